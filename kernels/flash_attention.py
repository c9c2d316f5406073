"""FlashAttention-2 in Triton, forward and backward, with the UniLM mask kinds computed inside each tile.

    O = softmax(S) V,   S = Q K^T / sqrt(D) + M,   LSE_i = log sum_j exp(S_ij)   (natural log, one per query row)

Forward (Dao 2023, arXiv 2307.08691): a program owns BLOCK_M query rows and walks the keys in tiles of BLOCK_N,
the online softmax of kernels/softmax.py with a running output: per tile, S = Q K^T, m' = max(m, rowmax S),
acc = acc * exp(m - m') + exp(S - m') V, ell likewise; O = acc / ell once at the end (FA2's deferred normalisation).
S (T x T) never exists in memory. Scores are kept in base 2 (scale folded into sm_scale * log2 e, exp -> exp2).

Masks (UniLM, arXiv 1905.03197), key j visible from query i (at position i + Tk - Tq), and always j < key_len[b]:

    none (bidirectional)         every key
    causal (left-to-right)       j <= i
    prefix (seq2seq, prefix-LM)  j < prefix_len[b]  or  j <= i      (source bidirectional, target left-to-right)

Each row sees a prefix [0, bound_i) of the keys, with bound_i growing with i. So for a query tile the key tiles
split into three runs: fully visible tiles (no mask work), tiles cut by a mask edge (predicate from indices),
and fully masked tiles, which are never loaded: that skipping is where a mask's speed comes from (about half
the work for causal). A row that sees no key at all (key_len = 0) returns zeros and LSE = -inf, not NaN.

Backward (FA2): P is recomputed from Q, K and the saved LSE (never stored), with delta_i = rowsum(dO * O):
    dV = P^T dO,   dP = dO V^T,   dS = P * (dP - delta),   dQ = dS K / sqrt(D),   dK = dS^T Q / sqrt(D)
The LSE output is differentiable too (merging calls by their LSE, as LongNet's dilated attention and split-KV
decoding do, needs it): dLSE_i / dS_ij = P_ij, so with an upstream dLSE the same kernels run with
delta_i = rowsum(dO * O) - dLSE_i. dK, dV are computed only when k or v needs a gradient, dQ only when q does.
We use two kernels, no atomics: one program per key tile accumulates dK, dV over the query tiles, one program
per query tile accumulates dQ over the key tiles. S and P are computed twice, but each output is written once
by one program: deterministic, and race-free by construction (the interpreter runs programs one at a time and
could not expose a race in an atomic version).

Kernels use plain pointer arithmetic (no block pointers, gone in Triton 3.9), so Triton 3.6 to 3.9 all work.
Every offset is 64-bit (the batch and head index and the strides are cast to int64 before any product): a
(B, T, H, D) view at H D = 4096 passes 2^31 elements at T = 512K, and an int32 product would wrap around.
Autotuning keys on the lengths rounded up to powers of two, so decoding token by token does not re-tune.
Triton tutorial 06-fused-attention is the production-grade relative (warp specialisation, TMA, fp8).
"""

import inspect
import math
import numbers
from typing import Optional, Sequence, Union

import torch

from kernels import GRID_MAX, INTERPRET, AotSpec, Benchmark, backend, check_grid, tl, triton
from nanomodels.attention import attention

MASK_NONE, MASK_CAUSAL, MASK_PREFIX = 0, 1, 2
HEAD_DIMS = (16, 32, 64, 128)
LengthsArg = Optional[Union[int, Sequence[int], torch.Tensor]]


# ----------------------------------------------------------------------------- the mask, in one place

@triton.jit
def _visible(q_pos, k_idx, key_len, prefix_len, MASK_KIND: tl.constexpr):
    """True where key k_idx is visible from the query at position q_pos (both broadcast to the tile's shape)."""
    ok = k_idx < key_len
    if MASK_KIND == 1:
        ok = ok & (k_idx <= q_pos)
    elif MASK_KIND == 2:
        ok = ok & ((k_idx < prefix_len) | (k_idx <= q_pos))
    return ok


