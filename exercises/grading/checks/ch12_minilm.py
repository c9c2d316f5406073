"""Chapter 12's graded checks: MiniLM's attention KL with its mask, MiniLMv2's relation heads, the v2 loss
(Q-Q + K-K + V-V) and MiniLM's value relation.

Each check tests what the MiniLM papers define (arXiv 2002.10957, 2012.15828), against the learner's function
(its first argument), with float64 oracles written out here as plain loops over Python floats; float32 and
float16 inputs are compared with the same oracle run on their (rounded) values. Known-wrong solutions:
exercises/grading/mutants/ch12_minilm.md.
"""

import math

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import F64, expect_close, expect_tensor, fmt, seeds

EPS = {torch.float64: 2.0 ** -52, torch.float32: 2.0 ** -23, torch.float16: 2.0 ** -10}


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- the oracles: loops over Python floats ------------------------------------------------------------------

def naive_kl(teacher, student, mask=None, reduce=True):
    """Σ over (b, h, valid row i) of Σ_k t (log t − log s), 0 log 0 = 0, t > 0 with s = 0 gives +inf; divided
    by H · (number of valid rows). reduce=False: (the sum, Σ t (|log t| + |log s|) (the size of the terms'
    rounding), H, the number of valid rows)."""
    t_, s_ = teacher.double().tolist(), student.double().tolist()
    B, H, T = len(t_), len(t_[0]), len(t_[0][0])
    m_ = [[True] * T for _ in range(B)] if mask is None else mask.tolist()
    total = spread = 0.0
    for b in range(B):
        for h in range(H):
            for i in range(T):
                if not m_[b][i]:
                    continue
                for tv, sv in zip(t_[b][h][i], s_[b][h][i]):
                    if tv > 0:
                        term = math.inf if sv <= 0 else tv * (math.log(tv) - math.log(sv))
                        total += term
                        spread += tv * (abs(math.log(tv)) + abs(math.log(sv))) if sv > 0 else math.inf
    rows = sum(sum(r) for r in m_)
    return total / (H * rows) if reduce else (total, spread, H, rows)


def _softmax_row(scores):
    top = max(scores)
    e = [math.exp(z - top) for z in scores]
    return [v / sum(e) for v in e]


def naive_value_relation(v):
    """softmax_j(Σ_c v[b,h,i,c] v[b,h,j,c] / √Dh), stable (the row max subtracted), as float64 (B, H, T, T)."""
    v_ = v.double().tolist()
    out = []
    for per_b in v_:
        out.append([])
        for rows in per_b:
            dh = len(rows[0])
            out[-1].append([_softmax_row([sum(a * c for a, c in zip(ri, rj)) / math.sqrt(dh) for rj in rows])
                            for ri in rows])
    return torch.tensor(out, dtype=F64).reshape(v.size(0), v.size(1), v.size(2), v.size(2))


def naive_relation(x, n_heads):
    """Relation head h of x (B, T, d) is columns h·d/n_heads ... (h+1)·d/n_heads − 1: softmax(x_h x_hᵀ / √(d/n))."""
    B, T, d = x.shape
    dh = d // n_heads
    x_ = x.double().tolist()
    heads = [[[[row[h * dh + c] for c in range(dh)] for row in x_[b]] for h in range(n_heads)] for b in range(B)]
    return naive_value_relation(torch.tensor(heads, dtype=F64).reshape(B, n_heads, T, dh))


def naive_v2(teacher_qkv, student_qkv, n_heads, mask=None):
    return sum(naive_kl(naive_relation(t, n_heads), naive_relation(s, n_heads), mask)
               for t, s in zip(teacher_qkv, student_qkv))


def _close(a, b, tol) -> bool:
    if math.isinf(b) or math.isinf(a):
        return a == b
    return abs(a - b) <= tol  # False for NaN


def _first_nan(out: torch.Tensor) -> str:
    idx = tuple(int(i) for i in out.isnan().nonzero()[0])
    return f"{int(out.isnan().sum())} NaN entries, the first at index {idx}"


def _value(out, what, dtype) -> float:
    out = expect_tensor(out, (), dtype, what)
    return out.item()


# ---- 12.1 attention_kl --------------------------------------------------------------------------------------
# corner cases: per-batch different masks; one valid row; T = 1; a valid row of zeros; a teacher with zeros
# (0 log 0 = 0); one head; float32/float16 spreads. Pinned: kl_matches_the_loop's examples.

PATTERNS = ("dense", "causal", "sparse")


