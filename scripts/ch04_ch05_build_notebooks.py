"""Build chapters/04_deepnet.ipynb and chapters/05_subln_magneto.ipynb with nbformat (no outputs; execute with
nbclient afterwards, see --execute).

    python scripts/ch04_ch05_build_notebooks.py               # write both notebooks, unexecuted
    python scripts/ch04_ch05_build_notebooks.py --execute     # and run them (full run) with this interpreter
"""

import json
import os
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parent.parent
md, code = new_markdown_cell, new_code_cell

SETUP = '''import inspect
import math
import sys
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import nanomodels
from nanomodels.runtime import quick_mode

QUICK = quick_mode()
ROOT = Path(nanomodels.__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))  # the experiment helpers shared with the sweeps (not a package)
import kernels  # noqa: E402,F401  (first: without a GPU it sets TRITON_INTERPRET=1 before torch imports triton)
import ch04_deepnet as exp  # noqa: E402

torch.set_num_threads(1)
torch.set_flush_denormal(True)  # a stalled Post-LN has subnormal gradients, ~100x slower on x86 CPUs
torch.manual_seed(0)
print(f"{'quick mode' if QUICK else 'full run'} | torch {torch.__version__} | {torch.get_num_threads()} thread(s)")


def show(obj):
    print(inspect.getsource(obj))


def load(name):
    """A results file written by a sweep script (the command that produced it is stored inside)."""
    import json
    data = json.loads((ROOT / "chapters" / "results" / name).read_text())
    print(f"{name}: {len(data['runs'])} runs, {data['seconds'] / 60:.1f} min on {data['threads']} thread(s), "
          f"torch {data['torch']}\\n  produced by: {data['command']}")
    return data'''

