"""BitLinear (BitNet b1.58): the quantizers, the STE layer, the integer inference path and the 2-bit packing,
against naive oracles written out below in Python floats (float64 everywhere an exact check is possible)."""

import functools
import io
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomodels.bitlinear import (BitLinear, BitNetResidual, TernaryLinear, activation_quant, pack_ternary,
                                  quantize_activation, quantize_weight, rms_norm, ternary_matmul_reference,
                                  to_ternary, unpack_ternary, weight_quant, weight_quant_binary)
from nanomodels.train import FunctionTask, fit
from nanomodels.transformer import Transformer, TransformerConfig

F64 = torch.float64
CHAPTER = "08"  # tests/conftest.py runs its graded checks as `graded_check`
SETTINGS = settings(deadline=None, max_examples=25)


def randn(*shape, seed=0, dtype=F64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def assert_close(actual, expected, what, atol=1e-10):
    diff = (actual.double() - expected.double()).abs()
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol})"


# ------------------------------------------------------------------------------------------------ oracles

def naive_weight_quant(w):
    """FAQ: scale = 1 / max(mean|w|, 1e-5); u = clamp(round(w * scale), -1, 1) / scale, element by element."""
    flat = [float(v) for v in w.flatten()]
    scale = 1.0 / max(sum(abs(v) for v in flat) / len(flat), 1e-5)
    return torch.tensor([min(1.0, max(-1.0, round(v * scale))) / scale for v in flat], dtype=F64).view(w.shape)


def naive_activation_quant(x):
    """FAQ: per row, scale = 127 / max(max|x|, 1e-5); y = clamp(round(x * scale), -128, 127) / scale."""
    rows = x.reshape(-1, x.size(-1))
    out = []
    for row in rows.tolist():
        scale = 127.0 / max(max(abs(v) for v in row), 1e-5)
        out.append([min(127.0, max(-128.0, round(v * scale))) / scale for v in row])
    return torch.tensor(out, dtype=F64).view(x.shape)


def naive_rms_norm(x, g, eps):
    rows = x.reshape(-1, x.size(-1)).tolist()
    out = [[v / math.sqrt(sum(u * u for u in row) / len(row) + eps) * float(gj) for v, gj in zip(row, g)]
           for row in rows]
    return torch.tensor(out, dtype=F64).view(x.shape)


def naive_bitlinear(x, w, g, eps, bias=None):
    """y_i = sum_j aq(RMSNorm(x))_j wq(W)_ij (+ b_i), as plain sums."""
    xq, wq = naive_activation_quant(naive_rms_norm(x, g, eps)), naive_weight_quant(w)
    rows = xq.reshape(-1, xq.size(-1)).tolist()
    out = [[sum(a * b for a, b in zip(row, wrow)) + (0.0 if bias is None else float(bias[i]))
            for i, wrow in enumerate(wq.tolist())] for row in rows]
    return torch.tensor(out, dtype=F64).view(*x.shape[:-1], w.size(0))


shapes = st.tuples(st.integers(1, 6), st.integers(1, 40))
scales = st.floats(1e-3, 1e3)
seeds = st.integers(0, 2 ** 16)


# ------------------------------------------------------------------------------------------------ quantizers

def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


@SETTINGS
@given(shapes, scales, seeds)
def test_weight_quant_matches_the_faq_equation_and_is_ternary_times_mean_abs(shape, c, seed):
    w = randn(*shape, seed=seed) * c
    wq = weight_quant(w)
    assert_close(wq, naive_weight_quant(w), "weight_quant vs the FAQ equation", 1e-12 * c)
    ratio = wq / w.abs().mean()
    nearest = ratio.round()
    assert_close(ratio, nearest, "weight_quant(W) / mean|W| must be an integer", 1e-12)
    assert set(nearest.unique().tolist()) <= {-1.0, 0.0, 1.0}, f"codes outside {{-1, 0, 1}}: {nearest.unique()}"


def test_gaussian_weights_have_zero_fraction_0_31():
    w = randn(1024, 1024, seed=1)
    zeros = (weight_quant(w) == 0).double().mean().item()
    expected = math.erf(0.5 / math.sqrt(math.pi))  # P(|z| < mean|z| / 2), mean|z| = sqrt(2 / pi)
    assert abs(expected - 0.3101) < 1e-4
    assert abs(zeros - expected) < 0.005, f"zero fraction {zeros:.4f}, expected {expected:.4f} for Gaussian W"


