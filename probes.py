"""
Measurements of a trained model that the study (compare.py --mode=study) and analyze.py
report: loss by position in the window, a synthetic key-value retrieval test, and the
geometry of table rows against dense up-projection outputs and random vectors.

Every probe reads fixed inputs (the first windows of the val split, a seeded draw of
retrieval prompts), so every variant of a study is measured on the same tokens.
"""

import random

import numpy as np
import torch
import torch.nn.functional as F

import data

COSINE_BINS = 50            # histogram of |cos| over [0, 1]


# -----------------------------------------------------------------------------
# geometry

def cosine_pairs(vectors, n_pairs=20000, seed=0):
    """|cos| between n_pairs random pairs of distinct rows of vectors (N, d), float64."""
    generator = torch.Generator().manual_seed(seed)
    n = vectors.size(0)
    i = torch.randint(n, (n_pairs,), generator=generator)
    j = (i + torch.randint(1, n, (n_pairs,), generator=generator)) % n      # j != i
    v = F.normalize(vectors.double(), dim=-1)
    return (v[i] * v[j]).sum(-1).abs()                                      # (n_pairs,)


def cosine_summary(cos):
    """Mean, P50, P95 and a COSINE_BINS histogram (counts over [0, 1]) of |cos| values."""
    return {"mean": cos.mean().item(), "p50": cos.quantile(0.5).item(), "p95": cos.quantile(0.95).item(),
            "histogram": torch.histc(cos, bins=COSINE_BINS, min=0, max=1).long().tolist()}


def abs_cosine_stats(vectors, n_pairs=20000, seed=0):
    """cosine_summary of random pairs of distinct rows of vectors (N, d)."""
    return cosine_summary(cosine_pairs(vectors, n_pairs, seed))


