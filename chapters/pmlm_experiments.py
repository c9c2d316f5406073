"""Chapter 03's experiment: seq2seq fine-tuning with pseudo masks (UniLMv2, as in s2s-ft) against UniLMv1 target
masking, at equal steps.

The toy: sort 14 digits ("31415926535897|" -> "11233455567899."), a 3-layer model (d = 128, 4 heads) trained from
scratch with each objective, the same initialisation, batches and learning-rate schedule; scored by exact match
with greedy cached decoding (`nanomodels.masks.cloze_decode`, `[MASK]` or `[P]` appended). The chapter notebook
(which runs in chapters/) imports this module; `run` is one training run.
"""

import time

import torch

from nanomodels.data import exact_match, make_task
from nanomodels.masks import cloze_decode, cloze_inputs, seq2seq_mask
from nanomodels.pmlm import s2s_pseudo_layout
from nanomodels.train import FunctionTask, TrainConfig, fit, lr_at, make_optimizer
from nanomodels.transformer import Transformer, TransformerConfig

task = make_task("sort", 14)
V = task.vocab_size
MASK, P = V, V + 1  # [MASK] = 40 and [P] = 41, past the task vocabulary
S, T = task.prompt_len, task.answer_len
CONFIG = dict(vocab_size=V + 2, block_size=S + T, n_layers=3, d_model=128, n_heads=4)


def loss_v1(model, src, tgt, g):
    """UniLMv1 fine-tuning: 70% of the target tokens become [MASK] (s2s-ft's mask_prob), the seq2seq mask, the
    loss at the [MASK]s."""
    seq = torch.cat([src, tgt], dim=1)
    predict = torch.zeros_like(seq, dtype=torch.bool)
    predict[:, S:] = torch.rand(tgt.shape, generator=g) < 0.7
    inputs, targets = cloze_inputs(seq, predict, MASK)
    return model(inputs, targets, allowed=seq2seq_mask(S, T), causal=False)[1]


def loss_pseudo(model, src, tgt, g):
    """Pseudo masks: source ++ target ++ [P] * T, one span per target token, the loss at every [P]."""
    b = s2s_pseudo_layout(src, tgt, P)
    return model(b["tokens"], b["targets"], allowed=b["allowed"], causal=False, positions=b["positions"])[1]


METHODS = {"UniLMv1 target masking": (loss_v1, MASK), "pseudo masks": (loss_pseudo, P)}


def evaluate(model, token, n):
    """Exact match on n fresh problems (evaluation seed 123), decoding with `token` appended at each step."""
    model.eval()
    em = exact_match(task, lambda p, L: cloze_decode(model, p, L, token)[0], n, torch.Generator().manual_seed(123))
    model.train()
    return em


def run(method, seed, steps, eval_every, n_eval):
    """One run: AdamW, warmup + cosine (nanomodels.train), batch 64, clipping at 1. Every `eval_every` steps the
    exact match on 300 problems (its time is not counted as training time); at the end on `n_eval` problems.
    Returns {"final": exact match, "curve": [(step, seconds, exact match)], "seconds": training time}."""
    make_loss, token = METHODS[method]
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(**CONFIG))
    tc = TrainConfig(steps=steps, lr=2e-3, min_lr=2e-4, warmup=min(100, steps // 5), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)

    def batch(step):
        x, y = task.batch(64, g)
        return torch.cat([x, y[:, -1:]], dim=1)

    curve, t0 = [], time.perf_counter()

    def on_step(done, loss):
        nonlocal t0
        if done % eval_every == 0 and done < steps:
            seconds = time.perf_counter() - t0
            curve.append((done, seconds, evaluate(model, token, 300)))
            t0 = time.perf_counter() - seconds  # evaluation time does not count as training time

    fit(model, FunctionTask(batch, lambda model, seq: make_loss(model, seq[:, :S], seq[:, S:], g)), steps,
        optimizer=make_optimizer(model, tc, torch.device("cpu")), lr=lambda step: lr_at(step, tc), grad_clip=1.0,
        on_step=on_step)
    seconds = time.perf_counter() - t0
    final = evaluate(model, token, n_eval)
    curve.append((steps, seconds, final))
    return {"final": final, "curve": curve, "seconds": seconds}
