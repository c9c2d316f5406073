"""LongNet dilated attention: sparse attention whose cost is linear in the sequence length (arXiv 2307.02486).

One pattern (w, r) = (segment length, dilation rate) splits the sequence into segments of w tokens and, in each
segment, keeps every r-th row starting at offset s (head j uses s_j = j mod r):

    Q~_i = [Q_{iw+s}, Q_{iw+s+r}, Q_{iw+s+2r}, ...]         (the same rows of K and V)
    O~_i = softmax(Q~_i K~_i^T / sqrt(d)) V~_i              dense attention among the kept rows only
    O|(w, r)  = O~_i scattered back to its rows, 0 on every row the pattern does not keep

Several patterns are mixed per query with weights from each pattern's softmax denominator Z_i:

    O = sum_i alpha_i O|(w_i, r_i),    alpha_i = Z_i / sum_j Z_j = softmax_i(LSE_i),    LSE_i = log Z_i

This is exactly dense attention over the multiset union of the keys the patterns give a query, i.e. dense
softmax attention with the additive bias log count(q, k) (-inf where no pattern pairs q with k). Cost per pattern:
(T/w) segments x (w/r)^2 scores = T w / r^2, linear in T. LongNet's geometric configuration w_i = w0 a^i,
r_i = a^i bounds the sum by T w0 a / (a - 1).

Names: `segment_lengths` are the paper's w, `dilation_rates` its r, `offsets` its s_j; q, k, v are (B, H, T, D).
T need not be a multiple of w: the last segment is shorter, and the keys padded onto it never receive weight.

Paper vs official code (microsoft/torchscale @ 4d1e0e8, torchscale/component/dilated_attention.py), all five
reproduced by `torchscale_dilated_attention` below: (1) offsets are implicit there: a diagonal trick over the
heads padded to a multiple of r gives head j the offset j // ceil(H / r) (`torchscale_head_offsets`), so for
H = 6, r = 4 the heads get [0, 0, 1, 1, 2, 2] and offset 3 is never queried although H >= r; this file uses
j mod r. (2) With H < r offsets H..r-1 are never queried here either; a query kept by no pattern gets 0. (3)
torchscale computes alpha under torch.no_grad(): the forward is exact but the backward is not the gradient of
the combined attention; here alpha is differentiable unless `detach_weights=True`. (4) Padding: torchscale cuts
a segment to min(w, T), zero-pads the sequence to a multiple of that and each segment to a multiple of r, with no
key mask: in bidirectional use zero keys (score 0) take attention mass only where w < T does not divide T or r
does not divide min(w, T); a pattern with w >= T and r | T is never padded. Segments padded to a multiple of r
are laid end to end at that length, so later rows shift (w = 10, r = 3, T = 20: rows 12-19 carry rows 10-17's
results). Here padded keys are masked and r must divide w. (5) torchscale runs only on a GPU (flash-attn or
xformers); this file is plain PyTorch and runs anywhere.
"""

import math
from functools import partial
from typing import Optional, Sequence

import torch
import torch.nn as nn

from nanomodels.attention import MultiHeadAttention


