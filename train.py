"""
Train a STEM (or dense) GPT.

    python data/facts/prepare.py && python train.py                    # tiny CPU default
    python train.py config/stem_350m.py --batch_size=8                  # a config file + flags
    python train.py --out_dir=out-facts --init_from=resume              # continue exactly
    python train.py config/stem_350m.py --device=cuda --dry_run=True    # the memory plan only

Every knob is a field of training.TrainConfig, model.GPTConfig or moe.MoEConfig;
`python train.py --help` lists them. Config files are Python files of plain assignments;
`--key=value` flags come after them. Unknown keys and values of the wrong type stop the run
with a message saying what was expected. A run is resolve -> build -> restore -> loop ->
finish; its checkpoint (out_dir/ckpt.pt) is written at every evaluation and at the end.
"""

import json
import math
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import checkpoint
import configurator
import data
import distributed
import memory
import shards
import tasks
import training
from configurator import UsageError
from model import GPT, GPTConfig
from moe import MoEConfig
from training import TrainConfig


@dataclass
class Run:
    """What a run resolved to before anything is built."""
    tc: TrainConfig
    config: GPTConfig
    device: str
    dtype: str
    meta: dict
    ckpt_path: str
    resume_from: dict = None        # the checkpoint resumed from (init_from=resume)
    tokenizer_json: str = None      # stored in the checkpoint, so that sampling needs no data folder
    eval_tasks: list = field(default_factory=list)
    world: distributed.World = None  # under torchrun: this rank and the world size

    @property
    def is_main(self):
        return self.world is None or self.world.is_main


@dataclass
class State:
    """What changes as the run goes."""
    iter_num: int = 0
    best_val_loss: float = math.inf
    saved_iter: int = None          # the iteration of the checkpoint this run wrote (or resumed from)
    # The first iteration whose loss or gradient norm is not finite, kept on the device (-1
    # while all is well) and read only where the loop syncs anyway (logging, evaluation,
    # the end), so that watching costs no host sync per step.
    first_bad_iter: torch.Tensor = None
    losses: dict = field(default_factory=dict)      # the last evaluation's


def resolve(tc, model_overrides):
    device, dtype = configurator.resolve_device(tc.device, tc.dtype)
    check_world_size(tc)
    world = distributed.init(device)
    device = distributed.device_of(world, device)
    configurator.keep_freed_memory(device, tc.cpu_keep_freed_memory)
    meta = data.load_meta(tc.dataset)
    config = training.resolve_model_config(tc, model_overrides, meta)
    run = Run(tc, config, device, dtype, meta, os.path.join(tc.out_dir, checkpoint.SHARDED if world else "ckpt.pt"),
              tokenizer_json=data.tokenizer_json(tc.dataset, meta),
              eval_tasks=[t.strip() for t in tc.eval_tasks.split(",") if t.strip()], world=world)
    if run.eval_tasks:
        if run.tokenizer_json is None:
            raise UsageError(f"eval_tasks needs text: dataset '{tc.dataset}' has no tokenizer")
        for task in run.eval_tasks:      # fail now, not at the first eval
            try:
                tasks.task_loader()(task, 1)
            except FileNotFoundError as e:
                raise UsageError(str(e)) from None
    # stop now, not out of memory halfway through building (or killed by the kernel, on the CPU)
    memory.check_fits(memory.plan_run(tc, config, device, dtype), tc, device)
    if tc.init_from == "resume":
        found = checkpoint.path_of(tc.out_dir)
        if world is not None and checkpoint.is_sharded(found):
            run.resume_from, run.ckpt_path = "sharded", found     # read into the shards by restore()
        else:                   # one process's file: mapped, each rank reads what it keeps
            run.resume_from = checkpoint.read(found, resume=True, mmap=world is not None)
    os.makedirs(tc.out_dir, exist_ok=True)
    distributed.join(world, device, tc.dist_timeout)       # after every check that fails alike on all ranks
    return run


def check_world_size(tc):
    launched = distributed.launched_size()
    if tc.world_size and tc.world_size != launched:
        raise UsageError(f"--world_size={tc.world_size} but {launched} process(es) were launched: the flag is for "
                         f"--dry_run=True plans; leave it 0 (or give torchrun --nproc_per_node={tc.world_size})")


