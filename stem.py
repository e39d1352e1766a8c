"""
STEM: the feed-forward layer whose up-projection is a table row looked up by token id.

    dense SwiGLU:  y = W_down( SiLU(W_gate x) * (W_up x) )
    STEM:          y = W_down( SiLU(W_gate x) * U_l[t] )      t = input token id at x's position

U_l is a (vocab_size, d_ff) table of layer l. Rows reach the FFN through one narrow
interface: the model asks a table source for the rows of the batch's unique token ids
(`lookup(unique_ids) -> (U, n_stem, d_ff)`) and each layer expands its slice to the
batch's positions through the inverse index. `ResidentTables` below is the source that
keeps the tables as an ordinary parameter; offload.py provides one that keeps them in
host memory. The FFN math never knows which one it talks to.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# up: the paper's STEM. gate: the table replaces W_gate x inside the SiLU (the paper finds
# it worse than dense). up+table: STEM-dagger, W_up x + U_l[t] (more FLOPs, no gain).
VARIANTS = ("up", "gate", "up+table")


def ffn_matmuls(variant):
    """How many of the three d_model x d_ff matmuls a STEM FFN of this variant keeps."""
    return 3 if variant == "up+table" else 2


def select_layers(spec, n_layer):
    """Which layers get a STEM FFN. Layer 0 always stays dense.
    full: 1..L-1; half: odd layers; third: every third layer starting at 1; none;
    or an explicit comma-separated list such as "1,3,5"."""
    spec = str(spec).strip()
    if spec == "none":
        return ()
    if spec == "full":
        return tuple(range(1, n_layer))
    if spec == "half":
        return tuple(range(1, n_layer, 2))
    if spec == "third":
        return tuple(range(1, n_layer, 3))
    try:
        layers = tuple(sorted({int(s) for s in spec.replace(" ", "").split(",") if s}))
    except ValueError:
        raise ValueError(f"stem_layers must be none|third|half|full or a list like '1,3,5', got {spec!r}") from None
    bad = [i for i in layers if not 1 <= i < n_layer]
    if bad:
        raise ValueError(f"stem_layers {bad} out of range: STEM layers are 1..{n_layer - 1} (layer 0 stays dense)")
    return layers


def check_ids(ids, vocab_size):
    """Raise a clear error for token ids outside [0, vocab_size)."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        bad = int(ids.max()) if int(ids.max()) >= vocab_size else int(ids.min())
        raise ValueError(f"token id {bad} is out of range for vocab_size {vocab_size}")


@dataclass
class RowIndex:
    """The dedup of a batch: unique_ids (U,) sorted, inverse (B, T) with
    unique_ids[inverse] == idx, counts (U,) occurrences of each id (None if unknown).
    Computed where the batch already is on the CPU."""
    unique_ids: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor = None

    @staticmethod
    def of(idx):
        unique_ids, inverse, counts = torch.unique(idx, sorted=True, return_inverse=True, return_counts=True)
        return RowIndex(unique_ids, inverse, counts)

    def to(self, device, non_blocking=False):
        return RowIndex(self.unique_ids.to(device, non_blocking=non_blocking),
                        self.inverse.to(device, non_blocking=non_blocking), self.counts)


class StemRows:
    """The looked-up rows of one batch for all STEM layers, and how to expand them."""

    def __init__(self, unique_rows, inverse):
        self.unique_rows = unique_rows      # (U, n_stem, d_ff)
        self.inverse = inverse              # (B, T) indices into U

    def layer(self, slot):
        # gather U rows once, expand per position here: (U, d_ff) -> (B, T, d_ff)
        return self.unique_rows[:, slot][self.inverse]


class ResidentTables(nn.Module):
    """All STEM tables as one parameter of shape (vocab_size, n_stem, d_ff).
    Slice [:, k] is layer k's table U_k of shape (vocab_size, d_ff)."""

    def __init__(self, vocab_size, n_stem, d_ff):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, n_stem, d_ff))
        self.reset_parameters()

    def reset_parameters(self):
        # Xavier-normal over each layer's whole (V, d_ff) matrix: std = sqrt(2 / (V + d_ff))
        vocab_size, _, d_ff = self.weight.shape
        nn.init.normal_(self.weight, mean=0.0, std=math.sqrt(2.0 / (vocab_size + d_ff)))

    def lookup(self, unique_ids):
        """Rows of the given ids for every STEM layer: (U,) -> (U, n_stem, d_ff).
        Gathering unique ids once (instead of B*T rows per layer) is the dedup: the
        backward scatters U rows into the table's gradient, not B*T."""
        return self.weight[unique_ids]

    def numel(self):
        return self.weight.numel()

    @torch.no_grad()
    def read_rows(self, ids):
        """A copy of the rows of `ids` for every layer: (K, n_stem, d_ff)."""
        return self.weight[torch.as_tensor(ids, device=self.weight.device)].clone()

    @torch.no_grad()
    def write_rows(self, ids, rows):
        self.weight[torch.as_tensor(ids, device=self.weight.device)] = rows.to(self.weight)


