"""The plan's working sets (memory.py), held to what the code makes: the peak bytes of live
tensor storage inside each region (tests/live_bytes.py), at two shapes, in float32 and in
CPU bf16 autocast, for dense AdamW, lazy, catch-up and offloaded tables.

Each item is within the larger of 5% and 64 KiB of the measured peak, plus, above it, the
rows the plan adds on purpose (it sizes each lookup for the largest batch of 200 steps,
+ 10% + 64 rows, where a measured batch has its own)."""

import os

import numpy as np
import pytest
import torch

import configurator
import memory
import train
import training
from live_bytes import LiveBytes
from test_train import write_dataset

VOCAB = 2048
SHAPES = {     # (model, batch_size): activations dominate "wide"; the table's gradient "tall"
    "wide": (dict(block_size=64, n_layer=4, n_head=4, n_embd=128), 8),
    "tall": (dict(block_size=32, n_layer=3, n_head=2, n_embd=64, d_ff=512), 2),
}
KINDS = {
    "dense-adamw": dict(table_optimizer="adamw"),
    "lazy": dict(table_optimizer="lazy_adamw"),
    "catch-up": dict(table_optimizer="adamw_catchup"),
    "offloaded": dict(table_optimizer="adamw_catchup", tables="offload", table_cache_fraction=0.1),
}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, VOCAB + 1) ** 1.1
    return write_dataset(str(tmp_path_factory.mktemp("zipf")), rng.choice(VOCAB, 100_000, p=p / p.sum())
                         .astype(np.uint16), VOCAB)


def planned(plan, *prefixes):
    """The largest working set whose name starts with one of the prefixes."""
    found = [b for place, name, b, _ in plan.rows if place.endswith("*") and name.startswith(prefixes)]
    assert found, prefixes
    return max(found)


def assert_close(measured, plan_bytes, extra=0):
    tolerance = max(0.05 * measured, 64 << 10)
    assert measured - tolerance <= plan_bytes <= measured + tolerance + extra, (measured, plan_bytes, extra)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_working_set_is_the_measured_peak(dataset, tmp_path, kind, shape, dtype):
    overrides, batch_size = SHAPES[shape]
    tc = training.TrainConfig(dataset=dataset, out_dir=str(tmp_path), batch_size=batch_size, grad_accum_steps=2,
                              device="cpu", dtype=dtype, max_iters=10, **KINDS[kind])
    run = train.resolve(tc, overrides)
    plan = memory.plan_run(tc, run.config, run.device, run.dtype)
    with LiveBytes() as live:
        model, optimizer, loaders = train.build(run)
    # building: what stays (weights and the tables' buffers; gradients and moments come later)
    # plus the working set of building
    stays = sum(b for place, name, b, _ in plan.rows if place in ("device", "host") and name.startswith(
        ("backbone weights", "buffers", "table weights" if kind == "dense-adamw" else "table", "host table")))
    building = [b for _, name, b, _ in plan.rows if name.startswith("building")]
    assert_close(live.peak, stays + sum(building))
    ctx = configurator.autocast_context(run.device, run.dtype)
    # one step first: moments, catch-up history and the cache in place
    training.train_step(model, optimizer, loaders["train"], tc, 1e-3, ctx)
    row = len(run.config.stem_layer_ids) * run.config.d_ff * 4
    planned_rows = memory.rows_in_flight(tc.dataset, tc.batch_size, run.config.block_size, tc.grad_accum_steps,
                                         VOCAB, tc.seed).batch

    # offloaded catch-up: a lookup brings its rows up to date (resident: every row at a flush, below)
    if kind == "offloaded":
        batch = loaders["train"].peek()
        model.prepare(batch.row_index)
        with LiveBytes() as live:
            model.tables.lookup(batch.row_index)
        missing = planned_rows - len(batch.row_index.unique_ids)
        assert_close(live.peak, planned(plan, "catch-up"), memory.CATCHUP_ROWS_PER_ROW * missing * row)
        model.tables.release()

    # a micro-batch's forward and backward: the first of a step (backward makes .grad, which
    # the plan counts as standing), then the second (.grad is there, gradients add into it;
    # with dense tables a table-sized gradient and its sum with .grad: the plan's peak)
    peaks = []
    for _ in range(2):
        batch, upcoming = loaders["train"].next(), loaders["train"].peek()
        model.prepare(batch.row_index)
        model.prepare(upcoming.row_index)
        with LiveBytes() as live:
            with ctx:
                loss = model(batch.x, batch.y, batch.row_index)[1]
            (loss / 2).backward()
            del loss
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        peaks.append(live.peak_without(grads))
        extra = 2 * (planned_rows - len(batch.row_index.unique_ids)) * row
    assert_close(max(peaks), planned(plan, "forward/backward", "end of backward"), extra)

    # the tables' step
    if kind != "dense-adamw":
        with LiveBytes() as live:
            model.tables.step(1e-3, 1.0)
        assert_close(live.peak, planned(plan, "lazy AdamW step"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

    # evaluation: no-grad forwards of the eval batches
    with LiveBytes() as live:
        train.estimate_loss(model, {"val": loaders["eval"]["val"]}, 2, ctx)
    rows_read = 8 if kind in ("catch-up", "offloaded") else 1      # catch-up reads weights and moments
    assert_close(live.peak, planned(plan, "evaluation"), rows_read * (planned_rows - len(batch.row_index.unique_ids)) * row)

    # a checkpoint: the tables made current (written back, caught up), the finiteness check, the file
    state = train.State(iter_num=3, first_bad_iter=torch.full((), -1))
    with LiveBytes() as live:
        train.save(run, model, optimizer, loaders["train"], state)
    assert os.path.exists(run.ckpt_path)
    assert_close(live.peak, planned(plan, "checkpoint", "catch-up"))


def short_run(dataset, tmp_path, kind, device):
    """A run of a few steps with evals and checkpoints: (its train.py argv, its plan)."""
    overrides, batch_size = SHAPES["tall"]
    args = dict(dataset=dataset, out_dir=str(tmp_path), batch_size=batch_size, grad_accum_steps=2, device=device,
                max_iters=4, eval_interval=2, eval_iters=2, **KINDS[kind])
    tc = training.TrainConfig(**args)
    run = train.resolve(tc, overrides)
    return [f"--{k}={v}" for k, v in {**args, **overrides}.items()], memory.plan_run(tc, run.config, run.device,
                                                                                      run.dtype)


@pytest.mark.parametrize("kind", ["dense-adamw", "offloaded"])
def test_a_short_run_peaks_at_the_planned_total(dataset, tmp_path, kind):
    """End to end: the peak live bytes of a whole CPU run (build, steps, evals, checkpoints)
    against the plan's total, device and host being one memory (row views are Python
    objects, not storage: left out)."""
    argv, plan = short_run(dataset, tmp_path, kind, "cpu")
    views = sum(b for _, name, b, _ in plan.rows if name.startswith("row views"))
    with LiveBytes() as live:
        train.main(argv)
    assert_close(live.peak, plan.total_one_memory() - views)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_short_cuda_run_peaks_at_the_planned_device_total(dataset, tmp_path, kind):
    """What the card sees: torch.cuda.max_memory_allocated() of a short run against the
    plan's device total (the CUDA context and the allocator's rounding are not counted)."""
    argv, plan = short_run(dataset, tmp_path, kind, "cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    train.main(argv)
    assert_close(torch.cuda.max_memory_allocated() - before, plan.total("device"))
