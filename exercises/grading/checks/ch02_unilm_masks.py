"""Chapter 02's graded checks: the seq2seq mask, the semi-causal mask, cloze decoding with a cache, and a
mixed-objective UniLM batch end to end (with a short training run on the learner's batches).

Each check tests the mechanism (who may attend to whom; cached decoding = full recompute) against the learner's
function, its first argument. Known-wrong solutions: exercises/grading/mutants/ch02_*.md.
"""

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import Z, expect_tensor
from nanomodels.attention import attention, causal_mask
from nanomodels.data import make_task
from nanomodels.masks import OBJECTIVE_PROBS, OBJECTIVES, SEGMENT_IDS
from nanomodels.masks import unilm_batch as library_unilm_batch
from nanomodels.transformer import Transformer, TransformerConfig

lengths = st.integers(0, 8)


def _bool_square(out, n: int, what: str) -> torch.Tensor:
    if type(out) is not torch.Tensor:
        raise Violation(f"{what} returned a {type(out).__name__}, expected a boolean tensor of shape ({n}, {n})")
    if tuple(out.shape) != (n, n) or out.dtype != torch.bool:
        raise Violation(f"{what} returned shape {tuple(out.shape)} and dtype {out.dtype}, expected ({n}, {n}) bool")
    return out


def _first(bad: torch.Tensor) -> tuple[int, int]:
    i, j = bad.nonzero()[0].tolist()
    return i, j


# ---- 2.1 the seq2seq mask ---------------------------------------------------------------------------------
# corner cases: no source (src_len = 0: the left-to-right mask); no target (tgt_len = 0: all True); both 0 (a
# 0 x 0 mask); one source and one target token. Pinned in every 2.1 check (PINNED_LENGTHS).
PINNED_LENGTHS = [dict(src=0, tgt=4), dict(src=4, tgt=0), dict(src=0, tgt=0), dict(src=1, tgt=1)]

@check("seq2seq_mask(src_len, tgt_len) is a boolean (n, n) tensor with n = src_len + tgt_len", src=lengths, tgt=lengths,
       examples=PINNED_LENGTHS)
def shape_and_dtype(seq2seq_mask, src, tgt):
    _bool_square(seq2seq_mask(src, tgt), src + tgt, f"seq2seq_mask({src}, {tgt})")


@check("source rows (i < src_len) never see a target key (j >= src_len)", src=lengths, tgt=lengths,
       examples=PINNED_LENGTHS)
def source_rows_never_see_the_target(seq2seq_mask, src, tgt):
    m = _bool_square(seq2seq_mask(src, tgt), src + tgt, "seq2seq_mask")
    if m[:src, src:].any():
        i, j = _first(m[:src, src:])
        raise Violation(f"with src_len={src}, tgt_len={tgt}: source row {i} sees target key {src + j}")


@check("every row, source or target, sees the whole source", src=lengths, tgt=lengths,
       examples=PINNED_LENGTHS)
def every_row_sees_the_whole_source(seq2seq_mask, src, tgt):
    m = _bool_square(seq2seq_mask(src, tgt), src + tgt, "seq2seq_mask")
    if not m[:, :src].all():
        i, j = _first(~m[:, :src])
        raise Violation(f"with src_len={src}, tgt_len={tgt}: row {i} does not see source key {j}")


@check("target rows see the target left to right, their own position included (j <= i)", src=lengths, tgt=lengths,
       examples=PINNED_LENGTHS)
def target_block_is_left_to_right(seq2seq_mask, src, tgt):
    m = _bool_square(seq2seq_mask(src, tgt), src + tgt, "seq2seq_mask")
    bad = m[src:, src:] != causal_mask(tgt)
    if bad.any():
        i, j = _first(bad)
        raise Violation(f"with src_len={src}, tgt_len={tgt}: target row {src + i}, target key {src + j} is "
                        f"{bool(m[src + i, src + j])}, expected {j <= i} (key <= query)")


