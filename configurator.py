"""
Everything a user hands the scripts, read and checked in one place: config files and
`--key=value` flags, the knobs' allowed values, the device, dataset folders and checkpoint
files. A mistake raises UsageError, which every script prints as one line `error: ...`.
Imports no script of the project, so that every script can import it.

A knob is declared with its allowed values next to it, and checked whenever its config
dataclass is built (from flags, a config file or code):

    @dataclass
    class TrainConfig:
        batch_size: int = knob(32, ge=1)
        tables: str = knob("resident", choices=("resident", "offload"))

        def __post_init__(self):
            configurator.check(self)
"""

import ctypes
import difflib
import json
import math
import os
import platform
import types
from contextlib import nullcontext
from dataclasses import field, fields

import numpy as np
import torch

DATA_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")


class UsageError(ValueError):
    """A mistake the user can fix (bad key or value, missing or broken file); printed as
    one line without a traceback."""


# -----------------------------------------------------------------------------
# knobs: a dataclass field with its allowed values

def knob(default, *, choices=None, gt=None, ge=None, lt=None, le=None):
    """A config field whose value must be one of `choices` and/or satisfy the bounds
    (gt: >, ge: >=, lt: <, le: <=). Checked by check()."""
    rules = dict(choices=choices, gt=gt, ge=ge, lt=lt, le=le)
    return field(default=default, metadata={k: v for k, v in rules.items() if v is not None})


def check(config):
    """Raise UsageError for a field of the wrong type or outside its declared values."""
    for f in fields(config):
        value, rules = getattr(config, f.name), f.metadata
        if not is_type(value, f.type):
            raise UsageError(f"'{f.name}' expects {f.type.__name__}, got {value!r}")
        if f.type is float and not math.isfinite(value):
            raise UsageError(f"'{f.name}' must be a finite number, got {value}")
        if "choices" in rules and value not in rules["choices"]:
            raise UsageError(f"'{f.name}' must be one of {' | '.join(map(str, rules['choices']))}, got {value!r}")
        for rule, holds, word in (("gt", lambda a, b: a > b, ">"), ("ge", lambda a, b: a >= b, ">="),
                                  ("lt", lambda a, b: a < b, "<"), ("le", lambda a, b: a <= b, "<=")):
            if rule in rules and not holds(value, rules[rule]):
                raise UsageError(f"'{f.name}' must be {word} {rules[rule]}, got {value}")


def is_type(value, typ):
    if typ is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, typ)


# -----------------------------------------------------------------------------
# config files and --key=value flags

def parse_overrides(argv, *config_classes, files_set_other_keys=False):
    """Read config files and --key=value flags into {key: value}, checked against the
    fields of the given dataclasses (names and types; values are checked when the
    dataclass is built). Later arguments win. files_set_other_keys: a config file may set
    keys of other scripts (python model.py reads train.py's config files): skip them."""
    field_types = {f.name: f.type for cls in config_classes for f in fields(cls)}
    overrides = {}

    def set_value(key, value, source):
        if key not in field_types:
            close = difflib.get_close_matches(key, field_types, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"unknown config key '{key}' in {source}{hint}")
        overrides[key] = convert(key, value, field_types[key], source)

    for arg in argv:
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                raise UsageError(f"flags take the form --key=value, got '{arg}'")
            set_value(key, value, "the command line")
        else:
            for key, value in read_config_file(arg).items():
                if key in field_types or not files_set_other_keys:
                    set_value(key, value, arg)
    return overrides


def read_config_file(path):
    """The plain assignments of a Python config file, as {name: value}."""
    if not os.path.isfile(path):
        raise UsageError(f"config file '{path}' not found (flags take the form --key=value)")
    namespace = {}
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
        exec(compile(source, path, "exec"), {"__file__": path}, namespace)
    except SyntaxError as e:
        raise UsageError(f"config file {path}, line {e.lineno}: {e.msg}") from None
    except Exception as e:     # a config file is user code: any failure in it is the user's to fix
        raise UsageError(f"config file {path} failed: {type(e).__name__}: {e}") from None
    return {k: v for k, v in namespace.items() if not k.startswith("_") and not isinstance(v, types.ModuleType)}


