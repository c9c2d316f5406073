"""Gated retention: retention whose decay is a per-token, data-dependent gate (YOCO's self-decoder, 2405.05254).

RetNet's retention decays every past key by one fixed gamma_h per step. Gated retention lets each token choose its
own decay gamma_t in (0, 1], computed from the token (YOCO: gamma_t = sigmoid(x_t W_gamma)^(1/16), i.e. log gamma_t =
logsigmoid(x_t W_gamma) / 16). With log_decay_t = log gamma_t, the three forms below compute one thing:

    parallel    o_n = sum_{m <= n} exp(sum_{j=m+1..n} log_decay_j) (q_n . k_m) v_m  =  (Q K^T ⊙ D) V,
                D[n, m] = exp(c_n - c_m) for n >= m else 0,   c_n = sum_{j <= n} log_decay_j   (a cumulative sum)
    recurrent   S_t = gamma_t S_{t-1} + k_t^T v_t,   o_t = q_t S_t        (S: one (Dk, Dv) state per head, whatever T)
    chunkwise   inside a chunk the parallel form, across chunks the state:  with b_j the cumulative log decay from
                the chunk's start to position j,  o_j = parallel_j + exp(b_j) q_j S_prev  and
                S = exp(b_last) S_prev + sum_j exp(b_last - b_j) k_j^T v_j

A constant log_decay = log gamma is RetNet's retention. No scaling and no normalisation here: callers scale q.
Shapes: q, k (B, H, T, Dk), v (B, H, T, Dv), log_decay (B, H, T), state (B, H, Dk, Dv).

`GatedRetention` is the layer (the gRet of YOCO's self-decoder, multi-head): q = x W_Q / sqrt(Dk), k = x W_K,
v = x W_V, the gate log gamma_t = logsigmoid(x_t W_gamma) / 16 (one per head and token), o = the chunkwise form (the
recurrent one when decoding a token), a per-head RMSNorm without affine, then (swish(x W_G) ⊙ o) W_O.

Paper vs official code (microsoft/unilm YOCO/yoco/models/decoder/kernel/gate_recurrent.py, read at 7402b0e): its
parallel, chunk and recurrent functions scale k by Dk^(-1/2) themselves (GatedRetention below
scales q instead: the same products) and take the cumulative sum of the log decays in float32; the chunk function
reshapes T into T // chunk_size chunks, so T must be a multiple of the chunk size, and the model's prefill pads the
prompt to a multiple of 256 and masks the padding out of the state. The chunkwise form here takes any T and
computes in the input dtype.
"""

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

GATE_LOGIT_NORMALIZER = 16  # log gamma_t = logsigmoid(x W_gamma) / 16: gamma_t = sigmoid(x W_gamma)^(1/16)


def _check(q, k, v, log_decay, state=None):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q, k: must both have shape (B, H, T, Dk), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: must have shape (B, H, T, Dv) with (B, H, T) = {tuple(q.shape[:3])}, "
                         f"got {tuple(v.shape)}")
    if log_decay.shape != q.shape[:3]:
        raise ValueError(f"log_decay: must have shape (B, H, T) = {tuple(q.shape[:3])}, got {tuple(log_decay.shape)}")
    if log_decay.numel() and not bool(((log_decay <= 0) & torch.isfinite(log_decay)).all()):
        raise ValueError("log_decay: must be finite and <= 0 (it is log gamma_t, gamma_t in (0, 1])")
    want = (*q.shape[:2], q.size(-1), v.size(-1))
    if state is not None and tuple(state.shape) != want:
        raise ValueError(f"state: must have shape (B, H, Dk, Dv) = {want}, got {tuple(state.shape)}")


def _parallel(q, k, v, log_decay):
    c = log_decay.cumsum(-1)  # (B, H, T): c_n = sum_{j <= n} log_decay_j
    T = q.size(-2)
    causal = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    # the mask goes in before exp: above the diagonal c_n - c_m >= 0 could overflow
    decay = (c[..., :, None] - c[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, T, T)
    return ((q @ k.transpose(-2, -1)) * decay) @ v  # (B, H, T, Dv)


def gated_retention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor) -> torch.Tensor:
    """o_n = sum_{m <= n} exp(sum_{j=m+1..n} log_decay_j) (q_n . k_m) v_m, the parallel form: (B, H, T, Dv)."""
    _check(q, k, v, log_decay)
    return _parallel(q, k, v, log_decay)


