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
# *This notebook is built from its source `chapters/08_bitlinear.py` (jupytext percent format): edit the source, then
# rebuild with `python chapters/build.py 08` (add `--execute` to run it and save the outputs, `--quick` with it
# for quick mode).*

# %% [markdown]
# # Chapter 08 — BitNet b1.58: ternary weights, 8-bit activations
#
# BitNet b1.58 (Ma et al. 2024, [arXiv 2402.17764](https://arxiv.org/abs/2402.17764), after BitNet,
# [arXiv 2310.11453](https://arxiv.org/abs/2310.11453)) replaces every `nn.Linear` of the Transformer body by a
# **BitLinear**: its weights take three values $\{-1, 0, +1\}$ times one scale per matrix, its inputs are 8-bit
# integers with one scale per token. A matrix-vector product then needs no multiplications by weights, only additions
# and subtractions of int8 activations, and a weight fits in 2 bits (1.58 bits of information: $\log_2 3$).
# Training keeps full-precision *latent* weights and quantizes them in every forward; the gradient passes through
# the rounding unchanged (the straight-through estimator, STE).
#
# $$W_q = \frac{\mathrm{clamp}(\mathrm{round}(W / \overline{|W|}), -1, 1)}{1/\overline{|W|}}, \qquad
# x_q = \frac{\mathrm{clamp}(\mathrm{round}(x \cdot 127/\max_j|x_j|), -128, 127)}{127/\max_j|x_j|}, \qquad
# \mathrm{BitLinear}(x) = x_q(\mathrm{RMSNorm}(x))\,W_q^\top.$$
#
# This chapter follows the official training code (the FAQ of microsoft/unilm's `bitnet/` folder) line by line —
# except that the FAQ's forward ignores the bias, while `BitLinear` keeps `nn.Linear`'s `bias=True` and adds it
# (`BitLinear(..., bias=False)` is the FAQ layer, `tests/test_bitlinear_official.py`; the models here pass the
# config's bias): the two quantizers and the STE layer (graded exercises 8.1–8.3), properties you can see, FP vs BitNet tiny
# language models at three widths with the BitNet learning rate and the two-stage schedule, the ternary codes over
# training, the memory of the weights, the integer inference path with 2-bit packed weights, the kernels (a CPU
# AVX2 GEMV, Triton, CUDA C), and generation from the trained 1.58-bit model on the CPU.

# %%
import math
import time

import matplotlib.pyplot as plt
import torch

import kernels  # noqa: F401  (without a GPU it sets TRITON_INTERPRET=1 before anything imports triton)
from nanomodels.runtime import quick_mode

import bitlinear_experiments as exp  # chapters/bitlinear_experiments.py: data, models, training runs, timing
from show import show  # chapters/show.py: prints library code; an exercise's function as its stub

QUICK = quick_mode()
torch.set_num_threads(1)
torch.manual_seed(0)
print(f"{'quick mode' if QUICK else 'full run'} | torch {torch.__version__} | {torch.get_num_threads()} thread(s)")

# %% [markdown]
# ## 1. The quantizers
#
# The weight scale is **per tensor** (the mean of $|W|$: "absmean"), the activation scale **per token** (the
# maximum of $|x|$ over the features: "absmax"). Swapping the two is the most common bug in re-implementations.

# %%
from nanomodels.bitlinear import activation_quant, weight_quant, weight_quant_binary

show(weight_quant)
show(activation_quant)

# %% [markdown]
# ### Properties you can see
#
# - $W_q / \overline{|W|} \in \{-1, 0, 1\}$; for Gaussian $W$ the zero fraction is
#   $P(|z| < \tfrac12\sqrt{2/\pi}) = \mathrm{erf}(1/(2\sqrt\pi)) \approx 0.310$.
# - The activation codes are integers in $[-127, 127]$ ($-128$ is never reached) and each row keeps its absmax.
# - Both are positively homogeneous: $q(cW) = c\,q(W)$ for $c > 0$.
# - Quantizing twice keeps the codes but shrinks the values by the non-zero fraction $p$, because
#   $\overline{|W_q|} = p\,\overline{|W|}$: never re-quantize already-quantized weights (released checkpoints hold the
#   latent weights; export applies `weight_quant` once).

