"""Chapter 02's graded checks: the seq2seq mask, the semi-causal mask, cloze decoding with a cache.

Each check tests the mechanism (who may attend to whom; cached decoding = full recompute) against the learner's
function, its first argument. Known-wrong solutions: exercises/mutants/ch02_*.py.
"""

import torch
from hypothesis import strategies as st

from exercises.checking import Exercise, Violation, check
from exercises.checks.common import expect_tensor
from nanomodels.attention import attention, causal_mask
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

@check("seq2seq_mask(src_len, tgt_len) is a boolean (n, n) tensor with n = src_len + tgt_len", src=lengths, tgt=lengths)
def shape_and_dtype(seq2seq_mask, src, tgt):
    _bool_square(seq2seq_mask(src, tgt), src + tgt, f"seq2seq_mask({src}, {tgt})")


@check("source rows (i < src_len) never see a target key (j >= src_len)", src=lengths, tgt=lengths)
def source_rows_never_see_the_target(seq2seq_mask, src, tgt):
    m = _bool_square(seq2seq_mask(src, tgt), src + tgt, "seq2seq_mask")
    if m[:src, src:].any():
        i, j = _first(m[:src, src:])
        raise Violation(f"with src_len={src}, tgt_len={tgt}: source row {i} sees target key {src + j}")


@check("every row, source or target, sees the whole source", src=lengths, tgt=lengths)
def every_row_sees_the_whole_source(seq2seq_mask, src, tgt):
    m = _bool_square(seq2seq_mask(src, tgt), src + tgt, "seq2seq_mask")
    if not m[:, :src].all():
        i, j = _first(~m[:, :src])
        raise Violation(f"with src_len={src}, tgt_len={tgt}: row {i} does not see source key {j}")


@check("target rows see the target left to right, their own position included (j <= i)", src=lengths, tgt=lengths)
def target_block_is_left_to_right(seq2seq_mask, src, tgt):
    m = _bool_square(seq2seq_mask(src, tgt), src + tgt, "seq2seq_mask")
    bad = m[src:, src:] != causal_mask(tgt)
    if bad.any():
        i, j = _first(bad)
        raise Violation(f"with src_len={src}, tgt_len={tgt}: target row {src + i}, target key {src + j} is "
                        f"{bool(m[src + i, src + j])}, expected {j <= i} (key <= query)")


# ---- 2.2 the semi-causal mask -----------------------------------------------------------------------------

@st.composite
def span_sets(draw):
    n = draw(st.integers(1, 10))
    cuts = sorted(set(draw(st.lists(st.integers(0, n), max_size=6))))
    spans = [(a, b) for a, b in zip(cuts[::2], cuts[1::2]) if a < b]
    return n, list(draw(st.permutations(spans)))  # the spans in any order


def _semi(semi_causal_mask, n, spans):
    return _bool_square(semi_causal_mask(n, spans), n, f"semi_causal_mask({n}, {spans})")


@check("allowed[i, j] = (j <= i) or (i and j inside the same span); nothing else is visible", case=span_sets(),
       max_examples=100)
def matches_the_rule(semi_causal_mask, case):
    n, spans = case
    m = _semi(semi_causal_mask, n, spans)
    for i in range(n):
        for j in range(n):
            expected = j <= i or any(a <= i < b and a <= j < b for a, b in spans)
            if bool(m[i, j]) != expected:
                raise Violation(f"n={n}, spans={spans}: allowed[{i}, {j}] is {bool(m[i, j])}, expected {expected}")


@check("a position before a span does not see it (the span block sits on the diagonal, not a column stripe)",
       case=span_sets())
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
       case=decode_cases)
def seq2seq_cached_equals_full_recompute(cloze_decode, case):
    _check_decoder(cloze_decode, case, "seq2seq")


@check("left-to-right decoding with the cache equals re-running prefix + decoded tokens + [MASK] with the "
       "left-to-right mask at every step (the prompt is encoded causally)", case=decode_cases)
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
}
