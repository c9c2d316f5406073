# Reads the mask the wrong way round: hides the keys marked True (= may attend) and keeps the others.
import math
from typing import Optional

import torch

from nanomodels.attention import _combine


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor] = None,
              *, causal: bool = False) -> torch.Tensor:
    allowed = _combine(allowed, causal, q.size(-2), k.size(-2), q.device)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if allowed is None:
        return torch.softmax(scores, dim=-1) @ v
    scores = scores.masked_fill(allowed, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores, dim=-1)
    weights = weights.masked_fill(allowed.all(dim=-1, keepdim=True), 0.0)
    return weights @ v
