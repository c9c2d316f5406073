"""Training: AdamW, warmup + cosine, gradient clipping, periodic eval, atomic resumable checkpoints, DDP.

    python -m nanomodels train                                   # the default tiny GPT on the pydoc corpus
    torchrun --nproc_per_node=2 -m nanomodels train --name ddp   # the same run, data-parallel

Reproducibility: every batch comes from one seeded torch.Generator whose state is saved in the checkpoint,
so `--resume` continues exactly where a run stopped (20 steps straight == 10 + resume + 10, tested).
Data parallel: every rank draws the same global batch and keeps its slice; DDP averages the gradients,
which equals the gradient of the mean loss over the global batch, so 2 processes match 1 (tested).
Checkpoints never unpickle code and are written atomically (nanomodels/checkpoint.py).
"""

import json
import math
import os
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from nanomodels.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from nanomodels.data import get_batch, load_text, train_val_split
from nanomodels.runtime import DEVICES, autocast_dtype, pick_device
from nanomodels.tokenizer import get_tokenizer, tokenizer_from_dict
from nanomodels.transformer import RESIDUALS, Transformer, TransformerConfig

# options that may change on --resume; every other option must match the checkpoint
RESUMABLE = {"steps", "stop_at", "eval_interval", "eval_iters", "device", "threads", "sample_tokens", "resume",
             "overwrite", "progress"}


