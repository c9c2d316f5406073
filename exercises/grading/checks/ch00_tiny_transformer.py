"""Chapter 00's graded checks: attention, the causal mask, one BPE merge, the most frequent pair, sampling.

Each check tests the mechanism (what the equation promises), in float64, against the learner's function,
its first argument. Known-wrong solutions: exercises/grading/mutants/ch00_*.md.

Not every plausible-looking change is a mistake: applying the temperature after the top-k filter keeps the
same tokens with the same probabilities (for T > 0, dividing by T preserves the order of the logits), and
forgetting to renormalise before torch.multinomial changes nothing (it normalises its input). Those are not
mutants; the mutants are changes a check can observe.
"""

import functools
import math
from collections import Counter

import regex
import torch
from hypothesis import assume
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import F64, Inputs, expect_tensor, fmt, halves, nan_note, seeds, tensors
from nanomodels.data import load_text
from nanomodels.tokenizer import GPT2_PATTERN, BPETokenizer
from nanomodels.tokenizer import train_bpe as library_train_bpe


# ---- 0.1 masked scaled dot-product attention ------------------------------------------------------------
# corner cases: one key (Tk = 1); one query after cached keys (Tq = 1 < Tk); a fully masked row; one head and one
# batch row; B = H = 2 with a (B, 1, Tq, Tk) mask that differs per batch row; a (Tq, Tk) mask broadcast to every
# slice; values wider than the head (Dv != D); scores up to 1e5 (wide_scores_stay_exact); float16/float32.
# Pinned (PINNED_ATTENTION): one query over three cached keys, and a per-batch mask whose second row masks a
# key the first row keeps (a learner that reads allowed[0] for every batch row).

@st.composite
def attention_cases(draw, mask: str = "any", min_keys: int = 1, min_d: int = 1, causal: bool = False,
                    batched: bool = False, elements=halves):
    """q (B, H, Tq, D), k and v (B, H, Tk, D), allowed None, (Tq, Tk) or (B, 1, Tq, Tk); B = H = 1 unless
    batched. mask: "none", "any" (a row may be fully masked), "visible" (every query sees a key)."""
    b, h = (draw(st.integers(1, 2)), draw(st.integers(1, 2))) if batched else (1, 1)
    tk, d = draw(st.integers(min_keys, 3)), draw(st.integers(min_d, 3))
    dv = draw(st.sampled_from([d, d + 1]))  # the values' width need not be the head size of q and k
    tq = draw(st.integers(1, tk)) if causal else draw(st.integers(1, 3))
    case = Inputs(q=draw(tensors((b, h, tq, d), elements)), k=draw(tensors((b, h, tk, d), elements)),
                  v=draw(tensors((b, h, tk, dv), elements)), allowed=None)
    if mask != "none":
        shape = draw(st.sampled_from([(tq, tk), (b, 1, tq, tk)]))
        bits = draw(st.lists(st.booleans(), min_size=math.prod(shape), max_size=math.prod(shape)))
        case["allowed"] = torch.tensor(bits, dtype=torch.bool).reshape(shape)
        if mask == "visible":
            case["allowed"][..., draw(st.integers(0, tk - 1))] = True
    return case


def _pinned_case(b: int, h: int, tq: int, tk: int, d: int, allowed) -> Inputs:
    """q, k, v of multiples of 1/2 from a fixed generator, with the given mask."""
    g = torch.Generator().manual_seed(b * 1000 + h * 100 + tq * 10 + tk)
    draw = lambda *shape: torch.randint(-6, 7, shape, generator=g).to(F64) / 2  # noqa: E731
    return Inputs(q=draw(b, h, tq, d), k=draw(b, h, tk, d), v=draw(b, h, tk, d + 1), allowed=allowed)


PINNED_ATTENTION = [
    dict(case=_pinned_case(1, 1, 1, 3, 2, None)),  # one query after two cached keys, no mask
    dict(case=_pinned_case(1, 1, 1, 3, 2, torch.tensor([[True, False, True]]))),
    dict(case=_pinned_case(2, 2, 2, 3, 2, torch.tensor([[[[True, True, False], [True, True, True]]],
                                                        [[[False, True, True], [False, False, False]]]]))),
]


def naive_attention(q, k, v, allowed):
    """The equation one query at a time, in Python floats: softmax over the visible keys, zeros if none."""
    B, H, Tq, D = q.shape
    Tk, Dv = k.size(2), v.size(-1)
    mask = torch.ones(Tq, Tk, dtype=torch.bool) if allowed is None else allowed
    mask, qs, ks, vs = mask.expand(B, H, Tq, Tk).tolist(), q.tolist(), k.tolist(), v.tolist()
    out = [[[[0.0] * Dv for _ in range(Tq)] for _ in range(H)] for _ in range(B)]
    for b in range(B):
        for h in range(H):
            for i in range(Tq):
                keys = [j for j in range(Tk) if mask[b][h][i][j]]
                if not keys:
                    continue
                s = [sum(qs[b][h][i][c] * ks[b][h][j][c] for c in range(D)) / math.sqrt(D) for j in keys]
                w = [math.exp(x - max(s)) for x in s]
                p = [wj / sum(w) for wj in w]
                out[b][h][i] = [sum(pj * vs[b][h][j][c] for pj, j in zip(p, keys)) for c in range(Dv)]
    return torch.tensor(out, dtype=F64)


def _attend(attention, case, **kwargs):
    """attention on copies of the case's tensors, checked for shape and dtype."""
    q, k, v = case["q"], case["k"], case["v"]
    out = attention(q.clone(), k.clone(), v.clone(), case["allowed"], **kwargs)
    expect_tensor(out, tuple(q.shape[:3]) + (v.size(-1),), F64, "attention")
    return out


def _worst(diff) -> tuple[int, ...]:
    """Where the largest difference is (NaN counts as the largest)."""
    diff = torch.nan_to_num(diff, nan=math.inf)
    return tuple(int(x) for x in torch.nonzero(diff == diff.max())[0])


def _at(b: int, h: int, case) -> str:
    return f" (batch {b}, head {h})" if case["q"].size(0) * case["q"].size(1) > 1 else ""


def _weights(attention, q, k, allowed=None):
    """Probe: with v = the identity, the output rows are the attention weights themselves."""
    B, H, Tk = k.size(0), k.size(1), k.size(2)
    w = attention(q.clone(), k.clone(), torch.eye(Tk, dtype=F64).expand(B, H, Tk, Tk).clone(), allowed)
    expect_tensor(w, (B, H, q.size(2), Tk), F64, "attention(q, k, v = identity)")
    return w


@check("attention(q, k, v, allowed) equals softmax(q k^T / sqrt(d), masked to `allowed`) v computed one "
       "query at a time (zeros for a query that sees no key), in the input's dtype", case=attention_cases(),
       examples=PINNED_ATTENTION)
