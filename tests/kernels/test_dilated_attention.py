"""The dilated-attention kernel (strided loads per (segment, head) + LSE merge), in tiers:

1. reference    the kernel module's entry points validate their arguments (ValueError before any launch).
2. interpreter  the Triton kernel under TRITON_INTERPRET=1 on CPU tensors, fp32 and fp16, against
                nanomodels.dilated in float64: each pattern's O and LSE (kept rows and the rows it leaves at 0 and
                -inf), the merged mixture, causal and bidirectional, T not a multiple of w, H < r, strided inputs,
                guard bands around both outputs.
3. compile      built for sm_80 / sm_90 through the kernel registry (tests/kernels/test_compile.py).
4. gpu          (-m gpu) fp16 numerics on the device at T = 4096.
"""

import math

import pytest
import torch

import kernels
from kernels.dilated_attention import dilated_attention_kernel, dilated_branch_kernel
from nanomodels.dilated import dilated_attention, dilated_branch

SENTINEL = 12345.0
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def assert_close(actual, expected, what, atol):
    diff = (actual.double() - expected.double()).abs().nan_to_num(nan=math.inf)
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol})"


# ---- tier 1 -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call, match", [
    (lambda: dilated_branch_kernel(*[randn(1, 2, 8, 16)] * 3, 6, 4), "r must divide"),
    (lambda: dilated_branch_kernel(randn(1, 2, 8, 16), randn(1, 2, 7, 16), randn(1, 2, 8, 16), 4, 1), "same shape"),
    (lambda: dilated_branch_kernel(*[randn(1, 2, 8, 16).double()] * 3, 4, 1), "dtype"),
    (lambda: dilated_branch_kernel(*[randn(1, 2, 8, 24)] * 3, 4, 1), "head size"),
    (lambda: dilated_attention_kernel(*[randn(1, 2, 8, 16)] * 3, [4, 8], [1]), "same number"),
])
def test_bad_arguments_raise_before_any_launch(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- tier 2 -------------------------------------------------------------------------------------------------

needs_interpreter = pytest.mark.skipif(not (kernels.HAS_TRITON and kernels.INTERPRET),
                                       reason="needs triton with TRITON_INTERPRET=1 (tests/conftest.py sets it "
                                              "when there is no CUDA device)")


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("T, w, r, H", [(96, 32, 1, 2), (100, 64, 2, 2), (70, 128, 4, 4), (50, 16, 4, 2)])
def test_each_pattern_gives_the_reference_output_and_lse_on_kept_rows_and_zero_elsewhere(T, w, r, H, causal):
    q, k, v = (randn(2, H, T, 16, seed=s) for s in range(3))
    out, lse = dilated_branch_kernel(q, k, v, w, r, causal=causal)
    want_out, want_lse = dilated_branch(q.double(), k.double(), v.double(), w, r, causal=causal)
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse)), "the kernel keeps other rows than the reference"
    assert_close(out, want_out, f"O (T={T}, w={w}, r={r})", ATOL[torch.float32])
    kept = torch.isfinite(want_lse)
    assert_close(lse[kept], want_lse[kept], "LSE on kept rows", ATOL[torch.float32])
    assert torch.equal(out[~kept], torch.zeros_like(out[~kept])), "rows the pattern does not keep must stay 0"


@needs_interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_merged_patterns_equal_dilated_attention(causal, dtype):
    ws, rs = (16, 32, 64), (1, 2, 4)
    q, k, v = (randn(1, 4, 90, 32, seed=10 + s, dtype=dtype) for s in range(3))
    got = dilated_attention_kernel(q, k, v, ws, rs, causal=causal)
    want = dilated_attention(q.double(), k.double(), v.double(), ws, rs, causal=causal)
    assert got.dtype == dtype and got.shape == q.shape
    assert_close(got, want, f"merged {dtype}", ATOL[dtype])


@needs_interpreter
def test_strided_inputs_are_read_through_their_strides():
    base = randn(1, 40, 2, 3 * 16, seed=20)  # (B, T, H, 3D): q, k, v as views of one packed projection
    q, k, v = (base[..., i * 16:(i + 1) * 16].transpose(1, 2) for i in range(3))  # (B, H, T, D), strided
    got = dilated_attention_kernel(q, k, v, (8, 16), (1, 2))
    want = dilated_attention(q.double(), k.double(), v.double(), (8, 16), (1, 2))
    assert_close(got, want, "strided q, k, v", ATOL[torch.float32])


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_kernel_writes_nothing_outside_out_and_lse(causal):
    B, H, T, D = 1, 2, 45, 16
    q, k, v = (randn(B, H, T, D, seed=30 + s) for s in range(3))
    n_out, n_lse = B * H * T * D, B * H * T
    out_buf = torch.full((n_out + 256,), SENTINEL)
    lse_buf = torch.full((n_lse + 64,), SENTINEL)
    out, lse = out_buf[128:128 + n_out].view(B, H, T, D), lse_buf[32:32 + n_lse].view(B, H, T)
    dilated_branch_kernel(q, k, v, 32, 4, causal=causal, out=out, lse=lse)
    for name, buf, lo, hi in (("out", out_buf, 128, 128 + n_out), ("lse", lse_buf, 32, 32 + n_lse)):
        guard = torch.cat([buf[:lo], buf[hi:]])
        assert (guard == SENTINEL).all(), f"{name}: {int((guard != SENTINEL).sum())} guard cells written"
    want_out, want_lse = dilated_branch(q.double(), k.double(), v.double(), 32, 4, causal=causal)
    assert_close(out, want_out, "O in a guarded buffer", ATOL[torch.float32])


# ---- tier 4 -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_matches_the_reference_on_the_device(causal):
    ws, rs = (512, 1024, 2048), (1, 2, 4)
    q, k, v = (randn(2, 8, 4096, 64, seed=s, dtype=torch.float16).cuda() for s in range(3))
    got = dilated_attention_kernel(q, k, v, ws, rs, causal=causal)
    want = dilated_attention(q.double(), k.double(), v.double(), ws, rs, causal=causal)
    assert_close(got, want, "fp16 on the device", 4e-3)
