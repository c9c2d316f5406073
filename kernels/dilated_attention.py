"""LongNet dilated attention in Triton: "dilation = strided loads", then the LSE merge (arXiv 2307.02486).

One pattern (w, r): head h keeps, in segment i, the rows i*w + s_h + r*t (s_h = h mod r, t = 0 .. w/r - 1).
Those rows are equally spaced, so a program reads them with the row stride r * stride_t: no gather, no copy.

    grid = (query blocks of the w/r kept rows, segments, B * H); the launcher passes the row stride r * stride_t
    program: Q~ = BLOCK_M kept rows; for each block of kept keys: S = Q~ K~^T / sqrt(D), online softmax (FA2)
    writes O at its kept rows and LSE = log sum_j exp(S_ij) there; every other row keeps O = 0, LSE = -inf

Keys past the end of the sequence (a short last segment) are masked inside the tile, never read. Causal: within a
segment all kept rows share the offset, so compressed order is position order and key blocks past the query
block's diagonal are skipped. The patterns are then mixed by alpha_i = softmax_i(LSE_i), nanomodels.dilated's
`merge_by_lse` (the split-KV / flash-decoding combine).

Backward: alpha is differentiable, so each pattern receives dO and dLSE. It reuses the FlashAttention-2 backward
kernels of kernels/flash_attention.py (with the LSE's gradient, delta = rowsum(dO * O) - dLSE): each head's kept
rows of each segment are gathered into a dense (B * H * segments, w/r, D) batch, the short last segment's missing
rows as key padding (key_lengths), and dQ, dK, dV are scattered back to the kept rows. The segments ride on grid
axis y (at most 65,535), so the backward launches them in chunks of MAX_SEGMENTS_PER_LAUNCH (`launch_grids`). The copies hold about
T/r rows per head and pattern.
"""

import math
from dataclasses import replace
from typing import Sequence

import torch

from kernels import GRID_MAX, INTERPRET, AotSpec, Benchmark, backend, tl, triton
from kernels.flash_attention import AOT_SPECS as FLASH_AOT_SPECS
from kernels.flash_attention import MASK_CAUSAL, MASK_NONE, flash_attention_backward
from nanomodels.dilated import check_patterns, dilated_branch, head_offsets, merge_by_lse

HEAD_DIMS = (16, 32, 64, 128)


