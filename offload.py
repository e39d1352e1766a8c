"""
STEM tables in host memory: the rows of offloaded LazyTables (tables.py). The host holds
the whole table (and its moments, in training); the device holds a pool of slots, an LFU
cache of hot rows plus transient slots for the rows of batches in flight that the cache
does not hold. A batch's ids are known on the CPU one batch before it runs, so its rows
are on their way while the previous batch computes. docs/offload.md tells the design.

Per batch (`plan`, from the training thread):
  1. Training thread: the LFU plan (numpy, sub-millisecond): hits keep their slots, each
     miss takes a slot no batch in flight holds (a cached one if it is hotter than the
     coldest unlocked cached row, else the transient slot freed longest ago); the row it
     displaces must go back to the host first (training). The move is queued for the worker.
  2. Worker thread: queues one copy per row and tensor: on the "out" copy queue the
     displaced rows from their slots straight into their host rows, on the "in" queue the
     missing rows from their host rows straight into their slots. In training the host
     tables are page-locked, so on CUDA these are DMA transfers: the CPU only issues them
     and never passes over the rows' bytes. Inference tables are not pinned: they may be a
     mapped checkpoint, which pinning would read whole; a token needs few rows.
  3. Copy queues: two side CUDA streams (the two directions of PCIe have an engine each)
     that start after the compute queued before the plan. The loads wait for the
     write-backs holding one of their slots or ids (numbered groups: one wait per batch),
     and the batch's lookup makes the compute stream wait for its loads.
Without CUDA each copy queue is a thread, with the same order and events, so the waits
between threads are exercised on the CPU (tests inject random delays to prove them needed);
the copy streams' wait for earlier compute exists only on CUDA (CPU compute has run).
"""

import functools
import itertools
import weakref

import numpy as np
import torch

from configurator import UsageError
from lanes import CopyQueue, Lane, pin, wait


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
            n_slots = len(self.id_of_slot) - self.n_cached
            seen = n_slots - len(transient_free) + n_transient      # transient rows this moment needs
            raise UsageError(f"the table pool cannot hold the {len(unique_ids)} unique ids of a batch beside the "
                             f"batches in flight ({n_transient} not admitted, {len(transient_free)} of "
                             f"{n_slots} transient slots free): this data needs {seen} transient rows here; raise "
                             f"--table_transient_rows (to at least {seen}; more for the batches to come)")
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



def on_device(device, array):
    """A numpy index array as a tensor on `device`; pinned first, so the copy is asynchronous."""
    index = torch.from_numpy(array)
    if device.type == "cuda":
        index = index.pin_memory().to(device, non_blocking=True)
    return index