def check_patterns(segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> tuple:
    """Validate the patterns and return them as tuples of ints: w_i >= 1, r_i >= 1, r_i divides w_i."""
    segment_lengths, dilation_rates = tuple(segment_lengths), tuple(dilation_rates)
    if not segment_lengths or len(segment_lengths) != len(dilation_rates):
        raise ValueError(f"segment_lengths, dilation_rates: need the same number (>= 1) of each, got "
                         f"{len(segment_lengths)} and {len(dilation_rates)}")
    for name, values in (("segment_lengths", segment_lengths), ("dilation_rates", dilation_rates)):
        for value in values:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: every entry must be a positive integer, got {value!r}")
    for w, r in zip(segment_lengths, dilation_rates):
        if w % r:
            raise ValueError(f"dilation_rates: r must divide its segment length w, got w={w}, r={r}")
    return segment_lengths, dilation_rates


def geometric_patterns(w0: int, a: int, n_patterns: int) -> tuple:
    """LongNet's geometric configuration: segment lengths w0 a^i and dilation rates a^i, i = 0 .. n_patterns - 1."""
    for name, value, low in (("w0", w0, 1), ("a", a, 2), ("n_patterns", n_patterns, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}: must be an integer >= {low}, got {value!r}")
    return tuple(w0 * a ** i for i in range(n_patterns)), tuple(a ** i for i in range(n_patterns))


def head_offsets(n_heads: int, r: int) -> torch.Tensor:
    """s_j = j mod r for heads j = 0 .. n_heads - 1: the row (mod r) within each segment that head j keeps."""
    # BEGIN EXERCISE 6.1: the paper's head offsets
    return torch.arange(n_heads) % r
    # END EXERCISE


def num_score_entries(T: int, segment_lengths: Sequence[int], dilation_rates: Sequence[int]) -> int:
    """Score entries one head computes: sum_i ceil(T / w_i) (w_i / r_i)^2 (a full last segment is counted)."""
    segment_lengths, dilation_rates = check_patterns(segment_lengths, dilation_rates)
    return sum(-(-T // w) * (w // r) ** 2 for w, r in zip(segment_lengths, dilation_rates))


def dilated_branch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, w: int, r: int, *,
                   causal: bool = False) -> tuple:
    """One pattern (w, r): (O|(w, r), LSE), shapes (B, H, T, D) and (B, H, T); rows it does not keep: 0 and -inf."""
    B, H, T, D = q.shape
    n, m = -(-T // w), w // r  # segments (the last one may be short) and kept rows per segment
    pad = n * w - T
    s = head_offsets(H, r).to(q.device)
    heads = torch.arange(H, device=q.device)

    def keep_rows(x):  # (B, H, T, D) -> (B, H, n, m, D): in segment i, rows i*w + s_j + r*t
        x = torch.nn.functional.pad(x, (0, 0, 0, pad)) if pad else x
        if r == 1:
            return x.reshape(B, H, n, m, D)
        x = x.reshape(B, H, n, m, r, D)
        return x[:, heads, :, :, s].transpose(0, 1)  # advanced indices move H first: (H, B, n, m, D) -> (B, H, ...)

    # BEGIN EXERCISE 6.2: attention inside one pattern, with padded keys masked
    qs, ks, vs = keep_rows(q), keep_rows(k), keep_rows(v)  # (B, H, n, m, D)
    scores = (qs / math.sqrt(D)) @ ks.transpose(-2, -1)  # (B, H, n, m, m); scaling q is m times cheaper
    t = torch.arange(m, device=q.device)
    pos = torch.arange(n, device=q.device)[:, None] * w + s[:, None, None] + r * t  # (H, n, m) original positions
    allowed = (pos < T)[:, :, None, :]  # padded keys never receive weight
    if causal:
        allowed = allowed & (t[None, :] <= t[:, None])  # same offset in a segment: compressed order = original
    if causal or pad:
        scores.masked_fill_(~allowed, torch.finfo(scores.dtype).min)  # padded query rows stay finite
    top = scores.amax(dim=-1, keepdim=True).detach()  # any constant works: it cancels in O and in d LSE
    p = scores.sub_(top).exp_()  # in place: the (n, m, m) score tensor is the only large one
    total = p.sum(dim=-1, keepdim=True)
    out = (p @ vs) / total  # (B, H, n, m, D)
    lse = (top + torch.log(total)).squeeze(-1)  # (B, H, n, m)
    # END EXERCISE
    if r == 1:
        return out.reshape(B, H, n * w, D)[:, :, :T], lse.reshape(B, H, n * w)[:, :, :T]
    kept = torch.arange(r, device=q.device) == s[:, None]  # (H, r): the one row in each group of r that head j keeps
    out = torch.where(kept[None, :, None, None, :, None], out.unsqueeze(4), 0.0)  # (B, H, n, m, r, D)
    lse = torch.where(kept[None, :, None, None, :], lse.unsqueeze(4), -math.inf)  # (B, H, n, m, r)
    return out.reshape(B, H, n * w, D)[:, :, :T], lse.reshape(B, H, n * w)[:, :, :T]


def merge_by_lse(outs: Sequence[torch.Tensor], lses: Sequence[torch.Tensor], *,
                 detach_weights: bool = False) -> torch.Tensor:
    """sum_i alpha_i O_i with alpha = softmax over i of LSE_i (the split-KV / flash-decoding combine).

    outs: P tensors (..., T, D), lses: P tensors (..., T), as lists or stacked along a new first axis. A row
    with LSE = -inf in every input gets 0. With detach_weights, alpha is a constant in the backward pass
    (torchscale's no_grad mixing).
    """
    # BEGIN EXERCISE 6.3: the LSE merge
    lse = torch.stack(list(lses))  # (P, ..., T)
    if detach_weights:
        lse = lse.detach()
    top = lse.amax(dim=0)
    top = torch.where(torch.isfinite(top), top, 0.0)  # rows no input covers: exp(-inf - 0) = 0, no NaN
    z = torch.exp(lse - top)  # Z_i up to the common factor exp(top)
    total = z.sum(dim=0)
    alpha = z / torch.where(total > 0, total, 1.0)
    return sum(a.unsqueeze(-1) * o for a, o in zip(alpha, outs))
    # END EXERCISE


def dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
                      dilation_rates: Sequence[int], *, causal: bool = False,
                      detach_weights: bool = False) -> torch.Tensor:
    """LongNet dilated attention, q, k, v: (B, H, T, D) -> (B, H, T, D); causal hides later positions.

    O = sum_i alpha_i O|(w_i, r_i) over the patterns (w_i, r_i) = (segment_lengths[i], dilation_rates[i]), with
    alpha_i = softmax_i(LSE_i) per query: dense attention with the bias log count(q, k), at about T w_i / r_i^2
    scores per pattern and head. A query no pattern keeps gets 0; detach_weights makes alpha a constant in the
    backward pass."""
    segment_lengths, dilation_rates = check_patterns(segment_lengths, dilation_rates)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v: must all have the same shape (B, H, T, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    # BEGIN EXERCISE 6.5: dilated attention end to end
    branches = [dilated_branch(q, k, v, w, r, causal=causal) for w, r in zip(segment_lengths, dilation_rates)]
    return merge_by_lse([o for o, _ in branches], [lse for _, lse in branches], detach_weights=detach_weights)
    # END EXERCISE


def dilated_attention_fn(segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                         detach_weights: bool = False):
    """An attention-function part `fn(q, k, v, allowed=None, *, causal=False)` for fixed patterns."""
    segment_lengths, dilation_rates = check_patterns(segment_lengths, dilation_rates)

    def fn(q, k, v, allowed=None, *, causal=False):
        if allowed is not None:
            raise ValueError("allowed: dilated attention chooses its own keys; pass no mask (only causal)")
        return dilated_attention(q, k, v, segment_lengths, dilation_rates, causal=causal,
                                 detach_weights=detach_weights)

    return fn


class DilatedAttention(MultiHeadAttention):
    """Multi-head attention whose attention function is dilated attention: the LongNet attention sublayer.

    Built like every attention part, DilatedAttention(config, attn_fn=..., linear=..., segment_lengths=...,
    dilation_rates=...); the `attn_fn` the Transformer passes in is replaced. Decoding with a KV cache would
    query fewer rows than there are keys, which the segments do not define: generate with use_cache=False.
    """

    def __init__(self, config, *, attn_fn=None, linear: type = nn.Linear, segment_lengths: Sequence[int],
                 dilation_rates: Sequence[int], detach_weights: bool = False):
        self_attention = dilated_attention_fn(segment_lengths, dilation_rates, detach_weights=detach_weights)
        super().__init__(config, attn_fn=self_attention, linear=linear)
        self.segment_lengths, self.dilation_rates = check_patterns(segment_lengths, dilation_rates)

    def forward(self, x: torch.Tensor, allowed=None, causal: bool = False, cache: Optional[dict] = None,
                memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        if cache is not None:
            raise ValueError("cache: dilated attention recomputes the whole sequence; generate with use_cache=False")
        if memory is not None:
            raise ValueError("memory: dilated attention is self-attention; use MultiHeadAttention to cross-attend")
        return super().forward(x, allowed, causal)


def longnet(segment_lengths: Sequence[int], dilation_rates: Sequence[int], *, detach_weights: bool = False):
    """The attention part with these patterns: Transformer(config, attention=longnet(*geometric_patterns(64, 4, 3)))."""
    return partial(DilatedAttention, segment_lengths=segment_lengths, dilation_rates=dilation_rates,
                   detach_weights=detach_weights)


def torchscale_head_offsets(n_heads: int, r: int) -> torch.Tensor:
    """torchscale's offsets: head j keeps row j // ceil(H / r) (mod r) of each segment (heads padded to r)."""
    return torch.arange(n_heads) // -(-n_heads // r)


def torchscale_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, segment_lengths: Sequence[int],
                                 dilation_rates: Sequence[int], *, mask_padding: bool = False) -> torch.Tensor:
    """What torchscale's DilatedAttention computes, bidirectional, one process: (B, H, T, D) -> (B, H, T, D).

    Per pattern: segment length sl = min(w, T), the sequence zero-padded to a multiple of sl, each segment
    zero-padded to a multiple of r (g rows), head j keeps rows t r + j // ceil(H / r), attention over every kept
    row with no mask (mask_padding=True masks the padded ones), the segments' g rows laid end to end and cut to
    T, patterns mixed by alpha = softmax(LSE) under no_grad. For r dividing w and no padding this is
    `dilated_attention` with torchscale's offsets and `detach_weights=True`."""
    B, H, T, D = q.shape
    outs, lses = [], []
    for w, r in zip(segment_lengths, dilation_rates):
        sl = min(w, T)
        n, g = -(-T // sl), -(-sl // r) * r  # segments, and rows per segment once padded to a multiple of r
        m, s = g // r, torchscale_head_offsets(H, r).to(q.device)
        real = torch.arange(n * sl, device=q.device).view(n, sl) < T  # (n, sl): not sequence padding
        real = torch.nn.functional.pad(real, (0, g - sl)).view(n, m, r)[..., s].permute(2, 0, 1)  # (H, n, m)

        def kept(x):  # (B, H, T, D) -> (B, H, n, m, D)
            x = torch.nn.functional.pad(x, (0, 0, 0, n * sl - T)).view(B, H, n, sl, D)
            x = torch.nn.functional.pad(x, (0, 0, 0, g - sl)).view(B, H, n, m, r, D)
            return x[:, torch.arange(H, device=q.device), :, :, s].transpose(0, 1)

        qs, ks, vs = kept(q), kept(k), kept(v)
        scores = qs @ ks.transpose(-2, -1) / math.sqrt(D)  # (B, H, n, m, m)
        if mask_padding:
            scores = scores.masked_fill(~real[None, :, :, None, :], -math.inf)
        lse = torch.logsumexp(scores, dim=-1)  # (B, H, n, m)
        out = torch.softmax(scores, dim=-1) @ vs
        mine = torch.arange(r, device=q.device) == s[:, None]  # (H, r)
        out = torch.where(mine[None, :, None, None, :, None], out.unsqueeze(4), 0.0).reshape(B, H, n * g, D)
        lse = torch.where(mine[None, :, None, None, :], lse.unsqueeze(4), -math.inf).reshape(B, H, n * g)
        outs.append(out[:, :, :T])
        lses.append(lse[:, :, :T])
    return merge_by_lse(outs, lses, detach_weights=True)
