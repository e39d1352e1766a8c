"""
STEM tables for the lazy optimiser, resident on the device or offloaded to host memory.

A table is (vocab, n_stem, d_ff): at vocab 50k and 23 STEM layers of d_ff 2816 that is
3.3B parameters, too big to sit next to the backbone on one card. `SparseTables` keeps
the rows the model reads in a device *pool* of slots; the plan of a batch says which
slot holds each of its unique ids, so the model's lookup is one gather:

    resident:   pool = the whole table, slot = token id
    offloaded:  pool = an LFU cache of `cache_rows` slots (plus transient slots for the
                batches in flight) filled from a host table

Both train with the same lazy AdamW (only the rows a step touched update their weights
and moments) and the same gradient path, so they agree bit for bit; they differ only in
where rows come from. Dense AdamW over all rows (the paper's optimiser) stays with
stem.ResidentTables and torch.optim.AdamW.

Offloaded, per batch (`prepare`, ids known on the CPU one batch before it runs):
  1. Training thread: the LFU plan (numpy, sub-millisecond): hits keep their slots, each
     miss takes a slot no batch in flight holds (a cached one if it is hotter than the
     coldest unlocked cached row, else the transient slot freed longest ago); the row it displaces
     must go back to the host first (training). The plan is queued for the worker.
  2. Worker thread: queues one copy per row and tensor: on the "out" copy queue the
     displaced rows from their slots straight into their host rows, on the "in" queue the
     missing rows from their host rows straight into their slots. In training the host
     tables are page-locked, so on CUDA these are DMA transfers: the CPU only issues them
     (a few microseconds each) and never passes over the rows' bytes (a row of one tensor
     is 23 x 2816 x 4 B = 253 KiB at 350M). Inference tables are not pinned: they may be
     a mapped checkpoint, which pinning would read whole; a token needs few rows.
  3. Copy queues: two side CUDA streams (the two directions of PCIe have an engine each)
     that start after the compute queued before the plan. The loads wait for the
     write-backs holding one of their slots or ids (numbered groups: one wait per batch),
     and the batch's lookup makes the compute stream wait for its loads.
Without CUDA each copy queue is a thread, with the same order and events, so the waits
between threads are exercised on the CPU (tests inject random delays to prove them needed);
the copy streams' wait for earlier compute exists only on CUDA (CPU compute has run).
"""

import collections
import functools
import itertools
import math
import time
import weakref

import numpy as np
import torch
import torch.nn as nn

from configurator import UsageError
from lanes import CopyQueue, Lane, pin
from lazy_adamw import LazyAdamW


