"""memory.py: the memory plan. Table bytes equal what LazyTables allocates, the
rows-in-flight measurement equals what data.BatchLoader hands out, the activation formula
matches the tensors autograd saves, and the dry run allocates nothing big."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import data
import memory
import train
import training
from configurator import UsageError
from model import GPT, GPTConfig
from tables import LazyTables, table_buffers

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from test_train import write_dataset

VOCAB = 96


def zipf_dataset(folder, vocab_size=VOCAB, n_tokens=30_000, seed=0):
    """Token bins with Zipf-like ids (a few hot, many rare), as real text has."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, vocab_size + 1) ** 1.1
    tokens = rng.choice(vocab_size, size=n_tokens, p=p / p.sum()).astype(np.uint16)
    return write_dataset(folder, tokens, vocab_size)


def configs(dataset, **train_args):
    args = dict(dataset=dataset, batch_size=3, grad_accum_steps=2, device="cpu", table_optimizer="lazy_adamw")
    args.update(train_args)
    tc = training.TrainConfig(**args)
    config = GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=3, n_head=2, n_embd=32, d_ff=48)
    return tc, config


def allocated_bytes(tables, layout):
    """{place: bytes} of the tensors LazyTables allocated, placed by the plan's layout."""
    assert set(tables.allocated) == set(layout)
    out = {}
    for name, t in tables.allocated.items():
        shape, dtype, place = layout[name]
        assert tuple(t.shape) == tuple(shape) and t.dtype == dtype, name
        out[place] = out.get(place, 0) + t.numel() * t.element_size()
    return out


# -- table bytes: planned == allocated ------------------------------------------------

@pytest.mark.parametrize("tables, optimizer, transient", [
    ("resident", "lazy_adamw", 0), ("offload", "lazy_adamw", 0), ("offload", "adamw_catchup", 0),
    ("offload", "lazy_adamw", 37)], ids=["resident-lazy", "offload-measured", "offload-catchup", "offload-knob"])
def test_planned_table_bytes_equal_allocated_bytes(tmp_path, tables, optimizer, transient):
    tc, config = configs(zipf_dataset(tmp_path / "d"), tables=tables, table_optimizer=optimizer,
                         table_transient_rows=transient, table_cache_fraction=0.1)
    p = memory.plan_run(tc, config, "cpu", "float32")
    torch.manual_seed(0)
    model = GPT(config)
    training.build_tables(model, tc, "cpu")
    assert isinstance(model.tables, LazyTables)
    assert allocated_bytes(model.tables, p.table_layout) == p.table_bytes()
    # and the plan's printed device/host lines carry exactly these bytes
    n_stem = len(config.stem_layer_ids)
    row = n_stem * config.d_ff * 4
    if tables == "offload":
        cache_rows, transient_rows = memory.table_slots(tc, config)
        assert cache_rows == int(0.1 * VOCAB)
        flight = memory.rows_in_flight(tc.dataset, tc.batch_size, config.block_size, tc.grad_accum_steps, VOCAB, tc.seed)
        assert transient_rows == (transient or flight.rows)
        assert p.table_bytes()["device"] == 4 * (cache_rows + transient_rows) * row    # weights, 2 moments, grad
        assert p.table_bytes()["host"] == 3 * VOCAB * row                             # weights, 2 moments
    else:
        assert p.table_bytes() == {"device": 4 * VOCAB * row}


@pytest.mark.parametrize("cache_rows, transient", [(None, 0), (10, 20), (10, 0), (VOCAB, 5)])
def test_inference_table_buffers_equal_allocated_bytes(cache_rows, transient):
    weight = torch.randn(VOCAB, 2, 8)
    layout = table_buffers(VOCAB, 2, 8, cache_rows=cache_rows, transient_rows=transient,
                                   training=False, dtype=torch.bfloat16)
    tables = LazyTables(weight, "cpu", cache_rows, transient, training=False, dtype=torch.bfloat16)
    planned = {}
    for shape, dtype, place in layout.values():
        planned[place] = planned.get(place, 0) + memory.nbytes(shape, dtype)
    assert allocated_bytes(tables, layout) == planned
    assert all(dtype == torch.bfloat16 for _, dtype, _ in layout.values())     # weights only, no moments
    assert not any("exp_avg" in name or "grad" in name for name in layout)