@SETTINGS
@given(shapes, scales, seeds)
def test_activation_quant_matches_the_faq_equation_per_token(shape, c, seed):
    x = randn(*shape, seed=seed) * c
    assert_close(activation_quant(x), naive_activation_quant(x), "activation_quant vs the FAQ equation", 1e-12 * c)


@SETTINGS
@given(st.integers(1, 5), st.integers(2, 60), scales, seeds)
def test_activation_codes_are_integers_in_127_and_the_row_absmax_is_kept(rows, cols, c, seed):
    x = randn(rows, cols, seed=seed) * c
    scale = 127.0 / x.abs().amax(-1, keepdim=True)
    codes = activation_quant(x) * scale
    assert_close(codes, codes.round(), "x_q * scale must be an integer", 1e-9)
    assert codes.round().abs().max() <= 127, "-128 is never reached by absmax quantization"
    assert_close(activation_quant(x).abs().amax(-1), x.abs().amax(-1), "row absmax preserved", 1e-12 * c)
    assert ((activation_quant(x) - x).abs() <= 0.5 / scale * (1 + 1e-12)).all(), "error must be <= 0.5 / scale"


def test_activation_scale_is_per_token_and_weight_scale_per_tensor():
    x = torch.tensor([[1.0, 0.5], [100.0, 50.0]], dtype=F64)  # row 1 is row 0 times 100
    assert_close(activation_quant(x)[1], 100 * activation_quant(x)[0], "rows are quantized independently")
    w = torch.tensor([[1.0, 0.1], [100.0, 10.0]], dtype=F64)  # one per-tensor mean|W| = 27.775
    assert weight_quant(w)[0].abs().max() == 0.0, "small rows of W vanish under one per-tensor scale"


@SETTINGS
@given(shapes, st.floats(1e-2, 1e2), seeds)
def test_both_quantizers_are_positively_homogeneous(shape, c, seed):
    w, x = randn(*shape, seed=seed), randn(*shape, seed=seed + 1)
    assert_close(weight_quant(c * w), c * weight_quant(w), "wq(cW) = c wq(W)", 1e-12 * c)
    assert_close(activation_quant(c * x), c * activation_quant(x), "aq(cx) = c aq(x)", 1e-12 * c)


@SETTINGS
@given(st.integers(2, 50), st.integers(2, 50), seeds)
def test_requantizing_keeps_the_codes_and_shrinks_by_the_nonzero_fraction(n, k, seed):
    w = randn(n, k, seed=seed)
    once = weight_quant(w)
    p = (once != 0).double().mean()
    assert torch.equal(once.sign(), weight_quant(once).sign()), "signs must survive re-quantization"
    assert_close(weight_quant(once), p * once, "wq(wq(W)) = p wq(W), p = non-zero fraction", 1e-12)


def test_binary_variant_is_sign_of_centered_weights_times_mean_abs():
    w = randn(7, 9, seed=3) + 0.3
    m, e = w.abs().mean().item(), w.mean().item()
    expected = torch.tensor([[math.copysign(m, v - e) for v in row] for row in w.tolist()], dtype=F64)
    assert_close(weight_quant_binary(w), expected, "b1: sign(W - mean W) mean|W|", 1e-12)


# ------------------------------------------------------------------------------------------------ BitLinear

def make_bitlinear(k, n, seed, bias=False, binary=False, eps=1e-5):
    torch.manual_seed(seed)
    layer = BitLinear(k, n, bias=bias, eps=eps, binary=binary, dtype=F64)
    with torch.no_grad():
        layer.norm_weight.copy_(1 + 0.3 * randn(k, seed=seed + 7))
        if bias:
            layer.bias.copy_(randn(n, seed=seed + 8))
    return layer


