"""
Sample from a trained model.

    python sample.py --out_dir=out-facts --start="The capital of France is" --temperature=0
    python sample.py --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=100
    python sample.py --start="The capital of Spain is" --temperature=0 --swap=Spain:Germany --compare=True

--swap=A:B gives word A the table rows of word B in every STEM layer before generating
(repeat the flag, or write A:B,C:D, for several edits); --compare=True prints the
unedited completion beside the edited one.

In Python, `load_checkpoint(out_dir)` gives a ready model and its tokenizer, and
`complete(model, tokenizer, prompt)` continues a prompt (greedy by default).
"""

import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

import configurator
import offload
import stem
from configurator import UsageError, knob
from model import GPT, GPTConfig


@dataclass
class SampleConfig:
    out_dir: str = "out-facts"      # folder with ckpt.pt (or a path to a .pt file)
    start: str = "The capital of France is"   # a prompt, or FILE:path to read it from a file
    num_samples: int = knob(1, ge=1)
    max_new_tokens: int = knob(20, ge=0)
    temperature: float = knob(0.8, ge=0)   # 0 means greedy
    top_k: int = knob(200, ge=0)            # 0 means no top-k filtering
    seed: int = knob(1337, ge=0)
    device: str = "auto"
    dtype: str = knob("auto", choices=configurator.DTYPES)
    tables: str = knob("resident", choices=("resident", "offload"))   # offload: host memory + a device LFU cache
    table_cache_fraction: float = knob(0.1, gt=0, le=1)
    swap: str = ""                  # "A:B[,C:D]": word A takes word B's STEM rows (knowledge editing)
    compare: bool = False           # with swap: print the unedited completion too

    def __post_init__(self):
        configurator.check(self)


def load_checkpoint(path, device="cpu", need_tokenizer=True, tables="resident", cache_fraction=0.1, batch_size=1,
                    dtype="float32"):
    """Load a checkpoint written by train.py (its folder or the file) and return
    (model, tokenizer): the model in eval mode on `device`, the tokenizer it was trained
    with (stored inside the checkpoint, so the data folder is not needed; None for data
    without one when need_tokenizer=False). tables="offload" keeps the STEM tables in
    host memory with an LFU cache of cache_fraction * vocab rows on the device.

    The checkpoint is mapped, not read, and the model is built on the meta device and
    given the mapped tensors: nothing is allocated twice, and the optimiser moments (most
    of a training checkpoint) are never touched. Only the backbone (and, resident, the
    tables) moves to the device; offloaded tables never go there whole."""
    checkpoint, ckpt_path = configurator.read_checkpoint(path, mmap=True)
    config = GPTConfig(**checkpoint["model_config"])
    with torch.device("meta"):
        model = GPT(config)
    model.load_state_dict(checkpoint["model"], assign=True)
    if config.tie_embeddings:       # assign gives each name its own parameter: tie them again
        model.lm_head.weight = model.wte.weight
    model.reset_rope()
    if checkpoint["tokenizer_json"] is None and need_tokenizer:
        raise UsageError(f"{ckpt_path} was trained on data without a tokenizer; cannot decode text")
    model.eos_id = checkpoint["meta"]["eos_id"]
    model.dataset, model.data_dtype = checkpoint["train_config"]["dataset"], checkpoint["meta"]["dtype"]
    tokenizer = Tokenizer.from_str(checkpoint["tokenizer_json"]) if checkpoint["tokenizer_json"] else None
    if tables == "offload" and model.tables is not None:
        offload_for_inference(model, device, cache_fraction, batch_size, dtype)     # before anything moves
    return model.to(device).eval(), tokenizer


def offload_for_inference(model, device, cache_fraction, batch_size=1, dtype="float32"):
    """Move the model's STEM tables to host memory with an LFU cache of
    cache_fraction * vocab rows on the device (rows in the compute dtype)."""
    vocab_size = model.config.vocab_size
    cache_rows = max(1, int(cache_fraction * vocab_size))
    transient_rows = min(batch_size * model.config.block_size, vocab_size)   # one prefill's worth
    return offload.use_sparse_tables(model, device, cache_rows, transient_rows, training=False,
                                     dtype=getattr(torch, dtype))


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


