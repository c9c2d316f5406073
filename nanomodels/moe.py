"""Sparse mixture of experts: top-k gating with capacity, the load-balancing loss, the X-MoE router
(arXiv 2204.09179) and multi-head MoE (MH-MoE, arXiv 2404.15045).

A MoE layer replaces the feed-forward FFN(h) by E experts FFN_1..FFN_E and a router. For the S = B*T tokens
h_s of a batch (GShard arXiv 2006.16668; torchscale's top-1 gate is this rule, its top-2 gate is not: see
nanomodels/moe_torchscale.py, the `routing=TorchscaleTop2(...)` option):

    p_s  = softmax(s(h_s))                       router probabilities over the E experts (float32 or wider)
    e1   = argmax_e p_s;   e2 = argmax_{e != e1} p_s                                  (k = 2 only)
    g    = p[e1] (k = 1, not renormalized);   g_j = p[e_j] / (p[e1] + p[e2]) (k = 2, before any drop)
    slots: per expert, in token order, first to every first choice, then to the second choices;
           a token whose slot is >= C (the capacity) is dropped from that expert (the residual carries it)
    y_s  = sum_j g_j [kept_j] FFN_{e_j}(h_s)
    l_aux = E * sum_e mean_s(p_{s,e}) * mean_s(1[e1(s) = e])   1 uniform, E at collapse; argmax part no grad
    C    = int(capacity_factor * k * ceil(S / E)) when training,  ceil(f * S) at eval (f > 0)

Router scores s(h): "linear" s = W_r h. "xmoe" (the paper, eq. 7): project to d_e << d, L2-normalize the token
and the expert embeddings e_k, learnable temperature tau: s_k = cos(W h, e_k) / tau, |s_k| <= 1/tau.
"xmoe_torchscale": the official code's. MH-MoE (heads = h > 1): h -> W_head h, h sub-tokens of d/h routed
independently, the expert outputs concatenated, W_merge.

Paper vs official code (microsoft/torchscale 0.3.0 = @ 4d1e0e8, torchscale/component/xmoe/routing.py): the
X-MoE gate normalizes only the expert side (the token normalization is commented out), has no temperature
(`gating_t` is never defined, microsoft/torchscale#63): scores ||W h|| cos(W h, e_k), unbounded; it rescales the
expert embeddings to norm 1.5 in place before each forward; W is nn.Linear's default, U(+-1/sqrt(d)), std
1/sqrt(3d) (here N(0, 1/d)). The paper-faithful gate (xy980523/MoEc_model) gates by a sigmoid of cos / tau.
"""

import math
from dataclasses import replace
from functools import partial
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from nanomodels.moe_parallel import run_experts_parallel
from nanomodels.transformer import MLP, TransformerConfig


class Routing(NamedTuple):
    experts: torch.Tensor  # (S, k) long: e1 (and e2)
    slots: torch.Tensor  # (S, k) long: the position in that expert's buffer (may be >= C)
    gates: torch.Tensor  # (S, k) float: g_j (GShard: normalized before dropping)
    kept: torch.Tensor  # (S, k) bool: slot < C
    probs: torch.Tensor  # (S, E) float: p
    aux_loss: torch.Tensor  # scalar: l_aux


def _check_gating(logits, k, capacity) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        got = getattr(logits, "shape", logits)
        raise ValueError(f"logits: expected a floating (S, E) tensor, got {got!r}")
    if k not in (1, 2) or isinstance(k, bool):
        raise ValueError(f"k: must be 1 or 2, got {k!r}")
    if k > logits.size(1):
        raise ValueError(f"k: must be <= the number of experts E = {logits.size(1)}, got {k}")
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity: must be an integer >= 1, got {capacity!r}")


def top_k_routing(logits: torch.Tensor, k: int, capacity: int) -> Routing:
    """The routing decisions for logits (S, E), without the dense (S, E, C) tensors (the sort-based path)."""
    _check_gating(logits, k, capacity)
    p = torch.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)  # (S, E)
    E = p.size(1)
    # BEGIN EXERCISE 7.1: top-k routing with capacity
    e1 = p.argmax(dim=-1)
    mask1 = F.one_hot(e1, E)  # (S, E)
    slot1 = (mask1.cumsum(0) - 1).gather(1, e1[:, None])  # earlier tokens win
    experts, slots = e1[:, None], slot1
    gates = p.gather(1, experts)
    if k == 2:
        e2 = p.masked_fill(mask1.bool(), float("-inf")).argmax(dim=-1)
        mask2 = F.one_hot(e2, E)
        slot2 = (mask2.cumsum(0) - 1 + mask1.sum(0)).gather(1, e2[:, None])  # after every first choice
        experts, slots = torch.cat([experts, e2[:, None]], 1), torch.cat([slot1, slot2], 1)
        gates = p.gather(1, experts)
        gates = gates / gates.sum(1, keepdim=True)  # before dropping
    # END EXERCISE
    return Routing(experts, slots, gates, slots < capacity, p, load_balancing_loss(p, e1))


