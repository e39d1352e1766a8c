"""
Simulations of the offloaded tables that need no GPU, on a dataset's real batches:

    python simulate.py --mode=pipeline --dataset=text             # the offload pipeline per micro-batch
    python simulate.py --mode=cache --dataset=text --batch_size=8  # dedup and LFU hit rates per cache size

pipeline: the real offload.OffloadedRows at the rows of a config (config/stem_350m.py by
default) on a dataset's training batches: what the training thread spends per
micro-batch on table bookkeeping, what the worker spends issuing row copies, and how long
the copy engines run, with a GPU's compute of each micro-batch stood in by a sleep
(--device=cuda: real copies on the side streams).
cache: no model; the LFU bookkeeping of offload.LFUCache replayed on a dataset's training
batch stream and on a decoding stream (B sequences, one token each per step), per cache
size, with the bytes a step moves with and without dedup.
docs/offload.md explains what the figures mean.
"""

import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import configurator
import data
import lazy_adamw
import memory
import offload
import stem
import tables
from configurator import UsageError, knob
from model import GPT, GPTConfig, gpu_peak_flops
from moe import MoEConfig


@dataclass
class SimConfig:
    mode: str = knob("pipeline", choices=("pipeline", "cache"), help="what to simulate")
    config: str = knob("config/stem_350m.py", help="the config file whose model (rows, FLOPs) is simulated")
    dataset: str = knob("text", help="whose training batches are replayed (prepared with the config's vocabulary "
                                     "for the pipeline)")
    batch_size: int = knob(16, ge=1, help="sequences per micro-batch")
    block_size: int = knob(0, ge=0, help="tokens per sequence; 0: the config's")
    table_cache_fraction: float = knob(0.1, gt=0, le=1, help="pipeline: device cache rows / vocabulary")
    grad_accum_steps: int = knob(4, ge=1, help="pipeline: micro-batches per optimiser step")
    micro_batches: int = knob(48, ge=1, help="pipeline: timed micro-batches (after the warm-up steps)")
    warmup: int = knob(8, ge=0, help="pipeline: untimed optimiser steps first (the cache fills)")
    layers: int = knob(0, ge=0, help="pipeline: STEM layers held (0: as many as fit in half the free memory)")
    gpu_mfu: float = knob(0.4, gt=0, le=1, help="pipeline: the GPU's utilisation, to time its compute of a "
                                                "micro-batch")
    gpu: str = knob("H100 SXM", help="pipeline: the GPU whose bf16 peak times that compute")
    copy_gbps: float = knob(25.0, gt=0, help="pipeline on the CPU: the copy engine's rate each way (pinned PCIe "
                                             "copies)")
    copy_issue_us: float = knob(5.0, ge=0, help="pipeline on the CPU: the worker's time to issue one row copy on "
                                                "CUDA (assumed, not measured)")
    n_batches: int = knob(200, ge=2, help="cache: batches (and decode steps) replayed")
    cache_fractions: str = knob("0.01,0.05,0.1,0.25", help="cache: the cache sizes, as fractions of the vocabulary")
    plot: str = knob("", help="cache: write a plot of hit rate against cache size here (needs matplotlib)")
    device: str = knob("cpu", help="pipeline: cpu, or cuda for real copies")
    seed: int = knob(0, ge=0, help="the draw of batches")

    def __post_init__(self):
        configurator.check(self)
        if gpu_peak_flops(self.gpu) is None:
            raise UsageError(f"no bf16 peak known for gpu '{self.gpu}'")


def model_config(sc):
    """The GPTConfig of the config file (its training keys ignored)."""
    return GPTConfig.from_dict(configurator.parse_overrides([sc.config], GPTConfig, MoEConfig,
                                                            files_set_other_keys=True))


