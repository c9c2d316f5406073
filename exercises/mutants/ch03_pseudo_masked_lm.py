"""Chapter 03's mutants (the pseudo-masked language model): known-wrong solutions, each a patch of a reference
region. Every mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/mutants/__init__.py.
"""

from exercises.mutants import Mutant

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
]
