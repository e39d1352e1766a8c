"""
STEM tables trained by lazy AdamW (lazy_adamw.py): only the rows a step touched update
their weights and moments. The table is (vocab, n_stem, d_ff): at vocab 50k and 23 STEM
layers of d_ff 2816 that is 3.3B parameters, often too big for one card beside the
backbone, so the rows the model reads sit in a device *pool* of slots, and a batch's plan
says which slot holds each of its unique ids. Where the rows come from is the only
difference between the two kinds, each a small object behind the same five calls:

    ResidentRows (here):            the pool is the whole table, a row's slot is its id
    offload.OffloadedRows:          the pool is an LFU cache (plus transient slots for
                                    the batches in flight) filled from host memory

Both train through the same lookup, gradient path and step, so they agree bit for bit.
Dense AdamW over every row (the paper's optimiser) is stem.ResidentTables.

The table-source interface, as the training step calls it:
    prepare(row_index)     start bringing a batch's rows (its plan is keyed by the RowIndex)
    lookup(row_index)      the rows (U, n_stem, d_ff) of row_index.unique_ids; a training
                           lookup takes the batch's plan (made now if it was not prepared)
    step(lr, max_norm)     clip the touched rows' gradient on its norm, update them, release
    flush()                make the complete tables current (checkpoints, edits)
"""

import math
import time

import numpy as np
import torch
import torch.nn as nn

import offload
from lazy_adamw import LazyAdamW

ROW_VIEW_BYTES = 660       # host memory of one row's view (a tensor object), measured: 50,304 take 31.5 MiB


def table_buffers(vocab_size, n_stem, d_ff, cache_rows=None, transient_rows=0, training=True,
                  dtype=torch.float32, device_is_cuda=False):
    """Every tensor LazyTables allocates: name -> (shape, dtype, place), place "device",
    "host" or "pinned" (host memory page-locked on CUDA, because device copies read and
    write it in training). The memory plan reads the same list, so planned bytes are
    allocated bytes."""
    dtype = torch.float32 if training else dtype        # training keeps fp32 master rows
    names = ("weight", "exp_avg", "exp_avg_sq") if training else ("weight",)
    row = (n_stem, d_ff)
    buffers = {}
    if cache_rows is None:                               # resident: the pool is the table
        n_slots = vocab_size
    else:
        n_slots = min(cache_rows, vocab_size) + transient_rows
        for name in names:          # rows are copied to and from the device in place: pinned on CUDA
            buffers[f"host.{name}"] = ((vocab_size,) + row, dtype, "pinned" if device_is_cuda and training else "host")
    for name in names:
        buffers[f"pool.{name}"] = ((n_slots,) + row, dtype, "device")
    if training:
        buffers["grad_pool"] = ((n_slots,) + row, dtype, "device")
    return buffers


class RowGather(torch.autograd.Function):
    """rows = pool[slots]; the backward adds the rows' gradient into grad_pool[slots]
    instead of making a pool-sized gradient per micro-batch, and marks the batch's plan:
    its rows were touched (a forward whose backward never runs touches nothing)."""

    @staticmethod
    def forward(ctx, anchor, pool, slots, grad_pool, plan):
        # anchor: an empty tensor that requires grad, so that autograd calls backward;
        # the pool itself is a plain tensor (it is updated in place by the optimiser)
        ctx.save_for_backward(slots)
        ctx.grad_pool, ctx.plan = grad_pool, plan
        return pool.index_select(0, slots)                      # (U, n_stem, d_ff)

    @staticmethod
    def backward(ctx, grad_rows):
        (slots,) = ctx.saved_tensors
        ctx.grad_pool.index_add_(0, slots, grad_rows.to(ctx.grad_pool.dtype))
        ctx.plan["touched"] = True
        return None, None, None, None, None


def _dynamic_rows(rows):
    """The number of unique ids changes every batch: say so to torch.compile, so that the
    graph after the lookup is compiled once for any count instead of recompiling."""
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    return rows


class ResidentRows:
    """Where a resident table's rows are: all in the pool, each at the slot of its id."""

    def __init__(self, pool):
        self.pool = pool

    def plan(self, ids, counts):
        return {"slots": ids, "moved": None}

    def slots_on_device(self, plan, unique_ids):
        return unique_ids

    def release(self, plans):
        """Nothing to unlock: no row ever leaves its slot."""

    def ids_of(self, slots):
        return slots

    def read(self, names, unique_ids):
        return {name: self.pool[name].index_select(0, unique_ids) for name in names}

    def table(self):
        """The tensors that hold every row."""
        return self.pool

    def write_back(self, training):
        return self.pool

    def reload(self):
        """Nothing to reload: the pool is the table."""

    def drain(self):
        """Nothing moves."""

    def forget_device_rows(self):
        """The pool is the table: nothing to forget."""

    def write_rows(self, ids, rows):
        self.pool["weight"][ids.to(self.pool["weight"].device)] = rows.to(self.pool["weight"])

    def stats(self):
        return {"bytes_h2d": 0, "bytes_d2h": 0}