def test_only_training_host_tables_are_pinned_on_cuda():
    """Training copies rows in place to and from its host tables, so on CUDA they are
    page-locked; inference tables may be a mapped checkpoint, which pinning would read whole."""
    places = lambda training, cuda: {name: place for name, (_, _, place) in table_buffers(
        VOCAB, 2, 8, cache_rows=10, transient_rows=5, training=training, device_is_cuda=cuda).items()
        if name.startswith("host.")}
    assert set(places(True, True).values()) == {"pinned"} and len(places(True, True)) == 3
    assert set(places(False, True).values()) == {"host"} and set(places(True, False).values()) == {"host"}


def test_dense_adamw_plan_counts_weight_gradient_and_moments(tmp_path):
    tc, config = configs(zipf_dataset(tmp_path / "d"), table_optimizer="adamw")
    p = memory.plan_run(tc, config, "cpu", "float32")
    table = VOCAB * len(config.stem_layer_ids) * config.d_ff * 4
    table_rows = [b for place, name, b, _ in p.rows if place == "device" and name.startswith("table")]
    assert sum(table_rows) == 4 * table and p.table_layout == {}


@pytest.mark.parametrize("extra", [{}, {"tables": "offload", "table_optimizer": "adamw_catchup"}],
                         ids=["dense-adamw", "offload-catchup"])
def test_planned_checkpoint_size_is_the_file_written(tmp_path, extra):
    dataset = zipf_dataset(tmp_path / "d")
    args = dict(dataset=dataset, out_dir=str(tmp_path / "out"), device="cpu", batch_size=3, grad_accum_steps=2,
                max_iters=2, eval_interval=2, eval_iters=1, log_interval=1, warmup_iters=1, **extra)
    shape = dict(block_size=16, n_layer=3, n_head=2, n_embd=32, d_ff=48)
    train.main([f"--{k}={v}" for k, v in {**args, **shape}.items()])
    tc, config = training.TrainConfig(**args), GPTConfig(vocab_size=VOCAB, **shape)
    planned = sum(b for _, b in memory.plan_run(tc, config, "cpu", "float32").checkpoint)
    written = os.path.getsize(tmp_path / "out" / "ckpt.pt")
    assert planned <= written <= planned * 1.05 + 64 * 1024     # + rng state, config, pickle framing


# -- rows in flight ---------------------------------------------------------------------

@pytest.mark.parametrize("grad_accum_steps", [1, 3])
def test_rows_in_flight_equal_what_the_loader_holds(tmp_path, grad_accum_steps):
    """Independent of the plan's own loop: data.BatchLoader, consumed as train_step does
    (next, then peek); the device holds a step's micro-batches and the prefetched one."""
    dataset = zipf_dataset(tmp_path / "d", vocab_size=400, n_tokens=20_000)
    B, T, steps, seed = 2, 24, 40, 7
    flight = memory.rows_in_flight(dataset, B, T, grad_accum_steps, 400, seed, steps=steps)
    loader = data.BatchLoader(os.path.join(dataset, "train.bin"), "uint16", B, T, 400, "cpu", seed,
                              with_row_index=True)
    truth, step_truth, batch_truth = 0, 0, 0
    for _ in range(steps):
        batches = []
        for _ in range(grad_accum_steps):
            batches.append(loader.next())
            loader.peek()
        held = [b.row_index.unique_ids.numpy() for b in batches]
        pending = loader.peek().row_index.unique_ids.numpy()
        truth = max(truth, len(np.unique(np.concatenate(held + [pending]))))
        step_truth = max(step_truth, len(np.unique(np.concatenate(held))))
        batch_truth = max(batch_truth, *(len(h) for h in held))
    assert flight.in_flight == truth and "measured" in flight.source
    assert flight.rows >= truth and flight.rows == memory.with_margin(truth, 400)
    assert flight.step >= step_truth and flight.batch >= batch_truth


