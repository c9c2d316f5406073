"""Property tests for nanomodels.masks (UniLM attention masks, objective sampler, cloze decoding), float64.

The invariants of the seq2seq and semi-causal masks and cloze decoding are the graded checks of chapter 02
(exercises/grading/checks/ch02_unilm_masks.py), run here against the library; this file adds what the grader does not
check.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.attention import attention
from nanomodels.masks import (OBJECTIVES, SEGMENT_IDS, bidirectional_mask, cloze_decode,
                              cloze_inputs, key_padding_mask, left_to_right_mask, objective_mask,
                              right_to_left_mask, sample_objectives, segment_ids, semi_causal_mask,
                              seq2seq_mask, shifted_inputs, unilm_batch)
from nanomodels.transformer import Transformer, TransformerConfig

V, MASK = 13, 13  # the toy vocabulary has ids 0..12; [MASK] is one past it
lengths = st.integers(0, 7)

CHAPTER = "02"  # tests/conftest.py runs its graded checks as `graded_check`


def model64(seed=0, n_layers=2):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=V + 1, block_size=24, n_layers=n_layers, d_model=16, n_heads=2)
    return Transformer(cfg, attention_fn=attention).double().eval()


def logits_of(model, idx, allowed):
    return model(idx, allowed=allowed, causal=False)[0]


# ---- the graded checks (seq2seq, semi-causal, cloze decoding), then the other masks ---------------------------------------------------------------------------------------

def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


@given(src=lengths, tgt=lengths)
def test_bidirectional_left_to_right_and_right_to_left_masks(src, tgt):
    n = src + tgt
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert bidirectional_mask(n).all() and bidirectional_mask(n).shape == (n, n)
    assert torch.equal(left_to_right_mask(n), k <= q), "left-to-right = lower triangle incl. the diagonal"
    assert torch.equal(right_to_left_mask(n), left_to_right_mask(n).T), "right-to-left = the transpose"


@pytest.mark.parametrize("call,match", [
    (lambda: seq2seq_mask(-1, 2), "src_len"), (lambda: seq2seq_mask(2, -3), "tgt_len"),
    (lambda: bidirectional_mask(-1), "n: "), (lambda: semi_causal_mask(5, [(3, 6)]), "spans"),
    (lambda: semi_causal_mask(5, [(2, 2)]), "spans"), (lambda: semi_causal_mask(6, [(0, 3), (2, 4)]), "overlaps"),
    (lambda: key_padding_mask([3, 7], 5), "lengths"), (lambda: objective_mask("gpt", 2, 2), "objective"),
    (lambda: unilm_batch(torch.zeros(2, 4, dtype=torch.long), 4, MASK, torch.Generator()), "src_len"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# ---- behaviour in a model -------------------------------------------------------------------------------

def test_seq2seq_source_states_unchanged_when_target_resampled():
    m, src, tgt = model64(), 5, 6
    idx = torch.randint(0, V, (3, src + tgt))
    other = idx.clone()
    other[:, src:] = torch.randint(0, V, (3, tgt))
    h1 = m.hidden(idx, allowed=seq2seq_mask(src, tgt), causal=False)
    h2 = m.hidden(other, allowed=seq2seq_mask(src, tgt), causal=False)
    assert torch.equal(h1[:, :src], h2[:, :src]), "source states changed with the target"
    for t in range(src, src + tgt):
        later = idx.clone()
        later[:, t + 1:] = (later[:, t + 1:] + 1) % V
        h3 = m.hidden(later, allowed=seq2seq_mask(src, tgt), causal=False)
        assert torch.equal(h3[:, :t + 1], h1[:, :t + 1]), f"target position {t} saw a later target token"


def embedding_grads(model, idx, row, **forward):
    """d(sum of the logits at `row`) / d(input embedding at every position) of model(idx, causal=False,
    **forward): (T,) gradient norms, 0 exactly where `row` cannot see. tests/test_pmlm.py uses it too."""
    store = {}

    def leaf(module, inputs, out):
        store["x"] = out.detach().requires_grad_(True)
        return store["x"]

    handle = model.embed.wte.register_forward_hook(leaf)
    try:
        model(idx, causal=False, **forward)[0][0, row].sum().backward()
    finally:
        handle.remove()
    return store["x"].grad[0].norm(dim=-1)


@pytest.mark.parametrize("name,mask_fn,blind", [
    ("left_to_right", left_to_right_mask, lambda i, j: j > i),
    ("right_to_left", right_to_left_mask, lambda i, j: j < i),
])
def test_causality_by_gradients(name, mask_fn, blind):
    m, n = model64(), 7
    idx = torch.randint(0, V, (1, n))
    for i in range(n):
        g = embedding_grads(m, idx, i, allowed=mask_fn(n))
        for j in range(n):
            if blind(i, j):
                assert g[j] == 0, f"{name}: output {i} has gradient {g[j]:.3g} w.r.t. token {j}"
            else:
                assert g[j] > 0, f"{name}: output {i} should depend on token {j}"


def test_all_ones_mask_is_no_mask_and_left_to_right_differs():
    m, idx = model64(), torch.randint(0, V, (2, 8))
    full = logits_of(m, idx, bidirectional_mask(8))
    assert torch.allclose(full, logits_of(m, idx, None), atol=1e-12, rtol=0)
    assert not torch.allclose(full, logits_of(m, idx, left_to_right_mask(8)), atol=1e-6)


def test_key_padding_hides_padded_keys():
    m, n = model64(), 8
    idx = torch.randint(0, V, (2, n))
    lengths = torch.tensor([5, 8])
    allowed = bidirectional_mask(n) & key_padding_mask(lengths, n)  # (B, n, n)
    other = idx.clone()
    other[0, 5:] = (other[0, 5:] + 3) % V
    a, b = logits_of(m, idx, allowed), logits_of(m, other, allowed)
    assert torch.equal(a[0, :5], b[0, :5]), "a valid query saw a padded key"
    assert torch.equal(key_padding_mask([0], 3), torch.zeros(1, 1, 3, dtype=torch.bool))


# ---- the sampler and the batch --------------------------------------------------------------------------

def test_objective_sampler_frequencies():
    draws = sample_objectives(6000, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / 6000
    assert OBJECTIVES == ("bidirectional", "seq2seq", "left_to_right", "right_to_left")
    for name, f, p in zip(OBJECTIVES, freq.tolist(), (1 / 3, 1 / 3, 1 / 6, 1 / 6)):  # the paper's mix
        assert abs(f - p) < 0.02, f"{name}: frequency {f:.3f}, expected {p:.3f} +- 0.02"


def test_segment_ids_name_the_objective():
    assert segment_ids("seq2seq", 2, 3).tolist() == [4, 4, 5, 5, 5]
    firsts = {SEGMENT_IDS[o] for o in OBJECTIVES}
    assert len(firsts) == 4, "each objective has its own segment ids"


def test_unilm_batch_matches_its_objectives():
    g = torch.Generator().manual_seed(3)
    tokens = torch.randint(0, V, (64, 10))
    b = unilm_batch(tokens, 4, MASK, g, mask_prob=0.3)
    predicted = b["inputs"] == MASK
    assert predicted.any(dim=1).all(), "every row predicts at least one token"
    assert torch.equal(b["targets"] != -100, predicted), "targets exactly at the [MASK] positions"
    assert torch.equal(b["targets"][predicted], tokens[predicted])
    assert torch.equal(b["inputs"][~predicted], tokens[~predicted])
    for row, o in enumerate(b["objective"].tolist()):
        assert torch.equal(b["allowed"][row], objective_mask(OBJECTIVES[o], 4, 6))
        assert torch.equal(b["segments"][row], segment_ids(OBJECTIVES[o], 4, 6))
        if OBJECTIVES[o] == "seq2seq":
            assert not predicted[row, :4].any(), "seq2seq predicts target tokens only"


# ---- the convention: cloze vs shifted, and the leak of mixing them --------------------------------------

def _depends(model, inputs, row, col, allowed):
    other = inputs.clone()
    other[0, col] = (other[0, col] + 1) % V
    return not torch.equal(logits_of(model, inputs, allowed)[0, row], logits_of(model, other, allowed)[0, row])


def test_mixing_the_conventions_leaks_the_answer():
    m, n = model64(), 6
    x = torch.randint(0, V, (1, n))
    mask = left_to_right_mask(n)
    i = 3
    # cloze: position i holds [MASK]; the answer x_i is nowhere in the input, whatever the diagonal
    inputs, targets = cloze_inputs(x, torch.arange(n)[None] == i, MASK)
    assert targets[0, i] == x[0, i] and inputs[0, i] == MASK
    # shifted: row i predicts x_{i+1}, which sits at column i+1, hidden by the mask
    s_in, s_tgt = shifted_inputs(x)
    assert s_tgt[0, i] == s_in[0, i + 1] and not mask[i, i + 1]
    assert not _depends(m, s_in, i, i + 1, left_to_right_mask(n - 1))
    # mixed: true tokens, unshifted targets (row i predicts x_i), diagonal visible -> logits see the answer
    assert mask[i, i] and _depends(m, x, i, i, mask), "the leak: output i reads its own target token"
