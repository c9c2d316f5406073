# Puts the inner norm after fc2, over d instead of the feed-forward width d_ff.
import torch
import torch.nn.functional as F


def subln_ffn(x: torch.Tensor, fc1, inner_norm, fc2) -> torch.Tensor:
    return inner_norm(fc2(F.gelu(fc1(x))))
