"""Fused adaLN modulate in Triton, forward and backward: y = LN(x) * (1 + scale) + shift, one pass per row.

The diffusion head of LatentLM (nanomodels/diffusion.py, `modulate`) normalizes each token's activations and
then modulates them with a per-token (shift, scale) computed from the condition. Eager PyTorch runs a
LayerNorm, a multiply and an add as separate kernels and writes the normalized row to memory between them;
here one program per row reads x, shift and scale once and writes y once, plus two floats (mean, rstd) for
the backward. It is the row pattern of kernels/layernorm.py with the per-column gain w replaced by a per-row,
per-column (1 + scale):

    xhat = (x - mean(x)) * rstd,   rstd = 1 / sqrt(mean((x - mean x)^2) + eps)
    y = xhat * (1 + scale) + shift                                       LN without its own affine

Backward, with dy the upstream gradient and w = 1 + scale (N = the row length):

    dx = rstd * (w dy - mean(w dy) - xhat * mean(w dy * xhat))
    dscale = dy * xhat,   dshift = dy                                     per element: no reduction over rows

A condition is per token (the LatentLM head: each token has its own t and h_i) or shared by the L tokens of a
sequence (DiT: one class and t per image, shift and scale (B, 1, D)). The kernels take it as it is: row r of x
reads condition row r // rows_per_cond, so a per-sequence condition is read once per token, never copied to
(B*L, D). With a per-token condition there is no cross-row sum (the LayerNorm kernel's dw partial buffer): the
backward is one program per row; a shared condition's dshift and dscale sum over its rows afterwards. The gate
multiplies the MLP's output (x + gate * MLP(y)), on the other side of a matmul, so it is not part of this row
kernel. Computed in float32 whatever the input dtype.
"""

import torch

from kernels import AotSpec, Benchmark, backend, check_grid, tl, triton

# The whole row lives in registers. BLOCK 16384's backward spills on sm_80 and sm_90 (416 / 320 B at 16 warps, 280
# / 224 B at 32; `python -m kernels.aot`, Triton 3.9), so rows stop at 8192, where every BLOCK builds spill-free.
MAX_COLS = 8192


