"""Chapter 04's graded checks: the DeepNorm constants, the DeepNorm residual, the beta initialization.

Each check tests what the paper promises, in float64, against the learner's function (its first argument).
Known-wrong solutions: exercises/mutants/ch04_*.py.
"""


import torch
import torch.nn as nn
from hypothesis import strategies as st

from exercises.checking import Exercise, Violation, check
from exercises.checks.common import F64, naive_layer_norm, xavier_std
from nanomodels.transformer import Transformer, TransformerConfig

TABLE = {6: (1.8612, 0.3799), 12: (2.2134, 0.3195), 18: (2.4495, 0.2887), 24: (2.6321, 0.2686),
         100: (3.7606, 0.1880), 1000: (6.6874, 0.1057)}
ENC_DEC = {(6, 6): ((1.4179, 0.4970), (2.0598, 0.3433)), (12, 12): ((1.7609, 0.4002), (2.4495, 0.2887)),
           (100, 100): ((3.4157, 0.2063), (4.1618, 0.1699))}


def _pair(value, what):
    if not (isinstance(value, tuple) and len(value) == 2):
        raise Violation(f"{what} should be a tuple (alpha, beta), got {value!r}")
    return float(value[0]), float(value[1])


# ---- 4.1 the constants ------------------------------------------------------------------------------------

@check("encoder-only and decoder-only models with N layers get alpha = (2N)^(1/4), beta = (8N)^(-1/4) "
       "(the paper's table: N = 6, 12, 18, 24, 100, 1000), under the one key of the side that has layers")
def single_stack_table(deepnorm_constants):
    for n, (alpha, beta) in TABLE.items():
        for side, kw in (("encoder", {"encoder_layers": n}), ("decoder", {"decoder_layers": n})):
            got = deepnorm_constants(**kw)
            if not isinstance(got, dict) or set(got) != {side}:
                raise Violation(f"deepnorm_constants({side}_layers={n}) returned {got!r}; expected a dict with the "
                                f"one key {side!r} (a side with 0 layers is absent)")
            a, b = _pair(got[side], f"[{side!r}]")
            if abs(a - alpha) > 6e-5 or abs(b - beta) > 6e-5:
                why = ""
                if abs(a - (4 * n) ** 0.25) < 1e-9:
                    why = "; that is (4N)^(1/4): N counts layers (blocks), not sublayers"
                raise Violation(f"N = {n}: got alpha = {a:.4f}, beta = {b:.4f}; the table has {alpha}, {beta}{why}")


@check("for every N, 2N (v^2 + w^2) / alpha^2 = 2N * 2 beta^2 / alpha^2 = 1 exactly (the update bound)",
       n=st.integers(1, 100_000))
def update_bound_is_one(deepnorm_constants, n):
    a, b = _pair(deepnorm_constants(decoder_layers=n)["decoder"], "['decoder']")
    value = 2 * n * 2 * b * b / (a * a)
    if abs(value - 1) > 1e-9:
        raise Violation(f"N = {n}: alpha = {a:.6g}, beta = {b:.6g} give 2N * 2 beta^2 / alpha^2 = {value:.6g}, not 1")


@check("an encoder-decoder model (N encoder, M decoder layers) gets encoder (0.81 (N^4 M)^(1/16), "
       "0.87 (N^4 M)^(-1/16)) and decoder ((3M)^(1/4), (12M)^(-1/4)), both keys present")
def encoder_decoder_table(deepnorm_constants):
    cases = dict(ENC_DEC)
    cases[(3, 50)] = ((0.81 * (3 ** 4 * 50) ** (1 / 16), 0.87 * (3 ** 4 * 50) ** (-1 / 16)),
                      ((150) ** 0.25, (600) ** -0.25))
    for (n, m), (enc, dec) in cases.items():
        got = deepnorm_constants(encoder_layers=n, decoder_layers=m)
        if not isinstance(got, dict) or set(got) != {"encoder", "decoder"}:
            raise Violation(f"deepnorm_constants({n}, {m}) returned {got!r}; expected keys 'encoder' and 'decoder'")
        for side, want in (("encoder", enc), ("decoder", dec)):
            a, b = _pair(got[side], f"[{side!r}]")
            if abs(a - want[0]) > 6e-5 or abs(b - want[1]) > 6e-5:
                why = ""
                if side == "encoder" and abs(b - 1.15 * (n ** 4 * m) ** (-1 / 16)) < 1e-9:
                    why = "; 1.15 is torchscale's constant, the paper has 0.87"
                if side == "decoder" and abs(a - (2 * m) ** 0.25) < 1e-9:
                    why = "; a decoder block of an enc-dec model has 3 sublayers: 3M and 12M"
                raise Violation(f"N = {n}, M = {m}, {side}: got ({a:.4f}, {b:.4f}), the paper gives "
                                f"({want[0]:.4f}, {want[1]:.4f}){why}")


# ---- 4.2 the residual -------------------------------------------------------------------------------------

def _norm(d: int, seed: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(d, eps=0.0, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g, dtype=F64))
        norm.bias.copy_(torch.randn(d, generator=g, dtype=F64))
    return norm


def _ln(h, norm):
    return naive_layer_norm(h, norm.weight, norm.bias)


