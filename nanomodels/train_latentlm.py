"""Training a class-conditional LatentLM on procedural digits: a sigma-VAE, then next-token diffusion over its latents.

    python -m nanomodels train-latentlm                    # sigma-VAE (1000 steps), then LatentLM (1500 steps)
    python -m nanomodels sample --name digits --cfg 3      # an image grid of generated digits, one row per class

The recipe is chapter 09's (arXiv 2412.08635 at toy scale): a SigmaVAE maps 16x16 digits to 4x4 latent patches of
`latent_dim` channels; the patches, in raster order and normalized as the official code does (z = (mu + bias) *
scale, bias = -mean and scale = 1/std of the first 256 training images), are the 16 tokens of a LatentLM whose
first input is the class (the null class with probability class_dropout, for classifier-free guidance).
Sampling runs the LatentLM token by token (KV cache) with DPM-Solver++ or DDIM and CFG, un-normalizes, decodes.

The run is nanomodels/train.py's `run` with a LatentLMTask (the sigma-VAE phase goes through the same `fit`): one
seeded generator draws every batch and every noise, its state is in the checkpoint, Ctrl-C finishes the current
step and writes it, and `--resume` continues exactly (in the sigma-VAE phase or the LatentLM phase). The checkpoint's "tokenizer" is the sigma-VAE with the
normalization, so `--vae_from RUN` starts a new LatentLM on the trained sigma-VAE of another run.
"""

import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from nanomodels.checkpoint import CHECKPOINT, load_checkpoint, run_kind
from nanomodels.data import procedural_digits
from nanomodels.digits import LATENT_TOKENS, NUM_CLASSES, encode_digits, grid_name, write_samples
from nanomodels.latentlm import LatentLM
from nanomodels.runtime import pick_device
from nanomodels.sigma_vae import SigmaVAE, latents_to_sequence
from nanomodels.train import (RUN_RESUMABLE, FunctionTask, Interrupted, RunConfig, check_counts, check_run_name,
                              check_schedule_and_run, fit, option, run, run_option, start_device)
from nanomodels.transformer import TransformerConfig

TRAIN_SEED, VAL_SEED = 0, 1  # procedural_digits seeds of the training images and the validation images
VAL_IMAGES = 500
NORM_IMAGES = 256  # the normalization is measured on the first batch of this many training images
# what `sample` does for a LatentLM run unless told otherwise; the end of training writes this grid
SAMPLE_DEFAULTS = {"cfg": 3.0, "steps": 20, "sampler": "dpm", "per_class": 8, "seed": 0}


