"""Chapter 09's experiments: next-token diffusion (LatentLM) on a bimodal toy and on procedural digits.

1. The bimodal toy (reference/08 E8): the next value is +a x or -a x with probability 1/2 each, plus N(0, noise^2).
   A diffusion head (nanomodels.diffusion.DiffusionHead) and an MSE regression head sit on the same small
   conditioner of x; the diffusion head should sample both modes, the MSE head predicts their mean (0).
   Quality (energy distance to the true conditional) against the number of sampling steps, DDIM vs DPM-Solver.

    OMP_NUM_THREADS=1 python chapters/diffusion_experiments.py toy --seeds 0 1 2 --out ch09_toy.json

2. Images: a sigma-VAE and a plain VAE on procedural 16x16 digits (nanomodels.data.procedural_digits), each
   followed by a class-conditional LatentLM over its 16 latent patches (nanomodels.diffusion.LatentLM on the
   core Transformer). Generated digits are scored by a small classifier trained on real digits (accuracy:
   does it look like the class it was asked for?) and by the Frechet distance between the classifier's
   features of generated and real digits. The decoders' robustness to latent noise tests the variance-
   collapse claim directly.

    OMP_NUM_THREADS=1 python chapters/diffusion_experiments.py images --seeds 0 1 2 --out ch09_images.json

Results go to chapters/results/. The chapter notebook (which runs in chapters/) imports these helpers as
`diffusion_experiments`; the library code itself lives in nanomodels/.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanomodels.data import procedural_digits
from nanomodels.diffusion import DiffusionHead
from nanomodels.latentlm import LatentLM
from nanomodels.sigma_vae import PlainVAE, SigmaVAE, latents_to_sequence, sequence_to_latents
from nanomodels.train import FunctionTask, fit
from nanomodels.transformer import TransformerConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOY = dict(a=1.0, noise=0.1, width=64, depth=3, batch=256, lr=2e-3)
TOY_CONDITIONS = (-1.5, -1.0, 1.0, 1.5)
STEP_COUNTS = (1, 2, 5, 10, 50)


def toy_pairs(n: int, gen: torch.Generator, a: float = TOY["a"], noise: float = TOY["noise"]):
    """(x, y), each (n, 1): |x| uniform in [0.5, 2] with a random sign; y = s a x + noise eps, s = +-1."""
    x = (0.5 + 1.5 * torch.rand(n, 1, generator=gen)) * (torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1)
    s = torch.randint(0, 2, (n, 1), generator=gen) * 2 - 1
    return x, s * a * x + noise * torch.randn(n, 1, generator=gen)


def toy_truth(x: float, n: int, gen: torch.Generator, a: float = TOY["a"], noise: float = TOY["noise"]):
    """n draws of y given x from the true conditional: (n,)."""
    s = torch.randint(0, 2, (n,), generator=gen) * 2 - 1
    return s * a * x + noise * torch.randn(n, generator=gen)


class Conditioner(nn.Module):
    """The toy's 'backbone': x (n, 1) -> h (n, 1, d), a small MLP standing in for the causal Transformer."""

    def __init__(self, d: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, d), nn.SiLU(), nn.Linear(d, d), nn.SiLU(), nn.Linear(d, d))

    def forward(self, x):
        return self.net(x).unsqueeze(1)


