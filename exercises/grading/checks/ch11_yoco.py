"""Chapter 11's graded checks: the gated-retention recurrence, the shared-KV cross-decoder, the early-exit prefill.

Each check compares the learner's function (its first argument) with a float64 oracle written out here: the
retention sum with its decays summed term by term, RMSNorm, LayerNorm, attention and the MLP from their formulas,
and a whole YOCO forward (both self-decoder kinds) built from those. Known-wrong solutions:
exercises/grading/mutants/ch11_yoco.md.
"""

import contextlib
import copy
import math

import torch
import torch.nn as nn
from hypothesis import strategies as st

import nanomodels.gated_retention as retention_module
import nanomodels.yoco as yoco_module
from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import F64, expect_tensor, naive_layer_norm, seeds
from nanomodels.yoco import YOCO, YOCOConfig

F32 = torch.float32


def _first_bad(got: torch.Tensor, want: torch.Tensor, limit: torch.Tensor, what: str, dims: str,
               why: str = "", nan_why: str = "") -> None:
    """got == want within `limit` (elementwise); a NaN or an infinity in got is named, with where it first
    appears (the earliest index along `dims`' order), before any value is compared. `why` ends the message of a
    wrong value, `nan_why` that of a NaN or infinity."""
    names = dims.split(",")
    finite = torch.isfinite(got)
    if not bool(finite.all()):
        where = (~finite).nonzero()[0].tolist()
        kind = "NaN" if bool(got.isnan().any()) else "an infinity"
        at = ", ".join(f"{n}={i}" for n, i in zip(names, where))
        raise Violation(f"{what} holds {kind} (first at {at}) where the oracle is {want[tuple(where)].item():.4g}"
                        f"{nan_why}")
    err = (got.double() - want).abs()
    if not bool((err <= limit).all()):
        where = (err > limit).nonzero()[0].tolist()
        at = ", ".join(f"{n}={i}" for n, i in zip(names, where))
        raise Violation(f"{what} is wrong: at {at} it is {got[tuple(where)].item():.6g}, expected "
                        f"{want[tuple(where)].item():.6g} (max |diff| {err.max().item():.3g}){why}")


def _close(got, want, tol: float) -> bool:
    return type(got) is torch.Tensor and got.shape == want.shape and bool(
        ((got.double() - want).abs() <= tol * (1 + want.abs())).all())


# ---- 11.1 the gated-retention recurrence ------------------------------------------------------------------
# corner cases: T = 0 (nothing new: an empty out and the state); T = 1 with and without a given state; one
# head; Dk = Dv (a transposed outer product has the right shape); gamma = 1 beside decays down to exp(-80);
# batch rows with their own decays. Pinned: RETENTION_EXAMPLES.

OVERFLOW = ("; the oracle is finite there, so an intermediate left the float range (an overflow, or 0/0 after an "
            "underflow), as exp of minus a cumulative log decay (an inverse decay) does for long or strong decays; "
            "multiply the state by gamma_t <= 1 step by step instead")

def _decay_matrix(log_decay_row):
    """D[n, m] = exp(sum_{j=m+1..n} a_j) for m <= n (else 0), each exponent summed term by term (<= 0)."""
    a = [float(x) for x in log_decay_row]
    T = len(a)
    return torch.tensor([[math.exp(math.fsum(a[m + 1: n + 1])) if m <= n else 0.0 for m in range(T)]
                         for n in range(T)], dtype=F64)


def naive_gated_retention(q, k, v, log_decay, S0, *, variant: str = ""):
    """The sum form in float64: o_n = sum_{m <= n} D[n, m] (q_n . k_m) v_m + exp(sum_{j <= n} a_j) q_n S_0 and
    S_T = exp(sum_j a_j) S_0 + sum_m exp(sum_{j > m} a_j) k_m^T v_m. `variant` names a known mistake (for the
    diagnosis only): "read_before", "decay_after_add"."""
    q, k, v, log_decay, S0 = (t.double() for t in (q, k, v, log_decay, S0))
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.size(-1), dtype=F64)
    state = torch.zeros_like(S0)
    for b in range(B):
        for h in range(H):
            a = log_decay[b, h].tolist()
            D = _decay_matrix(a)
            full = [math.exp(math.fsum(a[: n + 1])) for n in range(T)]  # S_0's decay up to n
            if variant == "decay_after_add":  # S_t = g_t (S_{t-1} + k_t^T v_t): D[n, m] = exp(sum_{j=m..n} a_j)
                D = _decay_matrix([0.0] + a)[1:, :-1]
            elif variant == "read_before":  # o_t = q_t S_{t-1}: D[n, m] = exp(sum_{j=m+1..n-1} a_j), m < n
                D = D * torch.ones(T, T, dtype=F64).tril(-1) / torch.tensor([math.exp(x) for x in a],
                                                                            dtype=F64)[:, None]
                full = [math.exp(math.fsum(a[:n])) for n in range(T)]
            out[b, h] = ((q[b, h] @ k[b, h].T) * D) @ v[b, h] + torch.tensor(full, dtype=F64)[:, None] * (
                q[b, h] @ S0[b, h])
            tail = torch.tensor([math.exp(math.fsum(a[m + 1: T])) for m in range(T)], dtype=F64)
            state[b, h] = math.exp(math.fsum(a)) * S0[b, h] + (k[b, h] * tail[:, None]).T @ v[b, h]
    return out, state