class LFUCache:
    """Which token id sits in which device slot: CPU bookkeeping, vectorised with numpy.

    Slots [0, n_cached) are the LFU cache; slots [n_cached, n_cached + n_transient) hold
    the rows of misses that were not admitted. An id held anywhere is a hit (also a
    transient one still in flight: reading it from the host would miss the update its
    batch is about to make). A miss is admitted when its
    frequency beats the least-frequent cached slot that no batch in flight holds (an
    empty slot always loses); otherwise it borrows a transient slot. A transient row no
    batch holds any more stays in its slot, a hit for any later batch, until a miss takes
    the slot: the one freed longest ago first (empty ones before), so the rows that stay
    are the latest used. A row leaves the device (written back first, in training) only
    when a miss takes its slot, cached or transient. Frequencies count tokens."""

    def __init__(self, vocab_size, n_cached, n_transient):
        self.n_cached = n_cached
        self.slot_of_id = np.full(vocab_size, -1, dtype=np.int64)
        self.id_of_slot = np.full(n_cached + n_transient, -1, dtype=np.int64)
        self.freq = np.zeros(vocab_size, dtype=np.int64)
        self.locks = np.zeros(n_cached + n_transient, dtype=np.int64)   # batches in flight per slot
        self.freed_at = np.zeros(n_transient, dtype=np.int64)           # release() count when each was freed
        self.releases = 0
        self.stats = dict(tokens=0, token_hits=0, unique=0, unique_misses=0, evictions=0)

    def plan(self, unique_ids, counts):
        """Slots for unique_ids (U,) that occur counts (U,) times. Returns (slots,
        miss_ids, miss_slots, evicted_ids, evicted_slots), numpy int64; evicted rows (the
        rows of the slots misses take) must be written back (in training) before miss rows
        overwrite their slots."""
        self.freq[unique_ids] += counts
        slots = self.slot_of_id[unique_ids].copy()
        hit = slots >= 0
        self.locks[slots[hit]] += 1
        miss_ids = unique_ids[~hit]
        miss_ids = miss_ids[np.argsort(-self.freq[miss_ids], kind="stable")]    # hottest first
        # admission: pair the k-th hottest miss with the k-th coldest unlocked cached slot;
        # misses descend and victims ascend in frequency, so the admitted ones are a prefix
        free = np.flatnonzero(self.locks[:self.n_cached] == 0)
        occupant = self.id_of_slot[free]
        victim_freq = np.where(occupant < 0, -1, self.freq[np.maximum(occupant, 0)])
        order = np.argsort(victim_freq, kind="stable")[:len(miss_ids)]
        victims, victim_freq = free[order], victim_freq[order]
        n_admit = int(np.argmin(np.append(self.freq[miss_ids[:len(victims)]] > victim_freq, False)))
        transient_free = np.flatnonzero(self.locks[self.n_cached:] == 0)      # empty, or released rows
        transient_free = self.n_cached + transient_free[np.argsort(self.freed_at[transient_free], kind="stable")]
        n_transient = len(miss_ids) - n_admit
        if n_transient > len(transient_free):
            self.locks[slots[hit]] -= 1
            self.freq[unique_ids] -= counts
            raise UsageError(f"the table pool cannot hold the {len(unique_ids)} unique ids of a batch beside the "
                             f"batches in flight ({n_transient} not admitted, {len(transient_free)} of "
                             f"{len(self.id_of_slot) - self.n_cached} transient slots free); raise "
                             f"--table_transient_rows")
        miss_slots = np.concatenate([victims[:n_admit], transient_free[:n_transient]])
        evicted_ids = self.id_of_slot[miss_slots]
        evicted_slots = miss_slots[evicted_ids >= 0]
        evicted_ids = evicted_ids[evicted_ids >= 0]
        self.slot_of_id[evicted_ids] = -1
        self.slot_of_id[miss_ids] = miss_slots
        self.id_of_slot[miss_slots] = miss_ids
        self.locks[miss_slots] += 1
        slots[~hit] = self.slot_of_id[unique_ids[~hit]]
        s = self.stats
        s["tokens"] += int(counts.sum()); s["token_hits"] += int(counts[hit].sum())
        s["unique"] += len(unique_ids); s["unique_misses"] += len(miss_ids); s["evictions"] += len(evicted_ids)
        return slots, miss_ids, miss_slots, evicted_ids, evicted_slots

    def release(self, slots):
        """A batch is done with its slots: a transient slot no batch holds is free for a
        miss (its row stays readable until then)."""
        self.locks[slots] -= 1
        done = slots[(slots >= self.n_cached) & (self.locks[slots] == 0)]
        self.releases += 1
        self.freed_at[done - self.n_cached] = self.releases


class RowGather(torch.autograd.Function):
    """rows = pool[slots]; the backward adds the rows' gradient into grad_pool[slots]
    instead of making a pool-sized gradient per micro-batch."""

    @staticmethod
    def forward(ctx, anchor, pool, slots, grad_pool):
        # anchor: an empty tensor that requires grad, so that autograd calls backward;
        # the pool itself is a plain tensor (it is updated in place by the optimiser)
        ctx.save_for_backward(slots)
        ctx.grad_pool = grad_pool
        return pool.index_select(0, slots)                      # (U, n_stem, d_ff)

    @staticmethod
    def backward(ctx, grad_rows):
        (slots,) = ctx.saved_tensors
        ctx.grad_pool.index_add_(0, slots, grad_rows.to(ctx.grad_pool.dtype))
        return None, None, None, None


ROW_VIEW_BYTES = 660       # host memory of one row's view (a tensor object), measured: 50,304 take 31.5 MiB


