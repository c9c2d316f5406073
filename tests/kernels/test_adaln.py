"""The fused adaLN modulate kernel, LN(x) (1 + scale) + shift, in tiers:

1. reference    the PyTorch reference against a written-out per-element loop (float64) and the diffusion head's
                `modulate`; bad arguments raise ValueError.
2. interpreter  both Triton kernels under TRITON_INTERPRET=1 on CPU tensors: fp32 and fp16, odd widths,
                conditions per token, per sequence (B, 1, D, read in place) and other broadcasts, forward and
                backward against float64 autograd, guard bands. The forward row is exercise 9.7, graded by
                exercises/grading/checks/ch09_next_token_diffusion.py (run against the library by tests/test_diffusion.py).
3. compile      built for sm_80 / sm_90 through the kernel registry (tests/kernels/test_compile.py).
4. gpu          (-m gpu) fp16 / bf16 numerics on the device.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.adaln import _conditions, adaln_backward, adaln_forward, adaln_modulate, modulate_reference
from nanomodels.diffusion import modulate
from tiers import needs_interpreter

SENTINEL = 12345.0
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype)


def assert_close(actual, expected, what, atol):
    diff = (actual.double() - expected.double()).abs().nan_to_num(nan=math.inf)
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol})"


def naive_modulate(x, shift, scale, eps):
    """One row at a time in Python floats: (x - mean) / sqrt(var + eps) * (1 + scale) + shift."""
    out = torch.empty_like(x, dtype=torch.float64)
    for i in range(x.size(0)):
        row = [float(v) for v in x[i]]
        mean = sum(row) / len(row)
        var = sum((v - mean) ** 2 for v in row) / len(row)
        for j, v in enumerate(row):
            out[i, j] = (v - mean) / math.sqrt(var + eps) * (1 + float(scale[i, j])) + float(shift[i, j])
    return out


# ---- tier 1 -------------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=20)
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), seed=st.integers(0, 2 ** 16))
def test_reference_matches_the_written_out_equation(rows, cols, seed):
    x, shift, scale = (randn(rows, cols, seed=seed + k).double() * 2 for k in range(3))
    assert_close(modulate_reference(x, shift, scale, 1e-6), naive_modulate(x, shift, scale, 1e-6), "reference",
                 1e-10)


def test_reference_is_the_diffusion_heads_modulate():
    x, shift, scale = (randn(4, 7, 33, seed=k).double() for k in range(3))
    assert_close(modulate_reference(x, shift, scale), modulate(x, shift, scale), "vs diffusion.modulate", 1e-12)


@pytest.mark.parametrize("call, match", [
    (lambda: adaln_modulate(torch.randn(3, 4), torch.randn(3, 5), torch.randn(3, 4)), "shift"),
    (lambda: adaln_modulate(torch.randn(3, 4), torch.randn(3, 4), torch.randn(2, 3, 4)), "scale"),
    (lambda: adaln_modulate(torch.randn(3, 4).double(), torch.randn(3, 4).double(), torch.randn(3, 4).double()),
     "dtype"),
    (lambda: adaln_modulate(torch.randn(3, 4), torch.randn(3, 4).half(), torch.randn(3, 4)), "shift"),
    (lambda: adaln_modulate(*[torch.empty(1, 8193, device="meta")] * 3), r"x: .*\[1, 8192\]"),  # BLOCK 16384 spills
])
def test_bad_arguments_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- tier 2 -------------------------------------------------------------------------------------------------

def check_fwd_bwd(x, shift, scale, what):
    leaves = [t.clone().requires_grad_() for t in (x, shift, scale)]
    y = adaln_modulate(*leaves)
    dy = randn(*y.shape, seed=99, dtype=x.dtype)
    y.backward(dy)
    ref = [t.double().requires_grad_() for t in (x, shift, scale)]
    ref_y = modulate_reference(*ref)
    ref_y.backward(dy.double())
    atol = ATOL[x.dtype]
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close(y, ref_y, f"{what}: y", atol)
    for name, t, r in zip(("dx", "dshift", "dscale"), leaves, ref):
        scale_ = max(1.0, r.grad.abs().max().item())  # a broadcast condition's gradient is a sum over rows
        assert_close(t.grad, r.grad, f"{what}: {name}", atol * scale_)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("rows, cols", [(7, 37), (1, 1), (5, 128)])
def test_forward_and_backward_match_float64_autograd(rows, cols, dtype):
    x, shift, scale = (randn(rows, cols, seed=k, dtype=dtype) * (2 if k == 0 else 0.5) for k in range(3))
    check_fwd_bwd(x, shift, scale, f"{rows}x{cols} {dtype}")


@needs_interpreter
def test_per_sequence_condition_broadcasts_over_tokens():
    x = randn(2, 5, 24, seed=1)
    shift, scale = randn(2, 1, 24, seed=2), randn(2, 1, 24, seed=3)
    check_fwd_bwd(x, shift, scale, "(B, 1, D) condition")


@needs_interpreter
@pytest.mark.parametrize("x_shape, shift_shape, scale_shape", [
    ((3, 4, 24), (3, 1, 24), (3, 1, 24)),  # one condition per sequence: read in place
    ((5, 24), (1, 24), (1, 24)),  # one condition for every row
    ((2, 3, 24), (24,), (2, 3, 24)),  # mixed broadcasts: copied to x's shape
    ((2, 3, 24), (2, 1, 24), (2, 3, 24)),
    ((2, 1, 24), (2, 1, 24), (2, 1, 24)),  # sequences of one token
], ids=["per-sequence", "one-for-all", "vector-and-full", "sequence-and-full", "one-token"])
def test_every_broadcast_of_the_condition_matches_float64_autograd(x_shape, shift_shape, scale_shape):
    x = randn(*x_shape, seed=30) * 2 + 0.5
    check_fwd_bwd(x, randn(*shift_shape, seed=31), randn(*scale_shape, seed=32), f"shift {shift_shape}, "
                  f"scale {scale_shape}")


def test_a_condition_shared_by_a_sequence_is_read_in_place_not_copied():
    x, shift, scale = randn(3, 4, 24, seed=33), randn(3, 1, 24, seed=34), randn(3, 1, 24, seed=35)
    shift2, scale2, rows_per_cond = _conditions(x, shift, scale)
    assert rows_per_cond == 4 and shift2.shape == scale2.shape == (3, 24)
    assert shift2.data_ptr() == shift.data_ptr() and scale2.data_ptr() == scale.data_ptr()
    _, _, rows_per_token = _conditions(x, randn(3, 4, 24, seed=36), randn(3, 4, 24, seed=37))
    assert rows_per_token == 1


@needs_interpreter
def test_takes_strided_inputs_and_bfloat16_in_float32():
    xt = randn(24, 6, seed=4).t()  # a transposed (non-contiguous) view
    shift, scale = randn(6, 24, seed=5), randn(6, 24, seed=6)
    assert_close(adaln_modulate(xt, shift, scale), modulate_reference(xt.double(), shift.double(), scale.double()),
                 "transposed x", 2e-5)
    xb, sb, cb = (t.bfloat16() for t in (xt, shift, scale))
    y = adaln_modulate(xb, sb, cb)
    assert y.dtype == torch.bfloat16
    assert_close(y, modulate_reference(xb.double(), sb.double(), cb.double()), "bf16", 5e-2)


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_forward_and_backward_write_nothing_outside_their_outputs(dtype):
    rows, cols = 5, 37
    x, shift, scale = (randn(rows, cols, seed=10 + k, dtype=dtype) for k in range(3))
    for name in ("y", "dx"):
        buf = torch.full((rows * cols + 64,), SENTINEL, dtype=dtype)
        view = buf[:rows * cols].view(rows, cols)
        y, mean, rstd = adaln_forward(x, shift, scale, out=view if name == "y" else None)
        if name == "dx":
            adaln_backward(x, scale, mean, rstd, torch.ones_like(x), dx=view)
        assert (buf[rows * cols:] == SENTINEL).all(), f"{name}: {int((buf[rows * cols:] != SENTINEL).sum())} " \
                                                      "guard cells written"
        assert not (view == SENTINEL).any(), f"{name}: some output cells were not written"


@needs_interpreter
def test_backward_into_a_row_strided_dx_gives_every_gradient_and_writes_only_dx():
    """dx a view whose rows are 2N apart: dshift and dscale are their own buffers, not laid out like dx."""
    rows, cols = 5, 37
    x, shift, scale = (randn(rows, cols, seed=40 + k) for k in range(3))
    dy = randn(rows, cols, seed=43)
    y, mean, rstd = adaln_forward(x, shift, scale)
    buf = torch.full((rows, 2 * cols), SENTINEL)
    dx, dshift, dscale = adaln_backward(x, scale, mean, rstd, dy, dx=buf[:, :cols])
    ref = [t.double().requires_grad_() for t in (x, shift, scale)]
    modulate_reference(*ref).backward(dy.double())
    for name, got, r in zip(("dx", "dshift", "dscale"), (dx, dshift, dscale), ref):
        assert_close(got, r.grad, name, ATOL[torch.float32])
    assert (buf[:, cols:] == SENTINEL).all(), "dx: the slack between its rows was written"


@needs_interpreter
def test_forward_reads_shift_and_scale_with_their_own_row_strides():
    rows, cols = 4, 19
    x = randn(rows, cols, seed=50)
    shift = randn(rows, 3 * cols, seed=51)[:, :cols]  # rows 3N apart
    scale = randn(rows, cols, seed=52)  # rows N apart
    y, _, _ = adaln_forward(x, shift, scale)
    assert_close(y, modulate_reference(x.double(), shift.double(), scale.double()), "y", ATOL[torch.float32])


def test_forward_and_backward_reject_an_output_whose_columns_are_strided():
    x, shift, scale = (randn(3, 8, seed=k) for k in range(3))
    with pytest.raises(ValueError, match="out"):
        adaln_forward(x, shift, scale, out=torch.empty(3, 16)[:, ::2])
    mean, rstd = torch.zeros(3), torch.ones(3)
    with pytest.raises(ValueError, match="dx"):
        adaln_backward(x, scale, mean, rstd, torch.ones(3, 8), dx=torch.empty(8, 3).t())


@needs_interpreter
def test_drop_in_for_the_diffusion_heads_adaln_block():
    from nanomodels.diffusion import AdaLNBlock

    torch.manual_seed(0)
    block = AdaLNBlock(32)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x, c = randn(6, 32, seed=20), randn(6, 32, seed=21)
    shift, scale, gate = block.ada(c).chunk(3, dim=-1)
    fused = x + gate * block.mlp(adaln_modulate(x, shift, scale))
    assert_close(fused, block(x, c), "fused modulate inside AdaLNBlock", 2e-5)


# ---- tier 4 -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_matches_the_reference_on_the_device(dtype):
    x, shift, scale = (randn(4096, 1024, seed=k, dtype=dtype).cuda().requires_grad_() for k in range(3))
    y = adaln_modulate(x, shift, scale)
    y.float().square().sum().backward()
    ref = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    modulate_reference(*ref).square().sum().backward()
    tol = 3e-2 if dtype == torch.bfloat16 else 5e-3
    assert_close(y, modulate_reference(*[r.detach() for r in ref]), "y", tol)
    assert_close(x.grad, ref[0].grad, "dx", tol * 10)
