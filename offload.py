"""
STEM tables for the lazy optimiser, resident on the device or offloaded to host memory.

A table is (vocab, n_stem, d_ff): at vocab 50k and 23 STEM layers of d_ff 2816 that is
3.3B parameters, too big to sit next to the backbone on one card. `SparseTables` keeps
the rows the model reads in a device *pool* and maps token ids to pool slots with a
device tensor `slot_of_id`, so the model's lookup is one gather and never syncs:

    resident:   pool = the whole table, slot_of_id = identity
    offloaded:  pool = an LFU cache of `cache_rows` slots filled from a host table

Both train with the same lazy AdamW (only the rows a step touched update their weights
and moments) and the same gradient path, so they agree step for step; they differ only
in where rows come from. Dense AdamW over all rows (the paper's optimiser) stays with
stem.ResidentTables and torch.optim.AdamW.

Offloaded, per batch (`prepare`, ids known on the CPU before the batch runs):
  1. LFU plan on the CPU: hits keep their slots, each miss takes the least-frequent slot
     not used by a batch in flight (write-back of the evicted row in training).
  2. Gather the missing rows from the host table into a pinned staging buffer (one
     vectorised index_select; double-buffered, each reuse gated by its copy's event).
  3. On a side CUDA stream: write back evicted rows (D2H), copy the staged rows (H2D)
     into their slots, update slot_of_id; record an event that the compute stream waits
     on before the batch's lookup. Without CUDA the same steps run in order on the CPU.
"""

import math

import numpy as np
import torch
import torch.nn as nn
from torch.optim.adamw import adamw


def pinned_empty(shape, dtype, pin):
    """A host tensor, page-locked when pin is set. cudaHostRegister on an ordinary
    allocation pins exactly its size; pin_memory() goes through the caching host
    allocator, which rounds large requests up to a power of two (up to 2x the memory)."""
    t = torch.empty(shape, dtype=dtype)
    if pin and t.numel():
        err = torch.cuda.cudart().cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)
        if int(err) != 0:
            raise RuntimeError(f"cudaHostRegister failed ({err}) for {t.numel() * t.element_size() / 2**30:.1f} GiB")
    return t


class LFUCache:
    """Which token id sits in which device slot: CPU bookkeeping, vectorised with numpy.

    Slots [0, n_cached) are the LFU cache; slots [n_cached, n_cached + n_transient) hold,
    for the batches in flight only, the rows of misses that were not admitted. An id held
    anywhere is a hit (also a transient one still in flight: reading it from the host
    would miss the update its batch is about to make). A miss is admitted when its
    frequency beats the least-frequent cached slot that no batch in flight holds (an
    empty slot always loses); otherwise it borrows a transient slot, freed (and, in
    training, written back) when its last batch releases it. Frequencies count tokens."""

    def __init__(self, vocab_size, n_cached, n_transient):
        self.n_cached = n_cached
        self.slot_of_id = np.full(vocab_size, -1, dtype=np.int64)
        self.id_of_slot = np.full(n_cached + n_transient, -1, dtype=np.int64)
        self.freq = np.zeros(vocab_size, dtype=np.int64)
        self.locks = np.zeros(n_cached + n_transient, dtype=np.int64)   # batches in flight per slot
        self.stats = dict(tokens=0, token_hits=0, unique=0, unique_misses=0, evictions=0)

    def plan(self, unique_ids, counts):
        """Slots for unique_ids (U,) that occur counts (U,) times. Returns (slots,
        miss_ids, miss_slots, evicted_ids, evicted_slots), numpy int64; evicted rows must
        be written back (in training) before miss rows overwrite their slots."""
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
        transient_free = self.n_cached + np.flatnonzero(self.id_of_slot[self.n_cached:] < 0)
        n_transient = len(miss_ids) - n_admit
        if n_transient > len(transient_free):
            self.locks[slots[hit]] -= 1
            raise RuntimeError(f"the table pool cannot hold the {len(unique_ids)} unique ids of a batch beside the "
                               f"batches in flight ({n_transient} not admitted, {len(transient_free)} transient "
                               f"slots free); raise transient_rows")
        miss_slots = np.concatenate([victims[:n_admit], transient_free[:n_transient]])
        evicted_ids = self.id_of_slot[victims[:n_admit]]
        evicted_slots = victims[:n_admit][evicted_ids >= 0]
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
        """A batch is done with its slots. Returns (ids, slots) of transient rows no batch
        holds any more: they leave the device (written back first, in training)."""
        self.locks[slots] -= 1
        done = slots[(slots >= self.n_cached) & (self.locks[slots] == 0)]
        ids = self.id_of_slot[done]
        self.slot_of_id[ids] = -1
        self.id_of_slot[done] = -1
        return ids, done


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