# %%
W = torch.randn(1024, 1024, dtype=torch.float64)
Wq = weight_quant(W)
codes = Wq / W.abs().mean()
print(f"codes: {sorted(codes.round().unique().tolist())}, max |code - round(code)| = "
      f"{(codes - codes.round()).abs().max():.1e}")
print(f"zero fraction {(Wq == 0).double().mean():.4f}  (theory erf(1/(2 sqrt(pi))) = {math.erf(0.5 / math.sqrt(math.pi)):.4f})")
x = torch.randn(4, 512, dtype=torch.float64) * torch.tensor([[0.01], [1.0], [30.0], [1e3]], dtype=torch.float64)
s = 127 / x.abs().amax(-1, keepdim=True)
xc = activation_quant(x) * s
print(f"activation codes: integers to {(xc - xc.round()).abs().max():.1e}, range [{xc.min():.0f}, {xc.max():.0f}], "
      f"row absmax kept to {(activation_quant(x).abs().amax(-1) / x.abs().amax(-1) - 1).abs().max():.1e} (relative)")
for c in (0.01, 7.0):
    print(f"c = {c:<5}: max |wq(cW) - c wq(W)| = {(weight_quant(c * W) - c * Wq).abs().max():.1e}, "
          f"max |aq(cx) - c aq(x)| = {(activation_quant(c * x) - c * activation_quant(x)).abs().max():.1e}")
p = (Wq != 0).double().mean()
print(f"re-quantized: same signs {torch.equal(weight_quant(Wq).sign(), Wq.sign())}, "
      f"mean|wq(wq(W))| / mean|wq(W)| = {weight_quant(Wq).abs().mean() / Wq.abs().mean():.4f} = p = {p:.4f}")
print(f"BitNet b1 (binary): values {sorted(weight_quant_binary(W).unique().tolist())[:2]}... "
      f"{len(weight_quant_binary(W).unique())} distinct")

# %% [markdown]
# ## 2. BitLinear: an RMSNorm inside, two straight-through estimators
#
# $q(v) := v + (q(v) - v).\mathrm{detach}()$ is $q(v)$ in the forward and the identity in the backward. So the
# gradient with respect to the latent $W$ is the gradient with respect to $W_q$, $g_y^\top x_q$, and the gradient
# reaches $x$ through the RMSNorm. `BitLinear` subclasses `nn.Linear` (the core's init and optimizer code treat it as
# one); its forward is the function below (exercise 8.3).

# %%
from nanomodels.bitlinear import BitLinear, BitNetResidual, bitlinear, rms_norm

show(bitlinear)
show(BitLinear)

# %%
torch.manual_seed(0)
layer = BitLinear(64, 16, bias=False, dtype=torch.float64)
xin = torch.randn(8, 64, dtype=torch.float64, requires_grad=True)
gy = torch.randn(8, 16, dtype=torch.float64)
layer(xin).backward(gy)
xq = activation_quant(rms_norm(xin.detach(), layer.norm_weight.detach(), layer.eps))
print(f"max |dL/dW (latent) - g_y^T x_q| = {(layer.weight.grad - gy.T @ xq).abs().max():.1e}")
layer0 = BitLinear(64, 16, bias=False, eps=0.0, dtype=torch.float64)
print(f"scale invariance (eps = 0): max |BitLinear(1000 x) - BitLinear(x)| = "
      f"{(layer0(1000 * xin) - layer0(xin)).abs().max():.1e}")

# %% [markdown]
# ## 3. The model: one line
#
# LLaMA → BitNet b1.58 replaces the linear layers of attention and feed-forward by BitLinear and drops the norm
# before each sublayer, since BitLinear has one built in: `BitNetResidual` is $x + f(x)$. The token embeddings, the
# final norm and the LM head stay in full precision (the core builds the head with its own `head_linear`).
#
# **Paper vs official code.** The b1.58 paper describes LLaMA's SwiGLU; the released BitNet b1.58 2B4T model
# (microsoft/BitNet `gpu/model.py`) uses a squared-ReLU GLU, extra sub-norms before the attention output and the
# down projection (an RMSNorm before *every* quantized matmul, which is what "BitLinear has its norm inside" gives
# here), and grouped-query attention (20 query heads, 5 KV heads). This chapter keeps the core's GELU MLP and
# multi-head attention: the only change is the linear layer.

