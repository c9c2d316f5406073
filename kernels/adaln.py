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

Since scale and shift differ per row, there is no cross-row sum (the LayerNorm kernel's dw partial buffer):
the backward is one program per row too. The gate multiplies the MLP's output (x + gate * MLP(y)), on the
other side of a matmul, so it is not part of this row kernel. Computed in float32 whatever the input dtype.
"""

import torch

from kernels import AotSpec, Benchmark, backend, tl, triton

MAX_COLS = 16384  # the whole row lives in registers


def modulate_reference(x, shift, scale, eps: float = 1e-6) -> torch.Tensor:
    """The equation in PyTorch ops (differentiable, in x's dtype): nanomodels.diffusion.modulate."""
    centered = x - x.mean(-1, keepdim=True)
    return centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps) * (1 + scale) + shift


@triton.jit
def _adaln_fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, n_cols, stride_x, stride_s, stride_y, eps,
                      BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # int64 so row * stride cannot overflow
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / n_cols
    centered = tl.where(inside, x - mean, 0.0)  # the padding must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    scale = tl.load(SCALE + row * stride_s + cols, mask=inside, other=0.0).to(tl.float32)
    shift = tl.load(SHIFT + row * stride_s + cols, mask=inside, other=0.0).to(tl.float32)
    y = centered * rstd * (1.0 + scale) + shift
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _adaln_bwd_kernel(X, SCALE, DY, MEAN, RSTD, DX, DSHIFT, DSCALE, n_cols, stride_x, stride_s, stride_dy,
                      stride_dx, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)
    dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
    w = 1.0 + tl.load(SCALE + row * stride_s + cols, mask=inside, other=0.0).to(tl.float32)
    rstd = tl.load(RSTD + row)
    xhat = tl.where(inside, (x - tl.load(MEAN + row)) * rstd, 0.0)
    wdy = w * dy
    dx = rstd * (wdy - tl.sum(wdy, axis=0) / n_cols - xhat * (tl.sum(wdy * xhat, axis=0) / n_cols))
    tl.store(DX + row * stride_dx + cols, dx.to(DX.dtype.element_ty), mask=inside)
    tl.store(DSCALE + row * stride_dx + cols, (dy * xhat).to(DSCALE.dtype.element_ty), mask=inside)
    tl.store(DSHIFT + row * stride_dx + cols, dy.to(DSHIFT.dtype.element_ty), mask=inside)


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


def _rows(t: torch.Tensor, shape, n: int) -> torch.Tensor:
    """A contiguous (rows, n) copy of t broadcast to shape (a view when t already is one)."""
    return t.expand(shape).reshape(-1, n).contiguous()


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if backend(x) == "interpreter" and x.dtype == torch.bfloat16 else x.dtype


def adaln_forward(x, shift, scale, *, eps=1e-6, out=None):
    """The forward kernel: (y, mean, rstd); x, shift, scale (rows, N) contiguous; `out` receives y if given."""
    n = x.size(-1)
    y = out if out is not None else torch.empty_like(x)
    mean = torch.empty(x.size(0), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block = triton.next_power_of_2(n)
    _adaln_fwd_kernel[(x.size(0),)](x, shift, scale, y, mean, rstd, n, x.stride(0), scale.stride(0), y.stride(0),
                                    float(eps), BLOCK=block, num_warps=_num_warps(block))
    return y, mean, rstd


def adaln_backward(x, scale, mean, rstd, dy, *, dx=None):
    """The backward kernel: (dx, dshift, dscale), each (rows, N); `dx` receives dx if given (guard bands)."""
    n = x.size(-1)
    dx = dx if dx is not None else torch.empty_like(x)
    dshift, dscale = torch.empty_like(dx), torch.empty_like(dx)
    block = triton.next_power_of_2(n)
    _adaln_bwd_kernel[(x.size(0),)](x, scale, dy, mean, rstd, dx, dshift, dscale, n, x.stride(0), scale.stride(0),
                                    dy.stride(0), dx.stride(0), BLOCK=block, num_warps=_num_warps(block))
    return dx, dshift, dscale


class _AdaLN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        y, mean, rstd = adaln_forward(x, shift, scale, eps=eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = adaln_backward(x, scale, mean, rstd, dy.contiguous())
        return dx, dshift, dscale, None


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LN(x) (1 + scale) + shift over the last dimension, forward and backward in Triton; shift and scale
    broadcast to x (e.g. (B, 1, D) per sequence). Differentiable in x, shift and scale."""
    _check(x, shift, scale)
    if backend(x) == "reference":
        return modulate_reference(x, shift, scale, eps)
    n, dtype = x.size(-1), _compute_dtype(x)
    # shift/scale as full (rows, N) tensors; autograd sums their gradients back over broadcast dims
    x2 = x.to(dtype).reshape(-1, n).contiguous()  # (rows, N)
    y = _AdaLN.apply(x2, _rows(shift.to(dtype), x.shape, n), _rows(scale.to(dtype), x.shape, n), float(eps))
    return y.to(x.dtype).view(x.shape)


def _aot_specs():
    """The default configs for the compile tier: fp16 rows of 1024 and 8192 columns, forward and backward."""
    ptrs = dict.fromkeys(["X", "SHIFT", "SCALE", "Y", "DY", "DX", "DSHIFT", "DSCALE"], "*fp16")
    ptrs.update(MEAN="*fp32", RSTD="*fp32")
    return [AotSpec(f"adaln_modulate {kind} fp16 (BLOCK {block})", kernel, ptrs, {"BLOCK": block},
                    scalars={"eps": "fp32"} if kind == "fwd" else {}, num_warps=_num_warps(block))
            for block in (1024, 8192) for kind, kernel in (("fwd", _adaln_fwd_kernel), ("bwd", _adaln_bwd_kernel))]


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
