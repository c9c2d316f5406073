"""Chapter 10's graded checks: retention's recurrent step, the chunkwise cross-chunk term, XPos's scale and the
decay mask D.

Each check compares the learner's function (its first argument) with an oracle written here from the equations, in
float64 with Python's own powers (never the library's code), and in float32/float16 where the dtype and the range
matter. No check draws random numbers it then tests statistically: every tolerance is a rounding bound, so a correct
answer is never rejected on luck. Known-wrong solutions: exercises/grading/mutants/ch10_retnet_xpos.md.
"""

import math

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import F64, expect_tensor, seeds

GAMMAS = (1.0, 0.96875, 0.9, 0.5, 0.1, 1e-3)  # gamma = 1 is causal linear attention, 1e-3 nearly diag(Q K^T) V
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.float16: 2e-2}  # relative to the sum of |terms|


def _randn(*shape, seed, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64) * scale).to(dtype)


def _index(t: torch.Tensor, flat: int) -> tuple[int, ...]:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), t.shape))


def _where(names, idx) -> str:
    return ", ".join(f"{n} {i}" for n, i in zip(names[-len(idx):], idx))


def expect_finite(got: torch.Tensor, want: torch.Tensor, what: str, names=("batch", "head", "token", "column"),
                  why=lambda idx: "") -> None:
    """No NaN and no inf where the oracle is finite; the first one is reported as such, with where it is."""
    g = got.detach().to(F64)
    for bad, word in ((g.isnan(), "NaN"), (g.isinf() & want.isfinite(), "inf")):
        if bad.any():
            idx = _index(g, int(bad.flatten().nonzero()[0]))
            raise Violation(f"{what} holds {int(bad.sum())} {word} entries, the first at ({_where(names, idx)}), "
                            f"where the oracle gives {float(want[idx]):.4g}{why(idx)}")


def expect_close(got: torch.Tensor, want: torch.Tensor, mag: torch.Tensor, tol: float, what: str,
                 names=("batch", "head", "token", "column"), why=lambda idx: "", atol: float = 1e-300) -> None:
    """|got - want| <= tol * mag + atol entrywise (mag: the sum of the |terms| of each entry), after
    expect_finite."""
    expect_finite(got, want, what, names, why)
    g = got.detach().to(F64)
    where = lambda idx: _where(names, idx)  # noqa: E731
    wrong = (g - want).abs() > tol * mag + atol
    if wrong.any():
        idx = _index(g, int(wrong.flatten().nonzero()[0]))
        got_x, want_x = float(g[idx]), float(want[idx])
        digits = ".6g" if abs(got_x - want_x) > 1e-4 * abs(want_x) else ".12g"  # enough digits to see the gap
        raise Violation(f"{what} at ({where(idx)}) is {got_x:{digits}}, the oracle gives {want_x:{digits}} "
                        f"({int(wrong.sum())} of {wrong.numel()} entries differ by more than {tol:g} of their "
                        f"terms' size, the rounding allowed){why(idx)}")


def _agrees(got, want, mag, tol) -> bool:
    g = got.detach().to(F64)
    return g.shape == want.shape and bool(((g - want).abs() <= tol * mag + 1e-300).all())


# ---- the oracle of retention: o_n = sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m + gamma^(n + 1) q_n S_0 ---------

def oracle_retention(q, k, v, gammas, S0=None):
    """(out, S_T) of retention from the closed form, in float64, powers by Python (0-based n)."""
    q, k, v = q.to(F64), k.to(F64), v.to(F64)
    T = q.size(2)
    P = torch.tensor([[[g ** (n - m) if n >= m else 0.0 for m in range(T)] for n in range(T)] for g in gammas],
                     dtype=F64)  # (H, T, T)
    out = torch.einsum("bhnm,bhme->bhne", torch.einsum("bhnd,bhmd->bhnm", q, k) * P, v)
    w = torch.tensor([[g ** (T - 1 - m) for m in range(T)] for g in gammas], dtype=F64)  # (H, T)
    state = torch.einsum("bhmd,bhme->bhde", k * w[None, :, :, None], v)
    if S0 is not None:
        S0 = S0.to(F64)
        first = torch.tensor([[g ** (n + 1) for n in range(T)] for g in gammas], dtype=F64)  # (H, T)
        out = out + (q @ S0) * first[None, :, :, None]
        state = state + S0 * torch.tensor([g ** T for g in gammas], dtype=F64)[None, :, None, None]
    return out, state