def load_balancing_loss(probs: torch.Tensor, e1: torch.Tensor) -> torch.Tensor:
    """l_aux = E * sum_e mean_s(p[:, e]) * mean_s(onehot(e1)[:, e]); the gradient flows only through p."""
    # BEGIN EXERCISE 7.2: the load-balancing loss
    E = probs.size(1)
    fraction = F.one_hot(e1, E).to(probs.dtype).mean(0)  # an argmax count: constant for autograd
    return E * (probs.mean(0) * fraction).sum()
    # END EXERCISE


def top_k_gating(logits: torch.Tensor, k: int, capacity: int):
    """GShard top-k gating (torchscale's for k = 1): logits (S, E) -> (combine (S, E, C) float, dispatch (S, E, C)
    bool, aux_loss scalar). combine[s, e, c] = g where token s holds slot c of expert e, else 0."""
    r = top_k_routing(logits, k, capacity)
    return (*dense_masks(r, capacity), r.aux_loss)


def dense_masks(r: Routing, capacity: int):
    """The routing as the dense (S, E, C) combine weights and dispatch mask."""
    S, E = r.probs.shape
    token = torch.arange(S, device=r.probs.device)[:, None].expand_as(r.experts)[r.kept]
    where = (token, r.experts[r.kept], r.slots[r.kept])
    combine = r.probs.new_zeros(S, E, capacity).index_put(where, r.gates[r.kept])
    dispatch = torch.zeros(S, E, capacity, dtype=torch.bool, device=r.probs.device).index_put_(
        where, torch.ones((), dtype=torch.bool, device=r.probs.device))
    return combine, dispatch


def expert_capacity(num_tokens: int, num_experts: int, k: int, capacity_factor: float) -> int:
    """C = int(capacity_factor * k * ceil(S / E)), at least 1 (torchscale: top-1 this, top-2 2 ceil(S / E))."""
    return max(1, int(capacity_factor * k * math.ceil(num_tokens / num_experts)))


def xmoe_scores(h: torch.Tensor, projection: torch.Tensor, expert_embeddings: torch.Tensor,
                temperature: torch.Tensor) -> torch.Tensor:
    """X-MoE (paper): s_k = cos(W h, e_k) / tau. h (S, d), projection W (d_e, d), e (E, d_e) -> (S, E)."""
    # BEGIN EXERCISE 7.3: the X-MoE routing scores
    token = F.normalize(h @ projection.t(), dim=-1)  # (S, d_e), on the unit sphere
    experts = F.normalize(expert_embeddings, dim=-1)  # (E, d_e)
    return token @ experts.t() / temperature
    # END EXERCISE


def xmoe_torchscale_scores(h: torch.Tensor, projection: torch.Tensor, expert_embeddings: torch.Tensor):
    """torchscale's X-MoE scores: (W h) . e_k / ||e_k|| -- no token normalization, no temperature."""
    return (h @ projection.t()) @ F.normalize(expert_embeddings, dim=-1).t()


class LinearRouter(nn.Module):
    """s = W_r h (the Switch / GShard router)."""

    def __init__(self, d: int, num_experts: int):
        super().__init__()
        self.proj = nn.Linear(d, num_experts, bias=False)

    def forward(self, h):
        return self.proj(h)


class XMoERouter(nn.Module):
    """X-MoE: scores on a d_e-dimensional hypersphere. style="paper" (learnable tau, init 0.07, >= 1e-4) or
    "torchscale" (expert side normalized only, no tau, embeddings reset to norm 1.5 before each forward)."""

    def __init__(self, d: int, num_experts: int, routing_dim: int = 16, style: str = "paper",
                 temperature: float = 0.07):
        super().__init__()
        if style not in ("paper", "torchscale"):
            raise ValueError(f"style: must be 'paper' or 'torchscale', got {style!r}")
        self.style = style
        self.projection = nn.Parameter(torch.empty(routing_dim, d))  # W (d_e, d)
        nn.init.normal_(self.projection, std=d ** -0.5)
        self.expert_embeddings = nn.Parameter(torch.empty(num_experts, routing_dim))  # e_k (E, d_e)
        nn.init.orthogonal_(self.expert_embeddings, gain=0.32)
        self.temperature = nn.Parameter(torch.tensor(float(temperature))) if style == "paper" else None

    def forward(self, h):
        if self.style == "paper":
            return xmoe_scores(h, self.projection, self.expert_embeddings, self.temperature.clamp(min=1e-4))
        with torch.no_grad():
            self.expert_embeddings.mul_(1.5 / self.expert_embeddings.norm(dim=1, keepdim=True))
        return xmoe_torchscale_scores(h, self.projection, self.expert_embeddings)


