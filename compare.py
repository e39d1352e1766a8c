"""
Train the variants of a comparison on the same batches, and tabulate them.

    python compare.py --dataset=facts                       # dense, STEM third/half/full, Hash-MoE, MoE
    python compare.py --dataset=text --max_iters=200 --train_args="--block_size=64 --batch_size=16"

Each variant is one `python train.py` run (a process of its own) with the same data,
seed, batches and number of steps; the table has final val loss, FLOPs/token, parameters,
tokens/s and loss spikes, written to out_dir/results.md and results.json, with a plot of
loss against training FLOPs (results.png) when matplotlib is installed.

The study (`python compare.py study`) trains a grid of such runs - variants x seeds, an
ablation, a learning-rate sweep and a long-context pair - measures every checkpoint
(probes.py), keeps one compact record per run in study_dir/runs/ (committed: the tables
and plots regenerate without training) and writes the study's sections of
docs/results.md (report.py). A half-finished grid resumes: finished runs are not redone,
an interrupted one resumes from its checkpoint.

    python compare.py study --dry_run=True        # the grid and each run's command
    python compare.py study                       # train what is missing, then report
    python compare.py study --train=False         # only the tables and plots, from the records
    python compare.py study --help
"""

import concurrent.futures
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import checkpoint
import configurator
import probes
import report
import stem
from configurator import UsageError, knob
from model import GPT, GPTConfig
from moe import MoEConfig
from training import TrainConfig

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


