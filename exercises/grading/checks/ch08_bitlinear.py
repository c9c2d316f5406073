"""Chapter 08's graded checks: the ternary weight quantizer, the 8-bit activation quantizer, BitLinear with its
straight-through estimators, the 2-bit packing the kernels read, the decode inside the Triton kernel (run by
Triton's interpreter without a GPU) and the integer inference path with its experiment.

Each check tests what the BitNet b1.58 training code (the FAQ of microsoft/unilm bitnet/) promises, in float64,
against the learner's function (its first argument). Known-wrong solutions: exercises/grading/mutants/ch08_bitlinear.md.
"""

import math

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import F64, expect_close, expect_tensor, fmt, seeds

shapes = st.tuples(st.integers(1, 6), st.integers(2, 30))
# x (..., K): ranks 1 to 4, so a reduction over shape[1:] (or a flatten) instead of the last axis is seen
any_rank = st.builds(lambda lead, k: (*lead, k), st.lists(st.integers(1, 4), max_size=3), st.integers(2, 30))
scales = st.sampled_from([1e-3, 0.37, 1.0, 52.0])


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def naive_weight_quant(w):
    """scale = 1 / max(mean|w|, 1e-5) over the whole tensor; clamp(round(w scale), -1, 1) / scale per element."""
    flat = w.flatten().tolist()
    scale = 1.0 / max(sum(abs(v) for v in flat) / len(flat), 1e-5)
    return torch.tensor([min(1.0, max(-1.0, round(v * scale))) / scale for v in flat], dtype=F64).view(w.shape)


def naive_activation_quant(x):
    """Per row: scale = 127 / max(max|x|, 1e-5); clamp(round(x scale), -128, 127) / scale."""
    out = []
    for row in x.reshape(-1, x.size(-1)).tolist():
        scale = 127.0 / max(max(abs(v) for v in row), 1e-5)
        out.append([min(127.0, max(-128.0, round(v * scale))) / scale for v in row])
    return torch.tensor(out, dtype=F64).view(x.shape)


def naive_rms_norm(x, g, eps):
    out = [[v / math.sqrt(sum(u * u for u in row) / len(row) + eps) * gj for v, gj in zip(row, g.tolist())]
           for row in x.reshape(-1, x.size(-1)).tolist()]
    return torch.tensor(out, dtype=F64).view(x.shape)


def _max_diff(a, b):
    return (a.double() - b.double()).abs().max().item()


# ---- 8.1 weight_quant -------------------------------------------------------------------------------------
# corner cases: one row; K = 2 (the smallest drawn). Drawn (shapes).

@check("weight_quant(W) = clamp(round(W / mean|W|), -1, 1) * mean|W|, one scale for the whole tensor (the FAQ "
       "code), for every shape and scale of W", shape=shapes, c=scales, seed=seeds)
def weight_quant_matches_the_faq(weight_quant, shape, c, seed):
    w = _randn(*shape, seed=seed) * c
    out = expect_tensor(weight_quant(w.clone()), shape, F64, "weight_quant")
    ref = naive_weight_quant(w)
    if not _max_diff(out, ref) <= 1e-12 * c:
        codes = (out / w.abs().mean()).round().unique().tolist()
        raise Violation(f"weight_quant differs from clamp(round(W / mean|W|), -1, 1) mean|W| by {_max_diff(out, ref):.3g} "
                        f"(mean|W| = {w.abs().mean():.4g}); your values / mean|W| take the values {codes}")


@check("weight_quant(W) / mean|W| is exactly -1, 0 or +1, and for Gaussian W about 31% of the codes are 0 "
       "(P(|z| < mean|z| / 2) = 0.310)", seed=seeds)
def weight_codes_are_ternary(weight_quant, seed):
    w = _randn(256, 256, seed=seed)
    ratio = weight_quant(w) / w.abs().mean()
    values = sorted(ratio.round(decimals=9).unique().tolist())
    if not set(values) <= {-1.0, 0.0, 1.0}:
        raise Violation(f"weight_quant(W) / mean|W| takes the values {values[:8]}; it must be in {{-1, 0, 1}}")
    zeros = (ratio.abs() < 0.5).double().mean().item()
    # False rejection: 65536 codes, the fraction's standard error sqrt(0.31 0.69 / 65536) = 0.0018, so 0.015 is
    # 8.3 standard errors: P < 1e-16 for a correct quantizer (and the Gaussian W itself is seeded)
    if abs(zeros - 0.3101) > 0.015:
        raise Violation(f"for Gaussian W {zeros:.3f} of the codes are 0; round(W / mean|W|) gives 0.310")


