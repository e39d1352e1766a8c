"""
Checkpoints: one file, ckpt.pt, in a run's out_dir, holding everything a run needs to
continue exactly (model, both optimisers, data position, every RNG) and everything a
sampler needs without the data folder (model config, tokenizer, dataset meta).

- save(): atomic (a temporary file, flushed to disk, renamed over the old one);
  non_finite() finds the weights a save must refuse.
- read(): a checkpoint file or its folder, validated, optionally mapped (not read).
- rng_state() / set_rng_state(): the RNGs a resumed run must continue from.
- load_model(): a ready model for sampling, evaluation and analysis, built from the mapped
  file so that nothing is allocated twice and the optimiser moments are never read.
"""

import os
import random
import shutil
import warnings

import numpy as np
import torch
from tokenizers import Tokenizer

import tables
from configurator import UsageError
from model import GPT, GPTConfig

KEYS = ("model", "model_config", "train_config", "iter_num", "meta")        # every checkpoint
RESUME_KEYS = ("optimizer", "data", "rng", "best_val_loss", "table_optimizer")   # a resumable one


SHARDED = "ckpt.dcp"     # a torchrun job's checkpoint: a torch.distributed.checkpoint folder


def path_of(path):
    """The checkpoint of a run folder (ckpt.pt, or the sharded ckpt.dcp of a torchrun job;
    ckpt.dcp.old if a job died while swapping it in), or the path itself."""
    if not os.path.isdir(path) or path.endswith((SHARDED, SHARDED + ".old")):
        return path
    for name in ("ckpt.pt", SHARDED, SHARDED + ".old"):
        if os.path.exists(os.path.join(path, name)):
            return os.path.join(path, name)
    return os.path.join(path, "ckpt.pt")


def is_sharded(path):
    return os.path.isdir(path_of(path))


# elements checked at a time: torch.isfinite makes a float copy (abs) and three masks, 7 bytes
# an fp32 entry, so a whole table at once would cost 1.75x the table
FINITE_CHUNK = 1 << 22


def non_finite(state_dict):
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    bad = []
    for name, t in state_dict.items():
        if t.is_floating_point():
            flat = t.reshape(-1)
            chunks = [flat[i:i + FINITE_CHUNK].isfinite().all() for i in range(0, flat.numel(), FINITE_CHUNK)]
            if chunks and not bool(torch.stack(chunks).all()):       # one host sync per tensor
                bad.append(name)
    return bad


def save(state, path):
    """Write to a temp file, flush it to disk, then rename over the old checkpoint: a crash
    mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    shutil.rmtree(os.path.join(os.path.dirname(path), SHARDED), ignore_errors=True)   # a sharded one is older now


def save_sharded(state, out_dir, is_main):
    """A torchrun job's checkpoint, every rank writing its shards (torch.distributed.
    checkpoint) into ckpt.dcp.tmp; rank 0 then swaps it in for ckpt.dcp (the old one kept
    as ckpt.dcp.old until the new one is in place) and removes an older ckpt.pt."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    final = os.path.join(out_dir, SHARDED)
    tmp, old = final + ".tmp", final + ".old"
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    dist.barrier()
    dcp.save(state, checkpoint_id=tmp)
    dist.barrier()
    if is_main:
        if os.path.exists(final):
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(os.path.join(out_dir, "ckpt.pt")):
            os.remove(os.path.join(out_dir, "ckpt.pt"))
    dist.barrier()


def load_sharded(targets, path):
    """Fill targets (the job's own sharded state: DTensors of this world size) from a
    sharded checkpoint written at any world size: torch.distributed.checkpoint reads the
    ranges each rank needs."""
    import torch.distributed.checkpoint as dcp
    stored = dcp.FileSystemReader(path_of(path)).read_metadata().state_dict_metadata
    targets = fit_to_saved(targets, stored)
    dcp.load(targets, checkpoint_id=path_of(path))
    return targets


def fit_to_saved(state, stored, prefix=""):
    """state with each plain tensor whose saved size differs (a history that grows with
    the steps, as catch-up's) replaced by an empty one of the saved size, to be filled."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.tensor import DTensor
    if isinstance(state, dict):
        return {k: fit_to_saved(v, stored, f"{prefix}{k}.") for k, v in state.items()}
    saved = stored.get(prefix[:-1])
    if (isinstance(state, torch.Tensor) and not isinstance(state, DTensor) and isinstance(saved, TensorStorageMetadata)
            and tuple(saved.size) != tuple(state.shape)):
        return torch.empty(saved.size, dtype=saved.properties.dtype)
    return state


def sharded_has(path, key):
    """Whether a sharded checkpoint holds a top-level key."""
    import torch.distributed.checkpoint as dcp
    keys = dcp.FileSystemReader(path_of(path)).read_metadata().state_dict_metadata
    return any(k == key or k.startswith(key + ".") for k in keys)


def read_sharded_extra(path):
    """The configs, step and meta of a sharded checkpoint, without reading its tables."""
    return _read_sharded(path, keys={"extra"})["extra"]


def _read_sharded(path, keys=None):
    """A sharded checkpoint's top-level keys (all if None) read whole in one process (the
    loader torch's own dcp_to_torch_save uses)."""
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    with warnings.catch_warnings():         # "assuming the intent is to load in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        return _load_state_dict_from_keys(keys, checkpoint_id=path_of(path))