@st.composite
def retention_cases(draw, max_t: int = 8):
    H = draw(st.integers(1, 3))
    return dict(B=draw(st.integers(1, 2)), H=H, T=draw(st.integers(1, max_t)), Dk=draw(st.integers(1, 3)),
                Dv=draw(st.integers(1, 4)), gammas=tuple(draw(st.sampled_from(GAMMAS)) for _ in range(H)),
                state=draw(st.booleans()), scale=draw(st.sampled_from([1.0, 1e-3, 40.0])), seed=draw(seeds))


def _retention_inputs(case, dtype=F64):
    B, H, T, Dk, Dv, s, seed = (case[n] for n in ("B", "H", "T", "Dk", "Dv", "scale", "seed"))
    q, k = _randn(B, H, T, Dk, seed=seed, dtype=dtype, scale=s), _randn(B, H, T, Dk, seed=seed + 1, dtype=dtype)
    v = _randn(B, H, T, Dv, seed=seed + 2, dtype=dtype)
    S0 = _randn(B, H, Dk, Dv, seed=seed + 3, dtype=dtype, scale=s) if case["state"] else None
    return q, k, v, S0


def _gamma_arg(case):
    return torch.tensor(case["gammas"], dtype=F64)


def _expect_retention(fn, case, what, dtype, why_out=None, **kwargs):
    """Run the learner's retention form on the case and compare (out, state) with the oracle."""
    q, k, v, S0 = _retention_inputs(case, dtype)
    got = fn(q, k, v, _gamma_arg(case), state=S0, **kwargs)
    if not isinstance(got, tuple) or len(got) != 2:
        raise Violation(f"{what} returned {type(got).__name__}; expected the pair (out, state)")
    out, state = got
    B, H, T, Dk, Dv = (case[n] for n in ("B", "H", "T", "Dk", "Dv"))
    expect_tensor(out, (B, H, T, Dv), dtype, f"{what} (its out)")
    expect_tensor(state, (B, H, Dk, Dv), dtype, f"{what} (its state)")
    want, want_S = oracle_retention(q, k, v, case["gammas"], S0)
    mag, mag_S = oracle_retention(q.abs(), k.abs(), v.abs(), case["gammas"], None if S0 is None else S0.abs())
    tol = TOL[dtype]
    why = (why_out or (lambda idx: ""))
    if why_out and not _agrees(out, want, mag, tol):  # name a known mistake when the output equals its result
        labels = [label for label, alt in _retention_variants(q, k, v, case["gammas"], S0)
                  if _agrees(out, alt, mag, tol) and not _agrees(alt, want, mag, tol)]
        if labels:  # on these inputs several mistakes may give the same numbers: all are named
            why = lambda idx: f": yours {' or '.join(labels)}"  # noqa: E731
    expect_close(out, want, mag, tol, f"the out of {what}", why=why)
    T, C = case["T"], kwargs.get("chunk_size")
    short = (f"; the last chunk has {T % C} tokens, not chunk_size = {C}: its gamma^C and zeta use its own length"
             if C and T % C else "")
    expect_close(state, want_S, mag_S, tol, f"the returned state S_T of {what}",
                 names=("batch", "head", "row", "column"),
                 why=lambda idx: f" (the state after the last token: gamma^T S_0 + sum_m gamma^(T-1-m) k_m^T v_m"
                                 f"{short})")


def _retention_variants(q, k, v, gammas, S0):
    yield "never applies the decay (that is gamma = 1 for every head)", oracle_retention(q, k, v, [1.0] * len(gammas),
                                                                                        S0)[0]
    yield "uses the first head's gamma for every head", oracle_retention(q, k, v, [gammas[0]] * len(gammas), S0)[0]
    if S0 is not None:
        yield "ignores the given state (starts from zeros)", oracle_retention(q, k, v, gammas)[0]
    T = q.size(2)  # o_n = q_n S_{n-1}: each token reads the state before its own k_n^T v_n is added
    prev = [S0.to(F64) if S0 is not None else torch.zeros_like(oracle_retention(q, k, v, gammas)[1])]
    for n in range(T - 1):
        prev.append(oracle_retention(q[:, :, :n + 1], k[:, :, :n + 1], v[:, :, :n + 1], gammas, S0)[1])
    yield "reads the state before adding the token's own k_n^T v_n (o_n = q_n S_(n-1))", torch.stack(
        [q[:, :, n, None, :].to(F64) @ prev[n] for n in range(T)], dim=2).squeeze(3)


