"""
What a training run is made of, apart from its loop (train.py): every training knob
(TrainConfig), the model config a run resolves to (shared by the loop and the memory
plan), the optimisers and the schedule, the table source the knobs ask for, and one
optimiser step (train_step, shared by train.py and bench.py).
"""

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

import checkpoint
import configurator
import data
import lazy_adamw
import memory
import tables
from configurator import UsageError, knob
from model import GPTConfig

SCHEDULE = "AdamW, linear warmup, then cosine decay to min_lr_ratio * learning_rate"


@dataclass
class TrainConfig:
    out_dir: str = knob("out-facts", help="where ckpt.pt and metrics.jsonl go", section="I/O (training.TrainConfig)")
    dataset: str = knob("facts", help="a folder under data/ (or a path) with train.bin, val.bin and meta.json")
    init_from: str = knob("scratch", choices=("scratch", "resume"),
                          help="resume: continue exactly from out_dir/ckpt.pt")
    eval_interval: int = knob(250, ge=1, help="steps between evaluations (each also writes the checkpoint)")
    eval_iters: int = knob(20, ge=1, help="batches per split in an evaluation")
    eval_tasks: str = knob("", help="downstream tasks (eval.py's) scored at every evaluation, e.g. facts; "
                                    "none by default")
    eval_limit: int = knob(100, ge=0, help="documents per task in those evaluations (0: all)")
    log_interval: int = knob(10, ge=1, help="steps between records in metrics.jsonl")
    always_save_checkpoint: bool = knob(True, help="save at every evaluation; False: only when val loss improves")
    batch_size: int = knob(32, ge=1, help="sequences per micro-batch", section="data and schedule")
    grad_accum_steps: int = knob(1, ge=1, help="micro-batches per optimiser step")
    learning_rate: float = knob(3e-3, gt=0, help=f"peak learning rate ({SCHEDULE})")
    max_iters: int = knob(2000, ge=0, help="optimiser steps")
    lr_decay_iters: int = knob(0, ge=0, help="steps of the cosine decay; 0 means max_iters")
    warmup_iters: int = knob(100, ge=0, help="steps of linear warmup")
    min_lr_ratio: float = knob(0.1, ge=0, le=1, help="the decay's floor as a fraction of learning_rate")
    weight_decay: float = knob(0.1, ge=0, help="AdamW decay of the matrices (norms are not decayed)")
    beta1: float = knob(0.9, ge=0, lt=1, help="AdamW beta1")
    beta2: float = knob(0.95, ge=0, lt=1, help="AdamW beta2")
    grad_clip: float = knob(1.0, ge=0, help="clip the backbone's gradient norm to this; 0 disables")
    table_lr_mult: float = knob(1.0, gt=0, help="the STEM tables' learning rate over the backbone's",
                                section="STEM tables (the paper: the backbone's settings, dense AdamW)")
    table_weight_decay: float = knob(-1.0, help="the tables' weight decay; negative: weight_decay")
    table_grad_clip: float = knob(-1.0, help="clip the tables' gradient norm (apart from the backbone's) to this; "
                                             "negative: grad_clip, 0 disables")
    table_optimizer: str = knob("adamw", choices=("adamw", "lazy_adamw", "adamw_catchup"),
                                help="adamw: dense, the paper's; lazy_adamw: only the rows a step touched move; "
                                     "adamw_catchup: lazy, with the skipped steps applied when a row is next read "
                                     "(dense AdamW but for eps)")
    table_catchup: str = knob("full", choices=("full", "decay", "momentum"),
                              help="adamw_catchup: apply both halves of a skipped step, or one (ablations)")
    tables: str = knob("resident", choices=("resident", "offload"),
                       help="offload: the tables in host memory, an LFU cache of rows on the device")
    table_cache_fraction: float = knob(0.1, gt=0, le=1, help="offload: device cache rows / vocabulary")
    table_transient_rows: int = knob(0, ge=0, help="offload: device slots for the rows of batches in flight that "
                                                   "the cache does not hold; 0: measured on the data (memory.py)")
    device: str = knob("auto", help=f"{configurator.DEVICE_HELP}", section="system")
    dtype: str = knob("auto", choices=configurator.DTYPES, help="auto: bfloat16 autocast on CUDA, float32 on CPU")
    compile: bool = knob(False, help="torch.compile the model")
    seed: int = knob(1337, ge=0, help="model init, data order, dropout")
    deterministic: bool = knob(False, help="CUDA: deterministic kernels and cuBLAS workspace (slower); CPU runs "
                                           "are bitwise repeatable without it")
    dry_run: bool = knob(False, help="print the memory plan (device, host, checkpoint) and exit; allocates nothing")
    world_size: int = knob(0, ge=0, help="ranks the memory plan is for (0: as launched); under torchrun it must "
                                         "be the launched number")
    dist_timeout: int = knob(600, ge=1, help="torchrun: seconds a collective waits before the job ends with an "
                                             "error (a rank that died does not hang the others)")
    cpu_keep_freed_memory: bool = knob(False, help="CPU runs: keep freed memory in the heap and back big tensors "
                                                   "with 2 MB pages, so steps do not page-fault their logits in "
                                                   "again (glibc only, process-wide; numerics unchanged)")

    def __post_init__(self):
        configurator.check(self)
        if self.tables == "offload" and self.table_optimizer == "adamw":
            raise UsageError("tables=offload needs table_optimizer=lazy_adamw or adamw_catchup: dense AdamW would "
                             "touch every host row every step")
        if self.table_optimizer == "adamw_catchup" and self.beta1 >= math.sqrt(self.beta2):
            raise UsageError(f"table_optimizer=adamw_catchup needs beta1 < sqrt(beta2), got {self.beta1}, "
                             f"{self.beta2}")

    @property
    def table_decay(self):
        return self.weight_decay if self.table_weight_decay < 0 else self.table_weight_decay

    @property
    def table_clip(self):
        return self.grad_clip if self.table_grad_clip < 0 else self.table_grad_clip


