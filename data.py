"""
Token data: a dataset is a folder with train.bin and val.bin (flat token arrays, uint16 or
uint32) and meta.json (vocab_size, dtype, eos_id, the tokenizer file). The loader draws
random windows of a bin from a seeded generator, so a checkpoint can store the data
position and resume replays the same batches; the memory plan draws the same windows to
measure how many distinct rows a run's batches need.
"""

import json
import os
from dataclasses import dataclass

import numpy as np
import torch

import stem
from configurator import UsageError, is_type

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


def data_dir_of(dataset):
    """A dataset is a folder under data/ (facts, text, ...) or a path to one."""
    return dataset if os.path.isdir(dataset) else os.path.join(DATA_ROOT, dataset)


def load_meta(dataset):
    """The dataset's meta.json, checked with its bins, or a UsageError that says what is
    wrong and how to make it right."""
    data_dir = data_dir_of(dataset)
    prepare = os.path.join(DATA_ROOT, dataset, "prepare.py")
    how = (f"run `python {os.path.relpath(prepare)}`" if os.path.exists(prepare)
           else "prepare it with data/text/prepare.py (see README)")
    missing = [f for f in ("train.bin", "val.bin", "meta.json") if not os.path.exists(os.path.join(data_dir, f))]
    if missing:
        raise UsageError(f"dataset '{dataset}' is missing {', '.join(missing)} in {data_dir}: {how} first")
    path = os.path.join(data_dir, "meta.json")
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise UsageError(f"{path} is not readable JSON ({e}): {how} again") from None
    if not isinstance(meta, dict):
        raise UsageError(f"{path} holds no metadata object: {how} again")
    problems = []
    vocab_size = meta.get("vocab_size")
    if not is_type(vocab_size, int) or vocab_size < 1:
        problems.append(f"vocab_size {vocab_size!r} is not a positive integer")
    if meta.get("dtype") not in ("uint16", "uint32"):
        problems.append(f"dtype {meta.get('dtype')!r} is not uint16 or uint32")
    elif is_type(vocab_size, int) and vocab_size > np.iinfo(meta["dtype"]).max + 1:
        problems.append(f"vocab_size {vocab_size} does not fit dtype {meta['dtype']}")
    eos_id = meta.get("eos_id")
    if eos_id is not None and not (is_type(eos_id, int) and is_type(vocab_size, int) and 0 <= eos_id < vocab_size):
        problems.append(f"eos_id {eos_id!r} is not a token id")
    tokenizer = meta.get("tokenizer")
    if tokenizer and not os.path.isfile(os.path.join(data_dir, tokenizer)):
        problems.append(f"the tokenizer file it names, {tokenizer}, is missing")
    for split in ("train", "val"):
        if not problems:
            size = os.path.getsize(os.path.join(data_dir, f"{split}.bin"))
            itemsize = np.dtype(meta["dtype"]).itemsize
            if size % itemsize:
                problems.append(f"{split}.bin has {size} bytes, not a whole number of {meta['dtype']} tokens "
                                f"(truncated?)")
    if problems:
        raise UsageError(f"dataset '{dataset}' ({data_dir}): {'; '.join(problems)}: {how} again")
    return meta


def read_meta(dataset):
    """The dataset's meta.json, or None when there is none (a dry run can plan without data)."""
    try:
        return load_meta(dataset)
    except UsageError:          # bins missing or incomplete: the bare meta.json still names the vocabulary
        try:
            with open(os.path.join(data_dir_of(dataset), "meta.json")) as f:
                meta = json.load(f)
        except (OSError, ValueError):
            return None
        return meta if isinstance(meta, dict) else None


def tokens(dataset, split, dtype):
    """A split's tokens, mapped (not read)."""
    return np.memmap(os.path.join(data_dir_of(dataset), f"{split}.bin"), dtype=dtype, mode="r")