def _retention_inputs(case, dtype=F64):
    B, H, T, Dk, Dv, seed, decay, with_state, scale = case
    g = torch.Generator().manual_seed(seed)
    q, k = (scale * torch.randn(B, H, T, Dk, generator=g, dtype=F64) for _ in range(2))
    v = scale * torch.randn(B, H, T, Dv, generator=g, dtype=F64)
    low = {"zero": 0.0, "mild": 2.0, "wide": 80.0}[decay]
    log_decay = -low * torch.rand(B, H, T, generator=g, dtype=F64)
    if decay == "wide":
        log_decay[..., ::3] = 0.0  # gamma = 1 exactly next to gammas of 1e-35
    S0 = scale * torch.randn(B, H, Dk, Dv, generator=g, dtype=F64) if with_state else None
    return tuple(t.to(dtype) if t is not None else None for t in (q, k, v, log_decay, S0))


# (B, H, T, Dk, Dv, seed, decay range, a given S_0, the values' scale)
RETENTION_CASES = st.tuples(st.integers(1, 2), st.integers(1, 3), st.integers(1, 9), st.integers(1, 4),
                            st.integers(1, 4), seeds, st.sampled_from(["mild", "zero", "wide"]), st.booleans(),
                            st.sampled_from([1.0, 30.0]))
RETENTION_EXAMPLES = [dict(case=c) for c in [
    (1, 1, 1, 1, 1, 0, "mild", False, 1.0),  # T = 1, one head, no state
    (2, 2, 0, 3, 2, 6, "mild", False, 1.0),  # T = 0: nothing new, out (B, H, 0, Dv) and a zero state
    (1, 1, 1, 2, 3, 1, "mild", True, 1.0),  # T = 1 from a given state
    (2, 2, 6, 3, 3, 2, "mild", True, 1.0),  # Dk = Dv: a transposed outer product has the right shape
    (2, 3, 7, 2, 4, 3, "zero", True, 1.0),  # gamma = 1: causal linear attention plus the state
    (2, 2, 9, 3, 2, 4, "wide", True, 30.0),  # decays down to exp(-80) and gamma = 1 side by side
    (2, 1, 5, 4, 1, 5, "mild", False, 1.0),  # two batch rows with their own decays, one head
]]


def _limit(q, k, v, log_decay, S0, tol):
    """tol times the magnitude of the terms each output and state entry sums (the oracle on |q|, |k|, |v|, |S_0|),
    plus tol: the rounding a correct float computation can make, however the terms cancel."""
    size_out, size_state = naive_gated_retention(q.abs(), k.abs(), v.abs(), log_decay, S0.abs())
    return tol * (1 + size_out), tol * (1 + size_state)


def _diagnose_retention(got_out, q, k, v, log_decay, S0) -> str:
    for variant, why in (("read_before", "o_t is read from S_{t-1}, before k_t^T v_t is added: o_t = q_t S_t "
                                         "with the updated state"),
                         ("decay_after_add", "gamma_t multiplies k_t^T v_t too: S_t = gamma_t S_{t-1} + k_t^T v_t "
                                             "decays only the past")):
        if _close(got_out, naive_gated_retention(q, k, v, log_decay, S0, variant=variant)[0], 1e-9):
            return f"; yours matches the mistake where {why}"
    if bool(S0.abs().sum() > 0) and _close(got_out, naive_gated_retention(q, k, v, log_decay, 0 * S0)[0], 1e-9):
        return "; yours equals the output from S_0 = 0: the given `state` is S_0 and must be used"
    if bool(log_decay.abs().sum() > 0) and _close(got_out, naive_gated_retention(q, k, v, 0 * log_decay, S0)[0],
                                                  1e-9):
        return "; yours equals the output without decay: gamma_t = exp(log_decay_t) multiplies S_{t-1}"
    if log_decay.size(0) > 1:
        shared = log_decay[:1].expand_as(log_decay)
        if _close(got_out, naive_gated_retention(q, k, v, shared, S0)[0], 1e-9):
            return "; yours uses batch row 0's decays for every row: log_decay is (B, H, T), one gate per row"
    return ""


@contextlib.contextmanager
def _other_forms_blocked(fn):
    """While the learner's recurrence runs, the library's parallel and chunkwise forms raise (the chunkwise form
    with chunk_size 1 IS the recurrence): in their modules and wherever the learner's module bound them."""
    forms = {id(retention_module.gated_retention): "gated_retention",
             id(retention_module.gated_retention_chunkwise): "gated_retention_chunkwise"}

    def blocked(name):
        def call(*_, **__):
            raise Violation(f"your code calls the library's `{name}`, another form of the same function: it earns "
                            "no points; write the recurrence yourself")
        return call

    spaces = [vars(retention_module), vars(yoco_module), getattr(getattr(fn, "__wrapped__", fn), "__globals__", {})]
    saved = [(ns, key, value) for ns in spaces for key, value in list(ns.items())
             if id(value) in forms]
    for ns, key, value in saved:
        ns[key] = blocked(forms[id(value)])
    try:
        yield
    finally:
        for ns, key, value in reversed(saved):
            ns[key] = value


def _run_recurrence(fn, q, k, v, log_decay, S0, dtype, what="gated_retention_recurrent"):
    with _other_forms_blocked(fn):
        result = fn(q, k, v, log_decay) if S0 is None else fn(q, k, v, log_decay, S0)
    if not isinstance(result, tuple) or len(result) != 2:
        raise Violation(f"{what} returned {type(result).__name__}; expected the pair (out, state)")
    B, H, T, Dk = q.shape
    out = expect_tensor(result[0], (B, H, T, v.size(-1)), dtype, f"{what}'s out")
    state = expect_tensor(result[1], (B, H, Dk, v.size(-1)), dtype, f"{what}'s state")
    return out, state