# %%
tok, train_ids, val_ids = data = exp.corpus()
fp_model = exp.build("fp", 128, tok.vocab_size, seed=0)
bit_model = exp.build("bit", 128, tok.vocab_size, seed=0)  # Transformer(cfg, linear=BitLinear, residual=BitNetResidual)
print(bit_model.blocks[0])
print(f"head: {type(bit_model.head.proj).__name__};  parameters fp {fp_model.num_params():,} vs bit "
      f"{bit_model.num_params():,} (the RMSNorm gains)")
print(f"vocabulary: {tok.vocab_size} characters; {len(train_ids):,} training and {len(val_ids):,} validation tokens; "
      f"learning rates {exp.LR} (BitNet / FP = {exp.LR['bit'] / exp.LR['fp']:g})")

# %% [markdown]
# ## 4. FP vs BitNet at widths 64, 128, 256
#
# Character-level language modelling of Python's documentation (103 characters, 10% held out), 2 layers, $T=32$.
# The recipe of the FAQ, scaled down: AdamW(0.9, 0.95), warmup, then two stages: the peak learning rate and weight
# decay 0.1 for the first half; then 2/3 of it decaying to 0, and weight decay 0 (the FAQ: 1.5e-3 → 1e-3 for 700M).
# BitNet's learning rate is 5× the FP one (the FAQ's b1.58 rates are 5–6× LLaMA's); both were fixed before the sweep,
# not tuned per width or per model, so neither is claimed to be its optimum. The paper's claim is about scale (b1.58 matches FP16 LLaMA from 3B parameters); what a laptop can show is the
# direction: does the gap shrink as the model widens, and does the loss drop late, at the second stage?

# %%
WIDTHS = (32, 64) if QUICK else (64, 128, 256)
SEEDS = (0,) if QUICK else (0, 1, 2)
STEPS = 60 if QUICK else 400
models = {}
start = time.perf_counter()
result = exp.sweep(WIDTHS, SEEDS, STEPS, models=models, data=data)
print(f"{len(result['runs'])} runs in {(time.perf_counter() - start) / 60:.1f} min")

# %%
rows = exp.summary(result)
print(f"{'width':>5} {'FP val loss':>16} {'BitNet val loss':>16} {'gap':>7} {'drop, end of stage 1':>22} "
      f"{'drop, start of stage 2':>24}")
for r in rows:
    print(f"{r['width']:>5} {r['fp'][0]:>9.3f} ± {r['fp'][1]:.3f} {r['bit'][0]:>9.3f} ± {r['bit'][1]:.3f} "
          f"{r['gap']:>+7.3f}   fp {r['fp_drop_stage1']:.3f} bit {r['bit_drop_stage1']:.3f}"
          f"     fp {r['fp_drop_stage2']:.3f} bit {r['bit_drop_stage2']:.3f}")
print(f"(val loss in nats per character, mean ± std over {len(SEEDS)} seed(s); 'drop' = the fall of the val loss over "
      f"the last 10% of stage 1 and over the first 10% of stage 2)")

