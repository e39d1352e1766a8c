"""
Tokenise local text files into train.bin / val.bin / meta.json for train.py.

    python data/text/prepare.py --input=path/to/books,notes.txt --vocab_size=32768
    python data/text/prepare.py --input=/usr/lib/python3.12 --glob="*.py" --exclude=site-packages
                                                                              # the stdlib, as text
    python data/text/prepare.py --input=corpus --tokenizer=tokenizer.json    # reuse a tokenizer
    python data/text/prepare.py --hf_dataset=HuggingFaceFW/fineweb-edu --hf_name=sample-10BT \
        --max_bytes=20000000000                                               # needs `datasets` + network

Every input file is a document (an end-of-text token follows it); a document goes to val
when a hash of its name (its path inside the --input folder) falls under val_fraction, so
the split is the same across runs, machines and places on disk. Nothing is loaded whole:
files are read in chunks of about chunk_bytes that end at a line break, both to train the
BPE (tokenizers counts words as the chunks stream by) and to encode (chunks are encoded in
parallel batches and appended to the bins). A chunk boundary
at a line break can merge tokens differently from a whole-file encoding only across that
line break.
"""

import fnmatch
import json
import os
import sys
import zlib
from dataclasses import dataclass

import numpy as np
from tqdm import tqdm

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))
import configurator  # noqa: E402  (the repository root's: knobs and the override parser)
from configurator import UsageError, knob  # noqa: E402
EOS = "<|endoftext|>"


@dataclass
class TextConfig:
    input: str = knob("", help="comma-separated files and folders")
    glob: str = knob("*.txt", help="which files of a folder to read (recursively)")
    exclude: str = knob("", help="comma-separated folder names to skip, e.g. site-packages")
    out_dir: str = knob(HERE, help="where train.bin, val.bin, meta.json and tokenizer.json go")
    vocab_size: int = knob(32768, ge=64, help="of the BPE trained here")
    tokenizer: str = knob("", help="an existing tokenizer.json to use instead of training one")
    val_fraction: float = knob(0.01, gt=0, lt=1, help="the fraction of documents (files) that go to val")
    max_bytes: int = knob(0, ge=0, help="stop after this many input bytes (0: all)")
    chunk_bytes: int = knob(1 << 20, ge=1, help="bytes read (and encoded) at a time, cut at a line break")
    hf_dataset: str = knob("", help="a Hugging Face dataset name instead of --input (streamed; needs `datasets` "
                                    "and the network), e.g. HuggingFaceFW/fineweb-edu")
    hf_name: str = knob("", help="its configuration, if any, e.g. sample-10BT")
    hf_split: str = knob("train", help="its split")
    hf_text_field: str = knob("text", help="the field that holds a document's text")

    def __post_init__(self):
        configurator.check(self)


def input_files(tc):
    """(path, name) of the files named by --input (folders searched recursively with --glob),
    in a fixed order. The name is the path relative to the folder given (a lone file: its base
    name), so that the train/val split does not depend on where the corpus sits on disk."""
    files = []
    for item in (s.strip() for s in tc.input.split(",") if s.strip()):
        if os.path.isfile(item):
            files.append((item, os.path.basename(item)))
        elif os.path.isdir(item):
            skip = {s.strip() for s in tc.exclude.split(",") if s.strip()}
            for root, dirs, names in os.walk(item):
                dirs[:] = sorted(d for d in dirs if d not in skip)
                paths = [os.path.join(root, n) for n in sorted(names) if fnmatch.fnmatch(n, tc.glob)]
                files += [(p, os.path.relpath(p, item).replace(os.sep, "/")) for p in paths]
        else:
            raise FileNotFoundError(f"--input '{item}' is neither a file nor a folder")
    if not files:
        raise FileNotFoundError(f"no files matching '{tc.glob}' in --input={tc.input!r}")
    return files


def is_val(name, fraction):
    return zlib.crc32(name.encode()) / 2 ** 32 < fraction