class StemFFN(nn.Module):
    """The FFN of a STEM layer; `rows` is (B, T, d_ff), this layer's table rows U_l[t]."""

    def __init__(self, config):
        super().__init__()
        self.variant = config.stem_variant
        d, d_ff = config.n_embd, config.d_ff
        if self.variant in ("up", "up+table"):
            self.gate = nn.Linear(d, d_ff, bias=False)
        if self.variant in ("gate", "up+table"):
            self.up = nn.Linear(d, d_ff, bias=False)
        self.down = nn.Linear(d_ff, d, bias=False)
        self.down.is_residual_output = True

    def forward(self, x, rows):
        # rows come in the table's dtype (fp32); cast to the matmul output's dtype so that
        # under bf16 autocast the product stays bf16 like the dense FFN's
        if self.variant == "up":
            g = self.gate(x)
            h = F.silu(g) * rows.to(g.dtype)                   # (B, T, d_ff)
        elif self.variant == "gate":
            u = self.up(x)
            h = F.silu(rows.to(u.dtype)) * u                   # (B, T, d_ff)
        else:  # up+table
            g, u = self.gate(x), self.up(x)
            h = F.silu(g) * (u + rows.to(u.dtype))             # (B, T, d_ff)
        return self.down(h)                                    # (B, T, C)


# -----------------------------------------------------------------------------
# knowledge editing: a fact is bound to a token's rows, so it can be changed by rows

def entity_ids(tokenizer, word):
    """Token ids of `word` as it occurs in running text (with its leading space)."""
    ids = tokenizer.encode(" " + word.strip()).ids
    if not ids:
        raise ValueError(f"'{word}' encodes to no tokens")
    return ids


class Edit:
    """Rows overwritten by an edit, saved so that undo restores them bit for bit."""

    def __init__(self, store, ids, saved):
        self.store, self.ids, self.saved = store, ids, saved

    def undo(self):
        self.store.write_rows(self.ids, self.saved)


def write_edit(store, ids, rows):
    """Write rows (K, ...) for ids (K,) into a row store (tables or an embedding) and
    return the Edit that undoes it."""
    if len(set(ids)) != len(ids):
        raise ValueError(f"an edit names token ids more than once: {ids}")
    edit = Edit(store, list(ids), store.read_rows(ids))
    store.write_rows(ids, rows)
    return edit


def swap_rows(store, source_ids, target_ids):
    """Give the source entity the target entity's rows in every STEM layer. With equal
    token counts the i-th source token takes the i-th target row; otherwise every source
    token takes the mean of the target's rows (the paper's rule). Returns the Edit."""
    target = store.read_rows(target_ids)                                 # (K_t, n_stem, d_ff)
    if len(source_ids) == len(target_ids):
        rows = target
    else:
        rows = target.mean(dim=0, keepdim=True).expand(len(source_ids), *target.shape[1:])
    return write_edit(store, source_ids, rows)


def inject_rows(store, ids, source_ids):
    """Write the mean of source_ids' rows into every token of ids (e.g. make a new word
    behave like the average of known entities). Returns the Edit."""
    mean = store.read_rows(source_ids).mean(dim=0, keepdim=True)
    return write_edit(store, ids, mean.expand(len(ids), *mean.shape[1:]))


class EmbeddingRows:
    """The input embedding as a row store: the closest analogue of a swap in a dense
    model (the control for what is specific to STEM)."""

    def __init__(self, embedding):
        self.embedding = embedding

    @torch.no_grad()
    def read_rows(self, ids):
        return self.embedding.weight[torch.as_tensor(ids, device=self.embedding.weight.device)].clone()

    @torch.no_grad()
    def write_rows(self, ids, rows):
        self.embedding.weight[torch.as_tensor(ids, device=self.embedding.weight.device)] = rows.to(self.embedding.weight)


# -----------------------------------------------------------------------------
# table analysis (the paper's figures: rows nearly orthogonal, |cos| P95 about 0.03,
# against about 0.15 for a dense FFN's up-projection outputs)