def train_toy(kind: str, steps: int, seed: int, toy: dict = TOY, prediction: str = "v"):
    """Train conditioner + head: kind "diffusion" (the diffusion loss, v- or eps-prediction) or "mse" (regress y)."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(1000 + seed)
    d = toy["width"]
    backbone = Conditioner(d)
    if kind == "diffusion":
        head = DiffusionHead(TransformerConfig(d_model=d, n_heads=1), latent_dim=1, width=d, depth=toy["depth"],
                             prediction=prediction)
    else:
        head = nn.Linear(d, 1)
    params = list(backbone.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=toy["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    def loss(model, xy):
        y, h = xy[1], backbone(xy[0])
        return head.loss(h, y.unsqueeze(1), generator=gen) if kind == "diffusion" else F.mse_loss(head(h[:, 0]), y)

    losses = fit(nn.ModuleList([backbone, head]), FunctionTask(lambda step: toy_pairs(toy["batch"], gen), loss),
                 steps, optimizer=opt, on_step=lambda step, _: sched.step())
    return backbone, head, losses


def energy_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """2 E|A - B| - E|A - A'| - E|B - B'| for 1-D samples (0 iff the distributions are equal)."""
    a, b = a.double().flatten(), b.double().flatten()
    return (2 * torch.cdist(a[:, None], b[:, None]).mean() - torch.cdist(a[:, None], a[:, None]).mean()
            - torch.cdist(b[:, None], b[:, None]).mean()).item()


@torch.no_grad()
def toy_samples(backbone, head, kind: str, x: float, n: int, seed: int, num_steps: int = 50,
                sampler: str = "dpm") -> torch.Tensor:
    """n next values given x: diffusion samples, or the MSE head's (deterministic) prediction repeated."""
    h = backbone(torch.full((n, 1), x))[:, 0]
    if kind == "mse":
        return head(h)[:, 0]
    return head.sample(head(h), num_steps, sampler, generator=torch.Generator().manual_seed(seed))[:, 0]


def mode_stats(y: torch.Tensor, x: float, toy: dict = TOY) -> dict:
    """in_mode: share within 3 noise of +a x or -a x; positive: share of those at +a x (0.5 = balanced)."""
    near_pos = (y - toy["a"] * x).abs() < 3 * toy["noise"]
    near_neg = (y + toy["a"] * x).abs() < 3 * toy["noise"]
    in_mode = (near_pos | near_neg).float().mean().item()
    return {"in_mode": in_mode, "positive": near_pos.float().sum().item() / max(1, int((near_pos | near_neg).sum()))}


def run_toy(seeds=(0, 1, 2), steps: int = 1500, n: int = 2000, step_counts=STEP_COUNTS) -> dict:
    """Per seed: the v-prediction diffusion head and the MSE head (energy distance and mode statistics at
    TOY_CONDITIONS, 50 DPM-Solver steps), the step sweep for the diffusion head; for the first seed also the
    eps-prediction head with the same budget. Returns a JSON-able dict."""
    out = {"config": {**TOY, "steps": steps, "n": n, "seeds": list(seeds)}, "runs": []}
    for seed in seeds:
        run = {"seed": seed}
        variants = [("diffusion", "v"), ("mse", None)] + ([("diffusion", "eps")] if seed == seeds[0] else [])
        for kind, prediction in variants:
            name = kind if prediction != "eps" else "diffusion_eps"
            start = time.perf_counter()
            backbone, head, losses = train_toy(kind, steps, seed, prediction=prediction)
            run[name] = {"train_s": time.perf_counter() - start, "final_loss": sum(losses[-100:]) / len(losses[-100:])}
            per_x = {}
            for x in TOY_CONDITIONS:
                y = toy_samples(backbone, head, kind, x, n, seed)
                truth = toy_truth(x, n, torch.Generator().manual_seed(99 + seed))
                per_x[str(x)] = {"energy": energy_distance(y, truth), "mean": y.mean().item(), **mode_stats(y, x)}
            run[name]["per_x"] = per_x
            run[name]["example"] = toy_samples(backbone, head, kind, 1.0, n, seed).tolist()
            if name == "diffusion":
                sweep = {}
                for sampler in ("ddim", "dpm"):
                    for k in step_counts:
                        sweep[f"{sampler}/{k}"] = sum(
                            energy_distance(toy_samples(backbone, head, kind, x, n, seed, k, sampler),
                                            toy_truth(x, n, torch.Generator().manual_seed(99 + seed)))
                            for x in TOY_CONDITIONS) / len(TOY_CONDITIONS)
                run[name]["steps"] = sweep
        out["runs"].append(run)
    return out


IMAGES = dict(n_train=6000, latent_dim=4, clf_steps=500, vae_steps=1000, lm_steps=1500, batch=64, d_model=64,
              n_layers=2, n_heads=4, head_width=64, head_depth=3, num_steps=20, cfg=(1.0, 3.0), per_class=20, lr=2e-3)
QUICK_IMAGES = dict(IMAGES, n_train=600, clf_steps=60, vae_steps=60, lm_steps=60, batch=32, per_class=2, num_steps=3)


