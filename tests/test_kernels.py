"""The kernels, tested in four tiers (run one with `pytest tests/test_kernels.py::TestInterpreter`):

1. TestReference     the PyTorch references and the argument checks: property tests, float64, CPU, no triton.
2. TestInterpreter   every Triton kernel under TRITON_INTERPRET=1 on CPU tensors: fp32 and fp16, odd lengths,
                     every mask kind, forward and backward against the references, guard bands for
                     out-of-bounds writes, the tiles each mask skips, a few training steps through the kernel.
3. TestCompile       each kernel compiled ahead of time for sm_80 and sm_90 (Triton AOT, nvcc): it builds,
                     shared memory fits, no register spills, tensor-core instructions in the attention kernels.
4. TestGPU           (-m gpu) bf16/fp16 numerics against SDPA / torch.softmax, the CUDA C softmax, the benchmark.
"""

import math
import os
import subprocess
import sys
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import kernels
from kernels import aot
from kernels.flash_attention import (
    allowed_mask,
    flash_attention,
    flash_attention_backward,
    flash_attention_fn,
    flash_attention_forward,
    forward_block_sizes,
    reference_attention,
    tile_plan,
)
from kernels.softmax import online_softmax, online_softmax_reference, softmax, softmax_reference
from nanomodels.attention import MultiHeadAttention, attention, causal_mask, sdpa_attention

SENTINEL = 12345.0  # guard-band value: no softmax or attention output can equal it
MASKS = {  # every mask kind, and key padding on its own and combined, for (B=2, Tk=200)
    "none": {},
    "causal": {"causal": True},
    "prefix": {"prefix_len": [70, 130]},
    "key_lengths": {"key_lengths": [150, 99]},
    "prefix+key_lengths": {"prefix_len": [70, 5], "key_lengths": [0, 133]},
    "causal+key_lengths": {"causal": True, "key_lengths": [200, 64]},
}


