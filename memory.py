"""
The memory plan of a training run: what train.py will hold on the device and on the
host, by component, computed before anything is allocated (the model is built on the
meta device). docs/memory.md tells what it counts and how each count is tested.

    python train.py config/stem_350m.py --device=cuda --dry_run=True

The tables are planned exactly (tables.table_buffers); activations by a formula checked
against saved-tensor hooks; the working sets that come and go (only the largest counts)
are held to measured peaks in tests/test_working_sets.py; the rows in flight of offloaded
tables are measured on the run's own batches or estimated from a Zipf model.
Not counted: the CUDA context (~0.5 GiB) and the allocator's fragmentation; leave ~2 GiB.
"""

import functools
import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

import checkpoint
import data
import distributed
import shards
import tables
from configurator import UsageError
from model import GPT

GiB = 2 ** 30
MEASURE_STEPS = 200          # optimiser steps of windows drawn to measure the rows in flight
MARGIN = (0.10, 64)          # planned slots = max measured * 1.10 + 64: on data/text at 16 x 1024 x 5
                             # micro-batches the max over 2,000 steps is 1% above the max over 200
ZIPF_EXPONENT = 1.1          # without the data: token ranks ~ r^-1.1, i.i.d. (real text repeats itself
                             # within a window: the 50k stdlib BPE needs 7.2k rows where this says 12.7k)
# Working sets of offload.py's arithmetic, in rows of fp32 (n_stem, d_ff):
STEP_BYTES_PER_ROW = 8       # lazy AdamW step: the rows are updated where they lie; each touched row
                             # costs its fp32 gradient norm and that norm's place in their stack
CATCHUP_STEP_BYTES_PER_ROW = 8   # ... and with catch-up, its token id (int64), to stamp its step
CATCHUP_ROWS_PER_ROW = 7     # catch-up of a chunk: w, m, v, u, w*keep, move*u, and the result
FINITE_CHECK_BYTES = 7       # a chunk's isfinite(): abs (fp32) and three bool masks, alive together
NODE_RANKS = 8               # GPUs (ranks) of a node, whose host memory the plan of a job adds up
CATCHUP_CHUNK = 4096         # lazy_adamw.LazyAdamW.catch_up's chunk of rows


# -----------------------------------------------------------------------------
# rows in flight

@dataclass
class InFlight:
    rows: int            # planned transient slots: the measured max with the margin, at most the vocabulary
    in_flight: int       # max unique ids of grad_accum_steps + 1 consecutive micro-batches (measured/estimated)
    step: int            # max unique ids of one optimiser step (the rows a lazy step updates)
    batch: int           # max unique ids of one micro-batch (the rows one lookup returns)
    source: str          # where the numbers come from, for the plan's output
    received: int = 0    # a job's rank: max rows it answers for one micro-batch (a row once per requester)


def with_margin(n, vocab_size):
    return min(vocab_size, math.ceil(n * (1 + MARGIN[0])) + MARGIN[1])


def zipf_unique(vocab_size, n_tokens, exponent=ZIPF_EXPONENT):
    """Expected number of distinct ids among n_tokens i.i.d. draws with P(rank r) ~ r^-exponent."""
    p = np.arange(1, vocab_size + 1, dtype=np.float64) ** -exponent
    p /= p.sum()
    return float(-np.expm1(n_tokens * np.log1p(-p)).sum())       # sum_r 1 - (1 - p_r)^n


