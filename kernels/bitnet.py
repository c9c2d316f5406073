"""BitNet b1.58 inference kernels in Triton: the activation quantizer fused with its RMSNorm, and the ternary
matmul on 2-bit packed weights (nanomodels/bitlinear.py has the equations and the packing).

1. `rmsnorm_quant`: one program per row (the row kernels of kernels/layernorm.py, extended):
       h = x / sqrt(mean(x^2) + eps) * g          RMSNorm with gain g
       s = 127 / max(max|h|, 1e-5)                 per-token absmax scale
       q = clamp(round(h s), -128, 127)            int8 codes
   Eager PyTorch reads and writes the row four times (norm, abs-max, scale, round); this reads it once and
   writes one byte per element plus one float per row. Rounding is half away from zero,
   where(y >= 0, floor(y + 0.5), ceil(y - 0.5)) (torch.round is half to even; the two differ only at exact ties,
   which random data never hits; libdevice.rint does not exist in the interpreter).
2. `ternary_matmul`: acc = X_int8 W^T over tiles, W read as bytes. A tile of W^T (BLOCK_K, BLOCK_N) loads byte
   k // 4 of each row and decodes (byte >> 2 (k mod 4)) & 3, minus 1, to int8; `tl.dot(int8, int8) -> int32`
   runs on the integer tensor cores (mma.sync m16n8k32 s8 on sm_80, wgmma s8 on sm_90). The int32
   accumulator is exact; then y = acc / s_x / s_W. Each weight byte is 4 bytes of int8 once decoded: the
   weights cross memory at 2 bits each, which is the point for a memory-bound GEMV.
"""

import torch

from kernels import INTERPRET, AotSpec, Benchmark, backend, check_grid, tl, triton
from nanomodels.bitlinear import quantize_activation, rms_norm, ternary_matmul_reference

MAX_COLS = 16384  # rmsnorm_quant holds the whole row in registers


def rmsnorm_quant_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5):
    """(int8 codes, float scale (..., 1)) of activation_quant(RMSNorm(x)), in PyTorch (nanomodels.bitlinear)."""
    return quantize_activation(rms_norm(x, weight, eps))


@triton.jit
def _rmsnorm_quant_kernel(X, W, Q, S, n_cols, stride_x, stride_q, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 so that row * stride cannot overflow
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    h = x * rstd * tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)
    scale = 127.0 / tl.maximum(tl.max(tl.abs(h), axis=0), 1e-5)
    y = h * scale
    q = tl.where(y >= 0, tl.floor(y + 0.5), tl.ceil(y - 0.5))  # round half away from zero
    q = tl.minimum(tl.maximum(q, -128.0), 127.0)
    tl.store(Q + row * stride_q + cols, q.to(tl.int8), mask=inside)
    tl.store(S + row, scale)


