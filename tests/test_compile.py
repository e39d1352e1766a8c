"""torch.compile (CPU, inductor) of the training step for the three table modes: resident
tables with dense AdamW (stem.ResidentTables), resident lazy (tables.LazyTables) and
offloaded (LazyTables with an LFU cache, each batch prepared while the one before it runs,
as training.train_step does). After the first step, training recompiles at most once;
evaluation compiles at most one graph of its own; the transformer blocks have no graph
break (the one allowed break is LazyTables.lookup, host bookkeeping outside the graph);
every training lookup under compile finds the plan its batch was prepared with; compiled
and eager runs from the same weights and batches agree."""

import collections
import contextlib

import numpy as np
import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

import data
import stem
import training
from model import GPT, GPTConfig
from tables import LazyTables

VOCAB, BATCH, BLOCK = 256, 4, 32
STEPS = 12
MODES = ("resident_adamw", "resident_lazy", "offloaded")


def config():
    return GPTConfig(vocab_size=VOCAB, n_layer=3, n_head=2, n_embd=64, block_size=BLOCK, dropout=0.0)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()
    counters.clear()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """Tokens with structure (a successor map with noise) so that the loss moves."""
    folder = tmp_path_factory.mktemp("compile_data")
    rng = np.random.default_rng(0)
    successor = rng.permutation(VOCAB)
    tokens = np.empty(20_000, dtype=np.uint16)
    tokens[0] = 0
    for i in range(1, len(tokens)):
        tokens[i] = successor[tokens[i - 1]] if rng.random() < 0.8 else rng.integers(VOCAB)
    tokens[:18_000].tofile(folder / "train.bin")
    tokens[18_000:].tofile(folder / "val.bin")
    return folder


class Counting:
    """A backend (inductor by default) that counts the graphs dynamo hands it: one per
    compile or recompile of a frame."""

    def __init__(self, inner="inductor"):
        self.graphs = 0
        self.ops = []          # per graph: how many calls of each torch function it holds
        self.inner = torch._dynamo.lookup_backend(inner)

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        self.ops.append(collections.Counter(getattr(node.target, "__name__", str(node.target))
                                            for node in gm.graph.nodes if node.op == "call_function"))
        return self.inner(gm, example_inputs)


def build(mode):
    """A tiny STEM model (same initial weights every call), its optimiser, TrainConfig,
    and whether its tables are LazyTables."""
    torch.manual_seed(0)
    model = GPT(config())
    sparse = mode != "resident_adamw"
    if mode == "resident_lazy":
        model.tables = LazyTables(model.tables.weight.detach().clone(), "cpu")
    elif mode == "offloaded":
        # a small cache: misses, evictions and transient rows every batch; transient slots
        # for the two batches in flight (the one running and the one prefetched)
        model.tables = LazyTables(model.tables.weight.detach().clone(), "cpu", cache_rows=32,
                                            transient_rows=2 * min(BATCH * BLOCK, VOCAB))
    tc = training.TrainConfig(batch_size=BATCH, learning_rate=1e-2, warmup_iters=0, max_iters=STEPS,
                              table_optimizer="lazy_adamw" if sparse else "adamw")
    optimizer = training.configure_optimizer(model, tc)
    return model, optimizer, tc, sparse


def loaders(data_dir):
    """train.py's loaders: one for training, one for evaluation."""
    args = dict(dtype="uint16", batch_size=BATCH, block_size=BLOCK, vocab_size=VOCAB, device="cpu",
                with_row_index=True)
    train_loader = data.BatchLoader(str(data_dir / "train.bin"), seed=1, **args)
    eval_loader = data.BatchLoader(str(data_dir / "val.bin"), seed=2, **args)
    return train_loader, eval_loader