@dataclass
class TrainConfig:
    name: str = "default"  # the run folder: <out_dir>/<name>/
    out_dir: str = "runs"
    data: str = "pydoc"  # 'pydoc' (ships with Python) or a path to a UTF-8 text file
    tokenizer: str = "bpe"  # 'bpe' (byte-level, trained on the corpus and cached) or 'char'
    vocab_size: int = 512  # BPE vocabulary size (ignored for 'char')
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    block_size: int = 128  # context length
    dropout: float = 0.0
    norm: str = "pre"  # residual-and-norm scheme: 'pre' (Pre-LN) or 'post' (Post-LN)
    batch_size: int = 32  # sequences per optimizer step, summed over all processes
    steps: int = 500  # the length of the run (and of the learning-rate schedule)
    stop_at: int = 0  # stop this invocation after this step (checkpointed; finish later with --resume); 0 = steps
    lr: float = 3e-3  # peak learning rate
    min_lr: float = 3e-4  # the cosine decays to this
    warmup: int = 50  # linear warmup steps
    weight_decay: float = 0.1  # on matrices only, not on biases, norms or position embeddings
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    eval_interval: int = 100
    eval_iters: int = 20
    seed: int = 1337
    device: str = "auto"  # 'auto', 'cpu', 'cuda', 'mps'
    threads: int = 0  # CPU threads for torch; 0 = torch's default (1 is often fastest on a busy 2-core machine)
    sample_tokens: int = 200  # tokens to sample at the end
    resume: bool = False  # continue from <out_dir>/<name>/ckpt.pt
    overwrite: bool = False  # start over even if the run folder holds a checkpoint
    progress: bool = True  # show a progress bar

    def __post_init__(self):
        positive = ("vocab_size", "n_layers", "d_model", "n_heads", "block_size", "batch_size", "steps",
                    "eval_interval", "eval_iters")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("warmup", "sample_tokens", "grad_clip", "weight_decay", "stop_at", "threads"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name}: must be >= 0, got {getattr(self, name)}")
        if self.tokenizer not in ("bpe", "char"):
            raise ValueError(f"--tokenizer: must be 'bpe' or 'char', got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"--vocab_size: a byte-level BPE needs more than the 256 bytes, got {self.vocab_size}")
        if self.norm not in RESIDUALS:
            raise ValueError(f"--norm: must be one of {sorted(RESIDUALS)}, got {self.norm!r}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError(f"--min_lr: must be in (0, lr={self.lr}], got {self.min_lr}")
        if self.device.split(":")[0] not in DEVICES:
            raise ValueError(f"--device: must be one of {DEVICES} (or 'cuda:N'), got {self.device!r}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite: choose one (continue the run, or start it over)")
        self.model_config()  # d_model/n_heads/dropout rules live in TransformerConfig; check them now

    def model_config(self, vocab_size: Optional[int] = None) -> TransformerConfig:
        try:
            return TransformerConfig(vocab_size=vocab_size or self.vocab_size, block_size=self.block_size,
                                     n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                                     dropout=self.dropout)
        except ValueError as err:
            raise ValueError(f"--{err}") from None

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to cfg.lr over cfg.warmup steps, then a cosine down to cfg.min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed.wpe")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed.wpe")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under train-set token frequencies (add-one smoothed)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


def build_model(cfg: TrainConfig, vocab_size: int) -> Transformer:
    residual, final_norm = RESIDUALS[cfg.norm]
    return Transformer(cfg.model_config(vocab_size), residual=residual, final_norm=final_norm)


def check_resumable(saved: dict, cfg: TrainConfig, path: Path) -> None:
    differ = [(f.name, saved.get(f.name), getattr(cfg, f.name)) for f in fields(cfg)
              if f.name not in RESUMABLE and saved.get(f.name) != getattr(cfg, f.name)]
    if differ:
        what = ", ".join(f"--{n}: checkpoint {a!r}, now {b!r}" for n, a, b in differ)
        raise ValueError(f"resume: {path} was trained with other options ({what}); "
                         "use the same options, or a new --name")


@torch.no_grad()
def evaluate(model, data: torch.Tensor, cfg: TrainConfig, device, amp) -> float:
    """Mean loss over cfg.eval_iters batches drawn with a fixed seed (the same windows every time)."""
    model.eval()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    losses = []
    for _ in range(cfg.eval_iters):
        x, y = get_batch(data, cfg.batch_size, cfg.block_size, gen)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            losses.append(model(x.to(device), y.to(device))[1].item())
    model.train()
    return sum(losses) / len(losses)


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns the metrics dict (also written to <run_dir>/metrics.json)."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = pick_device(cfg.device)
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, device, rank, world)
    finally:
        if distributed:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, device: torch.device, rank: int, world: int) -> dict:
    from tqdm.auto import tqdm

    if cfg.batch_size % world:
        raise ValueError(f"--batch_size: must be divisible by the number of processes ({world}), got {cfg.batch_size}")
    ckpt_path = cfg.run_dir / CHECKPOINT
    if cfg.resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (run without --resume to start)")
    if not cfg.resume and not cfg.overwrite and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, --overwrite to start over, "
                              "or choose another --name")
    state = load_checkpoint(ckpt_path) if cfg.resume else None
    if state is not None:
        check_resumable(state["config"], cfg, ckpt_path)
    text = load_text(cfg.data)
    if state is not None:
        tok = tokenizer_from_dict(state["tokenizer"])
    else:
        if rank == 0:  # rank 0 trains (and caches) the BPE first; the others then read the cache
            tok = get_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
        if world > 1:
            dist.barrier()
        if rank != 0:
            tok = get_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    train_ids, val_ids = train_val_split(ids, 0.1)
    if len(val_ids) <= cfg.block_size:
        raise ValueError(f"--block_size: the validation split has {len(val_ids)} tokens, fewer than block_size + 1 "
                         f"({cfg.block_size + 1}); use a larger text or a smaller --block_size")

    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tok.vocab_size).to(device)
    optimizer = make_optimizer(model, cfg, device)
    gen = torch.Generator().manual_seed(cfg.seed)  # every training batch comes from here
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, history = state["step"], state["history"]
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    amp = autocast_dtype(device)
    per_rank = cfg.batch_size // world
    tokens_per_step = cfg.batch_size * cfg.block_size

    def checkpoint(step: int) -> None:
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "config": asdict(cfg), "tokenizer": tok.to_dict()})

    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stop = min(cfg.stop_at or cfg.steps, cfg.steps)
    bar = tqdm(range(start, stop), initial=start, total=cfg.steps, disable=rank != 0 or not cfg.progress,
               unit="step", dynamic_ncols=True)
    t0, timed_tokens = time.perf_counter(), 0
    model.train()
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = get_batch(train_ids, cfg.batch_size, cfg.block_size, gen)  # the global batch; keep our slice
        x, y = x[rank * per_rank:(rank + 1) * per_rank].to(device), y[rank * per_rank:(rank + 1) * per_rank].to(device)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            _, loss = train_model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        timed_tokens += tokens_per_step
        tok_per_s = timed_tokens / (time.perf_counter() - t0)
        bar.set_postfix(loss=f"{loss.item():.3f}", tok_s=f"{tok_per_s:,.0f}")
        if (step + 1) % cfg.eval_interval == 0 or step + 1 == stop:
            train_loss = loss.detach().clone()
            if world > 1:  # the loss of the global batch = the mean of the ranks' losses
                dist.all_reduce(train_loss)
                train_loss /= world
            record = {"step": step + 1, "train_loss": train_loss.item(), "lr": lr_at(step, cfg),
                      "tokens_per_s": tok_per_s}
            if rank == 0:
                record["val_loss"] = evaluate(model, val_ids, cfg, device, amp)
                bar.write(f"step {step + 1:5d} | train {record['train_loss']:.4f} | val {record['val_loss']:.4f}")
            history.append(record)
            checkpoint(step + 1)
    bar.close()
    if world > 1:
        dist.barrier()
    if rank != 0:
        return {}
    if stop < cfg.steps:
        print(f"stopped at step {stop} of {cfg.steps} (--stop_at); continue with --resume")
        return {"history": history, "stopped_at": stop}
    return finish(cfg, model, tok, train_ids, val_ids, history, device, amp)


