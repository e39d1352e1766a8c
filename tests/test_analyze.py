"""analyze.py: the |cos| statistics against a float64 numpy reference, the distinct-row
counts against Python sets, and the CLI on tiny trained checkpoints."""


import numpy as np
import pytest
import torch

import analyze
import probes
import stem
import train
from test_train import make_dataset, tiny_args


def test_abs_cosine_stats_match_numpy_on_the_same_pairs():
    vectors = torch.randn(50, 7)
    stats = probes.abs_cosine_stats(vectors, n_pairs=3000, seed=3)
    # redraw the same pairs, then compute |cos| in float64 numpy
    generator = torch.Generator().manual_seed(3)
    i = torch.randint(50, (3000,), generator=generator).numpy()
    j = (i + torch.randint(1, 50, (3000,), generator=generator).numpy()) % 50
    assert (i != j).all()
    v = vectors.double().numpy()
    cos = np.abs((v[i] * v[j]).sum(1) / (np.linalg.norm(v[i], axis=1) * np.linalg.norm(v[j], axis=1)))
    assert stats["mean"] == pytest.approx(cos.mean(), abs=1e-12)
    assert stats["p50"] == pytest.approx(np.quantile(cos, 0.5), abs=1e-12)
    assert stats["p95"] == pytest.approx(np.quantile(cos, 0.95), abs=1e-12)


def test_abs_cosine_stats_on_known_geometry():
    orthogonal = probes.abs_cosine_stats(torch.eye(16) * 3.0)
    parallel = probes.abs_cosine_stats(torch.tensor([[1.0, 2.0], [-2.0, -4.0], [0.5, 1.0]]))
    assert orthogonal["p95"] == 0.0 and parallel["p50"] == pytest.approx(1.0)


def test_distinct_rows_by_length_counts_sets():
    tokens = np.random.default_rng(0).integers(0, 40, 500)
    got = analyze.distinct_rows_by_length(tokens, [4, 32], n_windows=20, seed=1)
    generator = torch.Generator().manual_seed(1)
    for length in (4, 32):
        starts = torch.randint(len(tokens) - length, (20,), generator=generator).tolist()
        assert got[length] == pytest.approx(np.mean([len(set(tokens[s:s + length])) for s in starts]))


def test_cli_reports_every_stem_layer_and_rejects_a_dense_checkpoint(tmp_path, capsys):
    data = make_dataset(tmp_path / "data")
    stem_out, dense_out = str(tmp_path / "stem"), str(tmp_path / "dense")
    train.main(tiny_args(data, stem_out, ffn="stem", stem_layers="full"))
    train.main(tiny_args(data, dense_out, ffn="dense"))
    rows, distinct = analyze.main([f"--out_dir={stem_out}", f"--dense_out_dir={dense_out}", f"--dataset={data}"])
    assert [layer for layer, _, _ in rows] == list(stem.select_layers("full", 3))
    for _, stem_stats, dense_stats in rows:
        assert 0 <= stem_stats["p50"] <= stem_stats["p95"] <= 1 and dense_stats is not None
    assert set(distinct) == {8, 16} and all(1 <= distinct[n] <= n for n in distinct)
    assert "|cos| between table rows" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="error: .* is a dense model"):
        analyze.main([f"--out_dir={dense_out}", f"--dataset={data}"])
    with pytest.raises(SystemExit, match="error: .*max_rows"):
        analyze.main([f"--out_dir={stem_out}", f"--dataset={data}", "--max_rows=1"])
