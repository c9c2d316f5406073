"""The Triton row softmax kernels (kernels/softmax.py): one-pass and online, in the tiers of tiers.py."""

import math

import pytest
import torch

from kernels.softmax import online_softmax, online_softmax_reference, softmax, softmax_reference
from tiers import SENTINEL, assert_close, given, needs_interpreter, randn, st


def naive_softmax(row):
    """One row, written out: exp(x_j - max) / sum_k exp(x_k - max)."""
    e = [math.exp(x - max(row)) for x in row]
    return [x / sum(e) for x in e]



class TestReference:
    @given(rows=st.integers(1, 4), cols=st.integers(1, 70), scale=st.sampled_from([1.0, 30.0, 1000.0]),
           seed=st.integers(0, 10_000))
    def test_softmax_rows_sum_to_one_and_match_the_written_out_equation(self, rows, cols, scale, seed):
        x = randn(rows, cols, seed=seed, dtype=torch.float64) * scale
        y = softmax_reference(x)
        assert_close(y.sum(-1), torch.ones(rows, dtype=torch.float64), "row sums", 1e-12)
        assert (y >= 0).all()
        expected = torch.tensor([naive_softmax(r) for r in x.tolist()], dtype=torch.float64)
        assert_close(y, expected, "softmax_reference vs naive", 1e-12)

    @given(cols=st.integers(1, 70), seed=st.integers(0, 10_000), shift=st.floats(-1e3, 1e3))
    def test_softmax_is_invariant_to_adding_a_constant_per_row(self, cols, seed, shift):
        x = randn(3, cols, seed=seed, dtype=torch.float64)
        c = torch.tensor([shift, -shift, 0.5 * shift], dtype=torch.float64)[:, None]
        assert_close(softmax_reference(x + c), softmax_reference(x), "softmax(x + c) vs softmax(x)", 1e-12)

    @given(cols=st.integers(1, 300), block_n=st.sampled_from([1, 4, 16, 64, 512]), seed=st.integers(0, 10_000),
           masked_prefix=st.integers(0, 299))
    def test_online_softmax_equals_one_pass(self, cols, block_n, seed, masked_prefix):
        x = randn(2, cols, seed=seed, dtype=torch.float64) * 10
        x[0, :min(masked_prefix, cols - 1)] = -math.inf  # whole tiles of -inf first: the m = -inf case
        assert_close(online_softmax_reference(x, block_n), softmax_reference(x), "online vs one-pass", 1e-12)

    @pytest.mark.parametrize("call, match", [
        (lambda: softmax(torch.arange(5)), "x: dtype must be"),
        (lambda: softmax(torch.zeros(3, 0)), "x: expected a tensor with a non-empty last dimension"),
        (lambda: online_softmax(torch.zeros(3, 5), block_n=24), "block_n: must be a power of two"),
        (lambda: softmax(torch.zeros(3, 5), out=torch.zeros(3, 4)), "out: must be a 2-D tensor"),
    ])
    def test_softmax_bad_arguments_raise(self, call, match):
        with pytest.raises(ValueError, match=match):
            call()


@needs_interpreter
class TestInterpreter:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("shape", [(37, 200), (3, 1), (2, 1000)], ids=["37x200", "3x1", "2x1000"])
    def test_softmax_kernels_match_the_reference(self, shape, dtype):
        x = randn(*shape, seed=1, dtype=dtype) * 4
        expected = softmax_reference(x.double())
        atol = 1e-6 if dtype == torch.float32 else 5e-4
        assert_close(softmax(x), expected, "one-pass softmax", atol)
        assert_close(online_softmax(x, block_n=64), expected, "online softmax, 64-column tiles", atol)

    def test_online_softmax_survives_whole_tiles_of_minus_infinity(self):
        x = randn(4, 200, seed=2)
        x[:, :130] = -math.inf  # the first two 64-column tiles hold no finite value
        assert_close(online_softmax(x, block_n=64), softmax_reference(x.double()), "online softmax", 1e-6)

    def test_softmax_takes_strided_and_batched_inputs(self):
        x = randn(50, 30, seed=3)
        assert_close(softmax(x.t()), softmax_reference(x.t().double()), "softmax of a transposed view", 1e-6)
        x3 = randn(2, 3, 40, seed=4)
        assert_close(online_softmax(x3, block_n=16), softmax_reference(x3.double()), "online softmax, 3-D", 1e-6)

    def test_bfloat16_softmax_is_computed_in_float32_under_the_interpreter(self):
        x = randn(5, 300, seed=5).bfloat16()
        y = softmax(x)
        assert y.dtype == torch.bfloat16
        assert_close(y, softmax_reference(x.double()), "bf16 softmax", 4e-3)

    @pytest.mark.parametrize("kernel", [softmax, lambda x, out: online_softmax(x, block_n=64, out=out)],
                             ids=["one-pass", "online"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    def test_softmax_writes_nothing_outside_its_output(self, kernel, dtype):
        x = randn(37, 200, seed=6, dtype=dtype)
        buf = torch.full((40, 216), SENTINEL, dtype=dtype)
        out = buf[:37, :200]
        kernel(x, out=out)
        band = torch.ones_like(buf, dtype=torch.bool)
        band[:37, :200] = False
        assert (buf[band] == SENTINEL).all(), f"{int((buf[band] != SENTINEL).sum())} guard-band elements written"
        assert_close(out, softmax_reference(x.double()), "softmax written into a view", 1e-6 if dtype == torch.float32
                     else 5e-4)


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    def test_softmax_kernels_match_torch(self, dtype):
        for shape in ((4096, 4096), (37, 200), (3, 20000)):
            x = randn(*shape, seed=22, dtype=dtype, device="cuda")
            expected = torch.softmax(x.double(), -1)
            atol = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}[dtype]
            assert_close(softmax(x), expected, f"softmax {shape}", atol)
            assert_close(online_softmax(x), expected, f"online softmax {shape}", atol)
