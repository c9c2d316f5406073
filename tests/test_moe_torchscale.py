"""torchscale 0.3.0's top-2 routing (nanomodels/moe_torchscale.py) against a loop-by-loop transcription of
`top2gating` (torchscale/component/xmoe/routing.py), float64, with the same random draws; and the MoE option."""

import math

import pytest
import torch

from nanomodels.moe import MoE, dense_masks, top_k_routing
from nanomodels.moe_torchscale import TorchscaleTop2
from nanomodels.transformer import TransformerConfig

F64 = torch.float64


def torchscale_top2gating(logits, capacity, policy, normalize_before, generator):
    """The official rule one token at a time: (combine (S, E, C), l_aux). Draws as the library does: Gumbel
    uniforms (S, E) for "sampling", one uniform per token for "random", from `generator`, float64."""
    S, E = logits.shape
    p = torch.softmax(logits, dim=1)
    noise = torch.zeros(S, E, dtype=F64)
    if policy == "sampling":
        u = torch.rand(S, E, generator=generator, dtype=F64).clamp(torch.finfo(F64).tiny, 1 - torch.finfo(F64).eps)
        noise = -torch.log(-torch.log(u))
    uniform = torch.rand(S, generator=generator, dtype=F64) if policy == "random" else None
    eps = torch.finfo(F64).eps
    first, second, g1, g2, take2 = [], [], [], [], []
    for s in range(S):
        e1 = max(range(E), key=lambda e: (p[s, e].item(), -e))  # argmax, first index on ties
        rest = [e for e in range(E) if e != e1]
        e2 = max(rest, key=lambda e: ((logits[s, e] + noise[s, e]).item(), -e))
        a, b = p[s, e1].item(), p[s, e2].item()
        if normalize_before:
            a, b = a / max(a + b, eps), b / max(a + b, eps)
        first.append(e1), second.append(e2), g1.append(a), g2.append(b)
        take2.append(policy != "random" or 2 * b > uniform[s].item())
    count = [0] * E
    loc1 = []
    for s in range(S):  # every first choice, in token order
        loc1.append(count[first[s]])
        count[first[s]] += 1
    loc2 = [None] * S
    for s in range(S):  # then the second choices that were taken
        if take2[s]:
            loc2[s] = count[second[s]]
            count[second[s]] += 1
    combine = torch.zeros(S, E, capacity, dtype=F64)
    for s in range(S):
        k1 = loc1[s] < capacity
        k2 = take2[s] and loc2[s] < capacity
        a, b = g1[s] * k1, g2[s] * k2
        if not normalize_before:
            a, b = a / max(a + b, eps), b / max(a + b, eps)
        if k1:
            combine[s, first[s], loc1[s]] += a
        if k2:
            combine[s, second[s], loc2[s]] += b
    me = p.mean(0)
    ce = torch.tensor([sum(1.0 for s in range(S) if first[s] == e) / S for e in range(E)], dtype=F64)
    return combine, (me * ce).mean() * E * E


@pytest.mark.parametrize("policy", ["random", "sampling", "all"])
@pytest.mark.parametrize("before", [False, True])
@pytest.mark.parametrize("S,E,C", [(12, 4, 2), (20, 5, 8), (9, 3, 1), (16, 8, 4)])
def test_routing_matches_torchscale_top2gating(policy, before, S, E, C):
    for seed in range(3):
        logits = torch.randn(S, E, generator=torch.Generator().manual_seed(seed), dtype=F64) * 1.5
        route = TorchscaleTop2(policy, before, generator=torch.Generator().manual_seed(100 + seed))
        got = route(logits, C)
        combine, aux = torchscale_top2gating(logits, C, policy, before, torch.Generator().manual_seed(100 + seed))
        mine, dispatch = dense_masks(got, C)
        diff = (mine - combine).abs().max().item()
        assert diff < 1e-12, f"{policy}, before={before}, S={S}, E={E}, C={C}, seed {seed}: combine off by {diff:.3g}"
        assert torch.equal(dispatch, combine > 0), "dispatch must be where combine is nonzero"
        assert abs(got.aux_loss.item() - aux.item()) < 1e-12, f"aux {got.aux_loss.item()} != {aux.item()}"


