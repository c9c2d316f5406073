"""Sub-LN / Magneto (reference/04). The invariants of gamma, the Sub-LN feed-forward and the gamma init are the graded
checks of chapter 05 (exercises/grading/checks/ch05_subln_magneto.py), run here against the library; this file adds what
the grader does not check: bad input, where the inner norms sit in the parts, scale invariance, the reduction to
Pre-LN, `magneto` itself. float64."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.attention import attention
from exercises.grading.checks.common import F64, naive_layer_norm, xavier_std
from nanomodels.subln import SubLNAttention, SubLNMLP, magneto, subln_gamma, subln_init_
from nanomodels.transformer import MLP, PreNorm, Transformer, TransformerConfig

CHAPTER = "05"  # tests/conftest.py runs its graded checks as `graded_check`


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


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


# ---- gamma, the feed-forward, the init: the graded checks -------------------------------------------------------------------------------------------------

def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


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

def test_magneto_uses_sqrt_log_2n():
    torch.manual_seed(0)
    model = magneto(small_config(n_layers=12, d_model=64, n_heads=2, d_ff=128))
    w = torch.cat([b.attn.v_proj.weight.flatten() for b in model.blocks])
    gamma = math.sqrt(math.log(24))
    assert abs(w.std().item() / xavier_std(model.blocks[0].attn.v_proj.weight, gamma) - 1) < 0.02


def test_init_rejects_a_non_positive_gamma():
    with pytest.raises(ValueError, match="gamma"):
        subln_init_(MLP(small_config()), -1.0)
