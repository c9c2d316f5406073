"""Chapter 04's graded checks: the DeepNorm constants, the DeepNorm residual, the beta initialization, a
DeepNet built from parts (its forward written out, its init per matrix, and a 24-layer model that trains), and
the fused LN(alpha x + g) row in Triton.

Each check tests what the paper promises, in float64, against the learner's function (its first argument). The
kernel exercise (4.5) installs the learner's kernel in kernels/layernorm.py for one call of the library's
launcher, run under Triton's interpreter on the CPU in float32, and compares with a float64 oracle.
Known-wrong solutions: exercises/grading/mutants/ch04_*.md.
"""


import contextlib
import math

import torch
import torch.nn as nn
from hypothesis import strategies as st

import kernels.layernorm as kln
from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import (F64, differs, expect_tensor, float32_default, fraction_tolerance, installed,
                                             max_diff, naive_layer_norm, std_tolerance, xavier_std, Z)
from nanomodels.attention import attention
from nanomodels.transformer import Transformer, TransformerConfig

TABLE = {6: (1.8612, 0.3799), 12: (2.2134, 0.3195), 18: (2.4495, 0.2887), 24: (2.6321, 0.2686),
         100: (3.7606, 0.1880), 1000: (6.6874, 0.1057)}
ENC_DEC = {(6, 6): ((1.4179, 0.4970), (2.0598, 0.3433)), (12, 12): ((1.7609, 0.4002), (2.4495, 0.2887)),
           (100, 100): ((3.4157, 0.2063), (4.1618, 0.1699))}


def _pair(value, what):
    if not (type(value) is tuple and len(value) == 2 and all(type(v) is float for v in value)):
        raise Violation(f"{what} should be a tuple of two Python floats (alpha, beta), got {value!r} "
                        f"({type(value).__name__} of {', '.join(type(v).__name__ for v in value)})"
                        if isinstance(value, (tuple, list)) else f"{what} should be a tuple (alpha, beta), got "
                        f"{value!r}")
    return value


# ---- 4.1 the constants ------------------------------------------------------------------------------------
# corner cases: N = 1 (one layer); the table's N; N far beyond it (100,000); an encoder-decoder with M != N and
# with N = M. Pinned: n = 1 and n = 100,000 in the exact checks, the table's N, encoder_decoder_table's rows.

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
       n=st.integers(1, 100_000), examples=[dict(n=1), dict(n=100_000)])
def update_bound_is_one(deepnorm_constants, n):
    a, b = _pair(deepnorm_constants(decoder_layers=n)["decoder"], "['decoder']")
    value = 2 * n * 2 * b * b / (a * a)
    if abs(value - 1) > 1e-9:
        raise Violation(f"N = {n}: alpha = {a:.6g}, beta = {b:.6g} give 2N * 2 beta^2 / alpha^2 = {value:.6g}, not 1")


@check("alpha = (2N)^(1/4) and beta = (8N)^(-1/4) exactly (to 1e-12, not rounded to the table's 4 decimals) "
       "for every N, the table's N included", n=st.integers(1, 100_000), max_examples=200,
       examples=[dict(n=1), dict(n=100_000)] + [dict(n=n) for n in TABLE])
def exact_at_every_n(deepnorm_constants, n):
    a, b = _pair(deepnorm_constants(decoder_layers=n)["decoder"], "['decoder']")
    want = ((2 * n) ** 0.25, (8 * n) ** -0.25)
    if abs(a / want[0] - 1) > 1e-12 or abs(b / want[1] - 1) > 1e-12:
        raise Violation(f"N = {n}: got ({a!r}, {b!r}), the formulas give ({want[0]!r}, {want[1]!r}); compute "
                        "them, do not copy the table's rounded values")


@check("an encoder-decoder model (N encoder, M decoder layers) gets encoder (0.81 (N^4 M)^(1/16), "
       "0.87 (N^4 M)^(-1/16)) and decoder ((3M)^(1/4), (12M)^(-1/4)), both keys present, exact to 1e-12")
def encoder_decoder_table(deepnorm_constants):
    cases = {(n, m): ((0.81 * (n ** 4 * m) ** (1 / 16), 0.87 * (n ** 4 * m) ** (-1 / 16)),
                      ((3 * m) ** 0.25, (12 * m) ** -0.25)) for n, m in ENC_DEC}
    cases[(3, 50)] = ((0.81 * (3 ** 4 * 50) ** (1 / 16), 0.87 * (3 ** 4 * 50) ** (-1 / 16)),
                      ((150) ** 0.25, (600) ** -0.25))
    for (n, m), (enc, dec) in cases.items():
        got = deepnorm_constants(encoder_layers=n, decoder_layers=m)
        if not isinstance(got, dict) or set(got) != {"encoder", "decoder"}:
            raise Violation(f"deepnorm_constants({n}, {m}) returned {got!r}; expected keys 'encoder' and 'decoder'")
        for side, want in (("encoder", enc), ("decoder", dec)):
            a, b = _pair(got[side], f"[{side!r}]")
            if abs(a / want[0] - 1) > 1e-12 or abs(b / want[1] - 1) > 1e-12:
                why = ""
                if side == "encoder" and abs(b - 1.15 * (n ** 4 * m) ** (-1 / 16)) < 1e-9:
                    why = "; 1.15 is torchscale's constant, the paper has 0.87"
                if side == "decoder" and abs(a - (2 * m) ** 0.25) < 1e-9:
                    why = "; a decoder block of an enc-dec model has 3 sublayers: 3M and 12M"
                raise Violation(f"N = {n}, M = {m}, {side}: got ({a:.4f}, {b:.4f}), the paper gives "
                                f"({want[0]:.4f}, {want[1]:.4f}){why}")


