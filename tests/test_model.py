"""model.py and stem.py against independent references: float64 numpy formulas for the
FFN variants and attention, closed forms for parameter counts, torch's FLOP counter for
FLOPs, a plain per-position lookup for the deduplicated one, and the uncached forward
for the KV cache."""

import math

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import model
import stem


def small_config(**overrides):
    args = dict(block_size=16, vocab_size=50, n_layer=4, n_head=4, n_embd=32, d_ff=48)
    args.update(overrides)
    return model.GPTConfig.from_dict(args)


def silu(z):
    return z / (1.0 + np.exp(-z))


# -- the STEM FFN ---------------------------------------------------------------------

@pytest.mark.parametrize("variant", stem.VARIANTS)
def test_stem_ffn_matches_float64_formula(variant):
    torch.manual_seed(0)
    ffn = stem.StemFFN(small_config(stem_variant=variant)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    rows = torch.randn(2, 5, 48, dtype=torch.float64)
    got = ffn(x, rows).detach().numpy()
    xn, rn = x.numpy(), rows.numpy()
    W_down = ffn.down.weight.detach().numpy()
    if variant == "up":            # W_down(SiLU(W_gate x) * U[t])
        h = silu(xn @ ffn.gate.weight.detach().numpy().T) * rn
    elif variant == "gate":        # W_down(SiLU(U[t]) * W_up x)
        h = silu(rn) * (xn @ ffn.up.weight.detach().numpy().T)
    else:                          # W_down(SiLU(W_gate x) * (W_up x + U[t]))
        h = silu(xn @ ffn.gate.weight.detach().numpy().T) * (xn @ ffn.up.weight.detach().numpy().T + rn)
    want = h @ W_down.T
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-12


def test_stem_ffn_has_no_up_projection():
    ffn = stem.StemFFN(small_config(stem_variant="up"))
    assert not hasattr(ffn, "up")
    weights = sorted(p.shape for p in ffn.parameters())
    assert weights == sorted([torch.Size([48, 32]), torch.Size([32, 48])])   # gate and down only


def test_stem_layer_is_fed_by_the_input_token_rows():
    """Changing one token's table row changes the output at that token's positions only
    (within a STEM layer: the FFN is position-wise)."""
    torch.manual_seed(0)
    ffn = stem.StemFFN(small_config())
    tables = stem.ResidentTables(50, 1, 48)
    idx = torch.tensor([[3, 7, 3, 9]])
    x = torch.randn(1, 4, 32)
    index = stem.RowIndex.of(idx)
    before = ffn(x, stem.StemRows(tables.lookup(index), index.inverse).layer(0))
    tables.write_rows([3], torch.randn(1, 1, 48))
    after = ffn(x, stem.StemRows(tables.lookup(index), index.inverse).layer(0))
    changed = (before - after).abs().amax(-1)[0] > 0
    assert changed.tolist() == [True, False, True, False]


@pytest.mark.parametrize("spec, n_layer, want", [
    ("full", 6, (1, 2, 3, 4, 5)),
    ("half", 6, (1, 3, 5)),
    ("third", 7, (1, 4)),
    ("third", 12, (1, 4, 7, 10)),
    ("none", 6, ()),
    ("5, 2,2", 6, (2, 5)),
])
def test_layer_selection(spec, n_layer, want):
    assert stem.select_layers(spec, n_layer) == want
    gpt = model.GPT(small_config(n_layer=n_layer, stem_layers=spec))
    assert tuple(i for i, b in enumerate(gpt.blocks) if b.is_stem) == want
    assert (gpt.tables is None) == (want == ())


@pytest.mark.parametrize("spec", ["0,1", "1,6", "every", "1;2"])
def test_bad_layer_selection_raises(spec):
    with pytest.raises(ValueError, match="stem_layers"):
        stem.select_layers(spec, 6)


def test_tables_init_is_xavier_normal():
    torch.manual_seed(0)
    tables = stem.ResidentTables(4000, 2, 1000)
    assert tables.weight.std().item() == pytest.approx(math.sqrt(2 / (4000 + 1000)), rel=0.01)
    assert abs(tables.weight.mean().item()) < 1e-3


# -- dedup: unique ids + inverse ---------------------------------------------------------

def test_unique_lookup_matches_per_position_lookup_values_and_grads():
    torch.manual_seed(0)
    idx = torch.randint(0, 20, (3, 11))
    weight = torch.randn(20, 3, 8, dtype=torch.float64)
    dedup = stem.ResidentTables(20, 3, 8).double()
    dedup.weight.data.copy_(weight)
    plain = weight.clone().requires_grad_(True)
    upstream = torch.randn(3, 3, 11, 8, dtype=torch.float64)         # (n_stem, B, T, d_ff)
    index = stem.RowIndex.of(idx)
    assert torch.equal(index.unique_ids[index.inverse], idx)
    rows = stem.StemRows(dedup.lookup(index), index.inverse)
    loss_dedup = sum((rows.layer(k) * upstream[k]).sum() for k in range(3))
    loss_plain = sum((plain[idx, k] * upstream[k]).sum() for k in range(3))   # B*T gathers per layer
    for k in range(3):
        assert torch.equal(rows.layer(k), plain[idx, k])
    loss_dedup.backward()
    loss_plain.backward()
    torch.testing.assert_close(dedup.weight.grad, plain.grad, rtol=1e-12, atol=1e-12)
    untouched = torch.ones(20, dtype=torch.bool)
    untouched[idx.unique()] = False
    assert torch.count_nonzero(dedup.weight.grad[untouched]) == 0


def test_forward_with_loader_row_index_equals_forward_without():
    torch.manual_seed(0)
    gpt = model.GPT(small_config())
    idx = torch.randint(0, 50, (2, 16))
    a, _ = gpt(idx, targets=idx)
    b, _ = gpt(idx, targets=idx, row_index=stem.RowIndex.of(idx))
    assert torch.equal(a, b)


# -- attention ----------------------------------------------------------------------------

def rope_reference(x, theta):
    """x (B, H, T, hd) float64 numpy: rotate (x[i], x[i + hd/2]) as a complex number by
    the angle pos * theta^(-2i/hd)."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    pos = np.arange(x.shape[2])[:, None]
    angle = pos * theta ** (-np.arange(half) * 2.0 / x.shape[-1])
    z = z * np.exp(1j * angle)
    return np.concatenate([z.real, z.imag], axis=-1)


@pytest.mark.parametrize("n_kv_head", [4, 2, 1])
def test_attention_matches_float64_reference(n_kv_head):
    torch.manual_seed(0)
    config = small_config(n_kv_head=n_kv_head)
    attn = model.CausalSelfAttention(config).double()
    B, T, C, H, hd = 2, 10, 32, 4, 8
    x = torch.randn(B, T, C, dtype=torch.float64)
    cos, sin = model.rope_cache(hd, T, config.rope_theta)
    got = attn(x, cos.double(), sin.double()).detach().numpy()

    W = attn.qkv.weight.detach().numpy()
    qkv = x.numpy() @ W.T
    q = qkv[..., :C].reshape(B, T, H, hd).transpose(0, 2, 1, 3)
    k = qkv[..., C:C + n_kv_head * hd].reshape(B, T, n_kv_head, hd).transpose(0, 2, 1, 3)
    v = qkv[..., C + n_kv_head * hd:].reshape(B, T, n_kv_head, hd).transpose(0, 2, 1, 3)
    q, k = rope_reference(q, config.rope_theta), rope_reference(k, config.rope_theta)
    group = H // n_kv_head
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)   # head h reads kv head h // group
    scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(hd)
    scores = np.where(np.tril(np.ones((T, T), dtype=bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    y = (p @ v).transpose(0, 2, 1, 3).reshape(B, T, C)
    want = y @ attn.proj.weight.detach().numpy().T
    # the model's rotary angles are float32 (the cache is built once, in float32): 1e-6
    assert np.abs(got - want).max() / np.abs(want).max() < 1e-6


# -- parameter and FLOP counts ---------------------------------------------------------------

@pytest.mark.parametrize("overrides", [
    dict(),
    dict(ffn="dense"),
    dict(stem_layers="half", tie_embeddings=True),
    dict(stem_variant="up+table", n_kv_head=2),
    dict(stem_variant="gate", stem_layers="1"),
])
def test_param_counts_closed_form(overrides):
    c = small_config(**overrides)
    gpt = model.GPT(c)
    V, d, f, L = c.vocab_size, c.n_embd, c.d_ff, c.n_layer
    kv_dim = c.n_kv_head * d // c.n_head
    n_stem = len(c.stem_layer_ids)
    stem_ffn = (3 if c.stem_variant == "up+table" else 2) * d * f
    per_layer = 2 * d + d * (d + 2 * kv_dim) + d * d
    tables = V * n_stem * f
    total = (V * d * (1 if c.tie_embeddings else 2) + L * per_layer + d
             + (L - n_stem) * 3 * d * f + n_stem * stem_ffn + tables)
    assert gpt.num_params() == (total, total - tables)


@pytest.mark.parametrize("overrides", [
    dict(),
    dict(ffn="dense"),
    dict(stem_layers="half", n_kv_head=2),
    dict(stem_variant="up+table"),
    dict(stem_variant="gate", tie_embeddings=True),
    dict(ffn="moe", n_experts=4, moe_top_k=2, n_shared_experts=1),
    dict(ffn="hash_moe", n_experts=4, stem_layers="half"),
    dict(ffn="expert_choice", n_experts=4, moe_top_k=2),
    dict(ffn="mot", n_experts=4),
])
def test_flops_per_token_matches_torch_flop_counter(overrides, monkeypatch):
    """torch counts every matmul the forward runs (lookups excluded), the same convention
    as flops_per_token. Its counter has no formula for the CPU's fused attention kernel, so
    attention runs here as the explicit matmuls, full T x T (PaLM's convention)."""
    def sdpa_as_matmuls(q, k, v, attn_mask=None, is_causal=False, dropout_p=0.0):
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))            # (B, H, T, T)
        if is_causal:
            scores = scores.masked_fill(~torch.ones_like(scores, dtype=torch.bool).tril(), float("-inf"))
        return scores.softmax(-1) @ v                                     # (B, H, T, hd)
    monkeypatch.setattr(model.F, "scaled_dot_product_attention", sdpa_as_matmuls)
    c = small_config(**overrides)
    gpt = model.GPT(c).eval()
    B, T = 2, c.block_size
    idx = torch.randint(0, c.vocab_size, (B, T))
    with FlopCounterMode(display=False) as counter:
        gpt(idx, targets=idx)                       # targets: logits at every position
    assert counter.get_total_flops() == B * T * gpt.flops_per_token(T, batch_size=B)


