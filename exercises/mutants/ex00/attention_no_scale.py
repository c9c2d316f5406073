# Forgets the 1/sqrt(d) scaling: the scores are q·k, so the softmax is too peaked for large heads.
from typing import Optional

import torch

from nanomodels.attention import _combine


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor] = None,
              *, causal: bool = False) -> torch.Tensor:
    allowed = _combine(allowed, causal, q.size(-2), k.size(-2), q.device)
    scores = q @ k.transpose(-2, -1)
    if allowed is None:
        return torch.softmax(scores, dim=-1) @ v
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    weights = weights.masked_fill(~allowed.any(dim=-1, keepdim=True), 0.0)
    return weights @ v
