"""
The sparse feed-forward baselines STEM is compared against: layers that also spend fewer
FLOPs per token than their parameter count suggests, but choose the parameters a token
uses by a learned router (or a hash) instead of by a table lookup.

    moe            token choice (Switch / GShard): each token picks its top-k experts
    expert_choice  each expert picks its top-c tokens of the batch (Zhou et al. 2022)
    hash_moe       the input token id fixes the expert (Roller et al. 2021, Hash Layers)
    mot            Mixture of Tokens: each expert processes a weighted mix of a group of
                   tokens and the output is spread back by the same weights (Antoniak et al.)

Every layer is `forward(x, idx) -> (y, aux)` with x (B, T, C), idx (B, T) the input token
ids, y (B, T, C) (the caller adds the residual) and aux a dict of detached diagnostics and
the auxiliary losses, the losses already multiplied by their coefficients:

    balance  scalar, the load-balancing loss (0 for layers without one)
    z        scalar, the router z-loss (0 for layers without one)
    load     (n_experts,) fraction of token-assignments each expert received, before
             any capacity drop (detached)
    dropped  scalar, fraction of token-assignments lost to a capacity limit (detached)

Experts are SwiGLU FFNs `down(silu(x @ gate) * (x @ up))` of hidden size expert_d_ff,
stored batched as (E, C, f) / (E, f, C) parameters so that all experts' weights are three
tensors and experts run as one bmm or as a short loop over experts, never over tokens.
"""

import heapq
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

import configurator
from configurator import knob

FAMILIES = ("moe", "expert_choice", "hash_moe", "mot")

@dataclass
class MoEConfig:
    """The baselines' knobs (model.GPTConfig holds one as .moe)."""
    n_experts: int = knob(8, ge=1, help="experts per MoE layer",
                          section="MoE baselines (moe.MoEConfig; for --ffn=moe, expert_choice, hash_moe, mot)")
    moe_top_k: int = knob(1, ge=1, help="experts per token (token choice), or k of expert choice's capacity")
    expert_d_ff: int = knob(0, ge=0, help="an expert's hidden size; 0 means d_ff (fewer, with more experts: "
                                          "fine-grained experts)")
    n_shared_experts: int = knob(0, ge=0, help="experts every token uses (DeepSeekMoE)")
    capacity_factor: float = knob(0.0, ge=0, help="token slots per expert as a multiple of the even share; "
                                                  "0: no limit (no dropped tokens)")
    router_noise: float = knob(0.0, ge=0, help="std of the router's noise in training (noisy top-k)")
    balance_loss_coef: float = knob(0.01, ge=0, help="coefficient of the Switch load-balancing loss")
    z_loss_coef: float = knob(0.0, ge=0, help="coefficient of the router z-loss")
    hash_assignment: str = knob("random", choices=("random", "balanced"),
                                help="Hash-MoE: a random expert per id, or balanced by training-token frequency")

    def __post_init__(self):
        configurator.check(self)


# The value a layer uses when its config lacks a setting (tests build layers from plain
# namespaces); seed: of the random hash assignment.
DEFAULTS = {**{f.name: f.default for f in fields(MoEConfig)}, "seed": 0}


def setting(config, name):
    """A baseline's setting: from config.moe (a GPTConfig) or from config itself."""
    return getattr(getattr(config, "moe", config), name, DEFAULTS[name])


def expert_hidden_size(config):
    return setting(config, "expert_d_ff") or config.d_ff


def top_k_of(config):
    k, n_experts = setting(config, "moe_top_k"), setting(config, "n_experts")
    if not 1 <= k <= n_experts:
        raise ValueError(f"moe_top_k must be in 1..n_experts ({n_experts}), got {k}")
    return k


def expert_capacity(capacity_factor, n_tokens, top_k, n_experts):
    """Token slots per expert: ceil(capacity_factor * N * k / E), the even share of the
    N*k assignments scaled by the capacity factor."""
    return math.ceil(capacity_factor * n_tokens * top_k / n_experts)


# -----------------------------------------------------------------------------
# building blocks