@check("one scale per tensor: a row of small weights next to rows of large ones quantizes to 0 (a per-row "
       "scale would keep it)")
def weight_scale_is_per_tensor(weight_quant):
    w = torch.tensor([[0.01, -0.02, 0.015], [1.0, -2.0, 1.5], [0.9, 1.1, -1.3]], dtype=F64)
    out = weight_quant(w)
    if not _max_diff(out, naive_weight_quant(w)) <= 1e-12:
        raise Violation(f"for W = {w.tolist()} got {out.tolist()}; with one per-tensor scale mean|W| = "
                        f"{w.abs().mean():.4f} the first row is all 0: {naive_weight_quant(w).tolist()}")


# ---- 8.2 activation_quant ---------------------------------------------------------------------------------
# corner cases: x of rank 1 to 4 (one scale per token over the last axis only); one token. Drawn (any_rank).

@check("activation_quant(x) = clamp(round(x s), -128, 127) / s with s = 127 / max|x| over the last dimension "
       "(one scale per token), for every shape of rank 1 to 4 and scale", shape=any_rank, c=scales, seed=seeds)
def activation_quant_matches_the_faq(activation_quant, shape, c, seed):
    x = _randn(*shape, seed=seed) * c
    out = expect_tensor(activation_quant(x.clone()), shape, F64, "activation_quant")
    ref = naive_activation_quant(x)
    expect_close(out, ref, 1e-12 * c, "activation_quant differs from the per-token absmax equation",
                 f" for x of shape {shape} times {c}")


@check("each row's codes x_q * 127 / max|x| are integers in [-127, 127], each row keeps its absmax, and scaling "
       "one row by 100 scales its quantized row by 100 and leaves the others alone", seed=seeds)
def activation_codes_per_token(activation_quant, seed):
    x = _randn(4, 50, seed=seed)
    out = activation_quant(x)
    codes = out * 127 / x.abs().amax(-1, keepdim=True)
    if not ((codes - codes.round()).abs().max() < 1e-9 and codes.abs().max() <= 127 + 1e-9):
        raise Violation(f"x_q * 127 / max|x| per row should be integers in [-127, 127]; got values from "
                        f"{codes.min():.4f} to {codes.max():.4f}, {((codes - codes.round()).abs() > 1e-9).sum()} "
                        f"non-integers")
    if not _max_diff(out.abs().amax(-1), x.abs().amax(-1)) <= 1e-12:
        raise Violation(f"row absmax changed: {x.abs().amax(-1).tolist()} -> {out.abs().amax(-1).tolist()}")
    y = x.clone()
    y[1] *= 100
    out2 = activation_quant(y)
    if not (_max_diff(out2[1], 100 * out[1]) <= 1e-10 and _max_diff(out2[[0, 2, 3]], out[[0, 2, 3]]) <= 1e-12):
        raise Violation("scaling row 1 of x by 100 changed the other rows (or did not scale row 1 by 100): the "
                        "scale must be per token, over the last dimension only")


# ---- 8.3 bitlinear ----------------------------------------------------------------------------------------
# corner cases: x of rank 1, 2 and 3; n = 1 output; with and without bias; eps 0 and large; binary. Drawn.

def _layer(k, n, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=F64) * 0.1
    gain = 1 + 0.3 * torch.randn(k, generator=g, dtype=F64)
    x = torch.randn(3, k, generator=g, dtype=F64) * 2
    return x, w, gain


@check("bitlinear(x, W, g, b, eps, binary) = activation_quant(RMSNorm(x) * g) W_q^T (+ bias), the RMSNorm "
       "x / sqrt(mean(x^2) + eps) inside, W_q = weight_quant(W) or, with binary=True, sign(W - mean W) mean|W|, "
       "for x of rank 1 to 3 and eps from 0 to 4", k=st.integers(2, 24), n=st.integers(1, 8), with_bias=st.booleans(),
       eps=st.sampled_from([1e-5, 0.0, 0.5, 4.0]), binary=st.booleans(),
       lead=st.sampled_from([(3,), (), (2, 3)]), seed=seeds)