def rows_in_flight(dataset, batch_size, block_size, grad_accum_steps, vocab_size, seed, steps=MEASURE_STEPS,
                   world_size=1):
    """The unique ids the device must hold at once: one optimiser step (grad_accum_steps
    micro-batches, looked up before the step) plus the micro-batch prefetched during its
    last one. Measured over `steps` steps of the run's own draws (the seed of its
    loader) on the dataset's train.bin; estimated from a Zipf model when the bins are
    not there or use ids beyond vocab_size. Cached while train.bin is unchanged (the
    dry run, the fit check and the tables' slots ask for the same numbers). Of a job of
    world_size ranks (shards.py), the numbers of its busiest rank: the rows it owns among
    those in flight and in a step, the rows its slice of a micro-batch looks up, and the
    rows it answers for one micro-batch."""
    path = os.path.join(data.data_dir_of(dataset), "train.bin")
    stamp = (os.stat(path).st_mtime_ns, os.path.getsize(path)) if os.path.exists(path) else None
    if world_size > 1:
        return _rows_in_flight_of_ranks(dataset, batch_size, block_size, grad_accum_steps, vocab_size, seed, steps,
                                        world_size, stamp)
    return _rows_in_flight(dataset, batch_size, block_size, grad_accum_steps, vocab_size, seed, steps, stamp)


@functools.lru_cache(maxsize=8)
def _rows_in_flight(dataset, batch_size, block_size, grad_accum_steps, vocab_size, seed, steps, stamp):
    G = grad_accum_steps
    meta = data.read_meta(dataset)
    path = os.path.join(data.data_dir_of(dataset), "train.bin")
    usable = (meta is not None and os.path.exists(path) and meta.get("dtype") in ("uint16", "uint32")
              and meta.get("vocab_size", math.inf) <= vocab_size)
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r") if usable else None
    if tokens is not None and len(tokens) > block_size + 1:
        generator = torch.Generator().manual_seed(seed)
        # one sorted unique per micro-batch (B*T ids), then unions of a few thousand each
        unique = [np.unique(data.draw_windows(tokens, generator, batch_size, block_size)[:, :-1])
                  for _ in range(steps * G + 1)]
        in_flight = max(len(np.unique(np.concatenate(unique[k * G:k * G + G + 1]))) for k in range(steps))
        step = max(len(np.unique(np.concatenate(unique[k * G:k * G + G]))) for k in range(steps))
        batch = max(len(u) for u in unique)
        source = f"measured over {steps} steps of {os.path.relpath(path)}"
    else:
        tokens = batch_size * block_size
        in_flight, step, batch = (math.ceil(zipf_unique(vocab_size, n * tokens)) for n in (G + 1, G, 1))
        source = (f"estimated from i.i.d. Zipf({ZIPF_EXPONENT}) ids (no usable {os.path.relpath(path)}; "
                  f"real text needs fewer)")
    return InFlight(with_margin(in_flight, vocab_size), in_flight, with_margin(step, vocab_size),
                    with_margin(batch, vocab_size), source)


def world_size_of(tc):
    """The ranks a run plans for: --world_size, else as launched."""
    return tc.world_size or distributed.launched_size()


def table_slots(tc, config):
    """(cache_rows, transient_rows) of offloaded tables (of one rank's shard in a job);
    (None, 0) when resident. transient_rows: the knob, or (0) the measured rows in flight."""
    if tc.tables != "offload":
        return None, 0
    N = world_size_of(tc)
    rows = math.ceil(config.vocab_size / N)
    cache_rows = min(rows, max(1, int(tc.table_cache_fraction * rows)))
    transient = tc.table_transient_rows or rows_in_flight(
        tc.dataset, tc.batch_size, config.block_size, tc.grad_accum_steps, config.vocab_size, tc.seed,
        world_size=N).rows
    return cache_rows, transient


