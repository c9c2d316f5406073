"""Row softmax in Triton: the fused one-pass kernel, then the online (tiled) kernel that leads to FlashAttention.

    softmax(x)_j = exp(x_j - m) / sum_k exp(x_k - m),    m = max_k x_k

Subtracting the row max m changes nothing mathematically; it keeps exp() from overflowing.

Version 1, `softmax`: one program per row holds the whole row (padded to a power of two, the padding set to
-inf so it adds exp(-inf) = 0) in registers. It reads the row once and writes it once, where eager PyTorch
(max, subtract, exp, sum, divide: five kernels) reads about 7 and writes about 3 row-sized arrays: softmax is
bandwidth-bound, so fusion is the whole speed-up (ideally ~5x over eager).

Version 2, `online_softmax`: the row is walked in column tiles of BLOCK_N, so its length is unlimited. The
program keeps a running max m and a running sum ell = sum exp(x - m) of the tiles seen so far. When a tile
raises the max from m to m', everything summed so far was scaled by exp(-m) instead of exp(-m'), so

    ell' = ell * exp(m - m') + sum_tile exp(x - m')    (the rescale: one multiply per tile, not per element)

A second walk writes exp(x - m) / ell. FlashAttention is this loop with the tile of scores computed on the fly
from Q K^T and the second walk folded into a running output that is rescaled the same way.

Both kernels compute in float32 whatever the input dtype. Triton tutorial 02-fused-softmax is the classic
version of kernel 1 (its newer form adds a persistent loop over rows sized from the SM count).
"""

from typing import Optional

import torch

from kernels import AotSpec, Benchmark, backend, check_grid, tl, triton

MAX_FUSED_COLS = 8192  # longer rows would spill registers in the one-pass kernel: they take the online kernel


def softmax_reference(x: torch.Tensor) -> torch.Tensor:
    """The equation, written out: exp(x - max) / sum exp(x - max) over the last dimension."""
    e = torch.exp(x - x.max(dim=-1, keepdim=True).values)
    return e / e.sum(dim=-1, keepdim=True)


def online_softmax_reference(x: torch.Tensor, block_n: int, trace: Optional[list] = None) -> torch.Tensor:
    """The online algorithm in PyTorch, tile by tile along the last dimension (what the Triton kernel does).
    `trace`, if given, receives the running (max, sum) after each tile."""
    m = torch.full(x.shape[:-1], -torch.inf, dtype=x.dtype, device=x.device)
    ell = torch.zeros_like(m)
    for start in range(0, x.size(-1), block_n):
        tile = x[..., start:start + block_n]
        m_new = torch.maximum(m, tile.max(dim=-1).values)
        m_ref = torch.where(m_new == -torch.inf, 0.0, m_new)  # no finite value seen yet: keep exp() finite
        ell = ell * torch.exp(m - m_ref) + torch.exp(tile - m_ref[..., None]).sum(dim=-1)
        m = m_new
        if trace is not None:
            trace.append((m.clone(), ell.clone()))
    return torch.exp(x - m[..., None]) / ell[..., None]


@triton.jit
def _softmax_kernel(X, Y, n_cols, stride_x, stride_y, BLOCK: tl.constexpr):
    """One program per row: Y[row, :n_cols] = softmax(X[row, :n_cols]), computed in float32 whatever X's dtype.
    The row is one block of BLOCK lanes (the next power of two >= n_cols); lanes n_cols..BLOCK-1 are padding."""
    row = tl.program_id(0).to(tl.int64)  # one program per row; int64 so row * stride cannot overflow
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    # BEGIN EXERCISE 1.1: the fused row softmax, with the padding lanes masked
    x = tl.load(X + row * stride_x + cols, mask=inside, other=-float("inf")).to(tl.float32)
    e = tl.exp(x - tl.max(x, axis=0))  # padding: exp(-inf) = 0
    y = e / tl.sum(e, axis=0)
    # END EXERCISE
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=inside)


