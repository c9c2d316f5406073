"""Retention's three forms against a literal loop, XPos's relative scores, and a RetNet LM that decodes with a
constant-size state: all in float64, eval mode."""

import math

import pytest
import torch
import torch.nn.functional as F

from nanomodels.retnet import (MultiScaleRetention, apply_xpos, retention_chunkwise, retention_gammas,
                               retention_parallel, retention_recurrent, retnet_lm)
from nanomodels.transformer import TransformerConfig

TOL = dict(rtol=0, atol=1e-12)
CHAPTER = "10"  # tests/conftest.py runs its graded checks as `graded_check`


def qkv(B=2, H=3, T=7, Dk=4, Dv=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=dtype) for D in (Dk, Dk, Dv)]


def naive(q, k, v, gamma):
    """o_n = sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m, one term at a time."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.size(-1), dtype=q.dtype)
    for h in range(H):
        for n in range(T):
            for m in range(n + 1):
                w = float(gamma[h]) ** (n - m) * (q[:, h, n] * k[:, h, m]).sum(-1)
                out[:, h, n] += w[:, None] * v[:, h, m]
    return out


@pytest.mark.parametrize("T", [1, 2, 7, 13])
def test_the_three_forms_equal_a_literal_loop(T):
    q, k, v = qkv(T=T)
    gamma = retention_gammas(3)
    want = naive(q, k, v, gamma)
    torch.testing.assert_close(retention_parallel(q, k, v, gamma), want, **TOL)
    torch.testing.assert_close(retention_recurrent(q, k, v, gamma)[0], want, **TOL)
    for C in (1, 3, T, T + 4):
        out, state = retention_chunkwise(q, k, v, gamma, C)
        torch.testing.assert_close(out, want, **TOL, msg=f"chunk_size {C}")
        torch.testing.assert_close(state, retention_recurrent(q, k, v, gamma)[1], **TOL)


def test_the_returned_state_continues_the_sequence():
    q, k, v = qkv(T=11)
    gamma = torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)
    whole, S = retention_recurrent(q, k, v, gamma)
    a, Sa = retention_recurrent(q[:, :, :4], k[:, :, :4], v[:, :, :4], gamma)
    b, Sb = retention_recurrent(q[:, :, 4:], k[:, :, 4:], v[:, :, 4:], gamma, Sa)
    torch.testing.assert_close(torch.cat([a, b], 2), whole, **TOL)
    torch.testing.assert_close(Sb, S, **TOL)
    c, Sc = retention_chunkwise(q[:, :, :5], k[:, :, :5], v[:, :, :5], gamma, 2)
    d, Sd = retention_chunkwise(q[:, :, 5:], k[:, :, 5:], v[:, :, 5:], gamma, 4, Sc)
    torch.testing.assert_close(torch.cat([c, d], 2), whole, **TOL)
    torch.testing.assert_close(Sd, S, **TOL)


def test_gamma_extremes_are_diagonal_and_causal_linear_attention():
    q, k, v = qkv(T=6)
    tiny = torch.full((3,), 1e-200, dtype=torch.float64)
    diag = (q * k).sum(-1, keepdim=True) * v
    torch.testing.assert_close(retention_parallel(q, k, v, tiny), diag, **TOL)
    ones = torch.ones(3, dtype=torch.float64)
    linear = ((q @ k.transpose(-2, -1)) * torch.ones(6, 6, dtype=torch.float64).tril()) @ v
    torch.testing.assert_close(retention_parallel(q, k, v, ones), linear, **TOL)
    torch.testing.assert_close(retention_recurrent(q, k, v, ones)[0], linear, **TOL)


def test_gammas_and_dtypes():
    assert torch.equal(retention_gammas(4), torch.tensor([1 - 2 ** -5, 1 - 2 ** -6, 1 - 2 ** -7, 1 - 2 ** -8],
                                                         dtype=torch.float64))
    q, k, v = qkv(T=5, dtype=torch.float32)
    for out in (retention_parallel(q, k, v, retention_gammas(3)), retention_recurrent(q, k, v, retention_gammas(3))[0]):
        assert out.dtype == torch.float32
    q, k, v = qkv(T=40)
    gamma = torch.tensor([0.999, 0.5, 0.9], dtype=torch.float64)  # gamma^39 in float32 would be off by ~1e-8
    torch.testing.assert_close(retention_parallel(q, k, v, gamma), naive(q, k, v, gamma), **TOL)


def scores(q, k):
    return q @ k.transpose(-2, -1)


@pytest.mark.parametrize("scale_base", [512, 8, math.inf])
def test_xpos_scores_depend_only_on_the_distance(scale_base):
    g = torch.Generator().manual_seed(1)
    q0, k0 = torch.randn(8, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    T = 9
    q, k = apply_xpos(q0.expand(T, 8), k0.expand(T, 8), scale_base=scale_base)
    S = scores(q, k)
    for n in range(T - 1):
        for m in range(T - 1):
            assert abs(S[n + 1, m + 1] - S[n, m]) < 1e-12, (n, m)
    if scale_base == math.inf:  # RoPE: a rotation keeps the norms
        torch.testing.assert_close(q.norm(dim=-1), q0.norm().expand(T), **TOL)


def test_xpos_decoding_one_query_equals_the_full_path():
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(2, 12, 6, generator=g, dtype=torch.float64), torch.randn(2, 12, 6, generator=g,
                                                                               dtype=torch.float64)
    fq, fk = apply_xpos(q, k)
    dq, dk = apply_xpos(q[:, -1:], k, q_offset=11)
    torch.testing.assert_close(scores(dq, dk), scores(fq, fk)[:, -1:], **TOL)


def test_xpos_scale_follows_the_formula():
    """One pair at distance n - m: the score is rotated by (n - m) theta and scaled by zeta^((n - m)/B)."""
    D, B = 4, 16.0
    q, k = torch.zeros(5, D, dtype=torch.float64), torch.zeros(5, D, dtype=torch.float64)
    q[:, 2], k[:, 2] = 1.0, 1.0  # pair i = 1 only
    qx, kx = apply_xpos(q, k, scale_base=B)
    zeta, theta = (2 + 0.4 * D) / (1.4 * D), 10000.0 ** (-2 / D)
    for n in range(5):
        for m in range(5):
            want = zeta ** ((n - m) / B) * math.cos((n - m) * theta)
            assert abs(float(qx[n] @ kx[m]) - want) < 1e-12


def lm(chunk_size=None, seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=30, block_size=24, n_layers=2, d_model=16, n_heads=2)
    return retnet_lm(cfg, chunk_size=chunk_size).double().eval()


def test_a_retnet_lm_gives_the_same_logits_parallel_chunkwise_and_token_by_token():
    idx = torch.randint(0, 30, (2, 13), generator=torch.Generator().manual_seed(3))
    parallel = lm()(idx)[0]
    chunked = lm(chunk_size=4)(idx)[0]
    torch.testing.assert_close(chunked, parallel, rtol=0, atol=1e-10)
    model, cache = lm(), None
    cache = [{} for _ in model.blocks]
    steps = torch.cat([model(idx[:, t:t + 1], cache=cache)[0] for t in range(13)], dim=1)
    torch.testing.assert_close(steps, parallel, rtol=0, atol=1e-10)
    assert all(set(c) == {"state", "offset"} and c["state"].shape == (2, 2, 8, 16) for c in cache)


def test_generate_with_the_recurrent_state_equals_recomputing():
    model = lm()
    prompt = torch.randint(0, 30, (1, 5), generator=torch.Generator().manual_seed(4))
    a = model.generate(prompt, 10, temperature=0, use_cache=True)
    b = model.generate(prompt, 10, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_torchscale_init_survives_the_core_init():
    model = lm()
    msr = model.blocks[0].attn
    bound = 2 ** -2.5 * math.sqrt(6 / (16 + 16))  # xavier_uniform bound of q_proj (16 -> 16)
    assert float(msr.q_proj.weight.detach().abs().max()) <= bound and float(msr.q_proj.weight.detach().abs().max()) > 0.8 * bound


def torchscale_parallel(q, k, v, gamma):
    """torchscale's parallel retention (0.2.0, multiscale_retention.py): decay rows divided by sqrt(row sum),
    then Q K^T (.) D divided by its detached absolute row sum, clamped to [1, 5e4]."""
    T = q.size(2)
    idx = torch.arange(T, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    D = torch.where(diff >= 0, gamma[:, None, None] ** diff.clamp(min=0), 0.0)
    D = D / D.sum(-1, keepdim=True).sqrt()
    qk = (q @ k.transpose(-2, -1)) * D
    qk = qk / qk.detach().abs().sum(-1, keepdim=True).clamp(min=1, max=5e4)
    return qk @ v


def test_torchscale_rescalings_cancel_through_rmsnorm_only_with_eps_zero():
    q, k, v = qkv(T=9)
    q, k = q * 0.3, k * 0.3  # small row sums, so that the clamp at 1 is active on some rows and not others
    gamma = retention_gammas(3)
    ours, theirs = retention_parallel(q, k, v, gamma), torchscale_parallel(q, k, v, gamma)
    assert (ours - theirs).abs().max() > 1e-2, "the rescalings changed nothing: the test would be vacuous"
    norm = lambda y, eps: F.rms_norm(y, (y.size(-1),), eps=eps)  # noqa: E731
    torch.testing.assert_close(norm(ours, 0.0), norm(theirs, 0.0), rtol=0, atol=1e-12)
    assert (norm(ours * 1e-3, 1e-6) - norm(theirs * 1e-3, 1e-6)).abs().max() > 1e-4


@pytest.mark.parametrize("call,message", [
    (lambda q, k, v: retention_parallel(q, k[..., :3], v, retention_gammas(3)), "q, k: expected equal shapes"),
    (lambda q, k, v: retention_parallel(q, k, v[:, :2], retention_gammas(3)), "v: expected"),
    (lambda q, k, v: retention_parallel(q, k, v, retention_gammas(2)), "gamma: expected shape"),
    (lambda q, k, v: retention_parallel(q, k, v, torch.tensor([0.5, 1.5, 0.9])), "gamma: every decay"),
    (lambda q, k, v: retention_recurrent(q, k, v, torch.tensor([0.0, 0.5, 0.9])), "gamma: every decay"),
    (lambda q, k, v: retention_chunkwise(q, k, v, retention_gammas(3), 0), "chunk_size"),
    (lambda q, k, v: retention_recurrent(q, k, v, retention_gammas(3), torch.zeros(2, 3, 4, 4)), "state"),
    (lambda q, k, v: apply_xpos(q[..., :3], k[..., :3]), "must be even"),
    (lambda q, k, v: apply_xpos(q, k, q_offset=-1), "q_offset"),
    (lambda q, k, v: retention_gammas(0), "n_heads"),
])
def test_bad_inputs_name_the_argument(call, message):
    q, k, v = qkv()
    with pytest.raises(ValueError, match=message):
        call(q, k, v)


def test_the_part_refuses_what_retention_does_not_define():
    msr = MultiScaleRetention(TransformerConfig(d_model=16, n_heads=2))
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="allowed"):
        msr(x, allowed=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal"):
        msr(x, causal=False)
    with pytest.raises(ValueError, match="memory"):
        msr(x, memory=x)


def test_xpos_centres_its_exponent_so_long_float32_sequences_stay_finite():
    """zeta_0 = 0.4/1.4: k's scale zeta^(-m/512) passes float32's 3.4e38 near m = 36K uncentred; centred at
    L/2 it stays below 1e27 at L = 50K, and the scores equal float64's."""
    T = 50_000
    q, k = torch.ones(T, 2), torch.ones(T, 2)
    q32, k32 = apply_xpos(q, k)
    assert torch.isfinite(q32).all() and torch.isfinite(k32).all()
    q64, k64 = apply_xpos(q.double(), k.double())
    last = (q64[-1] @ k64[-8:].T)
    torch.testing.assert_close((q32[-1] @ k32[-8:].T).double(), last, rtol=1e-5, atol=0)


def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()
