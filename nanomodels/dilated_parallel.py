"""LongNet's distributed algorithm: dilated attention with the sequence split across processes (arXiv 2307.02486 §3).

Each of P ranks holds one contiguous chunk of L = T / P positions (its q, k, v: (B, H, L, D)). For a pattern (w, r):

    w <= L   the chunk holds whole segments: the pattern is computed locally, no communication
    w >  L   a segment spans G = w / L consecutive ranks: each rank sparsifies its own keys and values first
             (the L / r rows of each head's offset), the G ranks of a segment all-gather those, and each rank
             attends with its own sparsified queries to the gathered w / r keys

A rank receives (G - 1) L / r rows of K and of V per head, under w / r whatever P and T are: the communication of
a rank is bounded by sum over the long patterns of 2 (w / r) H D elements, constant in T (LongNet's claim).
The patterns are then merged by LSE exactly as on one process, so outputs and gradients equal the single-process
`dilated_attention` on the whole sequence (tests/test_dilated_parallel.py runs 2 processes over gloo).

Paper vs official code (microsoft/torchscale @ 4d1e0e8, `gather_kv` in dilated_attention.py): the same
all-gather of the sparsified K/V; its mixing weights are detached (see nanomodels/dilated.py), here they are not.
"""

import math
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from nanomodels.dilated import check_patterns, dilated_branch, head_offsets, merge_by_lse

_GROUPS = {}


class _GatherInGroup(torch.autograd.Function):
    """all_gather along the time axis inside a process group; backward: the summed gradient of one's own slice."""

    @staticmethod
    def forward(ctx, x, group, stats):
        size = dist.get_world_size(group)
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x.contiguous(), group=group)
        ctx.group, ctx.index, ctx.n = group, dist.get_rank(group), x.size(2)
        if stats is not None:
            stats["bytes_received"] = stats.get("bytes_received", 0) + (size - 1) * x.numel() * x.element_size()
        return torch.cat(parts, dim=2)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)  # every rank's output used this rank's rows
        return grad[:, :, ctx.index * ctx.n:(ctx.index + 1) * ctx.n], None, None


def _segment_group(rank: int, world: int, ranks_per_segment: int):
    """The process group of the ranks sharing rank's segment; every rank creates every group, in one order."""
    mine = None
    for first in range(0, world, ranks_per_segment):
        ranks = tuple(range(first, min(first + ranks_per_segment, world)))
        if ranks not in _GROUPS:
            _GROUPS[ranks] = dist.new_group(list(ranks))
        if rank in ranks:
            mine = (_GROUPS[ranks], rank - first)
    return mine


def _long_branch(q, k, v, w, r, causal, stats):
    """A pattern whose segments span several ranks: sparsify locally, all-gather K~ and V~ in the segment."""
    B, H, L, D = q.shape
    s = head_offsets(H, r).to(q.device)
    heads = torch.arange(H, device=q.device)

    def keep_rows(x):  # (B, H, L, D) -> (B, H, L/r, D): the rows of each head's offset (r divides L)
        return x.reshape(B, H, L // r, r, D)[:, heads, :, s].transpose(0, 1)

    group, index = _segment_group(dist.get_rank(), dist.get_world_size(), w // L)
    qs = keep_rows(q)
    ks, vs = (_GatherInGroup.apply(keep_rows(x), group, stats) for x in (k, v))  # (B, H, G L/r, D)
    scores = (qs / math.sqrt(D)) @ ks.transpose(-2, -1)  # (B, H, L/r, G L/r)
    if causal:
        q_idx = index * (L // r) + torch.arange(L // r, device=q.device)  # compressed index in the segment
        later = torch.arange(ks.size(2), device=q.device)[None, :] > q_idx[:, None]
        scores = scores.masked_fill(later, -math.inf)  # every query keeps itself: no row is fully masked
    lse = torch.logsumexp(scores, dim=-1)  # (B, H, L/r)
    out = torch.softmax(scores, dim=-1) @ vs  # (B, H, L/r, D)
    kept = torch.arange(r, device=q.device) == s[:, None]  # (H, r)
    out = torch.where(kept[None, :, None, :, None], out.unsqueeze(3), 0.0)  # (B, H, L/r, r, D)
    lse = torch.where(kept[None, :, None, :], lse.unsqueeze(3), -math.inf)  # (B, H, L/r, r)
    return out.reshape(B, H, L, D), lse.reshape(B, H, L)


def sequence_parallel_dilated_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                        segment_lengths: Sequence[int], dilation_rates: Sequence[int], *,
                                        causal: bool = False, stats: Optional[dict] = None) -> torch.Tensor:
    """This rank's chunk of dilated attention over the whole sequence; q, k, v: (B, H, L, D), rank i holding
    positions [i L, (i + 1) L) of T = world_size L. `stats`, when given, accumulates "bytes_received"."""
    segment_lengths, dilation_rates = check_patterns(segment_lengths, dilation_rates)
    if q.dim() != 4 or q.shape != k.shape or q.shape != v.shape:
        raise ValueError(f"q, k, v: must all have the same shape (B, H, L, D), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    L = q.size(2)
    for w, r in zip(segment_lengths, dilation_rates):
        if (w <= L and L % w) or (w > L and (w % L or L % r)):
            raise ValueError(f"segment_lengths: each w must divide the chunk length L={L} or be a multiple of it "
                             f"(and then r must divide L), got w={w}, r={r}")
    if not dist.is_initialized():
        raise ValueError("torch.distributed: init_process_group must run first (gloo on CPU, nccl on GPU)")
    branches = [dilated_branch(q, k, v, w, r, causal=causal) if w <= L else _long_branch(q, k, v, w, r, causal, stats)
                for w, r in zip(segment_lengths, dilation_rates)]
    return merge_by_lse([o for o, _ in branches], [lse for _, lse in branches])
