"""The table-source interface: a lookup finds its plan by the batch it is given (its
RowIndex), never by order, so forwards a fork adds between prepare and lookup change no
bits; a second forward of a batch reuses its plan; a forward whose backward never runs
touches no row."""

import os

import numpy as np
import pytest
import torch

import data
import stem
import training
from model import GPT, GPTConfig
from tables import LazyTables
from test_train import make_dataset

VOCAB = 64
SETUPS = {"dense adamw": dict(table_optimizer="adamw"),
          "lazy resident": dict(table_optimizer="lazy_adamw"),
          "catch-up offloaded": dict(table_optimizer="adamw_catchup", tables="offload", table_cache_fraction=0.1,
                                     table_transient_rows=200)}


class ExtraForward(torch.nn.Module):
    """A fork's model call: `extra(model, x, y, row_index)` runs first (a training-mode
    forward whose result it drops), then the real forward. train_step reaches the model
    through _orig_mod, as it does under torch.compile."""

    def __init__(self, model, extra):
        super().__init__()
        self._orig_mod, self.extra = model, extra

    def forward(self, x, y, row_index):
        self.extra(self._orig_mod, x, y, row_index)
        return self._orig_mod(x, y, row_index)


def train(dataset, setup, extra=None, steps=6):
    """steps of training.train_step (2 micro-batches each); every tensor of the result."""
    torch.manual_seed(0)
    tc = training.TrainConfig(dataset=dataset, batch_size=4, grad_accum_steps=2, learning_rate=1e-2, warmup_iters=1,
                              max_iters=steps, device="cpu", **SETUPS[setup])
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=16, n_layer=3, n_head=2, n_embd=32))
    training.build_tables(model, tc, "cpu")
    optimizer = training.configure_optimizer(model, tc)
    loader = data.BatchLoader(os.path.join(dataset, "train.bin"), "uint16", 4, 16, VOCAB, "cpu", 1, True)
    stepped = model if extra is None else ExtraForward(model, extra)
    for it in range(steps):
        training.train_step(stepped, optimizer, loader, tc, training.lr_at(it, tc), torch.autocast("cpu", enabled=False))
    out = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    if isinstance(model.tables, LazyTables):
        out.update({f"tables.{k}": v.clone() for k, v in model.tables.tensors().items()})
        out["unprepared"] = model.tables.stats()["unprepared_lookups"]
    return out


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("tables_data"), vocab_size=VOCAB)


def same_batch(model, x, y, row_index):
    model(x, y, row_index)                      # e.g. logits for a log line, before the real forward


def another_batch(model, x, y, row_index):
    other = torch.roll(x, 1, 0)                 # a batch nobody prepared
    model(other, other, stem.RowIndex.of(other))


@pytest.mark.parametrize("setup", SETUPS)
def test_an_extra_forward_of_the_batch_between_prepare_and_lookup_changes_no_bits(dataset, setup):
    plain = train(dataset, setup)
    extra = train(dataset, setup, same_batch)
    assert plain.keys() == extra.keys()
    for key in plain:
        assert (plain[key] == extra[key]) if key == "unprepared" else torch.equal(plain[key], extra[key]), key
    if "unprepared" in plain:
        assert extra["unprepared"] == 0          # the second forward reused the batch's prepared plan


@pytest.mark.parametrize("setup", ["dense adamw", "lazy resident"])
def test_an_extra_forward_of_another_batch_touches_nothing(dataset, setup):
    """A training-mode forward of another batch, its backward never run: the prepared
    batches keep their plans, and no row it read is stepped (lazy AdamW touches the rows
    that got a gradient)."""
    plain = train(dataset, setup)
    extra = train(dataset, setup, another_batch)
    for key in plain:
        if key != "unprepared":
            assert torch.equal(plain[key], extra[key]), key
    if setup == "lazy resident":
        assert extra["unprepared"] == 12 and plain["unprepared"] == 0    # one per micro-batch: the extra ones


def test_a_lookup_takes_the_plan_of_its_batch_whatever_the_order():
    """Prepared A, then B; looked up B first, then A: each gets its own rows (the offloaded
    slots of the two batches differ)."""
    torch.manual_seed(0)
    weight = torch.randn(40, 2, 4)
    tables = LazyTables(weight, "cpu", cache_rows=2, transient_rows=16)
    a, b = stem.RowIndex.of(torch.tensor([1, 2, 3])), stem.RowIndex.of(torch.tensor([7, 8, 9, 10]))
    tables.prepare(a)
    tables.prepare(b)
    assert torch.equal(tables.lookup(b).detach(), weight[[7, 8, 9, 10]])
    assert torch.equal(tables.lookup(a).detach(), weight[[1, 2, 3]])
    # and again (a recompute): the same plan, nothing planned on the spot
    assert torch.equal(tables.lookup(a).detach(), weight[[1, 2, 3]])
    assert tables.stats()["unprepared_lookups"] == 0
    rows = np.concatenate([tables.in_flight[id(ri)][1]["slots"] for ri in (a, b)])
    assert len(set(rows.tolist())) == 7                      # every id of both batches in a slot of its own
