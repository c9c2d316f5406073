"""Gated retention against literal oracles, in float64: the parallel, recurrent and chunkwise forms against a
triple loop over the paper's sum, a constant decay against retention's gamma^(n-m), causality by perturbation.
"""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.gated_retention import gated_retention, gated_retention_chunkwise, gated_retention_recurrent

TOL = 1e-10


def report(name, got, want):
    diff = (got - want).abs()
    return f"{name}: max |diff| {diff.max().item():.3g}, mean {diff.mean().item():.3g}"


def inputs(B, H, T, Dk, Dv, seed=0, zero_decay_every=0):
    """q, k (B, H, T, Dk), v (B, H, T, Dv), log_decay (B, H, T) <= 0 in float64 (some exactly 0 if asked)."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, T, Dk, dtype=torch.float64, generator=g) for _ in range(2))
    v = torch.randn(B, H, T, Dv, dtype=torch.float64, generator=g)
    log_decay = -2 * torch.rand(B, H, T, dtype=torch.float64, generator=g)
    if zero_decay_every:
        log_decay[..., ::zero_decay_every] = 0.0
    return q, k, v, log_decay


def naive_gated_retention(q, k, v, log_decay):
    """The paper's sum, one term at a time: o_n = sum_{m <= n} exp(sum_{j=m+1..n} log_decay_j) (q_n . k_m) v_m."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.size(-1), dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            for n in range(T):
                for m in range(n + 1):
                    decay = math.exp(sum(log_decay[b, h, j].item() for j in range(m + 1, n + 1)))
                    out[b, h, n] += decay * torch.dot(q[b, h, n], k[b, h, m]) * v[b, h, m]
    return out


shapes = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(0, 9), st.integers(1, 4), st.integers(1, 4))


# ---- gated retention: three forms, one function ---------------------------------------------------------------

@given(shape=shapes, seed=st.integers(0, 2**16), zero_every=st.sampled_from([0, 1, 3]))
def test_gated_retention_parallel_equals_naive_loop(shape, seed, zero_every):
    q, k, v, g = inputs(*shape, seed=seed, zero_decay_every=zero_every)
    got, want = gated_retention(q, k, v, g), naive_gated_retention(q, k, v, g)
    assert got.shape == want.shape and got.dtype == torch.float64
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("parallel vs naive", got, want)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_gated_retention_recurrent_equals_parallel(shape, seed):
    q, k, v, g = inputs(*shape, seed=seed)
    out, state = gated_retention_recurrent(q, k, v, g)
    want = gated_retention(q, k, v, g)
    assert torch.allclose(out, want, rtol=0, atol=TOL), report("recurrent vs parallel", out, want)
    B, H, T, Dk = q.shape
    assert state.shape == (B, H, Dk, v.size(-1))


@given(shape=shapes, seed=st.integers(0, 2**16), chunk=st.sampled_from(["1", "3", "T", ">T"]))
def test_gated_retention_chunkwise_equals_recurrent_for_any_chunk_size(shape, seed, chunk):
    q, k, v, g = inputs(*shape, seed=seed)
    T = q.size(2)
    chunk_size = {"1": 1, "3": 3, "T": max(T, 1), ">T": T + 2}[chunk]
    out, state = gated_retention_chunkwise(q, k, v, g, chunk_size)
    want_out, want_state = gated_retention_recurrent(q, k, v, g)
    assert torch.allclose(out, want_out, rtol=0, atol=TOL), report("chunkwise vs recurrent", out, want_out)
    assert torch.allclose(state, want_state, rtol=0, atol=TOL), report("chunkwise state", state, want_state)


@pytest.mark.parametrize("form", ["recurrent", "chunkwise"])
@pytest.mark.parametrize("split", [0, 1, 4, 7])
def test_gated_retention_state_continues_the_sequence(form, split):
    q, k, v, g = inputs(2, 3, 7, 4, 3, seed=split)
    fn = gated_retention_recurrent if form == "recurrent" else (
        lambda *a, state=None: gated_retention_chunkwise(*a, chunk_size=3, state=state))
    first, state = fn(q[:, :, :split], k[:, :, :split], v[:, :, :split], g[:, :, :split])
    second, state = fn(q[:, :, split:], k[:, :, split:], v[:, :, split:], g[:, :, split:], state=state)
    whole, whole_state = fn(q, k, v, g)
    got = torch.cat([first, second], dim=2)
    assert torch.allclose(got, whole, rtol=0, atol=TOL), report("two halves vs whole", got, whole)
    assert torch.allclose(state, whole_state, rtol=0, atol=TOL)