# ---- 10.1 the recurrent step ---------------------------------------------------------------------------------
# corner cases: T = 1 with a given state (a decode step); no state (zeros); Dk != Dv; gamma = 1 beside a tiny
# gamma; three heads with their own gammas; two batch rows. Pinned: HARD_RETENTION.

HARD_RETENTION = [  # Dk != Dv, the two extremes of gamma side by side, a given state with one token, three heads
    dict(case=dict(B=1, H=2, T=5, Dk=2, Dv=3, gammas=(1.0, 1e-3), state=False, scale=1.0, seed=0)),
    dict(case=dict(B=2, H=3, T=1, Dk=3, Dv=2, gammas=(0.5, 0.9, 0.96875), state=True, scale=1.0, seed=1)),
    dict(case=dict(B=1, H=3, T=7, Dk=2, Dv=4, gammas=(0.96875, 0.5, 0.1), state=True, scale=40.0, seed=2)),
]


@check("retention_recurrent(q, k, v, gamma, state) gives o_n = q_n S_n with S_n = gamma_h S_(n-1) + k_n^T v_n from "
       "S_0 = state (zeros when None), each head its own gamma, and returns (out, S_T), in float64",
       case=retention_cases(), examples=HARD_RETENTION)
def recurrent_equals_the_decayed_sum(retention_recurrent, case):
    _expect_retention(retention_recurrent, case, "retention_recurrent", F64, why_out=lambda idx: "")


@check("two calls, the second given the first's returned state, equal one call on the whole sequence (out and "
       "state): the state is all the past the recurrence keeps", case=retention_cases(), cut=st.integers(1, 7),
       examples=[dict(case=HARD_RETENTION[2]["case"], cut=3)])
def two_calls_continue_the_sequence(retention_recurrent, case, cut):
    T = case["T"]
    if T < 2:
        case = dict(case, T=2)
        T = 2
    cut = min(cut, T - 1)
    q, k, v, S0 = _retention_inputs(case)
    gamma = _gamma_arg(case)
    first = retention_recurrent(q[:, :, :cut], k[:, :, :cut], v[:, :, :cut], gamma, state=S0)
    if not isinstance(first, tuple) or len(first) != 2:
        raise Violation(f"retention_recurrent returned {type(first).__name__}; expected the pair (out, state)")
    out2, S2 = retention_recurrent(q[:, :, cut:], k[:, :, cut:], v[:, :, cut:], gamma, state=first[1])
    want, want_S = oracle_retention(q, k, v, case["gammas"], S0)
    mag, mag_S = oracle_retention(q.abs(), k.abs(), v.abs(), case["gammas"], None if S0 is None else S0.abs())
    expect_tensor(out2, tuple(want[:, :, cut:].shape), F64, "the second call's out")

    def hint(idx):
        return (f" (token {cut + idx[2]} of the whole sequence, the second call's token {idx[2]}: it must continue "
                "from the state it was given)")

    expect_close(out2, want[:, :, cut:], mag[:, :, cut:], TOL[F64], "the second call's out", why=hint)
    expect_close(S2, want_S, mag_S, TOL[F64], "the second call's returned state", names=("batch", "head", "row",
                                                                                          "column"))


@check("float32 and float16 inputs give out and state in that dtype, finite and equal to the float64 oracle within "
       "the dtype's rounding", case=retention_cases(), dtype=st.sampled_from([torch.float32, torch.float16]),
       examples=[dict(case=HARD_RETENTION[0]["case"], dtype=torch.float16),
                 dict(case=HARD_RETENTION[2]["case"], dtype=torch.float16),
                 dict(case=HARD_RETENTION[1]["case"], dtype=torch.float32)])
def recurrent_keeps_the_dtype(retention_recurrent, case, dtype):
    case = dict(case, scale=min(case["scale"], 1.0)) if dtype == torch.float16 else case
    _expect_retention(retention_recurrent, case, f"retention_recurrent ({dtype} inputs)", dtype)


# ---- 10.2 the chunkwise cross-chunk term ---------------------------------------------------------------------
# corner cases: chunk size 1; C = T; C > T; the last chunk short (T % C != 0, down to 1 token); a given
# state; three heads. Pinned: HARD_CHUNKS.

