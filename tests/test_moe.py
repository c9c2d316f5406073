"""Sparse MoE (reference/06): top-k gating with capacity, the aux loss, routers (linear, X-MoE paper and
torchscale), MH-MoE, the MoE part, dense vs sorted dispatch, expert parallelism. float64 against naive oracles."""

import math
import os
import socket
from functools import partial

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomodels.moe import (MoE, XMoERouter, expert_capacity, load_balancing_loss, sorted_dispatch, top_k_gating,
                            top_k_routing, xmoe_scores, xmoe_torchscale_scores)
from nanomodels.transformer import PreNorm, Transformer, TransformerConfig

F64 = torch.float64
CHAPTER = "07"  # tests/conftest.py runs its graded checks as `graded_check`


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def assert_close(actual, expected, what, atol=1e-10):
    diff = (actual.double() - expected.double()).abs()
    assert diff.numel() == 0 or diff.max() <= atol, \
        f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol})"


def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


# ---- naive oracles: the rules written out one token at a time ------------------------------------------------

def naive_gating(logits, k, C):
    """Loop transcription of the spec: softmax, e1 / e2 by first maximum, gates (renormalized before dropping
    for k = 2), slots per expert counted over every choice (first choices of all tokens, then second)."""
    S, E = logits.shape
    p = [[math.exp(v) for v in row] for row in logits.tolist()]
    p = [[v / sum(row) for v in row] for row in p]
    choices, gates = [], []
    for row in p:
        e1 = max(range(E), key=lambda e: (row[e], -e))
        picked = [e1]
        if k == 2:
            picked.append(max((e for e in range(E) if e != e1), key=lambda e: (row[e], -e)))
        total = sum(row[e] for e in picked) if k == 2 else 1.0
        choices.append(picked)
        gates.append([row[e] / total for e in picked])
    combine = torch.zeros(S, E, C, dtype=F64)
    fill = [0] * E
    for j in range(k):
        for s in range(S):
            e = choices[s][j]
            if fill[e] < C:
                combine[s, e, fill[e]] = gates[s][j]
            fill[e] += 1
    aux = E * sum(sum(p[s][e] for s in range(S)) / S * sum(choices[s][0] == e for s in range(S)) / S
                  for e in range(E))
    return combine, aux


def naive_moe(h, logits, experts, k, C):
    """y_s = sum over kept choices of g * FFN_e(h_s), one token at a time, from the oracle's combine."""
    combine, _ = naive_gating(logits, k, C)
    y = torch.zeros_like(h)
    for s in range(h.size(0)):
        for e in range(len(experts)):
            g = combine[s, e].sum()
            if combine[s, e].ne(0).any():
                y[s] += g * experts[e](h[s:s + 1])[0]
    return y


def config(**kw):
    return TransformerConfig(**{**dict(vocab_size=40, block_size=16, n_layers=2, d_model=16, n_heads=2,
                                       d_ff=24), **kw})


