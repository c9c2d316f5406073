# Normalizes the stream before adding the branch, LN(alpha x) + G(x): a Pre-LN-like sum, not DeepNorm.
import torch


def deepnorm(x: torch.Tensor, g: torch.Tensor, alpha: float, norm) -> torch.Tensor:
    return norm(alpha * x) + g
