"""bench.py: the compare runner on a synthetic dataset, its spike count, the variant
names, and the cache replay against a direct count."""

import json
import os
import statistics
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402
import configurator  # noqa: E402
import train  # noqa: E402
from test_train import make_dataset, write_dataset  # noqa: E402


def test_loss_spikes_counts_steps_above_the_running_mean():
    losses = [2.0] * 60 + [3.0] + [2.0] * 10 + [2.3] + [2.0] * 5
    assert bench.loss_spikes(losses, margin=0.2, warmup=50) == 1      # 3.0 > 1.2 * 2.0; 2.3 is not
    assert bench.loss_spikes(losses, margin=0.1, warmup=50) == 2      # 2.3 > 1.1 * ~2.02 too
    assert bench.loss_spikes([5.0] * 10 + [9.0], margin=0.2, warmup=50) == 0   # inside the warmup


def test_variant_names():
    assert bench.variant_overrides("stem:half") == {"ffn": "stem", "stem_layers": "half"}
    assert bench.variant_overrides("moe:8x2") == {"ffn": "moe", "n_experts": 8, "moe_top_k": 2, "stem_layers": "full"}
    assert bench.variant_overrides("hash_moe:16")["moe_top_k"] == 1
    with pytest.raises(configurator.UsageError, match="unknown variant"):
        bench.variant_overrides("switch:8")


def test_compare_trains_every_variant_on_the_same_tokens(tmp_path):
    data = make_dataset(tmp_path / "d")
    out = tmp_path / "cmp"
    extra = "--block_size=16 --n_layer=3 --n_head=2 --n_embd=32 --batch_size=4 --eval_iters=2 --warmup_iters=2"
    rows = bench.main(["--mode=compare", f"--dataset={data}", f"--out_dir={out}", "--max_iters=12", "--device=cpu",
                       "--variants=dense,stem:full,hash_moe:4", f"--train_args={extra}"])
    assert [r["variant"] for r in rows] == ["dense", "stem:full", "hash_moe:4"]
    saved = json.loads((out / "results.json").read_text())
    assert [r["variant"] for r in saved] == [r["variant"] for r in rows]
    assert "| stem:full |" in (out / "results.md").read_text()
    dense, stem_full, hash_moe = rows
    # the same tokens: every curve has one point per step at the same token count
    assert [len(r["curve"]) for r in rows] == [12, 12, 12]
    # FLOPs: STEM saves one d x d_ff matmul pair per STEM layer; Hash-MoE top-1 costs as dense
    d, d_ff, n_sparse = 32, 128, 2
    assert dense["flops_per_token"] - stem_full["flops_per_token"] == n_sparse * 2 * d * d_ff
    assert hash_moe["flops_per_token"] == dense["flops_per_token"]
    assert hash_moe["active_params"] == dense["active_params"]
    assert hash_moe["total_params"] == dense["total_params"] + n_sparse * 3 * 3 * d * d_ff
    for r in rows:
        assert np.isfinite(r["val_loss"]) and r["tokens_per_sec"] > 0


def test_cache_replay_counts_hits_directly():
    """A full-size cache misses each id once (the first time it is seen): the token-hit
    count of the warm half is then every token whose id appeared before."""
    rng = np.random.default_rng(0)
    stream = [rng.integers(0, 50, size=(2, 8)) for _ in range(20)]
    totals = bench.lfu_replay(stream, 50, n_cached=50, n_transient=16)
    seen, hits, misses, tokens = set(), 0, 0, 0
    for i, ids in enumerate(stream):
        unique = set(ids.ravel().tolist())
        if i >= 10:
            tokens += ids.size
            hits += sum(int(t) in seen for t in ids.ravel())
            misses += len(unique - seen)
        seen |= unique
    assert totals["tokens"] == tokens and totals["token_hits"] == hits and totals["misses"] == misses


def test_train_and_decode_modes_run_on_cpu(capsys):
    runners = bench.main(["--mode=train", "--steps=1", "--rounds=2", "--warmup=1", "--batch_size=2", "--device=cpu"])
    assert [r.name for r in runners] == ["dense", "stem-full adamw", "stem-full resident", "stem-full offload"]
    # the dense model's last round closes the run: every other model's round lies between two of
    # dense's, and its ratio is set against them
    dense_times = [t for t, _ in runners[0].rounds]
    assert len(dense_times) == 3 and all(len(r.rounds) == 2 for r in runners[1:])
    assert all(dense_times[k] < r.rounds[k][0] < dense_times[k + 1] for r in runners[1:] for k in range(2))
    assert runners[0].ratio == 1.0
    assert runners[2].ratio == bench.drift_corrected_ratio(runners[2].rounds, runners[0].rounds)
    # resident and offloaded lazy-AdamW runners saw the same batches: the same tables after
    # (to float tolerance: Adam turns last-bit differences into ~1e-6 ones within two steps)
    tables = [r.raw_model.tables.tensors()["weight"] for r in runners[2:]]
    assert torch.equal(tables[1], tables[0])
    assert not torch.equal(tables[0], runners[1].raw_model.tables.weight)     # dense AdamW moves every row
    results = bench.main(["--mode=decode", "--new_tokens=4", "--rounds=1", "--warmup=1", "--prompt_tokens=16",
                          "--batch_size=2", "--device=cpu"])
    assert set(results) == {"resident", "offload"}
    assert "offloaded tokens identical to resident: True" in capsys.readouterr().out


