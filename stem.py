"""
STEM: the feed-forward layer whose up-projection is a table row looked up by token id.

    dense SwiGLU:  y = W_down( SiLU(W_gate x) * (W_up x) )
    STEM:          y = W_down( SiLU(W_gate x) * U_l[t] )      t = input token id at x's position

U_l is a (vocab_size, d_ff) table of layer l. Rows reach the FFN through one narrow
interface: the model asks a table source for the rows of the batch's unique token ids
(`lookup(row_index) -> (U, n_stem, d_ff)`, the rows of row_index.unique_ids) and each layer
expands its slice to the batch's positions through the inverse index. `ResidentTables`
below is the source that keeps the tables as an ordinary parameter trained by dense AdamW;
tables.py has the one trained by lazy AdamW, its rows resident or in host memory
(offload.py). The FFN math never knows which one it talks to.
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
    unique_ids[inverse] == idx, both where the model runs; counts (U,) occurrences of each
    id and host_ids (U,) the same ids, on the host (None if not known: a table source that
    needs them copies unique_ids, a sync). Computed where the batch already is on the CPU.
    A table source keys the plan of a batch's rows by its RowIndex (prepare, then lookup).
    U changes from batch to batch: every RowIndex marks it dynamic for torch.compile, so
    that a compiled model traces one graph for all U instead of recompiling per size."""
    unique_ids: torch.Tensor
    inverse: torch.Tensor
    counts: torch.Tensor = None
    host_ids: torch.Tensor = None

    def __post_init__(self):
        if not torch.compiler.is_compiling():
            for t in (self.unique_ids, self.counts):
                if t is not None:
                    torch._dynamo.maybe_mark_dynamic(t, 0)

    @staticmethod
    @torch.compiler.disable     # a data-dependent size: under compile it runs eagerly, outside the graph
    def of(idx):
        unique_ids, inverse, counts = torch.unique(idx, sorted=True, return_inverse=True, return_counts=True)
        on_host = unique_ids.device.type == "cpu"
        return RowIndex(unique_ids, inverse, counts if on_host else None, unique_ids if on_host else None)

    def pin_memory(self):
        return RowIndex(self.unique_ids.pin_memory(), self.inverse.pin_memory(), self.counts, self.host_ids)

    def to(self, device, non_blocking=False):
        """The ids and inverse on `device`; counts and host ids stay on the host."""
        return RowIndex(self.unique_ids.to(device, non_blocking=non_blocking),
                        self.inverse.to(device, non_blocking=non_blocking), self.counts, self.host_ids)

    def ids_on_host(self):
        """(host ids, counts) as numpy arrays; counts of 1 when unknown."""
        ids = self.host_ids if self.host_ids is not None else self.unique_ids.cpu()
        counts = self.counts if self.counts is not None else torch.ones_like(ids)
        return ids.numpy(), counts.numpy()


class StemRows:
    """The looked-up rows of one batch for all STEM layers, and how to expand them."""

    def __init__(self, unique_rows, inverse):
        self.layer_rows = unique_rows.unbind(1)     # n_stem views (U, d_ff), one per STEM layer
        self.inverse = inverse                      # (B, T) indices into U

    def layer(self, slot):
        """Layer `slot`'s rows at every position: (U, d_ff) -> (B, T, d_ff). An embedding
        lookup: its backward adds the gradients of a row's positions into a (U, d_ff)
        gradient in position order (deterministic on the CPU), and the per-layer gradients
        are stacked into (U, n_stem, d_ff) once, not zero-filled at full size per layer."""
        return F.embedding(self.inverse, self.layer_rows[slot])


class ResidentTables(nn.Module):
    """All STEM tables as one parameter of shape (vocab_size, n_stem, d_ff), trained by
    dense AdamW (the paper's optimiser: every row decays and moves every step).
    Slice [:, k] is layer k's table U_k of shape (vocab_size, d_ff). The table-source
    interface: prepare(row_index) (nothing to do: every row is here), lookup(row_index),
    step(lr, max_norm), flush(); read_rows/write_rows for edits. `optimizer` (a
    torch.optim.AdamW over `weight`) is set by whoever trains it (training.build_tables)."""

    def __init__(self, vocab_size, n_stem, d_ff):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, n_stem, d_ff))
        self.optimizer = None
        self.reset_parameters()

    def reset_parameters(self):
        # Xavier-normal over each layer's whole (V, d_ff) matrix: std = sqrt(2 / (V + d_ff))
        vocab_size, _, d_ff = self.weight.shape
        nn.init.normal_(self.weight, mean=0.0, std=math.sqrt(2.0 / (vocab_size + d_ff)))

    def prepare(self, row_index):
        """Nothing to bring: every row is resident."""

    def lookup(self, row_index):
        """Rows of the batch's unique ids for every STEM layer: (U,) -> (U, n_stem, d_ff).
        Gathering unique ids once (instead of B*T rows per layer) is the dedup: the
        backward scatters U rows into the table's gradient, not B*T."""
        # index_select: a whole-row copy (several times faster than weight[unique_ids] on the
        # CPU), and its backward index_add_ is deterministic
        return self.weight.index_select(0, row_index.unique_ids)      # (U, n_stem, d_ff)

    def step(self, lr, max_norm=0.0, all_reduce=None):
        """Clip the table's gradient on its own norm, take an AdamW step, clear the
        gradient. Returns the norm (a tensor), None if no gradient came. all_reduce (a shard
        of a table, shards.py): sums a tensor over the shards, so the norm is the whole
        table's, and a shard that no batch read still steps (its rows decay, as in one
        process)."""
        if all_reduce is None:
            if self.weight.grad is None:
                return None
            norm = torch.nn.utils.clip_grad_norm_([self.weight], max_norm if max_norm > 0 else float("inf"))
        else:
            if self.weight.grad is None:
                self.weight.grad = torch.zeros_like(self.weight)
            norm = all_reduce(torch.linalg.vector_norm(self.weight.grad).square()).sqrt()
            if max_norm > 0:
                self.weight.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def flush(self):
        """Nothing to write back."""

    def optimizer_state(self):
        """The AdamW state; before the first step, the state it would have after none
        (zero moments), so that the structure a checkpoint fills is always whole."""
        state = self.optimizer.state_dict()
        if not state["state"]:
            fused = self.optimizer.param_groups[0].get("fused")
            state["state"] = {0: {"step": torch.zeros((), dtype=torch.float32,
                                                      device=self.weight.device if fused else "cpu"),
                                  "exp_avg": torch.zeros_like(self.weight), "exp_avg_sq": torch.zeros_like(self.weight)}}
        return {"adamw": state}

    def load_optimizer_state(self, state):
        self.optimizer.load_state_dict(state["adamw"])

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
