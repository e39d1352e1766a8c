"""
More than one process: `torchrun --nproc_per_node=N train.py ...`.

The backbone trains under FSDP2 (`fully_shard` per block and at the root): parameters,
gradients and AdamW moments are sharded, which is what a 1B backbone on 24 GB cards needs
(DDP would hold all of them on every rank). The STEM tables stay out of FSDP: they are
sharded by vocabulary (shards.py), each row owned by one rank. The global batch and its
order depend on the seed only; rank r trains on rows [r * B / N, (r + 1) * B / N) of every
micro-batch. NCCL on GPUs, gloo on the CPU. One process without torchrun runs as before:
nothing here is touched.
"""

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from configurator import UsageError

MIN_TORCH = (2, 7)      # fully_shard with ignored_params, gloo all_to_all_single with uneven splits


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int

    @property
    def is_main(self):
        return self.rank == 0


def launched_size():
    """The world size torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def torch_version():
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def init(device):
    """This process's place in the torchrun job (None for one process), read from the
    environment; joining the job's process group waits for join()."""
    world_size = launched_size()
    if world_size == 1:
        return None
    if torch_version() < MIN_TORCH:
        raise UsageError(f"distributed runs need torch >= {'.'.join(map(str, MIN_TORCH))} (fully_shard with "
                         f"ignored_params, gloo all_to_all_single with uneven splits); this is {torch.__version__}")
    return World(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))


def join(world, device, timeout_s):
    """Join the job's process group (NCCL on GPUs, gloo on the CPU). Collectives time out
    after timeout_s, so that a rank that died ends the job instead of hanging it."""
    if world is None:
        return
    # on GPUs NCCL, with gloo beside it for CPU tensors (offloaded tables' shards in a checkpoint)
    backend = "cpu:gloo,cuda:nccl" if device.startswith("cuda") else "gloo"
    if device.startswith("cuda"):
        torch.cuda.set_device(world.local_rank)
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))


def device_of(world, device):
    """cuda -> cuda:local_rank under torchrun."""
    if world is not None and device.startswith("cuda"):
        return f"cuda:{world.local_rank}"
    return device


def mean(value, world):
    """The mean of a float over ranks (every rank gets it)."""
    if world is None:
        return value
    t = torch.tensor([float(value)], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / world.world_size


@contextlib.contextmanager
def in_turn(world):
    """The ranks run the body one after another (building: each holds the whole table on
    its host for a moment, then only its rows)."""
    if world is None:
        yield
        return
    for _ in range(world.rank):
        dist.barrier()
    yield
    for _ in range(world.rank, world.world_size):
        dist.barrier()


def first_of(value, world):
    """The least non-negative int over ranks, -1 where no rank has one (a rank's first
    diverged step: every rank stops at the same one)."""
    if world is None:
        return value
    none = 1 << 62
    t = torch.tensor([value if value >= 0 else none], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return -1 if t.item() == none else t.item()


def error_line(message):
    """The error line of this process, or None: outside torchrun, the message; in a job,
    before it is joined, rank 0's alone (a bad flag or file is bad on every rank); after,
    every failing rank's, with its rank (what fails there is the rank's own)."""
    rank = os.environ.get("RANK")
    if rank is None or not dist.is_initialized():
        return f"error: {message}" if rank in (None, "0") else None
    return f"error: rank {rank}: {message}"


def shard_backbone(model, world):
    """FSDP2 over the backbone: one unit per block, the rest (embeddings, final norm, the
    tied head) at the root. The STEM tables are left out (they are sharded by rows)."""
    from torch.distributed.fsdp import fully_shard
    ignored = set(model.tables.parameters()) if model.tables is not None else set()
    for block in model.blocks:
        fully_shard(block, ignored_params=ignored & set(block.parameters()) or None)
    fully_shard(model, ignored_params=ignored or None)
    return model


# -----------------------------------------------------------------------------
# checkpoints of a job: torch.distributed.checkpoint, resharded on load

def mesh_of(world, tensor):
    """The 1-D mesh of the tensor's device type that a table shard is a DTensor on (made once
    per type: an offloaded shard lives in host memory)."""
    meshes = world.__dict__.setdefault("meshes", {})
    if tensor.device.type not in meshes:
        from torch.distributed.device_mesh import init_device_mesh
        meshes[tensor.device.type] = init_device_mesh(tensor.device.type, (world.world_size,))
    return meshes[tensor.device.type]


def sharded_state(model, optimizer, extra, world, device, rng_keys=None):
    """What a job's checkpoint holds: the backbone's and its optimiser's FSDP shards, the
    tables' shards (shards.ShardedTables.sharded_state), `extra` (configs, step, data
    position: the same on every rank) and each rank's RNG state under rng.<rank>."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    with backbone_only(model):
        state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer),
                 "extra": extra}
    import checkpoint
    for key in rng_keys or [f"rng.{world.rank}"]:
        state[key] = checkpoint.rng_state()     # the saved one replaces it on load
    if model.tables is not None:
        state["tables"] = model.tables.sharded_state(lambda t: mesh_of(world, t))
    return state


def load_backbone(model, optimizer, model_state, optimizer_state, whole):
    """The backbone and its optimiser from a checkpoint's states: this job's shards, or
    (whole=True) one process's full tensors, each rank keeping its shards."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    with backbone_only(model):
        set_model_state_dict(model, {k: v for k, v in model_state.items() if not k.startswith("tables.")},
                             options=StateDictOptions(full_state_dict=whole))
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=whole))


@contextlib.contextmanager
def backbone_only(model):
    """The model without its tables, for torch.distributed.checkpoint.state_dict (which
    would look for the tables' rows as parameters; they are the shards' own state)."""
    tables, model.tables = model.tables, None
    try:
        yield model
    finally:
        model.tables = tables


def any_rank(flag, world):
    """Whether flag is true on any rank."""
    if world is None:
        return flag
    t = torch.tensor([int(bool(flag))])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def finish():
    """Leave the job's process group (if this process joined one)."""
    if dist.is_initialized():
        dist.destroy_process_group()