def run_metrics(out, spike_margin):
    """The record of a finished (or diverged) train.py run in folder out, from its
    metrics.jsonl and checkpoint: final losses, the per-step train loss curve, the val
    curve, FLOPs/token, parameters, median tokens/s and loss spikes."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    # a resumed run logs again the steps after its checkpoint: the last record of an iter wins
    steps = sorted({r["iter"]: r for r in records if "loss" in r}.values(), key=lambda r: r["iter"])
    evals = sorted({r["iter"]: r for r in records if "val_loss" in r}.values(), key=lambda r: r["iter"])
    saved = checkpoint.read(out, mmap=True)
    tc = saved["train_config"]
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(saved["model_config"]))
    total, active = model.num_params()
    losses = [r["loss"] for r in steps]
    return {"val_loss": evals[-1]["val_loss"] if evals else None, "train_loss": evals[-1]["train_loss"] if evals else None,
            "flops_per_token": model.flops_per_token(batch_size=tc["batch_size"]),
            "tokens_per_step": tc["batch_size"] * tc["grad_accum_steps"] * model.config.block_size,
            "total_params": total, "active_params": active,
            "tokens_per_sec": statistics.median(r["tokens_per_sec"] for r in steps[len(steps) // 10:]) if steps else None,
            "spikes": loss_spikes(losses, spike_margin), "losses": losses,
            "val_curve": [(r["iter"], r["val_loss"]) for r in evals]}


def train_run(args, out, env=None, log=None):
    """python train.py args --out_dir=out, resumed from out's checkpoint if it has one.
    Returns (return code, the output's last lines)."""
    resume = os.path.exists(checkpoint.path_of(out))
    command = [sys.executable, "train.py"] + args + [f"--out_dir={out}", f"--init_from={'resume' if resume else 'scratch'}"]
    if log is None:
        return subprocess.run(command, cwd=ROOT, env=env).returncode, ""
    os.makedirs(out, exist_ok=True)
    with open(log, "a") as f:
        code = subprocess.run(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    with open(log) as f:
        return code, f.read()[-2000:]


def compare(bc):
    """Train every variant with train.py on the same tokens; write results.{md,json,png}."""
    extra = [a for a in bc.train_args.split() if a]
    rows = []
    for variant in (v.strip() for v in bc.variants.split(",") if v.strip()):
        out = os.path.join(bc.out_dir, variant.replace(":", "-"))
        shutil.rmtree(out, ignore_errors=True)          # a fresh run
        args = [f"--dataset={bc.dataset}", f"--max_iters={bc.max_iters}", "--log_interval=1",
                f"--eval_interval={bc.max_iters}", f"--seed={bc.seed}", f"--device={bc.device}"] + extra
        args += [f"--{k}={v}" for k, v in variant_overrides(variant).items()]
        print(f"== {variant}: python train.py {' '.join(args)} --out_dir={out}", flush=True)
        if train_run(args, out)[0] != 0:
            raise UsageError(f"the run of {variant} failed (its error is above)")
        r = run_metrics(out, bc.spike_margin)
        rows.append({"variant": variant, **r,
                     "curve": [(3 * r["flops_per_token"] * r["tokens_per_step"] * (i + 1), loss)
                               for i, loss in enumerate(r.pop("losses"))]})
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


# -----------------------------------------------------------------------------
# the study: a grid of runs, one record each, the report written from the records

@dataclass
class StudyConfig:
    dataset: str = knob("text", help="the dataset every run trains on (README's stdlib text by default)",
                        section="the grid")
    train_args: str = knob("--n_layer=4 --n_embd=128 --block_size=64 --batch_size=16 --learning_rate=3e-3",
                           help="the recipe every run shares (flags or a config file, space-separated)")
    max_iters: int = knob(300, ge=1, help="steps of every run")
    seeds: int = knob(6, ge=2, help="seeds 0..seeds-1 for every variant of the equal-token, ablation and "
                                    "long-context claims (weights and batches)")
    variants: str = knob("dense,stem:third,stem:half,stem:full",
                         help="claim 1 (equal tokens, FLOPs): variants as in compare.py; the first is the reference")
    ablations: str = knob("gate,up+table", help="claim 2: stem_variant ablations of stem:full, against its up")
    stability_variants: str = knob("dense,stem:full,hash_moe:16", help="claim 3: the variants of the "
                                                                       "learning-rate sweep")
    stability_lrs: str = knob("3e-3,1e-2,3e-2", help="claim 3: the learning rates swept")
    stability_seeds: int = knob(2, ge=1, help="claim 3: seeds per variant and rate")
    context_block: int = knob(256, ge=2, help="claim 4: the long block, trained at the same tokens per step "
                                              "(batch_size scaled down)")
    context_variants: str = knob("dense,stem:full", help="claim 4: the variants trained at the long block")
    claims: str = knob("tokens,ablations,stability,context,geometry,offload",
                       help="which claims' runs and sections (geometry uses the tokens runs)")
    eval_interval: int = knob(50, ge=1, help="steps between the val-curve points of a run", section="measuring")
    eval_iters: int = knob(4, ge=1, help="batches per split at those points")
    probe_tokens: int = knob(32768, ge=1, help="val tokens of the final loss and the loss by position "
                                               "(the first ones, the same for every run)")
    position_buckets: int = knob(8, ge=1, help="claim 4: position buckets of the loss by position")
    kv_lengths: str = knob("16,32,64,128,256", help="claim 4: context lengths of the key-value retrieval test "
                                                    "(those up to a run's block)")
    kv_prompts: int = knob(100, ge=1, help="claim 4: retrieval prompts per length")
    spike_margin: float = knob(0.2, gt=0, help="claim 3: a spike is a loss above (1 + margin) x its running mean")
    study_dir: str = knob("docs/study", help="records (runs/*.json) and plots", section="where and how")
    out_dir: str = knob("out-study", help="the runs' checkpoints and logs while they train")
    keep_checkpoints: bool = knob(False, help="keep each run's checkpoint after it is measured")
    results: str = knob("docs/results.md", help="the file whose study section is written ('' : none)")
    workers: int = knob(2, ge=1, help="runs trained at once (processes)")
    threads: int = knob(1, ge=1, help="torch threads per run")
    train: bool = knob(True, help="False: only the tables and plots, from the records there are")
    dry_run: bool = knob(False, help="print the grid (every run's command) and exit")
    device: str = knob("auto", help=configurator.DEVICE_HELP)

    def __post_init__(self):
        configurator.check(self)
        for claim in self.claim_set:
            if claim not in CLAIMS:
                raise UsageError(f"unknown claim '{claim}' in --claims: use {', '.join(CLAIMS)}")
        for variant in split(self.variants) + split(self.stability_variants) + split(self.context_variants):
            variant_overrides(variant)
        for ablation in split(self.ablations):
            if ablation not in stem.VARIANTS or ablation == "up":
                raise UsageError(f"--ablations takes stem variants other than up ({', '.join(stem.VARIANTS[1:])}), "
                                 f"got '{ablation}'")
        for name, text in (("stability_lrs", self.stability_lrs), ("kv_lengths", self.kv_lengths)):
            try:
                values = [float(v) for v in split(text)]
            except ValueError:
                raise UsageError(f"--{name} takes comma-separated numbers, got '{text}'") from None
            if any(v <= 0 for v in values):
                raise UsageError(f"--{name} takes positive numbers, got '{text}'")

    @property
    def claim_set(self):
        return split(self.claims)


CLAIMS = ("tokens", "ablations", "stability", "context", "geometry", "offload")


def split(text):
    return [v.strip() for v in text.split(",") if v.strip()]


@dataclass
class StudyRun:
    name: str               # its record is study_dir/runs/<name>.json
    variant: str
    seed: int
    args: list              # train.py flags (no out_dir)
    claims: list            # the claims whose tables read it
    lr: float = None
    block_size: int = None
    stem_variant: str = "up"


def base_recipe(sc):
    """The train.py flags of the recipe and its (learning rate, block, batch)."""
    base = [a for a in sc.train_args.split() if a]
    overrides = configurator.parse_overrides(base, TrainConfig, GPTConfig, MoEConfig)
    return (base, overrides.get("learning_rate", TrainConfig.learning_rate),
            overrides.get("block_size", GPTConfig.block_size), overrides.get("batch_size", TrainConfig.batch_size))


def grid(sc):
    """The study's runs in training order (claim 1 first), one per name: a run that two
    claims share (the stem:full and dense runs of the sweep's base rate) is trained once."""
    base, base_lr, block, batch = base_recipe(sc)
    common = base + [f"--dataset={sc.dataset}", f"--max_iters={sc.max_iters}", "--log_interval=1",
                     f"--eval_interval={sc.eval_interval}", f"--eval_iters={sc.eval_iters}",
                     f"--device={sc.device}"]
    runs = {}

    def add(claim, variant, seed, lr=None, block_size=None, stem_variant="up"):
        lr, block_size = lr or base_lr, block_size or block
        name = variant.replace(":", "-") + (f"-{stem_variant}" if stem_variant != "up" else "")
        name += (f"-lr{lr:g}" if lr != base_lr else "") + (f"-T{block_size}" if block_size != block else "")
        name += f"-s{seed}"
        if name not in runs:
            args = common + [f"--seed={seed}"] + [f"--{k}={v}" for k, v in variant_overrides(variant).items()]
            if stem_variant != "up":
                args.append(f"--stem_variant={stem_variant}")
            if lr != base_lr:
                args.append(f"--learning_rate={lr:g}")
            if block_size != block:
                if (batch * block) % block_size:
                    raise UsageError(f"--context_block={block_size} does not divide the recipe's {batch} x {block} "
                                     f"tokens per micro-batch")
                args += [f"--block_size={block_size}", f"--batch_size={batch * block // block_size}"]
            runs[name] = StudyRun(name, variant, seed, args, [], lr, block_size, stem_variant)
        runs[name].claims.append(claim)

    claims, seeds = sc.claim_set, range(sc.seeds)
    for seed in seeds if {"tokens", "geometry"} & set(claims) else []:
        for variant in split(sc.variants):
            add("tokens", variant, seed)
    for seed in seeds if "context" in claims else []:
        for variant in split(sc.context_variants):
            add("context", variant, seed, block_size=sc.context_block)
    for seed in seeds if "ablations" in claims else []:
        for ablation in split(sc.ablations):
            add("ablations", "stem:full", seed)
            add("ablations", "stem:full", seed, stem_variant=ablation)
    for lr in [float(v) for v in split(sc.stability_lrs)] if "stability" in claims else []:
        for seed in range(sc.stability_seeds):
            for variant in split(sc.stability_variants):
                add("stability", variant, seed, lr=lr)
    return list(runs.values())


def record_path(sc, run):
    return os.path.join(sc.study_dir, "runs", f"{run.name}.json")


def read_record(sc, run):
    """The run's record, or None if it has not finished; a record made with other flags
    is an error (the grid changed: use another study_dir)."""
    path = record_path(sc, run)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        record = json.load(f)
    if record["args"] != run.args:
        raise UsageError(f"{path} was trained with other flags ({' '.join(record['args'])}); move it away or "
                         f"give another --study_dir")
    return record


def study_run(sc, run):
    """Train one run (resuming its checkpoint if any), measure it, write its record; in a
    worker process of its own. Returns the record."""
    torch.set_num_threads(sc.threads)
    out = os.path.join(sc.out_dir, run.name)
    env = dict(os.environ, OMP_NUM_THREADS=str(sc.threads))
    t0 = time.time()
    code, tail = train_run(run.args, out, env=env, log=os.path.join(out, "train.log"))
    diverged = "diverged" in tail or "non-finite" in tail
    if code != 0 and not diverged:
        raise UsageError(f"the run {run.name} failed: {tail.strip().splitlines()[-1] if tail.strip() else code} "
                         f"(log: {out}/train.log)")
    record = {"name": run.name, "variant": run.variant, "seed": run.seed, "lr": run.lr, "block_size": run.block_size,
              "stem_variant": run.stem_variant, "args": run.args, "diverged": diverged,
              "train_seconds": round(time.time() - t0, 1), "threads": sc.threads}
    record.update(run_metrics(out, sc.spike_margin) if os.path.exists(checkpoint.path_of(out)) else {})
    if not diverged:
        record.update(measure(sc, out))
    path = record_path(sc, run)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as f:
        json.dump(record, f)
    os.replace(path + ".tmp", path)                     # a record is whole or absent
    if not sc.keep_checkpoints:
        shutil.rmtree(out, ignore_errors=True)
    return record


def measure(sc, out):
    """The probes of a finished run, on the first val tokens (the same for every run)."""
    model, tokenizer = checkpoint.load_model(out, need_tokenizer=False)
    tokens = probes.val_tokens(model.dataset, model.data_dtype)
    per_position, n_tokens = probes.loss_by_position(model, tokens, sc.probe_tokens)
    lengths = [int(n) for n in (float(v) for v in split(sc.kv_lengths)) if n <= model.config.block_size]
    return {"probe_loss": per_position.mean().item(), "probe_tokens": n_tokens,
            "position_loss": probes.bucket_means(per_position, sc.position_buckets),
            # retrieval prompts are text: data without a tokenizer has none
            "kv_accuracy": probes.kv_retrieval(model, tokenizer, lengths, sc.kv_prompts) if tokenizer else {},
            "geometry": probes.geometry(model, tokens)}


def time_budget(sc, todo):
    """Seconds the runs still to train will take on sc.workers processes: each distinct
    shape timed over 3 steps of train.py (the last), times max_iters, plus the measured
    overhead of a run's start, evaluations and probes estimated as 20%."""
    per_step = {}
    for run in todo:
        key = shape_key(run)
        if key in per_step:
            continue
        out = os.path.join(sc.out_dir, "_timing")
        shutil.rmtree(out, ignore_errors=True)
        args = [a for a in run.args if not a.startswith(("--max_iters=", "--eval_interval="))]
        env = dict(os.environ, OMP_NUM_THREADS=str(sc.threads))
        code, tail = train_run(args + ["--max_iters=3", "--eval_interval=3", "--eval_iters=1"], out, env=env,
                               log=os.path.join(out, "train.log"))
        if code != 0:
            raise UsageError(f"a timing run of {run.name} failed: {tail.strip().splitlines()[-1]}")
        with open(os.path.join(out, "metrics.jsonl")) as f:
            last = [json.loads(line) for line in f if '"loss"' in line][-1]
        per_step[key] = run_metrics(out, sc.spike_margin)["tokens_per_step"] / last["tokens_per_sec"]
        shutil.rmtree(out, ignore_errors=True)
    total = sum(per_step[shape_key(r)] * sc.max_iters * 1.2 for r in todo)
    return total / min(sc.workers, max(1, len(todo))), per_step


def shape_key(run):
    return (run.variant, run.stem_variant, run.block_size)


def study(sc):
    """Train what the grid lacks (sc.workers at a time), then write the report."""
    runs = grid(sc)
    records = {r.name: read_record(sc, r) for r in runs}
    todo = [r for r in runs if records[r.name] is None]
    print(f"study: {len(runs)} runs, {len(runs) - len(todo)} finished (records in {sc.study_dir}/runs), "
          f"{len(todo)} to train")
    if sc.dry_run:
        for run in runs:
            state = "done" if records[run.name] else "todo"
            print(f"  [{state}] {run.name} ({', '.join(run.claims)}): python train.py {' '.join(run.args)} "
                  f"--out_dir={os.path.join(sc.out_dir, run.name)}")
        return runs
    if sc.train and todo:
        budget, per_step = time_budget(sc, todo)
        print(f"time budget: about {budget / 3600:.1f} h on {sc.workers} worker(s) x {sc.threads} thread(s) "
              f"({', '.join(f'{v}/{sv}/T{b}: {s:.2f} s/step' for (v, sv, b), s in per_step.items())}); "
              f"an interrupted study resumes where it stopped", flush=True)
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(sc.workers, mp_context=context) as pool:
            futures = {pool.submit(study_run, sc, run): run for run in todo}
            with tqdm(total=len(todo), desc="study runs", dynamic_ncols=True) as bar:
                for future in concurrent.futures.as_completed(futures):
                    try:
                        record = future.result()
                    except Exception as e:     # stop the grid: the finished runs keep their records
                        pool.shutdown(wait=True, cancel_futures=True)
                        raise UsageError(f"run {futures[future].name}: {e}") from None
                    records[record["name"]] = record
                    loss = "diverged" if record["diverged"] else f"val {record['probe_loss']:.4f}"
                    tqdm.write(f"{record['name']}: {loss}, {record['train_seconds']:.0f} s")
                    bar.update(1)
    finished = {name: r for name, r in records.items() if r is not None}
    return report.write(sc, runs, finished, command_of(sc))


def command_of(sc):
    """The command line that reproduces this study (the knobs that differ from defaults)."""
    defaults = StudyConfig.__dataclass_fields__
    flags = []
    for name, f in defaults.items():
        value = getattr(sc, name)
        if name in ("train", "dry_run", "workers", "threads", "keep_checkpoints") or value == f.default:
            continue
        flags.append(f'--{name}="{value}"' if " " in str(value) else f"--{name}={value}")
    return " ".join(["python compare.py study"] + flags)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["study"]:
            return study(StudyConfig(**configurator.parse(argv[1:], StudyConfig, doc=__doc__)))
        return compare(CompareConfig(**configurator.parse(argv, CompareConfig, doc=__doc__)))
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