def kl_inputs(B, H, T, pattern, mask_kind, seed, spread=2.0, dtype=F64):
    """teacher, student (B, H, T, T) and mask: distributions over the allowed keys of each row (dense, causal,
    or a random pattern in which query 0 allows no key: a zero row); the teacher also puts 0 on some keys the
    student allows (its own renormalized row); a masked row's student is all 0 (its KL would be +inf)."""
    g = _gen(seed)
    if pattern == "dense":
        allowed = torch.ones(B, H, T, T, dtype=torch.bool)
    elif pattern == "causal":
        allowed = torch.ones(T, T, dtype=torch.bool).tril().expand(B, H, T, T)
    else:
        allowed = torch.rand(B, H, T, T, generator=g) < 0.6
        allowed[:, :, 0] = False  # query 0 sees no key: a row of zeros (it counts in the mean when valid)
    logits = lambda: torch.randn(B, H, T, T, generator=g, dtype=F64) * spread  # noqa: E731
    s = torch.softmax(logits().masked_fill(~allowed, -math.inf), -1).nan_to_num(nan=0.0)
    t = torch.softmax(logits().masked_fill(~allowed, -math.inf), -1).nan_to_num(nan=0.0)
    drop = (torch.rand(B, H, T, T, generator=g) < 0.25) & (t < t.amax(-1, keepdim=True))  # keep each row's max
    t = t.masked_fill(drop, 0.0)
    t = t / t.sum(-1, keepdim=True).clamp_min(1e-300)
    mask = None
    if mask_kind == "random":
        mask = torch.rand(B, T, generator=g) < 0.6
        mask[int(torch.randint(B, (1,), generator=g)), int(torch.randint(T, (1,), generator=g))] = True
    elif mask_kind == "one row":
        mask = torch.zeros(B, T, dtype=torch.bool)
        mask[B - 1, T - 1] = True
    elif mask_kind == "per batch":  # batch b keeps rows i <= b: rows differ by batch, a mask per batch matters
        mask = torch.arange(T)[None, :] <= torch.arange(B)[:, None]
    if mask is not None:
        s = s.masked_fill(~mask[:, None, :, None], 0.0)
    t, s = t.to(dtype), s.to(dtype)
    if dtype != F64:  # rounding may zero a student entry the teacher keeps: keep the KL finite
        s = torch.where((t > 0) & (s == 0) & (mask is None or mask[:, None, :, None]), t, s)
    return t, s, mask


def _kl_mistake(out, teacher, student, mask) -> str:
    """Name the mistake behind a wrong attention_kl value, when it is one of the usual ones."""
    if out == math.inf:
        if mask is not None and not mask.all():
            return ("; +inf comes from a masked row (its student row is all 0): a masked row must add nothing, "
                    "whatever it holds")
        return ("; +inf where the loop is finite: a term with t = 0 was not 0, or the direction is student ‖ "
                "teacher (a teacher 0 where the student is > 0)")
    total, _, H, rows = naive_kl(teacher, student, mask, reduce=False)
    B, _, T, _ = teacher.shape
    masked_t = teacher if mask is None else teacher * mask[:, None, :, None]
    with_mass = int((masked_t.sum(-1) > 0).sum())
    candidates = [
        ("KL(student ‖ teacher): the direction is teacher ‖ student, Σ t (log t − log s)",
         naive_kl(student, teacher, mask)),
        ("the KL with the mask ignored (masked rows counted, their content too)", naive_kl(teacher, student)),
        ("the masked rows' KL left out, but the mean taken over all B·H·T rows; divide by H times the number "
         "of valid rows", total / (H * B * T)),
        ("a sum over the heads instead of the mean over them", total / rows),
        ("a sum over every row instead of the mean over B, H and the valid rows", total),
        ("the mean over only the rows where the teacher has mass; a valid row of zeros counts in the mean",
         total / max(with_mass, 1)),
    ]
    if mask is not None:
        keys = mask[:, None, None, :].expand_as(teacher)
        candidates.append(("the mask applied to the keys (the last axis); it selects query rows",
                           naive_kl(teacher.masked_fill(~keys, 0), student.masked_fill(~keys, 0)) * B * T / rows))
        first = mask[:1].expand(B, T)
        if int(first.sum()):
            candidates.append(("batch 0's mask used for every batch: each batch has its own mask row",
                               naive_kl(teacher, student, first)))
    for what, value in candidates:
        if math.isfinite(value) and _close(out, value, 1e-9 * max(1.0, abs(value))) and \
                not _close(out, total / (H * rows), 1e-12):
            return f"; that is {what}"
    return ""


def _describe(teacher, student, mask) -> str:
    both = int(((teacher == 0) & (student == 0)).sum())
    t_only = int(((teacher == 0) & (student > 0)).sum())
    masked = 0 if mask is None else int((~mask).sum())
    return (f"(B, H, T) = {tuple(teacher.shape[:3])}, {both} entries with teacher = student = 0, {t_only} with "
            f"only the teacher 0, {masked} masked rows (their student rows all 0)")


kl_cases = dict(B=st.integers(1, 3), H=st.integers(1, 3), T=st.integers(1, 6), pattern=st.sampled_from(PATTERNS),
                mask_kind=st.sampled_from(["none", "random", "one row", "per batch"]), seed=seeds)