CH04 = [
    md(r"""# Chapter 04 — DeepNet: DeepNorm trains 200-layer Post-LN Transformers

The original Transformer normalizes *after* the residual add (**Post-LN**): $x_{l+1} = \mathrm{LN}(x_l + G(x_l))$. It tends to
generalize well when it trains, but deep Post-LN models diverge or stall unless nursed with warmup and small learning rates.
GPT-2 moved the norm inside the branch (**Pre-LN**, $x + G(\mathrm{LN}(x))$, the core's default), which is stable but lets the
deep layers contribute little. DeepNet (Wang et al. 2022, [arXiv 2203.00555](https://arxiv.org/abs/2203.00555)) keeps Post-LN and
fixes its instability with two constants:

$$x_{l+1} = \mathrm{LN}(\alpha\, x_l + G_l(x_l;\theta_l)),\qquad
\theta_{v,\,o,\,\mathrm{ffn}} \sim \text{xavier\_normal}(\text{gain}=\beta),\qquad \theta_{q,k} \sim \text{xavier\_normal}(\text{gain}=1).$$

The paper's diagnosis: early in training, each of the $2N$ sublayers changes the model's output by $O(1)$, the changes add up and
the LayerNorms' inputs swing, and the gradient through them vanishes ("the model update explodes"). $\alpha > 1$ makes the
residual stream dominate each sum and $\beta < 1$ shrinks the branches, so that the total update
$\|F(x;\theta_t) - F(x;\theta_0)\|$ stays $O(1)$ whatever the depth. The bound needs $2N(v^2 + w^2)/\alpha^2 = O(1)$ for $2N$
sublayers with two scaled matrices each ($v = w = \beta$); $\alpha = (2N)^{1/4}$, $\beta = (8N)^{-1/4}$ make it exactly 1.

This chapter: the constants, the residual and the init (each a graded exercise), the paper's diagnostic (the early model update
against depth, up to 200 layers), Post-LN vs Pre-LN vs DeepNorm at depths 12, 24, 48 with 3 seeds, a 200-layer DeepNorm trained
on a 2-core CPU, and the fused `LN(α·x + g)` kernel."""),
    code(SETUP),
    md(r"""## 1. The constants

| architecture | $\alpha$ | $\beta$ |
|---|---|---|
| encoder-only, $N$ layers | $(2N)^{1/4}$ | $(8N)^{-1/4}$ |
| decoder-only, $M$ layers | $(2M)^{1/4}$ | $(8M)^{-1/4}$ |
| enc-dec: encoder | $0.81\,(N^4M)^{1/16}$ | $0.87\,(N^4M)^{-1/16}$ |
| enc-dec: decoder | $(3M)^{1/4}$ | $(12M)^{-1/4}$ |

$N$ and $M$ count **layers** (blocks of attention + feed-forward), not sublayers. A decoder block of an encoder–decoder model
has three sublayers (self-attention, cross-attention, feed-forward), hence $3M$ and $12M$. Exercise 4.1."""),
    code('''from nanomodels.deepnet import deepnorm_constants, deepnorm_bound

show(deepnorm_constants)
print(f"{'model':<22} {'alpha':>8} {'beta':>8}   2N*2*beta^2/alpha^2")
for n in (6, 12, 18, 24, 100, 200, 1000):
    alpha, beta = deepnorm_constants(decoder_layers=n)["decoder"]
    print(f"{'decoder-only N=' + str(n):<22} {alpha:8.4f} {beta:8.4f}   {deepnorm_bound(n, alpha, beta):.15f}")
for n, m in ((6, 6), (12, 12), (100, 100)):
    c = deepnorm_constants(encoder_layers=n, decoder_layers=m)
    print(f"{f'enc-dec {n}-{m}':<22} enc {c['encoder'][0]:.4f} / {c['encoder'][1]:.4f}   "
          f"dec {c['decoder'][0]:.4f} / {c['decoder'][1]:.4f}")'''),
    md(r"""## 2. The residual: $\mathrm{LN}(\alpha x + G(x))$

One line (exercise 4.2), wrapped as a residual part for the core Transformer. $\alpha$ multiplies the **residual stream**, not
the branch. A well-known annotated implementation computes $\mathrm{LN}(x + \alpha G(x))$ under a comment that says
$\mathrm{LN}(\alpha x + G(x))$ — which is why the tests feed a *known* branch output $g$ and compare with both. With the branch
forced to zero the block must return $\mathrm{LN}(\alpha x) = \mathrm{LN}(x)$ (exact with $\epsilon = 0$)."""),
    code('''from nanomodels.deepnet import DeepNorm, deepnorm
from nanomodels.transformer import TransformerConfig

show(deepnorm)
show(DeepNorm)
part = DeepNorm(TransformerConfig(n_layers=24, d_model=8, n_heads=2)).double()
part.norm.eps = 0.0
x, g = torch.randn(3, 8, dtype=torch.float64), torch.randn(3, 8, dtype=torch.float64)
ln = lambda h: torch.nn.functional.layer_norm(h, (8,), eps=0.0)  # noqa: E731
print(f"alpha for N=24: {part.alpha:.4f}")
print(f"branch = 0:  max |DeepNorm - LN(x)|         = {(part(x, torch.zeros_like) - ln(x)).abs().max():.2e}")
print(f"branch = g:  max |DeepNorm - LN(alpha x + g)| = {(part(x, lambda h: g) - ln(part.alpha * x + g)).abs().max():.2e}")
print(f"             max |DeepNorm - LN(x + alpha g)| = {(part(x, lambda h: g) - ln(x + part.alpha * g)).abs().max():.2e}"
      "   (the 'alpha on the branch' bug would be this one)")'''),
    md(r"""## 3. The init: xavier normal with gain $\beta$ on $W^V$, $W^O$, $W_1$, $W_2$

Only the matrices on the path that the residual update flows through are shrunk: the value and output projections and both
feed-forward matrices. Queries and keys get ordinary xavier (gain 1): they only shape the attention pattern. Embeddings and the
LM head are left alone (exercise 4.3). `deepnet(config)` is the core Transformer with `residual=DeepNorm`, then this init."""),
    code('''from nanomodels.deepnet import deepnet, deepnorm_init_

show(deepnorm_init_)
show(deepnet)
cfg = TransformerConfig(vocab_size=32, block_size=32, n_layers=24, d_model=128, n_heads=4, d_ff=256)
torch.manual_seed(0)
model = deepnet(cfg)
beta = deepnorm_constants(decoder_layers=24)["decoder"][1]
print(f"N=24, beta = {beta:.4f}; measured std / (xavier std) per matrix of block 0:")
for name, p in model.blocks[0].named_parameters():
    if p.dim() == 2:
        xavier = math.sqrt(2 / sum(p.shape))
        print(f"  {name:<22} {tuple(p.shape)!s:<11} std {p.std():.4f}   ratio to xavier {p.std() / xavier:.3f}")
print(f"  {'wte (embedding)':<22} std {model.wte.weight.std():.4f} (the core's init, untouched)")'''),
    md(r"""### Paper vs official code

The library follows the paper. The official code (`microsoft/torchscale` @ 4d1e0e8) deviates in three ways worth knowing:

1. `DecoderConfig(deepnorm=True)` sets `encoder_normalize_before=False` instead of the decoder's flag (a copy-paste slip), so a
   torchscale "DeepNorm decoder" stays **Pre-LN** with $\alpha$ and $\beta$; the fairseq LM example even forces Pre-LN
   ("Model training is not stable without this").
2. The enc-dec encoder's $\beta$ is $1.15\,(N^4M)^{-1/16}$ in the code, $0.87\,(N^4M)^{-1/16}$ in the paper.
3. The init is PyTorch's `nn.Linear` default (kaiming uniform, std $1/\sqrt{3\,\mathrm{fan_{in}}}$) divided by $1/\beta$, not xavier.

The size of deviations 2 and 3:"""),
    code('''n = m = 6
paper_beta = deepnorm_constants(encoder_layers=n, decoder_layers=m)["encoder"][1]
code_beta = 1.15 * (n ** 4 * m) ** (-1 / 16)
print(f"enc-dec 6-6 encoder beta: paper {paper_beta:.4f}, torchscale {code_beta:.4f} ({code_beta / paper_beta:.2f}x)")
d = 512
print(f"square {d}x{d} matrix: PyTorch default std {1 / math.sqrt(3 * d):.4f} vs xavier std {math.sqrt(2 / (2 * d)):.4f} "
      f"({(1 / math.sqrt(3 * d)) / math.sqrt(1 / d):.2f}x)")'''),
    md(r"""## 4. The paper's diagnostics: the early model update, and where the gradient goes

Two measurements over the first 10 Adam steps (constant learning rate $10^{-3}$, **no warmup**), cheap enough to reach 200
layers: the model update $\|F(x;\theta_t) - F(x;\theta_0)\| / \|F(x;\theta_0)\|$ with $F$ the logits on a fixed batch, and
the gradient norm of the first block's $W_1$ relative to the last block's, at step 0 and at step 10. Post-LN and Pre-LN here
use xavier init (gain 1) — the paper's setting; DeepNorm uses gain $\beta$.

The toy everywhere in this chapter (`scripts/ch04_deepnet.py`): width $d = 32$, 4 heads, feed-forward 64, vocabulary 32,
sequences of 32 tokens, batch 16, Adam(0.9, 0.98), no warmup, no clipping. The data: $x_t = (x_{t-2} + 1) \bmod 32$ with 10% of
the tokens replaced by random ones — one attention hop back; a model that learned nothing scores $\ln 32 = 3.47$ nats, a perfect
one about 0.65."""),
    code('''show(exp.early_update)
depths = [6, 12, 24] if QUICK else [6, 12, 24, 48, 100, 200]
seeds = [0] if QUICK else [0, 1, 2]
steps = 3 if QUICK else 10
variants = ["post", "pre", "deepnorm"]
diag = {v: [] for v in variants}
start = time.perf_counter()
print(f"after {steps} Adam steps at lr 1e-3, mean over seeds {seeds}:")
print(f"{'':<7}" + "".join(f"{exp.LABELS[v] + ': update, grad ratio 0 -> t':>38}" for v in variants))
for n in depths:
    for v in variants:
        diag[v].append([exp.early_update(v, n, 1e-3, seed=s, steps=steps) for s in seeds])
    cells = []
    for v in variants:
        mean = lambda key: sum(d[key] for d in diag[v][-1]) / len(seeds)  # noqa: E731
        cells.append(f"{mean('update'):.3f}, {mean('grad_ratio_0'):.3f} -> {mean('grad_ratio_t'):.3f}")
    print(f"N={n:<5}" + "".join(f"{c:>38}" for c in cells) + f"   ({time.perf_counter() - start:.0f} s)")

fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
for v in variants:
    for ax, key in zip(axes, ("update", "grad_ratio_t")):
        values = [[d[key] for d in per_seed] for per_seed in diag[v]]
        mean = [sum(u) / len(u) for u in values]
        ax.errorbar(depths, mean, yerr=[(max(u) - min(u)) / 2 for u in values], marker="o", capsize=3,
                    label=exp.LABELS[v])
axes[0].set(xscale="log", title=f"Model update after {steps} steps (lr 1e-3, no warmup)",
            xlabel="layers N (blocks, log scale)", ylabel="||F(x; θ_t) - F(x; θ_0)|| / ||F(x; θ_0)||")
axes[1].set(xscale="log", yscale="log", title=f"Gradient of block 1 / block N after {steps} steps",
            xlabel="layers N (blocks, log scale)", ylabel="||∂L/∂W_1|| first / last block")
axes[0].legend()
plt.tight_layout()
plt.show()'''),
    md(r"""How to read it. In **Post-LN** the gradient that reaches the first block collapses within the first 10 steps once the
model is deep (the right plot falls by orders of magnitude from 24 layers on): the early updates push the stack into a regime
where the LayerNorms block the gradient, and the bottom of the model stops learning — this is the "stall" of the next
section. **DeepNorm** keeps the first block's gradient within about 30% of the last block's at every depth, and its model
update is the smallest of the three at every depth — though at this toy scale it is not flat: it grows from about 0.4 at 6
layers to about 1.0 at 200 (the theory bounds it by a constant, not by a number independent of the data and steps). **Pre-LN**'s relative update is large, yet its gradient reaches the bottom unharmed (its
identity path never passes through a LayerNorm), which is why it trains; the paper's point is that the stable Pre-LN gives
up some of Post-LN's quality, which DeepNorm keeps.

## 5. Post-LN vs Pre-LN vs DeepNorm at depths 12, 24, 48

Same width, same learning rate ($10^{-3}$), no warmup, 300 steps, seeds 0, 1, 2. What the words mean here (final loss = mean
of the last 10 training losses):

* **trains**: final loss below $\ln|V| - 1 = 2.47$ nats;
* **stalls**: final loss between 2.47 and $\ln|V| + 0.5$ (stuck near $\ln 32 = 3.47$, the loss of a model that ignores its input);
* **diverges**: the loss became NaN/inf or ended above $\ln|V| + 0.5$.

The sweep is 36 runs (about 10 minutes on one CPU thread), so it lives in a script; its results are loaded here. A fourth
variant, *Post-LN with the core's GPT-2 init* (std 0.02, and $0.02/\sqrt{2N}$ on $W^O$, $W_2$), shows that a small init alone
is a down-scaling of the branches too — the same medicine as $\beta$, without the theory that sets the dose."""),
    code('''sweep = load("ch04_sweep.json")
runs = sweep["runs"]
variants = ["post", "pre", "deepnorm", "post-gpt2"]
depths = sorted({r["n_layers"] for r in runs})
print(f"\\nfinal loss (mean of the last 10 steps) per seed, and the verdict; ln|V| = {math.log(32):.3f}")
print(f"{'variant':<22}" + "".join(f"{'N=' + str(n):>30}" for n in depths))
for v in variants:
    cells = []
    for n in depths:
        rs = sorted((r for r in runs if r["variant"] == v and r["n_layers"] == n), key=lambda r: r["seed"])
        finals = " ".join(f"{r['final']:.2f}" for r in rs)
        verdicts = [exp.verdict(r["final"]) for r in rs]
        summary = verdicts[0] if len(set(verdicts)) == 1 else "/".join(verdicts)
        cells.append(f"{finals} {summary:>10}")
    print(f"{exp.LABELS[v]:<22}" + "".join(f"{c:>30}" for c in cells))
print("seeds", sorted({r["seed"] for r in runs}), "| steps", sweep["steps"], "| lr", runs[0]["lr"])'''),
    code('''fig, axes = plt.subplots(1, len(depths), figsize=(13, 3.5), sharey=True)
colors = {"post": "tab:red", "pre": "tab:blue", "deepnorm": "tab:green", "post-gpt2": "tab:gray"}
for ax, n in zip(axes, depths):
    for v in variants:
        for r in (r for r in runs if r["variant"] == v and r["n_layers"] == n):
            w = 10
            smooth = [sum(r["losses"][i:i + w]) / w for i in range(len(r["losses"]) - w + 1)]
            ax.plot(range(w, len(r["losses"]) + 1), smooth, color=colors[v], alpha=0.8,
                    label=exp.LABELS[v] if r["seed"] == 0 else None)
    ax.axhline(math.log(32), color="k", ls=":", lw=1)
    ax.set(title=f"N = {n} layers", xlabel="step", ylim=(0.5, 3.7))
axes[0].set(ylabel="training loss (nats/token, 10-step mean)")
axes[-1].legend(fontsize=8)
fig.suptitle("Post-LN vs Pre-LN vs DeepNorm, lr 1e-3, no warmup, 3 seeds each (dotted: ln 32)")
plt.tight_layout()
plt.show()'''),
    md(r"""Reading it honestly: at **N = 12** Post-LN (xavier) still trains at this learning rate, though it is the slowest of the
four. From **N = 24** on it sits on $\ln 32$ for all 300 steps and all seeds: the bottom of the stack stopped receiving
gradient in the first steps (section 4) and never recovers. DeepNorm is the same Post-LN architecture with $\alpha$ on the
stream and $\beta$ on the init; it trains at every depth, close to Pre-LN (a little behind it at 12 and 24 layers, level at
48). The GPT-2-style small init also rescues Post-LN at these depths: shrinking the branches at init is the cure, and
DeepNorm is the version of it whose dose is derived for each depth.

Run one pair live to see that the script's numbers reproduce (quick mode: 12 layers and 60 steps, too short to train):"""),
    code('''n, steps = (12, 60) if QUICK else (24, 300)
for v in ("post", "deepnorm"):
    r = exp.train_run(v, n, 1e-3, seed=0, steps=steps)
    print(f"{exp.LABELS[v]:<10} N={n} seed 0: final loss {r['final']:.3f} ({exp.verdict(r['final'])}), "
          f"{r['sec_per_step'] * 1e3:.0f} ms/step")'''),
    md(r"""## 6. Pushing DeepNorm deep: 200 and 1000 layers on a CPU

The same toy at $N = 200$ (400 sublayers), DeepNorm next to Post-LN, and DeepNorm alone at $N = 1000$ (2,000 sublayers, the
paper's headline depth): lr $10^{-3}$, no warmup, 300 steps, seed 0, one thread of a shared 2-core CPU. The scripts ran them
(commands printed below); this cell loads the results and prints the models' sizes."""),
    code('''deep = load("ch04_deep.json")
deeper = load("ch04_deep1000.json")
fig, ax = plt.subplots(figsize=(6, 3.5))
for r in deep["runs"] + deeper["runs"]:
    w = 10
    smooth = [sum(r["losses"][i:i + w]) / w for i in range(len(r["losses"]) - w + 1)]
    ax.plot(range(w, len(r["losses"]) + 1), smooth, color=colors[r["variant"]],
            ls="-" if r["n_layers"] == 200 else "--", label=f"{exp.LABELS[r['variant']]}, {r['n_layers']} layers")
    print(f"{exp.LABELS[r['variant']]:<10} N={r['n_layers']} seed {r['seed']}: final loss {r['final']:.3f} "
          f"({exp.verdict(r['final'])}), {r['sec_per_step']:.2f} s/step, {r['seconds'] / 60:.1f} min")
ax.axhline(math.log(32), color="k", ls=":", lw=1)
ax.set(title="The deepest models, lr 1e-3, no warmup, seed 0", xlabel="step",
       ylabel="training loss (nats/token, 10-step mean)")
ax.legend()
plt.show()
for n in (200, 1000):
    torch.manual_seed(0)
    big = deepnet(TransformerConfig(vocab_size=32, block_size=32, n_layers=n, d_model=32, n_heads=4, d_ff=64))
    print(f"the {n}-layer model: {big.num_params():,} parameters (without position embeddings), alpha = "
          f"{big.blocks[0].attn_residual.alpha:.3f}, beta = {deepnorm_constants(decoder_layers=n)['decoder'][1]:.4f}")'''),
    md(r"""At **200 layers** DeepNorm trains (its loss leaves $\ln 32$ after about 40 steps and is still falling at step 300) while
Post-LN at the same depth never moves. At **1000 layers** DeepNorm did *not* leave $\ln 32$ within 300 steps at this learning
rate. Whether it needs more steps (with $\beta = 0.106$ each branch starts very small) or another learning rate was not
tested: one such run costs 2.4 s per step here, 12 minutes per 300 steps. So the deepest model trained on this CPU is the
200-layer one; the paper's 1000-layer claim is left to a GPU (`--depths 1000 --steps 3000`, not run)."""),
    md(r"""## 7. The kernel: `LN(α·x + g)` in one pass

Eager PyTorch computes DeepNorm's residual in three kernels (scale, add, LayerNorm) and writes the sum to memory in between.
`kernels/layernorm.py` fuses them: one Triton program per row reads $x$ and $g$ once, computes $h = \alpha x + g$, its mean
and variance in registers, and writes $y$ once, plus two floats per row (mean, $1/\sigma$) for the backward pass. The backward
recomputes $h$ and reduces $\partial L/\partial w$, $\partial L/\partial b$ over rows in per-program partial sums. The same
kernel does RMSNorm (`rms=True`) and a plain norm (`g=None`, `alpha=1`). On this CPU it runs in Triton's interpreter (slow,
exact); on a GPU it compiles."""),
    code('''import kernels
from kernels.layernorm import add_norm, deepnorm_add_norm

show(deepnorm_add_norm)
part = DeepNorm(TransformerConfig(n_layers=24, d_model=64, n_heads=4))
x = torch.randn(4, 16, 64, requires_grad=True)
g = torch.randn(4, 16, 64, requires_grad=True)
fused = deepnorm_add_norm(x, g, part.norm, part.alpha)
eager = deepnorm(x, g, part.alpha, part.norm)
print(f"backend: {kernels.backend(x)}; forward max |fused - eager| = {(fused - eager).abs().max():.2e}")
fused.square().sum().backward()
gx, gg = x.grad.clone(), g.grad.clone()
x.grad = g.grad = None
eager.square().sum().backward()
print(f"backward: max |dx diff| = {(gx - x.grad).abs().max():.2e}, max |dg diff| = {(gg - g.grad).abs().max():.2e}")'''),
    md(r"""## Exercises

Generate your file with `python -m exercises stubs`, fill it in, then `python -m exercises grade 04`.

| # | function (in `nanomodels/deepnet.py`) | what the grader checks |
|---|---|---|
| 4.1 | `deepnorm_constants` | the paper's table for several $N$ and $(N, M)$; $2N\cdot 2\beta^2/\alpha^2 = 1$ for every $N$ |
| 4.2 | `deepnorm` | branch $= 0$ gives $\mathrm{LN}(x)$; a known branch $g$ gives $\mathrm{LN}(\alpha x + g)$ |
| 4.3 | `deepnorm_init_` | per-matrix std: gain $\beta$ on $W^V, W^O, W_1, W_2$, gain 1 on $W^Q, W^K$, everything else untouched |

Known-wrong solutions the grader must reject are in `exercises/mutants/ex04/` (α on the branch, β on the queries and keys,
$N$ counting sublayers, torchscale's 1.15, ...)."""),
]

