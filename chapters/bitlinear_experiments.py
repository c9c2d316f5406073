"""Chapter 08's experiments: full-precision vs BitNet b1.58 tiny character LMs, the ternary codes over training,
the memory of the weights, and generation with 2-bit packed weights on the CPU.

The data: Python's documentation topics (nanomodels.data.load_text("pydoc"), ~465 KB), one token per character,
the last 10% held out. The model: the core Transformer, 2 layers, 4 heads, T = 32, batches of 16, no biases, an untied
full-precision head; "bit" swaps the body's linear class and the residual in one line:

    Transformer(cfg)                                                   # "fp"
    Transformer(cfg, linear=BitLinear, residual=BitNetResidual)       # "bit": the norm is inside each BitLinear

Training follows the BitNet b1.58 FAQ's recipe, scaled down: AdamW(0.9, 0.95), a linear warmup, then two
stages: the peak learning rate with weight decay 0.1 for the first half, then 2/3 of it (1.5e-3 -> 1e-3 in the
FAQ) decaying linearly to 0, with weight decay 0. BitNet gets a learning rate several times the FP one.

    OMP_NUM_THREADS=1 python chapters/bitlinear_experiments.py sweep --widths 64 128 256 --seeds 0 1 2 \
        --steps 400 --out ch08_sweep.json

Results go to chapters/results/. The notebook (which runs in chapters/) imports this file as
`bitlinear_experiments`; the library code lives in nanomodels/bitlinear.py.
"""

import argparse
import copy
import functools
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from nanomodels.bitlinear import BitLinear, BitNetResidual, TernaryLinear, quantize_weight, to_ternary
from nanomodels.data import get_batch, load_text, train_val_split
from nanomodels.tokenizer import CharTokenizer
from nanomodels.train import FunctionTask, fit
from nanomodels.transformer import Transformer, TransformerConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOY = dict(block_size=32, n_layers=2, n_heads=4, batch_size=16, warmup=30, weight_decay=0.1, eval_every=20,
           eval_batches=4)
LR = {"fp": 2e-3, "bit": 1e-2, "b1": 1e-2}  # BitNet: 5x the FP rate (the FAQ: 1.5e-3 vs 2.5e-4 for LLaMA at 700M)


def corpus():
    """(tokenizer, train ids, val ids): pydoc, character level, the last 10% held out."""
    text = load_text("pydoc")
    tok = CharTokenizer(sorted(set(text)))
    train, val = train_val_split(torch.tensor(tok.encode(text), dtype=torch.long), 0.1)
    return tok, train, val


def build(kind: str, width: int, vocab_size: int, seed: int) -> Transformer:
    cfg = TransformerConfig(vocab_size=vocab_size, block_size=TOY["block_size"], n_layers=TOY["n_layers"],
                            d_model=width, n_heads=TOY["n_heads"], bias=False, tie_weights=False)
    torch.manual_seed(seed)
    if kind == "fp":
        return Transformer(cfg)
    if kind == "bit":
        return Transformer(cfg, linear=BitLinear, residual=BitNetResidual)
    if kind == "b1":  # BitNet b1: binary weights sign(W - mean W) mean|W|, the same activations
        return Transformer(cfg, linear=functools.partial(BitLinear, binary=True), residual=BitNetResidual)
    raise ValueError(f"kind: 'fp', 'bit' or 'b1', got {kind!r}")


def two_stage(step: int, steps: int, lr: float, warmup: int = TOY["warmup"], wd: float = TOY["weight_decay"]):
    """(learning rate, weight decay) at `step`: warmup to lr; stage 1 (first half) lr and wd; stage 2: 2/3 lr
    decaying linearly to 0, weight decay 0."""
    half = steps // 2
    if step < warmup:
        return lr * (step + 1) / warmup, wd
    if step < half:
        return lr, wd
    return lr * 2 / 3 * (steps - step) / (steps - half), 0.0


def code_fractions(model) -> dict:
    """Fractions of -1, 0, +1 over every BitLinear's ternary codes."""
    counts = torch.zeros(3)
    for m in model.modules():
        if isinstance(m, BitLinear):
            codes, _ = quantize_weight(m.weight.detach())
            counts += torch.stack([(codes == v).sum() for v in (-1, 0, 1)]).float()
    total = counts.sum().item()
    return {"-1": counts[0].item() / total, "0": counts[1].item() / total, "+1": counts[2].item() / total}


@torch.no_grad()
def evaluate(model, data, gen_seed: int = 123) -> float:
    model.eval()
    g = torch.Generator().manual_seed(gen_seed)  # the same batches for every model
    losses = [model(*get_batch(data, TOY["batch_size"], TOY["block_size"], g))[1].item()
              for _ in range(TOY["eval_batches"])]
    model.train()
    return sum(losses) / len(losses)