# ---- 2.2 the semi-causal mask -----------------------------------------------------------------------------
# corner cases: no span; one span over everything; a prefix span (seq2seq); a span of one position; a span that
# ends at n; two ADJACENT spans (b of one = a of the next: span_sets never draws them, its cuts are distinct);
# spans given out of order; n = 1. Pinned: PINNED_SPANS (adjacent, one-position, at the end, out of order).
PINNED_SPANS = [dict(case=(6, [(2, 5), (0, 2)])), dict(case=(5, [(4, 5), (1, 2), (2, 4)])), dict(case=(1, [(0, 1)]))]

@st.composite
def span_sets(draw):
    n = draw(st.integers(1, 10))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    return n, list(draw(st.permutations(spans)))  # the spans in any order


def _semi(semi_causal_mask, n, spans):
    return _bool_square(semi_causal_mask(n, spans), n, f"semi_causal_mask({n}, {spans})")


@check("allowed[i, j] = (j <= i) or (i and j inside the same span); nothing else is visible", case=span_sets(),
       max_examples=100, examples=PINNED_SPANS)
def matches_the_rule(semi_causal_mask, case):
    n, spans = case
    m = _semi(semi_causal_mask, n, spans)
    for i in range(n):
        for j in range(n):
            expected = j <= i or any(a <= i < b and a <= j < b for a, b in spans)
            if bool(m[i, j]) != expected:
                raise Violation(f"n={n}, spans={spans}: allowed[{i}, {j}] is {bool(m[i, j])}, expected {expected}")


@check("a position before a span does not see it (the span block sits on the diagonal, not a column stripe)",
       case=span_sets(), examples=PINNED_SPANS)
def nothing_before_a_span_sees_it(semi_causal_mask, case):
    n, spans = case
    m = _semi(semi_causal_mask, n, spans)
    for a, b in spans:
        if m[:a, a:b].any():
            i, j = _first(m[:a, a:b])
            raise Violation(f"n={n}, spans={spans}: position {i}, before span {(a, b)}, sees {a + j} inside it")


@check("the reductions: no span = left-to-right, one span over everything = bidirectional, a prefix span = seq2seq",
       n=st.integers(1, 9), s=st.integers(1, 9))
def reductions(semi_causal_mask, n, s):
    if not torch.equal(_semi(semi_causal_mask, n, []), causal_mask(n)):
        raise Violation(f"semi_causal_mask({n}, []) is not the left-to-right (lower-triangular) mask")
    if not _semi(semi_causal_mask, n, [(0, n)]).all():
        raise Violation(f"semi_causal_mask({n}, [(0, {n})]) is not all True")
    s = min(s, n)
    m = _semi(semi_causal_mask, n, [(0, s)])
    expected = causal_mask(n)
    expected[:, :s] = True
    if not torch.equal(m, expected):
        raise Violation(f"semi_causal_mask({n}, [(0, {s})]) is not the seq2seq mask with source length {s}")


# ---- 2.3 cloze decoding with a cache ----------------------------------------------------------------------
# corner cases: steps = 0 (empty results); steps = 1 (only the prompt in the cache); a one-token prompt; rows of
# one batch that decode different tokens (the model's large weights); both objectives. Pinned: one step after a
# one-token prompt (PINNED_DECODE); steps = 0 in zero_steps_return_empty_results.

V, MASK = 11, 11


def _model(seed: int) -> Transformer:
    """A tiny float64 model whose weights are large enough that its greedy choices depend on the input (with
    the usual 0.02 init every row of a batch would predict the same tokens)."""
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=V + 1, block_size=16, n_layers=2, d_model=16, n_heads=2)
    model = Transformer(cfg, attention_fn=attention).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model


def _full_recompute(model, prefix, steps, objective):
    src, seq, logits = prefix.size(1), prefix, []
    for t in range(steps):
        n = src + t + 1
        allowed = causal_mask(n)
        if objective == "seq2seq":
            allowed[:, :src] = True
        full = torch.cat([seq, torch.full((len(seq), 1), MASK)], dim=1)
        last = model(full, allowed=allowed, causal=False)[0][:, -1]
        logits.append(last)
        seq = torch.cat([seq, last.argmax(-1, keepdim=True)], dim=1)
    return seq[:, src:], torch.stack(logits, dim=1)


decode_cases = st.fixed_dictionaries({"seed": st.integers(0, 10_000), "batch": st.integers(2, 3),
                                      "src": st.integers(1, 6), "steps": st.integers(1, 6)})
