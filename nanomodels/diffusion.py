"""LatentLM: next-token diffusion, a causal Transformer whose head is a small diffusion model (arXiv 2412.08635).

A causal Transformer reads continuous latents x_1 .. x_n (shifted right behind a BOS/class embedding) and emits
h_i = f(x_<i). A small head models p(x_i | h_i) by denoising diffusion instead of a softmax:

    x_i^t = sqrt(abar_t) x_i + sqrt(1 - abar_t) eps,    eps ~ N(0, I)              the forward process
    L = E_{t, eps} || eps - eps_theta(x_i^t, t, h_i) ||^2                           eps-prediction
    (v-prediction: target v = sqrt(abar_t) eps - sqrt(1 - abar_t) x_i)

The schedule is improved-DDPM cosine with T = 1000 steps, abar(tau) = cos^2(((tau + 0.008) / 1.008) pi / 2),
beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999), alphas_cumprod_t = prod_{s<=t} (1 - beta_s).

Sampling starts from N(0, I) and runs a deterministic sampler conditioned on h_i; the sampled latent is
appended and the backbone continues with its KV cache. Two samplers, both ending at abar = 1 (x_0 itself):
  DDIM (eta = 0):   x0 = (x_t - sqrt(1 - a_t) eps) / sqrt(a_t);  x_s = sqrt(a_s) x0 + sqrt(1 - a_s) eps
  DPM-Solver++(2M) (arXiv 2211.01095, Alg. 2), lambda = log(alpha / sigma), h_i = lambda_i - lambda_{i-1}:
      x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (e^{-h_i} - 1) D_i,
      D_i = (1 + 1/(2 r_i)) x0_{i-1} - 1/(2 r_i) x0_{i-2},  r_i = h_{i-1} / h_i   (D_1 = x0_0: first order)
  Time grid: LatentLM's (LatentLM/schedule/dpm_solver.py = diffusers' DPMSolverMultistepScheduler defaults):
  round(linspace(0, T-1, n+1))[::-1][:-1], then a first-order step to sigma = 0 (x = x0). grid="endpoint" (T-1 .. 0,
  the older grid) ends on a second-order step to lambda_0 = 5.05; tests/test_dpm_grid.py measures both.

The head (DiT/MAR-style adaLN MLP): c = cond(h_i) + TimestepEmbed(t); blocks x + gate * MLP(LN(x) (1 + scale)
+ shift) with (shift, scale, gate) = Linear(SiLU(c)); a final adaLN + Linear, the modulation and the final linear
zero-initialized (the head outputs 0 at init). Training draws t per token, `batch_mul` draws per target.

Paper vs official code (microsoft/unilm @ 768a3c8, LatentLM/): only the ImageNet class-conditional part is
released: t per token (torch.multinomial), batch_mul = 4, latents normalized by scale = 1/std and bias = -mean
of the first batch, class dropout 0.1, DPM-Solver with 250 steps and CFG 4. Its head uses RMSNorm and SwiGLU;
this file LayerNorm (DiT/MAR's adaLN, the fused kernel's `LN(x)(1 + scale) + shift`) and a SiLU MLP.
"""

import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

Tensor = torch.Tensor


def cosine_schedule(num_steps: int = 1000) -> Tensor:
    """betas (T,) float64 of the improved-DDPM cosine schedule, T = num_steps, each capped at 0.999."""
    if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
        raise ValueError(f"num_steps: must be a positive integer (T), got {num_steps!r}")
    # BEGIN EXERCISE 9.1: the cosine schedule
    def abar(tau):
        return torch.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2

    t = torch.arange(num_steps, dtype=torch.float64)
    return (1 - abar((t + 1) / num_steps) / abar(t / num_steps)).clamp(max=0.999)
    # END EXERCISE


def alpha_bar(betas: Tensor) -> Tensor:
    """alphas_cumprod: abar_t = prod_{s <= t} (1 - beta_s), same shape and dtype as betas."""
    return torch.cumprod(1 - betas, dim=0)


