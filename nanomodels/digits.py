"""The procedural digits of chapter 09 in and out of a LatentLM: encoding images to normalized latent sequences,
sampling digits of given classes, and writing them as one picture (row k = digit k).

The normalization is the official code's: z = (mu + bias) * scale on the sigma-VAE's means, undone before decoding.
"""

from pathlib import Path

import torch

from nanomodels.latentlm import LatentLM
from nanomodels.sigma_vae import SigmaVAE, latents_to_sequence, sequence_to_latents

NUM_CLASSES = 10  # the digits 0-9
LATENT_TOKENS = 16  # a 16x16 image -> a 4x4 map of latent patches


@torch.no_grad()
def encode_digits(vae: SigmaVAE, images: torch.Tensor, norm: dict) -> torch.Tensor:
    """Images (n, 1, 16, 16) -> normalized latent sequences (n, 16, C): (mu + bias) * scale."""
    return (latents_to_sequence(vae.encode(images)) + norm["bias"]) * norm["scale"]


@torch.no_grad()
def generate_digits(lm: LatentLM, vae: SigmaVAE, norm: dict, labels: torch.Tensor, *, cfg_scale: float,
                    num_steps: int, sampler: str, generator: torch.Generator) -> torch.Tensor:
    """Images (n, 1, 16, 16) in [0, 1] for class labels (n,): latents token by token, un-normalized, decoded."""
    seq = lm.sample(labels, LATENT_TOKENS, num_steps=num_steps, sampler=sampler, cfg_scale=cfg_scale,
                    generator=generator)
    return vae.decode(sequence_to_latents(seq / norm["scale"] - norm["bias"]))


def image_grid(images: torch.Tensor, rows: int, pad: int = 1, zoom: int = 4) -> torch.Tensor:
    """(rows * cols, 1, h, w) images, row-major -> one gray (H, W) picture with `pad`-pixel gray borders,
    H = (rows (h + pad) + pad) zoom, W = (cols (w + pad) + pad) zoom (each pixel drawn zoom x zoom)."""
    n, _, h, w = images.shape
    cols = n // rows
    grid = torch.full((rows * (h + pad) + pad, cols * (w + pad) + pad), 0.5)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[pad + r * (h + pad):(r + 1) * (h + pad), pad + c * (w + pad):(c + 1) * (w + pad)] = images[i, 0]
    return grid.repeat_interleave(zoom, 0).repeat_interleave(zoom, 1)


def save_grid(grid: torch.Tensor, path: Path) -> None:
    from matplotlib.image import imsave

    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, grid.clamp(0, 1).numpy(), cmap="gray", vmin=0.0, vmax=1.0)


def grid_name(cfg_scale: float, sampler: str, num_steps: int, seed: int) -> str:
    return f"samples_cfg{cfg_scale:g}_{sampler}{num_steps}_seed{seed}.png"


def write_samples(lm: LatentLM, vae: SigmaVAE, norm: dict, path: Path, *, cfg_scale: float, num_steps: int,
                  sampler: str, per_class: int, seed: int) -> Path:
    """Generate per_class digits of each class (row k = digit k) and write them to path as a PNG grid."""
    device = next(lm.parameters()).device
    labels = torch.arange(NUM_CLASSES, device=device).repeat_interleave(per_class)
    images = generate_digits(lm, vae, norm, labels, cfg_scale=cfg_scale, num_steps=num_steps, sampler=sampler,
                             generator=torch.Generator(device=device).manual_seed(seed))
    save_grid(image_grid(images.cpu(), NUM_CLASSES), path)
    return path