def bitlinear_forward(bitlinear, k, n, with_bias, eps, binary, lead, seed):
    _, w, gain = _layer(k, n, seed)
    x = _randn(*lead, k, seed=seed + 7) * 2  # mean x^2 about 4: eps = 0.5 or 4 moves every token's norm
    b = torch.linspace(-1, 1, n, dtype=F64) if with_bias else None
    out = expect_tensor(bitlinear(x, w, gain, b, eps, binary), (*lead, n), F64, "bitlinear")
    w_q = (w - w.mean()).sign() * w.abs().mean() if binary else naive_weight_quant(w)
    h = naive_rms_norm(x, gain, eps)
    ref = naive_activation_quant(h) @ w_q.T
    ref = ref if b is None else ref + b
    if not _max_diff(out, ref) <= 1e-10:
        plus = 0 if b is None else b
        why = ""
        if _max_diff(out, naive_activation_quant(x) @ w_q.T + plus) < 1e-10:
            why = ": the RMSNorm of the input is missing"
        elif _max_diff(out, naive_activation_quant(naive_rms_norm(x, torch.ones_like(gain), eps)) @ w_q.T + plus) < 1e-10:
            why = ": the RMSNorm's gain norm_weight was not applied"
        elif eps != 1e-5 and _max_diff(out, naive_activation_quant(naive_rms_norm(x, gain, 1e-5)) @ w_q.T + plus) < 1e-10:
            why = f": that is the output with eps = 1e-5, not the eps = {eps:g} passed in"
        elif binary and _max_diff(out, naive_activation_quant(h) @ naive_weight_quant(w).T + plus) < 1e-10:
            why = ": binary=True was ignored (the ternary weight_quant was used, not sign(W - mean W) mean|W|)"
        elif b is not None and _max_diff(out, ref - b) < 1e-10:
            why = ": the bias was not added"
        raise Violation(f"bitlinear (eps = {eps:g}, binary = {binary}, bias {'given' if b is not None else 'None'}, "
                        f"x {tuple(x.shape)}) differs from aq(RMSNorm(x)) W_q^T{' + b' if b is not None else ''} by "
                        f"{_max_diff(out, ref):.3g}{why}")


@check("straight-through estimators: the gradient w.r.t. the latent W is g_y^T x_q (the gradient w.r.t. W_q), "
       "and the gradient w.r.t. x and the gain is that of F.linear(RMSNorm(x) g, W_q) (the quantizers act as the "
       "identity in the backward)", seed=seeds)
def bitlinear_straight_through(bitlinear, seed):
    x, w, gain = _layer(12, 5, seed)
    gy = _randn(3, 5, seed=seed + 1)
    xl, wl, gl = (t.clone().requires_grad_() for t in (x, w, gain))
    bitlinear(xl, wl, gl, None, 1e-5).backward(gy)
    if wl.grad is None or xl.grad is None or gl.grad is None:
        missing = [n for n, t in (("W", wl), ("x", xl), ("gain", gl)) if t.grad is None]
        raise Violation(f"no gradient reached {', '.join(missing)}: the quantized values must stay connected to "
                        f"the graph through v + (q(v) - v).detach()")
    xq = naive_activation_quant(naive_rms_norm(x, gain, 1e-5))
    expect_close(wl.grad, gy.T @ xq, 1e-10, "dL/dW differs from g_y^T x_q",
                 f" (max |g_y^T x_q| {(gy.T @ xq).abs().max():.3g}); the STE passes dL/dW_q to W unchanged", "dL/dW")
    xr, gr = x.clone().requires_grad_(), gain.clone().requires_grad_()
    h = xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-5) * gr
    (h @ naive_weight_quant(w).T).backward(gy)
    if not (_max_diff(xl.grad, xr.grad) <= 1e-10 and _max_diff(gl.grad, gr.grad) <= 1e-10):
        raise Violation(f"dL/dx differs from the gradient through RMSNorm with identity quantizers by "
                        f"{_max_diff(xl.grad, xr.grad):.3g} (dL/dgain by {_max_diff(gl.grad, gr.grad):.3g})")


@check("with eps = 0 the output does not depend on the scale of the input (the RMSNorm comes first)",
       c=st.sampled_from([1e-3, 0.1, 30.0, 1e4]), seed=seeds)
def bitlinear_scale_invariant(bitlinear, c, seed):
    x, w, gain = _layer(16, 4, seed)
    a, b = bitlinear(x, w, gain, None, 0.0), bitlinear(c * x, w, gain, None, 0.0)
    expect_close(b, a, 1e-10 * max(1.0, a.abs().max().item()), f"bitlinear({c} x) differs from bitlinear(x)",
                 ": normalize the input first (RMSNorm), so that the per-token scale cannot leak into the output")


# ---- 8.4 pack_ternary -------------------------------------------------------------------------------------
# corner cases: K = 1, 2, 3 (one byte, padded); K a multiple of 4 (no padding); K = 5 (a padded second
# byte); one row. Pinned: PINNED_PACKS.
PINNED_PACKS = [dict(n=1, k=1, seed=0), dict(n=2, k=4, seed=1), dict(n=3, k=5, seed=2), dict(n=1, k=3, seed=3)]

