"""Chapter 02's mutants (UniLM attention masks): known-wrong solutions, each a patch of a reference region. Every
mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.
"""

from exercises.grading.mutants import Mutant

MUTANTS = [
    Mutant("2.3", "cloze_decode_keeps_the_mask_in_the_cache",
           ("appends [MASK] to the real cache: its keys and values stay, so every later step also attends to "
            "old [MASK]s"),
           old=("    scratch = [dict(layer) for layer in cache]  # the [MASK] goes into a copy; its k, v are dropped\n"
                "    logits, _ = model(torch.full((B, 1), mask_id, device=prefix.device), causal=False, cache=scratch)"),
           new="    logits, _ = model(torch.full((B, 1), mask_id, device=prefix.device), causal=False, cache=cache)"),
    Mutant("2.3", "cloze_decode_never_caches_the_prediction",
           ("never feeds the predicted token back: every [MASK] sits at the same position and sees only the "
            "prompt"),
           old="    model(token, causal=False, cache=cache)  # the new query sees the cache and itself: both masks agree",
           new=""),
    Mutant("2.3", "cloze_decode_prompt_always_bidirectional",
           ("encodes the prompt bidirectionally for both objectives: left-to-right prompt rows must not see "
            "later tokens"),
           old="model(prefix, causal=objective == \"left_to_right\", cache=cache)",
           new="model(prefix, causal=False, cache=cache)"),
    Mutant("2.3", "cloze_decode_prompt_always_causal",
           "encodes the prompt causally for both objectives: seq2seq source rows must see the whole source",
           old="model(prefix, causal=objective == \"left_to_right\", cache=cache)",
           new="model(prefix, causal=True, cache=cache)"),
    Mutant("2.2", "semi_causal_mask_column_stripe",
           "every position sees every span position (a column stripe): tokens before a span see into it",
           old=("same_span = (span_id[:, None] == span_id[None, :]) & (span_id[:, None] != 0)\n"
                "return causal_mask(n) | same_span"),
           new="return causal_mask(n) | (span_id[None, :] != 0)"),
    Mutant("2.2", "semi_causal_mask_outside_counts_as_a_span",
           ("compares span ids without excluding 0: all positions outside the spans become one bidirectional "
            "\"span\""),
           old=("same_span = (span_id[:, None] == span_id[None, :]) & (span_id[:, None] != 0)\n"
                "return causal_mask(n) | same_span"),
           new="return causal_mask(n) | (span_id[:, None] == span_id[None, :])"),
    Mutant("2.2", "semi_causal_mask_span_end_inclusive",
           ("treats the half-open span (start, end) as closed: the position `end` joins the span's "
            "bidirectional block"),
           old="same_span = (span_id[:, None] == span_id[None, :]) & (span_id[:, None] != 0)",
           new=("inclusive = torch.zeros(n, dtype=torch.long)\n"
                "for k, (start, end) in enumerate(spans):\n"
                "    inclusive[start:end + 1] = k + 1\n"
                "same_span = (inclusive[:, None] == inclusive[None, :]) & (inclusive[:, None] != 0)")),
    Mutant("2.1", "seq2seq_mask_one_tril",
           ("one tril over the whole sequence: that is the left-to-right mask; source rows no longer see the "
            "later source"),
           old=("query, key = torch.arange(n)[:, None], torch.arange(n)[None, :]\n"
                "sees_source = key < src_len  # every row sees the whole source\n"
                "target_causal = (query >= src_len) & (key <= query)  # target rows also see the target up to themselves\n"
                "return sees_source | target_causal"),
           new="return torch.ones(n, n, dtype=torch.bool).tril()"),
    Mutant("2.1", "seq2seq_mask_source_off_by_one",
           "the source boundary is off by one (key <= src_len): every row also sees the first target token",
           old=("sees_source = key < src_len  # every row sees the whole source\n"
                "target_causal = (query >= src_len) & (key <= query)  # target rows also see the target up to themselves\n"
                "return sees_source | target_causal"),
           new="return (key <= src_len) | ((query >= src_len) & (key <= query))"),
    Mutant("2.1", "seq2seq_mask_source_sees_target",
           ("source rows see the whole sequence (bidirectional over source AND target): the source reads the "
            "answer"),
           old=("sees_source = key < src_len  # every row sees the whole source\n"
                "target_causal = (query >= src_len) & (key <= query)  # target rows also see the target up to themselves\n"
                "return sees_source | target_causal"),
           new="return (key < src_len) | (query < src_len) | (key <= query)"),
    Mutant("2.1", "seq2seq_mask_target_without_diagonal",
           ("target rows see the target strictly before themselves (key < query): the cloze [MASK] cannot see"
            " itself"),
           old=("sees_source = key < src_len  # every row sees the whole source\n"
                "target_causal = (query >= src_len) & (key <= query)  # target rows also see the target up to themselves\n"
                "return sees_source | target_causal"),
           new="return (key < src_len) | ((query >= src_len) & (key < query))"),

    # -- mutants that the grader of issue 10 passed: one per class of miss, each caught by a new check or guard
    Mutant("2.1", "seq2seq_mask_memoized",
           "caches the mask it returns: a caller that edits its mask corrupts every later call",
           old="return sees_source | target_causal",
           new=("cache = seq2seq_mask.__dict__.setdefault(\"cache\", {})\n"
                "if n not in cache or cache[n][0] != src_len:\n"
                "    cache[n] = (src_len, sees_source | target_causal)\n"
                "return cache[n][1]")),
    Mutant("2.3", "cloze_decode_zero_steps_fail",
           "stacks the empty lists when steps = 0: torch.cat of nothing raises",
           old=("if not out:\n"
                "    return prefix.new_zeros(B, 0), torch.zeros(B, 0, model.config.vocab_size)\n"),
           new=""),
    Mutant("2.3", "cloze_decode_first_row_decides",
           "feeds the first row's prediction to every row of the batch",
           old="token = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)",
           new="token = logits[:1, -1].argmax(dim=-1, keepdim=True).expand(B, 1)"),

    # -- 2.4 a mixed-objective UniLM batch, end to end
    Mutant("2.4", "unilm_batch_masks_the_seq2seq_source",
           "lets a seq2seq row mask and predict its source tokens too (every token eligible in every row)",
           old="eligible[objective == OBJECTIVES.index(\"seq2seq\"), :src_len] = False\n",
           new=""),
    Mutant("2.4", "unilm_batch_one_objective_per_batch",
           "draws one objective for the whole batch instead of one per row",
           old="objective = sample_objectives(B, generator)",
           new="objective = sample_objectives(1, generator).repeat(B)"),
    Mutant("2.4", "unilm_batch_uniform_objectives",
           "draws the four objectives uniformly (1/4 each) instead of the paper's 1/3, 1/3, 1/6, 1/6",
           old="objective = sample_objectives(B, generator)",
           new="objective = torch.randint(len(OBJECTIVES), (B,), generator=generator)"),
    Mutant("2.4", "unilm_batch_first_rows_mask_for_every_row",
           "stacks the first row's objective mask for every row: the rows' masks no longer match their objectives",
           old="allowed = torch.stack([objective_mask(name, src_len, n - src_len) for name in names])",
           new="allowed = torch.stack([objective_mask(names[0], src_len, n - src_len) for name in names])"),
    Mutant("2.4", "unilm_batch_segments_swapped",
           "gives the source the target's segment id and the target the source's",
           old="segments = torch.stack([segment_ids(name, src_len, n - src_len) for name in names])",
           new=("segments = torch.stack([torch.tensor([SEGMENT_IDS[name][1]] * src_len + [SEGMENT_IDS[name][0]] * "
                "(n - src_len)) for name in names])")),
    Mutant("2.4", "unilm_batch_targets_everywhere",
           "labels every token with its id instead of -100 off the [MASK]s: the loss also trains on copying",
           old="inputs, targets = cloze_inputs(tokens, predict, mask_id)",
           new="inputs, targets = tokens.masked_fill(predict, mask_id), tokens.clone()"),
    Mutant("2.4", "unilm_batch_inputs_keep_the_answer",
           "never puts [MASK] into the inputs: every target is visible at its own position (the answer leaks)",
           old="inputs, targets = cloze_inputs(tokens, predict, mask_id)",
           new="inputs, targets = tokens.clone(), tokens.masked_fill(~predict, -100)"),
    Mutant("2.4", "unilm_batch_rows_may_predict_nothing",
           "drops the at-least-one rule: a row that draws no [MASK] has no target at all",
           old="predict = (noise < mask_prob) | (noise == noise.min(dim=1, keepdim=True).values)  # at least one per row",
           new="predict = noise < mask_prob"),
    Mutant("2.4", "unilm_batch_forces_the_first_eligible_token",
           "forces the first eligible token of every row that drew none, instead of a uniformly placed one",
           old="predict = (noise < mask_prob) | (noise == noise.min(dim=1, keepdim=True).values)  # at least one per row",
           new=("predict = noise < mask_prob\n"
                "first = eligible.int().argmax(dim=1)\n"
                "predict[torch.arange(B), first] |= ~predict.any(dim=1)")),
    Mutant("2.4", "unilm_batch_global_rng",
           "draws the masking noise from the global RNG instead of `generator`: a seed no longer reproduces a batch",
           old="noise = torch.rand(B, n, generator=generator).masked_fill(~eligible, 2.0)",
           new="noise = torch.rand(B, n).masked_fill(~eligible, 2.0)"),
]
