"""Chapter 05's mutants (Sub-LN and Magneto): known-wrong solutions, each a patch of a reference region. Every
mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/mutants/__init__.py.
"""

from exercises.mutants import Mutant

MUTANTS = [
    Mutant("5.2", "subln_ffn_norm_before_the_activation",
           "normalizes before the activation, W2 GELU(LN(W1 x)), instead of between the activation and W2",
           old="return fc2(inner_norm(F.gelu(fc1(x))))",
           new="return fc2(F.gelu(inner_norm(fc1(x))))"),
    Mutant("5.2", "subln_ffn_norm_over_d_after_fc2",
           "puts the inner norm after fc2, over d instead of the feed-forward width d_ff",
           old="return fc2(inner_norm(F.gelu(fc1(x))))",
           new="return inner_norm(fc2(F.gelu(fc1(x))))"),
    Mutant("5.2", "subln_ffn_normalizes_the_input",
           "applies the inner norm to the input (a second Pre-LN over d) instead of inside the feed-forward",
           old="return fc2(inner_norm(F.gelu(fc1(x))))",
           new="return fc2(F.gelu(fc1(inner_norm(x))))"),
    Mutant("5.1", "subln_gamma_counts_sublayers",
           "lets N count sublayers: gamma = sqrt(log 4N) for a single stack",
           old=("N, M = encoder_layers, decoder_layers\n"
                "if N and M:\n"
                "    return {\"encoder\": math.sqrt(math.log(3 * M) * math.log(2 * N) / 3),\n"
                "            \"decoder\": math.sqrt(math.log(3 * M))}"),
           new=("N, M = 2 * encoder_layers, 2 * decoder_layers\n"
                "if N and M:\n"
                "    return {\"encoder\": math.sqrt(math.log(3 * M) * math.log(2 * N) / 3), \"decoder\": math.sqrt(math.log(3 * M))}")),
    Mutant("5.1", "subln_gamma_log_base_two",
           "uses log base 2 instead of the natural log",
           old=("    return {\"encoder\": math.sqrt(math.log(3 * M) * math.log(2 * N) / 3),\n"
                "            \"decoder\": math.sqrt(math.log(3 * M))}\n"
                "side, L = (\"encoder\", N) if N else (\"decoder\", M)\n"
                "return {side: math.sqrt(math.log(2 * L))}"),
           new=("    return {\"encoder\": math.sqrt(math.log2(3 * M) * math.log2(2 * N) / 3), \"decoder\": math.sqrt(math.log2(3 * M))}\n"
                "side, L = (\"encoder\", N) if N else (\"decoder\", M)\n"
                "return {side: math.sqrt(math.log2(2 * L))}")),
    Mutant("5.1", "subln_gamma_without_sqrt",
           "forgets the square root: gamma = log 2N",
           old=("    return {\"encoder\": math.sqrt(math.log(3 * M) * math.log(2 * N) / 3),\n"
                "            \"decoder\": math.sqrt(math.log(3 * M))}\n"
                "side, L = (\"encoder\", N) if N else (\"decoder\", M)\n"
                "return {side: math.sqrt(math.log(2 * L))}"),
           new=("    return {\"encoder\": math.log(3 * M) * math.log(2 * N) / 3, \"decoder\": math.log(3 * M)}\n"
                "side, L = (\"encoder\", N) if N else (\"decoder\", M)\n"
                "return {side: math.log(2 * L)}")),
    Mutant("5.3", "subln_init_divides_by_gamma",
           "divides by gamma (the DeepNet habit): gain 1 / gamma, but Sub-LN's gamma > 1 multiplies",
           old="return init_branches_(model, gamma, qk_gain=1.0)",
           new="return init_branches_(model, 1 / gamma, qk_gain=1.0)"),
    Mutant("5.3", "subln_init_gamma_on_queries_and_keys",
           "applies gain gamma to q_proj and k_proj too (the paper keeps them at gain 1)",
           old="return init_branches_(model, gamma, qk_gain=1.0)",
           new="return init_branches_(model, gamma, qk_gain=gamma)"),
    Mutant("5.3", "subln_init_torchscale_default_times_gamma",
           ("multiplies the existing (non-xavier) init by gamma, as torchscale does, instead of xavier normal"
            " with gain gamma"),
           old="return init_branches_(model, gamma, qk_gain=1.0)",
           new=("with torch.no_grad():\n"
                "    for name, module in model.named_modules():\n"
                "        if name.rsplit(\".\", 1)[-1] in (\"v_proj\", \"out_proj\", \"fc1\", \"fc2\"):\n"
                "            module.weight.mul_(gamma)\n"
                "return model")),

    # -- mutants that the grader of issue 10 passed: one per class of miss, each caught by a new check or guard
    Mutant("5.1", "subln_gamma_copies_the_table",
           "returns the table's 4-decimal gamma for the N it lists, the formula for every other N",
           old="return {side: math.sqrt(math.log(2 * L))}",
           new="return {side: {6: 1.5764, 12: 1.7827, 24: 1.9675}.get(L, math.sqrt(math.log(2 * L)))}"),
    Mutant("5.2", "subln_ffn_returns_float64",
           "returns float64 whatever the input dtype: a float32 model gets float64 activations",
           old="return fc2(inner_norm(F.gelu(fc1(x))))",
           new="return fc2(inner_norm(F.gelu(fc1(x)))).double()"),
    Mutant("5.3", "subln_init_xavier_uniform",
           "uses xavier_uniform_: the right std, the wrong distribution",
           old="return init_branches_(model, gamma, qk_gain=1.0)",
           new=("for name, module in model.named_modules():\n"
                "    leaf = name.rsplit(\".\", 1)[-1]\n"
                "    if leaf in (\"v_proj\", \"out_proj\", \"fc1\", \"fc2\"):\n"
                "        nn.init.xavier_uniform_(module.weight, gain=gamma)\n"
                "    elif leaf in (\"q_proj\", \"k_proj\"):\n"
                "        nn.init.xavier_uniform_(module.weight, gain=1.0)\n"
                "return model")),
    Mutant("5.3", "subln_init_returns_nothing",
           "forgets `return model`",
           old="return init_branches_(model, gamma, qk_gain=1.0)",
           new=("init_branches_(model, gamma, qk_gain=1.0)\n"
                "return None")),
    Mutant("5.3", "subln_init_scales_the_inner_norms",
           "also sets the inner LayerNorms' weights to gamma",
           old="return init_branches_(model, gamma, qk_gain=1.0)",
           new=("for name, module in model.named_modules():\n"
                "    if name.rsplit(\".\", 1)[-1] == \"inner_norm\":\n"
                "        nn.init.constant_(module.weight, gamma)\n"
                "return init_branches_(model, gamma, qk_gain=1.0)")),
]
