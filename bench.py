"""
Time training steps of a dense model and its STEM twin (same backbone) in one run.

    python bench.py                                  # small CPU default, ratios only
    python bench.py --preset=350m                    # the 350M configs on a GPU (bf16, compile)
    python bench.py --stem_layers=half --steps=50

Batches are synthetic token ids drawn from a Zipf distribution (natural text is roughly
Zipfian), so the STEM dedup sees a realistic number of unique ids. The models are timed
in alternating rounds so that drift of a shared machine hits both alike; the reported
time is the median step. On CUDA the steps are timed with events.
"""

import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

import stem
import train
from model import GPT, GPTConfig

PRESETS = {
    "tiny": dict(vocab_size=2048, block_size=128, n_layer=4, n_head=4, n_embd=256),
    "350m": dict(vocab_size=50304, block_size=1024, n_layer=24, n_head=16, n_embd=1024,
                 d_ff=2816, tie_embeddings=True),
}


@dataclass
class BenchConfig:
    preset: str = "tiny"            # tiny | 350m
    batch_size: int = 8
    steps: int = 20                 # timed steps per model per round
    rounds: int = 3
    warmup: int = 3
    stem_layers: str = "full"
    stem_variant: str = "up"
    zipf_exponent: float = 1.1
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    seed: int = 0


def zipf_batch(batch_size, block_size, vocab_size, exponent, generator):
    """(B, T) token ids with P(rank r) proportional to r^-exponent, ranks shuffled over ids."""
    ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
    probs = ranks.pow(-exponent)
    ids = torch.multinomial(probs / probs.sum(), batch_size * (block_size + 1), replacement=True, generator=generator)
    permutation = torch.randperm(vocab_size, generator=generator)
    return permutation[ids].view(batch_size, block_size + 1)


class Runner:
    """One model, its optimiser, and a step function identical to train.py's."""

    def __init__(self, name, config, bc, device, dtype):
        torch.manual_seed(bc.seed)
        self.name, self.config = name, config
        self.model = GPT(config).to(device)
        self.raw_model = self.model
        tc = train.TrainConfig(device=device)
        self.tc = tc
        self.optimizer = train.configure_optimizer(self.model, tc, device)
        if bc.compile:
            self.model = torch.compile(self.model)
        self.ctx = train.autocast_context(device, dtype)
        self.device = device
        self.times = []

    def step(self, window):
        x, y = window[:, :-1], window[:, 1:]
        row_index = stem.RowIndex.of(x) if self.raw_model.tables is not None else None
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if row_index is not None:
            row_index = row_index.to(self.device, non_blocking=True)
        with self.ctx:
            _, loss = self.model(x, y, row_index)
        loss.backward()
        train.clip_grads(self.raw_model, self.tc)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


def time_steps(runner, batches):
    """Seconds per step for each batch: CUDA events on the GPU, perf_counter on the CPU."""
    out = []
    for window in batches:
        if runner.device.startswith("cuda"):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            runner.step(window)
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            runner.step(window)
            out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        bc = BenchConfig(**train.parse_overrides(argv, BenchConfig))
        device, dtype = train.resolve_device(bc.device, bc.dtype)
        if bc.preset not in PRESETS:
            raise train.UsageError(f"preset must be one of {list(PRESETS)}, got '{bc.preset}'")
    except train.UsageError as e:
        sys.exit(f"error: {e}")
    base = PRESETS[bc.preset]
    runners = [Runner("dense", GPTConfig(**base, ffn="dense"), bc, device, dtype),
               Runner(f"stem-{bc.stem_layers}-{bc.stem_variant}",
                      GPTConfig(**base, ffn="stem", stem_layers=bc.stem_layers, stem_variant=bc.stem_variant),
                      bc, device, dtype)]
    generator = torch.Generator().manual_seed(bc.seed)
    block_size, vocab_size = base["block_size"], base["vocab_size"]
    make = lambda n: [zipf_batch(bc.batch_size, block_size, vocab_size, bc.zipf_exponent, generator) for _ in range(n)]
    for runner in runners:
        time_steps(runner, make(bc.warmup))            # compile, allocator, caches
    for _ in range(bc.rounds):
        batches = make(bc.steps)                         # both models see the same batches
        for runner in runners:
            runner.times += time_steps(runner, batches)

    tokens_per_step = bc.batch_size * block_size
    dense = runners[0]
    dense_time = statistics.median(dense.times)
    uniques = [stem.RowIndex.of(b[:, :-1]).unique_ids.numel() / tokens_per_step for b in make(10)]
    print(f"device {device} ({torch.cuda.get_device_name() if device.startswith('cuda') else 'cpu'}), "
          f"dtype {dtype}, batch {bc.batch_size}x{block_size}, median of {bc.rounds * bc.steps} steps, "
          f"unique/total tokens per batch {np.mean(uniques):.3f}")
    print(f"{'model':<22}{'total':>10}{'active':>10}{'MFLOP/tok':>11}{'flop ratio':>11}"
          f"{'tokens/s':>12}{'time ratio':>11}{'MFU':>8}")
    for runner in runners:
        model = runner.raw_model
        total, active = model.num_params()
        median = statistics.median(runner.times)
        tokens_per_sec = tokens_per_step / median
        mfu = model.estimate_mfu(tokens_per_sec) if device.startswith("cuda") else None
        flop_ratio = model.flops_per_token() / dense.raw_model.flops_per_token()
        print(f"{runner.name:<22}{total / 1e6:>9.1f}M{active / 1e6:>9.1f}M{model.flops_per_token() / 1e6:>11.1f}"
              f"{flop_ratio:>11.3f}{tokens_per_sec:>12,.0f}{median / dense_time:>11.3f}"
              f"{'-' if mfu is None else f'{100 * mfu:.1f}%':>8}")
    return runners


if __name__ == "__main__":
    main()