def parse_swaps(text):
    """"Spain:Germany,France:Italy" -> [("Spain", "Germany"), ("France", "Italy")]."""
    pairs = []
    for item in (s for s in text.split(",") if s.strip()):
        source, colon, target = item.partition(":")
        if not colon or not source.strip() or not target.strip():
            raise UsageError(f"swap expects A:B pairs such as Spain:Germany, got '{item}'")
        pairs.append((source.strip(), target.strip()))
    return pairs


def apply_swaps(model, tokenizer, pairs, prompt=None, known_ids=None):
    """Swap the STEM rows of each (A, B) pair (stem.swap_rows); returns the Edits, to undo
    in reverse order. A word whose tokens are not all in known_ids (the token ids seen in
    training) is an error: its rows were never trained. A source word absent from the
    prompt only gets a warning: the edit is valid but changes nothing there."""
    if model.tables is None:
        raise UsageError("this checkpoint is a dense model: it has no STEM rows to swap")
    prompt_ids = tokenizer.encode(prompt).ids if prompt is not None else None
    edits = []
    for source, target in pairs:
        source_ids, target_ids = stem.entity_ids(tokenizer, source), stem.entity_ids(tokenizer, target)
        for word, ids in ((source, source_ids), (target, target_ids)):
            unseen = [tokenizer.id_to_token(i) for i in ids if known_ids is not None and i not in known_ids]
            if unseen:
                raise UsageError(f"unknown word '{word}': its tokens {unseen} never occur in the "
                                       f"training data, so their rows are untrained")
        if set(source_ids) & set(target_ids):
            raise UsageError(f"'{source}' and '{target}' share tokens; a swap between them is not clean")
        if prompt_ids is not None and not contains(prompt_ids, source_ids):
            warnings.warn(f"'{source}' does not occur in the prompt (as ' {source}'); this swap changes nothing there")
        edits.append(stem.swap_rows(model.tables, source_ids, target_ids))
    return edits


def contains(ids, part):
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def training_token_ids(model):
    """The set of token ids in the model's training data, or None when that data is not
    on this machine (the unknown-word check is then skipped)."""
    path = os.path.join(configurator.data_dir_of(model.dataset), "train.bin")
    if not os.path.exists(path):
        return None
    data = np.memmap(path, dtype=model.data_dtype, mode="r")
    return set(np.flatnonzero(np.bincount(data, minlength=model.config.vocab_size)).tolist())


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # --swap may be repeated: join the repeats into one comma-separated value
    swaps = [a.partition("=")[2] for a in argv if a.startswith("--swap=")]
    argv = [a for a in argv if not a.startswith("--swap=")] + ([f"--swap={','.join(swaps)}"] if swaps else [])
    try:
        sc = SampleConfig(**configurator.parse_overrides(argv, SampleConfig))
        device, dtype = configurator.resolve_device(sc.device, sc.dtype)
        model, tokenizer = load_checkpoint(sc.out_dir, device, tables=sc.tables, cache_fraction=sc.table_cache_fraction,
                                           batch_size=sc.num_samples, dtype=dtype)
        prompt = sc.start
        if prompt.startswith("FILE:"):
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        pairs = parse_swaps(sc.swap)

        def completions():
            generator = torch.Generator(device=device).manual_seed(sc.seed)
            with configurator.autocast_context(device, dtype):
                return [complete(model, tokenizer, prompt, sc.max_new_tokens, sc.temperature, sc.top_k or None,
                                 generator) for _ in range(sc.num_samples)]

        before = completions() if pairs and sc.compare else None
        if pairs:
            apply_swaps(model, tokenizer, pairs, prompt, training_token_ids(model))
        after = completions()
    except (UsageError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    edited = ", ".join(f"{a} -> {b}" for a, b in pairs)
    for i, text in enumerate(after):
        if before is not None:      # the same seed for both, so only the edit differs
            print(f"unedited: {prompt}{before[i]}")
            print(f"edited ({edited}): {prompt}{text}")
        else:
            print(prompt + text)
        print("---------------")


if __name__ == "__main__":
    main()
