# ---
# jupyter:
#   jupytext:
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# *This notebook is built from its source `chapters/12_minilm.py` (jupytext percent format): edit the source,
# then rebuild with `python chapters/build.py 12` (add `--execute` to run it and save the outputs, `--quick` with it
# for quick mode).*

# %% [markdown]
# # Chapter 12 — MiniLM: distilling a Transformer through its self-attention
#
# MiniLM (Wang et al. 2020, [arXiv 2002.10957](https://arxiv.org/abs/2002.10957)) trains a small student to copy
# the *self-attention* of a large teacher's last layer instead of its hidden states, so the student's width and depth
# are free. Two KL divergences, teacher ‖ student, averaged over the $A_h$ heads and the $|x|$ query positions:
#
# $$\mathcal L_{AT} = \frac{1}{A_h|x|}\sum_a\sum_t \mathrm{KL}(A^T_{a,t}\,\|\,A^S_{a,t}),\qquad
#   \mathcal L_{VR} = \frac{1}{A_h|x|}\sum_a\sum_t \mathrm{KL}(\mathrm{VR}^T_{a,t}\,\|\,\mathrm{VR}^S_{a,t}),\qquad
#   \mathrm{VR} = \mathrm{softmax}(V V^\top/\sqrt{d_k}).$$
#
# The attention KL needs equal head counts. MiniLMv2 ([arXiv 2012.15828](https://arxiv.org/abs/2012.15828))
# concatenates the heads of $Q$, $K$, $V$ and re-splits them into $R$ *relation heads* shared by teacher and student,
# then distills the Q-Q, K-K and V-V relations — from an upper-middle teacher layer for large teachers.
# The paper's claim (theirs, on GLUE and SQuAD 2.0): more than 99% of the teacher's accuracy with half of its
# parameters and compute. This chapter measures what a toy shows on validation loss.

# %%
import json
import statistics
import tempfile
from pathlib import Path

import torch

from nanomodels.distill import default_teacher_layer, distill_terms
from nanomodels.minilm import attention_kl, minilm_v2_loss, relation

import minilm_experiments as exp  # chapters/minilm_experiments.py: the teacher run and the students
from preamble import start  # chapters/preamble.py: the set-up line below
from show import show

QUICK = start()  # quick or full run, 1 thread, seed 0
RESULTS = Path("results")

# %% [markdown]
# ## 1. The losses, from nanomodels/minilm.py, and the task that uses them
#
# $\mathcal L_{AT}$ is `attention_kl`: the mean over batch, heads and valid query rows of KL(teacher ‖ student), with
# $0 \log 0 = 0$. It is exercise 12.1, so only its specification is printed here; write it in
# `exercises/ex12_minilm.py` and grade it with `python -m exercises grade 12 --exercise 12.1`.

# %%
show(attention_kl)

# %% [markdown]
# The value relation $\mathrm{VR} = \mathrm{softmax}(V V^\top/\sqrt{d_k})$ (exercise 12.4), and MiniLMv2's relation
# heads (exercise 12.2): the same self-relation after the concatenated heads are re-split into `n_heads` relation
# heads, scaled by the width of one relation head. Grade them with `python -m exercises grade 12 --exercise 12.4`
# and `--exercise 12.2`.

# %%
from nanomodels.minilm import value_relation

show(value_relation)
show(relation)

# %% [markdown]
# The MiniLMv2 loss (exercise 12.3, `python -m exercises grade 12 --exercise 12.3`) sums the attention KLs of the
# Q-Q, K-K and V-V relations; `distill_terms` (nanomodels/distill.py) is where the trainer's distillation task calls
# these losses (and the logit KL).

# %%
show(minilm_v2_loss)
show(distill_terms)

# %% [markdown]
# Two checks you can see: the KL is zero for equal distributions and changes when teacher and student swap; the
# relations are $T\times T$ whatever the width, so a 12-head, 96-wide teacher and a 6-head, 48-wide student compare
# through 6 relation heads.

# %%
g = torch.Generator().manual_seed(0)
p = torch.softmax(torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64), -1)
q = torch.softmax(torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64), -1)
print(f"KL(p||p) = {attention_kl(p, p).item():.2e}, KL(p||q) = {attention_kl(p, q).item():.4f}, "
      f"KL(q||p) = {attention_kl(q, p).item():.4f}")
xt, xs = (torch.randn(2, 7, d, generator=g, dtype=torch.float64) for d in (96, 48))
print("relation shapes:", tuple(relation(xt, 6).shape), tuple(relation(xs, 6).shape),
      f"; v2 loss of three copies of one pair: {minilm_v2_loss((xt,) * 3, (xs,) * 3, 6).item():.4f}")
print("MiniLMv2's default teacher layer (0-based) for 6, 12, 24 layers:", [default_teacher_layer(n) for n in (6, 12, 24)])

