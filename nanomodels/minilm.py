"""MiniLM: distilling a Transformer through its self-attention (arXiv 2002.10957; MiniLMv2, arXiv 2012.15828).

The student mimics the teacher's self-attention, not its hidden states, so its width and depth are free.
MiniLM distills the teacher's LAST layer with two KL divergences, teacher ‖ student, averaged over the A_h
heads and the |x| query positions t:

    L_AT = 1/(A_h |x|) Σ_a Σ_t KL(A^T_{a,t} ‖ A^S_{a,t}),    A = softmax(Q Kᵀ / √d_k)   (attention)
    L_VR = 1/(A_h |x|) Σ_a Σ_t KL(VR^T_{a,t} ‖ VR^S_{a,t}),  VR = softmax(V Vᵀ / √d_k)  (value relation)
    KL(t ‖ s) = Σ_k t_k (log t_k − log s_k),   with 0 · log 0 = 0

L_AT + L_VR needs equal head counts. MiniLMv2 drops that constraint with relation heads: concatenate the
heads of Q (and K, V) back to (B, T, d), re-split into n_heads relation heads of d / n_heads (the same n_heads
for teacher and student whatever their widths), and distill the Q-Q, K-K and V-V relations
softmax(X_r X_rᵀ / √(d / n_heads)); for large teachers the paper takes an upper-middle layer, not the last.
A teacher row of zeros (a query with no visible key) adds 0 to a KL but counts in its mean unless `mask`
drops it.

`capture_attention(model, layer)` records a layer's q, k, v and attention probabilities during an ordinary
forward through MultiHeadAttention's read-only `tap`; the forward result stays bit-identical. `logit_kl` is
the standard baseline: KL between the output distributions at temperature τ (Hinton et al. 2015).

Paper vs official code: microsoft/unilm's `minilm/` holds the released models' README and an XNLI
fine-tuning script, no distillation code; the losses here follow the papers' equations.
"""

import math
from contextlib import contextmanager
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from nanomodels.attention import MultiHeadAttention, attention, causal_mask, sdpa_attention


def _check(x: torch.Tensor, name: str, dims: Optional[int], what: str) -> None:
    """x must be a floating tensor with `dims` axes (None: at least one)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name}: expected a floating {what} tensor, got {type(x).__name__}")
    if not x.is_floating_point() or (x.dim() < 1 if dims is None else x.dim() != dims):
        raise ValueError(f"{name}: expected a floating {what} tensor, got {x.dtype} {tuple(x.shape)}")


def _check_heads(n_heads: int, d: int, width: str) -> None:
    if isinstance(n_heads, bool) or not isinstance(n_heads, int) or n_heads < 1 or d % n_heads:
        raise ValueError(f"n_heads: must be a positive integer dividing {width} = {d}, got {n_heads!r}")


def attention_kl(teacher: torch.Tensor, student: torch.Tensor,
                 mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Mean over B, H and the valid query rows of KL(teacher ‖ student) = Σ_k t (log t − log s), 0 log 0 = 0.

    teacher, student: (B, H, T, T) distributions over the last axis. mask: (B, T) bool, True = a valid query
    row (None: every row); the mean is over every (b, h, valid row), so a masked row's content never matters.
    The teacher is a target: it is detached. s = 0 where t > 0 gives +inf (the student rules out what the
    teacher allows). The student's gradient is −t / s / (H · valid rows) where t > 0 in a valid row and
    exactly 0 elsewhere, never NaN where t = s = 0 (a causal student's future keys). The result has the
    inputs' dtype.
    A mask with no valid row is a ValueError (the mean over no row is undefined).
    """
    _check(teacher, "teacher", 4, "(B, H, T, T)")
    _check(student, "student", 4, "(B, H, T, T)")
    if teacher.shape != student.shape or teacher.size(-1) != teacher.size(-2):
        raise ValueError(f"teacher and student: expected the same (B, H, T, T) shape, got "
                         f"{tuple(teacher.shape)} and {tuple(student.shape)}")
    B, H, T, _ = teacher.shape
    if mask is None:
        mask = torch.ones(B, T, dtype=torch.bool, device=teacher.device)
    elif mask.dtype != torch.bool or tuple(mask.shape) != (B, T):
        raise ValueError(f"mask: expected a bool (B, T) = ({B}, {T}) tensor of valid query rows, got "
                         f"{mask.dtype} {tuple(mask.shape)}")
    if not mask.any():
        raise ValueError("mask: selects no query row; the mean KL over zero rows is undefined")
    # BEGIN EXERCISE 12.1: the attention KL(teacher || student) over the valid query rows
    t = teacher.detach().masked_fill(~mask[:, None, :, None], 0.0)  # masked rows: t = 0, so they add 0
    seen = t > 0
    # log 1 where t = 0: the term is 0 · (0 − 0) = 0 with gradient 0 (log 0 there would give 0 · inf = NaN)
    log_t = torch.log(torch.where(seen, t, 1.0))
    log_s = torch.log(torch.where(seen, student, 1.0))
    return (t * (log_t - log_s)).sum() / (H * int(mask.sum()))
    # END EXERCISE