PINNED_DECODE = [dict(case={"seed": 0, "batch": 2, "src": 1, "steps": 1})]


def _check_decoder(cloze_decode, case, objective):
    model = _model(case["seed"])
    prefix = torch.randint(0, V, (case["batch"], case["src"]), generator=torch.Generator().manual_seed(case["seed"]))
    out = cloze_decode(model, prefix, case["steps"], MASK, objective=objective)
    if not (type(out) is tuple and len(out) == 2):
        raise Violation(f"cloze_decode returned {type(out).__name__}, expected a pair (tokens, logits)")
    tokens, logits = out
    ref_tokens, ref_logits = _full_recompute(model, prefix, case["steps"], objective)
    if tuple(logits.shape) != tuple(ref_logits.shape):
        raise Violation(f"logits have shape {tuple(logits.shape)}, expected {tuple(ref_logits.shape)} "
                        "(batch, steps, vocabulary)")
    diff = (logits - ref_logits).abs().amax(dim=(0, 2))
    for t in (diff > 1e-9).nonzero().flatten().tolist()[:1]:
        raise Violation(f"{objective}, source length {case['src']}: the logits at step {t} differ from re-running "
                        f"the whole prefix + [MASK] with the {objective} mask by {diff[t]:.3g}")
    expect_tensor(tokens, tuple(ref_tokens.shape), torch.int64, "cloze_decode's tokens")
    if not torch.equal(tokens, ref_tokens):
        raise Violation(f"{objective}: the tokens {torch.as_tensor(tokens).tolist()} are not the greedy choices "
                        f"{ref_tokens.tolist()}")


@check("seq2seq decoding with the cache gives the logits of re-running source + decoded tokens + [MASK] with the "
       "seq2seq mask at every step (the [MASK] is never kept, the prompt is encoded bidirectionally)",
       case=decode_cases, examples=PINNED_DECODE)
def seq2seq_cached_equals_full_recompute(cloze_decode, case):
    _check_decoder(cloze_decode, case, "seq2seq")


@check("left-to-right decoding with the cache equals re-running prefix + decoded tokens + [MASK] with the "
       "left-to-right mask at every step (the prompt is encoded causally)", case=decode_cases,
       examples=PINNED_DECODE)
def left_to_right_cached_equals_full_recompute(cloze_decode, case):
    _check_decoder(cloze_decode, case, "left_to_right")


@check("steps=0 decodes nothing: tokens of shape (B, 0) (int64) and logits of shape (B, 0, |V|), no error",
       objective=st.sampled_from(["seq2seq", "left_to_right"]), batch=st.integers(1, 3))
def zero_steps_return_empty_results(cloze_decode, objective, batch):
    model = _model(0)
    out = cloze_decode(model, torch.zeros(batch, 3, dtype=torch.long), 0, MASK, objective=objective)
    if not (type(out) is tuple and len(out) == 2):
        raise Violation(f"cloze_decode(..., steps=0) returned {type(out).__name__}, expected a pair (tokens, logits)")
    expect_tensor(out[0], (batch, 0), torch.int64, "cloze_decode(..., steps=0)'s tokens")
    if type(out[1]) is not torch.Tensor or tuple(out[1].shape) != (batch, 0, V + 1):
        raise Violation(f"cloze_decode(..., steps=0)'s logits have shape {tuple(getattr(out[1], 'shape', ()))}, "
                        f"expected ({batch}, 0, {V + 1})")


# ---- 2.4 a mixed-objective UniLM batch, end to end --------------------------------------------------------
# corner cases: n = 2 (one source, one target token); a seq2seq row whose target is one token (src_len = n - 1:
# the forced [MASK] must be that token); one batch row; mask_prob = 1 (every eligible token); rows of one batch
# with different objectives (per-row masks). Pinned: PINNED_BATCHES.
PINNED_BATCHES = [dict(case={"batch": 1, "n": 2, "src": 1, "mask_id": 12, "mask_prob": 1.0, "seed": 0}),
                  dict(case={"batch": 6, "n": 4, "src": 3, "mask_id": 300, "mask_prob": 0.15, "seed": 7})]

