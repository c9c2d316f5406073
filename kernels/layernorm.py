"""Fused LayerNorm and RMSNorm in Triton, with an optional scaled residual input: DeepNorm's
LN(alpha x + g) in one pass.

    h = alpha * x + g               (g optional: the sublayer's output; alpha = 1, g = None is a plain norm)
    LayerNorm:  y = (h - mean(h)) * rstd * w + b,     rstd = 1 / sqrt(mean((h - mean h)^2) + eps)
    RMSNorm:    y = h * rstd * w (+ b),               rstd = 1 / sqrt(mean(h^2) + eps)

Eager PyTorch spends three kernels on DeepNorm's residual (scale, add, norm) and writes h to memory between
them; the fused forward reads x and g once and writes y once, plus two floats per row (mean, rstd) for the
backward. One program per row holds the whole row (padded to a power of two) in registers, as in
kernels/softmax.py.

Backward, with xhat = (h - mean) * rstd and the row's upstream gradient dy (N = the row length):

    dh = rstd * (w dy - mean(w dy) - xhat * mean(w dy * xhat))      (RMSNorm: without the mean(w dy) term)
    dx = alpha * dh,   dg = dh,   dw = sum over rows of dy * xhat,   db = sum over rows of dy

Rows of x, g and y may be strided (a row stride each), and so may weight and bias (`w[::2]`: an element
stride each). h is recomputed from x and g (cheaper than storing it). dw and db are sums over every row: each program walks
a strided set of rows, accumulates its own partial dw, db in registers and writes one row of a (programs, N)
buffer, which torch sums (Triton tutorial 05 protects a smaller buffer with a spin-lock; this is the plain
version). Everything is computed in float32 whatever the input dtype.
"""

from typing import Optional

import torch

from kernels import INTERPRET, AotSpec, Benchmark, backend, check_grid, tl, triton

# The whole row lives in registers. BLOCK 16384's backward spills on sm_80 and sm_90 (854 to 1296 B at 16 warps;
# `python -m kernels.aot`, Triton 3.9), so rows stop at 8192, where every BLOCK builds spill-free.
MAX_COLS = 8192