# ---- 4.2 the residual -------------------------------------------------------------------------------------
# corner cases: alpha = 1 (the plain Post-LN residual: a learner who puts alpha on the branch is right there);
# g = 0; a norm with its own eps and affine weights; float32. Pinned: alpha = 1 with g = 0, and alpha = 8.

def _norm(d: int, seed: int) -> nn.LayerNorm:
    norm = nn.LayerNorm(d, eps=0.0, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g, dtype=F64))
        norm.bias.copy_(torch.randn(d, generator=g, dtype=F64))
    return norm


def _ln(h, norm):
    return naive_layer_norm(h, norm.weight, norm.bias)


def _eps_why(out, h, norm) -> str:
    """When out is a LayerNorm of h with the norm's weights but another eps (the same for every row): says so.
    Each row's scale r is fitted by least squares to (out - bias) / weight = r (h - mean); eps = 1 / r^2 - var."""
    z = (out.detach() - norm.bias) / norm.weight
    c = h - h.mean(-1, keepdim=True)
    r = (z * c).sum(-1) / (c * c).sum(-1)
    fit = (z - r[..., None] * c).abs().max() <= 1e-8 * (1 + z.abs().max())
    eps = 1 / r ** 2 - (c * c).mean(-1)
    if not (fit and eps.isfinite().all()) or (eps.max() - eps.min()) > 1e-6 * (1e-12 + eps.abs().max()):
        return ""
    e = eps.mean().item()
    return "" if abs(e - norm.eps) <= 1e-12 else (f": yours is that LayerNorm with eps = {e:.3g}, but the norm's eps is "
                                                  f"{norm.eps:g}: call `norm` itself, it holds its own eps")


@check("with the branch g = 0, deepnorm(x, 0, alpha, norm) = LN(alpha x) = LN(x) (eps = 0)",
       seed=st.integers(0, 2 ** 16), alpha=st.floats(1.0, 8.0), examples=[dict(seed=0, alpha=1.0),
                                                                            dict(seed=1, alpha=8.0)])
def zero_branch_gives_layernorm_of_x(deepnorm, seed, alpha):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, generator=gen, dtype=F64) * 2
    norm = _norm(8, seed)
    with torch.no_grad():
        out = deepnorm(x.clone(), torch.zeros_like(x), alpha, norm)
        ref = _ln(x, norm)
    expect_tensor(out, tuple(x.shape), F64, "deepnorm")
    if not max_diff(out, ref) < 1e-10:
        why = _eps_why(out, alpha * x, norm) or ": the result must be the LayerNorm of the (scaled) stream"
        raise Violation(f"alpha = {alpha:.3g}: with g = 0 the output differs from LN(x) by {differs(out, ref)}{why}")


@check("with a known branch output g, deepnorm(x, g, alpha, norm) = LN(alpha x + g): alpha weighs the residual "
       "stream x, not the branch", seed=st.integers(0, 2 ** 16), alpha=st.floats(1.2, 8.0))
def known_branch_gives_layernorm_of_alpha_x_plus_g(deepnorm, seed, alpha):
    gen = torch.Generator().manual_seed(seed)
    x, g = torch.randn(2, 3, 8, generator=gen, dtype=F64), torch.randn(2, 3, 8, generator=gen, dtype=F64)
    norm = _norm(8, seed + 1)
    with torch.no_grad():
        out = deepnorm(x.clone(), g.clone(), alpha, norm)
        ref = _ln(alpha * x + g, norm)
        if not max_diff(out, ref) < 1e-10:
            why = _eps_why(out, alpha * x + g, norm)
            if not why and (out - _ln(x + alpha * g, norm)).abs().max() < 1e-10:
                why = ": yours is LN(x + alpha g), alpha on the branch"
            elif not why and (out - (alpha * x + g)).abs().max() < 1e-10:
                why = ": yours is alpha x + g without the LayerNorm"
            raise Violation(f"alpha = {alpha:.3g}: the output differs from LN(alpha x + g) by {differs(out, ref)}{why}")


class _RMS:
    """A norm that is not nn.LayerNorm (RMSNorm with a weight): deepnorm must apply the `norm` it is given."""

    def __init__(self, d: int, seed: int, dtype=F64):
        self.weight = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=dtype)

    def __call__(self, h):
        return h / h.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * self.weight


@check("deepnorm applies the `norm` it is given, with that norm's own eps and weights: an nn.LayerNorm with "
       "eps = 0.5, and an RMSNorm (not a LayerNorm at all), in float64 and float32 (the dtype is kept)",
       seed=st.integers(0, 2 ** 16), alpha=st.floats(1.2, 8.0), dtype=st.sampled_from([F64, torch.float32]))
def applies_the_given_norm(deepnorm, seed, alpha, dtype):
    gen = torch.Generator().manual_seed(seed)
    x, g = torch.randn(2, 3, 8, generator=gen, dtype=dtype), torch.randn(2, 3, 8, generator=gen, dtype=dtype)
    layer_norm = _norm(8, seed).to(dtype)
    layer_norm.eps = 0.5
    tolerance = 1e-10 if dtype == F64 else 1e-5
    for norm, name in ((layer_norm, "nn.LayerNorm(eps=0.5)"), (_RMS(8, seed, dtype), "an RMSNorm")):
        with torch.no_grad():
            out = deepnorm(x, g, alpha, norm)
            expect_tensor(out, tuple(x.shape), dtype, f"deepnorm with {name} on {dtype} inputs")
            ref = norm(alpha * x + g)
            diff = (out - ref).abs().max().item()
        if not diff < tolerance:
            why = ""
            if norm is layer_norm and (out - naive_layer_norm(alpha * x + g, norm.weight, norm.bias)).abs().max() \
                    < tolerance:
                why = ": yours is a LayerNorm with eps = 0, ignoring the norm's eps (0.5 here); call `norm` itself"
            elif norm is layer_norm:
                why = (": call `norm` itself: a LayerNorm written out (unbiased variance, another eps) is not the "
                       "norm the model passes")
            raise Violation(f"with {name}, alpha = {alpha:.3g}: the output differs from norm(alpha x + g) by "
                            f"{diff:.3g}{why}")


