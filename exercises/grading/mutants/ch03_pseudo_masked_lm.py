"""Chapter 03's mutants (the pseudo-masked language model): known-wrong solutions, each a patch of a reference
region. Every mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.
"""

from exercises.grading.mutants import Mutant

MUTANTS = [
    Mutant("3.1", "pmlm_layout_ignores_the_order",
           "appends the spans in their own order (span 0, 1, ...) instead of the sampled factorization order",
           old="for st, sid in enumerate(order):",
           new="for st, sid in enumerate(range(len(spans))):"),
    Mutant("3.1", "pmlm_layout_no_mask_in_the_ae_block",
           "the AE block keeps the original tokens instead of [M]: L_AE reads its answers from the input",
           old="tokens = [mask_id if i in masked else x[i] for i in range(n)]",
           new="tokens = [x[i] for i in range(n)]"),
    Mutant("3.1", "pmlm_layout_par_loss_on_the_real_copies",
           "puts the L_PAR labels on the real copies (which hold their own answer) instead of on the [P]s",
           old="            par_targets.append(x[p] if what == PSEUDO else -100)",
           new="            par_targets.append(x[p] if what == REAL else -100)"),
    Mutant("3.1", "pmlm_layout_positions_not_shared",
           ("positions not shared: the appended [P]s and real copies get new positions n, n+1, ..., so a [P] "
            "cannot know what it predicts"),
           old="            positions.append(p)",
           new="            positions.append(len(positions))"),
    Mutant("3.2", "pmlm_mask_ae_block_sees_the_appended_part",
           "the AE block attends to everything, the appended real tokens included: L_AE reads its answers",
           old="ae_query = (kq == AE) & (kk == AE)  # the AE block never sees the appended part",
           new="ae_query = kq == AE"),
    Mutant("3.2", "pmlm_mask_pseudo_sees_every_pseudo",
           "a [P] sees the [P]s of every span, not only its own",
           old="pseudo_query = (kq == PSEUDO) & ((kk == AE) | ((kk == REAL) & (sk < sq)) | ((kk == PSEUDO) & (sk == sq)))",
           new="pseudo_query = (kq == PSEUDO) & ((kk == AE) | ((kk == REAL) & (sk < sq)) | (kk == PSEUDO))"),
    Mutant("3.2", "pmlm_mask_pseudo_sees_its_own_real_token",
           ("a [P] sees the real tokens of its own span (sk <= sq): it copies its answer, the PAR loss "
            "collapses"),
           old="pseudo_query = (kq == PSEUDO) & ((kk == AE) | ((kk == REAL) & (sk < sq)) | ((kk == PSEUDO) & (sk == sq)))",
           new="pseudo_query = (kq == PSEUDO) & ((kk == AE) | ((kk == REAL) & (sk <= sq)) | ((kk == PSEUDO) & (sk == sq)))"),
    Mutant("3.2", "pmlm_mask_real_tokens_see_pseudo_masks",
           ("real appended tokens also attend to the [P]s of their span: their encodings change with the "
            "pseudo inputs"),
           old="real_query = (kq == REAL) & ((kk == AE) | ((kk == REAL) & (sk <= sq)))",
           new="real_query = (kq == REAL) & ((kk == AE) | ((kk == REAL) & (sk <= sq)) | ((kk == PSEUDO) & (sk == sq)))"),
    Mutant("3.3", "s2s_ft_mask_no_same_span_pseudo",
           "pseudo rows forget w_key == w_query: the [P]s of one span cannot see each other (nor themselves)",
           old="pseudo_rows = (wq < 0) & ((true_key & (-wk > wq)) | (wk == wq))",
           new="pseudo_rows = (wq < 0) & true_key & (-wk > wq)"),
    Mutant("3.3", "s2s_ft_mask_pseudo_compares_without_sign",
           ("pseudo rows compare w_key < -w_query with the sign mixed up (w_key > w_query): they see every "
            "true key"),
           old="pseudo_rows = (wq < 0) & ((true_key & (-wk > wq)) | (wk == wq))",
           new="pseudo_rows = (wq < 0) & ((true_key & (wk > wq)) | (wk == wq))"),
    Mutant("3.3", "s2s_ft_mask_pseudo_sees_its_own_span",
           "pseudo rows use -w_key >= w_query: a [P] sees the real tokens of its own span",
           old="pseudo_rows = (wq < 0) & ((true_key & (-wk > wq)) | (wk == wq))",
           new="pseudo_rows = (wq < 0) & ((true_key & (-wk >= wq)) | (wk == wq))"),
    Mutant("3.3", "s2s_ft_mask_real_rows_see_pseudo",
           "real rows drop the true-key test: w_key <= w_query then also admits every [P] (negative w)",
           old="real_rows = (wq >= 0) & true_key & (wk <= wq)",
           new="real_rows = (wq >= 0) & (wk <= wq)"),

    # -- mutants that the grader of issue 10 passed: one per class of miss, each caught by a new check or guard
    Mutant("3.1", "pmlm_layout_assumes_contiguous_spans",
           "walks each span from its first position over len(span) positions: wrong for a span that is not a "
           "sorted, contiguous run",
           old="        for p in spans[sid]:",
           new="        for p in range(spans[sid][0], spans[sid][0] + len(spans[sid])):"),
    Mutant("3.1", "pmlm_layout_sorts_each_span",
           "appends each span's positions sorted, not in the span's own order",
           old="        for p in spans[sid]:",
           new="        for p in sorted(spans[sid]):"),
    Mutant("3.2", "pmlm_mask_unbatched",
           "indexes the first axis (kind[:, None]) instead of the last: a batch (B, L) gets a wrong-shaped mask",
           old=("kq, kk = kind[..., :, None], kind[..., None, :]\n"
                "sq, sk = step[..., :, None], step[..., None, :]"),
           new=("kq, kk = kind[:, None], kind[None, :]\n"
                "sq, sk = step[:, None], step[None, :]")),

    # -- 3.4 the PMLM loss, both objectives from one pass
    Mutant("3.4", "pmlm_losses_model_default_causal",
           ("leaves the Transformer's default causal=True: every token also loses the keys to its right, the AE "
            "block is no longer bidirectional"),
           old="logits, _ = model(batch[\"tokens\"], allowed=batch[\"allowed\"], causal=False, positions=batch[\"positions\"])",
           new="logits, _ = model(batch[\"tokens\"], allowed=batch[\"allowed\"], positions=batch[\"positions\"])"),
    Mutant("3.4", "pmlm_losses_without_the_mask",
           "runs the pass without the layout's mask: every token sees every token, a [P] reads its own real copy",
           old="logits, _ = model(batch[\"tokens\"], allowed=batch[\"allowed\"], causal=False, positions=batch[\"positions\"])",
           new="logits, _ = model(batch[\"tokens\"], causal=False, positions=batch[\"positions\"])"),
    Mutant("3.4", "pmlm_losses_without_the_positions",
           "runs the pass without the layout's positions: the appended [P]s sit at n, n + 1, ..., not at their tokens",
           old="logits, _ = model(batch[\"tokens\"], allowed=batch[\"allowed\"], causal=False, positions=batch[\"positions\"])",
           new="logits, _ = model(batch[\"tokens\"], allowed=batch[\"allowed\"], causal=False)"),
    Mutant("3.4", "pmlm_losses_averages_over_every_token",
           "sums the cross-entropy of the predictions but divides by every token of the batch, not by their count",
           old="        losses.append(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))",
           new=("        losses.append(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction=\"sum\")\n"
                "                      / targets.numel())")),
    Mutant("3.4", "pmlm_losses_par_read_at_the_real_copies",
           "takes L_PAR at the appended real tokens (which see themselves) instead of at the [P]s",
           old="for targets in (batch[\"ae_targets\"].reshape(-1), batch[\"par_targets\"].reshape(-1)):",
           new=("par = torch.where(batch[\"kind\"] == REAL, batch[\"tokens\"], IGNORE_INDEX)\n"
                "for targets in (batch[\"ae_targets\"].reshape(-1), par.reshape(-1)):")),
    Mutant("3.4", "pmlm_losses_ae_on_every_context_token",
           "does not ignore the unmasked tokens: L_AE is also taken at every context token of the AE block",
           old="for targets in (batch[\"ae_targets\"].reshape(-1), batch[\"par_targets\"].reshape(-1)):",
           new=("ae = torch.where(batch[\"kind\"] != AE, IGNORE_INDEX, torch.where(batch[\"ae_targets\"] == IGNORE_INDEX,\n"
                "                                                                 batch[\"tokens\"], batch[\"ae_targets\"]))\n"
                "for targets in (ae.reshape(-1), batch[\"par_targets\"].reshape(-1)):")),
    Mutant("3.4", "pmlm_losses_swapped",
           "returns (L_PAR, L_AE): the two objectives' losses in the wrong order",
           old="return losses[0], losses[1]",
           new="return losses[1], losses[0]"),
    Mutant("3.4", "pmlm_losses_detached",
           "returns the losses' values without their graph (torch.tensor(loss.item())): nothing trains",
           old="        losses.append(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))",
           new=("        losses.append(torch.tensor(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX).item(),\n"
                "                                   dtype=logits.dtype))")),
    Mutant("3.4", "pmlm_losses_nan_without_predictions",
           "calls F.cross_entropy even when nothing is to be predicted: the mean over no predictions is NaN",
           old=("    if bool((targets != IGNORE_INDEX).any()):\n"
                "        losses.append(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))\n"
                "    else:\n"
                "        losses.append(logits.new_zeros(()))  # no prediction of this kind in the batch"),
           new="    losses.append(F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX))"),
    Mutant("3.4", "pmlm_losses_two_passes",
           ("encodes the AE block in a pass of its own and the whole layout in a second: the same values, twice "
            "the context's compute, the reuse PMLM is built on lost"),
           old="logits, _ = model(batch[\"tokens\"], allowed=batch[\"allowed\"], causal=False, positions=batch[\"positions\"])",
           new=("n = int((batch[\"kind\"][0] == AE).sum())\n"
                "ae_logits, _ = model(batch[\"tokens\"][:, :n], causal=False)\n"
                "logits, _ = model(batch[\"tokens\"], allowed=batch[\"allowed\"], causal=False, positions=batch[\"positions\"])\n"
                "logits = torch.cat([ae_logits, logits[:, n:]], dim=1)")),
]
