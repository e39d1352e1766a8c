"""
Table analysis: the geometry of STEM's table rows against the dense twin's up-projection
outputs, and how many distinct rows a sequence activates.

    python analyze.py --out_dir=out-facts --dense_out_dir=out-facts-dense [--dataset=facts]

The paper finds STEM rows nearly orthogonal (pairwise |cos| P95 about 0.03) against about
0.15 for a dense FFN's up-projection outputs `W_up x`. Rows are those of ids that occur in
the val split; the dense outputs are taken on val text. Writes table_analysis.png beside
the checkpoint if matplotlib is installed.
"""

import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import configurator
import data
import probes
from configurator import UsageError, knob


@dataclass
class AnalysisConfig:
    out_dir: str = knob("out-facts", help="the STEM checkpoint (its folder or the file)")
    dense_out_dir: str = knob("", help="its dense twin (optional), trained with --ffn=dense")
    dataset: str = knob("facts", help="whose val split gives the ids and the text")
    max_rows: int = knob(2000, ge=2, help="table rows sampled (ids seen in val)")
    seed: int = knob(0, ge=0, help="the draws of rows, pairs and windows")

    def __post_init__(self):
        configurator.check(self)


def distinct_rows_by_length(tokens, lengths, n_windows=200, seed=0):
    """Mean number of distinct token ids (so distinct table rows per STEM layer) in
    windows of each length drawn from a 1-D token array."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.as_tensor(tokens, dtype=torch.long)
    out = {}
    for length in lengths:
        starts = torch.randint(len(tokens) - length, (n_windows,), generator=generator)
        out[length] = sum(tokens[s:s + length].unique().numel() for s in starts.tolist()) / n_windows
    return out


def dense_up_projection_stats(dense, tokens, layers, seed):
    """|cos| statistics of the dense model's W_up x outputs on val text, per layer."""
    outputs = probes.dense_up_projection_outputs(dense, tokens, layers)
    return {i: probes.abs_cosine_stats(o, seed=seed) for i, o in outputs.items()}


def analyze(ac):
    model, _ = checkpoint.load_model(ac.out_dir, need_tokenizer=False)
    meta = data.load_meta(ac.dataset)
    if model.tables is None:
        raise UsageError(f"{ac.out_dir} is a dense model; --out_dir takes a STEM checkpoint")
    val = data.tokens(ac.dataset, "val", meta["dtype"])
    tokens = torch.from_numpy(np.asarray(val[: 200_000]).astype(np.int64))
    if tokens.numel() and int(tokens.max()) >= model.config.vocab_size:
        raise UsageError(f"dataset '{ac.dataset}' has token ids beyond the model's vocabulary "
                         f"({model.config.vocab_size}): it is not the data this model was trained on")
    generator = torch.Generator().manual_seed(ac.seed)
    seen = tokens.unique()
    if len(seen) < 2:
        raise UsageError(f"dataset '{ac.dataset}' val split has fewer than 2 distinct tokens")
    ids = seen[torch.randperm(len(seen), generator=generator)[: ac.max_rows]]
    table = model.tables.read_rows(ids)                                   # (K, n_stem, d_ff)
    stem_layers = model.config.stem_layer_ids
    dense_stats = {}
    make_twin = (f"`python train.py --ffn=dense --out_dir={ac.dense_out_dir or 'out-facts-dense'}` with the STEM "
                 f"run's other flags")
    if not ac.dense_out_dir:
        print(f"no --dense_out_dir: STEM rows only; a dense twin to compare with comes from {make_twin}")
    elif not os.path.exists(checkpoint.path_of(ac.dense_out_dir)):
        raise UsageError(f"no dense twin at {checkpoint.path_of(ac.dense_out_dir)}: train one with {make_twin}")
    else:
        dense, _ = checkpoint.load_model(ac.dense_out_dir, need_tokenizer=False)
        if dense.config.ffn != "dense":
            raise UsageError(f"--dense_out_dir={ac.dense_out_dir} is not a dense model")
        dense_stats = dense_up_projection_stats(dense, tokens, [i for i in stem_layers if i < dense.config.n_layer],
                                                ac.seed)
    print(f"|cos| between table rows of {len(ids)} ids seen in val (paper: P95 about 0.03)")
    print(f"{'layer':>6}{'mean':>9}{'P50':>9}{'P95':>9}   dense up-proj outputs: mean / P50 / P95 (paper P95 ~0.15)")
    rows = []
    for slot, layer in enumerate(stem_layers):
        s = probes.abs_cosine_stats(table[:, slot], seed=ac.seed)
        d = dense_stats.get(layer)
        rows.append((layer, s, d))
        dense_text = f"{d['mean']:.3f} / {d['p50']:.3f} / {d['p95']:.3f}" if d else "-"
        print(f"{layer:>6}{s['mean']:>9.3f}{s['p50']:>9.3f}{s['p95']:>9.3f}   {dense_text}")
    lengths = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if n <= model.config.block_size and n < len(tokens)]
    distinct = distinct_rows_by_length(tokens, lengths, seed=ac.seed)
    print("distinct rows per STEM layer a sequence activates:")
    print("  " + "  ".join(f"T={n}: {distinct[n]:.1f}" for n in lengths))
    plot(ac, rows, distinct, lengths, bool(dense_stats))
    return rows, distinct


def plot(ac, rows, distinct, lengths, with_dense):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot written)")
        return
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r[0] for r in rows], [r[1]["p95"] for r in rows], "o-", label="STEM table rows")
    if with_dense:
        left.plot([r[0] for r in rows if r[2]], [r[2]["p95"] for r in rows if r[2]], "s-", label="dense up-proj outputs")
    left.set(xlabel="layer", ylabel="P95 |cos|", title="row similarity")
    left.legend()
    right.plot(lengths, [distinct[n] for n in lengths], "o-")
    right.set(xlabel="sequence length", ylabel="distinct rows per layer", xscale="log", yscale="log")
    path = os.path.join(ac.out_dir if os.path.isdir(ac.out_dir) else os.path.dirname(ac.out_dir), "table_analysis.png")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        return analyze(AnalysisConfig(**configurator.parse(argv, AnalysisConfig, doc=__doc__)))
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