@check("attention_kl = Σ over (b, h, valid row) of KL(teacher ‖ student) / (H · valid rows), KL = Σ_k t (log t − "
       "log s) with 0 log 0 = 0: masked rows ignored whatever they hold (here a student row of zeros), a valid "
       "row of zeros counted in the mean, each batch with its own mask (float64, to 1e-12)", **kl_cases,
       examples=[dict(B=2, H=2, T=4, pattern="causal", mask_kind="per batch", seed=1),
                 dict(B=3, H=1, T=5, pattern="sparse", mask_kind="one row", seed=2),
                 dict(B=2, H=3, T=1, pattern="dense", mask_kind="none", seed=3),
                 dict(B=1, H=2, T=6, pattern="sparse", mask_kind="random", seed=4)])
def kl_matches_the_loop(attention_kl, B, H, T, pattern, mask_kind, seed):
    teacher, student, mask = kl_inputs(B, H, T, pattern, mask_kind, seed)
    want = naive_kl(teacher, student, mask)
    args = (teacher, student) if mask is None else (teacher, student, mask)
    out = _value(attention_kl(*args), "attention_kl", F64)
    if math.isnan(out):
        raise Violation(f"attention_kl returned NaN for {_describe(teacher, student, mask)}: a 0 · log 0 or "
                        f"0 · inf term was not counted as 0 (expected {want:.6g})")
    if not _close(out, want, 1e-12 * max(1.0, abs(want))):
        raise Violation(f"attention_kl = {out:.10g}, expected {want:.10g} for {_describe(teacher, student, mask)}"
                        f"{_kl_mistake(out, teacher, student, mask)}")


@check("KL(p ‖ p) = 0 for distributions with zeros; a student 0 where the teacher is > 0 gives +inf (not NaN, "
       "not a finite value), and a teacher 0 where the student is > 0 adds exactly 0", seed=seeds)