@triton.jit
def _ternary_matmul_kernel(X, WP, XS, WS, Y, M, N, K, stride_xm, stride_wn, stride_ym,
                           RESCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr):
    """One (BLOCK_M, BLOCK_N) tile of Y = X W^T. X: int8 codes (M, K), rows stride_xm apart. WP: W packed 2 bits
    per weight, uint8 (N, ceil(K / 4)), rows stride_wn apart: weight (n, k) is code c = w + 1 in {0, 1, 2} at bits
    2 (k mod 4) .. 2 (k mod 4) + 1 of byte (n, k // 4). Each step of the K loop decodes a (BLOCK_K, BLOCK_N) tile
    of W^T to int8 in {-1, 0, 1}; rows k >= K and columns n >= N are masked (their x is 0, their y not stored).
    RESCALE: Y = acc / XS[m] / WS (float32); otherwise the int32 accumulators."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    x_rows = X + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1) row starts
    w_rows = WP + rn.to(tl.int64)[None, :] * stride_wn  # (1, BLOCK_N): W^T's columns are W's packed rows
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        x = tl.load(x_rows + k[None, :], mask=(rm[:, None] < M) & (k[None, :] < K), other=0)  # (BM, BK) int8
        # BEGIN EXERCISE 8.6: decoding the 2-bit weights inside the Triton kernel
        byte = tl.load(w_rows + (k // 4)[:, None], mask=(k[:, None] < K) & (rn[None, :] < N), other=0)
        w = ((byte >> ((k % 4) * 2)[:, None].to(tl.uint8)) & 3).to(tl.int8) - 1  # (BK, BN) in {-1, 0, 1}
        # END EXERCISE
        acc += tl.dot(x, w, out_dtype=tl.int32)  # padding rows of x are 0, so w there does not matter
    out = Y + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    inside = (rm[:, None] < M) & (rn[None, :] < N)
    if RESCALE:
        xs = tl.load(XS + rm, mask=rm < M, other=1.0)
        y = acc.to(tl.float32) / xs[:, None] / tl.load(WS)
        tl.store(out, y, mask=inside)
    else:
        tl.store(out, acc, mask=inside)


def _check_quant(x, weight):
    if not isinstance(x, torch.Tensor) or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) \
            or x.dim() < 1 or not 0 < x.size(-1) <= MAX_COLS:
        raise ValueError(f"x: a float16/bfloat16/float32 tensor whose last dimension is in [1, {MAX_COLS}], got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (x.size(-1),) \
            or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"weight: the RMSNorm gain must be float16/bfloat16/float32 of shape ({x.size(-1)},), got "
                         f"{getattr(weight, 'dtype', type(weight))} {tuple(getattr(weight, 'shape', ()))}")


def _quant_warps(block: int) -> int:
    return 16 if block >= 8192 else 4


def rmsnorm_quant(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5, *, out=None):
    """(codes int8 shaped like x, scale float32 (..., 1)): activation_quant(RMSNorm(x) * weight) as integers,
    x_q = codes / scale. `out`, for 2-D x, receives the codes (the guard-band tests pass a view)."""
    _check_quant(x, weight)
    if backend(x) == "reference":
        codes, scale = rmsnorm_quant_reference(x.float(), weight.float(), eps)
        return codes, scale.float()
    n = x.size(-1)
    rows = x.reshape(-1, n)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    if backend(x) == "interpreter" and rows.dtype == torch.bfloat16:
        rows = rows.float()  # no bf16 arithmetic in the interpreter
    if out is not None and (out.dtype != torch.int8 or tuple(out.shape) != tuple(rows.shape)
                            or out.device != x.device or (out.numel() and out.stride(-1) != 1)):
        raise ValueError(f"out: must be an int8 tensor of shape {tuple(rows.shape)} on {x.device} with unit column "
                         f"stride (rows may be strided), got {out.dtype} {tuple(out.shape)} strides {out.stride()}")
    weight = weight.contiguous()  # the kernel reads the gain as W + cols
    codes = out if out is not None else torch.empty(rows.shape, dtype=torch.int8, device=x.device)
    scale = torch.empty(rows.size(0), dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(n)
    grid = check_grid((rows.size(0),), "x", "rows")
    _rmsnorm_quant_kernel[grid](rows, weight, codes, scale, n, rows.stride(0), codes.stride(0),
                                           float(eps), BLOCK=block, num_warps=_quant_warps(block))
    return (codes if out is not None else codes.view(x.shape)), scale.view(*x.shape[:-1], 1)


# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) on a GPU: a decode step (M <= 16 tokens), then a batch. BLOCK_K = 64:
# with 128, Triton 3.6 (GPU images ship it) spills registers (64x64x128, 4 warps: 348 B on sm_80, 224 B on sm_90;
# 16x64x128: 104 B / 12 B), Triton 3.9 does not; `python -m kernels.aot --only bitnet` compiles both configs.
GPU_BLOCKS = {"decode": (16, 64, 64, 4), "batch": (64, 64, 64, 8)}


def _blocks(M: int):
    if INTERPRET:
        return 16, 32, 64, 4  # one small config on the interpreter path
    return GPU_BLOCKS["decode" if M <= 16 else "batch"]


def check_packed(packed, K: int) -> None:
    """ValueError naming `packed` unless it is 2-bit packed ternary weights for rows of K: uint8 (N, ceil(K/4))."""
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2 \
            or packed.size(1) != (K + 3) // 4:
        raise ValueError(f"packed: must be uint8 of shape (N, ceil(K/4) = {(K + 3) // 4}), got "
                         f"{getattr(packed, 'dtype', None)} {tuple(getattr(packed, 'shape', ()))}")


def ternary_matmul(x_codes: torch.Tensor, packed: torch.Tensor, K: int, x_scale=None, w_scale=None,
                   *, out=None) -> torch.Tensor:
    """X_int8 W_tern^T: int8 (M, K) x packed uint8 (N, ceil(K/4)) -> int32 (M, N), exact; with x_scale (M, 1)
    and w_scale (a 0-d tensor) -> float32 acc / x_scale / w_scale. `out` receives the result (guard bands)."""
    if not isinstance(x_codes, torch.Tensor) or x_codes.dtype != torch.int8 or x_codes.dim() != 2 \
            or x_codes.size(1) != K:
        raise ValueError(f"x_codes: must be int8 of shape (M, K={K}), got {getattr(x_codes, 'dtype', None)} "
                         f"{tuple(getattr(x_codes, 'shape', ()))}")
    check_packed(packed, K)
    if (x_scale is None) != (w_scale is None):
        raise ValueError("x_scale, w_scale: pass both (a rescaled float32 result) or neither (int32 accumulators)")
    rescale = x_scale is not None
    M, N = x_codes.size(0), packed.size(0)
    dtype = torch.float32 if rescale else torch.int32
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != dtype or tuple(out.shape) != (M, N)
                            or out.device != x_codes.device):
        raise ValueError(f"out: must be a {dtype} tensor of shape ({M}, {N}) on {x_codes.device} (the "
                         f"{'rescaled' if rescale else 'int32'} result), got {getattr(out, 'dtype', type(out))} "
                         f"{tuple(getattr(out, 'shape', ()))}")
    if backend(x_codes) == "reference":
        acc = ternary_matmul_reference(x_codes, packed, K)
        y = acc.float() / x_scale.float() / w_scale.float() if rescale else acc
        return y if out is None else out.copy_(y)
    x, w = x_codes.contiguous(), packed.contiguous()
    # the kernel stores with a row stride and unit column stride; any other `out` gets the result by a copy
    direct = out is not None and (out.numel() == 0 or out.stride(1) == 1)
    y = out if direct else torch.empty(M, N, dtype=dtype, device=x.device)
    xs = x_scale.reshape(M).float().contiguous() if rescale else y
    ws = w_scale.reshape(1).float() if rescale else y
    bm, bn, bk, warps = _blocks(M)
    grid = check_grid((triton.cdiv(M, bm), triton.cdiv(N, bn)), "packed", f"(M / {bm}, N / {bn}) tiles")
    _ternary_matmul_kernel[grid](x, w, xs, ws, y, M, N, K, x.stride(0), w.stride(0), y.stride(0),
                                 RESCALE=rescale, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    return y if out is None or direct else out.copy_(y)


def ternary_gemm_triton(x_codes: torch.Tensor, packed: torch.Tensor, K: int) -> torch.Tensor:
    """The integer matmul hook of nanomodels.bitlinear.TernaryLinear (`gemm=`), by the Triton kernel."""
    return ternary_matmul(x_codes, packed, K)


# ----------------------------------------------------------------------------- registry (compile tier, bench)

AOT_SPECS = [  # rmsnorm_quant at the largest BLOCK of each warp count (4096: 4, 16384: 16 warps)
    AotSpec(f"rmsnorm_quant fp16 (BLOCK {block})", _rmsnorm_quant_kernel, {"X": "*fp16", "W": "*fp16", "Q": "*i8",
            "S": "*fp32"}, {"BLOCK": block}, scalars={"eps": "fp32"}, num_warps=_quant_warps(block),
            divisible=("stride_x",)) for block in (4096, MAX_COLS)
] + [AotSpec(f"ternary_matmul int8 x 2-bit, {case} ({bm}x{bn}x{bk}, {warps} warps)", _ternary_matmul_kernel,
             {"X": "*i8", "WP": "*u8", "XS": "*fp32", "WS": "*fp32", "Y": "*fp32"},
             {"RESCALE": True, "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=3,
             mma=bm >= 64, divisible=("stride_xm", "stride_wn", "stride_ym"))
       for case, (bm, bn, bk, warps) in GPU_BLOCKS.items()]  # mma: wgmma on sm_90 needs tiles of 64 rows; the
# 16-row decode tile compiles to mma.sync there (int8 tensor cores too; tests/kernels/test_bitnet.py checks both)


def _bench_gpu(quick: bool, time_ms) -> list:
    from nanomodels.bitlinear import pack_ternary

    rows = []
    for m, n, k in [(1, 8192, 8192)] if quick else [(1, 8192, 8192), (1, 20480, 3200), (64, 8192, 8192)]:
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
        packed = pack_ternary(codes)
        x = torch.randint(-127, 128, (m, k), dtype=torch.int8, device="cuda")
        xs, ws = torch.ones(m, 1, device="cuda"), torch.ones((), device="cuda")
        wb, xb = codes.bfloat16(), x.bfloat16()
        for impl, fn, nbytes in (("triton 2-bit", lambda: ternary_matmul(x, packed, k, xs, ws), packed.numel()),
                                 ("torch bf16", lambda: xb @ wb.T, wb.numel() * 2)):
            ms = time_ms(fn)
            rows.append({"impl": impl, "mode": "fwd", "shape": f"{m}x{n}x{k}", "case": "-", "ms": ms,
                         "gbs": nbytes / ms / 1e6})
    return rows


def _bench_cpu(quick: bool) -> list:
    """Without a GPU: exactness of both kernels against the PyTorch reference (interpreter or reference)."""
    from nanomodels.bitlinear import pack_ternary

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 300, generator=g)
    w = torch.rand(300, generator=g) + 0.5
    codes, scale = rmsnorm_quant(x, w)
    ref_codes, ref_scale = rmsnorm_quant_reference(x.double(), w.double())
    wc = torch.randint(-1, 2, (70, 300), generator=g, dtype=torch.int8)
    acc = ternary_matmul(codes, pack_ternary(wc), 300)
    return [{"case": "rmsnorm_quant 5x300", "codes off by 1": float((codes != ref_codes).sum()),
             "scale rel err": float(((scale - ref_scale) / ref_scale).abs().max())},
            {"case": "ternary_matmul 5x70x300", "wrong int32": float((acc != codes.int() @ wc.int().T).sum())}]


BENCHMARKS = [Benchmark("bitnet", gpu=_bench_gpu, cpu=_bench_cpu)]
