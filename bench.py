"""
Measure STEM against its dense twin, and offloaded tables against resident ones.

    python bench.py                                  # train steps: dense, STEM resident, STEM offloaded
    python bench.py --preset=350m --compile=True     # the 350M configs on a GPU (bf16)
    python bench.py --mode=decode --preset=350m      # decode tokens/s: resident vs offloaded tables
    python bench.py --mode=cache --dataset=text --batch_size=8 --block_size=1024
                                                     # dedup and LFU hit rates of a dataset's batches
    python bench.py --mode=pipeline --preset=350m    # offloaded tables' host pipeline per micro-batch on real
                                                     # text: main thread, worker, bytes (--device=cuda: real copies)
    python bench.py --mode=compare --dataset=facts   # train dense, STEM third/half/full, Hash-MoE and
                                                     # top-2 MoE on the same tokens; results table + plot

train/decode: batches are synthetic token ids drawn from a Zipf distribution (natural text
is roughly Zipfian), so the dedup and the cache see a realistic number of unique ids. On the
CPU the runners are timed in alternating rounds, with one more dense round at the end; a
model's time ratio is the median over rounds of its median step over the dense model's at the
same moment (interpolated between the dense rounds before and after it), so that a drift of the
shared machine's speed that is linear between two dense rounds cancels. --processes=N repeats
it all in N fresh processes and reports the median ratio. On a GPU the models run one after
another: median step over median step (CUDA events). Offloaded tables prefetch batch i+1 while
batch i runs, as train.py does.
cache: no model; the LFU bookkeeping of offload.py replayed on a dataset's training batch
stream and on a decoding stream (B sequences, one token each per step), per cache size.
compare: train.py runs, one per variant, with the same data, seed, batches and number of
steps; the table has final val loss, FLOPs/token, parameters, tokens/s and loss spikes.
"""

import concurrent.futures
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch

import configurator
import lazy_adamw
import offload
import plan
import stem
import train
from configurator import UsageError, knob
from model import GPT, GPTConfig, gpu_peak_flops

PRESETS = {
    "tiny": dict(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=256),
    "mid": dict(vocab_size=32768, block_size=256, n_layer=8, n_head=8, n_embd=512, tie_embeddings=True),
    "350m": dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024,
                 d_ff=2816, tie_embeddings=True),
}


@dataclass
class BenchConfig:
    mode: str = knob("train", choices=("train", "decode", "cache", "compare", "pipeline"))
    preset: str = knob("tiny", choices=tuple(PRESETS))
    batch_size: int = knob(0, ge=0)             # 0: 16 for the pipeline, else 8
    tables: str = knob("both", choices=("resident", "offload", "both"))     # train/decode
    table_cache_fraction: float = knob(0.1, gt=0, le=1)
    new_tokens: int = knob(64, ge=1)            # decode: tokens generated per timed run
    prompt_tokens: int = knob(128, ge=2)        # decode: prefill length
    dataset: str = ""                           # cache/compare (default facts), pipeline (default text)
    block_size: int = knob(0, ge=0)             # cache: 0 means the preset's
    n_batches: int = knob(200, ge=2)            # cache: batches (and decode steps) replayed
    cache_fractions: str = "0.01,0.05,0.1,0.25"
    variants: str = "dense,stem:third,stem:half,stem:full,hash_moe:16x1,moe:8x2"   # compare
    max_iters: int = knob(600, ge=1)            # compare: steps per variant (batch and context from train.py)
    out_dir: str = "out-compare"                # compare: one folder per variant, plus results.md/json/png
    train_args: str = ""                        # compare: extra --key=value flags for every run, space-separated
    spike_margin: float = knob(0.2, gt=0)       # compare: a spike is a loss above (1 + margin) x its running mean
    steps: int = knob(20, ge=1)                 # timed steps per model per round
    rounds: int = knob(3, ge=1)
    warmup: int = knob(8, ge=1)                 # untimed steps first: on the CPU the heap takes ~5-8 steps to settle
    stem_layers: str = "full"
    stem_variant: str = knob("up", choices=stem.VARIANTS)
    zipf_exponent: float = knob(1.1, gt=0)
    device: str = "auto"
    dtype: str = knob("auto", choices=configurator.DTYPES)
    compile: bool = False
    catchup: bool = False                       # train: also time resident tables with adamw_catchup
    processes: int = knob(1, ge=1)              # train on the CPU: repeat the whole timing in this many fresh
                                                # processes and report the median ratio (on a shared VM a
                                                # process's speed varies by more than the code's effect)
    grad_accum_steps: int = knob(4, ge=1)       # pipeline: micro-batches per optimiser step (as stem_350m.py)
    micro_batches: int = knob(48, ge=1)         # pipeline: timed micro-batches (after `warmup` steps)
    layers: int = knob(0, ge=0)                 # pipeline: STEM layers held (0: as many as fit in half the free memory)
    gpu_mfu: float = knob(0.4, gt=0, le=1)      # pipeline: the GPU's utilisation, to time its compute of a micro-batch
    gpu: str = "H100 SXM"                       # pipeline: the GPU whose peak times that compute
    copy_gbps: float = knob(25.0, gt=0)         # pipeline on the CPU: the copy engine's rate each way (pinned
                                                # PCIe copies; ~25 GB/s is a conservative H100 figure)
    copy_issue_us: float = knob(5.0, ge=0)      # pipeline on the CPU: the worker's time to issue one row copy on
                                                # CUDA (torch's copy_ and cudaMemcpyAsync: assumed, not measured)
    seed: int = knob(0, ge=0)

    def __post_init__(self):
        configurator.check(self)
        self.batch_size = self.batch_size or (16 if self.mode == "pipeline" else 8)
        self.dataset = self.dataset or ("text" if self.mode == "pipeline" else "facts")
        if self.mode == "pipeline" and gpu_peak_flops(self.gpu) is None:
            raise UsageError(f"no bf16 peak known for gpu '{self.gpu}'")


