"""Reproducibility and robustness through the real entry points: identical runs give
identical bits with the row expansion multi-threaded, kill -9 and resume is bitwise exact,
a diverging run stops and keeps its last good checkpoint, and every kind of bad input is
a one-line `error: ...` that leaves checkpoints and data untouched."""

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
import train
import training
from test_train import make_dataset

# Large enough that the per-layer row expansion (B*T x d_ff = 512 x 192 elements) and its
# backward run on several threads, which is where nondeterminism would show.
SHAPE = dict(block_size=64, n_layer=3, n_head=2, n_embd=64, batch_size=8, eval_iters=2, log_interval=5,
             warmup_iters=5, learning_rate=1e-2, dropout=0.1, device="cpu")


def args_of(data, out, **extra):
    return [f"--{k}={v}" for k, v in {**SHAPE, "dataset": data, "out_dir": out, **extra}.items()]


def checkpoint_tensors(out):
    ckpt = torch.load(os.path.join(out, "ckpt.pt"), map_location="cpu", weights_only=False)
    tensors = dict(ckpt["model"])
    for i, state in ckpt["optimizer"]["state"].items():
        tensors.update({f"optimizer.{i}.{k}": v for k, v in state.items()})
    table_state = ckpt["table_optimizer"] or {}
    tensors.update({f"tables.{k}": v for k, v in table_state.get("moments", {}).items()})     # lazy AdamW
    for i, state in table_state.get("adamw", {}).get("state", {}).items():                   # dense AdamW
        tensors.update({f"tables.adamw.{i}.{k}": v for k, v in state.items()})
    return ckpt["iter_num"], tensors


def assert_bitwise_equal(out_a, out_b):
    iter_a, a = checkpoint_tensors(out_a)
    iter_b, b = checkpoint_tensors(out_b)
    assert iter_a == iter_b and a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} of {len(a)} tensors differ, e.g. {differ[:3]}"


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"), n_tokens=40_000)


# -- determinism ----------------------------------------------------------------

@pytest.mark.parametrize("table_args", [dict(), dict(table_optimizer="lazy_adamw"),
                                        dict(table_optimizer="lazy_adamw", tables="offload",
                                             table_cache_fraction=0.05)],
                         ids=["adamw", "lazy", "offload"])
def test_identical_runs_give_identical_bits(data, tmp_path, table_args):
    assert torch.get_num_threads() >= 2 or os.cpu_count() == 1
    for name in ("a", "b"):
        train.main(args_of(data, str(tmp_path / name), max_iters=12, eval_interval=6, **table_args))
    assert_bitwise_equal(str(tmp_path / "a"), str(tmp_path / "b"))
    # and the comparison can fail: another seed gives other bits
    train.main(args_of(data, str(tmp_path / "c"), max_iters=12, eval_interval=6, seed=5, **table_args))
    with pytest.raises(AssertionError):
        assert_bitwise_equal(str(tmp_path / "a"), str(tmp_path / "c"))


# -- kill -9 and resume ----------------------------------------------------------

@pytest.mark.parametrize("table_args", [dict(), dict(table_optimizer="lazy_adamw", tables="offload",
                                                     table_cache_fraction=0.05),
                                        dict(table_optimizer="adamw_catchup", tables="offload",
                                             table_cache_fraction=0.05)], ids=["resident", "offload", "catchup"])
def test_kill_9_then_resume_is_bitwise_exact(data, tmp_path, table_args):
    max_iters, every = 400, 20
    run = dict(max_iters=max_iters, eval_interval=every, **table_args)
    killed = str(tmp_path / "killed")
    ckpt = os.path.join(killed, "ckpt.pt")
    # the killed process also keeps freed memory (process-wide, so only in a child): that knob changes no bits
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py")]
                               + args_of(data, killed, cpu_keep_freed_memory=True, **run),
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not os.path.exists(ckpt) and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)        # as soon as the first checkpoint is on disk
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    killed_at, _ = checkpoint_tensors(killed)
    assert 0 < killed_at < max_iters
    train.main(args_of(data, killed, init_from="resume", **run))
    straight = str(tmp_path / "straight")
    train.main(args_of(data, straight, **run))
    assert_bitwise_equal(killed, straight)


# -- divergence --------------------------------------------------------------------