CH05 = [
    md(r"""# Chapter 05 — Sub-LN (Magneto): one more LayerNorm per sublayer

Magneto ("Foundation Transformers", Wang et al. 2022, [arXiv 2210.06423](https://arxiv.org/abs/2210.06423)) keeps Pre-LN's stable
residual $x + f(\mathrm{LN}(x))$ and adds a second LayerNorm **inside** each sublayer, just before its output matrix:

$$\text{attention: } \mathrm{out} = W^O\,\mathrm{LN}\big(\mathrm{Attention}(W^Q\mathrm{LN}(x), W^K\mathrm{LN}(x), W^V\mathrm{LN}(x))\big),\qquad
\text{FFN}(x) = W_2\,\mathrm{LN}\big(\phi(W_1\,\mathrm{LN}(x))\big).$$

The inner LN of the attention is over $d$; the feed-forward's is over the feed-forward width $d_\mathrm{ff}$. The init, derived
from the DeepNet theory, **multiplies** the xavier init of $W^V, W^O, W_1, W_2$ by $\gamma = \sqrt{\log 2N}$ (> 1: DeepNet
*divides*). Because the inner LN normalizes whatever $W^V$ (or $W_1$) produced, $\gamma$ changes the optimization, not the
forward pass. This is the default architecture of torchscale.

This chapter: $\gamma$, the two parts and the init (graded exercises 5.1–5.3), properties you can see (scale invariance, exact
reduction to Pre-LN), then Post-LN vs Pre-LN vs Sub-LN vs DeepNorm at a fixed depth: the largest learning rate at which each
still trains, the loss curves, and what the extra norms cost in time."""),
    code(SETUP),
    md(r"""## 1. $\gamma$

| architecture | $\gamma$ (natural log) |
|---|---|
| encoder-only / decoder-only, $N$ layers | $\sqrt{\log 2N}$ |
| enc-dec: encoder | $\sqrt{\log(3M)\,\log(2N)/3}$ |
| enc-dec: decoder | $\sqrt{\log 3M}$ |"""),
    code('''from nanomodels.subln import subln_gamma
from nanomodels.deepnet import deepnorm_constants

show(subln_gamma)
print(f"{'model':<20} {'Sub-LN gamma':>13} {'DeepNet beta':>13}")
for n in (6, 12, 24, 48, 200, 1000):
    print(f"{'N=' + str(n):<20} {subln_gamma(decoder_layers=n)['decoder']:13.4f} "
          f"{deepnorm_constants(decoder_layers=n)['decoder'][1]:13.4f}")
g = subln_gamma(encoder_layers=6, decoder_layers=6)
print(f"{'enc-dec 6-6':<20} enc {g['encoder']:.4f} / dec {g['decoder']:.4f}")'''),
    md(r"""## 2. The parts: an inner LayerNorm before $W^O$ and before $W_2$

Both are parts for the core Transformer: the attention part subclasses the core's `MultiHeadAttention` and puts a LayerNorm
between its `attend()` (everything before the output projection) and `out_proj`; the feed-forward part subclasses the core
`MLP`. The residual stays the core's `PreNorm`. Exercise 5.2 is the feed-forward line."""),
    code('''from nanomodels.subln import SubLNAttention, SubLNMLP, magneto, subln_ffn, subln_init_
from nanomodels.transformer import PreNorm, Transformer, TransformerConfig

show(subln_ffn)
show(SubLNAttention)
show(SubLNMLP)
show(magneto)
cfg = TransformerConfig(vocab_size=32, block_size=32, n_layers=2, d_model=32, n_heads=4, d_ff=64)
print(magneto(cfg).blocks[0])'''),
    md(r"""### Properties you can see

**Scale invariance.** With a bias-free $W^V$, scaling it by $c$ scales the attention output by $c$ (the softmax weights do not
depend on $V$), and the inner LN removes it: the sublayer's output is unchanged, while $\partial L/\partial W^V$ scales by $1/c$.
A larger $W^V$ therefore learns more slowly, in relative terms — which is how $\gamma$ acts on optimization. (With a bias
the invariance breaks: softmax rows sum to 1, so the bias passes through unscaled.)

**Reduction to Pre-LN.** Replace both inner norms by identities and use $\gamma = 1$: the model is bit-identical to Pre-LN."""),
    code('''cfg64 = TransformerConfig(vocab_size=32, block_size=32, n_layers=2, d_model=32, n_heads=4, d_ff=64, bias=False)
torch.manual_seed(0)
attn = SubLNAttention(cfg64, attn_fn=nanomodels.attention.attention).double()
attn.inner_norm.eps = 0.0
x = torch.randn(2, 8, 32, dtype=torch.float64)
base = attn(x, None, True)
base.square().sum().backward()
grad = attn.v_proj.weight.grad.clone()
for c in (0.1, 3.0, 50.0):
    attn.zero_grad()
    with torch.no_grad():
        attn.v_proj.weight.mul_(c)
    out = attn(x, None, True)
    out.square().sum().backward()
    print(f"W^V x {c:<5}: max |output change| = {(out - base).abs().max():.1e}, "
          f"max |c * grad - grad_0| = {(attn.v_proj.weight.grad * c - grad).abs().max():.1e}")
    with torch.no_grad():
        attn.v_proj.weight.div_(c)

torch.manual_seed(1)
sub = subln_init_(Transformer(cfg, attention=SubLNAttention, ffn=SubLNMLP), 1.0)
torch.manual_seed(1)
pre = subln_init_(Transformer(cfg), 1.0)
for block in sub.blocks:
    block.attn.inner_norm = block.ffn.inner_norm = torch.nn.Identity()
idx = torch.randint(0, 32, (2, 16))
print("inner norms = identity, gamma = 1: logits bit-identical to Pre-LN:", torch.equal(sub(idx)[0], pre(idx)[0]))'''),
    md(r"""## 3. The init: xavier normal with gain $\gamma$ (exercise 5.3)

Paper vs official code: torchscale (@ 4d1e0e8) multiplies PyTorch's `nn.Linear` default init by $\gamma$ (xavier only with
`bert_init`), gives cross-attention no inner LN, and turns Sub-LN on by default (`subln=True` in every config), so a default
torchscale model is Magneto; its README warns that Sub-LN and DeepNorm cannot be combined in one model. The library follows the
paper: xavier normal with gain $\gamma$."""),
    code('''show(subln_init_)
torch.manual_seed(0)
model = magneto(TransformerConfig(vocab_size=32, block_size=32, n_layers=24, d_model=128, n_heads=4, d_ff=256))
gamma = subln_gamma(decoder_layers=24)["decoder"]
print(f"N=24, gamma = {gamma:.4f}; measured std / (xavier std) per matrix of block 0:")
for name, p in model.blocks[0].named_parameters():
    if p.dim() == 2:
        print(f"  {name:<22} {tuple(p.shape)!s:<11} ratio {p.std() / math.sqrt(2 / sum(p.shape)):.3f}")'''),
    md(r"""## 4. The largest learning rate that still trains

Post-LN, Pre-LN, Sub-LN and DeepNorm at **N = 24** layers on chapter 04's toy (width 32, 4 heads, feed-forward 64, the
`lag2` task, vocabulary 32, batch 16, Adam(0.9, 0.98), no warmup, no clipping, 300 steps), learning rates
$3\cdot10^{-4}, 10^{-3}, 3\cdot10^{-3}, 10^{-2}, 3\cdot10^{-2}, 10^{-1}$, seeds 0, 1, 2. Post-LN and Pre-LN start from xavier (gain 1), Sub-LN from
xavier $\times\gamma$, DeepNorm from xavier $\times\beta$.

A run **trains** if its final loss (mean of the last 10 steps) is below $\ln|V| - 1 = 2.47$ nats; it **diverges** on NaN/inf or
a final loss above $\ln|V| + 0.5$; otherwise it **stalls**. A variant's *max stable learning rate* is the largest one in the
sweep at which all three seeds train. The sweep (72 runs, in two invocations of `scripts/ch05_subln.py`) is loaded here.
With a fixed budget of 300 steps a very small learning rate can also fail to reach the threshold: that is slowness, not
instability, and the curves below tell the two apart."""),
    code('''lr_sweep = load("ch05_lr.json")
extra = load("ch05_lr_extra.json")  # the same sweep at 3e-4 and 1e-1, run afterwards
runs = lr_sweep["runs"] + extra["runs"]
variants = ["post", "pre", "subln", "deepnorm"]
lrs = sorted({r["lr"] for r in runs})
print(f"\\nfinal loss per seed (N={runs[0]['n_layers']}); ln|V| = {math.log(32):.3f}")
print(f"{'variant':<18}" + "".join(f"{'lr ' + format(lr, 'g'):>26}" for lr in lrs) + f"{'max stable lr':>16}")
max_lr = {}
for v in variants:
    cells, ok = [], []
    for lr in lrs:
        rs = sorted((r for r in runs if r["variant"] == v and r["lr"] == lr), key=lambda r: r["seed"])
        verdicts = [exp.verdict(r["final"]) for r in rs] or ["-"]
        ok.append(all(x == "trains" for x in verdicts))
        summary = verdicts[0] if len(set(verdicts)) == 1 else "mixed"
        cells.append(" ".join(f"{r['final']:.2f}" for r in rs) + f" {summary:>8}")
    stable = [lr for lr, good in zip(lrs, ok) if good]
    max_lr[v] = max(stable) if stable else None
    shown = "none" if max_lr[v] is None else format(max_lr[v], "g")
    print(f"{exp.LABELS[v]:<18}" + "".join(f"{c:>26}" for c in cells) + f"{shown:>16}")
print("seeds", sorted({r["seed"] for r in runs}), "| steps", lr_sweep["steps"])
print(f"\\nmean final loss over the seeds (nan: a diverged run)")
for v in variants:
    means = []
    for lr in lrs:
        finals = [r["final"] for r in runs if r["variant"] == v and r["lr"] == lr]
        means.append(sum(finals) / len(finals) if finals else float("nan"))
    print(f"{exp.LABELS[v]:<18}" + "".join(f"{m:>26.3f}" for m in means))'''),
    code('''colors = {"post": "tab:red", "pre": "tab:blue", "subln": "tab:purple", "deepnorm": "tab:green"}
fig, axes = plt.subplots(1, len(lrs), figsize=(15, 3.5), sharey=True)
for ax, lr in zip(axes, lrs):
    for v in variants:
        for r in (r for r in runs if r["variant"] == v and r["lr"] == lr):
            w = 10
            losses = [x if math.isfinite(x) else float("nan") for x in r["losses"]]
            smooth = [sum(losses[i:i + w]) / w for i in range(len(losses) - w + 1)]
            ax.plot(range(w, len(losses) + 1), smooth, color=colors[v], alpha=0.8,
                    label=exp.LABELS[v] if r["seed"] == 0 else None)
    ax.axhline(math.log(32), color="k", ls=":", lw=1)
    ax.set(title=f"lr {lr:g}", xlabel="step", ylim=(0.5, 4.5))
axes[0].set(ylabel="training loss (nats/token, 10-step mean)")
axes[0].legend(fontsize=8)
fig.suptitle(f"N = {runs[0]['n_layers']} layers, no warmup, 3 seeds each (dotted: ln 32)")
plt.tight_layout()
plt.show()'''),
    md(r"""What the sweep shows at $N = 24$ (numbers in the tables above):

* **Post-LN** trains at no learning rate of the sweep, from $3\cdot10^{-4}$ to $10^{-1}$: at this depth it needs warmup (or a
  smaller init) — the problem DeepNet set out to remove.
* **Pre-LN** and **Sub-LN** both train up to $3\cdot10^{-2}$. At that rate Sub-LN's three seeds all end between 1.0 and 1.2 nats
  while one Pre-LN seed ends at 2.2: at the edge of stability Sub-LN is the more robust. Sub-LN also has the lowest mean final
  loss at every learning rate from $10^{-3}$ to $3\cdot10^{-2}$ — Magneto's "better quality" claim, here only at toy scale and
  with 3 seeds.
* **DeepNorm** trains up to $10^{-2}$ and stalls at $3\cdot10^{-2}$: it bounds the model update *at a given* learning rate, it
  does not make every learning rate safe.
* At $10^{-1}$ nothing trains. At $3\cdot10^{-4}$ no variant reaches 2.47 nats within 300 steps, but the stable ones are still
  descending (the curves): that is slowness, not instability."""),
    md(r"""## 5. What the extra norms cost

Sub-LN adds two LayerNorms per block (one over $d$, one over $d_\mathrm{ff}$) and $2(d + d_\mathrm{ff})$ parameters; DeepNorm
adds nothing but a multiplication by $\alpha$. The sweep recorded the time per training step of every run (one CPU thread,
shared machine: compare within this table); the cell also times forward + backward of each variant directly."""),
    code('''import statistics

print(f"{'variant':<18} {'params':>9} {'median ms/step in the sweep':>28} {'fwd+bwd ms (here)':>19}")
x, y = exp.fib_batch(16, 32, 32, torch.Generator().manual_seed(0), rule="lag2")
n_layers = 6 if QUICK else runs[0]["n_layers"]
cost = {}
for v in variants:
    model = exp.build(v, n_layers, seed=0)
    times = []
    for i in range(3 if QUICK else 8):
        start = time.perf_counter()
        model(x, y)[1].backward()
        times.append(time.perf_counter() - start)
    sweep_ms = statistics.median(r["sec_per_step"] for r in runs if r["variant"] == v) * 1e3
    cost[v] = (model.num_params(), sweep_ms, statistics.median(times[1:]) * 1e3)
    print(f"{exp.LABELS[v]:<18} {cost[v][0]:>9,} {cost[v][1]:>28.1f} {cost[v][2]:>19.1f}")
print(f"(fwd+bwd measured at N={n_layers}, batch 16 x 32 tokens, median of the repeats after the first)")
extra = [100 * (cost["subln"][i] / cost["pre"][i] - 1) for i in range(3)]
print(f"Sub-LN vs Pre-LN: {extra[0]:+.1f}% parameters, {extra[1]:+.1f}% time per training step in the sweep, "
      f"{extra[2]:+.1f}% forward + backward here")'''),
    md(r"""## 6. The kernel

Each inner norm is a plain LayerNorm row kernel: `kernels/layernorm.py`'s `add_norm` with `g=None` (and `rms=True` gives the
RMSNorm that BitNet puts in the same place). Under the interpreter here, compiled on a GPU."""),
    code('''import kernels
from kernels.layernorm import layer_norm

ffn = SubLNMLP(TransformerConfig(n_layers=24, d_model=32, n_heads=4, d_ff=64))
h = torch.randn(8, 64)
print(f"backend: {kernels.backend(h)}; inner LN over d_ff by the kernel vs nn.LayerNorm: max |diff| = "
      f"{(layer_norm(h, ffn.inner_norm.weight, ffn.inner_norm.bias) - ffn.inner_norm(h)).abs().max():.2e}")'''),
    md(r"""## Exercises

Generate your file with `python -m exercises stubs`, fill it in, then `python -m exercises grade 05`.

| # | function (in `nanomodels/subln.py`) | what the grader checks |
|---|---|---|
| 5.1 | `subln_gamma` | the table; $\gamma^2 = \log 2N$ for every $N$; the enc-dec rows |
| 5.2 | `subln_ffn` | $W_2\,\mathrm{LN}(\mathrm{GELU}(W_1x))$ with the inner norm over $d_\mathrm{ff}$ |
| 5.3 | `subln_init_` | per-matrix std: gain $\gamma$ on $W^V, W^O, W_1, W_2$ (multiplied), gain 1 on $W^Q, W^K$, the rest untouched |

Known-wrong solutions are in `exercises/mutants/ex05/` ($\gamma$ divided instead of multiplied, the inner norm over $d$ instead
of $d_\mathrm{ff}$, $N$ counting sublayers, ...)."""),
]