def zipf_batch(batch_size, block_size, vocab_size, exponent, generator):
    """(B, T) token ids with P(rank r) proportional to r^-exponent, ranks shuffled over ids."""
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = ranks.pow(-exponent)
    ids = torch.multinomial(probs / probs.sum(), batch_size * (block_size + 1), replacement=True, generator=generator)
    permutation = torch.randperm(vocab_size, generator=generator)
    return permutation[ids].view(batch_size, block_size + 1)


class Runner:
    """One model and its optimiser, stepped by train.py's own train_step.
    tables: None (dense AdamW over resident tables, the paper's), "resident" or "offload"
    (both with lazy AdamW through offload.SparseTables), or "catchup" (resident, adamw_catchup)."""

    def __init__(self, name, config, bc, device, dtype, tables=None):
        torch.manual_seed(bc.seed)
        self.name, self.config = name, config
        self.model = GPT(config).to(device)
        self.raw_model = self.model
        optimizer = {None: "adamw", "catchup": "adamw_catchup"}.get(tables, "lazy_adamw")
        self.tc = train.TrainConfig(device=device, batch_size=bc.batch_size,
                                    tables="offload" if tables == "offload" else "resident",
                                    table_optimizer=optimizer, table_cache_fraction=bc.table_cache_fraction,
                                    # slots for the rows of the two batches in flight: the expected unique
                                    # ids of the Zipf draws, with the plan's margin
                                    table_transient_rows=plan.with_margin(math.ceil(plan.zipf_unique(
                                        config.vocab_size, 2 * bc.batch_size * config.block_size,
                                        bc.zipf_exponent)), config.vocab_size))
        self.sparse = train.use_table_options(self.model, self.tc, config, device)
        self.optimizer = train.configure_optimizer(self.model, self.tc, device)
        if bc.compile:
            self.model = torch.compile(self.model)
        self.ctx = configurator.autocast_context(device, dtype)
        self.device = device
        self.times, self.peak_memory = [], 0
        self.rounds = []        # (mid-time of the round, its median step): the drift correction's samples

    def batch(self, window):
        """The device batch of a (B, T+1) window, with its row index as train.py's loader makes it."""
        x, y = window[:, :-1], window[:, 1:]
        row_index_cpu = stem.RowIndex.of(x) if self.raw_model.tables is not None else None
        row_index = row_index_cpu.to(self.device) if row_index_cpu is not None else None
        return train.Batch(x.to(self.device), y.to(self.device), row_index, row_index_cpu)

    def prepare(self, batch):
        if self.sparse:
            self.raw_model.tables.prepare(batch.row_index_cpu)

    def step(self, batch):
        train.train_step(self.model, self.optimizer, lambda: batch, self.tc, self.tc.learning_rate, self.ctx)


def timed(device, fn):
    """Seconds that fn() takes: CUDA events on the GPU, perf_counter on the CPU."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_steps(runner, windows):
    """Seconds per step for each window; batch i+1's rows are prepared before step i runs."""
    batches = [runner.batch(w) for w in windows]
    runner.prepare(batches[0])
    out = []
    for i, batch in enumerate(batches):
        if i + 1 < len(batches):
            runner.prepare(batches[i + 1])
        out.append(timed(runner.device, lambda: runner.step(batch)))
    return out


