"""Chapter 12's mutants (MiniLM): known-wrong solutions, each a patch of a reference region. Every mutant must
lose its exercise's points, and every patch must still apply to the library's region (tests/test_exercises.py).
The format is described in exercises/grading/mutants/__init__.py. Each parameter of a graded function has a
mutant that ignores it (attention_kl's mask, relation's n_heads in the split and in the scale, minilm_v2_loss's
mask, n_heads, its V-V term and the teacher's k and v).
"""

from exercises.grading.mutants import Mutant

KL_MASK = "t = teacher.detach().masked_fill(~mask[:, None, :, None], 0.0)  # masked rows: t = 0, so they add 0"
KL_LOGS = ("log_t = torch.log(torch.where(seen, t, 1.0))\n"
           "log_s = torch.log(torch.where(seen, student, 1.0))")
KL_MEAN = "return (t * (log_t - log_s)).sum() / (H * int(mask.sum()))"
REL_SPLIT = "xr = x.view(B, T, n_heads, d // n_heads).transpose(1, 2)  # (B, n_heads, T, d / n_heads)"
REL_SCORES = "scores = xr @ xr.transpose(-2, -1) / math.sqrt(d // n_heads)  # (B, n_heads, T, T)"
V2 = ("return sum(attention_kl(relation(t, n_heads), relation(s, n_heads), mask)\n"
      "           for t, s in zip(teacher_qkv, student_qkv))")
VR = "return torch.softmax(v @ v.transpose(-2, -1) / math.sqrt(v.size(-1)), dim=-1)"

