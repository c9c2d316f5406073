"""Chapter 05's graded checks: the Sub-LN gamma, the Sub-LN feed-forward, the Magneto encoder-decoder (its parts,
a gamma per stack, and a short training run on a reverse task).

Each check tests what the paper promises, in float64, against the learner's function (its first argument).
Known-wrong solutions: exercises/grading/mutants/ch05_*.md.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from exercises.grading.checking import Exercise, Violation, check
from exercises.grading.checks.common import (F64, differs, expect_close, expect_tensor, float32_default, max_diff,
                                             naive_layer_norm, std_tolerance, xavier_std)
from nanomodels.attention import MultiHeadAttention
from nanomodels.subln import SubLNAttention, SubLNMLP, subln_gamma
from nanomodels.encoder_decoder import EncoderDecoder
from nanomodels.transformer import PreNorm, TransformerConfig



# ---- 5.1 gamma --------------------------------------------------------------------------------------------
# corner cases: N = 2 (the smallest N with gamma > 1); the table's N; N = 100,000; an encoder-decoder with
# M != N. Pinned: n = 2 and n = 100,000 beside the table's N; encoder_decoder_table's fixed rows.

@check("encoder-only and decoder-only models with N layers get gamma = sqrt(log 2N) (natural log; the table: "
       "N = 6 -> 1.5764, 12 -> 1.7827, 24 -> 1.9675), under the one key of the side that has layers")
def single_stack_table(subln_gamma):
    for n, gamma in {6: 1.5764, 12: 1.7827, 24: 1.9675}.items():
        for side, kw in (("encoder", {"encoder_layers": n}), ("decoder", {"decoder_layers": n})):
            got = subln_gamma(**kw)
            if type(got) is not dict or set(got) != {side}:
                raise Violation(f"subln_gamma({side}_layers={n}) returned {got!r}; expected a dict with the one "
                                f"key {side!r}")
            value = float(got[side])
            if abs(value - gamma) > 6e-5:
                why = ""
                if abs(value - math.sqrt(math.log(4 * n))) < 1e-9:
                    why = "; that is sqrt(log 4N): N counts layers (blocks), not sublayers"
                elif abs(value - math.log(2 * n)) < 1e-9:
                    why = "; that is log 2N: the square root is missing"
                elif abs(value - math.sqrt(math.log2(2 * n))) < 1e-9:
                    why = "; that is log base 2: the paper uses the natural log"
                raise Violation(f"N = {n}: got gamma = {value:.4f}, the table has {gamma}{why}")


def _float(value, what: str) -> float:
    if type(value) is not float:
        raise Violation(f"{what} is {value!r} of type {type(value).__name__}; return a Python float")
    return value


@check("gamma = sqrt(log 2N) exactly (to 1e-12, not rounded to the table's 4 decimals) for every N, the table's "
       "N included (and gamma > 1 from N = 2 on: Sub-LN multiplies the init)", n=st.integers(2, 100_000),
       max_examples=200, examples=[dict(n=2), dict(n=100_000), dict(n=6), dict(n=12), dict(n=24)])
def gamma_squared_is_log_2n(subln_gamma, n):
    value = _float(subln_gamma(decoder_layers=n)["decoder"], f"subln_gamma(decoder_layers={n})['decoder']")
    if abs(value / math.sqrt(math.log(2 * n)) - 1) > 1e-12:
        raise Violation(f"N = {n}: gamma^2 = {value ** 2:.6g}, log(2N) = {math.log(2 * n):.6g}")


@check("an encoder-decoder model gets encoder sqrt(log(3M) log(2N) / 3) and decoder sqrt(log 3M)")
def encoder_decoder_table(subln_gamma):
    for n, m in ((6, 6), (4, 20), (100, 3)):
        got = subln_gamma(encoder_layers=n, decoder_layers=m)
        if type(got) is not dict or set(got) != {"encoder", "decoder"}:
            raise Violation(f"subln_gamma({n}, {m}) returned {got!r}; expected keys 'encoder' and 'decoder'")
        enc, dec = math.sqrt(math.log(3 * m) * math.log(2 * n) / 3), math.sqrt(math.log(3 * m))
        got = {side: _float(v, f"subln_gamma({n}, {m})[{side!r}]") for side, v in got.items()}
        if abs(got["encoder"] / enc - 1) > 1e-12 or abs(got["decoder"] / dec - 1) > 1e-12:
            raise Violation(f"N = {n}, M = {m}: got encoder {float(got['encoder']):.4f}, decoder "
                            f"{float(got['decoder']):.4f}; the paper gives {enc:.4f}, {dec:.4f}")


# ---- 5.2 the feed-forward ---------------------------------------------------------------------------------
# corner cases: x of rank 1 (one token), 2 and 4 (any leading dimensions) beside the drawn rank 3; d_ff != d
# (the norm's width tells the two apart); float32 parts. Pinned: the ranks, in matches_w2_ln_gelu_w1's `lead`.

def _ffn_parts(d: int, d_ff: int, seed: int):
    torch.manual_seed(seed)
    fc1, fc2 = nn.Linear(d, d_ff, dtype=F64), nn.Linear(d_ff, d, dtype=F64)
    norm = nn.LayerNorm(d_ff, eps=0.0, dtype=F64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    return fc1, norm, fc2


def _ln(h, norm):
    return naive_layer_norm(h, norm.weight, norm.bias)


@check("subln_ffn(x, fc1, inner_norm, fc2) = W2 LN(GELU(W1 x)) with the inner LayerNorm over d_ff, between the "
       "activation and fc2, for x of any leading dimensions", seed=st.integers(0, 2 ** 16),
       d_ff=st.sampled_from([12, 20, 40]), lead=st.sampled_from([(2, 3), (5,), (), (1, 2, 2)]),
       examples=[dict(seed=0, d_ff=12, lead=()), dict(seed=1, d_ff=20, lead=(1, 2, 2)),
                 dict(seed=2, d_ff=40, lead=(5,))])
def matches_w2_ln_gelu_w1(subln_ffn, seed, d_ff, lead):
    fc1, norm, fc2 = _ffn_parts(8, d_ff, seed)
    x = torch.randn(*lead, 8, generator=torch.Generator().manual_seed(seed), dtype=F64)
    seen = []

    def recording(h):
        seen.append(h.shape[-1])
        if h.shape[-1] != d_ff:
            raise Violation(f"the inner norm was applied to a tensor of width {h.shape[-1]}; it normalizes over the "
                            f"feed-forward width d_ff = {d_ff}, between the activation and fc2 (d = 8)")
        return norm(h)

    with torch.no_grad():
        out = subln_ffn(x.clone(), fc1, recording, fc2)
        ref = fc2(_ln(F.gelu(fc1(x)), norm))
    if not seen:
        raise Violation(f"the inner norm (the `inner_norm` argument) was never called: Sub-LN applies it once, to "
                        f"GELU(W1 x) over the feed-forward width d_ff = {d_ff}, before fc2")
    if seen != [d_ff]:
        raise Violation(f"the inner norm was called {len(seen)} times, on tensors whose last dimension is {seen}; it "
                        f"must be called once, over the feed-forward width d_ff = {d_ff} (not d = 8)")
    if not max_diff(out, ref) < 1e-10:
        why = ""
        if (out - fc2(F.gelu(_ln(fc1(x), norm)))).abs().max() < 1e-10:
            why = ": yours normalizes before the activation"
        raise Violation(f"the output differs from W2 LN(GELU(W1 x)) by {differs(out, ref)}{why}")


@check("float32 parts and input give a float32 output equal to W2 LN(GELU(W1 x)) (the dtype is kept)",
       seed=st.integers(0, 2 ** 16))
def keeps_float32(subln_ffn, seed):
    fc1, norm, fc2 = (part.float() for part in _ffn_parts(8, 16, seed))
    x = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(seed)).float()
    with torch.no_grad():
        out = subln_ffn(x, fc1, norm, fc2)
        expect_tensor(out, (2, 3, 8), torch.float32, "subln_ffn on float32 input")
        want = fc2(norm(F.gelu(fc1(x))))
    expect_close(out, want, 1e-5, "in float32 the output differs from W2 LN(GELU(W1 x))")


# ---- 5.3 the Magneto encoder-decoder ------------------------------------------------------------------------
# corner cases: one encoder layer, one decoder layer (STACKS: (1, 2), (3, 1)); N > M and N < M (the gammas of
# the two stacks differ); parts passed in. All in STACKS and the fixed checks.

STACKS = st.sampled_from([(1, 2), (2, 3), (3, 1)])  # (N encoder, M decoder) layers: every gamma differs


def _encoder_decoder(magneto_encoder_decoder, n: int, m: int, config: TransformerConfig | None = None):
    torch.manual_seed(0)
    config = config or TransformerConfig(vocab_size=50, block_size=16, n_layers=m, d_model=96, n_heads=4, d_ff=192)
    model = magneto_encoder_decoder(config, n)
    if not isinstance(model, EncoderDecoder):
        raise Violation(f"magneto_encoder_decoder returned {type(model).__name__}, expected the EncoderDecoder "
                        "it built")
    if len(model.encoder) != n or len(model.decoder) != m:
        raise Violation(f"with encoder_layers = {n} and config.n_layers = {m} the model has {len(model.encoder)} "
                        f"encoder and {len(model.decoder)} decoder blocks")
    return model


@check("the model is an EncoderDecoder with N encoder and M = config.n_layers decoder blocks; every "
       "self-attention and feed-forward is Sub-LN (an inner LayerNorm), the decoder's cross-attention is plain "
       "multi-head attention (no inner LN: the paper's Magneto), every residual is Pre-LN", nm=STACKS)
def sub_ln_parts_where_magneto_puts_them(magneto_encoder_decoder, nm):
    model = _encoder_decoder(magneto_encoder_decoder, *nm)
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        for i, block in enumerate(stack):
            where = f"{side} block {i}"
            if not isinstance(block.attn, SubLNAttention) or not isinstance(block.ffn, SubLNMLP):
                raise Violation(f"{where}: self-attention {type(block.attn).__name__}, feed-forward "
                                f"{type(block.ffn).__name__}; both must be the Sub-LN parts")
            residuals = [block.attn_residual, block.ffn_residual] + ([block.cross_residual] if side == "decoder"
                                                                    else [])
            if not all(isinstance(r, PreNorm) for r in residuals):
                raise Violation(f"{where}: residual {type(block.attn_residual).__name__}; Magneto is Pre-LN")
            if side == "decoder" and (not isinstance(getattr(block, "cross_attn", None), MultiHeadAttention)
                                      or hasattr(block.cross_attn, "inner_norm")):
                raise Violation(f"{where}: cross-attention {type(getattr(block, 'cross_attn', None)).__name__}; "
                                "Magneto's cross-attention has no inner LayerNorm (plain MultiHeadAttention)")


@check("each stack is initialized with its own row of the table: the encoder's v/out/fc1/fc2 with xavier normal "
       "of gain gamma_encoder, the decoder's (its cross-attention's v and out included) with gamma_decoder, q/k "
       "with gain 1, every norm untouched", nm=STACKS)
def a_gamma_per_stack(magneto_encoder_decoder, nm):
    n, m = nm
    model = _encoder_decoder(magneto_encoder_decoder, n, m)
    gamma = subln_gamma(n, m)
    for side, stack in (("encoder", model.encoder), ("decoder", model.decoder)):
        other = "decoder" if side == "encoder" else "encoder"
        for name, p in stack.named_parameters():
            leaf = name.rsplit(".", 2)[-2] if name.endswith(".weight") else None
            if leaf in ("v_proj", "out_proj", "fc1", "fc2", "q_proj", "k_proj"):
                gain = gamma[side] if leaf not in ("q_proj", "k_proj") else 1.0
                # False rejection: std_tolerance, < 2e-9 per tensor, about 20 tensors per model: < 1e-7
                std, want = p.detach().std().item(), xavier_std(p, gain)
                if abs(std / want - 1) > std_tolerance(p.numel()):
                    why = ""
                    if abs(std / xavier_std(p, gamma[other]) - 1) < 0.06:
                        why = f": that is the {other}'s gamma {gamma[other]:.4g}; each stack takes its own row"
                    label = f"gamma_{side}" if leaf not in ("q_proj", "k_proj") else "q and k keep gain 1"
                    raise Violation(f"N = {n}, M = {m}: {side}.{name} has std {std:.4g}; xavier normal with gain "
                                    f"{gain:.4g} ({label}) gives {want:.4g}{why}")
            elif "norm" in name and name.endswith(".weight") and not torch.equal(p, torch.ones_like(p)):
                raise Violation(f"{side}.{name} changed: the norms (inner norms included) keep their weight 1")


class _CallersNorm(torch.nn.Identity):
    """A final norm the caller passes as a part: the model must be built with it."""


@check("the caller's **parts reach EncoderDecoder: a final_norm passed in builds the encoder's and the decoder's "
       "final norm, and the Sub-LN parts stay")
def parts_are_passed_on(magneto_encoder_decoder):
    torch.manual_seed(0)
    config = TransformerConfig(vocab_size=50, block_size=16, n_layers=2, d_model=32, n_heads=4, d_ff=64)
    model = magneto_encoder_decoder(config, 1, final_norm=lambda cfg: _CallersNorm())
    norms = {name: type(getattr(model, name, None)).__name__ for name in ("encoder_norm", "final_norm")}
    if not all(n == "_CallersNorm" for n in norms.values()):
        raise Violation(f"magneto_encoder_decoder(config, 1, final_norm=...) built the final norms {norms}: the "
                        "caller's **parts must be passed on to EncoderDecoder")


REVERSE = dict(digits=8, length=4, batch=16, steps=60, lr=1e-2)


@check(f"a 2 + 2 layer Magneto (width 32) learns to reverse {REVERSE['length']} digits of {REVERSE['digits']} in "
       f"{REVERSE['steps']} Adam steps at lr {REVERSE['lr']:g}: the mean loss of the last 5 steps is below 1.75 nats "
       f"(ln {REVERSE['digits']} = {math.log(REVERSE['digits']):.2f} is a model that learned only which digits "
       "occur)")
def a_reverse_task_trains(magneto_encoder_decoder):
    V, L, B = REVERSE["digits"], REVERSE["length"], REVERSE["batch"]
    config = TransformerConfig(vocab_size=V + 1, block_size=L, n_layers=2, d_model=32, n_heads=4, d_ff=64)
    with float32_default():
        model = _encoder_decoder(magneto_encoder_decoder, 2, 2, config)
        opt = torch.optim.Adam(model.parameters(), lr=REVERSE["lr"])
        gen = torch.Generator().manual_seed(0)
        losses = []
        for _ in range(REVERSE["steps"]):
            src = torch.randint(0, V, (B, L), generator=gen)
            out = src.flip(1)
            tgt = torch.cat([torch.full((B, 1), V), out[:, :-1]], 1)  # token V starts every target
            _, loss = model(src, tgt, out)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    last = sum(losses[-5:]) / 5
    if not last < 1.75:
        raise Violation(f"the loss went from {losses[0]:.3f} to {last:.3f} (mean of the last 5 steps), not below "
                        "1.75: the model does not learn the reverse task")


EXERCISES = {
    "5.1": Exercise(points=2, checks=[single_stack_table, gamma_squared_is_log_2n, encoder_decoder_table],
                    hint="gamma comes from the same theory as DeepNet's constants, with natural "
                         "logarithms; N counts blocks.",
                    hints=("A single stack: the square root of a logarithm of 2N; an encoder-decoder has "
                           "its own row per side. Return Python floats, computed, not copied from the "
                           "table.",
                           "math.sqrt(math.log(2 * L)) for a single stack of L layers; the enc-dec rows use 3M for "
                           "the decoder and sqrt(log(3M) log(2N) / 3) for the encoder.")),
    "5.2": Exercise(points=2, checks=[matches_w2_ln_gelu_w1, keeps_float32],
                    hint="Sub-LN adds one LayerNorm inside the feed-forward. Between which two "
                         "operations, and over which width?",
                    hints=("Apply fc1, the activation, the given inner norm, then fc2, in that order, "
                           "keeping the input's dtype.",
                           "fc1, then GELU, then the inner norm (it is d_ff wide), then fc2.")),
    "5.3": Exercise(points=3, checks=[sub_ln_parts_where_magneto_puts_them, a_gamma_per_stack, parts_are_passed_on,
                                      a_reverse_task_trains],
                    hint="An encoder-decoder Magneto has two stacks, and each gets its own row of the gamma "
                         "table (gamma, given, is computed by your subln_gamma of 5.1). Which parts carry an inner "
                         "LayerNorm, and which do not?",
                    hints=("Build the core EncoderDecoder from parts: Sub-LN self-attention and feed-forward on "
                           "both sides, Pre-LN residuals, and a cross-attention without an inner norm (the paper's "
                           "choice). Then initialize each stack, not the whole model, with its own gamma.",
                           "EncoderDecoder(config, encoder_layers=..., attention=the Sub-LN attention, "
                           "cross_attention=plain multi-head attention, ffn=the Sub-LN MLP, residual=Pre-LN, "
                           "**parts); then subln_init_ on model.encoder with gamma['encoder'] and on model.decoder "
                           "with gamma['decoder']; return the model.")),
}