def time_round(runner, windows):
    """time_steps, also kept as one round: its median step at the middle of its wall time."""
    start = time.perf_counter()
    times = time_steps(runner, windows)
    runner.rounds.append(((start + time.perf_counter()) / 2, statistics.median(times)))
    runner.times += times


def drift_corrected_ratio(rounds, dense_rounds):
    """A model's step time over the dense model's, with the machine's drift taken out.
    The speed of a shared CPU drifts by more than the effects measured, and alternating
    rounds only spread the drift, so each round of the model is set against the dense step
    time at the same moment: linearly interpolated between the dense rounds just before and
    just after it (a drift linear over that span cancels). Returns the median over rounds.
    rounds, dense_rounds: [(time, median step seconds)]; dense rounds bracket every round."""
    ratios = []
    for t, step in rounds:
        bracket = next(((a, b) for a, b in zip(dense_rounds, dense_rounds[1:]) if a[0] <= t <= b[0]), None)
        if bracket is None:
            raise ValueError(f"a round at t={t:.1f} s has no dense round before and after it")
        (t0, d0), (t1, d1) = bracket
        ratios.append(step / (d0 + (d1 - d0) * (t - t0) / (t1 - t0)))
    return statistics.median(ratios)


def table_kinds(bc):
    return ["resident", "offload"] if bc.tables == "both" else [bc.tables]


def stem_config(base, bc):
    return GPTConfig(**base, ffn="stem", stem_layers=bc.stem_layers, stem_variant=bc.stem_variant)


def pinned_copy_peak(device, n_bytes=256 << 20):
    """Host-to-device GB/s of one large pinned copy: the ceiling for the table prefetch."""
    host = torch.empty(n_bytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)
    return n_bytes / 1e9 / statistics.median(
        timed(device, lambda: target.copy_(host, non_blocking=True)) for _ in range(5))