class LazyAdamW:
    """AdamW restricted to given rows: torch's own fused AdamW kernel run on the gathered
    rows, so that a row touched at every step follows dense AdamW exactly. Bias correction
    uses the global step.

    catch_up=None: untouched rows do not move (no decay, no moment decay) - lazy AdamW.
    catch_up="full": a row's skipped steps are applied when it is next read, as dense AdamW
    would have applied them with a zero gradient: the weight decays every step and keeps
    moving along its decaying first moment. Over the steps s = a+1 .. c after its last
    touch a (lr_s the step's rate, d_s = 1 - lr_s * wd, rho = beta1 / sqrt(beta2)):

        m_c = beta1^(c-a) m_a,   v_c = beta2^(c-a) v_a
        w_c = (prod_s d_s) w_a - sum_s (prod_{r>s} d_r) lr_s sqrt(1-beta2^s)/(1-beta1^s) rho^(s-a) u
        u   = m_a / (sqrt(v_a) + eps)

    exact but for eps: dense AdamW divides by sqrt(v_s) + eps sqrt(1-beta2^s), whose eps
    part does not decay with v; here eps decays with it, a relative difference in a skipped
    step's move of about eps / sqrt(v_a) (1e-8 against table gradients of 1e-6 and up:
    below 1e-2 of an already small move, and 0 when eps is 0). The sum runs over at most
    `window` skipped steps: rho^window < 1e-20, beyond which the terms are below float64's
    resolution. Products of d come from a float64 prefix sum of log d over steps.
    "decay" and "momentum" apply one of the two halves (ablations)."""

    def __init__(self, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1, catch_up=None):
        self.beta1, self.beta2 = betas
        self.eps, self.weight_decay = eps, weight_decay
        self.catch_up_mode = catch_up
        self.step = torch.zeros(())       # the global step, a tensor as torch's kernel wants it
        if catch_up:
            rho = self.beta1 / math.sqrt(self.beta2)
            if not rho < 1:
                raise ValueError(f"catch-up needs beta1 < sqrt(beta2) (got {self.beta1}, {self.beta2}): a "
                                 f"skipped row's moves would not decay")
            self.window = math.ceil(math.log(1e-20) / math.log(rho)) if rho > 0 else 1
            # per step s = 0..c: log_decay_prefix[s] = sum_{r<=s} log d_r, move_scale[s] = lr_s sqrt(bc2)/bc1
            self.log_decay_prefix = torch.zeros(1, dtype=torch.float64)
            self.move_scale = torch.zeros(1, dtype=torch.float64)
            self.last_step = None         # (vocab,) int64: the step each row was last brought up to

    @property
    def step_count(self):
        return int(self.step)

    @step_count.setter
    def step_count(self, value):
        self.step.fill_(value)

    def update(self, weight, exp_avg, exp_avg_sq, slots, grad, lr, ids=None):
        """weight/exp_avg/exp_avg_sq: (N, ...) pools; slots (K,) unique; grad (K, ...); ids: the
        rows' token ids (catch-up keeps the step of each id)."""
        # index_select, not pool[slots]: on the CPU it copies whole rows, several times faster
        w, m, v = (pool.index_select(0, slots) for pool in (weight, exp_avg, exp_avg_sq))   # (K, ...) each
        self.step = self.step.to(w.device)
        adamw([w], [grad], [m], [v], [], [self.step], fused=True, amsgrad=False,
              beta1=self.beta1, beta2=self.beta2, lr=lr, weight_decay=self.weight_decay,
              eps=self.eps, maximize=False)              # increments self.step
        for pool, rows in ((weight, w), (exp_avg, m), (exp_avg_sq, v)):
            pool.index_copy_(0, slots, rows)
        if self.catch_up_mode:
            self._record_step(lr)
            self.last_step[ids] = self.step_count

    # -- catch-up ------------------------------------------------------------------------

    def _record_step(self, lr):
        s = self.step_count          # the step just taken
        decay = math.log1p(-lr * self.weight_decay) if lr * self.weight_decay < 1 else -math.inf
        bias = math.sqrt(1 - self.beta2 ** s) / (1 - self.beta1 ** s)
        self.log_decay_prefix = torch.cat([self.log_decay_prefix, self.log_decay_prefix[-1:] + decay])
        self.move_scale = torch.cat([self.move_scale, self.move_scale.new_tensor([lr * bias])])

    def track(self, n_rows, device):
        """Start tracking n_rows rows (all at the current step)."""
        if self.catch_up_mode and self.last_step is None:
            self.last_step = torch.full((n_rows,), self.step_count, dtype=torch.long, device=device)
            self.log_decay_prefix = self.log_decay_prefix.to(device)     # the history sits beside last_step
            self.move_scale = self.move_scale.to(device)

    def catch_up(self, weight, exp_avg, exp_avg_sq, slots, ids, chunk_rows=4096):
        """Bring the rows at `slots` of the pools (token ids `ids`) to the current step."""
        if not self.catch_up_mode:
            return
        c = self.step_count
        for start in range(0, len(ids), chunk_rows):
            part_slots, part_ids = slots[start:start + chunk_rows], ids[start:start + chunk_rows]
            w, m, v = (pool.index_select(0, part_slots) for pool in (weight, exp_avg, exp_avg_sq))
            keep, move, moment_steps = self._coefficients(self.last_step[part_ids.to(self.last_step.device)], c)
            shape = (-1,) + (1,) * (w.dim() - 1)
            keep, move = keep.to(w.device, w.dtype).view(shape), move.to(w.device, w.dtype).view(shape)
            moment_steps = moment_steps.to(w.device).view(shape)
            u = m / (v.sqrt() + self.eps)                                           # (K, ...)
            w = w * keep - move * u
            if self.catch_up_mode != "decay":
                m = m * self.beta1 ** moment_steps.to(w.dtype)
                v = v * self.beta2 ** moment_steps.to(w.dtype)
            for pool, rows in ((weight, w), (exp_avg, m), (exp_avg_sq, v)):
                pool.index_copy_(0, part_slots, rows)
        self.last_step[ids.to(self.last_step.device)] = c

    def _coefficients(self, last, c):
        """(keep, move, gap) per row of last-touched steps `last` (K,), brought up to step c:
        w_c = keep * w_a - move * u, all float64 (K,)."""
        log_decay = self.log_decay_prefix.to(last.device)
        move_scale = self.move_scale.to(last.device)
        gap = c - last                                                              # (K,)
        keep = torch.exp(log_decay[c] - log_decay[last])
        window = min(c, self.window)
        j = torch.arange(1, window + 1, device=last.device)                        # (J,)
        steps = (last[:, None] + j[None, :]).clamp(max=c)                          # (K, J): s = a + j
        rho = self.beta1 / math.sqrt(self.beta2)
        terms = move_scale[steps] * rho ** j.double()[None, :]
        if self.catch_up_mode != "momentum":
            terms = terms * torch.exp(log_decay[c] - log_decay[steps])             # prod_{r>s} d_r
        move = torch.where(j[None, :] <= gap[:, None], terms, 0.0).sum(1)          # (K,)
        if self.catch_up_mode == "decay":
            move = torch.zeros_like(move)
        elif self.catch_up_mode == "momentum":
            keep = torch.ones_like(keep)
        return keep, move, gap

    def state_dict(self):
        state = {"step_count": self.step_count}
        if self.catch_up_mode:
            state.update(last_step=self.last_step.cpu(), log_decay_prefix=self.log_decay_prefix.cpu(),
                         move_scale=self.move_scale.cpu())
        return state

    def load_state_dict(self, state):
        self.step_count = state["step_count"]
        if self.catch_up_mode:
            device = self.last_step.device
            self.last_step = state["last_step"].to(device)
            self.log_decay_prefix = state["log_decay_prefix"].to(device)
            self.move_scale = state["move_scale"].to(device)


