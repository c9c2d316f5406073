"""Grouped GEMM for mixture-of-experts layers in Triton: every expert's matmul in one launch, no (S, E, C)
tensors (the sort-and-pad scheme of vLLM's fused_moe_kernel; reference/kernels.md §1.5).

Routing metadata in torch (`align_by_expert`): the kept (token, choice) pairs are sorted by expert (stable:
token order inside an expert) and each expert's run is padded to a multiple of BLOCK_M with -1, so every
BLOCK_M block of rows belongs to one expert, `block_expert[b]`. Then one kernel, for block b and a column tile:

    out[c_rows[p], :] = a[a_rows[p], :] @ B[block_expert[b]]        for the rows p of block b with a_rows[p] >= 0

i.e. gather the rows, multiply by that block's expert weight, scatter. The MoE feed-forward is two such calls
(fc1 gathers tokens, fc2 scatters to one row per (token, choice)); GELU, the biases and the gated sum over the
k choices stay in torch. Backward, with g = d out:

    d a[a_rows[p]] += g[c_rows[p]] @ B[e]^T      the same kernel reading W[e] untransposed, then index_add
    d B[e]          = sum over e's rows p of a[a_rows[p]]^T g[c_rows[p]]     a second kernel, one program per
                                                  (expert, K tile, N tile) walking that expert's blocks

Weights are nn.Linear-shaped, W (E, N, K) with y = x W^T, so B[e] = W[e]^T (TRANS_W: read W[e] by rows).
Versions: 1 `moe_ffn_reference` (einsum over the dense (S, E, C) masks, nanomodels.moe), 2 this kernel.
"""

import torch
import torch.nn.functional as F

from kernels import AotSpec, Benchmark, backend, check_grid, tl, triton
from nanomodels.moe import Routing, top_k_gating

BLOCK_M, BLOCK_N, BLOCK_K = 64, 64, 32  # the default (and the interpreter's only) config
DW_BLOCK_K = 64  # dW tiles are (K, N) = 64 x 64: sm_90's wgmma needs 64 rows per warpgroup


