"""train.py: config overrides, data errors, optimiser groups, exact resume, atomic checkpoints."""

import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint
import configurator
import data
import train
import training
from model import GPTConfig
from moe import MoEConfig

VOCAB = 64


def make_dataset(folder, vocab_size=VOCAB, n_tokens=20_000, seed=0, bad_id=None):
    """A synthetic dataset with learnable structure: each next token is a fixed function
    of the current one, with a little noise."""
    rng = np.random.default_rng(seed)
    successor = rng.permutation(vocab_size)
    tokens = np.empty(n_tokens, dtype=np.uint16)
    tokens[0] = 0
    for i in range(1, n_tokens):
        tokens[i] = successor[tokens[i - 1]] if rng.random() < 0.9 else rng.integers(vocab_size)
    if bad_id is not None:
        tokens[::50] = bad_id
    return write_dataset(folder, tokens, vocab_size)


def write_dataset(folder, tokens, vocab_size):
    """train.bin (the first 90% of uint16 tokens), val.bin (the rest) and meta.json."""
    os.makedirs(folder, exist_ok=True)
    split = len(tokens) * 9 // 10
    tokens[:split].tofile(os.path.join(folder, "train.bin"))
    tokens[split:].tofile(os.path.join(folder, "val.bin"))
    with open(os.path.join(folder, "meta.json"), "w") as f:
        json.dump({"vocab_size": vocab_size, "dtype": "uint16", "eos_id": 0}, f)
    return str(folder)


def tiny_args(data, out, **extra):
    args = dict(dataset=data, out_dir=out, block_size=16, n_layer=3, n_head=2, n_embd=32,
                batch_size=4, max_iters=8, eval_interval=4, eval_iters=2, log_interval=2,
                warmup_iters=2, learning_rate=1e-2, device="cpu", dropout=0.1)
    args.update(extra)
    return [f"--{k}={v}" for k, v in args.items()]


# -- configuration ------------------------------------------------------------

def test_overrides_convert_types_and_later_wins(tmp_path):
    cfg = tmp_path / "c.py"
    cfg.write_text("n_layer = 3\nlearning_rate = 1\ncompile = True\nstem_layers = 'half'\n")
    o = configurator.parse_overrides([str(cfg), "--n_layer=5", "--compile=false", "--dropout=0.5"],
                              training.TrainConfig, GPTConfig)
    assert o == {"n_layer": 5, "learning_rate": 1.0, "compile": False, "stem_layers": "half", "dropout": 0.5}
    assert isinstance(o["learning_rate"], float)


@pytest.mark.parametrize("argv, message", [
    (["--batchsize=3"], "did you mean 'batch_size'"),
    (["--n_layer=abc"], "'n_layer' expects int, got 'abc'"),
    (["--compile=maybe"], "'compile' expects bool"),
    (["--n_layer"], "--key=value"),
    (["no_such_file.py"], "not found"),
])
def test_bad_flags_give_clear_errors(argv, message):
    with pytest.raises(configurator.UsageError, match=message):
        configurator.parse_overrides(argv, training.TrainConfig, GPTConfig)


def test_config_file_checks_types_and_keys(tmp_path):
    bad_type, bad_key = tmp_path / "t.py", tmp_path / "k.py"
    bad_type.write_text("n_layer = 'four'\n")
    bad_key.write_text("import os\nn_layers = 4\n")
    with pytest.raises(configurator.UsageError, match="'n_layer' expects int"):
        configurator.parse_overrides([str(bad_type)], training.TrainConfig, GPTConfig)
    with pytest.raises(configurator.UsageError, match="unknown config key 'n_layers'.*did you mean 'n_layer'"):
        configurator.parse_overrides([str(bad_key)], training.TrainConfig, GPTConfig)


def test_shipped_configs_parse_and_build():
    root = os.path.dirname(data.DATA_ROOT)
    for name in sorted(os.listdir(os.path.join(root, "config"))):
        overrides = configurator.parse_overrides([os.path.join(root, "config", name)], training.TrainConfig,
                                                 GPTConfig, MoEConfig)
        train_keys, model_keys = configurator.split_overrides(overrides, training.TrainConfig)
        training.TrainConfig(**train_keys)
        GPTConfig.from_dict(model_keys)


def test_main_exits_with_message_not_traceback(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset=" + str(tmp_path / "nothing"), "--out_dir=" + str(tmp_path / "o")])
    assert "missing train.bin, val.bin, meta.json" in str(e.value)
    with pytest.raises(SystemExit) as e:
        train.main(["--dataset=facts_typo"])
    assert "error:" in str(e.value)


def test_missing_prepared_data_names_the_prepare_command(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "DATA_ROOT", str(tmp_path))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "prepare.py").write_text("")
    with pytest.raises(configurator.UsageError, match=r"run `python .*mine/prepare.py` first"):
        data.load_meta("mine")


def test_out_of_range_token_in_data_is_a_clear_error(tmp_path):
    data = make_dataset(tmp_path / "d", bad_id=VOCAB + 5)
    for ffn in ("stem", "dense"):
        with pytest.raises(SystemExit) as e:
            train.main(tiny_args(data, str(tmp_path / "o"), ffn=ffn))
        assert f"token id {VOCAB + 5} is out of range for vocab_size {VOCAB}" in str(e.value)


def test_bad_model_value_is_a_usage_error(tmp_path):
    data = make_dataset(tmp_path / "d")
    with pytest.raises(SystemExit) as e:
        train.main(tiny_args(data, str(tmp_path / "o"), stem_layers="0,1"))
    assert "layer 0 stays dense" in str(e.value)


# -- optimiser, schedule, clipping -------------------------------------------