@check("codes [-1, 0, 1, 1, 1] pack to the two bytes 0b10100100, 0b01010110: code + 1 in bits 2(k mod 4) of byte "
       "k // 4 (little-endian fields), the last byte padded with code 1 (weight 0)")
def packing_layout(pack_ternary):
    out = pack_ternary(torch.tensor([[-1, 0, 1, 1, 1]], dtype=torch.int8))
    out = expect_tensor(out, (1, 2), torch.uint8, "pack_ternary of a (1, 5) tensor")
    if out.tolist() != [[0b10100100, 0b01010110]]:
        raise Violation(f"got bytes {[f'{b:08b}' for b in out[0].tolist()]}, expected ['10100100', '01010110']")


@check("unpack_ternary(pack_ternary(codes), K) == codes for every (N, K), and the packed tensor is (N, ceil(K/4)) "
       "uint8", n=st.integers(1, 6), k=st.integers(1, 40), seed=seeds, examples=PINNED_PACKS)
def packing_round_trip(pack_ternary, n, k, seed):
    from nanomodels.bitlinear import unpack_ternary

    codes = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = expect_tensor(pack_ternary(codes.clone()), (n, math.ceil(k / 4)), torch.uint8, "pack_ternary")
    back = unpack_ternary(packed, k)
    if not torch.equal(back, codes):
        i = tuple(int(v) for v in (back != codes).nonzero()[0])
        raise Violation(f"round trip changed code {i}: {int(codes[i])} -> {int(back[i])} (codes {codes.tolist()})")


# ---- 8.5 unpack_ternary -----------------------------------------------------------------------------------
# corner cases: as 8.4 (PINNED_PACKS): K = 1, 3, 4 and 5, one row.

@check("the bytes 0b10100100, 0b01010110 decode to [-1, 0, 1, 1, 1] with K = 5 and to [-1, 0, 1, 1, 1, 0, 0, 0] "
       "with K = 8: code (byte >> 2 (k mod 4)) & 3, minus 1, cropped to K")
def unpacking_known_bytes(unpack_ternary):
    packed = torch.tensor([[0b10100100, 0b01010110]], dtype=torch.uint8)
    for k, expected in ((5, [-1, 0, 1, 1, 1]), (8, [-1, 0, 1, 1, 1, 0, 0, 0])):
        out = expect_tensor(unpack_ternary(packed.clone(), k), (1, k), torch.int8, f"unpack_ternary(..., K={k})")
        if out.tolist() != [expected]:
            raise Violation(f"K = {k}: got {out.tolist()[0]}, expected {expected}")


@check("unpack_ternary(pack_ternary(codes), K) == codes (int8, shape (N, K)) for every (N, K)",
       n=st.integers(1, 6), k=st.integers(1, 40), seed=seeds, examples=PINNED_PACKS)
def unpacking_round_trip(unpack_ternary, n, k, seed):
    from nanomodels.bitlinear import pack_ternary

    codes = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    back = expect_tensor(unpack_ternary(pack_ternary(codes), k), (n, k), torch.int8, "unpack_ternary")
    if not torch.equal(back, codes):
        i = tuple(int(v) for v in (back != codes).nonzero()[0])
        raise Violation(f"code {i} came back as {int(back[i])}, it was {int(codes[i])} (codes {codes.tolist()})")


# ---- 8.6 the decode inside the Triton kernel ------------------------------------------------------------------
# corner cases (KERNEL_CASES): K not a multiple of BLOCK_K or of 4; one row (M = 1); M, N not multiples of
# the blocks.

# (M, N, K, BLOCK_M, BLOCK_N, BLOCK_K): K not a multiple of 4 nor of the block, N odd, M and N past one tile
KERNEL_CASES = ((5, 7, 37, 16, 16, 32), (3, 33, 64, 16, 32, 32), (17, 9, 130, 16, 16, 64), (1, 40, 200, 16, 32, 64))