def build(cells, path: Path) -> None:
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python", "version": "3.11"}
    nbformat.write(nb, path)


def execute(path: Path, quick: bool = False) -> float:
    from nbclient import NotebookClient

    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "kernels" / "nanomodels-build"
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "nanomodels build", "language": "python"}))
        os.environ["JUPYTER_PATH"] = tmp
        if quick:
            os.environ["MPLBACKEND"] = "Agg"
        else:
            os.environ.pop("MPLBACKEND", None)  # the kernel's inline backend: the figures go into the notebook
        os.environ["OMP_NUM_THREADS"] = "1"
        if quick:
            os.environ["NANOMODELS_QUICK"] = "1"
        else:
            os.environ.pop("NANOMODELS_QUICK", None)
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        NotebookClient(nb, kernel_name="nanomodels-build", timeout=1800,
                       resources={"metadata": {"path": str(path.parent)}}).execute()
        seconds = time.perf_counter() - start
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    if not quick:
        nbformat.write(nb, path)
    return seconds


if __name__ == "__main__":
    targets = {"04": (CH04, ROOT / "chapters" / "04_deepnet.ipynb"),
               "05": (CH05, ROOT / "chapters" / "05_subln_magneto.ipynb")}
    only = [a for a in sys.argv[1:] if a in targets] or list(targets)
    for key in only:
        cells, path = targets[key]
        build(cells, path)
        print(f"wrote {path.relative_to(ROOT)}")
        if "--quick" in sys.argv:
            print(f"  quick run: {execute(path, quick=True):.0f} s")
        if "--execute" in sys.argv:
            print(f"  full run: {execute(path):.0f} s (outputs saved)")