@SETTINGS
@given(st.integers(1, 24), st.integers(1, 12), st.booleans(), seeds)
def test_bitlinear_forward_matches_the_written_out_layer(k, n, bias, seed):
    layer = make_bitlinear(k, n, seed, bias=bias)
    x = randn(2, 3, k, seed=seed + 1)
    expected = naive_bitlinear(x, layer.weight.detach(), layer.norm_weight.detach(), 1e-5,
                               layer.bias.detach() if bias else None)
    assert_close(layer(x), expected, "BitLinear vs aq(RMSNorm(x)) wq(W)^T", 1e-10)


@SETTINGS
@given(st.integers(2, 24), st.integers(1, 12), st.floats(1e-3, 1e3), seeds)
def test_bitlinear_without_eps_is_invariant_to_the_input_scale(k, n, c, seed):
    layer = make_bitlinear(k, n, seed, eps=0.0)
    x = randn(4, k, seed=seed + 1)
    assert_close(layer(c * x), layer(x), "BitLinear(cx) = BitLinear(x) (RMSNorm, eps = 0)", 1e-10)


def test_straight_through_gradients_reach_the_latent_weights_and_the_input():
    layer = make_bitlinear(16, 8, seed=4)
    x = randn(5, 16, seed=5).requires_grad_()
    gy = randn(5, 8, seed=6)
    layer(x).backward(gy)
    xq = activation_quant(rms_norm(x.detach(), layer.norm_weight.detach(), layer.eps))
    assert_close(layer.weight.grad, gy.T @ xq, "dL/dW (latent) = g_y^T x_q = dL/dW_q")
    # the gradient w.r.t. x flows through RMSNorm as if both quantizers were the identity on the backward
    x2, g2 = x.detach().clone().requires_grad_(), layer.norm_weight.detach().clone().requires_grad_()
    torch.nn.functional.linear(rms_norm(x2, g2, layer.eps), weight_quant(layer.weight.detach())).backward(gy)
    assert_close(x.grad, x2.grad, "dL/dx through RMSNorm with an identity STE")
    assert_close(layer.norm_weight.grad, g2.grad, "dL/d(norm gain)")


def test_bad_arguments_raise_early():
    with pytest.raises(TypeError, match="w:"):
        weight_quant(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="x:"):
        activation_quant(torch.zeros(3, 0))
    with pytest.raises(ValueError, match="in_features"):
        BitLinear(0, 3)
    with pytest.raises(ValueError, match="eps"):
        BitLinear(3, 3, eps=-1.0)
    with pytest.raises(ValueError, match="last dimension"):
        BitLinear(3, 2)(torch.randn(2, 4))
    with pytest.raises(ValueError, match="codes"):
        pack_ternary(torch.tensor([[2, 0]]))
    with pytest.raises(ValueError, match="K:"):
        unpack_ternary(torch.zeros(2, 3, dtype=torch.uint8), 13)
    with pytest.raises(TypeError, match="layer"):
        TernaryLinear.from_bitlinear(nn.Linear(3, 3))


# ------------------------------------------------------------------------------------------------ packing, inference

def test_packing_layout_is_four_codes_per_byte_little_endian():
    codes = torch.tensor([[-1, 0, 1, 1, 1]], dtype=torch.int8)  # codes + 1 = 0, 1, 2, 2 | 2, pad 1, 1, 1
    packed = pack_ternary(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (1, 2)
    assert packed.tolist() == [[0 | 1 << 2 | 2 << 4 | 2 << 6, 2 | 1 << 2 | 1 << 4 | 1 << 6]]


@SETTINGS
@given(st.integers(1, 9), st.integers(1, 70), seeds)
def test_pack_unpack_round_trip_is_exact(n, k, seed):
    codes = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    assert torch.equal(unpack_ternary(pack_ternary(codes), k), codes), "unpack(pack(codes)) != codes"


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 12), st.booleans(), st.booleans(), seeds)
def test_integer_path_equals_the_fake_quant_forward(k, n, bias, binary, seed):
    layer = make_bitlinear(k, n, seed, bias=bias, binary=binary)
    x = randn(3, 2, k, seed=seed + 1) * 5
    fast = TernaryLinear.from_bitlinear(layer)
    assert fast.packed.dtype == torch.uint8 and fast.packed.shape == (n, math.ceil(k / 4))
    assert_close(fast(x), layer(x), "X_int8 W_tern^T / s_x / s_W vs F.linear(aq(x), wq(W))", 1e-10)