def test_lr_schedule_matches_formula():
    tc = training.TrainConfig(learning_rate=1.0, warmup_iters=10, max_iters=110, min_lr_ratio=0.1)
    assert training.lr_at(0, tc) == pytest.approx(1 / 11)
    assert training.lr_at(9, tc) == pytest.approx(10 / 11)
    assert training.lr_at(10, tc) == pytest.approx(1.0)
    assert training.lr_at(60, tc) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert training.lr_at(110, tc) == pytest.approx(0.1)
    assert training.lr_at(500, tc) == pytest.approx(0.1)


def test_optimizer_groups_and_table_defaults_follow_the_paper():
    from model import GPT
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=3, n_head=2, n_embd=32))
    tc = training.TrainConfig(weight_decay=0.05, table_lr_mult=2.0)
    groups = training.configure_optimizer(model, tc).param_groups
    grouped = [p for g in groups for p in g["params"]]
    # the backbone's AdamW holds every parameter but the tables, once
    assert len(grouped) + 1 == len(list(model.parameters())) and len({id(p) for p in grouped}) == len(grouped)
    assert all(p is not model.tables.weight for p in grouped)
    for g in groups:
        assert all((p.dim() >= 2) == (g["weight_decay"] > 0) for p in g["params"])
    # the tables' own dense AdamW: the backbone's decay (the paper), every row decays
    (table_group,) = model.tables.optimizer.param_groups
    assert table_group["params"] == [model.tables.weight] and table_group["weight_decay"] == 0.05
    assert training.TrainConfig(weight_decay=0.05, table_weight_decay=0.0).table_decay == 0.0


def test_tables_and_backbone_are_clipped_separately():
    from model import GPT
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=3, n_head=2, n_embd=32))
    training.configure_optimizer(model, training.TrainConfig())
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    model.tables.weight.grad.mul_(100.0)
    table = model.tables.weight.grad.norm().item()
    backbone = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters() if p is not model.tables.weight))
    norm = torch.nn.utils.clip_grad_norm_(training.backbone_parameters(model), 1.0)
    assert float(norm) == pytest.approx(backbone, rel=1e-5)
    after = math.sqrt(sum(p.grad.norm().item() ** 2 for p in model.parameters() if p is not model.tables.weight))
    assert after == pytest.approx(1.0, rel=1e-4)
    # the tables clip on their own norm in their step, before their AdamW runs
    seen = {}
    model.tables.optimizer.step = lambda: seen.update(norm=model.tables.weight.grad.norm().item(),
                                                      lr=model.tables.optimizer.param_groups[0]["lr"])
    assert float(model.tables.step(0.25, 0.5)) == pytest.approx(table, rel=1e-5)
    assert seen["norm"] == pytest.approx(0.5, rel=1e-4) and seen["lr"] == 0.25
    assert model.tables.weight.grad is None


def test_train_step_scales_the_table_learning_rate(tmp_path):
    from model import GPT
    dataset = make_dataset(tmp_path / "d")
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32))
    tc = training.TrainConfig(table_lr_mult=2.0, batch_size=2, grad_accum_steps=2)
    optimizer = training.configure_optimizer(model, tc)
    loader = data.BatchLoader(os.path.join(dataset, "train.bin"), "uint16", 2, 16, VOCAB, "cpu", 0, True)
    training.train_step(model, optimizer, loader, tc, 0.01, torch.autocast("cpu", enabled=False))
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.01]
    assert model.tables.optimizer.param_groups[0]["lr"] == 0.02
    assert loader.pending is not None          # the next micro-batch was drawn early, for its rows


# -- training, resume, checkpoints --------------------------------------------

def load_state(out):
    return torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)


def test_training_lowers_loss_and_logs(tmp_path):
    data = make_dataset(tmp_path / "d")
    out = str(tmp_path / "o")
    summary = train.main(tiny_args(data, out, max_iters=60, eval_interval=30, eval_iters=4))
    assert summary["val_loss"] < 0.6 * math.log(VOCAB)
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    steps = [r for r in records if "loss" in r]
    assert [r["iter"] for r in steps] == list(range(2, 61, 2))
    assert all(r["table_grad_norm"] is not None for r in steps)


def test_resume_is_bitwise_exact(tmp_path):
    """N steps straight == N/2 steps, stop, resume, N/2 steps (dropout on, so the RNG
    state must be restored as well as the data position and the optimiser)."""
    data = make_dataset(tmp_path / "d")
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    train.main(tiny_args(data, straight, max_iters=8, lr_decay_iters=8))
    train.main(tiny_args(data, split, max_iters=4, lr_decay_iters=8))
    train.main(tiny_args(data, split, max_iters=8, lr_decay_iters=8, init_from="resume"))
    a, b = load_state(straight), load_state(split)
    assert a["iter_num"] == b["iter_num"] == 8
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    # and a run that is not resumed differs (the comparison above can fail)
    other = str(tmp_path / "other")
    train.main(tiny_args(data, other, max_iters=8, lr_decay_iters=8, seed=7))
    assert not torch.equal(load_state(other)["model"]["wte.weight"], a["model"]["wte.weight"])


def test_resume_refuses_model_changes_and_missing_checkpoint(tmp_path):
    data = make_dataset(tmp_path / "d")
    out = str(tmp_path / "o")
    with pytest.raises(SystemExit, match="does not exist"):
        train.main(tiny_args(data, out, init_from="resume"))
    train.main(tiny_args(data, out, max_iters=2))
    with pytest.raises(SystemExit, match="cannot change model keys"):
        train.main(tiny_args(data, out, init_from="resume", n_embd=64))


def test_half_written_checkpoint_never_replaces_a_good_one(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save({"x": torch.arange(10)}, path)
    real_save = torch.save

    def crash_midway(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 truncated")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save({"x": torch.zeros(10)}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.equal(torch.load(path)["x"], torch.arange(10))