# ---- 4.3 the init -----------------------------------------------------------------------------------------
# corner cases: gain < 1 (DeepNet's beta) and > 1 (Sub-LN's gamma); qk_gain != 1; norms whose weights and biases
# are not at their init (the init must leave them); every block of a 2-layer model. All drawn from GAINS and
# the fixed model (_model).

def _model(**parts) -> nn.Module:
    """The core Transformer in float64 (its matrices are named q_proj, k_proj, v_proj, out_proj, fc1, fc2), its
    norms' weights and biases drawn at random so that an init that touches them is seen."""
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=50, block_size=16, n_layers=2, d_model=96, n_heads=4, d_ff=192)
    model = Transformer(config, **parts).to(F64)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                if m.bias is not None:
                    m.bias.uniform_(-0.5, 0.5)
    return model


def init_report(init_fn, scale: float, what: str, scaled=("v_proj", "out_proj", "fc1", "fc2"), qk_gain=1.0,
                model=None, **parts):
    """Run init_fn(model, scale) on the core Transformer (built with `parts`) and check every matrix: xavier
    NORMAL with gain `scale` on `scaled`, gain `qk_gain` on q_proj/k_proj (each re-drawn), everything else (norms,
    inner norms, embeddings, biases) bit-identical, the model returned."""
    model = _model(**parts) if model is None else model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = init_fn(model, scale)
    if out is not model:
        raise Violation(f"the init returned {type(out).__name__ if out is not None else 'None'}, not the model it "
                        "was given: end with `return model` (so `model = init(model, ...)` works)")
    pooled = []  # every initialized weight divided by its xavier std: standard normal if the init is right
    for name, p in model.named_parameters():
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if leaf in scaled or leaf in ("q_proj", "k_proj"):
            gain = scale if leaf in scaled else qk_gain
            if torch.equal(p, before[name]):
                raise Violation(f"{name} was not re-initialized: it gets xavier normal with gain {gain:.4g}"
                                + (f" (q_proj and k_proj are re-drawn too, with gain qk_gain = {qk_gain:g})"
                                   if leaf in ("q_proj", "k_proj") else ""))
            want = xavier_std(p, gain)
            std = p.detach().std().item()
            # false rejection < 2e-9 per tensor (std_tolerance: 6 standard errors or 6%, the wider)
            if abs(std / want - 1) > std_tolerance(p.numel()):
                why = ""
                if leaf in ("q_proj", "k_proj") and abs(std / (xavier_std(p, scale)) - 1) < 0.06:
                    why = f": {what} was applied to the queries/keys too; they get qk_gain = {qk_gain:g}"
                elif leaf in ("q_proj", "k_proj") and abs(std / xavier_std(p, 1.0) - 1) < 0.06:
                    why = f": that is gain 1; q_proj and k_proj get qk_gain = {qk_gain:g}"
                elif leaf in scaled and abs(std / xavier_std(p, qk_gain) - 1) < 0.06:
                    why = f": that is qk_gain = {qk_gain:g}, the queries' and keys' gain"
                elif abs(std / (want / scale ** 2) - 1) < 0.06:
                    why = f": that is xavier x 1/{what}, divided instead of multiplied"
                raise Violation(f"{name}: std {std:.4g}, xavier normal with gain {gain:.4g} gives {want:.4g}{why}")
            pooled.append(p.detach().flatten() / want)
        elif not torch.equal(p, before[name]):
            raise Violation(f"{name} changed: embeddings, the head, norms and biases must be left untouched")
    z = torch.cat(pooled)
    within_one, beyond_two = (z.abs() < 1).double().mean().item(), (z.abs() > 2).double().mean().item()
    # a normal distribution has 68.3% within one std and 4.55% beyond two; uniform 57.7% and 0%
    n = z.numel()  # each bound at least 6 standard errors of a correct answer's fraction or mean
    # False rejection: three bounds of >= 6 standard errors (< 2e-9 each), the kurtosis one below: < 1e-8 per call
    if (abs(within_one - 0.6827) > fraction_tolerance(0.6827, n, 0.015)
            or abs(beyond_two - 0.0455) > fraction_tolerance(0.0455, n, 0.01)
            or abs(z.mean().item()) > max(0.02, 6 / math.sqrt(n))):
        why = " (that is a uniform distribution: xavier_uniform_, not xavier_normal_)" if abs(
            within_one - 0.577) < 0.015 and beyond_two < 0.005 else ""
        raise Violation(f"the initialized weights have the right std, but not a zero-mean normal distribution: "
                        f"{within_one:.1%} of them lie within one std (normal: 68.3%), {beyond_two:.2%} beyond two "
                        f"(normal: 4.55%), mean {z.mean().item():.3g} std{why}")
    # kurtosis E[z^4] / E[z^2]^2: normal 3, uniform 1.8. Its standard error for n normal draws is ~sqrt(24 / n),
    # so Z = 6 of them (common.py) rejects a correct normal init with probability ~2e-9 per call (n = 147,456
    # on the core model: tolerance 0.077, far below the 1.2 gap to a uniform of the same std).
    kurt = (z.pow(4).mean() / z.pow(2).mean() ** 2).item()
    if abs(kurt - 3.0) > Z * math.sqrt(24 / n):
        why = " (1.8 is a uniform distribution: xavier_uniform_, not xavier_normal_)" if abs(kurt - 1.8) < 0.3 else ""
        raise Violation(f"the initialized weights have kurtosis {kurt:.3f}, a normal distribution has 3 (tolerance "
                        f"{Z * math.sqrt(24 / n):.3f}, 6 standard errors){why}")


