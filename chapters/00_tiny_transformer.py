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
# *This notebook is built from its source `chapters/00_tiny_transformer.py` (jupytext percent format): edit the source, then
# rebuild with `python chapters/build.py 00` (add `--execute` to run it and save the outputs, `--quick` with it
# for quick mode).*

# %% [markdown]
# # Chapter 00 — a tiny Transformer, from bytes to samples
#
# Every later chapter changes one part of the model built here, so this chapter builds all of it, from scratch:
#
# 1. **Bytes → tokens.** A byte-level BPE tokenizer trained on the corpus (then exported to `tiktoken` as the fast engine).
# 2. **Attention with an explicit mask.** $\mathrm{softmax}(QK^\top/\sqrt{d} + M)\,V$ where $M$ is $0$ or $-\infty$ — the one idea the
#    whole UniLM line keeps changing.
# 3. **The Transformer assembled from parts**: attention function, feed-forward, residual-and-norm scheme, linear layer, head.
# 4. **Training** a tiny GPT on Python's own documentation, against the unigram baseline.
# 5. **Sampling** with temperature and top-k, and a KV cache that must give exactly the same tokens.
#
# The code lives in `nanomodels/`; this notebook imports it and shows it (`show(fn)` prints a function's source, and only the signature and docstring of a function you write in an exercise), it never
# redefines it. Set `NANOMODELS_QUICK=1` to shrink every experiment (that is how CI runs this notebook); the committed outputs are
# from a full run on a 2-core CPU.

# %%
import contextlib
import time
from pathlib import Path

import matplotlib.pyplot as plt
import torch

import nanomodels
from nanomodels.runtime import pick_device, quick_mode

from show import show  # chapters/show.py: prints library code; an exercise's function as its stub

QUICK = quick_mode()
ROOT = Path(nanomodels.__file__).resolve().parent.parent  # the repository; the run goes to its runs/
torch.manual_seed(0)
print(f"{'quick mode' if QUICK else 'full run'} | device {pick_device()} | torch {torch.__version__} | "
      f"{torch.get_num_threads()} thread(s)")


# %% [markdown]
# ## 1. Bytes to tokens: byte-pair encoding
#
# The corpus is `pydoc_data.topics`: Python's own help pages, about 465 KB of English prose and code, shipped with every Python,
# so everything here runs offline.
#
# A byte-level BPE starts from the 256 bytes (nothing is ever unknown) and repeatedly **merges the most frequent adjacent pair**
# into a new token. A regex first cuts the text into chunks (a word with its leading space, digits, punctuation, whitespace), and
# merges never cross a chunk boundary. Two small functions do all the work: one merge step, and the choice of the pair
# (ties go to the smallest pair, so training is deterministic). Both are graded exercises (0.3 and 0.4).

# %%
from nanomodels.data import load_text
from nanomodels.tokenizer import (BPETokenizer, get_tokenizer, merge_pair, most_frequent_pair, train_bpe)

text = load_text("pydoc")
print(f"{len(text):,} characters, {len(text.encode()):,} bytes")
print(text[20_000:20_400])

# %%
show(merge_pair)
show(most_frequent_pair)

# %% [markdown]
# The classic example (from the Wikipedia article on BPE): in `aaabdaaabac` the pair `aa` is the most frequent, then `aa`+`a`...
# Each merge is printed as the bytes it creates.

# %%
toy = BPETokenizer(train_bpe("aaabdaaabac", 259))
for i, (a, b) in enumerate(toy.merges):
    print(f"merge {i}: {toy.vocab[a]!r} + {toy.vocab[b]!r} -> token {256 + i} = {toy.vocab[256 + i]!r}")
print("encode('aaabdaaabac') ->", toy.encode("aaabdaaabac", fast=False))

# %% [markdown]
# On the real corpus: a larger vocabulary compresses the text into fewer tokens (bytes per token goes up), at the price of a larger
# embedding table. Training takes about a second, thanks to counting each unique chunk once and re-scanning only the chunks that hold
# the merged pair.