def matches_the_naive_oracle(attention, case):
    out, ref = _attend(attention, case), naive_attention(case["q"], case["k"], case["v"], case["allowed"])
    diff = (out - ref).abs()
    if not diff.max() <= 1e-9:
        b, h, i, _ = _worst(diff)
        raise Violation(f"output[{b}, {h}, {i}] = {fmt(out[b, h, i])}, the oracle gives "
                        f"{fmt(ref[b, h, i])}")


@check("batches and heads are independent: each (batch, head) slice gives what it gives alone, and a "
       "(Tq, Tk) mask applies to every batch and head", case=attention_cases(batched=True),
       examples=PINNED_ATTENTION[2:])
def batches_and_heads_are_independent(attention, case):
    q, k, v, allowed = case["q"], case["k"], case["v"], case["allowed"]
    out = _attend(attention, case)
    for b in range(q.size(0)):
        for h in range(q.size(1)):
            one = slice(b, b + 1), slice(h, h + 1)
            mask = allowed if allowed is None or allowed.dim() == 2 else allowed[b:b + 1]
            alone = attention(q[one].clone(), k[one].clone(), v[one].clone(), mask)
            if not torch.allclose(out[b, h], alone[0, 0], atol=1e-12, rtol=0, equal_nan=True):
                diff = torch.nan_to_num((out[b, h] - alone[0, 0]).abs(), nan=math.inf)
                ref = naive_attention(q[one], k[one], v[one], mask if mask is None or mask.dim() == 2 else mask)
                which = "in the batch" if (alone[0, 0] - ref[0, 0]).abs().max() <= 1e-9 else "alone"
                raise Violation(f"batch {b}, head {h} of {q.size(0)} x {q.size(1)}: the output differs by up to "
                                f"{diff.max():.3g} between computing this slice in the batch and alone, and it is "
                                f"wrong {which}: each (batch, head) must only use its own q, k and v (k.transpose("
                                "-2, -1), not .T or .transpose(0, 1); a (Tq, Tk) mask broadcast to every slice)")


@check("the scores are q·k / sqrt(d) with d = q.size(-1), the head size",
       case=attention_cases(mask="none", min_keys=2, min_d=2))
def scores_are_scaled_by_one_over_sqrt_d(attention, case):
    q, k = case["q"], case["k"]
    d = q.size(-1)
    w, scores = _weights(attention, q, k), q @ k.transpose(-2, -1)
    want = torch.softmax(scores / math.sqrt(d), dim=-1)
    if not (w - want).abs().max() <= 1e-9:
        b, h, i, _ = _worst((w - want).abs())
        why = ""
        for scale, label in [(1.0, "softmax(q·k): the scores are not divided by sqrt(d)"),
                             (1.0 / d, "softmax(q·k / d): divided by d instead of sqrt(d)"),
                             (k.size(2) ** -0.5, "softmax(q·k / sqrt(Tk)): divided by sqrt(number of keys)")]:
            if torch.allclose(w, torch.softmax(scores * scale, dim=-1), atol=1e-9, rtol=0):
                why = f"; yours are {label}"
        raise Violation(f"with d = {d}, query {i}'s weights{_at(b, h, case)} are {fmt(w[b, h, i])}, "
                        f"softmax(q·k / sqrt(d)) gives {fmt(want[b, h, i])}{why}")


@check("softmax runs over the keys: each query's attention weights (probed with v = identity) are "
       ">= 0 and sum to 1", case=attention_cases(mask="visible"))
def weights_over_the_keys_sum_to_one(attention, case):
    w = _weights(attention, case["q"], case["k"], case["allowed"])
    sums = w.sum(dim=-1)
    for b, h, i in torch.nonzero(torch.nan_to_num((sums - 1).abs(), nan=1.0) > 1e-9).tolist()[:1]:
        raise Violation(f"query {i}'s weights{_at(b, h, case)} {fmt(w[b, h, i])} sum to "
                        f"{sums[b, h, i]:.4g}, not 1: softmax must normalise over the keys (the last axis), "
                        "after masking")
    for b, h, i, j in torch.nonzero(w < -1e-12).tolist()[:1]:
        raise Violation(f"query {i}'s weight on key {j}{_at(b, h, case)} is {w[b, h, i, j]:.4g} < 0")


def _perturbed(case, t: int) -> Inputs:
    k, v = case["k"].clone(), case["v"].clone()
    k[:, :, t] += 2.0
    v[:, :, t] -= 3.0
    return Inputs(case, k=k, v=v)


def _change(attention, case, t: int, **kwargs):
    """How much each query's output moves when token t's key and value are perturbed: (B, H, Tq)."""
    moved = _attend(attention, _perturbed(case, t), **kwargs) - _attend(attention, case, **kwargs)
    return torch.nan_to_num(moved.abs().amax(-1), nan=math.inf)


@check("a masked key gets no weight: perturbing the key and value of a position that query i may not see "
       "leaves query i's output unchanged", case=attention_cases(mask="any"))
def masked_keys_get_no_weight(attention, case):
    hidden = ~case["allowed"].expand(*case["q"].shape[:3], case["k"].size(2))
    for j in range(case["k"].size(2)):
        change = _change(attention, case, j)
        for b, h, i in torch.nonzero(hidden[..., j] & (change > 1e-12)).tolist()[:1]:
            raise Violation(f"query {i}'s output{_at(b, h, case)} changed by {change[b, h, i]:.3g} when key "
                            f"{j}, which it may not see, was perturbed: a masked key still gets weight")


@check("with causal=True, position p's output does not change when a later token's key and value are "
       "perturbed (the queries are the last Tq of the Tk positions)",
       case=attention_cases(mask="none", causal=True))
def causal_hides_the_future(attention, case):
    tq, tk = case["q"].size(2), case["k"].size(2)
    for t in range(tk):
        for b, h, i in torch.nonzero(_change(attention, case, t, causal=True) > 1e-12).tolist():
            if t > i + tk - tq:
                raise Violation(f"position {i + tk - tq} changed when token {t} was perturbed"
                                f"{_at(b, h, case)}: the mask lets a query see the future")


@st.composite
def fully_masked_cases(draw):
    """A (Tq, Tk) mask with at least one row all False."""
    case = draw(attention_cases(mask="none"))
    tq, tk = case["q"].size(2), case["k"].size(2)
    bits = draw(st.lists(st.booleans(), min_size=tq * tk, max_size=tq * tk))
    case["allowed"] = torch.tensor(bits, dtype=torch.bool).reshape(tq, tk)
    case["allowed"][draw(st.integers(0, tq - 1))] = False
    return case


