"""Chapter 11's mutants (YOCO: gated retention, the shared-KV cross-decoder, the early-exit prefill): known-wrong
solutions, each a patch of a reference region. Every mutant must lose its exercise's points, and every patch must
still apply to the library's region (tests/test_exercises.py). The format is described in
exercises/grading/mutants/__init__.py. Each exercise has one mutant per parameter that ignores it (the names say
which), then the plausible mistakes.
"""

from exercises.grading.mutants import Mutant

_LOOP = """S = _zero_state(q, v, state)
outs = [q.new_zeros(*q.shape[:2], 0, v.size(-1))]
for t in range(q.size(-2)):
    gamma = log_decay[..., t, None, None].exp()  # (B, H, 1, 1)
    S = gamma * S + k[..., t, :, None] @ v[..., t, None, :]  # (B, H, Dk, Dv)
    outs.append(q[..., t, None, :] @ S)  # (B, H, 1, Dv)
return torch.cat(outs, dim=2), S"""

_UPDATE = "S = gamma * S + k[..., t, :, None] @ v[..., t, None, :]  # (B, H, Dk, Dv)"
_KV = "k, v = (p(h).view(B, T, n_heads, C // n_heads).transpose(1, 2) for p in (k_proj, v_proj))"
_PAST = ("if past_kv is not None:\n"
         "    k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)")
_EXIT = "logits, (k, v) = model._cross_decode(x, 1)  # the early exit: one query position"

