"""UniLM: one shared Transformer, four language-model objectives, chosen by the attention mask alone.

UniLM (Dong et al. 2019, arXiv 1905.03197) trains ONE Transformer on a sequence `S1 [EOS] S2 [EOS]` with

    A = softmax(Q K^T / sqrt(d) + M) V,     M[i, j] = 0 if allowed[i, j] else -inf

and only `allowed` (query i may attend to key j) differs between the objectives:

    bidirectional   every j                                   (BERT-like cloze)
    left_to_right   j <= i                                    (diagonal included, see the convention below)
    right_to_left   j >= i
    seq2seq         j in the source, or (i, j both in the target and j <= i); source rows never see the target
    semi_causal     j <= i, or i and j in the same span       (MetaLM, arXiv 2206.06336: causal with
                                                               bidirectional blocks on the diagonal)

The semi-causal mask is a single-stack simplification of MetaLM: there the bidirectional spans are read by
separate non-causal encoders docked into the causal decoder through a connector; here one shared Transformer
reads them under an all-ones block of the mask.

A batch mixes the objectives 1/3 bidirectional, 1/3 seq2seq, 1/6 left-to-right, 1/6 right-to-left, and
segment ids double as objective identifiers (`SEGMENT_IDS`, from the official loader's `new_segment_ids`).

The convention (the pitfall of this chapter). UniLM is a CLOZE model: a predicted position holds [MASK] in
the input and its own output predicts the original token, so row i may see column i (it sees [MASK], not the
answer). A GPT is a SHIFTED model: the input holds the true tokens and row i predicts x_{i+1}. Both are fine;
true tokens + unshifted targets + a visible diagonal leaks the answer (tests/test_masks.py shows it).
`cloze_inputs` and `shifted_inputs` build the two conventions; every mask here is for the cloze one.

Paper vs official code (microsoft/unilm, unilm-v1 seq2seq_loader.py and s2s-ft modeling.py): the loader fills
the source columns with ones and copies one `tril` into the target block; s2s-ft writes the same mask as
`allowed = w_key <= w_query` with `w = [0] * src ++ target positions`. Cloze masking follows the paper's 15%
(ours: every picked token becomes [MASK]; the paper's 80/10/10 replacement and n-gram masking are left out).
Tokens: the synthetic tasks have no spare symbol, so [MASK] is one id past the task vocabulary (`mask_id`).
`unilm_batch` departs from the paper's pre-training in two ways: it masks only the target of a seq2seq row
(a masked source token would be predicted bidirectionally, which the bidirectional rows already train; it is
also what s2s-ft fine-tuning does), and it has no next-sentence prediction (the synthetic tasks have no
sentence pairs to tell apart).
"""

import torch

from nanomodels.attention import causal_mask

OBJECTIVES = ("bidirectional", "seq2seq", "left_to_right", "right_to_left")
OBJECTIVE_PROBS = (1 / 3, 1 / 3, 1 / 6, 1 / 6)
SEGMENT_IDS = {"bidirectional": (0, 1), "left_to_right": (2, 2), "right_to_left": (3, 3), "seq2seq": (4, 5)}


def _check_length(name: str, value: int, minimum: int = 0) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")


def bidirectional_mask(n: int) -> torch.Tensor:
    """(n, n) all True: every position sees every position."""
    _check_length("n", n)
    return torch.ones(n, n, dtype=torch.bool)


def left_to_right_mask(n: int) -> torch.Tensor:
    """(n, n) True where key <= query (cloze convention: the diagonal is visible, it holds [MASK])."""
    _check_length("n", n)
    return causal_mask(n)


def right_to_left_mask(n: int) -> torch.Tensor:
    """(n, n) True where key >= query: the left-to-right mask transposed."""
    _check_length("n", n)
    return causal_mask(n).T


