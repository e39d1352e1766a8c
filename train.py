"""
Train a STEM (or dense) GPT.

    python data/facts/prepare.py && python train.py                    # tiny CPU default
    python train.py config/stem_350m.py --batch_size=16                 # a config file + flags
    python train.py --out_dir=out-facts --init_from=resume              # continue exactly

Every hyperparameter is a field of TrainConfig (below) or of model.GPTConfig. Config files
are Python files of plain assignments; `--key=value` flags come after them. Unknown keys
and values of the wrong type stop the run with a message saying what was expected.
"""

import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm import tqdm

import configurator
import eval as downstream_eval
import lazy_adamw
import offload
import plan
import stem
from configurator import UsageError, knob
from model import GPT, GPTConfig


@dataclass
class TrainConfig:
    # I/O
    out_dir: str = "out-facts"
    dataset: str = "facts"          # a folder under data/ (or a path) with train.bin, val.bin, meta.json
    init_from: str = knob("scratch", choices=("scratch", "resume"))   # resume: from out_dir/ckpt.pt
    eval_interval: int = knob(250, ge=1)
    eval_iters: int = knob(20, ge=1)
    eval_tasks: str = ""             # downstream tasks scored at every eval (eval.py), e.g. facts; off by default
    eval_limit: int = knob(100, ge=0)   # documents per task in those evals (0: all)
    log_interval: int = knob(10, ge=1)
    always_save_checkpoint: bool = True   # else save only when val loss improves
    # data
    batch_size: int = knob(32, ge=1)
    grad_accum_steps: int = knob(1, ge=1)
    # AdamW, warmup + cosine decay to min_lr_ratio * learning_rate
    learning_rate: float = knob(3e-3, gt=0)
    max_iters: int = knob(2000, ge=0)
    lr_decay_iters: int = knob(0, ge=0)     # 0 means max_iters
    warmup_iters: int = knob(100, ge=0)
    min_lr_ratio: float = knob(0.1, ge=0, le=1)
    weight_decay: float = knob(0.1, ge=0)
    beta1: float = knob(0.9, ge=0, lt=1)
    beta2: float = knob(0.95, ge=0, lt=1)
    grad_clip: float = knob(1.0, ge=0)      # on the backbone's gradient norm; 0 disables
    # the STEM tables' optimiser group; negative means "same as the backbone" (the paper)
    table_lr_mult: float = knob(1.0, gt=0)
    table_weight_decay: float = -1.0
    table_grad_clip: float = -1.0   # tables are clipped on their own norm, as in the paper
    table_optimizer: str = knob("adamw", choices=("adamw", "lazy_adamw", "adamw_catchup"))  # adamw: dense,
                                    # the paper's; lazy_adamw: only touched rows move; adamw_catchup: lazy,
                                    # with the skipped steps applied when a row is next read (= dense AdamW)
    table_catchup: str = knob("full", choices=("full", "decay", "momentum"))   # adamw_catchup ablations
    tables: str = knob("resident", choices=("resident", "offload"))   # offload: host memory + device LFU cache
    table_cache_fraction: float = knob(0.1, gt=0, le=1)   # offload: device cache rows / vocabulary
    table_transient_rows: int = knob(0, ge=0)    # offload: device slots for rows of batches in flight that the
                                    # cache does not hold; 0: the rows in flight measured on the data (plan.py)
    # system
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    dtype: str = knob("auto", choices=configurator.DTYPES)   # auto: bfloat16 on CUDA, float32 on CPU
    compile: bool = False
    seed: int = knob(1337, ge=0)
    deterministic: bool = False     # CUDA: deterministic kernels and cuBLAS workspace (slower); the CPU
                                    # runs are bitwise repeatable without it
    dry_run: bool = False           # print the memory plan (device, host, checkpoint) and exit; allocates nothing

    def __post_init__(self):
        configurator.check(self)
        if self.tables == "offload" and self.table_optimizer == "adamw":
            raise UsageError("tables=offload needs table_optimizer=lazy_adamw or adamw_catchup: dense AdamW would "
                             "touch every host row every step")
        if self.table_optimizer == "adamw_catchup" and self.beta1 >= math.sqrt(self.beta2):
            raise UsageError(f"table_optimizer=adamw_catchup needs beta1 < sqrt(beta2), got {self.beta1}, "
                             f"{self.beta2}")


# -----------------------------------------------------------------------------
# data

class Batch:
    """x, y: (B, T) int64 on the device; row_index: the STEM dedup of x on the device and
    row_index_cpu the same on the host (None for dense)."""

    def __init__(self, x, y, row_index, row_index_cpu):
        self.x, self.y, self.row_index, self.row_index_cpu = x, y, row_index, row_index_cpu