def abs_cosine_stats(vectors, n_pairs=20000, seed=0):
    """Mean, P50 and P95 of |cos| between random pairs of distinct rows of vectors (N, d)."""
    generator = torch.Generator().manual_seed(seed)
    n = vectors.size(0)
    i = torch.randint(n, (n_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n      # j != i
    v = F.normalize(vectors.double(), dim=-1)
    cos = (v[i] * v[j]).sum(-1).abs()
    return {"mean": cos.mean().item(), "p50": cos.quantile(0.5).item(), "p95": cos.quantile(0.95).item()}


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


def analyze(argv):
    """python stem.py --out_dir=STEM_CKPT [--dense_out_dir=DENSE_CKPT] [--dataset=facts]
    Pairwise |cos| of table rows per STEM layer (rows of ids that occur in the val split)
    against the dense twin's up-projection outputs on val text, and distinct rows per
    sequence length. Writes table_analysis.png beside the checkpoint if matplotlib exists."""
    import os
    import sys
    from dataclasses import dataclass

    import numpy as np

    import sample
    import train

    @dataclass
    class AnalysisConfig:
        out_dir: str = "out-facts"
        dense_out_dir: str = ""
        dataset: str = "facts"
        max_rows: int = 2000
        seed: int = 0

    try:
        ac = AnalysisConfig(**train.parse_overrides(argv, AnalysisConfig))
        model, _ = sample.load_checkpoint(ac.out_dir)
        meta = train.load_meta(ac.dataset)
    except train.UsageError as e:
        sys.exit(f"error: {e}")
    if model.tables is None:
        sys.exit(f"error: {ac.out_dir} is a dense model; --out_dir takes a STEM checkpoint")
    val = np.memmap(os.path.join(train.data_dir_of(ac.dataset), "val.bin"), dtype=meta["dtype"], mode="r")
    tokens = torch.from_numpy(np.asarray(val[: 200_000]).astype(np.int64))
    generator = torch.Generator().manual_seed(ac.seed)
    seen = tokens.unique()
    ids = seen[torch.randperm(len(seen), generator=generator)[: ac.max_rows]]
    table = model.tables.read_rows(ids)                                   # (K, n_stem, d_ff)
    stem_layers = model.config.stem_layer_ids
    print(f"|cos| between table rows of {len(ids)} ids seen in val (paper: P95 about 0.03)")
    print(f"{'layer':>6}{'mean':>9}{'P50':>9}{'P95':>9}   dense up-proj outputs: mean / P50 / P95 (paper P95 ~0.15)")
    dense_stats = {}
    if ac.dense_out_dir:
        dense, _ = sample.load_checkpoint(ac.dense_out_dir)
        outputs = {i: [] for i in stem_layers}
        hooks = [dense.blocks[i].ffn.up.register_forward_hook(
            lambda module, inputs, output, i=i: outputs[i].append(output.reshape(-1, output.size(-1))))
            for i in stem_layers]
        block = dense.config.block_size
        windows = tokens[: (len(tokens) // block) * block].view(-1, block)[:16]
        with torch.no_grad():
            dense(windows, windows)
        for h in hooks:
            h.remove()
        dense_stats = {i: abs_cosine_stats(torch.cat(outputs[i]), seed=ac.seed) for i in stem_layers}
    rows = []
    for slot, layer in enumerate(stem_layers):
        s = abs_cosine_stats(table[:, slot], seed=ac.seed)
        d = dense_stats.get(layer)
        rows.append((layer, s, d))
        dense_text = f"{d['mean']:.3f} / {d['p50']:.3f} / {d['p95']:.3f}" if d else "-"
        print(f"{layer:>6}{s['mean']:>9.3f}{s['p50']:>9.3f}{s['p95']:>9.3f}   {dense_text}")
    lengths = [n for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) if n <= model.config.block_size]
    distinct = distinct_rows_by_length(tokens, lengths, seed=ac.seed)
    print("distinct rows per STEM layer a sequence activates:")
    print("  " + "  ".join(f"T={n}: {distinct[n]:.1f}" for n in lengths))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no plot written)")
        return rows, distinct
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot([r[0] for r in rows], [r[1]["p95"] for r in rows], "o-", label="STEM table rows")
    if dense_stats:
        left.plot([r[0] for r in rows], [r[2]["p95"] for r in rows], "s-", label="dense up-proj outputs")
    left.set(xlabel="layer", ylabel="P95 |cos|", title="row similarity")
    left.legend()
    right.plot(lengths, [distinct[n] for n in lengths], "o-")
    right.set(xlabel="sequence length", ylabel="distinct rows per layer", xscale="log", yscale="log")
    path = os.path.join(ac.out_dir, "table_analysis.png")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}")
    return rows, distinct


if __name__ == "__main__":
    import sys
    analyze(sys.argv[1:])