def seq2seq_mask(src_len: int, tgt_len: int) -> torch.Tensor:
    """(n, n), n = src_len + tgt_len: allowed[i, j] = j < src_len or (i >= src_len and j <= i)."""
    _check_length("src_len", src_len)
    _check_length("tgt_len", tgt_len)
    # BEGIN EXERCISE 2.1: the seq2seq (prefix LM) mask
    n = src_len + tgt_len
    query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]
    sees_source = key < src_len  # every row sees the whole source
    target_causal = (query >= src_len) & (key <= query)  # target rows also see the target up to themselves
    return sees_source | target_causal
    # END EXERCISE


def semi_causal_mask(n: int, spans) -> torch.Tensor:
    """(n, n): j <= i, or i and j inside the same half-open span (start, end). Spans must not overlap."""
    _check_length("n", n)
    span_id = torch.zeros(n, dtype=torch.long)  # 0 = outside every span, k + 1 = inside spans[k]
    for k, (start, end) in enumerate(spans):
        if not (0 <= start < end <= n):
            raise ValueError(f"spans: each (start, end) needs 0 <= start < end <= n = {n}, got {(start, end)}")
        if bool((span_id[start:end] != 0).any()):
            raise ValueError(f"spans: {(start, end)} overlaps an earlier span; spans must be disjoint")
        span_id[start:end] = k + 1
    # BEGIN EXERCISE 2.2: the semi-causal mask
    same_span = (span_id[:, None] == span_id[None, :]) & (span_id[:, None] != 0)
    return causal_mask(n) | same_span
    # END EXERCISE


def key_padding_mask(lengths, n: int) -> torch.Tensor:
    """(B, 1, n): True where key j < lengths[b]. `mask & key_padding_mask(lengths, n)` -> (B, n, n).

    Padding queries may keep their rows: attention gives a fully masked row zeros, and the loss ignores them.
    """
    lengths = torch.as_tensor(lengths, dtype=torch.long).reshape(-1)
    if bool(((lengths < 0) | (lengths > n)).any()):
        raise ValueError(f"lengths: each length must be in [0, n = {n}], got {lengths.tolist()}")
    return (torch.arange(n)[None, :] < lengths[:, None])[:, None, :]


def objective_mask(objective: str, src_len: int, tgt_len: int) -> torch.Tensor:
    """The (n, n) mask of one of OBJECTIVES for the layout source ++ target."""
    n = src_len + tgt_len
    masks = {"bidirectional": lambda: bidirectional_mask(n), "left_to_right": lambda: left_to_right_mask(n),
             "right_to_left": lambda: right_to_left_mask(n), "seq2seq": lambda: seq2seq_mask(src_len, tgt_len)}
    if objective not in masks:
        raise ValueError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")
    return masks[objective]()


def sample_objectives(batch: int, generator: torch.Generator) -> torch.Tensor:
    """(batch,) indices into OBJECTIVES drawn with OBJECTIVE_PROBS = (1/3, 1/3, 1/6, 1/6)."""
    _check_length("batch", batch)
    return torch.multinomial(torch.tensor(OBJECTIVE_PROBS), batch, replacement=True, generator=generator)


def segment_ids(objective: str, src_len: int, tgt_len: int) -> torch.Tensor:
    """(n,) segment ids that name the objective: the source gets SEGMENT_IDS[obj][0], the target [obj][1]."""
    if objective not in SEGMENT_IDS:
        raise ValueError(f"objective: must be one of {OBJECTIVES}, got {objective!r}")
    first, second = SEGMENT_IDS[objective]
    return torch.tensor([first] * src_len + [second] * tgt_len)


def cloze_inputs(tokens: torch.Tensor, predict: torch.Tensor, mask_id: int):
    """Cloze convention: (inputs, targets). inputs = tokens with [MASK] where `predict`; targets = the tokens
    there and -100 elsewhere. Row i predicts x_i from an input that no longer holds x_i: the diagonal may stay."""
    if predict.shape != tokens.shape or predict.dtype != torch.bool:
        raise ValueError(f"predict: must be a boolean tensor of the tokens' shape {tuple(tokens.shape)}")
    return tokens.masked_fill(predict, mask_id), tokens.masked_fill(~predict, -100)