def add_norm_reference(x, g=None, weight=None, bias=None, *, alpha: float = 1.0, eps: float = 1e-5,
                       rms: bool = False) -> torch.Tensor:
    """The equation, written out in PyTorch ops (differentiable; computed in x's dtype)."""
    h = alpha * x if g is None else alpha * x + g
    if rms:
        y = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    else:
        centered = h - h.mean(-1, keepdim=True)
        y = centered * torch.rsqrt(centered.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y if bias is None else y + bias


@triton.jit
def _add_norm_fwd_kernel(X, G, W, B, Y, MEAN, RSTD, n_cols, stride_x, stride_g, stride_y, stride_w, stride_b,
                         alpha, eps, HAS_G: tl.constexpr, HAS_BIAS: tl.constexpr, RMS: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of x (rows, n_cols), in float32 whatever the inputs' dtype:

        h = alpha * x + g                          (g only if HAS_G; alpha scales x, the residual stream)
        LayerNorm:  y = (h - mean) * rstd * w + b,  mean = sum(h) / n_cols,
                                                    rstd = 1 / sqrt(sum((h - mean)^2) / n_cols + eps)
        RMSNorm:    y = h * rstd * w + b,           mean = 0 (stored as 0),
                                                    rstd = 1 / sqrt(sum(h^2) / n_cols + eps)

    b only if HAS_BIAS. The row is one block of BLOCK lanes (the next power of two >= n_cols); lanes
    n_cols..BLOCK-1 are padding. Rows of x, g and y are stride_x, stride_g, stride_y apart; w and b may be
    strided (element strides stride_w, stride_b). mean and rstd are stored per row for the backward.
    """
    row = tl.program_id(0).to(tl.int64)  # one program per row; int64 so row * stride cannot overflow
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    # BEGIN EXERCISE 4.5: the fused LN(alpha x + g) row in Triton
    h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32) * alpha
    if HAS_G:
        h += tl.load(G + row * stride_g + cols, mask=inside, other=0.0).to(tl.float32)
    if RMS:
        mean = 0.0
    else:
        mean = tl.sum(h, axis=0) / n_cols
    centered = tl.where(inside, h - mean, 0.0)  # the padding must not enter the variance
    rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)
    y = centered * rstd * tl.load(W + cols * stride_w, mask=inside, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(B + cols * stride_b, mask=inside, other=0.0).to(tl.float32)
    # END EXERCISE
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)
    tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)


@triton.jit
def _add_norm_bwd_kernel(X, G, W, DY, MEAN, RSTD, DX, DG, DW_PART, DB_PART, n_rows, n_cols, stride_x,
                         stride_g, stride_dy, stride_dx, stride_dg, stride_w, alpha, HAS_G: tl.constexpr,
                         RMS: tl.constexpr,
                         BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    n_programs = tl.num_programs(0)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    dw = tl.zeros([BLOCK], dtype=tl.float32)
    db = tl.zeros([BLOCK], dtype=tl.float32)
    first = pid.to(tl.int64)
    for i in range(0, tl.cdiv(n_rows - pid, n_programs)):  # this program's rows: pid, pid + P, pid + 2P, ...
        row = first + i * n_programs
        h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32) * alpha
        if HAS_G:
            h += tl.load(G + row * stride_g + cols, mask=inside, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * stride_dy + cols, mask=inside, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        xhat = tl.where(inside, (h - tl.load(MEAN + row)) * rstd, 0.0)
        # w is re-read per row (from cache) rather than held: at BLOCK 8192 the registers it would pin make
        # sm_80 spill (Triton 3.6)
        wdy = tl.load(W + cols * stride_w, mask=inside, other=0.0).to(tl.float32) * dy
        dh = wdy - xhat * (tl.sum(xhat * wdy, axis=0) / n_cols)
        if not RMS:
            dh -= tl.sum(wdy, axis=0) / n_cols
        dh *= rstd
        tl.store(DX + row * stride_dx + cols, (alpha * dh).to(DX.dtype.element_ty), mask=inside)
        if HAS_G:
            tl.store(DG + row * stride_dg + cols, dh.to(DG.dtype.element_ty), mask=inside)
        dw += dy * xhat
        db += dy
    tl.store(DW_PART + pid * n_cols + cols, dw, mask=inside)
    tl.store(DB_PART + pid * n_cols + cols, db, mask=inside)


def _num_warps(block: int, backward: bool) -> int:
    """Warps per row program. At BLOCK 8192 the forward stays at 8 (with 16, Triton 3.6 spills on sm_80) and the
    backward, which holds about twice as many row arrays, takes 16; the LayerNorm forward at BLOCK 4096 takes 4
    (with 8 it spills 16 B on sm_80 under Triton 3.9). `python -m kernels.aot` checks each."""
    if not backward and block == 4096:
        return 4
    return 16 if backward and block >= 8192 else 8 if block >= 2048 else 4


def _rows(t: Optional[torch.Tensor], n: int) -> Optional[torch.Tensor]:
    """A 2-D (rows, n) view with a contiguous last dimension (a copy only when needed)."""
    if t is None:
        return None
    t = t.reshape(-1, n)
    return t if t.stride(-1) == 1 else t.contiguous()


def _check(x, g, weight, bias) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or not 0 < x.size(-1) <= MAX_COLS:
        raise ValueError(f"x: expected a tensor whose last dimension is in [1, {MAX_COLS}], got "
                         f"{tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if g is not None and (g.shape != x.shape or g.dtype != x.dtype):
        raise ValueError(f"g: must have x's shape {tuple(x.shape)} and dtype {x.dtype}, "
                         f"got {tuple(g.shape)} {g.dtype}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and tuple(p.shape) != (x.size(-1),):
            raise ValueError(f"{name}: must have shape ({x.size(-1)},), got {tuple(p.shape)}")
        if p is not None and p.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise ValueError(f"{name}: dtype must be float16, bfloat16 or float32 (the kernel computes in float32 "
                             f"and returns x's dtype), got {p.dtype}")
    if weight is None:
        raise ValueError("weight: required (pass torch.ones(d) for a norm without a gain)")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float32 if backend(x) == "interpreter" and x.dtype == torch.bfloat16 else x.dtype


def add_norm_forward(x, g, weight, bias=None, *, alpha=1.0, eps=1e-5, rms=False, out=None):
    """The forward kernel: (y, mean, rstd) with y shaped like x, mean and rstd float32 of shape (rows,).
    `out`, for 2-D x only, receives y (the tests pass a view inside a guard band)."""
    n = x.size(-1)
    dtype = _compute_dtype(x)
    x2, g2 = _rows(x.to(dtype), n), _rows(None if g is None else g.to(dtype), n)
    y = out if out is not None and dtype == x.dtype else torch.empty(x2.shape, dtype=dtype, device=x.device)
    mean = torch.empty(x2.size(0), dtype=torch.float32, device=x.device)
    rstd = torch.empty_like(mean)
    block = triton.next_power_of_2(n)
    grid = check_grid((x2.size(0),), "x", "rows")
    _add_norm_fwd_kernel[grid](
        x2, x2 if g2 is None else g2, weight, weight if bias is None else bias, y, mean, rstd, n,
        x2.stride(0), 0 if g2 is None else g2.stride(0), y.stride(0), weight.stride(0),
        0 if bias is None else bias.stride(0), float(alpha), float(eps),
        HAS_G=g2 is not None,
        HAS_BIAS=bias is not None, RMS=rms, BLOCK=block, num_warps=_num_warps(block, backward=False))
    if out is not None and y is not out:
        out.copy_(y)
        y = out
    return y.to(x.dtype).view(x.shape) if out is None else y, mean, rstd


def add_norm_backward(x, g, weight, mean, rstd, dy, *, alpha=1.0, rms=False, dx=None, programs=None):
    """The backward kernel: (dx, dg or None, dw, db). `dx`, for 2-D x only, receives dx (guard-band tests)."""
    n = x.size(-1)
    dtype = _compute_dtype(x)
    x2, g2, dy2 = _rows(x.to(dtype), n), _rows(None if g is None else g.to(dtype), n), _rows(dy.to(dtype), n)
    rows = x2.size(0)
    dx2 = dx if dx is not None and dtype == x.dtype else torch.empty(x2.shape, dtype=dtype, device=x.device)
    dg2 = None if g is None else torch.empty(x2.shape, dtype=dtype, device=x.device)
    if programs is None:
        cuda = x.is_cuda and not INTERPRET
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count if cuda else 4
        programs = min(rows, 4 * sms)
    dw_part = torch.empty(programs, n, dtype=torch.float32, device=x.device)
    db_part = torch.empty_like(dw_part)
    block = triton.next_power_of_2(n)
    _add_norm_bwd_kernel[(programs,)](
        x2, x2 if g2 is None else g2, weight, dy2, mean, rstd, dx2, dx2 if dg2 is None else dg2, dw_part,
        db_part, rows, n, x2.stride(0), 0 if g2 is None else g2.stride(0), dy2.stride(0), dx2.stride(0),
        0 if dg2 is None else dg2.stride(0), weight.stride(0), float(alpha), HAS_G=g2 is not None, RMS=rms, BLOCK=block,
        num_warps=_num_warps(block, backward=True))
    if dx is not None and dx2 is not dx:
        dx.copy_(dx2)
        dx2 = dx
    shaped = (lambda t: t.to(x.dtype).view(x.shape)) if dx is None else (lambda t: t)
    dg = None if dg2 is None else dg2.to(x.dtype).view(x.shape)
    return shaped(dx2), dg, dw_part.sum(0).to(weight.dtype), db_part.sum(0).to(weight.dtype)


class _AddNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, g, weight, bias, alpha, eps, rms):
        y, mean, rstd = add_norm_forward(x, g, weight, bias, alpha=alpha, eps=eps, rms=rms)
        ctx.save_for_backward(x, g, weight, mean, rstd)
        ctx.alpha, ctx.rms, ctx.has_bias = alpha, rms, bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, g, weight, mean, rstd = ctx.saved_tensors
        dx, dg, dw, db = add_norm_backward(x, g, weight, mean, rstd, dy, alpha=ctx.alpha, rms=ctx.rms)
        return dx, dg, dw, db if ctx.has_bias else None, None, None, None


def add_norm(x: torch.Tensor, g: Optional[torch.Tensor], weight: torch.Tensor,
             bias: Optional[torch.Tensor] = None, *, alpha: float = 1.0, eps: float = 1e-5,
             rms: bool = False) -> torch.Tensor:
    """norm(alpha * x + g) * weight (+ bias) over the last dimension, forward and backward in Triton.
    rms=False: LayerNorm; rms=True: RMSNorm. g=None: no residual input. Differentiable in x, g, weight,
    bias."""
    _check(x, g, weight, bias)
    if backend(x) == "reference":
        return add_norm_reference(x, g, weight, bias, alpha=alpha, eps=eps, rms=rms)
    return _AddNorm.apply(x, g, weight, bias, float(alpha), float(eps), bool(rms))


def layer_norm(x, weight, bias=None, eps=1e-5):
    """F.layer_norm over the last dimension, by the fused kernel. x: float16, bfloat16 or float32; weight and
    bias: any of those three (computed in float32; the result has x's dtype); float64 raises ValueError."""
    return add_norm(x, None, weight, bias, eps=eps)


def rms_norm(x, weight, eps=1e-5):
    """RMSNorm over the last dimension, by the fused kernel (dtypes as for `layer_norm`)."""
    return add_norm(x, None, weight, eps=eps, rms=True)


def deepnorm_add_norm(x, g, norm: torch.nn.LayerNorm, alpha: float) -> torch.Tensor:
    """Drop-in for nanomodels.deepnet.deepnorm(x, g, alpha, norm): LN(alpha x + g) with norm's parameters."""
    return add_norm(x, g, norm.weight, norm.bias, alpha=alpha, eps=norm.eps)


# ----------------------------------------------------------------------------- registry

def _aot_specs():
    ptrs = dict.fromkeys(["X", "G", "W", "B", "Y", "DY", "DX", "DG"], "*fp16")
    ptrs.update(MEAN="*fp32", RSTD="*fp32", DW_PART="*fp32", DB_PART="*fp32")
    unit = {"stride_w": 1, "stride_b": 1}  # a contiguous weight and bias: Triton specialises a stride of 1
    specs = []
    for block in (1024, 4096, MAX_COLS):  # the largest BLOCK at each warp count, forward and backward
        for rms in (False, True):
            kind = "rms_norm" if rms else "layer_norm"
            specs.append(AotSpec(f"{kind} add fwd fp16 (BLOCK {block})", _add_norm_fwd_kernel, ptrs,
                                 {"HAS_G": True, "HAS_BIAS": not rms, "RMS": rms, "BLOCK": block, **unit},
                                 scalars={"alpha": "fp32", "eps": "fp32"},
                                 num_warps=_num_warps(block, backward=False)))
            specs.append(AotSpec(f"{kind} add bwd fp16 (BLOCK {block})", _add_norm_bwd_kernel, ptrs,
                                 {"HAS_G": True, "RMS": rms, "BLOCK": block, "stride_w": 1},
                                 scalars={"alpha": "fp32"},
                                 num_warps=_num_warps(block, backward=True)))
    return specs


AOT_SPECS = _aot_specs()


def _bench_gpu(quick: bool, time_ms) -> list:
    rows = []
    m, n = 4096, 4096
    x, g = (torch.randn(m, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w, b = (torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    layer_norm_eager = torch.nn.functional.layer_norm
    impls = {  # (case, bytes moved: x [and g] read, y written)
        ("layer_norm", 2): {"triton": lambda: layer_norm(x, w, b),
                            "F.layer_norm": lambda: layer_norm_eager(x, (n,), w, b)},
        ("DeepNorm LN(2x + g)", 3): {"triton": lambda: add_norm(x, g, w, b, alpha=2.0),
                                     "eager (3 kernels)": lambda: layer_norm_eager(2.0 * x + g, (n,), w, b)},
        ("rms_norm", 2): {"triton": lambda: rms_norm(x, w),
                          "eager": lambda: add_norm_reference(x, weight=w, rms=True)},
    }
    for (case, arrays), fns in impls.items():
        for impl, fn in fns.items():
            ms = time_ms(fn)
            rows.append({"impl": impl, "mode": "fwd", "shape": f"{m}x{n} bfloat16", "case": case, "ms": ms,
                         "gbs": arrays * x.numel() * x.element_size() / ms / 1e6})
    return rows


def _bench_cpu(quick: bool) -> list:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator().manual_seed(0)
    x, g = (torch.randn(37, 1000, generator=gen).to(device).requires_grad_() for _ in range(2))
    w, b = (torch.randn(1000, generator=gen).to(device).requires_grad_() for _ in range(2))
    dy = torch.randn(37, 1000, generator=gen).to(device)
    rows = []
    for rms in (False, True):
        leaves = [t.detach().clone().requires_grad_() for t in (x, g, w, b)]
        add_norm(*leaves, alpha=2.0, rms=rms).backward(dy)
        ref = [t.detach().double().requires_grad_() for t in (x, g, w, b)]
        expected = add_norm_reference(*ref, alpha=2.0, rms=rms)
        expected.backward(dy.double())
        y = add_norm(*(t.detach() for t in leaves), alpha=2.0, rms=rms)
        errors = {"y err": (y.double() - expected).abs().max().item()}
        errors.update({f"d{name} err": (a.grad.double() - r.grad).abs().max().item()
                       for name, a, r in zip(("x", "g", "w", "b"), leaves, ref)})
        rows.append({"case": f"{'RMSNorm' if rms else 'LayerNorm'}(2x + g) fp32 37x1000", **errors})
    return rows


BENCHMARKS = [Benchmark("layernorm", gpu=_bench_gpu, cpu=_bench_cpu)]