@pytest.mark.parametrize("family, k, shared", [("moe", 2, 1), ("moe", 1, 0), ("hash_moe", 1, 0)])
def test_moe_active_params_count_only_the_experts_a_token_uses(family, k, shared):
    c = small_config(ffn=family, n_experts=4, moe_top_k=k, n_shared_experts=shared, stem_layers="half")
    gpt = model.GPT(c)
    dense = model.GPT(small_config(ffn="dense"))
    d, f, E = c.n_embd, c.d_ff, c.moe.n_experts
    router = d * E if family == "moe" else 0
    n_sparse = len(c.sparse_layer_ids)
    # each sparse layer swaps one dense FFN (3 d f) for E + shared experts and a router
    total = dense.num_params()[0] + n_sparse * (router + (E + shared) * 3 * d * f - 3 * d * f)
    active = dense.num_params()[0] + n_sparse * (router + (k + shared) * 3 * d * f - 3 * d * f)
    assert gpt.num_params() == (total, active)
    assert gpt.tables is None


def test_moe_aux_losses_join_the_training_loss_only():
    torch.manual_seed(0)
    gpt = model.GPT(small_config(ffn="moe", n_experts=4, balance_loss_coef=0.5, z_loss_coef=0.1))
    idx = torch.randint(0, 50, (2, 16))
    _, train_loss = gpt(idx, idx)
    aux = gpt.aux
    assert aux["load"].shape == (3, 4) and torch.allclose(aux["load"].sum(-1), torch.ones(3))
    assert aux["balance"] >= 0.5 * 3 * 0.999        # alpha per layer at best (perfect balance)
    gpt.eval()
    _, eval_loss = gpt(idx, idx)
    torch.testing.assert_close(train_loss, eval_loss + aux["balance"] + aux["z"])