@functools.lru_cache(maxsize=8)
def _rows_in_flight_of_ranks(dataset, batch_size, block_size, grad_accum_steps, vocab_size, seed, steps, world_size,
                             stamp):
    G, N, b = grad_accum_steps, world_size, batch_size // world_size
    owner = shards.OwnerMap(vocab_size, N).owner
    meta = data.read_meta(dataset)
    path = os.path.join(data.data_dir_of(dataset), "train.bin")
    usable = (meta is not None and os.path.exists(path) and meta.get("dtype") in ("uint16", "uint32")
              and meta.get("vocab_size", math.inf) <= vocab_size)
    tokens = np.memmap(path, dtype=meta["dtype"], mode="r") if usable else None
    if tokens is None or len(tokens) <= block_size + 1:
        n_tokens = batch_size * block_size
        in_flight, step = (math.ceil(zipf_unique(vocab_size, n * n_tokens) / N) for n in (G + 1, G))
        batch = math.ceil(zipf_unique(vocab_size, b * block_size))
        received = batch           # each of N requesters asks a rank for about 1/N of its rows
        source = (f"estimated from i.i.d. Zipf({ZIPF_EXPONENT}) ids over {N} ranks (no usable "
                  f"{os.path.relpath(path)}; real text needs fewer)")
    else:
        generator = torch.Generator().manual_seed(seed)
        owned_max, batch, received = lambda ids: int(np.bincount(owner(torch.from_numpy(ids)), minlength=N).max()), 0, 0
        unique = []
        for _ in range(steps * G + 1):
            windows = data.draw_windows(tokens, generator, batch_size, block_size)[:, :-1].astype(np.int64)
            slices = [np.unique(windows[r * b:(r + 1) * b]) for r in range(N)]
            batch = max(batch, max(len(s) for s in slices))
            received = max(received, owned_max(np.concatenate(slices)))       # a row once per requesting rank
            unique.append(np.unique(windows))
        in_flight = max(owned_max(np.unique(np.concatenate(unique[k * G:k * G + G + 1]))) for k in range(steps))
        step = max(owned_max(np.unique(np.concatenate(unique[k * G:k * G + G]))) for k in range(steps))
        source = f"measured over {steps} steps of {os.path.relpath(path)}, the busiest of {N} ranks"
    rank_rows = math.ceil(vocab_size / N)
    return InFlight(with_margin(in_flight, rank_rows), in_flight, with_margin(step, rank_rows),
                    with_margin(batch, vocab_size), source, with_margin(received, rank_rows))


# -----------------------------------------------------------------------------
# activations

def activation_bytes(config, batch_size, act_bytes):
    """Bytes of the tensors one micro-batch saves for backward, eager, by part. act_bytes:
    4 in float32; 2 under bf16 autocast, where matmul outputs are bf16 and every matmul
    saves its own bf16 cast of its input. Norms (F.rms_norm's composite: input, rstd,
    input * rstd) and the residual stream stay float32. Dropout is not modelled (the
    configs train without), MoE layers count as dense FFNs, and a fused CUDA rms_norm or
    torch.compile saves less: an upper estimate there."""
    c = config
    B, T, C, f, a = batch_size, c.block_size, c.n_embd, 4, act_bytes
    N, hd = B * T, c.n_embd // c.n_head
    kv = c.n_kv_head * hd
    autocast = a != 4

    def norm(matmuls_reading):
        # in float32 the normalised output is saved once (shared by the matmuls reading it)
        out = matmuls_reading * N * C * a if autocast else N * C * f
        return N * (2 * C * f + f) + out

    # SDPA saves q, k, v, its output and logsumexp. q and k are views of the rotated (q, k);
    # v a view of qkv's output; with grouped-query heads k, v are repeated to n_head copies
    # instead (and qkv's output is not kept). The output is laid out (B, T, H, hd), so proj's
    # input is a view of it.
    kv_saved = N * (C + 2 * kv) * a if c.n_kv_head == c.n_head else 2 * N * C * a
    attention = norm(1) + N * (C + kv) * a + kv_saved + N * C * a + B * c.n_head * T * 4
    # FFN: gate's output, SiLU's output, the up-projection (the table rows, or their sum with
    # W_up x for up+table) and their product, all (B, T, d_ff); the norm's output is read by
    # two matmuls (gate, up) or one (STEM: gate, or up for the gate variant)
    reads = {"up": 1, "gate": 1, "up+table": 2}[c.stem_variant]
    stem_ffn = norm(reads) + 4 * N * c.d_ff * a
    dense_ffn = norm(2) + 4 * N * c.d_ff * a
    n_stem = len(c.stem_layer_ids)
    return {
        "attention": c.n_layer * attention,
        "FFN": n_stem * stem_ffn + (c.n_layer - n_stem) * dense_ffn,
        # the ids (wte's, and the STEM layers' shared inverse index), the final norm, the
        # loss's float32 log-probabilities (B*T, V) and targets
        "embedding, final norm, loss": N * 8 * (1 + (n_stem > 0)) + norm(1) + N * c.vocab_size * 4 + N * 8,
    }


