"""The dilated-attention kernel (strided loads per (segment, head) + LSE merge), in tiers:

1. reference    the kernel module's entry points validate their arguments (ValueError before any launch).
2. interpreter  the Triton kernel under TRITON_INTERPRET=1 on CPU tensors, fp32 and fp16, against
                nanomodels.dilated in float64: each pattern's O and LSE (kept rows and the rows it leaves at 0 and
                -inf), the merged mixture, causal and bidirectional, T not a multiple of w, H < r, strided inputs,
                guard bands around both outputs. Backward: dQ, dK, dV equal autograd through
                nanomodels.dilated.dilated_attention (the gradient through the mixing weights included, not the
                detached-weights gradient), per pattern through O and LSE, and a central finite difference.
3. compile      built for sm_80 / sm_90 through the kernel registry (tests/kernels/test_compile.py): the forward,
                and kernels/flash_attention.py's dK/dV and dQ kernels with the mask kinds the backward launches.
4. gpu          (-m gpu) fp16 numerics on the device at T = 4096, forward and backward.
"""

import math

import pytest
import torch

from kernels.dilated_attention import dilated_attention_kernel, dilated_branch_kernel
from nanomodels.dilated import dilated_attention, dilated_branch
from tiers import needs_interpreter

SENTINEL = 12345.0
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def randn(*shape, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def assert_close(actual, expected, what, atol):
    diff = (actual.double() - expected.double()).abs().nan_to_num(nan=math.inf)
    assert diff.max() <= atol, f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol})"


# ---- tier 1 -------------------------------------------------------------------------------------------------

def test_autotune_drops_the_config_that_spills_on_the_launch_device(monkeypatch):
    """128x64 with 8 warps spills 40 B at D = 32 on sm_80 (compile tier, Triton 3.9): pruned there, kept on sm_90."""
    triton = pytest.importorskip("triton", reason="triton is not installed: no autotune configs to prune")
    from kernels import dilated_attention as da
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
               for bm, bn, nw, ns in da.FWD_CONFIGS]
    for arch, d, dropped in ((8, 32, {(128, 64, 8, 2)}), (9, 32, set()), (8, 64, set())):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, a=arch: (a, 0))
        kept = da._prune(configs, {"Q": torch.zeros(1)}, HEAD_DIM=d)
        assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept] == \
            [c for c in da.FWD_CONFIGS if c not in dropped], f"sm_{arch}0, D={d}"


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
def test_bfloat16_is_computed_in_float32_under_the_interpreter():
    """The interpreter multiplies bf16 bit patterns as integers (kernels.md, interpreter traps): up-cast there."""
    ws, rs = (16, 32), (1, 2)
    q, k, v, do = (randn(1, 2, 40, 16, seed=110 + s, dtype=torch.bfloat16) for s in range(4))
    out, lse = dilated_branch_kernel(q, k, v, 32, 2)
    want_out, want_lse = dilated_branch(q.double(), k.double(), v.double(), 32, 2)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert_close(out, want_out, "bf16 O of one pattern", 1e-2)
    kept = torch.isfinite(want_lse)
    assert_close(lse[kept], want_lse[kept], "bf16 LSE", 1e-5)
    buf = torch.full((2 * 40 * 16 + 8,), SENTINEL, dtype=torch.bfloat16)
    dilated_branch_kernel(q, k, v, 32, 2, out=buf[:-8].view(1, 2, 40, 16), lse=torch.empty(1, 2, 40))
    assert_close(buf[:-8].view(1, 2, 40, 16), want_out, "bf16 O into out=", 1e-2)
    assert (buf[-8:] == SENTINEL).all(), "out: guard cells written"
    (out, grads), (ref_out, ref_grads) = kernel_and_reference_grads(q, k, v, do, ws, rs, causal=True)
    assert out.dtype == torch.bfloat16
    assert_close(out, ref_out, "bf16 merged O", 1e-2)
    for name, g, ref in zip(("dQ", "dK", "dV"), grads, ref_grads):
        assert g.dtype == torch.bfloat16
        assert_close(g, ref, f"bf16 {name}", 2e-2)


def test_bad_outputs_raise_before_anything_is_written():
    q = randn(1, 2, 8, 16)
    for out, lse, match in ((torch.full((1, 2, 8, 8), SENTINEL), None, "out"),
                            (torch.full((1, 2, 8, 16), SENTINEL).half(), None, "out"),
                            (None, torch.full((1, 2, 8), SENTINEL).double(), "lse")):
        with pytest.raises(ValueError, match=match):
            dilated_branch_kernel(q, q, q, 4, 1, out=out, lse=lse)
        assert all(t is None or (t == SENTINEL).all() for t in (out, lse)), "an output was written before the check"


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


