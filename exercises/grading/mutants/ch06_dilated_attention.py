"""Chapter 06's mutants (LongNet dilated attention): known-wrong solutions, each a patch of a reference region.
Every mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.
"""

from exercises.grading.mutants import Mutant

MUTANTS = [
    Mutant("6.1", "head_offsets_all_zero",
           "ignores the offsets: every head keeps rows 0, r, 2r, ... and the other residues are never queried",
           old="return torch.arange(n_heads) % r",
           new="return torch.zeros(n_heads, dtype=torch.long)"),
    Mutant("6.1", "head_offsets_torchscale_groups",
           "copies torchscale's contiguous head groups (head j gets j // (H / r)), a permutation of j mod r",
           old="return torch.arange(n_heads) % r",
           new="return torch.arange(n_heads) // max(n_heads // r, 1) % r"),
    Mutant("6.1", "head_offsets_off_by_one",
           "starts the offsets at 1: s_j = (j + 1) mod r",
           old="return torch.arange(n_heads) % r",
           new="return (torch.arange(n_heads) + 1) % r"),
    Mutant("6.2", "dilated_branch_padded_keys_attended",
           "leaves the zero-padded keys of a short last segment unmasked (torchscale's padding): they take mass",
           old="allowed = (pos < T)[:, :, None, :]  # padded keys never receive weight",
           new="allowed = (pos >= 0)[:, :, None, :]"),
    Mutant("6.2", "dilated_branch_no_scaling",
           "forgets the 1/sqrt(d) scaling of the scores",
           old="scores = (qs / math.sqrt(D)) @ ks.transpose(-2, -1)",
           new="scores = qs @ ks.transpose(-2, -1)"),
    Mutant("6.2", "dilated_branch_causal_without_diagonal",
           "makes the causal mask strict: a row no longer sees itself",
           old="allowed = allowed & (t[None, :] <= t[:, None])",
           new="allowed = allowed & (t[None, :] < t[:, None])"),
    Mutant("6.2", "dilated_branch_lse_without_the_max",
           "drops the subtracted maximum from the LSE: log sum exp(s - max) instead of log sum exp(s)",
           old="lse = (top + torch.log(total)).squeeze(-1)",
           new="lse = torch.log(total).squeeze(-1)"),
    Mutant("6.3", "merge_by_lse_alpha_always_detached",
           "computes alpha under no_grad like torchscale: the forward is right, the gradient is not",
           old="if detach_weights:\n    lse = lse.detach()",
           new="lse = lse.detach()"),
    Mutant("6.3", "merge_by_lse_mixes_by_output_norm",
           "weighs each pattern by the norm of its output instead of its softmax denominator",
           old="z = torch.exp(lse - top)  # Z_i up to the common factor exp(top)",
           new="z = torch.stack([o.norm(dim=-1) for o in outs])"),
    Mutant("6.3", "merge_by_lse_nan_for_uncovered_rows",
           "does not guard rows that no input covers: exp(-inf - (-inf)) = NaN",
           old="top = torch.where(torch.isfinite(top), top, 0.0)  # rows no input covers: exp(-inf - 0) = 0, no NaN\n",
           new=""),
    Mutant("6.3", "merge_by_lse_plain_average",
           "averages the patterns' outputs, ignoring how much mass each one found",
           old="alpha = z / torch.where(total > 0, total, 1.0)",
           new="alpha = torch.where(z > 0, 1.0, 0.0) / torch.where(total > 0, (z > 0).sum(0), 1)"),
    Mutant("6.4", "dilated_branch_kernel_rows_not_dilated",
           "passes the tensor's own row stride: the kernel reads consecutive rows instead of every r-th",
           old="kept_row = [r * x.stride(2) for x in (q, k, v, out)]",
           new="kept_row = [x.stride(2) for x in (q, k, v, out)]"),
    Mutant("6.4", "dilated_branch_kernel_drops_the_short_segment",
           "counts segments with T // w: a short last segment (or a sequence shorter than w) is never computed",
           old="triton.cdiv(T, w), B * H)",
           new="T // w, B * H)"),
    Mutant("6.4", "dilated_branch_kernel_one_head_per_batch",
           "launches B programs on the last axis instead of B x H: only head 0 is computed",
           old="triton.cdiv(T, w), B * H)",
           new="triton.cdiv(T, w), B)"),
    Mutant("6.5", "dilated_attention_weights_always_detached",
           "mixes with torchscale's no_grad weights whatever detach_weights says: the forward is right, the "
           "gradient is not",
           old="detach_weights=detach_weights)",
           new="detach_weights=True)"),
    Mutant("6.5", "dilated_attention_patterns_averaged",
           "averages the patterns' outputs instead of weighting them by softmax(LSE)",
           old="return merge_by_lse([o for o, _ in branches], [lse for _, lse in branches], "
               "detach_weights=detach_weights)",
           new="return sum(o for o, _ in branches) / len(branches)"),
    Mutant("6.5", "dilated_attention_softmax_merge_nan_for_uncovered",
           "mixes with a plain softmax over the stacked LSEs: right wherever a pattern keeps the query, NaN where "
           "none does",
           old="return merge_by_lse([o for o, _ in branches], [lse for _, lse in branches], "
               "detach_weights=detach_weights)",
           new="alpha = torch.softmax(torch.stack([lse for _, lse in branches]), dim=0)\n"
               "return sum(a.unsqueeze(-1) * o for a, (o, _) in zip(alpha, branches))"),
    Mutant("6.5", "dilated_attention_wrong_rate_per_segment",
           "pairs each segment length with another pattern's dilation rate (the rates reversed)",
           old="zip(segment_lengths, dilation_rates)",
           new="zip(segment_lengths, dilation_rates[::-1])"),
    Mutant("6.5", "dilated_attention_causal_dropped",
           "forgets to pass the causal flag on to each pattern: a decoder sees later positions",
           old="dilated_branch(q, k, v, w, r, causal=causal)",
           new="dilated_branch(q, k, v, w, r)"),
    Mutant("6.5", "dilated_attention_dense_log_count",
           "computes the right output the dense way, with the log-count bias on a T x T score matrix: quadratic",
           old="branches = [dilated_branch(q, k, v, w, r, causal=causal) for w, r in zip(segment_lengths, "
               "dilation_rates)]\n"
               "return merge_by_lse([o for o, _ in branches], [lse for _, lse in branches], "
               "detach_weights=detach_weights)",
           new="t = torch.arange(q.size(2))\n"
               "count = torch.zeros(q.size(1), q.size(2), q.size(2), dtype=q.dtype)\n"
               "for w, r in zip(segment_lengths, dilation_rates):\n"
               "    s = head_offsets(q.size(1), r)[:, None, None]\n"
               "    pair = (t[:, None] // w == t[None, :] // w) & (t[:, None] % r == s) & (t[None, :] % r == s)\n"
               "    count = count + (pair & (t[None, :] <= t[:, None]) if causal else pair)\n"
               "scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + torch.log(count)\n"
               "covered = count.sum(-1, keepdim=True) > 0\n"
               "scores = torch.where(covered, scores, 0.0)\n"
               "return torch.where(covered, torch.softmax(scores, dim=-1) @ v, 0.0)"),
]