@pytest.fixture(autouse=True)
def float32_default():
    """Other test modules switch the default dtype to float64; these tests spell out every dtype anyway."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


def assert_close(actual, expected, what, atol, rtol=0.0):
    actual, expected = actual.double(), expected.double()
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual.sign() == expected.sign())
    diff = torch.where(both_inf, 0.0, (actual - expected).abs()).nan_to_num(nan=math.inf)
    bad = diff > atol + rtol * expected.abs().nan_to_num(posinf=0, neginf=0)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol}, rtol "
                             f"{rtol}); first bad index {idx}: got {actual[idx]:.6g}, expected {expected[idx]:.6g}")


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


# ------------------------------------------------------------------------------------------------ oracles

def naive_softmax(row):
    """One row, written out: exp(x_j - max) / sum_k exp(x_k - max)."""
    e = [math.exp(x - max(row)) for x in row]
    return [x / sum(e) for x in e]


def naive_masked_attention(q, k, v, visible):
    """Loop over (batch, head, query); `visible(b, i, j)` is the mask predicate written from its definition.
    Returns the output and the natural-log LSE (-inf and a zero output for a row with no visible key)."""
    B, H, Tq, D = q.shape
    out = torch.zeros(B, H, Tq, D, dtype=torch.float64)
    lse = torch.full((B, H, Tq), -math.inf, dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = [j for j in range(k.size(2)) if visible(b, i, j)]
                if not keys:
                    continue
                s = torch.stack([q[b, h, i] @ k[b, h, j] / math.sqrt(D) for j in keys])
                lse[b, h, i] = s.max() + torch.log(torch.exp(s - s.max()).sum())
                out[b, h, i] = sum(torch.exp(s[n] - lse[b, h, i]) * v[b, h, j] for n, j in enumerate(keys))
    return out, lse


def predicate(t_q, t_k, causal=False, prefix_len=None, key_lengths=None):
    """visible(b, i, j) from the docstring of kernels.flash_attention, one clause per rule."""
    def visible(b, i, j):
        pos = i + t_k - t_q  # the queries are the last Tq positions
        if key_lengths is not None and j >= key_lengths[b]:
            return False
        if prefix_len is not None:
            return j < prefix_len[b] or j <= pos
        return j <= pos if causal else True
    return visible


mask_args = st.sampled_from(["none", "causal", "prefix", "key_lengths", "prefix+key_lengths"])


def draw_mask(data, kind, batch, t_q, t_k):
    lengths = st.lists(st.integers(0, t_k), min_size=batch, max_size=batch)
    kw = {}
    if kind in ("causal",):
        kw["causal"] = True
    if "prefix" in kind:
        kw["prefix_len"] = data.draw(lengths)
    if "key_lengths" in kind:
        kw["key_lengths"] = data.draw(lengths)
    return kw


# ------------------------------------------------------------------------------------------------ tier 1

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

    @given(data=st.data(), kind=mask_args, t_q=st.integers(1, 9), extra=st.integers(0, 4), d=st.sampled_from([1, 4]),
           seed=st.integers(0, 10_000))
    def test_reference_attention_matches_the_naive_formula_for_every_mask_kind(self, data, kind, t_q, extra, d,
                                                                                seed):
        B, H, t_k = 2, 2, t_q + extra
        q, k, v = (randn(B, H, t, d, seed=seed + i, dtype=torch.float64) for i, t in enumerate((t_q, t_k, t_k)))
        kw = draw_mask(data, kind, B, t_q, t_k)
        out, lse = reference_attention(q, k, v, return_lse=True, **kw)
        expected, expected_lse = naive_masked_attention(q, k, v, predicate(t_q, t_k, **kw))
        assert_close(out, expected, f"reference output, {kw}", 1e-10)
        assert_close(lse, expected_lse, f"reference LSE, {kw}", 1e-10)

    def test_mask_kinds_reduce_to_each_other_at_the_edges(self):
        t = 9
        assert torch.equal(allowed_mask(t, t, causal=True)[0, 0], causal_mask(t))
        assert torch.equal(allowed_mask(t, t, prefix_len=0)[0, 0], causal_mask(t)), "prefix 0 = causal"
        assert allowed_mask(t, t, prefix_len=t).all(), "prefix = Tk: bidirectional"
        padded = allowed_mask(t, t, key_lengths=[4, 9], batch=2)
        assert not padded[0, :, :, 4:].any() and padded[0, :, :, :4].all() and padded[1].all()

    def test_tile_plan_of_causal_square_tiles_is_the_lower_triangle(self):
        plan = tile_plan(causal_mask(256), 64, 64)
        assert torch.equal(plan, 2 * torch.ones(4, 4, dtype=torch.long).tril(-1) + torch.eye(4, dtype=torch.long))

    BAD = {  # name: (change to valid arguments q, k, v of shape (2, 1, 10, 16), the message it must raise)
        "q not 4-D": (lambda q, k, v: dict(q=q[0]), "q: expected a tensor of shape \\(B, H, T, D\\)"),
        "k batch differs": (lambda q, k, v: dict(k=k[:1]), "k, v: expected shape"),
        "v length differs": (lambda q, k, v: dict(v=v[..., :2, :]), "k, v: expected shape"),
        "mixed dtypes": (lambda q, k, v: dict(q=q.half()), "q, k, v: one dtype"),
        "float64": (lambda q, k, v: dict(q=q.double(), k=k.double(), v=v.double()), "q, k, v: one dtype"),
        "two devices": (lambda q, k, v: dict(k=k.to("meta")), "q, k, v: must be on one device"),
        "D=8": (lambda q, k, v: dict(q=q[..., :8], k=k[..., :8], v=v[..., :8]), "head size D must be one of"),
        "D=48": (lambda q, k, v: {n: x.repeat(1, 1, 1, 3) for n, x in zip("qkv", (q, k, v))},
                 "head size D must be one of"),
        "prefix_len > Tk": (lambda q, k, v: dict(prefix_len=11), "prefix_len: every value must be in \\[0, Tk\\]"),
        "prefix_len < 0": (lambda q, k, v: dict(prefix_len=-1), "prefix_len: every value must be in \\[0, Tk\\]"),
        "prefix_len not (B,)": (lambda q, k, v: dict(prefix_len=[1, 2, 3]),
                                "prefix_len: expected an int or shape \\(B,\\)"),
        "prefix_len float": (lambda q, k, v: dict(prefix_len=2.5), "prefix_len: expected an int"),
        "key_lengths float": (lambda q, k, v: dict(key_lengths=torch.tensor([3.0, 4.0])),
                              "key_lengths: must hold integers"),
        "key_lengths > Tk": (lambda q, k, v: dict(key_lengths=[3, 11]),
                             "key_lengths: every value must be in \\[0, Tk\\]"),
        "causal and prefix": (lambda q, k, v: dict(causal=True, prefix_len=3), "causal, prefix_len: pick one"),
        "causal, Tq > Tk": (lambda q, k, v: dict(q=torch.cat([q, q], 2), causal=True),
                            "causal/prefix_len: need Tk >= Tq"),
    }

    @pytest.mark.parametrize("case", list(BAD))
    def test_bad_arguments_raise_before_any_launch(self, case):
        bad, match = self.BAD[case]
        q, k, v = (randn(2, 1, 10, 16, seed=i) for i in range(3))
        kw = {"q": q, "k": k, "v": v, **bad(q, k, v)}
        with pytest.raises(ValueError, match=match):
            flash_attention(**kw)

    def test_flash_attention_fn_rejects_an_arbitrary_mask_and_says_what_to_use(self):
        q = randn(1, 1, 4, 16)
        with pytest.raises(ValueError, match="nanomodels.attention.attention.*causal.*prefix_len.*key_lengths"):
            flash_attention_fn(q, q, q, torch.ones(4, 4, dtype=torch.bool))

    @pytest.mark.parametrize("call, match", [
        (lambda: softmax(torch.arange(5)), "x: dtype must be"),
        (lambda: softmax(torch.zeros(3, 0)), "x: expected a tensor with a non-empty last dimension"),
        (lambda: online_softmax(torch.zeros(3, 5), block_n=24), "block_n: must be a power of two"),
        (lambda: softmax(torch.zeros(3, 5), out=torch.zeros(3, 4)), "out: must be a 2-D tensor"),
    ])
    def test_softmax_bad_arguments_raise(self, call, match):
        with pytest.raises(ValueError, match=match):
            call()

    def test_cpu_tensors_without_the_interpreter_fall_back_to_the_reference_and_say_so(self, monkeypatch):
        monkeypatch.setattr(kernels, "INTERPRET", False)
        monkeypatch.setattr(kernels, "_warned", set())
        q, k, v = (randn(1, 2, 20, 16, seed=i) for i in range(3))
        with pytest.warns(UserWarning, match="using the PyTorch reference"):
            out = flash_attention(q, k, v, causal=True)
        assert_close(out, attention(q, k, v, causal=True), "fallback output", 1e-6)
        x = randn(3, 7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # said once, not on every call
            assert_close(softmax(x), torch.softmax(x, -1), "fallback softmax", 1e-6)

    def test_kernels_import_and_fall_back_without_triton(self):
        code = ("import sys, warnings, torch; sys.modules['triton'] = None\n"
                "import kernels; from kernels.flash_attention import flash_attention; "
                "from kernels.softmax import softmax\n"
                "assert not kernels.HAS_TRITON\n"
                "with warnings.catch_warnings(record=True) as w:\n"
                "    warnings.simplefilter('always'); q = torch.randn(1, 1, 5, 16)\n"
                "    flash_attention(q, q, q, causal=True); softmax(q)\n"
                "assert len(w) == 1 and 'triton is not installed' in str(w[0].message), [str(x.message) for x in w]\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             cwd=os.path.dirname(os.path.dirname(__file__)))
        assert out.returncode == 0, out.stderr[-2000:]


# ------------------------------------------------------------------------------------------------ tier 2

needs_interpreter = pytest.mark.skipif(
    not (kernels.HAS_TRITON and kernels.INTERPRET),
    reason="needs triton with TRITON_INTERPRET=1 (set by tests/conftest.py when there is no CUDA device; on a GPU "
           "machine run `TRITON_INTERPRET=1 pytest ...` for this tier, `pytest -m gpu` for the GPU tier)")
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def attention_case(dtype, B=2, H=1, t_q=200, t_k=200, D=64, seed=0):
    q = randn(B, H, t_q, D, seed=seed, dtype=dtype)
    k = randn(B, H, t_k, D, seed=seed + 1, dtype=dtype)
    v = randn(B, H, t_k, D, seed=seed + 2, dtype=dtype)
    do = randn(B, H, t_q, D, seed=seed + 3, dtype=dtype)
    return q, k, v, do


def check_against_reference(q, k, v, do, mask, tol, what):
    """Forward (O, LSE) and backward (dQ, dK, dV) of the kernel vs the float64 reference and autograd."""
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = flash_attention(*leaves, return_lse=True, **mask)
    out.backward(do)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    ref_out, ref_lse = reference_attention(*ref, return_lse=True, **mask)
    ref_out.backward(do.double())
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == q.shape[:3]
    assert_close(out, ref_out, f"{what}: O", **tol)
    assert_close(lse, ref_lse, f"{what}: LSE", **tol)
    for name, x, r in zip(("dQ", "dK", "dV"), leaves, ref):
        assert_close(x.grad, r.grad, f"{what}: {name}", **tol)


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

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("d", [32, 64])
    @pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
    def test_flash_attention_forward_and_backward_match_the_reference(self, mask, d, dtype):
        q, k, v, do = attention_case(dtype, D=d, seed=d)
        check_against_reference(q, k, v, do, MASKS[mask], TOL[dtype], f"{mask}, D={d}, {dtype}")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
    @pytest.mark.parametrize("d", [16, 128])
    @pytest.mark.parametrize("mask", ["causal", "prefix+key_lengths"])
    def test_the_smallest_and_largest_head_sizes(self, mask, d, dtype):
        q, k, v, do = attention_case(dtype, t_q=130, t_k=130, D=d, seed=d)
        kw = {key: [min(x, 130) for x in val] if isinstance(val, list) else val for key, val in MASKS[mask].items()}
        check_against_reference(q, k, v, do, kw, TOL[dtype], f"{mask}, D={d}, {dtype}")

    @pytest.mark.parametrize("mask", ["none", "causal", "prefix+key_lengths"])
    def test_queries_that_are_the_last_positions_of_a_longer_key_sequence(self, mask):
        q, k, v, do = attention_case(torch.float32, B=2, t_q=37, t_k=150, D=32, seed=7)
        kw = {key: [min(x, 150) for x in val] if isinstance(val, list) else val for key, val in MASKS[mask].items()}
        check_against_reference(q, k, v, do, kw, TOL[torch.float32], f"Tq=37 < Tk=150, {mask}")

    def test_strided_inputs_like_multi_head_attention_makes_them(self):
        B, T, H, D = 2, 100, 2, 32
        x = randn(B, T, 3 * H * D, seed=8)
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in x.split(H * D, dim=-1))  # non-contiguous views
        do = randn(B, T, H, D, seed=9).transpose(1, 2)
        assert not q.is_contiguous() and not do.is_contiguous()
        check_against_reference(q, k, v, do, {"causal": True}, TOL[torch.float32], "strided q, k, v, dO")

    def test_a_row_with_no_visible_key_gives_zeros_not_nan(self):
        q, k, v, do = attention_case(torch.float32, D=32, seed=10)
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out, lse = flash_attention(*leaves, key_lengths=[0, 200], return_lse=True)
        out.backward(do)
        assert (out[0] == 0).all() and torch.isneginf(lse[0]).all() and torch.isfinite(out).all()
        assert all(torch.isfinite(x.grad).all() and (x.grad[0] == 0).all() for x in leaves)

    def test_padding_keys_are_never_read(self):
        q, k, v, do = attention_case(torch.float32, D=32, seed=11)
        lengths = [77, 130]
        k_nan, v_nan = k.clone(), v.clone()
        for b, n in enumerate(lengths):
            k_nan[b, :, n:], v_nan[b, :, n:] = math.nan, math.nan  # a read would spread NaN through O and dQ
        out, lse = flash_attention(q, k_nan, v_nan, key_lengths=lengths, return_lse=True)
        ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), key_lengths=lengths, return_lse=True)
        assert_close(out, ref, "O with NaN padding keys", 1e-5)
        assert_close(lse, ref_lse, "LSE with NaN padding keys", 1e-5)
        kw = dict(key_lengths=lengths)
        dq, dk, dv = flash_attention_backward(q, k_nan, v_nan, out, lse, do, **kw)
        assert torch.isfinite(dq).all(), "dQ read a padding key"

    def test_attention_writes_nothing_outside_its_outputs(self):
        B, H, T, D = 2, 1, 200, 32
        q, k, v, do = attention_case(torch.float32, B=B, H=H, D=D, seed=12)
        mask = MASKS["prefix+key_lengths"]

        def guarded(*shape):
            buf = torch.full((B, H + 1, T + 7, D + 16)[:len(shape)], SENTINEL)
            view = buf[(slice(None),) + tuple(slice(0, n) for n in shape[1:])]
            return buf, view

        (o_buf, o), (l_buf, lse) = guarded(B, H, T, D), guarded(B, H, T)
        flash_attention_forward(q, k, v, out=o, lse=lse, **mask)
        grads = [guarded(B, H, T, D) for _ in range(3)]
        flash_attention_backward(q, k, v, o, lse, do, dq=grads[0][1], dk=grads[1][1], dv=grads[2][1], **mask)
        for name, (buf, view) in zip(("O", "LSE", "dQ", "dK", "dV"), [(o_buf, o), (l_buf, lse), *grads]):
            inside = torch.zeros_like(buf, dtype=torch.bool)
            inside[(slice(None),) + tuple(slice(0, n) for n in view.shape[1:])] = True
            written = int((buf[~inside] != SENTINEL).sum())
            assert written == 0, f"{name}: {written} guard-band elements overwritten (out-of-bounds store)"
            assert (view != SENTINEL).all(), f"{name}: part of the output was never written"
        ref = reference_attention(q.double(), k.double(), v.double(), **mask)
        assert_close(o, ref, "O written into a guarded view", 1e-5)

    @pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
    @pytest.mark.parametrize("t_q", [200, 37])
    def test_the_kernel_visits_exactly_the_tiles_the_mask_needs(self, mask, t_q):
        B, H, t_k = 2, 1, 200
        q, k, v, _ = attention_case(torch.float32, B=B, H=H, t_q=t_q, t_k=t_k, D=16, seed=13)
        counts = torch.full((B * H, math.ceil(t_q / 16), 2), -1, dtype=torch.int32)
        flash_attention_forward(q, k, v, tile_counts=counts, **MASKS[mask])
        bm, bn = forward_block_sizes()
        allowed = allowed_mask(t_q, t_k, batch=B, **MASKS[mask])
        for b in range(B):
            plan = tile_plan(allowed[b, 0], bm, bn)
            expected = torch.stack([(plan == 2).sum(1), (plan == 1).sum(1)], dim=1).int()
            got = counts[b * H, :plan.size(0)]
            assert torch.equal(got, expected), (f"{mask}, batch {b}: (unmasked, masked) tiles per query tile "
                                                f"{got.tolist()}, the mask needs {expected.tolist()}")

    def test_causal_skips_about_half_of_the_tiles(self):
        q, k, v, _ = attention_case(torch.float32, B=1, t_q=256, t_k=256, D=16, seed=14)
        visited = {}
        for name in ("none", "causal"):
            counts = torch.zeros((1, 16, 2), dtype=torch.int32)
            flash_attention_forward(q, k, v, tile_counts=counts, **MASKS[name])
            visited[name] = int(counts.sum())
        n = 256 // forward_block_sizes()[0]
        assert visited["none"] == n * n and visited["causal"] == n * (n + 1) // 2, visited

    def test_bfloat16_attention_is_computed_in_float32_under_the_interpreter(self):
        q, k, v, _ = attention_case(torch.bfloat16, B=1, t_q=64, t_k=64, D=32, seed=15)
        out = flash_attention(q, k, v, causal=True)
        assert out.dtype == torch.bfloat16
        assert_close(out, reference_attention(q.double(), k.double(), v.double(), causal=True), "bf16 O", 1e-2)

    def test_drop_in_for_multi_head_attention(self):
        torch.manual_seed(0)
        mha = MultiHeadAttention(64, 2, attn_fn=sdpa_attention)
        x = randn(2, 50, 64, seed=16)
        expected = mha(x, causal=True)
        mha.attn_fn = flash_attention_fn
        assert_close(mha(x, causal=True), expected, "MultiHeadAttention output, flash vs SDPA", 1e-5)
        cache = {}
        mha(x[:, :49], causal=True, cache=cache)  # decoding: one new query against 50 cached keys
        assert_close(mha(x[:, 49:], causal=True, cache=cache), expected[:, 49:], "one query with a KV cache", 1e-5)

    def test_training_a_few_steps_through_the_kernel_gives_the_reference_losses(self):
        from nanomodels.transformer import Transformer, TransformerConfig

        config = TransformerConfig(vocab_size=32, block_size=32, n_layers=2, d_model=64, n_heads=2)
        idx = torch.randint(0, 32, (2, 33), generator=torch.Generator().manual_seed(0))
        losses = {}
        for name, fn in (("reference", attention), ("flash", flash_attention_fn)):
            torch.manual_seed(0)
            model = Transformer(config, attention_fn=fn).float()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
            losses[name] = []
            for _ in range(3):
                _, loss = model(idx[:, :-1], idx[:, 1:])
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses[name].append(loss.item())
        assert losses["flash"][-1] < losses["flash"][0], f"the loss did not go down: {losses['flash']}"
        assert_close(torch.tensor(losses["flash"]), torch.tensor(losses["reference"]), "losses over 3 AdamW steps",
                     1e-5, 1e-5)


# ------------------------------------------------------------------------------------------------ tier 3

@pytest.fixture(scope="module")
def compiled():
    missing = aot.missing_toolchains()
    if "triton is not installed" in missing and "nvcc not found" in missing:
        pytest.skip("no triton and no nvcc: nothing to compile")
    return aot.report()


def _rows(compiled, part):
    if not compiled[part]:
        pytest.skip(f"compile tier ({part}) skipped: {'; '.join(compiled['missing'])}")
    return compiled[part]


@pytest.mark.slow
class TestCompile:
    def test_every_triton_kernel_builds_for_sm80_and_sm90(self, compiled):
        rows = _rows(compiled, "triton")
        names = {r["kernel"] for r in rows}
        assert len(names) >= 11 and all({(n, a) for a in ("sm_80", "sm_90")} <= {(r["kernel"], r["arch"])
                                                                                 for r in rows} for n in names)

    def test_shared_memory_fits(self, compiled):
        for r in _rows(compiled, "triton"):
            assert 0 < r["shared_bytes"] <= r["smem_limit"], f"{r['kernel']} on {r['arch']}: {r['shared_bytes']} B"

    def test_no_register_spills_in_the_default_configs(self, compiled):
        rows = _rows(compiled, "triton")
        if rows[0]["registers"] is None:
            pytest.skip("no ptxas in the triton wheel: registers and spills unknown")
        spills = [f"{r['kernel']} {r['arch']}: {r['spill_bytes']} B ({r['registers']} registers)" for r in rows
                  if r["spill_bytes"]]
        assert not spills, "register spills: " + "; ".join(spills)

    def test_attention_kernels_use_tensor_cores(self, compiled):
        for r in _rows(compiled, "triton"):
            if r["kernel"].startswith(("attn_fwd", "attn_bwd_dkdv", "attn_bwd_dq")):
                found = r["mma_sync"] if r["arch"] == "sm_80" else r["wgmma"]
                what = "mma.sync" if r["arch"] == "sm_80" else "wgmma.mma_async"
                assert found > 0, f"{r['kernel']} on {r['arch']}: no {what} in the PTX (tl.dot fell off tensor cores)"

    def test_cuda_softmax_builds_with_nvcc_without_spills(self, compiled):
        rows = _rows(compiled, "cuda")
        assert {(r["kernel"], r["arch"]) for r in rows} == {(f"softmax.cu {f}", a) for f in
                                                            ("softmax_rows", "softmax_rows_online")
                                                            for a in ("sm_80", "sm_90")}
        for r in rows:
            assert r["spill_bytes"] == 0, f"{r['kernel']} {r['arch']}: {r['spill_bytes']} B spilled"
            per_warp = 4 if r["kernel"].endswith("_rows") else 8  # one or two floats per warp slot, 32 slots
            assert r["shared_bytes"] == 32 * per_warp, f"{r['kernel']}: {r['shared_bytes']} B of shared memory"
            if "shfl_in_sass" in r:
                assert r["shfl_in_sass"] > 0, f"{r['kernel']}: no warp shuffle (SHFL.BFLY) in the SASS"

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour; the GPU tier runs it")
    def test_cuda_library_loads_and_reports_a_cuda_error_without_a_gpu(self):
        from kernels import cuda_softmax

        if cuda_softmax.nvcc() is None:
            pytest.skip("nvcc not found")
        lib = cuda_softmax.load()
        with pytest.raises(RuntimeError, match="softmax_rows_launch: CUDA error"):
            cuda_softmax.launch(lib, 0, 0, 4, 100, 2, 0)
        with pytest.raises(RuntimeError, match="invalid argument"):
            cuda_softmax.launch(lib, 0, 0, 0, 100, 2, 0)


# ------------------------------------------------------------------------------------------------ tier 4

@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
    @pytest.mark.parametrize("d", [64, 128])
    @pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
    def test_flash_attention_matches_sdpa(self, causal, d, dtype):
        q, k, v, do = attention_case(dtype, B=2, H=4, t_q=1000, t_k=1000, D=d, seed=20)
        q, k, v, do = (x.cuda() for x in (q, k, v, do))
        leaves = [x.clone().requires_grad_() for x in (q, k, v)]
        out = flash_attention(*leaves, causal=causal)
        out.backward(do)
        ref = [x.float().requires_grad_() for x in (q, k, v)]
        ref_out = torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=causal)
        ref_out.backward(do.float())
        tol = dict(atol=2e-2, rtol=2e-2) if dtype == torch.bfloat16 else dict(atol=4e-3, rtol=4e-3)
        assert_close(out, ref_out, f"O vs SDPA ({dtype})", **tol)
        for name, x, r in zip(("dQ", "dK", "dV"), leaves, ref):
            assert_close(x.grad, r.grad, f"{name} vs SDPA autograd ({dtype})", **tol)

    @pytest.mark.parametrize("mask", list(MASKS), ids=list(MASKS))
    def test_every_mask_kind_on_the_gpu(self, mask):
        q, k, v, do = (x.cuda() for x in attention_case(torch.float16, D=64, seed=21))
        check_against_reference(q, k, v, do, MASKS[mask], dict(atol=4e-3, rtol=4e-3), f"GPU {mask}")

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])
    def test_softmax_kernels_match_torch(self, dtype):
        for shape in ((4096, 4096), (37, 200), (3, 20000)):
            x = randn(*shape, seed=22, dtype=dtype, device="cuda")
            expected = torch.softmax(x.double(), -1)
            atol = {torch.float32: 1e-6, torch.float16: 5e-4, torch.bfloat16: 4e-3}[dtype]
            assert_close(softmax(x), expected, f"softmax {shape}", atol)
            assert_close(online_softmax(x), expected, f"online softmax {shape}", atol)

    @pytest.mark.parametrize("version", [1, 2])
    def test_cuda_c_softmax_matches_torch(self, version):
        from kernels.cuda_softmax import cuda_softmax

        for shape in ((4096, 4096), (37, 200), (3, 20000), (5, 1)):
            x = randn(*shape, seed=23, device="cuda") * 4
            assert_close(cuda_softmax(x, version=version), torch.softmax(x.double(), -1), f"v{version} {shape}", 1e-6)

    def test_benchmark_runs(self):
        from kernels import bench

        rows = bench.gpu_benchmark(quick=True)
        assert rows and all(r["ms"] > 0 for r in rows)