def _check_sampler(x_T, alphas_cumprod, num_steps) -> None:
    if not isinstance(x_T, Tensor) or x_T.dim() < 1:
        raise ValueError(f"x_T: must be a tensor with a leading batch dimension, got {type(x_T).__name__}")
    if not isinstance(alphas_cumprod, Tensor) or alphas_cumprod.dim() != 1:
        raise ValueError("alphas_cumprod: must be a 1-D tensor (T,)")
    if not isinstance(num_steps, int) or not 1 <= num_steps <= alphas_cumprod.numel():
        raise ValueError(f"num_steps: must be an integer in [1, T={alphas_cumprod.numel()}], got {num_steps!r}")


def sampling_timesteps(num_train_steps: int, num_steps: int) -> list:
    """num_steps distinct timesteps from T-1 down to 0, evenly spaced (rounded); [T-1] for one step."""
    return torch.linspace(num_train_steps - 1, 0, num_steps, dtype=torch.float64).round().long().tolist()


def dpm_solver_timesteps(num_train_steps: int, num_steps: int, grid: str = "diffusers") -> list:
    """The num_steps solver timesteps: "diffusers" T-1 .. round((T-1)/n) (the last step then goes to sigma = 0),
    "endpoint" sampling_timesteps (T-1 .. 0)."""
    if grid not in ("diffusers", "endpoint"):
        raise ValueError(f"grid: must be 'diffusers' or 'endpoint', got {grid!r}")
    if grid == "endpoint":
        return sampling_timesteps(num_train_steps, num_steps)
    if not 1 <= num_steps <= max(1, num_train_steps - 1):
        raise ValueError(f"num_steps: must be in [1, T-1={num_train_steps - 1}] on the diffusers grid, got {num_steps!r}")
    return torch.linspace(0, num_train_steps - 1, num_steps + 1, dtype=torch.float64).round().long().flip(0)[:-1].tolist()


def _eps_at(eps_fn, x, t: int) -> Tensor:
    return eps_fn(x, torch.full((x.size(0),), t, dtype=torch.long, device=x.device))


def ddim_sample(eps_fn: Callable, x_T: Tensor, alphas_cumprod: Tensor, num_steps: int) -> Tensor:
    """Deterministic DDIM (eta = 0) from x_T over num_steps timesteps T-1 .. 0; returns the sample x_0.

    eps_fn(x_t, t) -> eps_hat with t a LongTensor (batch,). After the step at the last timestep abar = 1, so
    the result is that step's predicted x_0.
    """
    _check_sampler(x_T, alphas_cumprod, num_steps)
    a = alphas_cumprod.to(x_T.dtype)
    steps = sampling_timesteps(a.numel(), num_steps)
    # BEGIN EXERCISE 9.2: the DDIM sampler
    x = x_T
    for i, t in enumerate(steps):
        eps = _eps_at(eps_fn, x, t)
        a_prev = a[steps[i + 1]] if i + 1 < len(steps) else a.new_tensor(1.0)  # abar = 1 after the last step
        x0 = (x - (1 - a[t]).sqrt() * eps) / a[t].sqrt()
        x = a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps
    return x
    # END EXERCISE