@dataclass
class LatentTrainConfig(RunConfig):
    """A `train-latentlm` run: a sigma-VAE, then a class-conditional LatentLM over its latents."""
    name: str = run_option("name", "digits")
    steps: int = run_option("steps", 1500, "LatentLM training steps (and the length of its learning-rate schedule)")
    stop_at: int = run_option("stop_at", 0, "stop this command after this LatentLM step, with a checkpoint (finish "
                                            "later with --resume); 0 = run to --steps")
    lr: float = run_option("lr", 2e-3, "peak learning rate (the sigma-VAE trains at this constant rate)")
    min_lr: float = run_option("min_lr", 2e-5, "the LatentLM's cosine decays to this learning rate (0 < min_lr <= lr)")
    warmup: int = run_option("warmup", 0, "linear warmup steps of the LatentLM")
    weight_decay: float = run_option("weight_decay", 0.0, "AdamW weight decay of the LatentLM (the sigma-VAE uses "
                                                          "AdamW's 0.01)")
    grad_clip: float = run_option("grad_clip", 1.0, "max global gradient norm of the LatentLM; 0 = no clipping")
    eval_interval: int = run_option("eval_interval", 250, "evaluate the validation loss (and write a checkpoint) "
                                                          "every this many steps")
    seed: int = run_option("seed", 1337, "seed of the initialization, the batch order, the noise and the class "
                                         "dropout")
    vae_from: str = option("", "start from the trained sigma-VAE of this run in OUT_DIR (its folder name) instead "
                               "of training one (--vae_steps is then ignored); '' = train one",
                           metavar="RUN")
    images: int = option(6000, "procedural 16x16 training digits (nanomodels.data.procedural_digits, seed 0; the "
                               f"validation digits are {VAL_IMAGES} more with seed 1)")
    latent_dim: int = option(4, "channels of each of the 16 latent patches (the sigma-VAE's C)")
    vae_steps: int = option(1000, "sigma-VAE training steps (constant --lr), before the LatentLM's")
    n_layers: int = run_option("n_layers", 2, "LatentLM transformer blocks")
    d_model: int = run_option("d_model", 64, "LatentLM width")
    head_width: int = option(64, "width of the diffusion head's adaLN MLP (even)")
    head_depth: int = option(3, "adaLN blocks of the diffusion head")
    class_dropout: float = option(0.1, "probability of replacing the class by the null class in training (what "
                                       "classifier-free guidance needs), in [0, 1)")
    batch_size: int = option(64, "images per optimizer step (sigma-VAE and LatentLM)")

    def __post_init__(self):
        check_run_name(self.name)
        if self.vae_from:
            try:
                check_run_name(self.vae_from)
            except ValueError as err:
                raise ValueError(str(err).replace("--name", "--vae_from")) from None
            if self.vae_from == self.name:
                raise ValueError(f"--vae_from: must name another run than --name, got {self.vae_from!r}")
        check_counts(self, ("images", "latent_dim", "vae_steps", "n_layers", "d_model", "n_heads", "head_width",
                            "head_depth", "batch_size", "steps", "eval_interval"),
                     ("warmup", "grad_clip", "weight_decay", "stop_at", "threads"))
        if self.head_width % 2:
            raise ValueError(f"--head_width: must be even (sin/cos timestep embedding), got {self.head_width}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"--class_dropout: must be in [0, 1), got {self.class_dropout}")
        check_schedule_and_run(self)
        self.model_config()

    def model_config(self) -> TransformerConfig:
        try:
            return TransformerConfig(block_size=LATENT_TOKENS, n_layers=self.n_layers, d_model=self.d_model,
                                     n_heads=self.n_heads)
        except ValueError as err:
            raise ValueError(f"--{err}") from None


def build_latentlm(cfg: LatentTrainConfig, latent_dim: int) -> LatentLM:
    return LatentLM(cfg.model_config(), latent_dim=latent_dim, num_classes=NUM_CLASSES,
                    class_dropout=cfg.class_dropout,
                    head=dict(width=cfg.head_width, depth=cfg.head_depth, prediction="v"))


def vae_from_dict(tokenizer: dict) -> SigmaVAE:
    vae = SigmaVAE(tokenizer["latent_dim"], tokenizer["noise_std"], tokenizer["kl_weight"])
    vae.load_state_dict(tokenizer["vae"])
    return vae


def vae_to_dict(vae: SigmaVAE, norm: Optional[dict]) -> dict:
    """The checkpoint's "tokenizer": the sigma-VAE and the latent normalization (None until the VAE is trained)."""
    return {"vae": vae.state_dict(), "latent_dim": vae.latent_dim, "noise_std": vae.noise_std,
            "kl_weight": vae.kl_weight, "norm": norm}


def load_latentlm(run_dir, device: Optional[str] = None):
    """(LatentLM, sigma-VAE, normalization, config) from a LatentLM run folder's checkpoint, ready for sampling."""
    path = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(path)
    if run_kind(state) != "latentlm":
        raise ValueError(f"checkpoint: {path} is a {run_kind(state)} run, not a LatentLM run")
    cfg = LatentTrainConfig(**{k: v for k, v in state["config"].items()
                               if k in {f.name for f in fields(LatentTrainConfig)}})
    if state["tokenizer"]["norm"] is None or state["step"] == 0:
        raise ValueError(f"checkpoint: {path} stopped before the LatentLM trained a step; continue it with "
                         "`python -m nanomodels train-latentlm --resume`")
    vae = vae_from_dict(state["tokenizer"])
    lm = build_latentlm(cfg, vae.latent_dim)
    lm.load_state_dict(state["model"])
    device = pick_device(device)
    return lm.to(device).eval(), vae.to(device).eval(), state["tokenizer"]["norm"], cfg


def train_latentlm(cfg: LatentTrainConfig) -> dict:
    """Train the sigma-VAE (unless --vae_from), then the LatentLM; returns the metrics (also metrics.json)."""
    device, rank, world = start_device(cfg)
    if world > 1:
        raise ValueError("train-latentlm: runs in one process (start it without torchrun)")
    return run(cfg, LatentLMTask(cfg, device))


def _source_vae(cfg: LatentTrainConfig) -> dict:
    """The checkpoint of the --vae_from run, checked: a LatentLM run past its sigma-VAE phase, same latent_dim."""
    path = Path(cfg.out_dir) / cfg.vae_from / CHECKPOINT
    if not path.exists():
        raise FileNotFoundError(f"--vae_from: no checkpoint at {path}")
    state = load_checkpoint(path)
    if run_kind(state) != "latentlm" or state["tokenizer"]["norm"] is None:
        raise ValueError(f"--vae_from: {path} holds no trained sigma-VAE (a {run_kind(state)} run"
                         f"{' that stopped in its sigma-VAE phase' if run_kind(state) == 'latentlm' else ''})")
    if state["tokenizer"]["latent_dim"] != cfg.latent_dim:
        raise ValueError(f"--latent_dim: the sigma-VAE of {cfg.vae_from} has latent_dim "
                         f"{state['tokenizer']['latent_dim']}, got {cfg.latent_dim}")
    return state


class LatentLMTask:
    """Next-token diffusion on procedural digits, for nanomodels.train.run: a sigma-VAE phase (before_loop, through
    the same `fit`, constant lr, checkpointed as step 0), then the LatentLM, whose batches are random images."""
    kind, phase = "latentlm", "LatentLM"
    resumable = RUN_RESUMABLE
    rank, world = 0, 1

    def __init__(self, cfg: LatentTrainConfig, device: torch.device):
        self.cfg, self.device = cfg, device
        self.rate = ("images_per_s", "img_s", cfg.batch_size)

    def setup(self, state):
        cfg, device = self.cfg, self.device
        source = _source_vae(cfg) if state is None and cfg.vae_from else state  # where the sigma-VAE comes from
        x, y = procedural_digits(cfg.images, seed=TRAIN_SEED)
        xv, yv = procedural_digits(VAL_IMAGES, seed=VAL_SEED)
        self.x, self.y, self.xv, self.yv = x.to(device), y.to(device), xv.to(device), yv.to(device)
        torch.manual_seed(cfg.seed)
        self.vae = SigmaVAE(cfg.latent_dim).to(device)
        # norm stays None until the VAE is trained
        self.norm, self.vae_step, self.vae_metrics = None, 0, {"steps": cfg.vae_steps}
        if source is not None:
            self.vae.load_state_dict(source["tokenizer"]["vae"])
            self.norm, self.vae_step = source["tokenizer"]["norm"], source["vae_step"]
            self.vae_metrics = source["vae_metrics"]
            if source is not state:
                self.vae_metrics = {**self.vae_metrics, "from": cfg.vae_from}
        self.model = build_latentlm(cfg, self.vae.latent_dim).to(device)
        self.vae_opt = torch.optim.AdamW(self.vae.parameters(), lr=cfg.lr)  # the chapter's sigma-VAE optimizer
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)  # batches, noise, class dropout
        if state is not None and state["vae_optimizer"] is not None:
            self.vae_opt.load_state_dict(state["vae_optimizer"])

    def describe(self, start, stop):
        cfg = self.cfg
        vae_part = (f"sigma-VAE steps {self.vae_step}..{cfg.vae_steps}, then " if self.norm is None else
                    f"the sigma-VAE of {cfg.vae_from}, " if cfg.vae_from else "")
        return (f"{vae_part}LatentLM steps {start}..{stop} of {cfg.steps}, "
                f"{sum(p.numel() for p in self.model.parameters()):,} LatentLM parameters, {cfg.images:,} training "
                "digits")

    def before_loop(self, interrupt, checkpoint):
        """The sigma-VAE phase (unless it is done): fit at the constant --lr, then the latent normalization."""
        from tqdm.auto import tqdm

        cfg, vae, x, gen = self.cfg, self.vae, self.x, self.generator
        if self.norm is None:
            t0 = time.perf_counter()
            bar = tqdm(total=cfg.vae_steps, initial=self.vae_step, unit="step", desc="sigma-VAE",
                       disable=not cfg.progress, dynamic_ncols=True)

            def on_step(done, loss):
                self.vae_step = done
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.4f}")
                return interrupt.is_set()

            images = FunctionTask(batch=lambda step: torch.randint(0, len(x), (cfg.batch_size,), generator=gen,
                                                                   device=self.device),
                                  loss=lambda model, idx: model.loss(x[idx], gen)[0])
            losses = fit(vae, images, cfg.vae_steps, optimizer=self.vae_opt, start=self.vae_step, on_step=on_step)
            bar.close()
            self.vae_metrics["seconds"] = self.vae_metrics.get("seconds", 0.0) + time.perf_counter() - t0
            if self.vae_step == cfg.vae_steps:  # trained: measure the normalization once, from now on fixed
                vae.eval()
                with torch.no_grad():
                    first = latents_to_sequence(vae.encode(x[:NORM_IMAGES]))
                    self.norm = {"bias": -first.mean().item(), "scale": 1.0 / first.std().item()}
                    recon = F.mse_loss(vae.decode(vae.encode(self.xv)), self.xv).item()
                self.vae_metrics.update(train_loss=losses[-1], val_recon_mse=recon)
                print(f"sigma-VAE step {self.vae_step:5d} | train {losses[-1]:.4f} | val reconstruction MSE "
                      f"{recon:.4f}", flush=True)
            checkpoint(0)
            if interrupt.is_set():
                raise Interrupted(f"interrupted: checkpoint of sigma-VAE step {self.vae_step} written to "
                                  f"{cfg.run_dir / CHECKPOINT}; continue with --resume")
        vae.eval()
        self.seq, self.seq_val = encode_digits(vae, x, self.norm), encode_digits(vae, self.xv, self.norm)

    def batch(self, step):
        return torch.randint(0, len(self.seq), (self.cfg.batch_size,), generator=self.generator, device=self.device)

    def loss(self, model, idx):
        return model(self.seq[idx], self.y[idx], generator=self.generator)

    def evaluate(self):
        return evaluate(self.model, self.seq_val, self.yv, self.cfg.seed)

    def record(self):
        return {}

    def checkpoint_state(self):
        return {"kind": "latentlm", "vae_step": self.vae_step,
                "vae_optimizer": self.vae_opt.state_dict() if self.norm is None else None,
                "vae_metrics": self.vae_metrics, "tokenizer": vae_to_dict(self.vae, self.norm)}

    def stopped(self):
        return {"vae": self.vae_metrics}

    def finish(self, history):
        """metrics.json's content, loss.png's baseline and the default sample grid."""
        cfg, lm = self.cfg, self.model
        lm.eval()
        grid = write_samples(lm, self.vae, self.norm, cfg.run_dir / grid_name(**{
            "cfg_scale": SAMPLE_DEFAULTS["cfg"], "sampler": SAMPLE_DEFAULTS["sampler"],
            "num_steps": SAMPLE_DEFAULTS["steps"], "seed": SAMPLE_DEFAULTS["seed"]}),
            cfg_scale=SAMPLE_DEFAULTS["cfg"], num_steps=SAMPLE_DEFAULTS["steps"], sampler=SAMPLE_DEFAULTS["sampler"],
            per_class=SAMPLE_DEFAULTS["per_class"], seed=SAMPLE_DEFAULTS["seed"])
        val_loss = history[-1]["val_loss"]
        metrics = {"val_loss": val_loss, "steps": cfg.steps, "params": sum(p.numel() for p in lm.parameters()),
                   "vae": self.vae_metrics, "history": history, "grid": str(grid)}
        # the zero-initialized head predicts v = 0: loss E[v^2] = abar E[eps^2] + (1 - abar) E[z^2], about 1 for
        # latents normalized to unit variance
        plot = {"baseline": 1.0, "title": "LatentLM diffusion loss", "ylabel": "v-prediction MSE per latent channel",
                "baseline_label": "zero head (initialization)"}
        lines = [f"sigma-VAE reconstruction MSE {self.vae_metrics['val_recon_mse']:.4f} (validation digits); "
                 f"LatentLM diffusion loss {val_loss:.4f} (validation; about 1 at initialization)",
                 f"wrote {cfg.run_dir}/ (ckpt.pt, config.json, metrics.json, loss.png, {grid.name}: row k = digit k)"]
        return metrics, plot, lines


@torch.no_grad()
def evaluate(lm: LatentLM, seq: torch.Tensor, labels: torch.Tensor, seed: int) -> float:
    """The diffusion loss of the validation digits, with noise drawn from a fixed seed (the same every time)."""
    lm.eval()
    loss = lm(seq, labels, generator=torch.Generator(device=seq.device).manual_seed(seed + 1)).item()
    lm.train()
    return loss
