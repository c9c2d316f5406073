"""Expert parallelism for the MoE layer: the E experts are split over the ranks of the default process group
(E / world each) and the (E, C, d) expert buffers are exchanged with all_to_all, there and back."""

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    """all_to_all over equal chunks of dim 0; its own transpose, so the backward is the same exchange."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.contiguous()  # a gradient may arrive strided; the exchange reads and writes flat buffers
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        return _AllToAll.apply(grad, ctx.group), None


def run_experts_parallel(experts, expert_in: torch.Tensor) -> torch.Tensor:
    """(E, C, d) -> (E, C, d) across ranks: this rank runs its local experts on every rank's buffers for them."""
    E, C, d = expert_in.shape
    local = len(experts)
    world = E // local
    received = _AllToAll.apply(expert_in, None).view(world, local, C, d)  # from every rank, my experts
    received = received.transpose(0, 1).reshape(local, world * C, d)
    out = torch.stack([expert(xe) for expert, xe in zip(experts, received)])
    out = out.view(local, world, C, d).transpose(0, 1).reshape(E, C, d)  # back in (rank, expert) order
    return _AllToAll.apply(out, None)
