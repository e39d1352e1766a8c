"""
STEM tables sharded by vocabulary across the ranks of a torchrun job.

Each rank owns a fixed set of token ids and holds only their rows, in a table source of
its own (stem.ResidentTables under dense AdamW, or tables.LazyTables resident or offloaded
with its own LFU cache): the math of a step is the one-process math, only the rows come
from their owners. The owner map is a fixed permutation of the ids (seeded, the same at
every world size) cut into contiguous ranges, torch.chunk-sized: the Zipf head spreads
evenly over ranks, and a checkpoint of the table in permuted order reshards by ranges.

A micro-batch on rank r, for its unique ids (deduplicated on the CPU by the loader):

    prepare   ids -> owners (all_to_all_single of counts, then of ids, uneven splits);
              each owner dedups what it received and prepares those rows in its source
    lookup    owners read their rows and send them back (all_to_all_single): a row crosses
              the wire once per requesting rank per micro-batch
    backward  each requester sends its rows' gradients back the same way; the owner's
              gather sums them (index_add over requesters): each row's gradient is reduced
              exactly once, then scaled by 1 / world_size as the backbone's average is
    step      the clip norm is global: one all-reduce of the squared norm of every shard

Every call is a collective: all ranks prepare, look up, step and flush in the same order
(the training loop runs the same steps on every rank, each on its slice of the batch).
"""

import math

import torch
import torch.distributed as dist

import lazy_adamw
import stem
import tables as lazy_tables


class OwnerMap:
    """Token id -> (owning rank, row in that rank's shard). The ids are laid out in a
    permutation seeded by `seed` alone; rank r owns positions [r * chunk, (r + 1) * chunk)
    with chunk = ceil(vocab / world), as torch.chunk and a Shard(0) DTensor cut them."""

    def __init__(self, vocab_size, world_size, seed=0):
        self.vocab_size, self.world_size = vocab_size, world_size
        self.order = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(seed))  # position -> id
        self.position = torch.empty_like(self.order)
        self.position[self.order] = torch.arange(vocab_size)                                  # id -> position
        self.chunk = math.ceil(vocab_size / world_size)
        self.bounds = [min(r * self.chunk, vocab_size) for r in range(world_size + 1)]

    def owner(self, ids):
        return self.position[ids] // self.chunk

    def local(self, ids):
        """Each id's row in its owner's shard."""
        return self.position[ids] % self.chunk

    def owned(self, rank):
        """The ids rank owns, in the order of its shard's rows."""
        return self.order[self.bounds[rank]:self.bounds[rank + 1]]

    def rows_served(self, id_counts):
        """Rows each rank serves, given how often each id is requested: (world,) counts."""
        counts = torch.as_tensor(id_counts, dtype=torch.float64)
        return torch.zeros(self.world_size, dtype=torch.float64).index_add_(0, self.owner(torch.arange(len(counts))),
                                                                            counts)


def exchange(tensor, send_splits, recv_splits, group):
    """all_to_all_single with uneven splits along dim 0: send_splits[r] rows go to rank r,
    recv_splits[r] rows come from it."""
    out = tensor.new_empty((sum(recv_splits),) + tuple(tensor.shape[1:]))
    dist.all_to_all_single(out, tensor.contiguous(), recv_splits, send_splits, group=group)
    return out


class RowExchange(torch.autograd.Function):
    """Owners' rows (R, n_stem, d_ff) -> the requesters' rows; backward sends the rows'
    gradients back to their owners, scaled by 1 / world_size (the backbone's average)."""

    @staticmethod
    def forward(ctx, owned_rows, send_splits, recv_splits, group):
        # owned_rows answer the ids this rank received, in the order it received them
        ctx.splits, ctx.group = (send_splits, recv_splits), group
        return exchange(owned_rows, send_splits, recv_splits, group)

    @staticmethod
    def backward(ctx, grad_rows):
        send_splits, recv_splits = ctx.splits
        grad = exchange(grad_rows, recv_splits, send_splits, ctx.group)
        return grad / dist.get_world_size(ctx.group), None, None, None


