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
# *This notebook is built from its source `chapters/06_dilated_attention.py` (jupytext percent format): edit the source,
# then rebuild with `python chapters/build.py 06` (add `--execute` to run it and save the outputs, `--quick` with it
# for quick mode).*

# %% [markdown]
# # Chapter 06 — LongNet: dilated attention, linear in the sequence length
#
# Dense attention compares every query with every key: $T^2$ scores, so doubling the context quadruples the work.
# LongNet (Ding et al. 2023, [arXiv 2307.02486](https://arxiv.org/abs/2307.02486)) keeps softmax attention but lets
# each query see a sparse, structured set of keys. A **pattern** $(w, r)$ cuts the sequence into segments of $w$
# tokens and keeps every $r$-th row of each segment, starting at an offset $s$; dense attention runs among the kept
# rows only, and the result is scattered back:
#
# $$\tilde Q_i = [Q_{iw+s}, Q_{iw+s+r}, \dots],\qquad \tilde O_i = \mathrm{softmax}\!\Big(\frac{\tilde Q_i \tilde K_i^\top}{\sqrt d}\Big)\tilde V_i .$$
#
# One pattern costs $(T/w)\,(w/r)^2 = Tw/r^2$ scores: linear in $T$. Short segments with no dilation see the
# neighbourhood in full; long segments with large dilation see far, sparsely. Head $j$ uses the offset $s_j = j \bmod r$,
# so with $H \ge r$ heads together they cover every row. The patterns are mixed per query with the weight of each pattern's softmax
# denominator $Z_i$,
#
# $$O = \sum_i \alpha_i\, O|_{(w_i, r_i)},\qquad \alpha_i = \frac{Z_i}{\sum_j Z_j} = \mathrm{softmax}_i(\mathrm{LSE}_i),$$
#
# which is exactly dense softmax attention over the *multiset* union of the keys the patterns give a query: dense
# attention with an additive bias $\log \mathrm{count}(q, k)$ ($-\infty$ where no pattern pairs them). With LongNet's
# geometric configuration $w_i = w_0 a^i$, $r_i = a^i$ the cost is bounded by $T w_0\, a/(a-1)$, and any two tokens
# are linked by a path of $O(\log T)$ hops.
#
# This chapter: the patterns drawn per head, the log-count identity checked numerically (outputs and gradients), what
# torchscale does differently, the cost against $T$ on a CPU (time and memory, to 128K tokens), the Triton kernel
# ("dilation = strided loads"), the sequence split across processes, and a long-range retrieval toy.

# %%
import json
import math
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import kernels  # noqa: F401  (without a GPU it sets TRITON_INTERPRET=1 before anything imports triton)
from nanomodels.dilated import (DilatedAttention, dilated_attention, dilated_branch, geometric_patterns, head_offsets,
                                merge_by_lse, num_score_entries)

import dilated_experiments as exp  # chapters/dilated_experiments.py: the benchmark, the toy, the process runs
from preamble import start  # chapters/preamble.py: the set-up line below
from show import show  # chapters/show.py: prints library code; an exercise's function as its stub

QUICK = start()  # quick or full run, 1 thread, seed 0
RESULTS = Path("results")

# %% [markdown]
# ## 1. One pattern, one head
#
# `dilated_branch` computes one pattern for every head: pad the sequence to a multiple of $w$, view each segment as
# $(w/r) \times r$ rows, take column $s_j$ for head $j$, attend, and scatter back with zeros (and $\mathrm{LSE} = -\infty$) on
# the rows the pattern does not keep. Padded keys of a short last segment are masked. Its core is exercise 6.2, the
# offsets are 6.1.

# %%
show(head_offsets)
show(dilated_branch)

# %% [markdown]
# The picture: which (query, key) pairs each pattern computes, for $T = 32$ and $H = 4$ heads, patterns
# $(8, 1), (16, 2), (32, 4)$; the last column is the count over patterns, i.e. the multiplicity that becomes the
# $\log\mathrm{count}$ bias.

# %%
T_PIC, H_PIC = 32, 4
WS, RS = (8, 16, 32), (1, 2, 4)


