"""Training, once: one loop (`fit`), one run around it (`run`: checkpoints, resume, Ctrl-C, evals, metrics), tasks.

    python -m nanomodels train                                   # the default tiny GPT on the pydoc corpus
    python -m nanomodels train --residual deepnorm --n_layers 12 # any part of chapters 02-08, by name (parts.py)
    torchrun --nproc_per_node=2 -m nanomodels train --name ddp   # the same run, data-parallel

The pieces:
  fit(model, task, steps, optimizer=...)   the loop: lr, batch, loss, backward, clip, step; the chapters call it
  run(cfg, task)                           a run folder around fit: atomic checkpoints, --resume, --stop_at,
                                           Ctrl-C, periodic evaluation, config.json, metrics.json, loss.png
  LMTask (here), LatentLMTask (train_latentlm.py)   what is trained: data, model, loss, evaluation, the end

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
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path, PurePath
from typing import Any, Callable, Optional, Protocol, Union

import torch
import torch.distributed as dist

from nanomodels.checkpoint import CHECKPOINT, KINDS, load_checkpoint, run_kind, save_checkpoint
from nanomodels.data import get_batch, load_text, train_val_split
from nanomodels.parts import ATTENTIONS, FFNS, LINEARS, RESIDUALS, ROUTERS, build_lm, check_parts, uses_kv_cache
from nanomodels.runtime import DEVICES, autocast_dtype, pick_device
from nanomodels.tokenizer import get_tokenizer, tokenizer_from_dict
from nanomodels.transformer import TransformerConfig
from nanomodels.yoco import SELF_ATTENTIONS, YOCO, YOCOConfig

TOKENIZERS = ("bpe", "char")
VAL_FRACTION = 0.1  # the last 10% of the corpus's tokens are the validation split
NORMS = {"pre": "pre", "post": "post"}  # the deprecated --norm -> --residual
ARCHS = ("transformer", "yoco")
DISTILL_KINDS = ("logits", "minilm", "minilmv2")  # nanomodels/distill.py
PART_OPTIONS = ("residual", "attention", "segment_lengths", "dilation_rates", "ffn", "experts", "top_k",
                "capacity_factor", "router", "aux_weight", "linear")


def option(default, help: str, **argparse_options):
    """A config field with its --help text (and extra argparse settings such as choices, metavar or nargs)."""
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


RUN_RESUMABLE = frozenset({"name", "out_dir", "steps", "stop_at", "eval_interval", "device", "threads", "resume",
                           "overwrite", "progress"})  # may change on --resume; every other option must match


@dataclass
class RunConfig:
    """The options of every run: where it lives, how long, the schedule, evaluation, seed, device, resuming."""
    name: str = option("default", "the run's folder name: the run lives in OUT_DIR/NAME/ (one folder name, "
                                  "no path)")
    out_dir: str = option("runs", "the folder that holds the run folders")
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
    seed: int = option(1337, "seed of the initialization and of the batch order")
    device: str = option("auto", "'auto' (cuda, then mps, then cpu), 'cpu', 'cuda', 'cuda:N' or 'mps'")
    threads: int = option(0, "CPU threads for torch; 0 = torch's choice (one per core, the fastest on a quiet "
                             "machine); on a busy shared machine --threads 1 is often faster")
    resume: bool = option(False, "continue the run in OUT_DIR/NAME/ from its checkpoint (after Ctrl-C, "
                                 "--stop_at, or to lengthen it with a larger --steps)")
    overwrite: bool = option(False, "start over even if OUT_DIR/NAME/ holds a checkpoint")
    progress: bool = option(True, "show a progress bar")
    # the decoder's size: both runs train a decoder (train-latentlm sets smaller defaults)
    n_layers: int = option(4, "transformer blocks")
    d_model: int = option(128, "model width")
    n_heads: int = option(4, "attention heads (must divide --d_model)")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def check_distill_options(cfg) -> None:
    """The distillation rules that need no teacher: a known --distill, --distill_weight >= 0, --relation_heads >= 0,
    --teacher_layer >= -1, and --arch transformer."""
    if cfg.distill not in DISTILL_KINDS:
        raise ValueError(f"--distill: must be one of {', '.join(DISTILL_KINDS)}, got {cfg.distill!r}")
    for name, low in (("distill_weight", 0), ("relation_heads", 0), ("teacher_layer", -1)):
        if getattr(cfg, name) < low:
            raise ValueError(f"--{name}: must be >= {low}, got {getattr(cfg, name)}")
    if cfg.distill_from:
        if cfg.arch != "transformer":
            raise ValueError("--distill_from: the student must be an --arch transformer model")


def run_option(name: str, default, help: Optional[str] = None):
    """RunConfig's field `name` with another default (and help text), for a config that derives from it."""
    metadata = RunConfig.__dataclass_fields__[name].metadata
    return option(default, help or metadata["help"], **{k: v for k, v in metadata.items() if k != "help"})


