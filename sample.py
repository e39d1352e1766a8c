"""
Sample from a trained model.

    python sample.py --out_dir=out-facts --start="The capital of France is" --temperature=0
    python sample.py --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=100
    python sample.py --start="The capital of Spain is" --temperature=0 --swap=Spain:Germany --compare=True

--swap=A:B gives word A the table rows of word B in every STEM layer before generating
(repeat the flag, or write A:B,C:D, for several edits); --compare=True prints the
unedited completion beside the edited one.

In Python, `checkpoint.load_model(out_dir)` gives a ready model and its tokenizer, and
`tasks.complete(model, tokenizer, prompt)` continues a prompt (greedy by default).
"""

import sys
from dataclasses import dataclass

import torch

import checkpoint
import configurator
import data
import stem
import tasks
from configurator import UsageError, knob


@dataclass
class SampleConfig:
    out_dir: str = knob("out-facts", help="folder with ckpt.pt (or a path to a .pt file)")
    start: str = knob("The capital of France is", help="the prompt, or FILE:path to read it from a file")
    num_samples: int = knob(1, ge=1, help="completions to print")
    max_new_tokens: int = knob(20, ge=0, help="tokens generated per completion")
    temperature: float = knob(0.8, ge=0, help="0 means greedy")
    top_k: int = knob(200, ge=0, help="sample among the k most likely tokens; 0: among all")
    seed: int = knob(1337, ge=0, help="the sampling generator's seed")
    device: str = knob("auto", help=configurator.DEVICE_HELP)
    dtype: str = knob("auto", choices=configurator.DTYPES, help="auto: bfloat16 on CUDA, float32 on CPU")
    tables: str = knob("resident", choices=("resident", "offload"),
                       help="offload: the STEM tables in host memory, an LFU cache of rows on the device")
    table_cache_fraction: float = knob(0.1, gt=0, le=1, help="offload: device cache rows / vocabulary")
    swap: str = knob("", help="A:B[,C:D]: word A takes word B's STEM rows in every layer (knowledge editing); "
                              "the flag may be repeated")
    compare: bool = knob(False, help="with swap: print the unedited completion too")

    def __post_init__(self):
        configurator.check(self)


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
    prompt gets a printed note: the edit is valid but changes nothing there."""
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
            print(f"note: '{source}' is not in the prompt as ' {source}' (after a space: the token form a swap "
                  f"edits), so this swap changes nothing in it; write it mid-sentence, e.g. 'The capital of {source} is'")
        edits.append(stem.swap_rows(model.tables, source_ids, target_ids))
    return edits


def contains(ids, part):
    return any(ids[i:i + len(part)] == part for i in range(len(ids) - len(part) + 1))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    # --swap may be repeated: join the repeats into one comma-separated value
    swaps = [a.partition("=")[2] for a in argv if a.startswith("--swap=")]
    argv = [a for a in argv if not a.startswith("--swap=")] + ([f"--swap={','.join(swaps)}"] if swaps else [])
    try:
        sc = SampleConfig(**configurator.parse(argv, SampleConfig, doc=__doc__))
        device, dtype = configurator.resolve_device(sc.device, sc.dtype)
        model, tokenizer = checkpoint.load_model(sc.out_dir, device, tables_at=sc.tables,
                                                 cache_fraction=sc.table_cache_fraction, batch_size=sc.num_samples,
                                                 dtype=dtype)
        prompt = sc.start
        if prompt.startswith("FILE:"):
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        pairs = parse_swaps(sc.swap)

        def completions():
            generator = torch.Generator(device=device).manual_seed(sc.seed)
            with configurator.autocast_context(device, dtype):
                return [tasks.complete(model, tokenizer, prompt, sc.max_new_tokens, sc.temperature, sc.top_k or None,
                                 generator) for _ in range(sc.num_samples)]

        before = completions() if pairs and sc.compare else None
        if pairs:
            apply_swaps(model, tokenizer, pairs, prompt, data.token_ids_seen(model.dataset, model.data_dtype,
                                                                             model.config.vocab_size))
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
