# Also re-initializes the embeddings and the LM head with gain beta (the paper leaves them alone).
import torch.nn as nn


def deepnorm_init_(model: nn.Module, beta: float) -> nn.Module:
    if not beta > 0:
        raise ValueError(f"beta: must be > 0, got {beta!r}")
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in ("v_proj", "out_proj", "fc1", "fc2", "wte", "wpe", "proj"):
            nn.init.xavier_normal_(module.weight, gain=beta)
        elif leaf in ("q_proj", "k_proj"):
            nn.init.xavier_normal_(module.weight, gain=1.0)
    return model
