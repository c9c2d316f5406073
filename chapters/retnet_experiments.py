"""Chapter 10's experiments: retention's three forms, decoding with a constant-size state, positions that extrapolate.

forms: the three forms of retention (nanomodels/retnet.py) against a naive double loop in float64, then the wall time
of each against T (1 thread, float32, (B, H, Dk, Dv) = (1, 4, 32, 64), median of `repeats` calls after a warm-up):
  parallel    (Q K^T * D) V: T x T scores, O(T^2)
  recurrent   S_n = gamma S_{n-1} + k_n^T v_n, o_n = q_n S_n: T steps of O(1) each
  chunkwise   chunks of C = 64: inside a chunk the parallel form, across chunks the state: O(T C)

    OMP_NUM_THREADS=1 python chapters/retnet_experiments.py forms --out ch10_forms.json

decode: the per-token latency and the cache of a RetNet LM against the same-size Transformer with a KV cache, at a
context of T tokens. The Transformer's cache holds T keys and values per layer, filled with random numbers of the
shape a prefill gives (the time of a step does not depend on their values; a real prefill of 32K tokens through dense
attention would take minutes here); the RetNet's state comes from a real prefill of the T tokens through the model.
Then `steps` single-token forward calls, each timed; the median is the latency.

    OMP_NUM_THREADS=1 python chapters/retnet_experiments.py decode --out ch10_decode.json

lm: small LMs on the default corpus (pydoc, BPE 512), trained at length 128 with nanomodels.train.fit, evaluated at
lengths 128 ... 1024 on the validation split. Four models that differ in one part:
  learned   the core Transformer: learned absolute positions (its table has rows up to 1024; those past 127 are
            never trained: no training window reaches them)
  rope      no position embedding; softmax attention with q, k rotated by apply_xpos(scale_base=math.inf) (RoPE)
  xpos      the same with apply_xpos(scale_base=512) (XPos); both also evaluated with blockwise causal attention
  retnet    no position embedding; MultiScaleRetention instead of attention, FFN width 2d (equal parameters)

    OMP_NUM_THREADS=1 python chapters/retnet_experiments.py lm --seeds 0 1 2 3 4 --kinds learned \
        --out ch10_lm_learned.json
    OMP_NUM_THREADS=1 python chapters/retnet_experiments.py lm --seeds 0 1 2 3 4 --kinds rope xpos retnet \
        --out ch10_lm.json
    OMP_NUM_THREADS=1 python chapters/retnet_experiments.py speed --out ch10_speed.json

speed: training tokens/s of the four LMs of `lm`, 20 steps per model per round, the models taking turns for 5 rounds.

Results go to chapters/results/; the chapter (which runs in chapters/) imports this file as `retnet_experiments`.
"""

import argparse
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from nanomodels.attention import MultiHeadAttention, as_4d_mask, causal_mask
from nanomodels.data import get_batch, load_text, train_val_split
from nanomodels.retnet import (apply_xpos, retention_chunkwise, retention_gammas, retention_parallel,
                               retention_recurrent, retnet_lm)
from nanomodels.runtime import median_seconds
from nanomodels.tokenizer import get_tokenizer
from nanomodels.train import FunctionTask, fit, lm_loss, lr_at, make_optimizer
from nanomodels.transformer import Transformer, TransformerConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"

# ----------------------------------------------------------------------------- 1. the three forms


def naive_retention(q, k, v, gamma):
    """o_n = sum_{m <= n} gamma^(n - m) (q_n . k_m) v_m, one (batch, head, n) at a time: the equation, as written."""
    B, H, T, _ = q.shape
    out = torch.zeros(B, H, T, v.size(-1), dtype=q.dtype)
    for b in range(B):
        for h in range(H):
            g = float(gamma[h])
            for n in range(T):
                for m in range(n + 1):
                    out[b, h, n] += g ** (n - m) * (q[b, h, n] @ k[b, h, m]) * v[b, h, m]
    return out


