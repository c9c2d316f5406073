# Treats the half-open span (start, end) as closed: the position `end` joins the span's bidirectional block.
import torch

from nanomodels.attention import causal_mask
from nanomodels.masks import _check_length


def semi_causal_mask(n: int, spans) -> torch.Tensor:
    _check_length("n", n)
    span_id = torch.zeros(n, dtype=torch.long)
    for k, (start, end) in enumerate(spans):
        if not (0 <= start < end <= n):
            raise ValueError(f"spans: each (start, end) needs 0 <= start < end <= n = {n}, got {(start, end)}")
        if bool((span_id[start:end] != 0).any()):
            raise ValueError(f"spans: {(start, end)} overlaps an earlier span; spans must be disjoint")
        span_id[start:end + 1] = k + 1
    same_span = (span_id[:, None] == span_id[None, :]) & (span_id[:, None] != 0)
    return causal_mask(n) | same_span
