"""sigma-VAE: the image tokenizer of LatentLM, a VAE whose noise scale is fixed, not learned (arXiv 2412.08635).

A plain VAE (Kingma & Welling, arXiv 1312.6114) encodes x to (mu, log sigma^2) and samples
z = mu + sigma * eps with the KL term KL(N(mu, sigma^2) || N(0, I)) = 1/2 sum(mu^2 + sigma^2 - 1 - log sigma^2).
With the small KL weight a tokenizer needs for sharp reconstructions, sigma shrinks towards 0 ("variance
collapse"): the decoder only ever sees latents within a hair of mu, so an autoregressive model's small errors in
latent space land where the decoder was never trained.

sigma-VAE keeps the noise on. The encoder outputs the mean mu only, and the variance is a fixed random scale:

    z = mu + sigma * eps,    sigma ~ N(0, (C_sigma)^2) drawn once per example,  eps ~ N(0, I)
    L = ||x - Dec(z)||^2 + w_kl * ||mu||^2                     (the "KL" term is MSE(mu, 0), w_kl = 1e-2)

so E[(z - mu)^2] = C_sigma^2 whatever the encoder does. Paper vs official code (microsoft/unilm @ 768a3c8,
LatentLM/tokenizer_models/modeling_sigma_vae.py): sigma = randn(batch) * (std / 0.8) with std = 0.75, i.e.
C_sigma = 0.75 / 0.8; `noise_std` below is that std. The released tokenizer is a large conv/attention VAE for
ImageNet; the one here is a small conv autoencoder for 16x16 images (16 latent patches of `latent_dim` each).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def sigma_vae_sample(mu: Tensor, noise_std: float = 0.75, generator: torch.Generator = None) -> Tensor:
    """z = mu + sigma * eps with sigma ~ N(0, (noise_std / 0.8)^2), one sigma per example (dim 0) of mu."""
    if not noise_std >= 0:
        raise ValueError(f"noise_std: must be >= 0, got {noise_std!r}")
    # BEGIN EXERCISE 9.6: the sigma-VAE sample
    shape = (mu.size(0),) + (1,) * (mu.dim() - 1)  # one sigma per example, broadcast over its latents
    sigma = torch.randn(shape, generator=generator, dtype=mu.dtype, device=mu.device) * (noise_std / 0.8)
    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
    return mu + sigma * eps
    # END EXERCISE


def gaussian_kl(mu: Tensor, logvar: Tensor) -> Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) = 1/2 (mu^2 + sigma^2 - 1 - log sigma^2), summed per example, averaged."""
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


class _ConvAutoencoder(nn.Module):
    """(B, 1, 16, 16) images <-> (B, latent_dim, 4, 4) latents: two stride-2 convolutions each way."""

    def __init__(self, latent_dim: int, out_channels: int, width: int = 32):
        super().__init__()
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim: must be a positive integer, got {latent_dim!r}")
        self.latent_dim = latent_dim
        self.encoder = nn.Sequential(
            nn.Conv2d(1, width, 3, stride=2, padding=1), nn.SiLU(),  # (B, w, 8, 8)
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),  # (B, 2w, 4, 4)
            nn.Conv2d(2 * width, out_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_dim, 2 * width, 1), nn.SiLU(),
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.SiLU(),  # (B, w, 8, 8)
            nn.ConvTranspose2d(width, 1, 4, stride=2, padding=1))  # (B, 1, 16, 16) logits

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, C, 4, 4) -> images (B, 1, 16, 16) in [0, 1]."""
        return torch.sigmoid(self.decoder(z))

    @staticmethod
    def _check(x: Tensor) -> None:
        if x.dim() != 4 or tuple(x.shape[1:]) != (1, 16, 16):
            raise ValueError(f"x: expected images of shape (B, 1, 16, 16), got {tuple(x.shape)}")


class SigmaVAE(_ConvAutoencoder):
    """The encoder gives mu only; `noise_std` (the official std, C_sigma = noise_std / 0.8), `kl_weight` w_kl."""

    def __init__(self, latent_dim: int = 4, noise_std: float = 0.75, kl_weight: float = 1e-2, width: int = 32):
        super().__init__(latent_dim, latent_dim, width)
        if not noise_std >= 0 or not kl_weight >= 0:
            raise ValueError(f"noise_std, kl_weight: must be >= 0, got {noise_std!r}, {kl_weight!r}")
        self.noise_std, self.kl_weight = noise_std, kl_weight

    def encode(self, x: Tensor) -> Tensor:
        """mu (B, C, 4, 4): the latents a LatentLM is trained on."""
        self._check(x)
        return self.encoder(x)

    def loss(self, x: Tensor, generator: torch.Generator = None):
        """(total, reconstruction MSE, the "KL" term MSE(mu, 0))."""
        mu = self.encode(x)
        recon = F.mse_loss(self.decode(sigma_vae_sample(mu, self.noise_std, generator)), x)
        kl = mu.pow(2).mean()
        return recon + self.kl_weight * kl, recon, kl


class PlainVAE(_ConvAutoencoder):
    """The encoder gives (mu, log sigma^2); the KL term is the Gaussian KL, weighted by `kl_weight`."""

    def __init__(self, latent_dim: int = 4, kl_weight: float = 1e-4, width: int = 32):
        super().__init__(latent_dim, 2 * latent_dim, width)
        if not kl_weight >= 0:
            raise ValueError(f"kl_weight: must be >= 0, got {kl_weight!r}")
        self.kl_weight = kl_weight

    def encode(self, x: Tensor) -> Tensor:
        """mu (B, C, 4, 4), as SigmaVAE.encode."""
        return self.encode_stats(x)[0]

    def encode_stats(self, x: Tensor):
        """(mu, logvar), each (B, C, 4, 4)."""
        self._check(x)
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(-30.0, 20.0)

    def loss(self, x: Tensor, generator: torch.Generator = None):
        """(total, reconstruction MSE, KL per image)."""
        mu, logvar = self.encode_stats(x)
        eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype, device=mu.device)
        recon = F.mse_loss(self.decode(mu + (0.5 * logvar).exp() * eps), x)
        kl = gaussian_kl(mu, logvar)
        return recon + self.kl_weight * kl, recon, kl


def latents_to_sequence(z: Tensor) -> Tensor:
    """(B, C, H, W) latent map -> (B, H*W, C) sequence of latent patches in raster order."""
    return z.flatten(2).transpose(1, 2)


def sequence_to_latents(seq: Tensor, height: int = 4) -> Tensor:
    """(B, H*W, C) -> (B, C, H, W), the inverse of latents_to_sequence."""
    B, L, C = seq.shape
    return seq.transpose(1, 2).reshape(B, C, height, L // height)