class Experts(nn.Module):
    """n SwiGLU experts of hidden size f as three batched weights: gate, up (n, C, f) and
    down (n, f, C). The down projections write into the residual stream, so they get the
    GPT-2 residual init 0.02 / sqrt(2 n_layer) when the config knows n_layer."""

    def __init__(self, n, n_embd, hidden, n_layer=None):
        super().__init__()
        self.gate = nn.Parameter(torch.empty(n, n_embd, hidden))
        self.up = nn.Parameter(torch.empty(n, n_embd, hidden))
        self.down = nn.Parameter(torch.empty(n, hidden, n_embd))
        self.n_layer = n_layer
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.gate, mean=0.0, std=0.02)
        nn.init.normal_(self.up, mean=0.0, std=0.02)
        down_std = 0.02 / math.sqrt(2 * self.n_layer) if self.n_layer else 0.02
        nn.init.normal_(self.down, mean=0.0, std=down_std)

    def one(self, e, x):
        """Expert e on a list of tokens: (M, C) -> (M, C)."""
        h = F.silu(x @ self.gate[e]) * (x @ self.up[e])                  # (M, f)
        return h @ self.down[e]                                          # (M, C)

    def batched(self, x):
        """Expert e on x[e] for every e at once: (n, M, C) -> (n, M, C)."""
        h = F.silu(torch.bmm(x, self.gate)) * torch.bmm(x, self.up)      # (n, M, f)
        return torch.bmm(h, self.down)                                   # (n, M, C)

    def summed(self, x):
        """Sum of all experts on every token: (N, C) -> (N, C). n experts of size f summed
        are one SwiGLU of size n*f, so this is three plain matmuls."""
        n, n_embd, hidden = self.gate.shape
        gate = self.gate.permute(1, 0, 2).reshape(n_embd, n * hidden)    # (C, n*f)
        up = self.up.permute(1, 0, 2).reshape(n_embd, n * hidden)        # (C, n*f)
        h = F.silu(x @ gate) * (x @ up)                                  # (N, n*f)
        return h @ self.down.reshape(n * hidden, n_embd)                 # (N, C)


def make_router(n_embd, n_experts):
    router = nn.Linear(n_embd, n_experts, bias=False)
    nn.init.normal_(router.weight, mean=0.0, std=0.02)
    return router