def bench_train(bc, device, dtype):
    base = PRESETS[bc.preset]
    specs = [("dense", GPTConfig(**base, ffn="dense"), None)]
    if bc.preset != "350m":     # dense AdamW over 3.3B table rows needs ~52 GB on its own
        specs.append((f"stem-{bc.stem_layers} adamw", stem_config(base, bc), None))
    specs += [(f"stem-{bc.stem_layers} {kind}", stem_config(base, bc), kind) for kind in table_kinds(bc)]
    if bc.catchup:
        specs.append((f"stem-{bc.stem_layers} catchup", stem_config(base, bc), "catchup"))
    generator = torch.Generator().manual_seed(bc.seed)
    block_size, vocab_size = base["block_size"], base["vocab_size"]
    make = lambda n: [zipf_batch(bc.batch_size, block_size, vocab_size, bc.zipf_exponent, generator) for _ in range(n)]
    warmup = make(bc.warmup)
    rounds = [make(bc.steps) for _ in range(bc.rounds)]     # every runner sees the same batches
    cuda = device.startswith("cuda")
    runners = []
    if not cuda:
        # all models at once, timed in alternating rounds; drift_corrected_ratio takes out the drift
        runners = [Runner(name, config, bc, device, dtype, tables) for name, config, tables in specs]
        for runner in runners:
            time_steps(runner, warmup)            # allocator, caches
        for batches in rounds:
            for runner in runners:
                time_round(runner, batches)
        time_round(runners[0], rounds[-1])        # a last dense round: every other round lies between two
        for runner in runners:
            runner.summary = summarize(runner)
            runner.ratio = drift_corrected_ratio(runner.rounds, runners[0].rounds) if runner is not runners[0] else 1.0
    else:
        # one at a time on a GPU (the 350M twins need not fit together), each with its own peak memory
        for name, config, tables in specs:
            runner = Runner(name, config, bc, device, dtype, tables)
            time_steps(runner, warmup)            # compile, allocator, caches
            torch.cuda.reset_peak_memory_stats()
            for batches in rounds:
                runner.times += time_steps(runner, batches)
            runner.ratio = statistics.median(runner.times) / statistics.median(runners[0].times) if runners else 1.0
            runner.peak_memory = torch.cuda.max_memory_allocated()
            runners.append(runner)
            runner.summary = summarize(runner)
            runner.model = runner.raw_model = runner.optimizer = None
            torch.cuda.empty_cache()

    tokens_per_step = bc.batch_size * block_size
    dense_flops = runners[0].summary["flops"]
    uniques = [stem.RowIndex.of(b[:, :-1]).unique_ids.numel() / tokens_per_step for b in make(10)]
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), "
          f"dtype {dtype}, batch {bc.batch_size}x{block_size}, median of {bc.rounds * bc.steps} steps"
          f"{'' if cuda else ' (dense: one more round)'}, "
          f"unique/total tokens per batch {np.mean(uniques):.3f}")
    if not cuda:
        print(f"time ratio: median over the {bc.rounds} rounds of the round's median step / the dense model's "
              f"at that moment (interpolated between the dense rounds around it)")
    print(f"{'model':<24}{'total':>10}{'active':>10}{'MFLOP/tok':>11}{'flop ratio':>11}"
          f"{'tokens/s':>12}{'time ratio':>11}{'MFU':>8}{'peak GiB':>10}")
    for runner in runners:
        s = runner.summary
        median = statistics.median(runner.times)
        tokens_per_sec = tokens_per_step / median
        mfu = 3 * s["flops"] * tokens_per_sec / s["peak_flops"] if s["peak_flops"] else None
        print(f"{runner.name:<24}{s['total'] / 1e6:>9.1f}M{s['active'] / 1e6:>9.1f}M{s['flops'] / 1e6:>11.1f}"
              f"{s['flops'] / dense_flops:>11.3f}{tokens_per_sec:>12,.0f}{runner.ratio:>11.3f}"
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%':>8}"
              f"{f'{runner.peak_memory / 2**30:.1f}' if cuda else '-':>10}")
    times = {r.name.split()[-1]: statistics.median(r.times) for r in runners}
    for runner in runners:
        s = runner.summary
        if "token_hit_rate" in s:
            steps = len(runner.times) + bc.warmup
            h2d = s["bytes_h2d"] / steps
            print(f"{runner.name}: token hit rate {s['token_hit_rate']:.3f}, unique-row hit rate "
                  f"{s['unique_hit_rate']:.3f}, H2D {h2d / 2**20:.1f} MiB/step, "
                  f"D2H {s['bytes_d2h'] / steps / 2**20:.1f} MiB/step")
            if cuda and "resident" in times:
                peak = pinned_copy_peak(device)
                copy_time = h2d / 1e9 / peak
                exposed = max(0.0, times["offload"] - times["resident"])
                print(f"pinned H2D peak {peak:.1f} GB/s; prefetch needs {h2d / 1e9 / times['offload']:.2f} GB/s "
                      f"over a step; estimated copy time {1e3 * copy_time:.2f} ms/step, of which "
                      f"{100 * (1 - min(1.0, exposed / copy_time)) if copy_time else 100:.0f}% hidden "
                      f"(1 - step-time difference / copy time)")
    if "catchup" in times and "resident" in times:
        ratios = {r.name.split()[-1]: r.ratio for r in runners}
        print(f"catch-up (adamw_catchup) vs lazy AdamW, both resident: {ratios['catchup'] / ratios['resident']:.3f}x "
              f"the step time (the ratio of their time ratios)")
    return runners


def _train_ratios(bc):
    """One fresh process's bench_train: each model's time ratio against the dense model."""
    device, dtype = configurator.resolve_device(bc.device, bc.dtype)
    return {r.name: r.ratio for r in bench_train(bc, device, dtype)}


def bench_train_processes(bc):
    """bench_train in bc.processes fresh processes, one after another; prints each model's
    median time ratio over them, with the range. Returns {name: [ratio per process]}."""
    one = replace(bc, processes=1)
    ratios = {}
    for k in range(bc.processes):
        print(f"process {k + 1} of {bc.processes}", flush=True)
        # spawn: a fresh interpreter, heap and OpenMP pool for every repeat (fork would inherit ours)
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            for name, ratio in pool.submit(_train_ratios, one).result().items():
                ratios.setdefault(name, []).append(ratio)
    print(f"time ratio vs dense over {bc.processes} processes: median (min - max)")
    for name, values in ratios.items():
        print(f"{name:<24}{statistics.median(values):>7.3f}  ({min(values):.3f} - {max(values):.3f})  "
              + " ".join(f"{v:.3f}" for v in values))
    return ratios


def summarize(runner):
    """What the report needs of a runner's model, kept after the model is freed."""
    model = runner.raw_model
    total, active = model.num_params()
    s = dict(total=total, active=active, flops=model.flops_per_token(),
             peak_flops=gpu_peak_flops() if runner.device.startswith("cuda") else None)
    if runner.sparse and model.tables.offloaded:
        s.update(model.tables.stats())
    return s