def test_rows_in_flight_without_data_come_from_a_zipf_model(tmp_path):
    flight = memory.rows_in_flight(str(tmp_path / "missing"), 16, 1024, 4, 50304, 0)
    assert "Zipf" in flight.source
    assert flight.batch < flight.step < flight.in_flight <= flight.rows < 50304
    # the i.i.d. estimate against a direct simulation of the same model
    rng = np.random.default_rng(0)
    p = 1.0 / np.arange(1, 5001) ** 1.1
    draws = [len(np.unique(rng.choice(5000, size=3000, p=p / p.sum()))) for _ in range(20)]
    assert abs(memory.zipf_unique(5000, 3000) - np.mean(draws)) < 0.02 * np.mean(draws)


def test_a_model_wider_than_the_data_still_measures_and_caps_at_the_vocabulary(tmp_path):
    dataset = zipf_dataset(tmp_path / "d", vocab_size=20, n_tokens=5000)
    flight = memory.rows_in_flight(dataset, 8, 32, 4, 24, 0, steps=20)
    assert "measured" in flight.source and flight.rows == 24        # capped at vocab_size
    assert "Zipf" in memory.rows_in_flight(dataset, 8, 32, 4, 16, 0, steps=20).source   # ids beyond the model's


# -- activations ----------------------------------------------------------------------

def saved_bytes(config, batch_size):
    """Bytes autograd keeps for backward of one float32 forward with loss, each storage
    once, parameters not counted."""
    torch.manual_seed(0)
    model = GPT(config)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    idx = torch.randint(config.vocab_size, (batch_size, config.block_size))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, torch.randint(config.vocab_size, idx.shape))
    del loss
    return sum(seen.values())


@pytest.mark.parametrize("shape", [
    dict(ffn="dense", vocab_size=300, block_size=64, n_layer=2, n_head=4, n_embd=64),
    dict(ffn="stem", vocab_size=500, block_size=32, n_layer=3, n_head=2, n_embd=96, d_ff=160),
    dict(ffn="stem", vocab_size=200, block_size=48, n_layer=4, n_head=4, n_kv_head=2, n_embd=64,
         stem_layers="half", tie_embeddings=True),
], ids=["dense", "stem-full", "stem-half-gqa"])
def test_activation_estimate_matches_saved_tensors(shape):
    config = GPTConfig(**shape)
    batch_size = 3
    estimate = sum(memory.activation_bytes(config, batch_size, 4).values())
    measured = saved_bytes(config, batch_size)
    assert abs(estimate - measured) <= 0.25 * measured, (estimate, measured)


# -- the dry run and the fit check ---------------------------------------------------

def test_dry_run_of_the_350m_config_prints_the_plan_and_allocates_nothing_big():
    args = ["config/stem_350m.py", "--dry_run=True", "--tables=offload", "--table_optimizer=lazy_adamw"]
    # VmHWM, the peak of this process's own memory: ru_maxrss would also count the parent's
    # (Linux keeps it across exec, and pytest's process may be large by now)
    code = ("import runpy, sys; sys.argv = ['train.py'] + sys.argv[1:]; "
            "runpy.run_path('train.py', run_name='__main__'); "
            "print('maxrss_kib', next(line.split()[1] for line in open('/proc/self/status') "
            "if line.startswith('VmHWM:')))")
    out = subprocess.run([sys.executable, "-c", code] + args, cwd=REPO_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    maxrss_gib = int(lines[-1].split()[1]) / 2**20
    assert maxrss_gib < 2, maxrss_gib        # the table alone is 12 GiB of fp32
    last = lines[-2]
    assert last.startswith("plan: device ") and last.endswith(" GiB")
    device, host = (float(x.split()[0]) for x in last[len("plan: device "):].split("GiB, host "))
    assert 10 < device < 100 and 36 < host < 200           # host holds 3 x 12.14 GiB of tables and moments
    assert any(line.startswith("checkpoint on disk:") for line in lines)
    assert any("host table weights" in line for line in lines)


def test_dry_run_plans_a_cuda_run_without_cuda(tmp_path, capsys):
    dataset = zipf_dataset(tmp_path / "d")
    train.main([f"--dataset={dataset}", "--device=cuda", "--dry_run=True", "--n_layer=2", "--n_embd=32",
                "--n_head=2", "--block_size=16", "--tables=offload", "--table_optimizer=adamw_catchup"])
    out = capsys.readouterr().out
    assert "bfloat16 on cuda" in out and "pinned" in out and out.strip().splitlines()[-1].startswith("plan: ")


def test_a_run_that_cannot_fit_stops_naming_the_knobs(tmp_path, monkeypatch):
    tc, config = configs(zipf_dataset(tmp_path / "d"), tables="offload")
    p = memory.plan_run(tc, config, "cuda", "bfloat16")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (p.total("device") - 1, 80 * 2**30))
    with pytest.raises(UsageError, match="table_cache_fraction.*table_transient_rows.*batch_size"):
        memory.check_fits(p, tc, "cuda")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (p.total("device"), 80 * 2**30))
    memory.check_fits(p, tc, "cuda")          # exactly enough is enough


