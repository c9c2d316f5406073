"""Training: AdamW, warmup + cosine, gradient clipping, periodic eval, atomic resumable checkpoints, DDP.

    python -m nanomodels train                                   # the default tiny GPT on the pydoc corpus
    torchrun --nproc_per_node=2 -m nanomodels train --name ddp   # the same run, data-parallel

Reproducibility: every batch comes from one seeded torch.Generator whose state is saved in the checkpoint,
so `--resume` continues exactly where a run stopped (20 steps straight == 10 + resume + 10, tested), whether
it stopped at --stop_at or at a Ctrl-C: in a single process, Ctrl-C lets the current step finish, writes the
checkpoint of that step and exits (a second Ctrl-C exits at once, leaving the last checkpoint written).
A run folder can be copied (`cp -r runs/a runs/b`) and resumed under the new name.
Data parallel: every rank draws the same global batch and keeps its slice; DDP averages the gradients,
which equals the gradient of the mean loss over the global batch, so 2 processes match 1 (tested).
Checkpoints never unpickle code and are written atomically (nanomodels/checkpoint.py).
"""

import contextlib
import itertools
import json
import math
import os
import signal
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePath
from typing import Optional

import torch
import torch.distributed as dist

from nanomodels.checkpoint import CHECKPOINT, KINDS, load_checkpoint, run_kind, save_checkpoint
from nanomodels.data import get_batch, load_text, train_val_split
from nanomodels.runtime import DEVICES, autocast_dtype, pick_device
from nanomodels.tokenizer import get_tokenizer, tokenizer_from_dict
from nanomodels.transformer import RESIDUALS, Transformer, TransformerConfig

# options that may change on --resume; every other option must match the checkpoint. The name and out_dir
# only say where the run lives, so a copied run folder resumes under its new name.
RESUMABLE = {"name", "out_dir", "steps", "stop_at", "eval_interval", "eval_iters", "device", "threads",
             "sample_tokens", "resume", "overwrite", "progress"}
TOKENIZERS = ("bpe", "char")
VAL_FRACTION = 0.1  # the last 10% of the corpus's tokens are the validation split


def option(default, help: str, **argparse_options):
    """A TrainConfig field with its --help text (and extra argparse settings such as choices or metavar)."""
    return field(default=default, metadata={"help": help, **argparse_options})



def check_counts(cfg, at_least_one, non_negative) -> None:
    """The options of a training config that count things: `at_least_one` must be >= 1, every float field finite,
    `non_negative` >= 0; the first that breaks its rule is named, as the command line spells it."""
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name}: must be >= 1, got {getattr(cfg, name)}")
    for f in fields(cfg):
        if f.type in (float, "float") and not math.isfinite(getattr(cfg, f.name)):
            raise ValueError(f"--{f.name}: must be a finite number, got {getattr(cfg, f.name)}")
    for name in non_negative:
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name}: must be >= 0, got {getattr(cfg, name)}")


def check_schedule_and_run(cfg) -> None:
    """lr > 0, 0 < min_lr <= lr, a known device, and not both --resume and --overwrite."""
    if cfg.lr <= 0:
        raise ValueError(f"--lr: must be > 0, got {cfg.lr}")
    if not 0 < cfg.min_lr <= cfg.lr:
        raise ValueError(f"--min_lr: must be in (0, --lr={cfg.lr}], got {cfg.min_lr}")
    if cfg.device.split(":")[0] not in DEVICES:
        raise ValueError(f"--device: must be one of {DEVICES} (or 'cuda:N'), got {cfg.device!r}")
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite: choose one (continue the run, or start it over)")