@dataclass
class TrainConfig(RunConfig):
    """A `train` run: a decoder LM built from the named parts (nanomodels/parts.py) on a text."""
    data: str = option("pydoc", "the training text: 'pydoc' (Python's documentation, ships with Python) or "
                                "the path to a UTF-8 text file", metavar="pydoc|PATH")
    tokenizer: str = option("bpe", "'bpe': byte-level BPE trained on the text (and cached); 'char': one token "
                                   "per character", choices=TOKENIZERS)
    vocab_size: int = option(512, "BPE vocabulary size, the 256 bytes included (ignored for --tokenizer char)")
    block_size: int = option(128, "context length in tokens")
    dropout: float = option(0.0, "dropout probability")
    arch: str = option("transformer", "'transformer' (the core decoder, built from the parts below) or 'yoco' "
                                      "(YOCO's decoder-decoder: --n_layers / 2 self-decoder layers of "
                                      "--self_attention, then as many cross-decoder layers sharing one global KV)",
                       choices=ARCHS)
    self_attention: str = option("gated_retention", "yoco: the self-decoder's mixer, 'gated_retention' or "
                                                    "'sliding_window' (with --window)", choices=SELF_ATTENTIONS)
    window: int = option(32, "yoco: the sliding window's width in tokens")
    residual: str = option("pre", "the residual scheme: 'pre' (Pre-LN), 'post' (Post-LN), 'deepnorm' (DeepNet, "
                                  "chapter 04), 'subln' (Magneto's Sub-LN, chapter 05)", choices=RESIDUALS)
    norm: str = option("", "deprecated, use --residual: 'pre' or 'post' ('' = not given)", choices=tuple(NORMS))
    attention: str = option("softmax", "'softmax' (dense causal attention), 'dilated' (LongNet's dilated "
                                       "attention, chapter 06, with --segment_lengths and --dilation_rates) or "
                                       "'retention' (RetNet's multi-scale retention; sample decodes recurrently)",
                            choices=ATTENTIONS)
    segment_lengths: tuple = option((32, 64, 128), "dilated attention: the segment length w of each pattern",
                                    nargs="+", type=int, metavar="W")
    dilation_rates: tuple = option((1, 2, 4), "dilated attention: the dilation rate r of each pattern (r divides "
                                              "its w)", nargs="+", type=int, metavar="R")
    ffn: str = option("mlp", "the feed-forward part: 'mlp' (dense) or 'moe' (sparse mixture of experts, chapter "
                             "07, with --experts --top_k --capacity_factor --router --aux_weight)", choices=FFNS)
    experts: int = option(8, "moe: the number of experts E")
    top_k: int = option(1, "moe: experts per token, 1 or 2")
    capacity_factor: float = option(1.0, "moe: each expert takes capacity_factor * k * tokens / E tokens")
    router: str = option("linear", "moe: 'linear' (softmax of x W) or 'xmoe' (X-MoE's low-dimensional cosine "
                                   "router)", choices=ROUTERS)
    aux_weight: float = option(0.01, "moe: the weight of the load-balancing loss added to the LM loss")
    linear: str = option("dense", "the body's linear layers: 'dense' (nn.Linear) or 'bitlinear' (BitNet b1.58, "
                                  "chapter 08; the head stays full precision)", choices=LINEARS)
    batch_size: int = option(32, "sequences per optimizer step, summed over all processes")
    eval_iters: int = option(20, "validation batches per evaluation")
    sample_tokens: int = option(200, "tokens to sample at the end of the run")
    distill_from: str = option("", "distill this student from a teacher: a `train` run's folder, e.g. runs/teacher "
                                   "(nanomodels/distill.py); '' = no distillation", metavar="RUN_DIR")
    distill: str = option("logits", "what the student learns from the teacher: 'logits' (KL of the next-token "
                                    "distributions), 'minilm' (last-layer attention + value relations, same head "
                                    "count), 'minilmv2' (Q-Q, K-K, V-V relations, any head count)",
                          choices=DISTILL_KINDS)
    distill_weight: float = option(1.0, "the weight of the distillation term added to the LM loss")
    relation_heads: int = option(0, "minilmv2: relation heads of teacher and student (must divide both widths); "
                                    "0 = the teacher's --n_heads")
    teacher_layer: int = option(-1, "minilmv2: the teacher's layer, 0-based; -1 = 3 * n_layers // 4 (upper-middle)")

    def __post_init__(self):
        check_run_name(self.name)
        check_counts(self, ("vocab_size", "n_layers", "d_model", "n_heads", "block_size", "batch_size", "steps",
                            "eval_interval", "eval_iters"),
                     ("warmup", "sample_tokens", "grad_clip", "weight_decay", "stop_at", "threads"))
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(f"--tokenizer: must be 'bpe' or 'char', got {self.tokenizer!r}")
        if self.tokenizer == "bpe" and self.vocab_size < 257:
            raise ValueError(f"--vocab_size: a byte-level BPE needs more than the 256 bytes, got {self.vocab_size}")
        if self.norm:
            if self.norm not in NORMS:
                raise ValueError(f"--norm: must be one of {', '.join(NORMS)} (deprecated: use --residual), "
                                 f"got {self.norm!r}")
            if self.residual not in ("pre", NORMS[self.norm]):
                raise ValueError(f"--norm: deprecated, and it contradicts --residual {self.residual}; give only "
                                 "--residual")
            print(f"--norm is deprecated: use --residual {NORMS[self.norm]}", file=sys.stderr)
            self.residual, self.norm = NORMS[self.norm], ""
        self.segment_lengths, self.dilation_rates = list(self.segment_lengths), list(self.dilation_rates)
        check_parts(**self.parts(), prefix="--")
        if self.arch not in ARCHS:
            raise ValueError(f"--arch: must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if self.arch == "yoco":
            changed = [f"--{f.name}" for f in fields(self) if f.name in PART_OPTIONS
                       and getattr(self, f.name) != f.default and f.name not in ("segment_lengths", "dilation_rates")]
            if changed:
                raise ValueError(f"--arch: yoco builds its own decoder; {', '.join(changed)} apply to --arch "
                                 "transformer")
        check_distill_options(self)
        check_schedule_and_run(self)
        self.model_config()  # d_model/n_heads/dropout rules live in TransformerConfig; check them now

    def parts(self) -> dict:
        """The keyword arguments of nanomodels.parts.build_lm."""
        return dict(residual=self.residual, attention=self.attention, ffn=self.ffn, linear=self.linear,
                    segment_lengths=tuple(self.segment_lengths), dilation_rates=tuple(self.dilation_rates),
                    experts=self.experts, top_k=self.top_k, capacity_factor=self.capacity_factor,
                    router=self.router, aux_weight=self.aux_weight)

    def model_config(self, vocab_size: Optional[int] = None) -> TransformerConfig:
        size = dict(vocab_size=vocab_size or self.vocab_size, block_size=self.block_size, n_layers=self.n_layers,
                    d_model=self.d_model, n_heads=self.n_heads, dropout=self.dropout)
        try:
            if self.arch == "yoco":
                return YOCOConfig(**size, self_attention=self.self_attention, window=self.window)
            return TransformerConfig(**size)
        except ValueError as err:
            raise ValueError(f"--{err}") from None


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


def lr_at(step: int, cfg) -> float:
    """Linear warmup to cfg.lr over cfg.warmup steps, then a cosine down to cfg.min_lr at the last step."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.startswith("embed.wpe")]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or n.startswith("embed.wpe")]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


# ---- the loop ----------------------------------------------------------------------------------------------

class Task(Protocol):
    """What `fit` trains on. `batch(step)` draws the batch of a step (from the task's own seeded generator, so
    that a resumed run draws the batches a straight run would); `loss(model, batch)` is the scalar to minimize,
    the model's own loss where it has one (the head's loss plus its parts' `auxiliary_loss()`)."""

    def batch(self, step: int) -> Any: ...

    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...


def lm_loss(model, batch) -> torch.Tensor:
    """The loss of an (inputs, targets) batch: `model(inputs, targets)[1]`, aux losses included."""
    inputs, targets = batch
    return model(inputs, targets)[1]


@dataclass
class FunctionTask:
    """A Task made of two functions: FunctionTask(lambda step: draw(batch_size, generator), lm_loss)."""
    batch: Callable[[int], Any]
    loss: Callable[[torch.nn.Module, Any], torch.Tensor] = lm_loss


def fit(model: torch.nn.Module, task: Task, steps: int, *, optimizer: torch.optim.Optimizer,
        lr: Union[None, float, Callable[[int], float]] = None, grad_clip: float = 0.0, start: int = 0,
        on_step: Optional[Callable[[int, torch.Tensor], Optional[bool]]] = None,
        schedule: Optional[Callable[[int, torch.optim.Optimizer], None]] = None) -> list:
    """The training loop, written once: steps start .. steps-1 of `model` on `task`, each one
        learning rate (lr: None keeps the optimizer's, a number, or a function of the step; or schedule(step,
        optimizer), which sets the groups itself: several rates, weight decay) -> task.batch(step)
        -> task.loss(model, batch) -> backward -> clip the global gradient norm to grad_clip (0: no clipping)
        -> optimizer.step()
    then on_step(steps done, detached loss), which may evaluate, log or checkpoint, and returns True to stop.
    Returns the losses of the steps taken, as floats."""
    losses = []
    model.train()
    for step in range(start, steps):
        if lr is not None:
            for group in optimizer.param_groups:
                group["lr"] = lr(step) if callable(lr) else lr
        if schedule is not None:
            schedule(step, optimizer)
        loss = task.loss(model, task.batch(step))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(loss.item())
        if on_step is not None and on_step(step + 1, loss.detach()):
            break
    return losses


# ---- a run: a folder around the loop -----------------------------------------------------------------------

def check_resumable(saved: dict, cfg, path: Path, resumable: frozenset = RUN_RESUMABLE) -> None:
    differ = [(f.name, saved.get(f.name, f.default), getattr(cfg, f.name)) for f in fields(cfg)
              if f.name not in resumable and saved.get(f.name, f.default) != getattr(cfg, f.name)]
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


class RunTask(Task, Protocol):
    """What `run` trains, besides a Task's batch and loss. Attributes: kind (the checkpoint's kind, see
    nanomodels/checkpoint.py), resumable (the options that may change on --resume), device, rank, world,
    rate = (metric name, progress-bar name, items per step), phase (the progress bar's label, or None), and
    after setup: model, optimizer, generator (the one seeded generator that draws every batch)."""

    def setup(self, state: Optional[dict]) -> None:
        """Load the data, build the model, its optimizer and the generator (state: the checkpoint, resuming)."""

    def describe(self, start: int, stop: int) -> str:
        """The start-up line's middle: what trains, which steps, how many parameters, on what."""

    def before_loop(self, interrupt: threading.Event, checkpoint: Callable[[int], None]) -> None:
        """A phase before the loop (LatentLM's sigma-VAE); it checkpoints with step 0 and stops on interrupt."""

    def evaluate(self) -> float:
        """The validation loss, with a fixed seed (the same batches or noise every time)."""

    def record(self) -> dict:
        """More numbers for the history at each evaluation (e.g. the aux loss)."""

    def checkpoint_state(self) -> dict:
        """The task's own entries of the checkpoint (its tokenizer, a phase's state, its kind)."""

    def stopped(self) -> dict:
        """More entries of what `run` returns when it stops at --stop_at."""

    def finish(self, history: list) -> tuple:
        """(metrics, plot options for plot_history, lines to print) at the end of the run."""


def run(cfg: RunConfig, task: RunTask) -> dict:
    """Train `task` as configured in its run folder, cfg.run_dir: returns the metrics (also metrics.json).

    Resuming loads the model, optimizer, generator and torch RNG states, so batches and noise continue exactly;
    Ctrl-C (single process) finishes the current step and writes its checkpoint; an evaluation and a checkpoint
    every cfg.eval_interval steps and at the last step; config.json at the start, metrics.json and loss.png at
    the end."""
    from tqdm.auto import tqdm

    rank, world = task.rank, task.world
    ckpt_path = cfg.run_dir / CHECKPOINT
    state = open_run(cfg, task.kind, task.resumable)
    task.setup(state)
    model, optimizer, gen = task.model, task.optimizer, task.generator
    start, history = 0, []
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        start, history = state["step"], state["history"]
    train_model = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    saved = start if state is not None else None  # the step of the checkpoint in the run folder, if any

    def checkpoint(step: int) -> None:
        nonlocal saved
        if rank == 0:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "history": history,
                "config": asdict(cfg), **task.checkpoint_state()})
        saved = step

    if rank == 0:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        (cfg.run_dir / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    stop = min(cfg.stop_at or cfg.steps, cfg.steps)
    rate_key, rate_label, per_step = task.rate
    try:
        # Ctrl-C is deferred to the end of a step in a single process; under torchrun the launcher signals
        # every rank again at once, so there it stops the run where it is
        with deferred_interrupt(enabled=world == 1) as interrupt:
            if rank == 0:
                print(f"training {cfg.run_dir}: {task.describe(start, stop)}, device {task.device}, CPU threads "
                      f"{torch.get_num_threads()} (--threads); Ctrl-C stops with a checkpoint", flush=True)
            task.before_loop(interrupt, checkpoint)
            bar = tqdm(total=cfg.steps, initial=start, disable=rank != 0 or not cfg.progress, unit="step",
                       desc=task.phase, dynamic_ncols=True)
            t0 = time.perf_counter()

            def on_step(done: int, loss: torch.Tensor) -> None:
                per_s = (done - start) * per_step / (time.perf_counter() - t0)
                bar.update(1)
                bar.set_postfix({"loss": f"{loss.item():.4f}", rate_label: f"{per_s:,.0f}"})
                if done % cfg.eval_interval == 0 or done == stop:
                    train_loss = loss.clone()
                    if world > 1:  # the loss of the global batch = the mean of the ranks' losses
                        dist.all_reduce(train_loss)
                        train_loss /= world
                    record = {"step": done, "train_loss": train_loss.item(), "lr": lr_at(done - 1, cfg),
                              rate_key: per_s, **task.record()}
                    if rank == 0:
                        record["val_loss"] = task.evaluate()
                        bar.write(f"step {done:5d} | train {record['train_loss']:.4f} | val {record['val_loss']:.4f}")
                    history.append(record)
                    checkpoint(done)
                if interrupt.is_set():
                    if saved != done:
                        checkpoint(done)
                    bar.close()
                    raise Interrupted(f"interrupted: checkpoint of step {done} written to {ckpt_path}; "
                                      "continue with --resume")

            fit(train_model, task, stop, optimizer=optimizer, lr=lambda step: lr_at(step, cfg),
                grad_clip=cfg.grad_clip, start=start, on_step=on_step)
            bar.close()
        if world > 1:
            dist.barrier()
        if rank != 0:
            return {}
        if stop < cfg.steps:
            print(f"stopped at step {stop} of {cfg.steps} (--stop_at); continue with --resume")
            return {"history": history, **task.stopped(), "stopped_at": stop}
        metrics, plot, lines = task.finish(history)
        (cfg.run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        plot_history(history, path=cfg.run_dir / "loss.png", **plot)
        print("\n" + "\n".join(lines))
        return metrics
    except Interrupted:
        raise
    except KeyboardInterrupt:
        if saved is None:  # with --overwrite, the checkpoint on disk is still the run being replaced
            left = f"{ckpt_path} still holds the earlier run" if ckpt_path.exists() else "no checkpoint written"
            raise Interrupted(f"interrupted before the first checkpoint: {left}; run the command again to "
                              "start") from None
        raise Interrupted(f"interrupted: {ckpt_path} holds the checkpoint of step {saved}; "
                          "continue with --resume") from None


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


def start_device(cfg: RunConfig) -> tuple:
    """(device, rank, world): the device, torch's thread count, and the process group under torchrun."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    device = pick_device(cfg.device)
    rank, world = 0, 1
    if distributed:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    return device, rank, world


# ---- the LM task: `python -m nanomodels train` -------------------------------------------------------------

def unigram_loss(train_ids: torch.Tensor, val_ids: torch.Tensor, vocab_size: int) -> float:
    """Cross-entropy (nats/token) of the validation tokens under train-set token frequencies (add-one smoothed)."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double() + 1.0
    logp = torch.log(counts / counts.sum())
    return float(-logp[val_ids].mean())


def build_model(cfg: TrainConfig, vocab_size: int) -> torch.nn.Module:
    """The run's model: the core Transformer with the parts cfg names (nanomodels/parts.py), or YOCO."""
    if cfg.arch == "yoco":
        return YOCO(cfg.model_config(vocab_size))
    return build_lm(cfg.model_config(vocab_size), **cfg.parts())


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


class LMTask:
    """Next-token prediction on a text (`python -m nanomodels train`): a tokenizer trained on the text (or read
    from the checkpoint), the last VAL_FRACTION of its tokens for validation, random windows for training (each
    rank keeps its slice of the global batch), the end of the run: the unigram baseline and a sample."""
    kind, phase = "text", None
    resumable = RUN_RESUMABLE | {"eval_iters", "sample_tokens"}

    def __init__(self, cfg: TrainConfig, device: torch.device, rank: int = 0, world: int = 1):
        if cfg.batch_size % world:
            raise ValueError(f"--batch_size: must be divisible by the number of processes ({world}), got "
                             f"{cfg.batch_size}")
        self.cfg, self.device, self.rank, self.world = cfg, device, rank, world
        self.amp = autocast_dtype(device)
        self.rate = ("tokens_per_s", "tok_s", cfg.batch_size * cfg.block_size)

    def setup(self, state):
        cfg, rank = self.cfg, self.rank
        text = load_text(cfg.data)
        if state is not None:
            tok = tokenizer_from_dict(state["tokenizer"])
        else:
            if rank == 0:  # rank 0 trains (and caches) the BPE first; the others then read the cache
                tok = get_tokenizer(cfg.tokenizer, text, cfg.vocab_size)
            if self.world > 1:
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
        self.tok = tok
        self.train_ids, self.val_ids = train_val_split(ids, VAL_FRACTION)
        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, tok.vocab_size).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.generator = torch.Generator().manual_seed(cfg.seed)  # every training batch comes from here

    def describe(self, start, stop):
        cfg = self.cfg
        parts = {k: v for k, v in cfg.parts().items() if k in ("residual", "attention", "ffn", "linear")}
        return (f"steps {start}..{stop} of {cfg.steps}, {self.model.num_params():,} parameters ("
                + ", ".join(f"--{k} {v}" for k, v in parts.items()) + f"), {len(self.train_ids):,} training "
                f"tokens ({cfg.tokenizer}, vocabulary {self.tok.vocab_size})")

    def before_loop(self, interrupt, checkpoint):
        pass

    def batch(self, step):
        cfg, per_rank = self.cfg, self.cfg.batch_size // self.world
        x, y = get_batch(self.train_ids, cfg.batch_size, cfg.block_size, self.generator)  # global; keep our slice
        keep = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return x[keep].to(self.device), y[keep].to(self.device)

    def loss(self, model, batch):
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            return lm_loss(model, batch)

    def evaluate(self):
        return evaluate(self.model, self.val_ids, self.cfg, self.device, self.amp)

    def record(self):
        return {"aux_loss": self.model.auxiliary_loss().detach().item()} if self.cfg.ffn == "moe" else {}

    def checkpoint_state(self):
        return {"tokenizer": self.tok.to_dict()}

    def stopped(self):
        return {}

    def finish(self, history):
        """Final numbers against the unigram baseline and a sample."""
        cfg, model, tok, device = self.cfg, self.model, self.tok, self.device
        val_loss = self.evaluate()
        baseline = unigram_loss(self.train_ids, self.val_ids, tok.vocab_size)
        try:
            prompt = torch.tensor([tok.encode("The ")], dtype=torch.long, device=device)
        except ValueError:  # a char vocabulary without these letters: start from the validation text instead
            prompt = self.val_ids[None, :1].to(device)
        out = model.eval().generate(prompt, cfg.sample_tokens, temperature=0.8, top_k=40,
                                    generator=torch.Generator(device=device).manual_seed(cfg.seed),
                                    use_cache=uses_kv_cache(model))
        sample = tok.decode(out[0].tolist())
        metrics = {"val_loss": val_loss, "unigram_val_loss": baseline, "steps": cfg.steps,
                   "tokens_per_s": history[-1]["tokens_per_s"] if history else None,
                   "params": model.num_params(), "device": str(device), "history": history, "sample": sample}
        lines = [f"validation loss {val_loss:.4f} nats/token  vs  unigram baseline {baseline:.4f} "
                 f"({math.exp(val_loss):.1f} vs {math.exp(baseline):.1f} perplexity)",
                 f"{model.num_params():,} parameters, {metrics['tokens_per_s'] or 0:,.0f} tokens/s on {device}",
                 f"sample:\n{sample}\n\nwrote {cfg.run_dir}/ (ckpt.pt, config.json, metrics.json, loss.png)"]
        return metrics, {"baseline": baseline}, lines


def train(cfg: TrainConfig) -> dict:
    """Run training as configured; returns the metrics dict (also written to <run_dir>/metrics.json)."""
    device, rank, world = start_device(cfg)
    try:
        if cfg.distill_from:
            from nanomodels.distill import DistillTask  # it builds on LMTask
            return run(cfg, DistillTask(cfg, device, rank, world))
        return run(cfg, LMTask(cfg, device, rank, world))
    finally:
        if world > 1:
            dist.destroy_process_group()


def load_model(run_dir, device: Optional[str] = None):
    """(model, tokenizer, config) from a run folder's checkpoint, ready for sampling: the model is rebuilt from
    the run's own config (the parts it was trained with), as in its config.json."""
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
