"""compare.py study: a tiny grid end to end (tables against the runs' own records), the
same batches for every variant of a seed, resume without redoing finished runs, the
probes against independent computations."""

import json
import math
import os
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import compare
import configurator
import probes
import report
import train
from model import GPTConfig
from moe import MoEConfig
from test_train import make_dataset
from training import TrainConfig

RECIPE = "--n_layer=2 --n_embd=32 --n_head=2 --block_size=16 --batch_size=4 --warmup_iters=2 --learning_rate=1e-2"


def study_args(data, tmp, **extra):
    args = dict(dataset=data, train_args=RECIPE, max_iters=6, seeds=2, variants="dense,stem:full",
                claims="tokens,geometry", eval_interval=3, eval_iters=2, probe_tokens=512, workers=2,
                study_dir=tmp / "study", out_dir=tmp / "out", results=tmp / "results.md", device="cpu")
    args.update(extra)
    return ["study"] + [f"--{k}={v}" for k, v in args.items()]


def table_rows(markdown, heading):
    """The rows of the first table under a heading: {first cell: [cells]}."""
    section = markdown[markdown.index(heading):]
    rows = {}
    for line in section.splitlines()[1:]:
        if line.startswith("## "):
            break
        if line.startswith("| ") and not line.startswith("| ---"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault(cells[0], cells[1:])
    return rows


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("study")
    data = make_dataset(tmp / "data")
    text = compare.main(study_args(data, tmp))
    return tmp, data, text


def test_the_tables_are_the_records_numbers(tiny_study):
    tmp, _, text = tiny_study
    records = {p[:-5]: json.loads((tmp / "study" / "runs" / p).read_text())
               for p in os.listdir(tmp / "study" / "runs")}
    assert sorted(records) == ["dense-s0", "dense-s1", "stem-full-s0", "stem-full-s1"]
    assert text in (tmp / "results.md").read_text()
    rows = table_rows(text, "## Claim 1")
    for variant, slug in (("dense", "dense"), ("stem:full", "stem-full")):
        losses = [records[f"{slug}-s{s}"]["probe_loss"] for s in (0, 1)]
        assert rows[variant][0] == "2"
        assert rows[variant][1] == f"{np.mean(losses):.4f} ± {np.std(losses, ddof=1):.4f}"
    # the paired effect and its interval, from the records: t(0.975, 1) = 12.706
    diffs = [records[f"stem-full-s{s}"]["probe_loss"] - records[f"dense-s{s}"]["probe_loss"] for s in (0, 1)]
    half = 12.7062 * np.std(diffs, ddof=1) / math.sqrt(2)
    effect, low, high = (float(v) for v in re.findall(r"[+-]\d+\.\d+", rows["stem:full"][2]))
    assert effect == pytest.approx(np.mean(diffs), abs=1e-4)
    assert (low, high) == (pytest.approx(np.mean(diffs) - half, abs=2e-4), pytest.approx(np.mean(diffs) + half, abs=2e-4))
    # one record's loss is the mean over the probe tokens of its own per-position losses
    for r in records.values():
        assert r["probe_tokens"] == 512 - 512 % 16 and len(r["losses"]) == 6
        assert np.mean(r["position_loss"]) == pytest.approx(r["probe_loss"], rel=1e-9)
    geometry = table_rows(text, "## Claim 5")
    p95 = [records[f"stem-full-s{s}"]["geometry"]["rows"]["p95"] for s in (0, 1)]
    assert geometry["stem:full table rows"][3] == f"{np.mean(p95):.3f} ± {np.std(p95, ddof=1):.3f}"
    assert not os.path.exists(tmp / "out" / "dense-s0")            # measured, then its checkpoint let go


def test_every_variant_of_a_seed_sees_the_same_batches(tiny_study, tmp_path):
    _, data, _ = tiny_study
    sc = compare.StudyConfig(**configurator.parse_overrides(study_args(data, tmp_path)[1:], compare.StudyConfig))
    runs = compare.grid(sc)
    streams = {}
    for run in runs:
        overrides = configurator.parse_overrides(run.args + [f"--out_dir={tmp_path / run.name}"],
                                                 TrainConfig, GPTConfig, MoEConfig)
        train_overrides, model_overrides = configurator.split_overrides(overrides, TrainConfig)
        model, _, loaders = train.build(train.resolve(TrainConfig(**train_overrides), model_overrides))
        loader = loaders["train"]
        streams[run.name] = [torch.cat([loader.next().x for _ in range(5)])]
    for seed in (0, 1):
        assert torch.equal(streams[f"dense-s{seed}"][0], streams[f"stem-full-s{seed}"][0])
    assert not torch.equal(streams["dense-s0"][0], streams["dense-s1"][0])


def test_a_resumed_study_trains_only_what_is_missing(tiny_study, tmp_path, monkeypatch):
    tmp, data, _ = tiny_study
    study_dir = tmp_path / "study"
    os.makedirs(study_dir / "runs")
    for name in ("dense-s0", "dense-s1", "stem-full-s0"):
        (study_dir / "runs" / f"{name}.json").write_text((tmp / "study" / "runs" / f"{name}.json").read_text())
    before = {p: os.stat(study_dir / "runs" / p).st_mtime_ns for p in os.listdir(study_dir / "runs")}
    trained = []
    real = compare.train_run
    monkeypatch.setattr(compare, "train_run", lambda args, out, **kw: trained.append(out) or real(args, out, **kw))
    compare.main(study_args(data, tmp_path, workers=1))     # timing runs and the missing run go through train_run
    after = {p: os.stat(study_dir / "runs" / p).st_mtime_ns for p in os.listdir(study_dir / "runs")}
    assert {p: after[p] for p in before} == before                  # finished records untouched
    assert sorted(after) == sorted(list(before) + ["stem-full-s1.json"])
    redo = json.loads((study_dir / "runs" / "stem-full-s1.json").read_text())
    first = json.loads((tmp / "study" / "runs" / "stem-full-s1.json").read_text())
    assert redo["losses"] == first["losses"] and redo["probe_loss"] == first["probe_loss"]   # the same run, bit for bit
    assert [os.path.basename(o) for o in trained] == ["_timing"]    # in this process: one timing run only


def test_a_record_from_other_flags_is_an_error(tiny_study, tmp_path):
    tmp, data, _ = tiny_study
    os.makedirs(tmp_path / "study" / "runs")
    record = json.loads((tmp / "study" / "runs" / "dense-s0.json").read_text())
    record["args"] = record["args"][:-1] + ["--max_iters=7"]
    (tmp_path / "study" / "runs" / "dense-s0.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="dense-s0.json was trained with other flags"):
        compare.main(study_args(data, tmp_path, dry_run=True))


def test_without_matplotlib_the_tables_are_still_written(tiny_study, tmp_path, monkeypatch):
    tmp, data, text = tiny_study
    monkeypatch.setattr(report, "pyplot", lambda: None)
    args = study_args(data, tmp_path, study_dir=tmp / "study", results=tmp_path / "r.md", train=False)
    again = compare.main(args)
    assert "![" not in again
    assert table_rows(again, "## Claim 1") == table_rows(text, "## Claim 1")


def test_bad_study_flags_are_one_line_errors(tmp_path):
    for flag, message in (("--claims=tokens,speed", "unknown claim 'speed'"),
                          ("--ablations=up", "ablations takes stem variants other than up"),
                          ("--stability_lrs=1e-2,x", "stability_lrs takes comma-separated numbers"),
                          ("--variants=dense,switch:8", "unknown variant")):
        with pytest.raises(SystemExit, match=message):
            compare.main(["study", flag, "--dry_run=True"])


# -- probes ---------------------------------------------------------------------

def test_loss_by_position_is_the_cross_entropy_of_each_position():
    torch.manual_seed(0)
    from model import GPT
    model = GPT(GPTConfig(vocab_size=50, n_layer=2, n_head=2, n_embd=16, block_size=8)).eval()
    tokens = torch.randint(50, (8 * 5 + 3,))
    per_position, n = probes.loss_by_position(model, tokens, max_tokens=40, batch_size=2)
    assert n == 40
    windows = tokens[:41]
    expected = torch.zeros(8, dtype=torch.float64)
    with torch.no_grad():
        for w in range(5):
            x, y = windows[w * 8:(w + 1) * 8], windows[w * 8 + 1:(w + 1) * 8 + 1]
            logits = model(x[None], y[None])[0][0].double()
            expected += F.cross_entropy(logits, y, reduction="none")
    torch.testing.assert_close(per_position, expected / 5, rtol=1e-5, atol=1e-6)
    assert probes.bucket_means(torch.arange(8.0), 4) == [0.5, 2.5, 4.5, 6.5]


def test_retrieval_prompts_hold_the_answer_and_chance_is_a_quarter():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    words = ["".join("abcdefghijklmnopqrstuvwxyz"[(7 * i + 3 * k) % 26] for k in range(5)) for i in range(30)]
    corpus = [" ".join(words) + f" = {w}\n" for w in words] * 5
    tokenizer.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=1000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    values = probes.single_token_values(tokenizer)
    assert values and all(tokenizer.encode(f" {v}").ids == [tokenizer.token_to_id("Ġ" + v)] for v in values)
    import random
    rng = random.Random(0)
    for length in (16, 48):
        ids, choice_ids, gold = probes.retrieval_prompt(rng, tokenizer, values, length)
        text = tokenizer.decode(ids)
        key = text.rsplit("\n", 1)[1][:-2]                       # the query line "key ="
        answer = tokenizer.decode([choice_ids[gold]]).strip()
        assert len(ids) <= length and len(set(choice_ids)) == 4
        assert re.search(rf"(^|\n){key} = {answer}\n", text)

    class Uniform(torch.nn.Module):          # no information: picks by a random logit
        def __init__(self):
            super().__init__()
            self.generator = torch.Generator().manual_seed(0)

        def forward(self, idx):
            return torch.rand(1, 1, tokenizer.get_vocab_size(), generator=self.generator), None

    accuracy = probes.kv_retrieval(Uniform(), tokenizer, [32], n_prompts=2000)[32]
    assert abs(accuracy - 0.25) < 0.03                  # 4.6 sd of a binomial at n = 2000
