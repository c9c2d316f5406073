"""Chunkwise (gated) retention in Triton, forward and backward: RetNet's retention (2307.08621) and YOCO's gated
retention (2405.05254) in one kernel pair.

    o_n = sum_{m <= n} exp(c_n - c_m) (q_n . k_m) v_m,     c_n = sum_{j <= n} log_decay_j,   log_decay <= 0

Forward (the chunkwise form of nanomodels/gated_retention.py): one program per (batch * head, Dv block) walks the
chunks of CHUNK tokens in order, carrying the state S = sum_{m < chunk} exp(c_last - c_m) k_m^T v_m (Dk x BLOCK_DV,
float32) in registers. With b_j the in-chunk cumulative log decay (tl.cumsum over the chunk):

    o_j = sum_{i <= j in chunk} exp(b_j - b_i) (q_j . k_i) v_i  +  exp(b_j) q_j S
    S   = exp(b_last) S + sum_j exp(b_last - b_j) k_j^T v_j

Every exponent is <= 0, so nothing overflows whatever T. Padding rows past T load zeros and a zero log decay.

Backward: two passes of the same shape, no atomics.
    dq_n = sum_{m <= n} exp(c_n - c_m) (do_n . v_m) k_m      the forward kernel itself, on (do, v, k)
    dk_m = sum_{n >= m} exp(c_n - c_m) (v_m . do_n) q_n      the reverse kernel on (v, do, q)
    dv_m = sum_{n >= m} exp(c_n - c_m) (k_m . q_n) do_n      the reverse kernel on (k, q, do)
The reverse kernel walks the chunks from last to first carrying dS = sum_{n >= next chunk} exp(c_n - c_end) b_n^T c_n.
d log_decay needs no kernel: with dc_t = q_t . dq_t - k_t . dk_t (the gradient of the cumulative sum c_t),
d log_decay_j = sum_{t >= j} dc_t, a reverse cumsum in torch.

Precision: q k^T and the intra-chunk (scores * decay) v products run in the input dtype with float32 accumulation;
the state products (q S, k^T v into S) in float32. On a GPU a float32 tl.dot uses TF32 (10-bit mantissa), so fp32
inputs are about 1e-3 relative, not 1e-7; the interpreter computes those dots in full fp32.
"""

from typing import Optional

import torch

from kernels import AotSpec, Benchmark, backend, check_grid, tl, triton
from nanomodels.gated_retention import _check as check_shapes
from nanomodels.gated_retention import gated_retention as reference_gated_retention

CHUNK_SIZES = (16, 32, 64, 128)
MAX_DK = 256
MAX_BH = 2**31 - 1  # grid axis 0 (batch * heads)
MAX_DV_BLOCKS = 65535  # grid axis 1: cdiv(Dv, BLOCK_DV)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ----------------------------------------------------------------------------- kernels

@triton.jit
def _program_head(A, B, C, OUT, G, T, H, DA, DC, stride_ab, stride_ah, stride_bb, stride_bh, stride_cb, stride_ch,
                  stride_ob, stride_oh, BLOCK_DA: tl.constexpr, BLOCK_DC: tl.constexpr):
    """This program's (batch * head, column block of C and OUT): the head's row-0 pointers into A, B (every DA
    column), C and OUT (columns from pid * BLOCK_DC) and G (its T log decays), the column offsets and masks."""
    bh, pid_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    bi, hi = bh // H, bh % H  # int64: every head offset, and each row offset of the callers, is 64-bit
    offs_a, offs_c = tl.arange(0, BLOCK_DA), tl.arange(0, BLOCK_DC)
    col0 = pid_c * BLOCK_DC
    return (A + bi * stride_ab + hi * stride_ah, B + bi * stride_bb + hi * stride_bh,
            C + bi * stride_cb + hi * stride_ch + col0, OUT + bi * stride_ob + hi * stride_oh + col0, G + bh * T,
            offs_a, offs_c, offs_a < DA, offs_c < DC - col0)