@triton.jit
def _dilated_fwd_kernel(Q, K, V, OUT, LSE, sm_scale, n_heads, t, w, r,
                        stride_qb, stride_qh, stride_qt, stride_qr, stride_kb, stride_kh, stride_kt, stride_kr,
                        stride_vb, stride_vh, stride_vt, stride_vr, stride_ob, stride_oh, stride_ot, stride_or,
                        stride_lb, stride_lh,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        CAUSAL: tl.constexpr):
    pid_m, seg, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, h = bh // n_heads, bh % n_heads
    first = seg * w + h % r  # position of kept row 0 of this (segment, head)
    Q += b.to(tl.int64) * stride_qb + h.to(tl.int64) * stride_qh + first.to(tl.int64) * stride_qt
    K += b.to(tl.int64) * stride_kb + h.to(tl.int64) * stride_kh + first.to(tl.int64) * stride_kt
    V += b.to(tl.int64) * stride_vb + h.to(tl.int64) * stride_vh + first.to(tl.int64) * stride_vt
    OUT += b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + first.to(tl.int64) * stride_ot
    n_rows = tl.minimum(w // r, (t - first + r - 1) // r)  # kept rows that exist (the last segment may be short)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < n_rows
    q = tl.load(Q + offs_m[:, None].to(tl.int64) * stride_qr + offs_d[None, :], mask=rows[:, None], other=0.0)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)
    ell = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634  # exp(x) = exp2(x log2 e)
    hi = tl.minimum(n_rows, (pid_m + 1) * BLOCK_M) if CAUSAL else n_rows
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        cols = offs_n < n_rows
        kt = tl.load(K + offs_n[None, :].to(tl.int64) * stride_kr + offs_d[:, None], mask=cols[None, :], other=0.0)
        s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N), base 2
        visible = cols[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(visible, s, -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # rows past the end see nothing: stay finite
        alpha = tl.exp2(m - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        ell = ell * alpha + tl.sum(p, axis=1)
        vv = tl.load(V + offs_n[:, None].to(tl.int64) * stride_vr + offs_d[None, :], mask=cols[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv)
        m = m_new
    ell = tl.where(ell == 0.0, 1.0, ell)
    tl.store(OUT + offs_m[:, None].to(tl.int64) * stride_or + offs_d[None, :], (acc / ell[:, None]).to(
        OUT.dtype.element_ty), mask=rows[:, None])
    lse = (m + tl.log2(ell)) * 0.6931471805599453  # natural log
    lse_rows = LSE + b.to(tl.int64) * stride_lb + h.to(tl.int64) * stride_lh + first + offs_m.to(tl.int64) * r
    tl.store(lse_rows, lse, mask=rows)


def _configs(gpu):
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) on a GPU, the first being the default; one config interpreted."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns) for bm, bn, nw, ns in gpu]


FWD_CONFIGS = [(64, 64, 4, 2), (128, 64, 8, 2), (64, 32, 4, 3)]
# Every config compiled for sm_80 / sm_90 at D = 16, 32, 64, 128 in fp16 and fp32 (causal, Triton 3.9, `python -m
# kernels.aot`): all fit shared memory (at most 192 KiB, fp32 D = 128 on sm_90) and one spills: 128x64 with 8 warps
# at D = 32 on sm_8x (40 B, fp16). The autotuner never tries what spills on the launch's device.
_SPILLS = {(8, 32): {(128, 64, 8, 2)}}  # (arch major, head size) -> spilling configs


def usable_configs(arch: int, head_dim: int) -> list:
    """FWD_CONFIGS without those that spill on compute capability `arch` (80, 90) at `head_dim`, in order."""
    return [c for c in FWD_CONFIGS if c not in _SPILLS.get((arch // 10, head_dim), set())]


def _prune(configs, named_args, **kwargs):
    """Triton's early_config_prune hook (called only with more than one config: never in the interpreter)."""
    major, minor = torch.cuda.get_device_capability(named_args["Q"].device)
    usable = usable_configs(10 * major + minor, kwargs["HEAD_DIM"])
    return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
            in usable] or configs[:1]


_fwd = triton.autotune(_configs(FWD_CONFIGS), key=["w", "r", "HEAD_DIM", "CAUSAL"],
                       prune_configs_by={"early_config_prune": _prune})(_dilated_fwd_kernel)


def _check(q, k, v):
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v: must all have the same shape (B, H, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v: dtype must be float16, bfloat16 or float32 (all the same), got {q.dtype}, "
                         f"{k.dtype}, {v.dtype}")
    if q.size(-1) not in HEAD_DIMS:
        raise ValueError(f"q: head size D must be one of {HEAD_DIMS}, got {q.size(-1)}")


MAX_SEGMENTS_PER_LAUNCH = GRID_MAX[1]  # the backward's (batch, head, segment) triples ride on grid axis y


def _segment_chunks(n: int) -> list:
    """[lo, hi) ranges of at most MAX_SEGMENTS_PER_LAUNCH of the backward's n gathered segments: one launch each."""
    return [(lo, min(n, lo + MAX_SEGMENTS_PER_LAUNCH)) for lo in range(0, n, MAX_SEGMENTS_PER_LAUNCH)]


def launch_grids(B: int, H: int, T: int, D: int, w: int, r: int) -> list:
    """[(name, grid)] of every launch one pattern (w, r) makes on q (B, H, T, D), computed, not launched: the
    forward's (query blocks, segments, B * H) and, per chunk of segments, the backward's delta, dK/dV and dQ
    (row blocks, segments in the chunk). Row blocks are counted at 16 rows, the smallest block any config uses."""
    m, n = w // r, -(-T // w)
    grids = [("forward", (-(-m // 16), n, B * H))]
    for lo, hi in _segment_chunks(B * H * n):
        grids += [(f"backward {part} [{lo}, {hi})", (-(-m // 16), hi - lo)) for part in ("delta", "dkdv", "dq")]
    return grids


def dilated_branch_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int, *,
                          causal: bool = False, out=None, lse=None) -> tuple:
    """One pattern (w, r) by the Triton kernel: (O|(w, r), LSE), as nanomodels.dilated.dilated_branch, and
    differentiable in q, k, v through both outputs.

    `out` (B, H, T, D, q's dtype) and `lse` (B, H, T, float32), each with a unit last stride, when given, are
    filled in place (no autograd); a bad one raises ValueError before anything is written. Under the interpreter
    bf16 is computed in float32 (the interpreter cannot multiply bf16) and rounded to bf16 at the end. float32
    inputs: on a GPU tl.dot runs in TF32 (10-bit mantissa), errors of order 1e-4 relative, not fp32's 1e-7
    (kernels/README.md); the interpreter multiplies in fp32."""
    check_patterns([w], [r])
    _check(q, k, v)
    if q.size(0) * q.size(1) > GRID_MAX[2] or -(-q.size(2) // w) > GRID_MAX[1]:
        raise ValueError(f"q: B * H = {q.size(0) * q.size(1)} must be <= {GRID_MAX[2]} and the segments ceil(T / w) "
                         f"= {-(-q.size(2) // w)} <= {GRID_MAX[1]} (CUDA's grid limits on axes z and y)")
    if backend(q) == "reference":
        out, lse = dilated_branch(q, k, v, w, r, causal=causal)
        return out, lse.float()
    if out is None and lse is None and torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v)):
        if backend(q) == "interpreter" and q.dtype == torch.bfloat16:  # as below; autograd casts the gradients
            o32, lse32 = _DilatedBranch.apply(q.float(), k.float(), v.float(), w, r, causal)
            return o32.to(q.dtype), lse32
        return _DilatedBranch.apply(q, k, v, w, r, causal)  # its forward calls this function without autograd
    B, H, T, D = q.shape
    for name, t, shape, dtype in (("out", out, q.shape, q.dtype), ("lse", lse, (B, H, T), torch.float32)):
        if t is not None and (t.shape != shape or t.dtype != dtype or t.device != q.device or t.stride(-1) != 1):
            raise ValueError(f"{name}: needs shape {tuple(shape)}, dtype {dtype}, q's device and a unit last stride, "
                             f"got {tuple(t.shape)} {t.dtype} on {t.device} with strides {t.stride()}")
    if backend(q) == "interpreter" and q.dtype == torch.bfloat16:  # the interpreter cannot multiply bf16: fp32
        o32, lse32 = dilated_branch_kernel(q.float(), k.float(), v.float(), w, r, causal=causal, lse=lse)
        return (o32.to(q.dtype) if out is None else out.copy_(o32)), lse32
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.zeros_like(q) if out is None else out.zero_()  # rows this pattern does not keep stay 0 ...
    lse = torch.empty((B, H, T), device=q.device, dtype=torch.float32) if lse is None else lse
    lse.fill_(-math.inf)  # ... with LSE = -inf
    # BEGIN EXERCISE 6.4: dilation as a strided load
    grid = lambda meta: (triton.cdiv(w // r, meta["BLOCK_M"]), triton.cdiv(T, w), B * H)  # noqa: E731
    kept_row = [r * x.stride(2) for x in (q, k, v, out)]  # one kept row to the next: r rows apart
    # END EXERCISE
    _fwd[grid](q, k, v, out, lse, 1.0 / math.sqrt(D), H, T, w, r, *q.stride()[:3], kept_row[0], *k.stride()[:3],
               kept_row[1], *v.stride()[:3], kept_row[2], *out.stride()[:3], kept_row[3], lse.stride(0),
               lse.stride(1), HEAD_DIM=D, CAUSAL=causal)
    return out, lse


def kept_positions(T: int, n_heads: int, w: int, r: int, device=None) -> torch.Tensor:
    """(H, n, w/r) positions i*w + s_h + r*t of head h's kept rows in segment i; those >= T are padding."""
    n, m = -(-T // w), w // r
    s = head_offsets(n_heads, r).to(device)
    return torch.arange(n, device=device)[:, None] * w + s[:, None, None] + r * torch.arange(m, device=device)


def _gather(x: torch.Tensor, pos: torch.Tensor, w: int) -> torch.Tensor:
    """x (B, H, T, *) -> (B * H * n, 1, w/r, *): head h's kept rows pos[h] of each segment, one segment per batch
    entry; rows at positions >= T (the short last segment) read 0."""
    B, H, T = x.shape[:3]
    n = pos.size(1)
    if n * w > T:
        x = torch.cat([x, x.new_zeros(B, H, n * w - T, *x.shape[3:])], dim=2)
    heads = torch.arange(H, device=x.device)[:, None, None]
    return x[:, heads, pos].reshape(B * H * n, 1, pos.size(2), *x.shape[3:])  # (B, H, n, m, *) flattened


class _DilatedBranch(torch.autograd.Function):
    """Forward: the strided kernel. Backward: FlashAttention-2's backward kernels on the gathered segments."""

    @staticmethod
    def forward(ctx, q, k, v, w, r, causal):
        out, lse = dilated_branch_kernel(q, k, v, w, r, causal=causal)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.w, ctx.r, ctx.causal = w, r, causal
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        B, H, T, D = q.shape
        pos = kept_positions(T, H, ctx.w, ctx.r, q.device)  # (H, n, m)
        key_lengths = (pos < T).sum(-1).flatten().repeat(B)  # kept rows that exist, per (b, h, segment)
        dout = torch.zeros_like(out) if dout is None else dout
        lse = torch.where(torch.isfinite(lse), lse, 0.0)  # padding rows: q = dO = 0 there, any finite LSE
        seg = [_gather(x, pos, ctx.w) for x in (q, k, v, out.to(q.dtype), lse, dout.to(q.dtype))]
        dlse = None if dlse is None else _gather(dlse.float(), pos, ctx.w)
        grads = [torch.empty_like(x) for x in seg[:3]]  # dq, dk, dv: filled one launch-sized chunk at a time
        for lo, hi in _segment_chunks(seg[0].size(0)):
            flash_attention_backward(*(x[lo:hi] for x in seg), causal=ctx.causal, key_lengths=key_lengths[lo:hi],
                                     dlse=None if dlse is None else dlse[lo:hi], dq=grads[0][lo:hi],
                                     dk=grads[1][lo:hi], dv=grads[2][lo:hi])
        heads = torch.arange(H, device=q.device)[:, None, None]

        def scatter(g):  # (B * H * n, 1, m, D) -> (B, H, T, D): the kept rows, 0 on every other row
            full = q.new_zeros(B, H, pos.size(1) * ctx.w, D)
            full[:, heads, pos] = g.view(B, *pos.shape, D)
            return full[:, :, :T]

        return (*(scatter(g) if needed else None for g, needed in zip(grads, ctx.needs_input_grad)), None, None, None)


def dilated_attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
                             dilation_rates: Sequence[int], *, causal: bool = False,
                             detach_weights: bool = False) -> torch.Tensor:
    """Dilated attention, q, k, v (B, H, T, D) -> (B, H, T, D): one kernel launch per pattern, then the merge.
    Differentiable; detach_weights as in nanomodels.dilated.dilated_attention (torchscale's no_grad mixing).
    float32 inputs: TF32 tl.dot on a GPU, errors of order 1e-4 relative (see `dilated_branch_kernel`)."""
    segment_lengths, dilation_rates = check_patterns(segment_lengths, dilation_rates)
    _check(q, k, v)
    branches = [dilated_branch_kernel(q, k, v, w, r, causal=causal) for w, r in zip(segment_lengths, dilation_rates)]
    out = merge_by_lse([o.float() for o, _ in branches], [lse for _, lse in branches], detach_weights=detach_weights)
    return out.to(q.dtype)


# ----------------------------------------------------------------------------- registry

def _aot_specs():
    specs = []
    for d, arch in ((d, arch) for d in HEAD_DIMS for arch in (80, 90)):  # the default (first usable) config
        bm, bn, nw, ns = usable_configs(arch, d)[0]
        specs.append(AotSpec(f"dilated_fwd fp16 D={d} causal ({bm}x{bn}, {nw} warps, {ns} stages)",
                             _dilated_fwd_kernel, dict.fromkeys(["Q", "K", "V", "OUT"], "*fp16") | {"LSE": "*fp32"},
                             {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "CAUSAL": True},
                             scalars={"sm_scale": "fp32"}, num_warps=nw, num_stages=ns, archs=(arch,), mma=True))
    # the backward: FlashAttention's dK/dV and dQ kernels at their default configs, with the mask kinds this
    # module launches them with (causal or none, plus key_lengths); flash_attention.py compiles the prefix mask
    for spec in FLASH_AOT_SPECS:
        if spec.name.startswith(("attn_bwd_dkdv fp16", "attn_bwd_dq fp16")):
            for kind, label in ((MASK_CAUSAL, "causal"), (MASK_NONE, "bidirectional")):
                specs.append(replace(spec, name=spec.name.replace("attn_bwd_", "dilated_bwd ").replace("prefix mask", label),
                                     constexprs={**spec.constexprs, "MASK_KIND": kind}))
    return specs


AOT_SPECS = _aot_specs()


def _bench_gpu(quick: bool, time_ms) -> list:
    from nanomodels.attention import sdpa_attention

    rows = []
    ws, rs = (2048, 4096, 8192, 16384), (1, 2, 4, 8)
    for T in ((16384,) if quick else (16384, 65536)):
        q, k, v = (torch.randn(1, 16, T, 64, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = sum(4 * 16 * T * (w // r) * 64 for w, r in zip(ws, rs))  # per pattern: T queries x w/r keys
        for impl, fn in (("triton dilated", lambda: dilated_attention_kernel(q, k, v, ws, rs)),
                         ("torch dilated", lambda: merge_by_lse(*zip(*[dilated_branch(q, k, v, w, r)
                                                                       for w, r in zip(ws, rs)]))),
                         ("sdpa dense", lambda: sdpa_attention(q, k, v))):
            ms = time_ms(fn)
            work = 4 * 16 * T * T * 64 if impl == "sdpa dense" else flops
            rows.append({"impl": impl, "mode": "fwd", "shape": f"1x16x{T}x64", "case": "w 2K-16K, r 1-8",
                         "ms": ms, "tflops": work / ms / 1e9})
    return rows


def _bench_cpu(quick: bool) -> list:
    rows = []
    for causal in (False, True):
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 4, 200, 32, generator=g) for _ in range(3))
        want = merge_by_lse(*zip(*[dilated_branch(q.double(), k.double(), v.double(), w, r, causal=causal)
                                   for w, r in ((32, 1), (64, 2), (128, 4))]))
        got = dilated_attention_kernel(q, k, v, (32, 64, 128), (1, 2, 4), causal=causal)
        rows.append({"case": f"fp32 T=200 {'causal' if causal else 'bidirectional'}",
                     "O err": (got.double() - want).abs().max().item()})
    return rows


BENCHMARKS = [Benchmark("dilated_attention", gpu=_bench_gpu, cpu=_bench_cpu)]
