"""Chapter 04's experiments (chapter 05 reuses them): Post-LN vs Pre-LN vs DeepNorm (vs Sub-LN) on a tiny synthetic
LM, no warmup.

The task: x_t = (x_{t-2} + 1) mod |V| ("lag2"), with 10% of the tokens replaced by random ones; a decoder-only
LM predicts the next token. It needs one attention hop (two positions back) and a lookup, so a stable model
learns it within a few hundred steps at width 32. (reference/03 §6 uses x_t = (x_{t-1} + x_{t-2}) mod |V|,
rule="fib"; in pilot runs at width 32 no variant got below 2.47 nats on it within 300 steps.) ln|V| = 3.47 is the loss
of a model that learned nothing; the best possible loss is about 0.65 nats (the random tokens are unpredictable).

    OMP_NUM_THREADS=1 python chapters/deepnet_experiments.py sweep --depths 12 24 48 \
        --variants post pre deepnorm post-gpt2 --seeds 0 1 2 --steps 300 --out ch04_sweep.json
    OMP_NUM_THREADS=1 python chapters/deepnet_experiments.py sweep --depths 12 24 48 \
        --variants post --seeds 0 1 2 3 4 --steps 300 --out ch04_sweep_post.json
    OMP_NUM_THREADS=1 python chapters/deepnet_experiments.py sweep --depths 12 24 48 \
        --variants pre deepnorm post-gpt2 --seeds 3 4 --steps 300 --out ch04_sweep_s34.json
    OMP_NUM_THREADS=1 python chapters/deepnet_experiments.py deep --depths 200 --variants deepnorm post --seeds 0 \
        --steps 300 --out ch04_deep.json

The first sweep ran before subnormal flushing was added (below); the second redoes Post-LN with it for all five seeds
(its near-stalled runs change), the third adds seeds 3 and 4 of the other variants, whose finals do not change with it.
Results go to chapters/results/. The chapter notebooks (which run in chapters/) import these helpers as
`deepnet_experiments`; the library code itself lives in nanomodels/.
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from nanomodels.deepnet import deepnet, deepnorm_init_
from nanomodels.subln import magneto
from nanomodels.train import FunctionTask, fit
from nanomodels.transformer import PostNorm, PreNorm, Transformer, TransformerConfig

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
VARIANTS = ("post", "pre", "deepnorm", "subln", "post-gpt2")
LABELS = {"post": "Post-LN", "pre": "Pre-LN", "deepnorm": "DeepNorm", "subln": "Sub-LN (Magneto)",
          "post-gpt2": "Post-LN, GPT-2 init"}
TOY = dict(vocab_size=32, block_size=32, d_model=32, n_heads=4, d_ff=64, batch_size=16, rule="lag2")


def fib_batch(batch: int, seq: int, vocab: int, gen: torch.Generator, noise: float = 0.1, rule: str = "fib"):
    """(x, y), both (batch, seq): a noisy Fibonacci-mod-|V| sequence and the same shifted by one.
    rule="lag2": x_t = (x_{t-2} + 1) mod |V| instead (one attention hop, learned faster)."""
    s = torch.empty(batch, seq + 1, dtype=torch.long)
    s[:, :2] = torch.randint(0, vocab, (batch, 2), generator=gen)
    for t in range(2, seq + 1):
        s[:, t] = (s[:, t - 1] + s[:, t - 2]) % vocab if rule == "fib" else (s[:, t - 2] + 1) % vocab
        flip = torch.rand(batch, generator=gen) < noise
        s[flip, t] = torch.randint(0, vocab, (int(flip.sum()),), generator=gen)
    return s[:, :-1], s[:, 1:]


def build(variant: str, n_layers: int, seed: int, toy: dict = TOY) -> Transformer:
    """The same core Transformer with one part swapped. Every variant starts from xavier normal init (the
    paper's setting): gain 1 for Post-LN and Pre-LN (= `deepnorm_init_` with beta = 1), gain beta for DeepNorm,
    gain gamma for Sub-LN. "post-gpt2" is Post-LN with the core's GPT-2 init (std 0.02, 1/sqrt(2N) on out_proj
    and fc2) instead: a small init that is itself a down-scaling of the branches."""
    cfg = TransformerConfig(vocab_size=toy["vocab_size"], block_size=toy["block_size"], n_layers=n_layers,
                            d_model=toy["d_model"], n_heads=toy["n_heads"], d_ff=toy["d_ff"])
    torch.manual_seed(seed)
    if variant == "post":
        return deepnorm_init_(Transformer(cfg, residual=PostNorm, final_norm=None), 1.0)
    if variant == "post-gpt2":
        return Transformer(cfg, residual=PostNorm, final_norm=None)
    if variant == "pre":
        return deepnorm_init_(Transformer(cfg, residual=PreNorm), 1.0)
    if variant == "deepnorm":
        return deepnet(cfg)
    if variant == "subln":
        return magneto(cfg)
    raise ValueError(f"variant: must be one of {VARIANTS}, got {variant!r}")


def train_run(variant: str, n_layers: int, lr: float, seed: int, steps: int, toy: dict = TOY) -> dict:
    """Adam(0.9, 0.98) at a constant lr, no warmup, no clipping. Stops early once the loss is NaN."""
    model = build(variant, n_layers, seed, toy)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(1000 + seed)
    batches = FunctionTask(lambda step: fib_batch(toy["batch_size"], toy["block_size"], toy["vocab_size"], gen,
                                                  rule=toy["rule"]))
    start = time.perf_counter()
    losses = fit(model, batches, steps, optimizer=opt, on_step=lambda done, loss: not math.isfinite(loss.item()))
    seconds = time.perf_counter() - start
    return {"variant": variant, "n_layers": n_layers, "lr": lr, "seed": seed, "steps": steps, "losses": losses,
            "seconds": seconds, "sec_per_step": seconds / len(losses), "final": final_loss(losses, steps)}


def final_loss(losses: list, steps: int, window: int = 10) -> float:
    """Mean of the last `window` losses; NaN if the run diverged (non-finite loss) before `steps`."""
    if len(losses) < steps or not all(math.isfinite(v) for v in losses[-window:]):
        return float("nan")
    return sum(losses[-window:]) / window


def verdict(final: float, vocab: int = TOY["vocab_size"]) -> str:
    """'trains': final loss at least 1 nat below ln|V|; 'diverges': NaN or above ln|V| + 0.5; else 'stalls'."""
    if not math.isfinite(final) or final > math.log(vocab) + 0.5:
        return "diverges"
    return "trains" if final < math.log(vocab) - 1.0 else "stalls"


def early_update(variant: str, n_layers: int, lr: float, seed: int, steps: int = 10, toy: dict = TOY) -> dict:
    """The paper's diagnostics over the first `steps` Adam steps (constant lr, no warmup):

    update:      ||F(x; theta_t) - F(x; theta_0)|| / ||F(x; theta_0)||, F = the logits on a fixed batch;
    grad_ratio:  ||dL/dW_1|| of the first block / of the last block, at step 0 and at step t (a vanishing
                 gradient in the bottom layers shows as a ratio near 0).
    """
    model = build(variant, n_layers, seed, toy)
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(1000 + seed)
    probe, _ = fib_batch(toy["batch_size"], toy["block_size"], toy["vocab_size"], torch.Generator().manual_seed(7),
                         rule=toy["rule"])
    with torch.no_grad():
        before = model(probe)[0]
    ratios = []
    for step in range(steps + 1):
        x, y = fib_batch(toy["batch_size"], toy["block_size"], toy["vocab_size"], gen, rule=toy["rule"])
        opt.zero_grad(set_to_none=True)
        model(x, y)[1].backward()
        if step in (0, steps):
            first, last = model.blocks[0].ffn.fc1.weight.grad, model.blocks[-1].ffn.fc1.weight.grad
            ratios.append(float(first.norm() / last.norm()))
        if step < steps:
            opt.step()
    with torch.no_grad():
        after = model(probe)[0]
    return {"update": float((after - before).norm() / before.norm()), "grad_ratio_0": ratios[0],
            "grad_ratio_t": ratios[1]}


def _save(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["sweep", "deep", "lr"], help="a label stored with the results")
    parser.add_argument("--depths", type=int, nargs="+", default=[12, 24, 48])
    parser.add_argument("--variants", nargs="+", default=["post", "pre", "deepnorm"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # a stalled deep Post-LN has gradients in the subnormal range, which x86 CPUs process ~100x slower: flush them
    # to zero (it changes nothing visible in the losses, and only the speed of the stalled runs)
    torch.set_flush_denormal(True)
    runs, start = [], time.perf_counter()
    for depth in args.depths:
        for lr in args.lrs:
            for variant in args.variants:
                for seed in args.seeds:
                    r = train_run(variant, depth, lr, seed, args.steps)
                    runs.append(r)
                    print(f"{LABELS[variant]:<18} N={depth:<4} lr={lr:<7g} seed={seed} final={r['final']:.3f} "
                          f"({verdict(r['final'])}, {r['sec_per_step'] * 1e3:.0f} ms/step)", flush=True)
    out = args.out or f"ch04_{args.what}.json"
    cmd = f"OMP_NUM_THREADS=1 python {os.path.relpath(sys.argv[0], ROOT)} " + " ".join(sys.argv[1:])
    path = _save(out, {"command": cmd, "toy": TOY, "steps": args.steps, "seconds": time.perf_counter() - start,
                       "torch": torch.__version__, "threads": torch.get_num_threads(), "flush_denormal": True,
                       "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