def _shut_down(queues, worker, unpin):
    """When offloaded rows are freed: the copies still queued finish before their memory is
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


class OffloadedRows:
    """Where an offloaded table's rows are: all in the host tables `host` ({name: (V, n_stem,
    d_ff)}), the hot ones also in the device pool `pool` ({name: (slots, n_stem, d_ff)}) at
    the slots the LFU cache gives them. views: one view per row of each pool tensor.
    The training thread plans and queues; the worker (a Lane) queues the copies of rows
    between the host tables and the pool; two copy queues run them, out and in. The
    training thread waits only when a batch's rows are needed (slots_on_device) and where
    host and device must agree (drain: evaluation, checkpoints, edits). `delay` = (seed,
    max seconds) injects random delays into the worker and (without CUDA) the copy queues,
    for tests; copy_rate (bytes/s, CPU only): the copy queues wait instead of copying (the
    pipeline simulation, simulate.py)."""

    def __init__(self, host, pool, views, device, n_cached, n_transient, training, pinned, delay=None,
                 copy_rate=None):
        self.host, self.pool, self.device, self.training = host, pool, device, training
        self.names = tuple(pool)
        vocab_size = host["weight"].shape[0]
        self.views = {"pool": views, "host": {name: tensor.unbind(0) for name, tensor in host.items()}}
        self.cache = LFUCache(vocab_size, n_cached, n_transient)
        # copies to the device and back run on queues of their own (the two directions of
        # PCIe, two copy engines), each with its own sequence of delays
        self.copies = {way: CopyQueue(device, (delay[0] + k, delay[1]) if delay else None, copy_rate)
                       for k, way in ((1, "in"), (2, "out"))}
        self.worker = Lane("table worker", delay)
        weakref.finalize(self, _shut_down, list(self.copies.values()), self.worker, pin(pinned) if pinned else None)
        for tensor in pool.values():
            tensor.zero_()
        self.row_bytes = pool["weight"][0].numel() * pool["weight"].element_size()     # one name's row
        self.bytes_h2d = self.bytes_d2h = 0
        # the number of the last write-back group of each id and slot (training thread);
        # the worker's marks of groups not yet waited for, and the last one waited for
        self.write_backs = 0
        self.written_back = (np.zeros(vocab_size, dtype=np.int64), np.zeros(len(self.cache.id_of_slot), dtype=np.int64))
        self.landed, self.waited_for = {}, 0

    def table(self):
        return self.host

    def ids_of(self, slots):
        return self.cache.id_of_slot[slots]

    # -- the training thread: plans ----------------------------------------------------

    def plan(self, ids, counts):
        """Slots for a batch's unique ids (U,) occurring counts (U,) times, and the queued
        move of its missing rows (None when nothing moves)."""
        slots, miss_ids, miss_slots, evicted_ids, evicted_slots = self.cache.plan(ids, counts)
        if not self.training:        # nothing changed them: evicted rows just go
            evicted_ids = evicted_slots = evicted_ids[:0]
        return {"slots": slots, "moved": self._queue_move(evicted_ids, evicted_slots, miss_ids, miss_slots)}

    def slots_on_device(self, plan, unique_ids):
        """The plan's slots on the device, once the compute that follows can read their rows."""
        if plan["moved"] is not None:
            ready = plan["moved"].result()      # the worker has queued this batch's copies
            if ready is not None:
                self._compute_waits(ready)
        return on_device(self.device, plan["slots"])

    def release(self, plans):
        """The batches are done with their slots (transient rows stay until misses take them)."""
        for plan in plans:
            self.cache.release(plan["slots"])

    def _queue_move(self, out_ids, out_slots, in_ids, in_slots):
        """Queue the worker's _move of these rows: the write-back of the rows going out (a
        numbered group) and the loads, which wait for the latest group holding one of their
        ids or slots (this one, whose slots they fill, or an earlier one still on its way
        back). Returns the move's future, or None when nothing moves."""
        if not (len(out_ids) or len(in_ids)):
            return None
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
            wait(event)

    # -- the worker thread: copies queued in order -------------------------------------

    def _move(self, compute_event, out_ids, out_slots, group, in_ids, in_slots, need):
        """On the "out" queue, rows at out_slots go back to their host rows out_ids (write-back
        group `group`, marked when done); on the "in" queue, once group `need` is done, host
        rows in_ids come into in_slots. One copy per row and tensor. Returns the event after
        which the incoming rows are in the pool (None if none come)."""
        for queue in self.copies.values():
            queue.wait_for(compute_event)     # slots are read (out) or overwritten (in) after that compute
        host, pool = self.views["host"], self.views["pool"]

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

    def drain(self):
        """Wait until every queued copy and write-back is done: host and pool agree."""
        self.worker.submit(lambda: [wait(queue.mark()) for queue in self.copies.values()]).result()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    # -- reads, write-backs and edits -------------------------------------------------

    @torch.no_grad()
    def read(self, names, unique_ids):
        """Current rows of unique_ids: from the pool where the device has them, else from the
        host (no LFU count, nothing moves for later)."""
        self.drain()
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
        return rows

    def write_back(self, training):
        """Wait for the copies in flight; in training, write every row on the device back to
        its host row. Returns the host tables, now complete."""
        self.drain()
        if training:
            ids, slots_dev = self._occupied()
            for name, host in self.host.items():
                host.index_copy_(0, ids, self.pool[name][slots_dev].cpu())
        return self.host

    def _occupied(self):
        """(ids on the host, their slots on the device) of every row the pool holds."""
        slots = np.flatnonzero(self.cache.id_of_slot >= 0)
        return torch.from_numpy(self.cache.id_of_slot[slots]), torch.from_numpy(slots).to(self.device)

    def reload(self):
        """The device copies of the rows the pool holds, read again from their host rows."""
        ids, slots_dev = self._occupied()
        for name, host in self.host.items():
            self.pool[name].index_copy_(0, slots_dev, host.index_select(0, ids).to(self.device))

    def forget_device_rows(self):
        """The host tables changed under the pool: no device row is current any more."""
        self.cache = LFUCache(len(self.cache.slot_of_id), self.cache.n_cached,
                              len(self.cache.id_of_slot) - self.cache.n_cached)

    def write_rows(self, ids, rows):
        self.host["weight"][ids] = rows.to(self.host["weight"])
        slots = torch.from_numpy(self.cache.slot_of_id[ids.numpy()])
        on_pool = slots >= 0
        if on_pool.any():
            self.pool["weight"][slots[on_pool].to(self.device)] = rows[on_pool].to(self.pool["weight"])

    def stats(self):
        """Tokens requested, unique ids, unique misses, hit rates, bytes moved, and seconds:
        the worker's (queueing copies) and each copy queue's (CPU: the copies themselves,
        and the in queue's waits)."""
        s = dict(self.cache.stats)
        s["token_hit_rate"] = s["token_hits"] / max(1, s["tokens"])
        s["unique_hit_rate"] = 1 - s["unique_misses"] / max(1, s["unique"])
        s.update(worker_seconds=self.worker.busy, bytes_h2d=self.bytes_h2d, bytes_d2h=self.bytes_d2h,
                 **{f"copy_{way}_seconds": queue.lane.busy if queue.lane is not None else None
                    for way, queue in self.copies.items()})
        return s