def build(run):
    """The model (tables converted before it moves), its optimiser, the data loaders."""
    tc, config = run.tc, run.config
    with distributed.in_turn(run.world):        # a job's ranks hold the whole table one at a time
        torch.manual_seed(tc.seed)
        model = GPT(config, training.token_counts(tc, config, run.meta))
        if run.world is None:
            training.build_tables(model, tc, run.device)
        elif model.tables is not None:
            shards.shard_tables(model, tc, run.world, run.device, memory.table_slots(tc, config))   # its rows only
    model.to(run.device)
    if run.world is not None:
        distributed.shard_backbone(model, run.world)
    optimizer = training.configure_optimizer(model, tc)
    if run.eval_tasks:
        model.eos_id = run.meta.get("eos_id") or 0      # the pad token of scored batches
    loader = lambda split, seed: data.BatchLoader(
        os.path.join(data.data_dir_of(tc.dataset), f"{split}.bin"), run.meta["dtype"], tc.batch_size,
        config.block_size, config.vocab_size, run.device, seed, with_row_index=model.tables is not None,
        rank=run.world.rank if run.world else 0, world_size=run.world.world_size if run.world else 1)
    loaders = {"train": loader("train", tc.seed), "eval": {split: loader(split, 0) for split in ("train", "val")}}
    return model, optimizer, loaders


def restore(run, model, optimizer, train_loader):
    """The state to start from: fresh, or everything the checkpoint resumed from holds (a
    job's sharded checkpoint from any world size, or one process's)."""
    state = State(first_bad_iter=torch.full((), -1, dtype=torch.long, device=run.device))
    ckpt = run.resume_from
    if ckpt is None:
        return state
    if ckpt == "sharded":
        ckpt = load_sharded(run, model, optimizer, train_loader)
    elif run.world is not None:                # one process's checkpoint, read whole on every rank
        distributed.load_backbone(model, optimizer, ckpt["model"],
                                  training.optimizer_state_by_name(model, ckpt["optimizer"]), whole=True)
        if model.tables is not None:
            model.tables.load_full_state({"weight": ckpt["model"]["tables.weight"],
                                          "optimizer": ckpt["table_optimizer"]})
    else:
        model.load_state_dict(ckpt["model"])
        training.restore_optimizer(model, optimizer, ckpt["optimizer"])
        if model.tables is not None:
            model.tables.load_optimizer_state(ckpt["table_optimizer"])
    train_loader.load_state_dict(ckpt["data"])
    checkpoint.set_rng_state(ckpt["rng"])
    state.iter_num = state.saved_iter = ckpt["iter_num"]
    state.best_val_loss = ckpt["best_val_loss"]
    run.resume_from = None          # let the checkpoint's memory go
    return state


def load_sharded(run, model, optimizer, train_loader):
    """A job's sharded checkpoint into this job's shards (its world size may differ): the
    checkpoint's extra state, with this rank's RNG state (rank 0's for a rank it lacks)."""
    rng_key = f"rng.{run.world.rank}" if checkpoint.sharded_has(run.ckpt_path, f"rng.{run.world.rank}") else "rng.0"
    targets = distributed.sharded_state(model, optimizer, extra_state(run, train_loader, None), run.world, run.device,
                                        rng_keys=[rng_key])
    targets = checkpoint.load_sharded(targets, run.ckpt_path)
    distributed.load_backbone(model, optimizer, targets["model"], targets["optimizer"], whole=False)
    if model.tables is not None:
        model.tables.load_sharded_state(targets["tables"])
    return {**targets["extra"], "rng": targets[rng_key]}


def extra_state(run, train_loader, state):
    """A checkpoint's configs, step and data position (the same on every rank)."""
    return {"model_config": asdict(run.config), "train_config": asdict(run.tc),
            "iter_num": state.iter_num if state else 0, "best_val_loss": state.best_val_loss if state else 0.0,
            "data": train_loader.state_dict(),
            "meta": run.meta, "tokenizer_json": run.tokenizer_json,
            "world_size": run.world.world_size if run.world else 1}