FIELDS = ("inputs", "targets", "allowed", "segments", "objective")


def who_sees_whom(objective: str, src: int, n: int) -> torch.Tensor:
    """The four objectives' rules, one (query, key) at a time."""
    rule = {"bidirectional": lambda i, j: True, "left_to_right": lambda i, j: j <= i,
            "right_to_left": lambda i, j: j >= i, "seq2seq": lambda i, j: j < src or (i >= src and j <= i)}
    return torch.tensor([[rule[objective](i, j) for j in range(n)] for i in range(n)], dtype=torch.bool)


@st.composite
def batch_cases(draw):
    n = draw(st.integers(2, 12))
    return {"batch": draw(st.integers(1, 6)), "n": n, "src": draw(st.integers(1, n - 1)),
            "mask_id": draw(st.sampled_from([12, 300, 1000])), "mask_prob": draw(st.sampled_from([0.15, 0.5, 1.0])),
            "seed": draw(st.integers(0, 2 ** 16))}


def _unilm(unilm_batch, tokens, src, mask_id, seed, mask_prob):
    B, n = tokens.shape
    out = unilm_batch(tokens, src, mask_id, torch.Generator().manual_seed(seed), mask_prob=mask_prob)
    if type(out) is not dict or set(out) != set(FIELDS):
        keys = sorted(out) if isinstance(out, dict) else "-"
        raise Violation(f"unilm_batch returned {type(out).__name__} with keys {keys}, expected a dict with exactly "
                        f"the keys {list(FIELDS)}")
    for key, shape, dtype in (("inputs", (B, n), torch.int64), ("targets", (B, n), torch.int64),
                              ("allowed", (B, n, n), torch.bool), ("segments", (B, n), torch.int64),
                              ("objective", (B,), torch.int64)):
        expect_tensor(out[key], shape, dtype, f"unilm_batch's {key!r}")
    if bool(((out["objective"] < 0) | (out["objective"] >= len(OBJECTIVES))).any()):
        raise Violation(f"objective {out['objective'].tolist()}: each must index OBJECTIVES {OBJECTIVES}")
    return out


def _drawn(case):
    g = torch.Generator().manual_seed(case["seed"] + 1)
    return torch.randint(0, case["mask_id"], (case["batch"], case["n"]), generator=g)


@check("every row gets the mask and the segment ids of its own objective: allowed[b] is that objective's "
       "who-sees-whom rule for source length src_len, segments[b] is SEGMENT_IDS[objective] over source and "
       "target", case=batch_cases(), examples=PINNED_BATCHES)
def each_row_gets_its_objectives_mask_and_segments(unilm_batch, case):
    tokens = _drawn(case)
    out = _unilm(unilm_batch, tokens, case["src"], case["mask_id"], case["seed"], case["mask_prob"])
    src, n = case["src"], case["n"]
    for b, o in enumerate(out["objective"].tolist()):
        name = OBJECTIVES[o]
        bad = out["allowed"][b] != who_sees_whom(name, src, n)
        if bad.any():
            i, j = bad.nonzero()[0].tolist()
            raise Violation(f"row {b} is {name} (src_len {src}, n {n}), but its allowed[{i}, {j}] is "
                            f"{bool(out['allowed'][b, i, j])}: each row takes its OWN objective's mask")
        first, second = SEGMENT_IDS[name]
        want = [first] * src + [second] * (n - src)
        if out["segments"][b].tolist() != want:
            raise Violation(f"row {b} is {name}: segments {out['segments'][b].tolist()}, expected {want} "
                            f"(SEGMENT_IDS[{name!r}] = {SEGMENT_IDS[name]}: the source's id, then the target's)")


@check("cloze inputs and targets: a predicted token is [MASK] in the inputs and its original id in the targets; "
       "every other token is unchanged in the inputs and -100 in the targets; each row predicts at least one "
       "token, and a seq2seq row never one of its source", case=batch_cases(), examples=PINNED_BATCHES)
