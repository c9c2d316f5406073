"""Top-2 routing as microsoft/torchscale 0.3.0 computes it (torchscale/component/xmoe/routing.py, `top2gating`),
a routing part for the MoE layer: `MoE(config, k=2, routing=TorchscaleTop2("random"))`.

nanomodels.moe's default top-2 rule is GShard's, deterministic: e2 = argmax_{e != e1} p, both gates normalized
over the two choices before any token is dropped, C = int(capacity_factor * 2 * ceil(S / E)). torchscale differs:

  second expert  policy "random" (its config default, moe_second_expert_policy): e2 = argmax_{e != e1} p, kept
                 only where 2 g2 > u, u ~ U(0, 1) per token, in training and at eval alike; "sampling" (the
                 default of the Top2Gate class itself): e2 = argmax_{e != e1} (logits + Gumbel(0, 1) noise), always
                 kept; "all" (any other policy string there): e2 = argmax_{e != e1} p, always kept
  gates          normalize_before_dropping=False (its default): g_j = p_j [kept_j] / max(sum_j p_j [kept_j], eps),
                 so a token whose second choice was dropped gets gate 1.0 on its first; True: g_j = p_j / (p1 + p2)
                 before dropping, and "random" then tests 2 g2 with that normalized g2
  capacity       C = 2 ceil(S / E) in training whatever the capacity factor; ceil(f S) at eval (f > 0)
  use_xmoe       forces normalize_before_dropping=True and "random" (torchscale/architecture/config.py)

The slots (first choices first, then the second choices that were kept, in token order), the float32-or-wider
softmax and the aux loss E^2 mean_e(mean_s p * mean_s 1[e1 = e]) are GShard's, as in nanomodels.moe.
"""

import math

import torch
import torch.nn.functional as F

from nanomodels.moe import Routing, _check_gating

POLICIES = ("random", "sampling", "all")


class TorchscaleTop2:
    """torchscale's top-2 routing: `routing(logits, capacity)` -> Routing, `capacity(S, E, training)` -> C.

    policy: "random", "sampling" or "all" (above); normalize_before_dropping: torchscale's
    moe_normalize_gate_prob_before_dropping; eval_capacity_fraction = f; generator: the source of the random
    draws (u for "random", the Gumbel noise for "sampling"), torch's default generator when None.
    """

    k = 2

    def __init__(self, policy: str = "random", normalize_before_dropping: bool = False,
                 eval_capacity_fraction: float = 0.25, generator: torch.Generator = None):
        if policy not in POLICIES:
            raise ValueError(f"policy: must be one of {POLICIES}, got {policy!r}")
        if not isinstance(normalize_before_dropping, bool):
            raise ValueError(f"normalize_before_dropping: must be a bool, got {normalize_before_dropping!r}")
        if not isinstance(eval_capacity_fraction, (int, float)) or eval_capacity_fraction < 0:
            raise ValueError(f"eval_capacity_fraction: must be a number >= 0, got {eval_capacity_fraction!r}")
        self.policy, self.normalize_before_dropping = policy, normalize_before_dropping
        self.eval_capacity_fraction, self.generator = eval_capacity_fraction, generator

    def capacity(self, num_tokens: int, num_experts: int, training: bool) -> int:
        """C = 2 ceil(S / E) in training (no capacity factor), ceil(f S) at eval when f > 0."""
        if not training and self.eval_capacity_fraction > 0:
            return math.ceil(self.eval_capacity_fraction * num_tokens)
        return 2 * math.ceil(num_tokens / num_experts)

    def __call__(self, logits: torch.Tensor, capacity: int) -> Routing:
        _check_gating(logits, 2, capacity)
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        p = torch.softmax(logits, dim=-1)  # (S, E)
        S, E = p.shape
        e1 = p.argmax(dim=-1)
        mask1 = F.one_hot(e1, E)  # (S, E)
        scores = logits
        if self.policy == "sampling":  # Gumbel-max: e2 is a sample from softmax(logits) without e1
            u = torch.rand(S, E, generator=self.generator, dtype=p.dtype, device=p.device)
            scores = logits - torch.log(-torch.log(u.clamp(torch.finfo(p.dtype).tiny, 1 - torch.finfo(p.dtype).eps)))
        e2 = scores.masked_fill(mask1.bool(), float("-inf")).argmax(dim=-1)
        experts = torch.stack([e1, e2], dim=1)  # (S, 2)
        gates = p.gather(1, experts)
        if self.normalize_before_dropping:
            gates = gates / gates.sum(1, keepdim=True).clamp(min=torch.finfo(p.dtype).eps)
        second = torch.ones(S, dtype=torch.bool, device=p.device)
        if self.policy == "random":
            second = 2 * gates[:, 1] > torch.rand(S, generator=self.generator, dtype=p.dtype, device=p.device)
        mask2 = F.one_hot(e2, E) * second[:, None]  # a second choice not taken holds no slot
        slot1 = (mask1.cumsum(0) - 1).gather(1, e1[:, None])
        slot2 = (mask2.cumsum(0) - 1 + mask1.sum(0)).gather(1, e2[:, None])
        slots = torch.cat([slot1, slot2], dim=1)
        kept = (slots < capacity) & torch.stack([torch.ones_like(second), second], dim=1)
        if not self.normalize_before_dropping:  # over the kept choices only
            gates = gates * kept
            gates = gates / gates.sum(1, keepdim=True).clamp(min=torch.finfo(p.dtype).eps)
        aux = E * E * (p.mean(0) * mask1.to(p.dtype).mean(0)).mean()
        return Routing(experts, slots, gates, kept, p, aux)
