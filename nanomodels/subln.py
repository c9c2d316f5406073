"""Sub-LN (Magneto / "Foundation Transformers", arXiv 2210.06423): Pre-LN plus one LayerNorm inside each
sublayer.

Pre-LN trains stably but its deep layers contribute little; Post-LN is better when it trains at all. Magneto
keeps Pre-LN's residual x + f(LN(x)) and adds a second LayerNorm inside each sublayer, just before its output
matrix:

    attention:     Q, K, V = W^{Q,K,V} LN(x);     out = W^O LN(Attention(Q, K, V))     inner LN over d
    feed-forward:  FFN(x) = W_2 LN(phi(W_1 LN(x)))                                      inner LN over d_ff
    residual:      x + sublayer(x)  (Pre-LN, no alpha, a final LN before the head)
    init:          xavier_normal_(W, gain=gamma) for W in {v_proj, out_proj, fc1, fc2}; gain 1 for q, k

gamma comes from the DeepNet theory (natural logarithms):

| architecture                  | gamma                        |
| encoder-only / decoder-only N | sqrt(log 2N)                 |
| enc-dec: encoder              | sqrt(log(3M) log(2N) / 3)    |
| enc-dec: decoder              | sqrt(log 3M)                 |

gamma > 1: Sub-LN *multiplies* these weights (DeepNet divides them). It is not a reparametrization of the forward
pass: the inner LN cancels the scale of W^V (the attention output is linear in V), but not of W_1 (GELU is not
scale-invariant), and gamma also scales W^O and W_2, which come after the inner LN (chapter 05 measures both).

Paper vs official code (microsoft/torchscale 0.3.0 and commit 4d1e0e8 alike): `subln=True` is the default in
every config, so a default torchscale model is Magneto; cross-attention gets no inner LN (here neither); the decoder's
init skips the cross-attention (`encoder_attn`), which this file scales like the self-attention; the init is
PyTorch's Linear default times gamma, or N(0, 0.02) with bert_init: torchscale never applies xavier. This file
follows the paper: xavier normal with gain gamma.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomodels.attention import MultiHeadAttention
from nanomodels.encoder_decoder import EncoderDecoder
from nanomodels.transformer import MLP, PreNorm, Transformer, TransformerConfig, init_branches_


def subln_gamma(encoder_layers: int = 0, decoder_layers: int = 0) -> dict:
    """{"encoder": gamma, "decoder": gamma}, one key per side with layers (N = encoder_layers,
    M = decoder_layers, in blocks). Encoder-only and decoder-only share sqrt(log 2N); enc-dec models get the
    enc-dec rows."""
    for name, value in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
    if encoder_layers == 0 and decoder_layers == 0:
        raise ValueError("encoder_layers, decoder_layers: at least one must be > 0 (both are 0)")
    # BEGIN EXERCISE 5.1: the Sub-LN gamma
    N, M = encoder_layers, decoder_layers
    if N and M:
        return {"encoder": math.sqrt(math.log(3 * M) * math.log(2 * N) / 3),
                "decoder": math.sqrt(math.log(3 * M))}
    side, L = ("encoder", N) if N else ("decoder", M)
    return {side: math.sqrt(math.log(2 * L))}
    # END EXERCISE


def subln_ffn(x: torch.Tensor, fc1, inner_norm, fc2) -> torch.Tensor:
    """W_2 LN(GELU(W_1 x)): fc1 maps d -> d_ff, inner_norm normalizes over d_ff, fc2 maps d_ff -> d.

    x is already LN(x): the outer (Pre-LN) norm belongs to the residual part."""
    # BEGIN EXERCISE 5.2: the Sub-LN feed-forward
    return fc2(inner_norm(F.gelu(fc1(x))))
    # END EXERCISE


class SubLNAttention(MultiHeadAttention):
    """Multi-head attention with an inner LayerNorm over d between the attention and the output projection."""

    def __init__(self, config: TransformerConfig, *, attn_fn, linear: type = nn.Linear):
        super().__init__(config, attn_fn=attn_fn, linear=linear)
        self.inner_norm = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, x, allowed=None, causal: bool = False, cache=None, memory=None):
        return self.dropout(self.out_proj(self.inner_norm(self.attend(x, allowed, causal, cache, memory))))


class SubLNMLP(MLP):
    """The dense MLP with an inner LayerNorm over d_ff between the activation and fc2."""

    def __init__(self, config: TransformerConfig, *, linear: type = nn.Linear):
        super().__init__(config, linear=linear)
        self.inner_norm = nn.LayerNorm(config.d_ff, bias=config.bias)

    def forward(self, x):
        return self.dropout(subln_ffn(x, self.fc1, self.inner_norm, self.fc2))


def subln_init_(model: nn.Module, gamma: float) -> nn.Module:
    """In place: xavier_normal_(gain=gamma) on each v_proj, out_proj, fc1, fc2 weight; gain 1 on q/k_proj.

    Every other parameter (embeddings, the head, norms, biases) is left as it was. Returns the model."""
    if not gamma > 0:
        raise ValueError(f"gamma: must be > 0, got {gamma!r}")
    return init_branches_(model, gamma, qk_gain=1.0)


def magneto(config: TransformerConfig, **parts) -> Transformer:
    """A decoder-only Magneto model: Pre-LN with Sub-LN attention and feed-forward, then `subln_init_`."""
    model = Transformer(config, attention=SubLNAttention, ffn=SubLNMLP, residual=PreNorm, **parts)
    return subln_init_(model, subln_gamma(decoder_layers=config.n_layers)["decoder"])


def magneto_encoder_decoder(config: TransformerConfig, encoder_layers: int, **parts) -> EncoderDecoder:
    """An encoder-decoder Magneto: N = encoder_layers, M = config.n_layers; Sub-LN self-attention and
    feed-forward on both sides, plain cross-attention (no inner LN), gamma per side from the enc-dec rows."""
    gamma = subln_gamma(encoder_layers, config.n_layers)
    # BEGIN EXERCISE 5.3: the Magneto encoder-decoder, one gamma per stack
    model = EncoderDecoder(config, encoder_layers=encoder_layers, attention=SubLNAttention,
                           cross_attention=MultiHeadAttention, ffn=SubLNMLP, residual=PreNorm, **parts)
    subln_init_(model.encoder, gamma["encoder"])
    subln_init_(model.decoder, gamma["decoder"])
    return model
    # END EXERCISE


__all__ = ["SubLNAttention", "SubLNMLP", "magneto", "magneto_encoder_decoder", "subln_ffn", "subln_gamma", "subln_init_"]
