# Applies gain gamma to q_proj and k_proj too (the paper keeps them at gain 1).
import torch.nn as nn


def subln_init_(model: nn.Module, gamma: float) -> nn.Module:
    if not gamma > 0:
        raise ValueError(f"gamma: must be > 0, got {gamma!r}")
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("v_proj", "out_proj", "fc1", "fc2", "q_proj", "k_proj"):
            nn.init.xavier_normal_(module.weight, gain=gamma)
    return model