def router_logits(router, x):
    """Router logits in float32 (float64 for a float64 module) even under bf16 autocast:
    softmax and top-k over near-equal bf16 logits would make routing noisy. (..., C) -> (..., E)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.linear(x.to(dtype), router.weight.to(dtype))


def z_loss(logits, coef):
    """ST-MoE router z-loss: coef * mean over tokens of logsumexp(logits)^2; keeps the
    logits small so that the float32 softmax stays well conditioned."""
    if not coef:
        return logits.new_zeros(())
    return coef * torch.logsumexp(logits, dim=-1).pow(2).mean()


def run_assignments(experts, x, token, expert, weight=None):
    """Sum over assignments of weight * expert(x[token]) into each token's output.
    x (N, C); token, expert, weight (A,): assignment a sends token[a] to expert[a].
    Sorting by expert turns the assignments into one contiguous slice per expert."""
    n_experts = experts.gate.size(0)
    order = torch.argsort(expert, stable=True)
    token = token[order]
    weight = None if weight is None else weight[order]
    counts = torch.bincount(expert, minlength=n_experts).tolist()      # host sync, once
    y = torch.zeros_like(x)                                              # (N, C)
    start = 0
    for e, count in enumerate(counts):
        if count:
            rows = token[start:start + count]
            out = experts.one(e, x[rows])                                # (count, C)
            if weight is not None:
                out = out * weight[start:start + count, None].to(out.dtype)
            y.index_add_(0, rows, out.to(y.dtype))
        start += count
    return y


def no_loss(x):
    return torch.zeros((), device=x.device, dtype=torch.float32)


# -----------------------------------------------------------------------------
# the four families

class TokenChoiceMoE(nn.Module):
    """Token choice (Switch for k=1, GShard for k=2) with optional always-on shared experts.

    Each token picks its top-k experts by router probability. An expert takes at most
    ceil(capacity_factor * N * k / E) of the batch's N*k assignments, first come first
    served in token order, every token's 1st choice ahead of any 2nd choice; an assignment
    over capacity is dropped and contributes nothing (the token still passes through the
    residual). With a capacity limit a token's output can depend on tokens earlier in the
    flattened (B*T) batch, which includes later positions of earlier sequences; set
    capacity_factor 0 for generation.

    Losses: the Switch load-balancing loss alpha * E * sum_i f_i P_i (f_i the fraction of
    tokens whose 1st choice is expert i, counted before drops; P_i the mean router
    probability of expert i), equal to alpha when routing is balanced; and the z-loss.
    """

    def __init__(self, config):
        super().__init__()
        self.n_experts = setting(config, "n_experts")
        self.top_k = top_k_of(config)
        self.capacity_factor = setting(config, "capacity_factor")
        self.router_noise = setting(config, "router_noise")
        self.balance_loss_coef = setting(config, "balance_loss_coef")
        self.z_loss_coef = setting(config, "z_loss_coef")
        hidden, n_layer = expert_hidden_size(config), getattr(config, "n_layer", None)
        self.router = make_router(config.n_embd, self.n_experts)
        self.experts = Experts(self.n_experts, config.n_embd, hidden, n_layer)
        n_shared = setting(config, "n_shared_experts")
        self.shared = Experts(n_shared, config.n_embd, hidden, n_layer) if n_shared else None

    def forward(self, x, idx=None):
        B, T, C = x.shape
        N, E, k = B * T, self.n_experts, self.top_k
        x_flat = x.reshape(N, C)
        logits = router_logits(self.router, x_flat)                      # (N, E) float32
        routing = logits
        if self.training and self.router_noise:
            # noisy top-k (Shazeer et al.): the noise changes the choice and the gate weights
            routing = logits + self.router_noise * torch.randn_like(logits)
        probs = F.softmax(routing, dim=-1)                               # (N, E)
        top_probs, top_experts = probs.topk(k, dim=-1)                   # (N, k)
        # k=1: the raw probability as in Switch, so the router learns from the gate value.
        # k>1: the chosen probabilities renormalised to sum to 1 over the k experts.
        weights = top_probs / top_probs.sum(-1, keepdim=True) if k > 1 else top_probs

        # assignments in priority order: all 1st choices in token order, then all 2nd choices
        expert = top_experts.t().reshape(-1)                             # (k*N,)
        token = torch.arange(N, device=x.device).repeat(k)               # (k*N,)
        weight = weights.t().reshape(-1)                                 # (k*N,)
        if self.capacity_factor:
            capacity = expert_capacity(self.capacity_factor, N, k, E)
            one_hot = F.one_hot(expert, E)                               # (k*N, E)
            place_in_queue = (one_hot.cumsum(0) * one_hot).sum(-1) - 1   # (k*N,)
            kept = place_in_queue < capacity
            y = run_assignments(self.experts, x_flat, token[kept], expert[kept], weight[kept])
            dropped = (~kept).float().mean()
        else:
            y = run_assignments(self.experts, x_flat, token, expert, weight)
            dropped = no_loss(x)
        if self.shared is not None:
            y = y + self.shared.summed(x_flat).to(y.dtype)

        first_choice_fraction = torch.bincount(top_experts[:, 0], minlength=E).to(probs.dtype) / N
        mean_prob = probs.mean(0)                                        # (E,)
        balance = self.balance_loss_coef * E * (first_choice_fraction * mean_prob).sum()
        load = torch.bincount(expert, minlength=E).float() / (k * N)
        aux = {"balance": balance, "z": z_loss(logits, self.z_loss_coef),
               "load": load.detach(), "dropped": dropped.detach()}
        return y.view(B, T, C), aux


class ExpertChoiceMoE(nn.Module):
    """Expert choice: each expert takes the c = ceil(capacity_factor * N * k / E) tokens of
    the batch with the highest router probability for it (capacity_factor 0 reads as 1), so
    loads are balanced by construction and a token gets a variable number of experts
    (k on average at capacity_factor 1). y_n = sum over experts that picked n of p_{n,e} expert_e(x_n).

    Not causal: the selection is a top-c over all B*T tokens, so whether the token at
    position t is picked depends on the scores of the tokens after it (and of the other
    sequences). Training therefore conditions on the future, and decoding one token at a
    time, where the later tokens do not exist yet, cannot reproduce the training-time
    computation. It is here as the baseline the literature reports, with that caveat.

    No balance loss (0); the z-loss is optional. aux "dropped" is the fraction of tokens
    that no expert picked (they get no FFN output).
    """

    def __init__(self, config):
        super().__init__()
        self.n_experts = setting(config, "n_experts")
        self.top_k = top_k_of(config)
        self.capacity_factor = setting(config, "capacity_factor") or 1.0
        self.z_loss_coef = setting(config, "z_loss_coef")
        self.router = make_router(config.n_embd, self.n_experts)
        self.experts = Experts(self.n_experts, config.n_embd, expert_hidden_size(config),
                               getattr(config, "n_layer", None))

    def forward(self, x, idx=None):
        B, T, C = x.shape
        N, E = B * T, self.n_experts
        x_flat = x.reshape(N, C)
        logits = router_logits(self.router, x_flat)                      # (N, E) float32
        probs = F.softmax(logits, dim=-1)                                # (N, E)
        capacity = min(N, expert_capacity(self.capacity_factor, N, self.top_k, E))
        top_probs, top_tokens = probs.t().topk(capacity, dim=-1)         # (E, c)
        out = self.experts.batched(x_flat[top_tokens])                   # (E, c, C)
        out = out * top_probs[..., None].to(out.dtype)
        y = torch.zeros_like(x_flat).index_add_(0, top_tokens.reshape(-1), out.reshape(-1, C).to(x.dtype))
        picked = torch.zeros(N, dtype=torch.bool, device=x.device)
        picked[top_tokens.reshape(-1)] = True
        aux = {"balance": no_loss(x), "z": z_loss(logits, self.z_loss_coef),
               "load": torch.full((E,), 1.0 / E, device=x.device),      # c tokens each
               "dropped": (~picked).float().mean().detach()}
        return y.view(B, T, C), aux


def random_assignment(vocab_size, n_experts, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(n_experts, (vocab_size,), generator=generator)


def balanced_assignment(token_counts, n_experts):
    """Greedy longest-processing-time: tokens by descending frequency, each to the expert
    with the smallest total frequency so far, so that the token-weighted load is even.
    Ties (e.g. among never-seen tokens of count 0) go to the expert with fewest token
    types, then the lowest index, so unseen tokens spread evenly instead of piling up."""
    counts = torch.as_tensor(token_counts, dtype=torch.float64).cpu()
    order = torch.argsort(counts, descending=True, stable=True).tolist()
    counts = counts.tolist()
    heap = [(0.0, 0, e) for e in range(n_experts)]    # (total count, token types, expert)
    assignment = [0] * len(counts)
    for token in order:
        total, types, e = heapq.heappop(heap)
        assignment[token] = e
        heapq.heappush(heap, (total + counts[token], types + 1, e))
    return torch.tensor(assignment, dtype=torch.long)


class HashMoE(nn.Module):
    """Hash layer: the input token id alone picks the expert (top-1, weight 1, no router),
    through a fixed buffer expert_of_token (vocab_size,). The closest MoE relative of STEM:
    both route by token id, but here a token selects a whole expert FFN, not a table row.

    hash_assignment "random": a uniform random expert per id, seeded by config.seed.
    "balanced": greedy balancing of the given token_counts (vocab_size,) frequencies
    (random when no counts are given). No auxiliary losses.
    """

    def __init__(self, config, token_counts=None):
        super().__init__()
        self.n_experts = setting(config, "n_experts")
        mode = setting(config, "hash_assignment")
        if mode not in ("random", "balanced"):
            raise ValueError(f"hash_assignment must be 'random' or 'balanced', got {mode!r}")
        if mode == "balanced" and token_counts is not None:
            if len(token_counts) != config.vocab_size:
                raise ValueError(f"token_counts has {len(token_counts)} entries, vocab_size is {config.vocab_size}")
            assignment = balanced_assignment(token_counts, self.n_experts)
        else:
            assignment = random_assignment(config.vocab_size, self.n_experts, setting(config, "seed"))
        self.register_buffer("expert_of_token", assignment)                 # (vocab_size,)
        self.experts = Experts(self.n_experts, config.n_embd, expert_hidden_size(config),
                               getattr(config, "n_layer", None))

    def forward(self, x, idx):
        B, T, C = x.shape
        x_flat = x.reshape(B * T, C)
        expert = self.expert_of_token[idx.reshape(-1)]                   # (N,)
        token = torch.arange(B * T, device=x.device)
        y = run_assignments(self.experts, x_flat, token, expert)
        load = torch.bincount(expert, minlength=self.n_experts).float() / (B * T)
        aux = {"balance": no_loss(x), "z": no_loss(x), "load": load, "dropped": no_loss(x)}
        return y.view(B, T, C), aux


class MixtureOfTokens(nn.Module):
    """Mixture of Tokens: for every position t, the B tokens at t (one per sequence) form
    a group. Each expert e mixes the group with weights w_{b,e} = softmax over b of the
    router logits, processes the single mixed token, and the result goes back to the group
    by the same weights: y_b = sum_e w_{b,e} expert_e(sum_b' w_{b',e} x_b'). Continuous, so
    no drops, no top-k and no balance loss; every expert is active for every group.

    Groups run across sequences, never along time, so a sequence's output at t depends on
    the other sequences at t but never on its own other positions: it stays causal. Mixing
    needs batch size > 1; with batch 1 (e.g. decoding one sequence) every weight is 1 and
    each expert sees the lone token, i.e. the layer becomes the sum of all E experts.
    """

    def __init__(self, config):
        super().__init__()
        self.n_experts = setting(config, "n_experts")
        self.router = make_router(config.n_embd, self.n_experts)
        self.experts = Experts(self.n_experts, config.n_embd, expert_hidden_size(config),
                               getattr(config, "n_layer", None))

    def forward(self, x, idx=None):
        logits = router_logits(self.router, x)                           # (B, T, E) float32
        weights = F.softmax(logits, dim=0).to(x.dtype)                   # (B, T, E), over the group
        mix = torch.einsum("bte,btc->etc", weights, x)                   # (E, T, C)
        out = self.experts.batched(mix)                                  # (E, T, C)
        y = torch.einsum("bte,etc->btc", weights, out.to(x.dtype))       # (B, T, C)
        aux = {"balance": no_loss(x), "z": no_loss(x),
               "load": torch.full((self.n_experts,), 1.0 / self.n_experts, device=x.device),
               "dropped": no_loss(x)}
        return y, aux


# -----------------------------------------------------------------------------
# construction and counting

def build(family, config, token_counts=None):
    """The FFN layer of one family; token_counts only matters for a balanced hash_moe."""
    if family == "moe":
        return TokenChoiceMoE(config)
    if family == "expert_choice":
        return ExpertChoiceMoE(config)
    if family == "hash_moe":
        return HashMoE(config, token_counts)
    if family == "mot":
        return MixtureOfTokens(config)
    raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def check_family(family):
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")


def params_per_layer(family, config):
    """(total, active per token) parameters of one layer of the family.
    Active: moe = router + shared + k routed experts; expert_choice = router + k experts
    (the average at capacity_factor 1; it scales with the capacity factor); hash_moe = one
    expert (no router); mot = everything, since every expert runs on every group."""
    check_family(family)
    C, E = config.n_embd, setting(config, "n_experts")
    expert = 3 * C * expert_hidden_size(config)
    router = C * E
    if family == "moe":
        shared = setting(config, "n_shared_experts") * expert
        return router + shared + E * expert, router + shared + top_k_of(config) * expert
    if family == "expert_choice":
        return router + E * expert, router + top_k_of(config) * expert
    if family == "hash_moe":
        return E * expert, expert
    return router + E * expert, router + E * expert                   # mot


def matmul_flops_per_token(family, config, batch_size=None):
    """Forward matmul FLOPs per token of one layer (2 per multiply-add); elementwise work
    (activations, gate weights, softmax) counts nothing, as in model.flops_per_token.
    Router 2*C*E; each expert a token goes through 3*2*C*f; shared experts likewise.
    expert_choice: E*c expert passes over N tokens, i.e. capacity_factor * k per token.
    mot: each expert runs once per group of B tokens, so E*3*2*C*f / B per token, plus the
    mixing and the redistribution einsums, 2*C*E each. batch_size is that B (default:
    config.batch_size if the config has one, else 1, the decoding case)."""
    check_family(family)
    C, E = config.n_embd, setting(config, "n_experts")
    expert = 3 * 2 * C * expert_hidden_size(config)
    router = 2 * C * E
    if family == "moe":
        return router + (top_k_of(config) + setting(config, "n_shared_experts")) * expert
    if family == "expert_choice":
        capacity_factor = setting(config, "capacity_factor") or 1.0
        return router + capacity_factor * top_k_of(config) * expert
    if family == "hash_moe":
        return expert
    B = batch_size or getattr(config, "batch_size", 1)
    return router + 2 * 2 * C * E + E * expert / B                     # mot