def test_stem_saves_a_third_of_ffn_flops():
    dense, stem_model = model.GPT(small_config(ffn="dense")), model.GPT(small_config())
    c = stem_model.config
    saved = dense.flops_per_token() - stem_model.flops_per_token()
    assert saved == len(c.stem_layer_ids) * 2 * c.n_embd * c.d_ff


# -- training and generation -------------------------------------------------------------------

def test_overfits_one_batch():
    torch.manual_seed(0)
    gpt = model.GPT(small_config())
    idx = torch.randint(0, 50, (4, 16))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(gpt.parameters(), lr=1e-2, weight_decay=0.0)
    _, first = gpt(x, y)
    for _ in range(150):
        _, loss = gpt(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first.item() > 3.5 and loss.item() < 0.05


def test_tables_get_gradients_only_for_ids_in_the_batch():
    torch.manual_seed(0)
    gpt = model.GPT(small_config())
    idx = torch.randint(0, 10, (2, 16))         # ids 10..49 never appear
    _, loss = gpt(idx, idx)
    loss.backward()
    grad = gpt.tables.weight.grad
    assert torch.count_nonzero(grad[10:]) == 0
    assert torch.count_nonzero(grad[idx.unique()].abs().sum((1, 2))) == len(idx.unique())


@pytest.mark.parametrize("overrides", [dict(), dict(n_kv_head=2, stem_variant="up+table"), dict(ffn="dense")])
def test_kv_cache_forward_equals_full_forward(overrides):
    torch.manual_seed(0)
    gpt = model.GPT(small_config(**overrides)).eval()
    idx = torch.randint(0, 50, (2, 12))
    full, _ = gpt(idx, targets=idx)                                       # (B, T, V)
    cache = [model.KVCache(2, gpt.config, "cpu", torch.float32) for _ in range(gpt.config.n_layer)]
    logits, _ = gpt(idx[:, :5], cache=cache, pos=0)                       # a prefix, then
    steps = [logits[:, -1]]
    chunk, _ = gpt(idx[:, 5:8], cache=cache, pos=5)                       # a chunk, then
    steps.append(chunk[:, -1])
    for t in range(8, 12):                                                # single tokens
        logits, _ = gpt(idx[:, t:t + 1], cache=cache, pos=t)
        steps.append(logits[:, -1])
    for got, t in zip(steps, [4, 7, 8, 9, 10, 11]):
        torch.testing.assert_close(got, full[:, t], rtol=1e-5, atol=1e-5)


def test_generate_cached_equals_uncached_past_block_size():
    torch.manual_seed(0)
    gpt = model.GPT(small_config())
    prompt = torch.randint(0, 50, (3, 6))
    a = gpt.generate(prompt, 30, temperature=0, use_cache=True)           # 36 > block_size 16
    b = gpt.generate(prompt, 30, temperature=0, use_cache=False)
    assert a.shape == (3, 36) and torch.equal(a, b)
    g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    s1 = gpt.generate(prompt, 10, temperature=1.0, top_k=5, generator=g1)
    s2 = gpt.generate(prompt, 10, temperature=1.0, top_k=5, use_cache=False, generator=g2)
    assert torch.equal(s1, s2)


def test_top_k_only_samples_from_the_k_best():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, -2.0]]).repeat(500, 1)
    g = torch.Generator().manual_seed(0)
    picks = model.sample_next(logits, 1.0, 2, g).flatten()
    assert set(picks.tolist()) == {1, 3}
    assert torch.equal(model.sample_next(logits, 0, None).flatten(), torch.ones(500, dtype=torch.long))