# -----------------------------------------------------------------------------
# the plan

@dataclass
class Plan:
    """Components (place, name, bytes); places: device, host. Working sets of a place
    (place "device*" / "host*") never overlap: only the largest counts."""
    header: list = field(default_factory=list)
    rows: list = field(default_factory=list)
    notes: list = field(default_factory=list)
    checkpoint: list = field(default_factory=list)
    device: str = "cpu"
    dtype: str = "float32"
    tables: str = "none"         # none | dense (AdamW over a resident parameter) | resident | offload
    transient_rows: int = 0
    table_layout: dict = field(default_factory=dict)     # tables.table_buffers of lazy tables

    def table_bytes(self):
        """{place: bytes} of the lazy tables' buffers (places of tables.table_buffers)."""
        out = {}
        for shape, dt, place in self.table_layout.values():
            out[place] = out.get(place, 0) + nbytes(shape, dt)
        return out

    def add(self, place, name, nbytes, detail=""):
        if nbytes:
            self.rows.append((place, name, int(nbytes), detail))

    def total(self, place):
        fixed = sum(b for p, _, b, _ in self.rows if p == place)
        return fixed + max([b for p, _, b, _ in self.rows if p == place + "*"], default=0)

    def total_one_memory(self):
        """A CPU run's peak: device and host are one memory, and the working sets of both
        never overlap."""
        fixed = sum(b for p, _, b, _ in self.rows if p in ("device", "host"))
        return fixed + max([b for p, _, b, _ in self.rows if p in ("device*", "host*")], default=0)

    def format(self):
        lines = list(self.header)
        for place, title in (("device", f"device ({self.device})"), ("host", "host")):
            lines.append(f"{title}:")
            rows = [r for r in self.rows if r[0] == place]
            working = [r for r in self.rows if r[0] == place + "*"]
            top = max([r[2] for r in working], default=None)
            if working:
                rows.append((place, "the largest of these, which come and go:", 0, ""))
            for p, name, b, detail in rows + working:
                mark = "" if p == place else "* " if b == top else "  "
                lines.append(f"  {mark + name:<70} " + (f"{b / GiB:8.2f} GiB" if b else ""))
                if detail:
                    lines.append(f"      {detail}")
            lines.append(f"  {'total':<70} {self.total(place) / GiB:8.2f} GiB")
        ckpt = sum(b for _, b in self.checkpoint)
        lines.append(f"checkpoint on disk: {ckpt / GiB:.2f} GiB ("
                     + ", ".join(f"{name} {b / GiB:.2f}" for name, b in self.checkpoint) + ")")
        lines += self.notes
        lines.append(f"plan: device {self.total('device') / GiB:.2f} GiB, host {self.total('host') / GiB:.2f} GiB")
        return "\n".join(lines)


def nbytes(shape, dtype):
    return math.prod(shape) * dtype.itemsize


def checkpoint_bytes(model, tc, sparse):
    """What train.py's save() writes: model state (tied weights once), AdamW
    state, the lazy tables' moments and catch-up history."""
    params = {id(p): p for p in model.parameters()}
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    model_bytes = sum(p.numel() * p.element_size() for p in params.values())
    model_bytes += sum(t.numel() * t.element_size() for n, t in model.state_dict().items() if n not in param_names)
    table = model.tables.weight if model.tables is not None else None
    adam = [p for p in params.values() if not sparse or p is not table]      # AdamW's groups
    parts = [("model", model_bytes),
             ("AdamW state", sum(2 * p.numel() * 4 + 4 for p in adam))]
    if sparse:
        history = 2 * 8 * (tc.max_iters + 1) + table.shape[0] * 8 if tc.table_optimizer == "adamw_catchup" else 0
        parts.append(("table moments", 2 * table.numel() * 4 + history))
    return parts