def dense_up_projection_outputs(dense, tokens, layers, n_windows=16):
    """{layer: (n_windows * T, d_ff)} the dense model's W_up x on the first windows of tokens."""
    outputs = {i: [] for i in layers}
    hooks = [dense.blocks[i].ffn.up.register_forward_hook(
        lambda module, inputs, output, i=i: outputs[i].append(output.reshape(-1, output.size(-1))))
        for i in layers]
    block = dense.config.block_size
    windows = tokens[: (len(tokens) // block) * block].view(-1, block)[:n_windows]
    with torch.no_grad():
        dense(windows, windows)
    for h in hooks:
        h.remove()
    return {i: torch.cat(outputs[i]) for i in layers}


def geometry(model, tokens, max_rows=2000, seed=0):
    """|cos| summaries pooled over the model's FFN layers that STEM replaces in its family
    (STEM: table rows of ids seen in tokens; dense: W_up x outputs on tokens at STEM's
    'full' layers), and a random Gaussian baseline of the same width and count."""
    generator = torch.Generator().manual_seed(seed)
    if model.tables is not None:
        seen = tokens.unique()
        ids = seen[torch.randperm(len(seen), generator=generator)[:max_rows]]
        rows = model.tables.read_rows(ids)                                   # (K, n_stem, d_ff)
        per_layer = [rows[:, slot] for slot in range(rows.size(1))]
    elif model.config.ffn == "dense":
        outputs = dense_up_projection_outputs(model, tokens, range(1, model.config.n_layer))
        per_layer = [o[torch.randperm(len(o), generator=generator)[:max_rows]] for o in outputs.values()]
    else:
        return None
    cos = torch.cat([cosine_pairs(v, seed=seed + k) for k, v in enumerate(per_layer)])
    width, count = per_layer[0].shape[1], per_layer[0].shape[0]
    random_cos = cosine_pairs(torch.randn(count, width, generator=generator, dtype=torch.float64), seed=seed)
    return {"rows": cosine_summary(cos), "random": cosine_summary(random_cos), "width": width, "count": count}


# -----------------------------------------------------------------------------
# loss by position

@torch.no_grad()
def loss_by_position(model, tokens, max_tokens=32768, batch_size=16):
    """Per-position mean cross-entropy (T,) over the non-overlapping windows of the first
    max_tokens + 1 tokens (T = the model's block size), float64; and the tokens counted."""
    T = model.config.block_size
    n_windows = min(max_tokens, len(tokens) - 1) // T
    if n_windows < 1:
        raise ValueError(f"{len(tokens)} tokens: fewer than one window of {T} + 1")
    sums = torch.zeros(T, dtype=torch.float64)
    for start in range(0, n_windows, batch_size):
        rows = range(start, min(n_windows, start + batch_size))
        x = torch.stack([tokens[r * T:(r + 1) * T] for r in rows])              # (B, T)
        y = torch.stack([tokens[r * T + 1:(r + 1) * T + 1] for r in rows])
        logits, _ = model(x, y)                                                  # (B, T, V)
        losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none")   # (B, T)
        sums += losses.double().sum(0)
    return sums / n_windows, n_windows * T


def bucket_means(per_position, n_buckets):
    """Means of per_position (T,) over n_buckets equal runs of positions."""
    return [chunk.mean().item() for chunk in per_position.chunk(n_buckets)]


# -----------------------------------------------------------------------------
# key-value retrieval

def single_token_values(tokenizer, limit=1000):
    """Up to `limit` words (letters or digits after a space, in id order) that the tokenizer
    writes as one token: the values of the retrieval prompts, so that each choice is scored
    by one logit."""
    values = []
    for i in range(tokenizer.get_vocab_size()):
        text = tokenizer.decode([i])
        if len(text) >= 3 and text[0] == " " and text[1:].isalnum() and tokenizer.encode(text).ids == [i]:
            values.append(text[1:])
            if len(values) == limit:
                break
    return values


def retrieval_prompt(rng, tokenizer, values, length, n_choices=4):
    """(ids, choice ids, gold index): lines `key = value` filling about `length` tokens,
    then one of the keys again, `key =`; the choices are the query's value and n_choices - 1
    other values of the same prompt. Keys are random 3-letter names, all distinct."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    lines, keys, n_tokens = [], set(), 0
    while True:
        key = "".join(rng.choice(letters) for _ in range(3))
        if key in keys:
            continue
        line = f"{key} = {rng.choice(values)}\n"
        cost = len(tokenizer.encode(line).ids)
        if n_tokens + cost > length - 4 and len(lines) >= n_choices:   # room for the query
            break
        lines.append((key, line))
        keys.add(key)
        n_tokens += cost
    values_of = {k: line[len(k) + 3:-1] for k, line in lines}
    query = rng.choice([k for k, _ in lines])
    others = sorted(set(values_of.values()) - {values_of[query]})
    if len(others) < n_choices - 1:                  # values repeat: draw distractors from the pool
        others = sorted(set(values) - {values_of[query]})
    choices = [values_of[query]] + rng.sample(others, n_choices - 1)
    rng.shuffle(choices)
    text = "".join(line for _, line in lines) + f"{query} ="
    ids = tokenizer.encode(text).ids[-length:]
    choice_ids = [tokenizer.encode(f" {v}").ids[0] for v in choices]
    return ids, choice_ids, choices.index(values_of[query])


@torch.no_grad()
def kv_retrieval(model, tokenizer, lengths, n_prompts=100, n_choices=4, seed=0):
    """{length: accuracy} of picking a key's value among n_choices values of the same
    prompt by the next-token logit after `key =` (chance 1 / n_choices). The prompts of a
    (seed, length) are the same for every model that shares a tokenizer."""
    values = single_token_values(tokenizer)
    if len(values) < n_choices:
        raise ValueError(f"the tokenizer has {len(values)} single-token words, fewer than {n_choices}")
    out = {}
    for length in lengths:
        rng = random.Random(f"{seed}-{length}")
        correct = 0
        for _ in range(n_prompts):
            ids, choice_ids, gold = retrieval_prompt(rng, tokenizer, values, length, n_choices)
            logits, _ = model(torch.tensor([ids]))                              # (1, 1, V)
            correct += int(logits[0, -1, choice_ids].argmax()) == gold
        out[length] = correct / n_prompts
    return out


def val_tokens(dataset, dtype, limit=200_000):
    """The first tokens of a dataset's val split as int64."""
    return torch.from_numpy(np.asarray(data.tokens(dataset, "val", dtype)[:limit]).astype(np.int64))
