# Forgets to zero the rows that see no key: a fully masked query averages every value uniformly.
import math
from typing import Optional

import torch

from nanomodels.attention import _combine


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor] = None,
              *, causal: bool = False) -> torch.Tensor:
    allowed = _combine(allowed, causal, q.size(-2), k.size(-2), q.device)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))
    if allowed is not None:
        scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1) @ v
