"""Chapter 10's mutants (RetNet retention and XPos): known-wrong solutions, each a patch of a reference region. Every
mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.

Each exercise has a mutant per parameter of its function that ignores it (q, k, v, gamma, state, chunk_size,
q_offset, scale_base, n) and one that loses the input dtype, besides the plausible mistakes of the mechanism.
"""

from exercises.grading.mutants import Mutant

STEP = "S = g * S + k[:, :, n, :, None] * v[:, :, n, None, :]  # (B, H, Dk, Dv)"
READ = "out.append(q[:, :, n, None, :] @ S)  # (B, H, 1, Dv)"
START = "S = q.new_zeros(B, H, Dk, v.size(-1)) if state is None else state"
DECAYS = "xi, zeta = (g ** (j + 1)).to(q.dtype), (g ** (C - 1 - j)).to(q.dtype)  # (H, C, 1)"
CROSS = "out.append(inner + (qc @ S) * xi)"
CARRY = "S = (g ** C).to(q.dtype) * S + kc.transpose(-2, -1) @ (vc * zeta)"
CENTRE = "c = (-max(q_offset + Tq, Tk)) // 2  # centres the exponent: zeta^(+-L/(2B)) at most, cancels in q'.k'"
Q_SCALE = "q_scale = zeta ** ((qpos[:, None] + c) / scale_base)  # (Tq, D/2)"
K_SCALE = "k_scale = zeta ** (-(kpos[:, None] + c) / scale_base)  # (Tk, D/2)"
ZETA = "zeta = (torch.arange(0, D, 2, device=q.device, dtype=work) + 0.4 * D) / (1.4 * D)  # (D/2,)"
PAIRS = "q_scale, k_scale = (s.repeat_interleave(2, dim=-1).to(q.dtype) for s in (q_scale, k_scale))  # (T, D)"
MASK = "return torch.where(diff >= 0, gamma ** diff.clamp(min=0), 0.0)"