@triton.jit
def _chunk_decay(G, t, T):
    """A chunk's rows t: (t < T, t as int64 (T * stride may pass 2^31), the in-chunk cumulative log decay b,
    its total b_last); rows past T decay by 0."""
    in_t = t < T
    g = tl.load(G + t, mask=in_t, other=0.0)
    return in_t, t.to(tl.int64), tl.cumsum(g, axis=0), tl.sum(g, axis=0)


@triton.jit
def _chunk_rows(X, tt, stride_t, offs, in_t, mask_cols):
    """The (CHUNK, len(offs)) tile of rows tt (int64) of one head; rows past T and masked columns read 0."""
    return tl.load(X + tt[:, None] * stride_t + offs[None, :], mask=in_t[:, None] & mask_cols[None, :], other=0.0)


@triton.jit
def _fwd_kernel(Q, K, V, G, OUT, T, H, DK, DV, stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr, CHUNK: tl.constexpr):
    """out_n = sum_{m <= n} exp(c_n - c_m) (q_n . k_m) v_m for one (batch * head, Dv block). q, k (T, DK),
    v, out (T, DV), the rows of one head at stride_*t (last dim contiguous), G (T,) float32 contiguous."""
    Q, K, V, OUT, G, offs_k, offs_v, mask_k, mask_v = _program_head(
        Q, K, V, OUT, G, T, H, DK, DV, stride_qb, stride_qh, stride_kb, stride_kh, stride_vb, stride_vh, stride_ob,
        stride_oh, BLOCK_DK, BLOCK_DV)
    rows = tl.arange(0, CHUNK)
    causal = rows[:, None] >= rows[None, :]
    state = tl.zeros((BLOCK_DK, BLOCK_DV), dtype=tl.float32)
    for t0 in range(0, T, CHUNK):
        in_t, tt, b, b_last = _chunk_decay(G, t0 + rows, T)
        q = _chunk_rows(Q, tt, stride_qt, offs_k, in_t, mask_k)
        k = _chunk_rows(K, tt, stride_kt, offs_k, in_t, mask_k)
        v = _chunk_rows(V, tt, stride_vt, offs_v, in_t, mask_v)
        scores = tl.dot(q, tl.trans(k))  # (CHUNK, CHUNK), float32
        decay = tl.exp(tl.where(causal, b[:, None] - b[None, :], -float("inf")))
        p = (scores * decay).to(v.dtype)
        out = tl.dot(p, v) + tl.exp(b)[:, None] * tl.dot(q.to(tl.float32), state)
        k_w = (k.to(tl.float32) * tl.exp(b_last - b)[:, None])
        state = tl.exp(b_last) * state + tl.dot(tl.trans(k_w), v.to(tl.float32))
        tl.store(OUT + tt[:, None] * stride_ot + offs_v[None, :], out.to(OUT.dtype.element_ty),
                 mask=in_t[:, None] & mask_v[None, :])


@triton.jit
def _rev_kernel(A, Bk, C, G, OUT, T, H, DA, DC, stride_ab, stride_ah, stride_at, stride_bb, stride_bh, stride_bt,
                stride_cb, stride_ch, stride_ct, stride_ob, stride_oh, stride_ot, BLOCK_DA: tl.constexpr, BLOCK_DC: tl.constexpr, CHUNK: tl.constexpr):
    """out_m = sum_{n >= m} exp(c_n - c_m) (a_m . b_n) c_n, chunks from last to first, carrying
    R = sum_{n >= chunk end} exp(c_n - c_{chunk end - 1}) b_n^T c_n (DA x BLOCK_DC, float32)."""
    A, Bk, C, OUT, G, offs_a, offs_c, mask_a, mask_c = _program_head(
        A, Bk, C, OUT, G, T, H, DA, DC, stride_ab, stride_ah, stride_bb, stride_bh, stride_cb, stride_ch, stride_ob,
        stride_oh, BLOCK_DA, BLOCK_DC)
    rows = tl.arange(0, CHUNK)
    anti = rows[:, None] <= rows[None, :]  # (m, n): n >= m
    state = tl.zeros((BLOCK_DA, BLOCK_DC), dtype=tl.float32)
    n_chunks = tl.cdiv(T, CHUNK)
    for i in range(0, n_chunks):
        in_t, tt, b, b_last = _chunk_decay(G, (n_chunks - 1 - i) * CHUNK + rows, T)
        a = _chunk_rows(A, tt, stride_at, offs_a, in_t, mask_a)
        bb = _chunk_rows(Bk, tt, stride_bt, offs_a, in_t, mask_a)
        c = _chunk_rows(C, tt, stride_ct, offs_c, in_t, mask_c)
        scores = tl.dot(a, tl.trans(bb))  # (m, n) = a_m . b_n
        decay = tl.exp(tl.where(anti, b[None, :] - b[:, None], -float("inf")))
        p = (scores * decay).to(c.dtype)
        out = tl.dot(p, c) + tl.exp(b_last - b)[:, None] * tl.dot(a.to(tl.float32), state)
        b_w = bb.to(tl.float32) * tl.exp(b)[:, None]
        state = tl.exp(b_last) * state + tl.dot(tl.trans(b_w), c.to(tl.float32))
        tl.store(OUT + tt[:, None] * stride_ot + offs_c[None, :], out.to(OUT.dtype.element_ty),
                 mask=in_t[:, None] & mask_c[None, :])