def bench_decode(bc, device, dtype):
    """Greedy decode tokens/s with resident vs offloaded tables (bf16 rows on a GPU)."""
    import sample
    base = PRESETS[bc.preset]
    generator = torch.Generator().manual_seed(bc.seed)
    prompt = zipf_batch(bc.batch_size, bc.prompt_tokens - 1, base["vocab_size"], bc.zipf_exponent, generator)
    torch.manual_seed(bc.seed)
    model = GPT(stem_config(base, bc)).to(device).eval()
    if dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    results, outputs = {}, {}
    for kind in ["resident"] + [k for k in table_kinds(bc) if k == "offload"]:
        if kind == "offload":
            sample.offload_for_inference(model, device, bc.table_cache_fraction, bc.batch_size, dtype)
        idx = prompt.to(device)

        def run():
            outputs[kind] = model.generate(idx, bc.new_tokens, temperature=0)

        for _ in range(bc.warmup):
            run()
        prefill = [timed(device, lambda: model.generate(idx, 1, temperature=0)) for _ in range(bc.rounds)]
        total = [timed(device, run) for _ in range(bc.rounds)]
        results[kind] = (statistics.median(prefill), statistics.median(total))
    resident_prefill, resident_total = results["resident"]
    print(f"decode: batch {bc.batch_size}, prompt {bc.prompt_tokens}, {bc.new_tokens} new tokens, {device}")
    for kind, (prefill, total) in results.items():
        tokens_per_sec = bc.batch_size * bc.new_tokens / total
        print(f"{kind:<10} tokens/s {tokens_per_sec:>10,.0f}  ratio {resident_total / total:.3f}  "
              f"prefill {prefill * 1e3:.1f} ms (x{prefill / resident_prefill:.2f})")
    if "offload" in outputs:
        same = torch.equal(outputs["offload"], outputs["resident"])
        print(f"offloaded tokens identical to resident: {same}")
    return results


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


def bench_cache(bc):
    """Dedup and LFU hit rates on a dataset, for training batches and for decoding."""
    meta = configurator.load_meta(bc.dataset)
    data = np.memmap(os.path.join(configurator.data_dir_of(bc.dataset), "train.bin"), dtype=meta["dtype"], mode="r")
    vocab_size, T, B = meta["vocab_size"], bc.block_size or PRESETS[bc.preset]["block_size"], bc.batch_size
    rng = np.random.default_rng(bc.seed)
    starts = rng.integers(0, len(data) - T - 1, size=(bc.n_batches, B))
    training = [np.stack([data[s:s + T] for s in row]).astype(np.int64) for row in starts]
    # decoding: B sequences read one token per step (the rows a decode step needs)
    seqs = np.stack([data[s:s + bc.n_batches] for s in rng.integers(0, len(data) - bc.n_batches, size=B)])
    decoding = [seqs[:, t].astype(np.int64) for t in range(bc.n_batches)]
    base = PRESETS[bc.preset]
    n_stem = len(stem.select_layers(bc.stem_layers, base["n_layer"]))
    d_ff = base.get("d_ff") or 64 * math.ceil(8 * base["n_embd"] / 3 / 64)
    row_bytes = n_stem * d_ff * 2                       # bf16 rows, the inference case
    print(f"dataset {bc.dataset}: vocab {vocab_size}, {len(data):,} train tokens; rows of preset {bc.preset} "
          f"({n_stem} STEM layers x d_ff {d_ff}, bf16) = {row_bytes / 1024:.0f} KiB; stats over the "
          f"second half of {bc.n_batches} steps")
    for name, stream in (("train", training), ("decode", decoding)):
        tokens = sum(ids.size for ids in stream)
        unique = sum(len(np.unique(ids)) for ids in stream)
        print(f"\n{name}: batch {B}x{T if name == 'train' else 1}; unique/total tokens per batch {unique / tokens:.3f}; "
              f"bytes per step without dedup {tokens / len(stream) * row_bytes / 2**20:.1f} MiB, with dedup "
              f"{unique / len(stream) * row_bytes / 2**20:.1f} MiB ({100 * (1 - unique / tokens):.1f}% less)")
        # transient slots as plan.py sizes them for one batch in flight (they keep recent rows too)
        n_transient = plan.with_margin(max(len(np.unique(ids)) for ids in stream), vocab_size)
        print(f"transient slots {n_transient}")
        print(f"{'cache':>8}{'rows':>8}{'token hit':>11}{'unique hit':>12}{'H2D MiB/step':>14}")
        for fraction in (float(f) for f in bc.cache_fractions.split(",")):
            n_cached = max(1, int(fraction * vocab_size))
            t = lfu_replay(stream, vocab_size, n_cached, n_transient)
            steps = len(stream) - len(stream) // 2
            print(f"{100 * fraction:>7.0f}%{n_cached:>8}{t['token_hits'] / t['tokens']:>11.3f}"
                  f"{1 - t['misses'] / t['unique']:>12.3f}{t['misses'] / steps * row_bytes / 2**20:>14.2f}")