def _chunk_why(T: int, C: int, given_state: bool):
    def why(idx) -> str:
        t = idx[-2]
        i, j, last = t // C, t % C, min(C, T - (t // C) * C)
        text = f" (chunk {i}, tokens {i * C}..{i * C + last - 1}, row j = {j}"
        if i == 0:
            return text + ": the first chunk's past is the given state, decayed by xi_j = gamma^(j + 1))" if \
                given_state else text + ": with no state the first chunk is the parallel form alone)"
        short = f"; this last chunk has {last} tokens, not {C}" if last < C else ""
        return text + f": the state carried from chunks 0..{i - 1}, decayed by gamma^C per chunk of C tokens and by " \
                      f"xi_j = gamma^(j + 1) at row j{short})"
    return why


@st.composite
def chunk_cases(draw):
    case = draw(retention_cases(max_t=9))
    return dict(case, chunk_size=draw(st.integers(1, case["T"] + 2)))


HARD_CHUNKS = [  # the last chunk short (1 token), chunk size 1, C = T, C > T, a given state, three heads
    dict(case=dict(HARD_RETENTION[2]["case"], chunk_size=3)),
    dict(case=dict(B=1, H=2, T=5, Dk=2, Dv=3, gammas=(0.5, 0.9), state=True, scale=1.0, seed=3, chunk_size=2)),
    dict(case=dict(B=1, H=2, T=4, Dk=3, Dv=2, gammas=(0.9, 0.1), state=True, scale=1.0, seed=4, chunk_size=1)),
    dict(case=dict(B=2, H=1, T=4, Dk=2, Dv=2, gammas=(0.5,), state=True, scale=1.0, seed=5, chunk_size=4)),
    dict(case=dict(B=1, H=3, T=3, Dk=1, Dv=2, gammas=(0.96875, 0.5, 1.0), state=True, scale=1.0, seed=6,
                   chunk_size=5)),
]


@check("retention_chunkwise(q, k, v, gamma, chunk_size, state) equals retention from S_0 = state for every chunk "
       "size (1, T, larger than T, one that leaves the last chunk short): out and the returned state S_T, float64",
       case=chunk_cases(), examples=HARD_CHUNKS)
def chunkwise_equals_the_decayed_sum(retention_chunkwise, case):
    C = case["chunk_size"]
    _expect_retention(retention_chunkwise, case, f"retention_chunkwise (chunk_size={C})", F64,
                      why_out=_chunk_why(case["T"], C, case["state"]), chunk_size=C)


@check("float32 and float16 inputs give out and state in that dtype, finite and equal to the float64 oracle within "
       "the dtype's rounding", case=chunk_cases(), dtype=st.sampled_from([torch.float32, torch.float16]),
       examples=[dict(case=HARD_CHUNKS[0]["case"], dtype=torch.float16),
                 dict(case=dict(HARD_CHUNKS[0]["case"], state=False), dtype=torch.float16)])
def chunkwise_keeps_the_dtype(retention_chunkwise, case, dtype):
    case = dict(case, scale=min(case["scale"], 1.0)) if dtype == torch.float16 else case
    C = case["chunk_size"]
    _expect_retention(retention_chunkwise, case, f"retention_chunkwise (chunk_size={C}, {dtype} inputs)", dtype,
                      chunk_size=C)


# ---- 10.3 XPos's scale ---------------------------------------------------------------------------------------
# corner cases: decoding (Tq = 1 at q_offset = T - 1, cached keys before the query); Tq > Tk; Tk = 1; q_offset
# past the keys (12); odd L; RoPE (scale_base = inf); the defaults; no leading dimension and two. Pinned:
# HARD_XPOS.