def predicted_tokens_are_masked_and_labelled(unilm_batch, case):
    tokens = _drawn(case)
    out = _unilm(unilm_batch, tokens, case["src"], case["mask_id"], case["seed"], case["mask_prob"])
    predict = out["inputs"] == case["mask_id"]
    changed = (out["inputs"] != tokens) & ~predict
    if changed.any():
        b, i = changed.nonzero()[0].tolist()
        raise Violation(f"row {b}, position {i}: the input is {int(out['inputs'][b, i])}, neither the token "
                        f"{int(tokens[b, i])} nor [MASK] = {case['mask_id']}")
    want = tokens.masked_fill(~predict, -100)
    bad = out["targets"] != want
    if bad.any():
        b, i = bad.nonzero()[0].tolist()
        what = "a [MASK]ed token" if predict[b, i] else "an unmasked token"
        raise Violation(f"row {b}, position {i} holds {what}; its target is {int(out['targets'][b, i])}, expected "
                        f"{int(want[b, i])} (the original id where the input is [MASK], -100 elsewhere)")
    for b in (~predict.any(dim=1)).nonzero().flatten().tolist()[:1]:
        raise Violation(f"row {b} ({OBJECTIVES[int(out['objective'][b])]}, n {case['n']}, mask_prob "
                        f"{case['mask_prob']}) predicts nothing: every row needs at least one [MASK]")
    s2s = out["objective"] == OBJECTIVES.index("seq2seq")
    source = predict[:, :case["src"]] & s2s[:, None]
    if source.any():
        b, i = source.nonzero()[0].tolist()
        raise Violation(f"row {b} is seq2seq and masks its source token {i} (src_len {case['src']}): a seq2seq "
                        "row predicts only its target")


def _many(unilm_batch, rows, n, src, mask_prob, seed):
    tokens = torch.randint(0, 12, (rows, n), generator=torch.Generator().manual_seed(seed))
    return _unilm(unilm_batch, tokens, src, 12, seed, mask_prob)


@check("the objectives are drawn one per row with the paper's mix, 1/3 bidirectional, 1/3 seq2seq, 1/6 "
       "left-to-right, 1/6 right-to-left (4000 rows, within 6 standard deviations)", seed=st.integers(0, 1000),
       max_examples=3)
def objectives_follow_the_paper_mix(unilm_batch, seed):
    rows = 4000
    out = _many(unilm_batch, rows, 6, 3, 0.15, seed)
    freq = torch.bincount(out["objective"], minlength=len(OBJECTIVES)).double() / rows
    # False rejection: 4 frequencies of 4000 rows, each within Z = 6 standard errors: < 4 x 2e-9 = 8e-9
    for o, (f, p) in enumerate(zip(freq.tolist(), OBJECTIVE_PROBS)):
        if abs(f - p) > Z * (p * (1 - p) / rows) ** 0.5:
            raise Violation(f"{OBJECTIVES[o]} came up in {f:.1%} of {rows} rows, expected {p:.1%} (OBJECTIVES "
                            f"{OBJECTIVES} with OBJECTIVE_PROBS); all: {[round(x, 3) for x in freq.tolist()]}")


@check("each eligible token is [MASK]ed independently with probability mask_prob, plus one forced where a row "
       "drew none: per position p + (1 - p)^m / m over the m eligible tokens of the row (4000 rows, within 6 "
       "standard deviations), and never a seq2seq source token", mask_prob=st.sampled_from([0.15, 0.5, 1e-9]),
       seed=st.integers(0, 1000), max_examples=4)
def each_eligible_token_is_masked_with_mask_prob(unilm_batch, mask_prob, seed):
    rows, n, src = 4000, 8, 3
    out = _many(unilm_batch, rows, n, src, mask_prob, seed)
    predict = out["inputs"] == 12
    for o, name in enumerate(OBJECTIVES):
        group = predict[out["objective"] == o]
        if len(group) < 100:
            continue
        first = src if name == "seq2seq" else 0
        m = n - first
        p = mask_prob + (1 - mask_prob) ** m / m
        rate = group.double().mean(dim=0)
        # False rejection: groups of >= 100 rows (about 660 to 1330 of 4000), 8 positions x 4 objectives, each
        # rate within 6 standard errors: < 32 x 2e-9 = 7e-8 (normal approximation of the binomial)
        for i in range(n):
            want = p if i >= first else 0.0
            if abs(rate[i].item() - want) > Z * (max(want * (1 - want), 1e-4) / len(group)) ** 0.5:
                where = "a seq2seq source token" if i < first else f"position {i}"
                raise Violation(f"mask_prob {mask_prob}: in the {len(group)} {name} rows, {where} is [MASK]ed in "
                                f"{rate[i].item():.1%} of them, expected {want:.1%} (each of the {m} eligible "
                                f"tokens with probability mask_prob, and one more, uniformly placed, in a row "
                                f"that drew none); all positions: {[round(r, 3) for r in rate.tolist()]}")