def bench_pipeline(bc, device):
    """The offloaded tables' host pipeline at the preset's row size, on real token batches:
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
    config = stem_config(PRESETS[bc.preset], bc)
    V, T, B, G, d_ff = config.vocab_size, config.block_size, bc.batch_size, bc.grad_accum_steps, config.d_ff
    n_stem = len(config.stem_layer_ids)
    meta = plan.read_meta(bc.dataset)
    path = os.path.join(configurator.data_dir_of(bc.dataset), "train.bin")
    if meta is None or meta.get("vocab_size") != V or not os.path.exists(path):
        raise UsageError(f"the pipeline bench reads real batches from data/{bc.dataset} prepared with --vocab_size={V}; "
                         f"e.g. the standard library: python data/text/prepare.py --input=$(python -c 'import "
                         f"sysconfig; print(sysconfig.get_paths()[\"stdlib\"])') --glob='*.py' "
                         f"--exclude=site-packages --vocab_size={V}")
    cache_rows = max(1, int(bc.table_cache_fraction * V))
    in_flight = plan.rows_in_flight(bc.dataset, B, T, G, V, bc.seed)
    layout = offload.table_buffers(V, 1, d_ff, cache_rows, in_flight.rows)
    layer_bytes = sum(plan.nbytes(shape, dtype) for shape, dtype, _ in layout.values())
    layers = bc.layers or max(1, min(n_stem, int(0.5 * available_memory() / layer_bytes)))
    layers, scale = min(layers, n_stem), n_stem / min(layers, n_stem)
    with torch.device("meta"):
        flops = 3 * GPT(config).flops_per_token() * B * T                      # one micro-batch, training
    gpu_seconds = flops / (gpu_peak_flops(bc.gpu) * bc.gpu_mfu)
    print(f"pipeline: {bc.preset} rows ({n_stem} x {d_ff} fp32, weights + 2 moments), {layers} of {n_stem} STEM "
          f"layers held ({layers * layer_bytes / 2**30:.1f} GiB); times and bytes below x {scale:.2f}")
    print(f"micro-batch {B} x {T} of {bc.dataset}, {G} per step; cache {cache_rows} rows, {in_flight.rows} transient "
          f"slots ({in_flight.source}); {bc.gpu} compute {1e3 * gpu_seconds:.1f} ms per micro-batch at "
          f"{100 * bc.gpu_mfu:.0f}% MFU")
    # without CUDA the copy engine is a wait of bytes / copy_gbps: a DMA engine does not take
    # the CPU's cores, and copying on them here would take the cores the worker needs
    weight = torch.full((V, layers, d_ff), 0.01)     # written, not calloc-ed: its pages exist, as a real table's do
    tables = offload.SparseTables(weight, device, cache_rows, in_flight.rows,
                                  optimizer=lazy_adamw.LazyAdamW(catch_up="full"), take_weight=True,
                                  copy_rate=None if device.startswith("cuda") else bc.copy_gbps * 1e9)
    data = np.memmap(path, dtype=meta["dtype"], mode="r")
    generator = torch.Generator().manual_seed(bc.seed)
    total = (bc.warmup + bc.micro_batches // G + 1) * G
    batches = [stem.RowIndex.of(torch.from_numpy(plan.draw_windows(data, generator, B, T)[:, :-1].astype(np.int64)))
               for _ in range(total + 1)]
    device_ids = [b.unique_ids.to(device) for b in batches]
    tables.prepare(batches[0])
    arithmetic, before, logged = 0.0, None, []
    for i in range(total):
        if i == bc.warmup * G:           # the cache has filled: start counting
            arithmetic, before = 0.0, tables.stats()
        start, clock = time.perf_counter(), dict(tables.clock)
        rows = tables.lookup(device_ids[i])                   # (U, layers, d_ff)
        logged.append({way: len(queue.log) for way, queue in tables.copies.items()})   # i's copies are queued
        (rows * 1e-3).sum().backward()
        if i % G == G - 1:
            tables.step(1e-4, 1.0)
        # this CPU's arithmetic (a GPU's work) is done before the next micro-batch's rows
        # start moving, so that it neither slows the worker nor lends it time
        tables.prepare(batches[i + 1])
        arithmetic += time.perf_counter() - start - sum(tables.clock[k] - clock[k] for k in ("plan", "wait"))
        time.sleep(gpu_seconds / scale)                       # the GPU runs micro-batch i + 1's forward and backward
    after, n = tables.stats(), total - bc.warmup * G
    per = {k: (after[k] - before[k]) / n for k in after if k in before and isinstance(after[k], (int, float))}
    ms = lambda seconds, scaled=True: 1e3 * seconds * (scale if scaled else 1)
    n_copies = (per["bytes_h2d"] + per["bytes_d2h"]) / tables.row_bytes       # one per row and tensor
    cpu = device == "cpu"
    issue_ms = n_copies * bc.copy_issue_us / 1e3 if cpu else 0.0              # on CUDA: in the worker's time
    worker_ms, gpu_ms = ms(per["worker_seconds"], False) + issue_ms, ms(gpu_seconds, False)
    copy_ms = {way: ms(per[f"copy_{way}_seconds"]) if per.get(f"copy_{way}_seconds") is not None else 0.0
               for way in ("in", "out")}
    # The worker and the copy engines have one GPU micro-batch to ready the next one's rows,
    # but this CPU's slower arithmetic gives them more (then no wait shows here). So the
    # copies queued are also replayed on a GPU's timeline, and the larger wait counts.
    stalls = [0.0]
    if cpu:
        # a copy takes its bytes' time at copy_gbps, or its issuing time if that is longer
        per_copy = max(tables.row_bytes * scale / (bc.copy_gbps * 1e9), bc.copy_issue_us / 1e6)
        op = lambda entry: ("copy", entry / tables.row_bytes * per_copy) if isinstance(entry, int) else entry
        moves = []
        for first, last in zip([{"in": 0, "out": 0}] + logged[:-1], logged):   # from the first micro-batch, so
            moves.append({way: [op(entry) for entry in queue.log[first[way]:last[way]]]   # that the timed ones
                          for way, queue in tables.copies.items()})                       # start steady
        stalls = copy_engine_stalls(moves, gpu_seconds)[bc.warmup * G:]
    wait_ms = max(ms(per["wait_seconds"]), worker_ms - gpu_ms, 1e3 * sum(stalls) / len(stalls))
    main_ms = ms(per["plan_seconds"], False) + wait_ms
    print(f"per micro-batch: {per['unique']:.0f} unique ids, {per['unique_misses']:.0f} misses, H2D "
          f"{scale * per['bytes_h2d'] / 2**30:.3f} GiB, D2H {scale * per['bytes_d2h'] / 2**30:.3f} GiB (write-backs)")
    print(f"training thread: plan + queue {ms(per['plan_seconds'], False):.2f} ms, waits {wait_ms:.2f} ms (measured "
          f"{ms(per['wait_seconds']):.2f}, the worker's excess over the GPU's {gpu_ms:.1f} ms "
          f"{max(0.0, worker_ms - gpu_ms):.2f}, the copies replayed on the GPU's timeline "
          f"{1e3 * sum(stalls) / len(stalls):.2f}, at most {1e3 * max(stalls):.2f}); arithmetic a GPU runs, here on "
          f"the CPU: {ms(arithmetic / n):.1f} ms")
    copies = ("" if per.get("copy_in_seconds") is None else
              f"; copy engines (waits of bytes / {bc.copy_gbps:g} GB/s) in {copy_ms['in']:.1f} ms (with its waits "
              f"for write-backs), out {copy_ms['out']:.1f} ms")
    issued = f" (views {worker_ms - issue_ms:.1f} + issuing at {bc.copy_issue_us:g} us each {issue_ms:.1f})" if cpu else ""
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


def available_memory():
    """Bytes of memory free for new allocations (Linux: MemAvailable), else 8 GiB."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 8 * 2**30