def _zero_state(q, v, state):
    """S_0: zeros, or a copy of the given state (the returned state is never the caller's tensor, even for T = 0)."""
    return q.new_zeros(*q.shape[:2], q.size(-1), v.size(-1)) if state is None else state.clone()


def gated_retention_recurrent(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                              state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """S_t = gamma_t S_{t-1} + k_t^T v_t, o_t = q_t S_t for t = 1..T -> (out (B, H, T, Dv), S_T (B, H, Dk, Dv)).

    gamma_t = exp(log_decay_t), one per batch row, head and token; S_t is a (Dk, Dv) matrix per head and k_t^T v_t
    the outer product of row vectors. `state` is S_0 (zeros when None); passing the returned state back continues
    the sequence. Computed in the inputs' dtype (out and state too)."""
    _check(q, k, v, log_decay, state)
    # BEGIN EXERCISE 11.1: the gated-retention recurrence
    S = _zero_state(q, v, state)
    outs = [q.new_zeros(*q.shape[:2], 0, v.size(-1))]
    for t in range(q.size(-2)):
        gamma = log_decay[..., t, None, None].exp()  # (B, H, 1, 1)
        S = gamma * S + k[..., t, :, None] @ v[..., t, None, :]  # (B, H, Dk, Dv)
        outs.append(q[..., t, None, :] @ S)  # (B, H, 1, Dv)
    return torch.cat(outs, dim=2), S
    # END EXERCISE


def gated_retention_chunkwise(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_decay: torch.Tensor,
                              chunk_size: int, state: Optional[torch.Tensor] = None
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunkwise form: parallel inside each chunk of chunk_size positions, recurrent across chunks.

    T need not be a multiple of chunk_size (the last chunk is shorter). Returns (out, state) as the recurrent form."""
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    _check(q, k, v, log_decay, state)
    S = _zero_state(q, v, state)
    outs = [q.new_zeros(*q.shape[:2], 0, v.size(-1))]
    for start in range(0, q.size(-2), chunk_size):
        part = slice(start, start + chunk_size)
        qc, kc, vc, gc = q[..., part, :], k[..., part, :], v[..., part, :], log_decay[..., part]
        b = gc.cumsum(-1)  # (B, H, C): log of the decay from the chunk's start through position j
        inner = _parallel(qc, kc, vc, gc)
        cross = (qc @ S) * b.exp()[..., None]  # the previous chunks, through the state
        outs.append(inner + cross)
        b_last = b[..., -1:]  # (B, H, 1)
        S = b_last.exp()[..., None] * S + (kc * (b_last - b).exp()[..., None]).transpose(-2, -1) @ vc
    return torch.cat(outs, dim=2), S


class GatedRetention(nn.Module):
    """Multi-head gated retention with a swish output gate; `cache` (a dict or None) carries its state. config: a
    YOCOConfig (d_model, n_heads, bias, chunk_size, dropout)."""

    def __init__(self, config, *, linear: type = nn.Linear):
        super().__init__()
        d, bias, self.n_heads, self.chunk_size = config.d_model, config.bias, config.n_heads, config.chunk_size
        self.q_proj, self.k_proj, self.v_proj, self.g_proj = (linear(d, d, bias=bias) for _ in range(4))
        self.gt_proj = linear(d, config.n_heads, bias=bias)  # W_gamma: one gate logit per head
        self.out_proj = linear(d, d, bias=bias)
        self.head_norm = nn.RMSNorm(d // config.n_heads, eps=1e-5, elementwise_affine=False)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[dict] = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (p(x).view(B, T, self.n_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * q.size(-1) ** -0.5  # (B, H, T, Dk)
        log_decay = F.logsigmoid(self.gt_proj(x)).transpose(1, 2) / GATE_LOGIT_NORMALIZER  # (B, H, T)
        state = None if cache is None else cache.get("state")
        if T == 1 and state is not None:  # decoding: one O(1) recurrent step
            o, state = gated_retention_recurrent(q, k, v, log_decay, state)
        else:
            o, state = gated_retention_chunkwise(q, k, v, log_decay, self.chunk_size, state)
        if cache is not None:
            cache["state"] = state  # (B, H, Dk, Dv): its size does not depend on T
        o = self.head_norm(o).transpose(1, 2).reshape(B, T, C)
        return self.dropout(self.out_proj(F.silu(self.g_proj(x)) * o))
