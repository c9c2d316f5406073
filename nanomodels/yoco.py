"""YOCO, "You Only Cache Once" (Sun et al. 2024, arXiv 2405.05254): a decoder-decoder that caches key-values once.

A Transformer decoder caches keys and values in every layer: L layers, L caches growing with the context. YOCO
splits the L layers in two halves:

    self-decoder   n_self_layers layers of *efficient* self-attention, whose cache does not grow with the context:
                   gated retention (a (Dk, Dv) state per head) or sliding-window attention (the last `window` keys)
    global KV      K, V = k_proj(RMSNorm(x)), v_proj(RMSNorm(x)) from the self-decoder's output x: ONE cache
    cross-decoder  n_cross_layers layers of causal cross-attention onto that one K, V (each layer its own q and
                   out projections, no keys or values of its own)

so the cache is one layer's K, V plus the self-decoder's constant-size state, whatever n_cross_layers is. Since
the cross-decoder needs only K, V, prefill can exit early: the prompt runs through the self-decoder and the
global KV, and only its last position runs through the cross-decoder (it gives the first new token's logits).

Gated retention (the gRet of the paper, multi-head): `GatedRetention` in nanomodels/gated_retention.py.
Sliding-window attention: query n sees keys m with n - window < m <= n (`window` positions, itself included).

The rest are the core's parts (nanomodels/transformer.py): token + learned position embeddings, Pre-LN residuals
around every mixer and MLP, a final LayerNorm, the tied LM head, GPT-2's init.

Layer split (YOCOConfig): with neither n_self_layers nor n_cross_layers given, n_layers is split in halves (the
paper's L/2 + L/2) and an odd n_layers is a ValueError; given one, the other is n_layers minus it (or equal to it
when n_layers is None); given both, n_layers defaults to their sum and must equal it.

Paper vs official code (microsoft/unilm YOCO/yoco/models/decoder/, read at 7402b0e): the official model has no
position embeddings and rotates q and k (interleaved RoPE) in the self-decoder and the cross-decoder's q and
global K; RMSNorm everywhere; a SwiGLU FFN; no biases; grouped key-value heads in the cross-decoder. Here the
core's learned positions, LayerNorm and GELU MLP stand in, so that YOCO differs from the core Transformer only in
its mixers and the global KV.
Its `skip_cross_decoder` prefill returns zeros of shape (B, 1, d) in place of the cross-decoder's output; here
prefill runs the last prompt position through the cross-decoder and returns its logits.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

from nanomodels.attention import MultiHeadAttention, sdpa_attention
from nanomodels.gated_retention import (GatedRetention, gated_retention, gated_retention_chunkwise,
                                       gated_retention_recurrent)
from nanomodels.transformer import (MLP, LMHead, PreNorm, TokenEmbedding, TransformerConfig, _check_sampling, _Model,
                                    gpt2_init_, layer_norm, sample_next_token)

__all__ = ["gated_retention", "gated_retention_recurrent", "gated_retention_chunkwise", "sliding_window_mask",
           "GatedRetention", "SlidingWindowAttention", "CrossAttention", "shared_kv_cross_decoder", "yoco_prefill",
           "YOCOConfig", "YOCO"]

SELF_ATTENTIONS = ("gated_retention", "sliding_window")


def _positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive integer, got {value!r}")


@dataclass
class YOCOConfig(TransformerConfig):
    n_layers: Optional[int] = None  # L = n_self_layers + n_cross_layers; None = their sum (4 if neither is given)
    n_self_layers: Optional[int] = None  # self-decoder depth; None = L/2
    n_cross_layers: Optional[int] = None  # cross-decoder depth; None = L/2
    self_attention: str = "gated_retention"  # the self-decoder's mixer: "gated_retention" or "sliding_window"
    window: int = 32  # sliding window: each query sees this many positions (itself included)
    chunk_size: int = 64  # gated retention's chunkwise form in forward and prefill

    def __post_init__(self):
        n_self, n_cross, L = self.n_self_layers, self.n_cross_layers, self.n_layers
        for name in ("n_self_layers", "n_cross_layers"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if L is not None:
            _positive_int("n_layers", L)
        if n_self is None and n_cross is None:
            L = 4 if L is None else L
            if L % 2:
                raise ValueError(f"n_layers: an odd n_layers ({L}) has no L/2 + L/2 split; make it even or give "
                                 "n_self_layers and n_cross_layers")
            n_self = n_cross = L // 2
        elif n_self is None or n_cross is None:
            given = n_self if n_cross is None else n_cross
            other = given if L is None else L - given
            name = "n_cross_layers" if n_cross is None else "n_self_layers"
            if other < 1:
                raise ValueError(f"{name}: n_layers ({L}) minus the other half ({given}) leaves {other} layers; "
                                 "each half needs at least one")
            n_self, n_cross = (given, other) if n_cross is None else (other, given)
        elif L is not None and L != n_self + n_cross:
            raise ValueError(f"n_layers: must equal n_self_layers + n_cross_layers = {n_self + n_cross}, got {L}")
        self.n_self_layers, self.n_cross_layers, self.n_layers = n_self, n_cross, n_self + n_cross
        if self.self_attention not in SELF_ATTENTIONS:
            raise ValueError(f"self_attention: must be one of {SELF_ATTENTIONS}, got {self.self_attention!r}")
        _positive_int("window", self.window)
        _positive_int("chunk_size", self.chunk_size)
        super().__post_init__()


def sliding_window_mask(n_queries: int, window: int, n_keys: Optional[int] = None, device=None) -> torch.Tensor:
    """Boolean (n_queries, n_keys): query i (at position i + n_keys - n_queries) sees key j when
    position - window < j <= position, i.e. the last `window` positions up to itself."""
    n_keys = n_queries if n_keys is None else n_keys
    position = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
    key = torch.arange(n_keys, device=device)[None, :]
    return (key <= position) & (key > position - window)


class SlidingWindowAttention(MultiHeadAttention):
    """Causal attention over the last `window` positions; the cache keeps only those positions' keys and values."""

    def __init__(self, config: YOCOConfig, *, attn_fn=sdpa_attention, linear: type = nn.Linear):
        super().__init__(config, attn_fn=attn_fn, linear=linear)
        self.window = config.window

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        past = cache["k"].size(2) if cache is not None and "k" in cache else 0
        allowed = sliding_window_mask(x.size(1), self.window, past + x.size(1), device=x.device)
        y = self.attend(x, allowed, False, cache)
        if cache is not None:  # the next query needs at most the last window - 1 of these, plus itself
            cache["k"], cache["v"] = cache["k"][:, :, -self.window:], cache["v"][:, :, -self.window:]
        return self.dropout(self.out_proj(y))