def run_training(tc, model_overrides):
    run = resolve(tc, model_overrides)
    model, optimizer, loaders = build(run)
    state = restore(run, model, optimizer, loaders["train"])
    total_params, active_params = model.num_params()
    say = print if run.is_main else (lambda *a, **k: None)       # only rank 0 speaks, logs and writes metrics
    say(f"model: {total_params / 1e6:.2f}M params, {active_params / 1e6:.2f}M active, "
          f"{model.flops_per_token() / 1e6:.2f} MFLOPs/token forward, STEM layers {list(run.config.stem_layer_ids)}")
    compiled = torch.compile(model) if tc.compile else model
    ctx = configurator.autocast_context(run.device, run.dtype)
    log = open(os.path.join(tc.out_dir, "metrics.jsonl") if run.is_main else os.devnull, "a")
    start_iter, t0 = state.iter_num, time.perf_counter()
    pbar = tqdm(total=tc.max_iters, initial=state.iter_num, desc="train", dynamic_ncols=True, disable=not run.is_main)
    while state.iter_num < tc.max_iters:
        if state.iter_num % tc.eval_interval == 0 and state.iter_num > start_iter:    # not again right after a resume
            improved = evaluate(run, compiled, model, loaders["eval"], state, ctx, log)
            if improved or tc.always_save_checkpoint:
                save(run, model, optimizer, loaders["train"], state)
        lr = training.lr_at(state.iter_num, tc)
        loss, grad_norm, table_grad_norm = training.train_step(compiled, optimizer, loaders["train"], tc, lr, ctx)
        finite = loss.detach().isfinite()
        for norm in (grad_norm, table_grad_norm):
            if norm is not None:
                finite = finite & norm.isfinite()
        state.first_bad_iter = torch.where((state.first_bad_iter < 0) & ~finite, state.iter_num + 1,
                                           state.first_bad_iter)
        state.iter_num += 1
        pbar.update(1)
        if state.iter_num % tc.log_interval == 0 or state.iter_num == tc.max_iters:
            stop_if_diverged(run, state)
            if run.device.startswith("cuda"):
                torch.cuda.synchronize()
            tokens_per_sec = tc.batch_size * tc.grad_accum_steps * run.config.block_size * tc.log_interval / (
                time.perf_counter() - t0)
            t0 = time.perf_counter()
            record = step_record(model, state.iter_num, distributed.mean(loss.item(), run.world), lr, grad_norm,
                                 table_grad_norm, tokens_per_sec, run.device)
            log.write(json.dumps(record) + "\n")
            log.flush()
            pbar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}",
                             mfu="-" if record["mfu"] is None else f"{100 * record['mfu']:.1f}%")
    pbar.close()
    evaluate(run, compiled, model, loaders["eval"], state, ctx, log)
    save(run, model, optimizer, loaders["train"], state)
    log.close()
    return {"iter_num": state.iter_num, "train_loss": state.losses.get("train"), "val_loss": state.losses.get("val"),
            "ckpt_path": run.ckpt_path}


def step_record(model, iter_num, loss, lr, grad_norm, table_grad_norm, tokens_per_sec, device):
    """A metrics.jsonl line of a training step (the one place the loop reads its tensors)."""
    mfu = model.estimate_mfu(tokens_per_sec) if device.startswith("cuda") else None
    record = {"iter": iter_num, "loss": float(loss), "lr": lr, "grad_norm": float(grad_norm),
              "table_grad_norm": None if table_grad_norm is None else float(table_grad_norm),
              "tokens_per_sec": tokens_per_sec, "mfu": mfu}
    if model.aux is not None:       # MoE baselines: auxiliary losses and expert loads
        aux = model.aux
        record.update(balance_loss=aux["balance"].item(), z_loss=aux["z"].item(),
                      dropped=aux["dropped"].item(), expert_load=aux["load"].mean(0).tolist())
    return record


@torch.no_grad()
def estimate_loss(model, loaders, eval_iters, ctx, world=None):
    """Mean loss over eval_iters batches per split, always the same batches (the eval
    loaders are reseeded), so evals are comparable and do not disturb training's data.
    Under torchrun each rank scores its slice of every batch and the means are averaged."""
    model.eval()
    out = {}
    for split, loader in loaders.items():
        loader.reseed(12345)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            b = loader.next()
            with ctx:
                losses[k] = model(b.x, b.y, b.row_index)[1].item()
        out[split] = distributed.mean(losses.mean().item(), world)
    model.train()
    return out


