"""
Prove a refactor by bits: train the same jobs with the code of an earlier commit and with
the working tree, at the same thread counts, and compare every tensor of the checkpoints.

    python tools/check_bits.py --base=COMMIT                      # the three jobs, 1 and 2 threads
    python tools/check_bits.py --base=COMMIT --jobs=default --threads=1

The earlier commit is checked out into a temporary folder (`git archive`), each tree
prepares its own facts corpus (the bins are compared too), and both run `python train.py`
with OMP_NUM_THREADS set. Checkpoints are flattened into {path: tensor}; KEY_MAP renames
the paths of the working tree's layout to the base's where a non-tensor key moved. Every
tensor of either side must have a partner that is torch.equal to it. Exit status 1 if any
differs. UNSEEDED lists entries that differ between any two processes of the base itself
(numpy's global generator is seeded from the OS at import, and nothing draws from it);
they are reported, not compared.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSEEDED = ("rng/numpy/",)
JOBS = {
    "default": ["--max_iters=200"],
    "offload": ["--tables=offload", "--table_optimizer=adamw_catchup", "--table_cache_fraction=0.05",
                "--max_iters=200"],
    "lazy": ["--table_optimizer=lazy_adamw", "--max_iters=200"],
}


def key_map(path, checkpoint, base_paths):
    """A path of the working tree's checkpoint -> the base's path of the same tensor.
    Dense-AdamW tables keep their moments in their own optimiser (table_optimizer) where
    a base before that layout kept them in the backbone's AdamW as its last parameter."""
    parts = path.split("/")
    if parts[:3] == ["table_optimizer", "adamw", "state"] and path not in base_paths:
        last = len(checkpoint["optimizer"]["state"])            # the backbone's parameters come first
        return "/".join(["optimizer", "state", str(last)] + parts[4:])
    return path


def flatten(value, prefix=""):
    """{path: tensor} of every tensor (and numpy array) inside nested dicts, lists, tuples."""
    out = {}
    if isinstance(value, torch.Tensor):
        out[prefix] = value
    elif isinstance(value, np.ndarray):
        out[prefix] = torch.from_numpy(value.copy())
    elif isinstance(value, dict):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}/{i}" if prefix else str(i)))
    return out


def run(tree, args, out_dir, threads):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONHASHSEED="0")
    cmd = [sys.executable, "train.py", f"--out_dir={out_dir}", "--device=cpu"] + args
    result = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} in {tree} failed:\n{result.stderr[-2000:]}")


def digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def compare(new_path, old_path):
    new = torch.load(new_path, map_location="cpu", weights_only=False)
    old = torch.load(old_path, map_location="cpu", weights_only=False)
    new_flat, old_flat = flatten(new), flatten(old)
    mapped = {key_map(path, new, old_flat): tensor for path, tensor in new_flat.items()}
    missing = sorted(set(old_flat) - set(mapped))
    extra = sorted(set(mapped) - set(old_flat))
    differ = [p for p in mapped if p in old_flat and not p.startswith(UNSEEDED)
              and not (mapped[p].dtype == old_flat[p].dtype and torch.equal(mapped[p], old_flat[p]))]
    return len(mapped), missing, extra, differ


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit whose checkpoints are the reference")
    parser.add_argument("--jobs", default=",".join(JOBS), help=f"comma-separated, of {', '.join(JOBS)}")
    parser.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS values")
    parser.add_argument("--work_dir", default="", help="keep the runs here (default: a temporary folder)")
    a = parser.parse_args()
    jobs = [j for j in a.jobs.split(",") if j]
    unknown = [j for j in jobs if j not in JOBS]
    if unknown:
        sys.exit(f"error: unknown job {unknown[0]!r}; jobs are {', '.join(JOBS)}")
    work = a.work_dir or tempfile.mkdtemp(prefix="check_bits_")
    os.makedirs(work, exist_ok=True)
    base_tree = os.path.join(work, "base")
    if not os.path.isdir(base_tree):
        os.makedirs(base_tree)
        archive = subprocess.run(["git", "archive", a.base], cwd=ROOT, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", base_tree], input=archive, check=True)
    for tree in (base_tree, ROOT):
        subprocess.run([sys.executable, "data/facts/prepare.py"], cwd=tree, check=True, capture_output=True)
    for name in ("train.bin", "val.bin", "meta.json"):
        same = digest(os.path.join(base_tree, "data/facts", name)) == digest(os.path.join(ROOT, "data/facts", name))
        print(f"data/facts/{name}: {'identical' if same else 'DIFFERS'}")
    failed = False
    for job in jobs:
        for threads in (int(t) for t in a.threads.split(",")):
            outs = {}
            for side, tree in (("base", base_tree), ("new", ROOT)):
                outs[side] = os.path.join(work, f"{job}-{threads}-{side}")
                run(tree, JOBS[job], outs[side], threads)
            n, missing, extra, differ = compare(os.path.join(outs["new"], "ckpt.pt"),
                                                os.path.join(outs["base"], "ckpt.pt"))
            ok = not (missing or extra or differ)
            failed |= not ok
            print(f"{job:<8} threads {threads}: {n} tensors, "
                  + ("all torch.equal (but the unseeded " + ", ".join(UNSEEDED) + ")" if ok else
                     f"{len(differ)} differ {differ[:3]}, missing {missing[:3]}, extra {extra[:3]}"), flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