def kernel_and_reference_grads(q, k, v, do, ws, rs, causal, detach_weights=False):
    """(out, [dQ, dK, dV]) of the kernel and of float64 autograd through nanomodels.dilated.dilated_attention."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = dilated_attention_kernel(*leaves, ws, rs, causal=causal)
    out.backward(do)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    ref_out = dilated_attention(*ref, ws, rs, causal=causal, detach_weights=detach_weights)
    ref_out.backward(do.double())
    return (out, [x.grad for x in leaves]), (ref_out, [x.grad for x in ref])


GRAD_CASES = {  # B, H, T, D, segment lengths, dilation rates
    "T not a multiple of w, H < r": (1, 2, 50, 16, (16, 32), (1, 4)),
    "H > r, three patterns, short last segments": (2, 5, 70, 16, (8, 32, 64), (1, 2, 4)),
    "H < r, one pattern: rows no head queries": (1, 2, 37, 16, (16,), (4,)),
    "H = r, T a multiple of w, D = 32": (1, 4, 64, 32, (16, 64), (2, 4)),
}


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("case", list(GRAD_CASES), ids=list(GRAD_CASES))
def test_kernel_gradients_equal_autograd_through_dilated_attention(case, causal):
    B, H, T, D, ws, rs = GRAD_CASES[case]
    q, k, v, do = (randn(B, H, T, D, seed=40 + s) for s in range(4))
    (out, grads), (ref_out, ref_grads) = kernel_and_reference_grads(q, k, v, do, ws, rs, causal)
    assert_close(out, ref_out, f"{case}: O", ATOL[torch.float32])
    for name, g, ref in zip(("dQ", "dK", "dV"), grads, ref_grads):
        assert_close(g, ref, f"{case}, causal={causal}: {name}", ATOL[torch.float32])


@needs_interpreter
def test_kernel_gradients_in_fp16_are_close_to_float64():
    q, k, v, do = (randn(1, 4, 45, 32, seed=50 + s, dtype=torch.float16) for s in range(4))
    (_, grads), (_, ref_grads) = kernel_and_reference_grads(q, k, v, do, (16, 32), (1, 2), True)
    for name, g, ref in zip(("dQ", "dK", "dV"), grads, ref_grads):
        assert g.dtype == torch.float16
        assert_close(g, ref, f"fp16 {name}", 1e-2)


@needs_interpreter
def test_the_gradient_flows_through_the_mixing_weights_not_the_detached_ones():
    ws, rs = (8, 32), (1, 4)
    q, k, v, do = (randn(1, 4, 32, 16, seed=60 + s) for s in range(4))
    (_, grads), (_, detached) = kernel_and_reference_grads(q, k, v, do, ws, rs, False, detach_weights=True)
    gap = max((g.double() - d).abs().max().item() for g, d in zip(grads, detached))
    assert gap > 1e-2, f"the kernel's gradient equals torchscale's detached-weights gradient (max gap {gap:.2g})"
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    dilated_attention_kernel(*leaves, ws, rs, detach_weights=True).backward(do)
    for name, x, d in zip(("dQ", "dK", "dV"), leaves, detached):
        assert_close(x.grad, d, f"detach_weights=True: {name}", ATOL[torch.float32])


@needs_interpreter
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_one_pattern_is_differentiable_through_its_output_and_its_lse(causal):
    H, T, D, w, r = 3, 41, 16, 16, 4
    q, k, v, do = (randn(1, H, T, D, seed=70 + s) for s in range(4))
    dlse = randn(1, H, T, seed=74)
    grads = {}
    for name, fn, dtype in (("kernel", dilated_branch_kernel, torch.float32), ("reference", dilated_branch,
                                                                                torch.float64)):
        leaves = [x.to(dtype).requires_grad_() for x in (q, k, v)]
        out, lse = fn(*leaves, w, r, causal=causal)
        finite = torch.isfinite(lse)  # the rows this pattern keeps; the others have no LSE to differentiate
        loss = (out * do.to(dtype)).sum() + torch.where(finite, lse * dlse.to(dtype), 0.0).sum()
        grads[name] = torch.autograd.grad(loss, leaves, retain_graph=True)
        lse_only = torch.autograd.grad(torch.where(finite, lse, 0.0).sum(), leaves[0])[0]
        grads[name + " LSE only"] = (lse_only,)
    for name, g, ref in zip(("dQ", "dK", "dV"), grads["kernel"], grads["reference"]):
        assert_close(g, ref, f"one pattern through O and LSE: {name}", ATOL[torch.float32])
    assert_close(grads["kernel LSE only"][0], grads["reference LSE only"][0], "dQ through the LSE alone",
                 ATOL[torch.float32])


@needs_interpreter
def test_only_the_inputs_that_need_a_gradient_get_one():
    q, k, v = (randn(1, 3, 40, 16, seed=100 + s) for s in range(3))
    q.requires_grad_()
    dilated_attention_kernel(q, k, v, (8, 16), (1, 4), causal=True).sum().backward()
    ref = q.detach().double().requires_grad_()
    dilated_attention(ref, k.double(), v.double(), (8, 16), (1, 4), causal=True).sum().backward()
    assert k.grad is None and v.grad is None
    assert_close(q.grad, ref.grad, "dQ with k, v frozen", ATOL[torch.float32])


@needs_interpreter
def test_gradient_matches_a_central_finite_difference():
    ws, rs = (8, 16), (1, 2)
    q, k, v, c = (randn(1, 3, 30, 16, seed=80 + s) for s in range(4))
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    (dilated_attention_kernel(*leaves, ws, rs, causal=True) * c).sum().backward()
    eps = 1e-2
    for i, name in enumerate(("q", "k", "v")):
        u = randn(*q.shape, seed=90 + i)
        with torch.no_grad():
            f = [(dilated_attention_kernel(*[x + sign * eps * u if j == i else x for j, x in enumerate((q, k, v))],
                                           ws, rs, causal=True) * c).sum().double() for sign in (1, -1)]
        numeric, analytic = (f[0] - f[1]) / (2 * eps), (leaves[i].grad.double() * u).sum()
        assert abs(numeric - analytic) <= 1e-3 * max(1.0, abs(analytic)), \
            f"d/d{name} along a random direction: finite difference {numeric:.6g}, kernel gradient {analytic:.6g}"


def test_every_grid_axis_stays_within_cudas_limits_at_the_largest_advertised_shapes():
    """Arithmetic, no launch: B=8, H=16, T=128K, w=256 is 65,536 (batch, head, segment) triples, one more than
    grid axis y allows; the backward splits them into launches of at most 65,535."""
    from kernels import GRID_MAX
    from kernels.dilated_attention import launch_grids

    for B, H, T, D, w, r in ((8, 16, 128 * 1024, 64, 256, 1), (8, 16, 128 * 1024, 128, 256, 4),
                             (1, 1, 65535 * 16, 16, 16, 1), (4095, 16, 256, 64, 256, 2)):
        grids = launch_grids(B, H, T, D, w, r)
        assert {"forward", "backward"} <= {name.split()[0] for name, _ in grids}
        for name, grid in grids:
            assert len(grid) <= 3 and all(0 < g <= lim for g, lim in zip(grid, GRID_MAX)), \
                f"(B, H, T, w, r) = {(B, H, T, w, r)}: {name} grid {grid} is past {GRID_MAX}"
        total = sum(grid[1] for name, grid in grids if name.startswith("backward dq"))
        assert total == B * H * -(-T // w), "the backward launches must cover every (batch, head, segment)"
    assert sum(name.startswith("backward dq") for name, _ in launch_grids(8, 16, 128 * 1024, 64, 256, 1)) == 2


def test_shapes_past_the_grid_limits_raise_before_any_launch():
    q = torch.empty(1, 65536, 1, 16)  # B * H = 65,536 > 65,535 (grid axis z of the forward)
    with pytest.raises(ValueError, match="B \\* H"):
        dilated_branch_kernel(q, q, q, 1, 1)
    q = torch.empty(1, 1, 65536, 16)  # 65,536 segments of w = 1 (grid axis y of the forward)
    with pytest.raises(ValueError, match="segments"):
        dilated_branch_kernel(q, q, q, 1, 1)


@needs_interpreter
def test_a_backward_split_into_several_launches_gives_the_same_gradients(monkeypatch):
    import kernels.dilated_attention as dil

    monkeypatch.setattr(dil, "MAX_SEGMENTS_PER_LAUNCH", 3)  # 1 * 2 * ceil(50 / 16) = 8 segments: 3 launches
    B, H, T, D, ws, rs = GRAD_CASES["T not a multiple of w, H < r"]
    q, k, v, do = (randn(B, H, T, D, seed=120 + s) for s in range(4))
    (_, grads), (_, ref_grads) = kernel_and_reference_grads(q, k, v, do, ws, rs, causal=True)
    for name, g, ref in zip(("dQ", "dK", "dV"), grads, ref_grads):
        assert_close(g, ref, f"chunked backward: {name}", ATOL[torch.float32])


# ---- tier 4 -------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_matches_the_reference_on_the_device(causal):
    ws, rs = (512, 1024, 2048), (1, 2, 4)
    q, k, v = (randn(2, 8, 4096, 64, seed=s, dtype=torch.float16).cuda() for s in range(3))
    got = dilated_attention_kernel(q, k, v, ws, rs, causal=causal)
    want = dilated_attention(q.double(), k.double(), v.double(), ws, rs, causal=causal)
    assert_close(got, want, "fp16 on the device", 4e-3)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gradients_match_the_reference_on_the_device(causal):
    ws, rs = (512, 1024, 2048), (1, 2, 4)
    q, k, v, do = (randn(2, 8, 4096, 64, seed=s, dtype=torch.float16).cuda() for s in range(4))
    (_, grads), (_, ref_grads) = kernel_and_reference_grads(q, k, v, do, ws, rs, causal)
    for name, g, ref in zip(("dQ", "dK", "dV"), grads, ref_grads):
        assert_close(g, ref, f"fp16 {name} on the device", 1e-2 * max(1.0, ref.abs().max().item()))
