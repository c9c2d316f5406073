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
# *This notebook is built from its source `chapters/01_kernels_flash_attention.py` (jupytext percent format): edit the source, then
# rebuild with `python chapters/build.py 01` (add `--execute` to run it and save the outputs, `--quick` with it
# for quick mode).*

# %% [markdown]
# # Chapter 01 — Kernels: from a softmax to FlashAttention with UniLM masks
#
# Chapter 00's attention computes the whole $T \times T$ score matrix $S = QK^\top/\sqrt{d}$, masks it, softmaxes it, then
# multiplies by $V$. On a GPU the arithmetic is cheap and the memory traffic is expensive: $S$ goes out to
# HBM and comes back several times. **FlashAttention** (Dao et al. 2022; FlashAttention-2, arXiv 2307.08691) never
# stores $S$. It computes attention one tile at a time in on-chip memory, using an *online* softmax. The UniLM
# masks (bidirectional, left-to-right, seq2seq) then become predicates on the row and column indices inside a
# tile, and the kernel never loads a tile that a mask hides entirely. That skipping is why a masked kernel runs
# *faster* than an unmasked one.
#
# We build it in three steps, each a kernel in `kernels/`: **(1)** a fused row softmax, **(2)** the online softmax
# (a running max and sum), **(3)** FlashAttention forward and backward with the mask kinds. Then we write the
# same softmax in **CUDA C**, to show the programming model underneath Triton. Everything runs here on a CPU
# through Triton's interpreter (`TRITON_INTERPRET=1`, set by `import kernels` when there is no GPU). The
# interpreter executes the kernel's programs one after another in NumPy. It is exact enough to test against,
# and far too slow to time: every timing in this chapter is of the interpreter, never of a GPU.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch

import kernels  # decides once: Triton on a GPU, else the interpreter (sets TRITON_INTERPRET=1 before triton loads)
from nanomodels.runtime import quick_mode

from show import show  # chapters/show.py: prints library code; an exercise's function as its stub

QUICK = quick_mode()
DEVICE = "cuda" if torch.cuda.is_available() and not kernels.INTERPRET else "cpu"
torch.manual_seed(0)
torch.set_num_threads(1)
backend = kernels.backend(torch.empty(0, device=DEVICE))
triton_version = __import__("triton").__version__ if kernels.HAS_TRITON else "not installed"
print(f"{'quick mode' if QUICK else 'full run'} | kernels run on: {backend} | device {DEVICE} | "
      f"torch {torch.__version__} | triton {triton_version}")


# %% [markdown]
# ## 1. Softmax, fused: one read, one write
#
# $$\mathrm{softmax}(x)_j = \frac{e^{x_j - m}}{\sum_k e^{x_k - m}}, \qquad m = \max_k x_k$$
#
# Subtracting the row max $m$ leaves the result unchanged and keeps $e^x$ from overflowing. In eager PyTorch the
# formula is five kernels (max, subtract, exp, sum, divide), and each one reads its input from memory and writes
# its output back. Softmax does almost no arithmetic per byte, so memory traffic decides its speed. The cell
# below counts that traffic.

# %%
M, N = 4096, 4096  # a (rows, columns) matrix, counted in elements read / written
eager = {  # op: (elements read, elements written)
    "m = x.max(-1)": (M * N, M),
    "z = x - m": (M * N + M, M * N),
    "e = exp(z)": (M * N, M * N),
    "s = e.sum(-1)": (M * N, M),
    "y = e / s": (M * N + M, M * N),
}
for op, (r, w) in eager.items():
    print(f"{op:<16} reads {r / (M * N):.2f} MN, writes {w / (M * N):.2f} MN")
total = sum(r + w for r, w in eager.values())
print(f"eager total {total / (M * N):.2f} MN element transfers; fused kernel 2 MN (read x once, write y once): "
      f"ideal speed-up {total / (2 * M * N):.1f}x")