def forms_agree(T: int = 50, chunk_sizes=(1, 3, 16, 50, 64), seed: int = 0) -> dict:
    """Max |difference| from the naive loop (float64, (B, H, Dk, Dv) = (2, 4, 8, 16)) of each form, and of the
    recurrent and chunkwise forms run on two halves with the state passed on."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(2, 4, T, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(2, 4, T, 16, generator=gen, dtype=torch.float64)
    gamma = retention_gammas(4)
    want = naive_retention(q, k, v, gamma)
    diff = {"parallel": (retention_parallel(q, k, v, gamma) - want).abs().max().item(),
            "recurrent": (retention_recurrent(q, k, v, gamma)[0] - want).abs().max().item()}
    for c in chunk_sizes:
        diff[f"chunkwise C={c}"] = (retention_chunkwise(q, k, v, gamma, c)[0] - want).abs().max().item()
    h = T // 2 + 1
    first, state = retention_recurrent(q[:, :, :h], k[:, :, :h], v[:, :, :h], gamma)
    second, _ = retention_recurrent(q[:, :, h:], k[:, :, h:], v[:, :, h:], gamma, state)
    diff["recurrent, two halves"] = (torch.cat([first, second], 2) - want).abs().max().item()
    first, state = retention_chunkwise(q[:, :, :h], k[:, :, :h], v[:, :, :h], gamma, 16)
    second, _ = retention_chunkwise(q[:, :, h:], k[:, :, h:], v[:, :, h:], gamma, 16, state)
    diff["chunkwise C=16, two halves"] = (torch.cat([first, second], 2) - want).abs().max().item()
    return {"T": T, "max_abs_output": want.abs().max().item(), "diff": diff}


FORMS = ("parallel", "recurrent", "chunkwise")
PARALLEL_MAX_T = 4096  # the parallel form stores (H, T, T) decay and score matrices: 3 x 256 MiB at T = 4096


def time_form(form: str, T: int, repeats: int = 3, chunk_size: int = 64) -> float:
    """Median seconds of one call of `form` on (1, 4, T, 32) queries and keys and (1, 4, T, 64) values, float32."""
    gen = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 4, T, 32, generator=gen) for _ in range(2))
    v = torch.randn(1, 4, T, 64, generator=gen)
    gamma = retention_gammas(4).float()
    call = {"parallel": lambda: retention_parallel(q, k, v, gamma),
            "recurrent": lambda: retention_recurrent(q, k, v, gamma),
            "chunkwise": lambda: retention_chunkwise(q, k, v, gamma, chunk_size)}[form]
    with torch.no_grad():
        return median_seconds(call, repeats)


def forms_cost(lengths, repeats: int = 3, chunk_size: int = 64, progress=print) -> list:
    rows = []
    for T in lengths:
        for form in FORMS:
            if form == "parallel" and T > PARALLEL_MAX_T:
                continue
            s = time_form(form, T, repeats, chunk_size)
            rows.append({"form": form, "T": T, "ms": 1e3 * s, "us_per_token": 1e6 * s / T, "repeats": repeats,
                         "chunk_size": chunk_size})
            progress(f"T={T:>6} {form:>9}: {1e3 * s:9.2f} ms ({1e6 * s / T:7.2f} us/token)")
    return rows


def forms_table(rows) -> str:
    by = {(r["form"], r["T"]): r for r in rows}
    lines = [f"{'T':>6} | " + " | ".join(f"{f + ' ms':>13} {'us/tok':>7}" for f in FORMS)]
    for T in sorted({r["T"] for r in rows}):
        cells = [f"{by[(f, T)]['ms']:>13.2f} {by[(f, T)]['us_per_token']:>7.2f}" if (f, T) in by
                 else f"{'-':>13} {'-':>7}" for f in FORMS]
        lines.append(f"{T:>6} | " + " | ".join(cells))
    return "\n".join(lines)


# ----------------------------------------------------------------------------- parts: positions as a swapped part


class TokensOnly(nn.Module):
    """The embed part without positions: token embeddings only (the attention part places the tokens)."""

    def __init__(self, config: TransformerConfig):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.d_model)

    def forward(self, idx, positions, segments=None):
        return self.wte(idx)


class RotaryAttention(MultiHeadAttention):
    """Softmax attention with q, k through apply_xpos: scale_base=512 is XPos, math.inf is RoPE. The cache holds the
    keys before rotation; every call rotates all of them at positions 0 .. Tk - 1 and the queries at the last T."""

    def __init__(self, config, *, scale_base: float = 512, **kwargs):
        super().__init__(config, **kwargs)
        self.scale_base = scale_base

    def attend(self, x, allowed=None, causal=False, cache=None, memory=None):
        B, T, C = x.shape
        q, k, v = (self.split_heads(proj(x)) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:
            if "k" in cache:
                k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
            cache["k"], cache["v"] = k, v
        q, k = apply_xpos(q, k, q_offset=k.size(2) - T, scale_base=self.scale_base)
        y = self.attn_fn(q, k, v, as_4d_mask(allowed, T, k.size(2)), causal=causal)  # (B, H, T, D)
        return y.transpose(1, 2).reshape(B, T, C)


def blockwise_causal_mask(T: int, block: int) -> torch.Tensor:
    """(T, T) boolean: query i sees key j when j <= i and j's block is i's or the one before (blocks of `block`)."""
    blocks = torch.arange(T) // block
    return causal_mask(T) & (blocks[None, :] >= blocks[:, None] - 1)


KINDS = ("learned", "rope", "xpos", "retnet")
LABELS = {"learned": "learned positions", "rope": "RoPE", "xpos": "XPos", "retnet": "RetNet (retention)"}


def build_lm(kind: str, *, vocab_size: int, block_size: int, d_model: int, n_layers: int, n_heads: int,
             seed: int) -> Transformer:
    """The core Transformer with one part swapped (see the module docstring for the four kinds)."""
    d_ff = 2 * d_model if kind == "retnet" else 4 * d_model  # retention has 8d^2 weights, attention 4d^2
    config = TransformerConfig(vocab_size=vocab_size, block_size=block_size, n_layers=n_layers, d_model=d_model,
                               n_heads=n_heads, d_ff=d_ff)
    torch.manual_seed(seed)
    if kind == "learned":
        return Transformer(config)
    if kind == "rope":
        return Transformer(config, embed=TokensOnly, attention=functools.partial(RotaryAttention,
                                                                                  scale_base=math.inf))
    if kind == "xpos":
        return Transformer(config, embed=TokensOnly, attention=RotaryAttention)
    if kind == "retnet":
        return retnet_lm(config, embed=TokensOnly)  # MultiScaleRetention as the attention part, torchscale's init
    raise ValueError(f"kind: must be one of {KINDS}, got {kind!r}")


# ----------------------------------------------------------------------------- 2. decoding


def cache_bytes(cache) -> int:
    """Bytes of every tensor held in a cache (nested lists and dicts)."""
    if isinstance(cache, torch.Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, dict):
        return sum(cache_bytes(v) for v in cache.values())
    if isinstance(cache, (list, tuple)):
        return sum(cache_bytes(v) for v in cache)
    return 0


DECODE = dict(vocab_size=512, d_model=128, n_layers=4, n_heads=4)


def decode_models(max_context: int, seed: int = 0) -> dict:
    """The two LMs of the decoding benchmark, same width, depth and heads, and (nearly) the same parameters."""
    return {kind: build_lm(kind, block_size=max_context + 64, seed=seed, **DECODE).eval()
            for kind in ("learned", "retnet")}


@torch.no_grad()
def filled_cache(kind: str, model: Transformer, T: int) -> list:
    """The cache after a context of T tokens (see the module docstring: random keys and values for the
    Transformer, a real prefill for the RetNet)."""
    gen = torch.Generator().manual_seed(T)
    cache = [{} for _ in model.blocks]
    if kind == "retnet":
        model(torch.randint(0, DECODE["vocab_size"], (1, T), generator=gen), cache=cache)
        return cache
    H = model.config.n_heads
    D = model.config.d_model // H
    for layer in cache:
        layer["k"], layer["v"] = (torch.randn(1, H, T, D, generator=gen) for _ in range(2))
    return cache


@torch.no_grad()
def decode_latency(kind: str, model: Transformer, T: int, steps: int = 16) -> dict:
    cache = filled_cache(kind, model, T)
    nbytes = cache_bytes(cache)
    token = torch.zeros(1, 1, dtype=torch.long)
    model(token, cache=cache)  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model(token, cache=cache)
        times.append(time.perf_counter() - start)
    params = model.num_params()  # without the Transformer's position table (its rows only index positions)
    return {"kind": kind, "T": T, "ms_per_token": 1e3 * statistics.median(times), "cache_bytes": nbytes,
            "weight_bytes": 4 * params, "steps": steps, "params": params}


def decode(contexts, steps: int = 16, progress=print) -> list:
    models = decode_models(max(contexts))
    rows = []
    for T in contexts:
        for kind, model in models.items():
            r = decode_latency(kind, model, T, steps)
            rows.append(r)
            progress(f"T={T:>6} {kind:>8}: {r['ms_per_token']:7.2f} ms/token, cache {r['cache_bytes'] / 2**20:8.2f} MiB")
    return rows


def decode_table(rows) -> str:
    by = {(r["kind"], r["T"]): r for r in rows}
    lines = [f"{'T':>6} | {'Transformer ms/tok':>18} {'KV cache MiB':>12} | {'RetNet ms/tok':>13} {'state MiB':>9} |"
             f" {'speed-up':>8} {'cache saved':>11} {'memory saved':>12}"]
    for T in sorted({r["T"] for r in rows}):
        t, r = by[("learned", T)], by[("retnet", T)]
        total_t, total_r = t["cache_bytes"] + t["weight_bytes"], r["cache_bytes"] + r["weight_bytes"]
        lines.append(f"{T:>6} | {t['ms_per_token']:>18.2f} {t['cache_bytes'] / 2**20:>12.2f} | "
                     f"{r['ms_per_token']:>13.2f} {r['cache_bytes'] / 2**20:>9.3f} | "
                     f"{t['ms_per_token'] / r['ms_per_token']:>7.1f}x {100 * (1 - r['cache_bytes'] / t['cache_bytes']):>10.1f}%"
                     f" {100 * (1 - total_r / total_t):>11.1f}%")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- 3 and 4. LMs on the default corpus

LM = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, train_len=128, batch=16, steps=300, lr=3e-3,
          min_lr=3e-4, warmup=30, weight_decay=0.1, grad_clip=1.0, eval_lengths=(128, 256, 512, 1024),
          eval_tokens=8192, bca_block=128)
QUICK_LM = dict(LM, steps=20, eval_lengths=(128, 256), eval_tokens=1024)


@functools.lru_cache(maxsize=None)
def corpus(vocab_size: int = 512) -> tuple:
    """(train ids, validation ids) of the default corpus, as `python -m nanomodels train` cuts them."""
    text = load_text("pydoc")
    ids = torch.tensor(get_tokenizer("bpe", text, vocab_size).encode(text), dtype=torch.long)
    return train_val_split(ids, 0.1)


@torch.no_grad()
def eval_loss(model, val_ids, length: int, n_tokens: int, longest: int, allowed=None) -> float:
    """Mean next-token loss (nats) over the same n_tokens validation tokens at every `length`: n_tokens // longest
    fixed windows of `longest` tokens, each cut into windows of `length`, the loss averaged over every position."""
    model.eval()
    x, y = get_batch(val_ids, max(1, n_tokens // longest), longest, torch.Generator().manual_seed(0))
    x, y = x.reshape(-1, length), y.reshape(-1, length)
    return statistics.mean(model(x[i:i + 1], y[i:i + 1], allowed=allowed)[1].item() for i in range(x.size(0)))


def lm_run(kind: str, seed: int, cfg: dict = LM) -> dict:
    """Train one LM at length cfg["train_len"] (AdamW, warmup + cosine, the default run's optimizer groups) and
    evaluate it at each of cfg["eval_lengths"]; rope and xpos also with blockwise causal attention."""
    train_ids, val_ids = corpus(cfg["vocab_size"])
    longest = max(cfg["eval_lengths"])
    model = build_lm(kind, vocab_size=cfg["vocab_size"], block_size=longest, d_model=cfg["d_model"],
                     n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], seed=seed)
    schedule = SimpleNamespace(lr=cfg["lr"], min_lr=cfg["min_lr"], warmup=cfg["warmup"], steps=cfg["steps"],
                               weight_decay=cfg["weight_decay"])
    optimizer = make_optimizer(model, schedule, torch.device("cpu"))
    gen = torch.Generator().manual_seed(1000 + seed)
    task = FunctionTask(batch=lambda step: get_batch(train_ids, cfg["batch"], cfg["train_len"], gen), loss=lm_loss)
    start = time.perf_counter()
    losses = fit(model, task, cfg["steps"], optimizer=optimizer, lr=lambda step: lr_at(step, schedule),
                 grad_clip=cfg["grad_clip"])
    train_s = time.perf_counter() - start
    row = {"kind": kind, "seed": seed, "params": model.num_params(), "train_s": train_s,
           "tokens_per_s": cfg["steps"] * cfg["batch"] * cfg["train_len"] / train_s,
           "final_train_loss": statistics.mean(losses[-20:]),
           "val": {str(L): eval_loss(model, val_ids, L, cfg["eval_tokens"], longest) for L in cfg["eval_lengths"]}}
    if kind in ("rope", "xpos"):
        row["val_bca"] = {str(L): eval_loss(model, val_ids, L, cfg["eval_tokens"], longest,
                                            allowed=blockwise_causal_mask(L, cfg["bca_block"]))
                          for L in cfg["eval_lengths"]}
    return row


def lm(seeds, kinds=KINDS, cfg: dict = LM, progress=print) -> list:
    rows = []
    for seed in seeds:
        for kind in kinds:
            r = lm_run(kind, seed, cfg)
            rows.append(r)
            progress(f"{kind:>8} seed {seed}: val " + " ".join(f"{L}:{v:.3f}" for L, v in r["val"].items())
                     + f" | {r['tokens_per_s']:,.0f} tok/s")
    return rows


def throughput(kinds=KINDS, rounds: int = 5, steps: int = 20, cfg: dict = LM, progress=print) -> list:
    """Training tokens/s of each kind, measured in interleaved rounds (kind 1, kind 2, ..., then again), so that a
    change in the shared machine's load falls on every kind alike: one row per (kind, round)."""
    train_ids, _ = corpus(cfg["vocab_size"])
    models = {kind: build_lm(kind, vocab_size=cfg["vocab_size"], block_size=cfg["train_len"], d_model=cfg["d_model"],
                             n_layers=cfg["n_layers"], n_heads=cfg["n_heads"], seed=0) for kind in kinds}
    rows = []
    for r in range(rounds):
        for kind, model in models.items():
            optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["min_lr"])
            gen = torch.Generator().manual_seed(r)
            task = FunctionTask(batch=lambda step: get_batch(train_ids, cfg["batch"], cfg["train_len"], gen))
            fit(model, task, 2, optimizer=optimizer)  # warm-up
            start = time.perf_counter()
            fit(model, task, steps, optimizer=optimizer, grad_clip=cfg["grad_clip"])
            seconds = time.perf_counter() - start
            rows.append({"kind": kind, "round": r, "tokens_per_s": steps * cfg["batch"] * cfg["train_len"] / seconds})
            progress(f"round {r} {kind:>8}: {rows[-1]['tokens_per_s']:,.0f} tokens/s")
    return rows


