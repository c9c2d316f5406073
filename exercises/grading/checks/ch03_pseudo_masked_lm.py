"""Chapter 03's graded checks: the PMLM layout, the pseudo-mask rules, the s2s-ft signed-span-id mask, and the
PMLM loss end to end (with a short training run on the learner's loss).

Each check tests the mechanism against the learner's function, its first argument, with a naive per-token
transcription of the rules as the oracle. Known-wrong solutions: exercises/grading/mutants/ch03_*.md.
"""

import functools
import math

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import F64, expect_close, expect_tensor
from nanomodels.attention import attention
from nanomodels.pmlm import pmlm_batch
from nanomodels.pmlm import pmlm_losses as library_pmlm_losses
from nanomodels.transformer import Transformer, TransformerConfig

AE, PSEUDO, REAL = 0, 1, 2
M_ID, P_ID = 90, 91


@st.composite
def layouts(draw):
    """x (n,), spans (disjoint position lists: contiguous and sorted as sample_spans makes them, or any distinct
    positions in any order, which pmlm_layout accepts too), a random order over them."""
    n = draw(st.integers(1, 9))
    if draw(st.booleans()):
        cuts = sorted(set(draw(st.lists(st.integers(0, n), min_size=2, max_size=8))))
        spans = [list(range(a, b)) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    else:
        chosen = draw(st.permutations(list(range(n))))[:draw(st.integers(1, n))]
        sizes = draw(st.lists(st.integers(1, 3), min_size=len(chosen), max_size=len(chosen)))
        spans, i = [], 0
        for size in sizes:
            if i < len(chosen):
                spans.append(list(chosen[i:i + size]))
                i += size
    if not spans:
        spans = [[0]]
    order = draw(st.permutations(list(range(len(spans)))))
    x = torch.tensor(draw(st.lists(st.integers(0, 9), min_size=n, max_size=n)))
    return x, spans, list(order)


def expected_layout(x, spans, order):
    n, masked = len(x), {p for s in spans for p in s}
    out = {"tokens": [M_ID if i in masked else int(x[i]) for i in range(n)], "positions": list(range(n)),
           "kind": [AE] * n, "step": [-1] * n, "ae_targets": [int(x[i]) if i in masked else -100 for i in range(n)],
           "par_targets": [-100] * n}
    for st_, sid in enumerate(order):
        for kind in (PSEUDO, REAL):
            for p in spans[sid]:
                out["tokens"].append(P_ID if kind == PSEUDO else int(x[p]))
                out["positions"].append(p)
                out["kind"].append(kind)
                out["step"].append(st_)
                out["ae_targets"].append(-100)
                out["par_targets"].append(int(x[p]) if kind == PSEUDO else -100)
    return out


def rule(kq, sq, kk, sk) -> bool:
    if kq == AE:
        return kk == AE
    if kk == AE:
        return True
    if kq == PSEUDO:
        return (kk == REAL and sk < sq) or (kk == PSEUDO and sk == sq)
    return kk == REAL and sk <= sq


NAMES = {AE: "AE", PSEUDO: "[P]", REAL: "real"}


# ---- 3.1 the layout ---------------------------------------------------------------------------------------
# corner cases: n = 1; one span over every position (nothing left unmasked); spans of non-contiguous positions
# given in reverse order; the factorization order reversed; a span at the very end. Pinned: PINNED_LAYOUTS.
PINNED_LAYOUTS = [dict(case=(torch.tensor([7]), [[0]], [0])),
                  dict(case=(torch.tensor([1, 2, 3]), [[0, 1, 2]], [0])),
                  # [3, 0]: a walk over len(span) positions from the first one stays inside x, so that it
                  # gives a wrong layout (named in the message) rather than an IndexError
                  dict(case=(torch.tensor([3, 1, 4, 1, 5]), [[3, 0], [4]], [1, 0]))]

def _layout(pmlm_layout, x, spans, order):
    out = pmlm_layout(x, spans, order, M_ID, P_ID)
    if type(out) is not dict:
        raise Violation(f"pmlm_layout returned a {type(out).__name__}, expected a dict of tensors")
    missing = [k for k in ("tokens", "positions", "kind", "step", "ae_targets", "par_targets") if k not in out]
    if missing:
        raise Violation(f"pmlm_layout's result lacks {missing}")
    L = len(x) + 2 * sum(len(s) for s in spans)
    for k in ("tokens", "positions", "kind", "step", "ae_targets", "par_targets"):
        expect_tensor(out[k], (L,), torch.int64, f"pmlm_layout's {k!r}")
    return {k: v.tolist() for k, v in out.items()}


def _compare(got, want, field, where):
    if got[field] != want[field]:
        i = next((i for i, (a, b) in enumerate(zip(got[field], want[field])) if a != b), min(len(got[field]),
                                                                                               len(want[field])))
        raise Violation(f"{where}: {field} = {got[field]}, expected {want[field]} (first difference at index {i})")


@check("the paper's example (x1..x6, spans {x2}, {x4, x5}, order {x4, x5} then {x2}) gives "
       "x1 [M] x3 [M] [M] x6 [P] [P] x4 x5 [P] x2 at positions 0 1 2 3 4 5 3 4 3 4 1 1")
def paper_example(pmlm_layout):
    x = torch.tensor([1, 2, 3, 4, 5, 6])
    got, want = _layout(pmlm_layout, x, [[1], [3, 4]], [1, 0]), expected_layout(x, [[1], [3, 4]], [1, 0])
    for field in ("tokens", "positions", "kind", "step"):
        _compare(got, want, field, "paper example")


@check("pseudo masks and real copies share the original position ids: pos([P]_m) = pos(x_m) = m",
       case=layouts(), examples=PINNED_LAYOUTS)
def positions_are_shared(pmlm_layout, case):
    got, want = _layout(pmlm_layout, *case), expected_layout(*case)
    _compare(got, want, "positions", f"spans {case[1]}, order {case[2]}")


@check("the AE block is x with [M] at every masked position; then, step by step in the given order, the span's "
       "[P]s and then its real tokens (kind and step per token)", case=layouts(), examples=PINNED_LAYOUTS)
def blocks_in_factorization_order(pmlm_layout, case):
    got, want = _layout(pmlm_layout, *case), expected_layout(*case)
    for field in ("tokens", "kind", "step"):
        _compare(got, want, field, f"x {case[0].tolist()}, spans {case[1]}, order {case[2]}")


@check("L_AE is taken at the [M]s of the AE block and L_PAR at every [P], each labelled with the original token "
       "(-100 elsewhere): |M| predictions each", case=layouts(), examples=PINNED_LAYOUTS)
def targets_of_both_losses(pmlm_layout, case):
    got, want = _layout(pmlm_layout, *case), expected_layout(*case)
    for field in ("ae_targets", "par_targets"):
        _compare(got, want, field, f"x {case[0].tolist()}, spans {case[1]}, order {case[2]}")


# ---- 3.2 the mask rules -----------------------------------------------------------------------------------
# corner cases: no AE token (every position masked); AE tokens only (no span); one span of one token; steps
# whose tokens are interleaved in any order (the rules read kind and step only); a batch whose rows are
# permuted differently; two leading axes. Pinned: PINNED_KINDS (the first three); works_on_a_batch the rest.

@st.composite
def kinds_and_steps(draw, min_ae: int = 0, min_spans: int = 0):
    n_ae = draw(st.integers(min_ae, 4))
    sizes = draw(st.lists(st.integers(1, 3), min_size=min_spans, max_size=4))
    kind, step = [AE] * n_ae, [-1] * n_ae
    for s, size in enumerate(sizes):
        kind += [PSEUDO] * size + [REAL] * size
        step += [s] * (2 * size)
    perm = draw(st.permutations(list(range(len(kind)))))  # any token order: the rules depend on kind and step only
    return torch.tensor([kind[p] for p in perm], dtype=torch.long), torch.tensor([step[p] for p in perm])


_T = lambda *v: torch.tensor(v, dtype=torch.long)  # noqa: E731
PINNED_KINDS = [dict(case=(_T(PSEUDO, REAL, PSEUDO, PSEUDO, REAL, REAL), _T(0, 0, 1, 1, 1, 1))),
                dict(case=(_T(AE, AE, AE), _T(-1, -1, -1))), dict(case=(_T(REAL, AE, PSEUDO), _T(0, -1, 0)))]


def _mask(pmlm_mask, kind, step):
    out = pmlm_mask(kind, step)
    L = len(kind)
    if type(out) is not torch.Tensor or tuple(out.shape) != (L, L) or out.dtype != torch.bool:
        raise Violation(f"pmlm_mask returned {getattr(out, 'shape', type(out).__name__)}, expected ({L}, {L}) bool")
    return out


def _against_rule(m, kind, step, only=None):
    for q in range(len(kind)):
        for k in range(len(kind)):
            if only is not None and not only(int(kind[q]), int(kind[k])):
                continue
            want = rule(int(kind[q]), int(step[q]), int(kind[k]), int(step[k]))
            if bool(m[q, k]) != want:
                raise Violation(f"query {q} ({NAMES[int(kind[q])]}, step {int(step[q])}) -> key {k} "
                                f"({NAMES[int(kind[k])]}, step {int(step[k])}) is {bool(m[q, k])}, expected {want}")


@check("the AE block sees exactly the AE block (never a [P] or an appended real token); everyone sees the AE block",
       case=kinds_and_steps(), examples=PINNED_KINDS)
def autoencoding_block_is_closed(pmlm_mask, case):
    kind, step = case
    _against_rule(_mask(pmlm_mask, kind, step), kind, step, only=lambda kq, kk: kq == AE or kk == AE)


@check("a [P] of step i sees the real tokens of steps < i (never its own or later spans) and the [P]s of its own "
       "span only", case=kinds_and_steps(), examples=PINNED_KINDS)
def pseudo_rows(pmlm_mask, case):
    kind, step = case
    _against_rule(_mask(pmlm_mask, kind, step), kind, step, only=lambda kq, kk: kq == PSEUDO and kk != AE)


@check("a real token of step i sees the real tokens of steps <= i and never a [P]", case=kinds_and_steps(),
       examples=PINNED_KINDS)
def real_rows(pmlm_mask, case):
    kind, step = case
    _against_rule(_mask(pmlm_mask, kind, step), kind, step, only=lambda kq, kk: kq == REAL and kk != AE)


@check("batched input: kind and step of shape (B, L) give allowed of shape (B, L, L), row by row, and (1, B, L) "
       "gives (1, B, L, L): any leading dimensions",
       a=kinds_and_steps(min_ae=1, min_spans=1), seed=st.integers(0, 1000))
def works_on_a_batch(pmlm_mask, a, seed):
    kind, step = a
    perm = torch.randperm(len(kind), generator=torch.Generator().manual_seed(seed))
    kinds, steps = torch.stack([kind, kind[perm]]), torch.stack([step, step[perm]])
    out = pmlm_mask(kinds, steps)
    L = len(kind)
    if type(out) is not torch.Tensor or tuple(out.shape) != (2, L, L) or out.dtype != torch.bool:
        raise Violation(f"for kind and step of shape (2, {L}) (a batch of two sequences) pmlm_mask returned "
                        f"{getattr(out, 'shape', type(out).__name__)}, expected a (2, {L}, {L}) bool mask: index "
                        "the last axis (kind[..., :, None], kind[..., None, :]), not the first, so a batch works")
    for b in range(2):
        _against_rule(out[b], kinds[b], steps[b])
    deep = pmlm_mask(kinds.view(1, 2, L), steps.view(1, 2, L))  # (..., L) of rank 3: two batch axes
    if type(deep) is not torch.Tensor or tuple(deep.shape) != (1, 2, L, L) or not torch.equal(deep[0], out):
        raise Violation(f"for kind and step of shape (1, 2, {L}) pmlm_mask returned "
                        f"{tuple(getattr(deep, 'shape', ()))}, expected (1, 2, {L}, {L}) equal to the (2, {L}) "
                        "batch's masks: any leading dimensions (index the last axis only)")


# ---- 3.3 the s2s-ft signed-span-id mask -------------------------------------------------------------------
# corner cases: no source (src_len = 0); an empty target; several target tokens of one span (equal ids); span ids
# with a gap (1, 3); one target token. Pinned: PINNED_S2S.
PINNED_S2S = [dict(case=(0, _T(1, 1, 2))), dict(case=(3, _T())), dict(case=(2, _T(1, 3))), dict(case=(1, _T(1)))]

@st.composite
def s2s_cases(draw):
    src = draw(st.integers(0, 4))
    jumps = draw(st.lists(st.integers(0, 2), max_size=6))
    return src, torch.tensor(jumps, dtype=torch.long).cumsum(0) + 1 if jumps else torch.zeros(0, dtype=torch.long)


@check("on source ++ target ++ pseudo, the signed-span-id mask equals the PMLM rules (source = AE block, target = "
       "real tokens, pseudo = [P]s, span id = step)", case=s2s_cases(),
       examples=PINNED_S2S)
def equals_the_rules(s2s_ft_mask, case):
    src, ids = case
    t = len(ids)
    kind = torch.tensor([AE] * src + [REAL] * t + [PSEUDO] * t)
    step = torch.cat([torch.full((src,), -1), ids, ids])
    out = s2s_ft_mask(src, ids)
    n = src + 2 * t
    if type(out) is not torch.Tensor or tuple(out.shape) != (n, n) or out.dtype != torch.bool:
        raise Violation(f"s2s_ft_mask({src}, {ids.tolist()}) returned {getattr(out, 'shape', None)}, "
                        f"expected ({n}, {n}) bool")
    try:
        _against_rule(out, kind, step)
    except Violation as err:
        raise Violation(f"source {src}, target span ids {ids.tolist()}: {err}") from None


@check("the reference note's example: source 3, target span ids [1, 1, 2, 3]")
def official_example(s2s_ft_mask):
    m = s2s_ft_mask(3, torch.tensor([1, 1, 2, 3]))
    rows = {"t0": (3, [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]), "t2": (5, [1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]),
            "p0": (7, [1, 1, 1, 0, 0, 0, 0, 1, 1, 0, 0]), "p2": (9, [1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 0])}
    for name, (r, want) in rows.items():
        got = [int(v) for v in m[r].tolist()]
        if got != want:
            raise Violation(f"row {name} is {got}, expected {want}")


# ---- 3.4 the PMLM loss, both objectives from one pass -----------------------------------------------------
# corner cases: every token masked (num_masked = n: no unmasked context); one batch row; unigram spans only
# (max_ngram = 1); nothing masked (both losses 0, not NaN: no_prediction_gives_zero_losses); rows whose spans
# differ. Pinned: PINNED_LOSSES (everything masked in one row of two tokens).

LOSS_V = 10  # the toy vocabulary; [M] = 10 and [P] = 11


def _model64(seed: int) -> Transformer:
    """A tiny float64 model with weights large enough that every logit depends on what its token sees."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=LOSS_V + 2, block_size=32, n_layers=2, d_model=16, n_heads=2)
    model = Transformer(cfg, attention_fn=attention).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


@st.composite
def loss_cases(draw):
    n = draw(st.integers(2, 10))
    return {"batch": draw(st.integers(1, 4)), "n": n, "num_masked": draw(st.integers(1, n)),
            "max_ngram": draw(st.integers(1, 4)), "seed": draw(st.integers(0, 2 ** 16))}


PINNED_LOSSES = [dict(case={"batch": 1, "n": 2, "num_masked": 2, "max_ngram": 1, "seed": 0})]


def _loss_batch(case) -> dict:
    """Rows that differ: random tokens, spans and orders per row (library pmlm_batch)."""
    g = torch.Generator().manual_seed(case["seed"])
    x = torch.randint(0, LOSS_V, (case["batch"], case["n"]), generator=g)
    return pmlm_batch(x, case["num_masked"], g, LOSS_V, LOSS_V + 1, max_ngram=case["max_ngram"], ngram_prob=0.5)


def _pair_of_losses(out, dtype, what="pmlm_losses") -> tuple:
    if not (type(out) is tuple and len(out) == 2):
        raise Violation(f"{what} returned {type(out).__name__}, expected a tuple (L_AE, L_PAR)")
    for name, value in zip(("L_AE", "L_PAR"), out):
        expect_tensor(value, (), dtype, f"{what}'s {name}")
    return out


def naive_mean_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """-log softmax(logits)[target], one prediction at a time, averaged over the predictions; 0 without any."""
    terms = []
    for row, labels in zip(logits.tolist(), targets.tolist()):
        for scores, label in zip(row, labels):
            if label != -100:
                top = max(scores)
                terms.append(top + math.log(sum(math.exp(v - top) for v in scores)) - scores[label])
    return sum(terms) / len(terms) if terms else 0.0


def _oracle(model, batch, **overrides) -> tuple[float, float]:
    kwargs = dict(allowed=batch["allowed"], causal=False, positions=batch["positions"]) | overrides
    with torch.no_grad():
        logits, _ = model(batch["tokens"], **kwargs)
    return (naive_mean_cross_entropy(logits, batch["ae_targets"]),
            naive_mean_cross_entropy(logits, batch["par_targets"]))


def _diagnose(model, batch, got) -> str:
    """Which common slip reproduces the learner's values."""
    slips = {"the forward pass ran with causal=True (the Transformer's default): pass causal=False, the layout's "
             "mask is the whole rule": dict(causal=True),
             "the forward pass ignored the layout's mask `allowed`": dict(allowed=None),
             "the forward pass ignored the layout's positions (a [P] must sit at its token's position)":
                 dict(positions=None)}
    for why, overrides in slips.items():
        try:
            other = _oracle(model, batch, **overrides)
        except Exception:  # noqa: BLE001 - a slip that cannot run explains nothing
            continue
        if all(abs(g - o) < 1e-9 for g, o in zip(got, other)):
            return f": {why}"
    if all(abs(g - o) < 1e-9 for g, o in zip(got, reversed(_oracle(model, batch)))):
        return ": the two losses are swapped (return (L_AE, L_PAR))"
    return ""


@check("(L_AE, L_PAR) are the mean cross-entropies, over their own predictions (ae_targets / par_targets not "
       "-100), of the logits of one pass over the layout with its positions and its mask alone (float64, to "
       "1e-10), on batches whose rows differ", case=loss_cases(), max_examples=30,
       examples=PINNED_LOSSES)
def losses_equal_the_mean_cross_entropy_of_their_predictions(pmlm_losses, case):
    model, batch = _model64(case["seed"]), _loss_batch(case)
    with torch.no_grad():
        got = _pair_of_losses(pmlm_losses(model, batch), F64)
    got = tuple(v.item() for v in got)
    want = _oracle(model, batch)
    for name, g, w in zip(("L_AE", "L_PAR"), got, want):
        if not abs(g - w) < 1e-10:
            raise Violation(f"{case['batch']} rows of n = {case['n']} with {case['num_masked']} masked each: {name} "
                            f"= {g:.10g}, expected {w:.10g} (L_AE = {want[0]:.6g}, L_PAR = {want[1]:.6g})"
                            + _diagnose(model, batch, got))


@check("both losses come from ONE forward pass over the whole layout of n + 2|M| tokens: the encodings of the "
       "context are computed once and reused (the model's first block runs once, on every token)",
       case=loss_cases(), max_examples=10)
def one_forward_pass_over_the_whole_layout(pmlm_losses, case):
    model, batch = _model64(case["seed"]), _loss_batch(case)
    lengths = []
    hook = model.blocks[0].register_forward_hook(lambda module, args, out: lengths.append(args[0].size(1)))
    try:
        with torch.no_grad():
            pmlm_losses(model, batch)
    finally:
        hook.remove()
    L = batch["tokens"].size(1)
    if lengths != [L]:
        raise Violation(f"the model's blocks ran {len(lengths)} time(s), on sequences of length {lengths}; PMLM "
                        f"takes both losses from one pass over the layout's {L} tokens (the AE block's encodings "
                        "are shared, not recomputed)")


@check("the losses carry the gradient: the gradient of L_AE + L_PAR with respect to the model's parameters "
       "equals that of the written-out losses (float64, to 1e-9)", case=loss_cases(), max_examples=10)
def the_gradient_flows_through_both_losses(pmlm_losses, case):
    model, batch = _model64(case["seed"]), _loss_batch(case)
    params = list(model.parameters())
    got = _pair_of_losses(pmlm_losses(model, batch), F64)
    if not (got[0].requires_grad and got[1].requires_grad):
        raise Violation("the losses do not require grad (detached, or rebuilt from Python floats): training "
                        "cannot follow them")
    mine = torch.autograd.grad(got[0] + got[1], params, allow_unused=True)
    logits, _ = model(batch["tokens"], allowed=batch["allowed"], causal=False, positions=batch["positions"])
    flat = logits.reshape(-1, logits.size(-1))
    ref = sum(torch.nn.functional.cross_entropy(flat, batch[k].reshape(-1)) for k in ("ae_targets", "par_targets"))
    want = torch.autograd.grad(ref, params)
    for (name, _), a, b in zip(model.named_parameters(), mine, want):
        a = torch.zeros_like(b) if a is None else a
        expect_close(a, b, 1e-9, f"the gradient of L_AE + L_PAR with respect to {name} differs from the "
                     "written-out losses'", output=f"the gradient to {name}")


@check("a batch with nothing masked (num_masked = 0) has no prediction of either kind: both losses are 0, "
       "0-d tensors, not NaN", batch=st.integers(1, 3), n=st.integers(2, 8), seed=st.integers(0, 1000),
       max_examples=10)
def no_prediction_gives_zero_losses(pmlm_losses, batch, n, seed):
    model = _model64(seed)
    data = _loss_batch({"batch": batch, "n": n, "num_masked": 0, "max_ngram": 1, "seed": seed})
    with torch.no_grad():
        got = _pair_of_losses(pmlm_losses(model, data), F64)
    if any(v.item() != 0.0 for v in got):
        raise Violation(f"with nothing masked the losses are ({got[0].item()}, {got[1].item()}), expected (0, 0): a "
                        "mean over no predictions is taken as 0 here (F.cross_entropy gives NaN)")


EXP_N, EXP_MASKED, EXP_STEPS, EXP_ROWS = 6, 2, 100, 32


def _progressions(rows: int, generator: torch.Generator) -> torch.Tensor:
    """Rows x_i = (d + s i) mod 10 with a random start d and step s in {0, 1, 2}: a masked token is implied by
    the context, once the model has worked out d and s from it."""
    d = torch.randint(0, LOSS_V, (rows, 1), generator=generator)
    s = torch.randint(0, 3, (rows, 1), generator=generator)
    return (d + s * torch.arange(EXP_N)) % LOSS_V


@functools.lru_cache(maxsize=1)
def _experiment_batches() -> tuple:
    g, held_out = torch.Generator().manual_seed(0), torch.Generator().manual_seed(123)
    train = [pmlm_batch(_progressions(EXP_ROWS, g), EXP_MASKED, g, LOSS_V, LOSS_V + 1) for _ in range(EXP_STEPS)]
    return train, pmlm_batch(_progressions(256, held_out), EXP_MASKED, held_out, LOSS_V, LOSS_V + 1)


def pmlm_experiment(pmlm_losses) -> tuple[float, float, list]:
    """A tiny Transformer trained for EXP_STEPS AdamW steps on L_AE + L_PAR as `pmlm_losses` computes them;
    the library's L_AE + L_PAR on 256 held-out rows before and after, and the training losses."""
    train, evaluation = _experiment_batches()
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=LOSS_V + 2, block_size=EXP_N + 2 * EXP_MASKED, n_layers=2,
                                          d_model=32, n_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)

    def measured():
        model.eval()
        with torch.no_grad():
            value = sum(library_pmlm_losses(model, evaluation)).item()
        model.train()
        return value

    start, losses = measured(), []
    for batch in train:
        l_ae, l_par = _pair_of_losses(pmlm_losses(model, batch), torch.float32)
        opt.zero_grad(set_to_none=True)
        (l_ae + l_par).backward()
        opt.step()
        losses.append((l_ae + l_par).item())
    return start, measured(), losses