# %% [markdown]
# The fused kernel gives each row to one **program** (Triton's unit of parallel work; on a GPU, one thread
# block). A program loads the whole row into registers. The row is padded to a power of two and the padding is
# set to $-\infty$, which adds $e^{-\infty} = 0$ to the sum. The program reduces, exponentiates, and stores.
#
# Writing that body is **exercise 1.1**, so `show` prints only the kernel's signature and docstring. Write the body in
# `exercises/ex01_kernels_flash_attention.py` and grade it with `python -m exercises grade 01`. The grader runs your
# kernel in the interpreter against a float64 softmax: rows whose length is not a power of two, scores of
# $\pm 10^4$, rows holding $-\infty$, float16 rows.

# %%
from kernels.softmax import _softmax_kernel, online_softmax, online_softmax_reference, softmax

show(_softmax_kernel)

# %%
rows = 64 if QUICK else 300
x = torch.randn(rows, 781, device=DEVICE) * 3
start = time.perf_counter()
y = softmax(x)
elapsed = time.perf_counter() - start
print(f"({rows}, 781): max |softmax - torch.softmax| = {(y - torch.softmax(x, -1)).abs().max():.2e}, "
      f"row sums within {(y.sum(-1) - 1).abs().max():.1e} of 1 "
      f"({elapsed:.2f} s for {rows} programs on the {backend})")

# %% [markdown]
# ## 2. Online softmax: a running max and a running sum
#
# The fused kernel needs the whole row at once, so its length is bounded by the registers. The online version
# walks the row in tiles of `BLOCK_N` columns. It keeps the largest value seen so far, $m$, and the sum
# $\ell = \sum e^{x - m}$ over the tiles seen so far. When a tile raises the max from $m$ to $m'$, every term summed
# so far used the wrong offset, and a single multiply corrects all of them:
#
# $$m' = \max(m, \max_{\text{tile}} x), \qquad \ell' = \ell\, e^{m - m'} + \sum_{\text{tile}} e^{x - m'}$$
#
# A second walk writes $e^{x - m}/\ell$. One edge case matters: while every value seen so far is $-\infty$ (masked
# scores), $e^{m - m'}$ would be $e^{-\infty + \infty}$, which is NaN. The kernel keeps such rows at $\ell = 0$
# instead.
#
# The PyTorch version below is printed in full. The kernel's update of $m$ and $\ell$ inside the first walk is
# **exercise 1.2** (`python -m exercises grade 01`). Its checks walk rows in 1 to 6 tiles whose max rises, falls
# or sits in the middle, rows of $\pm 10^4$, and rows that start with whole tiles of $-\infty$.

# %%
from kernels.softmax import _online_softmax_kernel

show(online_softmax_reference)
show(_online_softmax_kernel)

# %%
n = 1024
row = torch.linspace(0, 6, n) + torch.randn(n)  # a rising row: the max keeps growing, so the rescale keeps firing
trace = []
online_softmax_reference(row[None].double(), 64, trace=trace)
m_run = [float(m) for m, _ in trace]
ell_run = [float(ell) for _, ell in trace]
tiles = range(1, len(trace) + 1)
fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
axes[0].plot(tiles, m_run, "o-", label="running max m")
axes[0].axhline(float(row.max()), color="gray", ls="--", label="true row max")
axes[0].set(title="Online softmax: running max after each tile", xlabel="tiles of 64 columns seen",
            ylabel="m")
axes[1].plot(tiles, ell_run, "o-", color="C1", label="running sum, rescaled to the running max")
axes[1].axhline(float(torch.exp(row.double() - row.max()).sum()), color="gray", ls="--",
                label="exact sum of exp(x - max)")
axes[1].set(title="... and running sum ell (scaled down whenever m grows)", xlabel="tiles of 64 columns seen",
            ylabel="ell")
for ax in axes:
    ax.legend()
plt.tight_layout()
plt.show()

x = torch.randn(8, 1000, device=DEVICE) * 5
x[:3, :300] = -math.inf  # whole tiles of masked scores before the first finite value
expected = softmax(x)
for block_n in (16, 64, 256, 1024):
    print(f"BLOCK_N = {block_n:>4}: {math.ceil(1000 / block_n):>2} tiles per row, max |online - one-pass| = "
          f"{(online_softmax(x, block_n=block_n) - expected).abs().max():.2e}")