def lfu_replay(stream, vocab_size, n_cached, n_transient):
    """Replay batches of ids through offload.LFUCache; stats over the second half (warm)."""
    cache = offload.LFUCache(vocab_size, n_cached, n_transient)
    totals = dict(tokens=0, unique=0, misses=0, token_hits=0)
    for i, ids in enumerate(stream):
        unique_ids, counts = np.unique(ids, return_counts=True)
        before = dict(cache.stats)
        slots = cache.plan(unique_ids, counts)[0]
        cache.release(slots)
        if i >= len(stream) // 2:
            totals["tokens"] += ids.size
            totals["unique"] += len(unique_ids)
            totals["misses"] += cache.stats["unique_misses"] - before["unique_misses"]
            totals["token_hits"] += cache.stats["token_hits"] - before["token_hits"]
    return totals


def simulate_cache(sc):
    """Dedup and LFU hit rates on a dataset, for training batches and for decoding."""
    meta = data.load_meta(sc.dataset)
    tokens = data.tokens(sc.dataset, "train", meta["dtype"])
    config = model_config(sc)
    vocab_size, T, B = meta["vocab_size"], sc.block_size or config.block_size, sc.batch_size
    rng = np.random.default_rng(sc.seed)
    starts = rng.integers(0, len(tokens) - T - 1, size=(sc.n_batches, B))
    training = [np.stack([tokens[s:s + T] for s in row]).astype(np.int64) for row in starts]
    # decoding: B sequences read one token per step (the rows a decode step needs)
    seqs = np.stack([tokens[s:s + sc.n_batches] for s in rng.integers(0, len(tokens) - sc.n_batches, size=B)])
    decoding = [seqs[:, t].astype(np.int64) for t in range(sc.n_batches)]
    n_stem, d_ff = len(config.stem_layer_ids), config.d_ff
    row_bytes = n_stem * d_ff * 2                       # bf16 rows, the inference case
    print(f"dataset {sc.dataset}: vocab {vocab_size}, {len(tokens):,} train tokens; rows of {sc.config} "
          f"({n_stem} STEM layers x d_ff {d_ff}, bf16) = {row_bytes / 1024:.0f} KiB; stats over the "
          f"second half of {sc.n_batches} steps")
    results = {}
    for name, stream in (("train", training), ("decode", decoding)):
        n_tokens = sum(ids.size for ids in stream)
        unique = sum(len(np.unique(ids)) for ids in stream)
        print(f"\n{name}: batch {B}x{T if name == 'train' else 1}; unique/total tokens per batch "
              f"{unique / n_tokens:.3f}; bytes per step without dedup {n_tokens / len(stream) * row_bytes / 2**20:.1f} "
              f"MiB, with dedup {unique / len(stream) * row_bytes / 2**20:.1f} MiB "
              f"({100 * (1 - unique / n_tokens):.1f}% less)")
        # transient slots as memory.py sizes them for one batch in flight (they keep recent rows too)
        n_transient = memory.with_margin(max(len(np.unique(ids)) for ids in stream), vocab_size)
        print(f"transient slots {n_transient}")
        print(f"{'cache':>8}{'rows':>8}{'token hit':>11}{'unique hit':>12}{'H2D MiB/step':>14}")
        results[name] = []
        for fraction in tqdm([float(f) for f in sc.cache_fractions.split(",")], desc=name, leave=False):
            n_cached = max(1, int(fraction * vocab_size))
            t = lfu_replay(stream, vocab_size, n_cached, n_transient)
            steps = len(stream) - len(stream) // 2
            results[name].append({"fraction": fraction, "rows": n_cached, "token_hit": t["token_hits"] / t["tokens"],
                                  "unique_hit": 1 - t["misses"] / t["unique"],
                                  "h2d_mib": t["misses"] / steps * row_bytes / 2**20})
            r = results[name][-1]
            tqdm.write(f"{100 * fraction:>7.0f}%{n_cached:>8}{r['token_hit']:>11.3f}{r['unique_hit']:>12.3f}"
                       f"{r['h2d_mib']:>14.2f}")
    if sc.plot:
        plot_hit_rates(sc, results)
    return results