def oracle_xpos(x, positions, c: float, base: float, sign: int, mistake: str = ""):
    """x (..., T, D) rotated pairwise by position * 10000^(-2i/D) and scaled by zeta_i^(sign (p + c) / base),
    float64 with Python's math; also the entrywise magnitude (|x_2i| + |x_2i+1|) * scale. `mistake` names a
    known wrong variant of the scale (the diagnoses)."""
    D = x.size(-1)
    angle = [[p * 10000.0 ** (-2 * i / D) for i in range(D // 2)] for p in positions]
    zeta = [((i if mistake == "pair index" else 2 * i) + 0.4 * D) / (1.4 * D) for i in range(D // 2)]
    at = [p - positions[0] if mistake == "from zero" else p for p in positions]
    scale = torch.tensor([[z ** (sign * (p + c) / base) for z in zeta] for p in at], dtype=F64)
    cos = torch.tensor([[math.cos(a) for a in row] for row in angle], dtype=F64)
    sin = torch.tensor([[math.sin(a) for a in row] for row in angle], dtype=F64)
    x = x.to(F64)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    rot = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), -1).flatten(-2)
    full = scale.repeat(1, 2) if mistake == "blocked" else scale.repeat_interleave(2, dim=-1)  # (T, D)
    return rot * full, (x0.abs() + x1.abs()).repeat_interleave(2, dim=-1) * full


def xpos_oracle(q, k, q_offset: int, base: float, *, centre=None, signs=(1, -1), mistake=""):
    Tq, Tk = q.size(-2), k.size(-2)
    c = (-max(q_offset + Tq, Tk)) // 2 if centre is None else centre
    (qo, qm), (ko, km) = (oracle_xpos(q, range(q_offset, q_offset + Tq), c, base, signs[0], mistake),
                          oracle_xpos(k, range(Tk), c, base, signs[1], "" if mistake == "from zero" else mistake))
    return qo, qm, ko, km


def _xpos_variants(q, k, q_offset, base):
    L = max(q_offset + q.size(-2), k.size(-2))
    yield "does not centre the exponent (c = 0)", dict(centre=0)
    yield ("centres with L = max(Tq, Tk), forgetting that q sits at q_offset + t",
           dict(centre=(-max(q.size(-2), k.size(-2))) // 2))
    yield "centres with c = -L / 2 instead of the integer c = (-L) // 2 (they differ for odd L)", dict(centre=-L / 2)
    yield "scales q by zeta^(-n/B) and k by zeta^(+m/B): the signs are swapped", dict(signs=(-1, 1))
    if base != 512:
        yield f"uses B = 512 whatever scale_base says (here scale_base = {base})", dict(base=512.0)
    if base != math.inf:
        yield "applies no scale at all (that is RoPE, scale_base = inf)", dict(base=math.inf)
    yield "counts q's scale positions from 0: q sits at q_offset + t", dict(mistake="from zero")
    yield "builds zeta_i from i, not from the pair's first entry 2i: zeta_i = (2i + 0.4 D)/(1.4 D)", dict(
        mistake="pair index")
    yield ("gives pair i's two entries different scales: repeat each scale twice side by side "
           "(interleaved), not the block of D/2 scales twice"), dict(mistake="blocked")


@st.composite
def xpos_cases(draw):
    return dict(lead=draw(st.sampled_from([(), (2,), (1, 2)])), Tq=draw(st.integers(1, 5)), Tk=draw(st.integers(1, 6)),
                D=draw(st.sampled_from([2, 4, 6, 8])), q_offset=draw(st.sampled_from([None, 0, 1, 2, 5, 12])),
                scale_base=draw(st.sampled_from([None, math.inf, 1.0, 3.5, 64.0, 512.0])), seed=draw(seeds))


def _call_xpos(apply_xpos, q, k, q_offset, scale_base, what):
    kwargs = {name: value for name, value in (("q_offset", q_offset), ("scale_base", scale_base)) if value is not None}
    got = apply_xpos(q, k, **kwargs)
    if not isinstance(got, tuple) or len(got) != 2:
        raise Violation(f"{what} returned {type(got).__name__}; expected the pair (q', k')")
    expect_tensor(got[0], tuple(q.shape), q.dtype, f"{what}'s q'")
    expect_tensor(got[1], tuple(k.shape), k.dtype, f"{what}'s k'")
    return got


HARD_XPOS = [  # decoding (Tq = 1 at q_offset = T - 1), odd L, Tq > Tk, RoPE, the defaults, B = 1 (a steep decay)
    dict(case=dict(lead=(2,), Tq=1, Tk=5, D=4, q_offset=4, scale_base=512.0, seed=0)),
    dict(case=dict(lead=(), Tq=3, Tk=2, D=6, q_offset=2, scale_base=1.0, seed=1)),
    dict(case=dict(lead=(1, 2), Tq=4, Tk=1, D=8, q_offset=None, scale_base=math.inf, seed=2)),
    dict(case=dict(lead=(), Tq=2, Tk=3, D=4, q_offset=None, scale_base=None, seed=3)),
    dict(case=dict(lead=(2,), Tq=2, Tk=4, D=8, q_offset=12, scale_base=3.5, seed=4)),
]


@check("apply_xpos(q, k, q_offset=, scale_base=) rotates pair i by position * 10000^(-2i/D) and scales q_n by "
       "zeta_i^((n + c)/B), k_m by zeta_i^(-(m + c)/B), zeta_i = (2i + 0.4 D)/(1.4 D), c = (-L) // 2, "
       "L = max(q_offset + Tq, Tk) (defaults q_offset = 0, B = 512; B = inf is RoPE), for any leading dimensions",
       case=xpos_cases(), examples=HARD_XPOS)
def xpos_matches_the_formula(apply_xpos, case):
    lead, Tq, Tk, D, seed = (case[n] for n in ("lead", "Tq", "Tk", "D", "seed"))
    offset = 0 if case["q_offset"] is None else case["q_offset"]
    base = 512.0 if case["scale_base"] is None else case["scale_base"]
    q, k = _randn(*lead, Tq, D, seed=seed), _randn(*lead, Tk, D, seed=seed + 1)
    qo, ko = _call_xpos(apply_xpos, q, k, case["q_offset"], case["scale_base"], "apply_xpos")
    want_q, mag_q, want_k, mag_k = xpos_oracle(q, k, offset, base)
    why = lambda idx: ""  # noqa: E731
    if not (_agrees(qo, want_q, mag_q, 1e-12) and _agrees(ko, want_k, mag_k, 1e-12)):
        labels = []
        for label, change in _xpos_variants(q, k, offset, base):
            kw = dict(centre=change.get("centre"), signs=change.get("signs", (1, -1)),
                      mistake=change.get("mistake", ""))
            aq, _, ak, _ = xpos_oracle(q, k, offset, change.get("base", base), **kw)
            if _agrees(qo, aq, mag_q, 1e-12) and _agrees(ko, ak, mag_k, 1e-12) and not (
                    _agrees(aq, want_q, mag_q, 1e-12) and _agrees(ak, want_k, mag_k, 1e-12)):
                labels.append(label)
        if labels:
            why = lambda idx: f": yours {' or '.join(labels)}"  # noqa: E731
    names = ("lead", "lead", "position", "entry")
    expect_close(qo, want_q, mag_q, 1e-12, f"q' (q at positions {offset} + t)", names=names, why=why)
    expect_close(ko, want_k, mag_k, 1e-12, "k' (k at positions 0 .. Tk - 1)", names=names, why=why)


@st.composite
def long_xpos_cases(draw):
    base = draw(st.sampled_from([16.0, 32.0]))
    Tk = draw(st.integers(int(10 * base), int(14 * base)))
    Tq = draw(st.integers(1, 3))
    return dict(scale_base=base, Tk=Tk, Tq=Tq, q_offset=draw(st.integers(0, Tk - Tq)),
                D=draw(st.sampled_from([4, 8])), dtype=draw(st.sampled_from([torch.float16, torch.float32])),
                seed=draw(seeds))


@check("float16 and float32 q, k at positions up to 14 B give q', k' in that dtype, finite, and scores q'_n . k'_m "
       "equal to the oracle's within the dtype's rounding: the centred exponent keeps zeta^(+-L/(2B)) inside float16 "
       "(an uncentred k' reaches zeta^(-L/B) and overflows)", case=long_xpos_cases(), max_examples=10,
       examples=[dict(case=dict(scale_base=16.0, Tk=224, Tq=1, q_offset=223, D=8, dtype=torch.float16, seed=0))])
def xpos_long_positions_stay_finite(apply_xpos, case):
    Tq, Tk, D, dtype, seed = (case[n] for n in ("Tq", "Tk", "D", "dtype", "seed"))
    q = (torch.rand(1, Tq, D, generator=torch.Generator().manual_seed(seed), dtype=F64) * 2 - 1).to(dtype)
    k = (torch.rand(1, Tk, D, generator=torch.Generator().manual_seed(seed + 1), dtype=F64) * 2 - 1).to(dtype)
    what = f"apply_xpos on {dtype} (q_offset={case['q_offset']}, Tk={Tk}, scale_base={case['scale_base']:g})"
    qo, ko = _call_xpos(apply_xpos, q, k, case["q_offset"], case["scale_base"], what)
    want_q, _, want_k, _ = xpos_oracle(q, k, case["q_offset"], case["scale_base"])
    for name, got, want in (("q'", qo, want_q), ("k'", ko, want_k)):
        expect_finite(got, want, f"{what}: {name}", names=("lead", "position", "entry"),
                      why=lambda idx: f" (the scale left {dtype}'s range: is the exponent centred on c = (-L) // 2?)")
    scores = qo.to(F64) @ ko.to(F64).transpose(-2, -1)
    want = want_q @ want_k.transpose(-2, -1)
    mag = want_q.abs() @ want_k.abs().transpose(-2, -1)
    expect_close(scores, want, mag, {torch.float16: 2e-2, torch.float32: 1e-5}[dtype], f"{what}: q'.k'",
                 names=("lead", "query", "key"))


# ---- 10.4 the decay mask -------------------------------------------------------------------------------------
# corner cases: n = 1; n beyond 16; n = 120 with gamma = 1e-3 (gamma^(r - c) of r < c overflows); gamma = 1;
# several heads; float32. Pinned: the examples of both checks.

def oracle_decay(gammas, n: int):
    return torch.tensor([[[g ** (r - c) if r >= c else 0.0 for c in range(n)] for r in range(n)] for g in gammas],
                        dtype=F64)


def _expect_decay(decay_mask, gammas, n, dtype, tol, atol=1e-300):
    gamma = torch.tensor(gammas, dtype=F64).to(dtype)[:, None, None]
    got = decay_mask(gamma, n)
    what = f"decay_mask(gamma of shape {tuple(gamma.shape)}, {dtype}, n={n})"
    expect_tensor(got, (len(gammas), n, n), dtype, what)
    want = oracle_decay(gamma.flatten().tolist(), n)
    names = ("head", "row", "column")
    above = torch.ones(n, n, dtype=torch.bool).triu(1).expand_as(got)
    if got.isfinite().all() and (got[above] != 0).any():
        h, r, c = _index(got, int((above & (got != 0)).flatten().nonzero()[0]))
        raise Violation(f"{what}[{h}, {r}, {c}] = {float(got[h, r, c]):.4g} above the diagonal (column > row): D is "
                        "0 there, a token never sees a later one")

    def why(idx):
        h, r, c = idx
        if r < c:
            return ": above the diagonal D is exactly 0" + (
                ", and gamma^(r - c) * 0 is NaN once gamma^(r - c) overflows: choose 0 there, do not multiply"
                if got[idx].isnan() else "")
        flipped = oracle_decay([float(gamma.flatten()[h])], n)[0].transpose(0, 1)
        if got[h].isfinite().all() and _agrees(got[h], flipped, flipped, 1e-4):
            return ": yours is the transpose (gamma^(column - row))"
        if r == c:
            return ": the diagonal is gamma^0 = 1, a token sees itself"
        first = oracle_decay([float(gamma.flatten()[0])], n)[0]
        if h > 0 and _agrees(got[h], first, first, 1e-4):
            return f": head {h} got head 0's powers; each head takes its own gamma[h]"
        return f" (gamma = {float(gamma.flatten()[h]):.6g} of head {h} to the power row - column = {r - c})"

    expect_close(got, want, want, tol, what, names=names, why=why, atol=atol)


@check("decay_mask(gamma (H, 1, 1), n) is D (H, n, n) with D[h, r, c] = gamma_h^(r - c) for r >= c and exactly 0 "
       "above the diagonal, in gamma's dtype (float64 here), for n beyond 16 and gammas so small that gamma^(r - c) "
       "of r < c overflows", gammas=st.lists(st.sampled_from(GAMMAS + (0.25, 0.999)), min_size=1, max_size=4),
       n=st.integers(1, 40),
       examples=[dict(gammas=[1.0], n=1), dict(gammas=[0.5, 0.9], n=20), dict(gammas=[1e-3, 1.0, 0.96875], n=120)])
def decay_mask_equals_the_powers(decay_mask, gammas, n):
    _expect_decay(decay_mask, gammas, n, F64, 1e-12)  # exp((r - c) log gamma) is as right as gamma ** (r - c)


@check("float32 gamma gives a float32 D equal to the powers within float32 rounding, with no NaN, for n up to 200 "
       "and gammas as small as 1e-3 (gamma^(r - c) of r < c overflows float32 there)", H=st.integers(1, 3),
       n=st.integers(60, 200), small=st.sampled_from([0.5, 0.25, 0.1, 1e-3]), max_examples=8,
       examples=[dict(H=2, n=80, small=0.25)])
def decay_mask_float32_without_nan(decay_mask, H, n, small):
    gammas = [small] + [GAMMAS[i] for i in range(1, H)]
    # 1e-4: exp((r - c) log gamma) and a running product lose up to ~2e-5 over 200 powers in float32; atol: a few
    # ulps of float32's subnormals
    _expect_decay(decay_mask, gammas, n, torch.float32, 1e-4, atol=1e-43)


EXERCISES = {
    "10.1": Exercise(points=2, checks=[recurrent_equals_the_decayed_sum, two_calls_continue_the_sequence,
                                       recurrent_keeps_the_dtype],
                     hint="The state is a (Dk, Dv) matrix per batch and head. At each token it decays, takes in the "
                          "token's key-value outer product, and is read out by the token's query.",
                     hints=("Start from the given state or from zeros of the right shape and dtype. For each token n: "
                            "first update the state (decay it by its head's gamma, add k_n^T v_n), then read o_n with "
                            "q_n. Return every o_n stacked along the token axis, and the last state.",
                            "gamma arrives as g of shape (H, 1, 1) in the input dtype, so it broadcasts over "
                            "(B, H, Dk, Dv). The outer product of k[:, :, n] and v[:, :, n] is a broadcast product of "
                            "(B, H, Dk, 1) and (B, H, 1, Dv); the read-out is a (B, H, 1, Dk) @ (B, H, Dk, Dv) "
                            "matmul; never change the caller's state in place.")),
    "10.2": Exercise(points=3, checks=[chunkwise_equals_the_decayed_sum, chunkwise_keeps_the_dtype],
                     hint="Inside a chunk the parallel form is given. What reaches row j of this chunk from all the "
                          "chunks before it, and how much has it decayed by then? And what state does the next chunk "
                          "start from?",
                     hints=("Two decay vectors over the chunk's rows: xi for what the carried state contributes to "
                            "row j (j + 1 steps of decay), zeta for how much each row's key-value product has decayed "
                            "by the chunk's end. C is this chunk's own length: the last chunk may be shorter.",
                            "Make a column j = 0 .. C - 1 of shape (C, 1) in g's dtype; xi = g^(j+1), "
                            "zeta = g^(C-1-j), both cast to the input dtype. Add (Q_[i] S) * xi to the inner term, "
                            "then S becomes g^C S plus K_[i]^T (V_[i] * zeta); output first, state update after.")),
    "10.3": Exercise(points=3, checks=[xpos_matches_the_formula, xpos_long_positions_stay_finite],
                     hint="XPos multiplies each rotated pair i by zeta_i to a power that grows with the position for q "
                          "and shrinks for k, so that q'.k' carries zeta^((n - m)/B). The centre c cancels in q'.k' "
                          "but keeps the numbers in range.",
                     hints=("zeta_i depends on the pair index i through 2i and D; the exponent is (position + c) / B "
                            "for q and its negative for k, with c = (-L) // 2 and L the longest position + 1 "
                            "(q_offset counts). Both entries of a pair share one scale; scale_base = inf gives "
                            "exponent 0.",
                            "Build zeta from torch.arange(0, D, 2) in the working dtype; c from "
                            "max(q_offset + Tq, Tk); "
                            "q_scale = zeta^((qpos + c) / B) of shape (Tq, D/2), k_scale likewise with a minus sign; "
                            "repeat each column twice, interleaved (pair i covers entries 2i and 2i+1), and cast to "
                            "q's dtype.")),
    "10.4": Exercise(points=2, checks=[decay_mask_equals_the_powers, decay_mask_float32_without_nan], pure=True,
                     hint="D[r, c] is gamma raised to how far the key c lies behind the query r, and 0 for a key that "
                          "lies ahead. gamma has shape (H, 1, 1): one mask per head.",
                     hints=("Build the (n, n) table of row minus column in gamma's dtype; on and below the diagonal "
                            "raise gamma to it, above put exactly 0.",
                            "Choose between gamma^(difference clamped at 0) and 0 with torch.where on "
                            "difference >= 0; multiplying by a 0/1 mask instead turns an overflowed gamma^(-big) into "
                            "inf * 0 = NaN.")),
}