# %%
sizes = [256, 384, 512, 1024] if not QUICK else [256, 512]
sample_text = text[: len(text) // 4] if QUICK else text
ratios = []
for size in sizes:
    start = time.perf_counter()
    tok = BPETokenizer(train_bpe(sample_text, size))
    seconds = time.perf_counter() - start
    ratios.append(len(sample_text.encode()) / len(tok.encode(sample_text)))
    print(f"vocab {size:5d}: {ratios[-1]:.2f} bytes/token, trained in {seconds:.2f} s")
fig, ax = plt.subplots(figsize=(5, 3))
ax.plot(sizes, ratios, marker="o")
ax.set(title="BPE compression on the pydoc corpus", xlabel="vocabulary size (tokens)", ylabel="bytes per token")
plt.show()

# %% [markdown]
# **Exercise 0.6: the whole training loop.** `train_bpe` is the loop around the two steps above: cut the text into chunks,
# count the adjacent pairs inside them (a chunk that occurs k times counts k times), merge the most frequent pair everywhere,
# and repeat until the vocabulary is full or no pair occurs twice. Write it in `exercises/ex00_tiny_transformer.py` (your
# `merge_pair` and `most_frequent_pair` are yours to call), then run
#
#     python -m exercises grade 00 --exercise 0.6
#
# The grader compares your merges with the algorithm written out (every pair recounted after every merge) on random texts,
# then runs a short experiment: it trains your `train_bpe` on the first 10,000 characters of this corpus with a 384-token
# vocabulary and expects the library's merges, which compress that text to 2.02 bytes per token and decode it back exactly
# (`_pydoc_reference` in `exercises/grading/checks/ch00_tiny_transformer.py` trains them).

# %%
show(train_bpe)

# %% [markdown]
# The model below uses a 512-token vocabulary (`get_tokenizer` caches the merges, so the second time is instant). Here are its
# first merges, and a sentence cut into tokens:

# %%
tok = get_tokenizer("bpe", text, 512)
print("first 12 merges:", [tok.vocab[256 + i].decode() for i in range(12)])
sentence = "The for statement is used to iterate over the elements of a sequence."
pieces = [tok.decode([i]) for i in tok.encode(sentence)]
print(f"{len(sentence)} characters -> {len(pieces)} tokens:", pieces)

# %% [markdown]
# **tiktoken as the fast engine.** The learned merges export to a `tiktoken.Encoding` (bytes → rank). tiktoken does not replay
# the merge list: inside a chunk it merges the adjacent pair whose *concatenated bytes* have the lowest rank. Our pure-Python
# `encode(fast=False)` follows the same rule, so the two give identical ids — checked here on the whole corpus, and over arbitrary
# unicode in `tests/test_tokenizer.py`.

# %%
check = text if not QUICK else text[:50_000]
start = time.perf_counter(); slow = tok.encode(check, fast=False); t_python = time.perf_counter() - start
start = time.perf_counter(); fast = tok.to_tiktoken().encode_ordinary(check); t_tiktoken = time.perf_counter() - start
assert slow == fast
print(f"identical ids for {len(fast):,} tokens; pure Python {t_python * 1e3:.0f} ms, tiktoken {t_tiktoken * 1e3:.1f} ms "
      f"({t_python / t_tiktoken:.0f}x faster)")
print("round trip exact:", tok.decode(fast) == check)

# %% [markdown]
# ## 2. Attention with an explicit mask
#
# $$\mathrm{Attention}(Q, K, V) = \mathrm{softmax}\!\left(\frac{QK^\top}{\sqrt{d}} + M\right)V,\qquad
# M_{ij} = \begin{cases}0 & \text{if query } i \text{ may attend to key } j\\ -\infty & \text{otherwise}\end{cases}$$
#
# In `nanomodels` a mask is a boolean tensor `allowed[i, j]` (True = may attend). A GPT uses the **causal** mask: position $i$ sees
# itself and the past. With a KV cache the new queries are the *last* positions of the sequence, so the mask is offset.
# A query that may see nothing returns zeros, never NaN.

# %%
from nanomodels.attention import attention, causal_mask, sdpa_attention

show(causal_mask)
show(attention)

# %%
fig, axes = plt.subplots(1, 2, figsize=(8, 3))
for ax, (title, m) in zip(axes, [("causal_mask(8)", causal_mask(8)), ("causal_mask(3, 8): 3 new queries, 5 cached keys", causal_mask(3, 8))]):
    ax.imshow(m, cmap="Blues", vmin=0, vmax=1)
    ax.set(title=title, xlabel="key position j", ylabel="query i")
plt.tight_layout(); plt.show()

# %% [markdown]
# Two properties you can see (the test suite checks them over many shapes, in float64): with the causal mask, the output at
# position $t$ does not move when the inputs after $t$ change; and torch's fused `scaled_dot_product_attention` (the fast path the
# model uses) agrees with the readable reference to round-off.

# %%
g = torch.Generator().manual_seed(0)
q, k, v = (torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
base = attention(q, k, v, causal=True)
k2, v2 = k.clone(), v.clone()
k2[:, :, 4:] += 5.0; v2[:, :, 4:] -= 5.0  # change positions 4 and 5
after = attention(q, k2, v2, causal=True)
print("max change at positions 0..3:", (after[:, :, :4] - base[:, :, :4]).abs().max().item())
print("max change at positions 4..5:", (after[:, :, 4:] - base[:, :, 4:]).abs().max().item())
print("reference vs SDPA, max |diff|:", (attention(q, k, v, causal=True) - sdpa_attention(q, k, v, causal=True)).abs().max().item())

# %% [markdown]
# ## 3. The Transformer, assembled from parts
#
# `Transformer(config, embed=..., attention_fn=..., attention=..., ffn=..., residual=..., final_norm=..., linear=..., head=...,
# head_linear=...)`, every part built as `part(config, ...)`. The defaults make a GPT: token + learned position embeddings, SDPA
# attention, a GELU MLP, **Pre-LN** residuals $x + f(\mathrm{LN}(x))$ with a final LayerNorm, `nn.Linear`, and a language-model
# head (it owns its loss, cross-entropy) tied to the token embeddings. Post-LN ends every block with a LayerNorm already, so it
# takes `final_norm=None`. Later chapters swap parts: DeepNorm or Sub-LN (ch. 04–05) the residual scheme, dilated attention
# (ch. 06) the attention function, MoE (ch. 07) the feed-forward (and adds its load-balancing loss), BitLinear (ch. 08) the
# linear class of the body, next-token diffusion (ch. 09) the embedding and the head.

# %%
from nanomodels.transformer import PostNorm, Transformer, TransformerConfig

config = TransformerConfig(vocab_size=tok.vocab_size, block_size=128, n_layers=4, d_model=128, n_heads=4)
model = Transformer(config)
print(config)
print(f"{model.num_params():,} parameters (without position embeddings)")
print(model.blocks[0])
post_ln = Transformer(config, residual=PostNorm, final_norm=None)  # one part swapped: the original Post-LN Transformer
print("Post-LN final norm:", post_ln.final_norm)

# %% [markdown]
# An impossible configuration is refused when it is built, with the field and the rule — not as a shape error inside `forward`:

# %%
try:
    TransformerConfig(d_model=128, n_heads=3)
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 4. Training a tiny GPT
#
# `nanomodels.train` is what `python -m nanomodels train` runs: AdamW, linear warmup then cosine decay, gradient clipping, periodic
# evaluation on a held-out tail of the corpus, atomic checkpoints that `--resume` continues exactly. The yardstick is the
# **unigram baseline**: the cross-entropy of the validation tokens under the training set's token frequencies — what a model that
# ignores context can do. The full run below is the default configuration (the same as the command line).

# %%
from nanomodels.train import TrainConfig, train

tcfg = TrainConfig(name="chapter00", out_dir="runs", steps=30 if QUICK else 500, eval_interval=10 if QUICK else 50,
                   eval_iters=5 if QUICK else 20, overwrite=True, progress=False, sample_tokens=100)
with contextlib.chdir(ROOT):  # as `python -m nanomodels train` from the repository: paths print relative to it
    metrics = train(tcfg)

# %%
hist = metrics["history"]
fig, ax = plt.subplots(figsize=(6, 3.5))
ax.plot([h["step"] for h in hist], [h["train_loss"] for h in hist], label="train (one batch)")
ax.plot([h["step"] for h in hist], [h["val_loss"] for h in hist], marker="o", label="validation")
ax.axhline(metrics["unigram_val_loss"], color="gray", linestyle="--", label="unigram baseline")
ax.set(title="Tiny GPT on the pydoc corpus", xlabel="step", ylabel="cross-entropy (nats/token)")
ax.legend(); plt.show()
print(f"validation {metrics['val_loss']:.3f} vs unigram {metrics['unigram_val_loss']:.3f} nats/token; "
      f"{metrics['tokens_per_s']:,.0f} tokens/s on {metrics['device']}")

# %% [markdown]
# ## 5. Sampling: temperature, top-k, and the KV cache
#
# The next token is drawn from $\mathrm{softmax}(\ell / T)$ restricted to the $k$ largest logits ($T = 0$ means argmax). Low
# temperature is repetitive and safe; high temperature is creative and then nonsense. This is exercise 0.5.

# %%
from nanomodels.train import load_model
from nanomodels.transformer import sample_next_token

show(sample_next_token)

# %%
model, tok, _ = load_model(ROOT / "runs" / "chapter00")
prompt = torch.tensor([tok.encode("The ")])
for temperature, top_k in [(0.0, None), (0.8, 40), (1.5, None)]:
    out = model.generate(prompt, 60, temperature=temperature, top_k=top_k, generator=torch.Generator().manual_seed(0))
    print(f"--- temperature {temperature}, top_k {top_k}\n{tok.decode(out[0].tolist())}\n")

# %% [markdown]
# **The KV cache.** Generating token $t$ needs the keys and values of every earlier position. Without a cache they are recomputed
# from scratch at every step; with one, each step feeds only the newest token and appends its key and value. The result must be
# *identical* (the tests check the logits in float64); the time saved grows with the length.

# %%
n_new = 20 if QUICK else 100
timings = {}
for use_cache in (False, True):
    start = time.perf_counter()
    out = model.generate(prompt, n_new, temperature=0, use_cache=use_cache)
    timings[use_cache] = (time.perf_counter() - start, out)
assert torch.equal(timings[False][1], timings[True][1])
print(f"{n_new} greedy tokens: identical; without cache {timings[False][0] * 1e3:.0f} ms, "
      f"with cache {timings[True][0] * 1e3:.0f} ms ({timings[False][0] / timings[True][0]:.1f}x)")

# %% [markdown]
# ## Exercises
#
# Chapter 00's graded exercises live in `exercises/ex00_tiny_transformer.py`: masked scaled dot-product attention (0.1),
# the causal mask (0.2), one BPE merge step (0.3), the most frequent pair with its tie rule (0.4), sampling with temperature and
# top-k (0.5), and BPE training end to end (0.6, with its compression experiment). Fill in the bodies, then run
#
#     python -m exercises grade 00
#
# The grader runs property tests against *your* file and, for each failure, names the violated invariant and a minimal
# counterexample. See `exercises/README.md`.