def variant_overrides(variant):
    """'dense' | 'stem:LAYERS' | 'hash_moe:E' or 'hash_moe:ExK' | 'moe:ExK' | 'expert_choice:ExK'
    | 'mot:E' -> model overrides. Sparse baselines use the same layers as STEM full."""
    family, _, arg = variant.partition(":")
    if family == "dense":
        return {"ffn": "dense"}
    if family == "stem":
        return {"ffn": "stem", "stem_layers": arg or "full"}
    if family in ("moe", "hash_moe", "expert_choice", "mot"):
        experts, _, k = (arg or "8").partition("x")
        return {"ffn": family, "n_experts": int(experts), "moe_top_k": int(k or 1), "stem_layers": "full"}
    raise UsageError(f"unknown variant '{variant}': use dense, stem:LAYERS, moe:ExK, hash_moe:E, "
                           f"expert_choice:ExK or mot:E")


def loss_spikes(losses, margin, warmup=50):
    """Steps (after warmup) whose loss exceeds (1 + margin) x the running mean (EMA 0.9)
    of the losses before it."""
    spikes, mean = 0, None
    for i, loss in enumerate(losses):
        if mean is not None and i >= warmup and loss > (1 + margin) * mean:
            spikes += 1
        mean = loss if mean is None else 0.9 * mean + 0.1 * loss
    return spikes