@check("with the branch g = 0, deepnorm(x, 0, alpha, norm) = LN(alpha x) = LN(x) (eps = 0)",
       seed=st.integers(0, 2 ** 16), alpha=st.floats(1.0, 8.0))
def zero_branch_gives_layernorm_of_x(deepnorm, seed, alpha):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, generator=gen, dtype=F64) * 2
    norm = _norm(8, seed)
    with torch.no_grad():
        out = deepnorm(x.clone(), torch.zeros_like(x), alpha, norm)
        ref = _ln(x, norm)
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        raise Violation(f"returned {type(out).__name__} of shape {getattr(out, 'shape', None)}, expected {x.shape}")
    diff = (out - ref).abs().max().item()
    if not diff < 1e-10:
        raise Violation(f"alpha = {alpha:.3g}: with g = 0 the output differs from LN(x) by {diff:.3g}: the result "
                        "must be the LayerNorm of the (scaled) stream")


@check("with a known branch output g, deepnorm(x, g, alpha, norm) = LN(alpha x + g): alpha weighs the residual "
       "stream x, not the branch", seed=st.integers(0, 2 ** 16), alpha=st.floats(1.2, 8.0))
def known_branch_gives_layernorm_of_alpha_x_plus_g(deepnorm, seed, alpha):
    gen = torch.Generator().manual_seed(seed)
    x, g = torch.randn(2, 3, 8, generator=gen, dtype=F64), torch.randn(2, 3, 8, generator=gen, dtype=F64)
    norm = _norm(8, seed + 1)
    with torch.no_grad():
        out = deepnorm(x.clone(), g.clone(), alpha, norm)
        ref = _ln(alpha * x + g, norm)
        diff = (out - ref).abs().max().item()
        if not diff < 1e-10:
            why = ""
            if (out - _ln(x + alpha * g, norm)).abs().max() < 1e-10:
                why = ": yours is LN(x + alpha g), alpha on the branch"
            elif (out - (alpha * x + g)).abs().max() < 1e-10:
                why = ": yours is alpha x + g without the LayerNorm"
            raise Violation(f"alpha = {alpha:.3g}: the output differs from LN(alpha x + g) by {diff:.3g}{why}")


# ---- 4.3 the init -----------------------------------------------------------------------------------------

def _model() -> nn.Module:
    """The core Transformer in float64 (its matrices are named q_proj, k_proj, v_proj, out_proj, fc1, fc2)."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=50, block_size=16, n_layers=2, d_model=96, n_heads=4, d_ff=192)
    return Transformer(config).to(F64)


def init_report(init_fn, scale: float, what: str, scaled=("v_proj", "out_proj", "fc1", "fc2")):
    """Run init_fn(model, scale) and check every matrix: xavier normal with gain `scale` on `scaled`, gain 1 on
    q_proj/k_proj, everything else bit-identical."""
    model = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    init_fn(model, scale)
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if leaf in scaled or leaf in ("q_proj", "k_proj"):
            gain = scale if leaf in scaled else 1.0
            want = xavier_std(p, gain)
            std = p.detach().std().item()
            if abs(std / want - 1) > 0.06:
                why = ""
                if leaf in ("q_proj", "k_proj") and abs(std / (want * scale) - 1) < 0.06:
                    why = f": {what} was applied to the queries/keys too; they keep gain 1"
                elif abs(std / (want / scale ** 2) - 1) < 0.06:
                    why = f": that is xavier x 1/{what}, divided instead of multiplied"
                raise Violation(f"{name}: std {std:.4g}, xavier normal with gain {gain:.4g} gives {want:.4g}{why}")
        elif not torch.equal(p, before[name]):
            raise Violation(f"{name} changed: embeddings, the head, norms and biases must be left untouched")


BETAS = st.sampled_from([0.2, 0.35, 0.6])


@check("xavier_normal_(gain=beta) on v_proj, out_proj, fc1, fc2 (std within 6% of beta sqrt(2 / (fan_in + "
       "fan_out))), gain 1 on q_proj and k_proj, every other parameter untouched", beta=BETAS)
def beta_init_per_matrix(deepnorm_init_, beta):
    init_report(deepnorm_init_, beta, "beta")


EXERCISES = {
    "4.1": Exercise(points=2, checks=[single_stack_table, update_bound_is_one, encoder_decoder_table],
                    hint="Single stack with L layers: ((2L) ** 0.25, (8L) ** -0.25). Encoder-decoder: the encoder "
                         "uses (N ** 4 * M) ** (1 / 16) with 0.81 and 0.87, the decoder 3M and 12M (3 sublayers per "
                         "block). Return only the sides that have layers."),
    "4.2": Exercise(points=2, checks=[zero_branch_gives_layernorm_of_x, known_branch_gives_layernorm_of_alpha_x_plus_g],
                    hint="One line: the LayerNorm of (alpha times the stream) plus the branch."),
    "4.3": Exercise(points=3, checks=[beta_init_per_matrix],
                    hint="Walk model.named_modules(); the last part of the name says which matrix it is. "
                         "nn.init.xavier_normal_(module.weight, gain=...) with beta for v_proj, out_proj, fc1, fc2 "
                         "and 1 for q_proj, k_proj; touch nothing else."),
}