class BatchLoader:
    """Random windows of a token bin, drawn from a seeded generator so that a checkpoint
    can store the data position and resume replays the same batches.
    The dedup (unique ids + inverse) is done here, on the CPU copy the loader already
    holds: a torch.unique on the GPU would force a host sync every step.
    With lookahead, each batch is drawn one call early and handed to on_draw (offloaded
    tables prefetch its rows while the current batch computes)."""

    def __init__(self, path, dtype, batch_size, block_size, vocab_size, device, seed, with_row_index,
                 lookahead=False, on_draw=None):
        self.path, self.data = path, np.memmap(path, dtype=dtype, mode="r")
        if len(self.data) <= block_size + 1:
            raise UsageError(f"{path} has {len(self.data)} tokens, fewer than block_size + 2")
        self.batch_size, self.block_size, self.vocab_size = batch_size, block_size, vocab_size
        self.device, self.with_row_index = device, with_row_index
        self.generator = torch.Generator().manual_seed(seed)
        self.lookahead, self.on_draw = lookahead, on_draw
        self.pending, self.pending_state = None, None   # the batch drawn early, and the state before it

    def next(self):
        if not self.lookahead:
            return self._draw()
        if self.pending is None:
            self.pending_state, self.pending = self.generator.get_state(), self._draw()
        batch = self.pending
        self.pending_state, self.pending = self.generator.get_state(), self._draw()
        return batch

    def _draw(self):
        window = plan.draw_windows(self.data, self.generator, self.batch_size, self.block_size)   # (B, T+1)
        window = torch.from_numpy(window.astype(np.int64))
        x, y = window[:, :-1], window[:, 1:]                                   # (B, T) each
        row_index = row_index_cpu = stem.RowIndex.of(x) if self.with_row_index else None
        try:
            stem.check_ids(row_index.unique_ids if row_index else x, self.vocab_size)
        except ValueError as e:
            raise UsageError(f"{self.path}: {e}; was the data prepared with another tokenizer?") from None
        if self.device.startswith("cuda"):
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
            if row_index is not None:
                row_index = stem.RowIndex(row_index.unique_ids.pin_memory(), row_index.inverse.pin_memory())
                row_index = row_index.to(self.device, non_blocking=True)
        batch = Batch(x, y, row_index, row_index_cpu)
        if self.on_draw is not None:
            self.on_draw(batch)
        return batch

    def state_dict(self):
        """The data position: the generator state before any batch not yet handed out."""
        return {"generator": self.pending_state if self.pending is not None else self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.pending = None


# -----------------------------------------------------------------------------
# optimiser and schedule

def configure_optimizer(model, tc, device):
    """AdamW with three groups: backbone matrices (decayed), norms (not decayed), and the
    STEM tables (their own lr multiplier and decay; defaults follow the paper: the same as
    the backbone, dense gradients, so every row decays every step)."""
    table_params = [model.tables.weight] if isinstance(model.tables, stem.ResidentTables) else []
    table_ids = {id(p) for p in table_params}
    backbone = [p for p in model.parameters() if id(p) not in table_ids]
    groups = [
        {"params": [p for p in backbone if p.dim() >= 2], "weight_decay": tc.weight_decay, "lr_mult": 1.0},
        {"params": [p for p in backbone if p.dim() < 2], "weight_decay": 0.0, "lr_mult": 1.0},
    ]
    if table_params:
        table_decay = tc.weight_decay if tc.table_weight_decay < 0 else tc.table_weight_decay
        groups.append({"params": table_params, "weight_decay": table_decay, "lr_mult": tc.table_lr_mult})
    # fused: one pass over each tensor (weights, gradient, both moments), on the CPU too
    return torch.optim.AdamW(groups, lr=tc.learning_rate, betas=(tc.beta1, tc.beta2), fused=True)


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


def table_clip_of(tc):
    return tc.grad_clip if tc.table_grad_clip < 0 else tc.table_grad_clip


def use_table_options(model, tc, config, device):
    """Apply tables= and table_optimizer=: with lazy_adamw the tables become
    offload.SparseTables (resident, or offloaded with an LFU cache). True if so."""
    if model.tables is None or tc.table_optimizer == "adamw":
        return False
    decay = tc.weight_decay if tc.table_weight_decay < 0 else tc.table_weight_decay
    lazy = lazy_adamw.LazyAdamW(betas=(tc.beta1, tc.beta2), weight_decay=decay,
                                catch_up=tc.table_catchup if tc.table_optimizer == "adamw_catchup" else None)
    # offloaded: slots for the rows of the batches in flight (one step's micro-batches and the
    # prefetched one) that the cache does not hold, measured on the data unless set
    cache_rows, transient_rows = plan.table_slots(tc, config)
    offload.use_sparse_tables(model, device, cache_rows, transient_rows, training=True, optimizer=lazy)
    return True


def table_optimizer_state(model):
    """Lazy AdamW's moments (the host tensors themselves when offloaded: no second copy)."""
    if not isinstance(model.tables, offload.SparseTables):
        return None
    moments = {k: v for k, v in model.tables.tensors().items() if k != "weight"}
    return {"moments": moments, **model.tables.optimizer.state_dict()}


def clip_grads(model, tc):
    """Clip the backbone and the tables on separate global norms; return both norms."""
    table_ids = {id(model.tables.weight)} if isinstance(model.tables, stem.ResidentTables) else set()
    backbone = [p for p in model.parameters() if id(p) not in table_ids and p.grad is not None]
    tables = [p for p in model.parameters() if id(p) in table_ids and p.grad is not None]
    table_clip = table_clip_of(tc)
    norms = []
    for params, max_norm in ((backbone, tc.grad_clip), (tables, table_clip)):
        if not params:
            norms.append(None)
        else:
            norms.append(torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")))
    return norms


def train_step(model, optimizer, next_batch, tc, lr, ctx):
    """One optimiser step: forward and backward of tc.grad_accum_steps micro-batches (each
    from next_batch()), the backbone and the tables clipped on their own norms, the lazy
    table step (SparseTables) and AdamW. Returns (the last micro-batch's loss, backbone
    gradient norm, table gradient norm) as tensors: nothing here waits for the device."""
    raw_model = getattr(model, "_orig_mod", model)       # under torch.compile
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_mult"]
    for _ in range(tc.grad_accum_steps):
        batch = next_batch()
        with ctx:
            loss = model(batch.x, batch.y, batch.row_index)[1]   # not the logits: let them go before the next forward
        (loss / tc.grad_accum_steps).backward()
    grad_norm, table_grad_norm = clip_grads(raw_model, tc)
    if isinstance(raw_model.tables, offload.SparseTables):
        table_grad_norm = raw_model.tables.step(lr * tc.table_lr_mult, table_clip_of(tc))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, grad_norm, table_grad_norm


# -----------------------------------------------------------------------------
# checkpoints

def save_checkpoint(state, path):
    """Write to a temp file, flush it to disk, then rename over the old checkpoint: a crash
    mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def rng_state():
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# -----------------------------------------------------------------------------
# the run

@torch.no_grad()
def estimate_loss(model, loaders, eval_iters, ctx):
    """Mean loss over eval_iters batches per split, always the same batches (the eval
    loaders are reseeded), so evals are comparable and do not disturb training's data."""
    model.eval()
    out = {}
    for split, loader in loaders.items():
        loader.generator.manual_seed(12345)
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            b = loader.next()
            with ctx:
                losses[k] = model(b.x, b.y, b.row_index)[1].item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train(tc, model_overrides):
    """Run training as configured; return a summary dict (final losses, iterations)."""
    if tc.dry_run:
        return plan.dry_run(tc, model_overrides)
    if not tc.deterministic:
        return run_training(tc, model_overrides)
    # cuBLAS reads this when it first starts, so it must be set before the first matmul
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    try:
        return run_training(tc, model_overrides)
    finally:
        torch.use_deterministic_algorithms(was)


def run_training(tc, model_overrides):
    device, dtype = configurator.resolve_device(tc.device, tc.dtype)
    meta = configurator.load_meta(tc.dataset)
    data_dir = configurator.data_dir_of(tc.dataset)
    os.makedirs(tc.out_dir, exist_ok=True)
    ckpt_path = os.path.join(tc.out_dir, "ckpt.pt")

    checkpoint = None
    if tc.init_from == "resume":
        if not os.path.exists(ckpt_path):
            raise UsageError(f"init_from=resume but {ckpt_path} does not exist")
        checkpoint, _ = configurator.read_checkpoint(ckpt_path)
        missing = [k for k in ("optimizer", "data", "rng", "best_val_loss", "table_optimizer") if k not in checkpoint]
        if missing:
            raise UsageError(f"{ckpt_path} cannot be resumed from: it lacks {missing}")
        conflicts = {k: v for k, v in model_overrides.items() if checkpoint["model_config"].get(k) != v}
        if conflicts:
            raise UsageError(f"cannot change model keys on resume: {conflicts}")
        config = GPTConfig(**checkpoint["model_config"])
    else:      # scratch (the knob allows nothing else)
        model_overrides.setdefault("vocab_size", meta["vocab_size"])
        try:
            config = GPTConfig(**model_overrides)
        except ValueError as e:   # GPTConfig's own checks of the user's values
            raise UsageError(str(e)) from None
    if config.vocab_size < meta["vocab_size"]:
        raise UsageError(f"vocab_size {config.vocab_size} is smaller than the dataset's {meta['vocab_size']}")

    if device.startswith("cuda"):      # stop now, not out of memory halfway through building
        plan.check_fits(plan.plan_run(tc, config, device, dtype), tc, device)
    torch.manual_seed(tc.seed)
    token_counts = None
    if config.ffn == "hash_moe" and config.hash_assignment == "balanced" and checkpoint is None:
        train_data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=meta["dtype"], mode="r")
        token_counts = np.bincount(train_data, minlength=config.vocab_size)[:config.vocab_size]
    model = GPT(config, token_counts)     # on the CPU: lazy tables are converted before anything moves
    sparse = use_table_options(model, tc, config, device)
    model.to(device)
    optimizer = configure_optimizer(model, tc, device)
    loader_args = dict(dtype=meta["dtype"], batch_size=tc.batch_size, block_size=config.block_size,
                       vocab_size=config.vocab_size, device=device, with_row_index=model.tables is not None)
    on_draw = (lambda b: model.tables.prepare(b.row_index_cpu)) if sparse else None
    train_loader = BatchLoader(os.path.join(data_dir, "train.bin"), seed=tc.seed, lookahead=sparse,
                               on_draw=on_draw, **loader_args)
    eval_loaders = {split: BatchLoader(os.path.join(data_dir, f"{split}.bin"), seed=0, **loader_args)
                    for split in ("train", "val")}
    iter_num, best_val_loss = 0, float("inf")
    checkpoint_resumed = checkpoint is not None
    if checkpoint is not None:
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if sparse:
            model.tables.load_tensors(checkpoint["table_optimizer"]["moments"])
            model.tables.optimizer.load_state_dict(checkpoint["table_optimizer"])
        train_loader.load_state_dict(checkpoint["data"])
        set_rng_state(checkpoint["rng"])
        iter_num, best_val_loss = checkpoint["iter_num"], checkpoint["best_val_loss"]
        del checkpoint
    tokenizer_json = None   # stored in the checkpoint so that sampling needs no data folder
    if meta.get("tokenizer"):
        with open(os.path.join(data_dir, meta["tokenizer"])) as f:
            tokenizer_json = f.read()

    eval_tasks = [t.strip() for t in tc.eval_tasks.split(",") if t.strip()]
    if eval_tasks:
        if tokenizer_json is None:
            raise UsageError(f"eval_tasks needs text: dataset '{tc.dataset}' has no tokenizer")
        tokenizer, load_task = Tokenizer.from_str(tokenizer_json), downstream_eval.task_loader()
        for task in eval_tasks:      # fail now, not at the first eval
            try:
                load_task(task, 1)
            except FileNotFoundError as e:
                raise UsageError(str(e)) from None
        model.eos_id = meta.get("eos_id") or 0      # the pad token of scored batches
    total_params, active_params = model.num_params()
    print(f"model: {total_params / 1e6:.2f}M params, {active_params / 1e6:.2f}M active, "
          f"{model.flops_per_token() / 1e6:.2f} MFLOPs/token forward, STEM layers {list(config.stem_layer_ids)}")
    raw_model = model
    if tc.compile:
        model = torch.compile(model)
    ctx = configurator.autocast_context(device, dtype)
    log = open(os.path.join(tc.out_dir, "metrics.jsonl"), "a")
    tokens_per_iter = tc.batch_size * tc.grad_accum_steps * config.block_size

    last_good = {"iter": None}      # the iteration of the checkpoint on disk from this run

    def checkpoint_now():
        # a diverged model must never replace a good checkpoint
        bad = [name for name, t in raw_model.state_dict().items() if t.is_floating_point() and not t.isfinite().all()]
        if bad:
            raise UsageError(f"iter {iter_num}: non-finite weights in {bad[0]}{' and others' if len(bad) > 1 else ''}; "
                             f"not saved, {kept_checkpoint()}")
        save_checkpoint({
            "model": raw_model.state_dict(), "optimizer": optimizer.state_dict(),
            "model_config": asdict(config), "train_config": asdict(tc), "iter_num": iter_num,
            "best_val_loss": best_val_loss, "rng": rng_state(), "data": train_loader.state_dict(),
            "meta": meta, "tokenizer_json": tokenizer_json, "table_optimizer": table_optimizer_state(raw_model),
        }, ckpt_path)
        last_good["iter"] = iter_num

    def kept_checkpoint():
        if last_good["iter"] is not None:
            return f"the last good checkpoint ({ckpt_path}, iter {last_good['iter']}) is kept"
        if os.path.exists(ckpt_path):
            return f"{ckpt_path} is left as it was"
        return "no checkpoint was written"

    # Divergence: the first iteration whose loss or gradient norm is not finite, kept on the
    # device (-1 while all is well) and read only where the loop syncs anyway (logging,
    # evaluation, the end), so that watching costs no host sync per step.
    first_bad_iter = torch.full((), -1, dtype=torch.long, device=device)

    def stop_if_diverged():
        bad = int(first_bad_iter)
        if bad >= 0:
            raise UsageError(f"iter {bad}: the loss or gradient norm is not finite (diverged; try a lower "
                             f"learning_rate); training stopped, {kept_checkpoint()}")

    def evaluate():
        nonlocal best_val_loss
        losses = estimate_loss(model, eval_loaders, tc.eval_iters, ctx)
        record = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"]}
        text = f"iter {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
        if eval_tasks:
            # the uncompiled model, so that compile never sees the scoring shapes
            with ctx:
                scores, _ = downstream_eval.evaluate_tasks(raw_model, tokenizer, eval_tasks, load_task,
                                                           tc.eval_limit, tc.batch_size, progress=False)
            record["tasks"] = scores
            text += "".join(f", {task} {100 * m['primary']:.1f}%" for task, m in scores.items())
        log.write(json.dumps(record) + "\n")
        log.flush()
        tqdm.write(text)
        improved = losses["val"] < best_val_loss
        best_val_loss = min(best_val_loss, losses["val"])
        return losses, improved

    start_iter = iter_num
    if checkpoint_resumed:
        last_good["iter"] = iter_num     # the checkpoint resumed from is this run's last good one
    pbar = tqdm(total=tc.max_iters, initial=iter_num, desc="train", dynamic_ncols=True)
    losses = {}
    t0 = time.perf_counter()
    while iter_num < tc.max_iters:
        if iter_num % tc.eval_interval == 0 and iter_num > start_iter:     # not again right after a resume
            stop_if_diverged()
            losses, improved = evaluate()
            if improved or tc.always_save_checkpoint:
                checkpoint_now()
        lr = lr_at(iter_num, tc)
        loss, grad_norm, table_grad_norm = train_step(model, optimizer, train_loader.next, tc, lr, ctx)
        finite = loss.detach().isfinite()
        for norm in (grad_norm, table_grad_norm):
            if norm is not None:
                finite = finite & norm.isfinite()
        first_bad_iter = torch.where((first_bad_iter < 0) & ~finite, iter_num + 1, first_bad_iter)
        iter_num += 1
        pbar.update(1)
        if iter_num % tc.log_interval == 0 or iter_num == tc.max_iters:
            stop_if_diverged()
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / tc.log_interval
            t0 = time.perf_counter()
            tokens_per_sec = tokens_per_iter / dt
            mfu = raw_model.estimate_mfu(tokens_per_sec) if device.startswith("cuda") else None
            record = {"iter": iter_num, "loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm),
                      "table_grad_norm": None if table_grad_norm is None else float(table_grad_norm),
                      "tokens_per_sec": tokens_per_sec, "mfu": mfu}
            if raw_model.aux is not None:       # MoE baselines: auxiliary losses and expert loads
                aux = raw_model.aux
                record.update(balance_loss=aux["balance"].item(), z_loss=aux["z"].item(),
                              dropped=aux["dropped"].item(), expert_load=aux["load"].mean(0).tolist())
            log.write(json.dumps(record) + "\n")
            log.flush()
            pbar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tokens_per_sec:,.0f}",
                             mfu="-" if mfu is None else f"{100 * mfu:.1f}%")
    pbar.close()
    stop_if_diverged()
    losses, _ = evaluate()
    checkpoint_now()
    log.close()
    return {"iter_num": iter_num, "train_loss": losses.get("train"), "val_loss": losses.get("val"),
            "ckpt_path": ckpt_path}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        overrides = configurator.parse_overrides(argv, TrainConfig, GPTConfig)
        train_overrides, model_overrides = configurator.split_overrides(overrides, TrainConfig)
        return train(TrainConfig(**train_overrides), model_overrides)
    except UsageError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