@check("a query that may see no key (a fully masked row) gets zeros, never NaN", case=fully_masked_cases())
def fully_masked_row_gives_zeros(attention, case):
    out = _attend(attention, case)
    for i in torch.nonzero(~case["allowed"].any(dim=-1)).flatten().tolist():
        row = out[0, 0, i]
        if not (row.abs() <= 1e-12).all():
            nan = " (NaN: a softmax over a row of -inf divides 0 by 0)" if row.isnan().any() else ""
            raise Violation(f"query {i} may see no key, and its output is {fmt(row)}{nan}; expected zeros")


wide = st.integers(-400, 400).map(float)  # scores far beyond +-30 and below any "large negative" fill value


def _wide_why(attention, case, b: int, h: int, i: int, out) -> str:
    """Why a row is wrong for wide scores only: a masked key that got weight (probed with v = identity), or a
    softmax that is not shifted by the row maximum (NaN or inf, or weights off while no masked key has any)."""
    if not out[b, h, i].isfinite().all():
        return (" (NaN or inf" + nan_note(out[b, h, i], what="the row") + ": exp() of an unshifted score "
                "overflows; subtract each row's maximum score before exp())")
    w = _weights(attention, case["q"], case["k"], case["allowed"])[b, h, i]
    allowed = case["allowed"] if case["allowed"] is not None else torch.ones((), dtype=torch.bool)
    hidden = ~allowed.expand(*case["q"].shape[:3], case["k"].size(2))[b, h, i]
    if w.isfinite().all() and (w[hidden].abs() > 1e-12).any():
        return (": a masked key got weight, so the fill value is not low enough for these scores (use "
                "torch.finfo(dtype).min or -inf)")
    return (f": no masked key got weight, but query {i}'s weights are {fmt(w)}, summing to {w.sum().item():.4g}: "
            "exp() of scores this large overflows (or underflows to 0) unless each row is shifted by its maximum "
            "before exp(); a NaN that was replaced afterwards is still wrong")


@check("with wide values (scores up to about 1e5 in size) the output still equals the oracle: the softmax is "
       "shifted by the row maximum, and a masked key stays hidden whatever the visible scores are",
       case=attention_cases(mask="any", elements=wide), max_examples=60)
def wide_scores_stay_exact(attention, case):
    out, ref = _attend(attention, case), naive_attention(case["q"], case["k"], case["v"], case["allowed"])
    diff = (out - ref).abs() / (1 + ref.abs())
    if not diff.max() <= 1e-9:
        b, h, i, _ = _worst(diff)
        tame = Inputs(case, q=case["q"] / 100, k=case["k"] / 100)  # the same case with scores 1e4 times smaller
        tame_ok = (_attend(attention, tame) - naive_attention(tame["q"], tame["k"], tame["v"], tame["allowed"])
                   ).abs().max() <= 1e-9
        why = "" if not tame_ok else _wide_why(attention, case, b, h, i, out)
        raise Violation(f"output[{b}, {h}, {i}] = {fmt(out[b, h, i])}, the oracle gives {fmt(ref[b, h, i])}{why}")


@check("float32 and float16 inputs give an output of the same dtype that matches the float64 oracle (to the "
       "dtype's precision), with zeros for a fully masked row and no NaN",
       case=attention_cases(mask="any"), dtype=st.sampled_from([torch.float32, torch.float16]), max_examples=40)
def float32_and_float16_keep_their_dtype(attention, case, dtype):
    q, k, v = (case[name].to(dtype) for name in "qkv")
    out = attention(q, k, v, case["allowed"])
    expect_tensor(out, tuple(q.shape[:3]) + (v.size(-1),), dtype, f"attention on {dtype} inputs")
    ref = naive_attention(q.double(), k.double(), v.double(), case["allowed"])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    diff = (out.double() - ref).abs()
    if not diff.max() <= tolerance * (1 + ref.abs().max()):
        b, h, i, _ = _worst(diff)
        raise Violation(f"in {dtype}, output[{b}, {h}, {i}] = {fmt(out[b, h, i].double())}, the oracle gives "
                        f"{fmt(ref[b, h, i])}" + (" (NaN)" if out[b, h, i].isnan().any() else ""))


# ---- 0.2 the causal mask ----------------------------------------------------------------------------------
# corner cases: n_queries = 1 without a cache (a 1 x 1 mask); one query after many cached keys (decode: a row of
# True); n_keys = n_queries (no cache, n_keys given); n_keys left out; device='meta'. Pinned: the first three.
PINNED_MASKS = [dict(n_queries=1, n_cached=None), dict(n_queries=1, n_cached=7), dict(n_queries=5, n_cached=0)]

def _mask(causal_mask, n_queries: int, n_cached):
    """causal_mask(n_queries) when n_cached is None, else causal_mask(n_queries, n_queries + n_cached)."""
    if n_cached is None:
        m, n_keys, call = causal_mask(n_queries), n_queries, f"causal_mask({n_queries})"
    else:
        n_keys = n_queries + n_cached
        m, call = causal_mask(n_queries, n_keys), f"causal_mask({n_queries}, {n_keys})"
    expect_tensor(m, (n_queries, n_keys), torch.bool, call)
    return m, call, n_keys - n_queries


@check("causal_mask(n_queries, n_keys) is a boolean tensor of shape (n_queries, n_keys); n_keys defaults "
       "to n_queries", n_queries=st.integers(1, 40), n_cached=st.none() | st.integers(0, 40), max_examples=100,
       examples=PINNED_MASKS)
def shape_and_dtype(causal_mask, n_queries, n_cached):
    _mask(causal_mask, n_queries, n_cached)


@check("every query sees its own position: mask[i, i] is True", n_queries=st.integers(1, 40), max_examples=100)
def each_query_sees_itself(causal_mask, n_queries):
    m, call, _ = _mask(causal_mask, n_queries, None)
    for i in range(n_queries):
        if not m[i, i]:
            raise Violation(f"{call}[{i}, {i}] is False: query {i} cannot see its own position (off by one "
                            "on the diagonal)")


@check("no query sees the future: mask[i, j] is False for every key j > i", n_queries=st.integers(1, 40),
       max_examples=100)
def no_query_sees_the_future(causal_mask, n_queries):
    m, call, _ = _mask(causal_mask, n_queries, None)
    for i, j in torch.nonzero(m).tolist():
        if j > i:
            raise Violation(f"{call}[{i}, {j}] is True: query {i} sees key {j}, a later position: the mask "
                            "lets a query see the future")


@check("every query sees its whole past: mask[i, j] is True for every key j < i", n_queries=st.integers(1, 40),
       max_examples=100)
def every_query_sees_its_past(causal_mask, n_queries):
    m, call, _ = _mask(causal_mask, n_queries, None)
    for i, j in torch.nonzero(~m).tolist():
        if j < i:
            raise Violation(f"{call}[{i}, {j}] is False: query {i} cannot see key {j}, an earlier position")