@triton.jit
def _online_softmax_kernel(X, Y, n_cols, stride_x, stride_y, BLOCK_N: tl.constexpr):
    """One program per row, walked in tiles of BLOCK_N columns, in float32. First walk: the running max m and the
    running sum ell = sum exp(x - m) over the tiles seen so far. Second walk: Y = exp(x - m) / ell. X may hold
    -inf (masked scores): while every value seen so far is -inf, m = -inf and ell = 0."""
    row = tl.program_id(0).to(tl.int64)
    m = -float("inf")  # running max
    ell = 0.0  # running sum of exp(x - m)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(X + row * stride_x + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        # BEGIN EXERCISE 1.2: the online softmax update of the running max and sum
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # only -inf so far: exp(-inf - 0) = 0, not NaN
        ell = ell * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)
        m = m_new
        # END EXERCISE
    inv_l = 1.0 / ell
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        x = tl.load(X + row * stride_x + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        tl.store(Y + row * stride_y + cols, (tl.exp(x - m) * inv_l).to(Y.dtype.element_ty), mask=cols < n_cols)


def _num_warps(block: int) -> int:
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def _check(x: torch.Tensor, out: Optional[torch.Tensor]) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.size(-1) == 0:
        raise ValueError(f"x: expected a tensor with a non-empty last dimension, got {getattr(x, 'shape', x)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x: dtype must be float16, bfloat16 or float32, got {x.dtype}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype or out.device != x.device
                            or x.dim() != 2 or out.stride(-1) != 1):
        raise ValueError("out: must be a 2-D tensor with x's shape, dtype and device and a contiguous last dim")


def _launch(kernel, x: torch.Tensor, out: Optional[torch.Tensor], block: int, **meta) -> torch.Tensor:
    shape = x.shape
    if x.dim() != 2 or x.stride(-1) != 1:
        x = x.reshape(-1, shape[-1]).contiguous()
    compute = x
    if backend(x) == "interpreter" and x.dtype == torch.bfloat16:
        compute = x.float()  # the interpreter has no bfloat16 arithmetic (it works on the bit patterns)
    y = out if out is not None and compute.dtype == x.dtype else torch.empty_like(compute)
    grid = check_grid((x.size(0),), "x", "rows")
    kernel[grid](compute, y, x.size(1), compute.stride(0), y.stride(0), block, num_warps=_num_warps(block))
    if y.dtype != x.dtype:
        y = y.to(x.dtype)
        if out is not None:
            return out.copy_(y)
    return y if y.shape == shape else y.view(shape)


def softmax(x: torch.Tensor, *, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax over the last dimension with the fused one-pass kernel (rows longer than MAX_FUSED_COLS use the
    online kernel). `out`, for 2-D x only, receives the result (the tests pass a view inside a guard band)."""
    _check(x, out)
    if backend(x) == "reference":
        y = softmax_reference(x.float()).to(x.dtype)
        return y if out is None else out.copy_(y)
    if x.size(-1) > MAX_FUSED_COLS:
        return online_softmax(x, out=out)
    return _launch(_softmax_kernel, x, out, triton.next_power_of_2(x.size(-1)))


def online_softmax(x: torch.Tensor, *, block_n: Optional[int] = None,
                   out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Softmax over the last dimension, walking each row in tiles of `block_n` columns (a power of two, at least
    16; default min(next_pow2(cols), 1024)) with a running max and sum."""
    _check(x, out)
    if block_n is not None and (block_n < 16 or block_n & (block_n - 1)):
        raise ValueError(f"block_n: must be a power of two >= 16, got {block_n}")
    if backend(x) == "reference":
        y = online_softmax_reference(x.float(), block_n or 1024).to(x.dtype)
        return y if out is None else out.copy_(y)
    block_n = block_n or min(triton.next_power_of_2(x.size(-1)), 1024)
    return _launch(_online_softmax_kernel, x, out, block_n)


# ----------------------------------------------------------------------------- registry (compile tier)

_ROWS = {"X": "*fp32", "Y": "*fp32"}
AOT_SPECS = [AotSpec("softmax (BLOCK 4096)", _softmax_kernel, _ROWS, {"BLOCK": 4096}, num_warps=_num_warps(4096)),
             AotSpec("softmax (BLOCK 8192, the fused limit)", _softmax_kernel, _ROWS, {"BLOCK": 8192},
                     num_warps=_num_warps(8192)),
             AotSpec("online_softmax (BLOCK_N 1024)", _online_softmax_kernel, _ROWS, {"BLOCK_N": 1024},
                     num_warps=_num_warps(1024))]


# ----------------------------------------------------------------------------- registry (benchmark)

def _bench_gpu(quick: bool, time_ms) -> list:
    rows = []
    m = n = 4096
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, n, device="cuda", dtype=dtype)
        impls = {"triton one-pass": lambda: softmax(x), "triton online": lambda: online_softmax(x),
                 "torch.softmax": lambda: torch.softmax(x, -1), "eager (5 kernels)": lambda: softmax_reference(x)}
        for impl, fn in impls.items():
            ms = time_ms(fn)
            rows.append({"impl": impl, "mode": "fwd", "shape": f"{m}x{n} {str(dtype)[6:]}", "case": "-", "ms": ms,
                         "gbs": 2 * x.numel() * x.element_size() / ms / 1e6})
    return rows


def _bench_cpu(quick: bool) -> list:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(37, 1000, generator=torch.Generator().manual_seed(0)).to(device)
    expected = softmax_reference(x.double())
    return [{"case": f"{name} fp32 37x1000", "max err": (fn(x).double() - expected).abs().max().item()}
            for name, fn in (("softmax", softmax), ("online_softmax", lambda t: online_softmax(t, block_n=128)))]


BENCHMARKS = [Benchmark("softmax", gpu=_bench_gpu, cpu=_bench_cpu)]
