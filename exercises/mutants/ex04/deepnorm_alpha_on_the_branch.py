# Puts alpha on the branch, LN(x + alpha G(x)), like a well-known annotated implementation.
import torch


def deepnorm(x: torch.Tensor, g: torch.Tensor, alpha: float, norm) -> torch.Tensor:
    return norm(x + alpha * g)