def value_relation(v: torch.Tensor) -> torch.Tensor:
    """softmax(v vᵀ / √Dh) over the last axis: v (B, H, T, Dh) -> (B, H, T, T). MiniLM's VR.

    The result has v's dtype; the softmax subtracts each row's max: logits far beyond exp's range are fine."""
    _check(v, "v", 4, "(B, H, T, Dh)")
    # BEGIN EXERCISE 12.4: the value relation
    return torch.softmax(v @ v.transpose(-2, -1) / math.sqrt(v.size(-1)), dim=-1)
    # END EXERCISE


def relation(x: torch.Tensor, n_heads: int) -> torch.Tensor:
    """MiniLMv2's relation heads: x (B, T, d) split into n_heads heads of d / n_heads -> (B, n_heads, T, T).

    x is the concatenation of a layer's attention heads (q, k or v before the head split), so re-splitting
    it into n_heads relation heads needs no relation between the model's head count and n_heads. The result
    has x's dtype."""
    _check(x, "x", 3, "(B, T, d)")
    B, T, d = x.shape
    _check_heads(n_heads, d, "d")
    # BEGIN EXERCISE 12.2: the relation heads
    xr = x.view(B, T, n_heads, d // n_heads).transpose(1, 2)  # (B, n_heads, T, d / n_heads)
    scores = xr @ xr.transpose(-2, -1) / math.sqrt(d // n_heads)  # (B, n_heads, T, T)
    return torch.softmax(scores, dim=-1)
    # END EXERCISE


def minilm_v2_loss(teacher_qkv: Sequence[torch.Tensor], student_qkv: Sequence[torch.Tensor], n_heads: int,
                   mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ over Q-Q, K-K, V-V of attention_kl(relation(teacher, n_heads), relation(student, n_heads), mask).

    teacher_qkv: (q, k, v), each (B, T, d_teacher); student_qkv: (q, k, v), each (B, T, d_student). The widths
    may differ; B and T must agree; n_heads must divide both widths."""
    for name, qkv in (("teacher_qkv", teacher_qkv), ("student_qkv", student_qkv)):
        if not isinstance(qkv, (tuple, list)) or len(qkv) != 3:
            raise ValueError(f"{name}: expected a (q, k, v) triple, got {type(qkv).__name__}")
        for x in qkv:
            _check(x, name, 3, "(B, T, d)")
        if not qkv[0].shape == qkv[1].shape == qkv[2].shape:
            raise ValueError(f"{name}: q, k and v must share one (B, T, d) shape, got "
                             f"{[tuple(x.shape) for x in qkv]}")
    (B, T, dt), (Bs, Ts, ds) = teacher_qkv[0].shape, student_qkv[0].shape
    if (B, T) != (Bs, Ts):
        raise ValueError(f"teacher_qkv and student_qkv: must share B and T, got (B, T) = ({B}, {T}) and "
                         f"({Bs}, {Ts})")
    _check_heads(n_heads, dt, "d_teacher")
    _check_heads(n_heads, ds, "d_student")
    # BEGIN EXERCISE 12.3: the MiniLMv2 loss, Q-Q + K-K + V-V
    return sum(attention_kl(relation(t, n_heads), relation(s, n_heads), mask)
               for t, s in zip(teacher_qkv, student_qkv))
    # END EXERCISE


def attention_probs(q: torch.Tensor, k: torch.Tensor, allowed: Optional[torch.Tensor] = None,
                    causal: bool = False) -> torch.Tensor:
    """The weights `attention` multiplies v by: softmax(q kᵀ / √D) over the visible keys, (B, H, Tq, Tk);
    a row with no visible key is zeros (as in nanomodels.attention)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    if causal:
        tri = causal_mask(q.size(-2), k.size(-2), device=q.device)
        allowed = tri if allowed is None else allowed & tri
    if allowed is None:
        return torch.softmax(scores, dim=-1)
    weights = torch.softmax(scores.masked_fill(~allowed, torch.finfo(scores.dtype).min), dim=-1)
    return weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)


class AttentionRecord:
    """One layer's heads from the last forward: q, k, v (B, H, T, Dh); x_q, x_k, x_v (B, T, d), the heads
    concatenated (MiniLMv2's input); probs (B, H, T, T), the attention probabilities."""

    q = k = v = x_q = x_k = x_v = allowed = None
    causal = False

    def __call__(self, q, k, v, allowed, causal):
        self.q, self.k, self.v, self.allowed, self.causal = q, k, v, allowed, causal
        self.x_q, self.x_k, self.x_v = (h.transpose(1, 2).flatten(2) for h in (q, k, v))  # (B, T, H * Dh)

    @property
    def probs(self) -> torch.Tensor:
        return attention_probs(self.q, self.k, self.allowed, self.causal)


@contextmanager
def capture_attention(model, layer: int):
    """`with capture_attention(model, layer=-1) as rec: model(idx)` -> rec holds that block's self-attention.

    model: a Transformer (its `blocks`); layer: a block index (negative counts from the end). The block's
    attention must compute `attention` or `sdpa_attention`: rec.probs is their formula. The tap is removed on
    exit, also after an exception. Tensors keep their graph: run a teacher under torch.no_grad()."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise ValueError(f"model: expected a Transformer with `blocks`, got {type(model).__name__}")
    if isinstance(layer, bool) or not isinstance(layer, int) or not -len(blocks) <= layer < len(blocks):
        raise ValueError(f"layer: must be an integer in [-{len(blocks)}, {len(blocks)}), got {layer!r}")
    attn = blocks[layer].attn
    if not isinstance(attn, MultiHeadAttention) or attn.attn_fn not in (attention, sdpa_attention):
        raise ValueError(f"layer: block {layer}'s attention must be a MultiHeadAttention computing attention "
                         f"or sdpa_attention (rec.probs is their formula), got "
                         f"{getattr(attn, 'attn_fn', attn)!r}")
    if attn.tap is not None:
        raise ValueError(f"layer: block {layer} is already being captured")
    rec = attn.tap = AttentionRecord()
    try:
        yield rec
    finally:
        attn.tap = None


def minilm_loss(teacher_rec: AttentionRecord, student_rec: AttentionRecord,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """MiniLM's L_AT + L_VR from two records (teacher's and student's last layer; equal head counts)."""
    for name, rec in (("teacher_rec", teacher_rec), ("student_rec", student_rec)):
        if getattr(rec, "q", None) is None:
            raise ValueError(f"{name}: expected an AttentionRecord filled by a forward, got {rec!r}")
    if teacher_rec.q.size(1) != student_rec.q.size(1):
        raise ValueError(f"teacher_rec and student_rec: MiniLM needs equal head counts, got "
                         f"{teacher_rec.q.size(1)} and {student_rec.q.size(1)} (MiniLMv2's relation heads "
                         f"do not)")
    l_at = attention_kl(teacher_rec.probs, student_rec.probs, mask)
    return l_at + attention_kl(value_relation(teacher_rec.v), value_relation(student_rec.v), mask)


def logit_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """τ² · mean over positions of KL(softmax(teacher/τ) ‖ softmax(student/τ)), logits (..., V); the teacher
    is detached. The factor τ² is Hinton et al.'s (2015)."""
    _check(teacher_logits, "teacher_logits", None, "(..., V)")
    _check(student_logits, "student_logits", None, "(..., V)")
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(f"teacher_logits and student_logits: expected one shape, got "
                         f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: must be a number > 0, got {temperature!r}")
    log_t = F.log_softmax(teacher_logits.detach() / temperature, dim=-1)
    log_s = F.log_softmax(student_logits / temperature, dim=-1)
    p_t = log_t.exp()
    kl = torch.where(p_t > 0, p_t * (log_t - log_s), 0.0).sum(-1)  # 0 log 0 = 0 (a -inf teacher logit)
    return temperature ** 2 * kl.mean()
