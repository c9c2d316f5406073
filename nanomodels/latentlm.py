"""LatentLM on the core: continuous latents in through an embedding part, the diffusion head as the head
(arXiv 2412.08635; the head, schedules and samplers are in nanomodels/diffusion.py, the idea's main file).

    inputs  [class, z_1, ..., z_{L-1}]   (a class or null-class embedding, then projected latents)
    h_i = causal Transformer(inputs)_i   predicts z_i through the diffusion head's denoising loss

Classifier-free guidance: the class is replaced by the null class with probability `class_dropout` in training;
sampling mixes conditional and unconditional noise estimates. Sampling runs autoregressively with the KV cache.
"""

from functools import partial

import torch
import torch.nn as nn

from nanomodels.diffusion import DiffusionHead
from nanomodels.transformer import Transformer

Tensor = torch.Tensor


class LatentEmbedding(nn.Module):
    """The embed part: continuous latents (B, T, C) -> Linear(C, d) + learned positions, with `segments` (B, T)
    naming what each position holds: a class id in [0, num_classes) or the null class num_classes (the
    BOS/condition slot, whose latent input is ignored), or num_classes + 1 for a latent."""

    def __init__(self, config, *, latent_dim: int, num_classes: int):
        super().__init__()
        self.latent_id = num_classes + 1
        self.proj = nn.Linear(latent_dim, config.d_model)
        self.cond = nn.Embedding(num_classes + 1, config.d_model)  # the classes and the null class (CFG)
        self.wpe = nn.Embedding(config.block_size, config.d_model)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, inputs: Tensor, positions: Tensor, segments: Tensor = None) -> Tensor:
        if segments is None or segments.shape != inputs.shape[:2]:
            raise ValueError(f"segments: LatentEmbedding needs (B, T) = {tuple(inputs.shape[:2])} condition ids")
        latent = (segments == self.latent_id)[..., None]  # (B, T, 1)
        x = torch.where(latent, self.proj(inputs), self.cond(segments.clamp(max=self.latent_id - 1)))
        return self.drop(x + self.wpe(positions))


class LatentLM(nn.Module):
    """A causal Transformer over latents z_1..z_L with the diffusion head: inputs [class, z_1 .. z_{L-1}], h_i
    predicts z_i. `class_dropout` replaces the class by the null class in training (for CFG); `head` keyword
    arguments go to DiffusionHead; `parts` to the core Transformer."""

    def __init__(self, config, *, latent_dim: int, num_classes: int, class_dropout: float = 0.1, head=None,
                 **parts):
        super().__init__()
        if not 0 <= class_dropout < 1:
            raise ValueError(f"class_dropout: must be in [0, 1), got {class_dropout!r}")
        self.latent_dim, self.num_classes, self.class_dropout = latent_dim, num_classes, class_dropout
        self.model = Transformer(config, embed=partial(LatentEmbedding, latent_dim=latent_dim,
                                                       num_classes=num_classes),
                                 head=partial(DiffusionHead, latent_dim=latent_dim, **(head or {})), **parts)
        self.model.head.zero_init_()  # the core's GPT-2 init touched every Linear
        self.latent_id = num_classes + 1

    def _inputs(self, z: Tensor, labels: Tensor):
        """Shift right behind the condition slot: inputs (B, L, C), segments (B, L)."""
        inputs = torch.cat([torch.zeros_like(z[:, :1]), z[:, :-1]], dim=1)  # (B, L, C): h_i sees z_<i only
        segments = torch.full(z.shape[:2], self.latent_id, dtype=torch.long, device=z.device)
        segments[:, 0] = labels
        return inputs, segments

    def hidden(self, z: Tensor, labels: Tensor) -> Tensor:
        """h (B, L, d): h_i = f(class, z_<i)."""
        inputs, segments = self._inputs(z, labels)
        return self.model.hidden(inputs, segments=segments)

    def forward(self, z: Tensor, labels: Tensor, generator: torch.Generator = None) -> Tensor:
        """The diffusion loss of latents z (B, L, C) given class labels (B,)."""
        if z.dim() != 3 or z.size(-1) != self.latent_dim:
            raise ValueError(f"z: expected (B, L, {self.latent_dim}), got {tuple(z.shape)}")
        if labels.shape != z.shape[:1] or int(labels.min()) < 0 or int(labels.max()) > self.num_classes:
            raise ValueError(f"labels: expected ({z.size(0)},) ids in [0, num_classes={self.num_classes}]")
        if self.training and self.class_dropout > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.class_dropout
            labels = labels.masked_fill(drop, self.num_classes)
        return self.model.head.loss(self.hidden(z, labels), z, generator=generator)

    @torch.no_grad()
    def sample(self, labels: Tensor, length: int, *, num_steps: int = 50, sampler: str = "dpm",
               cfg_scale: float = 1.0, generator: torch.Generator = None, use_cache: bool = True) -> Tensor:
        """Latents (B, length, C) for class labels (B,), one token at a time; each token by `sampler` over
        num_steps, with classifier-free guidance when cfg_scale != 1 (the null class as the unconditional
        branch). With use_cache the backbone reads only the newest latent and reuses past keys and values."""
        head, guided = self.model.head, cfg_scale != 1.0
        B = labels.size(0)
        cond = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels  # (B or 2B,)
        p = next(self.parameters())
        z = torch.zeros(cond.size(0), 0, self.latent_dim, dtype=p.dtype, device=p.device)
        cache = [{} for _ in self.model.blocks] if use_cache else None
        for i in range(length):
            if use_cache:
                new = z.new_zeros(z.size(0), 1, self.latent_dim) if i == 0 else z[:, -1:]
                seg = cond[:, None] if i == 0 else torch.full_like(cond[:, None], self.latent_id)
                c = head(self.model.hidden(new, segments=seg, cache=cache))[:, -1]
            else:
                nxt = torch.cat([z, z.new_zeros(z.size(0), 1, self.latent_dim)], dim=1)  # placeholder: next latent
                c = head(self.hidden(nxt, cond))[:, -1]
            c_u = c[B:] if guided else None
            x = head.sample(c[:B], num_steps, sampler, c_uncond=c_u, cfg_scale=cfg_scale, generator=generator)
            z = torch.cat([z, (torch.cat([x, x]) if guided else x)[:, None]], dim=1)
        return z[:B]