def resolve_model_config(tc, model_overrides, meta):
    """The GPTConfig a run builds: the checkpoint's on resume (model keys may not change),
    else the overrides with the dataset's vocabulary (or the config's, without a dataset)."""
    if tc.init_from == "resume":
        ckpt_path = checkpoint.path_of(tc.out_dir)
        if not os.path.exists(ckpt_path):
            raise UsageError(f"init_from=resume but {ckpt_path} does not exist")
        saved = (checkpoint.read_sharded_extra(ckpt_path) if checkpoint.is_sharded(ckpt_path)
                 else checkpoint.read(ckpt_path, mmap=True))
        config = GPTConfig.from_dict(saved["model_config"])
        saved = configurator.flat(config)
        conflicts = {k: v for k, v in model_overrides.items() if saved.get(k) != v}
        if conflicts:
            raise UsageError(f"cannot change model keys on resume: {conflicts}")
    else:
        overrides = dict(model_overrides)
        if meta is not None and "vocab_size" in meta:
            overrides.setdefault("vocab_size", meta["vocab_size"])
        config = GPTConfig.from_dict(overrides)
    if meta is not None and isinstance(meta.get("vocab_size"), int) and config.vocab_size < meta["vocab_size"]:
        raise UsageError(f"vocab_size {config.vocab_size} is smaller than the dataset's {meta['vocab_size']}")
    return config


def plan_of(tc, model_overrides):
    """The memory plan of a run as configured, on any machine (a CUDA device needs no CUDA):
    (plan, the model config, the dataset's meta or None)."""
    device, dtype = configurator.resolve_device(tc.device, tc.dtype, need_cuda=False)
    meta = data.read_meta(tc.dataset)
    config = resolve_model_config(tc, model_overrides, meta)
    return memory.plan_run(tc, config, device, dtype), config, meta


def token_counts(tc, config, meta):
    """Training-token frequencies for a Hash-MoE with hash_assignment=balanced, else None."""
    if config.ffn != "hash_moe" or config.moe.hash_assignment != "balanced" or tc.init_from == "resume":
        return None
    return np.bincount(data.tokens(tc.dataset, "train", meta["dtype"]), minlength=config.vocab_size)[:config.vocab_size]


# -----------------------------------------------------------------------------
# optimisers and schedule

def build_tables(model, tc, device):
    """Give model.tables the optimiser the knobs ask for. adamw: dense AdamW over the
    resident parameter (stem.ResidentTables, the paper's); lazy_adamw / adamw_catchup: the
    tables become tables.LazyTables, resident or offloaded with an LFU cache. Call it with
    the model still on the CPU: lazy tables are converted before anything moves."""
    if model.tables is None or tc.table_optimizer == "adamw":
        return
    lazy = lazy_adamw.LazyAdamW(betas=(tc.beta1, tc.beta2), weight_decay=tc.table_decay,
                                catch_up=tc.table_catchup if tc.table_optimizer == "adamw_catchup" else None)
    # offloaded: slots for the rows of the batches in flight (one step's micro-batches and the
    # prefetched one) that the cache does not hold, measured on the data unless set
    cache_rows, transient_rows = memory.table_slots(tc, model.config)
    tables.use_lazy_tables(model, device, cache_rows, transient_rows, training=True, optimizer=lazy)