def kl_zero_log_zero_and_infinity(attention_kl, seed):
    p, _, _ = kl_inputs(2, 2, 5, "sparse", "none", seed)
    same = _value(attention_kl(p, p.clone()), "attention_kl", F64)
    if not abs(same) <= 1e-15:
        why = " (NaN: 0 · log 0 must be 0)" if math.isnan(same) else ""
        raise Violation(f"attention_kl(p, p) = {same:.4g} for p with {int((p == 0).sum())} zeros; it must be 0{why}")
    t = torch.tensor([[[[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]], dtype=F64)
    s = torch.tensor([[[[0.25, 0.25, 0.5], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]], dtype=F64)
    want = math.log(2.0) / 3  # row 0: 2 · 0.5 log 2 = log 2, rows 1 and 2: 0; the mean over 3 rows
    out = _value(attention_kl(t, s), "attention_kl", F64)
    if not _close(out, want, 1e-15):
        why = ("the student's 0.5 on key 2, where the teacher has 0, must add 0: is the direction student ‖ "
               "teacher?" if out == math.inf else "the teacher's 0 adds exactly 0, its 0 · log 0 too; an eps "
               "inside a logarithm shifts every term" if abs(out - want) < 1e-3 else "the teacher's 0 adds 0")
        raise Violation(f"teacher {fmt(t[0, 0])}, student {fmt(s[0, 0])}: got {out:.12g}, expected log(2)/3 = "
                        f"{want:.12g}, off by {out - want:.3g} ({why})")
    s_zero = torch.tensor([[[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]]], dtype=F64)
    out = _value(attention_kl(t, s_zero), "attention_kl", F64)
    if not out == math.inf:
        raise Violation(f"teacher {fmt(t[0, 0])}, student {fmt(s_zero[0, 0])}: got {out}, expected +inf (the "
                        "student gives 0 to a key the teacher weights: t · (log t − log 0) = +inf); no eps in "
                        "the log")


@check("gradients: none reaches the teacher (a target, detached); the student's is −t / s / (H · valid rows) "
       "where t > 0 in a valid row and exactly 0 elsewhere, never NaN where teacher and student are both 0 (a "
       "causal student's future keys)", pattern=st.sampled_from(["causal", "sparse"]),
       mask_kind=st.sampled_from(["none", "random"]), seed=seeds)
def kl_gradient_reaches_only_the_student(attention_kl, pattern, mask_kind, seed):
    teacher, student, mask = kl_inputs(2, 2, 5, pattern, mask_kind, seed)
    if mask is not None:  # a masked row's student: a distribution, so that the gradient there is finite
        student = torch.where(mask[:, None, :, None], student, torch.full_like(student, 0.2))
    t, s = teacher.clone().requires_grad_(), student.clone().requires_grad_()
    out = attention_kl(t, s, *(() if mask is None else (mask,)))
    expect_tensor(out, (), F64, "attention_kl")
    if not out.requires_grad:
        raise Violation("attention_kl's result has no graph: the gradient must reach the student")
    out.backward()
    if t.grad is not None and t.grad.abs().max() > 0:
        raise Violation(f"a gradient reached the teacher (max |dL/dteacher| = {t.grad.abs().max():.3g}): the "
                        "teacher is the target, detach it")
    if s.grad is None:
        raise Violation("no gradient reached the student")
    valid = torch.ones(2, 5, dtype=torch.bool) if mask is None else mask
    keep = (teacher > 0) & valid[:, None, :, None]
    want = torch.where(keep, -teacher / torch.where(keep, student, 1.0), 0.0) / (2 * int(valid.sum()))
    if s.grad.isnan().any():
        both = (teacher == 0) & (student == 0)
        where = " at entries where teacher and student are both 0" if s.grad[both].isnan().any() else ""
        raise Violation(f"the student's gradient holds NaN{where} ({_first_nan(s.grad)}): the derivative of "
                        "log s there is 0 / 0; keep the entries with t = 0 out of the logarithm (not only out of "
                        "the forward value)")
    err = (s.grad - want).abs().max().item()
    if not err <= 1e-12 * max(1.0, want.abs().max().item()):
        why = ""
        if (s.grad[~valid[:, None, :, None].expand_as(s)] != 0).any():
            why = ": a masked query row got a gradient (its KL was counted)"
        elif (s.grad[keep] != 0).all():
            ratio = (s.grad[keep] / want[keep])
            if (ratio - ratio[0]).abs().max() <= 1e-9:
                why = (f": it is {ratio[0].item():.4g} times the right one, so the mean divides by the wrong count "
                       f"(H · valid rows = {2 * int(valid.sum())})")
        raise Violation(f"the student's gradient differs from −t / s / (H · valid rows) by {err:.3g}{why}")


@check("float32 and float16 teacher and student (probabilities down to 1e-30, and below the float16 range): "
       "the result keeps their dtype and matches the float64 loop on the same values within 64 ulps of "
       "Σ t (|log t| + |log s|) / (H · valid rows), the size of the logarithms' rounding",
       dtype=st.sampled_from([torch.float32, torch.float16]), pattern=st.sampled_from(PATTERNS),
       mask_kind=st.sampled_from(["none", "random", "per batch"]), seed=seeds)
def kl_in_low_precision(attention_kl, dtype, pattern, mask_kind, seed):
    teacher, student, mask = kl_inputs(2, 2, 6, pattern, mask_kind, seed, spread=12.0, dtype=dtype)
    total, spread, H, rows = naive_kl(teacher, student, mask, reduce=False)
    want, tol = total / (H * rows), 64 * EPS[dtype] * spread / (H * rows)
    out = attention_kl(teacher, student, *(() if mask is None else (mask,)))
    out = _value(out, f"attention_kl of {dtype} inputs", dtype)
    if math.isnan(out):
        raise Violation(f"attention_kl of {dtype} inputs returned NaN ({_describe(teacher, student, mask)}); "
                        f"expected {want:.6g}: a 0 · log 0 or 0 · inf term, or an eps that rounds to 0 in {dtype}")
    if not _close(out, want, tol):
        raise Violation(f"attention_kl of {dtype} inputs = {out:.6g}, expected {want:.6g} ± {tol:.2g} (the float64 "
                        f"loop on the same {dtype} values){_kl_mistake(out, teacher, student, mask)}")


# ---- 12.2 relation and 12.4 value_relation -----------------------------------------------------------------
# corner cases: one head; one column per head; 12 columns into 6, 4 or 3 heads; T = 1; wide logits per
# dtype. Pinned: the examples of the relation checks (WIDE for the spreads).

def _rel_inputs(shape, scale, seed, dtype=F64):
    x = torch.randn(*shape, generator=_gen(seed), dtype=F64)
    return (x * scale).to(dtype)


def _max_logit(x, n_heads) -> float:
    """max over heads and pairs of Σ_c |x_ic x_jc| / √(d / n): a bound on every |logit| of the relation."""
    B, T, d = x.shape
    a = x.double().abs().view(B, T, n_heads, d // n_heads).transpose(1, 2)
    return (a @ a.transpose(-2, -1)).max().item() / math.sqrt(d // n_heads)


def _relation_mistake(out, x, n_heads) -> str:
    B, T, d = x.shape
    dh = d // n_heads
    heads = x.view(B, T, n_heads, dh).transpose(1, 2)
    scores = heads @ heads.transpose(-2, -1)
    interleaved = x.view(B, T, dh, n_heads).permute(0, 3, 1, 2)
    candidates = [
        ("scaled by 1/√d instead of 1/√(d / n_heads), the width of one relation head",
         torch.softmax(scores / math.sqrt(d), -1)),
        ("not scaled by 1/√(d / n_heads)", torch.softmax(scores, -1)),
        ("normalized over the queries (axis −2); each row (one query) is a distribution over the keys",
         torch.softmax(scores / math.sqrt(dh), -2)),
        ("the heads interleaved (column c to head c mod n_heads); relation head h is the contiguous block of "
         "columns h·d/n_heads ... (h+1)·d/n_heads − 1", torch.softmax(
             interleaved @ interleaved.transpose(-2, -1) / math.sqrt(dh), -1)),
        ("x viewed as (B, n_heads, T, d / n_heads) without moving the head axis: split the last axis, then put "
         "the heads before T", naive_value_relation(x.reshape(B, n_heads, T, dh))),
    ]
    for what, value in candidates:
        if out.shape == value.shape and (out.double() - value).abs().max() <= 1e-9:
            return f": your result is {what}"
    return ""


def _value_relation_mistake(out, v) -> str:
    scores, (T, dh) = v @ v.transpose(-2, -1), v.shape[-2:]
    for what, value in (("not scaled by 1/√Dh", torch.softmax(scores, -1)),
                        ("scaled by 1/√T instead of 1/√Dh", torch.softmax(scores / math.sqrt(T), -1)),
                        ("normalized over the queries (axis −2), not over the keys",
                         torch.softmax(scores / math.sqrt(dh), -2))):
        if (out.double() - value).abs().max() <= 1e-9:
            return f": your result is {what}"
    return ""


def _expect_distributions(out, want, tol, what, bound):
    """out matches want within tol; NaN / inf reported as such, with where they first appear."""
    if out.isnan().any() or out.isinf().any():
        bad = out.isnan() | out.isinf()
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise Violation(f"{what} holds NaN or inf ({int(bad.sum())} entries, the first at {idx}); its logits reach "
                        f"|x_i · x_j| / √dh up to {bound:.4g}: exp overflowed in {out.dtype}; subtract each row's "
                        f"max before exp (torch.softmax does)")
    err = (out.double() - want).abs().max().item()
    if not err <= tol:
        return err
    return None


@check("relation(x, n_heads)[b, h] = softmax over the keys of x_h x_hᵀ / √(d / n_heads), relation head h being "
       "columns h·d/n_heads ... (h+1)·d/n_heads − 1 of x (B, T, d), for every split (one head, one column per "
       "head, 12 columns into 6, 4 or 3 heads, T = 1), float64 to 1e-12",
       B=st.integers(1, 2), T=st.integers(1, 5), n_heads=st.integers(1, 4), dh=st.integers(1, 4),
       scale=st.sampled_from([0.3, 1.0, 2.0]), seed=seeds,
       examples=[dict(B=2, T=3, n_heads=6, dh=2, scale=1.0, seed=0),  # 12 columns into 6, 4 and 3 heads
                 dict(B=1, T=4, n_heads=4, dh=3, scale=1.0, seed=1),
                 dict(B=1, T=4, n_heads=3, dh=4, scale=1.0, seed=2),
                 dict(B=2, T=1, n_heads=2, dh=3, scale=1.0, seed=3),  # T = 1
                 dict(B=1, T=5, n_heads=1, dh=4, scale=2.0, seed=4),  # one head
                 dict(B=2, T=3, n_heads=3, dh=1, scale=2.0, seed=5)])  # one column per head
def relation_matches_the_loop(relation, B, T, n_heads, dh, scale, seed):
    x = _rel_inputs((B, T, n_heads * dh), scale, seed)
    want = naive_relation(x, n_heads)
    out = expect_tensor(relation(x, n_heads), (B, n_heads, T, T), F64, f"relation(x of shape {(B, T, n_heads * dh)}, "
                                                                          f"n_heads={n_heads})")
    err = _expect_distributions(out, want, 1e-12, "relation", _max_logit(x, n_heads))
    if err is not None:
        raise Violation(f"relation(x of shape {(B, T, n_heads * dh)}, n_heads={n_heads}) differs from the loop by "
                        f"{err:.3g}{_relation_mistake(out, x, n_heads)}")


def _wide(fn, x, n_heads, want_shape, what, mistake):
    dtype = x.dtype
    bound = _max_logit(x, n_heads)
    want = naive_relation(x, n_heads)
    out = expect_tensor(fn(), want_shape, dtype, what)
    # a row's probabilities move by at most 2 max|Δlogit|; a logit is a dot product of dh terms rounded in dtype
    tol = 2 * (x.size(-1) // n_heads + 2) * EPS[dtype] * bound + 4 * EPS[dtype]
    err = _expect_distributions(out, want, tol, what, bound)
    if err is not None:
        raise Violation(f"{what} differs from the float64 loop on the same {dtype} values by {err:.3g} (allowed "
                        f"{tol:.2g}; logits up to {bound:.4g}){mistake(out) if dtype == F64 else ''}")


WIDE = [(torch.float64, 30.0), (torch.float32, 200.0), (torch.float16, 30.0)]  # the target max |logit| per dtype


@check("relation logits far beyond exp's range (up to ±1000 in float64, ±200 in float32, ±30 in float16): no "
       "overflow, the dtype kept, every row the float64 loop's softmax within the rounding of its logits",
       wide=st.sampled_from(WIDE), n_heads=st.sampled_from([1, 2, 4]), seed=seeds,
       examples=[dict(wide=(torch.float64, 1000.0), n_heads=2, seed=0), dict(wide=(torch.float32, 200.0), n_heads=1,
                                                                             seed=1)])
def relation_is_stable(relation, wide, n_heads, seed):
    dtype, target = wide
    x = _rel_inputs((2, 5, 4 * n_heads), 1.0, seed)
    x = (x * math.sqrt(target / _max_logit(x, n_heads))).to(dtype)
    _wide(lambda: relation(x, n_heads), x, n_heads, (2, n_heads, 5, 5),
          f"relation of a {dtype} x, n_heads={n_heads}", lambda out: _relation_mistake(out, x, n_heads))


@check("relation head h sees only its own block of d / n_heads columns: with x non-zero only in head 1's block "
       "(d = 12, 3 heads), heads 0 and 2 are uniform (1/T) and head 1 is the softmax of that block's products")
def relation_heads_are_contiguous_blocks(relation):
    x = torch.zeros(1, 4, 12, dtype=F64)
    x[0, :, 4:8] = torch.tensor([[1.0, -2.0, 0.5, 1.5], [0.0, 1.0, -1.0, 2.0], [2.0, 0.5, 0.0, -1.0],
                                 [-1.5, 1.0, 1.0, 0.5]], dtype=F64)
    out = expect_tensor(relation(x, 3), (1, 3, 4, 4), F64, "relation(x of shape (1, 4, 12), n_heads=3)")
    want = naive_relation(x, 3)
    err = (out - want).abs().max().item()
    if not err <= 1e-12:
        uniform = [h for h in range(3) if (out[0, h] - 0.25).abs().max() <= 1e-12]
        heads = "" if uniform == [0, 2] else f": the uniform heads should be [0, 2], yours are {uniform}"
        raise Violation(f"x is non-zero only in columns 4..7 (relation head 1 of 3), error {err:.3g}{heads}"
                        f"{_relation_mistake(out, x, 3)}")


@check("value_relation(v)[b, h] = softmax over the keys of v vᵀ / √Dh for v (B, H, T, Dh), float64 to 1e-12",
       B=st.integers(1, 2), H=st.integers(1, 3), T=st.integers(1, 5), dh=st.integers(1, 4),
       scale=st.sampled_from([0.3, 1.0, 2.0]), seed=seeds,
       examples=[dict(B=1, H=2, T=1, dh=3, scale=1.0, seed=0), dict(B=2, H=1, T=4, dh=1, scale=2.0, seed=1)])
def value_relation_matches_the_loop(value_relation, B, H, T, dh, scale, seed):
    v = _rel_inputs((B, H, T, dh), scale, seed)
    want = naive_value_relation(v)
    out = expect_tensor(value_relation(v), (B, H, T, T), F64, f"value_relation(v of shape {(B, H, T, dh)})")
    x = v.transpose(1, 2).reshape(B, T, H * dh)  # the same heads as relation's input
    err = _expect_distributions(out, want, 1e-12, "value_relation", _max_logit(x, H))
    if err is not None:
        raise Violation(f"value_relation(v of shape {(B, H, T, dh)}) differs from the loop by {err:.3g}"
                        f"{_value_relation_mistake(out, v)}")


@check("value relation logits up to ±1000 in float64, ±200 in float32, ±30 in float16: no overflow, the dtype "
       "kept, the float64 loop's softmax within the rounding of the logits", wide=st.sampled_from(WIDE),
       seed=seeds)
def value_relation_is_stable(value_relation, wide, seed):
    dtype, target = wide
    v = _rel_inputs((2, 2, 5, 4), 1.0, seed)
    x = v.transpose(1, 2).reshape(2, 5, 8)
    scale = math.sqrt(target / _max_logit(x, 2))
    v, x = (v * scale).to(dtype), (x * scale).to(dtype)
    _wide(lambda: value_relation(v), x, 2, (2, 2, 5, 5), f"value_relation of a {dtype} v",
          lambda out: _value_relation_mistake(out, v))


# ---- 12.3 minilm_v2_loss ------------------------------------------------------------------------------------
# corner cases: per-batch masks; random masks; T = 1 with one head; teacher and student of different widths;
# (q, k, v) as a list or a tuple. Pinned: v2_matches_the_loop's examples.

def v2_inputs(B, T, n_heads, dt, ds, seed, dtype=F64, scale=1.0):
    g = _gen(seed)
    teacher = tuple((torch.randn(B, T, n_heads * dt, generator=g, dtype=F64) * scale).to(dtype) for _ in range(3))
    student = tuple((torch.randn(B, T, n_heads * ds, generator=g, dtype=F64) * scale).to(dtype) for _ in range(3))
    return teacher, student


def _v2_mistake(out, teacher, student, n_heads, mask) -> str:
    kl = lambda t, s, n=n_heads, m=mask: naive_kl(naive_relation(t, n), naive_relation(s, n), m)  # noqa: E731
    terms = [kl(t, s) for t, s in zip(teacher, student)]
    candidates = [
        ("Q-Q + K-K only: the V-V relation is missing", terms[0] + terms[1]),
        ("the mean of the three terms; MiniLMv2 sums them", sum(terms) / 3),
        ("KL(student ‖ teacher) of each relation; the direction is teacher ‖ student",
         sum(kl(s, t) for t, s in zip(teacher, student))),
        ("the loss with one relation head; n_heads relation heads split each width",
         sum(kl(t, s, 1) for t, s in zip(teacher, student))),
        ("teacher q paired with student k (and so on round): pair Q with Q, K with K, V with V",
         sum(kl(t, s) for t, s in zip(teacher, student[1:] + student[:1]))),
        ("the teacher's q taken as the target of all three relations: each of q, k, v has its own",
         sum(kl(teacher[0], s) for s in student)),
    ]
    if mask is not None:
        candidates.append(("the loss with the mask ignored: pass it to every attention KL",
                           sum(kl(t, s, m=None) for t, s in zip(teacher, student))))
    for what, value in candidates:
        if _close(out, value, 1e-9 * max(1.0, abs(value))):
            return f"; your value is {what}"
    return ""


@check("minilm_v2_loss = Σ over Q-Q, K-K, V-V of the mean KL(teacher ‖ student) of their n_heads relation "
       "heads, teacher and student of different widths, the (q, k, v) as tuples or lists, the mask's valid rows "
       "only (float64, to 1e-12)", B=st.integers(1, 2), T=st.integers(1, 5), n_heads=st.integers(1, 3),
       dt=st.integers(1, 4), ds=st.integers(1, 3), mask_kind=st.sampled_from(["none", "random", "per batch"]),
       as_list=st.booleans(), seed=seeds,
       examples=[dict(B=2, T=4, n_heads=3, dt=4, ds=2, mask_kind="per batch", as_list=False, seed=0),
                 dict(B=1, T=5, n_heads=2, dt=3, ds=1, mask_kind="random", as_list=True, seed=1),
                 dict(B=2, T=1, n_heads=1, dt=2, ds=3, mask_kind="none", as_list=False, seed=2)])
def v2_matches_the_loop(minilm_v2_loss, B, T, n_heads, dt, ds, mask_kind, as_list, seed):
    teacher, student = v2_inputs(B, T, n_heads, dt, ds, seed)
    g = _gen(seed + 1)
    mask = None
    if mask_kind == "random":
        mask = torch.rand(B, T, generator=g) < 0.6
        mask[0, 0] = True
    elif mask_kind == "per batch":
        mask = torch.arange(T)[None, :] <= torch.arange(B)[:, None]
    want = naive_v2(teacher, student, n_heads, mask)
    wrap = list if as_list else tuple
    out = minilm_v2_loss(wrap(teacher), wrap(student), n_heads, *(() if mask is None else (mask,)))
    out = _value(out, "minilm_v2_loss", F64)
    shapes = f"teacher (B, T, d) = {(B, T, n_heads * dt)}, student {(B, T, n_heads * ds)}, n_heads = {n_heads}"
    if not _close(out, want, 1e-12 * max(1.0, abs(want))):
        raise Violation(f"minilm_v2_loss = {out:.10g}, expected {want:.10g} ({shapes}, "
                        f"{'no mask' if mask is None else f'mask {fmt(mask)}'})"
                        f"{_v2_mistake(out, teacher, student, n_heads, mask)}")


def _autograd_v2(teacher, student, n_heads):
    """The loss written with log_softmax (no zero probabilities here): its gradients w.r.t. the student."""
    def log_rel(x):
        B, T, d = x.shape
        h = x.view(B, T, n_heads, d // n_heads).transpose(1, 2)
        return torch.log_softmax(h @ h.transpose(-2, -1) / math.sqrt(d // n_heads), -1)

    student = [s.detach().clone().requires_grad_() for s in student]
    loss = 0
    for t, s in zip(teacher, student):
        lt = log_rel(t)
        loss = loss + (lt.exp() * (lt - log_rel(s))).sum() / (n_heads * t.size(0) * t.size(1))
    loss.backward()
    return [s.grad for s in student]


@check("gradients of minilm_v2_loss reach the student's q, k and v (each its own, as autograd of the loop's "
       "formula gives, to 1e-10) and never the teacher's", seed=seeds)
def v2_gradients_reach_only_the_student(minilm_v2_loss, seed):
    teacher, student = v2_inputs(2, 4, 2, 3, 2, seed)
    t = tuple(x.clone().requires_grad_() for x in teacher)
    s = tuple(x.clone().requires_grad_() for x in student)
    out = minilm_v2_loss(t, s, 2)
    expect_tensor(out, (), F64, "minilm_v2_loss")
    if not out.requires_grad:
        raise Violation("minilm_v2_loss's result has no graph: the gradient must reach the student")
    out.backward()
    for name, x in zip("qkv", t):
        if x.grad is not None and x.grad.abs().max() > 0:
            raise Violation(f"a gradient reached the teacher's {name}: the teacher is the target, detach it")
    for name, x, want in zip("qkv", s, _autograd_v2(teacher, student, 2)):
        if x.grad is None or not x.grad.abs().max() > 0:
            raise Violation(f"no gradient reached the student's {name}: its relation is one of the three terms")
        expect_close(x.grad, want, 1e-10 * max(1.0, want.abs().max().item()),
                     f"the gradient w.r.t. the student's {name} differs from autograd of Σ KL(teacher ‖ student)",
                     output=f"the gradient to {name}")


@check("float32 q, k, v with relation logits up to ±200: a student equal to the teacher gives a loss of 0 "
       "(float32, no NaN from an overflowing softmax), and a float32 pair of logits up to ±5 matches the float64 "
       "loop to 1e-4 of the sum of the terms' sizes", n_heads=st.sampled_from([1, 2, 4]), seed=seeds)
def v2_in_float32(minilm_v2_loss, n_heads, seed):
    teacher, _ = v2_inputs(2, 5, n_heads, 4, 4, seed, dtype=F64)
    scale = math.sqrt(200.0 / max(_max_logit(x, n_heads) for x in teacher))
    teacher = tuple((x * scale).float() for x in teacher)
    out = _value(minilm_v2_loss(teacher, tuple(x.clone() for x in teacher), n_heads), "minilm_v2_loss", torch.float32)
    if not abs(out) <= 1e-6:
        why = (" (NaN: exp overflowed; a softmax must subtract each row's max)" if math.isnan(out) else
               ": a student equal to its teacher matches each relation exactly when Q is compared with Q, K with "
               "K and V with V, in the direction teacher ‖ student")
        raise Violation(f"minilm_v2_loss of a float32 student equal to its teacher (relation logits up to 200) = "
                        f"{out:.4g}, expected 0{why}")
    teacher, student = v2_inputs(2, 5, n_heads, 4, 2, seed, dtype=torch.float32, scale=1.2)
    want = naive_v2(teacher, student, n_heads)
    out = _value(minilm_v2_loss(teacher, student, n_heads), "minilm_v2_loss", torch.float32)
    if not _close(out, want, 1e-4 * max(1.0, abs(want))):
        raise Violation(f"minilm_v2_loss of float32 inputs = {out:.6g}, expected {want:.6g} (the float64 loop on "
                        f"the same values){_v2_mistake(out, teacher, student, n_heads, None)}")


EXERCISES = {
    "12.1": Exercise(points=3, checks=[kl_matches_the_loop, kl_zero_log_zero_and_infinity,
                                       kl_gradient_reaches_only_the_student, kl_in_low_precision],
                     hint="MiniLM's attention loss compares, for every head and every query row, the teacher's "
                          "distribution over the keys with the student's, and averages; the teacher is the target.",
                     hints=("Only valid query rows count, in the sum and in the number you divide by; a key the "
                            "teacher gives no weight must add nothing, even when the student gives it none either, "
                            "and must not reach a logarithm (its derivative would be 0 / 0).",
                            "Detach the teacher and zero its masked rows; where the teacher is 0 put 1 into both "
                            "logarithms (torch.where), so those terms are exactly 0; sum t times the difference of "
                            "the logs over everything and divide by the head count times the number of valid rows.")),
    "12.2": Exercise(points=3, checks=[relation_matches_the_loop, relation_is_stable,
                                       relation_heads_are_contiguous_blocks],
                     hint="MiniLMv2 compares teacher and student through relation heads of their own choosing: split "
                          "the concatenated heads again, into a number of relation heads shared by both models.",
                     hints=("Each relation head is a contiguous block of the last axis; inside a head the relation "
                            "is a self-attention of the vectors with themselves, scaled by the width of one head.",
                            "View the last axis as (n_heads, d / n_heads), move the head axis before T, take the "
                            "products of every pair of positions, divide by the square root of the head width, "
                            "and softmax over the keys (a stable softmax).")),
    "12.3": Exercise(points=2, checks=[v2_matches_the_loop, v2_gradients_reach_only_the_student, v2_in_float32],
                     hint="MiniLMv2 distills three self-attention relations at once, each of the same kind between "
                          "teacher and student.",
                     hints=("Each of q, k and v gives one relation per model, through the same number of relation "
                            "heads; each pair is compared with the attention KL, with the mask.",
                            "For each of the three positions of the triples, the attention KL of the teacher's "
                            "relation against the student's; return the sum of the three.")),
    "12.4": Exercise(points=2, checks=[value_relation_matches_the_loop, value_relation_is_stable],
                     hint="MiniLM's value relation is a self-attention of the values with themselves, per head.",
                     hints=("Scaled dot products of every pair of positions of one head, normalized over the keys.",
                            "Multiply v by its own transpose over the last two axes, divide by the square root "
                            "of the head width, and take a stable softmax over the last axis.")),
}
