"""compare.py: the comparison runner on a synthetic dataset (each variant a train.py
process), its spike count, and the variant names."""

import json

import numpy as np
import pytest

import compare
import configurator
from test_train import make_dataset


def test_loss_spikes_counts_steps_above_the_running_mean():
    losses = [2.0] * 60 + [3.0] + [2.0] * 10 + [2.3] + [2.0] * 5
    assert compare.loss_spikes(losses, margin=0.2, warmup=50) == 1      # 3.0 > 1.2 * 2.0; 2.3 is not
    assert compare.loss_spikes(losses, margin=0.1, warmup=50) == 2      # 2.3 > 1.1 * ~2.02 too
    assert compare.loss_spikes([5.0] * 10 + [9.0], margin=0.2, warmup=50) == 0   # inside the warmup


def test_variant_names():
    assert compare.variant_overrides("stem:half") == {"ffn": "stem", "stem_layers": "half"}
    assert compare.variant_overrides("moe:8x2") == {"ffn": "moe", "n_experts": 8, "moe_top_k": 2, "stem_layers": "full"}
    assert compare.variant_overrides("hash_moe:16")["moe_top_k"] == 1
    with pytest.raises(configurator.UsageError, match="unknown variant"):
        compare.variant_overrides("switch:8")


def test_compare_trains_every_variant_on_the_same_tokens(tmp_path):
    data = make_dataset(tmp_path / "d")
    out = tmp_path / "cmp"
    extra = "--block_size=16 --n_layer=3 --n_head=2 --n_embd=32 --batch_size=4 --eval_iters=2 --warmup_iters=2"
    rows = compare.main([f"--dataset={data}", f"--out_dir={out}", "--max_iters=12", "--device=cpu",
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