# %% [markdown]
# ## 2. Teacher and students
#
# Teacher: 6 layers, $d = 256$, 4 heads, trained on the default corpus (pydoc, BPE 512) for 800 steps by an ordinary
# `train` run (`python chapters/minilm_experiments.py teacher`; its weights stay in the cache folder, its config and
# metrics are `results/ch12_teacher.json`). Students: the default 4-layer $d = 128$ model, 150 steps of 16 windows of
# 32 tokens, each arm from the same seeds (same initialisation seed, same batches):
#
# | arm | loss |
# |---|---|
# | scratch | LM loss, 4 heads |
# | scratch-8h | LM loss, 8 heads (the baseline of MiniLMv2's student) |
# | logits | LM + KL(teacher ‖ student) of the next-token distributions |
# | minilm | LM + last-layer $\mathcal L_{AT} + \mathcal L_{VR}$ (4 heads, as the teacher) |
# | minilmv2 | LM + Q-Q, K-K, V-V relations from teacher layer 4 of 0..5, 4 relation heads, student with 8 heads |
#
# Every distillation term is added to the LM loss with weight 1 in one run (jointly), not the papers' two stages
# (distil, then train on the task): at equal student steps one schedule serves every arm, and the two-stage
# split would leave a 150-step budget with two short halves. Validation loss is over the whole validation split
# in non-overlapping 32-token windows. Quick mode trains a 2-layer teacher for 20 steps and one seed for 10 steps:
# it shows that the code runs, not the result.

# %%
saved_file = RESULTS / "ch12_students.json"
if not QUICK and saved_file.exists():
    saved = json.loads(saved_file.read_text())
    print(f"from {saved_file} ({saved['machine']}):\n  {saved['command']}")
    rows, teacher_info = saved["rows"], saved["teacher"]
else:
    tmp = Path(tempfile.mkdtemp())
    cfg = exp.teacher_config(name="quick_teacher", out_dir=str(tmp), n_layers=2, d_model=64, steps=20,
                             eval_interval=20, sample_tokens=5) if QUICK else exp.teacher_config()
    exp.train_teacher(cfg)
    rows = [exp.student(arm, seed, cfg.run_dir, **({"steps": 10, "warmup": 2} if QUICK else {}))
            for seed in ([0] if QUICK else [0, 1, 2, 3, 4]) for arm in exp.ARMS]
    teacher_info = None

seeds = sorted({r["seed"] for r in rows})
by = {(r["arm"], r["seed"]): r for r in rows}
print(f"{'arm':12s} {'val loss (mean ± sd)':>22s} {'vs its scratch (paired)':>26s} {'train tok/s':>12s}")
for arm in exp.ARMS:
    vals = [by[arm, s]["val_loss"] for s in seeds]
    base = "scratch-8h" if exp.ARMS[arm]["n_heads"] == 8 else "scratch"
    diffs = [by[arm, s]["val_loss"] - by[base, s]["val_loss"] for s in seeds]
    sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
    dsd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    tok = statistics.mean(by[arm, s]["train_tokens_per_s"] for s in seeds)
    pair = "" if arm == base else f"{statistics.mean(diffs):+.4f} ± {dsd:.4f}"
    print(f"{arm:12s} {statistics.mean(vals):14.4f} ± {sd:.4f} {pair:>26s} {tok:12,.0f}")
if teacher_info:
    print(f"teacher: val loss {teacher_info['val_loss_block32']:.4f} on the same windows, "
          f"{teacher_info['params']:,} parameters; student {rows[0]['params']:,} parameters")

# %% [markdown]
# ## 3. What the toy shows
#
# The stored run (`results/ch12_students.json`, seeds 0-4, 150 steps): from scratch the 4-head student reaches
# 4.861 ± 0.142 nats/token (8 heads: 4.755 ± 0.148); logit distillation 4.223 ± 0.173, MiniLM 4.105 ± 0.024,
# MiniLMv2 4.095 ± 0.013. Paired against the scratch student with the same head count, every distillation lowers the
# validation loss on every seed: logits −0.638 ± 0.135, MiniLM −0.756 ± 0.159, MiniLMv2 (vs 8 heads) −0.660 ± 0.160.
# The attention-based terms also make the students far less seed-dependent (spread 0.01-0.02 vs 0.14-0.17). The
# teacher, 5.7× the student's non-embedding parameters (4,870,144 vs 858,880), scores 2.926 on the same windows: at
# this budget no student comes near it, and a distilled step costs about twice a plain one (the teacher's forward;
# train tokens/s column, on a shared loaded machine). The paper's claim (>99% of the teacher's GLUE/SQuAD accuracy
# at half the size) is about BERT-sized teachers and students trained on billions of tokens; this toy shows only that,
# at equal student steps, the teacher's attention (or its logits) is a much stronger early training signal than
# the next token alone.
#
# ## Exercises
#
# `exercises/ex12_minilm.py` holds four exercises (10 points): 12.1 the attention KL over the valid query rows (3),
# 12.2 the relation heads (3), 12.3 the MiniLMv2 loss (2), 12.4 the value relation (2). Grade them all with
#
#     python -m exercises grade 12
#
# and ask for a hint with `python -m exercises hint 12.1`. The grader compares each function with float64 loops,
# also on float32 and float16 inputs with relation logits far beyond the range of `exp`.