def test_drift_corrected_ratio_cancels_a_linear_drift_and_ignores_a_burst_in_one_model_round():
    slowdown = lambda t: 1 + 0.04 * t                  # the machine slows by 4% a second
    dense = [(t, 2.0 * slowdown(t)) for t in (0.0, 10.0, 20.0, 30.0)]     # the last dense round closes the run
    model = [(t, 1.8 * slowdown(t)) for t in (5.0, 12.5, 27.0)]         # truly 0.9 of the dense step
    assert bench.drift_corrected_ratio(model, dense) == pytest.approx(0.9, rel=1e-12)
    # medians of all steps against each other keep the drift in
    naive = statistics.median(s for _, s in model) / statistics.median(s for _, s in dense)
    assert abs(naive - 0.9) > 0.05
    # a round that ran during a burst of neighbours' load is one sample of three: the median drops it
    model[1] = (12.5, 1.8 * slowdown(12.5) * 1.5)
    assert bench.drift_corrected_ratio(model, dense) == pytest.approx(0.9, rel=1e-12)
    with pytest.raises(ValueError, match="no dense round before and after"):
        bench.drift_corrected_ratio([(31.0, 2.0)], dense)


def test_train_mode_in_fresh_processes_reports_the_median_of_their_ratios(capfd):
    # capfd, not capsys: the spawned processes write to the file descriptor they inherit
    ratios = bench.main(["--mode=train", "--steps=1", "--rounds=1", "--warmup=1", "--batch_size=2",
                         "--device=cpu", "--tables=resident", "--processes=3"])
    out = capfd.readouterr().out
    assert list(ratios) == ["dense", "stem-full adamw", "stem-full resident"]
    assert all(len(values) == 3 for values in ratios.values())
    assert ratios["dense"] == [1.0, 1.0, 1.0]
    # the summary line is the median of the per-process ratios that each process's table printed
    printed = [float(line.split()[-3]) for line in out.splitlines()     # the per-process table rows
               if line.startswith("stem-full resident ") and len(line.split()) == 10]
    assert len(printed) == 3
    assert [round(v, 3) for v in ratios["stem-full resident"]] == printed
    summary = next(line for line in out.splitlines() if line.startswith("stem-full resident") and "(" in line)
    assert float(summary.split()[2]) == round(statistics.median(printed), 3)
    with pytest.raises(SystemExit, match="'processes' must be >= 1"):
        bench.main(["--mode=train", "--processes=0"])


def test_copy_engine_stalls_replay_a_gpu_timeline():
    """Hand-worked timelines (GPU 10 s a micro-batch; copies in seconds)."""
    load = lambda seconds, key: {"out": [], "in": [("copy", seconds), ("mark", key)]}
    # each micro-batch's 5 s of loads end inside the GPU's 10 s, except the very first
    assert bench.copy_engine_stalls([load(5, 0), load(5, 1), load(5, 2)], 10) == [5, 0, 0]
    # micro-batch 2's copies may start only once micro-batch 0 has computed (t = 10), not
    # at t = 0: 15 s of loads end at 25, 5 s after micro-batch 1 has computed
    assert bench.copy_engine_stalls([load(0, 0), load(0, 1), load(15, 2)], 10) == [0, 0, 5]
    # 30 s of write-backs (mark "a") on the other engine delay micro-batch 2's loads only
    # if they wait for them: then from 10 to 30, and its rows arrive at 35, 15 s after
    # micro-batch 1 has computed
    burst = {"out": [("copy", 30), ("mark", "a")], "in": [("copy", 2), ("mark", 1)]}
    after = {"out": [], "in": [("wait", "a"), ("copy", 5), ("mark", 2)]}
    assert bench.copy_engine_stalls([load(0, 0), burst, after], 10) == [0, 0, 15]
    assert bench.copy_engine_stalls([load(0, 0), burst, load(5, 2)], 10) == [0, 0, 0]


def test_pipeline_mode_runs_on_a_small_dataset(tmp_path, capsys):
    tokens = np.random.default_rng(0).zipf(1.3, 60_000) % 2048
    data = write_dataset(tmp_path / "d", tokens.astype(np.uint16), 2048)
    result = bench.main(["--mode=pipeline", "--preset=tiny", f"--dataset={data}", "--batch_size=2",
                         "--micro_batches=8", "--warmup=2", "--layers=2", "--table_cache_fraction=0.05"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("pipeline: main thread ")
    config = bench.stem_config(bench.PRESETS["tiny"], bench.BenchConfig(preset="tiny"))
    n_stem = len(config.stem_layer_ids)
    # bytes are reported for all STEM layers: rows moved x (weights + 2 moments) x n_stem x d_ff x 4 B
    row_bytes = 3 * n_stem * config.d_ff * 4
    assert result["misses"] > 0 and result["h2d_gib"] * 2**30 == pytest.approx(result["misses"] * row_bytes)
    assert result["d2h_gib"] > 0 and result["layers"] == 2 and result["main_ms"] > 0
