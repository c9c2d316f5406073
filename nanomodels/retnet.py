"""RetNet's retention (arXiv 2307.08621) in its three equal forms, and XPos (arXiv 2212.10554).

Retention is attention without the softmax, with an exponential decay gamma_h per head (h = head):

    parallel:   O = (Q K^T (.) D) V,        D[n, m] = gamma^(n - m) if n >= m else 0       O(T^2) for T tokens
    recurrent:  S_n = gamma S_{n-1} + k_n^T v_n,    o_n = q_n S_n                          O(1) per token
    chunkwise:  chunks of C tokens; inside a chunk the parallel form, across chunks the state:
                o_[i] = (Q_[i] K_[i]^T (.) D) V_[i] + (Q_[i] S_{i-1}) (.) xi,      xi_j   = gamma^(j + 1)
                S_i   = gamma^C S_{i-1} + K_[i]^T (V_[i] (.) zeta),                zeta_j = gamma^(C - j - 1)

q, k are (B, H, T, Dk), v (B, H, T, Dv), the state S (B, H, Dk, Dv): a decoder keeps one S per layer, whatever
the length. The multi-scale decays are gamma_h = 1 - 2^(-5 - h) (0.96875, 0.984375, ...), one per head.

XPos rotates the interleaved pairs (2i, 2i+1) of q and k by position * theta_i, theta_i = 10000^(-2i/D) (RoPE),
and scales q_n by zeta_i^(n/B), k_m by zeta_i^(-m/B), zeta_i = (2i + 0.4 D) / (1.4 D), B = scale_base, so the score
q'_n . k'_m carries zeta^((n - m)/B): a decay with distance. The exponent is centred (n + c, m + c with c =
(-L) // 2, L the longest position + 1, as torchscale's min_pos); c cancels in q' . k'. scale_base=math.inf is RoPE.

MultiScaleRetention is the attention part of a RetNet block: q, k rotated (no zeta: gamma already decays), k
scaled by Dk^(-1/2), value width 2 d, a per-head RMSNorm without affine, a swish gate, the output projection:

    Y = RMSNorm_h(Retention(X)),    MSR(X) = (swish(X W_G) (.) Y) W_O

Paper vs official code (torchscale 0.2.0, microsoft/torchscale @ 4d1e0e8, architecture/retnet.py and
component/multiscale_retention.py): (1) torchscale rescales each form differently: the parallel D rows are
divided by sqrt(row sum) and Q K^T (.) D by its detached |.| row sum clamped to [1, 5e4]; the recurrent state is
kept divided by sqrt(sum_j gamma^j); the chunkwise form aligns per-chunk abs-sum scales. These are per-row factors
that only the scale-invariant RMSNorm cancels, and exactly only with eps = 0 (microsoft/torchscale#40);
tests/test_retnet.py re-implements the parallel form's two rescalings and shows them cancel through RMSNorm with
eps = 0 and not with eps = 1e-6. This file computes the raw identity,
which the three forms share for any eps. (2) torchscale's RetNet rotates with theta_i = 10000^(-i/(Dk/2 - 1)),
here XPos's theta_i = 10000^(-2i/Dk). (3) torchscale's chunkwise form needs T % C == 0 (its decoder pads the
tokens); here the last chunk may be shorter. (4) torchscale's RetNet embeds tokens without positions and uses
RMSNorm and a GLU FFN; `retnet_lm` keeps the core's parts, so TokenEmbedding's learned positions are still added.
"""

from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomodels.transformer import Transformer, TransformerConfig


def retention_gammas(n_heads: int) -> torch.Tensor:
    """gamma_h = 1 - 2^(-5 - h) for h = 0 .. n_heads - 1, float64 (n_heads,)."""
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads < 1:
        raise ValueError(f"n_heads: must be a positive integer, got {n_heads!r}")
    return 1 - 2.0 ** (-5 - torch.arange(n_heads, dtype=torch.float64))