GAINS = st.sampled_from([0.2, 0.35, 0.6, 1.9])  # DeepNet's beta < 1, Sub-LN's gamma > 1


@check("init_branches_(model, gain) re-draws v_proj, out_proj, fc1, fc2 with xavier normal of gain `gain` (std "
       "within 6% or 6 standard errors, whichever is wider, of gain sqrt(2 / (fan_in + fan_out)), normally "
       "distributed) and q_proj, k_proj with gain 1; every other parameter untouched; returns the model", gain=GAINS)
def gain_per_matrix(init_branches_, gain):
    init_report(lambda model, g: init_branches_(model, g), gain, "gain")


@check("qk_gain is the queries' and keys' gain: init_branches_(model, gain, qk_gain=q) gives q_proj and k_proj "
       "xavier normal with gain q, the branch matrices gain `gain`", gain=GAINS,
       qk_gain=st.sampled_from([0.5, 2.0]))
def qk_gain_sets_the_queries_and_keys(init_branches_, gain, qk_gain):
    init_report(lambda model, g: init_branches_(model, g, qk_gain=qk_gain), gain, "gain", qk_gain=qk_gain)


# ---- 4.4 a DeepNet built from parts ------------------------------------------------------------------------
# corner cases: one layer (alpha = 2^(1/4)); one token (T = 1); one head; a vocabulary of 2; with and without
# biases; 6 layers with 4 heads. Pinned: PINNED_DEEPNETS (the smallest model, and the deepest widest one).
PINNED_DEEPNETS = [dict(n_layers=1, n_heads=1, head_dim=3, T=1, vocab=2, bias=False, seed=0),
                   dict(n_layers=6, n_heads=4, head_dim=3, T=12, vocab=40, bias=True, seed=1)]

def _build(deepnet, config: TransformerConfig, seed: int = 0, **parts) -> Transformer:
    torch.manual_seed(seed)
    model = deepnet(config, **parts)
    if not isinstance(model, Transformer):
        raise Violation(f"deepnet returned {type(model).__name__}, expected the core Transformer it built")
    if len(model.blocks) != config.n_layers:
        raise Violation(f"config.n_layers = {config.n_layers}, but the model has {len(model.blocks)} blocks")
    return model


def _layer_norm_of(part: nn.Module, where: str) -> nn.LayerNorm:
    norms = [m for m in part.modules() if isinstance(m, nn.LayerNorm)]
    if len(norms) != 1:
        raise Violation(f"{where} holds {len(norms)} LayerNorms; a DeepNorm residual holds exactly one")
    return norms[0]


def _written_out(model, idx, alpha, scheme="deepnorm", final=False):
    """The forward of a DeepNet written out with the model's own embedding, sublayers, norms and head:
    x = LN(alpha x + G(x)) around every sublayer, no final norm. scheme "branch": LN(x + alpha G(x));
    "pre": x + G(LN(x)) and a final LN (the explanations of a mismatch)."""
    T = idx.size(1)
    x = model.embed.wte.weight[idx] + model.embed.wpe.weight[:T]
    for i, block in enumerate(model.blocks):
        for sublayer, residual, name in ((lambda h: block.attn(h, None, True, None), block.attn_residual, "attn"),
                                         (block.ffn, block.ffn_residual, "ffn")):
            norm = _layer_norm_of(residual, f"block {i}'s {name}_residual")
            ln = lambda h: naive_layer_norm(h, norm.weight, norm.bias, norm.eps)  # noqa: E731
            if scheme == "pre":
                x = x + sublayer(ln(x))
            else:
                x = ln(alpha * x + sublayer(x)) if scheme == "deepnorm" else ln(x + alpha * sublayer(x))
    if final:
        norm = _layer_norm_of(model.final_norm, "the final norm")
        x = naive_layer_norm(x, norm.weight, norm.bias, norm.eps)
    return model.head(x)


@check("in float64 the model's logits equal the DeepNet forward written out with its own parts: "
       "x = LN(alpha x + G(x)) around each attention and feed-forward sublayer, alpha = (2N)^(1/4), no LayerNorm "
       "after the last block (every norm's weight and bias drawn at random first), and the `parts` passed on",
       n_layers=st.integers(1, 6), n_heads=st.sampled_from([1, 2, 4]), head_dim=st.integers(3, 6),
       T=st.integers(1, 12), vocab=st.integers(2, 40), bias=st.booleans(), seed=st.integers(0, 2 ** 16),
       examples=PINNED_DEEPNETS)