@triton.jit
def _grouped_gemm_kernel(A, W, C, A_ROWS, C_ROWS, BLOCK_EXPERT, N, K, stride_am, stride_we, stride_wr, stride_cm,
                         TRANS_W: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """C[c_rows] = A[a_rows] @ W[e]^T (TRANS_W; W[e] is (N, K)) or A[a_rows] @ W[e] (W[e] is (K, N)).
    Every matrix has unit stride along its last dimension; stride_wr is W's row stride, stride_we its expert
    stride. Program (pid_m, pid_n) owns rows pid_m * BLOCK_M .. + BLOCK_M - 1 of the int64 row lists A_ROWS and
    C_ROWS (-1 in A_ROWS marks a padding row) and columns pid_n * BLOCK_N .. + BLOCK_N - 1; all its rows belong
    to expert BLOCK_EXPERT[pid_m]. The K loop walks BLOCK_K at a time with a float32 accumulator (K need not be a
    multiple of BLOCK_K); the tile is stored in C's dtype, padding rows and columns >= N left untouched."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    # BEGIN EXERCISE 7.6: one tile of the grouped GEMM: its expert, the gathered rows, the masked K loop
    expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    a_row = tl.load(A_ROWS + rows)  # int64 row ids, -1 = padding
    c_row = tl.load(C_ROWS + rows)
    valid = a_row >= 0
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = A + a_row[:, None] * stride_am + ks[None, :]  # the gathered rows, advanced along K below
    if TRANS_W:
        w_ptrs = W + expert * stride_we + cols[None, :].to(tl.int64) * stride_wr + ks[:, None]
    else:
        w_ptrs = W + expert * stride_we + ks[:, None].to(tl.int64) * stride_wr + cols[None, :]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptrs, mask=valid[:, None] & (ks[None, :] < K - k0), other=0.0)
        w = tl.load(w_ptrs, mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)  # (BLOCK_K, BLOCK_N)
        acc += tl.dot(a, w)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K if TRANS_W else BLOCK_K * stride_wr
    tl.store(C + c_row[:, None] * stride_cm + cols[None, :], acc.to(C.dtype.element_ty),
             mask=valid[:, None] & (cols[None, :] < N))
    # END EXERCISE


@triton.jit
def _grouped_gemm_dw_kernel(A, G, DW, A_ROWS, G_ROWS, EXPERT_BLOCKS, N, K, stride_am, stride_gm, stride_we,
                            stride_wr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """DW[e] (N, K) = sum over expert e's rows p of G[g_rows[p]]^T A[a_rows[p]], one (K, N) tile per program."""
    expert = tl.program_id(0)
    ks = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    cols = tl.program_id(2) * BLOCK_N + tl.arange(0, BLOCK_N)
    first = tl.load(EXPERT_BLOCKS + expert).to(tl.int64)  # this expert's blocks: first .. last - 1
    last = tl.load(EXPERT_BLOCKS + expert + 1).to(tl.int64)
    acc = tl.zeros([BLOCK_K, BLOCK_N], dtype=tl.float32)
    for block in range(first, last):
        rows = block * BLOCK_M + tl.arange(0, BLOCK_M)  # block is int64: 64-bit offsets
        a_row = tl.load(A_ROWS + rows)
        g_row = tl.load(G_ROWS + rows)
        valid = a_row >= 0
        a_t = tl.load(A + a_row[None, :] * stride_am + ks[:, None],
                      mask=valid[None, :] & (ks[:, None] < K), other=0.0)  # (BLOCK_K, BLOCK_M): A^T
        g = tl.load(G + g_row[:, None] * stride_gm + cols[None, :],
                    mask=valid[:, None] & (cols[None, :] < N), other=0.0)
        acc += tl.dot(a_t, g)
    tl.store(DW + expert.to(tl.int64) * stride_we + cols[None, :].to(tl.int64) * stride_wr + ks[:, None],
             acc.to(DW.dtype.element_ty), mask=(ks[:, None] < K) & (cols[None, :] < N))


def align_by_expert(experts: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """The sort-and-pad metadata. experts (P,) expert id of each (token, choice) pair ->
    order (P_pad,) int64: pair indices sorted by expert (token order kept inside an expert), each expert's run
        padded with -1 to a multiple of block_m, so that every block of block_m rows holds one expert's pairs;
    block_expert (P_pad / block_m,) int32: the expert of each block;
    expert_blocks (E + 1,) int32: expert e owns blocks expert_blocks[e] .. expert_blocks[e + 1] - 1."""
    # BEGIN EXERCISE 7.4: the sort-and-pad metadata of the grouped GEMM
    counts = torch.bincount(experts, minlength=num_experts)
    blocks = (counts + block_m - 1) // block_m  # ceil: a partial block is padded
    expert_blocks = F.pad(blocks.cumsum(0), (1, 0)).to(torch.int32)
    sorted_pairs = torch.argsort(experts, stable=True)
    run_start = (expert_blocks[:-1].long() * block_m).repeat_interleave(counts)  # padded start of each pair's run
    first_of_expert = F.pad(counts.cumsum(0), (1, 0))[:-1].repeat_interleave(counts)  # in sorted_pairs
    rank = torch.arange(len(experts), device=experts.device) - first_of_expert  # position inside its expert
    order = torch.full((int(expert_blocks[-1]) * block_m,), -1, dtype=torch.int64, device=experts.device)
    order[run_start + rank] = sorted_pairs
    block_expert = torch.arange(num_experts, device=experts.device).repeat_interleave(blocks).to(torch.int32)
    return order, block_expert, expert_blocks
    # END EXERCISE


def _launch(a, w, a_rows, c_rows, block_expert, out, trans_w=True):
    """out[c_rows] = a[a_rows] @ W[e]^T (trans_w) or @ W[e], for w (E, N, K) contiguous."""
    if len(block_expert) == 0:  # every pair was dropped
        return out
    n, k = (w.size(1), w.size(2)) if trans_w else (w.size(2), w.size(1))
    grid = check_grid((len(block_expert), triton.cdiv(n, BLOCK_N)), "w", f"(row blocks, N / {BLOCK_N})")
    _grouped_gemm_kernel[grid](a, w, out, a_rows, c_rows, block_expert, n, k, a.stride(0), w.stride(0), w.stride(1),
                               out.stride(0), TRANS_W=trans_w, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
                               num_warps=4)
    return out


class _GroupedGEMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, w, a_rows, c_rows, block_expert, expert_blocks, out_rows):
        out = a.new_zeros(out_rows, w.size(1))
        _launch(a, w, a_rows, c_rows, block_expert, out)
        ctx.save_for_backward(a, w, a_rows, c_rows, block_expert, expert_blocks)
        return out

    @staticmethod
    def backward(ctx, g):
        a, w, a_rows, c_rows, block_expert, expert_blocks = ctx.saved_tensors
        g = g.contiguous()
        valid = a_rows >= 0
        identity = torch.where(valid, torch.arange(len(a_rows), device=a.device), -1)
        da_rows = _launch(g, w, torch.where(valid, c_rows, -1), identity, block_expert,
                          a.new_zeros(len(a_rows), a.size(1)), trans_w=False)  # (P_pad, K), one row per pair
        da = torch.zeros_like(a).index_add_(0, a_rows[valid], da_rows[valid])
        dw = torch.empty_like(w)
        grid = (w.size(0), triton.cdiv(w.size(2), DW_BLOCK_K), triton.cdiv(w.size(1), BLOCK_N))
        check_grid(grid, "w", f"(E, K / {DW_BLOCK_K}, N / {BLOCK_N}) tiles")
        _grouped_gemm_dw_kernel[grid](a, g, dw, a_rows, c_rows, expert_blocks, w.size(1), w.size(2), a.stride(0),
                                      g.stride(0), dw.stride(0), dw.stride(1), BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
                                      BLOCK_K=DW_BLOCK_K, num_warps=4)
        return da, dw, None, None, None, None, None


def _check_routing(m, n_experts, a_rows, c_rows, block_expert, expert_blocks, out_rows) -> None:
    """The kernels index memory with the metadata, so every index is checked before a launch: a_rows in
    [-1, M) (-1: padding), c_rows in [0, out_rows) where a_rows >= 0, block_expert in [0, E), expert_blocks
    E + 1 non-decreasing block offsets from 0 to len(block_expert). Cost: a few elementwise comparisons over the
    P_pad + E + 1 indices on their device and one host synchronisation for the combined verdict."""
    if not isinstance(out_rows, int) or out_rows < 0:
        raise ValueError(f"out_rows: must be an int >= 0, got {out_rows!r}")
    if len(expert_blocks) != n_experts + 1:
        raise ValueError(f"expert_blocks: needs E + 1 = {n_experts + 1} entries, got {len(expert_blocks)}")
    live = a_rows >= 0
    steps = expert_blocks.diff()
    verdict = torch.stack([
        ((a_rows >= -1) & (a_rows < m)).all(),
        (~live | ((c_rows >= 0) & (c_rows < out_rows))).all(),
        ((block_expert >= 0) & (block_expert < n_experts)).all(),
        (expert_blocks[0] == 0) & (expert_blocks[-1] == len(block_expert)) & (steps >= 0).all(),
    ]).tolist()  # the one synchronisation
    rules = (("a_rows", f"every entry in [-1, M = {m})"), ("c_rows", f"every live entry in [0, out_rows = {out_rows})"),
             ("block_expert", f"every expert id in [0, E = {n_experts})"),
             ("expert_blocks", f"non-decreasing from 0 to len(block_expert) = {len(block_expert)}"))
    for ok, (name, rule) in zip(verdict, rules):
        if not ok:
            raise ValueError(f"{name}: {rule} (an index past it would read or write outside the buffers)")


def launch_grids(blocks: int, E: int, N: int, K: int) -> list:
    """[(name, grid)] of the forward, the dA pass and the dW kernel for `blocks` row blocks and w (E, N, K),
    computed, not launched, each checked with `check_grid` (N and K up to 65,535 * 64 = 4,194,240)."""
    return [(name, check_grid(grid, "w", f"the {name} grid (E, N, K) = {(E, N, K)}")) for name, grid in (
        ("forward", (blocks, triton.cdiv(N, BLOCK_N))), ("dA", (blocks, triton.cdiv(K, BLOCK_N))),
        ("dW", (E, triton.cdiv(K, DW_BLOCK_K), triton.cdiv(N, BLOCK_N))))]


def grouped_gemm(a, w, a_rows, c_rows, block_expert, expert_blocks, out_rows: int):
    """out (out_rows, N) with out[c_rows[p]] = a[a_rows[p]] @ w[e]^T for every p with a_rows[p] >= 0 (e the
    expert of p's block); other rows are 0. a (M, K), w (E, N, K). Differentiable in a and w. Routing metadata
    out of range (an expert id >= E, a row >= M, a destination row >= out_rows) raises ValueError naming the
    argument before any launch (`_check_routing`: one host synchronisation). float32 inputs: on a GPU tl.dot runs
    in TF32 (10-bit mantissa), errors of order 1e-4 relative, not fp32's 1e-7 (kernels/README.md); the interpreter
    multiplies in fp32."""
    if a.dim() != 2 or w.dim() != 3 or a.size(1) != w.size(2):
        raise ValueError(f"a, w: need a (M, K) and w (E, N, K) with equal K, got {tuple(a.shape)}, "
                         f"{tuple(w.shape)}")
    if a.dtype != w.dtype or a.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"a, w: dtype must be float16, bfloat16 or float32 and equal, got {a.dtype}, "
                         f"{w.dtype}")
    if len(a_rows) != len(c_rows) or len(a_rows) != len(block_expert) * BLOCK_M:
        raise ValueError(f"a_rows, c_rows: need length len(block_expert) * BLOCK_M = "
                         f"{len(block_expert) * BLOCK_M}")
    launch_grids(len(block_expert), *w.shape)
    _check_routing(a.size(0), w.size(0), a_rows, c_rows, block_expert, expert_blocks, out_rows)
    rows = [t.to(torch.int64).contiguous() for t in (a_rows, c_rows)]
    if a.dtype == torch.bfloat16 and backend(a) == "interpreter":  # the interpreter cannot multiply bf16
        out = grouped_gemm(a.float(), w.float(), *rows, block_expert, expert_blocks, out_rows)
        return out.to(torch.bfloat16)
    return _GroupedGEMM.apply(a.contiguous(), w.contiguous(), *rows, block_expert.to(torch.int32).contiguous(),
                              expert_blocks.to(torch.int32).contiguous(), out_rows)


