"""moe.py against independent references: float64 per-token loops over tokens and experts
for every family's forward (routing, capacity drops, mixing written out by hand), the
balance and z losses recomputed from the router weights, hand-derived closed forms for
parameter counts, torch's FLOP counter for FLOPs, and perturbation tests for which
positions an output may depend on."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import moe

B, T, C, E, F_EXPERT, VOCAB = 3, 8, 12, 4, 8, 30
N = B * T


def small_config(**overrides):
    args = dict(n_embd=C, d_ff=20, n_experts=E, moe_top_k=1, expert_d_ff=F_EXPERT,
                n_shared_experts=0, capacity_factor=0.0, router_noise=0.0,
                balance_loss_coef=0.01, z_loss_coef=0.001, hash_assignment="random",
                vocab_size=VOCAB, seed=0, n_layer=2)
    args.update(overrides)
    return SimpleNamespace(**args)


def layer_and_inputs(family, seed=0, token_counts=None, **overrides):
    """A float64 layer of the family in eval mode and random inputs x (B, T, C), idx (B, T).
    Expert weights are scaled up from the 0.02 init so outputs are far from zero."""
    torch.manual_seed(seed)
    layer = moe.build(family, small_config(**overrides), token_counts).double().eval()
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_(0.0, 0.5)
    x = torch.randn(B, T, C, dtype=torch.float64)
    idx = torch.randint(VOCAB, (B, T))
    return layer, x, idx


def numpy_of(tensor):
    return tensor.detach().cpu().numpy().astype(np.float64)


def softmax(values):
    m = max(values)
    exps = [math.exp(v - m) for v in values]
    return [v / sum(exps) for v in exps]


def expert_output(experts, e, v):
    """SwiGLU expert e of a moe.Experts on one token v (C,), written out in numpy."""
    gate, up, down = numpy_of(experts.gate[e]), numpy_of(experts.up[e]), numpy_of(experts.down[e])
    a, b = v @ gate, v @ up
    return (a / (1.0 + np.exp(-a)) * b) @ down


def router_probs(layer, v):
    weight = numpy_of(layer.router.weight)                           # (E, C)
    logits = [float(weight[e] @ v) for e in range(weight.shape[0])]
    return logits, softmax(logits)


# -- token choice ---------------------------------------------------------------------

def reference_token_choice(layer, x, k, capacity_factor, n_shared):
    """Returns y (N, C), the per-token choices, the number of dropped assignments, and the
    balance and z losses, all computed one token at a time."""
    X = numpy_of(x).reshape(N, C)
    choices, all_probs, all_logits = [], [], []
    for n in range(N):
        logits, probs = router_probs(layer, X[n])
        ranked = sorted(range(E), key=lambda e: -probs[e])[:k]
        weights = [probs[e] for e in ranked]
        if k > 1:
            weights = [w / sum(weights) for w in weights]
        choices.append(list(zip(ranked, weights)))
        all_probs.append(probs)
        all_logits.append(logits)
    capacity = math.ceil(capacity_factor * N * k / E) if capacity_factor else float("inf")
    used, kept = [0] * E, set()
    for j in range(k):                      # 1st choices of all tokens, then 2nd choices
        for n in range(N):
            e = choices[n][j][0]
            if used[e] < capacity:
                used[e] += 1
                kept.add((n, j))
    y = np.zeros((N, C))
    for n in range(N):
        for j in range(k):
            if (n, j) in kept:
                e, w = choices[n][j]
                y[n] += w * expert_output(layer.experts, e, X[n])
        for s in range(n_shared):
            y[n] += expert_output(layer.shared, s, X[n])
    first = [sum(1 for n in range(N) if choices[n][0][0] == e) / N for e in range(E)]
    mean_prob = [sum(all_probs[n][e] for n in range(N)) / N for e in range(E)]
    balance = 0.01 * E * sum(f * p for f, p in zip(first, mean_prob))
    lse = [max(l) + math.log(sum(math.exp(v - max(l)) for v in l)) for l in all_logits]
    z = 0.001 * sum(v * v for v in lse) / N
    return y, choices, k * N - len(kept), balance, z


@pytest.mark.parametrize("k,capacity_factor,n_shared", [(1, 0.0, 0), (1, 0.5, 1), (2, 0.0, 1), (2, 0.6, 2)])
def test_token_choice_matches_reference(k, capacity_factor, n_shared):
    layer, x, idx = layer_and_inputs("moe", moe_top_k=k, capacity_factor=capacity_factor,
                                     n_shared_experts=n_shared)
    y, aux = layer(x, idx)
    y_ref, choices, n_dropped, balance, z = reference_token_choice(layer, x, k, capacity_factor, n_shared)
    np.testing.assert_allclose(numpy_of(y).reshape(N, C), y_ref, rtol=1e-10, atol=1e-12)
    if capacity_factor:
        assert n_dropped > 0, "the capacity factor is meant to force drops"
    else:
        assert n_dropped == 0
    assert aux["dropped"].item() == pytest.approx(n_dropped / (k * N), abs=1e-7)   # a float32 diagnostic
    load = [sum(1 for n in range(N) for e2, _ in choices[n] if e2 == e) / (k * N) for e in range(E)]
    np.testing.assert_allclose(numpy_of(aux["load"]), load, atol=1e-7)
    assert aux["balance"].item() == pytest.approx(balance, rel=1e-10)
    assert aux["z"].item() == pytest.approx(z, rel=1e-10)
    assert not aux["load"].requires_grad and not aux["dropped"].requires_grad


def test_balance_loss_is_alpha_when_balanced_and_larger_when_not():
    # E tokens, token i = 5 * e_i and router = [I | 0]: token i puts a large prob p on expert
    # i and (1-p)/(E-1) on the others, so f_i = 1/E and P_i = (p + (E-1)(1-p)/(E-1))/E = 1/E
    # exactly, with no ties anywhere.
    alpha = 0.3
    layer = moe.TokenChoiceMoE(small_config(balance_loss_coef=alpha)).double()
    with torch.no_grad():
        layer.router.weight.zero_()
        layer.router.weight[:, :E] = torch.eye(E, dtype=torch.float64)
    x = torch.zeros(1, E, C, dtype=torch.float64)
    x[0, :, :E] = 5 * torch.eye(E, dtype=torch.float64)
    _, aux = layer(x, torch.zeros(1, E, dtype=torch.long))
    assert aux["balance"].item() == pytest.approx(alpha, rel=1e-12)
    np.testing.assert_allclose(numpy_of(aux["load"]), [1 / E] * E)
    # every token prefers expert 0: f = (1, 0, ...) and P_0 near 1, so the loss nears alpha * E
    x[0, :, :E] = 0
    x[0, :, 0] = 5
    _, aux = layer(x, torch.zeros(1, E, dtype=torch.long))
    p0 = math.exp(5) / (math.exp(5) + E - 1)
    assert aux["balance"].item() == pytest.approx(alpha * E * p0, rel=1e-12)
    assert aux["balance"].item() > 2 * alpha


def test_router_noise_only_in_training():
    layer, x, idx = layer_and_inputs("moe", router_noise=1.0, moe_top_k=2)
    clean = moe.build("moe", small_config(moe_top_k=2)).double()
    clean.load_state_dict(layer.state_dict())
    np.testing.assert_allclose(numpy_of(layer(x, idx)[0]), numpy_of(clean.eval()(x, idx)[0]))
    layer.train()
    torch.manual_seed(1)
    first = layer(x, idx)[0]
    torch.manual_seed(2)
    assert not torch.allclose(first, layer(x, idx)[0])


# -- expert choice --------------------------------------------------------------------

@pytest.mark.parametrize("k,capacity_factor", [(1, 0.0), (2, 1.5), (1, 0.4)])
def test_expert_choice_matches_reference(k, capacity_factor):
    layer, x, idx = layer_and_inputs("expert_choice", moe_top_k=k, capacity_factor=capacity_factor)
    y, aux = layer(x, idx)
    X = numpy_of(x).reshape(N, C)
    probs = [router_probs(layer, X[n])[1] for n in range(N)]
    capacity = min(N, math.ceil((capacity_factor or 1.0) * N * k / E))
    y_ref, picked = np.zeros((N, C)), set()
    for e in range(E):
        for n in sorted(range(N), key=lambda n: -probs[n][e])[:capacity]:
            y_ref[n] += probs[n][e] * expert_output(layer.experts, e, X[n])
            picked.add(n)
    np.testing.assert_allclose(numpy_of(y).reshape(N, C), y_ref, rtol=1e-10, atol=1e-12)
    assert aux["dropped"].item() == pytest.approx(1 - len(picked) / N)
    assert aux["balance"].item() == 0


def test_expert_choice_leaks_the_future_token_choice_does_not():
    # router = [I | 0], so a token's logits are its first E features. The last token flips
    # from hating expert 0 to loving it: it enters expert 0's top-c and pushes out an
    # earlier token, whose output changes although it comes first in time.
    config = dict(moe_top_k=1, capacity_factor=0.0)
    torch.manual_seed(0)
    x = torch.randn(1, T, C, dtype=torch.float64)
    x[0, -1, :E] = 0
    x[0, -1, 0] = -20
    later = x.clone()
    later[0, -1, 0] = 20
    idx = torch.zeros(1, T, dtype=torch.long)
    for family, leaks in (("expert_choice", True), ("moe", False)):
        layer = moe.build(family, small_config(**config)).double().eval()
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[:, :E] = torch.eye(E, dtype=torch.float64)
        change = (layer(x, idx)[0] - layer(later, idx)[0])[0, :-1].abs().max().item()
        assert (change > 1e-6) == leaks, (family, change)


# -- hash -----------------------------------------------------------------------------

def test_hash_matches_reference_and_depends_only_on_token_id():
    layer, x, idx = layer_and_inputs("hash_moe")
    idx[0, 0] = idx[1, 5] = idx[2, 7] = 3        # one id at different positions and inputs
    y, aux = layer(x, idx)
    X, ids = numpy_of(x).reshape(N, C), idx.reshape(-1).tolist()
    expert_of = layer.expert_of_token.tolist()
    y_ref = np.stack([expert_output(layer.experts, expert_of[ids[n]], X[n]) for n in range(N)])
    np.testing.assert_allclose(numpy_of(y).reshape(N, C), y_ref, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(numpy_of(aux["load"]), [sum(expert_of[i] == e for i in ids) / N for e in range(E)])
    # the routing is a pure function of the id: identical inputs under the same id give the
    # same output anywhere, and the assignment is fixed by the seed alone
    x2 = torch.randn_like(x)
    x2[1, 5] = x2[2, 7] = x2[0, 0]
    y2, _ = layer(x2, idx)
    torch.testing.assert_close(y2[1, 5], y2[0, 0])
    torch.testing.assert_close(y2[2, 7], y2[0, 0])
    again = moe.build("hash_moe", small_config())
    assert torch.equal(again.expert_of_token, layer.expert_of_token)
    other_seed = moe.build("hash_moe", small_config(seed=1))
    assert not torch.equal(other_seed.expert_of_token, layer.expert_of_token)
    assert layer.expert_of_token.min() >= 0 and layer.expert_of_token.max() < E


def test_balanced_hash_balances_zipf_counts():
    vocab, experts = 1000, 8
    counts = [1e6 / (rank + 1) for rank in range(vocab)]                 # Zipf, s = 1
    config = small_config(vocab_size=vocab, n_experts=experts, hash_assignment="balanced")

    def expert_loads(assignment):
        loads = [0.0] * experts
        for token, e in enumerate(assignment.tolist()):
            loads[e] += counts[token]
        return loads

    balanced = expert_loads(moe.HashMoE(config, token_counts=torch.tensor(counts)).expert_of_token)
    random = expert_loads(moe.HashMoE(small_config(vocab_size=vocab, n_experts=experts)).expert_of_token)
    assert max(balanced) / (sum(counts) / experts) < max(random) / (sum(counts) / experts)
    # greedy onto the lightest expert: no expert exceeds another by more than one token's count
    assert max(balanced) - min(balanced) <= max(counts)
    # without counts "balanced" falls back to the seeded random assignment
    fallback = moe.HashMoE(config).expert_of_token
    assert torch.equal(fallback, moe.HashMoE(small_config(vocab_size=vocab, n_experts=experts)).expert_of_token)
    # never-seen tokens (count 0) spread evenly over the experts still at total 0 (all but
    # the two that took the tokens of count 5 and 3) instead of piling onto one
    spread = moe.balanced_assignment([5.0, 3.0] + [0.0] * 40, experts)
    assert spread[:2].tolist() == [0, 1]
    assert torch.bincount(spread[2:], minlength=experts).tolist() == [0, 0, 7, 7, 7, 7, 6, 6]


# -- mixture of tokens ----------------------------------------------------------------

def test_mot_matches_reference():
    layer, x, idx = layer_and_inputs("mot")
    y, _ = layer(x, idx)
    X = numpy_of(x)
    y_ref = np.zeros((B, T, C))
    for t in range(T):
        logits = [router_probs(layer, X[b, t])[0] for b in range(B)]     # [b][e]
        for e in range(E):
            weights = softmax([logits[b][e] for b in range(B)])          # over the group
            mix = sum(weights[b] * X[b, t] for b in range(B))
            out = expert_output(layer.experts, e, mix)
            for b in range(B):
                y_ref[b, t] += weights[b] * out
    np.testing.assert_allclose(numpy_of(y), y_ref, rtol=1e-10, atol=1e-12)


def test_mot_mixes_across_sequences_never_along_time():
    layer, x, idx = layer_and_inputs("mot")
    y = layer(x, idx)[0]
    changed = x.clone()
    changed[0, 3] = torch.randn(C, dtype=torch.float64)
    y2 = layer(changed, idx)[0]
    others = [t for t in range(T) if t != 3]
    torch.testing.assert_close(y2[:, others], y[:, others], rtol=0, atol=0)   # same sequence, other t
    assert (y2[1:, 3] - y[1:, 3]).abs().max() > 1e-6                         # other sequences, same t
    # batch 1: every weight is 1, so the layer is the plain sum of all experts
    single = numpy_of(x[:1])
    expected = [sum(expert_output(layer.experts, e, single[0, t]) for e in range(E)) for t in range(T)]
    np.testing.assert_allclose(numpy_of(layer(x[:1], idx[:1])[0])[0], expected, rtol=1e-10, atol=1e-12)


# -- counting -------------------------------------------------------------------------

def test_param_counts_match_closed_forms():
    # C=12, E=4, f=8, k=2, one shared expert: expert = 3*12*8 = 288, router = 12*4 = 48
    config = small_config(moe_top_k=2, n_shared_experts=1)
    expected = {"moe": (48 + 288 + 4 * 288, 48 + 288 + 2 * 288),
                "expert_choice": (48 + 4 * 288, 48 + 2 * 288),
                "hash_moe": (4 * 288, 288),
                "mot": (48 + 4 * 288, 48 + 4 * 288)}
    for family in moe.FAMILIES:
        total, active = moe.params_per_layer(family, config)
        assert (total, active) == expected[family], family
        assert total == sum(p.numel() for p in moe.build(family, config).parameters()), family
    # expert_d_ff 0 means d_ff (20): expert = 3*12*20 = 720
    assert moe.params_per_layer("hash_moe", small_config(expert_d_ff=0)) == (4 * 720, 720)


def test_flops_match_closed_forms_and_the_flop_counter():
    # expert pass = 3*2*12*8 = 576, router = 2*12*4 = 96; capacity 1.5 with k=2 gives
    # c = 1.5*24*2/4 = 18 slots per expert exactly; MoT at B=3 adds 2 mixing einsums of 96
    config = small_config(moe_top_k=2, n_shared_experts=1, capacity_factor=1.5)
    no_capacity = small_config(moe_top_k=2, n_shared_experts=1)
    cases = {"moe": (no_capacity, 96 + 3 * 576),
             "expert_choice": (config, 96 + 1.5 * 2 * 576),
             "hash_moe": (config, 576),
             "mot": (config, 96 + 2 * 96 + 4 * 576 / B)}
    for family, (family_config, expected) in cases.items():
        assert moe.matmul_flops_per_token(family, family_config, batch_size=B) == pytest.approx(expected)
        layer = moe.build(family, family_config)
        x, idx = torch.randn(B, T, C), torch.randint(VOCAB, (B, T))
        with FlopCounterMode(display=False) as counter:
            layer(x, idx)
        assert counter.get_total_flops() == pytest.approx(N * expected), family
    # MoT at batch 1 runs every expert for every token
    assert moe.matmul_flops_per_token("mot", config) == 96 + 192 + 4 * 576


# -- training -------------------------------------------------------------------------

@pytest.mark.parametrize("family", moe.FAMILIES)
def test_gradients_reach_router_and_experts(family):
    config = small_config(moe_top_k=2, n_shared_experts=1 if family == "moe" else 0)
    layer = moe.build(family, config).train()
    x = torch.randn(B, T, C, requires_grad=True)
    y, aux = layer(x, torch.randint(VOCAB, (B, T)))
    (y.pow(2).sum() + aux["balance"] + aux["z"]).backward()
    named = dict(layer.named_parameters())
    expected = ["experts.gate", "experts.up", "experts.down"]
    expected += [] if family == "hash_moe" else ["router.weight"]
    expected += ["shared.gate", "shared.up", "shared.down"] if family == "moe" else []
    for name in expected:
        assert named[name].grad is not None and named[name].grad.abs().sum() > 0, (family, name)
    assert x.grad.abs().sum() > 0


def test_router_runs_in_float32_under_bf16_autocast():
    layer = moe.build("moe", small_config(moe_top_k=2))
    x = torch.randn(B, T, C)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = moe.router_logits(layer.router, x.to(torch.bfloat16))
        y, aux = layer(x, torch.zeros(B, T, dtype=torch.long))
    assert logits.dtype == torch.float32 and aux["balance"].dtype == torch.float32
    assert torch.isfinite(y).all()


def test_build_rejects_unknown_family_and_bad_top_k():
    with pytest.raises(ValueError, match="family"):
        moe.build("dense", small_config())
    with pytest.raises(ValueError, match="moe_top_k"):
        moe.build("moe", small_config(moe_top_k=E + 1))


def test_expert_init_scales_residual_projection():
    layer = moe.build("moe", small_config(n_embd=64, expert_d_ff=64, n_experts=8, n_layer=8))
    assert layer.experts.gate.std().item() == pytest.approx(0.02, rel=0.03)
    assert layer.experts.down.std().item() == pytest.approx(0.02 / math.sqrt(2 * 8), rel=0.03)
    no_depth = small_config(n_embd=64, expert_d_ff=64, n_experts=8)
    del no_depth.n_layer
    assert moe.build("mot", no_depth).experts.down.std().item() == pytest.approx(0.02, rel=0.03)