def file_documents(tc):
    """(name, chunks) per input file; chunks is a generator of text pieces ending at line
    breaks, so that no file is ever held whole in memory."""
    def chunks(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            while True:
                text = f.read(tc.chunk_bytes)
                if not text:
                    return
                rest = f.readline()          # finish the line so a chunk ends at a line break
                yield text + rest
    for path, name in input_files(tc):
        yield name, chunks(path)


def hf_documents(tc):
    try:
        import datasets
    except ImportError:
        raise SystemExit("error: --hf_dataset needs the `datasets` package (pip install datasets) and network")
    stream = datasets.load_dataset(tc.hf_dataset, tc.hf_name or None, split=tc.hf_split, streaming=True)
    for i, row in enumerate(stream):
        yield f"{tc.hf_dataset}/{i}", iter([row[tc.hf_text_field]])


def documents(tc):
    return hf_documents(tc) if tc.hf_dataset else file_documents(tc)


def stream(tc, progress):
    """(is_val, text chunk, last chunk of its document) over the corpus, up to max_bytes."""
    seen = 0
    for name, chunks in documents(tc):
        val = is_val(name, tc.val_fraction)
        previous = None
        for chunk in chunks:
            if previous is not None:
                yield val, previous, False
            previous = chunk
            size = len(chunk.encode("utf-8", errors="replace"))
            seen += size
            progress.update(size)
        if previous is not None:
            yield val, previous, True
        if tc.max_bytes and seen >= tc.max_bytes:
            return


def total_bytes(tc):
    if tc.hf_dataset:
        return tc.max_bytes or None
    size = sum(os.path.getsize(path) for path, _ in input_files(tc))
    return min(size, tc.max_bytes) if tc.max_bytes else size


def train_tokenizer(tc):
    """A byte-level BPE of tc.vocab_size trained on the training documents, streamed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=tc.vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    with tqdm(total=total_bytes(tc), unit="B", unit_scale=True, desc="train BPE") as progress:
        tokenizer.train_from_iterator((text for val, text, _ in stream(tc, progress) if not val), trainer)
    return tokenizer


def encode_corpus(tc, tokenizer, eos_id, dtype):
    """Append the token ids of every document to train.bin or val.bin; returns the counts."""
    paths = {split: os.path.join(tc.out_dir, f"{split}.bin") for split in ("train", "val")}
    files = {split: open(path + ".tmp", "wb") for split, path in paths.items()}
    counts = {"train": 0, "val": 0}
    batch = []

    def flush():
        for (val, _, last), encoding in zip(batch, tokenizer.encode_batch([text for _, text, _ in batch])):
            ids = encoding.ids + ([eos_id] if last else [])
            split = "val" if val else "train"
            np.asarray(ids, dtype=dtype).tofile(files[split])
            counts[split] += len(ids)
        batch.clear()

    with tqdm(total=total_bytes(tc), unit="B", unit_scale=True, desc="encode") as progress:
        for item in stream(tc, progress):
            batch.append(item)
            if len(batch) >= 64:            # encode_batch runs the batch on all cores
                flush()
        flush()
    for split, f in files.items():
        f.close()
        os.replace(paths[split] + ".tmp", paths[split])     # a half-written bin never looks done
    return counts


def prepare(tc):
    from tokenizers import Tokenizer
    os.makedirs(tc.out_dir, exist_ok=True)
    tokenizer = Tokenizer.from_file(tc.tokenizer) if tc.tokenizer else train_tokenizer(tc)
    eos_id = tokenizer.token_to_id(EOS)
    if eos_id is None:
        tokenizer.add_special_tokens([EOS])
        eos_id = tokenizer.token_to_id(EOS)
    vocab_size = tokenizer.get_vocab_size()
    dtype = "uint16" if vocab_size <= 65536 else "uint32"
    tokenizer.save(os.path.join(tc.out_dir, "tokenizer.json"))
    counts = encode_corpus(tc, tokenizer, eos_id, dtype)
    if counts["val"] == 0 or counts["train"] == 0:
        raise SystemExit(f"error: the split left {counts} tokens; raise or lower --val_fraction "
                         f"(documents are whole files, so a few files cannot be split finely)")
    meta = {"vocab_size": vocab_size, "dtype": dtype, "tokenizer": "tokenizer.json", "eos_id": eos_id,
            "dataset": os.path.basename(os.path.normpath(tc.out_dir))}
    with open(os.path.join(tc.out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    print(f"{counts['train']:,} train tokens, {counts['val']:,} val tokens, vocab {vocab_size} -> {tc.out_dir}")
    return meta, counts


def main(argv=None):
    try:
        tc = TextConfig(**configurator.parse(sys.argv[1:] if argv is None else argv, TextConfig, doc=__doc__))
        if not tc.input and not tc.hf_dataset:
            raise UsageError("give --input=FILES_OR_FOLDERS (or --hf_dataset=NAME)")
        return prepare(tc)
    except (UsageError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
