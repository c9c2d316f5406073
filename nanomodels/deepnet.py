"""DeepNet: DeepNorm, a Post-LN residual with an up-weighted stream and a down-scaled init (arXiv 2203.00555).

Post-LN, x_{l+1} = LN(x_l + G(x_l)), trains well when shallow and diverges when deep: early in training each
of the 2N sublayers moves the output by O(1), the updates add up, and the LayerNorms amplify them. DeepNorm
keeps the Post-LN form and bounds the total update ||F(x; theta_t) - F(x; theta_0)|| = O(1) with two
constants:

    x_{l+1} = LN(alpha * x_l + G_l(x_l))                        alpha > 1 weighs the stream, not the branch
    xavier_normal_(W, gain=beta)  for W in {v_proj, out_proj, fc1, fc2}    beta < 1 shrinks the branches
    xavier_normal_(W, gain=1)     for W in {q_proj, k_proj}; embeddings and the head are left as they are

With N blocks (2N sublayers, each with two scaled matrices v = w = beta) the bound needs 2N (v^2 + w^2) /
alpha^2 = O(1); alpha = (2N)^(1/4), beta = (8N)^(-1/4) make it exactly 2N * 2 beta^2 / alpha^2 = 1.

| architecture          | alpha                  | beta                    |
| encoder-only, N       | (2N)^(1/4)             | (8N)^(-1/4)             |
| decoder-only, M       | (2M)^(1/4)             | (8M)^(-1/4)             |
| enc-dec: encoder      | 0.81 (N^4 M)^(1/16)    | 0.87 (N^4 M)^(-1/16)    |
| enc-dec: decoder      | (3M)^(1/4)             | (12M)^(-1/4)            |   (3 sublayers per decoder block)

N and M count layers (blocks of attention + feed-forward), not sublayers.

Paper vs official code. (1) At microsoft/torchscale commit 4d1e0e8, `DecoderConfig(deepnorm=True)` sets
`encoder_normalize_before=False` instead of the decoder's, so a torchscale "DeepNorm decoder" stays Pre-LN (with
alpha and beta), and `EncoderDecoderConfig` has the same slip on the decoder side; a regression at that commit:
the released torchscale 0.3.0 sets `decoder_normalize_before=False` correctly. Its fairseq LM example forces Pre-LN
either way. (2) Its enc-dec encoder beta is 1.15 (N^4 M)^(-1/16), where the paper has 0.87. (3) It never applies
xavier: weights keep PyTorch's Linear default (kaiming uniform) divided by init_scale = 1/beta, or N(0, 0.02) with
bert_init; the xavier `reset_parameters` of its attention is never called by Encoder/Decoder (microsoft/torchscale#16).
This file follows the paper: Post-LN, 0.87, xavier normal with gain beta.
"""

from functools import partial
from typing import Optional

import torch
import torch.nn as nn

from nanomodels.encoder_decoder import EncoderDecoder
from nanomodels.transformer import Transformer, TransformerConfig, init_branches_


def _check_layers(encoder_layers, decoder_layers) -> None:
    for name, value in (("encoder_layers", encoder_layers), ("decoder_layers", decoder_layers)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name}: must be an integer >= 0, got {value!r}")
    if encoder_layers == 0 and decoder_layers == 0:
        raise ValueError("encoder_layers, decoder_layers: at least one must be > 0 (both are 0)")


def deepnorm_constants(encoder_layers: int = 0, decoder_layers: int = 0) -> dict:
    """{"encoder": (alpha, beta), "decoder": (alpha, beta)}: one key per side with layers, the paper's table.

    encoder_layers = N, decoder_layers = M (blocks). Encoder-only (M = 0) and decoder-only (N = 0) share one
    formula; an encoder-decoder model gets the enc-dec rows for both sides.
    """
    _check_layers(encoder_layers, decoder_layers)
    # BEGIN EXERCISE 4.1: the DeepNorm constants
    N, M = encoder_layers, decoder_layers
    if N and M:
        return {"encoder": (0.81 * (N ** 4 * M) ** (1 / 16), 0.87 * (N ** 4 * M) ** (-1 / 16)),
                "decoder": ((3 * M) ** (1 / 4), (12 * M) ** (-1 / 4))}
    side, L = ("encoder", N) if N else ("decoder", M)
    return {side: ((2 * L) ** (1 / 4), (8 * L) ** (-1 / 4))}
    # END EXERCISE