def convert(key, value, typ, source):
    """A flag string (or a config file's value) as the field's type, or a UsageError."""
    if isinstance(value, str) and typ is not str:
        text = value.strip().lower()
        try:
            if typ is bool:
                if text not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return text in ("true", "1", "yes")
            return typ(value)
        except ValueError:
            raise UsageError(f"'{key}' expects {typ.__name__}, got '{value}' in {source}") from None
    if not is_type(value, typ):
        raise UsageError(f"'{key}' expects {typ.__name__}, got {value!r} in {source}")
    return float(value) if typ is float else value


def split_overrides(overrides, config_class):
    """(the keys that are fields of config_class, the rest)."""
    names = {f.name for f in fields(config_class)}
    return ({k: v for k, v in overrides.items() if k in names},
            {k: v for k, v in overrides.items() if k not in names})


# -----------------------------------------------------------------------------
# the device, precision and CPU memory

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(device, dtype):
    """('cpu' | 'cuda' | 'cuda:N', 'float32' | 'bfloat16') from the device/dtype knobs."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"device must be {DEVICE_HELP}, got '{device}'")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device} but CUDA is not available; use --device=cpu")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be {' | '.join(DTYPES)}, got '{dtype}'")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if device == "cpu":
        keep_freed_memory()
    return device, dtype


def autocast_context(device, dtype):
    """bf16 autocast with fp32 master weights; plain float32 otherwise."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def keep_freed_memory():
    """CPU memory settings for steps that allocate and free the same large tensors every
    step (the logits and their gradient alone are B*T*vocab floats each).
    - glibc serves blocks over 32 MB with mmap and returns them to the OS on free, so every
      step page-faults them in again (a third of the step at a 32k vocabulary): keep freed
      memory in the heap instead (no mmap for big blocks, no trimming).
    - PyTorch advises the kernel to back its large CPU tensors with 2 MB pages
      (THP_MEM_ALLOC_ENABLE, read at PyTorch's first allocation, so this must run before
      any tensor is made): 512x fewer page faults on new memory, fewer TLB misses.
    Process-wide, Linux/glibc only, numerics unchanged."""
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)     # -1: never give the top of the heap back


# -----------------------------------------------------------------------------
# datasets: a folder with train.bin, val.bin and meta.json (and the tokenizer it names)

def data_dir_of(dataset):
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


# -----------------------------------------------------------------------------
# checkpoints

CHECKPOINT_KEYS = ("model", "model_config", "train_config", "iter_num", "meta")


def read_checkpoint(path, mmap=False):
    """A checkpoint written by train.py (its folder or the file), on the CPU. mmap=True maps
    the file instead of reading it: tensors are read from disk only when used (a sampler
    never touches the optimiser state). A missing, truncated or foreign file is a
    UsageError that says what the file is."""
    ckpt_path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(ckpt_path):
        raise UsageError(f"no checkpoint at {ckpt_path}: train one with `python train.py` first")
    try:
        checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False, mmap=mmap)
    except Exception as e:      # torch.load raises many kinds on a damaged file
        size = os.path.getsize(ckpt_path)
        raise UsageError(f"{ckpt_path} ({size:,} bytes) is not a readable checkpoint, perhaps truncated or "
                         f"not written by train.py ({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
    if not isinstance(checkpoint, dict) or any(k not in checkpoint for k in CHECKPOINT_KEYS):
        raise UsageError(f"{ckpt_path} is a torch file but not a train.py checkpoint (it lacks "
                         f"{[k for k in CHECKPOINT_KEYS if not isinstance(checkpoint, dict) or k not in checkpoint]})")
    return checkpoint, ckpt_path