def bench_compare(bc):
    """Train every variant with train.py on the same tokens; write results.{md,json,png}."""
    extra = [a for a in bc.train_args.split() if a]
    rows = []
    for variant in (v.strip() for v in bc.variants.split(",") if v.strip()):
        name = variant.replace(":", "-")
        out = os.path.join(bc.out_dir, name)
        shutil.rmtree(out, ignore_errors=True)          # a fresh run: metrics.jsonl appends
        args = [f"--dataset={bc.dataset}", f"--out_dir={out}", f"--max_iters={bc.max_iters}", "--log_interval=1",
                f"--eval_interval={bc.max_iters}", f"--seed={bc.seed}", f"--device={bc.device}"] + extra
        args += [f"--{k}={v}" for k, v in variant_overrides(variant).items()]
        print(f"== {variant}: python train.py {' '.join(args)}")
        overrides = configurator.parse_overrides(args, train.TrainConfig, GPTConfig)
        train_overrides, model_overrides = configurator.split_overrides(overrides, train.TrainConfig)
        tc = train.TrainConfig(**train_overrides)
        summary = train.train(tc, model_overrides)
        checkpoint = torch.load(summary["ckpt_path"], map_location="cpu", weights_only=False)
        with torch.device("meta"):
            model = GPT(GPTConfig(**checkpoint["model_config"]))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        steps = [r for r in records if "loss" in r]
        total, active = model.num_params()
        tokens_per_step = tc.batch_size * tc.grad_accum_steps * model.config.block_size
        flops = model.flops_per_token(batch_size=tc.batch_size)
        rows.append({"variant": variant, "val_loss": summary["val_loss"], "train_loss": summary["train_loss"],
                     "flops_per_token": flops, "total_params": total, "active_params": active,
                     "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in steps[len(steps) // 10:]),
                     "spikes": loss_spikes([r["loss"] for r in steps], bc.spike_margin),
                     "curve": [(3 * flops * tokens_per_step * r["iter"], r["loss"]) for r in steps]})
    write_results(bc, rows)
    return rows


def write_results(bc, rows):
    dense = next((r for r in rows if r["variant"] == "dense"), rows[0])
    lines = [f"dataset {bc.dataset}, {bc.max_iters} steps each, same batches (seed {bc.seed}); FLOPs are forward "
             f"matmul FLOPs/token; spikes: steps with loss > {1 + bc.spike_margin:.2f} x running mean", "",
             "| variant | val loss | train loss | MFLOPs/token | FLOPs vs dense | total params | active params "
             "| tokens/s | loss spikes |", "|" + " --- |" * 9]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['val_loss']:.4f} | {r['train_loss']:.4f} | {r['flops_per_token'] / 1e6:.2f} "
                     f"| {r['flops_per_token'] / dense['flops_per_token']:.3f} | {r['total_params'] / 1e6:.2f}M "
                     f"| {r['active_params'] / 1e6:.2f}M | {r['tokens_per_sec']:,.0f} | {r['spikes']} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(bc.out_dir, exist_ok=True)
    with open(os.path.join(bc.out_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(bc.out_dir, "results.json"), "w") as f:
        json.dump(rows, f)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (results.json has the curves)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        x, y = zip(*r["curve"])
        smooth = np.convolve(y, np.ones(20) / 20, mode="valid")            # 20-step moving mean
        ax.plot(x[len(x) - len(smooth):], smooth, label=r["variant"])
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (3 x forward matmul FLOPs x tokens)")
    ax.set_ylabel("train loss (20-step mean)")
    ax.set_title(f"{bc.dataset}: loss vs FLOPs")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(bc.out_dir, "results.png"), dpi=120)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        bc = BenchConfig(**configurator.parse_overrides(argv, BenchConfig))
        device, dtype = configurator.resolve_device(bc.device, bc.dtype)
        if bc.mode == "train" and bc.processes > 1:
            if device != "cpu":
                raise UsageError("processes > 1 is for the CPU (a GPU run times one model at a time already)")
            return bench_train_processes(bc)
        if bc.mode == "train":
            return bench_train(bc, device, dtype)
        if bc.mode == "decode":
            return bench_decode(bc, device, dtype)
        if bc.mode == "cache":
            return bench_cache(bc)
        if bc.mode == "compare":
            return bench_compare(bc)
        if bc.mode == "pipeline":
            return bench_pipeline(bc, device)
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