@dataclass
class TrainConfig:
    name: str = option("default", "the run's folder name: the run lives in OUT_DIR/NAME/ (one folder name, "
                                  "no path)")
    out_dir: str = option("runs", "the folder that holds the run folders")
    data: str = option("pydoc", "the training text: 'pydoc' (Python's documentation, ships with Python) or "
                                "the path to a UTF-8 text file", metavar="pydoc|PATH")
    tokenizer: str = option("bpe", "'bpe': byte-level BPE trained on the text (and cached); 'char': one token "
                                   "per character", choices=TOKENIZERS)
    vocab_size: int = option(512, "BPE vocabulary size, the 256 bytes included (ignored for --tokenizer char)")
    n_layers: int = option(4, "transformer blocks")
    d_model: int = option(128, "model width")
    n_heads: int = option(4, "attention heads (must divide --d_model)")
    block_size: int = option(128, "context length in tokens")
    dropout: float = option(0.0, "dropout probability")
    norm: str = option("pre", "where the LayerNorm sits: 'pre' (Pre-LN, LN inside each residual branch) or "
                              "'post' (Post-LN, LN after each residual addition)", choices=tuple(RESIDUALS))
    batch_size: int = option(32, "sequences per optimizer step, summed over all processes")
    steps: int = option(500, "the length of the run (and of the learning-rate schedule)")
    stop_at: int = option(0, "stop this command after this step, with a checkpoint (finish later with "
                             "--resume; the schedule still follows --steps); 0 = run to --steps")
    lr: float = option(3e-3, "peak learning rate")
    min_lr: float = option(3e-4, "the cosine decays to this learning rate (0 < min_lr <= lr)")
    warmup: int = option(50, "linear warmup steps")
    weight_decay: float = option(0.1, "AdamW weight decay, on matrices only (not biases, norms, position "
                                      "embeddings)")
    grad_clip: float = option(1.0, "max global gradient norm; 0 = no clipping")
    eval_interval: int = option(100, "evaluate (and write a checkpoint) every this many steps")
    eval_iters: int = option(20, "validation batches per evaluation")
    seed: int = option(1337, "seed of the initialization and of the batch order")
    device: str = option("auto", "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    threads: int = option(1, "CPU threads for torch; 0 = torch's choice (one per core). 1 is the default: "
                             "on a shared or busy machine more threads are often slower")
    sample_tokens: int = option(200, "tokens to sample at the end of the run")
    resume: bool = option(False, "continue the run in OUT_DIR/NAME/ from its checkpoint (after Ctrl-C, "
                                 "--stop_at, or to lengthen it with a larger --steps)")
    overwrite: bool = option(False, "start over even if OUT_DIR/NAME/ holds a checkpoint")
    progress: bool = option(True, "show a progress bar")

    def __post_init__(self):
        check_run_name(self.name)
        check_counts(self, ("vocab_size", "n_layers", "d_model", "n_heads", "block_size", "batch_size", "steps",
                            "eval_interval", "eval_iters"),
                     ("warmup", "sample_tokens", "grad_clip", "weight_decay", "stop_at", "threads"))
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"--tokenizer: must be 'bpe' or 'char', got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"--vocab_size: a byte-level BPE needs more than the 256 bytes, got {self.vocab_size}")
        if self.norm not in RESIDUALS:
            raise ValueError(f"--norm: must be one of {sorted(RESIDUALS)}, got {self.norm!r}")
        check_schedule_and_run(self)
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


def check_run_name(name: str) -> None:
    """A run name is one folder name, so a run lives inside --out_dir: no separator, not '', '.' or '..'."""
    if name in ("", ".", "..") or "/" in name or "\\" in name or PurePath(name).name != name:
        raise ValueError(f"--name: must be one folder name (no '/' or '\\', not empty, '.' or '..'), got {name!r}")


def check_run_dir(run_dir: Path) -> None:
    """The run folder and the folders above it exist as folders or not at all (a file in the way is an error)."""
    for path in (run_dir, *run_dir.parents):
        if path.exists():
            if not path.is_dir():
                option = "--name" if path == run_dir else "--out_dir"
                raise ValueError(f"{option}: '{path}' is a file, not a folder")
            return