class ShardedTables(torch.nn.Module):
    """The table-source interface over shards: `local` is this rank's source over the
    rows owner_map.owned(rank) (in that order). A batch's exchange is keyed by its
    RowIndex, like a table source's plans."""

    def __init__(self, local, owner_map, row_shape, device, group=None):
        super().__init__()
        self.local, self.owner_map, self.group = local, owner_map, group
        self.row_shape, self.device = tuple(row_shape), torch.device(device)
        self.rank, self.world_size = dist.get_rank(group), dist.get_world_size(group)
        self.exchanges = {}       # id(row_index) -> (row_index, its Exchange plan)
        self.stats = {"id_bytes": 0, "row_bytes": 0}      # put on the wire by this rank (not to itself)

    def numel(self):
        """Elements of the whole table (all shards), as model.num_params counts them."""
        return self.owner_map.vocab_size * math.prod(self.row_shape)

    def _plan(self, row_index):
        """Send this batch's unique ids to their owners; receive the ids others ask of us
        (deduplicated into a RowIndex of our shard's rows)."""
        ids, counts = row_index.ids_on_host()
        ids = torch.from_numpy(ids)
        owners = self.owner_map.owner(ids)
        order = torch.argsort(owners, stable=True)                # requests grouped by owner
        send_splits = torch.bincount(owners, minlength=self.world_size)
        recv_splits = torch.empty_like(send_splits)
        dist.all_to_all_single(recv_splits, send_splits, group=self.group)
        send_splits, recv_splits = send_splits.tolist(), recv_splits.tolist()
        received = exchange(self.owner_map.local(ids[order]), send_splits, recv_splits, self.group)   # (R,)
        received_counts = exchange(torch.as_tensor(counts)[order], send_splits, recv_splits, self.group)
        local_ids, inverse = torch.unique(received, sorted=True, return_inverse=True)
        local_counts = torch.zeros(len(local_ids), dtype=received_counts.dtype).index_add_(0, inverse, received_counts)
        device = row_index.unique_ids.device
        local_index = stem.RowIndex(local_ids.to(device), inverse.to(device), local_counts, local_ids)
        self.stats["id_bytes"] += 2 * 8 * (sum(send_splits) - send_splits[self.rank])      # ids and counts
        return {"order": order.to(device), "send": send_splits, "recv": recv_splits, "local": local_index}

    def prepare(self, row_index):
        key = id(row_index)
        if key not in self.exchanges:
            plan = self._plan(row_index)
            self.exchanges[key] = (row_index, plan)
            self.local.prepare(plan["local"])

    def lookup(self, row_index):
        """(U, n_stem, d_ff) rows of row_index.unique_ids, from their owners."""
        key = id(row_index)
        _, plan = self.exchanges.pop(key) if key in self.exchanges else (row_index, self._plan(row_index))
        local = plan["local"]
        owned = self.local.lookup(local)                                     # (U_local, n_stem, d_ff)
        answers = owned.index_select(0, local.inverse)                       # (R, ...): backward sums requesters
        remote = sum(plan["recv"]) - plan["recv"][self.rank]                 # answers for the other ranks
        # the rows go out now, and (training) their gradients come back: one row's bytes each way
        self.stats["row_bytes"] += remote * math.prod(self.row_shape) * answers.element_size() * (1 + torch.is_grad_enabled())
        rows = RowExchange.apply(answers, plan["recv"], plan["send"], self.group)   # (U, ...) grouped by owner
        return rows.index_select(0, torch.argsort(plan["order"]))          # back to unique-id order

    def step(self, lr, max_norm=0.0):
        return self.local.step(lr, max_norm, all_reduce=self._all_reduce)

    def _all_reduce(self, tensor):
        dist.all_reduce(tensor, group=self.group)
        return tensor

    def flush(self):
        self.local.flush()

    def release(self):
        if hasattr(self.local, "release"):
            self.local.release()

    @torch.no_grad()
    def read_rows(self, ids):
        """Rows of ids (K, n_stem, d_ff) on every rank (a collective: each owner gives its own)."""
        ids = torch.as_tensor(ids, dtype=torch.long)
        mine = self.owner_map.owner(ids) == self.rank
        rows = torch.zeros((len(ids),) + self.row_shape, device=self.device)
        if mine.any():
            rows[mine.to(rows.device)] = self.local.read_rows(self.owner_map.local(ids[mine])).to(rows)
        dist.all_reduce(rows, group=self.group)            # one owner wrote each row, the rest zeros
        return rows

    # -- checkpoints: the shard's state, as one process's at the shard's rows ------------------

    def local_state(self):
        """{"weight", "optimizer"}: this shard's weights and its source's optimiser state,
        in one process's format over the shard's rows (in owner_map.owned order)."""
        weight = self.local.tensors()["weight"] if hasattr(self.local, "tensors") else self.local.weight.detach()
        return {"weight": weight, "optimizer": self.local.optimizer_state()}

    def load_local_state(self, state):
        state = int_keys(state)
        with torch.no_grad():
            if hasattr(self.local, "load_tensors"):
                self.local.load_tensors({"weight": state["weight"]})
            else:
                self.local.weight.copy_(state["weight"])
        self.local.load_optimizer_state(state["optimizer"])

    def sharded_state(self, mesh_of):
        """local_state with every per-row tensor a DTensor: the shard of a table in the
        owner map's permuted order, which torch.distributed.checkpoint reshards by ranges."""
        from torch.distributed.tensor import DTensor, Shard
        vocab_size = self.owner_map.vocab_size

        def as_dtensor(t):
            shape = torch.Size((vocab_size,) + tuple(t.shape[1:]))
            return DTensor.from_local(t, mesh_of(t), [Shard(0)], run_check=False, shape=shape,
                                      stride=torch.empty(shape, device="meta").stride())
        return map_rows(self.local_state(), as_dtensor)

    def load_sharded_state(self, state):
        self.load_local_state(map_rows(state, lambda t: t.to_local()))

    def load_full_state(self, state):
        """From one process's format over the whole table (rows in id order): take ours."""
        owned = self.owner_map.owned(self.rank)
        self.load_local_state(map_rows(state, lambda t: t.index_select(0, owned.to(t.device))))

    def optimizer_state(self):
        return self.local.optimizer_state()

    def load_optimizer_state(self, state):
        self.local.load_optimizer_state(state)


