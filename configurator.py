"""
What a user hands the scripts: config files, `--key=value` flags and `--help`, read and
checked in one place, and the device and precision they ask for. A mistake raises
UsageError, which every script prints as one line `error: ...`. Imports no other module of
the project, so that every module can import it.

A knob is a config dataclass field declared with its default, its allowed values and its
help, checked whenever the dataclass is built (from flags, a config file or code):

    @dataclass
    class TrainConfig:
        batch_size: int = knob(32, ge=1, help="sequences per micro-batch")
        tables: str = knob("resident", choices=("resident", "offload"), help="where the tables live")

        def __post_init__(self):
            configurator.check(self)
"""

import ctypes
import dataclasses
import difflib
import math
import os
import platform
import shutil
import sys
import textwrap
import types
from contextlib import nullcontext
from dataclasses import field, fields

import torch


class UsageError(ValueError):
    """A mistake the user can fix (bad key or value, missing or broken file); printed as
    one line without a traceback."""


# -----------------------------------------------------------------------------
# knobs: a dataclass field with its allowed values and its help

def knob(default, *, help, choices=None, gt=None, ge=None, lt=None, le=None, section=None):
    """A config field whose value must be one of `choices` and/or satisfy the bounds
    (gt: >, ge: >=, lt: <, le: <=), checked by check(). help: one line for --help;
    section: a heading that --help prints before this field (the first of a group)."""
    if not help:
        raise TypeError("every knob needs its help")
    rules = dict(choices=choices, gt=gt, ge=ge, lt=lt, le=le)
    meta = {k: v for k, v in rules.items() if v is not None}
    meta.update(help=help, section=section)
    return field(default=default, metadata=meta)


def knobs(config_class):
    """The fields of a config class that are set by flags (nested configs excluded)."""
    return [f for f in fields(config_class) if "help" in f.metadata]


def check(config):
    """Raise UsageError for a field of the wrong type or outside its declared values."""
    for f in knobs(type(config)):
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
# config files, --key=value flags and --help

def parse(argv, *config_classes, doc="", files_set_other_keys=False):
    """parse_overrides, after printing the help and exiting when argv asks for it."""
    if any(a in ("-h", "--help") for a in argv):
        print_help(doc, *config_classes)
        sys.exit(0)
    return parse_overrides(argv, *config_classes, files_set_other_keys=files_set_other_keys)


def parse_overrides(argv, *config_classes, files_set_other_keys=False):
    """Read config files and --key=value flags into {key: value}, checked against the
    knobs of the given dataclasses (names and types; values are checked when the
    dataclass is built). Later arguments win. files_set_other_keys: a config file may set
    keys of other scripts (python model.py reads train.py's config files): skip them."""
    field_types = {f.name: f.type for cls in config_classes for f in knobs(cls)}
    overrides = {}

    def set_value(key, value, source):
        if key not in field_types:
            close = difflib.get_close_matches(key, field_types, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise UsageError(f"unknown config key '{key}' in {source}{hint} (--help lists them)")
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


def print_help(doc, *config_classes):
    """The script's docstring, then every knob: --name=default, its help, its allowed values."""
    width = min(100, shutil.get_terminal_size((100, 20)).columns)
    print(textwrap.dedent(doc).strip())
    print("\nConfig files (Python files of plain assignments) and --key=value flags set these; later ones win.")
    for cls in config_classes:
        for f in knobs(cls):
            if f.metadata.get("section"):
                print(f"\n{f.metadata['section']}:")
            rules = [" | ".join(map(str, f.metadata["choices"]))] if "choices" in f.metadata else []
            rules += [f"{word} {f.metadata[r]}" for r, word in (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
                      if r in f.metadata]
            text = f.metadata["help"] + (f" [{'; '.join(rules)}]" if rules else "")
            default = f'"{f.default}"' if isinstance(f.default, str) and " " in f.default else f.default
            head = f"  --{f.name}={default}"        # quoted when it has spaces: copy it to a shell as is
            lines = textwrap.wrap(text, width - 34) or [""]
            print(f"{head:<33} {lines[0]}" if len(head) < 33 else f"{head}\n{'':<33} {lines[0]}")
            for line in lines[1:]:
                print(f"{'':<33} {line}")


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


def split_overrides(overrides, *config_classes):
    """The overrides as one dict per config class (by its knobs), then a dict of the rest."""
    out, rest = [], dict(overrides)
    for cls in config_classes:
        names = {f.name for f in knobs(cls)}
        out.append({k: v for k, v in rest.items() if k in names})
        rest = {k: v for k, v in rest.items() if k not in names}
    return (*out, rest)


def build(config_class, **values):
    """config_class(**values), its own checks of the values turned into a UsageError."""
    try:
        return config_class(**values)
    except UsageError:
        raise
    except ValueError as e:
        raise UsageError(str(e)) from None


def flat(config):
    """A config dataclass as one flat {knob: value}, nested configs' knobs included."""
    out = {}
    for f in fields(config):
        value = getattr(config, f.name)
        out.update(flat(value) if dataclasses.is_dataclass(value) else {f.name: value})
    return out


# -----------------------------------------------------------------------------
# the device and precision

DEVICE_HELP = "auto | cpu | cuda | cuda:N"
DTYPES = ("auto", "float32", "bfloat16")


def resolve_device(device, dtype, need_cuda=True):
    """('cpu' | 'cuda' | 'cuda:N', 'float32' | 'bfloat16') from the device/dtype knobs.
    need_cuda=False: a CUDA device is fine without CUDA (a dry run plans a GPU run anywhere)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not (device == "cpu" or device == "cuda" or (device.startswith("cuda:") and device[5:].isdigit())):
        raise UsageError(f"device must be {DEVICE_HELP}, got '{device}'")
    if need_cuda and device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"device={device} but CUDA is not available; use --device=cpu")
    if dtype not in DTYPES:
        raise UsageError(f"dtype must be {' | '.join(DTYPES)}, got '{dtype}'")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return device, dtype


def autocast_context(device, dtype):
    """bf16 autocast with fp32 master weights; plain float32 otherwise."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16)
    return nullcontext()


def keep_freed_memory(device, enabled):
    """CPU memory settings for steps that allocate and free the same large tensors every
    step (the logits and their gradient alone are B*T*vocab floats each); the opt-in of
    --cpu_keep_freed_memory. A CPU speed setting only: a GPU run's big tensors are on the GPU.
    - glibc serves blocks over 32 MB with mmap and returns them to the OS on free, so every
      step page-faults them in again: keep freed memory in the heap instead (no mmap for
      big blocks, no trimming).
    - PyTorch advises the kernel to back its large CPU tensors with 2 MB pages
      (THP_MEM_ALLOC_ENABLE, read at PyTorch's first allocation, so this must run before
      any tensor is made).
    Process-wide, Linux/glibc only, numerics unchanged. Does nothing unless enabled on the CPU."""
    if device != "cpu" or not enabled:
        return
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    libc = ctypes.CDLL("libc.so.6")
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    libc.mallopt(M_MMAP_MAX, 0)
    libc.mallopt(M_TRIM_THRESHOLD, -1)     # -1: never give the top of the heap back
