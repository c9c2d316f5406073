"""Scaled dot-product attention with an explicit boolean mask, and multi-head attention.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(d) + M) V,    M[i, j] = 0 if allowed[i, j] else -inf

`allowed` is a boolean tensor broadcastable to (B, H, Tq, Tk): True means query i may attend to key j.
Every idea of the UniLM line that changes *who sees whom* (bidirectional, left-to-right, seq2seq, pseudo
masks, dilated attention) is a different `allowed`; the rest of the Transformer never changes.

Two interchangeable attention functions follow the same signature `fn(q, k, v, allowed=None, *, causal=False)`:
  - `attention`: the readable reference, written out from the equation (float64-exact, any mask);
  - `sdpa_attention`: torch's fused scaled_dot_product_attention (the fast path; causal without an explicit
    mask when it can), which must agree with the reference (tests/test_attention.py checks it).
A kernel from kernels/ is a third drop-in. `causal=True` means key j is visible from query i when
j <= i + (Tk - Tq): the queries are the *last* Tq positions, which is what decoding with a KV cache needs.

A query row with no visible key (a fully masked row, e.g. a padding query) returns zeros, never NaN.
"""

import math
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

AttentionFn = Callable[..., torch.Tensor]


def causal_mask(n_queries: int, n_keys: Optional[int] = None, device=None) -> torch.Tensor:
    """Boolean (n_queries, n_keys) mask, True where key j <= query i + (n_keys - n_queries).

    With n_keys == n_queries (the default) this is the lower triangle including the diagonal: position i
    sees itself and the past. With n_keys > n_queries the queries are the last n_queries positions.
    """
    n_keys = n_queries if n_keys is None else n_keys
    if n_keys < n_queries:
        raise ValueError(f"causal_mask: n_keys ({n_keys}) must be >= n_queries ({n_queries})")
    # BEGIN EXERCISE 0.2: the causal mask
    query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
    key_pos = torch.arange(n_keys, device=device)[None, :]
    return key_pos <= query_pos
    # END EXERCISE


def _combine(allowed: Optional[torch.Tensor], causal: bool, tq: int, tk: int, device) -> Optional[torch.Tensor]:
    if causal:
        tri = causal_mask(tq, tk, device=device)
        return tri if allowed is None else allowed & tri
    return allowed


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor] = None,
              *, causal: bool = False) -> torch.Tensor:
    """softmax(q k^T / sqrt(D), masked to `allowed`) v.   q: (B, H, Tq, D), k, v: (B, H, Tk, D) -> (B, H, Tq, D).

    `allowed` is boolean, broadcastable to (B, H, Tq, Tk), True = may attend; None = every key is visible.
    `causal=True` additionally hides the future (see `causal_mask`). A row with no visible key gives zeros.
    """
    allowed = _combine(allowed, causal, q.size(-2), k.size(-2), q.device)
    # BEGIN EXERCISE 0.1: masked scaled dot-product attention
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if allowed is None:
        return torch.softmax(scores, dim=-1) @ v
    # the most negative finite number instead of -inf: a fully masked row stays finite (uniform), no NaN
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)  # fully masked row -> zeros
    return weights @ v
    # END EXERCISE


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                   *, causal: bool = False) -> torch.Tensor:
    """Same contract as `attention`, computed by torch's fused scaled_dot_product_attention."""
    tq, tk = q.size(-2), k.size(-2)
    if allowed is None and (not causal or tq == 1):  # one query at the end of the sequence sees every key
        return F.scaled_dot_product_attention(q, k, v)
    if allowed is None and tq == tk:  # the fused causal path: no mask tensor is built at all
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    allowed = _combine(allowed, causal, tq, tk, q.device)
    if not bool(allowed.any(dim=-1).all()):
        return attention(q, k, v, allowed)  # fully masked rows: SDPA would give NaN, the reference gives 0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


def as_4d_mask(allowed: Optional[torch.Tensor], tq: int, tk: int) -> Optional[torch.Tensor]:
    """Accept a mask of shape (Tq, Tk), (B, Tq, Tk) or (B, H, Tq, Tk); return it broadcastable to (B, H, Tq, Tk)."""
    if allowed is None:
        return None
    if allowed.dtype != torch.bool:
        raise TypeError(f"allowed: must be a boolean tensor (True = may attend), got dtype {allowed.dtype}")
    if allowed.dim() not in (2, 3, 4) or tuple(allowed.shape[-2:]) != (tq, tk):
        raise ValueError(f"allowed: expected shape (Tq, Tk), (B, Tq, Tk) or (B, H, Tq, Tk) with (Tq, Tk) = "
                         f"({tq}, {tk}), got {tuple(allowed.shape)}")
    return allowed[:, None] if allowed.dim() == 3 else allowed


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v/out projections (DeepNet and Sub-LN treat them differently).

    Built like every part of the core, `MultiHeadAttention(config, attn_fn=..., linear=...)`: `attn_fn` is the
    attention function part (`attention`, `sdpa_attention`, or a kernel), `linear` the linear layer class
    (nn.Linear, or BitLinear). Self-attention by default; with `memory` (B, S, C) the keys and values come from
    it (cross-attention: an encoder-decoder's decoder attending to the encoder's output). A `cache` dict, when
    given, holds this layer's past keys and values (for cross-attention: the memory's, computed once).
    `tap`, when set, is called with q, k, v (B, H, T, D) and the mask before attention: a read-only probe
    (nanomodels/minilm.py's capture_attention records a layer's heads for distillation with it).
    """

    def __init__(self, config, *, attn_fn: AttentionFn = sdpa_attention, linear: type = nn.Linear):
        super().__init__()
        self.n_heads, self.attn_fn = config.n_heads, attn_fn
        d, bias = config.d_model, config.bias
        self.q_proj = linear(d, d, bias=bias)
        self.k_proj = linear(d, d, bias=bias)
        self.v_proj = linear(d, d, bias=bias)
        self.out_proj = linear(d, d, bias=bias)
        self.dropout = nn.Dropout(config.dropout)
        self.tap = None

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        return x.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)  # (B, H, T, D)

    def attend(self, x: torch.Tensor, allowed=None, causal: bool = False, cache: Optional[dict] = None,
               memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Everything up to (not including) the output projection: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q = self.split_heads(self.q_proj(x))
        if memory is not None and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]  # cross-attention: the memory's keys and values do not change
        else:
            source = x if memory is None else memory
            k, v = self.split_heads(self.k_proj(source)), self.split_heads(self.v_proj(source))
            if cache is not None:
                if memory is None and "k" in cache:
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        allowed = as_4d_mask(allowed, T, k.size(2))
        if self.tap is not None:
            self.tap(q, k, v, allowed, causal)
        y = self.attn_fn(q, k, v, allowed, causal=causal)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, C)

    def forward(self, x: torch.Tensor, allowed=None, causal: bool = False, cache: Optional[dict] = None,
                memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self.dropout(self.out_proj(self.attend(x, allowed, causal, cache, memory)))