def moe(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    return MoE(config(), **kw)


gating_cases = dict(S=st.integers(1, 24), E=st.integers(2, 8), k=st.sampled_from([1, 2]), C=st.integers(1, 10),
                    seed=st.integers(0, 2 ** 16))


# ---- top_k_gating ----------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=40)
@given(**gating_cases)
def test_gating_matches_the_per_token_loop_oracle(S, E, k, C, seed):
    logits = randn(S, E, seed=seed) * 2
    combine, dispatch, aux = top_k_gating(logits, k, C)
    ref, ref_aux = naive_gating(logits, k, C)
    assert combine.shape == (S, E, C) and dispatch.dtype == torch.bool
    assert_close(combine, ref, f"combine (S={S}, E={E}, k={k}, C={C})")
    assert torch.equal(dispatch, ref != 0), "dispatch must be True exactly where a token holds a slot"
    assert abs(aux.item() - ref_aux) < 1e-12, f"aux loss {aux.item()} != oracle {ref_aux}"


@settings(deadline=None, max_examples=30)
@given(S=st.integers(1, 20), E=st.integers(2, 5), k=st.sampled_from([1, 2]), C=st.integers(1, 6),
       seed=st.integers(0, 2 ** 16))
def test_ties_go_to_the_lowest_expert_index_like_the_oracle(S, E, k, C, seed):
    logits = torch.randint(0, 2, (S, E), generator=torch.Generator().manual_seed(seed)).to(F64)
    assert_close(top_k_gating(logits, k, C)[0], naive_gating(logits, k, C)[0], "combine with tied logits")


@settings(deadline=None, max_examples=40)
@given(**gating_cases)
def test_at_most_k_experts_per_token_and_at_most_C_tokens_per_slot_buffer(S, E, k, C, seed):
    _, dispatch, _ = top_k_gating(randn(S, E, seed=seed) * 3, k, C)
    assert dispatch.sum((1, 2)).max() <= k, "a token was sent to more than k experts"
    assert dispatch.sum(0).max() <= 1, "two tokens share one slot (expert, c)"
    assert dispatch.any(-1).sum(1).max() <= k and dispatch.sum((0, 2)).max() <= C


@settings(deadline=None, max_examples=40)
@given(S=st.integers(1, 24), E=st.integers(2, 8), seed=st.integers(0, 2 ** 16))
def test_undropped_top2_weights_sum_to_one_and_top1_weight_is_p_max(S, E, seed):
    logits = randn(S, E, seed=seed) * 2
    big = 2 * S  # no token is dropped
    c2, d2, _ = top_k_gating(logits, 2, big)
    assert_close(c2.sum((1, 2)), torch.ones(S), "top-2 combine weights of an undropped token sum to 1")
    assert (d2.sum((1, 2)) == 2).all()
    c1, _, _ = top_k_gating(logits, 1, big)
    assert_close(c1.sum((1, 2)), torch.softmax(logits, -1).max(-1).values, "top-1 weight = p_max (no renorm)")


def test_top2_gates_are_normalized_before_dropping():
    # both tokens pick expert 0 first; C = 1 drops token 1 from expert 0, its second gate keeps p2 / (p1 + p2)
    logits = torch.tensor([[3.0, 0.0, 1.0], [2.0, 0.5, -1.0]])  # second choices: token 0 -> 2, 1 -> 1
    combine, _, _ = top_k_gating(logits, 2, 1)
    p = torch.softmax(logits[1], -1)
    assert combine[1, 0].sum() == 0, "token 1 must be dropped from its first expert"
    assert_close(combine[1, 1, 0], p[1] / (p[0] + p[1]), "gate of the surviving second choice")


def test_second_choices_get_slots_after_every_first_choice():
    # token 0 picks (0, 1); token 1 picks (1, 0). With C = 1 expert 1's slot goes to token 1's first choice,
    # although token 0 comes first in token order.
    logits = torch.tensor([[2.0, 1.0, -5.0], [1.0, 2.0, -5.0]])
    combine, _, _ = top_k_gating(logits, 2, 1)
    assert combine[1, 1, 0] > 0 and combine[0, 1].sum() == 0, "second choices must queue after first choices"
    assert combine[0, 0, 0] > 0 and combine[1, 0].sum() == 0


@settings(deadline=None, max_examples=30)
@given(S=st.integers(1, 30), E=st.integers(2, 6), k=st.sampled_from([1, 2]), seed=st.integers(0, 2 ** 16))
def test_capacity_one_keeps_exactly_the_first_token_per_expert(S, E, k, seed):
    logits = randn(S, E, seed=seed) * 2
    _, dispatch, _ = top_k_gating(logits, k, 1)
    e1 = logits.argmax(-1).tolist()
    for e in range(E):
        holders = dispatch[:, e, 0].nonzero().flatten().tolist()
        if e in e1:
            assert holders == [e1.index(e)], f"expert {e}: slot 0 must hold the first token choosing it first"
        elif k == 1:
            assert holders == []


def test_aux_loss_is_one_at_uniform_routing_and_E_at_collapse():
    E = 4
    uniform = torch.zeros(8, E) + torch.eye(E).repeat(2, 1) * 1e-9  # p uniform, argmax balanced
    assert abs(top_k_gating(uniform, 1, 8)[2].item() - 1.0) < 1e-8
    collapsed = torch.zeros(8, E)
    collapsed[:, 2] = 60.0  # p = one-hot, every argmax on expert 2
    assert abs(top_k_gating(collapsed, 2, 8)[2].item() - E) < 1e-10


@settings(deadline=None, max_examples=20)
@given(S=st.integers(1, 12), E=st.integers(2, 6), seed=st.integers(0, 2 ** 16))
def test_aux_loss_gradient_flows_only_through_the_mean_probability(S, E, seed):
    logits = (randn(S, E, seed=seed) * 2).requires_grad_()
    top_k_gating(logits, 2, 3)[2].backward()
    p = torch.softmax(logits.detach(), -1)
    ce = torch.nn.functional.one_hot(p.argmax(-1), E).to(F64).mean(0)
    # d/dz_{sj} of E sum_e me_e ce_e with ce constant: (E / S) p_sj (ce_j - sum_e ce_e p_se)
    expected = E / S * p * (ce - (p * ce).sum(-1, keepdim=True))
    assert_close(logits.grad, expected, "aux-loss gradient (ce must be a constant)", 1e-12)


def test_routing_is_done_in_at_least_float32():
    combine, _, aux = top_k_gating(torch.randn(5, 3).half(), 1, 2)
    assert combine.dtype == torch.float32 and aux.dtype == torch.float32
    assert top_k_gating(torch.randn(5, 3), 1, 2)[0].dtype == F64


@pytest.mark.parametrize("args, match", [((torch.randn(4, 3), 3, 2), "k:"), ((torch.randn(4, 3), 0, 2), "k:"),
                                         ((torch.randn(4, 1), 2, 2), "k:"), ((torch.randn(4, 3), 1, 0), "capacity"),
                                         ((torch.randn(4, 3), 1, 2.0), "capacity"), ((torch.randn(12), 1, 2), "logits"),
                                         ((torch.ones(4, 3, dtype=torch.long), 1, 2), "logits")])
def test_bad_gating_arguments_raise_naming_them(args, match):
    with pytest.raises(ValueError, match=match):
        top_k_gating(*args)


def test_capacity_follows_torchscale_at_factor_one():
    assert expert_capacity(100, 8, 1, 1.0) == math.ceil(100 / 8)  # top-1: int(cf * ceil(S / E))
    assert expert_capacity(100, 8, 2, 1.0) == 2 * math.ceil(100 / 8)  # top-2: 2 ceil(S / E)
    assert expert_capacity(100, 8, 1, 1e-3) == 1
    layer = moe(num_experts=4, eval_capacity_fraction=0.25)
    assert layer.capacity(40) == 10
    layer.eval()
    assert layer.capacity(40) == math.ceil(0.25 * 40)


# ---- the MoE part ----------------------------------------------------------------------------------------------

def same_experts(layer):
    with torch.no_grad():
        for expert in layer.experts[1:]:
            expert.load_state_dict(layer.experts[0].state_dict())
    return layer


@pytest.mark.parametrize("dispatch", ["einsum", "sorted"])
def test_identical_experts_top2_no_drops_equal_the_dense_ffn(dispatch):
    layer = same_experts(moe(num_experts=5, k=2, capacity_factor=10.0, dispatch=dispatch))
    x = randn(3, 7, 16, seed=1)
    assert_close(layer(x), layer.experts[0](x), "MoE with E identical experts vs FFN")


def test_identical_experts_top1_give_p_max_times_the_ffn():
    layer = same_experts(moe(num_experts=4, k=1, capacity_factor=10.0))
    x = randn(2, 5, 16, seed=2)
    p_max = torch.softmax(layer.router(x.reshape(-1, 16)), -1).max(-1).values.reshape(2, 5, 1)
    assert_close(layer(x), p_max * layer.experts[0](x), "top-1 MoE with identical experts vs p_max FFN")


@pytest.mark.parametrize("router", ["linear", "xmoe", "xmoe_torchscale"])
@pytest.mark.parametrize("dispatch", ["einsum", "sorted"])
def test_moe_output_equals_the_per_token_loop_oracle(router, dispatch):
    layer = moe(num_experts=4, k=2, capacity_factor=0.5, router=router, dispatch=dispatch)
    x = randn(2, 9, 16, seed=3)
    h = x.reshape(-1, 16)
    C = layer.capacity(h.size(0))
    ref = naive_moe(h, layer.router(h).detach(), layer.experts, 2, C)
    assert naive_gating(layer.router(h).detach(), 2, C)[0].ne(0).sum() < 2 * h.size(0), "no drops: weak test"
    assert_close(layer(x).reshape(-1, 16), ref, f"MoE ({router}, {dispatch}) vs per-token loop")


@settings(deadline=None, max_examples=15)
@given(E=st.integers(2, 6), k=st.sampled_from([1, 2]), cf=st.floats(0.2, 2.0), seed=st.integers(0, 2 ** 16))
def test_sorted_dispatch_equals_the_einsum_dispatch(E, k, cf, seed):
    layer = moe(num_experts=E, k=min(k, E), capacity_factor=cf, seed=seed)
    x = randn(2, 8, 16, seed=seed)
    dense = layer(x)
    h = x.reshape(-1, 16)
    routing = top_k_routing(layer.router(h), layer.k, layer.capacity(16))
    assert_close(sorted_dispatch(h, routing, layer.experts).reshape(x.shape), dense, "sorted vs einsum dispatch")


def test_permuting_experts_with_router_rows_leaves_outputs_unchanged():
    for router, weight in (("linear", "proj.weight"), ("xmoe", "expert_embeddings")):
        layer = moe(num_experts=5, k=2, capacity_factor=0.6, router=router)
        x = randn(2, 10, 16, seed=4)
        perm = [3, 0, 4, 1, 2]
        permuted = moe(num_experts=5, k=2, capacity_factor=0.6, router=router)
        permuted.load_state_dict(layer.state_dict())
        with torch.no_grad():
            permuted.router.get_parameter(weight).copy_(layer.router.get_parameter(weight)[perm])
        permuted.experts = nn.ModuleList(layer.experts[i] for i in perm)
        assert_close(permuted(x), layer(x), f"{router}: output after permuting experts and router rows")


def test_dropped_tokens_get_exactly_zero_from_the_moe_branch_and_the_residual_carries_them():
    layer = moe(num_experts=4, k=1, capacity_factor=0.25)  # C = 1 for 12 tokens
    x = randn(1, 12, 16, seed=5)
    y = layer(x)[0]
    _, dispatch, _ = top_k_gating(layer.router(x[0]), 1, layer.capacity(12))
    dropped = ~dispatch.any(-1).any(-1)
    assert dropped.sum() >= 8
    assert (y[dropped] == 0).all(), "a dropped token must get exactly 0 from the MoE branch"
    assert (y[~dropped] != 0).all()
    block = PreNorm(config())
    assert torch.equal(block(x, layer)[0, dropped], x[0, dropped]), "the residual must carry dropped tokens"


def test_train_and_eval_capacities_differ_as_configured():
    layer = moe(num_experts=4, k=1, capacity_factor=0.25, eval_capacity_fraction=1.0)
    x = randn(1, 12, 16, seed=6)
    train_out = layer(x)
    layer.eval()
    eval_out = layer(x)
    assert (train_out == 0).all(-1).sum() > 0 and not (eval_out == 0).all(-1).any(), \
        "eval capacity ceil(1.0 * S) must keep every token that training capacity 1 drops"


def test_aux_loss_is_set_by_every_forward_with_a_visible_weight():
    layer = moe(num_experts=4)
    assert layer.aux_weight == 0.01
    logits_h = randn(3, 4, 16, seed=7)
    layer(logits_h)
    p = torch.softmax(layer.router(logits_h.reshape(-1, 16)), -1)
    assert_close(layer.aux_loss, load_balancing_loss(p, p.argmax(-1)), "MoE.aux_loss")
    assert layer.aux_loss.requires_grad


@pytest.mark.parametrize("kw, match", [(dict(num_experts=0), "num_experts"), (dict(num_experts=2, k=3), "k:"),
                                       (dict(router="cosine"), "router"), (dict(heads=3), "heads"),
                                       (dict(capacity_factor=0.0), "capacity_factor"),
                                       (dict(dispatch="loop"), "dispatch")])
def test_bad_moe_arguments_raise_at_construction(kw, match):
    with pytest.raises(ValueError, match=match):
        MoE(config(), **kw)


# ---- routers ---------------------------------------------------------------------------------------------------

def naive_cosine_scores(h, W, e, tau):
    out = torch.empty(h.size(0), e.size(0))
    for s in range(h.size(0)):
        z = [sum(W[i, j].item() * h[s, j].item() for j in range(h.size(1))) for i in range(W.size(0))]
        for kk in range(e.size(0)):
            dot = sum(a * b for a, b in zip(z, e[kk].tolist()))
            out[s, kk] = dot / (math.sqrt(sum(a * a for a in z)) * math.sqrt(sum(b * b for b in e[kk].tolist())))
    return out / tau


@settings(deadline=None, max_examples=15)
@given(S=st.integers(1, 6), E=st.integers(1, 6), de=st.integers(2, 5), tau=st.floats(0.01, 2.0),
       seed=st.integers(0, 2 ** 16))
def test_xmoe_scores_are_cosine_over_temperature_within_plus_minus_one_over_tau(S, E, de, tau, seed):
    h, W, e = randn(S, 8, seed=seed), randn(de, 8, seed=seed + 1), randn(E, de, seed=seed + 2)
    s = xmoe_scores(h, W, e, torch.tensor(tau))
    assert_close(s, naive_cosine_scores(h, W, e, tau), "X-MoE scores vs cos(W h, e_k) / tau", 1e-9)
    assert s.abs().max() <= 1 / tau + 1e-9, "X-MoE scores must lie in [-1/tau, 1/tau]"


@settings(deadline=None, max_examples=20)
@given(c1=st.floats(1e-3, 1e3), c2=st.floats(1e-3, 1e3), seed=st.integers(0, 2 ** 16))
def test_xmoe_scores_are_invariant_to_positive_rescaling_of_h_and_expert_embeddings(c1, c2, seed):
    h, W, e, tau = randn(5, 8, seed=seed), randn(4, 8, seed=seed + 1), randn(3, 4, seed=seed + 2), torch.tensor(0.3)
    assert_close(xmoe_scores(c1 * h, W, c2 * e, tau), xmoe_scores(h, W, e, tau), "scores after h -> c h, e -> c e",
                 1e-9)


def test_torchscale_xmoe_scores_deviate_no_token_norm_no_temperature():
    h, W, e = randn(5, 8, seed=8), randn(4, 8, seed=9), randn(3, 4, seed=10)
    ts = xmoe_torchscale_scores(h, W, e)
    norm = (h @ W.t()).norm(dim=-1, keepdim=True)
    assert_close(ts, norm * xmoe_scores(h, W, e, torch.tensor(1.0)), "torchscale = ||W h|| cos(W h, e_k)")
    assert_close(xmoe_torchscale_scores(3 * h, W, e), 3 * ts, "torchscale scores scale with the token")
    assert_close(xmoe_torchscale_scores(h, W, 3 * e), ts, "torchscale normalizes the expert side")
    paper = XMoERouter(8, 3, routing_dim=4)
    assert (paper(100 * h).abs() <= 1 / 0.07 + 1e-9).all()
    assert not torch.allclose(ts, xmoe_scores(h, W, e, torch.tensor(0.07)))


def test_torchscale_router_resets_expert_embeddings_to_norm_1_5_and_has_no_temperature():
    router = XMoERouter(8, 3, routing_dim=4, style="torchscale")
    with torch.no_grad():
        router.expert_embeddings.mul_(7.0)
    router(randn(2, 8, seed=11))
    assert_close(router.expert_embeddings.norm(dim=1), torch.full((3,), 1.5), "expert embedding norms")
    assert router.temperature is None


def test_paper_router_temperature_is_learnable_and_clamped():
    router = XMoERouter(8, 3, routing_dim=4)
    assert router.temperature.item() == pytest.approx(0.07)
    router(randn(4, 8, seed=12)).square().sum().backward()
    assert router.temperature.grad is not None and router.temperature.grad != 0
    with torch.no_grad():
        router.temperature.fill_(-1.0)
    assert router(randn(4, 8, seed=12)).abs().max() <= 1e4 + 1e-6, "tau is clamped at 1e-4"


# ---- MH-MoE ----------------------------------------------------------------------------------------------------

def test_multi_head_moe_equals_split_route_merge_oracle():
    layer = moe(num_experts=4, k=2, heads=4, capacity_factor=0.5)
    x = randn(2, 5, 16, seed=13)
    sub = layer.head_proj(x).reshape(-1, 4)  # (B T h, d / h): sub-tokens in token order
    C = layer.capacity(sub.size(0))
    assert C == expert_capacity(40, 4, 2, 0.5), "capacity counts sub-tokens"
    merged = naive_moe(sub, layer.router(sub).detach(), layer.experts, 2, C).reshape(2, 5, 16)
    assert_close(layer(x), layer.merge_proj(merged), "MH-MoE vs head -> split -> route -> concat -> merge")
    assert layer.experts[0].fc1.in_features == 4


# ---- the part in a Transformer ---------------------------------------------------------------------------------

def test_moe_part_swaps_in_one_line_and_trains():
    torch.manual_seed(0)
    cfg = config(d_model=32, n_heads=2, d_ff=32)
    model = Transformer(cfg, ffn=partial(MoE, num_experts=4, k=2)).float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    idx = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(15):
        _, loss = model(idx[:, :-1], idx[:, 1:])  # the core adds 0.01 * aux_loss of each MoE layer
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"
    assert all(m.router.proj.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, MoE))