@check("the batch is drawn from `generator` alone: the same seed gives the same batch whatever the global RNG "
       "holds, the global RNG is left as it was, and another seed gives another batch", seed=st.integers(0, 1000),
       max_examples=5)
def draws_only_from_the_generator(unilm_batch, seed):
    tokens = torch.randint(0, 12, (16, 8), generator=torch.Generator().manual_seed(seed))
    torch.manual_seed(seed)
    state = torch.get_rng_state()
    first = _unilm(unilm_batch, tokens, 3, 12, seed, 0.3)
    if not torch.equal(torch.get_rng_state(), state):
        raise Violation("unilm_batch drew from the global RNG (its state changed): draw every random number with "
                        "`generator`")
    torch.manual_seed(seed + 7)
    again = _unilm(unilm_batch, tokens, 3, 12, seed, 0.3)
    for key in FIELDS:
        if not torch.equal(first[key], again[key]):
            raise Violation(f"two calls with torch.Generator().manual_seed({seed}) gave different {key!r}: the batch "
                            "must depend on `generator` only")
    other = _unilm(unilm_batch, tokens, 3, 12, seed + 1, 0.3)
    if all(torch.equal(first[k], other[k]) for k in FIELDS):
        raise Violation(f"seeds {seed} and {seed + 1} gave the same batch: the draws do not use `generator`")


REVERSE = make_task("reverse", 2)  # "31|" -> "13.": the source S1 is the prompt, the target S2 the answer
EXP_MASK = REVERSE.vocab_size  # [MASK], one past the task vocabulary
EXP_SRC, EXP_N = REVERSE.prompt_len, REVERSE.prompt_len + REVERSE.answer_len
EXP_STEPS, EXP_ROWS, EXP_PROB = 100, 32, 0.3


def _reverse_tokens(rows: int, generator: torch.Generator) -> torch.Tensor:
    x, y = REVERSE.batch(rows, generator)
    return torch.cat([x, y[:, -1:]], dim=1)  # prompt ++ answer


def cloze_loss(model, b) -> torch.Tensor:
    return model(b["inputs"], b["targets"], allowed=b["allowed"], causal=False)[1]


