"""Chapter 07's graded checks: top-k routing with capacity, the load-balancing loss, the X-MoE scores, the
grouped GEMM's sort-and-pad metadata (kernels/grouped_gemm.py), the MoE layer end to end (a tiny MoE model
that trains with a balanced load), and one tile of the grouped GEMM inside its Triton kernel.

Each check tests the mechanism in float64 against the learner's function (its first argument), with naive loop
oracles. The kernel exercise (7.6) launches the learner's @triton.jit kernel under Triton's interpreter on
buffers whose surroundings are observable: NaN around every expert's weights and past column K - 1, sentinel
rows and columns around the output. Known-wrong solutions: exercises/grading/mutants/ch07_mixture_of_experts.md.
"""

import math
from functools import partial

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import expect_close, expect_tensor, float32_default, fmt, installed
from nanomodels.moe import MoE
from nanomodels.transformer import Transformer, TransformerConfig

F64 = torch.float64


def _logits(S, E, seed, scale=2.0):
    return torch.randn(S, E, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale


def _oracle(logits, k, C):
    """{(s, e): (slot, gate)} for kept choices, by the rule written out one token at a time."""
    S, E = logits.shape
    p = torch.softmax(logits, -1).tolist()
    picks = []
    for row in p:
        e1 = max(range(E), key=lambda e: (row[e], -e))
        chosen = [e1] + ([max((e for e in range(E) if e != e1), key=lambda e: (row[e], -e))] if k == 2 else [])
        total = sum(row[e] for e in chosen) if k == 2 else 1.0
        picks.append([(e, row[e] / total) for e in chosen])
    fill, kept = [0] * E, {}
    for j in range(k):  # every first choice, then every second choice
        for s in range(S):
            e, g = picks[s][j]
            if fill[e] < C:
                kept[s, e] = (fill[e], g)
            fill[e] += 1
    return kept


def _kept(routing):
    out = {}
    for s in range(routing.experts.size(0)):
        for j in range(routing.experts.size(1)):
            if bool(routing.kept[s, j]):
                out[s, int(routing.experts[s, j])] = (int(routing.slots[s, j]), float(routing.gates[s, j]))
    return out


# ---- 7.1 top-k routing ------------------------------------------------------------------------------------
# corner cases: one token; capacity 1 with every token's choices overflowing it (S = 16, E = 2, k = 2); no
# overflow (C >= S); k = 1 and 2; second choices after all first choices. Pinned: those three.

@check("the kept (token, expert, slot, gate) choices equal the rule: softmax, e1 = argmax, e2 = argmax of the rest, "
       "slots per expert in token order with every first choice before any second choice, a slot >= C dropped, "
       "gate p[e1] for k = 1 and p[e_j] / (p[e1] + p[e2]) for k = 2 (before dropping)",
       S=st.integers(1, 16), E=st.integers(2, 6), k=st.sampled_from([1, 2]), C=st.integers(1, 6),
       seed=st.integers(0, 10_000), examples=[dict(S=1, E=2, k=2, C=1, seed=0), dict(S=16, E=2, k=2, C=1, seed=1),
                                              dict(S=16, E=6, k=1, C=6, seed=2)])
def routing_matches_the_rule(top_k_routing, S, E, k, C, seed):
    logits = _logits(S, E, seed)
    got, want = _kept(top_k_routing(logits, k, C)), _oracle(logits, k, C)
    if set(got) != set(want):
        raise Violation(f"kept (token, expert) pairs {sorted(got)}, the rule keeps {sorted(want)}")
    for key, (slot, gate) in want.items():
        if got[key][0] != slot or abs(got[key][1] - gate) > 1e-10:
            raise Violation(f"token {key[0]} at expert {key[1]}: got slot {got[key][0]}, gate {got[key][1]:.6f}; "
                            f"the rule gives slot {slot}, gate {gate:.6f}")


@check("with capacity 1 each expert keeps exactly the first token (in token order) that chose it first",
       S=st.integers(1, 20), E=st.integers(2, 6), k=st.sampled_from([1, 2]), seed=st.integers(0, 10_000))
def capacity_one_keeps_the_first_token(top_k_routing, S, E, k, seed):
    logits = _logits(S, E, seed)
    got = _kept(top_k_routing(logits, k, 1))
    e1 = logits.argmax(-1).tolist()
    for e in sorted(set(e1)):
        holders = sorted(s for (s, ee) in got if ee == e)
        if holders != [e1.index(e)]:
            raise Violation(f"expert {e} holds tokens {holders}; the first token choosing it first is {e1.index(e)}")


@check("routing returns the load-balancing loss of its probabilities and first choices, and probs = softmax(logits)",
       S=st.integers(1, 12), E=st.integers(2, 6), seed=st.integers(0, 10_000))
def routing_returns_probs_and_aux(top_k_routing, S, E, seed):
    logits = _logits(S, E, seed)
    r = top_k_routing(logits, 2, 3)
    if (r.probs - torch.softmax(logits, -1)).abs().max() > 1e-12:
        raise Violation("probs is not softmax(logits)")
    p = torch.softmax(logits, -1)
    f = torch.nn.functional.one_hot(p.argmax(-1), E).to(F64).mean(0)
    want = E * float((p.mean(0) * f).sum())
    if abs(float(r.aux_loss) - want) > 1e-10:
        raise Violation(f"aux loss {float(r.aux_loss):.6f}, expected {want:.6f}")


# ---- 7.2 the load-balancing loss --------------------------------------------------------------------------
# corner cases: one token; every token on one expert; E = 2. Drawn (S from 1, E from 2).

@check("l_aux = E sum_e mean_s p[s, e] * mean_s 1[e1(s) = e]: 1 at uniform routing, E at collapse, and the "
       "written-out sum on random probabilities", S=st.integers(1, 12), E=st.integers(2, 6),
       seed=st.integers(0, 10_000))
def aux_loss_value(load_balancing_loss, S, E, seed):
    p = torch.softmax(_logits(S, E, seed), -1)
    e1 = p.argmax(-1)
    want = E * sum(sum(float(p[s, e]) for s in range(S)) / S * sum(int(e1[s]) == e for s in range(S)) / S
                   for e in range(E))
    got = float(load_balancing_loss(p, e1))
    if abs(got - want) > 1e-10:
        raise Violation(f"got {got:.6f}, the equation gives {want:.6f}")
    uniform = torch.full((2 * E, E), 1.0 / E, dtype=F64)
    if abs(float(load_balancing_loss(uniform, torch.arange(2 * E) % E)) - 1) > 1e-10:
        raise Violation("uniform probabilities with balanced first choices must give exactly 1")
    collapsed = torch.zeros(4, E, dtype=F64)
    collapsed[:, 0] = 1
    if abs(float(load_balancing_loss(collapsed, torch.zeros(4, dtype=torch.long))) - E) > 1e-10:
        raise Violation(f"every token on one expert with probability 1 must give E = {E}")


@check("the gradient flows only through the mean probability: d l_aux / d p[s, e] = (E / S) f_e",
       S=st.integers(1, 12), E=st.integers(2, 6), seed=st.integers(0, 10_000))
def aux_loss_gradient(load_balancing_loss, S, E, seed):
    p = torch.softmax(_logits(S, E, seed), -1).requires_grad_()
    e1 = p.detach().argmax(-1)
    load_balancing_loss(p, e1).backward()
    f = torch.nn.functional.one_hot(e1, E).to(F64).mean(0)
    want = (E / S) * f.expand(S, E)
    if p.grad is None or (p.grad - want).abs().max() > 1e-12:
        diff = "no gradient" if p.grad is None else f"max |diff| {(p.grad - want).abs().max():.3g}"
        raise Violation(f"gradient w.r.t. p differs from (E / S) f_e ({diff}): the argmax fraction must be a constant")


# ---- 7.3 X-MoE scores -------------------------------------------------------------------------------------
# corner cases: one expert; one token; tau far below and above 1; inputs scaled by 0.01 and 1000. Drawn.

def _cos_oracle(h, W, e, tau):
    out = torch.empty(h.size(0), e.size(0), dtype=F64)
    for s in range(h.size(0)):
        z = (W @ h[s]).tolist()
        for k in range(e.size(0)):
            ek = e[k].tolist()
            dot = sum(a * b for a, b in zip(z, ek))
            out[s, k] = dot / (math.sqrt(sum(a * a for a in z)) * math.sqrt(sum(b * b for b in ek))) / tau
    return out


@check("s_k = cos(W h, e_k) / tau, written out per token and expert", S=st.integers(1, 5), E=st.integers(1, 5),
       de=st.integers(2, 5), tau=st.sampled_from([0.07, 0.5, 2.0]), seed=st.integers(0, 10_000))
def xmoe_scores_equation(xmoe_scores, S, E, de, tau, seed):
    g = torch.Generator().manual_seed(seed)
    h, W, e = (torch.randn(*shape, generator=g, dtype=F64) for shape in ((S, 8), (de, 8), (E, de)))
    got, want = xmoe_scores(h, W, e, torch.tensor(tau, dtype=F64)), _cos_oracle(h, W, e, tau)
    if got.shape != want.shape or (got - want).abs().max() > 1e-9:
        raise Violation(f"max |diff| {(got - want).abs().max() if got.shape == want.shape else got.shape} "
                        f"against cos(W h, e_k) / tau")


@check("scores lie in [-1/tau, 1/tau] and do not change when h or the expert embeddings are scaled by c > 0",
       c=st.sampled_from([0.01, 3.0, 1000.0]), seed=st.integers(0, 10_000))
def xmoe_scores_bounded_and_scale_free(xmoe_scores, c, seed):
    g = torch.Generator().manual_seed(seed)
    h, W, e = torch.randn(6, 8, generator=g, dtype=F64), torch.randn(4, 8, generator=g, dtype=F64), \
        torch.randn(3, 4, generator=g, dtype=F64)
    tau = torch.tensor(0.1, dtype=F64)
    base = xmoe_scores(h, W, e, tau)
    if base.abs().max() > 10 + 1e-9:
        raise Violation(f"max |s| = {base.abs().max():.4f} > 1/tau = 10")
    for what, scaled in (("h", xmoe_scores(c * h, W, e, tau)), ("e", xmoe_scores(h, W, c * e, tau))):
        if (scaled - base).abs().max() > 1e-9:
            raise Violation(f"scaling {what} by {c} changed the scores by {(scaled - base).abs().max():.3g}")


# ---- 7.4 the grouped GEMM's sort-and-pad metadata -------------------------------------------------------
# corner cases: no pair (n = 0); an expert with no row; block_m = 1; runs that are multiples of block_m.
# Drawn (n from 0, E up to 5 over few rows).

def _align(align_by_expert, experts, E, block_m):
    out = align_by_expert(experts, E, block_m)
    if not (isinstance(out, tuple) and len(out) == 3):
        raise Violation(f"expected (order, block_expert, expert_blocks), got {type(out).__name__}")
    return [t.long() for t in out]


@check("every block of block_m rows holds one expert's pairs (block_expert says which), each pair appears once, "
       "in token order inside its expert, padding (-1) follows the pairs, and each expert gets ceil(count / block_m) "
       "blocks, from expert_blocks[e] to expert_blocks[e + 1]", n=st.integers(0, 80), E=st.integers(1, 5),
       block_m=st.sampled_from([1, 4, 16]), seed=st.integers(0, 10_000))
def alignment_layout(align_by_expert, n, E, block_m, seed):
    experts = torch.randint(0, E, (n,), generator=torch.Generator().manual_seed(seed))
    order, block_expert, expert_blocks = _align(align_by_expert, experts, E, block_m)
    if len(order) != len(block_expert) * block_m or len(expert_blocks) != E + 1 or int(expert_blocks[0]) != 0:
        raise Violation(f"lengths: order {len(order)}, block_expert {len(block_expert)}, expert_blocks "
                        f"{len(expert_blocks)} (need len(order) = block_m * len(block_expert), E + 1 starting at 0)")
    for e in range(E):
        mine = (experts == e).nonzero().flatten()
        lo, hi = int(expert_blocks[e]), int(expert_blocks[e + 1])
        if hi - lo != -(-len(mine) // block_m):
            raise Violation(f"expert {e} has {len(mine)} pairs and {hi - lo} blocks; it needs ceil(count / block_m)")
        if (block_expert[lo:hi] != e).any():
            raise Violation(f"blocks {lo}..{hi - 1} belong to expert {e}, block_expert says {block_expert[lo:hi].tolist()}")
        run = order[lo * block_m:hi * block_m]
        if not torch.equal(run[:len(mine)], mine) or (run[len(mine):] != -1).any():
            raise Violation(f"expert {e}'s rows are {run.tolist()}; expected its pairs {mine.tolist()} in token "
                            f"order, then -1")


@check("the metadata drives a grouped matmul: out[order[p]] = a[order[p]] @ W[block_expert[p // block_m]] gives "
       "a[i] @ W[experts[i]] for every pair i", n=st.integers(1, 60), E=st.integers(1, 5),
       block_m=st.sampled_from([2, 8]), seed=st.integers(0, 10_000))
def alignment_drives_a_grouped_matmul(align_by_expert, n, E, block_m, seed):
    g = torch.Generator().manual_seed(seed)
    experts = torch.randint(0, E, (n,), generator=g)
    a, W = torch.randn(n, 3, generator=g, dtype=F64), torch.randn(E, 3, 2, generator=g, dtype=F64)
    order, block_expert, _ = _align(align_by_expert, experts, E, block_m)
    out = torch.full((n, 2), float("nan"), dtype=F64)
    for p, i in enumerate(order.tolist()):
        if i >= 0:
            if not 0 <= p // block_m < len(block_expert) or not 0 <= i < n:
                raise Violation(f"row {p} (pair {i}) has no block or no pair")
            out[i] = a[i] @ W[int(block_expert[p // block_m])]
    want = torch.einsum("nk,nkj->nj", a, W[experts])
    if not torch.allclose(out, want, atol=1e-12) or out.isnan().any():
        missing = out.isnan().any(-1).nonzero().flatten().tolist()
        raise Violation(f"pairs {missing[:8]} were never computed" if missing else
                        "some pair was multiplied by another expert's weight")


# ---- 7.5 the MoE layer, end to end ---------------------------------------------------------------------------
# corner cases: one token with one expert and k = 2 (k clipped to E); capacity overflow (factor 0.25: tokens
# every expert drops give 0); training and eval capacity; fraction 0. Pinned in output_follows_the_rule.

def _layer(S, d, E, k, factor, fraction, training, seed):
    """An MoE part in float64 with its router and experts drawn from `seed`, and S tokens h (S, d)."""
    config = TransformerConfig(vocab_size=8, block_size=8, n_layers=1, d_model=d, n_heads=1, d_ff=d + 2)
    moe = MoE(config, num_experts=E, k=k, capacity_factor=factor, eval_capacity_fraction=fraction).to(F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=F64))
    moe.train(training)
    return moe, torch.randn(S, d, generator=g, dtype=F64)


def _layer_oracle(moe, h, *, gates="rule", capacity=None, passthrough=False):
    """(y, l_aux, first-and-second choices) by the rule, one token at a time, differentiable. The keyword
    arguments give the wrong variants that explain a mismatch."""
    S, E, k = h.size(0), moe.num_experts, moe.k
    if capacity is None:
        capacity = (math.ceil(moe.eval_capacity_fraction * S) if not moe.training and moe.eval_capacity_fraction > 0
                    else max(1, int(moe.capacity_factor * k * math.ceil(S / E))))
    p = torch.softmax(moe.router(h), -1)
    rows = p.tolist()
    choices = []
    for row in rows:
        e1 = max(range(E), key=lambda e: (row[e], -e))
        choices.append([e1] + ([max((e for e in range(E) if e != e1), key=lambda e: (row[e], -e))] if k == 2 else []))
    fill, kept = [0] * E, [[False] * k for _ in range(S)]
    for j in range(k):  # every first choice, then every second choice
        for s in range(S):
            e = choices[s][j]
            kept[s][j] = fill[e] < capacity
            fill[e] += 1
    ys = []
    for s in range(S):
        picked = [p[s, e] for e in choices[s]]
        total = sum(picked) if k == 2 else 1.0
        if gates == "probs":
            total = 1.0
        elif gates == "kept":
            total = sum((q for q, keep in zip(picked, kept[s]) if keep), h.new_zeros(())) if any(kept[s]) else 1.0
        y = h.new_zeros(h.size(1))
        for j, e in enumerate(choices[s]):
            if kept[s][j]:
                y = y + picked[j] / total * moe.experts[e](h[s:s + 1])[0]
        if passthrough and not any(kept[s]):
            y = y + h[s]
        ys.append(y)
    first = torch.tensor([c[0] for c in choices])
    aux = E * (p.mean(0) * torch.bincount(first, minlength=E).to(p.dtype).div(S)).sum()
    return torch.stack(ys), aux, torch.tensor(choices)


LAYERS = dict(S=st.integers(1, 40), d=st.integers(1, 6), E=st.integers(1, 6), k=st.sampled_from([1, 2]),
              factor=st.sampled_from([0.25, 0.5, 1.0, 2.0]), fraction=st.sampled_from([0.0, 0.25, 0.5]),
              training=st.booleans(), seed=st.integers(0, 10_000))


@check("in float64 the layer's output equals the rule, one token at a time: y_s = sum_j [kept_j] g_j FFN_(e_j)(h_s) "
       "with the routing's gates, C = moe.capacity(S) (training and eval), a token every expert dropped gives 0",
       **LAYERS, examples=[dict(S=12, d=3, E=3, k=2, factor=0.5, fraction=0.25, training=True, seed=1),
                           dict(S=1, d=1, E=1, k=2, factor=0.25, fraction=0.0, training=False, seed=2),
                           dict(S=40, d=2, E=2, k=2, factor=0.25, fraction=0.5, training=True, seed=3)])
def output_follows_the_rule(moe_forward, S, d, E, k, factor, fraction, training, seed):
    k = min(k, E)
    moe, h = _layer(S, d, E, k, factor, fraction, training, seed)
    with torch.no_grad():
        y = moe_forward(moe, h)
        want, _, _ = _layer_oracle(moe, h)
    expect_tensor(y, (S, d), F64, "moe_forward")
    diff = (y - want).abs().max().item()
    if not diff < 1e-10:
        why = ""
        variants = {"the gates p[e_j] without the top-2 normalization": dict(gates="probs"),
                    "the gates normalized again over the kept choices, after dropping": dict(gates="kept"),
                    "the training capacity in eval mode": dict(capacity=max(1, int(factor * k * math.ceil(S / E)))),
                    "no capacity limit (no token dropped)": dict(capacity=S * k),
                    "a dropped token passed through (y_s = h_s): the residual already carries it": dict(
                        passthrough=True)}
        with torch.no_grad():
            for text, kw in variants.items():
                if (y - _layer_oracle(moe, h, **kw)[0]).abs().max() < 1e-10:
                    why = f": that is {text}"
                    break
        mode = "training" if training else "eval"
        raise Violation(f"S = {S}, E = {E}, k = {k}, {mode}, C = {moe.capacity(S)}: the output differs from the "
                        f"rule by {diff:.3g}{why}")


@check("the layer sets moe.aux_loss = l_aux of this call, in the autograd graph (its gradient to the router "
       "equals the rule's), and moe.last_experts = the (S, k) choices, detached", **LAYERS)
def aux_loss_is_attached(moe_forward, S, d, E, k, factor, fraction, training, seed):
    k = min(k, E)
    moe, h = _layer(S, d, E, k, factor, fraction, training, seed)
    moe.aux_loss, moe.last_experts = torch.zeros(()), None
    moe_forward(moe, h)
    aux, choices = moe.aux_loss, moe.last_experts
    _, want, want_choices = _layer_oracle(moe, h)
    if type(aux) is not torch.Tensor or aux.dim() != 0:
        raise Violation(f"moe.aux_loss is {aux!r}; the layer sets it to the scalar l_aux of this call")
    if abs(aux.item() - want.item()) > 1e-10:
        raise Violation(f"moe.aux_loss = {aux.item():.6g}; l_aux of this call is {want.item():.6g}")
    if not aux.requires_grad:
        raise Violation("moe.aux_loss is detached from the router: the model adds aux_weight * aux_loss to its "
                        "loss, and the balancing gradient must reach the router")
    got_grad = torch.autograd.grad(aux, moe.router.proj.weight)[0]
    want_grad = torch.autograd.grad(want, moe.router.proj.weight)[0]
    expect_close(got_grad, want_grad, 1e-10, "the gradient of moe.aux_loss to the router differs from l_aux's",
                 output="your router gradient")
    if type(choices) is not torch.Tensor or tuple(choices.shape) != (S, k) or not torch.equal(choices.cpu(),
                                                                                            want_choices):
        raise Violation(f"moe.last_experts is {fmt(choices) if isinstance(choices, torch.Tensor) else choices!r}; "
                        f"the (S, k) choices are {fmt(want_choices)}")
    if choices.requires_grad:
        raise Violation("moe.last_experts carries a gradient; store it detached")


@check("gradients flow as in the rule: for a random weighting w, d(sum w * y)/d(router, expert weights, h) equal "
       "the rule's (the gates keep their gradient, so the router learns from the task)", **LAYERS)
def gradients_follow_the_rule(moe_forward, S, d, E, k, factor, fraction, training, seed):
    k = min(k, E)
    moe, h = _layer(S, d, E, k, factor, fraction, training, seed)
    h.requires_grad_(True)
    w = torch.randn(S, d, generator=torch.Generator().manual_seed(seed + 1), dtype=F64)
    params = list(moe.parameters()) + [h]  # the router first: a detached gate shows there
    names = [n for n, _ in moe.named_parameters()] + ["h"]
    got = torch.autograd.grad((moe_forward(moe, h) * w).sum(), params, allow_unused=True)
    want = torch.autograd.grad((_layer_oracle(moe, h)[0] * w).sum(), params, allow_unused=True)
    for name, a, b in zip(names, got, want):
        a = torch.zeros_like(params[names.index(name)]) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        expect_close(a, b, 1e-9, f"the gradient to {name} differs from the rule's",
                     " (the gates are detached?)" if name.startswith("router") else "", f"the gradient to {name}")


class _GradedMoE(MoE):
    """The MoE part with the learner's moe_forward as its layer."""

    def __init__(self, config, linear=torch.nn.Linear, *, layer, **kwargs):
        super().__init__(config, linear, **kwargs)
        self.layer = [layer]  # a list: not a submodule

    def forward(self, x):
        return self.layer[0](self, x.reshape(-1, x.size(-1))).reshape(x.shape)


TOY = dict(vocab=16, T=8, batch=16, steps=40, lr=3e-3, experts=4, aux_weight=0.1)


@check(f"a 2-layer model with top-2 MoE feed-forwards ({TOY['experts']} experts, aux_weight {TOY['aux_weight']}) "
       f"learns x_t = x_(t-1) + 1 mod {TOY['vocab']} in {TOY['steps']} Adam steps: the task loss of the last 5 steps "
       f"is below 1.5 nats (ln {TOY['vocab']} = {math.log(TOY['vocab']):.2f}) and every layer's l_aux stays below "
       f"1.2 (1 is a balanced load, {TOY['experts']} a collapse)")
def a_tiny_moe_model_trains_balanced(moe_forward):
    config = TransformerConfig(vocab_size=TOY["vocab"], block_size=TOY["T"], n_layers=2, d_model=32, n_heads=4,
                               d_ff=64)
    with float32_default():
        torch.manual_seed(0)
        model = Transformer(config, ffn=partial(_GradedMoE, layer=moe_forward, num_experts=TOY["experts"], k=2,
                                                aux_weight=TOY["aux_weight"]))
        opt = torch.optim.Adam(model.parameters(), lr=TOY["lr"])
        gen = torch.Generator().manual_seed(0)
        task, aux = [], []
        for _ in range(TOY["steps"]):
            start = torch.randint(0, TOY["vocab"], (TOY["batch"], 1), generator=gen)
            s = (start + torch.arange(TOY["T"] + 1)) % TOY["vocab"]
            _, loss = model(s[:, :-1], s[:, 1:])
            opt.zero_grad()
            loss.backward()
            opt.step()
            layers = [v.detach().item() for v in model.aux_losses().values()]
            if len(layers) != config.n_layers:
                raise Violation(f"{len(layers)} of the {config.n_layers} MoE layers set an aux_loss")
            aux.append(max(layers))
            task.append(loss.item() - TOY["aux_weight"] * sum(layers))
    last, balance = sum(task[-5:]) / 5, sum(aux[-5:]) / 5
    if not last < 1.5:
        raise Violation(f"the task loss went from {task[0]:.3f} to {last:.3f} (mean of the last 5 steps), not below "
                        "1.5: the model does not learn")
    if not balance < 1.2:
        raise Violation(f"l_aux ends at {balance:.3f} (the worst layer, mean of the last 5 steps): the load is not "
                        "balanced (1 is balanced)")


# ---- 7.6 one tile of the grouped GEMM, inside the Triton kernel ------------------------------------------------
# corner cases (fixed cases): K not a multiple of BLOCK_K; N not a multiple of BLOCK_N; padding rows in a
# block; an expert with no block; strided a, w and out.

SENTINEL = -7.0  # what the output holds where the kernel must not write
GUARD = 3  # rows of the output buffer before and after the real rows, and columns after N


def _grouped_buffers(group_sizes, n, k, *, seed, dtype=torch.float32, trans_w=True, positive=False):
    """A problem for the kernel with every out-of-bounds read observable: the tokens a (M, K) of the pairs, in
    shuffled expert order, expert weights W (E, N, K) (TRANS_W) or (E, K, N), and guard regions of NaN around
    them: W has a NaN expert before the first and after the last, A a NaN row before the first, and A's and W's
    rows are padded past their last column with NaN, so a read of another expert's weights or of columns >= K
    gives NaN."""
    g = torch.Generator().manual_seed(seed)
    experts = torch.cat([torch.full((c,), e) for e, c in enumerate(group_sizes)]).long()
    experts = experts[torch.randperm(len(experts), generator=g)]  # tokens arrive in any expert order
    E, M = len(group_sizes), len(experts)
    draw = (lambda *shape: torch.rand(*shape, generator=g, dtype=F64)) if positive else \
        (lambda *shape: torch.randn(*shape, generator=g, dtype=F64))
    a64 = draw(M, k)
    w64 = draw(E, n, k) * (1 + torch.arange(E, dtype=F64)[:, None, None])  # experts differ in scale too
    a_buf = torch.full((M + 1, k + 5), float("nan"), dtype=dtype)  # a NaN row before the first
    a_buf[1:, :k] = a64.to(dtype)
    rows, inner = (n, k) if trans_w else (k, n)
    w_buf = torch.full((E + 2, rows, inner + 5), float("nan"), dtype=dtype)
    w_buf[1:E + 1, :, :inner] = (w64 if trans_w else w64.transpose(1, 2)).to(dtype)
    return experts, a_buf[1:, :k], w_buf[1:E + 1, :, :inner]


def run_grouped_kernel(kernel, a, w, experts, blocks, *, trans_w=True, padding_target=-1):
    """Launch the learner's _grouped_gemm_kernel on one pair per row of a (pair i = token i, expert experts[i]),
    metadata from the library's align_by_expert, with (BLOCK_M, BLOCK_N, BLOCK_K) = blocks. Padding rows get
    C_ROWS = padding_target. Returns (buf, out rows, metadata): buf is the whole output buffer, SENTINEL
    everywhere the kernel must not write, with GUARD rows before and after and GUARD columns after N."""
    from kernels import HAS_TRITON, INTERPRET
    from kernels.grouped_gemm import align_by_expert

    if not HAS_TRITON:
        raise Violation("Triton is not installed here (it has Linux wheels only): exercise 7.6 needs its interpreter")
    kernel = getattr(kernel, "__wrapped__", kernel)  # the graded function is the @triton.jit kernel itself
    if not hasattr(kernel, "__getitem__"):
        raise Violation(f"_grouped_gemm_kernel is a {type(kernel).__name__}, not a @triton.jit kernel: keep the "
                        "decorator")
    device = "cpu" if INTERPRET else "cuda"
    bm, bn, bk = blocks
    E = w.size(0)
    n, k = (w.size(1), w.size(2)) if trans_w else (w.size(2), w.size(1))
    order, block_expert, _ = align_by_expert(experts, E, bm)
    c_rows = torch.where(order >= 0, order, padding_target)
    expert_buf = torch.cat([block_expert, torch.tensor([E], dtype=torch.int32)])  # one past the end: the NaN expert
    M = a.size(0)
    buf = torch.full((M + 2 * GUARD, n + GUARD), SENTINEL, dtype=a.dtype, device=device)
    out = buf[GUARD:GUARD + M, :n]
    a, w = a.to(device), w.to(device)
    try:
        if len(block_expert):
            kernel[(len(block_expert), math.ceil(n / bn))](
                a, w, out, order.to(device), c_rows.to(device), expert_buf.to(device), n, k, a.stride(0),
                w.stride(0), w.stride(1), out.stride(0), TRANS_W=trans_w, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
    except Exception as exc:  # the interpreter wraps what the kernel raised: report that, at its line
        if type(exc).__name__ == "InterpreterError" and exc.__cause__ is not None:
            raise exc.__cause__ from None
        if "NotImplementedError" in str(exc):
            raise NotImplementedError("Exercise 7.6: one tile of the grouped GEMM: its expert, the gathered rows, "
                                      "the masked K loop") from None
        raise
    return buf.cpu(), order, block_expert


def _grouped_oracle(a, w, experts, trans_w=True):
    """out[i] = a[i] @ W[experts[i]]^T (or @ W[experts[i]]), in float64."""
    w = w.double() if trans_w else w.double().transpose(1, 2)
    return torch.einsum("mk,mnk->mn", a.double(), w[experts])


def _expect_grouped(buf, a, w, experts, order, block_expert, blocks, tol, case, *, trans_w=True):
    """The real rows equal the oracle; every guard row, guard column and padding target still holds SENTINEL."""
    M = a.size(0)
    n = w.size(1) if trans_w else w.size(2)
    bm = blocks[0]
    layout = "W[e] is (N, K)" if trans_w else "W[e] is (K, N)"
    where = (f"{case} (group sizes {torch.bincount(experts, minlength=w.size(0)).tolist()}, N = {n}, "
             f"K = {a.size(1)}, BLOCK_M, BLOCK_N, BLOCK_K = {blocks}, {layout}, {a.dtype})")
    got = buf[GUARD:GUARD + M, :n].double()
    guard_rows = torch.cat([buf[:GUARD], buf[GUARD + M:]])
    if (guard_rows != SENTINEL).any():
        raise Violation(f"{where}: the kernel wrote outside the output, into the rows around it: padding rows "
                        f"(A_ROWS = -1, C_ROWS = -1 here) must not be stored")
    if (buf[:, n:] != SENTINEL).any():
        raise Violation(f"{where}: the kernel wrote columns >= N (into the next row's memory): mask the store by "
                        "the columns too")
    want = _grouped_oracle(a, w, experts, trans_w)
    bad = ~((got - want).abs() <= tol * (1 + want.abs()))  # NaN counts as wrong
    if bad.any():
        i = int(bad.any(1).nonzero()[0])
        p = int((order == i).nonzero()[0])
        e = int(experts[i])
        why = ""
        if got[i].isnan().any():
            why = (" (NaN: the guard memory holds NaN, past column K - 1 of A and of W and in the experts before "
                   "the first and after the last; was a load not masked by K, or did the tile use another "
                   "expert's weights?)")
        elif (got[i] == SENTINEL).all():
            why = " (the row was never stored)"
        elif (got[i] == 0).all():
            why = (" (it holds 0, what a padding row computes: its A_ROWS = -1 loads nothing; was a padding row "
                   "stored at its C_ROWS?)")
        else:
            for other in range(w.size(0)):
                alt = _grouped_oracle(a[i:i + 1], w, torch.tensor([other]), trans_w)[0]
                if other != e and torch.allclose(got[i], alt, rtol=1e-3, atol=1e-3):
                    why = f" (it equals a[{i}] times expert {other}'s weight: the tile used another expert)"
        raise Violation(f"{where}: {int(bad.any(1).sum())} of {M} rows are wrong, first row {i} (pair {i}, expert "
                        f"{e}, padded row {p}, block {p // bm} with BLOCK_EXPERT = {int(block_expert[p // bm])}): "
                        f"max error {(got[i] - want[i]).abs().max().item():.3g}, tolerance {tol:g} x (1 + |out|)"
                        f"{why}")


def _grouped_case(kernel, group_sizes, n, k, blocks, *, seed, case, trans_w=True, padding_target=-1,
                  dtype=torch.float32, tol=1e-5, positive=False):
    experts, a, w = _grouped_buffers(group_sizes, n, k, seed=seed, dtype=dtype, trans_w=trans_w, positive=positive)
    buf, order, block_expert = run_grouped_kernel(kernel, a, w, experts, blocks, trans_w=trans_w,
                                                  padding_target=padding_target)
    _expect_grouped(buf, a, w, experts, order, block_expert, blocks, tol, case, trans_w=trans_w)


@check("each row of a block is a[a_row] @ W[e]^T with e = BLOCK_EXPERT[block] (float32 against a float64 oracle), "
       "for expert groups of 0, 1, a part of a block, exactly one block and several blocks, K not a multiple of "
       "BLOCK_K and N not a multiple of BLOCK_N; W's neighbouring memory (other experts' rows, columns >= K) holds "
       "NaN, so a tile that reads another expert's weights or past K fails")
def grouped_tile_matches_the_oracle(_grouped_gemm_kernel):
    _grouped_case(_grouped_gemm_kernel, [0, 1, 11, 16, 37, 0], 21, 37, (16, 16, 16), seed=1,
                  case="small blocks, the first and last experts empty")
    _grouped_case(_grouped_gemm_kernel, [3, 70, 64], 40, 70, (64, 64, 32), seed=2,
                  case="the library's blocks")


@check("padding rows (A_ROWS = -1) are never stored: with C_ROWS = -1 they would land in the row before the output, "
       "with C_ROWS = 0 (the library's fc2 call) on pair 0's row; columns >= N and the rows around the output keep "
       "their values")
def grouped_tile_stores_only_real_rows(_grouped_gemm_kernel):
    _grouped_case(_grouped_gemm_kernel, [5, 0, 18, 2], 24, 20, (16, 16, 16), seed=3, padding_target=-1,
                  case="padding rows with C_ROWS = -1")
    _grouped_case(_grouped_gemm_kernel, [1, 9, 17], 20, 24, (16, 16, 16), seed=4, padding_target=0,
                  case="padding rows with C_ROWS = 0")


@check("with TRANS_W = False (the dA pass of the backward, W[e] stored as (K, N)) each row is a[a_row] @ W[e], "
       "for N != K")
def grouped_tile_untransposed_weight(_grouped_gemm_kernel):
    _grouped_case(_grouped_gemm_kernel, [7, 0, 20, 1], 19, 40, (16, 16, 16), seed=5, trans_w=False,
                  case="TRANS_W = False")


@check("float16 inputs over K = 1024: the accumulator stays float32 through the K loop, so the stored float16 "
       "result is within float16 rounding (relative 2^-11) of the float64 oracle; a running sum rounded to "
       "float16 at each of the 64 K steps drifts by more")
def grouped_tile_float16_accumulates_in_float32(_grouped_gemm_kernel):
    _grouped_case(_grouped_gemm_kernel, [9, 20], 16, 1024, (16, 16, 16), seed=6, dtype=torch.float16, tol=1e-3,
                  positive=True, case="float16, positive entries")


@check("the library's grouped_gemm with this kernel: its forward and its dA (the same kernel reading W "
       "untransposed, then index_add) equal the float64 oracle for a top-2 routing of 30 tokens to 4 experts")
def grouped_gemm_forward_and_input_gradient(_grouped_gemm_kernel):
    import kernels.grouped_gemm as gg

    g = torch.Generator().manual_seed(7)
    S, d, f, E = 30, 24, 40, 4
    experts = torch.stack([torch.randperm(E, generator=g)[:2] for _ in range(S)]).flatten()  # (S k,) pair experts
    order, block_expert, expert_blocks = gg.align_by_expert(experts, E)
    tokens = torch.where(order >= 0, order // 2, -1)
    # float32 whatever the default dtype is (the property tests run with float64 as the default)
    h = torch.randn(S, d, generator=g, dtype=torch.float32, requires_grad=True)
    w = torch.randn(E, f, d, generator=g, dtype=torch.float32)
    weight = torch.randn(len(order), f, generator=g, dtype=F64)
    # the dA pass stores through C_ROWS = -1 for padding rows: a kernel that stores them would write before
    # the library's buffer, so the guarded run comes first
    _grouped_case(_grouped_gemm_kernel, [2, 5], 8, 8, (16, 16, 16), seed=8, case="a guarded run first")
    with installed(gg, "_grouped_gemm_kernel", _grouped_gemm_kernel):
        out = gg.grouped_gemm(h, w, tokens, torch.arange(len(order)), block_expert, expert_blocks, len(order))
        (out.double() * weight).sum().backward()
    h64 = h.detach().double().requires_grad_()
    rows = tokens.clamp(min=0)
    want = torch.einsum("pd,pfd->pf", h64[rows], w.double()[block_expert.long().repeat_interleave(gg.BLOCK_M)])
    want = want * (tokens >= 0)[:, None]
    (want * weight).sum().backward()
    expect_close(out, want, 1e-4, "grouped_gemm's forward differs from the oracle", output="its output")
    expect_close(h.grad, h64.grad, 1e-4, "grouped_gemm's dA (TRANS_W = False, then index_add over the pairs) differs "
                 "from the oracle", output="dA")


EXERCISES = {
    "7.1": Exercise(points=4, checks=[routing_matches_the_rule, capacity_one_keeps_the_first_token,
                                      routing_returns_probs_and_aux],
                    hint='Experts fill their slots in token order: first choices of all tokens, then the second choices.',
                    hints=("A running count per expert gives each token its slot; second choices start after that expert's total of first choices; the two gates are normalized before anything is dropped.",
                           "Slot = (cumulative count of the one-hot choice mask over tokens) - 1; for second choices add the expert's number of first choices; the gates are p[e1] and p[e2] divided by their sum (k = 2) or p[e1] (k = 1), computed before dropping.")),
    "7.2": Exercise(points=2, checks=[aux_loss_value, aux_loss_gradient],
                    hint='The balancing loss multiplies how often an expert is the first choice by how much probability it gets.',
                    hints=('Only the probabilities carry a gradient: the first-choice fractions are counts.',
                           'E times the sum over experts of (mean probability of the expert) times (fraction of tokens whose first choice it is).')),
    "7.3": Exercise(points=2, checks=[xmoe_scores_equation, xmoe_scores_bounded_and_scale_free],
                    hint='X-MoE scores a token against each expert by a cosine similarity in a low-dimensional space, sharpened by a temperature.',
                    hints=('Both the projected token and the expert embeddings are normalized to unit length before their dot products.',
                           'Project the token, L2-normalize it and every expert embedding, take the dot products, divide by the learnable temperature.')),
    "7.4": Exercise(points=3, checks=[alignment_layout, alignment_drives_a_grouped_matmul],
                    hint="The grouped GEMM wants every block of rows to belong to one expert: sort the (token, expert) pairs by expert and pad each expert's group to a whole number of blocks.",
                    hints=('Count pairs per expert, round each count up to the block size, and keep the pairs of one expert in token order.',
                           "Per expert: its count rounded up to block_m gives its padded rows and blocks; a pair's row is its expert's first padded row plus its rank among that expert's pairs (a stable sort keeps token order); one expert id per block.")),
    "7.5": Exercise(points=4, checks=[output_follows_the_rule, aux_loss_is_attached, gradients_follow_the_rule,
                                      a_tiny_moe_model_trains_balanced],
                    hint="One layer: route, dispatch into per-expert buffers, run the experts, combine. Which gates "
                         "weigh the combine, which capacity holds (training or eval), and where does the balancing "
                         "loss go?",
                    hints=("Route with your 7.1 on the router's scores and the layer's capacity; store the aux loss "
                           "(still in the graph) and the choices (detached) on the layer. Scatter each kept (token, "
                           "choice) to its expert's slot, run every expert on its (E, C, d) buffer, and gather the "
                           "outputs back weighted by the routing's gates; dropped choices contribute nothing.",
                           "C from moe.capacity(S); the routing from top_k_routing(moe.router(h), moe.k, C); set "
                           "moe.aux_loss and moe.last_experts; build a (S, E, C) 0/1 dispatch and a (S, E, C) "
                           "combine holding the gate at each kept (token, expert, slot); buffers = einsum of dispatch "
                           "and h; outputs = moe._run_experts(buffers); y = einsum of combine and the outputs.")),
    "7.6": Exercise(points=3, checks=[grouped_tile_matches_the_oracle, grouped_tile_stores_only_real_rows,
                                      grouped_tile_untransposed_weight, grouped_tile_float16_accumulates_in_float32,
                                      grouped_gemm_forward_and_input_gradient],
                    hint="One program computes one (BLOCK_M, BLOCK_N) tile: all its rows belong to one expert, "
                         "read from the metadata, and each row is gathered from A and scattered to C by the row "
                         "lists.",
                    hints=("The block's expert is BLOCK_EXPERT at the block's index; the tile's rows of A_ROWS and "
                           "C_ROWS say where each row comes from and goes (-1: padding, neither read nor stored). "
                           "Walk K in steps of BLOCK_K, loading the gathered A tile and W[e]'s tile (by rows of W "
                           "when TRANS_W), masked beyond K, and accumulate their tl.dot in a float32 accumulator "
                           "that starts at zero.",
                           "expert from BLOCK_EXPERT + pid_m (as int64); rows = pid_m * BLOCK_M + arange(BLOCK_M); "
                           "a_row and c_row loaded from A_ROWS and C_ROWS at rows; valid where a_row >= 0; cols = "
                           "pid_n * BLOCK_N + arange(BLOCK_N); A pointers a_row * stride_am + ks; W pointers "
                           "expert * stride_we plus cols * stride_wr + ks (TRANS_W) or ks * stride_wr + cols; per "
                           "step the loads masked by valid rows, ks < K - k0 and cols < N, acc += dot, pointers "
                           "advanced by BLOCK_K (times stride_wr when not TRANS_W); finally store acc in C's dtype "
                           "at c_row * stride_cm + cols, masked by valid rows and cols < N.")),
}