def _check(q, k, v, gamma, state=None):
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q, k: expected equal shapes (B, H, T, Dk), got {tuple(q.shape)} and {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v: expected (B, H, T, Dv) with (B, H, T) = {tuple(q.shape[:3])}, got {tuple(v.shape)}")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v: must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    gamma = torch.as_tensor(gamma)
    if gamma.shape != (q.size(1),):
        raise ValueError(f"gamma: expected shape (H,) = ({q.size(1)},), got {tuple(gamma.shape)}")
    if not bool(((gamma > 0) & (gamma <= 1)).all()):
        raise ValueError(f"gamma: every decay must be in (0, 1], got {gamma.tolist()}")
    B, H, _, Dk = q.shape
    if state is not None and (state.shape != (B, H, Dk, v.size(-1)) or state.dtype != q.dtype):
        raise ValueError(f"state: expected (B, H, Dk, Dv) = {(B, H, Dk, v.size(-1))} of dtype {q.dtype}, "
                         f"got {tuple(state.shape)} of dtype {state.dtype}")
    # powers in float64 for float64 inputs (gamma ** an int tensor would silently give float32), float32 at least
    return gamma.to(q.device, torch.promote_types(q.dtype, torch.float32))[:, None, None]  # (H, 1, 1)


def decay_mask(gamma: torch.Tensor, n: int) -> torch.Tensor:
    """D (H, n, n): gamma^(row - column) on and below the diagonal, 0 above; gamma is (H, 1, 1), D its dtype."""
    # BEGIN EXERCISE 10.4: the decay mask
    idx = torch.arange(n, device=gamma.device, dtype=gamma.dtype)
    diff = idx[:, None] - idx[None, :]  # (n, n)
    return torch.where(diff >= 0, gamma ** diff.clamp(min=0), 0.0)
    # END EXERCISE


def retention_parallel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gamma) -> torch.Tensor:
    """(Q K^T (.) D) V: q, k (B, H, T, Dk), v (B, H, T, Dv), gamma (H,) -> (B, H, T, Dv). No scaling."""
    g = _check(q, k, v, gamma)
    D = decay_mask(g, q.size(2)).to(q.dtype)  # (H, T, T)
    return ((q @ k.transpose(-2, -1)) * D) @ v


def retention_recurrent(q, k, v, gamma, state: Optional[torch.Tensor] = None):
    """S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n for n = 1 .. T -> (out (B, H, T, Dv), S_T (B, H, Dk, Dv)).

    `state` is S_0 (zeros when None): passing the returned state back continues the sequence."""
    g = _check(q, k, v, gamma, state).to(q.dtype)
    B, H, T, Dk = q.shape
    # BEGIN EXERCISE 10.1: the recurrent step
    S = q.new_zeros(B, H, Dk, v.size(-1)) if state is None else state
    out = []
    for n in range(T):
        S = g * S + k[:, :, n, :, None] * v[:, :, n, None, :]  # (B, H, Dk, Dv)
        out.append(q[:, :, n, None, :] @ S)  # (B, H, 1, Dv)
    return torch.cat(out, dim=2) if out else v.new_zeros(v.shape), S
    # END EXERCISE


def retention_chunkwise(q, k, v, gamma, chunk_size: int, state: Optional[torch.Tensor] = None):
    """The chunkwise form: chunks of chunk_size tokens (the last may be shorter), parallel inside a chunk,
    the state across chunks -> (out (B, H, T, Dv), state (B, H, Dk, Dv)), equal to the other two forms.

    Chunk i of C tokens (rows j = 0 .. C - 1), after the chunks before it left the state S:
        o_[i] = (Q_[i] K_[i]^T (.) D) V_[i] + (Q_[i] S) (.) xi,    xi_j = gamma^(j + 1)
        S    <- gamma^C S + K_[i]^T (V_[i] (.) zeta),              zeta_j = gamma^(C - j - 1)
    `state` is the S before the first chunk (zeros when None)."""
    g = _check(q, k, v, gamma, state)
    if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    B, H, T, Dk = q.shape
    S = q.new_zeros(B, H, Dk, v.size(-1)) if state is None else state
    out = []
    for start in range(0, T, chunk_size):
        qc, kc, vc = (t[:, :, start:start + chunk_size] for t in (q, k, v))
        C = qc.size(2)  # chunk_size, or fewer in the last chunk
        inner = ((qc @ kc.transpose(-2, -1)) * decay_mask(g, C).to(q.dtype)) @ vc
        # BEGIN EXERCISE 10.2: the chunkwise cross-chunk term
        j = torch.arange(C, device=q.device, dtype=g.dtype)[:, None]  # (C, 1): index in the chunk
        xi, zeta = (g ** (j + 1)).to(q.dtype), (g ** (C - 1 - j)).to(q.dtype)  # (H, C, 1)
        out.append(inner + (qc @ S) * xi)
        S = (g ** C).to(q.dtype) * S + kc.transpose(-2, -1) @ (vc * zeta)
        # END EXERCISE
    return torch.cat(out, dim=2) if out else v.new_zeros(v.shape), S


