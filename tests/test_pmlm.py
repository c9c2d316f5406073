"""Property tests for nanomodels.pmlm (UniLMv2 pseudo-masked LM): layout, mask rules, leaks, reuse, losses.

The invariants of the layout, the mask rules and the s2s-ft mask are the graded checks of chapter 03
(exercises/grading/checks/ch03_pseudo_masked_lm.py), run here against the library; this file adds what the grader does
not check.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from nanomodels.attention import attention
from nanomodels.pmlm import (AE, PSEUDO, REAL, pmlm_batch, pmlm_layout, pmlm_losses, pmlm_mask, s2s_ft_mask,
                             s2s_pseudo_layout, sample_spans)
from nanomodels.transformer import Transformer, TransformerConfig

from test_masks import embedding_grads

V = 13
M_ID, P_ID = 13, 14  # [M] and [P] are the two ids past the toy vocabulary

CHAPTER = "03"  # tests/conftest.py runs its graded checks as `graded_check`


def model64(seed=0):
    torch.manual_seed(seed)
    cfg = TransformerConfig(vocab_size=V + 2, block_size=32, n_layers=2, d_model=16, n_heads=2)
    return Transformer(cfg, attention_fn=attention).double().eval()


@st.composite
def layouts(draw):
    n = draw(st.integers(2, 10))
    k = draw(st.integers(1, n))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    spans = sample_spans(n, k, g, max_ngram=draw(st.integers(1, 4)), ngram_prob=0.5)
    order = torch.randperm(len(spans), generator=g).tolist()
    x = torch.randint(0, V, (n,), generator=g)
    return x, spans, order


def test_graded_invariant_holds_for_the_library(graded_check):
    graded_check()


def paper_example():
    x = torch.tensor([1, 2, 3, 4, 5, 6])  # x1..x6
    return x, pmlm_layout(x, [[1], [3, 4]], [1, 0], M_ID, P_ID)  # spans {x2}, {x4, x5}; order {x4, x5} -> {x2}


@given(case=layouts())
def test_spans_are_disjoint_contiguous_and_count_exactly(case):
    x, spans, _ = case
    flat = [p for s in spans for p in s]
    assert len(flat) == len(set(flat)) and all(0 <= p < len(x) for p in flat)
    assert all(s == list(range(s[0], s[0] + len(s))) for s in spans), "spans are contiguous"


@given(src=st.integers(0, 5), ids=st.lists(st.integers(0, 2), min_size=0, max_size=7))
def test_rules_equal_the_official_signed_span_id_formula(src, ids):
    span_ids = torch.tensor(ids, dtype=torch.long).cumsum(0) + 1  # non-decreasing, >= 1, repeats = spans
    lay = s2s_pseudo_layout(torch.zeros(1, src, dtype=torch.long), torch.zeros(1, len(ids), dtype=torch.long), P_ID,
                            span_ids)
    assert torch.equal(pmlm_mask(lay["kind"], lay["step"]), s2s_ft_mask(src, span_ids))


def test_reductions():
    n = 6
    lay = pmlm_layout(torch.arange(n), [[p] for p in range(n)], list(range(n)), M_ID, P_ID)  # spans of length 1
    m, kind, pos = pmlm_mask(lay["kind"], lay["step"]), lay["kind"], lay["positions"]
    P, R = (kind == PSEUDO).nonzero().flatten(), (kind == REAL).nonzero().flatten()
    for i, q in enumerate(P.tolist()):
        sees = {int(pos[k]) for k in R.tolist() if m[q, k]}
        assert sees == set(range(pos[q].item())), "autoregressive: [P]_t sees the real tokens < t"
        assert [k for k in P.tolist() if m[q, k]] == [q], "and only itself among the [P]s"
    lay = pmlm_layout(torch.arange(n), [list(range(1, 5))], [0], M_ID, P_ID)  # one span: non-autoregressive
    m, kind = pmlm_mask(lay["kind"], lay["step"]), lay["kind"]
    for q in (kind == PSEUDO).nonzero().flatten().tolist():
        assert torch.equal(m[q], (kind == AE) | (kind == PSEUDO)), "[P] sees the AE block and its span's [P]s"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pseudo_logits_have_zero_gradient_wrt_own_and_later_real_tokens(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, V, (10,), generator=g)
    spans = sample_spans(10, 6, g, max_ngram=3, ngram_prob=0.6)
    order = torch.randperm(len(spans), generator=g).tolist()
    lay, m = pmlm_layout(x, spans, order, M_ID, P_ID), model64(seed)
    kind, step = lay["kind"], lay["step"]
    for q in (kind == PSEUDO).nonzero().flatten().tolist():
        grad = embedding_grads(m, lay["tokens"][None], q, allowed=pmlm_mask(kind, step),
                               positions=lay["positions"])
        for k in (kind == REAL).nonzero().flatten().tolist():
            if step[k] >= step[q]:
                assert grad[k] == 0, f"[P] at {q} (step {step[q]}) leaks the real token at {k} (step {step[k]})"
            else:
                assert grad[k] > 0, f"[P] at {q} should depend on the earlier-span real token at {k}"


def test_autoencoding_states_identical_with_and_without_appended_part():
    x, lay = paper_example()
    m, n = model64(), 6
    full = m.hidden(lay["tokens"][None], allowed=pmlm_mask(lay["kind"], lay["step"]), causal=False,
                    positions=lay["positions"])
    alone = m.hidden(lay["tokens"][None, :n], causal=False)
    # a shorter sequence sums in another order: equal to float64 rounding, not bit for bit
    assert torch.allclose(full[0, :n], alone[0], atol=1e-12, rtol=0), "the AE block saw the appended part"
    other = lay["tokens"].clone()
    other[n:] = (other[n:] + 5) % V  # resample every appended token ([P]s and real copies alike)
    again = m.hidden(other[None], allowed=pmlm_mask(lay["kind"], lay["step"]), causal=False,
                     positions=lay["positions"])
    assert torch.equal(again[0, :n], full[0, :n]), "AE encodings must be bit-identical whatever is appended"


def test_losses_from_one_pass_equal_separate_cross_entropies():
    g = torch.Generator().manual_seed(0)
    batch = pmlm_batch(torch.randint(0, V, (4, 9), generator=g), 3, g, M_ID, P_ID)
    assert batch["tokens"].shape == (4, 15) and batch["allowed"].shape == (4, 15, 15)
    m = model64()
    l_ae, l_par = pmlm_losses(m, batch)
    n = 9
    ae_logits, _ = m(batch["tokens"][:, :n], causal=False)  # the AE block alone: the reused encodings
    assert torch.allclose(l_ae, F.cross_entropy(ae_logits.reshape(-1, V + 2), batch["ae_targets"][:, :n].reshape(-1)),
                          atol=1e-12, rtol=0)
    logits, _ = m(batch["tokens"], allowed=batch["allowed"], causal=False, positions=batch["positions"])
    ref = F.cross_entropy(logits.reshape(-1, V + 2), batch["par_targets"].reshape(-1))
    assert torch.allclose(l_par, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("call,match", [
    (lambda: sample_spans(5, 6, torch.Generator()), "num_masked"),
    (lambda: pmlm_layout(torch.arange(4), [[1], [1]], [0, 1], M_ID, P_ID), "spans"),
    (lambda: pmlm_layout(torch.arange(4), [[5]], [0], M_ID, P_ID), "spans"),
    (lambda: pmlm_layout(torch.arange(4), [[1], [2]], [0, 0], M_ID, P_ID), "order"),
    (lambda: s2s_ft_mask(2, torch.tensor([2, 1])), "target_span_ids"),
])
def test_bad_input_raises_naming_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