# %%
fig, axes = plt.subplots(1, len(WIDTHS), figsize=(4.5 * len(WIDTHS), 3.5), sharey=True)
for ax, width in zip(axes, WIDTHS):
    for kind, color in (("fp", "tab:blue"), ("bit", "tab:red")):
        for r in (r for r in result["runs"] if r["kind"] == kind and r["width"] == width):
            ax.plot(r["eval_steps"], r["val"], color=color, alpha=0.7,
                    label=f"{'FP' if kind == 'fp' else 'BitNet b1.58'} (lr {r['lr']:g})" if r["seed"] == SEEDS[0] else None)
    ax.axvline(STEPS // 2, color="gray", ls=":", label="stage 2 begins")
    ax.set(title=f"width {width}", xlabel="step", ylim=(1.3, 3.8))
    ax.legend(fontsize=8)
axes[0].set_ylabel("validation loss (nats / char)")
fig.suptitle("FP vs BitNet b1.58 tiny character LMs, two-stage schedule")
plt.tight_layout()
plt.show()

# %% [markdown]
# Read the table, not the hope: in the committed full run (3 seeds) the gap did not shrink as the model widened
# (+0.35, +0.60, +0.55 nats per character at widths 64, 128, 256), and BitNet's drop at the start of stage 2 was
# smaller than FP's at every width. Models this small (under half a million parameters) are far below the 3B
# parameters where the paper reports b1.58 matching FP16, so this toy does not reproduce the scale claim; it shows
# the mechanism and the cost of ternary weights at a tiny width.
#
# **BitNet b1 for comparison.** The first BitNet paper used binary weights, $\mathrm{sign}(W - \overline{W})\,
# \overline{|W|}$ (the FAQ's code), with the same 8-bit activations. One run at the widest width, seed 0, the BitNet
# learning rate:

# %%
b1_run = exp.train_run("b1", WIDTHS[-1], SEEDS[0], STEPS, data)
b1_run.pop("model")
same_seed = {r["kind"]: r for r in result["runs"] if r["width"] == WIDTHS[-1] and r["seed"] == SEEDS[0]}
print(f"width {WIDTHS[-1]}, seed {SEEDS[0]}, {STEPS} steps, final val loss: FP {same_seed['fp']['val'][-1]:.3f}, "
      f"b1.58 (ternary) {same_seed['bit']['val'][-1]:.3f}, b1 (binary) {b1_run['val'][-1]:.3f}")

# %% [markdown]
# ## 5. The ternary codes over training
#
# At the (Gaussian) init 31% of the codes are 0 and 34.5% each are ±1. The FAQ reports that trained ternary values
# end up roughly uniform. The fractions below are over every BitLinear of the widest model, seed 0.

# %%
widest = [r for r in result["runs"] if r["kind"] == "bit" and r["width"] == WIDTHS[-1] and r["seed"] == SEEDS[0]][0]
fig, ax = plt.subplots(figsize=(6, 3.5))
for key, color in (("-1", "tab:blue"), ("0", "tab:gray"), ("+1", "tab:red")):
    ax.plot(widest["eval_steps"], [c[key] for c in widest["codes"]], color=color, label=f"code {key}")
ax.axvline(STEPS // 2, color="gray", ls=":", label="weight decay -> 0")
ax.set(xlabel="step", ylabel="fraction of the weights", title=f"Ternary codes, BitNet width {WIDTHS[-1]}")
ax.legend()
plt.tight_layout()
plt.show()
first, last = widest["codes"][0], widest["codes"][-1]
print("init:  " + "  ".join(f"{k}: {v:.3f}" for k, v in first.items()))
print("final: " + "  ".join(f"{k}: {v:.3f}" for k, v in last.items()))

# %% [markdown]
# ## 6. Memory of the linear weights
#
# A ternary weight packs into 2 bits (4 per byte; the base-3 packing of 5 weights per byte reaches 1.6 bits), one
# fp32 scale per matrix. For a 4096×4096 layer: fp32 64 MiB, bf16 32, int8 16, 2-bit 4. The checkpoint below is a
# real `torch.save` of the trained model, before and after `to_ternary` (embeddings, head and norms stay fp32).

# %%
from nanomodels.bitlinear import pack_ternary, to_ternary, unpack_ternary

trained_bit, trained_fp = models[("bit", WIDTHS[-1])], models[("fp", WIDTHS[-1])]
mem = exp.linear_weight_memory(trained_bit)
print(f"width {WIDTHS[-1]}: {mem['weights']:,} linear weights in the body")
for fmt in ("fp32", "bf16", "int8", "2-bit"):
    print(f"  {fmt:>5}: {mem[fmt] / 2 ** 10:8.1f} KiB  ({mem['fp32'] / mem[fmt]:4.1f}x smaller than fp32)")
n = 4096 * 4096
print("4096x4096 layer: " + ", ".join(f"{f} {b / 2 ** 20:.0f} MiB" for f, b in
                                     (("fp32", 4 * n), ("bf16", 2 * n), ("int8", n), ("2-bit", n // 4))))
packed_model = exp.ternary_copy(trained_bit)
print(f"checkpoint: latent fp32 {exp.checkpoint_bytes(trained_bit) / 2 ** 10:.0f} KiB -> 2-bit packed "
      f"{exp.checkpoint_bytes(packed_model) / 2 ** 10:.0f} KiB")

# %% [markdown]
# ## 7. The inference path
#
# Offline, the latent weights are quantized once to codes $c \in \{-1,0,1\}$ and packed: 4 codes per byte along the
# input dimension, $c+1$ in bits $2(k \bmod 4)$ of byte $k/4$. That layout is this course's own: none of the three
# official formats is byte-compatible with it — the BitNet GPU kernel's (codes $c+2$ permuted in $16\times 32$ tiles,
# the 2-bit fields of each int32 interleaved), the HF 2B4T checkpoint's (codes $c+1$ packed along the *output*
# dimension, uint8 $(N/4, K)$: `pack_hf_bitnet` / `unpack_hf_bitnet` write and read it) and bitnet.cpp's I2_S (blocks of
# 128 weights, byte $b$ holding weights $b, b+32, b+64, b+96$ from the high bits down); `nanomodels/bitlinear.py`
# spells out each. Online, the RMSNorm output is quantized to int8 per
# token, one **integer** matmul accumulates in int32, and two rescales finish:
# $y = (X_{\text{int8}} W_{\text{tern}}^\top) / s_x / s_W$. One layer equals the fake-quant training forward up to
# float rounding (the grader checks it to 1e-10 in float64); through a whole float32 model a rounding
# difference can move one int8 code of a later layer by one, hence the small difference in the logits below.
#
# `TernaryLinear.forward` is one call of `ternary_linear`, the whole integer path, which is **exercise 8.7**
# (4 points): `python -m exercises grade 08 --exercise 8.7`.

# %%
from nanomodels.bitlinear import TernaryLinear, ternary_linear

show(pack_ternary)
show(TernaryLinear.forward)
show(ternary_linear)

# %%
codes_demo = torch.tensor([[-1, 0, 1, 1, 1]], dtype=torch.int8)
print(f"codes {codes_demo.tolist()[0]} -> bytes {[f'{b:08b}' for b in pack_ternary(codes_demo)[0].tolist()]} -> "
      f"{unpack_ternary(pack_ternary(codes_demo), 5).tolist()[0]}")

# %%
h = torch.randint(0, tok.vocab_size, (2, 32))
with torch.no_grad():
    fake, _ = trained_bit.eval()(h)
    real, _ = packed_model(h)
print(f"logits, 2-bit integer path vs fake-quant: max |diff| {(real - fake).abs().max():.1e} "
      f"(max |logit| {fake.abs().max():.1f})")

# %% [markdown]
# **The experiment of exercise 8.7.** A tiny BitNet LM (2 layers, width 32, float64) learns to count up by one,
# mod 12, in 40 AdamW steps; exported to 2-bit codes, with every layer's forward computed by your `ternary_linear`,
# it must decode the same greedy tokens as its fake-quant training forward. The cell runs your function from
# `exercises/ex08_bitlinear.py` once it is written (the library's until then); the grader's last check of 8.7 is
# this experiment.

# %%
from exercises import ex08_bitlinear as yours
from exercises.grading.checks.ch08_bitlinear import greedy_through_both_paths

try:
    fake_ids, int_ids, logit_diff, last_loss = greedy_through_both_paths(yours.ternary_linear)
    whose = "your ternary_linear"
except NotImplementedError:
    fake_ids, int_ids, logit_diff, last_loss = greedy_through_both_paths(ternary_linear)
    whose = "the library's ternary_linear (exercise 8.7 is not solved yet)"
print(f"{whose}; final training loss {last_loss:.3f} nats")
print(f"fake-quant greedy tokens: {fake_ids[0].tolist()}")
print(f"integer-path tokens:      {int_ids[0].tolist()}")
print(f"same tokens: {torch.equal(fake_ids, int_ids)}; max |logit difference| on the prompt {logit_diff:.1e}")

# %% [markdown]
# ## 8. Kernels
#
# **CPU (C, AVX2).** `kernels/cpu/ternary_gemv.c` reads 32 packed bytes (128 weights), splits them with one shift
# and one mask per 2-bit field, and multiplies unsigned codes $c = w+1$ by int8 activations with `maddubs`, using
# $\sum_k w_k x_k = \sum_k c_k x_k - \sum_k x_k$. The weights cross memory at 2 bits each, 16× less than fp32; the
# scalar version shows that decoding one weight at a time costs more than the bytes it saves.

# %%
from kernels.cpu_ternary import available, benchmark, ternary_gemm_cpu

ok, why = available("avx2")
print("AVX2 kernel:", "available" if ok else f"unavailable ({why})")
if ok:
    print(f"{'N=K':>6} {'torch.mv fp32':>14} {'2-bit AVX2':>11} {'speedup':>8} {'2-bit scalar':>13} {'exact':>6}")
    for n in ((1024, 2048) if QUICK else (4096, 8192)):
        r = benchmark(n, repeats=5 if QUICK else 15, scalar=not QUICK)
        print(f"{n:>6} {r['torch_mv_fp32_ms']:>11.2f} ms {r['avx2_ms']:>8.3f} ms {r['speedup_vs_fp32']:>7.1f}x "
              f"{r.get('scalar_ms', float('nan')):>10.1f} ms {str(r['avx2_exact']):>6}")
    print("(median ms of y = W x, one thread; 'exact': equal to an int64 reference)")

# %% [markdown]
# **Triton.** `kernels/bitnet.py` fuses RMSNorm → absmax → int8 codes in one row kernel, and multiplies int8
# activations by 2-bit packed weights with `tl.dot(int8, int8) → int32` (the integer tensor cores on a GPU). Without
# a GPU they run in Triton's interpreter, here checked against the PyTorch reference; `python -m kernels.aot --only
# bitnet cuda_ternary` compiles them (and the CUDA C GEMV, a warp per row with `__dp4a`) for sm_80 and sm_90.
#
# Inside the matmul kernel, each step of the K loop turns a tile of packed bytes into a (BLOCK_K, BLOCK_N) tile of
# $W^\top$ in $\{-1, 0, 1\}$: the decode of exercise 8.5, on a whole tile at once. That decode is **exercise 8.6**
# (3 points): below, the kernel's spec; your file holds the whole kernel with the decode left out. The grader runs
# your kernel in Triton's interpreter with $X = I$, which returns $W^\top$ itself, and with int8 activations over
# the whole range, for $K$ not a multiple of 4 nor of the block and odd $N$, and compares the int32 results exactly:
# `python -m exercises grade 08 --exercise 8.6`.

# %%
from kernels.bitnet import _ternary_matmul_kernel

show(_ternary_matmul_kernel)

# %%
from kernels.bitnet import rmsnorm_quant, rmsnorm_quant_reference, ternary_matmul

xt = torch.randn(6, 200)
ct, st = rmsnorm_quant(xt, torch.ones(200))
cr, sr = rmsnorm_quant_reference(xt.double(), torch.ones(200, dtype=torch.float64))
wt = torch.randint(-1, 2, (40, 200), dtype=torch.int8)
acc = ternary_matmul(ct, pack_ternary(wt), 200)
print(f"rmsnorm_quant: {int((ct != cr).sum())} of {ct.numel()} codes differ from float64, scale rel. error "
      f"{((st - sr) / sr).abs().max():.1e}; ternary_matmul: int32 exact = {torch.equal(acc, ct.int() @ wt.int().T)}")

# %% [markdown]
# ## 9. Generating text with 2-bit weights on the CPU
#
# The trained BitNet, exported to packed weights, decodes greedily with the KV cache, each BitLinear's inference
# (RMSNorm, int8 codes, the AVX2 GEMV, the two rescales) in one C call (`use_cpu_kernel`; `bitlinear_f32`, version 3
# of the C file). It should produce the same tokens as the fake-quant model it came from. The tokens/s compare it
# with the FP model of the same width and with the same 2-bit model whose integer matmul alone is the C kernel;
# at this width every matrix is tiny (at most 256×1024), so per-call overheads (Python, the per-token
# quantization) weigh more than the weight bytes the kernel saves.

# %%
prompt = torch.tensor([tok.encode("The ")], dtype=torch.long)
n_new = 40 if QUICK else 200
from kernels.cpu_ternary import use_cpu_kernel

gemm_model = exp.ternary_copy(trained_bit, ternary_gemm_cpu if ok else None)
kernel_model = use_cpu_kernel(exp.ternary_copy(trained_bit)) if ok else gemm_model
fake_ids, fake_tps = exp.tokens_per_second(trained_bit, prompt, n_new)
gemm_ids, gemm_tps = exp.tokens_per_second(gemm_model, prompt, n_new)
kern_ids, kern_tps = exp.tokens_per_second(kernel_model, prompt, n_new)
fp_ids, fp_tps = exp.tokens_per_second(trained_fp, prompt, n_new)
for name, ids in (("2-bit, C GEMV", gemm_ids), ("2-bit, one C call per layer", kern_ids)):
    print(f"greedy tokens of {name} equal to the fake-quant model's: "
          f"{int((fake_ids == ids).sum()) - prompt.size(1)} of {n_new}")
print(f"tokens/s (median of 3): fp32 model {fp_tps:.0f}, BitNet fake-quant {fake_tps:.0f}, BitNet 2-bit with the C "
      f"GEMV {gemm_tps:.0f}, BitNet 2-bit with one C call per layer {kern_tps:.0f}"
      + ("" if ok else " (no C kernel here: PyTorch's integer matmul)"))
print("BitNet 2-bit:", repr(tok.decode(kern_ids[0].tolist())))
print("FP:          ", repr(tok.decode(fp_ids[0].tolist())))

# %% [markdown]
# ## Exercises
#
# Fill in your file, `exercises/ex08_bitlinear.py`, then run `python -m exercises grade 08`.
#
# | # | function (in `nanomodels/bitlinear.py`) | what the grader checks |
# |---|---|---|
# | 8.1 | `weight_quant` | the FAQ equation; codes in $\{-1,0,1\}$ times mean$|W|$ (per tensor); homogeneity |
# | 8.2 | `activation_quant` | per-token absmax: integer codes in $[-127, 127]$, each row's absmax kept |
# | 8.3 | `bitlinear` | RMSNorm inside, both STEs: the gradient w.r.t. the latent $W$ is $g_y^\top x_q$ |
# | 8.4 | `pack_ternary` | the byte layout (code + 1, little-endian 2-bit fields, padding code 1); the round trip |
# | 8.5 | `unpack_ternary` | the decode every kernel does, `(byte >> 2(k mod 4)) & 3` minus 1, cropped to $K$ |
# | 8.6 | `_ternary_matmul_kernel` (in `kernels/bitnet.py`) | the same decode on a tile inside the Triton kernel: $X = I$ gives $W^\top$; int32 results exact, with tails in $K$ and $N$ |
# | 8.7 | `ternary_linear` | the integer path equals the fake-quant forward (1e-10, float64); one `gemm` call on the int8 codes; the experiment's greedy tokens |
#
# Known-wrong solutions are in `exercises/grading/mutants/ch08_bitlinear.md` (per-tensor and per-token scales swapped, floor
# instead of round, the mean of $W$ instead of the mean of $|W|$, no straight-through gradient, no RMSNorm, the 2-bit
# fields in the wrong order, the wrong padding, a one-bit mask, a shift by $k \bmod 4$ instead of $2(k \bmod 4)$,
# multiplying by the scales instead of dividing, a float matmul instead of the integer one).
