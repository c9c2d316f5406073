"""Chapter 06's graded checks: the head offsets, one dilated pattern, the LSE merge, the kernel's launch, and
dilated attention end to end with its cost experiment (`cost_experiment`).

Each check tests what the LongNet paper promises, in float64 (the kernel in float32), against the learner's
function (its first argument), with oracles written out here. Known-wrong solutions:
exercises/grading/mutants/ch06_dilated_attention.md.
"""

import math

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import F64, expect_close


def _qkv(B, H, T, D, seed, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, T, D, generator=g, dtype=torch.float64).to(dtype) for _ in range(3)]


def _diff(a, b) -> float:
    return (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item()


def branch_oracle(q, k, v, w, r, causal):
    """Loops: for head j and segment i, the rows i*w + (j mod r) + r*t < T attend to each other (causal: t' <= t)."""
    B, H, T, D = q.shape
    out, lse = torch.zeros_like(q), torch.full((B, H, T), -math.inf, dtype=q.dtype)
    for j in range(H):
        for start in range(0, T, w):
            rows = list(range(start + j % r, min(start + w, T), r))
            if not rows:
                continue
            s = q[:, j, rows] @ k[:, j, rows].transpose(-2, -1) / math.sqrt(D)
            if causal:
                s = s.masked_fill(torch.ones(len(rows), len(rows), dtype=torch.bool).triu(1), -math.inf)
            out[:, j, rows] = torch.softmax(s, -1) @ v[:, j, rows]
            lse[:, j, rows] = torch.logsumexp(s, -1)
    return out, lse


# ---- 6.1 the head offsets -----------------------------------------------------------------------------------
# corner cases: one head; H < r (some offsets unused); H > r (offsets wrap); r = 1. Pinned: all four.

@check("head_offsets(H, r)[j] = j mod r for every head j (the paper's s_j), as an integer tensor of length H",
       n_heads=st.integers(1, 16), r=st.integers(1, 8),
       examples=[dict(n_heads=1, r=1), dict(n_heads=1, r=4), dict(n_heads=2, r=4), dict(n_heads=5, r=2)])
def offsets_are_j_mod_r(head_offsets, n_heads, r):
    got = head_offsets(n_heads, r)
    if not isinstance(got, torch.Tensor) or got.shape != (n_heads,) or got.is_floating_point():
        raise Violation(f"head_offsets({n_heads}, {r}) returned {got!r}; expected an integer tensor of shape "
                        f"({n_heads},)")
    want = [j % r for j in range(n_heads)]
    if got.tolist() != want:
        why = ""
        if n_heads >= r and got.tolist() == [(j // (n_heads // r)) % r for j in range(n_heads)]:
            why = ": that is torchscale's contiguous head groups, a permutation; the paper uses j mod r"
        raise Violation(f"H = {n_heads}, r = {r}: got {got.tolist()}, expected {want}{why}")


# ---- 6.2 one pattern ----------------------------------------------------------------------------------------
# corner cases: T = 1; T not a multiple of the segment (the last segment short); offset != 0 (head h % r)
# reaching a padded key; H < r and H > r; r = 1; causal. Pinned: T = 7, w = 2, r = 2, H = 2 (both masks).

PATTERN = dict(T=st.integers(1, 24), base=st.sampled_from([1, 2, 3, 4, 8]), r=st.sampled_from([1, 2, 4]),
               H=st.integers(1, 4), causal=st.booleans(), seed=st.integers(0, 2 ** 16))


@check("O|(w, r) and LSE equal the loop oracle: head j's rows i w + (j mod r) + r t of each segment attend among "
       "themselves only (causal: to earlier ones); other rows get O = 0 and LSE = -inf; keys past T get no weight",
       # a short last segment whose padded key only an offset head reaches (head 1 keeps rows 5 and 7 of T = 7)
       examples=[dict(T=7, base=2, r=2, H=2, causal=False, seed=0), dict(T=7, base=2, r=2, H=2, causal=True, seed=1)],
       **PATTERN)
def branch_matches_the_loop_oracle(dilated_branch, T, base, r, H, causal, seed):
    w = base * r
    q, k, v = _qkv(2, H, T, 3, seed)
    out, lse = dilated_branch(q, k, v, w, r, causal=causal)
    want_out, want_lse = branch_oracle(q, k, v, w, r, causal)
    if tuple(out.shape) != tuple(q.shape) or tuple(lse.shape) != (2, H, T):
        raise Violation(f"shapes: O {tuple(out.shape)}, LSE {tuple(lse.shape)}; expected {tuple(q.shape)}, {(2, H, T)}")
    kept = torch.isfinite(want_lse)
    if not torch.equal(torch.isfinite(lse), kept):
        wrong = (torch.isfinite(lse) != kept).nonzero()[0].tolist()
        raise Violation(f"w = {w}, r = {r}: (batch, head, row) {wrong} has LSE {lse[tuple(wrong)].item():.4g}, "
                        f"expected {want_lse[tuple(wrong)].item():.4g}: head j keeps the rows = j mod r of each segment")
    if _diff(out, want_out) > 1e-10 or _diff(lse[kept], want_lse[kept]) > 1e-10:
        why = ""
        if T % w and not causal:
            why = " (T is not a multiple of w: are the padded keys of the last segment masked?)"
        raise Violation(f"T = {T}, w = {w}, r = {r}, causal = {causal}: O differs by {_diff(out, want_out):.3g}, "
                        f"LSE by {_diff(lse[kept], want_lse[kept]):.3g}{why}")


@check("one segment covering the sequence with r = 1 is dense softmax attention, and its LSE is logsumexp of the "
       "scores", T=st.integers(1, 20), extra=st.integers(0, 8), causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def whole_segment_is_dense(dilated_branch, T, extra, causal, seed):
    q, k, v = _qkv(1, 2, T, 4, seed)
    s = q @ k.transpose(-2, -1) / 2.0
    if causal:
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    out, lse = dilated_branch(q, k, v, T + extra, 1, causal=causal)
    d_out, d_lse = _diff(out, torch.softmax(s, -1) @ v), _diff(lse, torch.logsumexp(s, -1))
    if d_out > 1e-10 or d_lse > 1e-10:
        raise Violation(f"T = {T}, w = {T + extra}: O differs from dense attention by {d_out:.3g}, LSE by {d_lse:.3g}")


# ---- 6.3 the LSE merge --------------------------------------------------------------------------------------
# corner cases: one branch; a row no branch covers (LSE = -inf everywhere: zeros, not NaN); leading dims of
# rank 0 and 1; lists and stacked tensors; float16/float32 spreads of +-200; detach_weights. Pinned below.

@check("split-KV: attention over disjoint key sets, merged with alpha = softmax(LSE), equals attention over their "
       "union, for outs (..., T, D) of any leading dimensions (ranks 2 to 5)", T=st.integers(2, 16),
       cuts=st.integers(2, 3), seed=st.integers(0, 2 ** 16), lead=st.sampled_from([(), (2,), (1, 2), (2, 1, 2)]),
       examples=[dict(T=5, cuts=2, seed=0, lead=()), dict(T=6, cuts=3, seed=1, lead=(2,))])
def merge_of_key_splits_is_attention_over_all_keys(merge_by_lse, T, cuts, seed, lead):
    q, k, v = (x.reshape(*lead, T, 4) for x in _qkv(1, math.prod(lead), T, 4, seed))
    edges = sorted({0, T, *torch.randint(1, T, (cuts - 1,), generator=torch.Generator().manual_seed(seed)).tolist()})
    outs, lses = [], []
    for lo, hi in zip(edges, edges[1:]):
        s = q @ k[..., lo:hi, :].transpose(-2, -1) / 2.0
        outs.append(torch.softmax(s, -1) @ v[..., lo:hi, :])
        lses.append(torch.logsumexp(s, -1))
    want = torch.softmax(q @ k.transpose(-2, -1) / 2.0, -1) @ v
    got = merge_by_lse(torch.stack(outs), torch.stack(lses))
    expect_close(got, want, 1e-10,
                 f"outs {tuple(outs[0].shape)}, key splits at {edges}: the merge differs from attention over all keys")


@check("a row with LSE = -inf in every input is covered by nothing: its output is 0, never NaN",
       seed=st.integers(0, 2 ** 16))
def uncovered_rows_are_zero(merge_by_lse, seed):
    g = torch.Generator().manual_seed(seed)
    outs = [torch.randn(1, 2, 6, 3, generator=g, dtype=F64) for _ in range(2)]
    lses = [torch.randn(1, 2, 6, generator=g, dtype=F64) for _ in range(2)]
    for lse in lses:
        lse[..., 2] = -math.inf
    outs = [torch.where(torch.isinf(lse)[..., None], 0.0, o) for o, lse in zip(outs, lses)]
    got = merge_by_lse(torch.stack(outs), torch.stack(lses))
    if torch.isnan(got).any() or got[..., 2, :].abs().max() != 0:
        raise Violation(f"row 2 has LSE = -inf in both inputs; its output is {got[0, 0, 2].tolist()}, expected zeros")


@check("alpha is differentiable: the gradients of the merge with respect to the outputs and the LSEs are those of "
       "sum_i softmax_i(LSE) O_i", seed=st.integers(0, 2 ** 16))
def merge_gradients_flow_through_alpha(merge_by_lse, seed):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(3, 1, 2, 5, 3, generator=g, dtype=F64, requires_grad=True)  # 3 patterns, stacked
    lses = torch.randn(3, 1, 2, 5, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(1, 2, 5, 3, generator=g, dtype=F64)
    got = torch.autograd.grad((merge_by_lse(outs, lses) * weight).sum(), (outs, lses), allow_unused=True)
    alpha = torch.softmax(lses, 0)
    want = torch.autograd.grad(((alpha[..., None] * outs).sum(0) * weight).sum(), (outs, lses))
    for name, a, b in zip(("d outs", "d lses"), got, want):
        if a is None or _diff(a, b) > 1e-10:
            raise Violation(f"{name} differs from the gradient of softmax(LSE)-weighted outputs by "
                            f"{'everything (no gradient)' if a is None else f'{_diff(a, b):.3g}'}: is alpha detached?")


def _merge_oracle(outs, lses):
    """sum_i softmax_i(LSE_i) O_i in float64 with each row's own maximum (rows covered by nothing: 0)."""
    lse = torch.stack([x.double() for x in lses])
    top = lse.amax(0)
    z = torch.exp(lse - torch.where(torch.isfinite(top), top, 0.0))
    alpha = z / torch.where(z.sum(0) > 0, z.sum(0), 1.0)
    return sum(a.unsqueeze(-1) * o.double() for a, o in zip(alpha, outs))


@check("wide and low-precision LSEs: float32 LSEs spread +-1000 and float16 ones spread +-30 (exp leaves float16's "
       "range past +-11), rows far apart, given as a list or stacked, merge to the float64 result in the inputs' "
       "dtype (each row shifted by its own maximum)", dtype=st.sampled_from([torch.float32, torch.float16]),
       stacked=st.booleans(), seed=st.integers(0, 2 ** 16),
       examples=[dict(dtype=torch.float16, stacked=False, seed=0), dict(dtype=torch.float32, stacked=True, seed=1)])
def merge_is_stable_for_wide_lses(merge_by_lse, dtype, stacked, seed):
    g = torch.Generator().manual_seed(seed)
    spread = 1000.0 if dtype == torch.float32 else 30.0
    outs = [torch.randn(1, 2, 6, 3, generator=g).to(dtype) for _ in range(3)]
    row_offset = (torch.rand(1, 2, 6, generator=g) * 2 - 1) * spread  # rows hundreds apart: a global max underflows
    lses = [(row_offset + torch.randn(1, 2, 6, generator=g) * 3).to(dtype) for _ in range(3)]
    got = merge_by_lse(torch.stack(outs) if stacked else outs, torch.stack(lses) if stacked else lses)
    want = _merge_oracle(outs, lses)
    if not isinstance(got, torch.Tensor) or got.dtype != dtype:
        raise Violation(f"the merge of {dtype} inputs returned {getattr(got, 'dtype', type(got).__name__)}; "
                        f"expected {dtype}")
    if torch.isnan(got).any() or torch.isinf(got).any():
        raise Violation(f"{dtype} LSEs of size up to {spread:.0f}: the result holds NaN or inf (exp overflowed: is "
                        "each row shifted by its maximum before exp?)")
    err = (got.double() - want).abs().max().item()
    # loose enough for any correct order of operations (a float16 logsumexp of LSEs near 30 rounds by ~0.015), far
    # below what a global maximum (rows underflow to 0) or no shift (inf, NaN) gives
    tol = (1e-3 if dtype == torch.float32 else 0.1) * max(1.0, want.abs().max().item())
    if err > tol:
        raise Violation(f"{dtype} LSEs whose rows lie up to {spread:.0f} apart: the merge differs from float64 by "
                        f"{err:.3g} (allowed {tol:.3g}); one maximum for all rows lets exp underflow in the others")


@check("detach_weights=True: the same forward, d outs = alpha and no gradient through the LSEs (alpha a constant)",
       seed=st.integers(0, 2 ** 16))
def detached_weights_stop_the_lse_gradient(merge_by_lse, seed):
    g = torch.Generator().manual_seed(seed)
    outs = torch.randn(2, 1, 2, 5, 3, generator=g, dtype=F64, requires_grad=True)
    lses = torch.randn(2, 1, 2, 5, generator=g, dtype=F64, requires_grad=True)
    weight = torch.randn(1, 2, 5, 3, generator=g, dtype=F64)
    got = merge_by_lse(outs, lses, detach_weights=True)
    expect_close(got, _merge_oracle(outs, lses), 1e-10, "detach_weights=True changed the forward")
    d_outs, d_lses = torch.autograd.grad((got * weight).sum(), (outs, lses), allow_unused=True)
    want = torch.softmax(lses.detach(), 0)[..., None] * weight
    if d_outs is None or _diff(d_outs, want) > 1e-10:
        raise Violation("detach_weights=True: d outs must be alpha times the upstream gradient")
    if d_lses is not None and d_lses.abs().max() != 0:
        raise Violation(f"detach_weights=True: the LSEs got a gradient (max {d_lses.abs().max():.3g}); alpha must "
                        "be a constant in the backward pass")


# ---- 6.4 the kernel's launch --------------------------------------------------------------------------------
# corner cases (fixed cases): a short last segment; offset heads; B, H > 1 with q, k, v, out strides that
# differ; rates 1 and > 1.

def _rows_why(wrote, kept, T: int, w: int) -> str:
    """Which rows the kernel left out or wrote extra, (B, H, T) masks: a missing short last segment, missing
    heads, or else how many rows differ."""
    missing, extra = kept & ~wrote, wrote & ~kept
    rows = missing.nonzero()[:, 2]
    start = T // w * w  # the short last segment's first row (T when there is none)
    if not extra.any() and len(rows) and start < T and bool((rows >= start).all()) and bool(
            torch.equal(missing[..., start:], kept[..., start:])):
        return (f"the last (short) segment, rows {start}..{T - 1} of T = {T} with w = {w}, is missing: the kernel "
                f"never computed it; count the segments as ceil(T / w), not T // w")
    heads = missing.any(-1).any(0).nonzero()[:, 0].tolist()
    if not extra.any() and heads and all(torch.equal(missing[:, h], kept[:, h]) for h in heads):
        return f"heads {heads} were never computed (no row of them written): launch one program per (batch, head)"
    return (f"the kernel wrote other rows than the pattern keeps ({int(missing.sum())} kept rows missing, "
            f"{int(extra.sum())} rows written that the pattern does not keep)")


@check("the Triton kernel (run by the interpreter) gives dilated_branch's O and LSE, float32, for short last "
       "segments, several heads and dilations, causal or not")
def kernel_matches_the_reference(dilated_branch_kernel):
    from nanomodels.dilated import dilated_branch

    for T, w, r, H, causal in ((40, 16, 2, 2, False), (37, 32, 4, 3, True), (24, 8, 1, 2, True), (20, 32, 4, 2, False)):
        q, k, v = _qkv(1, H, T, 16, seed=T, dtype=torch.float32)
        out, lse = dilated_branch_kernel(q, k, v, w, r, causal=causal)
        want_out, want_lse = dilated_branch(q.double(), k.double(), v.double(), w, r, causal=causal)
        kept = torch.isfinite(want_lse)
        if not torch.equal(torch.isfinite(lse), kept):
            raise Violation(f"T = {T}, w = {w}, r = {r}, H = {H}: {_rows_why(torch.isfinite(lse), kept, T, w)}")
        if _diff(out, want_out) > 2e-5 or _diff(lse[kept], want_lse[kept]) > 2e-5:
            raise Violation(f"T = {T}, w = {w}, r = {r}, H = {H}, causal = {causal}: O differs by "
                            f"{_diff(out, want_out):.3g}, LSE by {_diff(lse[kept], want_lse[kept]):.3g}")


@check("layouts: q and v in (B, T, H, D) memory (transposed), k contiguous, out= and lse= given as views into "
       "wider buffers: each tensor is stepped with its own row stride, and the results land in out and lse")
def kernel_strides_and_out(dilated_branch_kernel):
    from nanomodels.dilated import dilated_branch

    B, H, T, D, w, r = 1, 2, 21, 16, 8, 2
    q, k, v = _qkv(B, H, T, D, seed=5, dtype=torch.float32)
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)  # row stride H * D instead of D
    v_t = v.transpose(1, 2).contiguous().transpose(1, 2)  # v like q, k contiguous: three layouts, two strides
    out = torch.zeros(B, H, T, D + 8)[..., :D]  # row stride D + 8
    lse = torch.full((B, H, T + 3), -math.inf)[..., :T]
    got_out, got_lse = dilated_branch_kernel(q_t, k, v_t, w, r, out=out, lse=lse)
    want_out, want_lse = dilated_branch(q.double(), k.double(), v.double(), w, r)
    kept = torch.isfinite(want_lse)
    if got_out.data_ptr() != out.data_ptr() or got_lse.data_ptr() != lse.data_ptr():
        raise Violation("out= and lse= were given: the kernel must fill them and return them, not new tensors")
    if not torch.equal(torch.isfinite(lse), kept):
        raise Violation(f"T = {T}, w = {w}, r = {r}, H = {H}, out with row stride {out.stride(2)}: "
                        f"{_rows_why(torch.isfinite(lse), kept, T, w)}")
    d_out, d_lse = _diff(out[kept], want_out[kept]), _diff(lse[kept], want_lse[kept])
    if d_out > 2e-5 or d_lse > 2e-5:
        raise Violation(f"q and v of row stride {q_t.stride(2)}, k of {k.stride(2)}, out of {out.stride(2)}: O "
                        f"differs by {d_out:.3g}, LSE by {d_lse:.3g}; step each tensor by r times its own row stride")


# ---- 6.5 dilated attention end to end ----------------------------------------------------------------------
# corner cases: T = 1; T not a multiple of any segment; one head (H < r); more heads than rates (H > r);
# rates in any order; causal; detach_weights. Pinned: PINNED_MIXTURES in the mixture check.

def count_matrix(T, H, segment_lengths, dilation_rates, causal):
    """(H, T, T) float64: how many patterns pair query t with key u in head j, from the definition (loops)."""
    count = torch.zeros(H, T, T, dtype=F64)
    for w, r in zip(segment_lengths, dilation_rates):
        for j in range(H):
            for start in range(0, T, w):
                rows = torch.tensor(list(range(start + j % r, min(start + w, T), r)), dtype=torch.long)
                pairs = torch.ones(len(rows), len(rows), dtype=F64)
                count[j, rows[:, None], rows[None, :]] += pairs.tril() if causal else pairs
    return count


def log_count_oracle(q, k, v, count):
    """Dense softmax attention with the additive bias log count(q, k) (-inf where 0); a row with no key: 0."""
    covered = count.sum(-1, keepdim=True) > 0
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + torch.log(count.clamp(min=1))
    scores = torch.where(count > 0, scores, -math.inf)
    scores = torch.where(covered, scores, 0.0)  # rows no pattern keeps: any finite row, zeroed below
    return torch.where(covered, torch.softmax(scores, -1) @ v, 0.0)


PATTERN_SETS = [((8,), (1,)), ((4, 8), (1, 2)), ((4, 8, 16), (1, 2, 4)), ((8, 16), (2, 4)), ((16,), (4,)),
                ((2, 8), (1, 4)), ((6, 12), (3, 3)), ((8, 4), (4, 1))]
# one token; T = 37 (every segment length cuts it short); one head under rates 1, 2, 4 (H < r); 5 heads over
# rates 1 and 4 (H > r, offsets wrap)
PINNED_MIXTURES = [dict(T=1, H=1, patterns=((4, 8), (1, 2)), causal=True, seed=0),
                   dict(T=37, H=1, patterns=((4, 8, 16), (1, 2, 4)), causal=False, seed=1),
                   dict(T=37, H=5, patterns=((2, 8), (1, 4)), causal=True, seed=2)]
MIXTURE = dict(T=st.integers(1, 40), H=st.integers(1, 5), patterns=st.sampled_from(PATTERN_SETS),
               causal=st.booleans(), seed=st.integers(0, 2 ** 16))


@check("the mixture equals dense attention with the bias log count(q, k) (float64, 1e-10), causal or not, T not a "
       "multiple of w, H < r and H > r", **MIXTURE,
       examples=PINNED_MIXTURES)
def mixture_is_log_count_attention(dilated_attention, T, H, patterns, causal, seed):
    q, k, v = _qkv(2, H, T, 3, seed)
    got = dilated_attention(q, k, v, *patterns, causal=causal)
    want = log_count_oracle(q, k, v, count_matrix(T, H, *patterns, causal))
    if tuple(got.shape) != tuple(q.shape):
        raise Violation(f"the output has shape {tuple(got.shape)}, expected {tuple(q.shape)}")
    if _diff(got, want) > 1e-10:
        bad = ((got - want).abs().nan_to_num(nan=math.inf) > 1e-10).nonzero()[0].tolist()
        raise Violation(f"patterns w = {patterns[0]}, r = {patterns[1]}, T = {T}, H = {H}, causal = {causal}: "
                        f"the output differs from log-count attention by {_diff(got, want):.3g}, first at (batch, "
                        f"head, row, column) {bad}")


@check("a query that no pattern keeps (H < r: offsets no head has) outputs 0, not NaN, and passes no NaN gradient")
def uncovered_queries_are_zero(dilated_attention):
    q, k, v = (x.requires_grad_() for x in _qkv(1, 1, 16, 3, seed=5))  # head 0 keeps the even rows only
    out = dilated_attention(q, k, v, (8, 16), (2, 4))
    if torch.isnan(out).any() or out[0, 0, 1::2].abs().max() != 0:
        raise Violation(f"H = 1, patterns (8, 2), (16, 4): odd rows are kept by no pattern; their outputs are "
                        f"{out[0, 0, 1].tolist()} (row 1), ..., expected zeros")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    if any(torch.isnan(g).any() for g in grads):
        raise Violation("the outputs are right, but the gradient holds NaN (from the uncovered rows)")


@check("the gradient flows through alpha: dQ, dK, dV equal those of log-count attention (float64, 1e-9); with "
       "detach_weights=True the same forward and the gradient of sum_i alpha_i O_i with alpha a constant", **MIXTURE)
def gradients_are_those_of_the_mixture(dilated_attention, T, H, patterns, causal, seed):
    from nanomodels.dilated import dilated_branch

    q, k, v = (x.requires_grad_() for x in _qkv(1, H, T, 3, seed))
    weight = _qkv(1, H, T, 3, seed + 1)[0]
    got = torch.autograd.grad((dilated_attention(q, k, v, *patterns, causal=causal) * weight).sum(), (q, k, v),
                              allow_unused=True)
    oracle = log_count_oracle(q, k, v, count_matrix(T, H, *patterns, causal))
    want = torch.autograd.grad((oracle * weight).sum(), (q, k, v))
    for name, a, b in zip(("dQ", "dK", "dV"), got, want):
        if a is None or _diff(a, b) > 1e-9:
            raise Violation(f"patterns w = {patterns[0]}, r = {patterns[1]}, T = {T}, causal = {causal}: {name} "
                            f"differs from the gradient of log-count attention by "
                            f"{'everything (no gradient)' if a is None else f'{_diff(a, b):.3g}'}")
    branches = [dilated_branch(q, k, v, w, r, causal=causal) for w, r in zip(*patterns)]
    alpha = torch.softmax(torch.stack([lse for _, lse in branches]).detach(), 0).nan_to_num(0.0)
    frozen = sum(a[..., None] * o for a, (o, _) in zip(alpha, branches))
    want = torch.autograd.grad((frozen * weight).sum(), (q, k, v))
    out = dilated_attention(q, k, v, *patterns, causal=causal, detach_weights=True)
    got = torch.autograd.grad((out * weight).sum(), (q, k, v), allow_unused=True)
    expect_close(out, oracle, 1e-10, "detach_weights=True changed the forward",
                 "; only the backward should change")
    for name, a, b in zip(("dQ", "dK", "dV"), got, want):
        if a is None or _diff(a, b) > 1e-9:
            raise Violation(f"detach_weights=True: {name} differs from the gradient with alpha held constant by "
                            f"{'everything (no gradient)' if a is None else f'{_diff(a, b):.3g}'}")


COST_PATTERNS = ((16, 64, 256), (1, 4, 16))  # geometric_patterns(16, 4, 3)


def cost_experiment(dilated_attention, lengths=(256, 512, 1024, 2048), B=1, H=4, D=8):
    """The experiment of exercise 6.5: the floating-point operations of one call, counted by torch's
    FlopCounterMode (every matrix product), for the patterns COST_PATTERNS at each T in `lengths`. Rows
    {T, flops, sparse, dense}: `sparse` = 4 B H D x the score entries of the patterns (QK^T and PV, 2 flops a
    multiply-add), `dense` = 4 B H D T^2, what dense attention costs."""
    from torch.utils.flop_counter import FlopCounterMode

    from nanomodels.dilated import num_score_entries

    rows = []
    for T in lengths:
        q, k, v = _qkv(B, H, T, D, seed=T)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            dilated_attention(q, k, v, *COST_PATTERNS, causal=True)
        rows.append({"T": T, "flops": counter.get_total_flops(),
                     "sparse": 4 * B * H * D * num_score_entries(T, *COST_PATTERNS), "dense": 4 * B * H * D * T * T})
    return rows


def cost_table(rows) -> str:
    lines = [f"{'T':>6} | {'flops counted':>13} | {'flops / T':>9} | {'dense flops':>13} | {'% of dense':>10}"]
    lines += [f"{r['T']:>6} | {r['flops']:>13,} | {r['flops'] / r['T']:>9,.0f} | {r['dense']:>13,} | "
              f"{100 * r['flops'] / r['dense']:>10.2f}" for r in rows]
    return "\n".join(lines)


@check("the experiment: the matrix products of one call cost 4 B H D x the patterns' score entries, so the cost "
       "per token stays constant from T = 256 to 2048 (linear in T), while dense attention's grows 8-fold")
def cost_is_linear_in_t(dilated_attention):
    rows = cost_experiment(dilated_attention)
    for row in rows:
        if row["flops"] != row["sparse"]:
            dense = " (that is dense attention's count)" if row["flops"] >= row["dense"] else ""
            per_token = ", ".join(f"{r['flops'] // r['T']:,} at T = {r['T']}" for r in rows)
            raise Violation(f"T = {row['T']}, patterns {COST_PATTERNS}: one call counted {row['flops']:,} flops in "
                            f"matrix products; computing exactly the patterns' scores costs {row['sparse']:,}"
                            f"{dense}. Flops per token: {per_token}")


EXERCISES = {
    "6.1": Exercise(points=2, checks=[offsets_are_j_mod_r],
                    hint='The paper gives head j of a pattern with dilation r its own offset so that the heads together cover every row.',
                    hints=('The offset depends only on the head index and the dilation rate, not on the segment or the position.',
                           'Head j starts at row s_j = j mod r of every segment.')),
    "6.2": Exercise(points=4, checks=[branch_matches_the_loop_oracle, whole_segment_is_dense],
                    hint='One pattern is ordinary softmax attention, only among the rows a head keeps in each segment.',
                    hints=('Gather the kept rows per segment; a short last segment has fewer real rows than w / r: those keys must get no weight; with causal, compare original positions.',
                           'Scores of the kept queries against the kept keys of the same segment, scaled by 1/sqrt(D); padded (beyond T) keys and, when causal, later keys masked; return the attention output and the per-row log-sum-exp.')),
    "6.3": Exercise(points=3, checks=[merge_of_key_splits_is_attention_over_all_keys, uncovered_rows_are_zero,
                                      merge_gradients_flow_through_alpha, merge_is_stable_for_wide_lses,
                                      detached_weights_stop_the_lse_gradient],
                    hint='Two partial softmaxes over disjoint key sets combine exactly when each is weighted by its share of the total normalizer.',
                    hints=('The share of pattern i is exp(LSE_i) over the sum of the exp(LSE)s: a softmax over patterns, computed stably; a row no pattern covers must stay 0, not NaN.',
                           "alpha_i = softmax over patterns of the LSEs (subtract the max, guard the all -inf case), output = sum_i alpha_i O_i; detach alpha only when asked (torchscale's choice).")),
    "6.4": Exercise(points=3, checks=[kernel_matches_the_reference, kernel_strides_and_out], mutates=("out", "lse"),
                    hint='Dilation in a kernel is a stride: the kept rows of a segment are evenly spaced in memory.',
                    hints=('One program handles one block of kept rows of one segment for one (batch, head); the grid has one axis for each of these.',
                           "Grid: blocks of the w / r kept rows, segments ceil(T / w), B * H; the row stride passed for q, k, v and the output is r times the tensor's own row stride.")),
    "6.5": Exercise(points=4, checks=[mixture_is_log_count_attention, uncovered_queries_are_zero,
                                      gradients_are_those_of_the_mixture, cost_is_linear_in_t],
                    hint='Dilated attention is the patterns computed one at a time, each on its own, then combined per query by how much softmax mass each one found.',
                    hints=('Each pattern (w_i, r_i) is one call of the per-pattern attention of exercise 6.2 (pair the i-th segment length with the i-th dilation rate, and pass the causal flag on); the combination is the merge of exercise 6.3, which also knows what to do with queries nobody keeps and with detach_weights.',
                           'For every (w, r) taken together from the two sequences, compute (O_i, LSE_i) with the library helper of 6.2; then return the LSE merge of 6.3 over the list of outputs and the list of LSEs, forwarding detach_weights. Never build a T x T matrix: the experiment counts the flops.')),
}
