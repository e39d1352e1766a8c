"""
Measure what a model trained on the facts corpus knows, and how well row swaps edit it.

    python data/facts/evaluate.py --out_dir=out-facts                   # recall accuracy
    python data/facts/evaluate.py --out_dir=out-facts --task=edit       # knowledge editing
    python data/facts/evaluate.py --out_dir=out-facts-dense --task=edit # dense control

recall: greedy completion of every country x held-out template (wordings never seen in
training), per attribute; an answer counts when the completion starts with it.
edit: for a seeded sample of ordered pairs (A, B), swap A's rows for B's in every STEM
layer (for a dense model: A's input-embedding rows, the closest analogue) and ask the
held-out prompts about A. success = answers B's attribute; locality = prompts about other
countries keep their answers; reversible = undo restores every row bit for bit and the
original answers.
"""

import os
import random
import sys
from dataclasses import dataclass

import torch
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, HERE)
import prepare as facts  # noqa: E402
import checkpoint  # noqa: E402
import configurator  # noqa: E402
import stem  # noqa: E402
import tasks  # noqa: E402
from configurator import knob  # noqa: E402


@dataclass
class EvalConfig:
    out_dir: str = knob("out-facts", help="the checkpoint (its folder or the file)")
    task: str = knob("recall", choices=("recall", "edit"), help="recall: held-out wordings answered; edit: row swaps")
    attributes: str = knob("capital,continent,language,currency", help="comma-separated attributes to ask about")
    pairs: int = knob(100, ge=1, help="edit: ordered country pairs sampled")
    locality_countries: int = knob(10, ge=0, help="edit: other countries checked per pair")
    seed: int = knob(0, ge=0, help="edit: the draw of pairs and other countries")
    device: str = knob("cpu", help="cpu | cuda | cuda:N")

    def __post_init__(self):
        configurator.check(self)
        unknown = [a for a in self.attributes.split(",") if a and a not in facts.ATTRIBUTES]
        if unknown:
            raise configurator.UsageError(f"unknown attribute {unknown[0]!r}; attributes are among {facts.ATTRIBUTES}")


def complete_batch(model, tokenizer, prompts, max_new_tokens):
    """Greedy completions of many prompts; prompts of equal token length share a batch."""
    encoded = [tokenizer.encode(p).ids for p in prompts]
    out = [None] * len(prompts)
    by_length = {}
    for i, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(i)
    device = model.wte.weight.device
    for length, members in by_length.items():
        idx = torch.tensor([encoded[i] for i in members], device=device)
        generated = model.generate(idx, max_new_tokens, temperature=0)[:, length:]
        for i, row in zip(members, generated.tolist()):
            out[i] = tasks.decode(model, tokenizer, row)
    return out


def answer_prompts(attribute, countries=None, mid_sentence=False):
    """(country, prompt, answer) of the held-out templates; mid_sentence keeps only the
    templates where the country follows a space (the token form an edit swaps)."""
    rows = [r for r in facts.eval_prompts(attribute, heldout=True) if countries is None or r[0] in countries]
    if mid_sentence:
        rows = [r for r in rows if (" " + r[0]) in r[1]]
    return rows


def accuracy(model, tokenizer, rows, expected=None):
    """Fraction of rows whose completion starts with the expected answer (default: the row's)."""
    if not rows:
        return float("nan"), []
    n_tokens = max(len(tokenizer.encode(answer).ids) for _, _, answer in rows) + 1
    completions = complete_batch(model, tokenizer, [prompt for _, prompt, _ in rows], n_tokens)
    expected = expected or [answer for _, _, answer in rows]
    hits = [c.startswith(e) for c, e in zip(completions, expected)]
    return sum(hits) / len(hits), completions


def recall(model, tokenizer, attributes):
    results = {}
    for attribute in tqdm(attributes, desc="recall", leave=False):
        held_out, _ = accuracy(model, tokenizer, answer_prompts(attribute))
        seen, _ = accuracy(model, tokenizer, [(c, p, a) for c, p, a in facts.eval_prompts(attribute, heldout=False)])
        results[attribute] = (held_out, seen)
        tqdm.write(f"{attribute:<10} held-out templates {100 * held_out:6.2f}%   training templates {100 * seen:6.2f}%")
    return results


def row_store(model):
    return model.tables if model.tables is not None else stem.EmbeddingRows(model.wte)


def edit_eval(model, tokenizer, attributes, n_pairs, n_local, seed):
    """Swap rows for sampled pairs; return {attribute: (success, locality, reversible, n)}."""
    rng = random.Random(seed)
    by_name = {row[0]: row for row in facts.COUNTRIES}
    ids = {name: stem.entity_ids(tokenizer, name) for name in by_name}
    store = row_store(model)
    results = {}
    for attribute in attributes:
        success, local, reversible, skipped = [], [], [], 0
        pairs = [(a, b) for a in by_name for b in by_name if a != b]
        for a, b in tqdm(rng.sample(pairs, min(n_pairs, len(pairs))), desc=f"{attribute} edits", leave=False):
            target = facts.answer_of(by_name[b], attribute)
            if target == facts.answer_of(by_name[a], attribute) or set(ids[a]) & set(ids[b]):
                skipped += 1      # same answer (nothing to measure) or shared tokens (no clean swap)
                continue
            about_a = answer_prompts(attribute, {a}, mid_sentence=True)
            others = rng.sample([c for c in by_name if c not in (a, b)], n_local)
            about_others = answer_prompts(attribute, set(others), mid_sentence=True)
            before_table = store.read_rows(ids[a])
            _, others_before = accuracy(model, tokenizer, about_others)
            _, a_before = accuracy(model, tokenizer, about_a)
            edit = stem.swap_rows(store, ids[a], ids[b])
            hit, _ = accuracy(model, tokenizer, about_a, [" " + target] * len(about_a))
            _, others_after = accuracy(model, tokenizer, about_others)
            edit.undo()
            _, a_after_undo = accuracy(model, tokenizer, about_a)
            success.append(hit)
            local += [x == y for x, y in zip(others_before, others_after)]
            reversible.append(torch.equal(store.read_rows(ids[a]), before_table) and a_after_undo == a_before)
        mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
        results[attribute] = (mean(success), mean(local), all(reversible), len(success))
        tqdm.write(f"{attribute:<10} edit success {100 * mean(success):6.2f}%   locality {100 * mean(local):6.2f}%   "
              f"reversible {all(reversible)}   pairs {len(success)} (skipped {skipped})")
    return results


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        ec = EvalConfig(**configurator.parse(argv, EvalConfig, doc=__doc__))
        model, tokenizer = checkpoint.load_model(ec.out_dir, ec.device)
        attributes = [a for a in ec.attributes.split(",") if a]
    except configurator.UsageError as e:
        sys.exit(f"error: {e}")
    kind = "STEM" if model.tables is not None else "dense (input-embedding swap)"
    print(f"{ec.out_dir}: {kind} model, {len(facts.COUNTRIES)} countries")
    if ec.task == "recall":
        return recall(model, tokenizer, attributes)
    return edit_eval(model, tokenizer, attributes, ec.pairs, ec.locality_countries, ec.seed)


if __name__ == "__main__":
    main()