def moe_ffn_reference(h, logits, k, capacity, w1, b1, w2, b2):
    """The einsum reference: y = sum_e combine[:, e] * (GELU(x_e W1_e^T + b1_e) W2_e^T + b2_e)."""
    combine, dispatch, _ = top_k_gating(logits, k, capacity)
    x = torch.einsum("sec,sd->ecd", dispatch.to(h.dtype), h)  # (E, C, d)
    y = F.gelu(torch.einsum("ecd,efd->ecf", x, w1) + b1[:, None]) @ w2.transpose(1, 2) + b2[:, None]
    return torch.einsum("sec,ecd->sd", combine.to(h.dtype), y)


def moe_ffn(h, routing: Routing, w1, b1, w2, b2):
    """The same MoE feed-forward through two grouped GEMMs. h (S, d), w1 (E, F, d), w2 (E, d, F). float32: TF32
    tl.dot on a GPU (see `grouped_gemm`)."""
    if backend(h) == "reference":
        raise RuntimeError("moe_ffn needs triton (a CUDA device or TRITON_INTERPRET=1); use sorted_dispatch")
    S, k = routing.experts.shape
    kept_pairs = routing.kept.flatten().nonzero().squeeze(1)  # (P,) pair ids s k + j, dropped pairs left out
    local, block_expert, expert_blocks = align_by_expert(routing.experts.flatten()[kept_pairs], w1.size(0))
    order = torch.where(local >= 0, kept_pairs[local.clamp(min=0)], -1)  # (P_pad,) pair id or -1
    real = len(order)
    tokens = torch.where(order >= 0, order // k, -1)
    rows = torch.arange(real, device=h.device)
    hidden = grouped_gemm(h, w1, tokens, rows, block_expert, expert_blocks, real)  # (P_pad, F)
    hidden = F.gelu(hidden + b1[block_expert.long().repeat_interleave(BLOCK_M)])
    pair_rows = torch.where(order >= 0, rows, -1)
    out = grouped_gemm(hidden, w2, pair_rows, order.clamp(min=0), block_expert, expert_blocks, S * k)  # (S k, d)
    out = out + b2[routing.experts.flatten()]
    gate = (routing.gates * routing.kept).to(h.dtype)
    return (out.view(S, k, -1) * gate[..., None]).sum(1)


def grouped_gemm_dispatch(h, routing: Routing, experts):
    """Drop-in for nanomodels.moe.sorted_dispatch: `MoE(config, dispatch=grouped_gemm_dispatch)`."""
    w1 = torch.stack([e.fc1.weight for e in experts])
    w2 = torch.stack([e.fc2.weight for e in experts])
    b1 = torch.stack([e.fc1.bias for e in experts])
    b2 = torch.stack([e.fc2.bias for e in experts])
    return moe_ffn(h, routing, w1, b1, w2, b2)


def _aot_specs():
    """The default config, fp16, for the compile tier: both kernels must use tensor cores and not spill."""
    rows = {"A_ROWS": "*i64", "C_ROWS": "*i64", "G_ROWS": "*i64", "BLOCK_EXPERT": "*i32", "EXPERT_BLOCKS": "*i32"}
    half = dict.fromkeys(["A", "W", "C", "G", "DW"], "*fp16")
    fwd = {k: v for k, v in {**half, **rows}.items() if k in ("A", "W", "C", "A_ROWS", "C_ROWS", "BLOCK_EXPERT")}
    dw = {k: v for k, v in {**half, **rows}.items() if k in ("A", "G", "DW", "A_ROWS", "G_ROWS", "EXPERT_BLOCKS")}
    tiles = {"BLOCK_M": BLOCK_M, "BLOCK_N": BLOCK_N, "BLOCK_K": BLOCK_K}
    return [AotSpec(f"moe grouped_gemm fp16 W^T ({BLOCK_M}x{BLOCK_N}x{BLOCK_K}, 4 warps)", _grouped_gemm_kernel, fwd,
                    {**tiles, "TRANS_W": True}, num_warps=4, mma=True),
            AotSpec(f"moe grouped_gemm fp16 W, the dA pass ({BLOCK_M}x{BLOCK_N}x{BLOCK_K}, 4 warps)",
                    _grouped_gemm_kernel, fwd, {**tiles, "TRANS_W": False}, num_warps=4, mma=True),
            AotSpec(f"moe grouped_gemm dW fp16 ({DW_BLOCK_K}x{BLOCK_N} tiles, 4 warps)", _grouped_gemm_dw_kernel, dw,
                    {**tiles, "BLOCK_K": DW_BLOCK_K}, num_warps=4, mma=True)]


AOT_SPECS = _aot_specs()


def _bench_gpu(quick: bool, time_ms) -> list:
    """The MoE feed-forward (top-2, capacity factor 1) in bf16: the grouped GEMM vs the einsum reference and a
    per-expert loop of torch matmuls over the sorted tokens (nanomodels.moe.sorted_dispatch's scheme)."""
    from nanomodels.moe import sorted_dispatch, top_k_routing

    rows = []
    S, d, f = 8192, 1024, 2048
    for E in ((8,) if quick else (8, 32, 64)):
        gen = torch.Generator(device="cuda").manual_seed(E)
        h = torch.randn(S, d, device="cuda", dtype=torch.bfloat16, generator=gen)
        logits = torch.randn(S, E, device="cuda", generator=gen)
        w1, w2 = (torch.randn(E, *shape, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
                  for shape in ((f, d), (d, f)))
        b1, b2 = torch.zeros(E, f, device="cuda", dtype=torch.bfloat16), torch.zeros(E, d, device="cuda",
                                                                                      dtype=torch.bfloat16)
        C = 2 * -(-S // E)
        routing = top_k_routing(logits, 2, C)
        experts = [lambda x, e=e: F.linear(F.gelu(F.linear(x, w1[e], b1[e])), w2[e], b2[e]) for e in range(E)]

        impls = {"triton grouped GEMM": lambda: moe_ffn(h, routing, w1, b1, w2, b2),
                 "per-expert loop": lambda: sorted_dispatch(h, routing, experts),
                 "einsum (S, E, C)": lambda: moe_ffn_reference(h, logits, 2, C, w1, b1, w2, b2)}
        flops = 2 * 2 * int(routing.kept.sum()) * d * f  # two matmuls per kept (token, expert) pair
        for impl, fn in impls.items():
            ms = time_ms(fn)
            rows.append({"impl": impl, "mode": "fwd", "shape": f"S={S} d={d} F={f} bfloat16",
                         "case": f"E={E} top-2", "ms": ms, "tflops": flops / ms / 1e9})
    return rows


def _bench_cpu(quick: bool) -> list:
    """Without a GPU: the interpreter's forward error against the float64 einsum reference."""
    from nanomodels.moe import top_k_routing

    gen = torch.Generator().manual_seed(0)
    S, d, f, E = 40, 32, 48, 4
    h, logits = torch.randn(S, d, generator=gen), torch.randn(S, E, generator=gen)
    w = [torch.randn(E, f, d, generator=gen) * 0.2, torch.randn(E, f, generator=gen) * 0.1,
         torch.randn(E, d, f, generator=gen) * 0.2, torch.randn(E, d, generator=gen) * 0.1]
    rows = []
    for k, C in ((1, 10), (2, 12)):
        y = moe_ffn(h, top_k_routing(logits, k, C), *w)
        ref = moe_ffn_reference(h.double(), logits.double(), k, C, *(t.double() for t in w))
        err = (y.double() - ref).abs().max().item()
        rows.append({"case": f"fp32 S={S} d={d} F={f} E={E} top-{k} C={C}", "y err": err})
    return rows


BENCHMARKS = [Benchmark("grouped_gemm", gpu=_bench_gpu, cpu=_bench_cpu)]
