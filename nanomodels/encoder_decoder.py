"""The encoder-decoder assembly of the core's parts: an encoder (bidirectional self-attention) and a decoder
(causal self-attention, cross-attention over the encoder's output, feed-forward), sharing one embedding.

It is the model the encoder-decoder rows of DeepNet's and Sub-LN's tables are for: `deepnet_encoder_decoder` and
`magneto_encoder_decoder` build it with one residual scheme and one init gain per side.
"""

from typing import Optional

import torch
import torch.nn as nn

from nanomodels.attention import MultiHeadAttention, sdpa_attention
from nanomodels.transformer import (MLP, Block, LMHead, PreNorm, TokenEmbedding, TransformerConfig, _check_sampling,
                                    _Model, gpt2_init_, layer_norm, sample_next_token)


class EncoderDecoder(_Model):
    """An encoder (bidirectional, `encoder_layers` blocks) and a decoder (causal self-attention, cross-attention
    over the encoder's output, config.n_layers blocks), sharing one embedding; the head reads the decoder.

    The residual scheme is chosen per side (DeepNorm's alpha and Sub-LN's gamma differ between the encoder and
    the decoder of an encoder-decoder model); `residual` sets both when the sides agree.
    """

    def __init__(self, config: TransformerConfig, *, encoder_layers: int, embed=TokenEmbedding,
                 attention_fn=sdpa_attention, attention=MultiHeadAttention, cross_attention=None, ffn=MLP,
                 residual=PreNorm, encoder_residual=None, decoder_residual=None, final_norm=layer_norm,
                 linear: type = nn.Linear, head=LMHead, head_linear: type = nn.Linear):
        super().__init__()
        if not isinstance(encoder_layers, int) or isinstance(encoder_layers, bool) or encoder_layers < 1:
            raise ValueError(f"encoder_layers: must be a positive integer, got {encoder_layers!r}")
        self.config, self.encoder_layers = config, encoder_layers
        self.embed = embed(config)
        parts = dict(attention_fn=attention_fn, attention=attention, ffn=ffn, linear=linear)
        self.encoder = nn.ModuleList(Block(config, residual=encoder_residual or residual, **parts)
                                     for _ in range(encoder_layers))
        self.decoder = nn.ModuleList(Block(config, residual=decoder_residual or residual,
                                           cross_attention=cross_attention or attention, **parts)
                                     for _ in range(config.n_layers))
        self.encoder_norm = final_norm(config) if final_norm is not None else nn.Identity()
        self.final_norm = final_norm(config) if final_norm is not None else nn.Identity()
        self.head = head(config, linear=head_linear)
        gpt2_init_(self, encoder_layers + config.n_layers)
        self._tie()

    def encode(self, src, *, src_keep=None):
        """The encoder's output (B, S, d): bidirectional attention; `src_keep` (B, S) bool hides padded keys."""
        x = self.embed(src, self._positions(src.shape[1], 0, None, src.device))
        allowed = None if src_keep is None else _keys(src_keep, src.shape[1])
        for block in self.encoder:
            x = block(x, allowed, False)
        return self.encoder_norm(x)

    def decode(self, tgt, memory, *, src_keep=None, cache=None):
        """The decoder's hidden states (B, T, d) for target inputs `tgt`, attending to `memory` (B, S, d)."""
        past = cache[0]["k"].size(2) if cache and "k" in cache[0] else 0
        x = self.embed(tgt, self._positions(tgt.shape[1], past, None, tgt.device))
        memory_allowed = None if src_keep is None else _keys(src_keep, tgt.shape[1])
        for i, block in enumerate(self.decoder):
            x = block(x, None, True, None if cache is None else cache[i], memory, memory_allowed)
        return self.final_norm(x)

    def forward(self, src, tgt, targets=None, *, src_keep=None):
        """src (B, S), tgt (B, T) -> (head outputs for every target position, loss or None).

        `src_keep` (B, S) bool: False marks source padding, which no query (encoder or decoder) attends to."""
        if src_keep is not None and (src_keep.dtype != torch.bool or src_keep.shape != src.shape):
            raise ValueError(f"src_keep: expected a boolean tensor of shape {tuple(src.shape)}")
        memory = self.encode(src, src_keep=src_keep)
        h = self.decode(tgt, memory, src_keep=src_keep)
        outputs = self.head(h)
        return outputs, (None if targets is None else self._loss(h, targets, outputs))

    @torch.no_grad()
    def generate(self, src, bos: int, max_new_tokens: int, *, src_keep=None, temperature: float = 0.0,
                 top_k: Optional[int] = None, generator: Optional[torch.Generator] = None):
        """Decode max_new_tokens after a `bos` token, with a KV cache (self and cross): (B, 1 + max_new_tokens)."""
        _check_sampling(max_new_tokens, temperature, top_k)
        if 1 + max_new_tokens > self.config.block_size:
            raise ValueError(f"max_new_tokens: 1 + {max_new_tokens} exceeds block_size {self.config.block_size}")
        memory = self.encode(src, src_keep=src_keep)
        out = torch.full((src.size(0), 1), bos, dtype=torch.long, device=src.device)
        cache = [{} for _ in self.decoder]
        for _ in range(max_new_tokens):
            logits = self.head(self.decode(out[:, -1:], memory, src_keep=src_keep, cache=cache))
            out = torch.cat([out, sample_next_token(logits[:, -1, :], temperature, top_k, generator)], dim=1)
        return out


def _keys(keep: torch.Tensor, n_queries: int) -> torch.Tensor:
    """(B, S) key mask -> (B, n_queries, S): every query sees the kept keys."""
    return keep[:, None, :].expand(keep.size(0), n_queries, keep.size(1))