# %% [markdown]
# ## 3. FlashAttention: online softmax with the scores computed on the fly
#
# One program owns `BLOCK_M` query rows $Q_i$ and walks the keys in tiles of `BLOCK_N`. For each key tile $j$ it
# computes the score tile $S_{ij} = Q_i K_j^\top/\sqrt d$ with a `tl.dot` (tensor cores on a GPU), then applies
# the online softmax with a running output:
#
# $$m' = \max(m, \mathrm{rowmax}\, S_{ij}), \quad P = e^{S_{ij} - m'}, \quad \ell' = \ell\,e^{m-m'} + \mathrm{rowsum}\,P,
# \quad \mathrm{acc}' = \mathrm{acc}\; e^{m-m'} + P\,V_j$$
#
# After the last tile, $O_i = \mathrm{acc}/\ell$: FlashAttention-2 divides once at the end instead of at every tile.
# The kernel also stores the log-sum-exp $L_i = m + \log \ell$, one number per row. The backward pass needs it,
# and so does merging partial attentions (LongNet, chapter 06). The $T \times T$ matrix never exists. The kernel
# keeps scores in base 2, folding $\log_2 e$ into the scale, because `exp2` is the native instruction.
#
# The loop over the key tiles, `_fwd_tiles`, is **exercise 1.3**: the scores of one tile, the mask, and the update
# of $m$, $\ell$ and acc. `_attn_fwd_kernel`, printed in full, loads the query tile, calls `_fwd_tiles` for the
# unmasked and then the masked run of key tiles, and writes $O = \mathrm{acc}/\ell$ and the LSE. Grade it with
# `python -m exercises grade 01`. The grader compares $O$ and the LSE with a float64 oracle over 1 to 3 key
# tiles, for causal, prefix and key-padding masks, scores of order $10^3$ to $10^4$, and float16 inputs.

# %%
from kernels.flash_attention import _attn_fwd_kernel, _fwd_tiles

show(_fwd_tiles)
show(_attn_fwd_kernel)

# %%
from kernels.flash_attention import flash_attention, reference_attention

T = 128 if QUICK else 256
for dtype in (torch.float32, torch.float16):
    q, k, v = (torch.randn(1, 2, T, 64, device=DEVICE, dtype=dtype) for _ in range(3))
    start = time.perf_counter()
    out, lse = flash_attention(q, k, v, return_lse=True)
    elapsed = time.perf_counter() - start
    ref, ref_lse = reference_attention(q.double(), k.double(), v.double(), return_lse=True)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    print(f"{str(dtype):<14} T={T}: max |O - reference| {(out.double() - ref).abs().max():.1e}, "
          f"|O - SDPA| {(out.float() - sdpa).abs().max():.1e}, |LSE - reference| "
          f"{(lse.double() - ref_lse).abs().max():.1e}  ({elapsed:.2f} s on the {backend})")

# %% [markdown]
# ## 4. UniLM masks, computed inside the tile
#
# UniLM (arXiv 1905.03197) trains one Transformer for understanding and generation by changing only *who sees
# whom*. Query $i$ sits at position $i + T_k - T_q$, so the queries are the last $T_q$ positions. Key $j$ is visible
# from query $i$ under these rules:
#
# | mask | visible when | used for |
# |---|---|---|
# | none (bidirectional) | always | BERT-style encoding |
# | causal (left-to-right) | $j \le i$ | GPT-style generation |
# | prefix (seq2seq) | $j < P$ or $j \le i$ | the source attends bidirectionally, the target left-to-right |
# | key padding (any of the above) | additionally $j < \text{key\_len}_b$ | batches of unequal lengths |
#
# The kernel computes these predicates from the row and column indices of a tile (`_visible`). Nothing of size
# $T \times T$ is read from memory. The masks share one structure: **row $i$ sees a prefix $[0, b_i)$ of the keys,
# and $b_i$ grows with $i$**. So the key tiles of a query tile fall into three runs. Tiles fully visible to every
# row need no mask work. Tiles cut by a mask edge apply the predicate. Tiles fully masked are skipped, never
# loaded (`_key_range`).

