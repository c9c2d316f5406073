"""DeepNet / DeepNorm (reference/03): the constants table, LN(alpha x + G(x)) semantics, the beta init. float64."""

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.deepnet import DeepNorm, deepnet, deepnorm, deepnorm_bound, deepnorm_constants, deepnorm_init_
from nanomodels.transformer import MLP, PostNorm, Transformer, TransformerConfig

F64 = torch.float64


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def naive_layer_norm(x, weight, bias, eps=0.0):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, variance with 1/d (biased), written out."""
    mean = x.sum(-1, keepdim=True) / x.size(-1)
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.size(-1)
    return (x - mean) / torch.sqrt(var + eps) * weight + bias


def small_config(**kw):
    base = dict(vocab_size=40, block_size=16, n_layers=3, d_model=16, n_heads=2, d_ff=24)
    return TransformerConfig(**{**base, **kw})


# ---- constants --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, alpha, beta", [(6, 1.8612, 0.3799), (12, 2.2134, 0.3195), (18, 2.4495, 0.2887),
                                            (24, 2.6321, 0.2686), (100, 3.7606, 0.1880), (1000, 6.6874, 0.1057)])
def test_single_stack_constants_match_the_paper_table(n, alpha, beta):
    for side, kw in (("encoder", {"encoder_layers": n}), ("decoder", {"decoder_layers": n})):
        got = deepnorm_constants(**kw)
        assert set(got) == {side}, f"only the {side} side has layers, got keys {sorted(got)}"
        assert got[side] == pytest.approx((alpha, beta), abs=6e-5), f"{side}-only N={n}"


@pytest.mark.parametrize("n, m, enc, dec", [(6, 6, (1.4179, 0.4970), (2.0598, 0.3433)),
                                            (12, 12, (1.7609, 0.4002), (2.4495, 0.2887)),
                                            (100, 100, (3.4157, 0.2063), (4.1618, 0.1699))])
def test_encoder_decoder_constants_match_the_paper_table(n, m, enc, dec):
    got = deepnorm_constants(encoder_layers=n, decoder_layers=m)
    assert set(got) == {"encoder", "decoder"}
    assert got["encoder"] == pytest.approx(enc, abs=6e-5), "encoder side: 0.81 (N^4 M)^(1/16), 0.87 (N^4 M)^(-1/16)"
    assert got["decoder"] == pytest.approx(dec, abs=6e-5), "decoder side: (3M)^(1/4), (12M)^(-1/4)"


def test_encoder_decoder_constants_use_n_and_m_in_their_places():
    got = deepnorm_constants(encoder_layers=3, decoder_layers=50)
    assert got["encoder"] == pytest.approx((0.81 * (3 ** 4 * 50) ** (1 / 16), 0.87 * (3 ** 4 * 50) ** (-1 / 16)),
                                           rel=1e-12)
    assert got["decoder"] == pytest.approx(((3 * 50) ** 0.25, (12 * 50) ** -0.25), rel=1e-12)


@given(st.integers(1, 10_000))
def test_update_bound_2n_2beta2_over_alpha2_is_exactly_one(n):
    alpha, beta = deepnorm_constants(decoder_layers=n)["decoder"]
    assert abs(deepnorm_bound(n, alpha, beta) - 1.0) < 1e-12, f"N={n}: 2N * 2 beta^2 / alpha^2 != 1"
    assert abs(2 * n * 2 * beta ** 2 / alpha ** 2 - 1.0) < 1e-12


@pytest.mark.parametrize("kw, match", [({}, "both are 0"), ({"encoder_layers": -1}, "encoder_layers"),
                                       ({"decoder_layers": -2}, "decoder_layers"),
                                       ({"decoder_layers": 2.0}, "decoder_layers"),
                                       ({"encoder_layers": True}, "encoder_layers")])
def test_bad_layer_counts_raise_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        deepnorm_constants(**kw)


# ---- the residual ------------------------------------------------------------------------------------------

def _part(seed, d=8, n_layers=5):
    part = DeepNorm(small_config(d_model=d, n_heads=2, n_layers=n_layers))
    part.norm.eps = 0.0  # LN(alpha x) == LN(x) holds exactly only without eps
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        part.norm.weight.copy_(torch.randn(d, generator=g))
        part.norm.bias.copy_(torch.randn(d, generator=g))
    return part, g


@given(st.integers(0, 2 ** 16), st.integers(1, 200))
def test_deepnorm_branch_zero_gives_layernorm_of_input(seed, n_layers):
    part, g = _part(seed, n_layers=n_layers)
    x = torch.randn(2, 3, 8, generator=g) * 3
    out = part(x, lambda h: torch.zeros_like(h))
    ref = naive_layer_norm(x, part.norm.weight, part.norm.bias)
    assert (out - ref).abs().max() < 1e-10, "branch = 0 must give LN(alpha x) = LN(x)"


@given(st.integers(0, 2 ** 16), st.integers(1, 200))
def test_deepnorm_known_branch_gives_layernorm_of_alpha_x_plus_g(seed, n_layers):
    part, gen = _part(seed, n_layers=n_layers)
    x, g = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 3, 8, generator=gen)
    seen = []
    out = part(x, lambda h: seen.append(h) or g)
    alpha = (2 * n_layers) ** 0.25
    assert torch.equal(seen[0], x), "the sublayer reads the residual stream x itself (Post-LN: no norm before it)"
    ref = naive_layer_norm(alpha * x + g, part.norm.weight, part.norm.bias)
    wrong = naive_layer_norm(x + alpha * g, part.norm.weight, part.norm.bias)
    diff = (out - ref).abs().max()
    hint = " (alpha is on the branch)" if (out - wrong).abs().max() < 1e-10 else ""
    assert diff < 1e-10, f"DeepNorm must return LN(alpha x + g), max |diff| {diff:.3g}{hint}"


def test_deepnorm_function_is_norm_of_alpha_x_plus_g():
    x, g = torch.randn(4, 8), torch.randn(4, 8)
    out = deepnorm(x, g, 2.5, lambda h: h)
    assert torch.allclose(out, 2.5 * x + g, atol=1e-12, rtol=0)


def test_block_is_two_post_norm_sublayers_with_alpha():
    torch.manual_seed(0)
    model = deepnet(small_config(n_layers=4))
    block = model.blocks[1]
    x = torch.randn(2, 5, 16)
    alpha = (2 * 4) ** 0.25
    h = block.attn_residual.norm(alpha * x + block.attn(x, None, True))
    ref = block.ffn_residual.norm(alpha * h + block.ffn(h))
    assert (block(x, None, True) - ref).abs().max() < 1e-12
    assert block.attn_residual.alpha == pytest.approx(alpha, rel=1e-15)
    assert isinstance(model.final_norm, nn.Identity), "DeepNorm is Post-LN: no final LayerNorm"


# ---- the init ----------------------------------------------------------------------------------------------

def _xavier_std(w, gain=1.0):
    fan_out, fan_in = w.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


@pytest.mark.parametrize("beta", [0.3, 0.7])
def test_beta_init_scales_v_out_fc1_fc2_and_leaves_q_k_at_xavier(beta):
    torch.manual_seed(0)
    model = Transformer(small_config(n_layers=2, d_model=128, n_heads=4, d_ff=256), residual=PostNorm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deepnorm_init_(model, beta)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if leaf in ("v_proj", "out_proj", "fc1", "fc2", "q_proj", "k_proj"):
            gain = beta if leaf in ("v_proj", "out_proj", "fc1", "fc2") else 1.0
            std, want = p.std().item(), _xavier_std(p, gain)
            assert abs(std / want - 1) < 0.03, f"{name}: std {std:.4g}, xavier normal with gain {gain} gives {want:.4g}"
            assert abs(p.mean().item()) < 4 * want / math.sqrt(p.numel()), f"{name}: mean should be 0"
        else:
            assert torch.equal(p, before[name]), f"{name} must be left untouched by the DeepNorm init"


def test_beta_init_leaves_embeddings_head_norms_and_biases_untouched():
    torch.manual_seed(1)
    model = Transformer(small_config(), residual=DeepNorm)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    deepnorm_init_(model, 0.5)
    untouched = [k for k in before if not any(f"{m}.weight" in k for m in
                                              ("v_proj", "out_proj", "fc1", "fc2", "q_proj", "k_proj"))]
    assert {"wte.weight", "wpe.weight", "head.proj.weight"} <= set(untouched)
    for k in untouched:
        assert torch.equal(model.state_dict()[k], before[k]), f"{k} changed"


def test_deepnet_uses_the_decoder_only_beta():
    torch.manual_seed(0)
    model = deepnet(small_config(n_layers=30, d_model=64, n_heads=2, d_ff=128))
    beta = (8 * 30) ** -0.25
    w = torch.cat([b.ffn.fc1.weight.flatten() for b in model.blocks])
    assert abs(w.std().item() / _xavier_std(model.blocks[0].ffn.fc1.weight, beta) - 1) < 0.02


def test_init_rejects_a_non_positive_beta():
    with pytest.raises(ValueError, match="beta"):
        deepnorm_init_(MLP(small_config()), 0.0)