def pair_mask(T, H, w, r, causal=False):
    """(H, T, T) boolean: pattern (w, r) computes the score of (query t, key u) for head j."""
    t = torch.arange(T)
    same = (t[:, None] // w) == (t[None, :] // w)
    mask = torch.stack([same & (t[:, None] % r == j % r) & (t[None, :] % r == j % r) for j in range(H)])
    return mask & (t[None, :] <= t[:, None]) if causal else mask


fig, axes = plt.subplots(H_PIC, len(WS) + 1, figsize=(11, 11))
count = sum(pair_mask(T_PIC, H_PIC, w, r).int() for w, r in zip(WS, RS))
for j in range(H_PIC):
    for c, (w, r) in enumerate(zip(WS, RS)):
        axes[j, c].imshow(pair_mask(T_PIC, H_PIC, w, r)[j], cmap="Blues", vmin=0, vmax=1)
        axes[j, c].set_title(f"head {j}: w={w}, r={r}, s={j % r}", fontsize=9)
    im = axes[j, -1].imshow(count[j], cmap="viridis", vmin=0, vmax=3)
    axes[j, -1].set_title(f"head {j}: count (patterns)", fontsize=9)
for ax in axes.flat:
    ax.set_xlabel("key position", fontsize=7)
    ax.set_ylabel("query position", fontsize=7)
    ax.tick_params(labelsize=6)
fig.colorbar(im, ax=axes[:, -1], shrink=0.6, label="count(q, k)")
fig.suptitle("Dilated attention: computed (query, key) pairs per pattern and head, and their multiplicity")
plt.show()
covered = (count > 0).float().mean(dim=(1, 2))
print("share of (q, k) pairs covered per head:", [f"{c:.3f}" for c in covered.tolist()],
      f"| dense: 1.000 | score entries per head: {num_score_entries(T_PIC, WS, RS)} of {T_PIC ** 2}")

# %% [markdown]
# ## 2. The mixture is dense attention with a log-count bias — outputs and gradients
#
# `merge_by_lse` is the split-KV / flash-decoding combine (exercise 6.3): it mixes the patterns' outputs with
# $\alpha = \mathrm{softmax}(\mathrm{LSE})$ and gives 0 to a query no pattern covers. `dilated_attention` puts the
# pieces together, one `dilated_branch` per pattern and then the merge (exercise 6.5).

# %%
show(merge_by_lse)
show(dilated_attention)

# %%
def log_count_oracle(q, k, v, count):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1)) + torch.log(count)
    return torch.softmax(scores.masked_fill(count == 0, -math.inf), dim=-1) @ v