@check("with n_keys > n_queries (a KV cache) the queries are the last positions: query i is position "
       "i + (n_keys - n_queries) and sees exactly the keys up to it",
       n_queries=st.integers(1, 40), n_cached=st.integers(1, 40), max_examples=100, examples=PINNED_MASKS[1:2])
def queries_are_the_last_positions_with_a_cache(causal_mask, n_queries, n_cached):
    m, call, c = _mask(causal_mask, n_queries, n_cached)
    want = torch.tensor([[j <= i + c for j in range(n_queries + c)] for i in range(n_queries)])
    for i in range(n_queries):
        if not torch.equal(m[i], want[i]):
            raise Violation(f"with {c} cached keys query {i} is position {i + c}: {call}[{i}] should be "
                            f"{fmt(want[i].int())}, yours is {fmt(m[i].int())} (1 = visible)")


@check("the mask is built on `device`: causal_mask(n, device='meta') is a meta tensor (the argument is used, "
       "not ignored)", n_queries=st.integers(1, 5))
def built_on_the_given_device(causal_mask, n_queries):
    m = causal_mask(n_queries, device="meta")
    if type(m) is not torch.Tensor or m.device.type != "meta":
        where = m.device if isinstance(m, torch.Tensor) else type(m).__name__
        raise Violation(f"causal_mask({n_queries}, device='meta') returned a mask on {where}: build it on "
                        "`device` (torch.arange(..., device=device)), so a GPU model gets a GPU mask")


# ---- 0.3 one BPE merge step -------------------------------------------------------------------------------
# corner cases: the empty list; one token; the pair in the last two places; a run of the pair's first token
# (overlaps, taken from the left); a pair (a, a); equal ids that are different int objects; ids past a byte.
# Pinned: HARD_MERGES, and merge_pair([], ...) / merge_pair([a], ...) below.

# a small alphabet so that pairs occur, with one-, two- and three-digit ids and ids past a byte
token_ids = st.sampled_from([0, 1, 2, 3, 11, 12, 21, 255, 256, 300])
ids_lists = st.lists(token_ids, max_size=16)
pairs = st.tuples(token_ids, token_ids)
new_ids = st.integers(256, 1000)
HARD_MERGES = [dict(ids=[1, 12, 11, 1], pair=(1, 1), new_id=300),  # "1 12 11 1" contains "1 1" twice
               dict(ids=[], pair=(1, 2), new_id=256), dict(ids=[3], pair=(3, 3), new_id=256),
               dict(ids=[2, 2, 2, 2, 2], pair=(2, 2), new_id=256),  # a run of five: two merges and a leftover
               dict(ids=[300, 256, 300, 256], pair=(300, 256), new_id=999)]  # ids past a byte


def naive_merge(ids, pair, new_id):
    """str.replace on a string with one character per id: leftmost, non-overlapping occurrences."""
    enc = lambda xs: "".join(chr(0x1000 + x) for x in xs)  # noqa: E731
    return [ord(c) - 0x1000 for c in enc(ids).replace(enc(pair), chr(0x1000 + new_id))]


def _fresh_ints(values):
    """Equal ints as other objects (CPython shares only -5..256): an `is` comparison of ids fails on them."""
    return [int(str(v)) for v in values]


def _merged(merge_pair, ids, pair, new_id):
    arg = _fresh_ints(ids)
    got = merge_pair(arg, tuple(_fresh_ints(pair)), new_id)
    if type(got) is not list or any(type(x) is not int for x in got):
        raise Violation(f"merge_pair({ids}, {pair}, {new_id}) returned {got!r} of type {type(got).__name__}; "
                        "expected a plain list of ints")
    if got is arg:
        raise Violation(f"merge_pair({ids}, {pair}, {new_id}) returned its input list itself; the docstring asks "
                        "for a new list (a caller that edits the result would edit its ids)")
    return got


@check("every adjacent (a, b) becomes new_id and everything else is kept in order, occurrences taken from "
       "the left without overlap", ids=ids_lists, pair=pairs, new_id=new_ids, max_examples=300,
       examples=HARD_MERGES)
def replaces_every_occurrence_left_to_right(merge_pair, ids, pair, new_id):
    got, want = _merged(merge_pair, ids, pair, new_id), naive_merge(ids, pair, new_id)
    if got != want:
        raise Violation(f"merge_pair({ids}, {pair}, {new_id}) returned {got}, expected {want}")


@check("overlapping occurrences are taken from the left: a run of n copies of a with pair (a, a) gives "
       "n // 2 new ids, then one a if n is odd", a=st.integers(0, 3), n=st.integers(2, 7), new_id=new_ids)