def test_a_cpu_run_that_cannot_fit_stops_before_building(tmp_path, monkeypatch):
    """A CPU run checks its plan (device and host: one memory) against the memory free,
    before anything is built or written."""
    dataset = zipf_dataset(tmp_path / "d")
    args = [f"--dataset={dataset}", f"--out_dir={tmp_path / 'out'}", "--device=cpu", "--n_layer=2", "--n_embd=32",
            "--n_head=2", "--block_size=16", "--max_iters=1", "--batch_size=3"]
    tc, config = configs(dataset, batch_size=3, grad_accum_steps=1, table_optimizer="adamw")
    need = memory.plan_run(tc, GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=2, n_head=2, n_embd=32),
                           "cpu", "float32").total_one_memory()
    monkeypatch.setattr(memory, "available_bytes", lambda: need - 1)
    with pytest.raises(SystemExit, match=r"^error: the run needs .* GiB on this machine but .* GiB are free; try .*"
                                         r"batch_size.*a smaller model"):
        train.main(args)
    assert not (tmp_path / "out").exists()
    monkeypatch.setattr(memory, "available_bytes", lambda: need)
    train.main(args)                           # exactly enough is enough
    assert (tmp_path / "out" / "ckpt.pt").exists()


def test_the_cpu_peak_counts_both_memories_and_the_largest_working_set():
    p = memory.Plan()
    p.add("device", "a", 10)
    p.add("host", "b", 5)
    for place, name, b in (("device*", "c", 3), ("device*", "d", 7), ("host*", "e", 9)):
        p.add(place, name, b)
    assert p.total("device") == 17 and p.total("host") == 14 and p.total_one_memory() == 24


# -- on a GPU ----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_planned_device_table_bytes_are_what_cuda_allocates(tmp_path):
    tc, config = configs(zipf_dataset(tmp_path / "d"), tables="offload", device="cuda")
    p = memory.plan_run(tc, config, "cuda", "bfloat16")
    model = GPT(config)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    training.build_tables(model, tc, "cuda")
    allocated = torch.cuda.memory_allocated() - before
    planned = p.table_bytes()["device"]
    # the caching allocator rounds each tensor up to 512 bytes; the anchor and slot maps are small
    assert planned <= allocated <= planned + 512 * (len(p.table_layout) + 8) + 8 * VOCAB * 4
    assert set(p.table_bytes()) == {"device", "pinned"}          # the host tables are pinned


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_run_that_cannot_fit_stops_before_building(tmp_path, monkeypatch):
    dataset = zipf_dataset(tmp_path / "d")
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**20, 2**30))
    with pytest.raises(SystemExit, match="error: the run needs .* GiB on cuda but 0.00 GiB are free; try "):
        train.main([f"--dataset={dataset}", f"--out_dir={tmp_path / 'out'}", "--device=cuda", "--n_layer=2",
                    "--n_embd=32", "--n_head=2", "--block_size=16", "--max_iters=1"])
