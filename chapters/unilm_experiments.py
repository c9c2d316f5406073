"""Chapter 02's experiment: one tiny Transformer trained on the UniLM mix of cloze objectives, then used with the
same weights as a bidirectional cloze model, a seq2seq model and a left-to-right generator; and the leak of mixing
the cloze and the shifted conventions.

The toy: length-8 digit reversal ("31415926|" -> "62951413."), the prompt with its `|` as the source S1, the
answer with its `.` as the target S2; `[MASK]` is the id one past the task vocabulary. The chapter notebook (which
runs in chapters/) imports this module.
"""

import torch

from nanomodels.data import make_task
from nanomodels.masks import cloze_inputs, left_to_right_mask, unilm_batch
from nanomodels.train import FunctionTask, TrainConfig, fit, lr_at, make_optimizer
from nanomodels.transformer import Transformer, TransformerConfig

task = make_task("reverse", 8)
MASK = task.vocab_size  # [MASK] = 40, one past the task vocabulary
S, T = task.prompt_len, task.answer_len
CONFIG = dict(vocab_size=task.vocab_size + 1, block_size=S + T, n_layers=3, d_model=128, n_heads=4)


def tokens_batch(n, generator):
    x, y = task.batch(n, generator)
    return torch.cat([x, y[:, -1:]], dim=1)  # prompt ++ answer, (n, S + T)


def new_model(seed):
    torch.manual_seed(seed)
    return Transformer(TransformerConfig(**CONFIG))


def train(model, steps, make_loss, seed, lr=2e-3):
    """AdamW, warmup + cosine (nanomodels.train), batch 64, gradient clipping at 1; returns (model, losses)."""
    tc = TrainConfig(steps=steps, lr=lr, min_lr=lr / 10, warmup=min(100, steps // 5), weight_decay=0.1)
    g = torch.Generator().manual_seed(seed)
    batches = FunctionTask(batch=lambda step: tokens_batch(64, g), loss=lambda model, tokens: make_loss(model, tokens, g))
    losses = fit(model, batches, steps, optimizer=make_optimizer(model, tc, torch.device("cpu")),
                 lr=lambda step: lr_at(step, tc), grad_clip=1.0)
    return model.eval(), losses


def leaky_loss(model, tokens, g):  # true tokens, targets NOT shifted, left-to-right mask keeps the diagonal
    targets = tokens.clone()
    targets[:, :S] = -100
    return model(tokens, targets, allowed=left_to_right_mask(S + T), causal=False)[1]


def unilm_loss(model, tokens, g):
    b = unilm_batch(tokens, S, MASK, g, mask_prob=0.15)
    return model(b["inputs"], b["targets"], allowed=b["allowed"], causal=False)[1]


@torch.no_grad()
def cloze_accuracy(model, mask_fn, n, seed=123, prob=0.15):
    """(source, target) accuracy at `prob` masked tokens of n fresh problems, under the mask `mask_fn()`."""
    g = torch.Generator().manual_seed(seed)
    tokens = tokens_batch(n, g)
    predict = torch.rand(tokens.shape, generator=g) < prob
    inputs, _ = cloze_inputs(tokens, predict, MASK)
    logits, _ = model(inputs, allowed=mask_fn(), causal=False)
    right = logits.argmax(-1) == tokens
    src_part, tgt_part = predict.clone(), predict.clone()
    src_part[:, S:], tgt_part[:, :S] = False, False
    return right[src_part].float().mean().item(), right[tgt_part].float().mean().item()