def overlapping_occurrences_taken_from_the_left(merge_pair, a, n, new_id):
    got, want = _merged(merge_pair, [a] * n, (a, a), new_id), [new_id] * (n // 2) + [a] * (n % 2)
    if got != want:
        raise Violation(f"merge_pair({[a] * n}, {(a, a)}, {new_id}) returned {got}, expected {want}: after a "
                        "merge the scan continues after both merged tokens")


@check("without an occurrence of the pair the output equals the input (a new list)",
       ids=ids_lists, pair=pairs, new_id=new_ids, max_examples=200)
def no_occurrence_returns_an_equal_list(merge_pair, ids, pair, new_id):
    assume(all((x, y) != tuple(pair) for x, y in zip(ids, ids[1:])))
    got = _merged(merge_pair, ids, pair, new_id)
    if got != ids:
        raise Violation(f"merge_pair({ids}, {pair}, {new_id}) returned {got}; the pair does not occur, so "
                        "the output must equal the input")


@check("the end of the list is handled: a pair in the last two places is merged, and a last token that is "
       "not merged is kept", prefix=ids_lists, pair=pairs, last=token_ids, new_id=new_ids, max_examples=200)
def the_end_of_the_list_is_handled(merge_pair, prefix, pair, last, new_id):
    for ids in (prefix + list(pair), prefix + [last]):
        got, want = _merged(merge_pair, ids, pair, new_id), naive_merge(ids, pair, new_id)
        if got != want:
            raise Violation(f"merge_pair({ids}, {pair}, {new_id}) returned {got}, expected {want}")


@check("the input list is not modified (the result is a new list)", ids=ids_lists, pair=pairs, new_id=new_ids)
def the_input_is_not_modified(merge_pair, ids, pair, new_id):
    arg = list(ids)
    merge_pair(arg, tuple(pair), new_id)
    if arg != ids:
        raise Violation(f"merge_pair({ids}, {pair}, {new_id}) changed its input list to {arg}")


# ---- 0.4 the most frequent pair ---------------------------------------------------------------------------
# corner cases: one pair; ties on the count (the smallest pair wins), ties on the first element, a tie where the
# smallest pair is neither the first nor the last inserted, (9, 5) < (10, 1) as numbers. Pinned: HARD_COUNTS.

pair_counts = st.dictionaries(st.tuples(st.integers(0, 20), st.integers(0, 20)), st.integers(1, 4),
                              min_size=1, max_size=8)
HARD_COUNTS = [dict(counts={(2, 9): 3, (2, 7): 3, (5, 1): 1}),  # a tie on the first element
               dict(counts={(10, 1): 2, (9, 5): 2}),  # (9, 5) < (10, 1) as numbers, not as strings
               dict(counts={(3, 4): 1, (1, 20): 5, (1, 3): 5}),
               dict(counts={(4, 4): 2, (0, 7): 2, (6, 0): 2}),  # the smallest of three tied pairs is in the middle
               dict(counts={(7, 7): 1})]


def _most_frequent(most_frequent_pair, counts):
    arg = dict(counts)
    got = most_frequent_pair(arg)
    if type(got) is not tuple or any(type(x) is not int for x in got) or got not in counts:
        raise Violation(f"most_frequent_pair({counts}) returned {got!r}, which is not one of the pairs")
    return got, arg


def _top(counts) -> tuple[int, list]:
    best = max(counts.values())
    return best, sorted(p for p, c in counts.items() if c == best)


@check("the result is a pair with the largest count", counts=pair_counts, max_examples=200)
def returns_a_pair_with_the_largest_count(most_frequent_pair, counts):
    got, _ = _most_frequent(most_frequent_pair, counts)
    best, top = _top(counts)
    if counts[got] != best:
        raise Violation(f"most_frequent_pair({counts}) returned {got} with count {counts[got]}; the largest "
                        f"count is {best} ({', '.join(map(str, top))})")


@check("ties go to the smallest pair: among the pairs with the largest count, the result is the smallest "
       "(a, b)", counts=pair_counts, max_examples=200,
       examples=HARD_COUNTS)
def ties_go_to_the_smallest_pair(most_frequent_pair, counts):
    got, _ = _most_frequent(most_frequent_pair, counts)
    best, top = _top(counts)
    if got != top[0]:
        raise Violation(f"most_frequent_pair({counts}) returned {got}; the pairs {', '.join(map(str, top))} "
                        f"have the largest count {best}, and the tie goes to the smallest, {top[0]}")


@check("the result does not depend on the order in which the pairs were inserted into the dict",
       counts=pair_counts, max_examples=200, examples=HARD_COUNTS)
def does_not_depend_on_insertion_order(most_frequent_pair, counts):
    items = list(counts.items())
    orders = {"as given": items, "reversed": items[::-1], "sorted": sorted(items)}
    results = {order: _most_frequent(most_frequent_pair, dict(items))[0] for order, items in orders.items()}
    if len(set(results.values())) > 1:
        got = ", ".join(f"{r} (insertion order {o})" for o, r in results.items())
        raise Violation(f"most_frequent_pair({counts}) returned {got}: a tie must not be decided by the "
                        "dict's order")


@check("the counts dict is not modified", counts=pair_counts)
def the_counts_are_not_modified(most_frequent_pair, counts):
    _, arg = _most_frequent(most_frequent_pair, counts)
    if arg != counts:
        raise Violation(f"most_frequent_pair({counts}) changed its input to {arg}")


# ---- 0.5 sampling with temperature and top-k --------------------------------------------------------------
# corner cases: top_k = 1 (greedy through the filter); top_k = |V| and above; ties at the k-th logit
# (ties_at_the_kth_logit_are_kept); rows with different k-th logits in one batch (each_row_uses_its_own_top_k);
# temperature 0 with ties; huge and very negative logits (extreme_logits_are_sampled_stably); |V| = 2.

# False rejection: each token's frequency must lie within 6 standard errors (+ 0.002) of its probability; a correct
# sampler misses one bound with probability < 2e-9 (normal tail), a check of at most 3 rows x 6 tokens < 4e-8.
N_DRAWS = 20_000
temperatures = st.sampled_from([1.0, 0.5, 2.0, 0.25, 0.8, 1.5, 4.0])


@st.composite
def logits_and_k(draw):
    v = draw(st.integers(2, 6))
    return Inputs(logits=draw(st.lists(halves, min_size=v, max_size=v)), top_k=draw(st.integers(1, v)))


def logit_rows(v: int):
    """Logits (B, |V|) as nested lists: 1 to 3 rows of v multiples of 1/2."""
    return st.lists(st.lists(halves, min_size=v, max_size=v), min_size=1, max_size=3)


def _draw(sample_next_token, rows, temperature, top_k, seed: int):
    """One call on a copy of rows (B, |V|) with a generator seeded `seed`; checks it returns (B, 1) ids."""
    rows = rows.clone()
    generator = torch.Generator().manual_seed(seed)
    out = sample_next_token(rows, temperature=temperature, top_k=top_k, generator=generator)
    expect_tensor(out, (rows.size(0), 1), torch.int64, "sample_next_token")
    if out.numel() and (out.min() < 0 or out.max() >= rows.size(-1)):
        raise Violation(f"sample_next_token drew token {int(out.max())}, outside the vocabulary "
                        f"0..{rows.size(-1) - 1}")
    return out


def _expected_probs(logits, temperature, top_k):
    if top_k is None:
        return torch.softmax(logits / temperature, dim=-1)
    kth = torch.sort(logits, descending=True).values[top_k - 1]
    return torch.softmax((logits / temperature).masked_fill(logits < kth, -math.inf), dim=-1)


def _compare_frequencies(out, logits, temperature, top_k):
    n = out.numel()
    p = _expected_probs(logits, temperature, top_k)
    freq = torch.bincount(out.flatten(), minlength=logits.numel()).to(F64) / n
    tolerance = 6 * torch.sqrt(p * (1 - p) / n) + 2e-3
    setting = f"T = {temperature:.3g}, top_k = {top_k}"
    for j in range(logits.numel()):
        if p[j] == 0 and freq[j] > 0:
            raise Violation(f"with logits {fmt(logits)} and {setting}, token {j} was drawn "
                            f"{round(float(freq[j]) * n)} times; only the top_k largest logits (and ties "
                            "with the k-th) may be drawn")
    if ((freq - p).abs() > tolerance).any():
        why = ""
        at_t1 = _expected_probs(logits, 1.0, top_k)
        if temperature != 1 and torch.allclose(freq, at_t1, atol=float(tolerance.max())):
            why = "; yours match T = 1: the temperature has no effect"
        elif freq.max() == 1.0:
            why = "; every draw is the same token: sample, do not take the argmax"
        raise Violation(f"over {n} draws from logits {fmt(logits)} with {setting}, the token frequencies "
                        f"are {fmt(freq)}; softmax(logits / T) over the kept tokens gives {fmt(p)}{why}")


@check("temperature 0 is greedy decoding: each row's token is an argmax of its logits",
       logits=logit_rows(4), top_k=st.none() | st.integers(1, 4))
def temperature_zero_is_argmax(sample_next_token, logits, top_k):
    logits = torch.tensor(logits, dtype=F64)
    out = _draw(sample_next_token, logits, 0.0, top_k, 0)
    for b in range(logits.size(0)):
        t = int(out[b, 0])
        if logits[b, t] != logits[b].max():
            raise Violation(f"row {b}: logits {fmt(logits[b])} at temperature 0 gave token {t}; greedy "
                            f"decoding takes the argmax, token {int(logits[b].argmax())}")


@check("draws are token ids: an int64 tensor of shape (B, 1) with values in [0, |V|)",
       logits=logit_rows(5), temperature=temperatures, top_k=st.none() | st.integers(1, 5), seed=seeds)
def draws_are_token_ids_of_shape_b_by_1(sample_next_token, logits, temperature, top_k, seed):
    _draw(sample_next_token, torch.tensor(logits, dtype=F64), temperature, top_k, seed)


@check("without top_k, the tokens are drawn with probabilities softmax(logits / T): over many draws each "
       "token's frequency matches", logits=st.lists(halves, min_size=2, max_size=6),
       temperature=temperatures, seed=seeds)
def frequencies_match_softmax_of_logits_over_t(sample_next_token, logits, temperature, seed):
    logits = torch.tensor(logits, dtype=F64)
    out = _draw(sample_next_token, logits.repeat(N_DRAWS, 1), temperature, None, seed)
    _compare_frequencies(out, logits, temperature, None)


@check("with top_k = k only the k largest logits can be drawn, with probabilities softmax(logits / T) "
       "renormalised over them", case=logits_and_k(), temperature=temperatures, seed=seeds)
def top_k_keeps_the_k_largest_renormalised(sample_next_token, case, temperature, seed):
    logits, top_k = torch.tensor(case["logits"], dtype=F64), case["top_k"]
    out = _draw(sample_next_token, logits.repeat(N_DRAWS, 1), temperature, top_k, seed)
    _compare_frequencies(out, logits, temperature, top_k)


@check("each row is filtered by its own k-th largest logit: rows with different logits in one batch keep "
       "different tokens", perm=st.permutations([0.0, 1.0, 2.0, 3.0, 4.0]), top_k=st.integers(1, 4), seed=seeds)
def each_row_uses_its_own_top_k(sample_next_token, perm, top_k, seed):
    rows = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0], list(perm)], dtype=F64).repeat_interleave(500, dim=0)
    out = _draw(sample_next_token, rows, 1.0, top_k, seed)
    for b in (0, 500):
        kth = sorted(rows[b].tolist(), reverse=True)[top_k - 1]
        drawn = sorted(set(out[b:b + 500].flatten().tolist()))
        bad = [t for t in drawn if rows[b, t] < kth]
        if bad:
            raise Violation(f"row {fmt(rows[b])} with top_k = {top_k} drew token {bad[0]} (logit {rows[b, bad[0]]:.3g}), "
                            f"below its own k-th largest logit {kth:.3g}: the threshold must be taken per row "
                            "(torch.topk(..., dim=-1) keeps one value per row), not from the first row")


