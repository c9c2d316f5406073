# Applies the mask after the softmax: masked keys still enter the normaliser, so the weights do not sum to 1.
import math
from typing import Optional

import torch

from nanomodels.attention import _combine


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: Optional[torch.Tensor] = None,
              *, causal: bool = False) -> torch.Tensor:
    allowed = _combine(allowed, causal, q.size(-2), k.size(-2), q.device)
    weights = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1)), dim=-1)
    if allowed is not None:
        weights = weights.masked_fill(~allowed, 0.0)
    return weights @ v
