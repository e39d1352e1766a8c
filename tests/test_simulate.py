"""simulate.py: the cache replay against a direct count, the GPU-timeline replay of the
copy engines on hand-worked timelines, and the pipeline simulation on a small dataset."""

import numpy as np
import pytest

import simulate
from model import GPTConfig
from test_train import write_dataset


def test_cache_replay_counts_hits_directly():
    """A full-size cache misses each id once (the first time it is seen): the token-hit
    count of the warm half is then every token whose id appeared before."""
    rng = np.random.default_rng(0)
    stream = [rng.integers(0, 50, size=(2, 8)) for _ in range(20)]
    totals = simulate.lfu_replay(stream, 50, n_cached=50, n_transient=16)
    seen, hits, misses, tokens = set(), 0, 0, 0
    for i, ids in enumerate(stream):
        unique = set(ids.ravel().tolist())
        if i >= 10:
            tokens += ids.size
            hits += sum(int(t) in seen for t in ids.ravel())
            misses += len(unique - seen)
        seen |= unique
    assert totals["tokens"] == tokens and totals["token_hits"] == hits and totals["misses"] == misses


def test_copy_engine_stalls_replay_a_gpu_timeline():
    """Hand-worked timelines (GPU 10 s a micro-batch; copies in seconds)."""
    load = lambda seconds, key: {"out": [], "in": [("copy", seconds), ("mark", key)]}
    # each micro-batch's 5 s of loads end inside the GPU's 10 s, except the very first
    assert simulate.copy_engine_stalls([load(5, 0), load(5, 1), load(5, 2)], 10) == [5, 0, 0]
    # micro-batch 2's copies may start only once micro-batch 0 has computed (t = 10), not
    # at t = 0: 15 s of loads end at 25, 5 s after micro-batch 1 has computed
    assert simulate.copy_engine_stalls([load(0, 0), load(0, 1), load(15, 2)], 10) == [0, 0, 5]
    # 30 s of write-backs (mark "a") on the other engine delay micro-batch 2's loads only
    # if they wait for them: then from 10 to 30, and its rows arrive at 35, 15 s after
    # micro-batch 1 has computed
    burst = {"out": [("copy", 30), ("mark", "a")], "in": [("copy", 2), ("mark", 1)]}
    after = {"out": [], "in": [("wait", "a"), ("copy", 5), ("mark", 2)]}
    assert simulate.copy_engine_stalls([load(0, 0), burst, after], 10) == [0, 0, 15]
    assert simulate.copy_engine_stalls([load(0, 0), burst, load(5, 2)], 10) == [0, 0, 0]


def test_pipeline_mode_runs_on_a_small_dataset(tmp_path, capsys):
    tokens = np.random.default_rng(0).zipf(1.3, 60_000) % 2048
    data = write_dataset(tmp_path / "d", tokens.astype(np.uint16), 2048)
    config_file = tmp_path / "tiny.py"
    config_file.write_text("vocab_size = 2048\nblock_size = 128\nn_layer = 4\nn_head = 4\nn_embd = 256\n"
                           "batch_size = 3\n")           # (a training key: ignored)
    result = simulate.main(["--mode=pipeline", f"--config={config_file}", f"--dataset={data}", "--batch_size=2",
                            "--micro_batches=8", "--warmup=2", "--layers=2", "--table_cache_fraction=0.05"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1].startswith("pipeline: main thread ")
    config = GPTConfig(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=256)
    n_stem = len(config.stem_layer_ids)
    # bytes are reported for all STEM layers: rows moved x (weights + 2 moments) x n_stem x d_ff x 4 B
    row_bytes = 3 * n_stem * config.d_ff * 4
    assert result["misses"] > 0 and result["h2d_gib"] * 2**30 == pytest.approx(result["misses"] * row_bytes)
    assert result["d2h_gib"] > 0 and result["layers"] == 2 and result["main_ms"] > 0