class CrossAttention(nn.Module):
    """Causal attention from this layer's queries onto the global K, V (B, H, Tk, D); queries are the last Tq."""

    def __init__(self, config: YOCOConfig, *, attn_fn=sdpa_attention, linear: type = nn.Linear):
        super().__init__()
        self.n_heads, self.attn_fn = config.n_heads, attn_fn
        self.q_proj = linear(config.d_model, config.d_model, bias=config.bias)
        self.out_proj = linear(config.d_model, config.d_model, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, -1).transpose(1, 2)  # (B, H, T, D)
        y = self.attn_fn(q, k, v, causal=True)  # query i sees keys j <= i + (Tk - T)
        return self.dropout(self.out_proj(y.transpose(1, 2).reshape(B, T, C)))


class Layer(nn.Module):
    """x + mixer(LN(x)), then x + MLP(LN(x)): a core Pre-LN block around any mixer."""

    def __init__(self, config: YOCOConfig, mixer: nn.Module, *, linear: type = nn.Linear):
        super().__init__()
        self.mixer, self.mixer_residual = mixer, PreNorm(config)
        self.ffn, self.ffn_residual = MLP(config, linear=linear), PreNorm(config)

    def forward(self, x, **mixer_args):
        x = self.mixer_residual(x, lambda h: self.mixer(h, **mixer_args))
        return self.ffn_residual(x, self.ffn)