def run_ternary_kernel(kernel, x, packed, K, blocks, scales=None):
    """Launch the learner's _ternary_matmul_kernel on int8 x (M, K) and packed W (N, ceil(K / 4)) with the block
    sizes (BLOCK_M, BLOCK_N, BLOCK_K): the int32 (M, N) it stores (RESCALE=False), or with scales = (s_x (M,)
    float32, s_W () float32) the float32 acc / s_x / s_W (RESCALE=True). Under the interpreter (no GPU) on CPU
    tensors; with a GPU, compiled on the device."""
    from kernels import HAS_TRITON, INTERPRET

    if not HAS_TRITON:
        raise Violation("Triton is not installed here (it has Linux wheels only): exercise 8.6 needs its interpreter")
    kernel = getattr(kernel, "__wrapped__", kernel)  # the graded function is the @triton.jit kernel itself
    if not hasattr(kernel, "__getitem__"):
        raise Violation(f"_ternary_matmul_kernel is a {type(kernel).__name__}, not a @triton.jit kernel: keep the "
                        "decorator")
    device = "cpu" if INTERPRET else "cuda"
    M, N = x.size(0), packed.size(0)
    bm, bn, bk = blocks
    x, packed = x.to(device), packed.to(device)
    y = torch.full((M, N), -77, dtype=torch.int32 if scales is None else torch.float32, device=device)
    xs, ws = (y, y) if scales is None else (s.to(device) for s in scales)
    try:
        kernel[(math.ceil(M / bm), math.ceil(N / bn))](x, packed, xs, ws, y, M, N, K, x.stride(0), packed.stride(0),
                                                        y.stride(0), RESCALE=scales is not None, BLOCK_M=bm,
                                                        BLOCK_N=bn, BLOCK_K=bk)
    except Exception as exc:  # the interpreter wraps what the kernel raised: report that, at its line
        if type(exc).__name__ == "InterpreterError" and exc.__cause__ is not None:
            raise exc.__cause__ from None
        if "NotImplementedError" in str(exc):
            raise NotImplementedError("Exercise 8.6: decoding the 2-bit weights inside the Triton kernel") from None
        raise
    return y.cpu()