def run(mode, data_dir, backend=None):
    """Train STEPS steps (compiled with `backend` if given), evaluate two batches under
    no_grad, train one more step. Returns the losses and the backend's graph counts at
    each phase: after the first step, after training, after eval, after the last step."""
    model, optimizer, tc, sparse = build(mode)
    compiled = model if backend is None else torch.compile(model, backend=backend)
    train_loader, eval_loader = loaders(data_dir)
    ctx = contextlib.nullcontext()

    def graphs():
        return backend.graphs if backend is not None else 0

    losses, counts = [], {}
    model.train()
    for it in range(STEPS):
        loss, _, _ = training.train_step(compiled, optimizer, train_loader, tc, training.lr_at(it, tc), ctx)
        losses.append(loss.item())
        if it == 0:
            counts["first_step"] = graphs()
    counts["train"] = graphs()
    model.eval()
    eval_losses = []
    with torch.no_grad():
        for _ in range(2):
            b = eval_loader.next()
            eval_losses.append(compiled(b.x, b.y, b.row_index)[1].item())
    model.train()
    counts["eval"] = graphs()
    loss, _, _ = training.train_step(compiled, optimizer, train_loader, tc, training.lr_at(STEPS, tc), ctx)
    losses.append(loss.item())
    counts["after_eval"] = graphs()
    # every lookup found the plan of the batch it was given (none planned on the spot)
    counts["unprepared"] = model.tables.stats()["unprepared_lookups"] if sparse else 0
    return losses, eval_losses, counts


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_compiled_training_recompiles_at_most_once_and_matches_eager(mode, data_dir):
    eager_losses, eager_eval, _ = run(mode, data_dir)
    torch._dynamo.reset()
    counters.clear()
    backend = Counting()
    losses, eval_losses, counts = run(mode, data_dir, backend)
    breaks = dict(counters["graph_break"])
    print(f"{mode}: graphs {counts}, graph breaks {sum(breaks.values())}, "
          f"loss eager {eager_losses[-1]:.6f} compiled {losses[-1]:.6f}")

    assert counts["first_step"] >= 1, "nothing was compiled"
    # the number of unique ids changes every batch: at most one recompile for it
    assert counts["train"] - counts["first_step"] <= 1, counts
    # evaluation (eval mode, no grad) compiles at most one graph, for all its batches
    assert counts["eval"] - counts["train"] <= 1, counts
    # back in training mode the training graph is reused
    assert counts["after_eval"] == counts["eval"], counts
    # no graph break inside the blocks: every graph holds the whole transformer (each
    # block's attention, SiLU and linears, and the lm_head)
    n_layer = config().n_layer
    n_linear = 1 + sum(isinstance(m, torch.nn.Linear) for m in GPT(config()).blocks.modules())
    for ops in backend.ops:
        assert ops["scaled_dot_product_attention"] == n_layer and ops["silu"] == n_layer, ops
        assert ops["linear"] == n_linear, ops
    assert counts["unprepared"] == 0, counts
    # the one allowed graph break: LazyTables.lookup (host bookkeeping, compile-disabled)
    if mode == "resident_adamw":
        assert not breaks, breaks
    else:
        assert all("lookup" in reason and "torch.compiler.disable" in reason for reason in breaks), breaks
    # data-dependent checks and dedup stay out of the graph: no .item()/unique fallbacks
    assert not any("item" in reason or "dynamic shape" in reason.lower() for reason in breaks), breaks

    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, eager_losses, rtol=1e-4)
    np.testing.assert_allclose(eval_losses, eager_eval, rtol=1e-4)


@pytest.mark.parametrize("layer", [0, 1], ids=["dense_block", "stem_block"])
def test_block_compiles_to_one_graph(layer):
    """A Block (dense FFN in layer 0, STEM in layer 1) compiles with fullgraph=True, forward
    and backward, training mode: no graph break inside the transformer blocks."""
    torch.manual_seed(0)
    cfg = config()
    model = GPT(cfg)
    block = model.blocks[layer]
    assert block.is_stem == (layer == 1)
    x = torch.randn(BATCH, BLOCK, cfg.n_embd, requires_grad=True)
    cos, sin = model.rope_cos[:BLOCK], model.rope_sin[:BLOCK]
    idx = torch.randint(0, VOCAB, (BATCH, BLOCK))
    rows = None
    if block.is_stem:
        row_index = stem.RowIndex.of(idx)
        rows = stem.StemRows(model.tables.lookup(row_index), row_index.inverse).layer(0)

    def loss_of(fn):
        out, aux = fn(x, cos, sin, rows, None, 0, idx)
        assert aux is None
        return out.square().mean()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    got = loss_of(compiled)
    (grad_got,) = torch.autograd.grad(got, [x])
    want = loss_of(block)
    (grad_want,) = torch.autograd.grad(want, [x])
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad_got, grad_want)


def test_row_index_marks_unique_ids_dynamic():
    """Every RowIndex (made by the loader, pinned, moved) marks U dynamic for compile, and
    the model's own dedup (no row_index given) runs outside the graph."""
    idx = torch.tensor([[3, 1, 3, 7]])
    ri = stem.RowIndex.of(idx)
    assert 0 in getattr(ri.unique_ids, "_dynamo_weak_dynamic_indices", ())
    assert 0 in getattr(ri.to("cpu").unique_ids, "_dynamo_weak_dynamic_indices", ())

    torch.manual_seed(0)
    model = GPT(config())
    backend = Counting("aot_eager")
    compiled = torch.compile(model, backend=backend)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for n in (40, 90, 200):      # three different numbers of unique ids, no row_index
            x = torch.randint(0, n, (BATCH, BLOCK), generator=g)
            torch.testing.assert_close(compiled(x, x)[1], model(x, x)[1], rtol=1e-4, atol=1e-6)
    breaks = dict(counters["graph_break"])
    assert not any("item" in reason for reason in breaks), breaks
    assert backend.graphs <= 2, backend.graphs
