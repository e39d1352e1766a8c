"""torchrun: a job of N gloo processes trains as one process on the same global batch
(losses and every weight, rtol 1e-5), its sharded checkpoint resumes at another world size
and in one process, a kill -9 of the job resumes to the same bits, and the row exchange
sums each row's gradient once (a broken exchange fails the same comparison)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import checkpoint
import data as data_module
import shards
import stem
import tables as lazy_tables
import training
import train
from model import GPT, GPTConfig
from test_train import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(block_size=16, n_layer=3, n_head=2, n_embd=32, batch_size=4, eval_interval=6, eval_iters=2,
             log_interval=1, warmup_iters=2, lr_decay_iters=12, learning_rate=1e-2, device="cpu", dropout=0.0)
VARIANTS = {"dense": dict(ffn="dense"), "resident": dict(ffn="stem"),
            "catchup": dict(ffn="stem", tables="offload", table_optimizer="adamw_catchup", table_cache_fraction=0.2)}


def args_of(data, out, **extra):
    return [f"--{k}={v}" for k, v in {**SHAPE, "dataset": data, "out_dir": out, **extra}.items()]


def job(n, args, **popen):
    """torchrun --nproc_per_node=n train.py args (a subprocess)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               os.path.join(ROOT, "train.py")] + args
    env = dict(os.environ, OMP_NUM_THREADS="1")
    if popen:
        return subprocess.Popen(command, cwd=ROOT, env=env, **popen)
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def state_of(out):
    """Every tensor of a run's checkpoint, read in one process, optimiser keyed by name."""
    saved = checkpoint.read(out)
    with torch.device("meta"):
        model = GPT(GPTConfig.from_dict(saved["model_config"]))
    tensors = {f"model/{k}": v for k, v in saved["model"].items()}
    optimizer = training.optimizer_state_by_name(model, saved["optimizer"])["state"]
    tensors.update({f"optimizer/{name}/{k}": v for name, s in optimizer.items() for k, v in s.items()
                    if torch.is_tensor(v) and v.dim() > 0})
    flat = shards.map_rows(saved["table_optimizer"] or {}, lambda t: t)

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}/{k}", v)
        elif torch.is_tensor(value) and value.dim() > 0:
            tensors[prefix] = value
    walk("tables", flat)
    return saved["iter_num"], tensors


def assert_same_run(one, many, rtol=1e-5, atol=1e-5):      # atol: float32 assert_close default
    a, b = losses(one), losses(many)
    assert a.keys() == b.keys()
    torch.testing.assert_close(torch.tensor(list(b.values())), torch.tensor(list(a.values())), rtol=rtol, atol=0)
    (ia, ta), (ib, tb) = state_of(one), state_of(many)
    assert ia == ib and ta.keys() == tb.keys()
    for name in ta:
        torch.testing.assert_close(tb[name].float(), ta[name].float(), rtol=rtol, atol=atol, msg=name)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def one_process(data, tmp_path_factory):
    """The one-process reference of each variant, 12 steps."""
    runs = {}
    for name, extra in VARIANTS.items():
        out = str(tmp_path_factory.mktemp(f"one-{name}"))
        train.main(args_of(data, out, max_iters=12, **extra))
        runs[name] = out
    return runs


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_two_rank_job_trains_as_one_process(data, one_process, tmp_path, variant):
    out = str(tmp_path / "job")
    job(2, args_of(data, out, max_iters=12, **VARIANTS[variant]))
    assert checkpoint.is_sharded(out)
    assert_same_run(one_process[variant], out)


def test_rows_each_rank_owns_match_including_rows_one_rank_read(data, one_process, tmp_path):
    """Per owner, its rows equal one process's; some of them were read by one rank only."""
    out = str(tmp_path / "job")
    job(2, args_of(data, out, max_iters=12, ffn="stem"))
    one, many = checkpoint.read(one_process["resident"]), checkpoint.read(out)
    vocab = one["model_config"]["vocab_size"]
    owner_map = shards.OwnerMap(vocab, 2)
    read_by = []
    for rank in range(2):          # the ids each rank's slices held over the 12 steps
        loader = data_module.BatchLoader(os.path.join(data, "train.bin"), "uint16", 4, 16, vocab, "cpu", 1337, True,
                                         rank=rank, world_size=2)
        read_by.append(set(torch.cat([loader.next().x.reshape(-1) for _ in range(12)]).tolist()))
    only_one = (read_by[0] ^ read_by[1])
    assert only_one, "the test data gives every rank the same ids"
    for rank in range(2):
        ids = owner_map.owned(rank)
        torch.testing.assert_close(many["model"]["tables.weight"][ids], one["model"]["tables.weight"][ids],
                                   rtol=1e-5, atol=1e-5, msg=f"rows of rank {rank}")
    ids = torch.tensor(sorted(only_one))
    torch.testing.assert_close(many["model"]["tables.weight"][ids], one["model"]["tables.weight"][ids], rtol=1e-5,
                               atol=1e-5)
    assert not torch.equal(many["model"]["tables.weight"][ids], GPT(GPTConfig.from_dict(one["model_config"])).tables.weight[ids])