def forward_is_post_ln_with_alpha_on_the_stream(deepnet, n_layers, n_heads, head_dim, T, vocab, bias, seed):
    d = n_heads * head_dim
    config = TransformerConfig(vocab_size=vocab, block_size=12, n_layers=n_layers, d_model=d, n_heads=n_heads,
                               d_ff=2 * d + 1, bias=bias)
    calls = []

    def recording(*args, **kwargs):
        calls.append(1)
        return attention(*args, **kwargs)

    model = _build(deepnet, config, seed, attention_fn=recording).to(F64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.copy_(torch.rand(m.weight.shape, generator=gen, dtype=F64) + 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.rand(m.bias.shape, generator=gen, dtype=F64) - 0.5)
        idx = torch.randint(0, vocab, (2, T), generator=gen)
        calls.clear()
        got, _ = model(idx)
        if not calls:
            raise Violation("deepnet(config, attention_fn=f) never calls f: pass `parts` on to the Transformer")
        alpha = (2 * n_layers) ** 0.25
        want = _written_out(model, idx, alpha)
    expect_tensor(got, (2, T, vocab), F64, "the model's logits")
    diff = (got - want).abs().max().item()
    if not diff < 1e-9:
        why = ""
        variants = {"LN(x + alpha G(x)): alpha on the branch, not on the stream": dict(scheme="branch"),
                    "LN(x + G(x)): plain Post-LN, alpha = 1": dict(alpha=1.0),
                    f"alpha = {(3 * n_layers) ** 0.25:.4g}, (3N)^(1/4): the encoder-decoder decoder's row; "
                    "a decoder-only model has 2 sublayers per block": dict(alpha=(3 * n_layers) ** 0.25),
                    "x + G(LN(x)) with a final LayerNorm: Pre-LN placement": dict(scheme="pre", final=True),
                    "LN(alpha x + G(x)) and then one more LayerNorm after the last block: DeepNet is Post-LN, "
                    "final_norm=None": dict(final=True)}
        for text, kw in variants.items():
            with contextlib.suppress(Violation), torch.no_grad():
                if (model(idx)[0] - _written_out(model, idx, kw.pop("alpha", alpha), **kw)).abs().max() < 1e-9:
                    why = f": yours computes {text}"
                    break
        raise Violation(f"N = {n_layers}: the logits differ from the written-out DeepNet forward by {diff:.3g}{why}")


@check("the init: v_proj, out_proj, fc1, fc2 of every block xavier normal with gain beta = (8N)^(-1/4), q_proj "
       "and k_proj with gain 1 (each std within 6% or 6 standard errors, the pooled weights normally distributed), embeddings as the core "
       "draws them (std 0.02), every LayerNorm weight 1 and every bias 0", n_layers=st.sampled_from([1, 2, 6]),
       seed=st.integers(0, 2 ** 16))
def init_gives_beta_to_the_branches(deepnet, n_layers, seed):
    config = TransformerConfig(vocab_size=50, block_size=16, n_layers=n_layers, d_model=96, n_heads=4, d_ff=192)
    model = _build(deepnet, config, seed)
    beta = (8 * n_layers) ** -0.25
    pooled = []
    for name, p in model.named_parameters():
        p = p.detach().double()
        leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
        if leaf in ("v_proj", "out_proj", "fc1", "fc2", "q_proj", "k_proj"):
            gain = 1.0 if leaf in ("q_proj", "k_proj") else beta
            std, want = p.std().item(), xavier_std(p, gain)
            # false rejection < 2e-9 per tensor (std_tolerance: 6 standard errors or 6%, the wider)
            if abs(std / want - 1) > std_tolerance(p.numel()):
                why = ""
                if abs(std / xavier_std(p, beta) - 1) < 0.06:
                    why = ": that is beta; q_proj and k_proj keep gain 1"
                elif abs(std / 0.02 - 1) < 0.06 or abs(std / (0.02 / math.sqrt(2 * n_layers)) - 1) < 0.06:
                    why = ": that is the core's GPT-2 init; DeepNet re-draws these matrices (deepnorm_init_)"
                elif abs(std / xavier_std(p, 1.0) - 1) < 0.06:
                    why = ": that is gain 1; the branch matrices get beta"
                elif abs(std / xavier_std(p, 1 / beta) - 1) < 0.06:
                    why = ": that is 1 / beta"
                raise Violation(f"N = {n_layers}: {name} has std {std:.4g}; xavier normal with gain {gain:.4g} "
                                f"gives {want:.4g}{why}")
            pooled.append(p.flatten() / want)
        elif name.endswith(("wte.weight", "wpe.weight")):
            # false rejection < 2e-9 per tensor (std_tolerance: 6 standard errors or 6%, the wider)
            if abs(p.std().item() / 0.02 - 1) > std_tolerance(p.numel()):
                raise Violation(f"{name} has std {p.std().item():.4g}; DeepNet leaves the embeddings as the core "
                                "draws them (std 0.02)")
        elif "norm" in name:
            if not torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)):
                raise Violation(f"{name} changed: every LayerNorm starts at weight 1, bias 0")
        elif name.endswith(".bias") and not torch.equal(p, torch.zeros_like(p)):
            raise Violation(f"{name} changed: the biases start at 0")
    z = torch.cat(pooled)
    within_one = (z.abs() < 1).double().mean().item()
    if abs(within_one - 0.6827) > fraction_tolerance(0.6827, z.numel(), 0.015):
        raise Violation(f"the re-drawn weights have the right std but {within_one:.1%} of them lie within one std "
                        "(a normal distribution: 68.3%): xavier NORMAL")


def _successor_batch(batch: int, T: int, vocab: int, gen: torch.Generator):
    """x_t = (x_{t-1} + 1) mod |V| from a random start: (inputs, next tokens), both (batch, T)."""
    start = torch.randint(0, vocab, (batch, 1), generator=gen)
    s = (start + torch.arange(T + 1)) % vocab
    return s[:, :-1], s[:, 1:]


DEEP = dict(layers=24, vocab=16, T=8, batch=8, steps=30, lr=5e-3)


@check(f"a {DEEP['layers']}-layer DeepNet (width 32) learns x_t = x_(t-1) + 1 mod {DEEP['vocab']} in "
       f"{DEEP['steps']} Adam steps at lr {DEEP['lr']:g} with no warmup: the mean loss of the last 5 steps is below "
       f"1.5 nats (ln {DEEP['vocab']} = {math.log(DEEP['vocab']):.2f}); Post-LN of the same depth stays near "
       f"ln {DEEP['vocab']}")
def a_deep_model_trains(deepnet):
    config = TransformerConfig(vocab_size=DEEP["vocab"], block_size=DEEP["T"], n_layers=DEEP["layers"], d_model=32,
                               n_heads=4, d_ff=64)
    with float32_default():
        model = _build(deepnet, config)
        opt = torch.optim.Adam(model.parameters(), lr=DEEP["lr"], betas=(0.9, 0.98))
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(DEEP["steps"]):
            x, y = _successor_batch(DEEP["batch"], DEEP["T"], DEEP["vocab"], gen)
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    last = sum(losses[-5:]) / 5
    if not last < 1.5:
        raise Violation(f"the loss went from {losses[0]:.3f} to {last:.3f} (mean of the last 5 steps), not below "
                        f"1.5: the model does not train at this depth")