@check("out[b, h, n] = sum_{m <= n} exp(sum_{j=m+1..n} log_decay_j) (q_n . k_m) v_m + exp(sum_{j <= n} "
       "log_decay_j) q_n S_0, and the returned state is S_T = exp(sum_j log_decay_j) S_0 + sum_m "
       "exp(sum_{j > m} log_decay_j) k_m^T v_m (float64, to 1e-10 relative; S_0 = zeros when state is None), "
       "with decays from exp(-80) to exactly 1, any B, H, T, Dk, Dv", case=RETENTION_CASES,
       examples=RETENTION_EXAMPLES, max_examples=40)
def matches_the_retention_sum(gated_retention_recurrent, case):
    q, k, v, log_decay, S0 = _retention_inputs(case)
    out, state = _run_recurrence(gated_retention_recurrent, q, k, v, log_decay, S0, F64)
    zero = torch.zeros(*q.shape[:2], q.size(-1), v.size(-1), dtype=F64) if S0 is None else S0
    want_out, want_state = naive_gated_retention(q, k, v, log_decay, zero)
    if not _close(out, want_out, 1e-10):
        why = _diagnose_retention(out, q, k, v, log_decay, zero)
        if why:
            raise Violation(f"the output differs from the retention sum{why}")
    limit_out, limit_state = _limit(q, k, v, log_decay, zero, 1e-10)
    _first_bad(out, want_out, limit_out, "the output", "b,h,t,j", nan_why=OVERFLOW)
    _first_bad(state, want_state, limit_state, "the returned state S_T", "b,h,i,j", nan_why=OVERFLOW)


@check("passing the returned state back continues the sequence: running positions 1..s, then s+1..T from the "
       "state the first call returned, gives the outputs and final state of one call over 1..T (float64)",
       case=RETENTION_CASES, split=st.floats(0.0, 1.0),
       examples=[dict(case=(1, 1, 2, 1, 1, 0, "mild", False, 1.0), split=0.5),
                 dict(case=(2, 2, 8, 3, 2, 1, "mild", True, 1.0), split=0.9),
                 dict(case=(2, 3, 7, 2, 2, 2, "wide", True, 1.0), split=0.1)])
def the_state_continues_the_sequence(gated_retention_recurrent, case, split):
    q, k, v, log_decay, S0 = _retention_inputs(case)
    T = q.size(2)
    if T < 2:
        return
    s = min(max(1, round(split * T)), T - 1)
    part = lambda t, a, b: t[..., a:b, :] if t.dim() == 4 else t[..., a:b]  # noqa: E731
    first = [part(t, 0, s) for t in (q, k, v, log_decay)]
    rest = [part(t, s, T) for t in (q, k, v, log_decay)]
    out1, state1 = _run_recurrence(gated_retention_recurrent, *first, S0, F64)
    out2, state2 = _run_recurrence(gated_retention_recurrent, *rest, state1.clone(), F64)
    zero = torch.zeros(*q.shape[:2], q.size(-1), v.size(-1), dtype=F64) if S0 is None else S0
    want_out, want_state = naive_gated_retention(q, k, v, log_decay, zero)
    limit_out, limit_state = _limit(q, k, v, log_decay, zero, 1e-10)
    want_mid, limit_mid = naive_gated_retention(*first, zero)[1], _limit(*first, zero, 1e-10)[1]
    where = f"(split after position {s} of {T})"
    _first_bad(out1, want_out[..., :s, :], limit_out[..., :s, :], f"the first call's output {where}", "b,h,t,j", nan_why=OVERFLOW)
    _first_bad(state1, want_mid, limit_mid, f"the state after the first call {where}", "b,h,i,j", nan_why=OVERFLOW)
    _first_bad(out2, want_out[..., s:, :], limit_out[..., s:, :],
               f"the second call's output, started from the first call's state {where}", "b,h,t,j", nan_why=OVERFLOW)
    _first_bad(state2, want_state, limit_state, f"the final state {where}", "b,h,i,j", nan_why=OVERFLOW)


@check("float32 inputs give float32 out and state, equal to the float64 oracle of the same values to 1e-3 of the "
       "terms' magnitude (a correct float32 form that sums the log decays loses about 6e-8 times their sum in each "
       "exponent), with values of size 100 and decays from exp(-80) to 1 (no overflow, no NaN)",
       case=RETENTION_CASES, examples=[dict(case=(2, 2, 9, 3, 2, 4, "wide", True, 30.0)),
                                       dict(case=(1, 1, 9, 1, 1, 1, "wide", False, 1.0))])
def float32_stays_finite_and_exact(gated_retention_recurrent, case):
    B, H, T, Dk, Dv, seed, _, with_state, _ = case
    q, k, v, log_decay, S0 = _retention_inputs((B, H, T, Dk, Dv, seed, "wide", with_state, 100.0), F32)
    out, state = _run_recurrence(gated_retention_recurrent, q, k, v, log_decay, S0, F32)
    zero = torch.zeros(B, H, Dk, Dv, dtype=F32) if S0 is None else S0
    want_out, want_state = naive_gated_retention(q, k, v, log_decay, zero)
    limit_out, limit_state = _limit(q.double(), k.double(), v.double(), log_decay.double(), zero.double(), 1e-3)
    _first_bad(out, want_out, limit_out, "the float32 output", "b,h,t,j", nan_why=OVERFLOW)
    _first_bad(state, want_state, limit_state, "the float32 state", "b,h,i,j", nan_why=OVERFLOW)


