"""Sub-LN / Magneto (reference/04): gamma, where the inner norms sit, scale invariance, reduction to Pre-LN. float64."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.attention import attention
from nanomodels.subln import SubLNAttention, SubLNMLP, magneto, subln_ffn, subln_gamma, subln_init_
from nanomodels.transformer import MLP, PreNorm, Transformer, TransformerConfig

F64 = torch.float64
SCALED = ("v_proj", "out_proj", "fc1", "fc2")


@pytest.fixture(autouse=True)
def float64_default():
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)
    yield
    torch.set_default_dtype(old)


def naive_layer_norm(x, weight=None, bias=None, eps=0.0):
    mean = x.sum(-1, keepdim=True) / x.size(-1)
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.size(-1)
    y = (x - mean) / torch.sqrt(var + eps)
    return y * (1 if weight is None else weight) + (0 if bias is None else bias)


def small_config(**kw):
    base = dict(vocab_size=40, block_size=16, n_layers=3, d_model=16, n_heads=2, d_ff=24)
    return TransformerConfig(**{**base, **kw})


def _randomize_norms(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = 0.0
                m.weight.copy_(torch.randn(m.weight.shape, generator=g))
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g))


# ---- gamma -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, gamma", [(6, 1.5764), (12, 1.7827), (24, 1.9675)])
def test_single_stack_gamma_matches_the_table(n, gamma):
    assert subln_gamma(encoder_layers=n) == {"encoder": pytest.approx(gamma, abs=6e-5)}
    assert subln_gamma(decoder_layers=n) == {"decoder": pytest.approx(gamma, abs=6e-5)}


def test_encoder_decoder_gamma_matches_the_table():
    got = subln_gamma(encoder_layers=6, decoder_layers=6)
    assert got == {"encoder": pytest.approx(1.5473, abs=6e-5), "decoder": pytest.approx(1.7001, abs=6e-5)}
    got = subln_gamma(encoder_layers=4, decoder_layers=20)
    assert got["encoder"] == pytest.approx(math.sqrt(math.log(60) * math.log(8) / 3), rel=1e-12)
    assert got["decoder"] == pytest.approx(math.sqrt(math.log(60)), rel=1e-12)


@given(st.integers(2, 10_000))
def test_gamma_is_above_one_and_grows_with_depth(n):
    g1, g2 = subln_gamma(decoder_layers=n)["decoder"], subln_gamma(decoder_layers=n + 1)["decoder"]
    assert 1 < g1 < g2, "gamma = sqrt(log 2N) > 1 for N >= 2 (it multiplies the init) and grows with N"
    assert abs(g1 ** 2 - math.log(2 * n)) < 1e-12


@pytest.mark.parametrize("kw, match", [({}, "both are 0"), ({"encoder_layers": -3}, "encoder_layers"),
                                       ({"decoder_layers": 1.5}, "decoder_layers")])
def test_bad_layer_counts_raise_naming_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        subln_gamma(**kw)


# ---- structure ---------------------------------------------------------------------------------------------

def test_each_block_has_one_pre_norm_and_one_inner_norm_per_sublayer():
    cfg = small_config()
    model = magneto(cfg)
    for block in model.blocks:
        assert isinstance(block.attn_residual, PreNorm) and isinstance(block.ffn_residual, PreNorm)
        assert block.attn_residual.norm.normalized_shape == (cfg.d_model,)
        assert block.attn.inner_norm.normalized_shape == (cfg.d_model,), "attention inner LN is over d"
        assert block.ffn_residual.norm.normalized_shape == (cfg.d_model,)
        assert block.ffn.inner_norm.normalized_shape == (cfg.d_ff,), "feed-forward inner LN is over d_ff"
        assert sum(isinstance(m, nn.LayerNorm) for m in block.modules()) == 4
    assert isinstance(model.final_norm, nn.LayerNorm), "Sub-LN keeps Pre-LN's final LayerNorm"


@given(st.integers(0, 2 ** 16))
def test_attention_inner_norm_sits_between_attention_and_out_proj(seed):
    torch.manual_seed(seed)
    attn = SubLNAttention(small_config(), attn_fn=attention)
    _randomize_norms(attn, seed)
    x = torch.randn(2, 5, 16)
    y = attn.attend(x, None, True)
    ref = naive_layer_norm(y, attn.inner_norm.weight, attn.inner_norm.bias) @ attn.out_proj.weight.T + attn.out_proj.bias
    assert (attn(x, None, True) - ref).abs().max() < 1e-10, "out = W^O LN(Attention(Q, K, V))"


@given(st.integers(0, 2 ** 16))
def test_feed_forward_is_w2_layernorm_over_dff_of_gelu_w1(seed):
    torch.manual_seed(seed)
    ffn = SubLNMLP(small_config())
    _randomize_norms(ffn, seed)
    x = torch.randn(2, 5, 16)
    h = F.gelu(x @ ffn.fc1.weight.T + ffn.fc1.bias)
    ref = naive_layer_norm(h, ffn.inner_norm.weight, ffn.inner_norm.bias) @ ffn.fc2.weight.T + ffn.fc2.bias
    assert (ffn(x) - ref).abs().max() < 1e-10, "FFN(x) = W2 LN(GELU(W1 x)), the inner LN over d_ff"
    assert (subln_ffn(x, ffn.fc1, ffn.inner_norm, ffn.fc2) - ref).abs().max() < 1e-10


# ---- scale invariance --------------------------------------------------------------------------------------

@given(st.integers(0, 2 ** 16), st.floats(0.05, 20.0))
def test_attention_sublayer_is_invariant_to_scaling_a_bias_free_v_proj(seed, c):
    torch.manual_seed(seed)
    attn = SubLNAttention(small_config(bias=False), attn_fn=attention)
    attn.inner_norm.eps = 0.0
    x = torch.randn(2, 5, 16)
    base = attn(x, None, True)
    base.square().sum().backward()
    grad = attn.v_proj.weight.grad.clone()
    attn.zero_grad()
    with torch.no_grad():
        attn.v_proj.weight.mul_(c)
    out = attn(x, None, True)
    out.square().sum().backward()
    assert (out - base).abs().max() < 1e-9 * max(1.0, base.abs().max().item()), "the inner LN cancels W^V's scale"
    assert (attn.v_proj.weight.grad * c - grad).abs().max() < 1e-8 * max(1.0, grad.abs().max().item()), \
        "dL/dW^V scales by 1/c"


def test_scaling_only_the_weight_of_a_biased_v_proj_breaks_the_invariance():
    torch.manual_seed(0)
    attn = SubLNAttention(small_config(), attn_fn=attention)
    attn.inner_norm.eps = 0.0
    with torch.no_grad():
        attn.v_proj.bias.normal_()
    x = torch.randn(2, 5, 16)
    base = attn(x, None, True)
    with torch.no_grad():
        attn.v_proj.weight.mul_(3.0)
    assert (attn(x, None, True) - base).abs().max() > 1e-3


# ---- reduction to Pre-LN -----------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_identity_inner_norms_and_gamma_one_give_exactly_pre_ln(seed):
    cfg = small_config()
    torch.manual_seed(seed)
    sub = subln_init_(Transformer(cfg, attention=SubLNAttention, ffn=SubLNMLP), 1.0)
    torch.manual_seed(seed)
    pre = subln_init_(Transformer(cfg), 1.0)
    for block in sub.blocks:
        block.attn.inner_norm, block.ffn.inner_norm = nn.Identity(), nn.Identity()
    assert sub.state_dict().keys() == pre.state_dict().keys()
    for k, v in pre.state_dict().items():
        assert torch.equal(sub.state_dict()[k], v), f"{k}: same seed, gamma = 1 must give the same weights"
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    assert torch.equal(sub(idx)[0], pre(idx)[0]), "without inner norms Sub-LN is bit-identical to Pre-LN"


# ---- the init ----------------------------------------------------------------------------------------------

def _xavier_std(w, gain=1.0):
    fan_out, fan_in = w.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


def test_gamma_init_multiplies_v_out_fc1_fc2_and_leaves_the_rest():
    torch.manual_seed(0)
    cfg = small_config(n_layers=2, d_model=128, n_heads=4, d_ff=256)
    model = Transformer(cfg, attention=SubLNAttention, ffn=SubLNMLP)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gamma = 1.9
    subln_init_(model, gamma)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if leaf in SCALED + ("q_proj", "k_proj"):
            gain = gamma if leaf in SCALED else 1.0
            std, want = p.std().item(), _xavier_std(p, gain)
            assert abs(std / want - 1) < 0.03, f"{name}: std {std:.4g}, want xavier x {gain} = {want:.4g}"
        else:
            assert torch.equal(p, before[name]), f"{name} must be left untouched"


def test_magneto_uses_sqrt_log_2n():
    torch.manual_seed(0)
    model = magneto(small_config(n_layers=12, d_model=64, n_heads=2, d_ff=128))
    w = torch.cat([b.attn.v_proj.weight.flatten() for b in model.blocks])
    gamma = math.sqrt(math.log(24))
    assert abs(w.std().item() / _xavier_std(model.blocks[0].attn.v_proj.weight, gamma) - 1) < 0.02


def test_init_rejects_a_non_positive_gamma():
    with pytest.raises(ValueError, match="gamma"):
        subln_init_(MLP(small_config()), -1.0)