# -----------------------------------------------------------------------------
# bytes on the wire, for the bench (and a test that holds the exchange's own count to them)

def exchange_bytes(slices, owner_map, row_bytes):
    """What one micro-batch's exchange puts on the wire, summed over ranks (nothing a rank
    sends itself counts): each rank's unique ids with their counts (8 bytes each) to their
    owners, and per remote request one row out and one gradient back. slices: each rank's
    token ids. Also returns the rows each rank serves (its own requests included)."""
    ids_bytes = rows = 0
    served = torch.zeros(owner_map.world_size, dtype=torch.long)
    for rank, ids in enumerate(slices):
        owners = owner_map.owner(torch.unique(torch.as_tensor(ids)))
        remote = int((owners != rank).sum())
        ids_bytes, rows = ids_bytes + 2 * 8 * remote, rows + remote
        served += torch.bincount(owners, minlength=owner_map.world_size)
    return {"ids": ids_bytes, "rows": 2 * rows * row_bytes, "served": served}


def column_sharded_bytes(tokens_per_rank, world_size, n_stem, d_ff, act_bytes):
    """The official scheme's bytes for one micro-batch, summed over ranks: each table split
    by d_ff columns over the N ranks; every rank all-gathers every token id (8 bytes),
    looks up its columns for all tokens and an all-to-all returns each rank its tokens'
    full rows, per STEM layer, in forward and again (gradients) in backward."""
    N, t = world_size, tokens_per_rank
    ids = N * (N - 1) * t * 8
    activations = 2 * n_stem * (N - 1) * t * d_ff * act_bytes          # N ranks x (N-1) peers x t x d_ff / N
    return {"ids": ids, "rows": activations}


def dense_all_reduce_bytes(table_bytes, world_size):
    """A dense table gradient all-reduced (ring) every step, summed over ranks."""
    return 2 * (world_size - 1) * table_bytes


ROW_KEYS = ("weight", "exp_avg", "exp_avg_sq", "last_step")   # the per-row tensors of a table's state


def map_rows(state, fn):
    """state with fn applied to every per-row tensor (a ROW_KEYS leaf), the rest as is."""
    if isinstance(state, dict):
        return {k: fn(v) if k in ROW_KEYS and isinstance(v, torch.Tensor) else map_rows(v, fn)
                for k, v in state.items()}
    return state


def int_keys(state):
    """state with every dict keyed by digit strings keyed by ints again (a torch
    optimiser numbers its parameters; a checkpoint's flattening writes the numbers as text)."""
    if not isinstance(state, dict):
        return state
    if state and all(isinstance(k, str) and k.isdigit() for k in state):
        return {int(k): int_keys(v) for k, v in state.items()}
    return {k: int_keys(v) for k, v in state.items()}


def unpermute(state, owner_map):
    """A table state read whole from a sharded checkpoint (rows in permuted order) in id
    order, as one process holds it."""
    return int_keys(map_rows(state, lambda t: t.index_select(0, owner_map.position)))


def shard_tables(model, tc, world, device, table_slots, seed=0, delay=None):
    """Replace the model's full tables (built on the CPU, the same bits on every rank) by
    this rank's shard behind ShardedTables: a stem.ResidentTables of its rows under dense
    AdamW (training.configure_optimizer gives it its optimiser), or tables.LazyTables,
    resident or offloaded with its own LFU cache. table_slots: memory.table_slots, which
    sizes a job's shard (cache rows None: resident). delay: offload.OffloadedRows's injected
    delays."""
    full = model.tables.weight.detach()
    vocab_size, n_stem, d_ff = full.shape
    owner_map = OwnerMap(vocab_size, world.world_size, seed)
    mine = full.index_select(0, owner_map.owned(world.rank))               # (V / N, n_stem, d_ff)
    model.tables = None                                                   # the full table goes
    if tc.table_optimizer == "adamw":
        local = stem.ResidentTables(len(mine), n_stem, d_ff)
        with torch.no_grad():
            local.weight.copy_(mine)
        local.to(device)
    else:
        optimizer = lazy_adamw.LazyAdamW(betas=(tc.beta1, tc.beta2), weight_decay=tc.table_decay,
                                         catch_up=tc.table_catchup if tc.table_optimizer == "adamw_catchup" else None)
        cache_rows, transient_rows = table_slots       # the shard's (memory.table_slots of a job)
        local = lazy_tables.LazyTables(mine, device, cache_rows, transient_rows, training=True, optimizer=optimizer,
                                       take_weight=True, delay=delay)
    model.tables = ShardedTables(local, owner_map, (n_stem, d_ff), device)
    return model.tables