def plot_hit_rates(sc, results):
    """Hit rate against cache size, training and decoding, token- and unique-row-weighted."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, style in (("train", "-"), ("decode", "--")):
        x = [100 * r["fraction"] for r in results[name]]
        ax.plot(x, [r["token_hit"] for r in results[name]], "o" + style, label=f"{name}: token hit rate")
        ax.plot(x, [r["unique_hit"] for r in results[name]], "s" + style, label=f"{name}: unique-row hit rate")
    ax.set(xscale="log", xlabel="LFU cache size (% of the vocabulary)", ylabel="hit rate", ylim=(0, 1),
           title=f"{sc.dataset}: offloaded tables' device cache")
    ax.legend()
    fig.tight_layout()
    fig.savefig(sc.plot, dpi=120)
    print(f"wrote {sc.plot}")


def simulate_pipeline(sc, device):
    """The offloaded tables' host pipeline at the config's row size, on real token batches:
    what the training thread spends per micro-batch on table bookkeeping (planning,
    queueing, waiting for the worker or a copy) while the worker queues the copies of rows
    between the pinned host tables and the device pool. The GPU's compute of each
    micro-batch is a sleep of its FLOPs at the GPU's peak x gpu_mfu (the training thread
    is blocked behind the GPU then); the arithmetic a GPU would run (lookup gather,
    catch-up, backward, lazy AdamW update) runs on this CPU before the next plan is queued
    and is reported apart. On the CPU the copy engine is a wait of bytes / copy_gbps, and
    the worker's cost of issuing each copy on CUDA (copy_issue_us) is added to its time;
    with --device=cuda the copies and their issuing are real (but the compute is still a
    host sleep, so a copy arriving late is not seen). A machine that cannot hold all STEM
    layers' tables holds `layers` of them: the row bytes, the copies' and the GPU's times
    scale with the layers, so they and the waits are reported x (all layers / layers
    held); planning and the worker's time, which go by rows, do not scale."""
    config = model_config(sc)
    V, T, B, G, d_ff = config.vocab_size, sc.block_size or config.block_size, sc.batch_size, sc.grad_accum_steps, \
        config.d_ff
    n_stem = len(config.stem_layer_ids)
    if not n_stem:
        raise UsageError(f"{sc.config} has no STEM layers")
    meta = data.read_meta(sc.dataset)
    path = os.path.join(data.data_dir_of(sc.dataset), "train.bin")
    if meta is None or meta.get("vocab_size") != V or not os.path.exists(path):
        raise UsageError(f"the pipeline simulation reads real batches from data/{sc.dataset} prepared with --vocab_size={V}; "
                         f"e.g. the standard library: python data/text/prepare.py --input=$(python -c 'import "
                         f"sysconfig; print(sysconfig.get_paths()[\"stdlib\"])') --glob='*.py' "
                         f"--exclude=site-packages --vocab_size={V}")
    cache_rows = max(1, int(sc.table_cache_fraction * V))
    in_flight = memory.rows_in_flight(sc.dataset, B, T, G, V, sc.seed)
    layout = tables.table_buffers(V, 1, d_ff, cache_rows, in_flight.rows)
    layer_bytes = sum(memory.nbytes(shape, dtype) for shape, dtype, _ in layout.values())
    layers = sc.layers or max(1, min(n_stem, int(0.5 * (memory.available_bytes() or 8 * 2**30) / layer_bytes)))
    layers, scale = min(layers, n_stem), n_stem / min(layers, n_stem)
    with torch.device("meta"):
        flops = 3 * GPT(config).flops_per_token() * B * T                      # one micro-batch, training
    gpu_seconds = flops / (gpu_peak_flops(sc.gpu) * sc.gpu_mfu)
    print(f"pipeline: {sc.config} rows ({n_stem} x {d_ff} fp32, weights + 2 moments), {layers} of {n_stem} STEM "
          f"layers held ({layers * layer_bytes / 2**30:.1f} GiB); times and bytes below x {scale:.2f}")
    print(f"micro-batch {B} x {T} of {sc.dataset}, {G} per step; cache {cache_rows} rows, {in_flight.rows} transient "
          f"slots ({in_flight.source}); {sc.gpu} compute {1e3 * gpu_seconds:.1f} ms per micro-batch at "
          f"{100 * sc.gpu_mfu:.0f}% MFU")
    # without CUDA the copy engine is a wait of bytes / copy_gbps: a DMA engine does not take
    # the CPU's cores, and copying on them here would take the cores the worker needs
    weight = torch.full((V, layers, d_ff), 0.01)     # written, not calloc-ed: its pages exist, as a real table's do
    lazy = tables.LazyTables(weight, device, cache_rows, in_flight.rows,
                             optimizer=lazy_adamw.LazyAdamW(catch_up="full"), take_weight=True,
                             copy_rate=None if device.startswith("cuda") else sc.copy_gbps * 1e9)
    train_tokens = data.tokens(sc.dataset, "train", meta["dtype"])
    generator = torch.Generator().manual_seed(sc.seed)
    total = (sc.warmup + sc.micro_batches // G + 1) * G
    batches = [stem.RowIndex.of(torch.from_numpy(data.draw_windows(train_tokens, generator, B, T)[:, :-1]
                                                 .astype(np.int64))).to(device) for _ in range(total + 1)]
    per, arithmetic, logged = replay(lazy, batches, sc.warmup * G, G, gpu_seconds / scale)
    return report(sc, device, lazy, per, arithmetic, logged, layers, scale, gpu_seconds)


def replay(lazy, batches, warmup, G, gpu_seconds):
    """Run micro-batches through the tables as training does; returns the stats per
    micro-batch after `warmup` of them, this CPU's arithmetic per micro-batch and, for
    each, how many entries each copy queue's log had once its copies were queued."""
    copy_queues = lazy.rows.copies
    total = len(batches) - 1
    lazy.prepare(batches[0])
    arithmetic, before, logged = 0.0, None, []
    for i in tqdm(range(total), desc="micro-batches", leave=False):
        if i == warmup:           # the cache has filled: start counting
            arithmetic, before = 0.0, lazy.stats()
        start, clock = time.perf_counter(), dict(lazy.clock)
        rows = lazy.lookup(batches[i])                      # (U, layers, d_ff)
        logged.append({way: len(queue.log) for way, queue in copy_queues.items()})   # i's copies are queued
        (rows * 1e-3).sum().backward()
        if i % G == G - 1:
            lazy.step(1e-4, 1.0)
        # this CPU's arithmetic (a GPU's work) is done before the next micro-batch's rows
        # start moving, so that it neither slows the worker nor lends it time
        lazy.prepare(batches[i + 1])
        arithmetic += time.perf_counter() - start - sum(lazy.clock[k] - clock[k] for k in ("plan", "wait"))
        time.sleep(gpu_seconds)                               # the GPU runs micro-batch i + 1's forward and backward
    after, n = lazy.stats(), total - warmup
    per = {k: (after[k] - before[k]) / n for k in after if k in before and isinstance(after[k], (int, float))}
    return per, arithmetic / n, logged


def report(sc, device, lazy, per, arithmetic, logged, layers, scale, gpu_seconds):
    """Print the per-micro-batch figures; return them."""
    G, copy_queues = sc.grad_accum_steps, lazy.rows.copies
    ms = lambda seconds, scaled=True: 1e3 * seconds * (scale if scaled else 1)
    n_copies = (per["bytes_h2d"] + per["bytes_d2h"]) / lazy.row_bytes       # one per row and tensor
    cpu = device == "cpu"
    issue_ms = n_copies * sc.copy_issue_us / 1e3 if cpu else 0.0              # on CUDA: in the worker's time
    worker_ms, gpu_ms = ms(per["worker_seconds"], False) + issue_ms, ms(gpu_seconds, False)
    copy_ms = {way: ms(per[f"copy_{way}_seconds"]) if per.get(f"copy_{way}_seconds") is not None else 0.0
               for way in ("in", "out")}
    # The worker and the copy engines have one GPU micro-batch to ready the next one's rows,
    # but this CPU's slower arithmetic gives them more (then no wait shows here). So the
    # copies queued are also replayed on a GPU's timeline, and the larger wait counts.
    stalls = [0.0]
    if cpu:
        # a copy takes its bytes' time at copy_gbps, or its issuing time if that is longer
        per_copy = max(lazy.row_bytes * scale / (sc.copy_gbps * 1e9), sc.copy_issue_us / 1e6)
        op = lambda entry: ("copy", entry / lazy.row_bytes * per_copy) if isinstance(entry, int) else entry
        moves = []
        for first, last in zip([{"in": 0, "out": 0}] + logged[:-1], logged):   # from the first micro-batch, so
            moves.append({way: [op(entry) for entry in queue.log[first[way]:last[way]]]   # that the timed ones
                          for way, queue in copy_queues.items()})                       # start steady
        stalls = copy_engine_stalls(moves, gpu_seconds)[sc.warmup * G:]
    wait_ms = max(ms(per["wait_seconds"]), worker_ms - gpu_ms, 1e3 * sum(stalls) / len(stalls))
    main_ms = ms(per["plan_seconds"], False) + wait_ms
    print(f"per micro-batch: {per['unique']:.0f} unique ids, {per['unique_misses']:.0f} misses, H2D "
          f"{scale * per['bytes_h2d'] / 2**30:.3f} GiB, D2H {scale * per['bytes_d2h'] / 2**30:.3f} GiB (write-backs)")
    print(f"training thread: plan + queue {ms(per['plan_seconds'], False):.2f} ms, waits {wait_ms:.2f} ms (measured "
          f"{ms(per['wait_seconds']):.2f}, the worker's excess over the GPU's {gpu_ms:.1f} ms "
          f"{max(0.0, worker_ms - gpu_ms):.2f}, the copies replayed on the GPU's timeline "
          f"{1e3 * sum(stalls) / len(stalls):.2f}, at most {1e3 * max(stalls):.2f}); arithmetic a GPU runs, here on "
          f"the CPU: {ms(arithmetic):.1f} ms")
    copies = ("" if per.get("copy_in_seconds") is None else
              f"; copy engines (waits of bytes / {sc.copy_gbps:g} GB/s) in {copy_ms['in']:.1f} ms (with its waits "
              f"for write-backs), out {copy_ms['out']:.1f} ms")
    issued = f" (views {worker_ms - issue_ms:.1f} + issuing at {sc.copy_issue_us:g} us each {issue_ms:.1f})" if cpu else ""
    print(f"worker: queueing {n_copies:.0f} row copies {worker_ms:.1f} ms{issued}" + copies)
    print(f"pipeline: main thread {main_ms:.1f} ms per micro-batch, worker {worker_ms:.1f} ms, "
          f"H2D {scale * per['bytes_h2d'] / 2**30:.3f} GiB")
    return {"main_ms": main_ms, "worker_ms": worker_ms, "layers": layers, "gpu_ms": gpu_ms,
            "misses": per["unique_misses"],
            "h2d_gib": scale * per["bytes_h2d"] / 2**30, "d2h_gib": scale * per["bytes_d2h"] / 2**30}


def copy_engine_stalls(moves, gpu_seconds):
    """Seconds each micro-batch's compute waits for its rows on a GPU, replaying the copies
    queued for it on the two copy engines: moves[k] = {"in": ops, "out": ops}, ops in the
    order queued: ("copy", seconds), ("mark", key) and ("wait", key) for a mark of the
    other engine. As in train.py, micro-batch k's plan is queued before k-1's forward, so
    its copies start once their engine is free and k-2 has computed; k computes once k-1
    has and its rows are in (its last "in" mark). (The moves come from the bench's loop,
    which plans in the same order of micro-batches and steps.)"""
    engine_free, landed = {"in": 0.0, "out": 0.0}, {}
    end_before_last = end_last = 0.0
    stalls = []
    for move in moves:
        ready = end_last
        for way in ("out", "in"):           # the in engine waits for out marks, never the other way
            t = max(engine_free[way], end_before_last)
            for kind, value in move[way]:
                if kind == "copy":
                    t += value
                elif kind == "wait":
                    t = max(t, landed[value])
                else:
                    landed[value] = t
                    ready = t if way == "in" else ready
            engine_free[way] = t
        begin = max(end_last, ready)
        stalls.append(begin - end_last)
        end_before_last, end_last = end_last, begin + gpu_seconds
    return stalls


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        sc = SimConfig(**configurator.parse(argv, SimConfig, doc=__doc__))
        device, _ = configurator.resolve_device(sc.device, "float32")
        if sc.mode == "cache":
            return simulate_cache(sc)
        return simulate_pipeline(sc, device)
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