@check(f"the experiment: a tiny Transformer trained for {EXP_STEPS} steps on L_AE + L_PAR from your pmlm_losses "
       f"(rows of {EXP_N} tokens in arithmetic progression mod 10, {EXP_MASKED} masked, seeded) has a library-"
       "measured L_AE + L_PAR on 256 held-out rows below 3/4 of its start (the library's own loss takes it from "
       "5.1 to 3.2 nats; guessing the digits uniformly gives 4.6)")
def training_on_the_loss_teaches_the_model(pmlm_losses):
    start, end, losses = pmlm_experiment(pmlm_losses)
    if not end < 0.75 * start:
        raise Violation(f"after {EXP_STEPS} steps on your losses, L_AE + L_PAR measured by the library on held-out "
                        f"rows is {end:.3f} nats, from {start:.3f}: not below 3/4 of the start (your own loss went "
                        f"from {losses[0]:.3f} to {losses[-1]:.3f}). A loss that reads its answers (a [P] or the "
                        "AE block seeing the real tokens) trains a model that fails where it cannot")


EXERCISES = {
    "3.1": Exercise(points=3, checks=[paper_example, positions_are_shared, blocks_in_factorization_order,
                                      targets_of_both_losses],
                    hint="The lengthened sequence has the original tokens (with [M] where masked), then "
                         "for each span in the factorization order its pseudo masks and its real tokens, "
                         "all at their original positions.",
                    hints=("Loop over the order (the step is the place in the order, not the span's id), "
                           "and within a step first the span's [P]s, then its real tokens, each span's "
                           "positions in the span's own order; both losses are read where the docstring "
                           "says, -100 elsewhere.",
                           "Start from the n original tokens with [M] at the masked positions (positions 0..n-1, kind "
                           "AE, step -1). Then for each step st and span id sid = order[st]: append the span's [P]s, then "
                           "its real tokens, each at its ORIGINAL position p, with kind PSEUDO / REAL and step st. The "
                           "L_AE label sits on the AE block's [M]s, the L_PAR label on the [P]s.")),
    "3.2": Exercise(points=3, checks=[autoencoding_block_is_closed, pseudo_rows, real_rows, works_on_a_batch],
                    hint="Every rule depends only on the kind and the step of the query and of the key. "
                         "Write the table of the module docstring as one boolean expression per query "
                         "kind.",
                    hints=("Broadcast kind and step of the queries (a column) against those of the keys "
                           "(a row) along the LAST axis, so that a batch (..., L) works too, and OR the "
                           "three query kinds' expressions.",
                           "Broadcast kind and step as a query column (..., L, 1) and a key row (..., 1, L), write one "
                           "boolean expression per query kind from the table in the docstring, and OR them."),
                    pure=True),
    "3.3": Exercise(points=2, checks=[equals_the_rules, official_example],
                    hint="The official code encodes every token's role in one signed integer: 0 for the "
                         "source, the span id for a target token, minus the span id for its pseudo mask.",
                    hints=("Build w from the three parts, broadcast it as queries against keys, and "
                           "transcribe the docstring's two row rules (real rows, pseudo rows) as boolean "
                           "expressions.",
                           "w = [0]*src_len ++ ids ++ (-ids); a key is 'true' when w_key >= 0. Real rows (w_q >= 0): "
                           "true key and w_key <= w_query. Pseudo rows (w_q < 0): true key and -w_key > w_query, or "
                           "w_key == w_query (a pseudo of the same span)."), pure=True),
    "3.4": Exercise(points=4, checks=[losses_equal_the_mean_cross_entropy_of_their_predictions,
                                      one_forward_pass_over_the_whole_layout, the_gradient_flows_through_both_losses,
                                      no_prediction_gives_zero_losses, training_on_the_loss_teaches_the_model],
                    hint="The layout and its mask already encode who sees what; the loss is one pass of the model "
                         "over it and two averages. What must the pass be told, and over which tokens is each "
                         "average taken?",
                    hints=("Run the model once on the layout's tokens with its positions and its mask, and switch "
                           "off the model's own causal mask (its default). L_AE averages the cross-entropy over the "
                           "tokens with an ae_target, L_PAR over those with a par_target; -100 marks the rest.",
                           "Call the model on batch['tokens'] with allowed, positions and causal set; flatten the "
                           "batch and sequence axes of the logits; for each of ae_targets and par_targets take "
                           "F.cross_entropy with ignore_index=IGNORE_INDEX, or a zero 0-d tensor of the logits' "
                           "dtype when every target is IGNORE_INDEX. Return the pair.")),
}