def rotate_pairs(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Rotate each interleaved pair (x_2i, x_2i+1) of x (..., T, D) by positions[t] * 10000^(-2i/D)."""
    D = x.size(-1)
    work = torch.promote_types(x.dtype, torch.float32)
    theta = 10000.0 ** (-torch.arange(0, D, 2, device=x.device, dtype=work) / D)  # (D/2,)
    angle = positions.to(work)[:, None] * theta  # (T, D/2)
    cos, sin = angle.cos().to(x.dtype), angle.sin().to(x.dtype)
    x0, x1 = x[..., 0::2], x[..., 1::2]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2)


def apply_xpos(q: torch.Tensor, k: torch.Tensor, *, q_offset: int = 0, scale_base: float = 512):
    """XPos: q (..., Tq, D) at positions q_offset + t, k (..., Tk, D) at positions 0 .. Tk - 1 -> (q', k').

    Rotation by position * theta_i, q scaled by zeta_i^((n + c)/B), k by zeta_i^(-(m + c)/B) on both entries of
    pair i, zeta_i = (2i + 0.4 D) / (1.4 D), B = scale_base, c = (-L) // 2 with L = max(q_offset + Tq, Tk); q', k'
    in the input dtype; scale_base=math.inf gives RoPE."""
    if q.dim() < 2 or k.dim() < 2 or q.size(-1) != k.size(-1):
        raise ValueError(f"q, k: expected (..., T, D) with one D, got {tuple(q.shape)} and {tuple(k.shape)}")
    D = q.size(-1)
    if D % 2:
        raise ValueError(f"q, k: the last dimension D must be even (rotated pairs), got {D}")
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ValueError(f"q_offset: must be an integer >= 0, got {q_offset!r}")
    if not scale_base > 0:
        raise ValueError(f"scale_base: must be > 0 (math.inf = RoPE), got {scale_base!r}")
    Tq, Tk = q.size(-2), k.size(-2)
    work = torch.promote_types(q.dtype, torch.float32)
    qpos = torch.arange(q_offset, q_offset + Tq, device=q.device, dtype=work)
    kpos = torch.arange(Tk, device=k.device, dtype=work)
    # BEGIN EXERCISE 10.3: XPos's scale
    zeta = (torch.arange(0, D, 2, device=q.device, dtype=work) + 0.4 * D) / (1.4 * D)  # (D/2,)
    c = (-max(q_offset + Tq, Tk)) // 2  # centres the exponent: zeta^(+-L/(2B)) at most, cancels in q'.k'
    q_scale = zeta ** ((qpos[:, None] + c) / scale_base)  # (Tq, D/2)
    k_scale = zeta ** (-(kpos[:, None] + c) / scale_base)  # (Tk, D/2)
    q_scale, k_scale = (s.repeat_interleave(2, dim=-1).to(q.dtype) for s in (q_scale, k_scale))  # (T, D)
    # END EXERCISE
    return rotate_pairs(q, qpos) * q_scale, rotate_pairs(k, kpos) * k_scale


class MultiScaleRetention(nn.Module):
    """The retention part: MultiScaleRetention(config, attn_fn=..., linear=..., chunk_size=None, norm_eps=1e-6).

    forward(x, allowed=None, causal=True, cache=None, memory=None) -> (B, T, d). Without a cache: the parallel
    form, or the chunkwise form when `chunk_size` is set. With a cache dict: `step`, the recurrent form, which
    keeps cache["state"] (B, H, Dk, Dv) and cache["offset"] (tokens consumed; rotations continue from it).
    Retention is causal by construction: `allowed`, causal=False or `memory` raise ValueError. `attn_fn` (what
    the Transformer passes every attention part) is not used. Heads H = n_heads, Dk = d / H, Dv = 2 d / H.
    """

    def __init__(self, config: TransformerConfig, *, attn_fn=None, linear: type = nn.Linear,
                 chunk_size: Optional[int] = None, norm_eps: float = 1e-6):
        super().__init__()
        if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                       or chunk_size < 1):
            raise ValueError(f"chunk_size: must be a positive integer or None (parallel form), got {chunk_size!r}")
        if not norm_eps >= 0:
            raise ValueError(f"norm_eps: must be >= 0, got {norm_eps!r}")
        d, self.n_heads = config.d_model, config.n_heads
        self.chunk_size, self.norm_eps = chunk_size, norm_eps
        self.key_dim, self.value_dim = d // self.n_heads, 2 * d // self.n_heads
        self.q_proj = linear(d, d, bias=False)
        self.k_proj = linear(d, d, bias=False)
        self.v_proj = linear(d, 2 * d, bias=False)
        self.g_proj = linear(d, 2 * d, bias=False)
        self.out_proj = linear(2 * d, d, bias=False)
        self.dropout = nn.Dropout(config.dropout)
        self.reset_parameters()

    def reset_parameters(self):
        """torchscale's init: xavier_uniform_ with gain 2^-2.5 for q, k, v, g and 2^-1 for the output."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.out_proj.weight, gain=2 ** -1)

    def _heads(self, x, T, offset):
        B = x.size(0)
        split = lambda t, D: t.view(B, T, self.n_heads, D).transpose(1, 2)  # noqa: E731  (B, H, T, D)
        positions = torch.arange(offset, offset + T, device=x.device)
        q = rotate_pairs(split(self.q_proj(x), self.key_dim), positions)
        k = rotate_pairs(split(self.k_proj(x) * self.key_dim ** -0.5, self.key_dim), positions)
        return q, k, split(self.v_proj(x), self.value_dim)

    def _output(self, x, y):
        B, H, T, Dv = y.shape
        y = F.rms_norm(y, (Dv,), eps=self.norm_eps).transpose(1, 2).reshape(B, T, H * Dv)  # per-head norm
        return self.dropout(self.out_proj(F.silu(self.g_proj(x)) * y))

    def step(self, x: torch.Tensor, cache: dict) -> torch.Tensor:
        """The recurrent form on x (B, T, d), continuing from cache["state"] at position cache["offset"]."""
        offset = cache.get("offset", 0)
        q, k, v = self._heads(x, x.size(1), offset)
        gamma = retention_gammas(self.n_heads)
        y, cache["state"] = retention_recurrent(q, k, v, gamma, cache.get("state"))
        cache["offset"] = offset + x.size(1)
        return self._output(x, y)

    def forward(self, x: torch.Tensor, allowed=None, causal: bool = True, cache: Optional[dict] = None,
                memory: Optional[torch.Tensor] = None) -> torch.Tensor:
        if allowed is not None:
            raise ValueError("allowed: retention has one fixed causal decay mask; pass allowed=None")
        if not causal:
            raise ValueError("causal: retention is causal by construction; causal=False is not defined")
        if memory is not None:
            raise ValueError("memory: retention is self-retention; there is no cross-retention")
        if cache is not None:
            return self.step(x, cache)
        q, k, v = self._heads(x, x.size(1), 0)
        gamma = retention_gammas(self.n_heads)
        if self.chunk_size is None:
            y = retention_parallel(q, k, v, gamma)
        else:
            y, _ = retention_chunkwise(q, k, v, gamma, self.chunk_size)
        return self._output(x, y)


def retnet_lm(config: TransformerConfig, *, chunk_size: Optional[int] = None, norm_eps: float = 1e-6,
              **parts) -> Transformer:
    """A RetNet LM: the core Transformer with MultiScaleRetention as its attention part (other parts from
    `parts`). Transformer() applies GPT-2's init to every part; this re-applies torchscale's to the retention."""
    model = Transformer(config, attention=partial(MultiScaleRetention, chunk_size=chunk_size, norm_eps=norm_eps),
                        **parts)
    for module in model.modules():
        if isinstance(module, MultiScaleRetention):
            module.reset_parameters()
    return model