def test_the_core_adds_the_weighted_aux_loss():
    torch.manual_seed(0)
    model = Transformer(config(), ffn=partial(MoE, num_experts=4, aux_weight=0.5))
    idx = torch.randint(0, 40, (2, 8))
    _, loss = model(idx, idx)
    plain = nn.functional.cross_entropy(model.head(model.hidden(idx)).flatten(0, 1), idx.flatten())
    aux = model.aux_losses()
    assert len(aux) == 2
    assert_close(loss, plain + 0.5 * sum(aux.values()), "loss = LM loss + aux_weight * aux_loss")


# ---- expert parallelism over 2 gloo processes ------------------------------------------------------------------

EP = dict(num_experts=4, k=2, capacity_factor=0.75)


def _ep_inputs(world):
    return randn(world, 2, 6, 16, seed=14), randn(world, 2, 6, 16, seed=15)


def _ep_worker(rank, world, port, out_dir):
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_default_dtype(F64)
    full = moe(**EP)
    layer = MoE(config(), **EP, expert_parallel=True)
    local = len(layer.experts)
    layer.router.load_state_dict(full.router.state_dict())
    for i, expert in enumerate(layer.experts):
        expert.load_state_dict(full.experts[layer.first_expert + i].state_dict())
    x, w = _ep_inputs(world)
    x = x[rank].clone().requires_grad_()
    y = layer(x)
    ((y * w[rank]).sum() + layer.aux_loss).backward()
    torch.save({"y": y.detach(), "dx": x.grad, "router": layer.router.proj.weight.grad, "first": layer.first_expert,
                "experts": [[p.grad for p in e.parameters()] for e in layer.experts], "local": local},
               os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


def test_two_process_expert_parallel_matches_one_process(tmp_path):
    world = 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ep_worker, args=(world, port, str(tmp_path)), nprocs=world, join=True)
    full = moe(**EP)
    x, w = _ep_inputs(world)
    x.requires_grad_()
    total = 0
    ys = []
    for r in range(world):  # each rank routes its own tokens with its own capacity
        ys.append(full(x[r]))
        total = total + (ys[-1] * w[r]).sum() + full.aux_loss
    total.backward()
    router_grad = 0
    dropped = 0
    for r in range(world):
        got = torch.load(tmp_path / f"{r}.pt")
        dropped += int((ys[r] == 0).all(-1).sum())
        assert_close(got["y"], ys[r], f"rank {r}: output")
        assert_close(got["dx"], x.grad[r], f"rank {r}: input gradient")
        router_grad = router_grad + got["router"]
        for i, grads in enumerate(got["experts"]):
            for g, p in zip(grads, full.experts[got["first"] + i].parameters()):
                assert_close(g, p.grad, f"rank {r}: gradient of expert {got['first'] + i}")
    assert_close(router_grad, full.router.proj.weight.grad, "router gradient summed over ranks")
    assert got["local"] == 2
