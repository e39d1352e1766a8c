"""
A small modern GPT with STEM feed-forward layers, readable top to bottom.

Backbone: token embedding -> n_layer x [RMSNorm -> causal attention (RoPE, SDPA,
optional grouped-query heads) -> RMSNorm -> FFN] -> RMSNorm -> lm_head. No biases.

The FFN of a layer is either the dense SwiGLU `W_down(SiLU(W_gate x) * W_up x)` or a
STEM FFN (stem.py) whose up-projection is a row of a per-layer table looked up by the
input token id; or, for comparisons, one of the sparse baselines of moe.py (--ffn=moe,
expert_choice, hash_moe, mot) in the same layers. All STEM tables live in one
`ResidentTables` module (stem.py) laid out as (vocab, n_stem, d_ff): the model looks up
the rows of the batch's unique token ids once per forward, and every STEM layer reads its
slice through an inverse index.
"""

import math
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

import configurator
import moe
import stem
from configurator import UsageError, knob
from moe import MoEConfig


@dataclass
class GPTConfig:
    block_size: int = knob(64, ge=1, help="context length in tokens", section="model (model.GPTConfig)")
    vocab_size: int = knob(2048, ge=1, help="train.py sets it from the dataset's meta.json unless given")
    n_layer: int = knob(4, ge=1, help="transformer blocks")
    n_head: int = knob(4, ge=1, help="attention heads")
    n_kv_head: int = knob(0, ge=0, help="key/value heads: 0 means n_head (plain multi-head), fewer is grouped-query")
    n_embd: int = knob(128, ge=2, help="model width")
    d_ff: int = knob(0, ge=0, help="FFN hidden size; 0 means SwiGLU's 8/3 * n_embd rounded up to a multiple of 64")
    dropout: float = knob(0.0, ge=0, lt=1, help="dropout on the embeddings and in attention")
    tie_embeddings: bool = knob(False, help="share the input embedding and the output head")
    rope_theta: float = knob(10000.0, gt=0, help="RoPE base")
    ffn: str = knob("stem", choices=("dense", "stem") + moe.FAMILIES,
                    help="the FFN of the sparse layers: stem, dense everywhere, or a moe.py baseline")
    stem_layers: str = knob("full", help="which layers get the sparse FFN (STEM or a baseline): none, third, "
                                         "half, full, or a list such as 1,3,5; layer 0 stays dense")
    stem_variant: str = knob("up", choices=stem.VARIANTS,
                             help="up: the paper's STEM; gate, up+table: the paper's ablations")
    moe: MoEConfig = field(default_factory=MoEConfig)    # the moe.py baselines' knobs

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        configurator.check(self)
        if self.n_kv_head == 0:
            self.n_kv_head = self.n_head
        if self.d_ff == 0:
            self.d_ff = 64 * math.ceil(8 * self.n_embd / 3 / 64)
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise UsageError(f"n_embd ({self.n_embd}) must divide by n_head ({self.n_head}) "
                             f"and n_head by n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise UsageError("head size n_embd/n_head must be even for RoPE")
        try:
            if self.ffn in moe.FAMILIES:
                moe.top_k_of(self)                    # checks moe_top_k against n_experts
            self.sparse_layer_ids = stem.select_layers(self.stem_layers if self.ffn != "dense" else "none",
                                                       self.n_layer)
        except ValueError as e:
            raise UsageError(str(e)) from None
        self.stem_layer_ids = self.sparse_layer_ids if self.ffn == "stem" else ()

    @classmethod
    def from_dict(cls, values):
        """A GPTConfig from flat knobs (flags; the MoE ones go to its MoEConfig) or from the
        nested dict of a checkpoint (dataclasses.asdict)."""
        values = dict(values)
        moe_names = {f.name for f in configurator.knobs(MoEConfig)}
        moe_values = {**values.pop("moe", {}), **{k: values.pop(k) for k in list(values) if k in moe_names}}
        return configurator.build(cls, **values, moe=configurator.build(MoEConfig, **moe_values))


# -----------------------------------------------------------------------------
# building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 so that bf16 activations do not lose the mean square
        return F.rms_norm(x.float(), self.weight.shape, self.weight.float(), self.eps).type_as(x)


def rope_cache(head_dim, max_len, theta, device=None):
    """cos/sin of the rotary angles, each (max_len, head_dim/2)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim)
    angles = torch.outer(torch.arange(max_len, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    # x: (B, T, heads, hd); rotate the pairs (x1, x2) = (first half, second half) of each head.
    # cos, sin: (T, hd/2), broadcast over batch and heads
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos[:, None].to(x.dtype), sin[:, None].to(x.dtype)          # (T, 1, hd/2)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class CrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits (N, V) against targets (N,), targets of -1 ignored: the
    value and gradient of F.cross_entropy(logits.float(), targets, ignore_index=-1). torch's
    backward zero-fills an (N, V) buffer for the target picks and then runs the log-softmax
    backward into a fresh (N, V) gradient; here the saved log-probabilities become the
    gradient in place, softmax * scale - scale at the target, and no new buffer is made.
    Why not F.cross_entropy: on a GPU too its backward peaks at one to two more float32
    (N, V) buffers, 3 to 6 GiB at the 350M micro-batch (tests/test_model.py measures it)."""

    @staticmethod
    def forward(ctx, logits, targets):
        # at least float32: bf16 logits lose the small probabilities
        logprobs = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (N, V)
        valid = targets >= 0
        picked = logprobs.gather(1, targets.clamp(min=0)[:, None])[:, 0]    # (N,)
        n_valid = valid.sum()
        ctx.save_for_backward(logprobs, targets, n_valid)
        ctx.logits_dtype = logits.dtype
        return -(picked * valid).sum() / n_valid

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        logprobs, targets, n_valid = ctx.saved_tensors
        row_scale = (grad_loss / n_valid) * (targets >= 0)                   # (N,), 0 for ignored rows
        grad = logprobs.exp_().mul_(row_scale[:, None])                      # softmax * scale, in place
        grad.scatter_add_(1, targets.clamp(min=0)[:, None], -row_scale[:, None])   # minus one-hot * scale
        return grad.to(ctx.logits_dtype), None


def cross_entropy(logits, targets):
    return CrossEntropy.apply(logits, targets)


class KVCache:
    """Preallocated keys/values for one attention layer: (B, n_kv_head, block_size, hd)."""

    def __init__(self, batch_size, config, device, dtype):
        shape = (batch_size, config.n_kv_head, config.block_size, config.n_embd // config.n_head)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    def update(self, pos, k, v):
        T = k.size(2)
        self.k[:, :, pos:pos + T] = k
        self.v[:, :, pos:pos + T] = v
        return self.k[:, :, :pos + T], self.v[:, :, :pos + T]


class CausalSelfAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head, self.n_kv_head = config.n_head, config.n_kv_head
        self.head_dim = config.n_embd // config.n_head
        kv_dim = self.n_kv_head * self.head_dim
        self.qkv = nn.Linear(config.n_embd, config.n_embd + 2 * kv_dim, bias=False)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.proj.is_residual_output = True
        self.dropout = config.dropout

    def forward(self, x, cos, sin, cache=None, pos=0):
        B, T, C = x.shape
        kv_dim = self.n_kv_head * self.head_dim
        # split, not two slices: the backward of a split is one cat, a slice's is a zero-filled
        # (B, T, C + 2 kv_dim) gradient per slice, added together (the same values)
        qk, v = self.qkv(x).split([C + kv_dim, kv_dim], dim=-1)            # (B, T, C + kv_dim), (B, T, kv_dim)
        # rotate q's and k's heads in one pass: they sit side by side in qkv
        qk = qk.view(B, T, self.n_head + self.n_kv_head, self.head_dim)
        q, k = apply_rope(qk, cos, sin).transpose(1, 2).split([self.n_head, self.n_kv_head], dim=1)
        # q: (B, H, T, hd), k: (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)    # (B, Hkv, T, hd)
        if cache is not None:
            k, v = cache.update(pos, k, v)                                 # (B, Hkv, pos+T, hd)
        if self.n_kv_head != self.n_head:
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if pos == 0:
            mask, causal = None, True
        elif T == 1:                 # one new token attends to everything cached
            mask, causal = None, False
        else:                        # a chunk after a prefix: causal within the chunk
            mask = torch.ones(T, pos + T, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        y = y.transpose(1, 2).contiguous().view(B, T, C)                   # (B, T, C)
        return self.proj(y)


class DenseFFN(nn.Module):
    """SwiGLU: W_down(SiLU(W_gate x) * W_up x)."""

    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.up = nn.Linear(config.n_embd, config.d_ff, bias=False)
        self.down = nn.Linear(config.d_ff, config.n_embd, bias=False)
        self.down.is_residual_output = True

    def forward(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))               # (B, T, C)


class Block(nn.Module):
    """Pre-norm attention + FFN. The FFN is dense, STEM (fed the layer's table rows) or a
    moe.py baseline (fed the token ids; it also returns auxiliary losses and loads)."""

    def __init__(self, config, layer_id, token_counts=None):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ffn_norm = RMSNorm(config.n_embd)
        self.is_stem = layer_id in config.stem_layer_ids
        self.is_moe = layer_id in config.sparse_layer_ids and config.ffn in moe.FAMILIES
        if self.is_stem:
            self.ffn = stem.StemFFN(config)
        elif self.is_moe:
            self.ffn = moe.build(config.ffn, config, token_counts)
        else:
            self.ffn = DenseFFN(config)

    def forward(self, x, cos, sin, rows=None, cache=None, pos=0, idx=None):
        """Returns (x, aux): aux is the MoE layer's dict (moe.py), None otherwise."""
        x = x + self.attn(self.attn_norm(x), cos, sin, cache, pos)
        h = self.ffn_norm(x)
        if self.is_moe:
            y, aux = self.ffn(h, idx)
            return x + y, aux
        return x + (self.ffn(h, rows) if self.is_stem else self.ffn(h)), None


# -----------------------------------------------------------------------------
# the model

class GPT(nn.Module):
    def __init__(self, config, token_counts=None):
        """token_counts: (vocab_size,) training-token frequencies, used only by a Hash-MoE
        with hash_assignment=balanced (the assignment is then a buffer in the state dict)."""
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, i, token_counts) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        # The tables of all STEM layers, one (vocab, n_stem, d_ff) tensor: a token's rows
        # for every layer sit together, so one gather per unique id serves all layers.
        # None for a dense model. training.build_tables may swap it for tables.LazyTables.
        n_stem = len(config.stem_layer_ids)
        self.tables = stem.ResidentTables(config.vocab_size, n_stem, config.d_ff) if n_stem else None
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.reset_rope()
        self.aux = None     # the last forward's MoE auxiliary losses and loads, for logging
        self.apply(self._init_weights)

    def reset_rope(self, device=None):
        """(Re)compute the RoPE tables, which checkpoints do not store (a model built on the
        meta device and given a checkpoint's tensors gets them here)."""
        c = self.config
        self.rope_cos, self.rope_sin = rope_cache(c.n_embd // c.n_head, c.block_size, c.rope_theta, device)

    def _init_weights(self, module):
        # std 0.02 everywhere; residual output projections scaled by 1/sqrt(2 n_layer) as in GPT-2
        if isinstance(module, nn.Linear):
            std = 0.02 / math.sqrt(2 * self.config.n_layer) if getattr(module, "is_residual_output", False) else 0.02
            nn.init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        # the STEM tables initialise themselves (Xavier-normal), see stem.ResidentTables

    def prepare(self, row_index):
        """Start bringing the table rows of a batch that runs later (row_index: its
        stem.RowIndex); nothing to do for a dense model or resident tables."""
        if self.tables is not None:
            self.tables.prepare(row_index)

    def forward(self, idx, targets=None, row_index=None, cache=None, pos=0):
        """
        idx: (B, T) token ids. targets: (B, T) or None.
        row_index: a stem.RowIndex (unique ids + inverse) of idx computed by the caller, e.g.
          on the CPU by the data loader so that no torch.unique runs on the GPU; computed
          here when None. The table source finds the batch's prepared rows by it.
          cache/pos: KV caches (one per layer) and the position of idx[:, 0].
        Returns (logits, loss); logits are (B, T, V) with targets, (B, 1, V) without.
        In training mode the loss includes the MoE auxiliary losses (self.aux has them
        apart); in eval mode it is the cross-entropy alone, comparable across families.
        """
        B, T = idx.shape
        if pos + T > self.config.block_size:
            raise ValueError(f"sequence of {pos + T} tokens exceeds block_size {self.config.block_size}")
        # on the GPU the loader checked the ids (a check here would sync), and under
        # torch.compile it would break the graph on a data-dependent value: skipped there
        if not idx.is_cuda and not torch.compiler.is_compiling():
            stem.check_ids(idx, self.config.vocab_size)
        rows = None
        if self.tables is not None:
            if row_index is None:
                row_index = stem.RowIndex.of(idx)
            rows = stem.StemRows(self.tables.lookup(row_index), row_index.inverse)
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        x = self.drop(self.wte(idx))                                       # (B, T, C)
        stem_slot, layer_aux = 0, []
        for i, block in enumerate(self.blocks):
            layer_rows = None
            if block.is_stem:
                layer_rows, stem_slot = rows.layer(stem_slot), stem_slot + 1   # (B, T, d_ff)
            x, aux = block(x, cos, sin, layer_rows, None if cache is None else cache[i], pos, idx)
            if aux is not None:
                layer_aux.append(aux)
        if layer_aux:
            self.aux = {"balance": sum(a["balance"] for a in layer_aux), "z": sum(a["z"] for a in layer_aux),
                        "load": torch.stack([a["load"] for a in layer_aux]),        # (n_moe_layers, E)
                        "dropped": torch.stack([a["dropped"] for a in layer_aux]).mean()}
        x = self.norm(x)
        if targets is None:
            return self.lm_head(x[:, [-1], :]), None                       # (B, 1, V)
        logits = self.lm_head(x)                                           # (B, T, V)
        loss = cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))
        if layer_aux and self.training:
            loss = loss + self.aux["balance"] + self.aux["z"]
        return logits, loss

    # -- counting -------------------------------------------------------------

    def num_params(self):
        """(total, active per token). Active excludes the STEM tables (a token reads one row
        of each, a lookup rather than a matmul) and the experts a token does not use
        (moe.params_per_layer). Tied embeddings count once."""
        total = sum(p.numel() for p in self.parameters())
        inactive = self.tables.numel() if self.tables is not None else 0
        if self.tables is not None:     # tables.LazyTables holds its rows outside parameters()
            total += inactive - sum(p.numel() for p in self.tables.parameters())
        if self.config.ffn in moe.FAMILIES:
            layer_total, layer_active = moe.params_per_layer(self.config.ffn, self.config)
            inactive += len(self.config.sparse_layer_ids) * (layer_total - layer_active)
        return total, total - inactive

    def flops_per_token(self, seq_len=None, batch_size=None):
        """Forward matmul FLOPs per token (2 per multiply-add); training is 3x this.
        Attention scores count the full T x T product (PaLM's convention); table lookups,
        norms and activations count nothing. batch_size matters only for ffn=mot."""
        c = self.config
        T = seq_len or c.block_size
        head_dim = c.n_embd // c.n_head
        attn = 2 * c.n_embd * (c.n_embd + 2 * c.n_kv_head * head_dim) + 2 * c.n_embd * c.n_embd
        attn += 2 * 2 * T * c.n_embd                                      # q @ k^T and att @ v
        dense_ffn = 3 * 2 * c.n_embd * c.d_ff
        stem_ffn = stem.ffn_matmuls(c.stem_variant) * 2 * c.n_embd * c.d_ff
        n_sparse = len(c.sparse_layer_ids)
        if c.ffn in moe.FAMILIES:
            sparse_ffn = moe.matmul_flops_per_token(c.ffn, c, batch_size)
        else:
            sparse_ffn = stem_ffn
        ffn = (c.n_layer - n_sparse) * dense_ffn + n_sparse * sparse_ffn
        return c.n_layer * attn + ffn + 2 * c.n_embd * c.vocab_size        # + lm_head

    def estimate_mfu(self, tokens_per_second, device_name=None, seq_len=None):
        """Model FLOPs utilisation of a training run against the GPU's bf16 dense peak;
        None on a device we have no peak for (e.g. the CPU)."""
        peak = gpu_peak_flops(device_name)
        return None if peak is None else 3 * self.flops_per_token(seq_len) * tokens_per_second / peak

    # -- generation -----------------------------------------------------------

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, use_cache=True, generator=None):
        """Continue idx (B, T) by max_new_tokens tokens. temperature 0 means greedy.
        Past block_size tokens the context is cropped to the last block_size tokens (the
        cached path then re-reads that window, so both paths compute the same logits)."""
        if idx.size(1) > self.config.block_size:
            raise ValueError(f"prompt is {idx.size(1)} tokens but the model's context (block_size) "
                             f"is {self.config.block_size}; shorten the prompt")
        was_training = self.training
        self.eval()
        cache, pos = None, 0
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -self.config.block_size:])
            else:
                if cache is None or pos >= self.config.block_size:
                    # (re)fill the cache from the window of the last block_size tokens
                    window = idx[:, -self.config.block_size:]
                    param = self.wte.weight
                    cache = [KVCache(idx.size(0), self.config, param.device, param.dtype)
                             for _ in range(self.config.n_layer)]
                    logits, _ = self(window, cache=cache, pos=0)
                    pos = window.size(1)
                else:
                    logits, _ = self(idx[:, -1:], cache=cache, pos=pos)
                    pos += 1
            idx = torch.cat([idx, sample_next(logits[:, -1, :], temperature, top_k, generator)], dim=1)
        self.train(was_training)
        return idx


def sample_next(logits, temperature, top_k, generator=None):
    """One token per row from logits (B, V): greedy at temperature 0, else top-k sampling."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator)


# bf16 dense tensor-core peaks (FLOP/s) from the vendors' data sheets, matched by name
GPU_PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,     # SXM; the PCIe card is lower (756e12)
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 70e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
}


def gpu_peak_flops(device_name=None):
    if device_name is None:
        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    if "H100" in device_name and "PCIe" in device_name:
        return 756e12
    for key, peak in GPU_PEAK_FLOPS.items():
        if key in device_name:
            return peak
    warnings.warn(f"no bf16 peak known for {device_name!r}; MFU not reported")
    return None
