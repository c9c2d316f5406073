# Uses gain 1 / beta (torchscale divides by init_scale = 1 / beta; dividing by beta itself up-scales).
import torch.nn as nn


def deepnorm_init_(model: nn.Module, beta: float) -> nn.Module:
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta!r}")
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("v_proj", "out_proj", "fc1", "fc2"):
            nn.init.xavier_normal_(module.weight, gain=1 / beta)
        elif leaf in ("q_proj", "k_proj"):
            nn.init.xavier_normal_(module.weight, gain=1.0)
    return model
