"""Chapter 05's mutants (Sub-LN and Magneto): known-wrong solutions, each a patch of a reference region. Every
mutant must lose its exercise's points, and every patch must still apply to the library's region
(tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.
"""

from exercises.grading.mutants import Mutant

MUTANTS = [
    Mutant("5.2", "subln_ffn_norm_before_the_activation",
           "normalizes before the activation, W2 GELU(LN(W1 x)), instead of between the activation and W2",
           old="return fc2(inner_norm(F.gelu(fc1(x))))",
           new="return fc2(F.gelu(inner_norm(fc1(x))))"),
    Mutant("5.2", "subln_ffn_never_calls_the_inner_norm",
           "leaves the inner norm out, W2 GELU(W1 x): the Sub-LN of the feed-forward is never applied",
           old="return fc2(inner_norm(F.gelu(fc1(x))))",
           new="return fc2(F.gelu(fc1(x)))"),
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
    # -- mutants that the grader of issue 10 passed: one per class of miss, each caught by a new check or guard
    Mutant("5.1", "subln_gamma_copies_the_table",
           "returns the table's 4-decimal gamma for the N it lists, the formula for every other N",
           old="return {side: math.sqrt(math.log(2 * L))}",
           new="return {side: {6: 1.5764, 12: 1.7827, 24: 1.9675}.get(L, math.sqrt(math.log(2 * L)))}"),
    Mutant("5.2", "subln_ffn_returns_float64",
           "returns float64 whatever the input dtype: a float32 model gets float64 activations",
           old="return fc2(inner_norm(F.gelu(fc1(x))))",
           new="return fc2(inner_norm(F.gelu(fc1(x)))).double()"),

    # -- 5.3 is the Magneto encoder-decoder: the parts, and a gamma per stack
    Mutant("5.3", "magneto_encoder_decoder_swaps_the_gammas",
           "initializes the encoder with the decoder's gamma and the decoder with the encoder's",
           old=("subln_init_(model.encoder, gamma[\"encoder\"])\n"
                "subln_init_(model.decoder, gamma[\"decoder\"])"),
           new=("subln_init_(model.encoder, gamma[\"decoder\"])\n"
                "subln_init_(model.decoder, gamma[\"encoder\"])")),
    Mutant("5.3", "magneto_encoder_decoder_one_gamma_for_the_model",
           "initializes the whole model with the decoder's gamma (the encoder's row is never used)",
           old=("subln_init_(model.encoder, gamma[\"encoder\"])\n"
                "subln_init_(model.decoder, gamma[\"decoder\"])"),
           new="subln_init_(model, gamma[\"decoder\"])"),
    Mutant("5.3", "magneto_encoder_decoder_decoder_left_at_gpt2_init",
           "forgets the decoder's init: it keeps the core's default init",
           old="subln_init_(model.decoder, gamma[\"decoder\"])\n",
           new=""),
    Mutant("5.3", "magneto_encoder_decoder_sub_ln_cross_attention",
           "gives the cross-attention an inner LayerNorm too (torchscale and the paper do not)",
           old="                       cross_attention=MultiHeadAttention, ffn=SubLNMLP, residual=PreNorm, **parts)",
           new="                       cross_attention=SubLNAttention, ffn=SubLNMLP, residual=PreNorm, **parts)"),
    Mutant("5.3", "magneto_encoder_decoder_plain_feed_forward",
           "keeps the plain MLP: the feed-forward has no inner LayerNorm",
           old="                       cross_attention=MultiHeadAttention, ffn=SubLNMLP, residual=PreNorm, **parts)",
           new="                       cross_attention=MultiHeadAttention, residual=PreNorm, **parts)"),
    Mutant("5.3", "magneto_encoder_decoder_divides_by_gamma",
           "divides by gamma (the DeepNet habit): Sub-LN's gamma > 1 multiplies",
           old=("subln_init_(model.encoder, gamma[\"encoder\"])\n"
                "subln_init_(model.decoder, gamma[\"decoder\"])"),
           new=("subln_init_(model.encoder, 1 / gamma[\"encoder\"])\n"
                "subln_init_(model.decoder, 1 / gamma[\"decoder\"])")),
]