# ---- the naive YOCO pieces (float64 oracles) ----------------------------------------------------------------

def _as64(module):
    """A float64 copy (the module given to the learner's code is left as it is)."""
    return copy.deepcopy(module).double()


def _lin(m, x):
    return x @ m.weight.T + (m.bias if m.bias is not None else 0.0)


def _ln(norm, x):
    return naive_layer_norm(x, norm.weight, norm.bias, eps=norm.eps)


def _rms(norm, x):
    out = x / torch.sqrt((x * x).sum(-1, keepdim=True) / x.size(-1) + norm.eps)
    return out * norm.weight if norm.weight is not None else out


def _heads(t, H):
    B, T, C = t.shape
    return torch.stack([t[:, :, h * (C // H):(h + 1) * (C // H)] for h in range(H)], dim=1)  # (B, H, T, D)


def _merge(t):
    return torch.cat(list(t.unbind(1)), dim=-1)  # (B, H, T, D) -> (B, T, H D)


def _attend(q, k, v, allowed):
    """softmax(q k^T / sqrt(D)) v over the allowed keys (Tq, Tk), written out."""
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~allowed, -math.inf)
    w = torch.exp(scores - scores.max(-1, keepdim=True).values)
    return (w / w.sum(-1, keepdim=True)) @ v


def _mlp(mlp, x):
    h = _lin(mlp.fc1, x)
    return _lin(mlp.fc2, 0.5 * h * (1 + torch.erf(h / math.sqrt(2))))


def naive_global_kv(kv_norm, k_proj, v_proj, x, H):
    h = _rms(kv_norm, x)
    return _heads(_lin(k_proj, h), H), _heads(_lin(v_proj, h), H)


def naive_cross_layer(layer, x, K, V, H):
    """One cross-decoder layer: x + out(attention(q(LN x) onto K, V, causal)), then x + MLP(LN x)."""
    a = layer.mixer
    q = _heads(_lin(a.q_proj, _ln(layer.mixer_residual.norm, x)), H)
    Tq, Tk = x.size(1), K.size(2)
    allowed = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
    x = x + _lin(a.out_proj, _merge(_attend(q, K, V, allowed)))
    return x + _mlp(layer.ffn, _ln(layer.ffn_residual.norm, x))


def _naive_self_mixer(a, h, config):
    H = config.n_heads
    q, k, v = (_heads(_lin(p, h), H) for p in (a.q_proj, a.k_proj, a.v_proj))
    T = h.size(1)
    if config.self_attention == "sliding_window":
        n, m = torch.arange(T)[:, None], torch.arange(T)[None, :]
        return _lin(a.out_proj, _merge(_attend(q, k, v, (m <= n) & (m > n - config.window))))
    z = _lin(a.gt_proj, h).transpose(1, 2)  # (B, H, T)
    log_decay = -torch.log1p(torch.exp(-z)) / 16  # log sigmoid(z) / 16
    o, _ = naive_gated_retention(q / math.sqrt(q.size(-1)), k, v, log_decay,
                                 torch.zeros(*q.shape[:2], q.size(-1), v.size(-1), dtype=F64))
    o = o / torch.sqrt((o * o).sum(-1, keepdim=True) / o.size(-1) + a.head_norm.eps)
    g = _lin(a.g_proj, h)
    return _lin(a.out_proj, g * torch.sigmoid(g) * _merge(o))


def naive_yoco(model, idx):
    """The whole forward, written out: (logits (B, T, V), the global K, V, the self-decoder's output)."""
    c = model.config
    x = model.embed.wte.weight[idx] + model.embed.wpe.weight[torch.arange(idx.size(1))]
    for layer in model.self_layers:
        x = x + _naive_self_mixer(layer.mixer, _ln(layer.mixer_residual.norm, x), c)
        x = x + _mlp(layer.ffn, _ln(layer.ffn_residual.norm, x))
    K, V = naive_global_kv(model.kv_norm, model.k_proj, model.v_proj, x, c.n_heads)
    h = x
    for layer in model.cross_layers:
        h = naive_cross_layer(layer, h, K, V, c.n_heads)
    return _ln(model.final_norm, h) @ model.head.proj.weight.T, (K, V), x


def _scramble_(module, seed: int, std: float = 0.35):
    """Every parameter redrawn (norm weights around 1): no part of the computation is negligible."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=g, dtype=F64))


def _model(seed, *, kind="gated_retention", n_self=2, n_cross=2, window=3, chunk_size=3, n_heads=2, d=8,
           dtype=F64):
    torch.manual_seed(seed)
    config = YOCOConfig(vocab_size=11, block_size=16, d_model=d, n_heads=n_heads, d_ff=2 * d,
                        n_self_layers=n_self, n_cross_layers=n_cross, self_attention=kind, window=window,
                        chunk_size=chunk_size)
    model = YOCO(config).double()
    _scramble_(model, seed)
    return model.to(dtype).eval()


# ---- 11.2 the shared-KV cross-decoder -----------------------------------------------------------------------
# corner cases: T = 1 and one head; every position a query (n_queries None); one query (the early exit);
# one new position after cached ones (past_kv: cached keys before the queries); float32; wide x. Pinned:
# CROSS_EXAMPLES.

class _Probe(nn.Module):
    """A stand-in cross layer with its own queries: h + attention(q_proj(h) onto the K, V it is given), causal;
    it records the K, V and the input it was called with."""

    def __init__(self, d, H, seed, dtype):
        super().__init__()
        self.H = H
        self.q_proj = nn.Linear(d, d, dtype=dtype)
        _scramble_(self, seed, std=0.5)
        self.calls = []

    def forward(self, x, *, k, v):
        for name, t in (("K", k), ("V", v)):
            if t.dim() != 4 or t.size(1) != self.H or t.size(3) * self.H != x.size(-1):
                raise Violation(f"a cross layer was given {name} of shape {tuple(t.shape)}; expected "
                                f"(B, n_heads = {self.H}, positions, d / n_heads = {x.size(-1) // self.H})")
        self.calls.append((x.detach().double().clone(), k.detach().double().clone(), v.detach().double().clone()))
        q = _heads(self.q_proj(x), self.H)
        Tq, Tk = x.size(1), k.size(2)
        allowed = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
        return x + _merge(_attend(q, k, v, allowed))

    def naive(self, x, K, V):
        q = _heads(_lin(_as64(self.q_proj), x), self.H)
        Tq, Tk = x.size(1), K.size(2)
        allowed = torch.arange(Tk)[None, :] <= torch.arange(Tq)[:, None] + (Tk - Tq)
        return x + _merge(_attend(q, K, V, allowed))


def _kv_parts(d, seed, dtype):
    g = torch.Generator().manual_seed(seed)
    norm = nn.RMSNorm(d, eps=1e-5, dtype=F64)
    k_proj, v_proj = nn.Linear(d, d, dtype=F64), nn.Linear(d, d, dtype=F64)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.5 * torch.randn(d, generator=g, dtype=F64))
        for p in (*k_proj.parameters(), *v_proj.parameters()):
            p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=F64))
    return norm.to(dtype), k_proj.to(dtype), v_proj.to(dtype)


# (B, T, n_heads of d = 8, cross layers, n_queries (0: None), past positions (0: None), seed, x's scale, dtype)
CROSS_CASES = st.tuples(st.integers(1, 2), st.integers(1, 6), st.sampled_from([1, 2, 4]), st.integers(1, 3),
                        st.integers(0, 6), st.integers(0, 4), seeds, st.sampled_from([1.0, 100.0]),
                        st.sampled_from(["float64", "float64", "float32"]))
CROSS_EXAMPLES = [dict(case=c) for c in [
    (1, 1, 1, 1, 1, 0, 0, 1.0, "float64"),  # T = 1, one head, one cross layer
    (2, 5, 2, 1, 0, 0, 1, 1.0, "float64"),  # one cross layer, every position a query
    (2, 5, 2, 3, 1, 0, 2, 100.0, "float64"),  # three layers, the early exit's one query, wide x
    (2, 1, 4, 2, 1, 3, 3, 1.0, "float64"),  # one new position after 3 cached ones (a decoding step)
    (1, 4, 2, 2, 2, 2, 4, 1.0, "float32"),  # float32, a past and two queries
]]


def _cross_call(fn, case):
    B, T, H, L, nq, past, seed, scale, dtype = case
    dtype, d = getattr(torch, dtype), 8
    nq = min(nq, T) or None
    g = torch.Generator().manual_seed(seed + 1)
    x = (scale * torch.randn(B, T, d, generator=g, dtype=F64)).to(dtype)
    past_kv = tuple(torch.randn(B, H, past, d // H, generator=g, dtype=F64).to(dtype)
                    for _ in range(2)) if past else None
    norm, k_proj, v_proj = _kv_parts(d, seed, dtype)
    layers = nn.ModuleList(_Probe(d, H, seed + 10 + i, dtype) for i in range(L))
    with torch.no_grad():
        result = fn(x, norm, k_proj, v_proj, layers, H, nq, past_kv)
    return (x, norm, k_proj, v_proj, layers, H, nq, past_kv, dtype), result


def _unpack_cross(result, B, nq, d, H, Tk, dtype):
    if not isinstance(result, tuple) or len(result) != 2 or not isinstance(result[1], tuple) or len(result[1]) != 2:
        raise Violation(f"shared_kv_cross_decoder returned {type(result).__name__}; expected (h, (K, V))")
    h = expect_tensor(result[0], (B, nq, d), dtype, "shared_kv_cross_decoder's h (the last n_queries positions)")
    K, V = (expect_tensor(t, (B, H, Tk, d // H), dtype, f"shared_kv_cross_decoder's {n} (past and new positions, "
                          "split into heads)") for t, n in zip(result[1], "KV"))
    return h, K, V


@check("K = k_proj(RMSNorm(x)) and V = v_proj(RMSNorm(x)) are computed once, split into n_heads heads, after "
       "past_kv when given, and returned; every layer, in order, is called with that same K, V and the previous "
       "layer's output (the first with x's last n_queries positions); h is the last layer's output", case=CROSS_CASES,
       examples=CROSS_EXAMPLES, max_examples=40)
def one_global_kv_for_every_layer(shared_kv_cross_decoder, case):
    (x, norm, k_proj, v_proj, layers, H, nq, past_kv, dtype), result = _cross_call(shared_kv_cross_decoder, case)
    B, T, d = x.shape
    nq_ = T if nq is None else nq
    past = 0 if past_kv is None else past_kv[0].size(2)
    h, K, V = _unpack_cross(result, B, nq_, d, H, past + T, dtype)
    tol = 1e-9 if dtype == F64 else 2e-4
    xd = x.double()
    K_new, V_new = naive_global_kv(_as64(norm), _as64(k_proj), _as64(v_proj), xd, H)
    if past_kv is not None:
        K_want, V_want = (torch.cat([p.double(), n], dim=2) for p, n in zip(past_kv, (K_new, V_new)))
    else:
        K_want, V_want = K_new, V_new
    projections = {"K": _as64(k_proj), "V": _as64(v_proj)}

    def with_past(name, new):
        return new if past_kv is None else torch.cat([past_kv["KV".index(name)].double(), new], dim=2)

    last = layers[-1].calls
    from_output = (naive_global_kv(_as64(norm), _as64(k_proj), _as64(v_proj), layers[-1].naive(*last[0]), H)
                   if last else None)  # K, V recomputed from the last layer's output: a per-layer cache
    for name, got, want in (("K", K, K_want), ("V", V, V_want)):
        if not _close(got, want, tol):
            why = ""
            if from_output is not None and _close(got, with_past(name, from_output["KV".index(name)]), tol):
                why = (": it is computed from the last layer's output; YOCO computes K, V ONCE, from x, before "
                       "the cross layers, and never recomputes them")
            elif past_kv is not None and _close(got, torch.cat([want[:, :, past:], want[:, :, :past]], 2), tol):
                why = ": the past positions must come first (past_kv, then x's positions)"
            elif _close(got, with_past(name, _heads(_lin(projections[name], xd), H)), tol):
                why = ": the RMSNorm (kv_norm) is missing before the projection"
            elif _close(got, V_want if name == "K" else K_want, tol):
                why = f": that is {'V' if name == 'K' else 'K'}; K comes from k_proj, V from v_proj"
            _first_bad(got, want, tol * (1 + want.abs()), f"the returned {name}", "b,head,t,j", why)
    for i, layer in enumerate(layers):
        if len(layer.calls) != 1:
            raise Violation(f"layer {i} of {len(layers)} was called {len(layer.calls)} times; the cross-decoder calls "
                            "each layer once, in order")
        x_in, k_in, v_in = layer.calls[0]
        own = naive_global_kv(_as64(norm), _as64(k_proj), _as64(v_proj), x_in, H)
        for name, got, want in (("K", k_in, K_want), ("V", v_in, V_want)):
            if not _close(got, want, tol):
                why = ""
                if _close(got, with_past(name, own["KV".index(name)]), tol):
                    why = (": it was computed from this layer's input; YOCO computes K, V ONCE, from x, and every "
                           "cross layer shares them")
                raise Violation(f"layer {i} was given a {name} (shape {tuple(got.shape)}) other than the global "
                                f"{name} (shape {tuple(want.shape)}){why}")
        expected_in = xd[:, T - nq_:] if i == 0 else layers[i - 1].naive(*layers[i - 1].calls[0])
        if not _close(x_in, expected_in, tol):
            what = (f"x's last n_queries = {nq_} positions (B, {nq_}, d)" if i == 0 else
                    f"layer {i - 1}'s output")
            why = ""
            if i == 0 and x_in.shape == expected_in.shape and _close(x_in, _rms(_as64(norm), expected_in), tol):
                why = ": it is RMSNorm(x); the norm feeds K and V only, the layers get x itself"
            raise Violation(f"layer {i} was called with an input of shape {tuple(x_in.shape)} that is not "
                            f"{what}{why}")
    want_h = layers[-1].naive(*layers[-1].calls[0])
    _first_bad(h, want_h, tol * (1 + want_h.abs()), "h, the last layer's output", "b,t,j")


CROSS_MODELS = st.tuples(st.integers(1, 2), st.integers(1, 6), st.integers(1, 3), st.integers(0, 6),
                         st.integers(0, 3), seeds)


@check("with a YOCO model's own kv_norm, k_proj, v_proj and cross_layers (float64, every weight redrawn), h equals "
       "the naive cross-decoder: each layer x + out(causal attention of its own queries onto the one K, V), then "
       "x + MLP, written out", case=CROSS_MODELS,
       examples=[dict(case=(1, 1, 1, 0, 0, 0)), dict(case=(2, 6, 3, 1, 0, 1)), dict(case=(2, 1, 2, 1, 4, 2))])
def equals_the_naive_cross_decoder_of_a_model(shared_kv_cross_decoder, case):
    B, T, L, nq, past, seed = case
    model = _model(seed, n_cross=L)
    H, d = model.config.n_heads, model.config.d_model
    g = torch.Generator().manual_seed(seed + 2)
    x = torch.randn(B, T, d, generator=g, dtype=F64)
    past_kv = tuple(torch.randn(B, H, past, d // H, generator=g, dtype=F64) for _ in range(2)) if past else None
    nq = min(nq, T) or None
    with torch.no_grad():
        result = shared_kv_cross_decoder(x, model.kv_norm, model.k_proj, model.v_proj, model.cross_layers, H, nq,
                                         past_kv)
        h, _, _ = _unpack_cross(result, B, nq or T, d, H, past + T, F64)
        K, V = naive_global_kv(model.kv_norm, model.k_proj, model.v_proj, x, H)
        if past_kv is not None:
            K, V = torch.cat([past_kv[0], K], 2), torch.cat([past_kv[1], V], 2)
        want = x[:, T - (nq or T):]
        for layer in model.cross_layers:
            want = naive_cross_layer(layer, want, K, V, H)
    _first_bad(h, want, 1e-9 * (1 + want.abs()), f"h after the model's {L} cross layer(s)", "b,t,j")


# ---- 11.3 the early-exit prefill ----------------------------------------------------------------------------
# corner cases: T = 1; window 1 (a token sees itself only); window >= T; a prompt longer than the window;
# chunks that leave the last one short; one and three layers each side. Pinned: PREFILL_EXAMPLES.

# (kind, B, T, self layers, cross layers, window (sliding) or chunk size (retention), seed)
PREFILL_CASES = st.tuples(st.sampled_from(["gated_retention", "sliding_window"]), st.integers(1, 2),
                          st.integers(1, 8), st.integers(1, 3), st.integers(1, 3), st.integers(1, 10), seeds)
PREFILL_EXAMPLES = [dict(case=c) for c in [
    ("gated_retention", 1, 1, 1, 1, 3, 0),  # T = 1, one layer each side
    ("sliding_window", 2, 6, 2, 1, 1, 1),  # window 1: a token sees only itself; one cross layer
    ("sliding_window", 2, 5, 1, 2, 8, 2),  # window >= T: causal attention
    ("gated_retention", 2, 8, 3, 3, 3, 3),  # chunks of 3 over 8 positions, three layers each side
    ("sliding_window", 1, 7, 3, 2, 3, 4),  # a prompt longer than the window, three self layers
]]


def _prefill_model(case):
    kind, B, T, n_self, n_cross, knob, seed = case
    extra = dict(window=knob) if kind == "sliding_window" else dict(chunk_size=knob)
    model = _model(seed, kind=kind, n_self=n_self, n_cross=n_cross, **extra)
    idx = torch.randint(0, model.config.vocab_size, (B, T + 2), generator=torch.Generator().manual_seed(seed))

    def library_prefill(*_, **__):
        raise Violation("your code calls the model's own prefill (the library's answer); write the early exit")

    model.prefill = library_prefill  # the exercise IS prefill
    return model, idx[:, :T], idx


def _library_prefill_blocked():
    """While the learner's code runs, nanomodels.yoco.yoco_prefill (YOCO.prefill's body) raises."""
    saved = yoco_module.yoco_prefill

    def blocked(*_, **__):
        raise Violation("your code calls YOCO.prefill (the library's answer); write the early exit yourself")

    class _Ctx:
        def __enter__(self):
            yoco_module.yoco_prefill = blocked

        def __exit__(self, *exc):
            yoco_module.yoco_prefill = saved

    return _Ctx()


def _prefill(fn, model, prompt):
    with torch.no_grad(), _library_prefill_blocked():
        result = fn(model, prompt)
    if not isinstance(result, tuple) or len(result) != 2:
        raise Violation(f"yoco_prefill returned {type(result).__name__}; expected (logits_last, cache)")
    logits = expect_tensor(result[0], (prompt.size(0), model.config.vocab_size), next(model.parameters()).dtype,
                           "yoco_prefill's logits (the last position's, (B, V))")
    return logits, result[1]


@check("the logits prefill returns are the naive full forward's at the last prompt position (B, V), for both "
       "self-decoder kinds, windows 1 to >= T, chunked retention, 1 to 3 layers each side (float64, to 1e-9)",
       case=PREFILL_CASES, examples=PREFILL_EXAMPLES)
def last_logits_equal_the_full_forward(yoco_prefill, case):
    model, prompt, _ = _prefill_model(case)
    logits, _ = _prefill(yoco_prefill, model, prompt)
    with torch.no_grad():
        want = naive_yoco(model, prompt)[0]
    last = want[:, -1]
    if not _close(logits, last, 1e-9) and prompt.size(1) > 1 and _close(logits, want[:, 0], 1e-9):
        raise Violation("the logits are the FIRST prompt position's; prefill returns the last position's")
    _first_bad(logits, last, 1e-9 * (1 + last.abs()), "the last position's logits", "b,token")


@check("the early exit: the self-decoder runs over the whole prompt (each self layer once, on (B, T, d)), and "
       "each cross-decoder layer runs once, on the LAST position only (B, 1, d)", case=PREFILL_CASES,
       examples=PREFILL_EXAMPLES)
def cross_decoder_runs_for_the_last_position_only(yoco_prefill, case):
    model, prompt, _ = _prefill_model(case)
    seen = {}
    for side in ("self_layers", "cross_layers"):
        for i, layer in enumerate(getattr(model, side)):
            layer.register_forward_pre_hook(lambda m, args, kwargs, key=(side, i): seen.setdefault(key, []).append(
                tuple((args or list(kwargs.values()))[0].shape)), with_kwargs=True)
    _prefill(yoco_prefill, model, prompt)
    B, T = prompt.shape
    d = model.config.d_model
    for i in range(model.config.n_self_layers):
        got = seen.get(("self_layers", i), [])
        if got != [(B, T, d)]:
            raise Violation(f"self-decoder layer {i} ran on {got or 'nothing'}; it runs once over the whole "
                            f"prompt, {(B, T, d)}")
    for i in range(model.config.n_cross_layers):
        got = seen.get(("cross_layers", i), [])
        if got != [(B, 1, d)]:
            more = " (all prompt positions: no early exit)" if got == [(B, T, d)] and T > 1 else ""
            raise Violation(f"cross-decoder layer {i} ran on {got or 'nothing'}{more}; the early exit runs each "
                            f"cross layer once, for the last position only, {(B, 1, d)}")


@check("the cache decodes on: {'pos': T, 'self': one dict per self layer, each its own, 'k', 'v': the global K, "
       "V of every prompt position (B, H, T, D)}, and the model's step from it gives the naive forward's logits at "
       "the next two positions (float64, to 1e-9)", case=PREFILL_CASES, examples=PREFILL_EXAMPLES)
def the_cache_decodes_on(yoco_prefill, case):
    model, prompt, idx = _prefill_model(case)
    _, cache = _prefill(yoco_prefill, model, prompt)
    B, T = prompt.shape
    c = model.config
    if not isinstance(cache, dict) or not {"pos", "self", "k", "v"} <= set(cache):
        raise Violation(f"the cache is {type(cache).__name__} with keys {sorted(cache) if isinstance(cache, dict) else []}"
                        "; expected a dict with 'pos', 'self', 'k' and 'v'")
    if type(cache["pos"]) is not int or cache["pos"] != T:
        raise Violation(f"cache['pos'] is {cache['pos']!r}; it counts the prompt's tokens, {T}")
    selves = cache["self"]
    if not isinstance(selves, list) or len(selves) != c.n_self_layers or not all(isinstance(s, dict) for s in selves):
        raise Violation(f"cache['self'] is {type(selves).__name__} of length "
                        f"{len(selves) if hasattr(selves, '__len__') else '?'}; expected a list of "
                        f"{c.n_self_layers} dicts, one per self-decoder layer")
    if len({id(s) for s in selves}) < len(selves):
        raise Violation("cache['self'] holds the same dict more than once: each self-decoder layer needs its own "
                        "(with one shared dict, every layer overwrites the others' state)")
    empty = [i for i, s in enumerate(selves) if not s]
    if empty:
        raise Violation(f"cache['self'][{empty[0]}] is empty: pass the per-layer dicts to the self-decoder, which "
                        "stores each layer's state (retention) or last keys and values (sliding window) in them")
    with torch.no_grad():
        want, (K, V), _ = naive_yoco(model, idx)
    D = c.d_model // c.n_heads
    for name, want_kv in (("k", K), ("v", V)):
        got = expect_tensor(cache[name], (B, c.n_heads, T, D), F64, f"cache[{name!r}] (the global "
                            f"{name.upper()} of every prompt position)")
        _first_bad(got, want_kv[:, :, :T], 1e-9 * (1 + want_kv[:, :, :T].abs()), f"cache[{name!r}]", "b,head,t,j")
    with torch.no_grad():
        for t in (T, T + 1):
            logits, cache = YOCO.step(model, idx[:, t:t + 1], cache)
            _first_bad(logits, want[:, t], 1e-9 * (1 + want[:, t].abs()), f"the logits of the step at position {t} "
                       "from your cache", "b,token", ": a self-decoder state in cache['self'] is wrong")


EXERCISES = {
    "11.1": Exercise(points=3, checks=[matches_the_retention_sum, the_state_continues_the_sequence,
                                       float32_stays_finite_and_exact],
                     hint="One (Dk, Dv) state per batch row and head carries everything the past contributes. "
                          "In which order do the decay, the new token's outer product and the read-out happen, "
                          "and where does the given state enter?",
                     hints=("Start from the given state (zeros of shape (B, H, Dk, Dv) when it is None) and walk "
                            "the positions in order. At each position decay the state by that token's gamma, add "
                            "the outer product of its key and value, then read its output with its query. Collect "
                            "the outputs along T and return them with the last state.",
                            "gamma_t is exp of log_decay at position t, shaped to broadcast over the (Dk, Dv) "
                            "matrix of each (batch, head). The outer product of a (Dk,) key and a (Dv,) value is "
                            "a (Dk, 1) column times a (1, Dv) row; the read-out is a (1, Dk) row times the state. "
                            "Never build exp of minus a cumulative sum: it overflows for long or strong decays.")),
    "11.2": Exercise(points=3, checks=[one_global_kv_for_every_layer, equals_the_naive_cross_decoder_of_a_model],
                     hint="YOCO caches keys and values once: which tensor are they computed from, how many times, "
                          "and which positions are queries?",
                     hints=("Normalize x with kv_norm, project it with k_proj and with v_proj, split both into "
                            "heads as attention expects (B, H, T, D), and put the past keys and values before the "
                            "new ones. Then feed x's last n_queries positions through the layers one after "
                            "another, handing every layer the same K and V.",
                            "The head split is a view to (B, T, H, D) followed by swapping the T and H axes (a "
                            "plain view to (B, H, T, D) mixes positions). Concatenate along the time axis, past "
                            "first. Each layer is called with keywords k= and v=; its output is the next layer's "
                            "input. Return the last output and the pair (K, V).")),
    "11.3": Exercise(points=3, checks=[last_logits_equal_the_full_forward, cross_decoder_runs_for_the_last_position_only,
                                       the_cache_decodes_on],
                     hint="The cross-decoder reads only the global K, V, so a prompt token's cross-decoder output "
                          "is never needed except the last one's. What does decoding need from the prompt?",
                     hints=("Give each self-decoder layer its own empty dict, run the self-decoder over the whole "
                            "prompt with them (it fills them), then run the global KV and the cross-decoder asking "
                            "for one query position. Return the last logits and the cache dict the docstring "
                            "describes.",
                            "A list comprehension makes one fresh dict per self layer (multiplying a list repeats "
                            "one dict). The self-decoder starts at position 0. _cross_decode with n_queries 1 gives "
                            "logits (B, 1, V) and (K, V) over every prompt position; drop the time axis of the "
                            "logits, and store the prompt length as pos.")),
}
