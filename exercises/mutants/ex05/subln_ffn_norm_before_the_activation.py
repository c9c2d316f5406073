# Normalizes before the activation, W2 GELU(LN(W1 x)), instead of between the activation and W2.
import torch
import torch.nn.functional as F


def subln_ffn(x: torch.Tensor, fc1, inner_norm, fc2) -> torch.Tensor:
    return fc2(F.gelu(inner_norm(fc1(x))))