@dataclass
class Shape:
    """What the parts of a plan read of a run: its knobs, its model on the meta device, and
    the sizes derived from them."""
    tc: object
    config: object
    device: str
    dtype: str
    model: object

    def __post_init__(self):
        c, tc = self.config, self.tc
        self.cuda = self.device.startswith("cuda")
        self.a = 2 if self.dtype == "bfloat16" else 4           # bytes of an activation
        self.table = self.model.tables.weight if self.model.tables is not None else None
        self.sparse = self.table is not None and tc.table_optimizer != "adamw"
        self.catchup = self.sparse and tc.table_optimizer == "adamw_catchup"
        self.offloaded = self.sparse and tc.tables == "offload"
        self.V, self.C, self.B, self.T, self.G = c.vocab_size, c.n_embd, tc.batch_size, c.block_size, tc.grad_accum_steps
        # a job: each of N ranks computes B / N sequences of a micro-batch, owns ceil(V / N)
        # table rows and an FSDP shard of the backbone
        self.N = world_size_of(tc)
        if self.B % self.N:
            raise UsageError(f"batch_size {self.B} does not split over {self.N} ranks")
        self.B //= self.N
        self.rank_rows = math.ceil(self.V / self.N)
        self.node_ranks = min(self.N, NODE_RANKS)
        self.n_stem = len(c.stem_layer_ids)
        self.row = self.n_stem * c.d_ff * 4                      # one fp32 row, every STEM layer
        self.full_table_bytes = self.table.numel() * 4 if self.table is not None else 0
        self.table_bytes = self.rank_rows * self.row if self.table is not None else 0     # this rank's rows
        self.flight = rows_in_flight(tc.dataset, tc.batch_size, self.T, self.G, self.V, tc.seed,
                                     world_size=self.N) if self.table is not None else None
        self.U = self.flight.batch if self.flight else 0         # rows of one micro-batch's lookup
        self.backbone = [q for q in self.model.parameters() if q is not self.table]
        self.n_backbone = sum(q.numel() for q in self.backbone)
        self.block_params = max(sum(q.numel() for q in b.parameters()) for b in self.model.blocks)
        # a checkpoint's finiteness check, chunk by chunk (the table is the largest tensor)
        self.finite_check = FINITE_CHECK_BYTES * min(checkpoint.FINITE_CHUNK, self.table.numel()) \
            if self.table is not None else 0
        self.n_slots = self.rank_rows                             # device slots of lazy tables (offloaded: fewer)
        if self.offloaded:
            cache_rows, transient = table_slots(tc, c)
            self.n_slots = min(cache_rows, self.rank_rows) + transient