def modulate_reference(x, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    """The equation in PyTorch ops (differentiable, in x's dtype): nanomodels.diffusion.modulate."""
    centered = x - x.mean(-1, keepdim=True)
    return centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * (1 + scale) + shift


@triton.jit
def _adaln_fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, n_cols, rows_per_cond, stride_x, stride_sh, stride_sc,
                      stride_y, eps, BLOCK: tl.constexpr):
    """One program per row of x (rows, n_cols): y = (x - mean) * rstd * (1 + scale) + shift, in float32.

    mean = sum(x) / n_cols and rstd = 1 / sqrt(sum((x - mean)^2) / n_cols + eps) over the row's n_cols
    columns (BLOCK >= n_cols lanes, the ones past n_cols masked), stored per row for the backward. shift and
    scale hold one condition row per rows_per_cond consecutive rows of x (1: per token; L: per sequence of L
    tokens), rows stride_sh (shift) and stride_sc (scale) apart; row r of x is modulated by condition row r // rows_per_cond.
    """
    row = tl.program_id(0).to(tl.int64)  # int64 so row * stride cannot overflow
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    # BEGIN EXERCISE 9.7: the fused adaLN row in Triton
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(inside, x - mean, 0.0)  # the padding must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    cond = row // rows_per_cond  # the condition row this token shares with its sequence
    scale = tl.load(SCALE + cond * stride_sc + cols, mask=inside, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + cond * stride_sh + cols, mask=inside, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    # END EXERCISE
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _adaln_bwd_kernel(X, SCALE, DY, MEAN, RSTD, DX, DSHIFT, DSCALE, n_cols, rows_per_cond, stride_x, stride_s,
                      stride_dy, stride_dx, stride_g, BLOCK: tl.constexpr):
    """One program per row: dx (rows stride_dx apart) and the per-row dscale, dshift (rows stride_g apart)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
    w = 1.0 + tl.load(SCALE + (row // rows_per_cond) * stride_s + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = tl.where(inside, (x - tl.load(MEAN + row)) * rstd, 0.0)
    wdy = w * dy
    dx = rstd * (wdy - tl.sum(wdy, axis=0) / n_cols - xhat * (tl.sum(wdy * xhat, axis=0) / n_cols))
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)
    tl.store(DSCALE + row * stride_g + cols, (dy * xhat).to(DSCALE.dtype.element_ty), mask=inside)  # per row
    tl.store(DSHIFT + row * stride_g + cols, dy.to(DSHIFT.dtype.element_ty), mask=inside)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _check(x, shift, scale) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not 0 < x.size(-1) <= MAX_COLS:
        raise ValueError(f"x: expected a tensor whose last dimension is in [1, {MAX_COLS}], got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: dtype must be float16, bfloat16 or float32, got {x.dtype}")
    for name, t in (("shift", shift), ("scale", scale)):
        if not isinstance(t, torch.Tensor) or t.dtype != x.dtype:
            raise ValueError(f"{name}: must be a tensor of x's dtype {x.dtype}")
        try:
            torch.broadcast_shapes(t.shape, x.shape)
        except RuntimeError:
            raise ValueError(f"{name}: shape {tuple(t.shape)} does not broadcast to x's {tuple(x.shape)}") from None
        if torch.broadcast_shapes(t.shape, x.shape) != x.shape:
            raise ValueError(f"{name}: broadcasting {tuple(t.shape)} with x must keep x's shape {tuple(x.shape)}")


def _conditions(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor):
    """(shift, scale, rows_per_cond): contiguous (conditions, N) rows of each and how many consecutive rows of x
    share one. Per token (x's shape) or per sequence (x's shape with 1 in dim -2) they are views of the
    arguments; any other broadcast is expanded to x's shape and copied."""
    n = x.size(-1)
    if shift.shape == scale.shape == x.shape:
        group = 1
    elif x.dim() >= 2 and x.size(-2) > 1 and shift.shape == scale.shape == x.shape[:-2] + (1, n):
        group = x.size(-2)
    else:
        shift, scale, group = shift.expand(x.shape), scale.expand(x.shape), 1
    return shift.reshape(-1, n).contiguous(), scale.reshape(-1, n).contiguous(), group


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if backend(x) == "interpreter" and x.dtype == torch.bfloat16 else x.dtype


def _rows(name, t, shape, dtype):
    """t as (rows, N) with unit column stride: an input is copied if its columns are strided, an output
    (`out`, `dx`: written in place) must already have x's shape, dtype and unit column stride."""
    if name in ("out", "dx"):
        if not isinstance(t, torch.Tensor) or t.shape != shape or t.dtype != dtype or t.dim() != 2 or (
                t.numel() and t.stride(-1) != 1):
            raise ValueError(f"{name}: must be a {tuple(shape)} {dtype} tensor with unit column stride (rows may be "
                             f"strided), got {tuple(getattr(t, 'shape', ()))} {getattr(t, 'dtype', type(t))}"
                             f"{'' if not isinstance(t, torch.Tensor) else ' strides ' + str(t.stride())}")
        return t
    return t if t.stride(-1) == 1 else t.contiguous()


def adaln_forward(x, shift, scale, *, eps=1e-6, out=None, rows_per_cond=1):
    """The forward kernel: (y, mean, rstd); x (rows, N), shift and scale (rows / rows_per_cond, N), each read with
    its own row stride (a strided column is copied); `out` (rows, N) with unit column stride receives y if given."""
    n = x.size(-1)
    x, shift, scale = (_rows(name, t, None, None) for name, t in (("x", x), ("shift", shift), ("scale", scale)))
    y = _rows("out", out, x.shape, x.dtype) if out is not None else torch.empty_like(x)
    mean = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block = triton.next_power_of_2(n)
    grid = check_grid((x.size(0),), "x", "rows")
    _adaln_fwd_kernel[grid](x, shift, scale, y, mean, rstd, n, rows_per_cond, x.stride(0), shift.stride(0),
                                    scale.stride(0), y.stride(0), float(eps), BLOCK=block, num_warps=_num_warps(block))
    return y, mean, rstd


def adaln_backward(x, scale, mean, rstd, dy, *, dx=None, rows_per_cond=1):
    """The backward kernel: (dx, dshift, dscale), dx (rows, N), dshift and dscale shaped like scale (summed over
    the rows_per_cond rows that share a condition); `dx` (rows, N) with unit column stride receives dx if given
    (its rows may be strided: dshift and dscale are separate contiguous buffers)."""
    n = x.size(-1)
    x, scale, dy = (_rows(name, t, None, None) for name, t in (("x", x), ("scale", scale), ("dy", dy)))
    dx = _rows("dx", dx, x.shape, x.dtype) if dx is not None else torch.empty_like(x)
    dshift, dscale = (torch.empty(x.shape, dtype=x.dtype, device=x.device) for _ in range(2))  # per row of x
    block = triton.next_power_of_2(n)
    grid = check_grid((x.size(0),), "x", "rows")
    _adaln_bwd_kernel[grid](x, scale, dy, mean, rstd, dx, dshift, dscale, n, rows_per_cond, x.stride(0),
                                    scale.stride(0), dy.stride(0), dx.stride(0), n, BLOCK=block,
                                    num_warps=_num_warps(block))
    if rows_per_cond > 1:
        dshift, dscale = (g.view(-1, rows_per_cond, n).sum(1) for g in (dshift, dscale))
    return dx, dshift, dscale


class _AdaLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps, rows_per_cond):
        y, mean, rstd = adaln_forward(x, shift, scale, eps=eps, rows_per_cond=rows_per_cond)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.rows_per_cond = rows_per_cond
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = adaln_backward(x, scale, mean, rstd, dy.contiguous(), rows_per_cond=ctx.rows_per_cond)
        return dx, dshift, dscale, None, None


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LN(x) (1 + scale) + shift over the last dimension, forward and backward in Triton; shift and scale
    broadcast to x: per token (x's shape) or per sequence ((B, 1, D) for x (B, L, D)) they are read in place,
    other broadcasts are copied to x's shape. Differentiable in x, shift and scale."""
    _check(x, shift, scale)
    if backend(x) == "reference":
        return modulate_reference(x, shift, scale, eps)
    n, dtype = x.size(-1), _compute_dtype(x)
    x2 = x.to(dtype).reshape(-1, n).contiguous()  # (rows, N)
    # (conditions, N) views or copies; autograd takes their gradients back to the arguments' shapes
    shift2, scale2, rows_per_cond = _conditions(x, shift.to(dtype), scale.to(dtype))
    y = _AdaLN.apply(x2, shift2, scale2, float(eps), rows_per_cond)
    return y.to(x.dtype).view(x.shape)


def _aot_specs():
    """The compile tier's fp16 forward and backward at the largest BLOCK of each warp count (1024: 4, 4096: 8,
    8192: 16 warps), the most row elements per thread. Every BLOCK from 1 to 8192 compiled once for sm_80 and
    sm_90 without spills (Triton 3.9)."""
    ptrs = dict.fromkeys(["X", "SHIFT", "SCALE", "Y", "DY", "DX", "DSHIFT", "DSCALE"], "*fp16")
    ptrs.update(MEAN="*fp32", RSTD="*fp32")
    return [AotSpec(f"adaln_modulate {kind} fp16 (BLOCK {block})", kernel, ptrs, {"BLOCK": block},
                    scalars={"eps": "fp32"} if kind == "fwd" else {}, num_warps=_num_warps(block))
            for block in (1024, 4096, MAX_COLS)
            for kind, kernel in (("fwd", _adaln_fwd_kernel), ("bwd", _adaln_bwd_kernel))]


AOT_SPECS = _aot_specs()


def _bench_gpu(quick: bool, time_ms) -> list:
    """Forward and forward+backward of LN(x)(1 + scale) + shift on (tokens, width) bf16, against eager PyTorch;
    bytes counted as x, shift, scale read and y written (forward), plus dy read and 3 gradients written."""
    rows = []
    for m, n in ((4096, 1024),) if quick else ((4096, 1024), (16384, 1024), (4096, 4096)):
        x, shift, scale = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        dy = torch.randn(m, n, device="cuda", dtype=torch.bfloat16)
        nbytes = x.numel() * x.element_size()
        for impl, fn in (("triton", adaln_modulate), ("eager", modulate_reference)):
            rows.append({"impl": impl, "mode": "fwd", "shape": f"{m}x{n} bfloat16", "case": "-",
                         "ms": (ms := time_ms(lambda: fn(x, shift, scale))), "gbs": 4 * nbytes / ms / 1e6})
            rows.append({"impl": impl, "mode": "fwd+bwd", "shape": f"{m}x{n} bfloat16", "case": "-",
                         "ms": (ms := time_ms(lambda: fn(x, shift, scale).backward(dy), grads=[x, shift, scale])),
                         "gbs": 12 * nbytes / ms / 1e6})
    return rows


def _bench_cpu(quick: bool) -> list:
    """Correctness without a GPU: the kernel (interpreter) against the float64 reference, forward and backward."""
    gen = torch.Generator().manual_seed(0)
    x, shift, scale = (torch.randn(37, 200, generator=gen).requires_grad_() for _ in range(3))
    dy = torch.randn(37, 200, generator=gen)
    adaln_modulate(x, shift, scale).backward(dy)
    ref = [t.detach().double().requires_grad_() for t in (x, shift, scale)]
    y_ref = modulate_reference(*ref)
    y_ref.backward(dy.double())
    row = {"case": "fp32 37x200", "y err": (adaln_modulate(x, shift, scale).double() - y_ref).abs().max().item()}
    row.update({f"d{name} err": (t.grad.double() - r.grad).abs().max().item()
                for name, t, r in zip(("x", "shift", "scale"), (x, shift, scale), ref)})
    return [row]


BENCHMARKS = [Benchmark("adaln", gpu=_bench_gpu, cpu=_bench_cpu)]
