"""Distillation as a trainer task: a student LM learns from a frozen teacher run (chapter 12, nanomodels/minilm.py).

    loss = the student's LM loss + distill_weight * D,   D one of
      logits    KL(teacher ‖ student) of the next-token distributions (Hinton et al. 2015, τ = 1): the baseline
      minilm    MiniLM's L_AT + L_VR between the teacher's last layer and the student's last layer; the attention
                KL needs one head count in both (MiniLMv2's relation heads relax it)
      minilmv2  MiniLMv2: Σ over Q-Q, K-K, V-V of the relation KL between teacher layer `teacher_layer` and the
                student's last layer, both re-split into `relation_heads` relation heads (any head counts, any
                widths the relation heads divide)

The teacher is a finished `train` run (`load_model(run_dir)`), kept in eval mode, without gradients, run under
torch.no_grad(); the student uses its tokenizer (so its vocabulary) and a context no longer than its own.
MiniLMv2's default layer (teacher_layer = -1) is `default_teacher_layer(L) = 3L // 4` (0-based): the layer three
quarters of the way up, an upper-middle layer as the paper takes for large teachers (the 5th of 6, the 19th of 24).
The papers distill with the attention terms alone and fine-tune afterwards; here every term is added to the
student's LM loss in one run (one schedule, equal steps for every kind).

`distill_terms` / `distill_loss` are the loss on one batch (a chapter calls them with nanomodels.train.fit);
`DistillTask` is the same loss as a task for `nanomodels.train.run`, configured by TrainConfig's distillation fields
distill_from, distill, distill_weight, relation_heads, teacher_layer.
"""

import contextlib
from typing import Optional

import torch

from nanomodels.minilm import capture_attention, logit_kl, minilm_loss, minilm_v2_loss
from nanomodels.train import DISTILL_KINDS as KINDS
from nanomodels.train import LMTask, check_distill_options, evaluate, load_model



def default_teacher_layer(n_layers: int) -> int:
    """MiniLMv2's upper-middle teacher layer, 0-based: 3 * n_layers // 4 (6 layers -> 4, 12 -> 9, 24 -> 18)."""
    return 3 * n_layers // 4


def resolve_teacher_layer(n: int, teacher_layer: int) -> int:
    """teacher_layer (-1 = the default) as a 0-based layer of a teacher of n layers; ValueError outside."""
    if isinstance(teacher_layer, bool) or not isinstance(teacher_layer, int) or not -1 <= teacher_layer < n:
        raise ValueError(f"--teacher_layer: must be -1 (the default, {default_teacher_layer(n)}) or a 0-based layer "
                         f"of the teacher's {n}, got {teacher_layer!r}")
    return default_teacher_layer(n) if teacher_layer == -1 else teacher_layer


def distill_terms(kind: str, teacher, student, batch, *, teacher_layer: int = -1, relation_heads: int = 0):
    """(the student's LM loss, the distillation term D) on one (inputs, targets) batch, teacher ‖ student.

    kind: 'logits', 'minilm' or 'minilmv2' (module docstring). teacher_layer: minilmv2's teacher layer, 0-based,
    -1 = default_teacher_layer; relation_heads: minilmv2's relation heads, 0 = the teacher's head count.
    The teacher is set to eval mode and run under no_grad; the student may be wrapped in DDP (`.module`)."""
    if kind not in KINDS:
        raise ValueError(f"--distill: must be one of {', '.join(KINDS)}, got {kind!r}")
    inputs, targets = batch
    inner = getattr(student, "module", student)
    layer = resolve_teacher_layer(len(teacher.blocks), teacher_layer) if kind == "minilmv2" else -1
    watch = kind != "logits"
    teacher.eval()
    with torch.no_grad(), (capture_attention(teacher, layer) if watch else contextlib.nullcontext()) as t_rec:
        t_logits, _ = teacher(inputs)
    with capture_attention(inner, -1) if watch else contextlib.nullcontext() as s_rec:
        s_logits, lm = student(inputs, targets)
    if kind == "logits":
        return lm, logit_kl(t_logits, s_logits)
    if kind == "minilm":
        return lm, minilm_loss(t_rec, s_rec)
    heads = relation_heads or teacher.config.n_heads
    return lm, minilm_v2_loss((t_rec.x_q, t_rec.x_k, t_rec.x_v), (s_rec.x_q, s_rec.x_k, s_rec.x_v), heads)


def distill_loss(kind: str, teacher, student, batch, *, weight: float = 1.0, teacher_layer: int = -1,
                 relation_heads: int = 0) -> torch.Tensor:
    """LM loss + weight * D: the loss `fit` minimizes, e.g.
    FunctionTask(draw, lambda model, batch: distill_loss('minilm', teacher, model, batch))."""
    lm, term = distill_terms(kind, teacher, student, batch, teacher_layer=teacher_layer,
                             relation_heads=relation_heads)
    return lm + weight * term


