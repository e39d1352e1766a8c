"""data/text/prepare.py: bins that decode back to the input files, a stable split by
document, streaming in small chunks, reuse of a tokenizer, clear errors."""

import importlib.util
import json
import os
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("text_prepare", os.path.join(ROOT, "data", "text", "prepare.py"))
text_prepare = importlib.util.module_from_spec(spec)
spec.loader.exec_module(text_prepare)


def make_corpus(folder, n_files=40):
    rng = np.random.default_rng(0)
    words = ["stem", "table", "row", "token", "layer", "the", "of", "a", "gate", "down", "cache", "host"]
    texts = {}
    for i in range(n_files):
        lines = [" ".join(rng.choice(words, size=rng.integers(3, 12))) for _ in range(rng.integers(5, 30))]
        sub = folder / ("sub" if i % 3 else "") / ("skipme" if i == 5 else "")
        sub.mkdir(parents=True, exist_ok=True)
        path = sub / f"doc{i:02d}.txt"
        path.write_text("\n".join(lines) + "\n")
        texts[str(path)] = path.read_text()
    (folder / "notes.md").write_text("not matched by the glob\n")
    return texts


def documents_of(out):
    """Decode each split's bin into its documents (split at end-of-text tokens)."""
    meta = json.loads((out / "meta.json").read_text())
    tokenizer = Tokenizer.from_file(str(out / meta["tokenizer"]))
    docs = {}
    for split in ("train", "val"):
        ids = np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]).tolist()
        assert ids[-1] == meta["eos_id"]
        pieces, current = [], []
        for i in ids:
            if i == meta["eos_id"]:
                pieces.append(tokenizer.decode(current))
                current = []
            else:
                current.append(i)
        docs[split] = pieces
    return meta, docs


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 64])
def test_bins_decode_back_to_the_input_files(tmp_path, chunk_bytes):
    texts = make_corpus(tmp_path / "in")
    out = tmp_path / "out"
    tc = text_prepare.TextConfig(input=str(tmp_path / "in"), out_dir=str(out), vocab_size=300, val_fraction=0.2,
                                 chunk_bytes=chunk_bytes, exclude="skipme")
    meta, counts = text_prepare.prepare(tc)
    assert meta["vocab_size"] <= 300 and meta["dtype"] == "uint16"
    meta, docs = documents_of(out)
    kept = {p: t for p, t in sorted(texts.items()) if "skipme" not in p}
    want = {"train": [], "val": []}
    for path, name in text_prepare.input_files(tc):
        want["val" if text_prepare.is_val(name, 0.2) else "train"].append(kept[path])
    assert docs == want
    assert len(docs["val"]) >= 3 and len(docs["train"]) >= 20         # about a fifth held out
    assert counts["train"] == len(np.fromfile(out / "train.bin", dtype="uint16"))


def test_reusing_a_tokenizer_and_max_bytes(tmp_path):
    make_corpus(tmp_path / "in")
    first = tmp_path / "first"
    text_prepare.prepare(text_prepare.TextConfig(input=str(tmp_path / "in"), out_dir=str(first), vocab_size=300,
                                                 val_fraction=0.2))
    second = tmp_path / "second"
    text_prepare.prepare(text_prepare.TextConfig(input=str(tmp_path / "in"), out_dir=str(second), val_fraction=0.2,
                                                 tokenizer=str(first / "tokenizer.json")))
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()
    # the same corpus elsewhere on disk: the same split, the same BPE, the same bins
    shutil.copytree(tmp_path / "in", tmp_path / "moved" / "corpus")
    third = tmp_path / "third"
    text_prepare.prepare(text_prepare.TextConfig(input=str(tmp_path / "moved" / "corpus"), out_dir=str(third),
                                                 vocab_size=300, val_fraction=0.2))
    for name in ("train.bin", "val.bin", "tokenizer.json"):
        assert (first / name).read_bytes() == (third / name).read_bytes()
    small = tmp_path / "small"
    _, counts = text_prepare.prepare(text_prepare.TextConfig(input=str(tmp_path / "in"), out_dir=str(small),
                                                             tokenizer=str(first / "tokenizer.json"),
                                                             val_fraction=0.2, max_bytes=2000))
    assert 0 < counts["train"] + counts["val"] < 0.3 * sum(
        len(np.fromfile(first / f"{s}.bin", dtype="uint16")) for s in ("train", "val"))


def test_clear_errors(tmp_path):
    with pytest.raises(SystemExit, match="--input"):
        text_prepare.main([f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="neither a file nor a folder"):
        text_prepare.main([f"--input={tmp_path / 'missing'}", f"--out_dir={tmp_path}"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no files matching"):
        text_prepare.main([f"--input={tmp_path / 'empty'}", f"--out_dir={tmp_path}"])
    with pytest.raises(SystemExit, match="unknown config key 'vocab'"):
        text_prepare.main(["--vocab=10"])
