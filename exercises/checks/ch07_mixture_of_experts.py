"""Chapter 07's graded checks: top-k routing with capacity, the load-balancing loss, the X-MoE scores, the
grouped GEMM's sort-and-pad metadata (kernels/grouped_gemm.py), and the MoE layer end to end (a tiny MoE model
that trains with a balanced load).

Each check tests the mechanism in float64 against the learner's function (its first argument), with naive loop
oracles. Known-wrong solutions: exercises/mutants/ch07_mixture_of_experts.py.
"""

import contextlib
import math
from functools import partial

import torch
from hypothesis import strategies as st

from exercises.checking import Exercise, Violation, check
from exercises.checks.common import expect_tensor, fmt
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

@check("the kept (token, expert, slot, gate) choices equal the rule: softmax, e1 = argmax, e2 = argmax of the rest, "
       "slots per expert in token order with every first choice before any second choice, a slot >= C dropped, "
       "gate p[e1] for k = 1 and p[e_j] / (p[e1] + p[e2]) for k = 2 (before dropping)",
       S=st.integers(1, 16), E=st.integers(2, 6), k=st.sampled_from([1, 2]), C=st.integers(1, 6),
       seed=st.integers(0, 10_000))
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
       **LAYERS, examples=[dict(S=12, d=3, E=3, k=2, factor=0.5, fraction=0.25, training=True, seed=1)])
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
    if not torch.allclose(got_grad, want_grad, rtol=0, atol=1e-10):
        raise Violation(f"the gradient of moe.aux_loss to the router differs from l_aux's by "
                        f"{(got_grad - want_grad).abs().max().item():.3g}")
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
        if not torch.allclose(a, b, rtol=0, atol=1e-9):
            raise Violation(f"the gradient to {name} differs from the rule's by {(a - b).abs().max().item():.3g}"
                            + (" (the gates are detached?)" if name.startswith("router") else ""))


class _GradedMoE(MoE):
    """The MoE part with the learner's moe_forward as its layer."""

    def __init__(self, config, linear=torch.nn.Linear, *, layer, **kwargs):
        super().__init__(config, linear, **kwargs)
        self.layer = [layer]  # a list: not a submodule

    def forward(self, x):
        return self.layer[0](self, x.reshape(-1, x.size(-1))).reshape(x.shape)


@contextlib.contextmanager
def _float32_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


TOY = dict(vocab=16, T=8, batch=16, steps=40, lr=3e-3, experts=4, aux_weight=0.1)


@check(f"a 2-layer model with top-2 MoE feed-forwards ({TOY['experts']} experts, aux_weight {TOY['aux_weight']}) "
       f"learns x_t = x_(t-1) + 1 mod {TOY['vocab']} in {TOY['steps']} Adam steps: the task loss of the last 5 steps "
       f"is below 1.5 nats (ln {TOY['vocab']} = {math.log(TOY['vocab']):.2f}) and every layer's l_aux stays below "
       f"1.2 (1 is a balanced load, {TOY['experts']} a collapse)")
def a_tiny_moe_model_trains_balanced(moe_forward):
    config = TransformerConfig(vocab_size=TOY["vocab"], block_size=TOY["T"], n_layers=2, d_model=32, n_heads=4,
                               d_ff=64)
    with _float32_default():
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
}