@check("top_k larger than the vocabulary keeps every token (no error): it is the same as top_k=None",
       v=st.integers(2, 6), extra=st.integers(1, 50), seed=seeds)
def top_k_larger_than_the_vocabulary_keeps_every_token(sample_next_token, v, extra, seed):
    out = _draw(sample_next_token, torch.zeros(2000, v, dtype=F64), 1.0, v + extra, seed)
    # False rejection: a correct sampler misses one of v <= 6 equal tokens in 2000 draws with P <= 6 (5/6)^2000 < 1e-150
    counts = torch.bincount(out.flatten(), minlength=v)
    for j in (counts == 0).nonzero().flatten().tolist()[:1]:
        raise Violation(f"from equal logits over {v} tokens with top_k = {v + extra} > |V|, token {j} never came "
                        "up in 2000 draws")


@check("huge or very negative logits (e.g. 1000, 999, 998 or -30000, ...) and float32 logits give the right "
       "frequencies, not NaN: the softmax is computed stably, and hidden tokens get probability exactly 0")
def extreme_logits_are_sampled_stably(sample_next_token):
    for values, dtype, temperature, top_k in [([1000.0, 999.0, 998.0], F64, 1.0, None),
                                              ([100.0, 99.0, 98.0], torch.float32, 0.5, None),
                                              ([-30000.0, -30001.0, -30002.0], F64, 1.0, 2),
                                              ([-30000.0, -30001.0, -30002.0], F64, 1.0, 1)]:
        logits = torch.tensor(values, dtype=dtype)
        out = _draw(sample_next_token, logits.repeat(4000, 1), temperature, top_k, 0)
        _compare_frequencies(out, logits.double(), temperature, top_k)


@check("tokens tied with the k-th largest logit are kept (the docstring's tie rule)")
def ties_at_the_kth_logit_are_kept(sample_next_token):
    for values, top_k in [([2.0, 1.0, 1.0, 0.0], 2), ([0.0, 3.0, 3.0, 3.0, 1.0], 1)]:
        logits = torch.tensor(values, dtype=F64)
        counts = torch.bincount(_draw(sample_next_token, logits.repeat(4000, 1), 1.0, top_k, 0).flatten(),
                                minlength=len(values)).tolist()
        kth = sorted(values, reverse=True)[top_k - 1]
        # False rejection: a kept token has probability >= 0.21 here, so it misses 4000 draws with P < 1e-400
        if any((value >= kth) != (count > 0) for value, count in zip(values, counts)):
            raise Violation(f"logits {values} with top_k = {top_k}, 4000 draws: token counts {counts}; every "
                            f"token whose logit is >= the {top_k}-th largest ({kth}) must be drawn, no other")


@check("the draws come from `generator`: generators seeded alike give the same tokens whatever the global "
       "random state, different seeds give different tokens, with or without top_k", v=st.integers(3, 6),
       top_k=st.none() | st.integers(2, 6), seed=seeds)
def uses_the_passed_generator(sample_next_token, v, top_k, seed):
    logits = torch.zeros(200, v, dtype=F64)
    first = _draw(sample_next_token, logits, 1.0, top_k, seed)
    torch.rand(3)  # move the global random state on
    if not torch.equal(first, _draw(sample_next_token, logits, 1.0, top_k, seed)):
        raise Violation(f"two calls with torch.Generator().manual_seed({seed}) drew different tokens: draw "
                        "with `generator` (torch.multinomial(..., generator=generator)), not the global RNG")
    if torch.equal(first, _draw(sample_next_token, logits, 1.0, top_k, seed + 1)):
        raise Violation(f"seeds {seed} and {seed + 1} drew the same 200 tokens from equal logits: the draws "
                        "do not depend on `generator`")


