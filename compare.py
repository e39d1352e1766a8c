"""
Train the variants of a comparison on the same batches, and tabulate them.

    python compare.py --dataset=facts                       # dense, STEM third/half/full, Hash-MoE, MoE
    python compare.py --dataset=text --max_iters=200 --train_args="--block_size=64 --batch_size=16"

Each variant is one `python train.py` run (a process of its own) with the same data,
seed, batches and number of steps; the table has final val loss, FLOPs/token, parameters,
tokens/s and loss spikes, written to out_dir/results.md and results.json, with a plot of
loss against training FLOPs (results.png) when matplotlib is installed.
"""

import json
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import configurator
from configurator import UsageError, knob
from model import GPT, GPTConfig

ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class CompareConfig:
    dataset: str = knob("facts", help="the dataset every variant trains on")
    variants: str = knob("dense,stem:third,stem:half,stem:full,hash_moe:16x1,moe:8x2",
                         help="comma-separated: dense, stem:LAYERS, moe:ExK, hash_moe:E, expert_choice:ExK, mot:E")
    max_iters: int = knob(600, ge=1, help="steps per variant (batch and context: train.py's, or train_args)")
    out_dir: str = knob("out-compare", help="one folder per variant, plus results.md/json/png")
    train_args: str = knob("", help="extra --key=value flags for every run, space-separated")
    spike_margin: float = knob(0.2, gt=0, help="a spike is a loss above (1 + margin) x its running mean")
    seed: int = knob(0, ge=0, help="every run's seed (weights and batches)")
    plot: str = knob("", help="where the plot goes; default: out_dir/results.png (needs matplotlib)")
    device: str = knob("auto", help=configurator.DEVICE_HELP)

    def __post_init__(self):
        configurator.check(self)
        for variant in self.variants.split(","):
            if variant.strip():
                variant_overrides(variant.strip())


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
        if experts.isdigit() and (k or "1").isdigit():
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


def compare(bc):
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
        print(f"== {variant}: python train.py {' '.join(args)}", flush=True)
        if subprocess.run([sys.executable, "train.py"] + args, cwd=ROOT).returncode != 0:
            raise UsageError(f"the run of {variant} failed (its error is above)")
        saved = checkpoint.read(out, mmap=True)
        tc = saved["train_config"]
        with torch.device("meta"):
            model = GPT(GPTConfig.from_dict(saved["model_config"]))
        with open(os.path.join(out, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        steps = [r for r in records if "loss" in r]
        final = [r for r in records if "val_loss" in r][-1]
        total, active = model.num_params()
        tokens_per_step = tc["batch_size"] * tc["grad_accum_steps"] * model.config.block_size
        flops = model.flops_per_token(batch_size=tc["batch_size"])
        rows.append({"variant": variant, "val_loss": final["val_loss"], "train_loss": final["train_loss"],
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
    path = bc.plot or os.path.join(bc.out_dir, "results.png")
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        return compare(CompareConfig(**configurator.parse(argv, CompareConfig, doc=__doc__)))
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
