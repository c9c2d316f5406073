"""UniLMv2's pseudo-masked language model (PMLM): autoencoding and partially autoregressive, one forward pass.

UniLMv2 (Bao et al. 2020, arXiv 2002.12804). Masked positions M are grouped into spans M_1..M_|M| visited in a
random factorization order; with x_\\M the unmasked context,

    L_AE  = - sum_{m in M} log p(x_m | x_\\M)                                   ([M]: conventional masks)
    L_PAR = - sum_i sum_{m in M_i} log p(x_m | x_\\M, x_{M_<i})                 ([P]: pseudo masks)
    L     = L_AE + L_PAR

All spans of length 1 make L_PAR fully autoregressive; one span holding everything makes it non-autoregressive.
Both losses come from ONE pass over the lengthened sequence (the paper's example, x1..x6, spans {x2}, {x4, x5},
order {x4, x5} then {x2}):

    tokens     x1 [M] x3 [M] [M] x6 | [P] [P] x4 x5 | [P] x2
    positions   0   1  2   3   4  5 |  3   4  3  4  |  1   1     (pseudo masks and real copies share positions)

    query                  may attend to
    AE block (kind AE)     the AE block only: its encodings are computed once and reused by both losses
    [P] of step i          AE block, real tokens of steps < i, the [P]s of its own span
    real token of step i   AE block, real tokens of steps <= i; never a [P]

Paper vs official code: the pretraining code was never released (microsoft/unilm#441). The official pseudo masks
live in s2s-ft's seq2seq fine-tuning (BertForSequenceToSequenceWithPseudoMask): layout source ++ target ++ pseudo,
no [M] block, loss on the pseudo outputs only, and the mask written with signed span ids (`s2s_ft_mask`): the
same rules, which tests/test_pmlm.py checks. The paper's relative position bias is left out (the core model has
learned absolute positions). Tokens: [M] and [P] are ids past the task vocabulary (`mask_id`, `pseudo_id`).
"""

import torch
import torch.nn.functional as F

from nanomodels.transformer import IGNORE_INDEX

AE, PSEUDO, REAL = 0, 1, 2  # the kind of each token of the layout


def sample_spans(n: int, num_masked: int, generator: torch.Generator, *, max_ngram: int = 6,
                 ngram_prob: float = 0.4) -> list:
    """Disjoint contiguous spans (lists of positions, sorted) covering exactly `num_masked` of range(n).

    n-gram masking: each new span is an n-gram (n uniform in 2..max_ngram) with probability `ngram_prob`, else one
    token; it is shortened to what is left and to what fits between the spans placed so far.
    """
    if not 0 <= num_masked <= n:
        raise ValueError(f"num_masked: must be in [0, n = {n}], got {num_masked}")
    if max_ngram < 1 or not 0.0 <= ngram_prob <= 1.0:
        raise ValueError(f"max_ngram >= 1 and ngram_prob in [0, 1] required, got {max_ngram}, {ngram_prob}")
    free, spans = torch.ones(n, dtype=torch.bool), []
    while num_masked > 0:
        r = torch.rand(2, generator=generator).tolist()
        length = 2 + int(r[1] * (max_ngram - 1)) if max_ngram > 1 and r[0] < ngram_prob else 1
        length = min(length, num_masked)
        while True:  # the starts where `length` free positions follow; length 1 always fits
            runs = torch.stack([free[s:s + length].all() for s in range(n - length + 1)])
            if runs.any():
                break
            length -= 1
        starts = runs.nonzero().flatten()
        start = int(starts[torch.randint(len(starts), (1,), generator=generator)])
        free[start:start + length] = False
        spans.append(list(range(start, start + length)))
        num_masked -= length
    return sorted(spans)


def pmlm_layout(x: torch.Tensor, spans, order, mask_id: int, pseudo_id: int) -> dict:
    """The lengthened sequence for tokens x (n,), spans (lists of positions) and an order (permutation of span ids).

    Returns tokens, positions, kind (AE / PSEUDO / REAL), step (-1 in the AE block, else the span's place in the
    order), ae_targets and par_targets (the original token where that loss is taken, -100 elsewhere), all (L,)
    with L = n + 2 |M|.
    """
    n = x.numel()
    masked = [p for span in spans for p in span]
    if any(not 0 <= p < n for p in masked) or len(set(masked)) != len(masked):
        raise ValueError(f"spans: positions must be distinct and in [0, {n}), got {spans}")
    if sorted(order) != list(range(len(spans))):
        raise ValueError(f"order: must be a permutation of range({len(spans)}), got {list(order)}")
    x = x.tolist()
    # BEGIN EXERCISE 3.1: the PMLM layout
    tokens = [mask_id if i in masked else x[i] for i in range(n)]
    positions, kind, step = list(range(n)), [AE] * n, [-1] * n
    ae_targets = [x[i] if i in masked else -100 for i in range(n)]
    par_targets = [-100] * n
    for st, sid in enumerate(order):
        for what in (PSEUDO, REAL):  # the span's pseudo masks, then its real tokens, at the same positions
            for p in spans[sid]:
                tokens.append(pseudo_id if what == PSEUDO else x[p])
                positions.append(p)
                kind.append(what)
                step.append(st)
                ae_targets.append(-100)
                par_targets.append(x[p] if what == PSEUDO else -100)
    # END EXERCISE
    out = {"tokens": tokens, "positions": positions, "kind": kind, "step": step, "ae_targets": ae_targets,
           "par_targets": par_targets}
    return {k: torch.tensor(v, dtype=torch.long) for k, v in out.items()}


