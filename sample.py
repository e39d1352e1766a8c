"""
Sample from a trained model.

    python sample.py --out_dir=out-facts --start="The capital of France is" --temperature=0
    python sample.py --start=FILE:prompt.txt --num_samples=3 --max_new_tokens=100

In Python, `load_checkpoint(out_dir)` gives a ready model and its tokenizer, and
`complete(model, tokenizer, prompt)` continues a prompt (greedy by default).
"""

import os
import sys
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer

import offload
import train
from model import GPT, GPTConfig


@dataclass
class SampleConfig:
    out_dir: str = "out-facts"      # folder with ckpt.pt (or a path to a .pt file)
    start: str = "The capital of France is"   # a prompt, or FILE:path to read it from a file
    num_samples: int = 1
    max_new_tokens: int = 20
    temperature: float = 0.8        # 0 means greedy
    top_k: int = 200                # 0 means no top-k filtering
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    tables: str = "resident"        # resident | offload (tables in host memory, an LFU cache on the device)
    table_cache_fraction: float = 0.1


def load_checkpoint(path, device="cpu"):
    """Load a checkpoint written by train.py (its folder or the file) and return
    (model, tokenizer): the model in eval mode on `device`, the tokenizer it was trained
    with (stored inside the checkpoint, so the data folder is not needed)."""
    ckpt_path = os.path.join(path, "ckpt.pt") if os.path.isdir(path) else path
    if not os.path.exists(ckpt_path):
        raise train.UsageError(f"no checkpoint at {ckpt_path}: train one with `python train.py` first")
    checkpoint = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    model = GPT(GPTConfig(**checkpoint["model_config"]))
    model.load_state_dict(checkpoint["model"])
    if checkpoint["tokenizer_json"] is None:
        raise train.UsageError(f"{ckpt_path} was trained on data without a tokenizer; cannot decode text")
    model.eos_id = checkpoint["meta"]["eos_id"]
    return model.to(device).eval(), Tokenizer.from_str(checkpoint["tokenizer_json"])


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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    try:
        sc = SampleConfig(**train.parse_overrides(argv, SampleConfig))
        device, dtype = train.resolve_device(sc.device, sc.dtype)
        model, tokenizer = load_checkpoint(sc.out_dir, device)
        if sc.tables == "offload" and model.tables is not None:
            offload_for_inference(model, device, sc.table_cache_fraction, sc.num_samples, dtype)
        elif sc.tables not in ("resident", "offload"):
            raise train.UsageError(f"tables must be resident or offload, got '{sc.tables}'")
        prompt = sc.start
        if prompt.startswith("FILE:"):
            with open(prompt[5:], encoding="utf-8") as f:
                prompt = f.read()
        generator = torch.Generator(device=device).manual_seed(sc.seed)
        with train.autocast_context(device, dtype):
            for _ in range(sc.num_samples):
                text = complete(model, tokenizer, prompt, sc.max_new_tokens, sc.temperature,
                                sc.top_k or None, generator)
                print(prompt + text)
                print("---------------")
    except (train.UsageError, ValueError, OSError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