def read_sharded_whole(path):
    """A sharded checkpoint read whole in one process, in one process's format: the
    tables' rows in id order, the job's rank-0 RNG state. Its optimiser state is keyed by
    parameter names (training.restore_optimizer takes either kind)."""
    import shards
    state = _read_sharded(path)
    out = dict(state["extra"])
    out["model"], out["optimizer"], out["rng"] = dict(state["model"]), state["optimizer"], state["rng.0"]
    out["table_optimizer"] = None
    if "tables" in state:
        owner_map = shards.OwnerMap(out["model_config"]["vocab_size"], 1)
        whole = shards.unpermute(state["tables"], owner_map)
        out["model"]["tables.weight"], out["table_optimizer"] = whole["weight"], whole["optimizer"]
    return out


def read(path, mmap=False, resume=False):
    """A checkpoint written by train.py (its folder or the file), on the CPU. mmap=True maps
    the file instead of reading it: tensors are read from disk only when used (a sampler
    never touches the optimiser state). resume=True: it must hold a run's full state. A
    missing, truncated or foreign file is a UsageError that says what the file is."""
    ckpt_path = path_of(path)
    if not os.path.exists(ckpt_path):
        raise UsageError(f"no checkpoint at {ckpt_path}: train one with `python train.py` first")
    try:
        if os.path.isdir(ckpt_path):
            checkpoint = read_sharded_whole(ckpt_path)
        else:
            checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:      # torch.load raises many kinds on a damaged file
        size = os.path.getsize(ckpt_path)
        raise UsageError(f"{ckpt_path} ({size:,} bytes) is not a readable checkpoint, perhaps truncated or "
                         f"not written by train.py ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    lacks = [k for k in KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]
    if lacks:
        raise UsageError(f"{ckpt_path} is a torch file but not a train.py checkpoint (it lacks {lacks})")
    lacks = [k for k in RESUME_KEYS if k not in checkpoint] if resume else []
    if lacks:
        raise UsageError(f"{ckpt_path} cannot be resumed from: it lacks {lacks}")
    return checkpoint


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
# mapped loading, for sample.py, eval.py, analyze.py

def load_model(path, device="cpu", need_tokenizer=True, tables_at="resident", cache_fraction=0.1, batch_size=1,
               dtype="float32"):
    """(model, tokenizer) of a checkpoint written by train.py (its folder or the file): the
    model in eval mode on `device`, the tokenizer it was trained with (stored inside the
    checkpoint, so the data folder is not needed; None for data without one when
    need_tokenizer=False). tables_at="offload" keeps the STEM tables in host memory with an
    LFU cache of cache_fraction * vocab rows on the device.

    The checkpoint is mapped, not read, and the model is built on the meta device and
    given the mapped tensors: nothing is allocated twice, and the optimiser moments (most
    of a training checkpoint) are never touched. Only the backbone (and, resident, the
    tables) moves to the device; offloaded tables never go there whole."""
    checkpoint = read(path, mmap=True)
    config = GPTConfig.from_dict(checkpoint["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(checkpoint["model"], assign=True)
    if config.tie_embeddings:       # assign gives each name its own parameter: tie them again
        model.lm_head.weight = model.wte.weight
    model.reset_rope()
    if checkpoint["tokenizer_json"] is None and need_tokenizer:
        raise UsageError(f"{path_of(path)} was trained on data without a tokenizer; cannot decode text")
    model.eos_id = checkpoint["meta"]["eos_id"]
    model.dataset, model.data_dtype = checkpoint["train_config"]["dataset"], checkpoint["meta"]["dtype"]
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer_json"]) if checkpoint["tokenizer_json"] else None
    if tables_at == "offload" and model.tables is not None:
        offload_for_inference(model, device, cache_fraction, batch_size, dtype)     # before anything moves
    return model.to(device).eval(), tokenizer


def offload_for_inference(model, device, cache_fraction, batch_size=1, dtype="float32"):
    """Move the model's STEM tables to host memory with an LFU cache of
    cache_fraction * vocab rows on the device (rows in the compute dtype)."""
    vocab_size = model.config.vocab_size
    cache_rows = max(1, int(cache_fraction * vocab_size))
    transient_rows = min(batch_size * model.config.block_size, vocab_size)   # one prefill's worth
    return tables.use_lazy_tables(model, device, cache_rows, transient_rows, training=False,
                                  dtype=getattr(torch, dtype))