def shifted_inputs(tokens: torch.Tensor):
    """Next-token convention: (inputs, targets) = (x[..., :-1], x[..., 1:]). Row i holds x_i, predicts x_{i+1}."""
    return tokens[..., :-1], tokens[..., 1:]


def unilm_batch(tokens: torch.Tensor, src_len: int, mask_id: int, generator: torch.Generator,
                mask_prob: float = 0.15) -> dict:
    """One mixed-objective cloze batch from tokens (B, n) laid out source ++ target; every draw from `generator`.

    Per row: an objective from `sample_objectives` (an index into OBJECTIVES); each eligible token becomes [MASK]
    independently with probability `mask_prob`, and a row that drew none gets one, placed uniformly among its
    eligible tokens. Eligible: every token, except for seq2seq where only the target is predicted (its source rows
    are bidirectional, which the bidirectional objective already trains). Inputs and targets as `cloze_inputs`
    makes them; per row, `allowed` is its objective's mask and `segments` its SEGMENT_IDS.
    Returns inputs, targets (B, n), allowed (B, n, n), segments (B, n), objective (B,).
    """
    B, n = tokens.shape
    if not 0 < src_len < n:
        raise ValueError(f"src_len: must be in (0, n = {n}) so that source and target are non-empty, got {src_len}")
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob: must be in (0, 1], got {mask_prob}")
    # BEGIN EXERCISE 2.4: a mixed-objective UniLM batch, end to end
    objective = sample_objectives(B, generator)
    eligible = torch.ones(B, n, dtype=torch.bool)
    eligible[objective == OBJECTIVES.index("seq2seq"), :src_len] = False
    noise = torch.rand(B, n, generator=generator).masked_fill(~eligible, 2.0)
    predict = (noise < mask_prob) | (noise == noise.min(dim=1, keepdim=True).values)  # at least one per row
    inputs, targets = cloze_inputs(tokens, predict, mask_id)
    names = [OBJECTIVES[o] for o in objective.tolist()]
    allowed = torch.stack([objective_mask(name, src_len, n - src_len) for name in names])
    segments = torch.stack([segment_ids(name, src_len, n - src_len) for name in names])
    return {"inputs": inputs, "targets": targets, "allowed": allowed, "segments": segments, "objective": objective}
    # END EXERCISE


@torch.no_grad()
def cloze_decode(model, prefix: torch.Tensor, steps: int, mask_id: int, *, objective: str = "seq2seq"):
    """Greedy UniLM decoding (the official BertForSeq2SeqDecoder, with a key/value cache).

    Returns (tokens (B, steps), logits (B, steps, |V|)): the prediction read at each appended [MASK].
    The prefix is encoded once (bidirectionally for seq2seq, causally for left_to_right). Each step appends
    [MASK] at the next position, reads the prediction there, and then caches the PREDICTED token at that
    position instead: the [MASK]'s keys and values are thrown away (they live in a scratch copy of the cache).
    """
    if objective not in ("seq2seq", "left_to_right"):
        raise ValueError(f"objective: decoding needs 'seq2seq' or 'left_to_right', got {objective!r}")
    _check_length("steps", steps)
    B = prefix.size(0)
    # BEGIN EXERCISE 2.3: cloze decoding with a cache
    cache = [{} for _ in model.blocks]
    model(prefix, causal=objective == "left_to_right", cache=cache)
    out, all_logits = [], []
    for _ in range(steps):
        scratch = [dict(layer) for layer in cache]  # the [MASK] goes into a copy; its k, v are dropped
        logits, _ = model(torch.full((B, 1), mask_id, device=prefix.device), causal=False, cache=scratch)
        token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
        all_logits.append(logits[:, -1])
        model(token, causal=False, cache=cache)  # the new query sees the cache and itself: both masks agree
        out.append(token)
    if not out:
        return prefix.new_zeros(B, 0), torch.zeros(B, 0, model.config.vocab_size)
    return torch.cat(out, dim=1), torch.stack(all_logits, dim=1)
    # END EXERCISE