class LazyTables(nn.Module):
    """A table source trained by lazy AdamW. cache_rows=None keeps the whole table on the
    device (ResidentRows). An int keeps the table in host memory with `cache_rows` LFU rows
    on the device plus `transient_rows` slots for the rows of batches in flight that the
    cache did not admit (offload.OffloadedRows; the memory plan measures how many).
    training=False: weights only (in `dtype`), for sampling and evaluation. `delay`,
    `copy_rate`: see offload.OffloadedRows. take_weight: the caller gives `weight` up, and
    a CPU table of the host dtype becomes the host table itself instead of being copied (a
    checkpoint's mapped table is then read only where rows are copied)."""

    def __init__(self, weight, device, cache_rows=None, transient_rows=0, training=True,
                 dtype=torch.float32, optimizer=None, delay=None, take_weight=False, copy_rate=None):
        super().__init__()
        vocab_size, n_stem, d_ff = weight.shape
        self.device, self.training_tables = torch.device(device), training
        self.optimizer = optimizer or LazyAdamW()
        offloaded = cache_rows is not None
        layout = table_buffers(vocab_size, n_stem, d_ff, cache_rows, transient_rows, training, dtype,
                               self.device.type == "cuda")
        # every tensor allocated once, here, exactly as planned (the pool is never a copy
        # of a device tensor: a resident table is copied in from wherever `weight` lives)
        adopt = (take_weight and offloaded and weight.device.type == "cpu" and weight.is_contiguous()
                 and weight.dtype == layout["host.weight"][1])
        allocated = {name: weight.detach() if adopt and name == "host.weight" else
                     torch.empty(shape, dtype=dt, device=self.device if place == "device" else "cpu")
                     for name, (shape, dt, place) in layout.items()}
        self.layout, self.allocated = layout, allocated
        self.names = tuple(name.removeprefix("pool.") for name in layout if name.startswith("pool."))
        self.pool = {name: allocated[f"pool.{name}"] for name in self.names}
        self.grad_pool = allocated.get("grad_pool")
        # one view per row of each tensor, made once (ROW_VIEW_BYTES each), as a view costs
        # ~2.5 us to make: the lazy step updates rows in place by them (and the copies of
        # offloaded rows move rows by them)
        self.views = {name: tensor.unbind(0) for name, tensor in self.pool.items()} if training or offloaded else {}
        if training:
            self.views["grad"] = self.grad_pool.unbind(0)
        if offloaded:
            host = {name: allocated[f"host.{name}"] for name in self.names}
            pinned = [allocated[name] for name, (_, _, place) in layout.items() if place == "pinned"]
            self.rows = offload.OffloadedRows(host, self.pool, self.views, self.device, min(cache_rows, vocab_size),
                                              transient_rows, training, pinned, delay, copy_rate)
        else:
            self.rows = ResidentRows(self.pool)
        table = self.rows.table()
        if not adopt:
            table["weight"].copy_(weight)
        for name in self.names[1:]:
            table[name].zero_()
        if self.grad_pool is not None:
            self.grad_pool.zero_()
        if training:
            self.optimizer.track(vocab_size, self.device)
        self.grad_anchor = torch.empty(0, device=device, requires_grad=True)
        self.row_bytes = n_stem * d_ff * self.pool["weight"].element_size()       # one name's row
        self.clock = {"plan": 0.0, "wait": 0.0}     # seconds the training thread plans (and queues) and waits
        self.prepared = {}        # id(row_index) -> (row_index, plan): prepared, not yet looked up
        self.in_flight = {}       # the same for batches looked up, until step() releases them
        self.unprepared = 0       # training lookups of batches nobody prepared (planned on the spot)
        self.flushed = False      # the complete tables (resident: the pool; offloaded: the host) are current

    def numel(self):
        return math.prod(self.rows.table()["weight"].shape)

    # -- the table-source interface ---------------------------------------------------

    def prepare(self, row_index):
        """Start bringing the rows of a batch to the device for its training lookup (a
        batch already prepared or looked up keeps its plan)."""
        key = id(row_index)
        if key not in self.prepared and key not in self.in_flight:
            self.prepared[key] = (row_index, self._plan(*row_index.ids_on_host()))

    def _plan(self, ids, counts):
        start = time.perf_counter()
        plan = self.rows.plan(ids, counts)
        self.clock["plan"] += time.perf_counter() - start
        if plan["moved"] is not None:
            self.flushed = False                   # rows are on the move: a flush (or write_rows) must drain
        return plan

    @torch.compiler.disable      # plans and waits are host bookkeeping: outside any compiled graph
    def lookup(self, row_index):
        """(U, n_stem, d_ff) rows of row_index.unique_ids. A training lookup (grad enabled)
        uses the batch's plan: the prepared one, the one in flight (a second forward of the
        batch), or one made now (reading the ids on the host: a sync). A no-grad lookup on
        training tables (evaluation) reads current weights and changes nothing: no
        write-back, no LFU count, no catch-up stored."""
        unique_ids = row_index.unique_ids
        if self.training_tables and not torch.is_grad_enabled():
            return _dynamic_rows(self._read_weights(unique_ids))
        key = id(row_index)
        again = key in self.in_flight
        if again:
            _, plan = self.in_flight[key]
        elif key in self.prepared:
            _, plan = self.prepared.pop(key)
        else:
            self.unprepared += self.training_tables
            plan = self._plan(*row_index.ids_on_host())
        start = time.perf_counter()
        slots = self.rows.slots_on_device(plan, unique_ids)     # waits for the batch's rows
        self.clock["wait"] += time.perf_counter() - start
        if not self.training_tables:
            rows = self.pool["weight"].index_select(0, slots)
            start = time.perf_counter()
            self.rows.release([plan])              # later copies into these slots wait for this gather
            self.clock["plan"] += time.perf_counter() - start
            return _dynamic_rows(rows)
        self.flushed = False
        if not again:
            # catch-up: rows skipped by lazy steps are brought up to date first
            self.optimizer.catch_up(self.pool["weight"], self.pool["exp_avg"], self.pool["exp_avg_sq"], slots,
                                    unique_ids)
            self.in_flight[key] = (row_index, plan)       # its slots stay locked until step()
        rows = RowGather.apply(self.grad_anchor, self.pool["weight"], slots, self.grad_pool, plan)  # (U, n_stem, d_ff)
        return _dynamic_rows(rows)

    @torch.no_grad()
    def _read_weights(self, unique_ids):
        """Current weights of unique_ids (U, n_stem, d_ff), without changing any state."""
        names = self.names if self.optimizer.catch_up_mode else ("weight",)   # catch-up needs the moments
        rows = self.rows.read(names, unique_ids)
        if self.optimizer.catch_up_mode:
            return self.optimizer.current_weight(rows["weight"], rows["exp_avg"], rows["exp_avg_sq"], unique_ids)
        return rows["weight"]

    @torch.no_grad()
    def release(self):
        """Let the batches looked up go without a step: their slots unlock, their gradient
        is dropped."""
        plans = [plan for _, plan in self.in_flight.values()]
        if plans:
            slots = np.unique(np.concatenate([plan["slots"] for plan in plans])).tolist()
            torch._foreach_zero_([self.views["grad"][slot] for slot in slots])
        self.in_flight = {}
        self.rows.release(plans)

    @torch.no_grad()
    def step(self, lr, max_norm=0.0, all_reduce=None):
        """Clip the touched rows' gradient (the rows of batches whose backward ran) on its
        own norm, apply lazy AdamW to those rows, clear their gradient, release the slots of
        every batch looked up. Returns the gradient norm (a tensor), None if nothing was
        touched. all_reduce (a shard of a table, shards.py): sums a tensor over the shards,
        so the norm is the whole table's, and a shard nobody touched still takes its step."""
        plans = [plan for _, plan in self.in_flight.values()]
        touched = [plan for plan in plans if plan.get("touched")]
        if not touched and all_reduce is None:
            self.release()
            return None
        self.flushed = False
        start = time.perf_counter()
        slots = np.unique(np.concatenate([plan["slots"] for plan in touched])) if touched else np.zeros(0, np.int64)
        # in id order, as resident slots are: the norm's summation order (its last bits)
        # must not depend on the cache layout, or resident and offloaded runs drift apart
        slots = slots[np.argsort(self.rows.ids_of(slots))]
        self.clock["plan"] += time.perf_counter() - start
        # the touched rows where they lie: K views per tensor, no gather and no scatter back
        slot_list = slots.tolist()
        rows = {name: [views[slot] for slot in slot_list] for name, views in self.views.items()}
        norm = (torch.linalg.vector_norm(torch.stack(torch._foreach_norm(rows["grad"])))   # of the (K, n_stem, d_ff) gradient
                if slot_list else torch.zeros((), device=self.device))
        if all_reduce is not None:
            norm = all_reduce(norm.square()).sqrt()
        if max_norm > 0 and slot_list:
            torch._foreach_mul_(rows["grad"], torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        ids = offload.on_device(self.device, self.rows.ids_of(slots)) if self.optimizer.catch_up_mode else None
        self.optimizer.update(rows["weight"], rows["exp_avg"], rows["exp_avg_sq"], rows["grad"], lr, ids)
        torch._foreach_zero_(rows["grad"])
        self.in_flight = {}
        start = time.perf_counter()
        self.rows.release(plans)
        self.clock["plan"] += time.perf_counter() - start
        return norm

    def flush(self):
        """Make the complete tables current: offloaded, every row on the device goes back
        to the host; with catch-up, every row is brought up to the current step. Nothing to
        do when no training lookup or step came since the last flush."""
        if self.flushed:
            return
        self.flushed = True
        table = self.rows.write_back(self.training_tables)
        if self.training_tables and self.optimizer.catch_up_mode:
            every = torch.arange(table["weight"].shape[0], device=table["weight"].device)
            self.optimizer.catch_up(table["weight"], table["exp_avg"], table["exp_avg_sq"], every, every)
            self.rows.reload()                   # offloaded: the device copies from the caught-up host rows

    # -- checkpoints, edits and stats ----------------------------------------------------

    def tensors(self):
        """The complete tables (and moments), without a second copy of host tables."""
        self.flush()
        return self.rows.table()

    def load_tensors(self, state):
        """Load weights (and moments, where given) from a tensors() dict."""
        if self.prepared or self.in_flight:
            raise RuntimeError("load_tensors with batches prepared or in flight: their plans would point at "
                               "slots the new cache treats as free")
        table = self.rows.table()
        if set(table) - set(state):    # the device copies are forgotten below: the rest keeps their state
            self.flush()
        else:
            self.rows.drain()
        self.flushed = False
        for name, value in state.items():
            if name in table:
                table[name].copy_(value)
        self.rows.forget_device_rows()     # the complete tables are the truth now

    def optimizer_state(self):
        """Lazy AdamW's moments (offloaded: the host tensors themselves, no second copy)."""
        moments = {k: v for k, v in self.tensors().items() if k != "weight"}
        return {"moments": moments, **self.optimizer.state_dict()}

    def load_optimizer_state(self, state):
        self.load_tensors(state["moments"])
        self.optimizer.load_state_dict(state)

    @torch.no_grad()
    def read_rows(self, ids):
        """A copy of the current rows of `ids` (K, n_stem, d_ff), wherever they live."""
        weight = self.tensors()["weight"]
        return weight[torch.as_tensor(ids, dtype=torch.long).to(weight.device)].clone()

    @torch.no_grad()
    def write_rows(self, ids, rows):
        """Overwrite the rows of `ids` (device copies too, so nothing stale is read); their
        moments stay as they are."""
        self.flush()
        self.rows.write_rows(torch.as_tensor(ids, dtype=torch.long), rows)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.tensors()["weight"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "weight" in state_dict:
            self.load_tensors({"weight": state_dict[prefix + "weight"]})
        elif strict:
            missing_keys.append(prefix + "weight")

    def stats(self):
        """Offloaded: tokens requested, unique ids, unique misses, hit rates, bytes moved and
        the threads' seconds (offload.OffloadedRows.stats); and the training thread's
        seconds planning and waiting."""
        return {**self.rows.stats(), "plan_seconds": self.clock["plan"], "wait_seconds": self.clock["wait"],
                "unprepared_lookups": self.unprepared}


def use_lazy_tables(model, device, cache_rows=None, transient_rows=0, training=True,
                    dtype=torch.float32, optimizer=None, delay=None):
    """Replace model.tables (stem.ResidentTables) by LazyTables holding the same rows. The
    old table is let go before the new buffers are allocated, so that the device never
    holds two full tables (give it a model whose tables are still on the CPU to avoid even
    one); a CPU table of the host dtype becomes the offloaded host table without a copy."""
    weight = model.tables.weight.detach()
    if weight.device.type != "cpu":
        weight = weight.cpu()
    model.tables = None               # frees a device-resident table before the pool is allocated
    model.tables = LazyTables(weight, device, cache_rows, transient_rows, training, dtype, optimizer,
                              delay, take_weight=True)
    return model.tables