@check("top_k=None keeps every token: from equal logits every token comes up", v=st.integers(2, 8),
       temperature=temperatures, seed=seeds)
def top_k_none_keeps_every_token(sample_next_token, v, temperature, seed):
    out = _draw(sample_next_token, torch.zeros(2000, v, dtype=F64), temperature, None, seed)
    counts = torch.bincount(out.flatten(), minlength=v)
    for j in (counts == 0).nonzero().flatten().tolist()[:1]:
        raise Violation(f"from equal logits over {v} tokens with top_k=None, token {j} never came up in 2000 "
                        "draws")


# ---- 0.6 BPE training: the merge loop ---------------------------------------------------------------------
# corner cases: empty text; vocab_size = 256 (no merge); no pair repeats; a tie in the count (the smallest pair is
# merged first); a chunk that occurs k times; pairs across a chunk boundary; a run "aaaa" (overlaps). Pinned:
# the examples below ("aaabdaaabac": ties; "ab ab cd cd": a tie between chunks; "": empty) and the checks' texts.

def naive_train_bpe(text: str, vocab_size: int, pattern: str) -> list:
    """The algorithm literally: cut into chunks, then per merge recount every adjacent pair of every chunk
    occurrence, take the most frequent (ties to the smallest pair), stop below a count of 2, replace it."""
    words = [list(chunk.encode("utf-8")) for chunk in regex.findall(pattern, text)]
    merges = []
    while 256 + len(merges) < vocab_size:
        counts = Counter(pair for word in words for pair in zip(word, word[1:]))
        if not counts:
            break
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        if counts[best] < 2:
            break
        merges.append(best)
        words = [naive_merge(word, best, 255 + len(merges)) for word in words]
    return merges


PATTERNS = {"GPT2_PATTERN": GPT2_PATTERN, "words and spaces": r"\S+|\s+", "single characters": r"(?s)."}
# a small alphabet makes pairs repeat; multi-byte characters give pairs of bytes above 127
bpe_texts = st.text(alphabet="ab ab c1 2.\né日", max_size=60)


def _merges(train_bpe, text, vocab_size, pattern):
    got = train_bpe(text, vocab_size, pattern)
    if type(got) is not list or any(type(m) is not tuple or len(m) != 2 or any(type(i) is not int for i in m)
                                    for m in got):
        raise Violation(f"train_bpe({text!r}, {vocab_size}) returned {got!r}; expected a plain list of "
                        "(int, int) tuples, merge i being the pair that token 256 + i replaces")
    return got


def _first_difference(got, want) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    if i < min(len(got), len(want)):
        return f"merge {i} is {got[i]}, expected {want[i]}"
    if len(got) > len(want):
        return f"{len(got)} merges, expected {len(want)}: merge {i} = {got[i]} should not be there"
    return f"only {len(got)} merges, expected {len(want)}: the next is {want[i]}"


@check("train_bpe(text, vocab_size, pattern) returns exactly the merges of the algorithm written out (chunks by "
       "the pattern, every pair recounted after each merge, most frequent first, ties to the smallest pair, "
       "new id 256 + i, stop at vocab_size or when no pair occurs twice)",
       text=bpe_texts, vocab_size=st.integers(256, 300), pattern=st.sampled_from(list(PATTERNS)),
       max_examples=60,
       examples=[{"text": "aaabdaaabac", "vocab_size": 1000, "pattern": "GPT2_PATTERN"},
                 {"text": "ab ab cd cd", "vocab_size": 1000, "pattern": "GPT2_PATTERN"},
                 {"text": "aaaa aaaa", "vocab_size": 1000, "pattern": "words and spaces"},
                 {"text": "", "vocab_size": 300, "pattern": "GPT2_PATTERN"}])
def merges_equal_the_algorithm_written_out(train_bpe, text, vocab_size, pattern):
    got = _merges(train_bpe, text, vocab_size, PATTERNS[pattern])
    want = naive_train_bpe(text, vocab_size, PATTERNS[pattern])
    if got != want:
        raise Violation(f"train_bpe({text!r}, {vocab_size}, pattern={pattern}): {_first_difference(got, want)} "
                        f"(all of yours: {got[:8]}{' ...' if len(got) > 8 else ''})")


@check("a chunk that occurs k times counts k times, and merges never cross a chunk boundary: "
       "train_bpe(' ab' * k + ' c' + 'xy' ...) follows the chunk multiplicities",
       k=st.integers(2, 6), extra=st.integers(1, 3))
def chunk_multiplicity_and_boundaries(train_bpe, k, extra):
    # " ab" k times makes (32, a) and (a, b) k-fold; "ba" inside one chunk only once per chunk: a learner that
    # counts unique chunks once, or pairs across chunk boundaries ("b" then " "), merges something else
    text = " ab" * k + " ba" * (k - 1) + " cb" * extra
    got = _merges(train_bpe, text, 300, GPT2_PATTERN)
    want = naive_train_bpe(text, 300, GPT2_PATTERN)
    if got != want:
        raise Violation(f"train_bpe({text!r}, 300): {_first_difference(got, want)}; a chunk counts as often as "
                        "it occurs, and no pair spans two chunks")


@check("vocab_size = 256 learns nothing; training stops without error when no pair occurs twice "
       "(every pair of 'abcdef' is unique) and after vocab_size - 256 merges at most", vocab_size=st.integers(256, 270))
def stops_at_the_vocabulary_size_or_when_nothing_repeats(train_bpe, vocab_size):
    for text in ("abcdef", "ab cd ef", ""):
        got = _merges(train_bpe, text, vocab_size, GPT2_PATTERN)
        if got:
            raise Violation(f"train_bpe({text!r}, {vocab_size}) returned {got}; no pair occurs twice, so there is "
                            "nothing to merge")
    got = _merges(train_bpe, "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", vocab_size, GPT2_PATTERN)
    want = naive_train_bpe("a" * 48, vocab_size, GPT2_PATTERN)
    if got != want:
        raise Violation(f"train_bpe('a' * 48, {vocab_size}): {_first_difference(got, want)} (vocab_size counts the "
                        "256 bytes too: at most vocab_size - 256 merges)")


PYDOC_CHARS, PYDOC_VOCAB = 10_000, 384


@functools.lru_cache(maxsize=1)
def _pydoc_reference():
    text = load_text("pydoc")[:PYDOC_CHARS]
    return text, library_train_bpe(text, PYDOC_VOCAB)