def unilm_experiment(unilm_batch) -> tuple[float, float, list]:
    """A tiny Transformer trained for EXP_STEPS AdamW steps on `unilm_batch`'s batches of the 2-digit reversal
    task; its cloze loss on 256 fresh rows batched by the LIBRARY, before and after, and the training losses."""
    torch.manual_seed(0)
    model = Transformer(TransformerConfig(vocab_size=EXP_MASK + 1, block_size=EXP_N, n_layers=2, d_model=32,
                                          n_heads=2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g, held_out = torch.Generator().manual_seed(0), torch.Generator().manual_seed(123)
    evaluation = library_unilm_batch(_reverse_tokens(256, held_out), EXP_SRC, EXP_MASK, held_out, EXP_PROB)

    def measured():
        model.eval()
        with torch.no_grad():
            value = cloze_loss(model, evaluation).item()
        model.train()
        return value

    start, losses = measured(), []
    for _ in range(EXP_STEPS):
        loss = cloze_loss(model, unilm_batch(_reverse_tokens(EXP_ROWS, g), EXP_SRC, EXP_MASK, g, mask_prob=EXP_PROB))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return start, measured(), losses


@check(f"the experiment: a tiny Transformer trained for {EXP_STEPS} steps on your batches of the 2-digit reversal "
       "task (seeded) has a cloze loss, on 256 fresh rows batched by the library, below half of its start "
       "(the library's own batches take it from 3.7 to about 1.3 nats)")
def training_on_the_batches_teaches_a_cloze_model(unilm_batch):
    start, end, losses = unilm_experiment(unilm_batch)
    if not end < start / 2:
        trained = f"; on your own batches the training loss went from {losses[0]:.2f} to {losses[-1]:.2f}" \
            if losses else ""
        raise Violation(f"after {EXP_STEPS} steps on your batches the cloze loss on the library's batches is "
                        f"{end:.3f} nats, from {start:.3f} at the start: not below half{trained}. A model that "
                        "learns from leaked answers, the wrong masks or the wrong targets does not transfer")


EXERCISES = {
    "2.1": Exercise(points=2, checks=[shape_and_dtype, source_rows_never_see_the_target,
                                      every_row_sees_the_whole_source, target_block_is_left_to_right],
                    hint="Write down who sees whom: a source row sees the source only; a target row sees "
                         "the source and the target up to itself.",
                    hints=("Broadcast query and key indices against each other and OR two boolean "
                           "conditions; build a new tensor on each call.",
                           "Compare a column of query indices with a row of key indices (broadcasting). A key is "
                           "visible when it is in the source (key < src_len), or when the query is in the target "
                           "and key <= query. One tril over everything is the left-to-right mask, not this one."),
                    pure=True),
    "2.2": Exercise(points=2, checks=[matches_the_rule, nothing_before_a_span_sees_it, reductions],
                    hint="The semi-causal mask is the causal mask plus the blocks where query and key are"
                         " in the same span.",
                    hints=("span_id (given) labels every position with its span (0 for none). Compare the"
                           " labels of every query with every key by broadcasting, and do not let two "
                           "positions outside every span count as 'the same span'.",
                           "span_id is 0 outside every span and k + 1 inside spans[k]. Two positions share a span "
                           "when their ids are equal AND not 0; OR that with causal_mask(n)."), pure=True),
    "2.3": Exercise(points=4, checks=[seq2seq_cached_equals_full_recompute, left_to_right_cached_equals_full_recompute,
                                      zero_steps_return_empty_results],
                    hint="Decoding with a cache means: run only the new token each step, and keep in the "
                         "cache exactly what a full recompute would see. Which tokens belong in the "
                         "cache, and which do not?",
                    hints=("Encode the prompt once (with the objective's own attention direction). Each "
                           "step appends a [MASK], reads the prediction at it, then forgets the [MASK] "
                           "and remembers the predicted token instead. A cache is a list of dicts, one "
                           "per block: a scratch copy is cheap. Also handle steps = 0.",
                           "Encode the prefix once with a fresh cache ([{} for each block]; causal only for "
                           "left_to_right). Per step: run [MASK] with causal=False on a copy of the cache "
                           "([dict(layer) for layer in cache]) and take the argmax; then run the predicted token "
                           "with causal=False on the real cache. Return (tokens, logits) stacked over the steps.")),
    "2.4": Exercise(points=4, checks=[each_row_gets_its_objectives_mask_and_segments,
                                      predicted_tokens_are_masked_and_labelled, objectives_follow_the_paper_mix,
                                      each_eligible_token_is_masked_with_mask_prob, draws_only_from_the_generator,
                                      training_on_the_batches_teaches_a_cloze_model],
                    hint="One batch trains four language models at once: every row draws its own objective, and "
                         "the objective decides three things for that row. Which tokens may be predicted, which "
                         "mask, which segment ids?",
                    hints=("Draw the objectives with sample_objectives and every other random number with "
                           "`generator`. Decide per token whether it is eligible (a seq2seq row predicts only its "
                           "target), mask each eligible token with probability mask_prob and force one where a row "
                           "drew none; cloze_inputs, objective_mask and segment_ids do the rest, row by row.",
                           "One uniform number per token from `generator`; make the ineligible ones too large to "
                           "count. A token is predicted when its number is below mask_prob, or when it is its row's "
                           "smallest. Then cloze_inputs(tokens, predict, mask_id); stack objective_mask(name, "
                           "src_len, n - src_len) and segment_ids(...) over the rows' objective names; return the "
                           "five fields.")),
}
