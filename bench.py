"""
Measure STEM against its dense twin, and offloaded tables against resident ones.

    python bench.py                                  # train steps: dense, STEM resident, STEM offloaded
    python bench.py --preset=mid --processes=5       # the mid preset, the median over 5 fresh processes
    python bench.py --preset=350m --compile=True     # the 350M configs on a GPU (bf16)
    python bench.py --mode=decode --preset=350m      # decode tokens/s: resident vs offloaded tables
    python bench.py --mode=wire --world_size=8       # a job's table exchange: bytes on the wire per step

Batches are synthetic token ids drawn from a Zipf distribution (natural text is roughly
Zipfian), so the dedup and the cache see a realistic number of unique ids. Every model is
stepped by training.train_step, train.py's own step, which prepares the next batch's table
rows while the current one runs.
On the CPU the models are timed in alternating rounds, with one more dense round at the
end; a model's time ratio is the median over rounds of its median step over the dense
model's at the same moment (interpolated between the dense rounds before and after it), so
that a drift of the shared machine's speed that is linear between two dense rounds cancels.
--processes=N repeats it all in N fresh processes and reports the median ratio. On a GPU
the models run one after another: median step over median step (CUDA events).
simulate.py replays the offload pipeline and the LFU cache; compare.py trains the variants.
"""