def tokenizer_json(dataset, meta):
    """The text of the dataset's tokenizer.json, or None for data without one."""
    if not meta.get("tokenizer"):
        return None
    with open(os.path.join(data_dir_of(dataset), meta["tokenizer"])) as f:
        return f.read()


def token_ids_seen(dataset, dtype, vocab_size):
    """The set of token ids in a dataset's train split, or None when it is not on this
    machine."""
    if not os.path.exists(os.path.join(data_dir_of(dataset), "train.bin")):
        return None
    counts = np.bincount(tokens(dataset, "train", dtype), minlength=vocab_size)
    return set(np.flatnonzero(counts).tolist())


# -----------------------------------------------------------------------------
# batches

def draw_windows(data, generator, batch_size, block_size):
    """A micro-batch of random windows, (B, T + 1) tokens (the inputs are [:, :-1], the
    targets [:, 1:])."""
    ix = torch.randint(len(data) - block_size - 1, (batch_size,), generator=generator)
    return np.stack([data[i:i + block_size + 1] for i in ix.tolist()])


@dataclass
class Batch:
    """x, y: (B, T) int64 on the device; row_index: the STEM dedup of x (None for a dense
    model), its ids on the device and their counts on the host."""
    x: torch.Tensor
    y: torch.Tensor
    row_index: stem.RowIndex = None


class BatchLoader:
    """Random windows of a token bin, drawn from a seeded generator.
    The dedup (unique ids + inverse) is done here, on the CPU copy the loader already
    holds: a torch.unique on the GPU would force a host sync every step.
    peek() shows the next batch early (the training step prepares its table rows while
    the current batch computes); state_dict() is the position before any batch not yet
    handed out by next(). Of a torchrun job, rank r of N keeps rows [r B / N, (r + 1) B / N)
    of every batch drawn: the global batch is the seed's, whatever N."""

    def __init__(self, path, dtype, batch_size, block_size, vocab_size, device, seed, with_row_index, rank=0,
                 world_size=1):
        self.path, self.data = path, np.memmap(path, dtype=dtype, mode="r")
        if len(self.data) <= block_size + 1:
            raise UsageError(f"{path} has {len(self.data)} tokens, fewer than block_size + 2")
        self.batch_size, self.block_size, self.vocab_size = batch_size, block_size, vocab_size
        self.device, self.with_row_index = device, with_row_index
        if batch_size % world_size:
            raise UsageError(f"batch_size {batch_size} does not split over {world_size} ranks")
        self.rows = slice(rank * batch_size // world_size, (rank + 1) * batch_size // world_size)
        self.generator = torch.Generator().manual_seed(seed)
        self.pending, self.pending_state = None, None   # the batch peeked at, and the state before it

    def next(self):
        if self.pending is None:
            return self._draw()
        batch, self.pending = self.pending, None
        return batch

    def peek(self):
        if self.pending is None:
            self.pending_state, self.pending = self.generator.get_state(), self._draw()
        return self.pending

    def _draw(self):
        window = draw_windows(self.data, self.generator, self.batch_size, self.block_size)   # (B, T+1)
        window = torch.from_numpy(window[self.rows].astype(np.int64))                 # this rank's rows
        x, y = window[:, :-1], window[:, 1:]                                   # (B, T) each
        row_index = stem.RowIndex.of(x) if self.with_row_index else None
        try:
            stem.check_ids(row_index.unique_ids if row_index else x, self.vocab_size)
        except ValueError as e:
            raise UsageError(f"{self.path}: {e}; was the data prepared with another tokenizer?") from None
        if self.device.startswith("cuda"):
            x, y = x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
            if row_index is not None:
                row_index = row_index.pin_memory().to(self.device, non_blocking=True)
        return Batch(x, y, row_index)

    def reseed(self, seed):
        """Start again from a seed (evaluation reads the same batches every time)."""
        self.generator.manual_seed(seed)
        self.pending = None

    def state_dict(self):
        return {"generator": self.pending_state if self.pending is not None else self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])
        self.pending = None