@given(shape=shapes, seed=st.integers(0, 2**16))
def test_constant_log_decay_is_retention_with_gamma_powers(shape, seed):
    """log_decay = log gamma_h at every token: (Q K^T ⊙ D) V with D[n, m] = gamma_h^(n - m), n >= m."""
    q, k, v, _ = inputs(*shape, seed=seed)
    B, H, T, _ = q.shape
    gamma = torch.linspace(0.5, 0.99, H, dtype=torch.float64)
    n = torch.arange(T, dtype=torch.float64)
    D = (gamma[:, None, None] ** (n[:, None] - n[None, :])).tril()  # float exponents keep float64
    want = ((q @ k.transpose(-2, -1)) * D) @ v
    log_decay = gamma.log()[None, :, None].expand(B, H, T)
    got = gated_retention(q, k, v, log_decay)
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("constant decay vs retention", got, want)


def test_zero_log_decay_is_causal_linear_attention():
    q, k, v, g = inputs(2, 2, 6, 3, 4)
    got = gated_retention(q, k, v, torch.zeros_like(g))
    want = ((q @ k.transpose(-2, -1)).tril()) @ v
    assert torch.allclose(got, want, rtol=0, atol=TOL), report("gamma = 1 vs linear attention", got, want)


@pytest.mark.parametrize("form", ["parallel", "recurrent", "chunkwise"])
@pytest.mark.parametrize("t", [0, 3, 6])
def test_gated_retention_is_causal_by_perturbation(form, t):
    """Changing q, k, v and the decay at position t leaves every output before t exactly unchanged."""
    fn = {"parallel": lambda *a: gated_retention(*a),
          "recurrent": lambda *a: gated_retention_recurrent(*a)[0],
          "chunkwise": lambda *a: gated_retention_chunkwise(*a, chunk_size=4)[0]}[form]
    q, k, v, g = inputs(1, 2, 7, 3, 3, seed=1)
    before = fn(q, k, v, g)
    q2, k2, v2, g2 = (x.clone() for x in (q, k, v, g))
    for x in (q2, k2, v2):
        x[:, :, t] += 10.0
    g2[:, :, t] = -5.0
    after = fn(q2, k2, v2, g2)
    assert torch.equal(after[:, :, :t], before[:, :, :t]), f"{form}: position {t} leaked into the past"
    assert not torch.allclose(after[:, :, t], before[:, :, t])


def test_gated_retention_gradients_match_between_forms():
    q, k, v, g = (x.requires_grad_() for x in inputs(1, 2, 7, 3, 2, seed=2))
    grads = []
    for fn in (lambda: gated_retention(q, k, v, g),
               lambda: gated_retention_chunkwise(q, k, v, g, chunk_size=3)[0]):
        grads.append(torch.autograd.grad(fn().square().sum(), (q, k, v, g)))
    for name, a, b in zip("qkvg", *grads):
        assert torch.allclose(a, b, rtol=0, atol=TOL), report(f"d/d{name}", a, b)


@pytest.mark.parametrize("fn", [gated_retention, gated_retention_recurrent,
                                lambda *a, **kw: gated_retention_chunkwise(*a, chunk_size=2, **kw)])
def test_gated_retention_rejects_bad_inputs(fn):
    q, k, v, g = inputs(1, 2, 5, 3, 4)
    with pytest.raises(ValueError, match="q, k"):
        fn(q, k[..., :2], v, g)
    with pytest.raises(ValueError, match="v:"):
        fn(q, k, v[:, :, :4], g)
    with pytest.raises(ValueError, match="log_decay"):
        fn(q, k, v, g[..., :4])
    bad = g.clone()
    bad[0, 1, 2] = 0.1
    with pytest.raises(ValueError, match="log_decay"):
        fn(q, k, v, bad)
    bad[0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="log_decay"):
        fn(q, k, v, bad)


def test_recurrent_forms_reject_bad_state_and_chunk_size():
    q, k, v, g = inputs(1, 2, 5, 3, 4)
    with pytest.raises(ValueError, match="state"):
        gated_retention_recurrent(q, k, v, g, state=torch.zeros(1, 2, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="state"):
        gated_retention_chunkwise(q, k, v, g, 2, state=torch.zeros(1, 2, 4, 3, dtype=torch.float64))
    for chunk_size in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match="chunk_size"):
            gated_retention_chunkwise(q, k, v, g, chunk_size)