import collections
import concurrent.futures
import math
import multiprocessing
import statistics
import sys
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import configurator
import data
import memory
import shards
import stem
import tables
import training
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
    mode: str = knob("train", choices=("train", "decode", "wire"),
                     help="train: step times; decode: generation tokens/s; wire: a job's table-exchange bytes")
    preset: str = knob("tiny", choices=tuple(PRESETS), help="the model shape: " + "; ".join(
        f"{k}: vocab {v['vocab_size']}, {v['n_layer']} x {v['n_embd']}, block {v['block_size']}"
        for k, v in PRESETS.items()))
    batch_size: int = knob(8, ge=1, help="sequences per batch")
    tables: str = knob("both", choices=("resident", "offload", "both"), help="which lazy-AdamW tables to time")
    table_cache_fraction: float = knob(0.1, gt=0, le=1, help="offloaded tables: device cache rows / vocabulary")
    new_tokens: int = knob(64, ge=1, help="decode: tokens generated per timed run")
    prompt_tokens: int = knob(128, ge=2, help="decode: prefill length")
    steps: int = knob(20, ge=1, help="timed steps per model per round")
    rounds: int = knob(3, ge=1, help="timed rounds (models alternate between rounds on the CPU)")
    warmup: int = knob(8, ge=1, help="untimed steps first: on the CPU the heap takes ~5-8 steps to settle")
    stem_layers: str = knob("full", help="the STEM model's layers: none, third, half, full or a list")
    stem_variant: str = knob("up", choices=stem.VARIANTS, help="the STEM variant")
    zipf_exponent: float = knob(1.1, gt=0, help="the token ids' Zipf law")
    device: str = knob("auto", help=configurator.DEVICE_HELP)
    dtype: str = knob("auto", choices=configurator.DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    compile: bool = knob(False, help="torch.compile every model")
    cpu_keep_freed_memory: bool = knob(False, help="CPU: keep freed memory in the heap, 2 MB pages for big tensors "
                                                   "(train.py's knob of the same name)")
    catchup: bool = knob(False, help="train: also time resident tables with adamw_catchup")
    processes: int = knob(1, ge=1, help="train on the CPU: repeat the whole timing in this many fresh processes "
                                        "and report the median ratio (a process's speed varies by more than the "
                                        "effects measured)")
    seed: int = knob(0, ge=0, help="initial weights and batches")
    config: str = knob("config/stem_350m.py", help="wire: the config whose model and batches are counted")
    dataset: str = knob("text", help="wire: whose training batches (the config's batch geometry)")
    world_size: int = knob(8, ge=2, help="wire: the ranks of the job")

    def __post_init__(self):
        configurator.check(self)


def zipf_batch(batch_size, block_size, vocab_size, exponent, generator):
    """(B, T) token ids with P(rank r) proportional to r^-exponent, ranks shuffled over ids."""
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = ranks.pow(-exponent)
    ids = torch.multinomial(probs / probs.sum(), batch_size * (block_size + 1), replacement=True, generator=generator)
    permutation = torch.randperm(vocab_size, generator=generator)
    return permutation[ids].view(batch_size, block_size + 1)


class Stream:
    """The batches a runner steps through, as training.train_step's loader: next() hands
    out the next one, peek() shows it early."""

    def __init__(self, batches):
        self.batches = collections.deque(batches)

    def next(self):
        return self.batches.popleft()

    def peek(self):
        return self.batches[0]


class Runner:
    """One model and its optimiser, stepped by training.train_step (train.py's step).
    kind: None (dense AdamW over resident tables, the paper's), "resident" or "offload"
    (both with lazy AdamW through tables.LazyTables), or "catchup" (resident, adamw_catchup)."""

    def __init__(self, name, config, bc, device, dtype, kind=None):
        torch.manual_seed(bc.seed)
        self.name, self.config = name, config
        self.model = GPT(config).to(device)
        self.raw_model = self.model
        optimizer = {None: "adamw", "catchup": "adamw_catchup"}.get(kind, "lazy_adamw")
        self.tc = training.TrainConfig(device=device, batch_size=bc.batch_size,
                                       tables="offload" if kind == "offload" else "resident",
                                       table_optimizer=optimizer, table_cache_fraction=bc.table_cache_fraction,
                                       # slots for the rows of the two batches in flight: the expected unique
                                       # ids of the Zipf draws, with the plan's margin
                                       table_transient_rows=memory.with_margin(math.ceil(memory.zipf_unique(
                                           config.vocab_size, 2 * bc.batch_size * config.block_size,
                                           bc.zipf_exponent)), config.vocab_size))
        training.build_tables(self.model, self.tc, device)
        self.optimizer = training.configure_optimizer(self.model, self.tc)
        if bc.compile:
            self.model = torch.compile(self.model)
        self.ctx = configurator.autocast_context(device, dtype)
        self.device = device
        self.times, self.peak_memory = [], 0
        self.rounds = []        # (mid-time of the round, its median step): the drift correction's samples

    def feed(self, windows):
        """The batches to step through: (B, T+1) windows, with row indexes as data.BatchLoader makes them."""
        batches = []
        for window in windows:
            x, y = window[:, :-1], window[:, 1:]
            row_index = stem.RowIndex.of(x).to(self.device) if self.raw_model.tables is not None else None
            batches.append(data.Batch(x.to(self.device), y.to(self.device), row_index))
        self.stream = Stream(batches)

    def step(self):
        training.train_step(self.model, self.optimizer, self.stream, self.tc, self.tc.learning_rate, self.ctx)


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


def time_steps(runner, n):
    """Seconds of each of the runner's next n steps (each prepares the next batch's rows)."""
    return [timed(runner.device, runner.step) for _ in range(n)]


def time_round(runner, n):
    """time_steps, also kept as one round: its median step at the middle of its wall time."""
    start = time.perf_counter()
    times = time_steps(runner, n)
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
    # each runner's stream: warm-up, the rounds, and one batch more (the last step prepares it)
    stream = warmup + sum(rounds, []) + make(1)
    cuda = device.startswith("cuda")
    runners = (time_one_after_another if cuda else time_in_alternation)(specs, bc, device, dtype, stream, rounds)
    uniques = [stem.RowIndex.of(b[:, :-1]).unique_ids.numel() / (bc.batch_size * block_size) for b in make(10)]
    report_train(bc, runners, device, dtype, block_size, np.mean(uniques))
    return runners


def time_in_alternation(specs, bc, device, dtype, stream, rounds):
    """The CPU: all models at once, timed in alternating rounds, the dense model one more
    at the end; drift_corrected_ratio takes out the machine's drift."""
    runners = [Runner(name, config, bc, device, dtype, kind) for name, config, kind in specs]
    progress = tqdm(total=len(runners) * (bc.warmup + bc.rounds * bc.steps) + bc.steps, desc="steps", leave=False)
    for runner in runners:
        # the dense model runs the last round twice: every other round lies between two of its rounds
        runner.feed(stream[:-1] + rounds[-1] + stream[-1:] if runner is runners[0] else stream)
        time_steps(runner, bc.warmup)            # allocator, caches
        progress.update(bc.warmup)
    for _ in rounds:
        for runner in runners:
            time_round(runner, bc.steps)
            progress.update(bc.steps)
    time_round(runners[0], bc.steps)
    progress.close()
    for runner in runners:
        runner.summary = summarize(runner)
        runner.ratio = drift_corrected_ratio(runner.rounds, runners[0].rounds) if runner is not runners[0] else 1.0
    return runners


def time_one_after_another(specs, bc, device, dtype, stream, rounds):
    """A GPU: one model at a time (the 350M twins need not fit together), each with its own
    peak memory; median step over the dense model's median step."""
    runners = []
    for name, config, kind in tqdm(specs, desc="models", leave=False):
        runner = Runner(name, config, bc, device, dtype, kind)
        runner.feed(stream)
        time_steps(runner, bc.warmup)            # compile, allocator, caches
        torch.cuda.reset_peak_memory_stats()
        for _ in rounds:
            runner.times += time_steps(runner, bc.steps)
        runner.ratio = statistics.median(runner.times) / statistics.median(runners[0].times) if runners else 1.0
        runner.peak_memory = torch.cuda.max_memory_allocated()
        runners.append(runner)
        runner.summary = summarize(runner)
        runner.model = runner.raw_model = runner.optimizer = None
        torch.cuda.empty_cache()
    return runners


def report_train(bc, runners, device, dtype, block_size, unique_fraction):
    cuda = device.startswith("cuda")
    tokens_per_step = bc.batch_size * block_size
    dense_flops = runners[0].summary["flops"]
    print(f"device {device} ({torch.cuda.get_device_name() if cuda else 'cpu'}), "
          f"dtype {dtype}, batch {bc.batch_size}x{block_size}, median of {bc.rounds * bc.steps} steps"
          f"{'' if cuda else ' (dense: one more round)'}, "
          f"unique/total tokens per batch {unique_fraction:.3f}")
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
    configurator.keep_freed_memory(device, bc.cpu_keep_freed_memory)
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
    if isinstance(model.tables, tables.LazyTables):
        s.update(model.tables.stats())
    return s


def bench_decode(bc, device, dtype):
    """Greedy decode tokens/s with resident vs offloaded tables (bf16 rows on a GPU)."""
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
            checkpoint.offload_for_inference(model, device, bc.table_cache_fraction, bc.batch_size, dtype)
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


def bench_wire(bc):
    """Bytes a job's table exchange puts on the wire per optimiser step on a dataset's
    batches (bc.steps steps of the config's batch_size x block_size x grad_accum_steps),
    against the official column-sharded scheme and against all-reducing a dense table
    gradient; and how evenly the owner map spreads the rows served."""
    from moe import MoEConfig
    from training import TrainConfig
    overrides = configurator.parse_overrides([bc.config], TrainConfig, GPTConfig, MoEConfig)
    train_keys, model_keys = configurator.split_overrides(overrides, TrainConfig)
    tc = TrainConfig(**{**train_keys, "dataset": bc.dataset})
    meta = data.load_meta(bc.dataset)
    config = GPTConfig.from_dict({**model_keys, "vocab_size": meta["vocab_size"]})
    N, B, T, G = bc.world_size, tc.batch_size, config.block_size, tc.grad_accum_steps
    if B % N:
        raise UsageError(f"the config's batch_size {B} does not split over {N} ranks")
    n_stem, d_ff = len(config.stem_layer_ids), config.d_ff
    owner_map = shards.OwnerMap(config.vocab_size, N)
    tokens = data.tokens(bc.dataset, "train", meta["dtype"])
    generator = torch.Generator().manual_seed(bc.seed)
    ours, served = {"ids": 0, "rows": 0}, torch.zeros(N, dtype=torch.long)
    for _ in tqdm(range(bc.steps * G), desc="micro-batches"):
        windows = torch.from_numpy(data.draw_windows(tokens, generator, B, T)[:, :-1].astype(np.int64))
        count = shards.exchange_bytes(windows.chunk(N), owner_map, n_stem * d_ff * 4)
        ours = {k: ours[k] + count[k] for k in ours}
        served += count["served"]
    official = {k: v * bc.steps * G for k, v in shards.column_sharded_bytes(B // N * T, N, n_stem, d_ff, 2).items()}
    dense = shards.dense_all_reduce_bytes(config.vocab_size * n_stem * d_ff * 4, N)
    rows = [("row-sharded exchange (this code): unique ids, fp32 rows out, fp32 gradients back",
             ours["ids"] / bc.steps, ours["rows"] / bc.steps),
            ("column-sharded (official): all-gathered ids, bf16 (tokens, d_ff / N) per STEM layer both ways",
             official["ids"] / bc.steps, official["rows"] / bc.steps),
            ("dense table gradient all-reduced (ring, fp32)", 0, dense)]
    print(f"{bc.config} on {bc.dataset}: {N} ranks, micro-batch {B} x {T} ({B // N} sequences a rank), "
          f"{G} micro-batches a step, {n_stem} STEM layers of d_ff {d_ff}; GiB per optimiser step summed over ranks, "
          f"mean of {bc.steps} steps")
    print(f"{'scheme':<96}{'ids':>8}{'rows':>10}{'total':>10}")
    for name, ids, payload in rows:
        print(f"{name:<96}{ids / 2**30:>8.3f}{payload / 2**30:>10.2f}{(ids + payload) / 2**30:>10.2f}")
    per_rank = served.double() / (bc.steps * G)
    print(f"rows served per rank and micro-batch: max {per_rank.max():.0f}, mean {per_rank.mean():.0f} "
          f"(max / mean {per_rank.max() / per_rank.mean():.3f})")
    return {"rows": rows, "served": per_rank.tolist()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        bc = BenchConfig(**configurator.parse(argv, BenchConfig, doc=__doc__))
        device, dtype = configurator.resolve_device(bc.device, bc.dtype)
        configurator.keep_freed_memory(device, bc.cpu_keep_freed_memory)
        if bc.mode == "train" and bc.processes > 1:
            if device != "cpu":
                raise UsageError("processes > 1 is for the CPU (a GPU run times one model at a time already)")
            return bench_train_processes(bc)
        if bc.mode == "wire":
            return bench_wire(bc)
        if bc.mode == "train":
            return bench_train(bc, device, dtype)
        return bench_decode(bc, device, dtype)
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