# ----------------------------------------------------------------------------- launchers

def default_chunk(d_k: int) -> int:
    """The chunk a call without chunk_size gets: 64 tokens up to Dk = 64, 32 above (at Dk = 128 a chunk of 64
    spills registers on sm_90, `python -m kernels.aot --only retention`)."""
    return 64 if d_k <= 64 else 32


def _chunk(q, chunk_size):
    """chunk_size, or default_chunk(Dk) when it is None (checked with the other arguments by _check)."""
    if chunk_size is None and isinstance(q, torch.Tensor) and q.dim() == 4:
        return default_chunk(q.size(-1))
    return chunk_size


def _blocks(d_in: int, d_out: int):
    """(BLOCK_D of the contracted dim, BLOCK_D of the carried value block, num_warps): the state is
    BLOCK_DK x BLOCK_DV float32 registers, so the value block shrinks as Dk grows."""
    block_in = max(16, triton.next_power_of_2(d_in))
    block_out = min(max(16, triton.next_power_of_2(d_out)), 64 if block_in <= 128 else 32)
    return block_in, block_out, 4 if block_in <= 64 else 8


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous (any batch, head and token strides: a (B, T, H, D)
    transpose, an offset view), else a contiguous copy."""
    return x if x.stride(-1) == 1 or x.size(-1) == 1 else x.contiguous()


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


def _launch(kernel, a, b, c, g, chunk_size: int, out=None):
    """One pass of `kernel` over heads of a, b (B, H, T, Da), c (B, H, T, Dc), g (B, H, T) float32 contiguous."""
    B, H, T, d_a = a.shape
    d_c = c.size(-1)
    a, b, c = _rows(a), _rows(b), _rows(c)
    out = torch.empty(B, H, T, d_c, device=a.device, dtype=c.dtype) if out is None else out
    target = _rows(out)
    block_a, block_c, warps = _blocks(d_a, d_c)
    grid = check_grid((B * H, triton.cdiv(d_c, block_c)), "q", "(B * H, Dv blocks)")
    kernel[grid](a, b, c, g, target, T, H, d_a, d_c, *_strides(a), *_strides(b), *_strides(c), *_strides(target),
                 block_a, block_c, chunk_size, num_warps=warps)
    if target is not out:
        out.copy_(target)
    return out


class _GatedRetention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, log_decay, chunk_size):
        g = log_decay.to(torch.float32).contiguous()
        ctx.save_for_backward(q, k, v, g)
        ctx.chunk_size = chunk_size
        ctx.decay_dtype = log_decay.dtype
        return _launch(_fwd_kernel, q, k, v, g, chunk_size)

    @staticmethod
    def backward(ctx, do):
        q, k, v, g = ctx.saved_tensors
        do = do.to(v.dtype)
        dq = _launch(_fwd_kernel, do, v, k, g, ctx.chunk_size)
        dk = _launch(_rev_kernel, v, do, q, g, ctx.chunk_size)
        dv = _launch(_rev_kernel, k, q, do, g, ctx.chunk_size)
        dlog = None
        if ctx.needs_input_grad[3]:
            dc = (q.float() * dq.float()).sum(-1) - (k.float() * dk.float()).sum(-1)  # (B, H, T)
            dlog = dc.flip(-1).cumsum(-1).flip(-1).to(ctx.decay_dtype)
        return dq, dk, dv, dlog, None


# ----------------------------------------------------------------------------- public API

def _check(q, k, v, log_decay, chunk_size):
    for name, x in (("q", q), ("k", k), ("v", v), ("log_decay", log_decay)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(x).__name__}")
    check_shapes(q, k, v, log_decay)  # nanomodels' rules: shapes, and log_decay finite and <= 0
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in DTYPES:
            raise ValueError(f"{name}: dtype must be one of {DTYPES}, got {x.dtype}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v: must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not log_decay.is_floating_point():
        raise ValueError(f"log_decay: must be a floating-point tensor, got {log_decay.dtype}")
    if len({q.device, k.device, v.device, log_decay.device}) != 1:
        raise ValueError("q, k, v, log_decay: must be on one device")
    B, H, _, d_k = q.shape
    if not 1 <= d_k <= MAX_DK:
        raise ValueError(f"q: head size Dk must be in [1, {MAX_DK}] (the state is Dk x BLOCK_DV registers), "
                         f"got {d_k}")
    if v.size(-1) < 1:
        raise ValueError(f"v: head size Dv must be >= 1, got {v.size(-1)}")
    if chunk_size not in CHUNK_SIZES:
        raise ValueError(f"chunk_size: must be one of {CHUNK_SIZES} (a power of two >= 16 for tl.dot), "
                         f"got {chunk_size!r}")
    if B * H > MAX_BH:
        raise ValueError(f"q: B * H must be <= {MAX_BH} (grid axis 0), got {B * H}")


def gated_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor, *,
                    chunk_size: Optional[int] = None) -> torch.Tensor:
    """o_n = sum_{m <= n} exp(sum_{j=m+1..n} log_decay_j) (q_n . k_m) v_m  ->  (B, H, T, Dv), in v's dtype.

    q, k: (B, H, T, Dk), v: (B, H, T, Dv), one dtype of float32 / float16 / bfloat16; log_decay: (B, H, T),
    any float dtype, finite and <= 0 (read as float32). No scaling of q. Any T (masked loads past T); T = 0 or
    B H = 0 returns a fresh empty/zero tensor. chunk_size: one of CHUNK_SIZES (None: default_chunk(Dk)). Differentiable in q, k, v and
    log_decay. Largest shapes: Dk <= 256 (any Dv, cdiv(Dv, BLOCK_DV) <= 65535), B * H < 2^31; offsets are int64
    (head and row), so T * stride need not fit int32. bf16 runs in fp32 under TRITON_INTERPRET (the
    interpreter cannot multiply bf16); float32 inputs use TF32 tl.dot on a GPU (see the module docstring).
    """
    chunk_size = _chunk(q, chunk_size)
    _check(q, k, v, log_decay, chunk_size)
    B, H, T, _ = q.shape
    if T == 0 or B * H == 0:
        return torch.zeros(B, H, T, v.size(-1), device=v.device, dtype=v.dtype)
    where = backend(q)
    if where == "reference":
        return reference_gated_retention(q, k, v, log_decay.to(q.dtype))
    dtype = v.dtype
    if where == "interpreter" and dtype == torch.bfloat16:  # the interpreter's bf16 tl.dot is garbage
        q, k, v = q.float(), k.float(), v.float()
    return _GatedRetention.apply(q, k, v, log_decay, chunk_size).to(dtype)


def retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma, *, chunk_size: Optional[int] = None) -> torch.Tensor:
    """RetNet's retention with one decay per head: gamma (H,) in (0, 1]; == nanomodels.retnet.retention_parallel.
    It is `gated_retention` with log_decay = log gamma broadcast to (B, H, T)."""
    gamma = torch.as_tensor(gamma, device=q.device if isinstance(q, torch.Tensor) else None)
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or gamma.shape != (q.size(1),):
        raise ValueError(f"gamma: expected shape (H,) = ({getattr(q, 'shape', (0, '?'))[1]},), "
                         f"got {tuple(gamma.shape)}")
    if not gamma.is_floating_point() or not bool(((gamma > 0) & (gamma <= 1)).all()):
        raise ValueError(f"gamma: every decay must be a float in (0, 1], got {gamma.tolist()}")
    log_decay = gamma.to(torch.float32).log()[None, :, None].expand(q.size(0), -1, q.size(2))
    return gated_retention(q, k, v, log_decay, chunk_size=chunk_size)


def gated_retention_forward(q, k, v, log_decay, *, chunk_size: Optional[int] = None,
                            out: Optional[torch.Tensor] = None):
    """The forward kernel once, no autograd; `out` (B, H, T, Dv) of v's dtype may be a preallocated view
    (guard-band tests). Not for bf16 under the interpreter."""
    chunk_size = _chunk(q, chunk_size)
    _check(q, k, v, log_decay, chunk_size)
    if out is not None and (out.shape != v.shape or out.dtype != v.dtype):
        raise ValueError(f"out: must have shape {tuple(v.shape)} and dtype {v.dtype}, got {tuple(out.shape)} "
                         f"{out.dtype}")
    return _launch(_fwd_kernel, q, k, v, log_decay.to(torch.float32).contiguous(), chunk_size, out)


# what a contracts harness registers: the wrapper, its float64 reference, its tensor arguments
CONTRACT = dict(wrapper=gated_retention, reference=reference_gated_retention, tensors=("q", "k", "v", "log_decay"))


def _aot_specs():
    """The compile tier's configs: the default chunk (64) in fp16 at Dk = 64 and 128, forward and the reverse pass,
    with the blocks and warps `_blocks` picks for Dk = Dv."""
    specs = []
    for d in (64, 128):
        block_in, block_out, warps = _blocks(d, d)
        for kind, kernel, names in (("fwd", _fwd_kernel, ("Q", "K", "V", "OUT")),
                                    ("rev", _rev_kernel, ("A", "Bk", "C", "OUT"))):
            ptrs = {**dict.fromkeys(names, "*fp16"), "G": "*fp32"}
            blocks = ({"BLOCK_DK": block_in, "BLOCK_DV": block_out} if kind == "fwd"
                      else {"BLOCK_DA": block_in, "BLOCK_DC": block_out})
            chunk = default_chunk(d)
            specs.append(AotSpec(f"gated_retention {kind} fp16 (Dk {d}, chunk {chunk})", kernel, ptrs,
                                 {**blocks, "CHUNK": chunk}, num_warps=warps))
    return specs


AOT_SPECS = _aot_specs()


def _bench_gpu(quick: bool, time_ms) -> list:
    """Forward and forward+backward of gated retention, bf16, Dk = Dv = 128, against nanomodels' chunkwise
    PyTorch form (the same chunk); FLOPs counted as the chunkwise form's matrix products (4 T C D + 4 T D^2 per
    head, forward)."""
    from nanomodels.gated_retention import gated_retention_chunkwise

    rows = []
    for B, H, T in ((4, 8, 2048),) if quick else ((4, 8, 2048), (2, 8, 8192)):
        D = 128
        q, k, v = (torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        g = (-torch.rand(B, H, T, device="cuda") * 0.1).requires_grad_()
        chunk = default_chunk(D)
        flops = B * H * (4 * T * chunk * D + 4 * T * D * D)
        impls = (("triton", lambda: gated_retention(q, k, v, g)),
                 ("eager chunkwise", lambda: gated_retention_chunkwise(q, k, v, g.to(q.dtype), chunk)[0]))
        for impl, fn in impls:
            shape = f"B{B} H{H} T{T} D{D} bfloat16"
            rows.append({"impl": impl, "mode": "fwd", "shape": shape, "case": f"chunk {chunk}",
                         "ms": (ms := time_ms(fn)), "tflops": flops / ms / 1e9})
            rows.append({"impl": impl, "mode": "fwd+bwd", "shape": shape, "case": f"chunk {chunk}",
                         "ms": (ms := time_ms(lambda: fn().sum().backward(), grads=[q, k, v, g])),
                         "tflops": 3 * flops / ms / 1e9})
    return rows


BENCHMARKS = [Benchmark("retention", gpu=_bench_gpu)]

