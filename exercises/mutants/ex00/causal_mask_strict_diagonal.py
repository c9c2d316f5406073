# Off by one on the diagonal: key_pos < query_pos hides each position from itself.
from typing import Optional

import torch


def causal_mask(n_queries: int, n_keys: Optional[int] = None, device=None) -> torch.Tensor:
    n_keys = n_queries if n_keys is None else n_keys
    if n_keys < n_queries:
        raise ValueError(f"causal_mask: n_keys ({n_keys}) must be >= n_queries ({n_queries})")
    query_pos = torch.arange(n_queries, device=device)[:, None] + (n_keys - n_queries)
    key_pos = torch.arange(n_keys, device=device)[None, :]
    return key_pos < query_pos
