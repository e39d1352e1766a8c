"""The offloaded tables' asynchronous pipeline (worker thread, two copy queues) under random
delays: it must give the resident tables' bits, and each wait must be needed."""

import threading

import numpy as np
import pytest
import torch

import lazy_adamw
import offload
import stem
from tables import LazyTables

BETAS, EPS, WD = (0.9, 0.95), 1e-8, 0.1
VOCAB, N_STEM, D_FF = 1000, 2, 8


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors: one intra-op thread. (Two cost a scheduler wake-up per kernel, which
    on a busy 2-core machine is ~100 ms for an index_add_ of a few rows.)"""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def zipf_batches(n, tokens, seed):
    """Micro-batches of token ids drawn from a Zipf law over the vocabulary (as text is)."""
    weights = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    rng = np.random.default_rng(seed)
    return [stem.RowIndex.of(torch.from_numpy(rng.choice(VOCAB, size=tokens, p=weights / weights.sum())))
            for _ in range(n)]


def train(tables, batches, grads, accum, on_device, eval_every=50):
    """train.py's order: each micro-batch is prepared (from its host ids) one ahead of its
    lookup (of its device ids), the tables step every `accum` micro-batches, an evaluation
    read now and then."""
    tables.prepare(on_device[0])
    for i in range(len(batches) - 1):
        tables.prepare(on_device[i + 1])
        (tables.lookup(on_device[i]) * grads[i]).sum().backward()
        if i % accum == accum - 1:
            tables.step(1e-2 * (0.5 + 0.5 * np.cos(i / len(batches))), 1.0)
        if i % eval_every == eval_every - 1:
            with torch.no_grad():
                tables.lookup(stem.RowIndex.of(torch.arange(0, VOCAB, 5, device=on_device[i].unique_ids.device)))
    return {name: t.cpu() for name, t in tables.tensors().items()}


def run(steps, accum=2, delay=None, seed=0, device="cpu"):
    torch.manual_seed(seed)
    w0 = torch.randn(VOCAB, N_STEM, D_FF)
    batches = zipf_batches(steps * accum + 1, 12, seed)
    g = torch.Generator().manual_seed(seed)
    grads = [torch.randn(len(b.unique_ids), N_STEM, D_FF, generator=g).to(device) for b in batches]
    resident = LazyTables(w0, device, optimizer=lazy_adamw.LazyAdamW(BETAS, EPS, WD))
    # a 3-row cache: nearly every micro-batch evicts rows and re-reads rows that just left
    offloaded = LazyTables(w0, device, cache_rows=3, transient_rows=(accum + 1) * 12,
                                     optimizer=lazy_adamw.LazyAdamW(BETAS, EPS, WD), delay=delay)
    on_device = [b.to(device) for b in batches]         # the ids on the device, their host copy for the plans
    return (train(resident, batches, grads, accum, on_device), train(offloaded, batches, grads, accum, on_device),
            offloaded)


def test_delayed_pipeline_gives_the_resident_bits(monkeypatch):
    """2000 optimiser steps with seeded random delays before every worker job and every
    copy: the offloaded tables end bit for bit where resident ones do, and the run did hit
    the race the write-back wait guards across batches (a row read from the host while
    its write-back, on the other copy queue, had not yet run)."""
    raced, leaving = [], {}     # ("id"|"slot", n) -> a mark reached once its latest write-back has run
    original = offload.OffloadedRows._move

    def watching(self, compute_event, out_ids, out_slots, group, in_ids, in_slots, need):
        needed = [("id", i) for i in in_ids.tolist()]          # (slots are refilled in every move: not a race)
        raced.append(any(key in leaving and not leaving[key].done() for key in needed))
        ready = original(self, compute_event, out_ids, out_slots, group, in_ids, in_slots, need)
        mark = self.copies["out"].mark()
        leaving.update({("id", i): mark for i in out_ids.tolist()})
        return ready
    monkeypatch.setattr(offload.OffloadedRows, "_move", watching)
    resident, offloaded, tables = run(2000, delay=(7, 2e-4))
    for name in resident:
        assert torch.equal(resident[name], offloaded[name]), name
    stats = tables.stats()
    assert stats["unique_misses"] > 1000 and stats["bytes_d2h"] > 1000 * N_STEM * D_FF * 4
    assert sum(raced) > 10, "the delays never left a write-back pending when its row was read again"


def test_without_the_write_back_wait_the_run_diverges(monkeypatch):
    """The same run with the load queue's wait for write-backs switched off: rows are read
    from the host before their update has landed there, or copied into a slot before its
    row has left, and the tables end elsewhere."""
    original = offload.OffloadedRows._move

    def without_wait(self, *args):
        return original(self, *args[:-1], 0)          # need = 0: wait for no write-back
    monkeypatch.setattr(offload.OffloadedRows, "_move", without_wait)
    resident, offloaded, _ = run(2000, delay=(7, 2e-4))
    assert any(not torch.equal(resident[name], offloaded[name]) for name in resident)


def test_without_the_lookups_wait_the_run_diverges(monkeypatch):
    """The same run with the lookup's wait for its batch's copies switched off: the
    compute reads slots before their rows have arrived, and the tables end elsewhere."""
    monkeypatch.setattr(offload.OffloadedRows, "_compute_waits", lambda self, event: None)
    resident, offloaded, _ = run(300, delay=(7, 2e-4))
    assert any(not torch.equal(resident[name], offloaded[name]) for name in resident)


def test_a_failed_copy_stops_the_batch_that_needs_it(monkeypatch):
    tables = LazyTables(torch.randn(VOCAB, N_STEM, D_FF), "cpu", cache_rows=3, transient_rows=24)

    def broken(*args, **kwargs):
        raise OSError("copy failed")
    monkeypatch.setattr(torch, "_foreach_copy_", broken)
    batch = stem.RowIndex.of(torch.tensor([1, 2]))
    tables.prepare(batch)
    with pytest.raises(OSError, match="copy failed"):
        tables.lookup(batch)


def test_a_worker_error_reaches_the_training_thread(monkeypatch):
    tables = LazyTables(torch.randn(VOCAB, N_STEM, D_FF), "cpu", cache_rows=3, transient_rows=24)

    def broken(self, *args):
        raise OSError("host table unreadable")
    monkeypatch.setattr(offload.OffloadedRows, "_move", broken)
    batch = stem.RowIndex.of(torch.tensor([1, 2]))
    tables.prepare(batch)
    with pytest.raises(OSError, match="unreadable"):
        tables.lookup(batch)


def test_tables_free_their_threads():
    import gc
    tables = LazyTables(torch.randn(VOCAB, N_STEM, D_FF), "cpu", cache_rows=3, transient_rows=24)
    (tables.lookup(stem.RowIndex.of(torch.tensor([1, 2, 3, 4]))) * 1.0).sum().backward()
    tables.step(0.1)
    tables.flush()              # every lane has run a job: its thread exists
    lanes = [tables.rows.worker] + [queue.lane for queue in tables.rows.copies.values()]
    threads = [t for t in threading.enumerate() if t.name.startswith(tuple(lane.name + "_" for lane in lanes))]
    assert len(threads) == 3 and all(t.is_alive() for t in threads)
    del tables, lanes
    gc.collect()
    for t in threads:
        t.join(timeout=5)
    assert not any(t.is_alive() for t in threads)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_delayed_pipeline_gives_the_resident_bits():
    """On CUDA the copies run on a side stream and the worker is delayed at random: the
    offloaded tables still end where resident ones do (to float tolerance: the CUDA
    kernels of the two runs may differ in summation order)."""
    resident, offloaded, _ = run(500, delay=(3, 5e-4), device="cuda")
    for name in resident:
        torch.testing.assert_close(offloaded[name], resident[name], rtol=1e-5, atol=1e-6)