def test_diverging_run_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, capsys):
    out = str(tmp_path / "o")
    train.main(args_of(data, out, max_iters=10, eval_interval=5))
    ckpt = os.path.join(out, "ckpt.pt")
    good = file_digest(ckpt)
    # resume with a learning rate that blows the weights up to inf within a few steps
    with pytest.raises(SystemExit) as exit_info:
        train.main(args_of(data, out, init_from="resume", max_iters=200, eval_interval=5,
                           learning_rate=1e30, grad_clip=0.0, warmup_iters=0))
    message = str(exit_info.value.code)
    assert message.startswith("error: iter ") and "\n" not in message
    assert "not finite" in message and f"the last good checkpoint ({ckpt}, iter 10) is kept" in message
    bad_iter = int(message.split()[2].rstrip(":"))
    assert 10 < bad_iter <= 15          # named within a log interval of where it happened
    assert file_digest(ckpt) == good
    # the loss log shows nothing past the stop
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert max(r["iter"] for r in records) <= bad_iter + SHAPE["log_interval"]


def test_a_save_refuses_non_finite_weights(data, tmp_path, monkeypatch):
    """The second line of defence: weights gone non-finite while the loss and gradient
    norms read finite are still never saved."""
    out = str(tmp_path / "o")
    train.main(args_of(data, out, max_iters=6, eval_interval=3))
    good = file_digest(os.path.join(out, "ckpt.pt"))
    real_step = training.train_step

    def poisoning_step(model, *args):
        real_step(model, *args)
        with torch.no_grad():
            model.lm_head.weight[0, 0] = float("nan")
        return torch.ones(()), torch.ones(()), torch.ones(())      # a loss and norms that look fine

    monkeypatch.setattr(training, "train_step", poisoning_step)
    with pytest.raises(SystemExit, match=r"^error: iter 9: non-finite weights in \S+ .*not saved, the last good "
                                         r"checkpoint \(.*ckpt.pt, iter 6\) is kept$"):
        train.main(args_of(data, out, init_from="resume", max_iters=12, eval_interval=3))
    assert file_digest(os.path.join(out, "ckpt.pt")) == good


# -- bad input ---------------------------------------------------------------------

def run_script(script, *argv):
    """Run a command-line tool as a user would; return (exit code, stderr)."""
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                            timeout=300, cwd=ROOT)
    return result.returncode, result.stderr


def assert_one_line_error(code, stderr, expected):
    assert code != 0 and "Traceback" not in stderr, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and expected in lines[0], stderr


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    out = str(tmp_path_factory.mktemp("trained"))
    train.main(args_of(data, out, max_iters=4, eval_interval=4))
    return out


def broken_dataset(tmp_path, data, how):
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("train.bin", "val.bin", "meta.json"):
        (folder / name).write_bytes(open(os.path.join(data, name), "rb").read())
    meta = json.load(open(folder / "meta.json"))
    if how == "odd-size":
        with open(folder / "train.bin", "ab") as f:
            f.write(b"\x01")
    elif how == "too-short":
        np.zeros(10, dtype=np.uint16).tofile(folder / "val.bin")
    elif how == "meta-not-json":
        (folder / "meta.json").write_text('{"vocab_size": 64,')
    elif how == "meta-no-vocab":
        (folder / "meta.json").write_text(json.dumps({**meta, "vocab_size": None}))
    elif how == "missing-tokenizer":
        (folder / "meta.json").write_text(json.dumps({**meta, "tokenizer": "tokenizer.json"}))
    return str(folder)


@pytest.mark.parametrize("how, expected", [
    ("odd-size", "not a whole number of uint16 tokens"),
    ("too-short", "fewer than block_size + 2"),
    ("meta-not-json", "is not readable JSON"),
    ("meta-no-vocab", "vocab_size None is not a positive integer"),
    ("missing-tokenizer", "tokenizer.json, is missing"),
])
def test_broken_data_is_a_one_line_error(data, tmp_path, how, expected):
    broken = broken_dataset(tmp_path, data, how)
    before = {name: file_digest(os.path.join(broken, name)) for name in os.listdir(broken)}
    code, stderr = run_script("train.py", *args_of(broken, str(tmp_path / "o"), max_iters=2))
    assert_one_line_error(code, stderr, expected)
    assert {name: file_digest(os.path.join(broken, name)) for name in os.listdir(broken)} == before


