"""checkpoint.load_model maps the checkpoint, builds nothing twice, never reads the
optimiser moments, and offloaded tables never sit whole in the "device" pool."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

import checkpoint
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the 350M config's vocabulary and rows (d_ff 2816), one STEM layer, a small backbone
CONFIG = dict(vocab_size=50304, block_size=64, n_layer=2, n_head=2, n_embd=64, d_ff=2816, tie_embeddings=True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A train.py-style checkpoint whose table moments are large: the table is 540 MiB,
    its two moments 1,081 MiB."""
    torch.manual_seed(0)
    config = GPTConfig(**CONFIG)
    model = GPT(config)
    table = model.tables.weight.detach()
    state = {
        "model": model.state_dict(), "model_config": asdict(config), "train_config": {"dataset": "none"},
        "iter_num": 1, "meta": {"eos_id": 0, "dtype": "uint16", "vocab_size": config.vocab_size},
        "tokenizer_json": None, "optimizer": {},
        "table_optimizer": {"moments": {"exp_avg": torch.randn_like(table), "exp_avg_sq": torch.rand_like(table)},
                            "step_count": 1},
    }
    path = tmp_path_factory.mktemp("ckpt") / "ckpt.pt"
    torch.save(state, path)
    backbone = sum(p.numel() * 4 for name, p in model.named_parameters() if not name.startswith("tables."))
    return str(path), table.numel() * 4, backbone


CHILD = """
import resource, sys, torch
import checkpoint
torch.manual_seed(0)
x = torch.randint(0, 50304, (1, 8))

def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

with open("/proc/self/clear_refs", "w") as f:     # restart the peak from the current size
    f.write("5")
base = peak()
model, _ = checkpoint.load_model({path!r}, need_tokenizer=False, tables_at={tables!r}, cache_fraction=0.01)
with torch.no_grad():
    logits = model.generate(x, 4, temperature=0)
print(peak() - base, int(logits.sum()))
"""


def peak_rss_of_loading(path, tables):
    out = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT, path=path, tables=tables)],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    grew, checksum = out.stdout.split()
    return int(grew), int(checksum)


def test_loading_reads_the_weights_once_and_never_the_moments(saved):
    """Peak memory while loading and generating: below the weights' bytes (the bound that
    matters: a loader that read the moments would need 3x the table), and in fact far
    below the table, since the mapped tensors are read only where rows are used (a loader
    that built the model, initialised its table and then copied the checkpoint in would
    hold a whole table)."""
    path, table_bytes, backbone_bytes = saved
    for tables in ("resident", "offload"):
        grew, _ = peak_rss_of_loading(path, tables)
        assert grew < table_bytes + backbone_bytes + (64 << 20), (tables, grew)
        assert grew < table_bytes / 4, (tables, grew)
    assert peak_rss_of_loading(path, "resident")[1] == peak_rss_of_loading(path, "offload")[1]   # same tokens


def test_offloaded_loading_keeps_a_cache_not_the_table_on_the_device(saved):
    path, _, _ = saved
    model, _ = checkpoint.load_model(path, need_tokenizer=False, tables_at="offload", cache_fraction=0.01)
    tables = model.tables
    assert tables.pool["weight"].shape[0] < CONFIG["vocab_size"] // 10          # cache + one prefill's slots
    assert set(tables.pool) == {"weight"} and not any("exp_avg" in name for name in tables.allocated)
    assert tables.rows.host["weight"].shape[0] == CONFIG["vocab_size"]
    reference, _ = checkpoint.load_model(path, need_tokenizer=False)
    ids = torch.tensor([[5, 17, 50000, 5]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids, ids)[0], reference(ids, ids)[0], rtol=1e-5, atol=1e-5)
    assert reference.lm_head.weight is reference.wte.weight        # tied again after loading
