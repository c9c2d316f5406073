# Applies the inner norm to the input (a second Pre-LN over d) instead of inside the feed-forward.
import torch
import torch.nn.functional as F


def subln_ffn(x: torch.Tensor, fc1, inner_norm, fc2) -> torch.Tensor:
    return fc2(F.gelu(fc1(inner_norm(x))))