MUTANTS = [
    # -- 10.1 the recurrent step: S_n = gamma S_(n-1) + k_n^T v_n, o_n = q_n S_n
    Mutant("10.1", "retention_recurrent_no_decay", "ignores gamma: S_n = S_(n-1) + k_n^T v_n (causal linear "
           "attention whatever the decay)", old=STEP, new="S = S + k[:, :, n, :, None] * v[:, :, n, None, :]"),
    Mutant("10.1", "retention_recurrent_ignores_the_state", "ignores the given state: always starts from zeros",
           old=START, new="S = q.new_zeros(B, H, Dk, v.size(-1))"),
    Mutant("10.1", "retention_recurrent_reads_before_the_update",
           "reads o_n = q_n S_(n-1): the token's own k_n^T v_n is added after its output",
           old=f"{STEP}\n    {READ}",
           new=f"{READ}\n    {STEP}"),
    Mutant("10.1", "retention_recurrent_decays_the_new_token", "decays after adding: S_n = gamma (S_(n-1) + "
           "k_n^T v_n), so the token's own product is decayed once too",
           old=STEP, new="S = g * (S + k[:, :, n, :, None] * v[:, :, n, None, :])"),
    Mutant("10.1", "retention_recurrent_one_gamma_for_all_heads", "uses the first head's gamma for every head",
           old=STEP, new="S = g[0] * S + k[:, :, n, :, None] * v[:, :, n, None, :]"),
    Mutant("10.1", "retention_recurrent_reads_with_k", "ignores q: reads the state out with the key, o_n = k_n S_n",
           old=READ, new="out.append(k[:, :, n, None, :] @ S)"),
    Mutant("10.1", "retention_recurrent_ignores_v", "ignores v: adds k_n^T 1 (a value of ones) instead of "
           "k_n^T v_n",
           old=STEP, new="S = g * S + k[:, :, n, :, None] * torch.ones_like(v[:, :, n, None, :])"),
    Mutant("10.1", "retention_recurrent_updates_the_state_in_place",
           "updates the caller's state tensor in place (S.mul_(gamma).add_(...)): the caller's S_0 is gone",
           old=STEP, new="S = S.mul_(g).add_(k[:, :, n, :, None] * v[:, :, n, None, :])"),
    Mutant("10.1", "retention_recurrent_default_dtype_state", "starts from torch.zeros in the default dtype: "
           "float16 inputs give a float32 state and output",
           old=START, new="S = torch.zeros(B, H, Dk, v.size(-1)) if state is None else state"),

    # -- 10.2 the chunkwise cross-chunk term: (Q S) (.) xi, S <- gamma^C S + K^T (V (.) zeta)
    Mutant("10.2", "retention_chunkwise_drops_the_carried_state",
           "ignores the state: a chunk's output is the inner parallel term alone, the past never arrives",
           old=CROSS, new="out.append(inner)"),
    Mutant("10.2", "retention_chunkwise_xi_from_zero", "decays the carried state by gamma^j at row j instead of "
           "gamma^(j + 1): the state is one step further back than the row 0 token",
           old=DECAYS, new="xi, zeta = (g ** j).to(q.dtype), (g ** (C - 1 - j)).to(q.dtype)"),
    Mutant("10.2", "retention_chunkwise_zeta_reversed", "decays the chunk's rows by gamma^j instead of "
           "gamma^(C - 1 - j) in the state update: the first row, the oldest, decays least",
           old=DECAYS, new="xi, zeta = (g ** (j + 1)).to(q.dtype), (g ** j).to(q.dtype)"),
    Mutant("10.2", "retention_chunkwise_state_not_decayed", "ignores gamma in the carry: S <- S + K^T (V (.) zeta), "
           "the old state is not decayed by gamma^C",
           old=CARRY, new="S = S + kc.transpose(-2, -1) @ (vc * zeta)"),
    Mutant("10.2", "retention_chunkwise_full_length_last_chunk",
           "ignores that the last chunk may be short: its decays use chunk_size instead of its own length C",
           old=DECAYS + "\n" + CROSS + "\n" + CARRY,
           new=("xi, zeta = (g ** (j + 1)).to(q.dtype), (g ** (chunk_size - 1 - j)).to(q.dtype)\n" + CROSS
                + "\nS = (g ** chunk_size).to(q.dtype) * S + kc.transpose(-2, -1) @ (vc * zeta)")),
    Mutant("10.2", "retention_chunkwise_updates_before_the_output",
           "updates the state before the chunk's output: the chunk sees its own keys twice",
           old=CROSS + "\n" + CARRY, new=CARRY + "\n" + CROSS),
    Mutant("10.2", "retention_chunkwise_one_gamma_for_all_heads", "uses the first head's gamma for the "
           "cross-chunk decays of every head",
           old=DECAYS, new="xi, zeta = (g[0] ** (j + 1)).to(q.dtype), (g[0] ** (C - 1 - j)).to(q.dtype)"),
    Mutant("10.2", "retention_chunkwise_xi_in_float32", "keeps xi in gamma's float32: float16 inputs give a "
           "float32 output", old=DECAYS, new="xi, zeta = g ** (j + 1), (g ** (C - 1 - j)).to(q.dtype)"),

    # -- 10.3 XPos's scale: q by zeta^((n + c)/B), k by zeta^(-(m + c)/B), centred
    Mutant("10.3", "apply_xpos_not_centred", "does not centre the exponent (c = 0): long float16 sequences "
           "overflow, and q', k' are not torchscale's", old=CENTRE, new="c = 0"),
    Mutant("10.3", "apply_xpos_signs_swapped", "scales q by zeta^(-n/B) and k by zeta^(m/B): the score grows "
           "with distance instead of decaying",
           old=Q_SCALE + "\n" + K_SCALE,
           new="q_scale = zeta ** (-(qpos[:, None] + c) / scale_base)\nk_scale = zeta ** ((kpos[:, None] + c) / "
               "scale_base)"),
    Mutant("10.3", "apply_xpos_centre_ignores_q_offset", "ignores q_offset in the centre: L = max(Tq, Tk)",
           old=CENTRE, new="c = (-max(Tq, Tk)) // 2"),
    Mutant("10.3", "apply_xpos_scale_ignores_q_offset", "ignores q_offset in q's scale: q's exponent counts from 0, "
           "as if the queries came first", old=Q_SCALE,
           new="q_scale = zeta ** ((torch.arange(Tq, dtype=work)[:, None] + c) / scale_base)"),
    Mutant("10.3", "apply_xpos_ignores_scale_base", "ignores scale_base: B = 512 always (scale_base = inf is not "
           "RoPE)", old=Q_SCALE + "\n" + K_SCALE,
           new="q_scale = zeta ** ((qpos[:, None] + c) / 512)\nk_scale = zeta ** (-(kpos[:, None] + c) / 512)"),
    Mutant("10.3", "apply_xpos_centre_not_floored", "centres on -L / 2, not the integer (-L) // 2: q', k' differ "
           "from torchscale's for odd L", old=CENTRE, new="c = -max(q_offset + Tq, Tk) / 2"),
    Mutant("10.3", "apply_xpos_zeta_of_the_pair_index", "builds zeta_i from i = 0, 1, 2, ... instead of the even "
           "entries 2i: (i + 0.4 D) / (1.4 D)",
           old=ZETA, new="zeta = (torch.arange(D // 2, dtype=work) + 0.4 * D) / (1.4 * D)"),
    Mutant("10.3", "apply_xpos_scales_not_interleaved", "repeats the D/2 scales as a block [s, s] instead of "
           "interleaved [s0, s0, s1, s1, ...]: pair i's two entries get different scales",
           old=PAIRS, new="q_scale, k_scale = (s.repeat(1, 2).to(q.dtype) for s in (q_scale, k_scale))"),
    Mutant("10.3", "apply_xpos_scale_in_float32", "keeps the scales in the working float32: float16 q, k give "
           "float32 q', k'", old=PAIRS,
           new="q_scale, k_scale = (s.repeat_interleave(2, dim=-1) for s in (q_scale, k_scale))"),

    # -- 10.4 the decay mask: D[r, c] = gamma^(r - c) for r >= c, else 0
    Mutant("10.4", "decay_mask_transposed", "puts the powers above the diagonal: gamma^(c - r) for c >= r",
           old=MASK, new="return torch.where(diff <= 0, gamma ** (-diff).clamp(min=0), 0.0)"),
    Mutant("10.4", "decay_mask_no_zeros_above", "forgets causality: gamma^|r - c| everywhere",
           old=MASK, new="return gamma ** diff.abs()"),
    Mutant("10.4", "decay_mask_strict_diagonal", "zeros the diagonal: a token does not see itself",
           old=MASK, new="return torch.where(diff > 0, gamma ** diff.clamp(min=0), 0.0)"),
    Mutant("10.4", "decay_mask_multiplies_by_the_mask", "multiplies gamma^(r - c) by a 0/1 mask: where "
           "gamma^(r - c) overflows above the diagonal, inf * 0 gives NaN",
           old=MASK, new="return gamma ** diff * (diff >= 0)"),
    Mutant("10.4", "decay_mask_one_gamma_for_all_heads", "ignores gamma's heads: every head gets the first head's "
           "mask", old=MASK,
           new="return torch.where(diff >= 0, gamma[:1] ** diff.clamp(min=0), 0.0).repeat(gamma.size(0), 1, 1)"),
    Mutant("10.4", "decay_mask_at_most_16", "ignores n beyond 16: builds a 16 x 16 mask and slices it",
           old="idx = torch.arange(n, device=gamma.device, dtype=gamma.dtype)\ndiff = idx[:, None] - idx[None, :]  # "
               "(n, n)\n" + MASK,
           new="idx = torch.arange(16, device=gamma.device, dtype=gamma.dtype)\ndiff = idx[:, None] - idx[None, :]\n"
               "return torch.where(diff >= 0, gamma ** diff.clamp(min=0), 0.0)[:, :n, :n].clone()"),
    Mutant("10.4", "decay_mask_in_float32", "returns float32 whatever gamma's dtype (a float64 gamma loses its "
           "precision)", old=MASK, new="return torch.where(diff >= 0, gamma ** diff.clamp(min=0), 0.0).float()"),
]