class SparseTables(nn.Module):
    """A table source (lookup(unique_ids) -> rows) trained by lazy AdamW.
    cache_rows=None keeps the whole table on the device. An int keeps the table in host
    memory, `cache_rows` LFU rows on the device, plus `transient_rows` slots for the rows
    of batches in flight that the cache did not admit (enough for the unique ids of every
    batch prepared or looked up but not yet stepped: with lookahead and gradient
    accumulation that is grad_accum_steps + 1 batches)."""

    def __init__(self, weight, device, cache_rows=None, transient_rows=0, training=True,
                 dtype=torch.float32, optimizer=None):
        super().__init__()
        vocab_size, n_stem, d_ff = weight.shape
        self.device, self.training_tables = torch.device(device), training
        self.optimizer = optimizer or LazyAdamW()
        self.offloaded = cache_rows is not None
        cuda = self.device.type == "cuda"
        dtype = torch.float32 if training else dtype
        names = ("weight", "exp_avg", "exp_avg_sq") if training else ("weight",)
        if self.offloaded:
            cache_rows = min(cache_rows, vocab_size)
            self.host = {name: pinned_empty(weight.shape, dtype, cuda) for name in names}
            self.host["weight"].copy_(weight)
            for name in names[1:]:
                self.host[name].zero_()
            n_slots = cache_rows + transient_rows
            self.pool = {name: torch.zeros(n_slots, n_stem, d_ff, dtype=dtype, device=device) for name in names}
            self.slot_of_id = torch.full((vocab_size,), -1, dtype=torch.long, device=device)
            self.cache = LFUCache(vocab_size, cache_rows, transient_rows)
        else:
            self.pool = {"weight": weight.detach().to(device=device, dtype=dtype).clone()}
            for name in names[1:]:
                self.pool[name] = torch.zeros_like(self.pool["weight"])
            self.slot_of_id = torch.arange(vocab_size, device=device)
            self.cache = None
        self.grad_pool = torch.zeros_like(self.pool["weight"]) if training else None
        if training:
            self.optimizer.track(vocab_size, device)
        self.grad_anchor = torch.empty(0, device=device, requires_grad=True)
        self.row_bytes = n_stem * d_ff * self.pool["weight"].element_size() * len(names)
        self.bytes_h2d = self.bytes_d2h = 0
        self.prepared = {}                 # plans of batches prepared, not yet looked up, by key
        self.in_flight = []                # plans looked up, awaiting step() / release()
        self.pending_writeback = []        # (ids, staged rows, event) not yet scattered to the host
        self.copy_stream = torch.cuda.Stream(self.device) if cuda and self.offloaded else None
        self.staging = [None, None]        # double-buffered pinned staging: (buffers, copy event)
        self.staging_turn = 0

    def numel(self):
        return math.prod((self.host if self.offloaded else self.pool)["weight"].shape)

    def _side_stream(self):
        """Context for copies: the side stream, after all work queued so far on the compute
        stream (which may still read or update the slots about to be overwritten)."""
        if self.copy_stream is None:
            return _null()
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        return torch.cuda.stream(self.copy_stream)

    def _record(self):
        if self.copy_stream is None:
            return None
        event = torch.cuda.Event()
        event.record(self.copy_stream)
        return event

    # -- bringing rows in and out --------------------------------------------------

    def prepare(self, row_index, key=None):
        """Make the rows of a batch available to a later lookup; asynchronous on CUDA.
        row_index: the batch's stem.RowIndex on the CPU (unique ids and their counts).
        key: the unique_ids tensor the model will pass to lookup (the device copy);
        defaults to row_index.unique_ids."""
        counts = row_index.counts if row_index.counts is not None else torch.ones_like(row_index.unique_ids)
        key = row_index.unique_ids if key is None else key
        self.prepared[id(key)] = dict(self._plan(row_index.unique_ids.numpy(), counts.numpy()), key=key)

    def _plan(self, ids, counts):
        if not self.offloaded:
            return {"slots": ids, "ready": None}
        self._finish_writeback()              # the host must be current before it is read
        slots, miss_ids, miss_slots, evicted_ids, evicted_slots = self.cache.plan(ids, counts)
        with self._side_stream():
            if self.training_tables and len(evicted_ids):
                self._start_writeback(evicted_ids, evicted_slots)
            if len(miss_ids):
                self._load_rows(miss_ids, miss_slots)
            ready = self._record()
        return {"slots": slots, "ready": ready}

    def _start_writeback(self, ids, slots):
        """Copy rows (weights and moments together) back towards the host; the scatter into
        the host tables happens before the next plan reads them (_finish_writeback)."""
        slots_dev = torch.from_numpy(slots).to(self.device, non_blocking=True)
        staged = {}
        for name, pool in self.pool.items():
            rows = pool.index_select(0, slots_dev)                              # (K, n_stem, d_ff)
            if self.copy_stream is not None:
                host_rows = torch.empty(rows.shape, dtype=rows.dtype, pin_memory=True)
                rows = host_rows.copy_(rows, non_blocking=True)
            staged[name] = rows
        self.pending_writeback.append((torch.from_numpy(ids), staged, self._record()))
        self.bytes_d2h += len(ids) * self.row_bytes

    def _finish_writeback(self):
        for ids, staged, event in self.pending_writeback:
            if event is not None:
                event.synchronize()     # queued a step ago: complete in the steady state
            for name, rows in staged.items():
                self.host[name].index_copy_(0, ids, rows)
        self.pending_writeback = []

    def _load_rows(self, ids, slots):
        """Host rows of `ids` into device `slots`, through a pinned staging buffer."""
        ids_cpu = torch.from_numpy(ids)
        turn, self.staging_turn = self.staging_turn, 1 - self.staging_turn
        if self.staging[turn] is not None and self.staging[turn][1] is not None:
            self.staging[turn][1].synchronize()          # its copy, two batches ago, is done
        pin = self.copy_stream is not None
        staged = {}
        for name, host in self.host.items():
            buffer = torch.empty((len(ids),) + host.shape[1:], dtype=host.dtype, pin_memory=pin)
            staged[name] = torch.index_select(host, 0, ids_cpu, out=buffer)   # one vectorised gather
        slots_dev = torch.from_numpy(slots).to(self.device, non_blocking=True)
        for name, buffer in staged.items():
            self.pool[name].index_copy_(0, slots_dev, buffer.to(self.device, non_blocking=True))
        self.slot_of_id[ids_cpu.to(self.device, non_blocking=True)] = slots_dev
        self.staging[turn] = (staged, self._record())
        self.bytes_h2d += len(ids) * self.row_bytes

    # -- the table-source interface ---------------------------------------------------

    def lookup(self, unique_ids):
        """(U,) device ids -> (U, n_stem, d_ff) rows. Uses the plan prepared for these ids;
        with none (eval, generation) it plans them now, which reads the ids on the host
        (a sync: fine off the training hot path)."""
        plan = self.prepared.pop(id(unique_ids), None)
        if plan is None:
            ids = unique_ids.cpu().numpy()
            plan = self._plan(ids, np.ones_like(ids))
        if plan["ready"] is not None:
            torch.cuda.current_stream(self.device).wait_event(plan["ready"])
        slots = self.slot_of_id[unique_ids]
        if self.training_tables:       # catch-up: rows skipped by lazy steps are brought up to date first
            self.optimizer.catch_up(self.pool["weight"], self.pool["exp_avg"], self.pool["exp_avg_sq"], slots,
                                    unique_ids)
        if self.training_tables and torch.is_grad_enabled():
            self.in_flight.append(plan)       # its slots stay locked until step()
            return RowGather.apply(self.grad_anchor, self.pool["weight"], slots, self.grad_pool)  # (U, n_stem, d_ff)
        rows = self.pool["weight"].index_select(0, slots)
        # nothing will write these rows: free them now (later copies wait for this gather),
        # but only this plan's, since a training batch may be waiting for its step()
        self._release([plan])
        return rows

    def release(self):
        """The batches looked up are done: unlock their slots; transient rows leave."""
        plans, self.in_flight = self.in_flight, []
        self._release(plans)

    def _release(self, plans):
        if self.cache is not None:
            for plan in plans:
                ids, slots = self.cache.release(plan["slots"])
                if len(ids):
                    with self._side_stream():
                        if self.training_tables:
                            self._start_writeback(ids, slots)
                        self.slot_of_id[torch.from_numpy(ids).to(self.device, non_blocking=True)] = -1

    @torch.no_grad()
    def step(self, lr, max_norm=0.0):
        """Clip the touched rows' gradient on its own norm, apply lazy AdamW to those rows,
        clear their gradient, release their slots. Returns the gradient norm (a tensor)."""
        if not self.in_flight:
            return None
        slots = np.unique(np.concatenate([plan["slots"] for plan in self.in_flight]))
        if self.offloaded:
            # in id order, as resident slots are: the norm's summation order (its last bits)
            # must not depend on the cache layout, or resident and offloaded runs drift apart
            slots = slots[np.argsort(self.cache.id_of_slot[slots])]
        slots_dev = torch.from_numpy(slots).to(self.device, non_blocking=True)
        grad = self.grad_pool[slots_dev]                                        # (K, n_stem, d_ff)
        norm = grad.norm()
        if max_norm > 0:
            grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))
        ids = torch.from_numpy(self.cache.id_of_slot[slots]) if self.offloaded else slots_dev
        self.optimizer.update(self.pool["weight"], self.pool["exp_avg"], self.pool["exp_avg_sq"], slots_dev, grad, lr,
                              ids)
        self.grad_pool.index_fill_(0, slots_dev, 0)
        self.release()
        return norm

    # -- checkpoints and stats ----------------------------------------------------

    def flush(self):
        """Write every row on the device back to the host so the host tables are complete;
        with catch-up, bring every row up to the current step."""
        if not self.offloaded:
            if self.training_tables:
                every = torch.arange(len(self.slot_of_id), device=self.device)
                self.optimizer.catch_up(self.pool["weight"], self.pool["exp_avg"], self.pool["exp_avg_sq"], every, every)
            return
        if self.copy_stream is not None:
            torch.cuda.synchronize(self.device)
        self._finish_writeback()
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
        target = self.host if self.offloaded else self.pool
        for name, value in state.items():
            if name in target:
                target[name].copy_(value)
        if self.offloaded:      # the host rows are the truth now: forget the device copies
            self.pending_writeback = []         # and the stale rows on their way back
            self.cache = LFUCache(len(self.cache.slot_of_id), self.cache.n_cached,
                                  len(self.cache.id_of_slot) - self.cache.n_cached)
            self.slot_of_id.fill_(-1)

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
        """Tokens requested, unique ids, unique misses, hit rates, bytes moved."""
        s = dict(self.cache.stats) if self.cache is not None else {}
        if s:
            s["token_hit_rate"] = s["token_hits"] / max(1, s["tokens"])
            s["unique_hit_rate"] = 1 - s["unique_misses"] / max(1, s["unique"])
        s.update(bytes_h2d=self.bytes_h2d, bytes_d2h=self.bytes_d2h)
        return s


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def use_sparse_tables(model, device, cache_rows=None, transient_rows=0, training=True,
                      dtype=torch.float32, optimizer=None):
    """Replace model.tables (stem.ResidentTables) by SparseTables holding the same rows."""
    weight = model.tables.weight.detach().cpu()
    model.tables = SparseTables(weight, device, cache_rows, transient_rows, training, dtype, optimizer)
    return model.tables