ROUTERS = {"linear": LinearRouter, "xmoe": XMoERouter,
           "xmoe_torchscale": lambda d, n, routing_dim: XMoERouter(d, n, routing_dim, style="torchscale")}


class MoE(nn.Module):
    """The sparse MoE feed-forward part: `Transformer(config, ffn=partial(MoE, num_experts=8))`.

    num_experts = E, k = top-k, capacity_factor and eval_capacity_fraction (f) set C; router: "linear",
    "xmoe" or "xmoe_torchscale" (routing_dim = d_e); heads = h > 1 makes it MH-MoE; d_expert = each expert's
    hidden width (config.d_ff); dispatch: "einsum" (dense (S, E, C) masks), "sorted" (gather by expert) or a
    function like sorted_dispatch (kernels/grouped_gemm.py's grouped_gemm_dispatch); routing: None (GShard's
    rule, top_k_routing) or a part with `capacity(S, E, training)` and `(logits, C) -> Routing` (TorchscaleTop2
    in nanomodels/moe_torchscale.py); aux_weight multiplies the aux loss the model adds; expert_parallel:
    nanomodels/moe_parallel.py."""

    def __init__(self, config: TransformerConfig, linear: type = nn.Linear, *, num_experts: int = 8,
                 k: int = 1, capacity_factor: float = 1.0, eval_capacity_fraction: float = 0.25,
                 router: str = "linear", routing_dim: int = 16, heads: int = 1, d_expert: int = None,
                 dispatch: str = "einsum", aux_weight: float = 0.01, expert_parallel: bool = False,
                 routing=None):
        super().__init__()
        if not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: must be a positive integer, got {num_experts!r}")
        if k not in (1, 2) or k > num_experts:
            raise ValueError(f"k: must be 1 or 2 and <= num_experts ({num_experts}), got {k!r}")
        if not capacity_factor > 0:
            raise ValueError(f"capacity_factor: must be > 0, got {capacity_factor!r}")
        if router not in ROUTERS:
            raise ValueError(f"router: must be one of {sorted(ROUTERS)}, got {router!r}")
        if not isinstance(heads, int) or heads < 1 or config.d_model % heads:
            raise ValueError(f"heads: must be a positive integer dividing d_model ({config.d_model}), got {heads!r}")
        if dispatch not in ("einsum", "sorted") and not callable(dispatch):
            raise ValueError(f"dispatch: must be 'einsum', 'sorted' or a function like sorted_dispatch, "
                             f"got {dispatch!r}")
        if routing is not None and (getattr(routing, "k", None) != k or not hasattr(routing, "capacity")):
            raise ValueError(f"routing: must be None or a routing part for k = {k} with a capacity method, got {routing!r}")
        world = dist.get_world_size() if expert_parallel else 1
        if num_experts % world or (expert_parallel and dispatch != "einsum"):
            raise ValueError(f"expert_parallel: needs dispatch='einsum' and num_experts ({num_experts}) "
                             f"divisible by the world size ({world})")
        self.num_experts, self.k, self.heads, self.dispatch = num_experts, k, heads, dispatch
        self.capacity_factor, self.eval_capacity_fraction = capacity_factor, eval_capacity_fraction
        self.aux_weight, self.expert_parallel, self.routing = aux_weight, expert_parallel, routing
        width = config.d_model // heads  # each (sub-)token's width
        args = (width, num_experts) if router == "linear" else (width, num_experts, routing_dim)
        self.router = ROUTERS[router](*args)
        expert_config = replace(config, d_model=width, n_heads=1, d_ff=d_expert or config.d_ff)
        self.first_expert = dist.get_rank() * (num_experts // world) if expert_parallel else 0
        self.experts = nn.ModuleList(MLP(expert_config, linear=linear) for _ in range(num_experts // world))
        if heads > 1:
            self.head_proj = linear(config.d_model, config.d_model, bias=config.bias)
            self.merge_proj = linear(config.d_model, config.d_model, bias=config.bias)
        self.aux_loss = torch.zeros(())

    def capacity(self, num_tokens: int) -> int:
        if self.routing is not None:
            return self.routing.capacity(num_tokens, self.num_experts, self.training)
        if not self.training and self.eval_capacity_fraction > 0:
            return math.ceil(self.eval_capacity_fraction * num_tokens)
        return expert_capacity(num_tokens, self.num_experts, self.k, self.capacity_factor)

    def forward(self, x):
        shape = x.shape
        if self.heads > 1:
            x = self.head_proj(x)
        h = x.reshape(-1, shape[-1] // self.heads)  # (S, d / heads): sub-tokens in token order
        if self.dispatch == "einsum" and self.routing is None:
            y = moe_forward(self, h)
        else:
            C = self.capacity(h.size(0))
            routing = (self.routing or partial(top_k_routing, k=self.k))(self.router(h), capacity=C)
            self.aux_loss = routing.aux_loss
            self.last_experts = routing.experts.detach()  # (S, k), for diagnostics
            if self.dispatch == "einsum":
                combine, dispatch = dense_masks(routing, C)
                out = self._run_experts(torch.einsum("sec,sd->ecd", dispatch.to(h.dtype), h))
                y = torch.einsum("sec,ecd->sd", combine.to(h.dtype), out)
            else:
                y = (sorted_dispatch if self.dispatch == "sorted" else self.dispatch)(h, routing, self.experts)
        y = y.reshape(shape)
        return self.merge_proj(y) if self.heads > 1 else y

    def _run_experts(self, expert_in):
        """(E, C, d) -> (E, C, d), each expert on its own buffer; across ranks when expert_parallel."""
        if not self.expert_parallel:
            return torch.stack([expert(xe) for expert, xe in zip(self.experts, expert_in)])
        return run_experts_parallel(self.experts, expert_in)


def moe_forward(moe: MoE, h: torch.Tensor) -> torch.Tensor:
    """The MoE layer on S (sub-)tokens h (S, d) -> y (S, d), end to end, with dense (S, E, C) masks:

    route     C = moe.capacity(S) (it differs between training and eval); top_k_routing(moe.router(h), moe.k, C)
    record    moe.aux_loss = l_aux, kept in the autograd graph (the model adds moe.aux_weight * moe.aux_loss to
              its loss); moe.last_experts = the (S, k) expert choices, detached (for diagnostics)
    dispatch  buffer[e, c] = h_s for each kept choice (token s, expert e, slot c); unused slots hold 0  (E, C, d)
    experts   out[e] = FFN_e(buffer[e]): moe._run_experts(buffer) (across ranks under expert parallelism)
    combine   y_s = sum_j [kept_j] g_j out[e_j, slot_j] with the routing's gates as they are (k = 2: normalized
              over both choices before dropping, never again after); a token every expert dropped gets y_s = 0
    """
    # BEGIN EXERCISE 7.5: the MoE layer, end to end
    C = moe.capacity(h.size(0))
    routing = top_k_routing(moe.router(h), moe.k, C)
    moe.aux_loss = routing.aux_loss
    moe.last_experts = routing.experts.detach()
    S, E = routing.probs.shape
    token = torch.arange(S, device=h.device)[:, None].expand_as(routing.experts)[routing.kept]
    where = (token, routing.experts[routing.kept], routing.slots[routing.kept])  # (token, expert, slot) kept
    combine = routing.probs.new_zeros(S, E, C).index_put(where, routing.gates[routing.kept])  # (S, E, C)
    dispatch = torch.zeros(S, E, C, dtype=torch.bool, device=h.device).index_put_(
        where, torch.ones((), dtype=torch.bool, device=h.device))
    expert_in = torch.einsum("sec,sd->ecd", dispatch.to(h.dtype), h)  # (E, C, d)
    return torch.einsum("sec,ecd->sd", combine.to(h.dtype), moe._run_experts(expert_in))
    # END EXERCISE


def sorted_dispatch(h: torch.Tensor, routing: Routing, experts) -> torch.Tensor:
    """y_s = sum_j g_j FFN_{e_j}(h_s) over kept choices, without (S, E, C) tensors: sort the kept (token,
    expert) pairs by expert, run each expert on its contiguous rows, scatter-add the gated results."""
    S, k = routing.experts.shape
    token = torch.arange(S, device=h.device)[:, None].expand(S, k)[routing.kept]
    expert, gate = routing.experts[routing.kept], routing.gates[routing.kept]
    order = torch.argsort(expert, stable=True)  # stable: token order inside each expert
    token, expert, gate = token[order], expert[order], gate[order]
    counts = torch.bincount(expert, minlength=len(experts)).tolist()
    rows = [ffn(chunk) for ffn, chunk in zip(experts, torch.split(h[token], counts))]
    out = torch.cat(rows) * gate[:, None].to(h.dtype)
    return h.new_zeros(h.shape).index_add_(0, token, out)


__all__ = ["MoE", "LinearRouter", "Routing", "XMoERouter", "dense_masks", "expert_capacity", "load_balancing_loss",
           "moe_forward", "sorted_dispatch", "top_k_gating", "top_k_routing", "xmoe_scores", "xmoe_torchscale_scores"]
