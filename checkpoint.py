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

import numpy as np
import torch
from tokenizers import Tokenizer

import tables
from configurator import UsageError
from model import GPT, GPTConfig

KEYS = ("model", "model_config", "train_config", "iter_num", "meta")        # every checkpoint
RESUME_KEYS = ("optimizer", "data", "rng", "best_val_loss", "table_optimizer")   # a resumable one


def path_of(path):
    """The checkpoint file of a run folder (or the file itself)."""
    return os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path


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


def read(path, mmap=False, resume=False):
    """A checkpoint written by train.py (its folder or the file), on the CPU. mmap=True maps
    the file instead of reading it: tensors are read from disk only when used (a sampler
    never touches the optimiser state). resume=True: it must hold a run's full state. A
    missing, truncated or foreign file is a UsageError that says what the file is."""
    ckpt_path = path_of(path)
    if not os.path.exists(ckpt_path):
        raise UsageError(f"no checkpoint at {ckpt_path}: train one with `python train.py` first")
    try:
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