def dpm_solver_sample(eps_fn: Callable, x_T: Tensor, alphas_cumprod: Tensor, num_steps: int, *,
                      grid: str = "diffusers") -> Tensor:
    """DPM-Solver++(2M) from x_T over dpm_solver_timesteps(T, num_steps, grid), first order at the first step
    and at the last (to sigma = 0, returning that step's x0); the same eps_fn contract as ddim_sample."""
    _check_sampler(x_T, alphas_cumprod, num_steps)
    a = alphas_cumprod.to(x_T.dtype)
    steps = dpm_solver_timesteps(a.numel(), num_steps, grid)
    alpha, sigma = a.sqrt(), (1 - a).sqrt()
    lam = alpha.log() - sigma.log()  # lambda_t, the half log-SNR
    x, x0_prev, h_prev = x_T, None, None
    for i, t in enumerate(steps):
        x0 = (x - sigma[t] * _eps_at(eps_fn, x, t)) / alpha[t]  # the data prediction
        if i + 1 == len(steps):
            return x0  # first-order step to sigma = 0: x = alpha * x0 with alpha = 1
        s = steps[i + 1]
        h = lam[s] - lam[t]
        if x0_prev is None:
            d = x0
        else:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = sigma[s] / sigma[t] * x - alpha[s] * torch.expm1(-h) * d
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = {"ddim": ddim_sample, "dpm": dpm_solver_sample}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (N,) -> (N, dim): [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: LN(x) (1 + scale) + shift, LN without its own affine (the condition supplies it)."""
    # BEGIN EXERCISE 9.3: the adaLN modulation
    return F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift
    # END EXERCISE


def adaln_modulation(width: int, chunks: int) -> nn.Sequential:
    """SiLU then Linear(width, chunks * width), zero-initialized (weight and bias): at init every shift, scale
    and gate is 0, so each block is the identity and the final layer outputs 0."""
    # BEGIN EXERCISE 9.4: the zero-initialized adaLN modulation
    ada = nn.Sequential(nn.SiLU(), nn.Linear(width, chunks * width))
    nn.init.zeros_(ada[1].weight)
    nn.init.zeros_(ada[1].bias)
    return ada
    # END EXERCISE


class AdaLNBlock(nn.Module):
    """x + gate * MLP(modulate(x, shift, scale)) with (shift, scale, gate) = Linear(SiLU(c))."""

    def __init__(self, width: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.ada = adaln_modulation(width, 3)

    def forward(self, x, c):
        shift, scale, gate = self.ada(c).chunk(3, dim=-1)
        return x + gate * self.mlp(modulate(x, shift, scale))


class FinalLayer(nn.Module):
    """Linear(modulate(x, shift, scale)) -> (N, C); the modulation and the linear are zero-initialized."""

    def __init__(self, width: int, out_dim: int):
        super().__init__()
        self.ada = adaln_modulation(width, 2)
        self.linear = nn.Linear(width, out_dim)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


def q_sample(x0: Tensor, alphas_cumprod: Tensor, generator: torch.Generator = None):
    """The forward process for rows x0 (N, C): (x_t, t, eps) with one t ~ U{0..T-1} per row (per token)."""
    # BEGIN EXERCISE 9.5: per-token timesteps and the noisy latent
    t = torch.randint(0, alphas_cumprod.numel(), (x0.size(0),), generator=generator, device=x0.device)
    a = alphas_cumprod.to(x0.dtype)[t][:, None]
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device=x0.device)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps
    # END EXERCISE


def diffusion_loss(head: nn.Module, h: Tensor, targets: Tensor, outputs: Tensor = None,
                   generator: torch.Generator = None) -> Tensor:
    """The diffusion head's training loss for backbone states h (B, L, d) and targets (B, L, C): a scalar.

    head: a DiffusionHead. The conditions c = head(h) (B, L, width) are computed once, or taken from `outputs`
    when given. Each target and its condition are repeated batch_mul times, the copies of one token adjacent
    (repeat_interleave): rows x0 (B*L*mul, C) and c (B*L*mul, width). One call q_sample(x0,
    head.alphas_cumprod, generator) draws (x_t, t, eps), a timestep per row. The network output
    head.predict(x_t, t, c) is compared with eps (head.prediction == "eps") or with
    v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0 ("v"): the mean squared error over all elements.
    """
    if targets.shape[:-1] != h.shape[:-1] or targets.size(-1) != head.latent_dim:
        raise ValueError(f"targets: expected shape {tuple(h.shape[:-1]) + (head.latent_dim,)}, "
                         f"got {tuple(targets.shape)}")
    # BEGIN EXERCISE 9.8: the diffusion head's training loss, end to end
    c = head(h) if outputs is None else outputs
    # the backbone ran once; each target gets batch_mul fresh (t, eps) draws
    c = c.reshape(-1, head.width).repeat_interleave(head.batch_mul, dim=0)  # (B*L*mul, width)
    x0 = targets.reshape(-1, head.latent_dim).repeat_interleave(head.batch_mul, dim=0)  # (B*L*mul, C)
    x_t, t, noise = q_sample(x0, head.alphas_cumprod, generator)
    a = head.alphas_cumprod.to(x0.dtype)[t][:, None]
    target = noise if head.prediction == "eps" else a.sqrt() * noise - (1 - a).sqrt() * x0
    return F.mse_loss(head.predict(x_t, t, c), target)
    # END EXERCISE


class DiffusionHead(nn.Module):
    """The head part: h (B, L, d) -> conditions c (B, L, width); `loss(h, targets)` the per-token diffusion loss.

    latent_dim = C (each x_i is (C,)); depth = the number of adaLN blocks; batch_mul = noise draws per target;
    prediction = "eps" or "v"; num_train_steps = T of the cosine schedule.
    """

    def __init__(self, config, *, linear: type = nn.Linear, latent_dim: int, width: int = 128, depth: int = 3,
                 batch_mul: int = 4, prediction: str = "eps", num_train_steps: int = 1000):
        super().__init__()
        for name, value in (("latent_dim", latent_dim), ("width", width), ("depth", depth),
                            ("batch_mul", batch_mul)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: must be a positive integer, got {value!r}")
        if width % 2:
            raise ValueError(f"width: must be even (sin/cos timestep embedding), got {width}")
        if prediction not in ("eps", "v"):
            raise ValueError(f"prediction: must be 'eps' or 'v', got {prediction!r}")
        self.latent_dim, self.width, self.batch_mul, self.prediction = latent_dim, width, batch_mul, prediction
        self.register_buffer("alphas_cumprod", alpha_bar(cosine_schedule(num_train_steps)).float(), persistent=False)
        self.cond = linear(config.d_model, width)  # after an affine-free RMSNorm, as the official condition_layer
        self.time_embed = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.x_embed = nn.Linear(latent_dim, width)
        self.blocks = nn.ModuleList(AdaLNBlock(width) for _ in range(depth))
        self.final = FinalLayer(width, latent_dim)

    def zero_init_(self) -> "DiffusionHead":
        """Zero the adaLN modulations and the final linear again (after a model-wide init such as GPT-2's)."""
        for module in self.modules():
            if isinstance(module, (AdaLNBlock, FinalLayer)):
                nn.init.zeros_(module.ada[1].weight)
                nn.init.zeros_(module.ada[1].bias)
        nn.init.zeros_(self.final.linear.weight)
        nn.init.zeros_(self.final.linear.bias)
        return self

    def forward(self, h: Tensor) -> Tensor:
        return self.cond(F.rms_norm(h, h.shape[-1:]))

    def predict(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """The network output (eps or v) for noisy latents x_t (N, C), timesteps t (N,), conditions c (N, width)."""
        c = c + self.time_embed(timestep_embedding(t, self.width).to(x_t.dtype))
        x = self.x_embed(x_t)
        for block in self.blocks:
            x = block(x, c)
        return self.final(x, c)

    def eps(self, x_t: Tensor, t: Tensor, c: Tensor) -> Tensor:
        """eps_hat, converted from v when prediction = "v": eps = sqrt(a) v + sqrt(1 - a) x_t."""
        out = self.predict(x_t, t, c)
        if self.prediction == "eps":
            return out
        a = self.alphas_cumprod.to(x_t.dtype)[t][:, None]
        return a.sqrt() * out + (1 - a).sqrt() * x_t

    def loss(self, h: Tensor, targets: Tensor, outputs: Tensor = None, generator: torch.Generator = None) -> Tensor:
        """`diffusion_loss`: the MSE over B * batch_mul * L noisy copies of targets (B, L, C)."""
        return diffusion_loss(self, h, targets, outputs, generator)

    @torch.no_grad()
    def sample(self, c: Tensor, num_steps: int = 50, sampler: str = "dpm", c_uncond: Tensor = None,
               cfg_scale: float = 1.0, generator: torch.Generator = None) -> Tensor:
        """One latent per condition c (N, width) -> (N, C); with c_uncond, CFG: eps_u + cfg_scale (eps_c - eps_u)."""
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler: must be one of {sorted(SAMPLERS)}, got {sampler!r}")
        x_T = torch.randn(c.size(0), self.latent_dim, generator=generator, device=c.device, dtype=c.dtype)
        if c_uncond is None:
            eps_fn = lambda x, t: self.eps(x, t, c)  # noqa: E731
        else:
            def eps_fn(x, t):
                e_c, e_u = self.eps(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, c_uncond])).chunk(2)
                return e_u + cfg_scale * (e_c - e_u)
        return SAMPLERS[sampler](eps_fn, x_T, self.alphas_cumprod.to(c.dtype), num_steps)
