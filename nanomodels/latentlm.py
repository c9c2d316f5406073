"""LatentLM on the core: continuous latents in through an embedding part, the diffusion head as the head
(arXiv 2412.08635; the head, schedules and samplers are in nanomodels/diffusion.py, the idea's main file).

    inputs  [class, z_1, ..., z_{L-1}]   (a class or null-class embedding, then projected latents)
    h_i = causal Transformer(inputs)_i   predicts z_i through the diffusion head's denoising loss

Classifier-free guidance: the class is replaced by the null class with probability `class_dropout` in training;
sampling mixes conditional and unconditional noise estimates. Sampling runs autoregressively with the KV cache.

GraphedSampler runs one token's solver loop (num_steps head evaluations on a fixed batch) from static buffers
with precomputed timesteps and solver coefficients, so that on CUDA it can be captured once as a CUDA graph and
replayed; LatentLM.sample_graphed is `sample` with that loop.
"""

from functools import partial

import torch
import torch.nn as nn

from nanomodels.diffusion import SAMPLERS, DiffusionHead, dpm_solver_timesteps, sampling_timesteps
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

    @torch.no_grad()
    def sample_graphed(self, labels: Tensor, length: int, *, num_steps: int = 50, sampler: str = "dpm",
                       cfg_scale: float = 1.0, generator: torch.Generator = None, capture: bool = None) -> Tensor:
        """`sample` with the KV cache, each token's solver loop run by one GraphedSampler (a CUDA graph replayed
        per token on CUDA; eager on the CPU or with capture=False). The starting noise is drawn outside the loop
        by the same torch.randn call as DiffusionHead.sample, so with the same generator the latents are those
        of `sample`."""
        head, guided = self.model.head, cfg_scale != 1.0
        B = labels.size(0)
        cond = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels  # (B or 2B,)
        p = next(self.parameters())
        z = torch.zeros(cond.size(0), 0, self.latent_dim, dtype=p.dtype, device=p.device)
        cache = [{} for _ in self.model.blocks]
        loop = GraphedSampler(head, (B, self.latent_dim), num_steps, solver=sampler, cfg=cfg_scale, capture=capture)
        for i in range(length):
            new = z.new_zeros(z.size(0), 1, self.latent_dim) if i == 0 else z[:, -1:]
            seg = cond[:, None] if i == 0 else torch.full_like(cond[:, None], self.latent_id)
            c = head(self.model.hidden(new, segments=seg, cache=cache))[:, -1]  # (B or 2B, width)
            noise = torch.randn(B, self.latent_dim, generator=generator, device=c.device, dtype=c.dtype)
            x = loop(c, noise)  # the static output: consumed by the cat below before the next call
            z = torch.cat([z, (torch.cat([x, x]) if guided else x)[:, None]], dim=1)
        return z[:B]