def test_integer_matmul_is_exact_against_int64_sums():
    g = torch.Generator().manual_seed(9)
    x = torch.randint(-127, 128, (3, 37), generator=g, dtype=torch.int8)
    w = torch.randint(-1, 2, (5, 37), generator=g, dtype=torch.int8)
    expected = [[sum(int(a) * int(b) for a, b in zip(xr, wr)) for wr in w.tolist()] for xr in x.tolist()]
    got = ternary_matmul_reference(x, pack_ternary(w), 37)
    assert got.dtype == torch.int32 and got.tolist() == expected
    codes, scale = quantize_activation(randn(4, 37, seed=2))
    assert codes.dtype == torch.int8 and codes.abs().max() == 127 and scale.shape == (4, 1)
    wc, ws = quantize_weight(randn(5, 37, seed=3))
    assert wc.dtype == torch.int8 and ws.dim() == 0


def tiny_config(**kw):
    return TransformerConfig(**{**dict(vocab_size=32, block_size=16, n_layers=2, d_model=32, n_heads=4, bias=False,
                                       tie_weights=False), **kw})


def bitnet(config):
    """The body's linears are BitLinear; the head keeps nn.Linear (the core's head_linear)."""
    return Transformer(config, linear=BitLinear, residual=BitNetResidual)


def test_a_two_bit_checkpoint_loads_back_exactly_and_gives_the_same_logits():
    torch.manual_seed(0)
    model = bitnet(tiny_config()).double().eval()
    idx = torch.randint(0, 32, (2, 10))
    fake_quant_logits, _ = model(idx)
    to_ternary(model)
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    assert not any(isinstance(m, BitLinear) for m in model.modules())
    assert all(p.dtype == torch.uint8 for n, p in model.state_dict().items() if n.endswith("packed"))
    torch.manual_seed(1)
    fresh = to_ternary(bitnet(tiny_config()).double().eval())
    buffer.seek(0)
    fresh.load_state_dict(torch.load(buffer))
    logits, _ = fresh(idx)
    assert_close(logits, fake_quant_logits, "2-bit checkpoint logits vs the fake-quant model", 1e-9)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), f"{name} differs after the round trip"


def test_a_tiny_bitnet_trains_with_bitlinear_swapped_in_one_line():
    torch.manual_seed(0)
    model = bitnet(tiny_config())
    assert isinstance(model.blocks[0].ffn.fc1, BitLinear) and type(model.head.proj) is nn.Linear
    data = torch.arange(16).repeat(4, 2)[:, :17] % 32  # a fixed, learnable sequence
    losses = fit(model, FunctionTask(lambda step: (data[:, :-1], data[:, 1:])), 30,
                 optimizer=torch.optim.AdamW(model.parameters(), lr=3e-3))
    assert losses[-1] < 0.5 * losses[0], f"loss did not fall: {losses[0]:.3f} -> {losses[-1]:.3f}"


def test_ternary_linear_takes_a_custom_integer_gemm():
    layer = make_bitlinear(12, 5, seed=11)
    calls = []

    def gemm(x_codes, packed, k):
        calls.append((x_codes.shape, packed.shape, k))
        return ternary_matmul_reference(x_codes, packed, k)

    fast = TernaryLinear.from_bitlinear(layer, gemm=functools.partial(gemm))
    x = randn(2, 3, 12, seed=12)
    assert_close(fast(x), layer(x), "custom gemm")
    assert calls == [((6, 12), (5, 3), 12)]


def test_ternary_linear_names_a_shape_mismatch_instead_of_failing_inside():
    from nanomodels.bitlinear import pack_ternary, quantize_weight, ternary_linear

    codes, scale = quantize_weight(torch.randn(8, 12, dtype=torch.float64))
    packed = pack_ternary(codes)
    assert ternary_linear(torch.randn(3, 12, dtype=torch.float64), packed, scale, torch.ones(12)).shape == (3, 8)
    for x, norm in ((torch.randn(3, 10), torch.ones(12)), (torch.randn(3, 12), torch.ones(10)),
                    (torch.randn(3, 16), torch.ones(16))):
        with pytest.raises(ValueError, match=r"x, packed, norm_weight: need x \(\.\.\., K\)"):
            ternary_linear(x, packed, scale, norm)