def _decoding_mistake(got_t, codes):
    """What a wrong decode looks like, from the decoded W^T (K, N) next to the true codes (N, K)."""
    fields = codes.long() + 1  # the stored 2-bit fields
    K = codes.size(1)
    order = torch.arange(K)
    reversed_fields = (fields[:, (order // 4) * 4 + 3 - order % 4] if K % 4 == 0 else None)
    for wrong, what in ((fields, "the stored fields c = w + 1 in {0, 1, 2}: the -1 is missing"),
                        (fields % 2 - 1, "codes from 1 bit of each field: keep both bits of a field"),
                        (reversed_fields - 1 if reversed_fields is not None else None,
                         "the four fields of each byte in reverse order: weight k is in the bits 2 (k mod 4) up"),):
        if wrong is not None and torch.equal(got_t, wrong.T.int()):
            return f" (it looks like {what})"
    return ""


@check("with X = the identity the kernel returns W^T exactly: every weight (n, k) decodes from its byte and 2-bit "
       "field to -1, 0 or 1, for K with a tail (not a multiple of 4 nor of BLOCK_K) and odd N")
def kernel_decodes_every_weight(_ternary_matmul_kernel):
    for n, k, blocks in ((5, 12, (16, 16, 32)), (7, 37, (16, 16, 32)), (33, 68, (16, 32, 32))):
        g = torch.Generator().manual_seed(k)
        codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        codes[0, :3] = torch.tensor([-1, 0, 1], dtype=torch.int8)  # every value appears
        eye = torch.eye(k, dtype=torch.int8)
        got = run_ternary_kernel(_ternary_matmul_kernel, eye, _pack(codes), k, blocks)  # (K, N) = W^T
        if not torch.equal(got, codes.T.int()):
            kk, col = (int(v) for v in (got != codes.T.int()).nonzero()[0])
            byte = int(_pack(codes)[col, kk // 4])
            raise Violation(f"N = {n}, K = {k}: weight (n = {col}, k = {kk}) is {int(codes[col, kk])}, stored in "
                            f"byte {byte:08b} (row {col}, byte {kk // 4}, field {kk % 4}), but the kernel gave "
                            f"{int(got[kk, col])}{_decoding_mistake(got, codes)}")


@check("the kernel's int32 accumulators equal X W^T exactly (an int64 oracle) for int8 X over the whole range "
       "[-128, 127], several K blocks with a tail, and M, N past one tile")
def kernel_matmul_is_exact(_ternary_matmul_kernel):
    for m, n, k, *blocks in KERNEL_CASES:
        g = torch.Generator().manual_seed(m * n + k)
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        x[0, 0], x[-1, -1] = -128, 127
        codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        got = run_ternary_kernel(_ternary_matmul_kernel, x, _pack(codes), k, blocks)
        want = (x.long() @ codes.long().T).int()
        if not torch.equal(got, want):
            bad = got != want
            raise Violation(f"M = {m}, N = {n}, K = {k}, blocks {tuple(blocks)}: {int(bad.sum())} of {bad.numel()} "
                            f"results differ from X W^T, max |diff| {int((got.long() - want.long()).abs().max())}")


@check("RESCALE=True, the path ternary_matmul runs: the kernel stores acc / s_x[m] / s_W in float32, one "
       "activation scale per row and the weight scale, both far from 1, for K with a tail and M, N past one tile")
def kernel_rescale_path(_ternary_matmul_kernel):
    for m, n, k, *blocks in KERNEL_CASES[:3]:
        g = torch.Generator().manual_seed(m + n + k)
        x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)
        codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
        s_x = torch.logspace(-3, 3, m, dtype=torch.float32)  # one scale per row, 1e-3 to 1e3
        s_w = torch.tensor(37.5, dtype=torch.float32)
        got = run_ternary_kernel(_ternary_matmul_kernel, x, _pack(codes), k, blocks, (s_x, s_w))
        acc = (x.long() @ codes.long().T).float()
        want = acc / s_x[:, None] / s_w
        if not torch.allclose(got, want, rtol=1e-6, atol=0):
            bad = ~torch.isclose(got, want, rtol=1e-6, atol=0)
            i, j = (int(v) for v in bad.nonzero()[0])
            why = ""
            if torch.allclose(got * s_x[:, None] * s_w, acc, rtol=1e-4):
                why = " (the rescale is right, so the decode or the mask of a tile differs from the integer path)"
            raise Violation(f"RESCALE=True, M = {m}, N = {n}, K = {k}: y[{i}, {j}] = {got[i, j].item():.6g}, expected "
                            f"acc / s_x / s_W = {want[i, j].item():.6g} with s_x[{i}] = {s_x[i].item():.3g}, s_W = "
                            f"37.5{why}")


# ---- 8.7 the integer inference path -------------------------------------------------------------------------
# corner cases: x of rank 1 to 3 with a leading axis of 1; K = 1; n = 1; rows scaled 0.01 to 100; binary;
# with and without bias. Drawn (lead sampled from five shapes).

def _exported(w, binary=False):
    """(packed, s_W) of latent weights W, as TernaryLinear.from_bitlinear stores them (quantized once)."""
    from nanomodels.bitlinear import quantize_weight

    codes, scale = quantize_weight(w, binary=binary)
    return _pack(codes), scale


@check("ternary_linear(x, packed codes of W, s_W, g, b) equals bitlinear(x, W, g, b), the fake-quant training "
       "forward, to 1e-10 in float64: one int8 scale per token, the 2-bit codes, both rescales, the bias, any "
       "leading dimensions (x of rank 1 to 4)", k=st.integers(1, 40), n=st.integers(1, 9),
       lead=st.sampled_from([(), (1,), (3,), (2, 3), (2, 1, 2)]), with_bias=st.booleans(), binary=st.booleans(),
       eps=st.sampled_from([1e-5, 0.0, 3.0]), seed=seeds)
def integer_path_equals_fake_quant(ternary_linear, k, n, lead, with_bias, binary, eps, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g, dtype=F64) * 0.1
    gain = 1 + 0.3 * torch.randn(k, generator=g, dtype=F64)
    spread = torch.logspace(-2, 2, lead[-1], dtype=F64)[:, None] if lead else 3.0  # rows scaled 0.01 to 100
    x = torch.randn(*lead, k, generator=g, dtype=F64) * spread
    b = torch.linspace(-1, 1, n, dtype=F64) if with_bias else None
    packed, scale = _exported(w, binary)
    out = expect_tensor(ternary_linear(x, packed, scale, gain, b, eps), (*lead, n), F64, "ternary_linear")
    w_q = (w - w.mean()).sign() * w.abs().mean() if binary else naive_weight_quant(w)
    ref = naive_activation_quant(naive_rms_norm(x, gain, eps)) @ w_q.T + (0 if b is None else b)
    expect_close(out, ref, 1e-10 * max(1.0, ref.abs().max().item()),
                 f"x of shape {tuple(x.shape)} (rows scaled 0.01 to 100), W ({n}, {k}){' binary' if binary else ''}, "
                 f"eps = {eps:g}: ternary_linear differs from aq(RMSNorm(x)) wq(W)^T{' + b' if b is not None else ''}",
                 f" (max |y| {ref.abs().max():.3g})")


@check("the matmul runs through `gemm`, once, on the int8 codes (M, K) of RMSNorm(x), and y is gemm's int32 "
       "result / s_x / s_W: a gemm that adds 1 to every accumulator moves y by 1 / (s_x s_W)")
def integer_matmul_goes_through_gemm(ternary_linear):
    from nanomodels.bitlinear import ternary_matmul_reference

    g = torch.Generator().manual_seed(8)
    w = torch.randn(6, 20, generator=g, dtype=F64)
    gain = 1 + 0.3 * torch.randn(20, generator=g, dtype=F64)
    x = torch.randn(2, 3, 20, generator=g, dtype=F64) * 5
    packed, scale = _exported(w)
    calls = []

    def off_by_one_gemm(codes, packed_, K):
        calls.append((codes.dtype, tuple(codes.shape), codes.clone(), K))
        return ternary_matmul_reference(codes, packed_, K) + 1

    out = ternary_linear(x, packed, scale, gain, None, 1e-5, off_by_one_gemm)
    if len(calls) != 1:
        raise Violation(f"gemm was called {len(calls)} times; the integer matmul of all M = 6 rows is one call of "
                        "gemm(codes (M, K) int8, packed, K)")
    dtype, shape, codes, K = calls[0]
    h = naive_rms_norm(x, gain, 1e-5).reshape(6, 20)
    s_x = 127 / h.abs().amax(-1, keepdim=True)
    want_codes = (h * s_x).round()
    if dtype != torch.int8 or shape != (6, 20) or K != 20:
        raise Violation(f"gemm got codes of dtype {dtype} and shape {shape} with K = {K}; expected int8 (6, 20), "
                        "K = 20 (x (2, 3, 20) flattened to its 6 tokens)")
    if not torch.equal(codes.double(), want_codes):
        raise Violation(f"gemm got codes {fmt(codes[0, :6])}... for token 0; the int8 codes of RMSNorm(x) with "
                        f"one scale 127 / max|h| per token are {fmt(want_codes[0, :6])}...")
    acc = (want_codes @ unpack_codes(packed, 20).double().T + 1).view(2, 3, 6)
    want = acc / s_x.view(2, 3, 1) / scale
    expect_close(out, want, 1e-10 * want.abs().max().item(), "y differs from gemm's result / s_x / s_W",
                 ": the output must be computed from the int32 accumulators gemm returns")


def unpack_codes(packed, K):
    from nanomodels.bitlinear import unpack_ternary

    return unpack_ternary(packed, K)


def greedy_through_both_paths(ternary_linear, steps: int = 40, n_new: int = 24, seed: int = 0):
    """The experiment of exercise 8.7. A tiny BitNet LM (2 layers, width 32, float64) learns a next-token rule for
    `steps` AdamW steps (count up by one, mod 12); then it decodes greedily twice from the same prompt: with the fake-quant training forward
    (BitLinear), and exported (to_ternary) with every layer's forward computed by `ternary_linear`.
    Returns (fake-quant ids, integer-path ids, max |logit difference| on the prompt, final training loss)."""
    import copy
    import functools

    from nanomodels.bitlinear import BitLinear, BitNetResidual, TernaryLinear, to_ternary
    from nanomodels.transformer import Transformer, TransformerConfig

    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=12, block_size=32, n_layers=2, d_model=32, n_heads=4, bias=False,
                            tie_weights=False)
    model = Transformer(cfg, linear=BitLinear, residual=BitNetResidual).double()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):  # the rule: count up by one, mod 12, from a random start
        seq = (torch.randint(0, 12, (8, 1), generator=g) + torch.arange(17)) % 12
        _, loss = model(seq[:, :-1], targets=seq[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    integer = to_ternary(copy.deepcopy(model))
    for layer in integer.modules():
        if isinstance(layer, TernaryLinear):
            layer.forward = functools.partial(
                lambda x, m: ternary_linear(x, m.packed, m.weight_scale, m.norm_weight, m.bias, m.eps, m.gemm),
                m=layer)
    prompt = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        diff = (model(prompt)[0] - integer(prompt)[0]).abs().max().item()
    return (model.generate(prompt, n_new, temperature=0.0), integer.generate(prompt, n_new, temperature=0.0),
            diff, loss.item())


@check("the experiment: a tiny BitNet LM trained for 40 steps, exported to 2-bit codes with every layer run by "
       "ternary_linear, decodes the same 24 greedy tokens as its fake-quant training forward (float64), and its "
       "logits agree to 1e-9")
def same_greedy_tokens_through_both_paths(ternary_linear):
    fake, real, diff, _ = greedy_through_both_paths(ternary_linear)
    if not torch.equal(fake, real):
        first = int((fake != real).nonzero()[0, 1])
        raise Violation(f"the greedy tokens differ from position {first}: fake-quant {fake[0].tolist()}, integer "
                        f"path {real[0].tolist()} (max |logit difference| on the prompt {diff:.3g})")
    if not diff <= 1e-9:
        raise Violation(f"same greedy tokens, but the logits on the prompt differ by {diff:.3g}; in float64 the "
                        "two paths agree to about 1e-12")


def _pack(codes):
    from nanomodels.bitlinear import pack_ternary

    return pack_ternary(codes)


EXERCISES = {
    "8.1": Exercise(points=2, checks=[weight_quant_matches_the_faq, weight_codes_are_ternary,
                                      weight_scale_is_per_tensor],
                    hint='BitNet b1.58 quantizes a weight matrix to {-1, 0, +1} times one scale for the whole tensor.',
                    hints=('The scale comes from the mean absolute value of the weights (guarded against zero); the codes come from rounding and clipping.',
                           'Divide by the mean |W| (clamped at 1e-5), round, clip to [-1, 1], and multiply back by the mean |W|: a fake-quantized float tensor.')),
    "8.2": Exercise(points=2, checks=[activation_quant_matches_the_faq, activation_codes_per_token],
                    hint="Activations are quantized to 8 bits with one scale per token, from the token's largest magnitude.",
                    hints=('The scale is over the last dimension only, guarded against zero; the codes are rounded and clipped to the int8 range.',
                           'Multiply by 127 / max|x| of the token (clamped at 1e-5), round, clip to [-128, 127], divide by the same factor.')),
    "8.3": Exercise(points=3, checks=[bitlinear_forward, bitlinear_straight_through, bitlinear_scale_invariant],
                    hint='BitLinear normalizes its input, quantizes input and weight in the forward pass, and lets the gradient pass through both quantizers as if they were the identity.',
                    hints=('A straight-through estimator: the value of the quantized tensor, the gradient of the unquantized one (add the quantization error, detached).',
                           "RMSNorm of the input with the layer's weight and eps, then both quantizers with straight-through gradients, then an ordinary linear map with the bias.")),
    "8.4": Exercise(points=2, checks=[packing_layout, packing_round_trip],
                    hint='Four ternary weights fit in one byte: each code needs 2 bits once it is shifted to be non-negative.',
                    hints=('Pad the input dimension to a multiple of 4 with weight 0; weight k goes into bits 2 (k mod 4) of byte k // 4.',
                           'Codes w + 1 as uint8, grouped by four along K; OR the four fields, each shifted left by 0, 2, 4 and 6 bits.')),
    "8.5": Exercise(points=2, checks=[unpacking_known_bytes, unpacking_round_trip],
                    hint='Unpacking inverts the packing: four 2-bit fields per byte, in the same order.',
                    hints=('Shift each byte right by the four field offsets at once (broadcast), keep 2 bits, and undo the +1.',
                           'Fields (byte >> 0, 2, 4, 6) & 3 along a new last dimension, flattened along K, cut to the first K columns, minus 1, as int8.')),
    "8.6": Exercise(points=3, checks=[kernel_decodes_every_weight, kernel_matmul_is_exact, kernel_rescale_path],
                    hint='Inside the kernel the decode of exercise 8.5 runs on a whole tile at once: for each row k of the (BLOCK_K, BLOCK_N) tile of W^T, one byte per column and one 2-bit field of it.',
                    hints=("Row k of the tile needs byte k // 4 of each packed row n (w_rows already points at the rows); the field's shift depends on k only, so it broadcasts along the columns. Mask the loads past K and past N.",
                           "Load the bytes at w_rows plus k // 4 as a column vector, masked where k >= K or n >= N (other=0); shift them right by 2 (k mod 4) (as uint8, one shift per row), keep the low two bits, convert to int8 and subtract 1 so that tl.dot sees -1, 0 and 1.")),
    "8.7": Exercise(points=4, checks=[integer_path_equals_fake_quant, integer_matmul_goes_through_gemm,
                                      same_greedy_tokens_through_both_paths],
                    hint='At inference BitLinear needs no float matmul: normalize, quantize each token to int8, multiply the int8 codes by the 2-bit weights in integers, then undo both scales.',
                    hints=("The weights were quantized once, offline (codes in packed, s_W); the activations are quantized on every call with one scale per token (quantize_activation gives codes and s_x). The integer matmul works on 2-D (M, K) codes; put the leading dimensions back afterwards.",
                           "RMSNorm with the gain and eps; int8 codes and s_x of the result; flatten the codes to (M, K) and call gemm once; view the int32 result as (..., N), convert to x's dtype, divide by s_x (per token) and by s_W; add the bias last.")),
}