def test_after_dropping_a_token_whose_second_choice_was_dropped_gets_gate_one():
    logits = torch.tensor([[2.0, 1.0, 0.0]] * 3 + [[1.0, 2.0, 0.0]] * 3, dtype=F64)  # choices (0, 1) and (1, 0)
    got = TorchscaleTop2("all")(logits, 3)  # each expert's three first choices fill C = 3: every second is dropped
    assert got.kept[:, 0].all() and not got.kept[:, 1].any(), f"kept {got.kept.tolist()}"
    assert torch.equal(got.gates[:, 0], torch.ones(6, dtype=F64)), f"gates {got.gates.tolist()}"
    gshard = top_k_routing(logits, 2, 3)  # the course's rule: normalized before dropping, never again
    p = torch.softmax(logits[0], 0)
    assert abs(gshard.gates[0, 0].item() - (p[0] / (p[0] + p[1])).item()) < 1e-15


@pytest.mark.parametrize("training", [True, False])
def test_random_policy_keeps_the_second_expert_with_probability_2_g2_in_training_and_eval(training):
    S, E = 20000, 4
    logits = torch.randn(S, E, generator=torch.Generator().manual_seed(0), dtype=F64)
    route = TorchscaleTop2("random", generator=torch.Generator().manual_seed(1))
    got = route(logits, S)  # C = S: nothing dropped for capacity
    q = (2 * torch.softmax(logits, 1).gather(1, got.experts[:, 1:]).squeeze(1)).clamp(max=1)
    rate, want = got.kept[:, 1].double().mean().item(), q.mean().item()
    se = math.sqrt((q * (1 - q)).sum().item()) / S
    assert abs(rate - want) < 5 * se, f"second expert kept at rate {rate:.4f}, E[min(1, 2 g2)] = {want:.4f}"
    moe = MoE(TransformerConfig(vocab_size=8, d_model=8, n_heads=2, n_layers=1, d_ff=16), num_experts=E, k=2,
              routing=route).train(training)
    moe(torch.randn(2, 50, 8))
    assert moe.last_experts.shape == (100, 2)


def test_top2_capacity_ignores_the_capacity_factor():
    config = TransformerConfig(vocab_size=8, d_model=8, n_heads=2, n_layers=1, d_ff=16)
    for factor in (0.5, 1.0, 2.0):
        moe = MoE(config, num_experts=6, k=2, capacity_factor=factor, routing=TorchscaleTop2())
        assert moe.capacity(100) == 2 * math.ceil(100 / 6) == 34, f"factor {factor}: C = {moe.capacity(100)}"
        assert moe.eval().capacity(100) == 25  # ceil(0.25 S) at eval
    assert MoE(config, num_experts=6, k=2, capacity_factor=0.5).capacity(100) == int(0.5 * 2 * 17)


@pytest.mark.parametrize("dispatch", ["einsum", "sorted"])
def test_moe_with_torchscale_routing_is_the_combine_of_its_routing(dispatch):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=8, d_model=8, n_heads=2, n_layers=1, d_ff=16)
    moe = MoE(config, num_experts=4, k=2, dispatch=dispatch, routing=TorchscaleTop2("all")).to(F64)
    h = torch.randn(1, 30, 8, dtype=F64)
    routing = TorchscaleTop2("all")(moe.router(h.reshape(30, 8)), moe.capacity(30))
    combine, _ = dense_masks(routing, moe.capacity(30))
    want = sum(combine[:, e].sum(-1, keepdim=True) * moe.experts[e](h.reshape(30, 8)) for e in range(4))
    diff = (moe(h).reshape(30, 8) - want).abs().max().item()
    assert diff < 1e-12, f"MoE output != sum_e g_e FFN_e(h): {diff:.3g}"


def test_bad_routing_arguments_are_refused():
    config = TransformerConfig(vocab_size=8, d_model=8, n_heads=2, n_layers=1, d_ff=16)
    with pytest.raises(ValueError, match="policy"):
        TorchscaleTop2("jitter")
    with pytest.raises(ValueError, match="routing"):
        MoE(config, num_experts=4, k=1, routing=TorchscaleTop2())
    with pytest.raises(ValueError, match="eval_capacity_fraction"):
        TorchscaleTop2(eval_capacity_fraction=-1)


def test_xmoe_router_projection_init_and_torchscales():
    from nanomodels.moe import XMoERouter
    d = 4096
    ours = XMoERouter(d, 8, routing_dim=16).projection.detach().std().item()
    theirs = torch.nn.Linear(d, 16, bias=False).weight.detach().std().item()  # torchscale's wg_reduction
    assert abs(ours * math.sqrt(d) - 1) < 0.03 and abs(theirs * math.sqrt(3 * d) - 1) < 0.03, (ours, theirs)
