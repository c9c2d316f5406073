"""Chapter 04's mutants (DeepNet: DeepNorm for very deep Post-LN Transformers): known-wrong solutions, each a
patch of a reference region. Every mutant must lose its exercise's points, and every patch must still apply to
the library's region (tests/test_exercises.py). The format is described in exercises/grading/mutants/__init__.py.
"""

from exercises.grading.mutants import Mutant

MUTANTS = [
    Mutant("4.2", "deepnorm_alpha_on_the_branch",
           "puts alpha on the branch, LN(x + alpha G(x)), like a well-known annotated implementation",
           old="return norm(alpha * x + g)",
           new="return norm(x + alpha * g)"),
    Mutant("4.1", "deepnorm_constants_counts_sublayers",
           "lets N count sublayers (2 per block): alpha = (4N)^(1/4), beta = (16N)^(-1/4) for a single stack",
           old="N, M = encoder_layers, decoder_layers",
           new="N, M = 2 * encoder_layers, 2 * decoder_layers"),
    Mutant("4.1", "deepnorm_constants_encdec_decoder_two_sublayers",
           ("gives the decoder of an enc-dec model the decoder-only constants (2M, 8M), forgetting its cross-"
            "attention"),
           old="            \"decoder\": ((3 * M) ** (1 / 4), (12 * M) ** (-1 / 4))}",
           new="            \"decoder\": ((2 * M) ** (1 / 4), (8 * M) ** (-1 / 4))}"),
    Mutant("4.1", "deepnorm_constants_torchscale_encoder_beta",
           "copies torchscale's enc-dec encoder beta, 1.15 (N^4 M)^(-1/16), instead of the paper's 0.87",
           old="    return {\"encoder\": (0.81 * (N ** 4 * M) ** (1 / 16), 0.87 * (N ** 4 * M) ** (-1 / 16)),",
           new="    return {\"encoder\": (0.81 * (N ** 4 * M) ** (1 / 16), 1.15 * (N ** 4 * M) ** (-1 / 16)),"),
    Mutant("4.2", "deepnorm_norm_before_the_add",
           ("normalizes the stream before adding the branch, LN(alpha x) + G(x): a Pre-LN-like sum, not "
            "DeepNorm"),
           old="return norm(alpha * x + g)",
           new="return norm(alpha * x) + g"),
    Mutant("4.2", "deepnorm_without_layernorm",
           "drops the LayerNorm: alpha x + G(x), a residual that grows without bound with depth",
           old="return norm(alpha * x + g)",
           new="return alpha * x + g"),

    # -- mutants that the grader of issue 10 passed: one per class of miss, each caught by a new check or guard
    Mutant("4.1", "deepnorm_constants_copies_the_table",
           "returns the paper table's 4-decimal values for the N it lists, the formula for every other N",
           old="return {side: ((2 * L) ** (1 / 4), (8 * L) ** (-1 / 4))}",
           new=("table = {6: (1.8612, 0.3799), 12: (2.2134, 0.3195), 18: (2.4495, 0.2887), 24: (2.6321, 0.2686),\n"
                "         100: (3.7606, 0.1880), 1000: (6.6874, 0.1057)}\n"
                "return {side: table.get(L, ((2 * L) ** (1 / 4), (8 * L) ** (-1 / 4)))}")),
    Mutant("4.1", "deepnorm_constants_returns_tensors",
           "returns 0-d float64 tensors instead of Python floats",
           old="return {side: ((2 * L) ** (1 / 4), (8 * L) ** (-1 / 4))}",
           new=("return {side: (torch.tensor((2 * L) ** (1 / 4), dtype=torch.float64),\n"
                "                torch.tensor((8 * L) ** (-1 / 4), dtype=torch.float64))}")),
    Mutant("4.2", "deepnorm_scales_x_in_place",
           "scales the caller's residual stream in place (x.mul_(alpha))",
           old="return norm(alpha * x + g)",
           new="return norm(x.mul_(alpha) + g)"),
    Mutant("4.2", "deepnorm_layernorm_written_out_without_eps",
           "writes the LayerNorm out with eps = 0 instead of calling `norm` (its eps is ignored)",
           old="return norm(alpha * x + g)",
           new=("h = alpha * x + g\n"
                "mean = h.mean(-1, keepdim=True)\n"
                "return (h - mean) / (h - mean).pow(2).mean(-1, keepdim=True).sqrt() * norm.weight + norm.bias")),
    Mutant("4.2", "deepnorm_in_float64",
           "returns float64 whatever the input dtype: a float32 model gets float64 activations",
           old="return norm(alpha * x + g)",
           new="return norm(alpha * x + g).double()"),

    # -- 4.3 is the shared init_branches_ (the core): which matrices get which gain
    Mutant("4.3", "init_branches_gain_on_queries_and_keys",
           "gives q_proj and k_proj the branch gain too (the paper keeps them at qk_gain = 1)",
           old="        nn.init.xavier_normal_(module.weight, gain=qk_gain)",
           new="        nn.init.xavier_normal_(module.weight, gain=gain)"),
    Mutant("4.3", "init_branches_divides_by_the_gain",
           "uses gain 1 / gain (torchscale divides by init_scale = 1 / beta; dividing by beta itself up-scales)",
           old="        nn.init.xavier_normal_(module.weight, gain=gain)",
           new="        nn.init.xavier_normal_(module.weight, gain=1 / gain)"),
    Mutant("4.3", "init_branches_scales_embeddings_and_head",
           "also re-initializes the embeddings and the LM head with the gain (the paper leaves them alone)",
           old="    if leaf in BRANCH_PROJECTIONS:",
           new="    if leaf in BRANCH_PROJECTIONS + (\"wte\", \"wpe\", \"proj\"):"),
    Mutant("4.3", "init_branches_xavier_uniform",
           "uses xavier_uniform_: the right std, the wrong distribution",
           old=("        nn.init.xavier_normal_(module.weight, gain=gain)\n"
                "    elif leaf in QK_PROJECTIONS:\n"
                "        nn.init.xavier_normal_(module.weight, gain=qk_gain)"),
           new=("        nn.init.xavier_uniform_(module.weight, gain=gain)\n"
                "    elif leaf in QK_PROJECTIONS:\n"
                "        nn.init.xavier_uniform_(module.weight, gain=qk_gain)")),
    Mutant("4.3", "init_branches_returns_nothing",
           "forgets `return model`: `model = deepnorm_init_(model, beta)` gives None",
           old="return model",
           new="return None"),
    Mutant("4.3", "init_branches_leaves_queries_and_keys",
           "never re-draws q_proj and k_proj (they keep their previous init)",
           old=("    elif leaf in QK_PROJECTIONS:\n"
                "        nn.init.xavier_normal_(module.weight, gain=qk_gain)\n"),
           new=""),
    Mutant("4.3", "init_branches_ignores_qk_gain",
           "re-draws q_proj and k_proj with gain 1 whatever qk_gain says",
           old="        nn.init.xavier_normal_(module.weight, gain=qk_gain)",
           new="        nn.init.xavier_normal_(module.weight, gain=1.0)"),
    Mutant("4.3", "init_branches_scales_the_existing_weights",
           "multiplies the existing (non-xavier) weights by the gain, as torchscale does, instead of re-drawing them",
           old="        nn.init.xavier_normal_(module.weight, gain=gain)",
           new=("        with torch.no_grad():\n"
                "            module.weight.mul_(gain)")),

    # -- 4.4 a DeepNet built from parts: the residual, its placement, the final norm, the init
    Mutant("4.4", "deepnet_alpha_on_the_branch",
           "writes its own residual LN(x + alpha G(x)): alpha weighs the branch instead of the stream",
           old="model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), final_norm=None, **parts)",
           new=("class AlphaOnBranch(DeepNorm):\n"
                "    def forward(self, x, sublayer):\n"
                "        return self.norm(x + self.alpha * sublayer(x))\n"
                "model = Transformer(config, residual=partial(AlphaOnBranch, alpha=alpha), final_norm=None, **parts)")),
    Mutant("4.4", "deepnet_beta_on_queries_and_keys",
           "re-draws q_proj and k_proj with gain beta too (the paper keeps them at gain 1)",
           old="return deepnorm_init_(model, beta)",
           new="return init_branches_(model, beta, qk_gain=beta)"),
    Mutant("4.4", "deepnet_pre_ln_placement",
           "keeps the core's Pre-LN residual x + G(LN(x)) and its final LayerNorm, with DeepNet's init",
           old="model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), final_norm=None, **parts)",
           new="model = Transformer(config, **parts)"),
    Mutant("4.4", "deepnet_keeps_the_final_norm",
           "keeps the core's final LayerNorm after the last DeepNorm block (Post-LN needs none)",
           old="model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), final_norm=None, **parts)",
           new="model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), **parts)"),
    Mutant("4.4", "deepnet_plain_post_ln",
           "uses LN(x + G(x)) (alpha = 1) with DeepNet's init: half of DeepNorm",
           old="model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), final_norm=None, **parts)",
           new="model = Transformer(config, residual=partial(DeepNorm, alpha=1.0), final_norm=None, **parts)"),
    Mutant("4.4", "deepnet_without_the_init",
           "forgets the beta init: the matrices keep the core's GPT-2 init",
           old="return deepnorm_init_(model, beta)",
           new="return model"),
    Mutant("4.4", "deepnet_encoder_decoder_row",
           "reads alpha and beta from the encoder-decoder table's decoder row ((3N)^(1/4), (12N)^(-1/4))",
           old='alpha, beta = deepnorm_constants(decoder_layers=config.n_layers)["decoder"]',
           new='alpha, beta = deepnorm_constants(config.n_layers, config.n_layers)["decoder"]'),
    Mutant("4.4", "deepnet_drops_the_parts",
           "ignores `parts`: deepnet(config, attention_fn=f) builds the default model",
           old="model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), final_norm=None, **parts)",
           new="model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), final_norm=None)"),
    Mutant("4.5", "_add_norm_fwd_kernel_alpha_on_the_branch",
           "scales the branch instead of the stream inside the kernel, LN(x + alpha g)",
           old="h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32) * alpha\n"
               "if HAS_G:\n"
               "    h += tl.load(G + row * stride_g + cols, mask=inside, other=0.0).to(tl.float32)",
           new="h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)\n"
               "if HAS_G:\n"
               "    h += alpha * tl.load(G + row * stride_g + cols, mask=inside, other=0.0).to(tl.float32)"),
    Mutant("4.5", "_add_norm_fwd_kernel_unbiased_variance",
           "divides the sum of squares by N - 1 (the unbiased variance) instead of N, as LayerNorm does",
           old="rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)",
           new="rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / (n_cols - 1) + eps)"),
    Mutant("4.5", "_add_norm_fwd_kernel_eps_outside_the_sqrt",
           "adds eps after the square root: 1 / (sqrt(var) + eps), wrong for rows of small variance",
           old="rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)",
           new="rstd = 1.0 / (tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols) + eps)"),
    Mutant("4.5", "_add_norm_fwd_kernel_one_pass_variance",
           "takes the variance in one pass as E[h^2] - E[h]^2: in float32 it cancels on rows with a large mean",
           old="rstd = 1.0 / tl.sqrt(tl.sum(centered * centered, axis=0) / n_cols + eps)",
           new="rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / n_cols - mean * mean + eps)"),
    Mutant("4.5", "_add_norm_fwd_kernel_padding_in_the_mean",
           "divides the row sum by BLOCK, the padded length, so the padding lanes count in the mean",
           old="mean = tl.sum(h, axis=0) / n_cols",
           new="mean = tl.sum(h, axis=0) / BLOCK"),
    Mutant("4.5", "_add_norm_fwd_kernel_padding_in_the_variance",
           "does not zero the lanes past n_cols after centring: each adds mean^2 to the variance",
           old="centered = tl.where(inside, h - mean, 0.0)  # the padding must not enter the variance",
           new="centered = h - mean"),
    Mutant("4.5", "_add_norm_fwd_kernel_rmsnorm_centres",
           "subtracts the mean in the RMSNorm branch too: a LayerNorm without its mean stored as 0",
           old="mean = 0.0",
           new="mean = tl.sum(h, axis=0) / n_cols"),
    Mutant("4.5", "_add_norm_fwd_kernel_weight_stride_ignored",
           "reads the weight as contiguous (W + cols): wrong for a strided view such as w[::2]",
           old="y = centered * rstd * tl.load(W + cols * stride_w, mask=inside, other=0.0).to(tl.float32)",
           new="y = centered * rstd * tl.load(W + cols, mask=inside, other=0.0).to(tl.float32)"),
    Mutant("4.5", "_add_norm_fwd_kernel_alpha_forgotten",
           "adds x and g without alpha: LN(x + g), the Post-LN residual rather than DeepNorm's",
           old="h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32) * alpha",
           new="h = tl.load(X + row * stride_x + cols, mask=inside, other=0.0).to(tl.float32)"),
]