def pmlm_mask(kind: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    """allowed (..., L, L) from the per-token kind and step (..., L), by the rules of the module docstring."""
    # BEGIN EXERCISE 3.2: the pseudo-mask attention rules
    kq, kk = kind[..., :, None], kind[..., None, :]
    sq, sk = step[..., :, None], step[..., None, :]
    ae_query = (kq == AE) & (kk == AE)  # the AE block never sees the appended part
    pseudo_query = (kq == PSEUDO) & ((kk == AE) | ((kk == REAL) & (sk < sq)) | ((kk == PSEUDO) & (sk == sq)))
    real_query = (kq == REAL) & ((kk == AE) | ((kk == REAL) & (sk <= sq)))
    return ae_query | pseudo_query | real_query
    # END EXERCISE


def s2s_ft_mask(src_len: int, target_span_ids: torch.Tensor) -> torch.Tensor:
    """The official s2s-ft mask for source ++ target ++ pseudo (one [P] per target token), from signed span ids.

    target_span_ids (T,): non-decreasing ids >= 1 (s2s-ft uses position + 1 when there are no spans).
    w = [0] * src ++ span_id ++ (-span_id);  true keys: w >= 0;
    real rows (w_q >= 0): true key and w_k <= w_q;  pseudo rows (w_q < 0): (true key and -w_k > w_q) or w_k == w_q.
    """
    ids = torch.as_tensor(target_span_ids, dtype=torch.long)
    if ids.numel() and (int(ids.min()) < 1 or bool((ids[1:] < ids[:-1]).any())):
        raise ValueError(f"target_span_ids: must be >= 1 and non-decreasing, got {ids.tolist()}")
    # BEGIN EXERCISE 3.3: the s2s-ft signed-span-id mask
    w = torch.cat([torch.zeros(src_len, dtype=torch.long), ids, -ids])
    wq, wk = w[:, None], w[None, :]
    true_key = wk >= 0
    real_rows = (wq >= 0) & true_key & (wk <= wq)
    pseudo_rows = (wq < 0) & ((true_key & (-wk > wq)) | (wk == wq))
    return real_rows | pseudo_rows
    # END EXERCISE


def s2s_pseudo_layout(src: torch.Tensor, tgt: torch.Tensor, pseudo_id: int, target_span_ids=None) -> dict:
    """s2s-ft fine-tuning with pseudo masks, batched: src (B, S), tgt (B, T) -> tokens source ++ target ++ [P]*T.

    Spans default to one per target token (fully autoregressive). Returns tokens, positions, kind, step, targets
    (the target token at each [P], -100 elsewhere) and allowed (L, L), the same for every row.
    """
    (B, S), T = src.shape, tgt.size(1)
    ids = torch.arange(1, T + 1) if target_span_ids is None else torch.as_tensor(target_span_ids)
    allowed = s2s_ft_mask(S, ids)
    kind = torch.tensor([AE] * S + [REAL] * T + [PSEUDO] * T)
    step = torch.cat([torch.full((S,), -1), ids, ids])
    positions = torch.cat([torch.arange(S), S + torch.arange(T), S + torch.arange(T)])
    tokens = torch.cat([src, tgt, torch.full((B, T), pseudo_id)], dim=1)
    targets = torch.cat([torch.full((B, S + T), IGNORE_INDEX), tgt], dim=1)
    return {"tokens": tokens, "positions": positions, "kind": kind, "step": step, "targets": targets,
            "allowed": allowed}


def pmlm_batch(x: torch.Tensor, num_masked: int, generator: torch.Generator, mask_id: int, pseudo_id: int,
               **span_options) -> dict:
    """Layouts for a batch x (B, n): spans by `sample_spans`, a uniform random order; stacked, with `allowed`."""
    rows = []
    for row in x:
        spans = sample_spans(x.size(1), num_masked, generator, **span_options)
        order = torch.randperm(len(spans), generator=generator).tolist()
        rows.append(pmlm_layout(row, spans, order, mask_id, pseudo_id))
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    batch["allowed"] = pmlm_mask(batch["kind"], batch["step"])  # (B, L, L)
    return batch


def pmlm_losses(model, batch: dict):
    """(L_AE, L_PAR) from ONE forward pass of `model` over a `pmlm_batch` layout.

    The pass reads the tokens at their layout positions (a [P] and its real copy share the original position) under
    the layout's mask `allowed` alone, nothing else hidden. Each loss is the mean cross-entropy over its own
    predictions (the tokens whose ae_targets / par_targets are not IGNORE_INDEX), a 0-d tensor that carries the
    gradient; it is 0 when the batch has no prediction of that kind.
    """
    # BEGIN EXERCISE 3.4: the PMLM loss, both objectives from one pass
    logits, _ = model(batch["tokens"], allowed=batch["allowed"], causal=False, positions=batch["positions"])
    logits = logits.reshape(-1, logits.size(-1))  # (B L, |V|)
    losses = []
    for targets in (batch["ae_targets"].reshape(-1), batch["par_targets"].reshape(-1)):
        if bool((targets != IGNORE_INDEX).any()):
            losses.append(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))
        else:
            losses.append(logits.new_zeros(()))  # no prediction of this kind in the batch
    return losses[0], losses[1]
    # END EXERCISE