def spread(values) -> str:
    """mean (min .. max)"""
    return f"{statistics.mean(values):.3f} ({min(values):.3f} .. {max(values):.3f})"


def curves(rows) -> dict:
    """{label: {length: [per-seed perplexity, in seed order]}} for every model and evaluation."""
    out = {}
    for r in sorted(rows, key=lambda r: r["seed"]):
        for key, suffix in (("val", ""), ("val_bca", " + BCA")):
            for L, loss in r.get(key, {}).items():
                out.setdefault(LABELS[r["kind"]] + suffix, {}).setdefault(int(L), []).append(math.exp(loss))
    return out


def ppl_table(rows) -> str:
    """Perplexity per evaluation length: mean (min .. max) over seeds."""
    table = curves(rows)
    lengths = sorted({L for c in table.values() for L in c})
    lines = [f"{'model':>22} | " + " | ".join(f"{'L=' + str(L):>24}" for L in lengths)]
    for label, c in table.items():
        cells = [spread(c[L]) if L in c else "-" for L in lengths]
        lines.append(f"{label:>22} | " + " | ".join(f"{cell:>24}" for cell in cells))
    return "\n".join(lines)


def paired(rows, a: str, b: str, key: str = "val", key_b: str = "val") -> dict:
    """{length: [log-perplexity of a minus b, per seed]} (the seeds both have; a loss difference in nats)."""
    A = {r["seed"]: r for r in rows if r["kind"] == a}
    B = {r["seed"]: r for r in rows if r["kind"] == b}
    seeds = sorted(set(A) & set(B))
    return {int(L): [A[s][key][L] - B[s][key_b][L] for s in seeds] for L in A[seeds[0]][key]} if seeds else {}


