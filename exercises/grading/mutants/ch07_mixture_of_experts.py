"""Chapter 07's mutants (sparse mixture of experts): known-wrong solutions, each a patch of a reference region.
Every mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.
"""

from exercises.grading.mutants import Mutant

MUTANTS = [
    Mutant("7.1", "top_k_routing_second_choices_first",
           "places the second choices before the first choices in each expert's queue",
           old="slot1 = (mask1.cumsum(0) - 1).gather(1, e1[:, None])  # earlier tokens win",
           new="slot1 = (mask1.cumsum(0) - 1 + F.one_hot(p.masked_fill(mask1.bool(), float('-inf')).argmax(-1), "
               "E).sum(0) * (k == 2)).gather(1, e1[:, None])"),
    Mutant("7.1", "top_k_routing_renormalizes_after_dropping",
           "renormalizes the top-2 gates over the kept choices only (after dropping): torchscale's default "
           "(moe_normalize_gate_prob_before_dropping=False), but wrong for this exercise's rule, GShard's "
           "normalization before dropping",
           old="gates = gates / gates.sum(1, keepdim=True)  # before dropping",
           new="gates = gates * (slots < capacity)\n"
               "    gates = gates / gates.sum(1, keepdim=True).clamp(min=1e-30)"),
    Mutant("7.1", "top_k_routing_interleaves_choices_in_token_order",
           "counts capacity over both choices in token order (token 0's second choice before token 1's first)",
           old="slot2 = (mask2.cumsum(0) - 1 + mask1.sum(0)).gather(1, e2[:, None])  # after every first choice",
           new="slot2 = (mask2.cumsum(0) - 1 + mask1.cumsum(0)).gather(1, e2[:, None])"),
    Mutant("7.1", "top_k_routing_top1_gate_renormalized",
           "renormalizes the top-1 gate to 1 (the gate must stay p_max)",
           old="gates = p.gather(1, experts)\nif k == 2:",
           new="gates = torch.ones_like(p.gather(1, experts))\nif k == 2:"),
    Mutant("7.2", "load_balancing_loss_gradient_through_the_fraction",
           "lets the gradient flow through the argmax fraction (a straight-through estimate): same value, wrong "
           "gradient",
           old="fraction = F.one_hot(e1, E).to(probs.dtype).mean(0)  # an argmax count: constant for autograd",
           new="fraction = (F.one_hot(e1, E).to(probs.dtype) + probs - probs.detach()).mean(0)"),
    Mutant("7.2", "load_balancing_loss_soft_fraction",
           "uses the mean probability for both factors (E sum me^2): differentiable, but not the balance loss",
           old="fraction = F.one_hot(e1, E).to(probs.dtype).mean(0)  # an argmax count: constant for autograd",
           new="fraction = probs.mean(0)"),
    Mutant("7.2", "load_balancing_loss_missing_factor_e",
           "averages over experts instead of summing (E^2 mean = E sum; this is E mean): 1/E at uniform routing",
           old="return E * (probs.mean(0) * fraction).sum()",
           new="return E * (probs.mean(0) * fraction).mean()"),
    Mutant("7.3", "xmoe_scores_token_not_normalized",
           "leaves the token side unnormalized, like torchscale (scores grow with ||W h||)",
           old="token = F.normalize(h @ projection.t(), dim=-1)  # (S, d_e), on the unit sphere",
           new="token = h @ projection.t()"),
    Mutant("7.3", "xmoe_scores_expert_not_normalized",
           "normalizes the token but not the expert embeddings",
           old="experts = F.normalize(expert_embeddings, dim=-1)  # (E, d_e)",
           new="experts = expert_embeddings"),
    Mutant("7.3", "xmoe_scores_temperature_multiplies",
           "multiplies by tau instead of dividing",
           old="return token @ experts.t() / temperature",
           new="return token @ experts.t() * temperature"),
    Mutant("7.4", "align_by_expert_floor_blocks",
           "rounds each expert's block count down, so a partial block of pairs has no rows",
           old="blocks = (counts + block_m - 1) // block_m  # ceil: a partial block is padded",
           new="blocks = counts // block_m"),
    Mutant("7.4", "align_by_expert_unpadded_runs",
           "packs the experts' runs back to back without padding: a block can hold two experts' pairs",
           old="run_start = (expert_blocks[:-1].long() * block_m).repeat_interleave(counts)  # padded start of each "
               "pair's run",
           new="run_start = F.pad(counts.cumsum(0), (1, 0))[:-1].repeat_interleave(counts)"),
    Mutant("7.4", "align_by_expert_one_label_per_expert",
           "gives each expert one block label however many blocks it has",
           old="block_expert = torch.arange(num_experts, device=experts.device).repeat_interleave(blocks)"
               ".to(torch.int32)",
           new="block_expert = torch.arange(num_experts, device=experts.device)[blocks > 0]"
               ".repeat_interleave(blocks[blocks > 0].clamp(max=1)).to(torch.int32)"),

    # -- 7.5 the MoE layer end to end: capacity, gates in the combine, dropped tokens, the aux loss
    Mutant("7.5", "moe_forward_gates_not_normalized",
           "combines with the router probabilities p[e_j] instead of the routing's gates (no top-2 normalization)",
           old="combine = routing.probs.new_zeros(S, E, C).index_put(where, routing.gates[routing.kept])  # (S, E, C)",
           new=("combine = routing.probs.new_zeros(S, E, C).index_put(\n"
                "    where, routing.probs.gather(1, routing.experts)[routing.kept])")),
    Mutant("7.5", "moe_forward_renormalizes_over_kept",
           "normalizes the gates again over the kept choices, so a token with one choice dropped gets gate 1 "
           "(torchscale's top-2 default; this exercise's rule uses the routing's gates as they are)",
           old="combine = routing.probs.new_zeros(S, E, C).index_put(where, routing.gates[routing.kept])  # (S, E, C)",
           new=("kept_gates = routing.gates * routing.kept\n"
                "kept_gates = kept_gates / kept_gates.sum(1, keepdim=True).clamp(min=1e-30)\n"
                "combine = routing.probs.new_zeros(S, E, C).index_put(where, kept_gates[routing.kept])")),
    Mutant("7.5", "moe_forward_passes_dropped_tokens_through",
           "returns h_s for a token every expert dropped (the residual already carries it: counted twice)",
           old='return torch.einsum("sec,ecd->sd", combine.to(h.dtype), moe._run_experts(expert_in))',
           new=('y = torch.einsum("sec,ecd->sd", combine.to(h.dtype), moe._run_experts(expert_in))\n'
                "return y + h * (~routing.kept.any(1))[:, None].to(h.dtype)")),
    Mutant("7.5", "moe_forward_dropped_choices_in_the_last_slot",
           "never drops: a choice past the capacity is clamped into the expert's last slot (C - 1)",
           old=("token = torch.arange(S, device=h.device)[:, None].expand_as(routing.experts)[routing.kept]\n"
                "where = (token, routing.experts[routing.kept], routing.slots[routing.kept])  # (token, expert, slot) kept\n"
                "combine = routing.probs.new_zeros(S, E, C).index_put(where, routing.gates[routing.kept])  # (S, E, C)"),
           new=("token = torch.arange(S, device=h.device)[:, None].expand_as(routing.experts).reshape(-1)\n"
                "where = (token, routing.experts.reshape(-1), routing.slots.clamp(max=C - 1).reshape(-1))\n"
                "combine = routing.probs.new_zeros(S, E, C).index_put(where, routing.gates.reshape(-1))")),
    Mutant("7.5", "moe_forward_aux_loss_detached",
           "stores the aux loss detached: the model adds it, but no balancing gradient reaches the router",
           old="moe.aux_loss = routing.aux_loss",
           new="moe.aux_loss = routing.aux_loss.detach()"),
    Mutant("7.5", "moe_forward_ignores_capacity",
           "routes with capacity S: no token is ever dropped",
           old="C = moe.capacity(h.size(0))",
           new="C = h.size(0)"),
    Mutant("7.5", "moe_forward_training_capacity_in_eval",
           "computes the training capacity int(factor k ceil(S / E)) in eval mode too, instead of moe.capacity(S)",
           old="C = moe.capacity(h.size(0))",
           new="C = expert_capacity(h.size(0), moe.num_experts, moe.k, moe.capacity_factor)"),
    Mutant("7.5", "moe_forward_gates_detached",
           "detaches the gates in the combine: the router learns only from the balancing loss",
           old="combine = routing.probs.new_zeros(S, E, C).index_put(where, routing.gates[routing.kept])  # (S, E, C)",
           new="combine = routing.probs.new_zeros(S, E, C).index_put(where, routing.gates[routing.kept].detach())"),

    # -- 7.6 one tile of the grouped GEMM inside the Triton kernel: expert, gather, masked K loop, masked store
    Mutant("7.6", "_grouped_gemm_kernel_next_blocks_expert",
           "takes the expert of the next block (an off-by-one in BLOCK_EXPERT): a tile multiplies by another "
           "expert's weights, the last one by whatever follows the metadata",
           old="expert = tl.load(BLOCK_EXPERT + pid_m).to(tl.int64)",
           new="expert = tl.load(BLOCK_EXPERT + pid_m + 1).to(tl.int64)"),
    Mutant("7.6", "_grouped_gemm_kernel_a_not_masked_by_k",
           "loads the A tile without the K mask: the last K step reads past column K - 1 of each row",
           old="a = tl.load(a_ptrs, mask=valid[:, None] & (ks[None, :] < K - k0), other=0.0)",
           new="a = tl.load(a_ptrs, mask=valid[:, None], other=0.0)"),
    Mutant("7.6", "_grouped_gemm_kernel_w_not_masked_by_k",
           "loads the W tile without the K mask: the last K step reads past W[e]'s last column (or row)",
           old="mask=(ks[:, None] < K - k0) & (cols[None, :] < N), other=0.0)",
           new="mask=cols[None, :] < N, other=0.0)"),
    Mutant("7.6", "_grouped_gemm_kernel_stores_padding_rows",
           "stores every row of the tile, padding rows (A_ROWS = -1) included, at their C_ROWS",
           old="mask=valid[:, None] & (cols[None, :] < N))",
           new="mask=cols[None, :] < N)"),
    Mutant("7.6", "_grouped_gemm_kernel_store_not_masked_by_n",
           "stores all BLOCK_N columns of the last column tile: columns >= N land in the next row's memory",
           old="mask=valid[:, None] & (cols[None, :] < N))",
           new="mask=valid[:, None])"),
    Mutant("7.6", "_grouped_gemm_kernel_overwrites_the_accumulator",
           "assigns each K step's product to the accumulator instead of adding it: only the last K tile counts",
           old="acc += tl.dot(a, w)",
           new="acc = tl.dot(a, w)"),
    Mutant("7.6", "_grouped_gemm_kernel_accumulates_in_the_input_dtype",
           "rounds the running sum to C's dtype after every K step (a float16 accumulator for float16 inputs)",
           old="acc += tl.dot(a, w)",
           new="acc = (acc + tl.dot(a, w)).to(C.dtype.element_ty)"),
    Mutant("7.6", "_grouped_gemm_kernel_transposed_weight",
           "swaps the two weight layouts: reads W[e] as (K, N) when TRANS_W says it is stored (N, K), and the "
           "other way round",
           old="if TRANS_W:",
           new="if not TRANS_W:"),
]