@check(f"the experiment: trained on the first {PYDOC_CHARS:,} characters of the pydoc corpus with vocab_size "
       f"{PYDOC_VOCAB}, your merges equal the library's, and the tokenizer built from them compresses that text "
       "to the library's bytes per token (about 2.0, from 1.0 for raw bytes) and decodes it back exactly")
def compresses_the_pydoc_corpus(train_bpe):
    text, want = _pydoc_reference()
    got = _merges(train_bpe, text, PYDOC_VOCAB, GPT2_PATTERN)
    n_bytes = len(text.encode("utf-8"))
    try:
        tokenizer = BPETokenizer(got)
    except ValueError as err:
        raise Violation(f"BPETokenizer(your merges) refuses them: {err}") from None
    ids = tokenizer.encode(text)
    ratio, ref_ratio = n_bytes / len(ids), n_bytes / len(BPETokenizer(want).encode(text))
    if tokenizer.decode(ids) != text:
        raise Violation("the tokenizer built from your merges does not decode the corpus back to itself")
    if got != want or ratio != ref_ratio:
        raise Violation(f"your {len(got)} merges compress the text to {ratio:.4f} bytes per token, the library's "
                        f"{len(want)} to {ref_ratio:.4f}; {_first_difference(got, want)}")


EXERCISES = {
    "0.1": Exercise(
        points=4,
        hint="Attention is three steps: scores between each query and each key, a softmax that turns one "
             "query's scores into weights over the keys, and a weighted sum of the values. Where does the"
             " mask act, and what should a query that may see no key return?",
        hints=("The scores are a batched matrix product of q with k transposed on its last two axes, "
               "divided by sqrt of the head size. A hidden key must get weight exactly 0 *inside* the "
               "softmax (fill its score with a very negative number that the dtype can hold), and the "
               "softmax must stay finite for huge scores.",
               "scores = q @ k^T / sqrt(d) has shape (B, H, Tq, Tk). Hide the masked keys *before* the softmax "
               "(masked_fill; torch.finfo(dtype).min instead of -inf keeps a fully masked row finite), "
               "normalise over the keys, and give a query that sees no key zeros."),
        checks=[matches_the_naive_oracle, batches_and_heads_are_independent,
                scores_are_scaled_by_one_over_sqrt_d, weights_over_the_keys_sum_to_one,
                masked_keys_get_no_weight, causal_hides_the_future, fully_masked_row_gives_zeros,
                wide_scores_stay_exact, float32_and_float16_keep_their_dtype]),
    "0.2": Exercise(
        points=2,
        hint="Query i is position i + (n_keys - n_queries): with a KV cache the queries are the last "
             "positions. Which keys may it see?",
        hints=("Build the result from two position vectors that broadcast against each other (a column "
               "for the queries, a row for the keys), on `device`, and compare them; no loops and no "
               "stored buffer.",
               "Compare two torch.arange with broadcasting: the query positions as a column (shifted by "
               "n_keys - n_queries, so the queries are the last positions), the key positions as a row; key j "
               "is visible when j <= the query's position."),
        checks=[shape_and_dtype, each_query_sees_itself, no_query_sees_the_future, every_query_sees_its_past,
                queries_are_the_last_positions_with_a_cache, built_on_the_given_device],
        pure=True),
    "0.3": Exercise(
        points=3,
        hint="Think of one left-to-right scan that builds a new list: at each place you either see the "
             "pair or you do not.",
        hints=("When the pair starts at the current place, emit new_id and move past both tokens; "
               "otherwise copy one token and move on. Work on ids as integers, never as text.",
               "Build a new list while an index i walks through ids: if ids[i], ids[i + 1] is the pair, "
               "append new_id and jump by 2, otherwise append ids[i] and step by 1. Mind the last element, "
               "which has no right neighbour."),
        checks=[replaces_every_occurrence_left_to_right, overlapping_occurrences_taken_from_the_left,
                no_occurrence_returns_an_equal_list, the_end_of_the_list_is_handled,
                the_input_is_not_modified]),
    "0.4": Exercise(
        points=2,
        hint="Two rules: the largest count first, then, among equal counts, the smallest pair. The dict's"
             " order must not matter.",
        hints=("One min() or max() over the pairs with a key that encodes both rules; tuples compare "
               "element by element, so a count can be negated to turn 'largest' into 'smallest'.",
               "max(counts, key=counts.get) breaks ties by the dict's insertion order, not by the pair. A key "
               "function may return a tuple, and tuples compare element by element."),
        checks=[returns_a_pair_with_the_largest_count, ties_go_to_the_smallest_pair,
                does_not_depend_on_insertion_order, the_counts_are_not_modified]),
    "0.5": Exercise(
        points=4,
        hint="Greedy decoding, temperature and top-k are three separate steps; which one has to come "
             "first so that nothing divides by zero?",
        hints=("Temperature rescales the logits; top-k hides every logit below each row's own k-th "
               "largest (ties kept, and a top_k above the vocabulary hides nothing); a stable softmax "
               "gives probabilities; the draw must use `generator`, and the caller's logits must stay "
               "untouched.",
               "Temperature 0 first (greedy; no division by zero). Otherwise scale the logits by 1/T, hide "
               "every logit below the k-th largest (torch.topk gives it), turn the logits into probabilities, "
               "and draw with torch.multinomial, passing `generator`."),
        checks=[temperature_zero_is_argmax, draws_are_token_ids_of_shape_b_by_1,
                frequencies_match_softmax_of_logits_over_t, top_k_keeps_the_k_largest_renormalised,
                ties_at_the_kth_logit_are_kept, uses_the_passed_generator, top_k_none_keeps_every_token,
                each_row_uses_its_own_top_k, top_k_larger_than_the_vocabulary_keeps_every_token,
                extreme_logits_are_sampled_stably]),
    "0.6": Exercise(
        points=4,
        hint="Training is a loop around 0.3 and 0.4: count the adjacent pairs, pick one, merge it everywhere, "
             "repeat. Where are pairs counted (inside what?), how often does a chunk count, and when does "
             "the loop stop?",
        hints=("Cut the text with `pattern` into chunks and turn each into its UTF-8 bytes; a chunk that "
               "occurs k times contributes k to each of its pairs (count each distinct chunk once, with its "
               "multiplicity). After a merge the counts change: recount, or update only the chunks that "
               "held the pair.",
               "Loop while 256 + the number of merges is below vocab_size: take the most frequent pair with "
               "most_frequent_pair, stop if its count is below 2, give it the id 256 + the number of merges "
               "so far, record it, and replace it in every chunk with merge_pair. Return the list of pairs."),
        checks=[merges_equal_the_algorithm_written_out, chunk_multiplicity_and_boundaries,
                stops_at_the_vocabulary_size_or_when_nothing_repeats, compresses_the_pydoc_corpus]),
}