@pytest.mark.parametrize("flag, expected", [
    ("--block_size=0", "'block_size' must be >= 1"),
    ("--batch_size=0", "'batch_size' must be >= 1"),
    ("--learning_rate=-1", "'learning_rate' must be > 0"),
    ("--table_cache_fraction=0", "'table_cache_fraction' must be > 0"),
    ("--table_cache_fraction=1.5", "'table_cache_fraction' must be <= 1"),
    ("--learning_rate=nan", "'learning_rate' must be a finite number"),
    ("--tables=disk", "'tables' must be one of resident | offload"),
    ("--n_layr=3", "unknown config key 'n_layr'"),
])
def test_out_of_range_knobs_are_one_line_errors_that_keep_the_checkpoint(data, trained, flag, expected):
    ckpt = os.path.join(trained, "ckpt.pt")
    good = file_digest(ckpt)
    code, stderr = run_script("train.py", f"--dataset={data}", f"--out_dir={trained}", "--device=cpu", flag)
    assert_one_line_error(code, stderr, expected)
    assert file_digest(ckpt) == good


def test_too_few_table_slots_is_a_one_line_error_naming_the_knob(data, tmp_path):
    code, stderr = run_script("train.py", *args_of(data, str(tmp_path / "o"), max_iters=2, table_optimizer="lazy_adamw",
                                                   tables="offload", table_cache_fraction=0.05,
                                                   table_transient_rows=1))
    assert_one_line_error(code, stderr, "raise --table_transient_rows")


def test_config_file_with_a_syntax_error(tmp_path):
    config = tmp_path / "bad.py"
    config.write_text("batch_size = 4\nlearning_rate = = 3\n")
    code, stderr = run_script("train.py", str(config))
    assert_one_line_error(code, stderr, f"config file {config}, line 2")


@pytest.mark.parametrize("script, flag, expected", [
    ("sample.py", "--max_new_tokens=-1", "'max_new_tokens' must be >= 0"),
    ("sample.py", "--temperature=-0.5", "'temperature' must be >= 0"),
    ("sample.py", "--table_cache_fraction=0", "'table_cache_fraction' must be > 0"),
    ("bench.py", "--steps=0", "'steps' must be >= 1"),
    ("analyze.py", "--max_rows=1", "'max_rows' must be >= 2"),
    ("data/facts/prepare.py", "--passes=0", "'passes' must be >= 1"),
    ("data/facts/evaluate.py", "--attributes=capital,colour", "unknown attribute 'colour'"),
    ("data/text/prepare.py", "--val_fraction=1.5", "'val_fraction' must be < 1"),
])
def test_every_script_checks_its_knobs(script, flag, expected):
    code, stderr = run_script(script, flag)
    assert_one_line_error(code, stderr, expected)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_damaged_checkpoints_are_one_line_errors_for_resume_and_sampling(data, trained, tmp_path, damage):
    out = tmp_path / "damaged"
    out.mkdir()
    good = open(os.path.join(trained, "ckpt.pt"), "rb").read()
    ckpt = out / "ckpt.pt"
    if damage == "truncated":
        ckpt.write_bytes(good[: len(good) // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all" * 100)
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    before = file_digest(ckpt)
    expected = "not a train.py checkpoint" if damage == "foreign" else "is not a readable checkpoint"
    code, stderr = run_script("train.py", *args_of(data, str(out), init_from="resume", max_iters=8))
    assert_one_line_error(code, stderr, expected)
    code, stderr = run_script("sample.py", f"--out_dir={out}", "--device=cpu")
    assert_one_line_error(code, stderr, expected)
    assert file_digest(ckpt) == before


def test_deterministic_knob_runs_on_cpu_and_changes_no_bits(data, tmp_path):
    """--deterministic=True makes torch refuse any op without a deterministic kernel: a run
    with it proves every op of the step has one, and on the CPU it gives the same bits."""
    for name, flag in (("plain", "False"), ("strict", "True")):
        train.main(args_of(data, str(tmp_path / name), max_iters=6, eval_interval=6, table_optimizer="lazy_adamw",
                           tables="offload", table_cache_fraction=0.05, deterministic=flag))
    assert not torch.are_deterministic_algorithms_enabled()      # restored after the run
    assert_bitwise_equal(str(tmp_path / "plain"), str(tmp_path / "strict"))
