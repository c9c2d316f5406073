"""The fused (scaled residual +) LayerNorm / RMSNorm kernels (kernels/layernorm.py), in the tiers of tiers.py:
the reference against the written-out equation and torch's norms (float64), argument checks; the Triton
kernels under the interpreter (fp32 and fp16, odd widths, forward and backward against the float64 reference,
guard bands, DeepNorm drop-in); (-m gpu) bf16 / fp16 on the device. The compile tier is tests/kernels/test_compile.py.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from kernels.layernorm import (add_norm, add_norm_backward, add_norm_forward, add_norm_reference, deepnorm_add_norm,
                               layer_norm, rms_norm)
from tiers import SENTINEL, assert_close, given, needs_interpreter, randn, st


def naive_add_norm(x, g, w, b, alpha, eps, rms):
    """One row at a time in Python floats: h = alpha x + g, then (h - mean) / sqrt(var + eps) * w + b."""
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(x.size(0)):
        h = [alpha * float(x[i, j]) + (0.0 if g is None else float(g[i, j])) for j in range(x.size(1))]
        mean = 0.0 if rms else sum(h) / len(h)
        var = sum((v - mean) ** 2 for v in h) / len(h)
        for j, v in enumerate(h):
            out[i, j] = (v - mean) / math.sqrt(var + eps) * float(w[j]) + (0.0 if b is None else float(b[j]))
    return out



class TestReference:
    @given(st.integers(1, 5), st.integers(1, 40), st.floats(0.1, 8.0), st.booleans(), st.booleans(),
           st.integers(0, 2 ** 16))
    def test_reference_matches_the_written_out_equation(self, rows, cols, alpha, rms, with_g, seed):
        x = randn(rows, cols, seed=seed).double() * 3
        g = randn(rows, cols, seed=seed + 1).double() if with_g else None
        w, b = randn(cols, seed=seed + 2).double(), randn(cols, seed=seed + 3).double()
        ref = naive_add_norm(x, g, w, b, alpha, 1e-5, rms)
        assert_close(add_norm_reference(x, g, w, b, alpha=alpha, eps=1e-5, rms=rms), ref, "reference", 1e-10)

    def test_reference_agrees_with_torch_layer_norm_and_rms_norm(self):
        x, w, b = randn(6, 33, seed=1).double(), randn(33, seed=2).double(), randn(33, seed=3).double()
        assert_close(add_norm_reference(x, None, w, b), F.layer_norm(x, (33,), w, b, 1e-5), "LayerNorm", 1e-12)
        assert_close(add_norm_reference(x, None, w, rms=True), F.rms_norm(x, (33,), w, 1e-5), "RMSNorm", 1e-12)

    @pytest.mark.parametrize("call, match", [
        (lambda: add_norm(torch.randn(3, 4), None, torch.ones(5)), "weight"),
        (lambda: add_norm(torch.randn(3, 4), torch.randn(3, 5), torch.ones(4)), "g:"),
        (lambda: add_norm(torch.randn(3, 4), None, None), "weight"),
        (lambda: add_norm(torch.randn(3, 4).double(), None, torch.ones(4)), "dtype"),
        (lambda: add_norm(torch.randn(3, 0), None, torch.ones(0)), "last dimension"),
        (lambda: add_norm(torch.randn(3, 4), None, torch.ones(4, dtype=torch.float64)), "weight: dtype"),
        (lambda: add_norm(torch.empty(1, 8193, device="meta"), None, torch.ones(8193)), r"x: .*\[1, 8192\]"),
        (lambda: add_norm(torch.randn(3, 4), None, torch.ones(4), torch.ones(4).double()), "bias: dtype")])
    def test_bad_arguments_raise(self, call, match):
        with pytest.raises(ValueError, match=match):
            call()


ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}



def check_fwd_bwd(rows, cols, dtype, alpha, rms, with_g, with_bias, seed=0):
    x = randn(rows, cols, seed=seed, dtype=dtype) * 2
    g = randn(rows, cols, seed=seed + 1, dtype=dtype) if with_g else None
    w = randn(cols, seed=seed + 2, dtype=dtype)
    b = randn(cols, seed=seed + 3, dtype=dtype) if with_bias else None
    dy = randn(rows, cols, seed=seed + 4, dtype=dtype)
    leaves = [None if t is None else t.clone().requires_grad_() for t in (x, g, w, b)]
    y = add_norm(*leaves, alpha=alpha, rms=rms)
    y.backward(dy)
    ref = [None if t is None else t.double().requires_grad_() for t in (x, g, w, b)]
    ref_y = add_norm_reference(*ref, alpha=alpha, rms=rms)
    ref_y.backward(dy.double())
    what = f"{'RMS' if rms else 'Layer'}Norm {rows}x{cols} {dtype} alpha={alpha} g={with_g} bias={with_bias}"
    assert y.dtype == dtype
    atol = ATOL[dtype]
    assert_close(y, ref_y, f"{what}: y", atol)
    for name, t, r in zip(("dx", "dg", "dw", "db"), leaves, ref):
        if t is not None:
            scale = max(1.0, r.grad.abs().max().item())  # dw, db are sums over the rows
            assert_close(t.grad, r.grad, f"{what}: {name}", atol * scale)



@needs_interpreter
class TestInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
    @pytest.mark.parametrize("rows, cols", [(7, 37), (1, 1), (5, 128)])
    def test_forward_and_backward_match_the_reference(self, rows, cols, rms, dtype):
        check_fwd_bwd(rows, cols, dtype, alpha=2.6, rms=rms, with_g=True, with_bias=not rms)

    @pytest.mark.parametrize("with_g, with_bias", [(False, True), (True, False), (False, False)])
    def test_optional_residual_and_bias(self, with_g, with_bias):
        check_fwd_bwd(6, 50, torch.float32, alpha=1.0 if not with_g else 0.7, rms=False, with_g=with_g,
                      with_bias=with_bias, seed=3)

    def test_alpha_multiplies_x_not_g(self):
        x, g, w = randn(4, 24, seed=1), randn(4, 24, seed=2), torch.ones(24)
        y = add_norm(x, g, w, alpha=3.0)
        assert_close(y, F.layer_norm(3.0 * x + g, (24,), eps=1e-5), "LN(alpha x + g)", 2e-6)
        assert (y - F.layer_norm(x + 3.0 * g, (24,), eps=1e-5)).abs().max() > 0.1

    def test_plain_layer_norm_and_rms_norm_match_torch(self):
        x, w, b = randn(9, 70, seed=5), randn(70, seed=6), randn(70, seed=7)
        assert_close(layer_norm(x, w, b), F.layer_norm(x, (70,), w, b, 1e-5), "layer_norm", 2e-5)
        assert_close(rms_norm(x, w), F.rms_norm(x, (70,), w, 1e-5), "rms_norm", 2e-5)

    def test_takes_batched_and_strided_inputs(self):
        x = randn(2, 3, 40, seed=8)
        g = randn(40, 6, seed=9).t().reshape(2, 3, 40)
        w = randn(40, seed=10)
        assert_close(add_norm(x, g, w, alpha=1.5), add_norm_reference(x.double(), g.double(), w.double(), alpha=1.5),
                     "3-D input", 2e-5)
        xt = randn(40, 12, seed=11).t()  # a transposed (non-contiguous) view
        assert_close(layer_norm(xt, w), F.layer_norm(xt, (40,), w, eps=1e-5), "transposed input", 2e-5)

    @pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
    def test_strided_weight_and_bias_like_every_other_element(self, rms):
        x, g, dy = randn(6, 40, seed=40), randn(6, 40, seed=41), randn(6, 40, seed=42)
        w_base, b_base = randn(80, seed=43).requires_grad_(), randn(120, seed=44).requires_grad_()
        w, b = w_base[::2], b_base[::3]  # element strides 2 and 3
        add_norm(x, g, w, b, alpha=1.7, rms=rms).backward(dy)
        ref_w, ref_b = w_base.detach().double().requires_grad_(), b_base.detach().double().requires_grad_()
        expected = add_norm_reference(x.double(), g.double(), ref_w[::2], ref_b[::3], alpha=1.7, rms=rms)
        expected.backward(dy.double())
        y = add_norm(x, g, w.detach(), b.detach(), alpha=1.7, rms=rms)
        assert_close(y, expected, "y with weight w[::2] and bias b[::3]", 2e-5)
        assert_close(w_base.grad, ref_w.grad, "dw lands on every other element of the base", 2e-5)
        assert_close(b_base.grad, ref_b.grad, "db lands on every third element of the base", 2e-5)

    def test_a_half_precision_weight_with_float32_x_returns_float32(self):
        x, w, b = randn(5, 48, seed=13), randn(48, seed=14).half(), randn(48, seed=15).half()
        y = layer_norm(x, w, b)
        assert y.dtype == torch.float32
        assert_close(y, add_norm_reference(x.double(), None, w.double(), b.double()), "fp32 x, fp16 weight", 2e-5)

    def test_bfloat16_is_computed_in_float32_under_the_interpreter(self):
        x, w = randn(3, 64, seed=12).bfloat16(), torch.ones(64, dtype=torch.bfloat16)
        y = layer_norm(x, w)
        assert y.dtype == torch.bfloat16
        assert_close(y, F.layer_norm(x.double(), (64,), eps=1e-5), "bf16 LayerNorm", 2e-2)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    def test_forward_and_backward_write_nothing_outside_their_outputs(self, dtype):
        rows, cols = 5, 37
        x, g, w = randn(rows, cols, seed=13, dtype=dtype), randn(rows, cols, seed=14, dtype=dtype), randn(cols, seed=15)
        w, b = w.to(dtype), randn(cols, seed=16, dtype=dtype)
        for name in ("y", "dx"):
            buf = torch.full((rows + 3, cols + 19), SENTINEL, dtype=dtype)
            view = buf[1:rows + 1, 2:cols + 2]
            y, mean, rstd = add_norm_forward(x, g, w, b, alpha=2.0, out=view if name == "y" else None)
            if name == "dx":
                add_norm_backward(x, g, w, mean, rstd, torch.ones_like(x), alpha=2.0, dx=view, programs=2)
            band = torch.ones_like(buf, dtype=torch.bool)
            band[1:rows + 1, 2:cols + 2] = False
            assert (buf[band] == SENTINEL).all(), f"{name}: {int((buf[band] != SENTINEL).sum())} guard cells written"
            assert not (view == SENTINEL).any(), f"{name}: some output cells were not written"

    @pytest.mark.parametrize("programs", [1, 3, 7])
    def test_dw_partial_sums_do_not_depend_on_the_number_of_programs(self, programs):
        x, g, w, dy = randn(7, 20, seed=17), randn(7, 20, seed=18), randn(20, seed=19), randn(7, 20, seed=20)
        _, mean, rstd = add_norm_forward(x, g, w, None, alpha=1.3)
        _, _, dw, db = add_norm_backward(x, g, w, mean, rstd, dy, alpha=1.3, programs=programs)
        ref = [t.double().requires_grad_() for t in (x, g, w)]
        add_norm_reference(*ref, alpha=1.3).backward(dy.double())
        assert_close(dw, ref[2].grad, f"dw with {programs} programs", 2e-5)
        assert_close(db, dy.double().sum(0), f"db with {programs} programs", 2e-5)

    def test_drop_in_for_the_deepnorm_residual(self):
        from nanomodels.deepnet import DeepNorm, deepnorm
        from nanomodels.transformer import TransformerConfig

        part = DeepNorm(TransformerConfig(n_layers=12, d_model=48, n_heads=4))
        x, g = randn(2, 5, 48, seed=21), randn(2, 5, 48, seed=22)
        assert_close(deepnorm_add_norm(x, g, part.norm, part.alpha), deepnorm(x, g, part.alpha, part.norm),
                     "kernel vs nanomodels.deepnet.deepnorm", 2e-5)



@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
    @pytest.mark.parametrize("rms", [False, True])
    def test_matches_the_reference_on_the_device(self, dtype, rms):
        x = randn(4096, 1024, seed=0, dtype=dtype).cuda().requires_grad_()
        g = randn(4096, 1024, seed=1, dtype=dtype).cuda().requires_grad_()
        w = randn(1024, seed=2, dtype=dtype).cuda().requires_grad_()
        y = add_norm(x, g, w, alpha=2.0, rms=rms)
        y.float().square().sum().backward()
        ref = [t.detach().double().requires_grad_() for t in (x, g, w)]
        ry = add_norm_reference(*ref, alpha=2.0, rms=rms)
        ry.square().sum().backward()
        tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
        assert_close(y, ry, "y", tol)
        assert_close(x.grad, ref[0].grad, "dx", tol * 10)