def check_teacher(cfg, teacher_cfg, teacher_vocab: int) -> None:
    """The rules between the student's options and the teacher run's (ValueError naming the student's option)."""
    if cfg.tokenizer != teacher_cfg.tokenizer or (cfg.tokenizer == "bpe" and cfg.vocab_size != teacher_vocab):
        raise ValueError(f"--tokenizer/--vocab_size: the student uses the teacher's tokenizer ({teacher_cfg.tokenizer}"
                         f", vocabulary {teacher_vocab}), got {cfg.tokenizer} {cfg.vocab_size}")
    if cfg.block_size > teacher_cfg.block_size:
        raise ValueError(f"--block_size: must be <= the teacher's block_size {teacher_cfg.block_size} (it reads "
                         f"the student's windows), got {cfg.block_size}")
    if cfg.distill == "logits":
        return
    for who, attention in (("the student", cfg.attention), ("the teacher", teacher_cfg.attention)):
        if attention != "softmax":
            raise ValueError(f"--attention: --distill {cfg.distill} reads softmax attention, {who} uses {attention}")
    if cfg.distill == "minilm" and cfg.n_heads != teacher_cfg.n_heads:
        raise ValueError(f"--n_heads: --distill minilm compares attention head by head, so the student needs the "
                         f"teacher's {teacher_cfg.n_heads} heads, got {cfg.n_heads}; MiniLMv2 (--distill minilmv2) "
                         "relaxes it with relation heads")
    if cfg.distill == "minilmv2":
        heads = cfg.relation_heads or teacher_cfg.n_heads
        if teacher_cfg.d_model % heads or cfg.d_model % heads:
            raise ValueError(f"--relation_heads: must divide the teacher's d_model {teacher_cfg.d_model} and the "
                             f"student's {cfg.d_model}, got {heads} (0 means the teacher's n_heads)")
        resolve_teacher_layer(teacher_cfg.n_layers, cfg.teacher_layer)


class DistillTask(LMTask):
    """LMTask whose loss adds cfg.distill_weight * D from the teacher run cfg.distill_from (module docstring).
    Reads cfg.distill_from, cfg.distill, cfg.distill_weight, cfg.relation_heads, cfg.teacher_layer."""

    def __init__(self, cfg, device: torch.device, rank: int = 0, world: int = 1):
        super().__init__(cfg, device, rank, world)
        check_distill_options(cfg)
        if not cfg.distill_from:
            raise ValueError("--distill_from: the teacher's run folder is required to distill")
        self.teacher, self.teacher_tok, self.teacher_cfg = load_model(cfg.distill_from, str(device))
        self.teacher.requires_grad_(False)
        check_teacher(cfg, self.teacher_cfg, self.teacher_tok.vocab_size)
        self.last_term: Optional[torch.Tensor] = None

    def setup(self, state):
        # LMTask reads a checkpoint's tokenizer instead of training one: a fresh run gets the teacher's that way
        super().setup(state if state is not None else {"tokenizer": self.teacher_tok.to_dict()})

    def describe(self, start, stop):
        cfg = self.cfg
        return (super().describe(start, stop) + f"; distilling --distill {cfg.distill} (weight {cfg.distill_weight})"
                f" from {cfg.distill_from} ({self.teacher.num_params():,} parameters)")

    def loss(self, model, batch):
        cfg = self.cfg
        with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
            lm, term = distill_terms(cfg.distill, self.teacher, model, batch, teacher_layer=cfg.teacher_layer,
                                     relation_heads=cfg.relation_heads)
        self.last_term = term.detach()
        return lm + cfg.distill_weight * term

    def record(self):
        extra = {} if self.last_term is None else {"distill_loss": self.last_term.item()}
        return {**super().record(), **extra}

    def teacher_val_loss(self) -> float:
        loss = evaluate(self.teacher, self.val_ids, self.cfg, self.device, self.amp)
        self.teacher.eval()  # evaluate() leaves its model in train mode
        return loss

    def finish(self, history):
        metrics, plot, lines = super().finish(history)
        teacher_loss = self.teacher_val_loss()
        metrics.update(distill=self.cfg.distill, distill_from=self.cfg.distill_from, teacher_val_loss=teacher_loss,
                       teacher_params=self.teacher.num_params())
        lines.insert(1, f"teacher {self.cfg.distill_from}: validation loss {teacher_loss:.4f} on the same batches, "
                        f"{self.teacher.num_params():,} parameters")
        return metrics, plot, lines