class GraphedSampler:
    """One token's diffusion sampling loop in a form that can be captured as a CUDA graph, for a fixed batch.

    GraphedSampler(head, (N, C), num_steps, solver="dpm" or "ddim", cfg=1.0); calling it with cond (N, width),
    or (2N, width) when cfg != 1 (the conditional rows, then the unconditional ones, as LatentLM.sample stacks
    them), and noise x_T (N, C) drawn by the caller returns x_0 (N, C): what
    head.sample(cond[:N], num_steps, solver, c_uncond=cond[N:], cfg_scale=cfg) returns from that noise.

    The inputs are copied into static buffers; `step` reads only those buffers, the timesteps (num_steps, rows)
    and the solver coefficients (num_steps, k) computed here, and writes the static output `out`: no Python
    branch on a tensor value, no .item(), every shape fixed. On CUDA (capture None or True) the first call runs
    `step` `warmup` times on a side stream, captures it with torch.cuda.graph and replays the graph on every
    call; on the CPU, or with capture=False, `step` runs eagerly. The returned tensor is `out` itself, which the
    next call overwrites (clone it to keep it).
    """

    def __init__(self, head: DiffusionHead, batch_shape, num_steps: int, solver: str = "dpm", cfg: float = 1.0,
                 *, capture: bool = None, warmup: int = 3):
        if solver not in SAMPLERS:
            raise ValueError(f"solver: must be one of {sorted(SAMPLERS)}, got {solver!r}")
        if len(batch_shape) != 2 or batch_shape[1] != head.latent_dim or batch_shape[0] < 1:
            raise ValueError(f"batch_shape: expected (N, latent_dim={head.latent_dim}), got {tuple(batch_shape)}")
        T = head.alphas_cumprod.numel()
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or not 1 <= num_steps <= T:
            raise ValueError(f"num_steps: must be an integer in [1, T={T}], got {num_steps!r}")
        p = next(head.parameters())
        if capture is None:
            capture = p.device.type == "cuda"
        elif capture and p.device.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need the head on a CUDA device, it is on {p.device}; "
                             "use capture=False (or None) to run the same static loop eagerly")
        self.head, self.solver, self.cfg, self.num_steps = head, solver, float(cfg), num_steps
        self.capture, self.warmup, self.graph = bool(capture), warmup, None
        self.guided = self.cfg != 1.0
        N, C = batch_shape
        rows = 2 * N if self.guided else N
        kw = dict(device=p.device, dtype=p.dtype)
        self.cond, self.noise, self.out = (torch.zeros(rows, head.width, **kw), torch.zeros(N, C, **kw),
                                           torch.zeros(N, C, **kw))
        a = head.alphas_cumprod.to(p.dtype)  # the samplers' `alphas_cumprod.to(dtype)`, on the head's device
        steps = sampling_timesteps(T, num_steps) if solver == "ddim" else dpm_solver_timesteps(T, num_steps)
        self.t = torch.tensor(steps, dtype=torch.long, device=p.device)[:, None].repeat(1, rows)  # (S, rows)
        self.coef = self._coefficients(a, steps)  # (S, k)

    def _coefficients(self, a: Tensor, steps: list) -> Tensor:
        """Per step the scalars of ddim_sample / dpm_solver_sample, computed by the same tensor expressions."""
        rows, one, zero = [], a.new_tensor(1.0), a.new_tensor(0.0)
        if self.solver == "ddim":  # x0 = (x - k0 eps) / k1;  x = k2 x0 + k3 eps
            for i, t in enumerate(steps):
                a_prev = a[steps[i + 1]] if i + 1 < len(steps) else one
                rows.append([(1 - a[t]).sqrt(), a[t].sqrt(), a_prev.sqrt(), (1 - a_prev).sqrt()])
            return torch.stack([torch.stack(r) for r in rows])
        # x0 = (x - k0 eps) / k1;  d = k2 x0 - k3 x0_prev (d = x0 at the first step);  x = k4 x - k5 d
        alpha, sigma = a.sqrt(), (1 - a).sqrt()
        lam = alpha.log() - sigma.log()
        h_prev = None
        for i, t in enumerate(steps):
            if i + 1 == len(steps):  # the last step returns x0
                rows.append([sigma[t], alpha[t], one, zero, zero, zero])
                break
            s = steps[i + 1]
            h = lam[s] - lam[t]
            w1, w0 = (one, zero) if h_prev is None else (1 + 1 / (2 * (h_prev / h)), 1 / (2 * (h_prev / h)))
            rows.append([sigma[t], alpha[t], w1, w0, sigma[s] / sigma[t], alpha[s] * torch.expm1(-h)])
            h_prev = h
        return torch.stack([torch.stack(r) for r in rows])

    def _eps(self, x: Tensor, t: Tensor) -> Tensor:
        if not self.guided:
            return self.head.eps(x, t, self.cond)
        e_c, e_u = self.head.eps(torch.cat([x, x]), t, self.cond).chunk(2)
        return e_u + self.cfg * (e_c - e_u)

    @torch.no_grad()
    def step(self) -> None:
        """The whole solver loop from the static buffers into `out` (what the CUDA graph records)."""
        x, x0_prev = self.noise, None
        for i in range(self.num_steps):  # a Python loop over a fixed count: unrolled into the graph
            k = self.coef[i]
            eps = self._eps(x, self.t[i])
            x0 = (x - k[0] * eps) / k[1]
            if self.solver == "ddim":
                x = k[2] * x0 + k[3] * eps
            elif i + 1 == self.num_steps:
                x = x0
            else:
                d = x0 if i == 0 else k[2] * x0 - k[3] * x0_prev
                x, x0_prev = k[4] * x - k[5] * d, x0
        self.out.copy_(x)

    def _capture(self) -> None:
        """Warm up on a side stream, then record `step` (torch.cuda.graphs' whole-network capture recipe)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.step()

    def __call__(self, cond: Tensor, noise: Tensor) -> Tensor:
        if cond.shape != self.cond.shape or noise.shape != self.noise.shape:
            raise ValueError(f"cond, noise: expected {tuple(self.cond.shape)} and {tuple(self.noise.shape)}, got "
                             f"{tuple(cond.shape)} and {tuple(noise.shape)}")
        self.cond.copy_(cond)
        self.noise.copy_(noise)
        if not self.capture:
            self.step()
            return self.out
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.out