def plan_run(tc, config, device, dtype):
    """The Plan of a training run with TrainConfig tc and GPTConfig config on `device`
    ('cpu' | 'cuda' | 'cuda:N') with compute dtype `dtype` ('float32' | 'bfloat16')."""
    with torch.device("meta"):      # shapes only: nothing is allocated
        model = GPT(config)
    s = Shape(tc, config, device, dtype, model)
    p = Plan(device=device, dtype=dtype, tables="none" if s.table is None else tc.tables if s.sparse else "dense")
    total, active = s.model.num_params()
    p.header.append(f"model: {total / 1e6:.1f}M params, {active / 1e6:.1f}M active, "
                    f"{s.model.flops_per_token() / 1e9:.3f} GFLOPs/token forward (T={s.T}), {config.ffn} layers "
                    f"{len(config.sparse_layer_ids)} of {config.n_layer}")
    p.header.append(f"memory plan: {config.n_layer} layers, n_embd {s.C}, vocab {s.V}, {s.n_stem} STEM layers of "
                    f"d_ff {config.d_ff}; micro-batch {s.B} x {s.T}, grad_accum_steps {s.G}; {dtype} on {device}"
                    + (f"; tables {tc.tables}, {tc.table_optimizer}" if s.table is not None else ""))
    shard = f", an FSDP shard of 1/{s.N}" if s.N > 1 else ""
    p.add("device", f"backbone weights ({s.n_backbone / 1e6:.1f}M params, fp32{shard})", s.n_backbone * 4 // s.N)
    p.add("device", f"backbone gradients (fp32{shard})", s.n_backbone * 4 // s.N)
    p.add("device", f"backbone AdamW moments (2 x fp32{shard})", s.n_backbone * 8 // s.N)
    if s.N > 1:
        # FSDP2 gathers a block's weights for its forward and backward (and the next one's,
        # prefetched) and reduce-scatters its gradients; the root (embeddings, head, final
        # norm) stays gathered from its forward to the end of backward
        root = s.n_backbone - sum(q.numel() for b in s.model.blocks for q in b.parameters())
        p.add("device", "FSDP: the root's gathered weights and gradients (embeddings, head, norm)", root * 8)
        p.add("device", "FSDP: two blocks' gathered weights and gradients", 2 * s.block_params * 8)
        p.header.append(f"a job of {s.N} ranks: one rank's device; host for the ranks of one node "
                        f"(min({s.N}, {NODE_RANKS}) = {s.node_ranks})")
    p.add("device", "buffers (RoPE, ...)", sum(b.numel() * b.element_size() for b in s.model.buffers()))
    plan_tables(p, s)
    plan_device_working_sets(p, s)
    plan_host_working_sets(p, s)
    if tc.compile:
        p.notes.append("compile=True: activations planned as in eager mode (a compiled graph usually saves less)")
    if not s.cuda:
        p.notes.append(f"the device is the CPU: device and host are one memory, {p.total_one_memory() / GiB:.2f} GiB "
                       f"at the peak")
    return p


def plan_tables(p, s):
    """The tables: exactly what will be allocated."""
    tc, V = s.tc, s.rank_rows             # a job's rank holds its rows only
    if s.table is not None and not s.sparse:
        p.add("device", f"table weights {(V,) + tuple(s.table.shape[1:])} (dense AdamW, fp32)", s.table_bytes)
        p.add("device", "table gradient (dense, fp32)", s.table_bytes)
        p.add("device", "table AdamW moments (2 x fp32)", 2 * s.table_bytes)
    elif s.sparse:
        cache_rows, transient = table_slots(tc, s.config)
        buffers = tables.table_buffers(V, s.n_stem, s.config.d_ff, cache_rows=cache_rows, transient_rows=transient,
                                       training=True, dtype=torch.float32, device_is_cuda=s.cuda)
        p.table_layout, p.transient_rows = buffers, transient
        for name, (shape, dt, place) in buffers.items():
            what = {"pool.weight": "table weights", "pool.exp_avg": "table first moments",
                    "pool.exp_avg_sq": "table second moments", "grad_pool": "table gradient",
                    "host.weight": "host table weights", "host.exp_avg": "host table first moments",
                    "host.exp_avg_sq": "host table second moments"}[name]
            p.add("device" if place == "device" else "host",
                  f"{what}{' pinned' if place == 'pinned' else ''} ({shape[0]} rows, {str(dt).replace('torch.', '')})",
                  nbytes(shape, dt))
        # a view per row of the pool's weights, moments and gradient (the lazy step's), and of the
        # host's weights and moments (the copies')
        n_views = s.n_slots * 4 + (V * 3 if s.offloaded else 0)
        p.add("host", f"row views for the lazy step{' and the copies' if s.offloaded else ''} ({n_views} tensor "
                      f"objects)", n_views * tables.ROW_VIEW_BYTES)
        if s.offloaded:
            p.notes.append(f"device slots: {min(cache_rows, V)} cache (table_cache_fraction "
                           f"{tc.table_cache_fraction}) + {transient} transient "
                           + ("(table_transient_rows)" if tc.table_transient_rows else
                              f"(rows in flight {s.flight.in_flight} + {MARGIN[0]:.0%} + {MARGIN[1]})"))
    if s.flight is not None:
        p.notes.append(f"rows in flight: at most {s.flight.in_flight} unique ids in {s.G} micro-batches + 1 "
                       f"prefetched, {s.flight.batch} planned per micro-batch, {s.flight.step} per step; "
                       f"{s.flight.source}")


def plan_device_working_sets(p, s):
    """Working sets on the device, on top of what stays; they do not overlap."""
    tc, B, T, V, a, U, row = s.tc, s.B, s.T, s.V, s.a, s.U, s.row
    acts = activation_bytes(s.config, B, a)
    held = B * T * V * a                                  # the logits
    logits = held + (B * T * V * 4 if a != 4 else 0)      # + a float32 copy
    casts = sum(q.numel() for q in s.backbone
                if q.dim() >= 2 and (q is not s.model.wte.weight or s.config.tie_embeddings))
    casts = casts * 2 if a != 4 else 0                    # autocast's bf16 copies of the matmul weights
    p.add("device*", f"forward/backward of a micro-batch ({B} x {T})", sum(acts.values()) + logits + casts + U * row,
          "saved for backward: " + ", ".join(f"{k} {v / GiB:.2f}" for k, v in acts.items())
          + f"; logits {logits / GiB:.2f}" + (f"; bf16 weights {casts / GiB:.2f}" if casts else "")
          + (f"; looked-up rows {U * row / GiB:.2f}" if U else "") + " GiB")
    if s.table is not None:
        # the lookup's backward, after the layers': n_stem per-layer (U, d_ff) gradients, then their
        # stack; dense tables: index_select's backward is a zeroed table-sized gradient, which
        # .grad copies (first micro-batch of a step) or is summed with into a new tensor while
        # both addends live (the later ones): 1 or 2 tables beside the standing .grad
        if not s.sparse:
            p.add("device*", "end of backward: the looked-up rows' gradient, a table-sized gradient"
                  + (" and its sum with .grad" if s.G > 1 else ""), U * row + (2 if s.G > 1 else 1) * s.table_bytes)
        else:
            p.add("device*", "end of backward: the looked-up rows' gradients", 2 * U * row + held)
    if s.N > 1 and s.table is not None:
        R = s.flight.received
        p.add("device*", f"row exchange: the rows this rank answers for a micro-batch ({R}, once per requesting "
                         f"rank), gathered and copied, then their gradients", 2 * R * row)
    if s.sparse:
        # catch-up also appends a step to its two float64 histories (a copy of each while the old lives)
        p.add("device*", f"lazy AdamW step: norms of the {s.flight.step} rows touched"
              + (", their ids, the step histories" if s.catchup else ""),
              (STEP_BYTES_PER_ROW + s.catchup * CATCHUP_STEP_BYTES_PER_ROW) * s.flight.step
              + s.catchup * 2 * 8 * (tc.max_iters + 2))
        if s.catchup:
            chunk = min(CATCHUP_CHUNK, U if s.offloaded else V)   # resident: the checkpoint's flush, every row
            p.add("device*", f"catch-up of {chunk} rows being read", CATCHUP_ROWS_PER_ROW * chunk * row)
    # evaluation (no grad): the lookup (catch-up reads weights and moments), then the looked-up
    # rows stay while the forward reaches the loss: the logits, their float32 copy under bf16
    # autocast, the float32 log-softmax, one (B, T, d_ff) and one (B, T, C) float32 activation,
    # and autocast's bf16 copies of the matmul weights (kept for the autocast region)
    lookup = (8 if s.catchup else 3 if s.offloaded else 1) * U * row if s.sparse else 0
    N = B * T
    loss_end = U * row + N * V * (a + 4 + (4 if a != 4 else 0)) + N * (s.config.d_ff + s.C) * 4 + casts
    p.add("device*", "evaluation: a no-grad lookup, then the forward to the loss", max(lookup, loss_end))
    if s.offloaded:
        p.add("device*", "checkpoint: one tensor of the occupied slots gathered for the host", s.n_slots * row)
    elif s.table is not None:
        p.add("device*", f"checkpoint: the finiteness check of {checkpoint.FINITE_CHUNK} entries at a time",
              s.finite_check)


def plan_host_working_sets(p, s):
    """Working sets on the host, beside the host tables; and the checkpoint on disk."""
    tc = s.tc
    # the model is built on the CPU, then converted and moved; offloaded, its table becomes
    # the host table (counted above) without a copy
    build = s.n_backbone * 4 + (0 if s.offloaded else s.table_bytes)
    if s.N > 1:       # the ranks of a node build in turn, each the whole table, then keep its rows
        build = s.n_backbone * 4 + s.full_table_bytes
    if s.cuda or s.N > 1:
        p.add("host*", "building: the model on the CPU, before it moves", build)
    elif s.sparse and not s.offloaded:
        # on the CPU the model is built where it trains: its dense table lives while the pool
        # (counted above) is filled from it
        p.add("host*", "building: the model's dense table, while the tables' pool is filled", s.table_bytes)
    if s.offloaded:
        catchup = CATCHUP_ROWS_PER_ROW * min(CATCHUP_CHUNK, s.V) * s.row if s.catchup else 0
        p.add("host*", "checkpoint: the largest of the finiteness check, the flushed slots, a catch-up",
              max(s.finite_check, s.n_slots * s.row, catchup))
    elif s.table is not None and s.cuda:
        p.add("host*", "checkpoint: torch.save stages the table through host memory", s.table_bytes)
    if s.N > 1:        # what the plan lists is one rank's: a node holds node_ranks of them
        p.rows = [(place, name + (f" (x {s.node_ranks} ranks)" if place == "host" else ""),
                   b * s.node_ranks if place == "host" else b, detail) for place, name, b, detail in p.rows]
    p.checkpoint = checkpoint_bytes(s.model, tc, s.sparse)
    if tc.init_from == "resume":
        p.add("host*", "resume: the checkpoint read into memory, then the model built on the CPU",
              sum(b for _, b in p.checkpoint) + build)


def available_bytes():
    """Memory this machine has free for new allocations (Linux: MemAvailable; elsewhere
    the free pages), or None when it cannot tell."""
    if os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            found = [int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")]
        if found:
            return found[0]
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


def check_fits(p, tc, device):
    """Stop a run whose plan exceeds the memory free where it runs, naming knobs that shrink
    it: a CUDA device's free memory, or for a CPU run this machine's (device and host are
    then one memory)."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        need, where = p.total("device"), device
    else:
        free, need, where = available_bytes(), p.total_one_memory(), "this machine"
        if free is None:
            return
    if need <= free:
        return
    knobs = {"dense": ["--tables=offload --table_optimizer=adamw_catchup"], "resident": ["--tables=offload"],
             "offload": [f"a lower --table_cache_fraction (now {tc.table_cache_fraction})",
                         f"fewer --table_transient_rows (now {p.transient_rows}; fewer tokens per step need fewer)"],
             "none": []}[p.tables] if device.startswith("cuda") else []
    knobs.append(f"a smaller --batch_size (now {tc.batch_size}) with more --grad_accum_steps")
    if device.startswith("cuda") and p.dtype != "bfloat16":
        knobs.append("--dtype=bfloat16")
    if not device.startswith("cuda"):
        knobs.append("a smaller model (--n_layer, --n_embd, --block_size, a smaller vocabulary), or a GPU")
    raise UsageError(f"the run needs {need / GiB:.2f} GiB on {where} but {free / GiB:.2f} GiB are free; try "
                     f"{', '.join(knobs)} (see --dry_run=True)")