# %%
from kernels.flash_attention import _key_range, _visible

show(_visible)
show(_key_range)

# %% [markdown]
# The picture below does not come from a model of the kernel: each colour is the kernel's own count of the tiles it
# visited, reported through its `tile_counts` test hook. The count is then checked against the tiles that the
# dense mask says are needed.

# %%
from matplotlib.colors import ListedColormap
from matplotlib.patches import Patch

from kernels.flash_attention import allowed_mask, flash_attention_forward, forward_block_sizes, tile_plan

T = 256 if QUICK else 512
kinds = {"bidirectional": {}, "causal (left-to-right)": {"causal": True},
         f"seq2seq, prefix {T * 3 // 8}": {"prefix_len": T * 3 // 8},
         f"seq2seq + padding, key_len {T * 3 // 4}": {"prefix_len": T * 3 // 8, "key_lengths": [T * 3 // 4]}}
q, k, v = (torch.randn(1, 1, T, 16, device=DEVICE) for _ in range(3))
fig, axes = plt.subplots(1, 4, figsize=(16, 4.9))
colors = ListedColormap(["#f2f2f2", "#f4a261", "#2a9d8f"])  # skipped, masked, fully visible
visited = {}
for ax, (name, mask) in zip(axes, kinds.items()):
    counts = torch.zeros((1, math.ceil(T / 16), 2), dtype=torch.int32, device=DEVICE)
    flash_attention_forward(q, k, v, tile_counts=counts, **mask)
    bm, bn = forward_block_sizes()
    n_m, n_n = math.ceil(T / bm), math.ceil(T / bn)
    kernel_plan = torch.zeros(n_m, n_n, dtype=torch.long)
    for m_tile, (n_full, n_masked) in enumerate(counts[0, :n_m].tolist()):
        kernel_plan[m_tile, :n_full] = 2
        kernel_plan[m_tile, n_full:n_full + n_masked] = 1
    allowed = allowed_mask(T, T, batch=1, **mask)[0, 0]
    assert torch.equal(kernel_plan, tile_plan(allowed, bm, bn)), f"{name}: the kernel's tiles differ from the mask"
    visited[name] = (kernel_plan > 0).float().mean().item()
    ax.imshow(kernel_plan.repeat_interleave(bm, 0).repeat_interleave(bn, 1), cmap=colors, vmin=0, vmax=2)
    ax.contour(allowed.float().numpy(), levels=[0.5], colors="k", linewidths=0.8)
    ax.set(title=f"{name}\n{visited[name]:.0%} of tiles visited", xlabel="key j", ylabel="query i")
labels = ["skipped (never loaded)", "cut by the mask edge (predicate applied)", "fully visible (no mask work)"]
fig.legend(handles=[Patch(color=c, label=t) for c, t in zip(colors.colors, labels)], loc="lower center", ncol=3)
fig.suptitle(f"Which {bm}x{bn} tiles the kernel visits, T = {T} (black line: edge of the allowed region)")
plt.tight_layout(rect=(0, 0.1, 1, 0.93))
plt.show()

# %% [markdown]
# How much work each mask saves, for the GPU's default tiles (128 queries × 64 keys). The skipped share of
# tiles approaches the masked share of (query, key) pairs as $N$ grows, because fewer tiles straddle the
# mask edge. In the FLOP convention used for benchmarks, causal counts as exactly half the dense work.

# %%
from kernels.bench import tile_fractions, visible_fraction

sizes = (1024, 2048) if QUICK else (1024, 2048, 4096)
print(f"{'mask':<20} {'N':>5} {'visible pairs':>14} {'tiles visited':>14} {'of which masked':>16} {'skipped':>8}")
skipped = {}
for kind in ("none", "causal", "prefix", "prefix+key_lengths"):
    for n in sizes:
        f = tile_fractions(kind, n)
        skipped[kind, n] = f["skipped"]
        print(f"{kind:<20} {n:>5} {visible_fraction(kind, n):>14.1%} {f['full'] + f['masked']:>14.1%} "
              f"{f['masked']:>16.1%} {f['skipped']:>8.1%}")
print("(prefix = N/2; key_lengths = 3N/4)")

# %% [markdown]
# ## 5. The backward pass, FA2-style
#
# The gradient of $O = PV$ with $P = \mathrm{softmax}(S)$ needs $P$. The kernel does not store it ($T \times T$ again).
# It recomputes $P = e^{S - L}$ from $Q$, $K$ and the saved log-sum-exp $L$:
#
# $$dV = P^\top dO, \quad dP = dO\,V^\top, \quad dS = P \circ (dP - \delta), \quad dQ = dS\,K/\sqrt d, \quad dK = dS^\top Q/\sqrt d,
# \qquad \delta_i = \textstyle\sum_j P_{ij}\,dP_{ij} = \mathrm{rowsum}(dO \circ O)_i$$
#
# A small preprocess kernel computes $\delta$. Then one program per **key** tile loops over the query tiles and
# accumulates $dK$ and $dV$. A second kernel, with one program per **query** tile, accumulates $dQ$. The score
# tiles are computed twice, but every output has exactly one writer: there are no atomics, the result is
# deterministic, and no race is possible. That matters because the interpreter runs programs one after
# another and so could never expose a race. The tile skipping of section 4 applies to both kernels.

# %%
from kernels.flash_attention import _bwd_dkdv_tiles, _bwd_dq_tiles

show(_bwd_dkdv_tiles)
show(_bwd_dq_tiles)

# %%
from kernels.bench import correctness_sweep, print_sweep

start = time.perf_counter()
sweep = correctness_sweep(quick=QUICK)
print(f"max |kernel - float64 reference| for B=2, T=200 (odd: partial tiles), prefix = 100, key_lengths = 150 "
      f"({time.perf_counter() - start:.0f} s):")
print_sweep(sweep)

# %%
# a row that sees no key at all (key_lengths = 0) returns zeros and LSE = -inf, not NaN, and gets zero gradients
q, k, v = (torch.randn(2, 1, 40, 32, device=DEVICE, requires_grad=True) for _ in range(3))
out, lse = flash_attention(q, k, v, key_lengths=[0, 40], return_lse=True)
out.sum().backward()
print(f"batch 0: max |O| = {out[0].abs().max():.1f}, LSE = {lse[0, 0, :3].tolist()}..., max |dQ| = "
      f"{q.grad[0].abs().max():.1f}; any NaN anywhere: {any(t.isnan().any().item() for t in (out, q.grad, k.grad))}")

# %% [markdown]
# ## 6. A drop-in attention function: training with the kernel
#
# `flash_attention_fn(q, k, v, allowed=None, *, causal=False)` has the same signature as
# `nanomodels.attention.attention`. Swapping it in changes one line of the model. It refuses an arbitrary
# boolean `allowed`, because its masks are index predicates, not tensors. Below, a 2-layer byte-level model trains
# on Python's help pages three times, from the same initialization and on the same batches: with the readable
# reference attention, with torch's SDPA, and with the kernel (forward and backward in the interpreter).
#
# What counts as "the same" here? Two float32 implementations of attention agree to about $10^{-7}$ per step, and
# training amplifies that gap: Adam divides each update by a running gradient scale, so rounding-level
# differences in tiny gradients become visible changes in the weights, and the gap grows step by step. The fair
# test is therefore to compare the kernel against the reference with the same yardstick we apply to SDPA. Does
# the kernel stay as close to the reference as torch's own fused attention does?

# %%
from kernels.flash_attention import flash_attention_fn
from nanomodels.attention import attention, sdpa_attention
from nanomodels.data import load_text
from nanomodels.transformer import Transformer, TransformerConfig

data = torch.tensor(list(load_text("pydoc")[:200_000].encode()), dtype=torch.long)
config = TransformerConfig(vocab_size=256, block_size=64, n_layers=2, d_model=64, n_heads=2)  # head size 32
steps = 6 if QUICK else 60
g = torch.Generator().manual_seed(1)
starts = torch.randint(0, len(data) - 65, (steps, 4), generator=g)
curves = {}
runs = {"reference attention": attention, "torch SDPA": sdpa_attention, "flash_attention_fn (kernel)": flash_attention_fn}
for name, fn in runs.items():
    torch.manual_seed(0)
    model = Transformer(config, attention_fn=fn).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    curves[name], t0 = [], time.perf_counter()
    for s in range(steps):
        batch = torch.stack([data[i:i + 65] for i in starts[s].tolist()]).to(DEVICE)
        _, loss = model(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        curves[name].append(loss.item())
    print(f"{name:<28} loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f}  "
          f"({time.perf_counter() - t0:.2f} s for {steps} steps)")
ref = curves["reference attention"]
gaps = {name: [abs(a - b) for a, b in zip(c, ref)] for name, c in curves.items() if name != "reference attention"}
first = min(steps, 5)
for name, gap in gaps.items():
    print(f"|{name} - reference|: first {first} steps at most {max(gap[:first]):.1e}, all {steps} steps at most "
          f"{max(gap):.1e}")
fig, axes = plt.subplots(1, 2, figsize=(12, 3.8))
for (name, c), style in zip(curves.items(), ("-", "--", ":")):
    axes[0].plot(range(1, steps + 1), c, style, label=name)
axes[0].set(title="Same model, same batches, three attention functions", xlabel="training step",
            ylabel="cross-entropy (nats per byte)")
axes[0].legend()
for name, gap in gaps.items():
    axes[1].semilogy(range(1, steps + 1), [max(x, 1e-9) for x in gap], "o-", ms=3, label=f"{name} vs reference")
axes[1].set(title="Gap to the reference run (float32 rounding, amplified by Adam)", xlabel="training step",
            ylabel="|loss difference| (floored at 1e-9)")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7. The same softmax in CUDA C
#
# Triton lets us write programs over whole tiles and hides the thread level. CUDA C exposes it:
#
# | Triton (one program per row) | CUDA C (`kernels/cuda/softmax.cu`, one block per row) |
# |---|---|
# | `tl.arange(0, BLOCK)` covers the row | 256 threads; thread $t$ takes columns $t, t+256, \dots$ (neighbouring threads read neighbouring addresses: coalesced) |
# | `tl.max(x, axis=0)` | each thread reduces its columns → `__shfl_xor_sync` butterfly inside each 32-thread warp → one value per warp in `__shared__` memory → `__syncthreads()` → one more warp reduction |
# | the compiler places the barriers | we place them: a missing `__syncthreads()` is a race |
# | online softmax over tiles | version 2: each thread keeps its own $(m, \ell)$ over its columns, then pairs merge with the same rescale, $(m_1,\ell_1)+(m_2,\ell_2) = (M, \ell_1 e^{m_1-M} + \ell_2 e^{m_2-M})$ |
#
# The file is torch-free `extern "C"` code with a host launcher. Python builds it with `nvcc` and calls the
# launcher through ctypes (`kernels/cuda_softmax.py`). Without a GPU we can still compile it and read what
# `ptxas` reports for each kernel.

# %%
from pathlib import Path

source = (Path(kernels.__file__).parent / "cuda" / "softmax.cu").read_text()
print(source[source.index("#include"):source.index("// Host launcher")])

# %%
from kernels import aot, cuda_softmax

if cuda_softmax.nvcc() is None:
    print("nvcc not found: cannot compile the CUDA C kernels here")
else:
    for r in aot.compile_cuda([("cuda_softmax", spec) for spec in cuda_softmax.AOT_SPECS]):
        print(f"{r['kernel']:<32} {r['arch']}: {r['registers']} registers, {r['shared_bytes']} B shared memory, "
              f"{r['spill_bytes']} B spilled, {r.get('sass', {}).get('SHFL.BFLY', '?')} warp shuffles (SHFL.BFLY) "
              "in the SASS")
if torch.cuda.is_available():
    x = torch.randn(4096, 4096, device="cuda")
    for version in (1, 2):
        err = (cuda_softmax.cuda_softmax(x, version=version) - torch.softmax(x, -1)).abs().max()
        print(f"CUDA C softmax v{version} vs torch.softmax: max |diff| {err:.1e}")
else:
    print("no CUDA device here: the CUDA C kernels are compiled, not run")

# %% [markdown]
# ## 8. What a GPU would get: compiling for A100 and H100 without one
#
# `triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32))` runs Triton's real compiler down to a
# cubin for sm_80 (A100) and sm_90 (H100) on this CPU. `ptxas` then reports registers and spills. A spill sends
# registers to slow local memory and would show up as a slowdown on the GPU. The PTX also shows whether `tl.dot`
# reached the tensor cores: `mma.sync` on sm_80, `wgmma.mma_async` on sm_90. The compile tier of the tests
# asserts all of this (`tests/kernels/test_compile.py`, every kernel's `AOT_SPECS`).

# %%
start = time.perf_counter()
modules = ["softmax", "cuda_softmax"] + ([] if QUICK else ["flash_attention"])  # this chapter's kernels
report = aot.report(modules=modules)
print(aot.table(report))
print(f"({time.perf_counter() - start:.0f} s)")

# %% [markdown]
# ## 9. Speed
#
# Interpreter time measures nothing about a GPU, so this chapter reports no speed numbers. On a CUDA machine,
# `python -m kernels.bench` prints TFLOP/s for attention (forward $4BHN^2D$, half that for causal) and GB/s for
# softmax, next to torch SDPA / `torch.softmax` / eager PyTorch, each as a percentage of a peak measured in the
# same run. `kernels/README.md` holds the table once it has been measured on a GPU.

# %%
if torch.cuda.is_available() and not kernels.INTERPRET:
    from kernels.bench import gpu_benchmark

    gpu_benchmark(quick=QUICK)
else:
    print("No CUDA device: GPU timings unavailable here. On a GPU machine: python -m kernels.bench")

# %% [markdown]
# ## Exercises
#
# Fill in your file, `exercises/ex01_kernels_flash_attention.py`, then run `python -m exercises grade 01`. The
# grader puts your kernel in place of the library's, runs the library's launcher in Triton's interpreter on the
# CPU, and compares the result with a float64 oracle.
#
# | # | function | what the grader checks |
# |---|---|---|
# | 1.1 | `_softmax_kernel` (`kernels/softmax.py`) | softmax of each row for lengths that are not a power of two (the padding lanes take no mass); scores of $\pm 10^4$ without NaN; $-\infty$ entries; float16 |
# | 1.2 | `_online_softmax_kernel` | the tiled walk equals softmax for 1 to 6 tiles and a short last tile; scores of $\pm 10^4$; whole tiles of $-\infty$ give no NaN; float16 |
# | 1.3 | `_fwd_tiles` (`kernels/flash_attention.py`) | $O$ and LSE against a float64 oracle over several key and query tiles, bidirectional, causal (the diagonal included), prefix and key padding; rows that see no key give $O = 0$, LSE $= -\infty$; large scores; float16 |
#
# Known-wrong solutions the grader must reject are in `exercises/grading/mutants/ch01_kernels_flash_attention.md` (no max
# shift, padding filled with 0, the running sum or output not rescaled, the rescale's sign flipped, the tile max for
# the running max, division by $\ell$ inside the loop, $e^x$ for $2^x$, ...).

# %% [markdown]
# ## Summary
#
# * A fused kernel reads and writes each element once. For a bandwidth-bound op like softmax, that is the whole speed-up.
# * The online softmax keeps a running max and sum and rescales the sum whenever the max grows. With it, a row (or
#   a whole attention row of scores) can be processed in tiles it never has to hold at once.
# * FlashAttention-2 is that loop with $S = QK^\top$ computed tile by tile and a running output, normalised once at the
#   end. The backward pass recomputes $P$ from the saved log-sum-exp.
# * UniLM's masks are index predicates inside the tile. Each row sees a prefix of the keys, so whole tiles are skipped:
#   causal attention does about half the work, and seq2seq somewhere between half and all of it.
# * Under the interpreter the kernels run on a CPU, exactly enough to test. Under `triton.compile` they are built for
#   A100 and H100 without either. Only speed needs the GPU.