def sign(diffs, tol: float = 1e-6) -> str:
    """'equal' (every |difference| < tol), 'lower on every seed', 'higher on every seed' or 'mixed signs'."""
    if all(abs(d) < tol for d in diffs):
        return "equal"
    if all(d < 0 for d in diffs):
        return "lower on every seed"
    if all(d > 0 for d in diffs):
        return "higher on every seed"
    return "mixed signs"


def save(name: str, payload) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def command() -> str:
    """This run's command line, from the repository root (what tests/test_notebooks.py expects of a result)."""
    return "OMP_NUM_THREADS=1 python chapters/retnet_experiments.py " + " ".join(sys.argv[1:])


def machine() -> str:
    return (f"{platform.machine()}, {os.cpu_count()} CPU cores shared with other work, torch {torch.__version__}, "
            f"{torch.get_num_threads()} thread")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    fo = sub.add_parser("forms", help="equality in float64 and time against T of the three forms")
    fo.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096, 8192, 16384])
    fo.add_argument("--repeats", type=int, default=3)
    fo.add_argument("--out", default="ch10_forms.json")
    de = sub.add_parser("decode", help="per-token latency and cache size, RetNet vs KV-cache Transformer")
    de.add_argument("--contexts", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768])
    de.add_argument("--steps", type=int, default=16)
    de.add_argument("--out", default="ch10_decode.json")
    lm_ = sub.add_parser("lm", help="train the four LMs at length 128, evaluate at 128 .. 1024")
    lm_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    lm_.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    lm_.add_argument("--out", default="ch10_lm.json")
    sp = sub.add_parser("speed", help="training tokens/s of the four LMs, interleaved rounds")
    sp.add_argument("--rounds", type=int, default=5)
    sp.add_argument("--steps", type=int, default=20)
    sp.add_argument("--out", default="ch10_speed.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    if args.what == "forms":
        payload = {"agree": forms_agree(), "rows": forms_cost(args.lengths, args.repeats)}
        print(forms_table(payload["rows"]))
    if args.what == "decode":
        payload = {"config": DECODE, "rows": decode(args.contexts, args.steps)}
        print(decode_table(payload["rows"]))
    if args.what == "lm":
        payload = {"config": LM, "rows": lm(args.seeds, args.kinds)}
        print(ppl_table(payload["rows"]))
    if args.what == "speed":
        payload = {"config": LM, "rows": throughput(rounds=args.rounds, steps=args.steps)}
    payload.update(command=command(), machine=machine(), threads=torch.get_num_threads(),
                   seconds=time.perf_counter() - start)
    print("saved", save(args.out, payload))


if __name__ == "__main__":
    main()