MUTANTS = [
    # ---- 12.1 attention_kl
    Mutant("12.1", "attention_kl_ignores_the_mask",
           "ignores the mask: every row counts, masked ones (whose student may be all 0) included",
           old=f"{KL_MASK}\nseen = t > 0", new="t = teacher.detach()\nseen = t > 0\nmask = torch.ones_like(mask)"),
    Mutant("12.1", "attention_kl_mean_over_all_rows",
           "zeroes the masked rows but divides by H * B * T, as if every row were valid",
           old=KL_MEAN, new="return (t * (log_t - log_s)).sum() / (H * mask.numel())"),
    Mutant("12.1", "attention_kl_mask_only_in_the_count",
           "divides by the valid rows but keeps the masked rows' KL in the sum (inf for an all-0 student row)",
           old=KL_MASK, new="t = teacher.detach()"),
    Mutant("12.1", "attention_kl_masks_the_keys",
           "applies the (B, T) mask to the key axis instead of the query rows",
           old=KL_MASK, new="t = teacher.detach().masked_fill(~mask[:, None, None, :], 0.0)"),
    Mutant("12.1", "attention_kl_first_batch_mask_for_all",
           "uses batch 0's mask row for every batch",
           old=KL_MASK, new="t = teacher.detach().masked_fill(~mask[:1, None, :, None], 0.0)"),
    Mutant("12.1", "attention_kl_student_to_teacher",
           "computes KL(student || teacher), the reverse direction",
           old=f"{KL_MASK}\nseen = t > 0", new=("t = student.masked_fill(~mask[:, None, :, None], 0.0)\n"
                                                "student = teacher.detach()\nseen = t > 0")),
    Mutant("12.1", "attention_kl_plain_logs",
           "takes log t and log s everywhere: 0 * log 0 = 0 * -inf = NaN where the teacher is 0",
           old=KL_LOGS, new="log_t = torch.log(t)\nlog_s = torch.log(student)"),
    Mutant("12.1", "attention_kl_plain_log_of_the_student",
           "guards log t but not log s: NaN where teacher and student are both 0 (a causal student's future keys)",
           old=KL_LOGS, new="log_t = torch.log(torch.where(seen, t, 1.0))\nlog_s = torch.log(student)"),
    Mutant("12.1", "attention_kl_eps_in_the_logs",
           "adds 1e-8 inside both logarithms: a biased value, and finite where the student rules out a teacher key",
           old=KL_LOGS, new="log_t = torch.log(t + 1e-8)\nlog_s = torch.log(student + 1e-8)"),
    Mutant("12.1", "attention_kl_xlogy_nan_gradient",
           "writes the KL with xlogy: the right value, but the student's gradient is 0 / 0 = NaN where t = s = 0",
           old=KL_MEAN, new="return (torch.xlogy(t, t) - torch.xlogy(t, student)).sum() / (H * int(mask.sum()))"),
    Mutant("12.1", "attention_kl_sums_over_heads",
           "sums over the heads instead of averaging: the mean is over valid rows only",
           old=KL_MEAN, new="return (t * (log_t - log_s)).sum() / int(mask.sum())"),
    Mutant("12.1", "attention_kl_counts_rows_with_teacher_mass",
           "divides by the rows where the teacher has mass: a valid row of zeros must count in the mean",
           old=KL_MEAN, new="return (t * (log_t - log_s)).sum() / int((t.sum(-1) > 0).sum())"),
    Mutant("12.1", "attention_kl_teacher_not_detached",
           "does not detach the teacher: the loss's gradient reaches the target",
           old=KL_MASK, new="t = teacher.masked_fill(~mask[:, None, :, None], 0.0)"),
    Mutant("12.1", "attention_kl_in_float64",
           "computes and returns float64 whatever the inputs' dtype",
           old=KL_MEAN, new="return (t.double() * (log_t.double() - log_s.double())).sum() / (H * int(mask.sum()))"),
    # ---- 12.2 relation
    Mutant("12.2", "relation_scale_by_sqrt_d",
           "scales by 1/sqrt(d), the whole width, ignoring n_heads in the scale",
           old=REL_SCORES, new="scores = xr @ xr.transpose(-2, -1) / math.sqrt(d)"),
    Mutant("12.2", "relation_no_scale",
           "forgets the 1/sqrt(d / n_heads) scale",
           old=REL_SCORES, new="scores = xr @ xr.transpose(-2, -1)"),
    Mutant("12.2", "relation_interleaved_heads",
           "splits the last axis as (d / n_heads, n_heads): column c goes to head c mod n_heads",
           old=REL_SPLIT, new="xr = x.view(B, T, d // n_heads, n_heads).permute(0, 3, 1, 2)"),
    Mutant("12.2", "relation_view_without_transpose",
           "views x as (B, n_heads, T, d / n_heads) directly, mixing positions into the heads",
           old=REL_SPLIT, new="xr = x.reshape(B, n_heads, T, d // n_heads)"),
    Mutant("12.2", "relation_ignores_n_heads",
           "ignores n_heads: one relation head over the whole width (the shape is (B, 1, T, T))",
           old=f"{REL_SPLIT}\n{REL_SCORES}",
           new="xr = x.unsqueeze(1)\nscores = xr @ xr.transpose(-2, -1) / math.sqrt(d)"),
    Mutant("12.2", "relation_softmax_over_queries",
           "normalizes over the queries (axis -2) instead of the keys",
           old="return torch.softmax(scores, dim=-1)", new="return torch.softmax(scores, dim=-2)"),
    Mutant("12.2", "relation_unshifted_softmax",
           "writes the softmax as exp / sum without subtracting the row max: overflows for wide logits",
           old="return torch.softmax(scores, dim=-1)",
           new="e = scores.exp()\nreturn e / e.sum(-1, keepdim=True)"),
    Mutant("12.2", "relation_in_float64",
           "computes and returns float64 whatever x's dtype",
           old="return torch.softmax(scores, dim=-1)", new="return torch.softmax(scores.double(), dim=-1)"),
    # ---- 12.3 minilm_v2_loss
    Mutant("12.3", "minilm_v2_loss_ignores_the_mask",
           "ignores the mask: every query row counts",
           old=V2, new=("return sum(attention_kl(relation(t, n_heads), relation(s, n_heads))\n"
                        "           for t, s in zip(teacher_qkv, student_qkv))")),
    Mutant("12.3", "minilm_v2_loss_ignores_n_heads",
           "ignores n_heads: one relation head for each of Q, K, V",
           old=V2, new=("return sum(attention_kl(relation(t, 1), relation(s, 1), mask)\n"
                        "           for t, s in zip(teacher_qkv, student_qkv))")),
    Mutant("12.3", "minilm_v2_loss_student_to_teacher",
           "computes KL(student || teacher) of each relation",
           old=V2, new=("return sum(attention_kl(relation(s, n_heads), relation(t, n_heads), mask)\n"
                        "           for t, s in zip(teacher_qkv, student_qkv))")),
    Mutant("12.3", "minilm_v2_loss_forgets_the_values",
           "sums Q-Q and K-K only, ignoring v",
           old=V2, new=("return sum(attention_kl(relation(t, n_heads), relation(s, n_heads), mask)\n"
                        "           for t, s in zip(teacher_qkv[:2], student_qkv[:2]))")),
    Mutant("12.3", "minilm_v2_loss_mean_of_the_terms",
           "averages the three relation KLs instead of summing them",
           old=V2, new=("return sum(attention_kl(relation(t, n_heads), relation(s, n_heads), mask)\n"
                        "           for t, s in zip(teacher_qkv, student_qkv)) / 3")),
    Mutant("12.3", "minilm_v2_loss_pairs_across_q_k_v",
           "pairs the teacher's q with the student's k, k with v and v with q",
           old=V2, new=("return sum(attention_kl(relation(t, n_heads), relation(s, n_heads), mask)\n"
                        "           for t, s in zip(teacher_qkv, list(student_qkv[1:]) + list(student_qkv[:1])))")),
    Mutant("12.3", "minilm_v2_loss_teacher_queries_only",
           "uses the teacher's q as the target of all three relations, ignoring its k and v",
           old=V2, new=("return sum(attention_kl(relation(teacher_qkv[0], n_heads), relation(s, n_heads), mask)\n"
                        "           for s in student_qkv)")),
    # ---- 12.4 value_relation
    Mutant("12.4", "value_relation_no_scale",
           "forgets the 1/sqrt(Dh) scale",
           old=VR, new="return torch.softmax(v @ v.transpose(-2, -1), dim=-1)"),
    Mutant("12.4", "value_relation_scale_by_sqrt_T",
           "scales by 1/sqrt(T), the sequence length, instead of 1/sqrt(Dh)",
           old=VR, new="return torch.softmax(v @ v.transpose(-2, -1) / math.sqrt(v.size(-2)), dim=-1)"),
    Mutant("12.4", "value_relation_softmax_over_queries",
           "normalizes over the queries (axis -2)",
           old=VR, new="return torch.softmax(v @ v.transpose(-2, -1) / math.sqrt(v.size(-1)), dim=-2)"),
    Mutant("12.4", "value_relation_unshifted_softmax",
           "writes the softmax as exp / sum without the max shift: overflows for wide logits",
           old=VR, new=("e = (v @ v.transpose(-2, -1) / math.sqrt(v.size(-1))).exp()\n"
                        "return e / e.sum(-1, keepdim=True)")),
    Mutant("12.4", "value_relation_in_float64",
           "computes and returns float64 whatever v's dtype",
           old=VR, new="return torch.softmax(v.double() @ v.double().transpose(-2, -1) / math.sqrt(v.size(-1)), "
                       "dim=-1)"),
]
