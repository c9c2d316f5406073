"""The parts of chapters 02-08 by name: one registry for the command line, the chapters and the tests.

    build_lm(config)                                               # GPT: Pre-LN, softmax attention, MLP, nn.Linear
    build_lm(config, residual="deepnorm")                          # chapter 04's DeepNet
    build_lm(config, residual="subln")                             # chapter 05's Magneto (Sub-LN)
    build_lm(config, attention="dilated", segment_lengths=(32, 64, 128), dilation_rates=(1, 2, 4))  # ch. 06
    build_lm(config, ffn="moe", experts=8, top_k=2, router="xmoe") # chapter 07's (X-)MoE
    build_lm(config, linear="bitlinear")                           # chapter 08's BitNet b1.58 body
    build_lm(config, attention="retention")                        # RetNet's multi-scale retention

Each name picks one part of the core Transformer (nanomodels/transformer.py); `build_lm` validates the names and
the combinations before building anything, so `python -m nanomodels train --residual subln --ffn moe` fails with
a sentence, not a shape error. Every name maps to the same object a chapter uses: DeepNorm and Sub-LN come with
their initializations (nanomodels/deepnet.py, nanomodels/subln.py), dilated attention is `longnet(...)`, MoE is
`MoE(...)`, BitLinear pairs with BitNetResidual (its RMSNorm lives inside each BitLinear, BitNet's layout).
"""

import re
from functools import partial
from typing import Sequence

import torch.nn as nn

from nanomodels.bitlinear import BitLinear, BitNetResidual
from nanomodels.deepnet import deepnet
from nanomodels.dilated import DilatedAttention, check_patterns, longnet
from nanomodels.moe import MoE
from nanomodels.retnet import MultiScaleRetention
from nanomodels.subln import magneto
from nanomodels.transformer import PostNorm, PreNorm, Transformer, TransformerConfig, layer_norm

RESIDUALS = ("pre", "post", "deepnorm", "subln")  # where the norm sits (chapters 00, 04, 05)
ATTENTIONS = ("softmax", "dilated", "retention")  # who attends to whom, at what cost (chapters 06, 10)
FFNS = ("mlp", "moe")  # the feed-forward sublayer (chapter 07)
ROUTERS = ("linear", "xmoe")  # MoE's router (chapter 07)
LINEARS = ("dense", "bitlinear")  # the body's linear layers (chapter 08)


def _choose(option: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{option}: must be one of {', '.join(choices)}, got {value!r}")


def check_parts(*, residual: str = "pre", attention: str = "softmax", ffn: str = "mlp", linear: str = "dense",
                segment_lengths: Sequence[int] = (), dilation_rates: Sequence[int] = (),
                experts: int = 8, top_k: int = 1, capacity_factor: float = 1.0, router: str = "linear",
                aux_weight: float = 0.01, prefix: str = "") -> None:
    """Every name known, every combination buildable; the first broken rule raises a ValueError naming the option
    (spelled `prefix + name`, e.g. '--residual' on the command line)."""
    name = lambda n: prefix + n  # noqa: E731
    _choose(name("residual"), residual, RESIDUALS)
    _choose(name("attention"), attention, ATTENTIONS)
    _choose(name("ffn"), ffn, FFNS)
    _choose(name("linear"), linear, LINEARS)
    if attention == "retention" and residual in ("deepnorm", "subln"):
        raise ValueError(f"{name('attention')}: retention has its own projections, gate and per-head norm, which "
                         f"DeepNet's and Sub-LN's initializations do not cover; it combines with {name('residual')} "
                         "pre or post")
    if residual == "subln" and (attention != "softmax" or ffn != "mlp"):
        raise ValueError(f"{name('residual')}: subln brings its own attention and feed-forward parts (a LayerNorm "
                         f"inside each); it combines only with {name('attention')} softmax and {name('ffn')} mlp")
    if linear == "bitlinear" and residual != "pre":
        raise ValueError(f"{name('linear')}: bitlinear normalizes inside each BitLinear (BitNet's Pre-LN layout, "
                         f"x + f(x) around it); it combines only with {name('residual')} pre")
    if attention == "dilated":
        try:
            check_patterns(segment_lengths, dilation_rates)
        except ValueError as err:
            raise ValueError(re.sub(r"\b(segment_lengths|dilation_rates)\b", prefix + r"\1", str(err))) from None
    if ffn == "moe":
        _choose(name("router"), router, ROUTERS)
        if not isinstance(experts, int) or experts < 1:
            raise ValueError(f"{name('experts')}: must be a positive integer, got {experts!r}")
        if top_k not in (1, 2) or top_k > experts:
            raise ValueError(f"{name('top_k')}: must be 1 or 2 and at most {name('experts')} ({experts}), "
                             f"got {top_k!r}")
        if not capacity_factor > 0:
            raise ValueError(f"{name('capacity_factor')}: must be > 0, got {capacity_factor!r}")
        if not aux_weight >= 0:
            raise ValueError(f"{name('aux_weight')}: must be >= 0, got {aux_weight!r}")


def build_lm(config: TransformerConfig, *, residual: str = "pre", attention: str = "softmax", ffn: str = "mlp",
             linear: str = "dense", segment_lengths: Sequence[int] = (), dilation_rates: Sequence[int] = (),
             experts: int = 8, top_k: int = 1, capacity_factor: float = 1.0, router: str = "linear",
             aux_weight: float = 0.01) -> Transformer:
    """The core Transformer with the named parts (checked first by `check_parts`)."""
    check_parts(residual=residual, attention=attention, ffn=ffn, linear=linear, segment_lengths=segment_lengths,
                dilation_rates=dilation_rates, experts=experts, top_k=top_k,
                capacity_factor=capacity_factor, router=router, aux_weight=aux_weight)
    parts = {}
    if attention == "dilated":
        parts["attention"] = longnet(tuple(segment_lengths), tuple(dilation_rates))
    if attention == "retention":
        parts["attention"] = MultiScaleRetention
    if ffn == "moe":
        parts["ffn"] = partial(MoE, num_experts=experts, k=top_k, capacity_factor=capacity_factor, router=router,
                               aux_weight=aux_weight)
    if linear == "bitlinear":
        parts.update(linear=BitLinear, residual=BitNetResidual)
    if residual == "deepnorm":
        return deepnet(config, **parts)
    if residual == "subln":
        return magneto(config, **parts)
    if residual == "post":
        parts.update(residual=PostNorm, final_norm=None)
    parts.setdefault("residual", PreNorm)
    parts.setdefault("final_norm", layer_norm)
    model = Transformer(config, **parts)
    for m in model.modules():  # the core's GPT-2 init covered every part; retention keeps torchscale's
        if isinstance(m, MultiScaleRetention):
            m.reset_parameters()
    return model


def uses_kv_cache(model: nn.Module) -> bool:
    """Whether `model.generate` may keep a KV cache: dilated attention recomputes the whole window instead."""
    return not any(isinstance(m, DilatedAttention) for m in model.modules())
