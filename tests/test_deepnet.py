"""DeepNet / DeepNorm (reference/03). The invariants of the constants, the residual and the beta init are the graded
checks of chapter 04 (exercises/grading/checks/ch04_deepnet.py), run here against the library; this file adds what the
grader does not check: bad input, the DeepNorm part and block inside the core Transformer, `deepnet` itself. float64."""

import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from exercises.grading.checks.common import F64, naive_layer_norm, xavier_std
from nanomodels.deepnet import DeepNorm, deepnet, deepnorm_bound, deepnorm_constants, deepnorm_init_
from nanomodels.transformer import MLP, TransformerConfig

CHAPTER = "04"  # tests/conftest.py runs its graded checks as `graded_check`


pytestmark = pytest.mark.usefixtures("float64_default")  # tests/conftest.py


def small_config(**kw):
    base = dict(vocab_size=40, block_size=16, n_layers=3, d_model=16, n_heads=2, d_ff=24)
    return TransformerConfig(**{**base, **kw})


def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


@pytest.mark.parametrize("n", [1, 6, 1000])
def test_deepnorm_bound_is_one_for_the_paper_constants(n):
    alpha, beta = deepnorm_constants(decoder_layers=n)["decoder"]
    assert abs(deepnorm_bound(n, alpha, beta) - 1.0) < 1e-12, f"N={n}: 2N * 2 beta^2 / alpha^2 != 1"


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
def test_deepnorm_part_feeds_the_stream_to_the_sublayer_and_uses_alpha_of_its_depth(seed, n_layers):
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

def test_deepnet_uses_the_decoder_only_beta():
    torch.manual_seed(0)
    model = deepnet(small_config(n_layers=30, d_model=64, n_heads=2, d_ff=128))
    beta = (8 * 30) ** -0.25
    w = torch.cat([b.ffn.fc1.weight.flatten() for b in model.blocks])
    assert abs(w.std().item() / xavier_std(model.blocks[0].ffn.fc1.weight, beta) - 1) < 0.02


def test_init_rejects_a_non_positive_beta():
    with pytest.raises(ValueError, match="beta"):
        deepnorm_init_(MLP(small_config()), 0.0)


def test_post_ln_of_the_same_depth_fails_the_graded_training_run():
    """Exercise 4.4's run (24 layers, no warmup) separates DeepNet from Post-LN: the check rejects Post-LN."""
    from exercises.grading.checking import Violation
    from exercises.grading.checks.ch04_deepnet import a_deep_model_trains
    from nanomodels.transformer import PostNorm, Transformer

    torch.set_num_threads(1)
    with pytest.raises(Violation, match="does not train"):
        a_deep_model_trains.body(lambda config: deepnorm_init_(Transformer(config, residual=PostNorm,
                                                                           final_norm=None), 1.0))