def backbone_parameters(model):
    """Every parameter but the STEM tables' (the tables train with their own optimiser)."""
    return [p for name, p in model.named_parameters() if not name.startswith("tables.")]


def configure_optimizer(model, tc):
    """AdamW over the backbone (matrices decayed, norms not), returned; and, for tables
    trained by dense AdamW (the paper's), their own AdamW with the tables' decay, held by
    model.tables. Call it once the model is on its device."""
    backbone = backbone_parameters(model)
    groups = [{"params": [p for p in backbone if p.dim() >= 2], "weight_decay": tc.weight_decay},
              {"params": [p for p in backbone if p.dim() < 2], "weight_decay": 0.0}]
    # fused: one pass over each tensor (weights, gradient, both moments), on the CPU too
    if model.tables is not None and tc.table_optimizer == "adamw":
        dense = getattr(model.tables, "local", model.tables)       # a shard of the tables (shards.py) holds its own
        dense.optimizer = torch.optim.AdamW([dense.weight], lr=tc.learning_rate,
                                                   betas=(tc.beta1, tc.beta2), weight_decay=tc.table_decay,
                                                   fused=True)
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), fused=True)


def optimizer_names(model):
    """The backbone's parameter names in the order configure_optimizer gives them to AdamW
    (a one-process checkpoint numbers them so)."""
    named = [(name, p) for name, p in model.named_parameters() if not name.startswith("tables.")]
    return [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]


def optimizer_state_by_name(model, state):
    """A torch optimiser state_dict keyed by parameter number, keyed by name instead (as
    torch.distributed.checkpoint.state_dict takes it); one keyed by name as it is."""
    if all(isinstance(k, str) for k in state["state"]):
        return state
    names = optimizer_names(model)
    return {"state": {names[i]: s for i, s in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def restore_optimizer(model, optimizer, state):
    """Load the backbone's AdamW state in one process, keyed by number (a one-process
    checkpoint) or by name (a job's sharded checkpoint read whole)."""
    if all(isinstance(k, int) for k in state["state"]):
        optimizer.load_state_dict(state)
    else:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
        set_optimizer_state_dict(model, optimizer, state)


def lr_at(it, tc):
    """Linear warmup to learning_rate, then cosine decay to min_lr_ratio * learning_rate."""
    decay_iters = tc.lr_decay_iters or tc.max_iters
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / (tc.warmup_iters + 1)
    if it >= decay_iters:
        return tc.learning_rate * tc.min_lr_ratio
    progress = (it - tc.warmup_iters) / max(1, decay_iters - tc.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))
    return tc.learning_rate * (tc.min_lr_ratio + coeff * (1 - tc.min_lr_ratio))


def train_step(model, optimizer, loader, tc, lr, ctx):
    """One optimiser step: forward and backward of tc.grad_accum_steps micro-batches from
    the loader, each with the next one's table rows prepared (on their way while it
    computes); the backbone clipped on its norm and stepped by AdamW, the tables clipped on
    theirs and stepped by their own optimiser. Returns (the last micro-batch's loss,
    backbone gradient norm, table gradient norm) as tensors: nothing here waits for the
    device."""
    raw = getattr(model, "_orig_mod", model)       # under torch.compile
    for group in optimizer.param_groups:
        group["lr"] = lr
    for _ in range(tc.grad_accum_steps):
        batch, upcoming = loader.next(), loader.peek()
        raw.prepare(batch.row_index)        # done already, but for the first batch of a run
        raw.prepare(upcoming.row_index)
        with ctx:
            loss = model(batch.x, batch.y, batch.row_index)[1]   # not the logits: let them go before the next forward
        (loss / tc.grad_accum_steps).backward()
    clip = tc.grad_clip if tc.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in backbone_parameters(raw) if p.grad is not None], clip)
    table_grad_norm = raw.tables.step(lr * tc.table_lr_mult, tc.table_clip) if raw.tables is not None else None
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, table_grad_norm