class DigitClassifier(nn.Module):
    """A small CNN for 16x16 digits; `features` is its 64-d penultimate layer (for the Frechet distance)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 16, 3, 2, 1), nn.SiLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.SiLU(),
                                  nn.Flatten(), nn.Linear(32 * 16, 64), nn.SiLU())
        self.out = nn.Linear(64, 10)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.out(self.body(x))


def _indices(n: int, batch: int, gen: torch.Generator):
    """A task's batches: `batch` random indices into n examples, from gen (the loss is set by the caller)."""
    return lambda step: torch.randint(0, n, (batch,), generator=gen)


def train_classifier(x, y, steps: int, seed: int) -> DigitClassifier:
    torch.manual_seed(seed)
    model, gen = DigitClassifier(), torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    fit(model, FunctionTask(_indices(len(x), 128, gen), lambda model, idx: F.cross_entropy(model(x[idx]), y[idx])),
        steps, optimizer=opt)
    return model.eval()


def train_vae(kind: str, x, steps: int, seed: int, cfg: dict = IMAGES):
    """kind "sigma" (SigmaVAE, noise_std 0.75, kl_weight 1e-2) or "plain" (PlainVAE, kl_weight 1e-4)."""
    torch.manual_seed(seed)
    vae = SigmaVAE(cfg["latent_dim"]) if kind == "sigma" else PlainVAE(cfg["latent_dim"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"])
    fit(vae, FunctionTask(_indices(len(x), cfg["batch"], gen), lambda vae, idx: vae.loss(x[idx], gen)[0]), steps,
        optimizer=opt)
    return vae.eval()


@torch.no_grad()
def normalized_latents(vae, x):
    """(seq (n, 16, C), scale, bias): mu as a sequence of latent patches, normalized as the official code does,
    z = (mu + bias) * scale with bias = -mean and scale = 1/std measured on the first batch (here 256 images)."""
    seq = latents_to_sequence(vae.encode(x))
    bias, scale = -seq[:256].mean().item(), 1.0 / seq[:256].std().item()
    return (seq + bias) * scale, scale, bias


def train_latentlm(seq, y, steps: int, seed: int, cfg: dict = IMAGES) -> LatentLM:
    torch.manual_seed(seed)
    config = TransformerConfig(block_size=seq.size(1), n_layers=cfg["n_layers"], d_model=cfg["d_model"],
                               n_heads=cfg["n_heads"])
    model = LatentLM(config, latent_dim=seq.size(-1), num_classes=10, class_dropout=0.1,
                     head=dict(width=cfg["head_width"], depth=cfg["head_depth"], prediction="v"))
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    fit(model, FunctionTask(_indices(len(seq), cfg["batch"], gen), lambda lm, idx: lm(seq[idx], y[idx], generator=gen)),
        steps, optimizer=opt, on_step=lambda step, _: sched.step())
    return model.eval()


@torch.no_grad()
def generate(lm, vae, labels, scale: float, bias: float, cfg_scale: float, num_steps: int, seed: int):
    """Images (n, 1, 16, 16) for class labels (n,): sample latents token by token, un-normalize, decode."""
    seq = lm.sample(labels, 16, num_steps=num_steps, cfg_scale=cfg_scale, generator=torch.Generator().manual_seed(seed))
    return vae.decode(sequence_to_latents(seq / scale - bias))


def frechet_distance(f1: torch.Tensor, f2: torch.Tensor) -> float:
    """|m1 - m2|^2 + Tr(C1 + C2 - 2 (C1^1/2 C2 C1^1/2)^1/2) between Gaussians fit to two feature sets."""
    f1, f2 = f1.double(), f2.double()
    m1, m2 = f1.mean(0), f2.mean(0)
    c1, c2 = torch.cov(f1.T), torch.cov(f2.T)

    def sqrtm(c):
        w, v = torch.linalg.eigh(c)
        return v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    s1 = sqrtm(c1)
    return ((m1 - m2).pow(2).sum() + torch.trace(c1 + c2 - 2 * sqrtm(s1 @ c2 @ s1))).item()


@torch.no_grad()
def latent_noise_robustness(vae, x, levels=(0.0, 0.25, 0.5, 1.0)) -> dict:
    """Reconstruction MSE of decode(mu + level * std(mu) * eps): how brittle the decoder is off the posterior mean."""
    mu = vae.encode(x)
    gen = torch.Generator().manual_seed(0)
    return {str(lv): F.mse_loss(vae.decode(mu + lv * mu.std() * torch.randn(mu.shape, generator=gen)), x).item()
            for lv in levels}


def run_images(seeds=(0, 1, 2), cfg: dict = IMAGES) -> dict:
    """Per seed: a classifier on real digits; for the sigma-VAE and the plain VAE: reconstruction, posterior
    scale, robustness to latent noise, then a LatentLM on the normalized latents and its samples' classifier
    accuracy and Frechet distance per CFG scale. Returns a JSON-able dict (one example grid per VAE kind)."""
    x, y = procedural_digits(cfg["n_train"], seed=0)
    xt, yt = procedural_digits(1000, seed=1)
    out = {"config": {**cfg, "seeds": list(seeds)}, "runs": []}
    for seed in seeds:
        start = time.perf_counter()
        clf = train_classifier(x, y, cfg["clf_steps"], seed)
        real_acc = (clf(xt).argmax(1) == yt).float().mean().item()
        real_fd = frechet_distance(clf.features(xt[:500]), clf.features(xt[500:]))
        run = {"seed": seed, "classifier_acc": real_acc, "real_vs_real_fd": real_fd}
        for kind in ("sigma", "plain"):
            vae = train_vae(kind, x, cfg["vae_steps"], seed, cfg)
            with torch.no_grad():
                recon = F.mse_loss(vae.decode(vae.encode(xt)), xt).item()
                if kind == "plain":
                    posterior_std = (0.5 * vae.encode_stats(xt)[1]).exp().mean().item()
                else:
                    posterior_std = vae.noise_std / 0.8 * math.sqrt(2 / math.pi)  # E|sigma|, fixed
            seq, scale, bias = normalized_latents(vae, x)
            lm = train_latentlm(seq, y, cfg["lm_steps"], seed, cfg)
            labels = torch.arange(10).repeat_interleave(cfg["per_class"])
            res = {"recon_mse": recon, "posterior_std": posterior_std, "posterior_std_normalized": posterior_std * scale,
                   "robustness": latent_noise_robustness(vae, xt[:500]), "samples": {}}
            for cfg_scale in cfg["cfg"]:
                imgs = generate(lm, vae, labels, scale, bias, cfg_scale, cfg["num_steps"], seed)
                with torch.no_grad():
                    acc = (clf(imgs).argmax(1) == labels).float().mean().item()
                    fd = frechet_distance(clf.features(imgs), clf.features(xt[:len(imgs)]))
                res["samples"][str(cfg_scale)] = {"acc": acc, "fd": fd}
                if seed == seeds[0]:
                    res.setdefault("grid", {})[str(cfg_scale)] = imgs[:, 0].tolist()
            run[kind] = res
        run["seconds"] = time.perf_counter() - start
        out["runs"].append(run)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    toy = sub.add_parser("toy", help="the bimodal toy: diffusion head vs MSE head, quality vs sampling steps")
    toy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    toy.add_argument("--steps", type=int, default=1500)
    toy.add_argument("--out", default="ch09_toy.json")
    img = sub.add_parser("images", help="sigma-VAE vs plain VAE latents, LatentLM samples scored by a classifier")
    img.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    img.add_argument("--quick", action="store_true", help="the quick-mode sizes")
    img.add_argument("--out", default="ch09_images.json")
    args = p.parse_args(argv)
    RESULTS.mkdir(exist_ok=True)
    start = time.perf_counter()
    if args.cmd == "toy":
        result = run_toy(tuple(args.seeds), args.steps)
    else:
        result = run_images(tuple(args.seeds), QUICK_IMAGES if args.quick else IMAGES)
    result.update(command="OMP_NUM_THREADS=1 python chapters/diffusion_experiments.py " + " ".join(argv or sys.argv[1:]),
                  seconds=time.perf_counter() - start, threads=torch.get_num_threads(), torch=torch.__version__)
    (RESULTS / args.out).write_text(json.dumps(result))
    print(f"wrote {RESULTS / args.out}")


if __name__ == "__main__":
    main()