def min_tokens(block_size: int) -> int:
    """The fewest tokens whose validation tail (VAL_FRACTION) and training head both hold a window + 1 target."""
    def enough(n):
        n_val = round(VAL_FRACTION * n)  # the rule of train_val_split
        return n_val > block_size and n - n_val > block_size
    return next(n for n in itertools.count(block_size + 1) if enough(n))


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training; the message says which checkpoint the run folder holds."""


@contextlib.contextmanager
def deferred_interrupt(enabled: bool):
    """Within the block, a first Ctrl-C sets the yielded Event (the loop stops after the current step, so the
    checkpoint is of a whole step); a second one raises KeyboardInterrupt at once. Signal handlers can only
    be set from the main thread; elsewhere, or when not enabled, Ctrl-C acts as before."""
    requested = threading.Event()
    main_thread = threading.current_thread() is threading.main_thread()
    if not enabled or not main_thread or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # ignored: keep it so
        yield requested
        return

    def handler(signum, frame):
        if requested.is_set():
            raise KeyboardInterrupt
        requested.set()

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield requested
    finally:
        signal.signal(signal.SIGINT, previous)


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


def check_resumable(saved: dict, cfg, path: Path, resumable: frozenset = frozenset(RESUMABLE)) -> None:
    differ = [(f.name, saved.get(f.name), getattr(cfg, f.name)) for f in fields(cfg)
              if f.name not in resumable and saved.get(f.name) != getattr(cfg, f.name)]
    if differ:
        what = ", ".join(f"--{n}: checkpoint {a!r}, now {b!r}" for n, a, b in differ)
        raise ValueError(f"--resume: {path} was trained with other options ({what}); "
                         "use the same options, or a new --name to start another run")


def open_run(cfg, kind: str, resumable) -> Optional[dict]:
    """Check the run folder against --resume / --overwrite: the checkpoint's state when resuming, else None.
    `cfg` has name, out_dir, steps, stop_at, resume, overwrite and run_dir; `kind` is what the command trains."""
    check_run_dir(cfg.run_dir)
    ckpt_path = cfg.run_dir / CHECKPOINT
    if cfg.resume and not ckpt_path.exists():
        raise FileNotFoundError(f"--resume: no checkpoint at {ckpt_path} (run without --resume to start)")
    if not cfg.resume and not cfg.overwrite and ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue it, --overwrite to start over, "
                              "or choose another --name")
    if not cfg.resume:
        return None
    state = load_checkpoint(ckpt_path)
    if run_kind(state) != kind:
        raise ValueError(f"--resume: {ckpt_path} is a {run_kind(state)} run; continue it with `python -m "
                         f"nanomodels {KINDS[run_kind(state)]} --resume`")
    check_resumable(state["config"], cfg, ckpt_path, frozenset(resumable))
    if cfg.steps < state["step"]:
        raise ValueError(f"--steps: {ckpt_path} is at step {state['step']}; --steps must be at least that, "
                         f"got {cfg.steps}")
    if 0 < cfg.stop_at <= state["step"]:
        raise ValueError(f"--stop_at: {ckpt_path} is at step {state['step']}; --stop_at must be after it "
                         f"(or 0), got {cfg.stop_at}")
    return state


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
    state = open_run(cfg, "text", RESUMABLE)
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
    if len(ids) < min_tokens(cfg.block_size):
        raise ValueError(f"--data: {cfg.data!r} is {len(ids)} tokens long; with --block_size {cfg.block_size} "
                         f"it must be at least {min_tokens(cfg.block_size)} tokens, so that the last "
                         f"{VAL_FRACTION:.0%} (validation) and the rest (training) each hold more than "
                         "block_size tokens; give a longer text or a smaller --block_size")
    if state is None and cfg.tokenizer == "bpe" and tok.vocab_size < cfg.vocab_size:
        # BPE training stops when no pair occurs twice; a smaller vocabulary than asked is refused, not hidden
        fix = f"use --vocab_size {tok.vocab_size} or less" if tok.vocab_size > 256 else "use --tokenizer char"
        raise ValueError(f"--vocab_size: this text supports at most {tok.vocab_size} BPE tokens (after that "
                         f"no pair of tokens occurs twice); {fix}")
    train_ids, val_ids = train_val_split(ids, VAL_FRACTION)

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
    saved = start if state is not None else None  # the step of the checkpoint in the run folder, if any

    def checkpoint(step: int) -> None:
        nonlocal saved
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "config": asdict(cfg), "tokenizer": tok.to_dict()})
        saved = step

    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stop = min(cfg.stop_at or cfg.steps, cfg.steps)
    try:
        # Ctrl-C is deferred to the end of a step in a single process; under torchrun the launcher signals
        # every rank again at once, so there it stops the run where it is
        with deferred_interrupt(enabled=world == 1) as interrupt:
            if rank == 0:
                print(f"training {cfg.run_dir}: steps {start}..{stop} of {cfg.steps}, {model.num_params():,} "
                      f"parameters, {len(train_ids):,} training tokens ({cfg.tokenizer}, vocabulary "
                      f"{tok.vocab_size}), device {device}, CPU threads {torch.get_num_threads()} (--threads); "
                      "Ctrl-C stops with a checkpoint", flush=True)
            bar = tqdm(range(start, stop), initial=start, total=cfg.steps, disable=rank != 0 or not cfg.progress,
                       unit="step", dynamic_ncols=True)
            t0, timed_tokens = time.perf_counter(), 0
            model.train()
            for step in bar:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, cfg)
                x, y = get_batch(train_ids, cfg.batch_size, cfg.block_size, gen)  # the global batch; keep our slice
                x = x[rank * per_rank:(rank + 1) * per_rank].to(device)
                y = y[rank * per_rank:(rank + 1) * per_rank].to(device)
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
                        bar.write(f"step {step + 1:5d} | train {record['train_loss']:.4f} | "
                                  f"val {record['val_loss']:.4f}")
                    history.append(record)
                    checkpoint(step + 1)
                if interrupt.is_set():
                    if saved != step + 1:
                        checkpoint(step + 1)
                    bar.close()
                    raise Interrupted(f"interrupted: checkpoint of step {step + 1} written to {ckpt_path}; "
                                      "continue with --resume")
            bar.close()
        if world > 1:
            dist.barrier()
        if rank != 0:
            return {}
        if stop < cfg.steps:
            print(f"stopped at step {stop} of {cfg.steps} (--stop_at); continue with --resume")
            return {"history": history, "stopped_at": stop}
        return finish(cfg, model, tok, train_ids, val_ids, history, device, amp)
    except Interrupted:
        raise
    except KeyboardInterrupt:
        if saved is None:  # with --overwrite, the checkpoint on disk is still the run being replaced
            left = f"{ckpt_path} still holds the earlier run" if ckpt_path.exists() else "no checkpoint written"
            raise Interrupted(f"interrupted before the first checkpoint: {left}; run the command again to "
                              "start") from None
        raise Interrupted(f"interrupted: {ckpt_path} holds the checkpoint of step {saved}; "
                          "continue with --resume") from None


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


def plot_history(history: list, baseline: float, path: Path, title: str = "Training loss",
                 ylabel: str = "cross-entropy (nats/token)", baseline_label: str = "unigram baseline") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [h["step"] for h in history]
    ax.plot(steps, [h["train_loss"] for h in history], label="train (one batch)")
    ax.plot(steps, [h["val_loss"] for h in history if "val_loss" in h], marker="o", label="validation")
    ax.axhline(baseline, color="gray", linestyle="--", label=baseline_label)
    ax.set(title=title, xlabel="step", ylabel=ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def load_model(run_dir, device: Optional[str] = None):
    """(model, tokenizer, config) from a run folder's checkpoint, ready for sampling."""
    path = Path(run_dir) / CHECKPOINT
    state = load_checkpoint(path)
    if run_kind(state) != "text":
        raise ValueError(f"checkpoint: {path} is a {run_kind(state)} run, not a text model")
    cfg = TrainConfig(**{k: v for k, v in state["config"].items() if k in {f.name for f in fields(TrainConfig)}})
    tok = tokenizer_from_dict(state["tokenizer"])
    model = build_model(cfg, tok.vocab_size)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise ValueError(f"checkpoint: {path} does not match its own config ({str(err).splitlines()[0]})") from None
    return model.to(pick_device(device)).eval(), tok, cfg
