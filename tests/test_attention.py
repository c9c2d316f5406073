"""Property tests for nanomodels.attention, against a literal transcription of the equation, in float64."""

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.attention import MultiHeadAttention, as_4d_mask, attention, causal_mask, sdpa_attention
from nanomodels.transformer import TransformerConfig



@pytest.fixture(autouse=True, scope="module")
def float64_by_default():
    """Exact checks in float64; restored afterwards, so no other test module inherits the default."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def naive_attention(q, k, v, allowed):
    """Loop over every (batch, head, query): softmax over the visible keys only, zeros if none is visible."""
    B, H, Tq, D = q.shape
    out = torch.zeros(B, H, Tq, v.size(-1))
    allowed = allowed.expand(B, H, Tq, k.size(2))
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = allowed[b, h, i].nonzero().flatten()
                if len(keys) == 0:
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(D) for j in keys])
                w = torch.exp(s - s.max())
                w = w / w.sum()
                out[b, h, i] = sum(w[n] * v[b, h, j] for n, j in enumerate(keys))
    return out


def qkv(seed, B=2, H=2, Tq=5, Tk=5, D=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, Tq, D, generator=g), torch.randn(B, H, Tk, D, generator=g),
            torch.randn(B, H, Tk, D, generator=g))


def assert_close(a, b, what, atol=1e-10):
    diff = (a - b).abs()
    assert torch.allclose(a, b, atol=atol, rtol=0), f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"


@given(seed=st.integers(0, 10_000), tq=st.integers(1, 6), tk=st.integers(1, 6), d=st.sampled_from([1, 3, 8]),
       density=st.floats(0.0, 1.0))
def test_reference_matches_naive_formula_for_any_mask(seed, tq, tk, d, density):
    q, k, v = qkv(seed, Tq=tq, Tk=tk, D=d)
    g = torch.Generator().manual_seed(seed + 1)
    allowed = torch.rand(2, 1, tq, tk, generator=g) < density
    assert_close(attention(q, k, v, allowed), naive_attention(q, k, v, allowed), "attention vs naive oracle")


def test_no_mask_equals_all_true_mask_equals_plain_softmax():
    q, k, v = qkv(0)
    plain = torch.softmax(q @ k.transpose(-2, -1) / 2.0, dim=-1) @ v  # sqrt(D) = 2 for D = 4
    assert_close(attention(q, k, v), plain, "no mask vs softmax(QK^T/sqrt(d))V")
    assert_close(attention(q, k, v, torch.ones(5, 5, dtype=torch.bool)), plain, "all-True mask vs no mask")


def test_causal_mask_is_lower_triangle_including_diagonal():
    expected = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(3), expected)


def test_causal_mask_with_cache_puts_queries_at_the_end():
    # 2 new queries after 3 cached keys: they sit at positions 3 and 4
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)
    with pytest.raises(ValueError, match="n_keys"):
        causal_mask(3, 2)


def test_causal_output_at_t_unchanged_when_later_inputs_change():
    q, k, v = qkv(1, Tq=6, Tk=6)
    base = attention(q, k, v, causal=True)
    for t in range(5):
        k2, v2 = k.clone(), v.clone()
        k2[:, :, t + 1:] += 10.0
        v2[:, :, t + 1:] -= 10.0
        out = attention(q, k2, v2, causal=True)
        assert_close(out[:, :, : t + 1], base[:, :, : t + 1], f"rows <= {t} after perturbing keys > {t}")
        assert not torch.allclose(out[:, :, t + 1:], base[:, :, t + 1:]), "later rows must see the change"


def test_fully_masked_row_gives_zeros_and_finite_gradients():
    q, k, v = qkv(2)
    for t in (q, k, v):
        t.requires_grad_(True)
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[2] = False
    for fn in (attention, sdpa_attention):
        out = fn(q, k, v, allowed)
        assert torch.equal(out[:, :, 2], torch.zeros_like(out[:, :, 2])), f"{fn.__name__}: masked row not zero"
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v)), f"{fn.__name__}: NaN/inf gradient"
        assert torch.equal(q.grad[:, :, 2], torch.zeros_like(q.grad[:, :, 2])), "masked query got a gradient"
        q.grad = k.grad = v.grad = None


@pytest.mark.parametrize("case", ["none", "causal", "causal_cache", "mask", "mask_and_causal", "single_query"])
def test_sdpa_path_agrees_with_reference(case):
    tq = {"causal_cache": 3, "single_query": 1}.get(case, 7)
    q, k, v = qkv(3, Tq=tq, Tk=7)
    allowed = torch.rand(1, 1, tq, 7, generator=torch.Generator().manual_seed(4)) < 0.6 if "mask" in case else None
    causal = "causal" in case or case == "single_query"
    assert_close(sdpa_attention(q, k, v, allowed, causal=causal), attention(q, k, v, allowed, causal=causal),
                 f"sdpa vs reference ({case})")


def test_mask_shape_and_dtype_errors_name_the_argument():
    with pytest.raises(TypeError, match="allowed: must be a boolean"):
        as_4d_mask(torch.ones(3, 3), 3, 3)
    with pytest.raises(ValueError, match=r"allowed: expected shape .*\(3, 4\)"):
        as_4d_mask(torch.ones(3, 3, dtype=torch.bool), 3, 4)
    assert as_4d_mask(torch.ones(2, 3, 4, dtype=torch.bool), 3, 4).shape == (2, 1, 3, 4)


def test_multihead_attention_rejects_heads_not_dividing_width():
    with pytest.raises(ValueError, match="n_heads: must divide d_model"):
        TransformerConfig(d_model=10, n_heads=3)


def test_multihead_attention_with_cache_equals_full_sequence():
    torch.manual_seed(0)
    mha = MultiHeadAttention(TransformerConfig(vocab_size=8, d_model=16, n_heads=4), attn_fn=attention).eval()
    x = torch.randn(2, 6, 16)
    full = mha(x, causal=True)
    cache = {}
    steps = [mha(x[:, :3], causal=True, cache=cache)] + [mha(x[:, t:t + 1], causal=True, cache=cache)
                                                          for t in range(3, 6)]
    assert_close(torch.cat(steps, dim=1), full, "prefill + one-token steps vs full causal pass")


def test_multihead_attention_tap_sees_the_heads_and_changes_nothing():
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=8, d_model=16, n_heads=4)
    mha = MultiHeadAttention(config, attn_fn=sdpa_attention).eval()
    x, allowed = torch.randn(2, 6, 16), torch.rand(2, 6, 6) < 0.7
    plain = mha(x, allowed, causal=True)
    seen = []
    mha.tap = lambda q, k, v, mask, causal: seen.append((q, k, v, mask, causal))
    tapped = mha(x, allowed, causal=True)
    mha.tap = None
    assert torch.equal(tapped, plain), "the tap changed the output"
    (q, k, v, mask, causal), = seen
    assert torch.equal(q, mha.split_heads(mha.q_proj(x))) and q.shape == (2, 4, 6, 4)
    assert torch.equal(k, mha.split_heads(mha.k_proj(x))) and torch.equal(v, mha.split_heads(mha.v_proj(x)))
    assert torch.equal(mask, as_4d_mask(allowed, 6, 6)) and causal is True