# ---- 4.5 the fused LN(alpha x + g) row in Triton -----------------------------------------------------------
# corner cases (fixed cases, no random draws): a row of 1 column; a row length that is a multiple of the block
# (64) and one that is not (37, 100); one row; large means against the spread; g = None; no bias; strided x and
# g; float16; RMSNorm.

def _run_add_norm(graded, x, g, w, b, alpha, eps, rms):
    """(y, mean, rstd) from the library's launcher under the interpreter, with the learner's kernel."""
    with installed(kln, "_add_norm_fwd_kernel", graded):
        return kln.add_norm_forward(x, g, w, b, alpha=alpha, eps=eps, rms=rms)


def _add_norm_oracle(x, g, w, b, alpha, eps, rms, *, alpha_on_g=False, no_alpha=False, ddof=0, eps_outside=False,
                     block=None, pad_mean=False, pad_var=False, one_pass=False, centre_rms=False, unit_stride=False):
    """The row in float64 (the keywords give the classic mistakes, for the message): (y, mean, rstd)."""
    n = x.size(-1)
    xd, gd = x.double(), None if g is None else g.double()
    a_x, a_g = (1.0, alpha) if alpha_on_g else (1.0, 1.0) if no_alpha else (alpha, 1.0)
    h = a_x * xd if gd is None else a_x * xd + a_g * gd
    if unit_stride:  # weight and bias read as contiguous from their first element
        w, b = (None if t is None else torch.as_strided(t, (n,), (1,)) for t in (w, b))
    pad = (block or n) - n
    mean = h.sum(1, keepdim=True) / (n + pad if pad_mean else n)
    if rms and not centre_rms:
        mean = torch.zeros_like(mean)
    centred = h - mean
    if one_pass:  # E[h^2] - E[h]^2 in float32, as a one-pass kernel would
        hf = h.float()
        var = ((hf * hf).sum(1, keepdim=True) / n - (hf.sum(1, keepdim=True) / n) ** 2).double()
    else:
        var = (centred.pow(2).sum(1, keepdim=True) + (pad * mean.pow(2) if pad_var else 0)) / (n - ddof)
    rstd = 1 / (var.sqrt() + eps) if eps_outside else 1 / (var + eps).sqrt()
    y = centred * rstd * w.double()
    if b is not None:
        y = y + b.double()
    return y, mean[:, 0], rstd[:, 0]


def _add_norm_tolerance(x, g, w, b, alpha, rms) -> float:
    """A few float32 roundings at the scale of the row: max|h| / std(h) (RMSNorm: / rms(h)) grows with the mean
    (h's own rounding), |w| multiplies it, |b| adds its own rounding."""
    h = alpha * x.double() + (0 if g is None else g.double())
    spread = _spread(h, rms)
    return 4e-6 * (1 + spread) * w.double().abs().max().item() + \
        (0 if b is None else 1e-6 * b.double().abs().max().item())


def _spread(h, rms) -> float:
    if h.size(1) == 1 and not rms:
        return 1.0
    scale = h.pow(2).mean(1).sqrt() if rms else h.std(1, correction=0)
    return (h.abs().amax(1) / (scale + 1e-12)).max().item()


def _compare_add_norm(graded, x, g, w, b, alpha, eps, rms, what, tol=None):
    y, mean, rstd = _run_add_norm(graded, x, g, w, b, alpha, eps, rms)
    if type(y) is not torch.Tensor or y.shape != x.shape or y.dtype != x.dtype:
        raise Violation(f"{what}: the launcher returned y as {getattr(y, 'dtype', type(y))} "
                        f"{tuple(getattr(y, 'shape', ()))}, expected {x.dtype} {tuple(x.shape)}")
    want_y, want_mean, want_rstd = _add_norm_oracle(x, g, w, b, alpha, eps, rms)
    tol = _add_norm_tolerance(x, g, w, b, alpha, rms) if tol is None else tol
    diff = (y.double() - want_y).abs().nan_to_num(nan=math.inf).amax(1)
    name = "RMSNorm" if rms else "LayerNorm"
    if diff.max() > tol:
        r = int(diff.argmax())
        block = 1 << max(x.size(1) - 1, 0).bit_length()
        mistakes = {
            "alpha multiplies the branch g, not the stream x: DeepNorm is LN(alpha x + g)": dict(alpha_on_g=True),
            "alpha is missing: h = x + g; DeepNorm scales the stream, h = alpha x + g": dict(no_alpha=True),
            "its variance divides by N - 1; LayerNorm's is the biased one, sum / N": dict(ddof=1),
            "eps is added outside the square root: 1 / (sqrt(var) + eps), not 1 / sqrt(var + eps)":
                dict(eps_outside=True),
            "the mean divides by BLOCK, the padded length: divide the sum by n_cols": dict(pad_mean=True, block=block),
            "the padded lanes past n_cols enter the variance (each adds mean^2): zero them before squaring":
                dict(pad_var=True, block=block),
            "the variance is E[h^2] - E[h]^2 in one pass: in float32 it cancels when the mean is large compared "
            "with the spread; subtract the mean first": dict(one_pass=True),
            "RMSNorm subtracts the mean: its mean is 0, rstd = 1 / sqrt(mean(h^2) + eps)": dict(centre_rms=True),
            "weight and bias are read as contiguous (W + cols): a strided view such as w[::2] needs the element "
            "strides stride_w and stride_b": dict(unit_stride=True),
        }
        why, closest = "", math.inf  # the mistake whose output is nearest to the kernel's, if near enough
        for text, kw in mistakes.items():
            alt = _add_norm_oracle(x, g, w, b, alpha, eps, rms, **kw)[0]
            d = (y.double() - alt).abs().nan_to_num(nan=math.inf).max().item()
            if d < closest and d <= max(2 * tol, 0.1 * diff.max().item()):
                why, closest = f": {text}", d
        if not why and y[r].isnan().any():
            why = ": NaN (a division by zero, or a value that was never computed)"
        ratio = abs(want_mean[r].item()) * want_rstd[r].item()
        if not why and ratio > 50:
            why = (f": this row's mean is {ratio:.0f} times its standard deviation; a variance taken as "
                   "E[h^2] - E[h]^2 in float32 loses most of its digits there: subtract the mean first")
        raise Violation(f"{what}: row {r} of y differs from the {name} of alpha x + g by {diff[r].item():.3g} "
                        f"(float32 tolerance {tol:.2g}){why}")
    h = alpha * x.double() + (0 if g is None else g.double())
    mean_tol = 4e-7 * (1 + h.abs().max().item())
    if not (mean.double() - want_mean).abs().nan_to_num(nan=math.inf).max() <= mean_tol:
        of = "0 (RMSNorm)" if rms else "the row mean of h = alpha x + g"
        raise Violation(f"{what}: the stored mean differs from {of} by "
                        f"{(mean.double() - want_mean).abs().nan_to_num(nan=math.inf).max().item():.3g} "
                        "(the backward reads it)")
    rel = ((rstd.double() - want_rstd) / want_rstd).abs().nan_to_num(nan=math.inf).max().item()
    if not rel <= 1e-5 + 2e-7 * _spread(h, rms):
        raise Violation(f"{what}: the stored rstd differs from 1 / sqrt(var + eps) by a factor of {rel:.3g} "
                        "(the backward reads it)")


