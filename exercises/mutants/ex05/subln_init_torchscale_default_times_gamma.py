# Multiplies the existing (non-xavier) init by gamma, as torchscale does, instead of xavier normal with gain gamma.
import torch
import torch.nn as nn


def subln_init_(model: nn.Module, gamma: float) -> nn.Module:
    if not gamma > 0:
        raise ValueError(f"gamma: must be > 0, got {gamma!r}")
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("v_proj", "out_proj", "fc1", "fc2"):
                module.weight.mul_(gamma)
    return model