def shared_kv_cross_decoder(x: torch.Tensor, kv_norm: nn.Module, k_proj: nn.Module, v_proj: nn.Module,
                            layers, n_heads: int, n_queries: Optional[int] = None,
                            past_kv: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                            ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The cross-decoder over the self-decoder's output x (B, T, d), with ONE global K, V for all its layers.

    K = k_proj(kv_norm(x)) and V = v_proj(kv_norm(x)), split into n_heads heads (B, n_heads, T, d / n_heads);
    past_kv, the (K, V) of earlier positions (B, n_heads, T_past, d / n_heads), goes before them. The last
    n_queries positions of x (all when None) run through `layers` in order, each called as layer(h, k=K, v=V)
    with that one K, V (a cross layer has its own queries, no keys or values of its own).
    Returns (h (B, n_queries, d), (K, V)), K and V covering the past and all T positions."""
    T = x.size(1)
    n_queries = T if n_queries is None else n_queries
    if not isinstance(n_queries, int) or isinstance(n_queries, bool) or not 1 <= n_queries <= T:
        raise ValueError(f"n_queries: must be an integer in [1, T = {T}] or None, got {n_queries!r}")
    want = (x.size(0), n_heads, x.size(-1) // n_heads)  # (B, H, D) of every K, V
    if past_kv is not None and (len(past_kv) != 2 or any(t.dim() != 4 or (*t.shape[:2], t.size(3)) != want
                                                         for t in past_kv)):
        raise ValueError(f"past_kv: must be (K, V), each of shape (B, n_heads, T_past, d / n_heads) with "
                         f"(B, n_heads, d / n_heads) = {want}")
    # BEGIN EXERCISE 11.2: the shared-KV cross-decoder
    B, T, C = x.shape
    h = kv_norm(x)
    k, v = (p(h).view(B, T, n_heads, C // n_heads).transpose(1, 2) for p in (k_proj, v_proj))
    if past_kv is not None:
        k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
    h = x[:, T - n_queries:]
    for layer in layers:
        h = layer(h, k=k, v=v)
    return h, (k, v)
    # END EXERCISE


class YOCO(_Model):
    """The decoder-decoder. forward(idx) -> logits (B, T, V); prefill/step decode with one global KV cache.

    A cache is a dict: "pos" (tokens seen), "self" (one dict per self-decoder layer: gated retention's "state",
    or the sliding window's "k", "v"), and the global "k", "v" (B, H, T, D). `step` returns a new cache and
    leaves the one it was given unchanged."""

    def __init__(self, config: YOCOConfig, *, attention_fn=sdpa_attention, linear: type = nn.Linear):
        super().__init__()
        if not isinstance(config, YOCOConfig):
            raise ValueError(f"config: must be a YOCOConfig, got {type(config).__name__}")
        self.config = config
        self.embed = TokenEmbedding(config)
        mixer = {"gated_retention": lambda: GatedRetention(config, linear=linear),
                 "sliding_window": lambda: SlidingWindowAttention(config, attn_fn=attention_fn, linear=linear),
                 }[config.self_attention]
        self.self_layers = nn.ModuleList(Layer(config, mixer(), linear=linear) for _ in range(config.n_self_layers))
        d = config.d_model
        self.kv_norm = nn.RMSNorm(d, eps=1e-5)
        self.k_proj, self.v_proj = linear(d, d, bias=config.bias), linear(d, d, bias=config.bias)
        self.cross_layers = nn.ModuleList(
            Layer(config, CrossAttention(config, attn_fn=attention_fn, linear=linear), linear=linear)
            for _ in range(config.n_cross_layers))
        self.final_norm = layer_norm(config)
        self.head = LMHead(config)
        gpt2_init_(self, config.n_layers)
        self._tie()

    def _self_decode(self, idx, past, caches):
        if idx.dim() != 2:
            raise ValueError(f"idx: expected token ids of shape (B, T), got {tuple(idx.shape)}")
        positions = self._positions(idx.size(1), past, None, idx.device)
        x = self.embed(idx, positions)
        for i, layer in enumerate(self.self_layers):
            x = layer(x, cache=None if caches is None else caches[i])
        return x

    def _cross_decode(self, x, n_queries=None, past_kv=None):
        h, kv = shared_kv_cross_decoder(x, self.kv_norm, self.k_proj, self.v_proj, self.cross_layers,
                                        self.config.n_heads, n_queries, past_kv)
        return self.head(self.final_norm(h)), kv

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None):
        """Token ids (B, T) -> logits (B, T, V); with targets (B, T), (logits, loss) as the core Transformer gives
        (the head's cross-entropy), which is what the trainer calls."""
        logits, _ = self._cross_decode(self._self_decode(idx, 0, None))
        return logits if targets is None else (logits, self.head.loss(None, targets, logits))

    def prefill(self, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """The prompt (B, T) -> (logits of its last position (B, V), cache); the cross-decoder sees one position."""
        return yoco_prefill(self, idx)

    def step(self, idx_t: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        """One new token (B, 1) after the cached ones -> (its logits (B, V), the new cache)."""
        B = cache["k"].size(0)
        if idx_t.dim() != 2 or tuple(idx_t.shape) != (B, 1):
            raise ValueError(f"idx_t: expected one token per sequence, shape ({B}, 1), got {tuple(idx_t.shape)}")
        caches = [dict(c) for c in cache["self"]]  # the mixers replace entries; the given cache stays valid
        x = self._self_decode(idx_t, cache["pos"], caches)
        logits, (k, v) = self._cross_decode(x, past_kv=(cache["k"], cache["v"]))
        return logits[:, -1], {"pos": cache["pos"] + 1, "self": caches, "k": k, "v": v}

    @torch.no_grad()
    def generate(self, idx, max_new_tokens: int, *, temperature: float = 1.0, top_k: Optional[int] = None,
                 generator: Optional[torch.Generator] = None, use_cache: bool = True):
        """Extend idx (B, T) by max_new_tokens sampled tokens, like Transformer.generate: prefill once, then one
        `step` per token (use_cache), or a full forward per token; past block_size the window slides and the
        last block_size tokens are prefilled again."""
        _check_sampling(max_new_tokens, temperature, top_k)
        block, cache = self.config.block_size, None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits = self(idx[:, -block:])[:, -1]
            elif cache is None or cache["pos"] >= block:
                logits, cache = self.prefill(idx[:, -block:])
            else:
                logits, cache = self.step(idx[:, -1:], cache)
            idx = torch.cat([idx, sample_next_token(logits, temperature, top_k, generator)], dim=1)
        return idx

    @staticmethod
    def cache_nbytes(cache: dict) -> int:
        """Bytes held by the cache's tensors: the global K, V and every self-decoder layer's state."""
        tensors = [cache["k"], cache["v"]] + [t for c in cache["self"] for t in c.values()]
        return sum(t.numel() * t.element_size() for t in tensors)


def yoco_prefill(model: YOCO, idx: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """YOCO.prefill: the prompt idx (B, T) -> (logits of its last position (B, V), the cache to decode from).

    The self-decoder runs over the whole prompt, filling one cache dict per self layer
    (model._self_decode(idx, past=0, caches)); the global K, V cover every prompt position; the cross-decoder
    and the head run for the LAST position only, the early exit (model._cross_decode(x, n_queries, past_kv) ->
    (logits (B, n_queries, V), (K, V))). The cache: {"pos": T, "self": the per-layer dicts, "k": K, "v": V}."""
    if idx.dim() != 2 or idx.size(1) < 1:
        raise ValueError(f"idx: expected a prompt of shape (B, T) with T >= 1, got {tuple(idx.shape)}")
    # BEGIN EXERCISE 11.3: the early-exit prefill
    caches = [{} for _ in model.self_layers]
    x = model._self_decode(idx, 0, caches)
    logits, (k, v) = model._cross_decode(x, 1)  # the early exit: one query position
    return logits[:, -1], {"pos": idx.size(1), "self": caches, "k": k, "v": v}
    # END EXERCISE