for causal in (False, True):
    q, k, v = (torch.randn(2, H_PIC, T_PIC, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    count = sum(pair_mask(T_PIC, H_PIC, w, r, causal).double() for w, r in zip(WS, RS))
    ours, oracle = dilated_attention(q, k, v, WS, RS, causal=causal), log_count_oracle(q, k, v, count)
    g_ours = torch.autograd.grad(ours.square().sum(), (q, k, v))
    g_oracle = torch.autograd.grad(oracle.square().sum(), (q, k, v))
    detached = dilated_attention(q, k, v, WS, RS, causal=causal, detach_weights=True)
    g_det = torch.autograd.grad(detached.square().sum(), (q, k, v))
    print(f"causal={causal!s:5}: forward max |diff| {(ours - oracle).abs().max():.1e}; gradient max |diff| "
          f"{max((a - b).abs().max().item() for a, b in zip(g_ours, g_oracle)):.1e}; with torchscale's detached "
          f"alpha the forward still matches ({(detached - oracle).abs().max():.1e}) but dq is off by "
          f"{(g_det[0] - g_oracle[0]).abs().max():.2f}")

# %% [markdown]
# One draw says little about the size of that gradient error; over ten seeds (same shapes and patterns), the largest
# $|\Delta|$ of $dQ$ and $dK$ per draw:

# %%
for causal in (False, True):
    errors = {"dq": [], "dk": []}
    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        q, k, v = (torch.randn(2, H_PIC, T_PIC, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
        exact = torch.autograd.grad(dilated_attention(q, k, v, WS, RS, causal=causal).square().sum(), (q, k))
        detached = dilated_attention(q, k, v, WS, RS, causal=causal, detach_weights=True)
        approx = torch.autograd.grad(detached.square().sum(), (q, k))
        for name, a, b in zip(errors, exact, approx):
            errors[name].append((a - b).abs().max().item())
    print(f"causal={causal!s:5}: " + "; ".join(
        f"{name} max |diff| min {min(e):.2f}, median {torch.tensor(e).median():.2f}, max {max(e):.2f}"
        for name, e in errors.items()) + " (10 seeds)")

# %% [markdown]
# Exercise 6.5 grades `dilated_attention` against this oracle (outputs and gradients, float64, with and without
# `detach_weights`, and a query no pattern keeps) and with a short experiment on its cost: torch's `FlopCounterMode`
# counts the floating-point operations of every matrix product in one call, which must be $4BHD$ times the patterns'
# score entries at each $T$ (two products, $QK^\top$ and $PV$, two operations per multiply-add). A solution that
# builds the $T \times T$ log-count matrix gets the outputs right and fails there. The experiment, on the library's
# function:
#
# ```bash
# python -m exercises grade 06 --exercise 6.5
# ```

# %%
from exercises.grading.checks.ch06_dilated_attention import COST_PATTERNS, cost_experiment, cost_table

print(f"patterns w = {COST_PATTERNS[0]}, r = {COST_PATTERNS[1]}; B = 1, H = 4, D = 8, causal")
print(cost_table(cost_experiment(dilated_attention)))

# %% [markdown]
# ## 3. Paper vs official code (torchscale @ 4d1e0e8)
#
# `torchscale/component/dilated_attention.py` computes the same mixture with these differences (reference note 05 §2);
# `torchscale_dilated_attention` in `nanomodels/dilated.py` reproduces its forward in plain PyTorch (bidirectional, one
# process), and `tests/test_dilated_torchscale.py` checks each point below against a re-implementation:
#
# - **Offsets are implicit**: a diagonal trick over the heads padded to a multiple of $r$ gives head $j$ the offset
#   $\lfloor j / \lceil H/r \rceil \rfloor$. For $H = 6$, $r = 4$ that is $[0, 0, 1, 1, 2, 2]$: offset 3 is never queried
#   although $H \ge r$ (here $j \bmod r$ covers every offset once $H \ge r$).
# - **$H < r$**: some offsets are never queried; here too — those rows get nothing from that pattern, and a row no
#   pattern covers outputs 0.
# - **Mixing weights under `torch.no_grad()`**: the forward is exact, the backward is not the gradient of the
#   combined attention — the cells above.
# - **Padding**: a segment is cut to $\min(w, T)$, the sequence zero-padded to a multiple of that and each segment to
#   a multiple of $r$, with no key mask. So a pattern with $w \ge T$ (and $r \mid T$) is never padded; only a pattern
#   with $w < T$ not dividing $T$ (or $r \nmid \min(w, T)$) gives a bidirectional model zero keys (score 0) that take
#   attention mass. When $r \nmid w$ the padded segments are laid end to end at their padded length, so rows shift:
#   for $w = 10$, $r = 3$, $T = 20$ rows 12–19 carry rows 10–17's results. (`dilated_attention` masks padded keys and
#   refuses $r \nmid w$.) The cell below measures the zero keys on torchscale's own computation, once as it is and
#   once with the padded keys masked.

# %%
from nanomodels.dilated import torchscale_dilated_attention

q, k, v = (torch.randn(1, 4, 40, 16, dtype=torch.float64) for _ in range(3))
for ws, rs in (((32, 64), (1, 2)), ((16, 64), (1, 2)), ((64,), (2,))):
    as_is = torchscale_dilated_attention(q, k, v, ws, rs)
    masked = torchscale_dilated_attention(q, k, v, ws, rs, mask_padding=True)
    d = (as_is - masked).abs()
    print(f"T = 40, patterns {list(zip(ws, rs))}: zero keys change the output by up to {d.max():.3f} "
          f"(mean {d.mean():.3f}); rows changed: {(d.amax(dim=(0, 1, 3)) > 0).sum().item()} of 40")

# %% [markdown]
# ## 4. The cost against $T$
#
# Score entries per head: $\sum_i \lceil T/w_i\rceil (w_i/r_i)^2$, against $T^2$. For the benchmark's patterns
# $w = (256, 512, 1024, 2048)$, $r = (1, 2, 4, 8)$ that is $480\,T$ once $T \ge 2048$; for LongNet's LM configuration
# $w = (2048, \dots, 32768)$, $r = (1, 2, 4, 6, 12)$ about $\sum_i w_i/r_i^2 \approx 4267$ keys per query. (That
# configuration has $r = 6$ and $12$, which do not divide a power of two: torchscale pads each segment to a multiple
# of $r$; `dilated_attention` refuses it with a ValueError, so the LM column below is the formula.)

# %%
LONGNET_LM = ((2048, 4096, 8192, 16384, 32768), (1, 2, 4, 6, 12))
print(f"{'T':>9} | {'benchmark patterns':>18} | {'% of dense':>10} | {'LongNet LM keys/query':>21} | {'% of dense':>10}")
for T in (2048, 8192, 32768, 131072, 1 << 20):
    ours, lm = num_score_entries(T, *exp.SCALE_PATTERNS), sum(T * w / r ** 2 for w, r in zip(*LONGNET_LM))
    print(f"{T:>9} | {ours:>18,} | {100 * ours / T ** 2:>10.2f} | {lm / T:>21.0f} | {100 * lm / T ** 2:>10.2f}")
print("geometric_patterns(64, 4, 3) =", geometric_patterns(64, 4, 3))

# %% [markdown]
# Measured on this machine, one thread, float32, $(B, H, D) = (1, 1, 64)$, non-causal: `dilated_attention` against
# torch's SDPA (on a CPU a fused kernel that never stores the scores) and against the equation as written
# (`nanomodels.attention.attention`, which stores the $T\times T$ matrix). A full run reads the table that
# `python chapters/dilated_experiments.py scale` saved (one fresh process per measurement, so that each peak
# memory is that call's); quick mode times a few small $T$ here.

# %%
scale_file = RESULTS / "ch06_scale.json"
if not QUICK and scale_file.exists():
    saved = json.loads(scale_file.read_text())
    rows = saved["rows"]
    print(f"from {scale_file} ({saved['machine']}):\n  {saved['command']}")
else:
    rows = exp.scale([512, 1024, 2048] if QUICK else [1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072],
                     repeats=1 if QUICK else 3, fresh_process=not QUICK)
print(exp.table(rows))

fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 4.5))
for method, style in (("dilated", "o-"), ("sdpa", "s--"), ("dense", "^:")):
    mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["T"])
    ax_t.loglog([r["T"] for r in mine], [r["ms"] for r in mine], style, label=method, base=2)
    if all(r["peak_mib"] is not None for r in mine):
        ax_m.loglog([r["T"] for r in mine], [max(r["peak_mib"], 0.1) for r in mine], style, label=method, base=2)
ax_t.set(title="time per call (1 thread)", xlabel="sequence length T", ylabel="ms")
ax_m.set(title="extra peak memory per call" + (" (full run only)" if QUICK else ""), xlabel="sequence length T",
         ylabel="MiB")
for ax in (ax_t, ax_m):
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend()
plt.show()

# %% [markdown]
# ## 5. The kernel: dilation is a strided load
#
# The kept rows of a (segment, head) are equally spaced, so a Triton program reads them with the row stride
# $r \cdot$ `stride_t`: no gather, no copy. One program per (query block, segment, batch·head) runs the online softmax
# of FlashAttention over the kept keys and writes $O$ and the LSE at its rows; `merge_by_lse` combines the patterns.
# The launcher sets the grid and hands the kernel those dilated row strides (exercise 6.4).
# Here it runs in Triton's interpreter on the CPU (the compile tier builds it for sm_80 / sm_90 with no spills:
# `python -m kernels.aot --only dilated_attention`).
#
# The backward reuses FlashAttention-2's backward kernels (chapter 01), which take the gradient of the LSE as well:
# $\alpha$ depends on every pattern's LSE, so each pattern receives $dO$ and $d\mathrm{LSE}$, and the kernels run with
# $\delta = \mathrm{rowsum}(dO \odot O) - d\mathrm{LSE}$. Each head's kept rows of each segment are gathered into a
# dense batch of $w/r$ rows (the short last segment's missing rows become padded keys) and $dQ, dK, dV$ are scattered
# back. The cell compares them with autograd through `dilated_attention` in float64. The compile tier builds those
# backward kernels too, with the causal and the no-mask kinds this path launches, at their default configs (no spills).

# %%
from kernels.dilated_attention import _dilated_fwd_kernel, dilated_attention_kernel, dilated_branch_kernel

show(_dilated_fwd_kernel)
show(dilated_branch_kernel)

# %%
q, k, v, do = (torch.randn(1, 4, 100 if QUICK else 300, 32) for _ in range(4))
for causal in (False, True):
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    got = dilated_attention_kernel(*leaves, (16, 32, 64), (1, 2, 4), causal=causal)
    got.backward(do)
    ref = [x.double().requires_grad_() for x in (q, k, v)]
    want = dilated_attention(*ref, (16, 32, 64), (1, 2, 4), causal=causal)
    want.backward(do.double())
    grad_err = max((a.grad.double() - b.grad).abs().max().item() for a, b in zip(leaves, ref))
    print(f"backend {kernels.backend(q)}, T = {q.size(2)}, causal={causal}: max |kernel - float64 reference| = "
          f"{(got.double() - want).abs().max():.1e} (O), {grad_err:.1e} (dQ, dK, dV)")

# %% [markdown]
# ## 6. The sequence split across processes
#
# LongNet's distributed algorithm: each of $P$ ranks holds a contiguous chunk of $L$ positions. A pattern with
# $w \le L$ is local. For $w > L$ each rank first sparsifies its own keys and values ($L/r$ rows per head) and the ranks
# of a segment all-gather those: a rank receives fewer than $w/r$ rows per head and pattern, however large $T$ and $P$
# grow. `nanomodels/dilated_parallel.py` does this on `torch.distributed` (gloo here, nccl on GPUs), and its test checks
# that outputs and gradients equal one process. Below: $P$ processes with $L = 16$ each, patterns
# $(16, 1), (32, 2), (64, 4)$, causal; bytes each rank receives, and the difference from one process.

# %%
comm = exp.communication([2] if QUICK else [1, 2, 4, 8])
bound = sum(2 * (w // r) * 4 * 8 * 8 for w, r in ((32, 2), (64, 4)))  # K and V, w/r rows, H = 4, D = 8, float64
print(f"{'P':>3} {'T':>5} | {'bytes received per rank':>23} | {'max |diff| vs 1 process':>23}")
for row in comm:
    print(f"{row['world']:>3} {row['T']:>5} | {row['max_bytes']:>23,} | {row['max_err']:>23.1e}")
print(f"bound sum 2 (w/r) H D 8 bytes over the patterns longer than a chunk: {bound:,} bytes")

# %% [markdown]
# ## 7. Reach: a value far back
#
# The toy of reference note E5: a sequence of filler tokens holds one value, written over 16 consecutive positions
# (the largest dilation rate, so every head offset meets a copy), ending $D$ positions before a query marker; the
# model must output the value at the marker. The same one-layer model is trained with three attention parts,
# swapped in one line (`exp.reach_model`):
#
# ```python
# Transformer(config, attention=longnet((64, 256, 1024), (1, 4, 16)))   # local: longnet((64,), (1,)); dense: the default
# ```
#
# local attention $(64, 1)$ sees the last 49 positions before the marker (the marker sits at position 1008, 48 into its
# 64-token segment); the dilated mix adds $(256, 4)$ and $(1024, 16)$; dense attention sees everything. Exact match at
# the marker per distance $D$, over seeds. The chapter trains a smaller version ($T = 241$, patterns $(16, 1), (64, 4),
# (256, 16)$, 150 steps, 3 seeds, in which the marker at position 240 starts its 16-token segment, so local attention
# sees no value at all; quick mode: 15 steps, 1 seed, which shows that the code runs, not the result); the
# version above ($T = 1009$) is `python chapters/dilated_experiments.py reach --seeds 0 1 2`, shown here when its
# `results/ch06_reach.json` exists.

# %%
show(DilatedAttention)
show(exp.reach_batch)

# %%
reach_file = RESULTS / "ch06_reach.json"
if not QUICK and reach_file.exists():
    saved = json.loads(reach_file.read_text())
    reach_rows, reach_cfg = saved["rows"], saved["config"]
    print(f"from {reach_file} ({saved['machine']}):\n  {saved['command']}")
else:
    reach_cfg = dict(exp.SMALL_REACH, steps=15, batch=8) if QUICK else exp.SMALL_REACH
    reach_rows = exp.reach([0] if QUICK else [0, 1, 2], cfg=reach_cfg, progress=lambda s: None)
distances = [int(d) for d in reach_cfg["distances"]]
print(exp.reach_table(reach_rows, distances))

fig, ax = plt.subplots(figsize=(8, 4))
for kind, style in (("local", "o:"), ("dilated", "s-"), ("dense", "^--")):
    mine = [r for r in reach_rows if r["kind"] == kind]
    acc = [sum(r["accuracy"][str(d)] if str(d) in r["accuracy"] else r["accuracy"][d] for r in mine) / len(mine)
           for d in distances]
    ax.plot(distances, acc, style, label=kind)
ax.set(xscale="log", xlabel="distance D from the value to the query marker (tokens)", ylabel="exact match",
       title=f"Long-range retrieval, T = {reach_cfg['T']}, mean over {len({r['seed'] for r in reach_rows})} seed(s)")
ax.axhline(1 / reach_cfg["n_values"], color="gray", lw=0.8, label="chance")
ax.legend()
plt.show()

# %% [markdown]
# What the full run shows ($T = 1009$, 300 steps, seeds 0, 1, 2, `results/ch06_reach.json`): local attention retrieves the
# value only while it lies inside its window (exact match 1.00 at $D = 16$ and $40$ on every seed, 0.02–0.11 from $D = 100$
# on, where chance is $1/16 = 0.0625$); the dilated mix and dense attention get 1.00 at every distance up to $D = 990$ on
# every seed. With 8% of dense attention's $T^2$ score entries per head at this length (86,016 vs 1,018,081; a shrinking
# fraction as $T$ grows, section 4), the dilated patterns reach as far as dense attention on this task. The training times
# in the last column were measured on a shared, loaded machine; the cost comparison is section 4's.

# %% [markdown]
# ## Exercises
#
# Fill in your file, `exercises/ex06_dilated_attention.py`, then run `python -m exercises grade 06`.
#
# | # | function | what the grader checks |
# |---|---|---|
# | 6.1 | `head_offsets` (`nanomodels/dilated.py`) | $s_j = j \bmod r$ for every head, also $H < r$ and $r = 1$ |
# | 6.2 | `dilated_branch` | kept rows and their LSE, zero elsewhere; padded keys get no weight; $w \ge T, r = 1$ is dense |
# | 6.3 | `merge_by_lse` | the split-KV identity; disjoint inputs select; uncovered rows give 0; gradients flow through $\alpha$ |
# | 6.4 | `dilated_branch_kernel` (`kernels/dilated_attention.py`) | the launch: grid and dilated row strides; the kernel equals `dilated_branch` |
# | 6.5 | `dilated_attention` | the log-count identity for outputs and gradients; `detach_weights`; uncovered queries give 0; the cost experiment: flops $= 4BHD \times$ score entries, linear in $T$ |
#
# Known-wrong solutions the grader must reject are in `exercises/grading/mutants/ch06_dilated_attention.md` (offsets ignored,
# padded keys attended, $\alpha$ detached, mixing by output norm, patterns averaged, the dense log-count matrix, ...).