def _row_inputs(rows, n, seed, *, std=1.0, mean=0.0):
    """x, g (rows, n) float32 of the given spread, and a weight and bias (n,) that are not 1 and 0."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=gen) * std + mean
    g = torch.randn(rows, n, generator=gen) * std + 0.3 * mean
    w = torch.randn(n, generator=gen) * 0.5 + 1.0
    b = torch.randn(n, generator=gen) * 0.3
    return x, g, w, b


@check("LayerNorm: the kernel (float32, under the interpreter) gives LN(alpha x + g) w + b with alpha != 1 on "
       "the stream x, and stores the row mean and 1 / sqrt(var + eps), within float32 rounding of a float64 "
       "oracle, for rows of 37, 100 and 64 columns (not a multiple of the block and one that is), a row of one "
       "column, a single row, small variances and a large eps")
def kernel_row_matches_the_float64_oracle(kernel):
    for rows, n, std, alpha, eps, seed in ((4, 37, 1.0, 2.5, 1e-5, 0), (3, 37, 1e-3, 1.7, 1e-6, 4),
                                           (5, 100, 0.7, 0.5, 0.5, 2), (2, 64, 2.0, 3.0, 1e-5, 3),
                                           (3, 1, 1.0, 2.0, 1e-5, 1), (1, 50, 1.0, 1.3, 1e-5, 5)):
        x, g, w, b = _row_inputs(rows, n, 100 + seed, std=std)
        _compare_add_norm(kernel, x, g, w, b, alpha, eps, False,
                          f"{rows} rows of {n} columns (std {std:g}, alpha {alpha:g}, eps {eps:g})")


@check("rows with a large mean compared with their spread (alpha x + g of mean 1300, -390, 0 and 52, std about "
       "1.8) keep float32 precision: the variance is taken of the centred row, not as E[h^2] - E[h]^2")
def large_means_keep_the_precision(kernel):
    gen = torch.Generator().manual_seed(7)
    means = torch.tensor([[1000.0], [-300.0], [0.0], [40.0]])
    x = torch.randn(4, 50, generator=gen) + means
    g = torch.randn(4, 50, generator=gen) + 0.1 * means
    w, b = torch.randn(50, generator=gen) * 0.5 + 1.0, torch.randn(50, generator=gen) * 0.3
    _compare_add_norm(kernel, x, g, w, b, 1.2, 1e-5, False,
                      "rows of 50 columns with means 1300, -390, 0, 52 and alpha 1.2")


@check("RMSNorm (RMS=True, the same kernel): y = h rstd w (+ b) with rstd = 1 / sqrt(mean(h^2) + eps) and the "
       "stored mean 0, h = alpha x + g of nonzero mean, for 37, 64 and 1 columns, with and without a bias")
def rmsnorm_branch_does_not_centre(kernel):
    for rows, n, alpha, bias, seed in ((4, 37, 2.0, True, 20), (3, 64, 0.7, False, 21), (2, 1, 1.5, True, 22)):
        x, g, w, b = _row_inputs(rows, n, seed, mean=0.8)
        _compare_add_norm(kernel, x, g, w, b if bias else None, alpha, 1e-5, True,
                          f"RMSNorm, {rows} rows of {n} columns (alpha {alpha:g}, {'with' if bias else 'no'} bias)")


@check("no residual input (g = None: h = alpha x) and no bias; rows of x and g that are strided (slices of "
       "wider tensors, each its own row stride); weight and bias that are strided views (w[::2], b[::3]); float16 rows computed in float32 and "
       "stored as float16")
def options_strides_and_float16(kernel):
    gen = torch.Generator().manual_seed(30)
    wide = torch.randn(5, 60, generator=gen) * 1.3 + 0.4
    x = wide[:, 3:40]  # 37 columns, rows 60 apart
    w_base, b_base = torch.randn(2 * 37, generator=gen) * 0.5 + 1.0, torch.randn(3 * 37, generator=gen) * 0.3
    _compare_add_norm(kernel, x, None, w_base[::2], None, 1.5, 1e-5, False,
                      "LayerNorm of 1.5 x without g or bias, x rows strided, weight w[::2]")
    g = torch.randn(5, 50, generator=gen)[:, 7:44]  # 37 columns, rows 50 apart (not x's 60)
    _compare_add_norm(kernel, x, g, w_base[::2], b_base[::3], 2.0, 1e-5, False,
                      "LayerNorm of 2 x + g, x rows 60 and g rows 50 apart, weight w[::2] and bias b[::3]")
    _compare_add_norm(kernel, x, None, w_base[::2], b_base[::3], 0.5, 1e-5, True,
                      "RMSNorm of 0.5 x without g, weight w[::2] and bias b[::3]")
    xh, gh = (torch.randn(3, 70, generator=gen) * 2).half(), torch.randn(3, 70, generator=gen).half()
    w, b = w_base[:70].clone(), b_base[:70].clone()
    want = _add_norm_oracle(xh, gh, w, b, 1.3, 1e-5, False)[0]
    _compare_add_norm(kernel, xh, gh, w, b, 1.3, 1e-5, False, "float16 rows of 70 columns (alpha 1.3)",
                      tol=1e-3 * (1 + want.abs().max().item()))


EXERCISES = {
    "4.1": Exercise(points=2, checks=[single_stack_table, update_bound_is_one, exact_at_every_n, encoder_decoder_table],
                    hint="Read the constants from the paper's table: one formula for a single stack of N "
                         "layers, two sides for an encoder-decoder. N counts blocks, not sublayers.",
                    hints=("Compute them (do not copy the table's rounded values) and return a dict with "
                           "one key per side that has layers, each a tuple of two Python floats (alpha, "
                           "beta).",
                           "Single stack with L layers: ((2L) ** 0.25, (8L) ** -0.25). Encoder-decoder: the encoder "
                           "uses (N ** 4 * M) ** (1 / 16) with 0.81 and 0.87, the decoder 3M and 12M (3 sublayers per "
                           "block). Return only the sides that have layers.")),
    "4.2": Exercise(points=2, checks=[zero_branch_gives_layernorm_of_x, known_branch_gives_layernorm_of_alpha_x_plus_g,
                                      applies_the_given_norm],
                    hint="DeepNorm changes one thing in Post-LN: which term of the sum is scaled.",
                    hints=("Scale the stream, add the branch, and apply the `norm` you are given (its eps"
                           " and weights are part of it); never change x or g in place.",
                           "One line: the LayerNorm of (alpha times the stream) plus the branch.")),
    "4.3": Exercise(points=3, checks=[gain_per_matrix, qk_gain_sets_the_queries_and_keys],
                    hint="DeepNet (gain beta) and Sub-LN (gain gamma) share one init: some matrices of every "
                         "block are re-drawn with a gain, the rest is left alone. Which matrices get `gain`, which "
                         "get `qk_gain`?",
                    hints=("The matrices on the residual update's path (BRANCH_PROJECTIONS) get `gain`, the ones "
                           "that only shape the attention pattern (QK_PROJECTIONS) get `qk_gain`. Find them by the "
                           "last part of their module name, re-draw them with xavier NORMAL, and return the model.",
                           "Walk model.named_modules(); the part after the last dot names the matrix. "
                           "nn.init.xavier_normal_ on module.weight with gain `gain` for v_proj, out_proj, fc1, fc2 "
                           "and `qk_gain` for q_proj, k_proj; embeddings, head, norms and biases stay as they were."),
                    mutates=("model",)),
    "4.4": Exercise(points=4, checks=[forward_is_post_ln_with_alpha_on_the_stream, init_gives_beta_to_the_branches,
                                      a_deep_model_trains],
                    hint="A DeepNet is the core Transformer with one part swapped and one init applied. Which "
                         "residual, which final norm, and which two constants, from which row of the table?",
                    hints=("Take alpha and beta for a decoder-only stack of config.n_layers blocks (your 4.1). Build "
                           "the Transformer with a DeepNorm residual that uses that alpha, and no final norm (each "
                           "block already ends with a LayerNorm); pass `parts` on; then apply the beta init.",
                           "alpha, beta from deepnorm_constants(decoder_layers=N)['decoder']; Transformer(config, "
                           "residual=DeepNorm with alpha fixed (functools.partial), final_norm=None, **parts); then "
                           "deepnorm_init_ with beta, and return the model.")),
    "4.5": Exercise(points=3, checks=[kernel_row_matches_the_float64_oracle, large_means_keep_the_precision,
                                      rmsnorm_branch_does_not_centre, options_strides_and_float16],
                    hint="One program holds one whole row in registers: build the pre-norm sum with alpha on the "
                         "right term, normalize it in two passes over the registers, then apply the gain and the "
                         "optional bias; the padding lanes past n_cols must not count anywhere.",
                    hints=("Load x (and g when HAS_G) with the lane mask and fill 0, in float32; alpha scales x, the "
                           "stream, never g. LayerNorm: first the mean over n_cols, then the variance of the centred "
                           "values with the lanes past n_cols zeroed before they are squared, divided by n_cols, "
                           "eps inside the square root. RMSNorm: the mean is 0 and nothing is centred. Weight and "
                           "bias are read with their element strides.",
                           "h = the masked load of x times alpha, plus the masked load of g when HAS_G; mean = 0.0 "
                           "when RMS, else the sum of h over the block divided by n_cols; the centred row is "
                           "tl.where over the lane mask of h minus mean, else 0; rstd is one over the square root "
                           "of (the sum of the squared centred row over n_cols plus eps); y is the centred row "
                           "times rstd times the weight loaded at cols times stride_w, plus the bias loaded at "
                           "cols times stride_b when HAS_BIAS. The lines after the region store y, mean and "
                           "rstd.")),
}