# -- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [50, -1, 1000])
def test_out_of_range_ids_raise(bad):
    gpt = model.GPT(small_config())
    idx = torch.zeros(1, 4, dtype=torch.long)
    idx[0, 2] = bad
    with pytest.raises(ValueError, match=f"token id {bad} is out of range for vocab_size 50"):
        gpt(idx)


def test_too_long_prompt_and_bad_config_raise():
    gpt = model.GPT(small_config())
    with pytest.raises(ValueError, match="block_size"):
        gpt(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="block_size"):
        gpt.generate(torch.zeros(1, 17, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="n_head"):
        small_config(n_head=5)
    with pytest.raises(ValueError, match="stem_variant"):
        small_config(stem_variant="down")
    with pytest.raises(ValueError, match="ffn"):
        small_config(ffn="bogus")


def test_cross_entropy_matches_float64_reference_with_ignored_targets():
    torch.manual_seed(0)
    N, V = 12, 37
    logits = torch.randn(N, V, dtype=torch.float64) * 3
    targets = torch.randint(V, (N,))
    targets[[2, 7]] = -1                                   # ignored positions
    got = logits.clone().requires_grad_()
    loss = model.cross_entropy(got, targets)
    (2.5 * loss).backward()
    # reference: softmax cross-entropy written out in numpy float64
    z = logits.numpy()
    logp = z - z.max(1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(1, keepdims=True))
    valid = targets.numpy() >= 0
    rows = np.arange(N)[valid]
    want_loss = -logp[rows, targets.numpy()[valid]].mean()
    want_grad = np.exp(logp) * valid[:, None]
    want_grad[rows, targets.numpy()[valid]] -= 1
    want_grad *= 2.5 / valid.sum()
    assert loss.item() == pytest.approx(want_loss, rel=1e-12)
    assert np.abs(got.grad.numpy() - want_grad).max() < 1e-14
    # float32 and bfloat16 logits: computed in float32, the gradient comes back in the input dtype
    for dtype in (torch.float32, torch.bfloat16):
        low = logits.to(dtype).requires_grad_()
        model.cross_entropy(low, targets).backward()
        ref = logits.to(dtype).float().requires_grad_()
        torch.nn.functional.cross_entropy(ref, targets, ignore_index=-1).backward()
        assert low.grad.dtype == dtype
        assert torch.allclose(low.grad.float(), ref.grad.to(dtype).float(), atol=1e-6 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cross_entropy_peaks_below_torch_s_by_whole_float32_logit_buffers(dtype):
    """Why the model has its own cross-entropy: forward and backward of the loss hold one
    (N, V) float32 buffer fewer than F.cross_entropy's (two in float32), measured as live
    storage (tests/live_bytes.py)."""
    from live_bytes import LiveBytes
    N, V = 256, 4096
    buffer = N * V * 4
    peaks = {}
    for name, loss_of in (("ours", model.cross_entropy),
                          ("torch", lambda z, t: torch.nn.functional.cross_entropy(z.float(), t, ignore_index=-1))):
        logits = torch.randn(N, V, dtype=dtype, requires_grad=True)
        targets = torch.randint(V, (N,))
        with LiveBytes() as live:
            loss_of(logits, targets).backward()
        peaks[name] = live.peak
    saved = (peaks["torch"] - peaks["ours"]) / buffer
    assert saved == pytest.approx(2.0 if dtype == torch.float32 else 1.0, abs=0.01), peaks


def test_live_bytes_follows_allocations_and_frees():
    from live_bytes import LiveBytes
    before = torch.ones(1000)                         # live before the region: never counted
    with LiveBytes() as live:
        a = torch.zeros(1000)                         # 4,000 bytes
        b = a + 1                                     # 8,000
        view = b[:10]                                 # a view: nothing new
        del a                                         # 4,000
        c = torch.zeros(2000, dtype=torch.float64)    # 20,000: the peak
        before.add_(1)                                # in place on an older storage: nothing new
        before[:3] = 7                                # (index_put_ too)
        del c, before                                 # 4,000 (freeing an older storage counts nothing)
        d = b * 2                                     # 8,000
    assert live.peak == 20_000 and live.now == 8_000
    assert view.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and d.numel() == 1000