def test_four_ranks_with_lazy_tables(data, tmp_path):
    one, many = str(tmp_path / "one"), str(tmp_path / "job")
    extra = dict(ffn="stem", table_optimizer="lazy_adamw", max_iters=8, batch_size=8)
    train.main(args_of(data, one, **extra))
    job(4, args_of(data, many, **extra))
    assert_same_run(one, many)


def test_two_ranks_then_one_process_equals_one_process(data, one_process, tmp_path):
    out = str(tmp_path / "job")
    job(2, args_of(data, out, max_iters=6, **VARIANTS["catchup"]))
    train.main(args_of(data, out, max_iters=12, init_from="resume", **VARIANTS["catchup"]))
    assert not checkpoint.is_sharded(out)                  # one process wrote ckpt.pt, the job's went
    assert_same_run(one_process["catchup"], out)


def test_one_process_then_two_ranks_equals_one_process(data, one_process, tmp_path):
    out = str(tmp_path / "job")
    train.main(args_of(data, out, max_iters=6, ffn="stem"))
    job(2, args_of(data, out, max_iters=12, init_from="resume", ffn="stem"))
    assert_same_run(one_process["resident"], out)


def test_kill_9_of_a_job_then_resume_gives_the_same_bits(data, tmp_path):
    run = dict(max_iters=60, eval_interval=5, **VARIANTS["catchup"])
    killed, straight = str(tmp_path / "killed"), str(tmp_path / "straight")
    process = job(2, args_of(data, killed, **run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                  start_new_session=True)
    deadline = time.time() + 120
    while not os.path.exists(os.path.join(killed, checkpoint.SHARDED)) and process.poll() is None \
            and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(process.pid, signal.SIGKILL)        # the launcher and both ranks
    process.wait()
    killed_at = checkpoint.read(killed)["iter_num"]
    assert 0 < killed_at < 60
    job(2, args_of(data, killed, init_from="resume", **run))
    job(2, args_of(data, straight, **run))
    (ia, ta), (ib, tb) = state_of(killed), state_of(straight)
    assert ia == ib == 60
    for name in ta:
        assert torch.equal(ta[name], tb[name]), name


def test_world_size_flag_must_match_the_launch(data, tmp_path):
    with pytest.raises(SystemExit, match="--world_size=2 but 1 process"):
        train.main(args_of(data, str(tmp_path / "o"), max_iters=1, world_size=2))


# -- the row exchange, in processes of its own --------------------------------------------------

def exchange_worker(rank, world, port, variant, results):
    """Each rank looks up its batch of ids through ShardedTables, backpropagates a loss,
    steps; results[rank] gets its shard after the step."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    full, batches, weights = make_problem(world)
    if variant == "drop":           # owners keep only their own requests' gradients
        class Dropping(shards.RowExchange):
            @staticmethod
            def backward(ctx, grad_rows):
                answered, received = ctx.splits          # rows this rank sent each rank, rows it got from each
                grad = torch.zeros(sum(answered), *grad_rows.shape[1:])
                at, of = sum(answered[:rank]), sum(received[:rank])
                grad[at:at + answered[rank]] = grad_rows[of:of + received[rank]]
                return grad / world, None, None, None
        shards.RowExchange = Dropping
    if variant == "double":         # the reduction sums the other ranks' gradients twice
        class Doubling(shards.RowExchange):
            @staticmethod
            def backward(ctx, grad_rows):
                grad, *rest = shards.RowExchange.__mro__[1].backward(ctx, grad_rows)
                answered, _ = ctx.splits
                at = sum(answered[:rank])
                others = torch.ones(len(grad), *[1] * (grad.dim() - 1)) * 2
                others[at:at + answered[rank]] = 1
                return (grad * others, *rest)
        shards.RowExchange = Doubling
    owner_map = shards.OwnerMap(full.shape[0], world)
    mine = full[owner_map.owned(rank)]
    optimizer = __import__("lazy_adamw").LazyAdamW(catch_up="full")
    local = lazy_tables.LazyTables(mine, "cpu", cache_rows=3, transient_rows=len(mine), optimizer=optimizer,
                                   delay=(rank, 0.003))
    sharded = shards.ShardedTables(local, owner_map, full.shape[1:], "cpu")
    indexes = [stem.RowIndex.of(batch[rank]) for batch in batches]      # one per batch, as the loader's
    for step, index in enumerate(indexes):
        sharded.prepare(index)
        if step + 1 < len(indexes):
            sharded.prepare(indexes[step + 1])       # the next batch's exchange, early (as the training step does)
        rows = sharded.lookup(index)
        loss = (rows[index.inverse] * weights).sum() / index.inverse.numel()
        loss.backward()
        sharded.step(1e-2, max_norm=0.5)
    results[rank] = local.tensors()["weight"].clone()
    results[f"stats{rank}"] = dict(sharded.stats)
    dist.destroy_process_group()


def make_problem(world):
    g = torch.Generator().manual_seed(1)
    full = torch.randn(40, 2, 4, generator=g)
    # a Zipf-ish draw: some ids in every rank's batch, some in one only
    batches = [[torch.multinomial(1 / torch.arange(1, 41.0), 12, replacement=True, generator=g).view(3, 4)
                for _ in range(world)] for _ in range(4)]
    weights = torch.randn(3, 4, 2, 4, generator=g)            # (B, T, n_stem, d_ff)
    return full, batches, weights


def one_process_reference(world):
    full, batches, weights = make_problem(world)
    local = lazy_tables.LazyTables(full.clone(), "cpu", optimizer=__import__("lazy_adamw").LazyAdamW(catch_up="full"))
    for batch in batches:
        loss = 0
        index = stem.RowIndex.of(torch.cat(batch))
        rows = local.lookup(index)
        for r, idx in enumerate(batch):        # the mean over ranks of each rank's mean
            sub = stem.RowIndex.of(idx)
            part = rows[torch.searchsorted(index.unique_ids, sub.unique_ids)][sub.inverse]
            loss = loss + (part * weights).sum() / idx.numel() / world
        loss.backward()
        local.step(1e-2, max_norm=0.5)
    return local.tensors()["weight"]


def run_exchange(variant, world=2):
    port = 29500 + os.getpid() % 1000 + {"sum": 0, "drop": 1, "double": 2}[variant] * 7
    results = mp.Manager().dict()
    mp.spawn(exchange_worker, args=(world, port, variant, results), nprocs=world)
    owner_map = shards.OwnerMap(40, world)
    whole = torch.empty(40, 2, 4)
    for rank in range(world):
        whole[owner_map.owned(rank)] = results[rank]
    if variant == "sum":        # the bytes each rank counted on the wire, against the batches' own count
        _, batches, _ = make_problem(world)
        expected = [shards.exchange_bytes(batch, owner_map, 2 * 4 * 4) for batch in batches]
        assert sum(results[f"stats{r}"]["id_bytes"] for r in range(world)) == sum(e["ids"] for e in expected)
        assert sum(results[f"stats{r}"]["row_bytes"] for r in range(world)) == sum(e["rows"] for e in expected)
        assert sum(e["rows"] for e in expected) > 0
    return whole


def test_the_exchange_sums_each_rows_gradient_once_with_delays():
    reference = one_process_reference(2)
    torch.testing.assert_close(run_exchange("sum"), reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("variant", ["drop", "double"])
def test_an_exchange_that_drops_or_doubles_the_reduction_fails(variant):
    with pytest.raises(AssertionError):
        torch.testing.assert_close(run_exchange(variant), one_process_reference(2), rtol=1e-5, atol=1e-6)


# -- one rank's memory plan ------------------------------------------------------------------

def plan_rows(*flags):
    p = train.main(list(flags) + ["--dry_run=True", "--device=cuda"])["plan"]
    return {name.split(" (")[0]: b for place, name, b, _ in p.rows}, p


def test_a_jobs_plan_is_one_ranks_share():
    one, _ = plan_rows("config/stem_350m.py", "--dataset=none")
    eight, p = plan_rows("config/stem_350m.py", "--dataset=none", "--world_size=8")
    assert eight["backbone weights"] == one["backbone weights"] // 8
    V, row = 50304, 23 * 2816 * 4
    assert eight["table weights"] == -(-V // 8) * row and one["table weights"] == V * row
    assert "row exchange: the rows this rank answers for a micro-batch" in eight
    assert p.total("device") <= 76 * 2**30


def test_the_1b_recipe_for_24gb_cards_fits_at_8_ranks():
    _, p = plan_rows("config/stem_1b_24gb.py", "--dataset=none", "--world_size=8")
    assert p.total("device") <= 22 * 2**30
    with pytest.raises(SystemExit, match="does not split over 3 ranks"):
        plan_rows("config/stem_1b_24gb.py", "--dataset=none", "--world_size=3")


def test_a_jobs_checkpoint_samples_in_one_process(tmp_path, capsys):
    import importlib.util
    import sample
    spec = importlib.util.spec_from_file_location("text_prepare", os.path.join(ROOT, "data", "text", "prepare.py"))
    text_prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(text_prepare)
    (tmp_path / "in").mkdir()
    for k in range(10):
        (tmp_path / "in" / f"{k}.txt").write_text(f"The capital of France is Paris. Spain has Madrid {k}.\n" * 40)
    text_prepare.main([f"--input={tmp_path / 'in'}", f"--out_dir={tmp_path / 'text'}", "--vocab_size=300",
                       "--val_fraction=0.2"])
    out = str(tmp_path / "job")
    job(2, args_of(str(tmp_path / "text"), out, max_iters=6, ffn="stem", tables="offload",
                   table_optimizer="adamw_catchup"))
    capsys.readouterr()
    sample.main([f"--out_dir={out}", "--start=The capital of", "--max_new_tokens=4", "--device=cpu",
                 "--temperature=0"])
    printed = capsys.readouterr().out
    assert "The capital of" in printed
    model, _ = checkpoint.load_model(out)          # the rows are the job's, in id order
    saved = checkpoint.read(out)
    assert torch.equal(model.tables.read_rows(torch.arange(10)), saved["model"]["tables.weight"][:10])