def deepnorm(x: torch.Tensor, g: torch.Tensor, alpha: float, norm) -> torch.Tensor:
    """LN(alpha * x + g): x the residual stream (B, T, d), g = G(x) the sublayer's output, norm the LN."""
    # BEGIN EXERCISE 4.2: the DeepNorm residual
    return norm(alpha * x + g)
    # END EXERCISE


class DeepNorm(nn.Module):
    """Residual part: LN(alpha * x + f(x)), alpha = (2N)^(1/4), N = config.n_layers (one stack of layers).

    Post-LN: build the model with final_norm=None. `alpha` overrides the decoder-only constant (an
    encoder-decoder model has one alpha per side). The init half of DeepNorm is `deepnorm_init_`.
    """

    def __init__(self, config: TransformerConfig, alpha: Optional[float] = None):
        super().__init__()
        self.alpha = deepnorm_constants(decoder_layers=config.n_layers)["decoder"][0] if alpha is None else alpha
        self.norm = nn.LayerNorm(config.d_model, bias=config.bias)

    def forward(self, x, sublayer):
        return deepnorm(x, sublayer(x), self.alpha, self.norm)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.4f}"


def deepnorm_init_(model: nn.Module, beta: float) -> nn.Module:
    """In place: xavier_normal_(gain=beta) on each v_proj, out_proj, fc1, fc2 weight; gain 1 on q/k_proj.

    Every other parameter (embeddings, the head, norms, biases) is left exactly as it was. Returns the model.
    """
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta!r}")
    return init_branches_(model, beta, qk_gain=1.0)


def deepnet(config: TransformerConfig, **parts) -> Transformer:
    """A decoder-only DeepNet built from parts: the core Transformer (N = config.n_layers blocks, `parts` passed
    on) with every residual a DeepNorm, LN(alpha x + G(x)), and no final norm (Post-LN: each block ends with its
    LayerNorm); then `deepnorm_init_` with beta. alpha = (2N)^(1/4), beta = (8N)^(-1/4)."""
    # BEGIN EXERCISE 4.4: a DeepNet built from parts
    alpha, beta = deepnorm_constants(decoder_layers=config.n_layers)["decoder"]
    model = Transformer(config, residual=partial(DeepNorm, alpha=alpha), final_norm=None, **parts)
    return deepnorm_init_(model, beta)
    # END EXERCISE


def deepnet_encoder_decoder(config: TransformerConfig, encoder_layers: int, **parts) -> EncoderDecoder:
    """An encoder-decoder DeepNet: N = encoder_layers, M = config.n_layers; each side gets its own row of the
    table, alpha in its residual and beta in its init (the decoder's cross-attention v/out included)."""
    constants = deepnorm_constants(encoder_layers, config.n_layers)
    (enc_alpha, enc_beta), (dec_alpha, dec_beta) = constants["encoder"], constants["decoder"]
    model = EncoderDecoder(config, encoder_layers=encoder_layers, encoder_residual=partial(DeepNorm, alpha=enc_alpha),
                           decoder_residual=partial(DeepNorm, alpha=dec_alpha), final_norm=None, **parts)
    deepnorm_init_(model.encoder, enc_beta)
    deepnorm_init_(model.decoder, dec_beta)
    return model


def deepnorm_bound(layers: int, alpha: float, beta: float) -> float:
    """2N (v^2 + w^2) / alpha^2 with v = w = beta: the update bound, exactly 1 for the paper's constants."""
    return 2 * layers * 2 * beta ** 2 / alpha ** 2


__all__ = ["DeepNorm", "deepnet", "deepnet_encoder_decoder", "deepnorm", "deepnorm_bound", "deepnorm_constants", "deepnorm_init_"]