def finish(cfg, model, tok, train_ids, val_ids, history, device, amp) -> dict:
    """The end of a run: final numbers against the unigram baseline, a sample, metrics.json and loss.png."""
    val_loss = evaluate(model, val_ids, cfg, device, amp)
    baseline = unigram_loss(train_ids, val_ids, tok.vocab_size)
    try:
        prompt = torch.tensor([tok.encode("The ")], dtype=torch.long, device=device)
    except ValueError:  # a char vocabulary without these letters: start from the validation text instead
        prompt = val_ids[None, :1].to(device)
    sample = tok.decode(model.eval().generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=40,
                                              generator=torch.Generator(device=device).manual_seed(cfg.seed))[0].tolist())
    metrics = {"val_loss": val_loss, "unigram_val_loss": baseline, "steps": cfg.steps,
               "tokens_per_s": history[-1]["tokens_per_s"] if history else None,
               "params": model.num_params(), "device": str(device), "history": history, "sample": sample}
    (cfg.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    plot_history(history, baseline, cfg.run_dir / "loss.png")
    print(f"\nvalidation loss {val_loss:.4f} nats/token  vs  unigram baseline {baseline:.4f} "
          f"({math.exp(val_loss):.1f} vs {math.exp(baseline):.1f} perplexity)")
    print(f"{model.num_params():,} parameters, {metrics['tokens_per_s'] or 0:,.0f} tokens/s on {device}")
    print(f"sample:\n{sample}\n\nwrote {cfg.run_dir}/ (ckpt.pt, config.json, metrics.json, loss.png)")
    return metrics


def plot_history(history: list, baseline: float, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], label="train (one batch)")
    ax.plot(steps, [h["val_loss"] for h in history if "val_loss" in h], marker="o", label="validation")
    ax.axhline(baseline, color="gray", linestyle="--", label="unigram baseline")
    ax.set(title="Training loss", xlabel="step", ylabel="cross-entropy (nats/token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_model(run_dir, device: Optional[str] = None):
    """(model, tokenizer, config) from a run folder's checkpoint, ready for sampling."""
    path = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(path)
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in {f.name for f in fields(TrainConfig)}})
    tok = tokenizer_from_dict(state["tokenizer"])
    model = build_model(cfg, tok.vocab_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint: {path} does not match its own config ({str(err).splitlines()[0]})") from None
    return model.to(pick_device(device)).eval(), tok, cfg