def evaluate(run, compiled, model, loaders, state, ctx, log):
    """Losses on both splits (and the downstream tasks asked for), logged; True if val improved."""
    stop_if_diverged(run, state)
    losses = estimate_loss(compiled, loaders, run.tc.eval_iters, ctx, run.world)
    record = {"iter": state.iter_num, "train_loss": losses["train"], "val_loss": losses["val"]}
    text = f"iter {state.iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
    if run.eval_tasks:
        # the uncompiled model, so that compile never sees the scoring shapes
        tokenizer = Tokenizer.from_str(run.tokenizer_json)
        with ctx:
            scores, _ = tasks.evaluate_tasks(model, tokenizer, run.eval_tasks, tasks.task_loader(),
                                             run.tc.eval_limit, run.tc.batch_size, progress=False)
        record["tasks"] = scores
        text += "".join(f", {task} {100 * m['primary']:.1f}%" for task, m in scores.items())
    log.write(json.dumps(record) + "\n")
    log.flush()
    if run.is_main:
        tqdm.write(text)
    improved = losses["val"] < state.best_val_loss
    state.best_val_loss = min(state.best_val_loss, losses["val"])
    state.losses = losses
    return improved


def save(run, model, optimizer, train_loader, state):
    """The checkpoint of the run now; a diverged model never replaces a good checkpoint."""
    weights = {k: v.to_local() if hasattr(v, "to_local") else v for k, v in model.state_dict().items()}
    bad = checkpoint.non_finite(weights)
    if distributed.any_rank(bad, run.world):
        where = f"{bad[0]}{' and others' if len(bad) > 1 else ''}" if bad else "another rank's shards"
        raise UsageError(f"iter {state.iter_num}: non-finite weights in {where}; not saved, {kept_checkpoint(run, state)}")
    if run.world is not None:
        sharded = distributed.sharded_state(model, optimizer, extra_state(run, train_loader, state), run.world,
                                            run.device)
        checkpoint.save_sharded(sharded, run.tc.out_dir, run.is_main)
    else:
        checkpoint.save({
            **extra_state(run, train_loader, state), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": checkpoint.rng_state(),
            "table_optimizer": model.tables.optimizer_state() if model.tables is not None else None,
        }, run.ckpt_path)
    state.saved_iter = state.iter_num


def kept_checkpoint(run, state):
    if state.saved_iter is not None:
        return f"the last good checkpoint ({run.ckpt_path}, iter {state.saved_iter}) is kept"
    if os.path.exists(run.ckpt_path):
        return f"{run.ckpt_path} is left as it was"
    return "no checkpoint was written"


def stop_if_diverged(run, state):
    bad = int(state.first_bad_iter)
    bad = distributed.first_of(bad, run.world)      # every rank stops together, at the first bad step of any
    if bad >= 0:
        raise UsageError(f"iter {bad}: the loss or gradient norm is not finite (diverged; try a lower "
                         f"learning_rate); training stopped, {kept_checkpoint(run, state)}")


def dry_run(tc, model_overrides):
    """Print the plan of the run (--dry_run=True) without allocating; return its totals."""
    p, config, meta = training.plan_of(tc, model_overrides)
    if meta is None:
        p.notes.append(f"dataset '{tc.dataset}' not found: vocab_size {config.vocab_size} from the config")
    print(p.format())
    return {"device_bytes": p.total("device"), "host_bytes": p.total("host"), "plan": p}


def train(tc, model_overrides):
    """Run training as configured; return a summary dict (final losses, iterations)."""
    if tc.dry_run:
        return dry_run(tc, model_overrides)
    if not tc.deterministic:
        try:
            return run_training(tc, model_overrides)
        finally:
            distributed.finish()
    # cuBLAS reads this when it first starts, so it must be set before the first matmul
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        return run_training(tc, model_overrides)
    finally:
        torch.use_deterministic_algorithms(was)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = configurator.parse(argv, TrainConfig, GPTConfig, MoEConfig, doc=__doc__)
        train_overrides, model_overrides = configurator.split_overrides(overrides, TrainConfig)
        return train(configurator.build(TrainConfig, **train_overrides), model_overrides)
    except UsageError as e:
        line = distributed.error_line(e)
        sys.exit(line if line else 1)


if __name__ == "__main__":
    main()
