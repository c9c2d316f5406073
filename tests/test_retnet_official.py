"""RetNet against a second set of oracles, in float64: hypothesis-drawn shapes for the three forms, XPos as
uncentred complex rotations, float16 range, the init, and torchscale 0.2.0's stabilised parallel and recurrent
forms (microsoft/torchscale @ 4d1e0e8), which agree through RMSNorm only with eps = 0."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.retnet import (MultiScaleRetention, apply_xpos, retention_chunkwise, retention_gammas,
                               retention_parallel, retention_recurrent, retnet_lm)
from nanomodels.transformer import TransformerConfig

from test_retnet import naive, qkv  # the literal loop over m <= n, and its seeded float64 inputs

TOL = 1e-12


def test_gammas_are_one_minus_two_to_minus_five_minus_h():
    g = retention_gammas(3)
    assert g.dtype == torch.float64 and g.tolist() == [0.96875, 0.984375, 0.9921875]


@given(T=st.integers(1, 9), B=st.integers(1, 2), H=st.integers(1, 3), Dk=st.integers(1, 4), Dv=st.integers(1, 4),
       seed=st.integers(0, 99))
def test_three_forms_equal_the_naive_loop(T, B, H, Dk, Dv, seed):
    q, k, v = qkv(B, H, T, Dk, Dv, seed)
    gamma = retention_gammas(H)
    want = naive(q, k, v, gamma)
    par = retention_parallel(q, k, v, gamma)
    rec, S = retention_recurrent(q, k, v, gamma)
    assert par.dtype == torch.float64 and (par - want).abs().max() < TOL
    assert (rec - want).abs().max() < TOL
    for C in (1, 3, T, T + 2):
        chunk, S_c = retention_chunkwise(q, k, v, gamma, C)
        assert (chunk - want).abs().max() < TOL, f"chunk_size {C}"
        assert (S_c - S).abs().max() < TOL, f"chunk_size {C}: final state"


def test_state_continuation_two_halves_equal_one_call():
    q, k, v = qkv(2, 2, 10, 3, 4)
    gamma = retention_gammas(2)
    whole, S = retention_recurrent(q, k, v, gamma)
    a, S1 = retention_recurrent(q[:, :, :6], k[:, :, :6], v[:, :, :6], gamma)
    b, S2 = retention_chunkwise(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], gamma, 3, state=S1)
    assert (torch.cat([a, b], 2) - whole).abs().max() < TOL and (S2 - S).abs().max() < TOL


def test_gamma_limits_diagonal_and_causal_linear_attention():
    q, k, v = qkv(1, 2, 6, 3, 2)
    tiny = torch.full((2,), 1e-300, dtype=torch.float64)
    diag = (q * k).sum(-1, keepdim=True) * v
    assert (retention_parallel(q, k, v, tiny) - diag).abs().max() < TOL
    ones = torch.ones(2, dtype=torch.float64)
    linear = torch.tril(q @ k.transpose(-2, -1)) @ v
    assert (retention_parallel(q, k, v, ones) - linear).abs().max() < TOL


def test_bad_inputs_raise_naming_the_argument():
    q, k, v = qkv(1, 2, 4, 3, 2)
    g = retention_gammas(2)
    with pytest.raises(ValueError, match="gamma"):
        retention_parallel(q, k, v, torch.tensor([0.5, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="gamma"):
        retention_parallel(q, k, v, torch.tensor([0.0, 0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="gamma"):
        retention_parallel(q, k, v, retention_gammas(3))
    with pytest.raises(ValueError, match="q, k"):
        retention_parallel(q, k[..., :2], v, g)
    with pytest.raises(ValueError, match="v:"):
        retention_parallel(q, k, v[:, :, :3], g)
    with pytest.raises(ValueError, match="state"):
        retention_recurrent(q, k, v, g, state=torch.zeros(1, 2, 2, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="chunk_size"):
        retention_chunkwise(q, k, v, g, 0)
    with pytest.raises(ValueError, match="even"):
        apply_xpos(torch.randn(3, 5), torch.randn(3, 5))


def xpos_oracle(x, positions, sign, scale_base):
    """Complex form, uncentred: z_i e^(i p theta_i) zeta_i^(sign p / B)."""
    D = x.size(-1)
    i = torch.arange(D // 2, dtype=torch.float64)
    theta = 10000.0 ** (-2 * i / D)
    zeta = (2 * i + 0.4 * D) / (1.4 * D)
    p = positions.to(torch.float64)[:, None]
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.exp(1j * p * theta) * zeta ** (sign * p / scale_base)
    return torch.stack((z.real, z.imag), -1).flatten(-2)


@pytest.mark.parametrize("scale_base", [512, 8, math.inf])
def test_xpos_scores_equal_the_uncentred_complex_oracle(scale_base):
    q, k = torch.randn(2, 7, 6, dtype=torch.float64), torch.randn(2, 7, 6, dtype=torch.float64)
    qx, kx = apply_xpos(q, k, scale_base=scale_base)
    pos = torch.arange(7)
    want = xpos_oracle(q, pos, 1, scale_base) @ xpos_oracle(k, pos, -1, scale_base).transpose(-2, -1)
    assert ((qx @ kx.transpose(-2, -1)) - want).abs().max() < TOL
    if scale_base == math.inf:  # RoPE: the vectors themselves
        assert (qx - xpos_oracle(q, pos, 1, scale_base)).abs().max() < TOL


def test_xpos_score_depends_only_on_distance_and_decode_equals_full_path():
    torch.manual_seed(0)
    a, b = torch.randn(8, dtype=torch.float64), torch.randn(8, dtype=torch.float64)
    q, k = a.expand(12, 8).clone(), b.expand(12, 8).clone()
    qx, kx = apply_xpos(q, k, scale_base=16)
    s = qx @ kx.T
    for delta in range(-11, 12):
        d = torch.diagonal(s, delta)
        assert (d - d[0]).abs().max() < TOL, f"n - m = {-delta}"
    qd, kd = apply_xpos(q[-1:], k, q_offset=11, scale_base=16)
    assert ((qd @ kd.T) - s[-1:]).abs().max() < TOL


def test_xpos_centred_exponent_does_not_overflow_in_float16():
    x = torch.ones(6000, 8, dtype=torch.float16)
    qx, kx = apply_xpos(x, x)
    assert torch.isfinite(qx).all() and torch.isfinite(kx).all()
    zeta_min = 0.4 / 1.4  # the uncentred k scale at m = 5999 overflows float16
    assert not math.isfinite(float(torch.tensor(zeta_min ** (-5999 / 512)).half()))


def tiny(**kw):
    return TransformerConfig(**dict(vocab_size=29, block_size=16, n_layers=2, d_model=16, n_heads=2) | kw)


def lm64(seed=0, **kw):
    torch.manual_seed(seed)
    return retnet_lm(tiny(), **kw).double().eval()


def test_lm_parallel_equals_chunkwise_equals_token_by_token_recurrent():
    m = lm64()
    idx = torch.randint(0, 29, (2, 11))
    par, _ = m(idx)
    for C in (1, 3, 11, 20):
        for b in m.blocks:
            b.attn.chunk_size = C
        chunk, _ = m(idx)
        assert (chunk - par).abs().max() < 1e-10, f"chunk_size {C}"
    cache = [{} for _ in m.blocks]
    steps = [m(idx[:, t:t + 1], cache=cache)[0] for t in range(11)]
    assert (torch.cat(steps, 1) - par).abs().max() < 1e-10
    assert cache[0]["offset"] == 11 and cache[0]["state"].shape == (2, 2, 8, 16)


def test_generate_with_and_without_cache_gives_the_same_greedy_tokens():
    m = lm64(1)
    idx = torch.randint(0, 29, (2, 3))
    a = m.generate(idx, 20, temperature=0, use_cache=True)
    b = m.generate(idx, 20, temperature=0, use_cache=False)
    assert torch.equal(a, b)


def test_retnet_lm_keeps_torchscale_init_and_plain_transformer_does_not():
    m = retnet_lm(tiny())
    attn = m.blocks[0].attn
    for proj, gain in ((attn.q_proj, 2 ** -2.5), (attn.g_proj, 2 ** -2.5), (attn.out_proj, 2 ** -1)):
        fan_out, fan_in = proj.weight.shape
        bound = gain * math.sqrt(6 / (fan_in + fan_out))
        w = proj.weight.abs()
        assert w.max() <= bound and w.max() > 0.9 * bound, "xavier_uniform with torchscale's gain"
    from nanomodels.transformer import Transformer
    torch.manual_seed(0)
    plain = Transformer(tiny(), attention=MultiScaleRetention).blocks[0].attn.q_proj.weight
    assert abs(plain.std().item() - 0.02) < 0.004, "Transformer() alone applies GPT-2's N(0, 0.02)"


def test_part_rejects_masks_bidirectional_and_memory():
    part = MultiScaleRetention(tiny())
    x = torch.randn(1, 4, 16)
    with pytest.raises(ValueError, match="allowed"):
        part(x, torch.ones(4, 4, dtype=torch.bool), True)
    with pytest.raises(ValueError, match="causal"):
        part(x, None, False)
    with pytest.raises(ValueError, match="memory"):
        part(x, None, True, None, x)


def torchscale_modes(q, k, v, gamma, C, eps):
    """torchscale 0.2.0 (4d1e0e8) stabilised forms, followed by its per-head RMSNorm(eps)."""
    T = q.size(2)
    g = gamma[:, None, None]
    idx = torch.arange(T, dtype=torch.float64)
    diff = idx[:, None] - idx[None, :]
    D = torch.where(diff >= 0, g ** diff.clamp(min=0), 0.0)
    qk = (q @ k.transpose(-2, -1)) * (D / D.sum(-1, keepdim=True).sqrt())
    par = (qk / qk.abs().sum(-1, keepdim=True).clamp(1, 5e4)) @ v
    kv, scale, rec = None, None, []
    for n in range(T):
        new = k[:, :, n, :, None] * v[:, :, n, None, :]
        if kv is None:
            kv, scale = new, torch.ones_like(g)
        else:
            s = scale * g + 1
            kv, scale = kv * (scale.sqrt() * g / s.sqrt()) + new / s.sqrt(), s
        rec.append(q[:, :, n, None] @ kv)
    norm = lambda y: F.rms_norm(y, (y.size(-1),), eps=eps)  # noqa: E731
    return norm(par), norm(torch.cat(rec, 2))


def test_torchscale_normalisations_cancel_only_with_norm_eps_zero():
    q, k, v = qkv(1, 2, 12, 4, 3, seed=3)
    gamma = retention_gammas(2)
    ours = F.rms_norm(retention_parallel(q, k, v, gamma), (3,), eps=0.0)
    par, rec = torchscale_modes(q, k, v, gamma, 4, eps=0.0)
    assert (par - ours).abs().max() < TOL and (rec - ours).abs().max() < TOL
    par, rec = torchscale_modes(q, k, v, gamma, 4, eps=1e-6)
    assert (par - rec).abs().max() > 1e-8, "with eps > 0 the stabilised parallel and recurrent forms differ"