def table_buffers(vocab_size, n_stem, d_ff, cache_rows=None, transient_rows=0, training=True,
                  dtype=torch.float32, device_is_cuda=False):
    """Every tensor SparseTables allocates: name -> (shape, dtype, place), place "device",
    "host" or "pinned" (host memory page-locked on CUDA, because device copies read and
    write it in training). The memory plan (plan.py) reads the same list, so planned bytes are
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


def _shut_down(queues, worker, unpin):
    """When offloaded tables are freed: the copies still queued finish before their memory is
    released (the pools; the host tables are unpinned), then the threads stop."""
    for queue in queues:
        if queue.stream is not None:
            queue.stream.synchronize()
    if unpin is not None:
        unpin()
    worker.close()
    for queue in queues:
        if queue.lane is not None:
            queue.lane.close()


def _dynamic_rows(rows):
    """The number of unique ids changes every batch: say so to torch.compile, so that the
    graph after the lookup is compiled once for any count instead of recompiling."""
    torch._dynamo.maybe_mark_dynamic(rows, 0)
    return rows


def _on(device, array):
    """A numpy index array as a tensor on `device`; pinned first, so the copy is asynchronous."""
    index = torch.from_numpy(array)
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    return index


class SparseTables(nn.Module):
    """A table source (lookup(unique_ids) -> rows) trained by lazy AdamW.
    cache_rows=None keeps the whole table on the device. An int keeps the table in host
    memory, `cache_rows` LFU rows on the device, plus `transient_rows` slots for the rows
    of batches in flight that the cache did not admit (enough for the unique ids of one
    optimiser step and the batch prefetched beside it; plan.py measures that).

    The training thread plans (LFU bookkeeping, numpy) and queues; the worker (a Lane)
    queues the copies of rows between the host tables (pinned) and the device pool; two
    copy queues run them, out and in. In training the training thread waits only at a
    lookup, whose compute waits for its batch's loads (on the CPU the thread itself waits),
    and where host and device must agree (evaluation, checkpoints, edits); the in queue
    waits for the write-backs its loads depend on. `delay` injects random delays into the
    worker and (without CUDA) the copy queues, for tests."""

    def __init__(self, weight, device, cache_rows=None, transient_rows=0, training=True,
                 dtype=torch.float32, optimizer=None, delay=None, take_weight=False, copy_rate=None):
        super().__init__()
        vocab_size, n_stem, d_ff = weight.shape
        self.device, self.training_tables = torch.device(device), training
        self.optimizer = optimizer or LazyAdamW()
        self.offloaded = cache_rows is not None
        cuda = self.device.type == "cuda"
        layout = table_buffers(vocab_size, n_stem, d_ff, cache_rows, transient_rows, training, dtype, cuda)
        # every tensor allocated once, here, exactly as planned (the pool is never a copy
        # of a device tensor: a resident table is copied in from wherever `weight` lives).
        # take_weight: the caller gives `weight` up, and a CPU table of the host dtype
        # becomes the host table itself instead of being copied (a checkpoint's mapped
        # table is then read only where rows are copied; on CUDA, pinning it reads it whole)
        adopt = (take_weight and self.offloaded and weight.device.type == "cpu" and weight.is_contiguous()
                 and weight.dtype == layout["host.weight"][1])
        self.allocated = {name: weight.detach() if adopt and name == "host.weight" else
                        torch.empty(shape, dtype=dt, device=self.device if place == "device" else "cpu")
                        for name, (shape, dt, place) in layout.items()}
        self.names = tuple(name.removeprefix("pool.") for name in layout if name.startswith("pool."))
        self.pool = {name: self.allocated[f"pool.{name}"] for name in self.names}
        self.grad_pool = self.allocated.get("grad_pool")
        # one view per row of each tensor, made once (ROW_VIEW_BYTES each), as a view costs
        # ~2.5 us to make: a move copies rows by them, and the lazy step updates rows in place by them
        self.rows = {}
        if training or self.offloaded:
            self.rows["pool"] = {name: tensor.unbind(0) for name, tensor in self.pool.items()}
        if training:
            self.rows["pool"]["grad"] = self.grad_pool.unbind(0)
        if self.offloaded:
            self.host = {name: self.allocated[f"host.{name}"] for name in self.names}
            self.rows["host"] = {name: tensor.unbind(0) for name, tensor in self.host.items()}
            self.cache = LFUCache(vocab_size, min(cache_rows, vocab_size), transient_rows)
            # copies to the device and back run on queues of their own (the two directions of
            # PCIe, two copy engines), each with its own sequence of delays
            self.copies = {way: CopyQueue(self.device, (delay[0] + k, delay[1]) if delay else None, copy_rate)
                           for k, way in ((1, "in"), (2, "out"))}
            self.worker = Lane("table worker", delay)
            pinned = [self.allocated[name] for name, (_, _, place) in layout.items() if place == "pinned"]
            weakref.finalize(self, _shut_down, list(self.copies.values()), self.worker,
                             pin(pinned) if pinned else None)
            for tensor in self.pool.values():
                tensor.zero_()
        else:
            self.host, self.cache = None, None
        target = self.host if self.offloaded else self.pool
        if not adopt:
            target["weight"].copy_(weight)
        for name in self.names[1:]:
            target[name].zero_()
        if self.grad_pool is not None:
            self.grad_pool.zero_()
        if training:
            self.optimizer.track(vocab_size, self.device)
        self.grad_anchor = torch.empty(0, device=device, requires_grad=True)
        self.row_bytes = n_stem * d_ff * self.pool["weight"].element_size()       # one name's row
        self.bytes_h2d = self.bytes_d2h = 0
        # seconds: the training thread planning and queueing (and its bookkeeping at a step), and
        # waiting for a batch's rows
        self.clock = {"plan": 0.0, "wait": 0.0}
        self.prepared = collections.deque()         # plans of batches prepared, in order, not yet looked up
        self.flushed = False                        # the host tables (resident: the pool) are complete and current
        self.in_flight = []                         # plans looked up, awaiting step() / release()
        if self.offloaded:
            # the number of the last write-back group of each id and slot (training thread);
            # the worker's marks of groups not yet waited for, and the last one waited for
            self.write_backs = 0
            self.written_back = (np.zeros(vocab_size, dtype=np.int64), np.zeros(len(self.cache.id_of_slot),
                                                                                dtype=np.int64))
            self.landed, self.waited_for = {}, 0

    def numel(self):
        return math.prod((self.host if self.offloaded else self.pool)["weight"].shape)

    def _compute_event(self):
        """An event after the compute queued so far (None on the CPU: it has run)."""
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _compute_waits(self, event):
        """The compute that follows waits for event (a copy); on the CPU the thread waits."""
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_event(event)
        else:
            event.synchronize()

    # -- the training thread: plans ----------------------------------------------------

    def prepare(self, row_index):
        """Start bringing the rows of a batch to the device for a later training lookup;
        lookups take prepared plans in the order they were prepared. row_index: the batch's
        stem.RowIndex on the CPU (unique ids and their counts)."""
        counts = row_index.counts if row_index.counts is not None else torch.ones_like(row_index.unique_ids)
        self.prepared.append(self._plan(row_index.unique_ids.numpy(), counts.numpy()))

    def _plan(self, ids, counts):
        if not self.offloaded:
            return {"slots": ids, "n": len(ids), "moved": None}
        start = time.perf_counter()
        slots, miss_ids, miss_slots, evicted_ids, evicted_slots = self.cache.plan(ids, counts)
        if not self.training_tables:        # nothing changed them: evicted rows just go
            evicted_ids = evicted_slots = evicted_ids[:0]
        moved = self._queue_move(evicted_ids, evicted_slots, miss_ids, miss_slots)
        self.clock["plan"] += time.perf_counter() - start
        return {"slots": slots, "n": len(ids), "moved": moved}

    def _queue_move(self, out_ids, out_slots, in_ids, in_slots):
        """Queue the worker's _move of these rows: the write-back of the rows going out (a
        numbered group) and the loads, which wait for the latest group holding one of their
        ids or slots (this one, whose slots they fill, or an earlier one still on its way
        back). Returns the move's Done, or None when nothing moves."""
        if not (len(out_ids) or len(in_ids)):
            return None
        self.flushed = False                    # rows are on the move: a flush (or write_rows) must drain
        if len(out_ids):
            self.write_backs += 1
            self.written_back[0][out_ids], self.written_back[1][out_slots] = self.write_backs, self.write_backs
        need = max(self.written_back[0][in_ids].max(), self.written_back[1][in_slots].max()) if len(in_ids) else 0
        moved = self.worker.submit(functools.partial(self._move, self._compute_event(), out_ids, out_slots,
                                                     self.write_backs if len(out_ids) else 0, in_ids, in_slots,
                                                     int(need)))
        self.bytes_h2d += len(in_ids) * self.row_bytes * len(self.names)
        self.bytes_d2h += len(out_ids) * self.row_bytes * len(self.names)
        return moved

    # -- the worker thread: copies queued in order -------------------------------------

    def _move(self, compute_event, out_ids, out_slots, group, in_ids, in_slots, need):
        """On the "out" queue, rows at out_slots go back to their host rows out_ids (write-back
        group `group`, marked when done); on the "in" queue, once group `need` is done, host
        rows in_ids come into in_slots. One copy per row and tensor. Returns the event after
        which the incoming rows are in the pool (None if none come)."""
        for queue in self.copies.values():
            queue.wait_for(compute_event)     # slots are read (out) or overwritten (in) after that compute
        host, pool = self.rows["host"], self.rows["pool"]

        def views(rows, index):         # those rows of each tensor (map and chain: no Python loop holds the GIL)
            return list(itertools.chain.from_iterable(map(rows[name].__getitem__, index.tolist())
                                                      for name in self.names))

        def copies(queue, destinations, sources):
            if destinations:
                queue.run(functools.partial(torch._foreach_copy_, destinations, sources, non_blocking=True),
                          len(destinations) * self.row_bytes)
        if group:
            copies(self.copies["out"], views(host, out_ids), views(pool, out_slots))
            self.landed[group] = self.copies["out"].mark()
        if need > self.waited_for:          # in-queue order keeps every earlier group waited for
            self.copies["in"].wait_for(self.landed[need])
            self.waited_for = need
            self.landed = {number: event for number, event in self.landed.items() if number > need}
        copies(self.copies["in"], views(pool, in_slots), views(host, in_ids))
        return self.copies["in"].mark() if len(in_ids) else None

    def _drain(self):
        """Wait until every queued copy and write-back is done: host and pool agree."""
        if not self.offloaded:
            return
        self.worker.submit(lambda: [queue.mark().synchronize() for queue in self.copies.values()]).result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- the table-source interface ---------------------------------------------------

    @torch.compiler.disable      # plans and waits are host bookkeeping: outside any compiled graph
    def lookup(self, unique_ids):
        """(U,) device ids -> (U, n_stem, d_ff) rows. A training lookup (grad enabled) uses
        the oldest prepared plan, or plans now (reading the ids on the host: a sync). A
        no-grad lookup on training tables (evaluation) reads current weights and changes
        nothing: no write-back, no LFU count, no catch-up stored."""
        if self.training_tables and not torch.is_grad_enabled():
            return _dynamic_rows(self._read_weights(unique_ids))
        plan = self.prepared.popleft() if self.prepared else None
        if plan is not None and plan["n"] != unique_ids.shape[0]:
            raise RuntimeError(f"lookup of {unique_ids.shape[0]} ids, but the oldest prepared batch has "
                               f"{plan['n']}: batches must be looked up in the order they were prepared")
        if plan is None:
            ids = unique_ids.cpu().numpy()
            plan = self._plan(ids, np.ones_like(ids))
        start = time.perf_counter()
        if plan["moved"] is not None:
            ready = plan["moved"].result()      # the worker has queued this batch's copies
            if ready is not None:
                self._compute_waits(ready)
        slots = _on(self.device, plan["slots"]) if self.offloaded else unique_ids
        self.clock["wait"] += time.perf_counter() - start
        if self.training_tables:
            self.flushed = False
            # catch-up: rows skipped by lazy steps are brought up to date first
            self.optimizer.catch_up(self.pool["weight"], self.pool["exp_avg"], self.pool["exp_avg_sq"], slots,
                                    unique_ids)
            self.in_flight.append(plan)       # its slots stay locked until step()
            rows = RowGather.apply(self.grad_anchor, self.pool["weight"], slots, self.grad_pool)  # (U, n_stem, d_ff)
            return _dynamic_rows(rows)
        rows = self.pool["weight"].index_select(0, slots)
        self._release([plan])                 # later copies into these slots wait for this gather
        return _dynamic_rows(rows)

    @torch.no_grad()
    def _read_weights(self, unique_ids):
        """Current weights of unique_ids (U, n_stem, d_ff) from the pool (rows on the device)
        or the host tables (the others), without changing any state."""
        names = self.names if self.optimizer.catch_up_mode else ("weight",)   # catch-up needs the moments
        if not self.offloaded:
            rows = {name: self.pool[name].index_select(0, unique_ids) for name in names}
        else:
            self._drain()
            ids = unique_ids.cpu().numpy()
            slots = self.cache.slot_of_id[ids]
            missing = np.flatnonzero(slots < 0)                  # positions of the rows not on the device
            positions, miss_ids = torch.from_numpy(missing).to(self.device), torch.from_numpy(ids[missing])
            device_slots = torch.from_numpy(np.maximum(slots, 0)).to(self.device)   # (the missing ones overwritten)
            rows = {}
            for name in names:
                rows[name] = self.pool[name].index_select(0, device_slots)
                rows[name].index_copy_(0, positions, self.host[name].index_select(0, miss_ids).to(self.device))
            self.bytes_h2d += len(missing) * self.row_bytes * len(names)
        if self.optimizer.catch_up_mode:
            return self.optimizer.current_weight(rows["weight"], rows["exp_avg"], rows["exp_avg_sq"], unique_ids)
        return rows["weight"]

    def release(self):
        """The batches looked up are done: unlock their slots (their transient rows stay
        until misses take their slots)."""
        plans, self.in_flight = self.in_flight, []
        self._release(plans)

    def _release(self, plans):
        if self.cache is None:
            return
        start = time.perf_counter()
        for plan in plans:
            self.cache.release(plan["slots"])
        self.clock["plan"] += time.perf_counter() - start

    @torch.no_grad()
    def step(self, lr, max_norm=0.0):
        """Clip the touched rows' gradient on its own norm, apply lazy AdamW to those rows,
        clear their gradient, release their slots. Returns the gradient norm (a tensor)."""
        if not self.in_flight:
            return None
        self.flushed = False
        start = time.perf_counter()
        slots = np.unique(np.concatenate([plan["slots"] for plan in self.in_flight]))
        if self.offloaded:
            # in id order, as resident slots are: the norm's summation order (its last bits)
            # must not depend on the cache layout, or resident and offloaded runs drift apart
            slots = slots[np.argsort(self.cache.id_of_slot[slots])]
        self.clock["plan"] += time.perf_counter() - start
        # the touched rows where they lie: K views per tensor, no gather and no scatter back
        slot_list = slots.tolist()
        rows = {name: [views[slot] for slot in slot_list] for name, views in self.rows["pool"].items()}
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(rows["grad"])))   # of the (K, n_stem, d_ff) gradient
        if max_norm > 0:
            torch._foreach_mul_(rows["grad"], torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        ids = None
        if self.optimizer.catch_up_mode:
            ids = _on(self.device, self.cache.id_of_slot[slots] if self.offloaded else slots)
        self.optimizer.update(rows["weight"], rows["exp_avg"], rows["exp_avg_sq"], rows["grad"], lr, ids)
        torch._foreach_zero_(rows["grad"])
        self.release()
        return norm

    # -- checkpoints and stats ----------------------------------------------------

    def flush(self):
        """Write every row on the device back to the host so the host tables are complete;
        with catch-up, bring every row up to the current step. Nothing to do when no
        training lookup or step came since the last flush (a checkpoint asks several times)."""
        if self.flushed:
            return
        self.flushed = True
        if not self.offloaded:
            if self.training_tables:
                every = torch.arange(self.pool["weight"].shape[0], device=self.device)
                self.optimizer.catch_up(self.pool["weight"], self.pool["exp_avg"], self.pool["exp_avg_sq"], every, every)
            return
        self._drain()
        if self.training_tables:
            slots = np.flatnonzero(self.cache.id_of_slot >= 0)
            ids = torch.from_numpy(self.cache.id_of_slot[slots])
            slots_dev = torch.from_numpy(slots).to(self.device)
            for name, host in self.host.items():
                host.index_copy_(0, ids, self.pool[name][slots_dev].cpu())
            if self.optimizer.catch_up_mode:
                # catch the host rows up, then refresh the device copies from them
                every = torch.arange(len(self.cache.slot_of_id))
                self.optimizer.catch_up(self.host["weight"], self.host["exp_avg"], self.host["exp_avg_sq"], every,
                                        every)
                for name, host in self.host.items():
                    self.pool[name].index_copy_(0, slots_dev, host.index_select(0, ids).to(self.device))

    def tensors(self):
        """The complete tables (and moments), without a second copy of the host tables."""
        self.flush()
        return self.host if self.offloaded else self.pool

    def load_tensors(self, state):
        """Load weights (and moments, where given) from a tensors() dict."""
        if self.prepared or self.in_flight:
            raise RuntimeError("load_tensors with batches prepared or in flight: their plans would point at "
                               "slots the new cache treats as free")
        target = self.host if self.offloaded else self.pool
        if set(target) - set(state):    # the device copies are forgotten below: the rest keeps their state
            self.flush()
        else:
            self._drain()
        self.flushed = False
        for name, value in state.items():
            if name in target:
                target[name].copy_(value)
        if self.offloaded:      # the host rows are the truth now: forget the device copies
            self.cache = LFUCache(len(self.cache.slot_of_id), self.cache.n_cached,
                                  len(self.cache.id_of_slot) - self.cache.n_cached)

    @torch.no_grad()
    def read_rows(self, ids):
        """A copy of the current rows of `ids` (K, n_stem, d_ff), wherever they live."""
        self.flush()
        ids = torch.as_tensor(ids, dtype=torch.long)
        if not self.offloaded:
            return self.pool["weight"][ids.to(self.device)].clone()
        return self.host["weight"][ids].clone()

    @torch.no_grad()
    def write_rows(self, ids, rows):
        """Overwrite the rows of `ids`; device copies of them are updated too (so nothing
        stale is read), and their moments stay as they are."""
        self.flush()
        ids = torch.as_tensor(ids, dtype=torch.long)
        if not self.offloaded:
            self.pool["weight"][ids.to(self.device)] = rows.to(self.pool["weight"])
            return
        self.host["weight"][ids] = rows.to(self.host["weight"])
        slots = torch.from_numpy(self.cache.slot_of_id[ids.numpy()])
        on_device = slots >= 0
        if on_device.any():
            self.pool["weight"][slots[on_device].to(self.device)] = rows[on_device].to(self.pool["weight"])

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.tensors()["weight"]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        if prefix + "weight" in state_dict:
            self.load_tensors({"weight": state_dict[prefix + "weight"]})
        elif strict:
            missing_keys.append(prefix + "weight")

    def stats(self):
        """Tokens requested, unique ids, unique misses, hit rates, bytes moved, and seconds:
        the training thread's planning (and queueing) and waiting, the worker's (queueing
        copies), each copy queue's (CPU: the copies themselves, and the in queue's waits)."""
        s = dict(self.cache.stats) if self.cache is not None else {}
        if s:
            s["token_hit_rate"] = s["token_hits"] / max(1, s["tokens"])
            s["unique_hit_rate"] = 1 - s["unique_misses"] / max(1, s["unique"])
            s.update(worker_seconds=self.worker.busy,
                     **{f"copy_{way}_seconds": queue.lane.busy if queue.lane is not None else None
                        for way, queue in self.copies.items()})
        s.update(bytes_h2d=self.bytes_h2d, bytes_d2h=self.bytes_d2h, plan_seconds=self.clock["plan"],
                 wait_seconds=self.clock["wait"])
        return s


def use_sparse_tables(model, device, cache_rows=None, transient_rows=0, training=True,
                      dtype=torch.float32, optimizer=None, delay=None):
    """Replace model.tables (stem.ResidentTables) by SparseTables holding the same rows. The
    old table is let go before the new buffers are allocated, so that the device never
    holds two full tables (give it a model whose tables are still on the CPU to avoid even
    one); a CPU table of the host dtype becomes the offloaded host table without a copy."""
    weight = model.tables.weight.detach()
    if weight.device.type != "cpu":
        weight = weight.cpu()
    model.tables = None               # frees a device-resident table before the pool is allocated
    model.tables = SparseTables(weight, device, cache_rows, transient_rows, training, dtype, optimizer,
                                delay, take_weight=True)
    return model.tables