def train_run(kind: str, width: int, seed: int, steps: int, data=None, lr=None) -> dict:
    """One training run; returns its curves and the trained model (under "model")."""
    tok, train, val = data or corpus()
    model = build(kind, width, tok.vocab_size, seed)
    lr = lr or LR[kind]
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]  # matrices only (no norms, no gains)
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay}, {"params": rest, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(1000 + seed)
    run = {"kind": kind, "width": width, "seed": seed, "lr": lr, "steps": steps, "eval_steps": [], "val": [],
           "train": [], "codes": []}
    recent, start = [], time.perf_counter()

    def record(step, loss=None):  # after `step` steps: the validation loss, the mean training loss since the last
        nonlocal recent
        if loss is not None:
            recent.append(loss.item())
        if step % TOY["eval_every"] == 0 or step == steps:
            run["eval_steps"].append(step)
            run["val"].append(evaluate(model, val))
            run["train"].append(sum(recent) / len(recent) if recent else run["val"][-1])
            run["codes"].append(code_fractions(model) if kind == "bit" else None)
            recent = []

    def schedule(step, opt):
        step_lr, wd = two_stage(step, steps, lr)
        opt.param_groups[0].update(lr=step_lr, weight_decay=wd)
        opt.param_groups[1].update(lr=step_lr)

    record(0)
    fit(model, FunctionTask(lambda step: get_batch(train, TOY["batch_size"], TOY["block_size"], g)), steps,
        optimizer=opt, schedule=schedule, on_step=record)
    run["seconds"] = time.perf_counter() - start
    run["model"] = model
    return run


def sweep(widths, seeds, steps, kinds=("fp", "bit"), progress=print, models=None, data=None) -> dict:
    """Every (width, seed, kind) run; the curves in the result, the trained models of the first seed in
    `models` ({(kind, width): model}) when a dict is passed."""
    data = data or corpus()
    out = {"widths": list(widths), "seeds": list(seeds), "steps": steps, "lr": dict(LR), "toy": TOY, "runs": [],
           "threads": torch.get_num_threads(), "torch": torch.__version__}
    start = time.perf_counter()
    for width in widths:
        for seed in seeds:
            for kind in kinds:
                run = train_run(kind, width, seed, steps, data)
                model = run.pop("model")
                if models is not None and seed == seeds[0]:
                    models[(kind, width)] = model
                out["runs"].append(run)
                progress(f"  {kind:>3} d={width:<4} seed {seed}: val {run['val'][-1]:.3f} ({run['seconds']:.0f} s)")
    out["seconds"] = time.perf_counter() - start
    return out


def summary(result: dict) -> list:
    """Per width: mean +- std over seeds of the final val loss (fp, bit), the gap, and the drop of the loss in
    the first 10% of stage 2 against the last 10% of stage 1 (the late drop of the S-curve)."""
    rows = []
    steps = result["steps"]
    for width in result["widths"]:
        row = {"width": width}
        for kind in ("fp", "bit"):
            runs = [r for r in result["runs"] if r["kind"] == kind and r["width"] == width]
            finals = torch.tensor([r["val"][-1] for r in runs])
            row[kind] = (finals.mean().item(), finals.std().item() if len(runs) > 1 else 0.0)

            def at(r, s):  # val loss at the eval step closest to s
                i = min(range(len(r["eval_steps"])), key=lambda j: abs(r["eval_steps"][j] - s))
                return r["val"][i]
            tenth = steps // 10
            row[f"{kind}_drop_stage1"] = sum(at(r, steps // 2 - tenth) - at(r, steps // 2) for r in runs) / len(runs)
            row[f"{kind}_drop_stage2"] = sum(at(r, steps // 2) - at(r, steps // 2 + tenth) for r in runs) / len(runs)
        row["gap"] = row["bit"][0] - row["fp"][0]
        rows.append(row)
    return rows


def linear_weight_memory(model) -> dict:
    """Bytes of the body's linear weights stored as fp32, bf16, int8 and 2-bit (plus one fp32 scale each)."""
    n, layers = 0, 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and m is not getattr(model.head, "proj", None):
            n += m.weight.numel()
            layers += 1
    return {"weights": n, "fp32": 4 * n, "bf16": 2 * n, "int8": n + 4 * layers, "2-bit": n // 4 + 4 * layers}


def checkpoint_bytes(model) -> int:
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    return buf.tell()


def ternary_copy(model, gemm=None):
    """A deep copy whose BitLinears are TernaryLinears (2-bit packed weights, integer matmul by `gemm`)."""
    return to_ternary(copy.deepcopy(model).eval(), gemm)


def tokens_per_second(model, prompt, n_tokens: int, repeats: int = 3) -> tuple:
    """(generated ids, median tokens/s) of greedy decoding with the KV cache."""
    model.eval()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(prompt, n_tokens, temperature=0.0)
        times.append(time.perf_counter() - start)
    return out, n_tokens / sorted(times)[len(times) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("sweep", help="fp vs bit at several widths and seeds")
    s.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    s.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    s.add_argument("--steps", type=int, default=400)
    s.add_argument("--out", default="ch08_sweep.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    result = sweep(args.widths, args.seeds, args.steps)
    result["command"] = "OMP_NUM_THREADS=1 python chapters/bitlinear_experiments.py " + " ".join(sys.argv[1:])
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / args.out).write_text(json.dumps(result))
    for row in summary(result):
        print(f"d={row['width']:<4} fp {row['fp'][0]:.3f} +- {row['fp'][1]:.3f}  bit {row['bit'][0]:.3f} +- "
              f"{row['bit'][1]:.3f}  gap {row['gap']:+.3f}")
    print(f"{result['seconds'] / 60:.1f} min -> {RESULTS / args.out}")


if __name__ == "__main__":
    main()