@triton.jit
def _key_range(m0, offset, key_len, prefix_len, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               MASK_KIND: tl.constexpr):
    """Key tiles for query rows [m0, m0 + BLOCK_M): [0, full) are visible to every row, [full, hi) need the
    mask, [hi, Tk) are fully masked and skipped. Row i sees keys [0, bound_i), bound_i growing with i."""
    hi = key_len
    full = key_len // BLOCK_N * BLOCK_N
    if MASK_KIND == 1:
        hi = tl.minimum(hi, m0 + BLOCK_M + offset)  # the last row's bound
        full = tl.minimum(full, (m0 + offset + 1) // BLOCK_N * BLOCK_N)  # the first row's bound, whole tiles
    elif MASK_KIND == 2:
        hi = tl.minimum(hi, tl.maximum(prefix_len, m0 + BLOCK_M + offset))
        full = tl.minimum(full, tl.maximum(prefix_len, m0 + offset + 1) // BLOCK_N * BLOCK_N)
    return full, hi


@triton.jit
def _query_range(n0, offset, key_len, prefix_len, t_q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 MASK_KIND: tl.constexpr):
    """Query tiles for key rows [n0, n0 + BLOCK_N): [lo, full) need the mask, [full, Tq) see the whole key
    tile, [0, lo) see none of it. lo = full = Tq when the tile is all padding (n0 >= key_len)."""
    lo = 0
    full = 0
    if MASK_KIND == 1:
        lo = tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M  # first row with position >= n0
        full = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    elif MASK_KIND == 2:
        lo = tl.where(n0 < prefix_len, 0, tl.maximum(n0 - offset, 0) // BLOCK_M * BLOCK_M)
        full = tl.where(n0 + BLOCK_N <= prefix_len, 0,
                        tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M)
    full = tl.where(n0 + BLOCK_N <= key_len, full, t_q)  # a tile cut by key_len always needs the mask
    lo = tl.where(n0 < key_len, lo, t_q)
    return lo, tl.minimum(full, t_q)


# ----------------------------------------------------------------------------- forward

@triton.jit
def _fwd_tiles(acc, ell, m, q, q_pos, K, V, stride_kt, stride_vt, key_len, prefix_len, start, end, qk_scale,
               HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, MASKED: tl.constexpr):
    """Key tiles [start, end) for one query tile, BLOCK_N keys at a time: the online softmax with a running output.
    Over the keys seen so far, m (BLOCK_M,) is the running max of the base-2 scores s = q k^T * qk_scale (-inf
    before any visible key), ell (BLOCK_M,) = sum exp2(s - m), acc (BLOCK_M, HEAD_DIM) = sum exp2(s - m) v, all
    float32; returned updated. MASKED: keys hidden by `_visible` get s = -inf (else every key here is visible).
    The caller divides acc by ell once, after the last tile, and stores LSE = (m + log2 ell) ln 2."""
    offs_d = tl.arange(0, HEAD_DIM)
    rows = tl.arange(0, BLOCK_N)
    tile_k, tile_v = stride_kt.to(tl.int64), stride_vt.to(tl.int64)  # one tile's first row: int64 n0 * stride
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + rows
        # the tile's first row in int64, the rows inside it in int32 (the launcher keeps BLOCK * stride < 2^31):
        # 64-bit safe, with the register use of 32-bit offsets (int64 everywhere spills at D = 128 on sm_80)
        kt = tl.load(K + n0 * tile_k + rows[None, :] * stride_kt + offs_d[:, None],
                     mask=offs_n[None, :] < key_len, other=0.0)
        # BEGIN EXERCISE 1.3: one key/value tile of the FlashAttention forward
        s = tl.dot(q, kt) * qk_scale  # (BLOCK_M, BLOCK_N) scores, base 2
        if MASKED:
            s = tl.where(_visible(q_pos[:, None], offs_n[None, :], key_len, prefix_len, MASK_KIND), s,
                         -float("inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))
        m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)  # a row with no visible key yet stays 0, not NaN
        alpha = tl.exp2(m - m_ref)  # rescale what was accumulated under the old max
        p = tl.exp2(s - m_ref[:, None])
        ell = ell * alpha + tl.sum(p, axis=1)
        v = tl.load(V + n0 * tile_v + rows[:, None] * stride_vt + offs_d[None, :],
                    mask=offs_n[:, None] < key_len, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m = m_new
        # END EXERCISE
    return acc, ell, m


@triton.jit
def _attn_fwd_kernel(Q, K, V, OUT, LSE, KEY_LEN, PREFIX_LEN, TILES, sm_scale, n_heads, t_q, t_k,
                     stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                     stride_vb, stride_vh, stride_vt, stride_ob, stride_oh, stride_ot, stride_lb, stride_lh,
                     t_q_bucket, t_k_bucket, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr, COUNT_TILES: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # grid: (query tiles, B * H)
    b, h = bh // n_heads, bh % n_heads  # int64: the head and batch offsets, and each tile's first row, are
    m0 = pid_m * BLOCK_M  # 64-bit; offsets inside a tile are 32-bit (see _fwd_tiles)
    Q += b * stride_qb + h * stride_qh + m0.to(tl.int64) * stride_qt
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    OUT += b * stride_ob + h * stride_oh + m0.to(tl.int64) * stride_ot
    key_len, prefix_len = tl.load(KEY_LEN + b), tl.load(PREFIX_LEN + b)
    offset = t_k - t_q  # query row i sits at position i + offset (the queries are the last Tq positions)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    tile_rows = tl.arange(0, BLOCK_M)
    q = tl.load(Q + tile_rows[:, None] * stride_qt + offs_d[None, :], mask=offs_m[:, None] < t_q, other=0.0)
    m = tl.full((BLOCK_M,), -float("inf"), tl.float32)  # running max (base 2)
    ell = tl.zeros((BLOCK_M,), tl.float32)  # running sum of exp2(s - m)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)  # running, unnormalised output
    qk_scale = sm_scale * 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2 e)

    full, hi = _key_range(m0, offset, key_len, prefix_len, BLOCK_M, BLOCK_N, MASK_KIND)
    q_pos = offs_m + offset
    acc, ell, m = _fwd_tiles(acc, ell, m, q, q_pos, K, V, stride_kt, stride_vt, key_len, prefix_len, 0, full,
                           qk_scale, HEAD_DIM, BLOCK_N, MASK_KIND, False)
    acc, ell, m = _fwd_tiles(acc, ell, m, q, q_pos, K, V, stride_kt, stride_vt, key_len, prefix_len, full, hi,
                           qk_scale, HEAD_DIM, BLOCK_N, MASK_KIND, True)

    empty = ell == 0.0  # a fully masked row: acc = 0, so O = 0 and LSE = log(0) = -inf
    ell = tl.where(empty, 1.0, ell)
    tl.store(OUT + tile_rows[:, None] * stride_ot + offs_d[None, :], (acc / ell[:, None]).to(OUT.dtype.element_ty),
             mask=offs_m[:, None] < t_q)
    lse = tl.where(empty, -float("inf"), (m + tl.log2(ell)) * 0.6931471805599453)  # back to natural log
    tl.store(LSE + b * stride_lb + h * stride_lh.to(tl.int64) + offs_m, lse, mask=offs_m < t_q)
    if COUNT_TILES:  # test hook: how many key tiles this program visited, unmasked and masked
        slot = (bh * tl.cdiv(t_q, 16) + pid_m) * 2  # room for the smallest BLOCK_M (16) in any config
        tl.store(TILES + slot, full // BLOCK_N)
        tl.store(TILES + slot + 1, tl.cdiv(hi - full, BLOCK_N))


# ----------------------------------------------------------------------------- backward

@triton.jit
def _attn_bwd_delta_kernel(OUT, DO, DLSE, DELTA, n_heads, t_q, stride_ob, stride_oh, stride_ot,
                           stride_dob, stride_doh, stride_dot, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                           HAS_DLSE: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)
    b, h = bh // n_heads, bh % n_heads  # int64 like the strides below: no offset overflows at 2^31 elements
    stride_ot, stride_dot = stride_ot.to(tl.int64), stride_dot.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m[:, None] < t_q
    o = tl.load(OUT + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ot + offs_d[None, :],
                mask=rows, other=0.0)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_dot
                 + offs_d[None, :], mask=rows, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)  # = rowsum(P * dP), the softmax-backward term
    if HAS_DLSE:  # dLSE_i / dS_ij = P_ij, so dS = P * (dP - delta + dLSE): fold it into delta
        delta -= tl.load(DLSE + bh * t_q + offs_m, mask=offs_m < t_q, other=0.0)
    tl.store(DELTA + bh * t_q + offs_m, delta, mask=offs_m < t_q)


@triton.jit
def _bwd_dkdv_tiles(dk, dv, k, v, n_idx, Q, DO, LSE, DELTA, stride_qt, stride_dot, t_q, offset, key_len,
                    prefix_len, start, end, qk_scale, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                    MASK_KIND: tl.constexpr, MASKED: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for m0 in range(start, end, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        rows = offs_m < t_q
        qt = tl.load(Q + offs_m[None, :] * stride_qt + offs_d[:, None], mask=rows[None, :], other=0.0)
        do = tl.load(DO + offs_m[:, None] * stride_dot + offs_d[None, :], mask=rows[:, None], other=0.0)
        lse2 = tl.load(LSE + offs_m, mask=rows, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + offs_m, mask=rows, other=0.0)
        st = tl.dot(k, qt) * qk_scale  # (BLOCK_N, BLOCK_M): S^T, base 2
        if MASKED:
            st = tl.where(_visible(offs_m[None, :] + offset, n_idx[:, None], key_len, prefix_len, MASK_KIND),
                          st, -float("inf"))
        pt = tl.exp2(st - lse2[None, :])  # P^T recomputed from the saved log-sum-exp
        dv += tl.dot(pt.to(do.dtype), do)
        dpt = tl.dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))
    return dk, dv


@triton.jit
def _head_tile(X, head, offs, stride_t, offs_d, mask):
    """The (len(offs), HEAD_DIM) tile at rows `offs` of the head that starts `head` elements into X (int64);
    masked rows read 0."""
    return tl.load(X + head + offs[:, None] * stride_t + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, KEY_LEN, PREFIX_LEN, sm_scale, n_heads, t_q, t_k,
                          stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                          stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                          stride_dkb, stride_dkh, stride_dkt, stride_dvb, stride_dvh, stride_dvt,
                          t_q_bucket, t_k_bucket, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr):
    pid_n, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # grid: (key tiles, B * H)
    b, h = bh // n_heads, bh % n_heads  # int64 like the strides below: no offset overflows at 2^31 elements
    stride_qt, stride_kt, stride_vt, stride_dot, stride_dkt, stride_dvt = (
        stride_qt.to(tl.int64), stride_kt.to(tl.int64), stride_vt.to(tl.int64), stride_dot.to(tl.int64),
        stride_dkt.to(tl.int64), stride_dvt.to(tl.int64))
    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    LSE += bh * t_q
    DELTA += bh * t_q
    key_len, prefix_len = tl.load(KEY_LEN + b), tl.load(PREFIX_LEN + b)
    offset = t_k - t_q

    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM)
    keys = offs_n[:, None] < key_len
    k = _head_tile(K, b * stride_kb + h * stride_kh, offs_n, stride_kt, offs_d, keys)
    v = _head_tile(V, b * stride_vb + h * stride_vh, offs_n, stride_vt, offs_d, keys)
    dk = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    dv = tl.zeros((BLOCK_N, HEAD_DIM), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    lo, full = _query_range(n0, offset, key_len, prefix_len, t_q, BLOCK_M, BLOCK_N, MASK_KIND)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, stride_qt, stride_dot, t_q, offset, key_len,
                             prefix_len, lo, full, qk_scale, HEAD_DIM, BLOCK_M, MASK_KIND, True)
    dk, dv = _bwd_dkdv_tiles(dk, dv, k, v, offs_n, Q, DO, LSE, DELTA, stride_qt, stride_dot, t_q, offset, key_len,
                             prefix_len, full, t_q, qk_scale, HEAD_DIM, BLOCK_M, MASK_KIND, False)

    out = offs_n[:, None] < t_k
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkt + offs_d[None, :],
             (dk * sm_scale).to(DK.dtype.element_ty), mask=out)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvt + offs_d[None, :],
             dv.to(DV.dtype.element_ty), mask=out)


@triton.jit
def _bwd_dq_tiles(dq, q, do, lse2, delta, q_pos, K, V, stride_kt, stride_vt, key_len, prefix_len, start, end,
                  qk_scale, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK_KIND: tl.constexpr,
                  MASKED: tl.constexpr):
    offs_d = tl.arange(0, HEAD_DIM)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        keys = offs_n[None, :] < key_len
        kt = tl.load(K + offs_n[None, :] * stride_kt + offs_d[:, None], mask=keys, other=0.0)
        vt = tl.load(V + offs_n[None, :] * stride_vt + offs_d[:, None], mask=keys, other=0.0)
        s = tl.dot(q, kt) * qk_scale
        if MASKED:
            s = tl.where(_visible(q_pos[:, None], offs_n[None, :], key_len, prefix_len, MASK_KIND), s,
                         -float("inf"))
        p = tl.exp2(s - lse2[:, None])
        ds = p * (tl.dot(do, vt) - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, KEY_LEN, PREFIX_LEN, sm_scale, n_heads, t_q, t_k,
                        stride_qb, stride_qh, stride_qt, stride_kb, stride_kh, stride_kt,
                        stride_vb, stride_vh, stride_vt, stride_dob, stride_doh, stride_dot,
                        stride_dqb, stride_dqh, stride_dqt, t_q_bucket, t_k_bucket,
                        HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        MASK_KIND: tl.constexpr):
    pid_m, bh = tl.program_id(0), tl.program_id(1).to(tl.int64)  # grid: (query tiles, B * H)
    b, h = bh // n_heads, bh % n_heads  # int64 like the strides below: no offset overflows at 2^31 elements
    stride_qt, stride_kt, stride_vt, stride_dot, stride_dqt = (
        stride_qt.to(tl.int64), stride_kt.to(tl.int64), stride_vt.to(tl.int64), stride_dot.to(tl.int64),
        stride_dqt.to(tl.int64))
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    key_len, prefix_len = tl.load(KEY_LEN + b), tl.load(PREFIX_LEN + b)
    offset = t_k - t_q

    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    rows = offs_m < t_q
    q = _head_tile(Q, b * stride_qb + h * stride_qh, offs_m, stride_qt, offs_d, rows[:, None])
    do = _head_tile(DO, b * stride_dob + h * stride_doh, offs_m, stride_dot, offs_d, rows[:, None])
    lse2 = tl.load(LSE + bh * t_q + offs_m, mask=rows, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + bh * t_q + offs_m, mask=rows, other=0.0)
    dq = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    qk_scale = sm_scale * 1.4426950408889634

    full, hi = _key_range(m0, offset, key_len, prefix_len, BLOCK_M, BLOCK_N, MASK_KIND)
    q_pos = offs_m + offset
    dq = _bwd_dq_tiles(dq, q, do, lse2, delta, q_pos, K, V, stride_kt, stride_vt, key_len, prefix_len, 0, full,
                       qk_scale, HEAD_DIM, BLOCK_N, MASK_KIND, False)
    dq = _bwd_dq_tiles(dq, q, do, lse2, delta, q_pos, K, V, stride_kt, stride_vt, key_len, prefix_len, full, hi,
                       qk_scale, HEAD_DIM, BLOCK_N, MASK_KIND, True)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqt + offs_d[None, :],
             (dq * sm_scale).to(DQ.dtype.element_ty), mask=rows[:, None])


# ----------------------------------------------------------------------------- configs: one under the interpreter

def _configs(gpu):
    """`gpu` lists (BLOCK_M, BLOCK_N, num_warps, num_stages). The interpreter gets one 64 x 64 config (it cannot
    autotune, and its cost is per program and tile)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in gpu]


FWD_CONFIGS = [(128, 64, 8, 2), (64, 64, 4, 3), (128, 32, 4, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 32, 4, 2)]
DKDV_CONFIGS = [(32, 64, 4, 3), (64, 64, 8, 2), (32, 128, 4, 2), (64, 64, 4, 2)]
DQ_CONFIGS = [(64, 32, 4, 2), (128, 32, 8, 2), (64, 64, 4, 3), (128, 64, 8, 2)]
# Configs that spill registers at D = 128 on sm_8x (A100-class: 255 registers a thread at most), measured with
# the compile tier (fp16, the prefix mask, Triton 3.9; `python -m kernels.aot` checks each default).
_SPILL_SM8X_D128 = {"fwd": {(128, 64, 8, 2), (128, 32, 4, 3), (128, 128, 8, 2), (128, 64, 4, 3)},
                    "dkdv": {(32, 128, 4, 2)}, "dq": set()}


def shared_memory_bound(kernel: str, config: tuple, head_dim: int, elem_bytes: int) -> int:
    """Bytes of shared memory `config` needs at most: the forward pipelines num_stages K and V tiles of
    BLOCK_N rows and keeps the Q tile; dK/dV pipelines Q and dO tiles (BLOCK_M rows) and keeps K and V; dQ
    the reverse; plus one BLOCK_M x BLOCK_N tile. Equal to or above every size the compile tier measured."""
    bm, bn, _, stages = config
    rows = {"fwd": stages * 2 * bn + bm, "dkdv": stages * 2 * bm + 2 * bn, "dq": stages * 2 * bn + 2 * bm}[kernel]
    return (rows * head_dim + bm * bn) * elem_bytes


def usable_configs(kernel: str, arch: int, head_dim: int, elem_bytes: int, smem_limit: int) -> list:
    """The autotune configs of `kernel` ("fwd", "dkdv", "dq") worth trying on compute capability `arch` (80, 90)
    at `head_dim` with `elem_bytes`-byte inputs, in order (the first is the default): without the configs that
    spill there, and without those whose `shared_memory_bound` exceeds `smem_limit` bytes (fp32 doubles it)."""
    gpu = {"fwd": FWD_CONFIGS, "dkdv": DKDV_CONFIGS, "dq": DQ_CONFIGS}[kernel]
    spills = _SPILL_SM8X_D128[kernel] if arch // 10 == 8 and head_dim > 64 else set()
    smem = {c: shared_memory_bound(kernel, c, head_dim, elem_bytes) for c in gpu}
    keep = [c for c in gpu if c not in spills and smem[c] <= smem_limit]
    return keep or [min((c for c in gpu if c not in spills), key=smem.get)]


def _pruner(kernel: str):
    """Triton's early_config_prune hook: keep the usable configs for the launch's device, head size, dtype."""
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        major, minor = torch.cuda.get_device_capability(q.device)
        props = torch.cuda.get_device_properties(q.device)  # older torch: the A100 / H100 limits by major
        limit = getattr(props, "shared_memory_per_block_optin", (163 if major == 8 else 227) * 1024)
        usable = usable_configs(kernel, 10 * major + minor, kwargs["HEAD_DIM"], q.element_size(), limit)
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)
                in usable] or configs[:1]
    return {"early_config_prune": prune}  # only called with more than one config: never in the interpreter


_KEY = ["t_q_bucket", "t_k_bucket", "HEAD_DIM", "MASK_KIND"]
_fwd = triton.autotune(_configs(FWD_CONFIGS), key=_KEY, prune_configs_by=_pruner("fwd"))(_attn_fwd_kernel)
_dkdv = triton.autotune(_configs(DKDV_CONFIGS), key=_KEY, prune_configs_by=_pruner("dkdv"))(_attn_bwd_dkdv_kernel)
_dq = triton.autotune(_configs(DQ_CONFIGS), key=_KEY, prune_configs_by=_pruner("dq"))(_attn_bwd_dq_kernel)


def _aot_specs():
    """The default (first usable) GPU config of each kernel per arch and head size (D = 64, 128), fp16, the prefix
    mask (the most mask code)."""
    half = dict.fromkeys(["Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"], "*fp16")
    half.update(LSE="*fp32", DLSE="*fp32", DELTA="*fp32", KEY_LEN="*i32", PREFIX_LEN="*i32", TILES="*i32")
    specs = []
    smem_limit = {80: 163 * 1024, 90: 227 * 1024}
    for d, arch in ((d, arch) for d in (64, 128) for arch in (80, 90)):
        for name, tuner, kernel in (("attn_fwd", _fwd, "fwd"), ("attn_bwd_dkdv", _dkdv, "dkdv"),
                                    ("attn_bwd_dq", _dq, "dq")):
            bm, bn, warps, stages = usable_configs(kernel, arch, d, 2, smem_limit[arch])[0]
            consts = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "MASK_KIND": MASK_PREFIX}
            if name == "attn_fwd":
                consts["COUNT_TILES"] = False
            fn = tuner
            while hasattr(fn, "fn"):  # the Python function under the autotune and jit wrappers
                fn = fn.fn
            strides = tuple(p for p in inspect.signature(fn).parameters  # multiples of D, not so the LSE's
                            if p.startswith("stride_") and not p.startswith("stride_l"))
            specs.append(AotSpec(f"{name} fp16 D={d} prefix mask ({bm}x{bn}, {warps} warps, {stages} stages)",
                                 tuner, half, consts, scalars={"sm_scale": "fp32"}, num_warps=warps,
                                 num_stages=stages, archs=(arch,), divisible=strides, mma=True))
        specs.append(AotSpec(f"attn_bwd_delta fp16 D={d}", _attn_bwd_delta_kernel, half,
                             {"HEAD_DIM": d, "BLOCK_M": 64, "HAS_DLSE": True}, archs=(arch,)))
    single = {**half, **dict.fromkeys(["Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"], "*fp32")}
    for arch in (80, 90):  # fp32 at D = 128, the largest tiles: the pruned default must fit shared memory
        for spec in [s for s in specs if "D=128" in s.name and arch in s.archs and "delta" not in s.name]:
            kernel = spec.name.split()[0].removeprefix("attn_").removeprefix("bwd_")
            bm, bn, warps, stages = usable_configs(kernel, arch, 128, 4, smem_limit[arch])[0]
            specs.append(AotSpec(f"{spec.name.split()[0]} fp32 D=128 ({bm}x{bn}, {warps} warps, {stages} stages; "
                                 f"spills allowed)", spec.kernel, single, {**spec.constexprs, "BLOCK_M": bm,
                                                                           "BLOCK_N": bn},
                                 scalars=spec.scalars, num_warps=warps, num_stages=stages, archs=(arch,),
                                 divisible=spec.divisible, max_spill_bytes=4096, mma=True))
    return specs


AOT_SPECS = _aot_specs()


# ----------------------------------------------------------------------------- argument checks and launchers

def _lengths(name: str, value: LengthsArg, batch: int, t_k: int, default: int, device) -> torch.Tensor:
    """An int or a (B,) integer sequence/tensor with values in [0, t_k] -> int32 tensor (B,) on `device`."""
    if value is None:
        value = default
    array_like = isinstance(value, (numbers.Integral, torch.Tensor, list, tuple)) or hasattr(value, "__array__")
    if isinstance(value, bool) or not array_like:
        raise ValueError(f"{name}: expected an int or a (B,) integer tensor, got {type(value).__name__}")
    t = torch.as_tensor(value)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise ValueError(f"{name}: must hold integers, got dtype {t.dtype}")
    if t.dim() == 0:
        t = t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"{name}: expected an int or shape (B,) = ({batch},), got shape {tuple(t.shape)}")
    if len(t) and (int(t.min()) < 0 or int(t.max()) > t_k):
        raise ValueError(f"{name}: every value must be in [0, Tk] = [0, {t_k}], got {t.tolist()}")
    return t.to(device=device, dtype=torch.int32).contiguous()


def _check(q, k, v, causal, prefix_len, key_lengths, kernel=True):
    """Validate everything before any launch; return (mask_kind, key_len (B,), prefix_len (B,)) as int32.
    kernel=False (the reference) also accepts float64 and any head size."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"{name}: expected a tensor of shape (B, H, T, D), got {getattr(x, 'shape', x)}")
    B, H, t_q, D = q.shape
    t_k = k.size(2)
    if k.shape != v.shape or k.shape[:2] != (B, H) or k.size(3) != D:
        raise ValueError(f"k, v: expected shape (B, H, Tk, D) = ({B}, {H}, Tk, {D}) for both, got "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if t_q == 0 or t_k == 0:
        raise ValueError(f"q, k: sequence lengths must be >= 1, got Tq={t_q}, Tk={t_k}")
    dtypes = (torch.float16, torch.bfloat16, torch.float32) + (() if kernel else (torch.float64,))
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in dtypes:
        raise ValueError(f"q, k, v: one dtype among {dtypes}, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v: must be on one device, got {q.device}, {k.device}, {v.device}")
    if kernel and D not in HEAD_DIMS:
        raise ValueError(f"q: head size D must be one of {HEAD_DIMS} (a power of two for tl.arange, >= 16 for "
                         f"tl.dot), got {D}")
    if causal and prefix_len is not None:
        raise ValueError("causal, prefix_len: pick one mask kind; prefix_len already makes the target causal")
    if (causal or prefix_len is not None) and t_k < t_q:
        raise ValueError(f"causal/prefix_len: need Tk >= Tq (queries are the last Tq positions), got Tq={t_q}, "
                         f"Tk={t_k}")
    kind = MASK_PREFIX if prefix_len is not None else MASK_CAUSAL if causal else MASK_NONE
    return (kind, _lengths("key_lengths", key_lengths, B, t_k, t_k, q.device),
            _lengths("prefix_len", prefix_len, B, t_k, 0, q.device))


def _buckets(t_q: int, t_k: int):
    """The autotune key's lengths, rounded up to powers of two: decoding one token at a time (Tq = 1, Tk + 1 per
    step) re-tunes once per doubling of Tk, not at every token."""
    return triton.next_power_of_2(t_q), triton.next_power_of_2(t_k)


def _strides(x: torch.Tensor):
    return x.stride(0), x.stride(1), x.stride(2)


MAX_TOKEN_STRIDE = 2**31 // 256  # the forward's offsets inside a tile (at most 128 rows) stay below 2^31


def _inner_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x itself when its last dimension is contiguous and a token step is < MAX_TOKEN_STRIDE elements (every
    layout a model makes); a contiguous copy otherwise."""
    return x if x.stride(-1) == 1 and x.stride(2) < MAX_TOKEN_STRIDE else x.contiguous()


def batch_chunks(B: int, H: int) -> list:
    """[(b0, b1)]: the batch ranges launched one at a time, so that (b1 - b0) * H, grid axis y, stays within
    GRID_MAX[1] = 65,535 (one range for every model-sized batch). H alone past it raises ValueError."""
    step = GRID_MAX[1] // max(H, 1)
    if step == 0:
        raise ValueError(f"q: H = {H} heads is past CUDA's grid limit of {GRID_MAX[1]} on axis y (one program "
                         f"column per (batch, head))")
    return [(b, min(B, b + step)) for b in range(0, B, step)] or [(0, 0)]


def launch_grids(B: int, H: int, t_q: int, t_k: int) -> list:
    """[(name, grid)] of every launch one forward and backward make on q (B, H, Tq, D), k (B, H, Tk, D), computed,
    not launched (tiles counted at 16 rows, fewer than any config's), each checked with `check_grid`."""
    grids = []
    for b0, b1 in batch_chunks(B, H):
        for name, t in (("forward", t_q), ("delta", t_q), ("dkdv", t_k), ("dq", t_q)):
            grids.append((f"{name} [{b0}, {b1})", check_grid((-(-t // 16), (b1 - b0) * H), "q", "B * H")))
    return grids


def _by_batch(tensors: dict, b0: int, b1: int, H: int) -> dict:
    """Each tensor's rows of batches b0 .. b1 - 1 (None stays None; tile_counts is (B * H, ...))."""
    return {k: None if t is None else t[b0 * H:b1 * H] if k == "tile_counts" else t[b0:b1] for k, t in tensors.items()}


def _launch_forward(q, k, v, kind, key_len, prefix, out=None, lse=None, tile_counts=None):
    B, H, t_q, D = q.shape
    out = torch.empty_like(q) if out is None else out
    lse = torch.empty((B, H, t_q), device=q.device, dtype=torch.float32) if lse is None else lse
    for b0, b1 in batch_chunks(B, H):
        _launch_forward_chunk(kind, **_by_batch(dict(q=q, k=k, v=v, key_len=key_len, prefix=prefix, out=out, lse=lse,
                                                     tile_counts=tile_counts), b0, b1, H))
    return out, lse


def _launch_forward_chunk(kind, q, k, v, key_len, prefix, out, lse, tile_counts):
    B, H, t_q, D = q.shape
    grid = lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), B * H)  # noqa: E731
    _fwd[grid](q, k, v, out, lse, key_len, prefix, lse if tile_counts is None else tile_counts,
               1.0 / math.sqrt(D), H, t_q, k.size(2), *_strides(q), *_strides(k), *_strides(v), *_strides(out),
               lse.stride(0), lse.stride(1), *_buckets(t_q, k.size(2)), HEAD_DIM=D, MASK_KIND=kind,
               COUNT_TILES=tile_counts is not None)


def _launch_backward(q, k, v, o, lse, do, kind, key_len, prefix, dq=None, dk=None, dv=None, dlse=None,
                     need_dq=True, need_dkdv=True):
    """dQ (when need_dq) and dK, dV (when need_dkdv; None otherwise). dlse: the gradient of the LSE output."""
    H = q.size(1)
    lse = lse.contiguous()
    dlse = None if dlse is None else dlse.to(torch.float32).contiguous()
    dq = (torch.empty_like(q) if dq is None else dq) if need_dq else None
    dk = (torch.empty_like(k) if dk is None else dk) if need_dkdv else None
    dv = (torch.empty_like(v) if dv is None else dv) if need_dkdv else None
    for b0, b1 in batch_chunks(q.size(0), H):
        _launch_backward_chunk(kind, **_by_batch(dict(q=q, k=k, v=v, o=o, lse=lse, do=do, key_len=key_len,
                                                      prefix=prefix, dq=dq, dk=dk, dv=dv, dlse=dlse), b0, b1, H))
    return dq, dk, dv


def _launch_backward_chunk(kind, q, k, v, o, lse, do, key_len, prefix, dq, dk, dv, dlse):
    B, H, t_q, D = q.shape
    t_k = k.size(2)
    delta = torch.empty((B, H, t_q), device=q.device, dtype=torch.float32)
    _attn_bwd_delta_kernel[(triton.cdiv(t_q, 64), B * H)](o, do, delta if dlse is None else dlse, delta, H, t_q,
                                                          *_strides(o), *_strides(do), HEAD_DIM=D, BLOCK_M=64,
                                                          HAS_DLSE=dlse is not None)
    common = (key_len, prefix, 1.0 / math.sqrt(D), H, t_q, t_k, *_strides(q), *_strides(k), *_strides(v),
              *_strides(do))
    if dk is not None:
        _dkdv[lambda meta: (triton.cdiv(t_k, meta["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv, *common, *_strides(dk), *_strides(dv), *_buckets(t_q, t_k), HEAD_DIM=D,
            MASK_KIND=kind)
    if dq is not None:
        _dq[lambda meta: (triton.cdiv(t_q, meta["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq, *common, *_strides(dq), *_buckets(t_q, t_k), HEAD_DIM=D, MASK_KIND=kind)


class _FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, kind, key_len, prefix):
        q, k, v = _inner_contiguous(q), _inner_contiguous(k), _inner_contiguous(v)
        o, lse = _launch_forward(q, k, v, kind, key_len, prefix)
        ctx.save_for_backward(q, k, v, o, lse, key_len, prefix)
        ctx.kind = kind
        ctx.set_materialize_grads(False)  # an unused output's gradient arrives as None, not as zeros
        return o, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, o, lse, key_len, prefix = ctx.saved_tensors
        do = torch.zeros_like(o) if do is None else _inner_contiguous(do)  # only the LSE was used
        need_dq, need_k, need_v = ctx.needs_input_grad[:3]
        dq, dk, dv = _launch_backward(q, k, v, o, lse, do, ctx.kind, key_len, prefix, dlse=dlse,
                                      need_dq=need_dq, need_dkdv=need_k or need_v)
        return dq, dk if need_k else None, dv if need_v else None, None, None, None


# ----------------------------------------------------------------------------- public API

def allowed_mask(t_q: int, t_k: int, *, causal: bool = False, prefix_len: LengthsArg = None,
                 key_lengths: LengthsArg = None, batch: int = 1, device=None) -> torch.Tensor:
    """The boolean (B, 1, Tq, Tk) mask the kernel computes inside its tiles (True = may attend)."""
    key_len = _lengths("key_lengths", key_lengths, batch, t_k, t_k, device)
    prefix = _lengths("prefix_len", prefix_len, batch, t_k, 0, device)
    q_pos = torch.arange(t_q, device=device)[:, None] + (t_k - t_q)
    k_idx = torch.arange(t_k, device=device)[None, :]
    allowed = (k_idx < key_len[:, None, None])[:, None]  # (B, 1, 1, Tk)
    if prefix_len is not None:
        allowed = allowed & ((k_idx < prefix[:, None, None, None]) | (k_idx <= q_pos))
    elif causal:
        allowed = allowed & (k_idx <= q_pos)
    return allowed.expand(batch, 1, t_q, t_k)


def reference_attention(q, k, v, *, causal=False, prefix_len=None, key_lengths=None, return_lse=False):
    """What `flash_attention` computes, through nanomodels.attention.attention and an explicit mask."""
    _check(q, k, v, causal, prefix_len, key_lengths, kernel=False)
    allowed = allowed_mask(q.size(2), k.size(2), causal=causal, prefix_len=prefix_len, key_lengths=key_lengths,
                           batch=q.size(0), device=q.device)
    out = attention(q, k, v, allowed)
    if not return_lse:
        return out
    scores = (q @ k.transpose(-2, -1)).to(torch.promote_types(q.dtype, torch.float32)) / math.sqrt(q.size(-1))
    return out, torch.logsumexp(scores.masked_fill(~allowed, -torch.inf), dim=-1)


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = False,
                    prefix_len: LengthsArg = None, key_lengths: LengthsArg = None, return_lse: bool = False):
    """FlashAttention-2 with UniLM masks.   q: (B, H, Tq, D), k, v: (B, H, Tk, D) -> O (B, H, Tq, D) [, LSE].

    causal: key j visible from query i when j <= i + (Tk - Tq) (left-to-right).
    prefix_len: int or (B,) ints; seq2seq / prefix-LM: j < prefix_len[b], or j <= i + (Tk - Tq). Excludes causal.
    key_lengths: int or (B,) ints; keys j >= key_lengths[b] are padding, never read. A row with no visible key
        returns zeros (and LSE = -inf).
    return_lse: also return LSE (B, H, Tq) float32, natural log, differentiable (LSE merges of several calls).
    D must be one of HEAD_DIMS. Differentiable in q, k, v (FA2 backward kernels). B * H past 65,535 runs as
    several launches over batch ranges (`batch_chunks`). float32 inputs: on a GPU tl.dot runs in TF32 (10-bit
    mantissa), errors of order 1e-4 relative, not fp32's 1e-7 (kernels/README.md); the interpreter multiplies
    in fp32.
    """
    kind, key_len, prefix = _check(q, k, v, causal, prefix_len, key_lengths)
    where = backend(q)
    if where == "reference":
        return reference_attention(q, k, v, causal=causal, prefix_len=prefix_len, key_lengths=key_lengths,
                                   return_lse=return_lse)
    dtype = q.dtype
    if where == "interpreter" and dtype == torch.bfloat16:  # the interpreter cannot multiply bfloat16
        q, k, v = q.float(), k.float(), v.float()
    out, lse = _FlashAttention.apply(q, k, v, kind, key_len, prefix)
    out = out.to(dtype)
    return (out, lse) if return_lse else out


def flash_attention_fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                       *, causal: bool = False) -> torch.Tensor:
    """`flash_attention` behind nanomodels' attention-function signature: a drop-in `attn_fn`/`attention_fn`."""
    if allowed is not None:
        raise ValueError("allowed: flash_attention_fn computes its mask from indices inside each tile, so it "
                         "takes no mask tensor. Use nanomodels.attention.attention for an arbitrary boolean mask, "
                         "or kernels.flash_attention(q, k, v, causal=..., prefix_len=..., key_lengths=...) for "
                         "the causal, prefix (seq2seq) and key-padding mask kinds.")
    return flash_attention(q, k, v, causal=causal)


# ----------------------------------------------------------------------------- test and teaching hooks

def flash_attention_forward(q, k, v, *, causal=False, prefix_len=None, key_lengths=None, out=None, lse=None,
                            tile_counts=None):
    """Run the forward kernel once, no autograd. `out` / `lse` may be preallocated views (guard-band tests);
    `tile_counts`, an int32 tensor of shape (B * H, cdiv(Tq, 16), 2), receives for query tile m (of
    BLOCK_M rows, see `forward_block_sizes`) at [b * H + h, m] the number of key tiles visited without and
    with the mask."""
    kind, key_len, prefix = _check(q, k, v, causal, prefix_len, key_lengths)
    return _launch_forward(q, k, v, kind, key_len, prefix, out, lse, tile_counts)


def flash_attention_backward(q, k, v, o, lse, do, *, causal=False, prefix_len=None, key_lengths=None, dq=None,
                             dk=None, dv=None, dlse=None):
    """Run the three backward kernels once (delta, dK/dV, dQ); dq / dk / dv may be preallocated views.
    dlse (B, H, Tq), when given, is the gradient of the LSE output (delta = rowsum(dO * O) - dLSE)."""
    kind, key_len, prefix = _check(q, k, v, causal, prefix_len, key_lengths)
    return _launch_backward(q, k, v, o, lse, do, kind, key_len, prefix, dq, dk, dv, dlse=dlse)


def forward_block_sizes():
    """(BLOCK_M, BLOCK_N) of the forward kernel's last call (the one config under the interpreter)."""
    config = getattr(_fwd, "best_config", None) or _fwd.configs[0]
    return config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]


def tile_plan(allowed: torch.Tensor, block_m: int, block_n: int) -> torch.Tensor:
    """Classify the tiles of a (Tq, Tk) mask: 0 = fully masked (skipped), 1 = cut by the mask, 2 = fully
    visible. Keys beyond Tk count as masked (a tile holding them needs the mask); query rows beyond Tq are
    padding and count for nothing."""
    t_q, t_k = allowed.shape
    n_m, n_n = -(-t_q // block_m), -(-t_k // block_n)

    def tiles(pad_rows: bool) -> torch.Tensor:  # (n_m, n_n, block_m * block_n)
        padded = torch.zeros(n_m * block_m, n_n * block_n, dtype=torch.bool, device=allowed.device)
        padded[t_q:, :t_k] = pad_rows
        padded[:t_q, :t_k] = allowed
        return padded.view(n_m, block_m, n_n, block_n).transpose(1, 2).reshape(n_m, n_n, -1)

    return tiles(False).any(-1).long() + tiles(True).all(-1).long()


# ----------------------------------------------------------------------------- registry (benchmark)

MASK_KINDS = {"none": {}, "causal": {"causal": True}, "prefix": {"prefix_len": "half"},
              "prefix+key_lengths": {"prefix_len": "half", "key_lengths": "3/4"}}


def _mask(kind: str, batch: int, n: int) -> dict:
    values = {"half": n // 2, "3/4": [3 * n // 4] * batch}
    return {k: values.get(v, v) for k, v in MASK_KINDS[kind].items()}


def visible_fraction(kind: str, n: int) -> float:
    """Fraction of the N x N (query, key) pairs a mask keeps: the FLOPs a perfect kernel does. Row i sees
    min(key_len, max(prefix, i + 1)) keys; causal counts as exactly one half (the usual convention)."""
    if kind in ("none", "causal"):
        return 1.0 if kind == "none" else 0.5
    mask = _mask(kind, 1, n)
    key_len = mask.get("key_lengths", [n])[0]
    seen = torch.arange(1, n + 1).clamp(min=mask.get("prefix_len", 0)).clamp(max=key_len)
    return seen.sum().item() / n**2


def tile_fractions(kind: str, n: int, block_m: int = 128, block_n: int = 64) -> dict:
    """Share of the (query tile, key tile) pairs visited with and without the mask, and skipped."""
    plan = tile_plan(allowed_mask(n, n, batch=1, **_mask(kind, 1, n))[0, 0], block_m, block_n)
    total = plan.numel()
    return {"full": (plan == 2).sum().item() / total, "masked": (plan == 1).sum().item() / total,
            "skipped": (plan == 0).sum().item() / total}


def correctness_sweep(quick: bool = False) -> list:
    """Every mask kind x dtype x head size through the kernel vs the float64 reference: max |error| of O, LSE
    and the three gradients, as rows {"dtype", "D", "mask", "errors": [O, LSE, dQ, dK, dV]}."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    B, H, T = 2, 1, 200
    for dtype in (torch.float32, torch.float16):
        for d in ((64,) if quick else (32, 64)):
            for kind in MASK_KINDS:
                g = torch.Generator().manual_seed(d)
                q, k, v, do = (torch.randn(B, H, T, d, generator=g).to(device, dtype) for _ in range(4))
                mask = _mask(kind, B, T)
                leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                out, lse = flash_attention(*leaves, return_lse=True, **mask)
                out.backward(do)
                ref = [x.double().requires_grad_() for x in (q, k, v)]
                ref_out, ref_lse = reference_attention(*ref, return_lse=True, **mask)
                ref_out.backward(do.double())
                errs = [(out.double() - ref_out).abs().max().item(), (lse.double() - ref_lse).abs().max().item()]
                errs += [(a.grad.double() - r.grad).abs().max().item() for a, r in zip(leaves, ref)]
                rows.append({"dtype": str(dtype)[6:], "D": d, "mask": kind, "errors": errs})
    return rows


def print_sweep(rows) -> None:
    print(f"{'dtype':<8} {'D':>3} {'mask':<20} {'O':>9} {'LSE':>9} {'dQ':>9} {'dK':>9} {'dV':>9}")
    for r in rows:
        print(f"{r['dtype']:<8} {r['D']:>3} {r['mask']:<20} " + " ".join(f"{e:>9.1e}" for e in r["errors"]))


def _bench_cpu(quick: bool) -> list:
    rows = [{"case": f"{r['dtype']} D={r['D']} {r['mask']}", **dict(zip(("O err", "LSE err", "dQ err", "dK err",
                                                                            "dV err"), r["errors"]))}
            for r in correctness_sweep(quick)]
    for kind in ("none", "causal", "prefix"):  # what the masks save, whatever the hardware (128 x 64 tiles)
        f = tile_fractions(kind, 4096)
        rows.append({"case": f"N=4096 {kind}: share of", "visible pairs": visible_fraction(kind, 4096),
                     "tiles unmasked": f["full"], "tiles masked": f["masked"], "tiles skipped": f["skipped"]})
    return rows


def _bench_gpu(quick: bool, time_ms) -> list:
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    B, H = 4, 16
    for n in (1024,) if quick else (1024, 2048, 4096, 8192, 16384):
        for d in (64, 128):
            for kind in ("none", "causal", "prefix"):
                q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                mask = _mask(kind, B, n)
                impls = {"flash (ours)": lambda: flash_attention(q, k, v, **mask)}
                if kind == "prefix":  # SDPA has no prefix mask: it gets the dense boolean mask (N^2 bytes)
                    dense = allowed_mask(n, n, batch=1, device=q.device, **mask)
                    impls["SDPA + dense mask"] = lambda: sdpa(q, k, v, attn_mask=dense)
                else:
                    impls["SDPA"] = lambda: sdpa(q, k, v, is_causal=kind == "causal")
                flops = 4 * B * H * n * n * d * visible_fraction(kind, n)
                do = torch.randn_like(q)
                for impl, fn in impls.items():
                    for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                        ms = time_ms(fn) if mode == "fwd" else time_ms(lambda: fn().backward(do), grads=[q, k, v])
                        rows.append({"impl": impl, "mode": mode, "shape": f"B{B} H{H} N{n} D{d} bf16", "case": kind,
                                     "ms": ms, "tflops": mult * flops / ms / 1e9})
    return rows


BENCHMARKS = [Benchmark("flash_attention", gpu=_bench_gpu, cpu=_bench_cpu)]