MUTANTS = [
    # -- 11.1 the gated-retention recurrence: each parameter ignored once
    Mutant("11.1", "gated_retention_recurrent_ignores_q",
           "reads the output with the key instead of the query: o_t = k_t S_t",
           old="outs.append(q[..., t, None, :] @ S)  # (B, H, 1, Dv)",
           new="outs.append(k[..., t, None, :] @ S)"),
    Mutant("11.1", "gated_retention_recurrent_ignores_k",
           "adds q_t^T v_t to the state instead of k_t^T v_t",
           old=_UPDATE, new="S = gamma * S + q[..., t, :, None] @ v[..., t, None, :]"),
    Mutant("11.1", "gated_retention_recurrent_ignores_v",
           "adds k_t^T 1 (a row of ones) instead of k_t^T v_t: the values never enter",
           old=_UPDATE, new="S = gamma * S + k[..., t, :, None] @ torch.ones_like(v[..., t, None, :])"),
    Mutant("11.1", "gated_retention_recurrent_ignores_log_decay",
           "never decays: gamma_t = 1 (causal linear attention)",
           old="gamma = log_decay[..., t, None, None].exp()  # (B, H, 1, 1)",
           new="gamma = torch.ones_like(log_decay[..., t, None, None])"),
    Mutant("11.1", "gated_retention_recurrent_ignores_state",
           "always starts from zeros: the given state S_0 is dropped, so a continued sequence restarts",
           old="S = _zero_state(q, v, state)", new="S = _zero_state(q, v, None)"),
    # -- the plausible mistakes
    Mutant("11.1", "gated_retention_recurrent_reads_before_the_update",
           "reads o_t = q_t S_{t-1} before adding k_t^T v_t: a token does not see itself",
           old=("    S = gamma * S + k[..., t, :, None] @ v[..., t, None, :]  # (B, H, Dk, Dv)\n"
                "    outs.append(q[..., t, None, :] @ S)  # (B, H, 1, Dv)"),
           new=("    outs.append(q[..., t, None, :] @ (gamma * S))\n"
                "    S = gamma * S + k[..., t, :, None] @ v[..., t, None, :]")),
    Mutant("11.1", "gated_retention_recurrent_decays_the_new_token",
           "decays after adding: S_t = gamma_t (S_{t-1} + k_t^T v_t), so the current token is decayed too",
           old=_UPDATE, new="S = gamma * (S + k[..., t, :, None] @ v[..., t, None, :])"),
    Mutant("11.1", "gated_retention_recurrent_transposed_outer_product",
           "adds v_t^T k_t (Dv, Dk) instead of k_t^T v_t (Dk, Dv): right shape only when Dk = Dv, wrong values",
           old=_UPDATE, new="S = gamma * S + v[..., t, :, None] @ k[..., t, None, :]"),
    Mutant("11.1", "gated_retention_recurrent_one_decay_per_head",
           "takes batch row 0's gates for every row: log_decay is one gate per row, head and token",
           old="gamma = log_decay[..., t, None, None].exp()  # (B, H, 1, 1)",
           new="gamma = log_decay[:1, :, t, None, None].exp()"),
    Mutant("11.1", "gated_retention_recurrent_inverse_decays",
           "factors the decay as exp(c_t) * sum_m exp(-c_m) k_m^T v_m with c the cumulative log decay: exact on "
           "paper, but exp(-c_m) overflows for long or strong decays (inf * 0 = NaN)",
           old=_LOOP,
           new=("S0 = _zero_state(q, v, state)\n"
                "c = log_decay.cumsum(-1)\n"
                "U = torch.zeros_like(S0)\n"
                "outs = [q.new_zeros(*q.shape[:2], 0, v.size(-1))]\n"
                "for t in range(q.size(-2)):\n"
                "    U = U + (-c[..., t, None, None]).exp() * (k[..., t, :, None] @ v[..., t, None, :])\n"
                "    S = c[..., t, None, None].exp() * (S0 + U)\n"
                "    outs.append(q[..., t, None, :] @ S)\n"
                "return torch.cat(outs, dim=2), S")),
    Mutant("11.1", "gated_retention_recurrent_updates_the_state_in_place",
           "decays and adds into the caller's state tensor in place (the cache a decoder passed in changes)",
           old=_UPDATE, new="S = S.mul_(gamma).add_(k[..., t, :, None] @ v[..., t, None, :])"),

    # -- 11.2 the shared-KV cross-decoder: each parameter ignored once
    Mutant("11.2", "shared_kv_cross_decoder_kv_from_the_queries_only",
           "ignores x's earlier positions: K, V come from the last n_queries positions only",
           old="h = kv_norm(x)\n" + _KV,
           new=("h = kv_norm(x[:, T - n_queries:])\n"
                "k, v = (p(h).view(B, n_queries, n_heads, C // n_heads).transpose(1, 2) for p in (k_proj, v_proj))")),
    Mutant("11.2", "shared_kv_cross_decoder_ignores_kv_norm",
           "projects x itself: the RMSNorm before the key and value projections is skipped",
           old="h = kv_norm(x)", new="h = x"),
    Mutant("11.2", "shared_kv_cross_decoder_ignores_k_proj",
           "computes K with v_proj: K = V",
           old="for p in (k_proj, v_proj))", new="for p in (v_proj, v_proj))"),
    Mutant("11.2", "shared_kv_cross_decoder_ignores_v_proj",
           "computes V with k_proj: V = K",
           old="for p in (k_proj, v_proj))", new="for p in (k_proj, k_proj))"),
    Mutant("11.2", "shared_kv_cross_decoder_ignores_later_layers",
           "runs only the first cross layer (right with one cross layer only)",
           old="for layer in layers:", new="for layer in layers[:1]:"),
    Mutant("11.2", "shared_kv_cross_decoder_ignores_n_heads",
           "keeps one head of width d: K, V are never split into n_heads heads",
           old=_KV, new="k, v = (p(h).view(B, T, 1, C).transpose(1, 2) for p in (k_proj, v_proj))"),
    Mutant("11.2", "shared_kv_cross_decoder_ignores_n_queries",
           "runs every position of x through the layers, whatever n_queries asks",
           old="h = x[:, T - n_queries:]", new="h = x"),
    Mutant("11.2", "shared_kv_cross_decoder_ignores_past_kv",
           "drops the cached keys and values: a decoding step sees only its own position",
           old=_PAST, new=""),
    # -- the plausible mistakes
    Mutant("11.2", "shared_kv_cross_decoder_kv_per_layer",
           "recomputes K, V from each layer's output for the next layer (a standard decoder's per-layer cache)",
           old="    h = layer(h, k=k, v=v)",
           new=("    h = layer(h, k=k, v=v)\n"
                "    k, v = (p(kv_norm(h)).view(B, h.size(1), n_heads, C // n_heads).transpose(1, 2)\n"
                "            for p in (k_proj, v_proj))")),
    Mutant("11.2", "shared_kv_cross_decoder_past_after_the_new_positions",
           "puts the cached keys and values after the new ones: the causal offset then points at the wrong keys",
           old="k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)",
           new="k, v = torch.cat([k, past_kv[0]], dim=2), torch.cat([v, past_kv[1]], dim=2)"),
    Mutant("11.2", "shared_kv_cross_decoder_normed_queries",
           "feeds RMSNorm(x) to the cross layers: the norm belongs to K and V only",
           old="h = x[:, T - n_queries:]", new="h = kv_norm(x)[:, T - n_queries:]"),
    Mutant("11.2", "shared_kv_cross_decoder_heads_without_transpose",
           "splits heads with a plain view to (B, H, T, D): positions and heads get mixed",
           old=_KV, new="k, v = (p(h).view(B, n_heads, T, C // n_heads) for p in (k_proj, v_proj))"),

    # -- 11.3 the early-exit prefill: each parameter ignored once
    Mutant("11.3", "yoco_prefill_ignores_the_prompt",
           "runs the self-decoder on the last prompt token only (at its position): the prompt's context is lost",
           old="x = model._self_decode(idx, 0, caches)",
           new="x = model._self_decode(idx[:, -1:], idx.size(1) - 1, caches)"),
    Mutant("11.3", "yoco_prefill_ignores_the_model_depth",
           "makes two cache dicts whatever the model's number of self-decoder layers",
           old="caches = [{} for _ in model.self_layers]", new="caches = [{}, {}]"),
    # -- the plausible mistakes
    Mutant("11.3", "yoco_prefill_no_early_exit",
           "runs the cross-decoder over every prompt position and keeps the last (right logits, no early exit)",
           old=_EXIT, new="logits, (k, v) = model._cross_decode(x)"),
    Mutant("11.3", "yoco_prefill_one_dict_for_all_layers",
           "repeats one dict for every self layer ([{}] * n): each layer overwrites the others' state",
           old="caches = [{} for _ in model.self_layers]", new="caches = [{}] * len(model.self_layers)"),
    Mutant("11.3", "yoco_prefill_no_self_decoder_cache",
           "runs the self-decoder without its caches: the cache keeps empty dicts and decoding restarts",
           old="x = model._self_decode(idx, 0, caches)", new="x = model._self_decode(idx, 0, None)"),
    Mutant("11.3", "yoco_prefill_pos_off_by_one",
           "stores pos = T - 1: the next step takes the last prompt token's position",
           old='"pos": idx.size(1)', new='"pos": idx.size(1) - 1'),
    Mutant("11.3", "yoco_prefill_keeps_the_time_axis",
           "returns logits of shape (B, 1, V) instead of the last position's (B, V)",
           old="return logits[:, -1],", new="return logits,"),
    Mutant("11.3", "yoco_prefill_kv_of_the_last_position",
           "gives the cross-decoder only the last position, so the global K, V cover that one position",
           old=_EXIT, new="logits, (k, v) = model._cross_decode(x[:, -1:])"),
]
