"""Chapter 07's experiments: dense FFN vs sparse MoE on a memorization task, the aux loss and expert collapse,
linear vs X-MoE routing stability, MH-MoE's expert activation, and dense vs sort-based dispatch cost.

The task: a random second-order Markov chain over |V| = 32 tokens, x_t = table[x_{t-2}, x_{t-1}] with 10% of the
tokens replaced by random ones. Predicting it means memorizing the |V|^2 = 1024-entry table: more feed-forward
parameters help, which is what an MoE adds at equal active FLOPs. The best possible loss is about 0.45 nats
(the random tokens), ln 32 = 3.47 is knowing nothing.

    OMP_NUM_THREADS=1 python chapters/moe_experiments.py train --steps 600 --seeds 0 1 2 --out ch07_train.json
    OMP_NUM_THREADS=1 python chapters/moe_experiments.py dispatch --experts 8 16 32 64 --out ch07_dispatch.json

Results go to chapters/results/. The notebook (run in chapters/) imports this file as `moe_experiments`.
"""

import argparse
import contextlib
import json
import math
import os
import sys
from functools import partial
from pathlib import Path

import torch

from nanomodels.moe import MoE, sorted_dispatch, top_k_gating, top_k_routing
from nanomodels.runtime import median_seconds
from nanomodels.train import FunctionTask, fit
from nanomodels.transformer import MLP, Transformer, TransformerConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TOY = dict(vocab_size=32, block_size=32, n_layers=1, d_model=32, n_heads=2, d_ff=64)
MOE = partial(MoE, num_experts=8, k=1, capacity_factor=1.25, dispatch="sorted")  # the sort-based dispatch: no
# (S, E, C) tensors (same outputs as the einsum, tests/test_moe.py), much cheaper on a CPU (dispatch_benchmark)
VARIANTS = {  # name -> feed-forward part; every MoE has 8 experts of width d_ff (8x the dense parameters)
    "dense": MLP,
    "moe": MOE,
    "moe, no aux loss": partial(MOE, aux_weight=0.0),
    "moe, X-MoE router": partial(MOE, router="xmoe"),
    "mh-moe (h=4)": partial(MOE, heads=4),
}


def markov_table(vocab: int, seed: int = 1234) -> torch.Tensor:
    return torch.randint(0, vocab, (vocab, vocab), generator=torch.Generator().manual_seed(seed))


def batch(table, n: int, seq: int, gen: torch.Generator, noise: float = 0.1):
    """(x, y) of shape (n, seq): the chain and the same shifted by one."""
    vocab = table.size(0)
    s = torch.empty(n, seq + 1, dtype=torch.long)
    s[:, :2] = torch.randint(0, vocab, (n, 2), generator=gen)
    for t in range(2, seq + 1):
        s[:, t] = table[s[:, t - 2], s[:, t - 1]]
        flip = torch.rand(n, generator=gen) < noise
        s[flip, t] = torch.randint(0, vocab, (int(flip.sum()),), generator=gen)
    return s[:, :-1], s[:, 1:]


def moe_layers(model):
    return [m for m in model.modules() if isinstance(m, MoE)]


def total_loss(model, x, y):
    """The LM loss plus aux_weight * aux_loss of each MoE layer (the core adds them)."""
    return model(x, y)[1]


TEMPERATURE_LR = 1e-4


def optimizer(model, lr: float) -> torch.optim.AdamW:
    """AdamW; X-MoE's temperatures get TEMPERATURE_LR. Adam moves each parameter by about its learning rate per
    step, so at lr = 3e-3 a temperature of 0.07 could reach the 1e-4 clamp in about 23 steps."""
    temps = [p for n, p in model.named_parameters() if n.endswith("router.temperature")]
    rest = [p for n, p in model.named_parameters() if not n.endswith("router.temperature")]
    groups = [{"params": rest}] + ([{"params": temps, "lr": TEMPERATURE_LR}] if temps else [])
    return torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)


def train(variant: str, seed: int = 0, steps: int = 600, batch_size: int = 16, lr: float = 3e-3,
          checkpoint_every: int = 50) -> dict:
    """One run: losses, validation loss, expert-usage entropy and routing fluctuation at each checkpoint."""
    torch.manual_seed(seed)
    table = markov_table(TOY["vocab_size"])
    model = Transformer(TransformerConfig(**TOY), ffn=VARIANTS[variant])
    opt = optimizer(model, lr)
    gen = torch.Generator().manual_seed(seed)
    probe = batch(table, 64, TOY["block_size"], torch.Generator().manual_seed(10_000))
    history, previous = [], None

    def checkpoint(step, loss):
        nonlocal previous
        if step % checkpoint_every == 0 or step == steps:
            row = {"step": step, "loss": loss.item(), **probe_routing(model, probe, previous)}
            previous = row.pop("assignment", None)
            history.append(row)

    fit(model, FunctionTask(lambda step: batch(table, batch_size, TOY["block_size"], gen),
                            lambda model, xy: total_loss(model, *xy)), steps, optimizer=opt, on_step=checkpoint)
    return {"variant": variant, "seed": seed, "steps": steps, "val_loss": history[-1]["val_loss"],
            "params": sum(p.numel() for p in model.parameters()), "history": history}


@torch.no_grad()
def probe_routing(model, probe, previous) -> dict:
    """Validation loss on fixed sequences; for an MoE, the usage entropy, the share of probe tokens whose expert
    changed since the last checkpoint (routing fluctuation), the share of experts each sequence uses
    (activation), and the effective rank of the router's input representations."""
    model.eval()
    _, val = model(*probe)
    model.train()
    out = {"val_loss": val.item()}
    layers = moe_layers(model)
    if not layers:
        return out
    layer = layers[0]
    if getattr(layer.router, "temperature", None) is not None:
        out["temperature"] = layer.router.temperature.item()
    hidden = {}
    handle = layer.register_forward_hook(lambda m, inp, _: hidden.setdefault("h", inp[0]))
    layer.eval()
    model(probe[0])
    layer.train()
    handle.remove()
    assignment = layer.last_experts[:, 0].clone()
    B, T = probe[0].shape
    per_seq = layer.last_experts.reshape(B, -1)  # every (sub-)token choice of each sequence
    used = torch.zeros(B, layer.num_experts).scatter_(1, per_seq, 1.0)
    counts = torch.bincount(assignment, minlength=layer.num_experts).double()
    p = counts / counts.sum()
    h = hidden["h"].reshape(-1, hidden["h"].size(-1)).double()
    s = torch.linalg.svdvals(h - h.mean(0))
    q = s / s.sum()
    out.update(entropy=float(-(p[p > 0] * p[p > 0].log()).sum()), assignment=assignment,
               activation=float(used.mean()), effective_rank=float(torch.exp(-(q[q > 0] * q[q > 0].log()).sum())),
               fluctuation=None if previous is None else float((assignment != previous).double().mean()))
    return out


@contextlib.contextmanager
def _quiet_fds():
    """Silence C-level stdout / stderr (the profiler's tracer prints a line at every start and stop)."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(os.devnull, "w") as null:
        os.dup2(null.fileno(), 1)
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


def allocated_bytes(fn) -> int:
    """Bytes the CPU allocator hands out during fn() (the sum over every allocation, frees not subtracted)."""
    with _quiet_fds(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                              profile_memory=True) as prof:
        fn()
    return sum(max(e.self_cpu_memory_usage, 0) for e in prof.key_averages())


def dispatch_benchmark(experts=(8, 16, 32, 64), tokens: int = 2048, d: int = 64, k: int = 2,
                       repeats: int = 5) -> list:
    """Routing + dispatch + combine (identity experts, so only the data movement is timed) of S tokens to E
    experts, top-k, capacity factor 1: the dense (S, E, C) einsum vs the sort-based gather / index_add."""
    rows = []
    for E in experts:
        gen = torch.Generator().manual_seed(E)
        h, logits = torch.randn(tokens, d, generator=gen), torch.randn(tokens, E, generator=gen)
        C = k * math.ceil(tokens / E)
        identity = [torch.nn.Identity()] * E

        def dense():
            combine, dispatch, _ = top_k_gating(logits, k, C)
            x = torch.einsum("sec,sd->ecd", dispatch.to(h.dtype), h)
            return torch.einsum("sec,ecd->sd", combine, x)

        def sort_based():
            return sorted_dispatch(h, top_k_routing(logits, k, C), identity)

        assert torch.allclose(dense(), sort_based(), atol=1e-5)
        rows.append({"experts": E, "capacity": C, "dense_ms": 1e3 * median_seconds(dense, repeats),
                     "sorted_ms": 1e3 * median_seconds(sort_based, repeats), "dense_bytes": allocated_bytes(dense),
                     "sorted_bytes": allocated_bytes(sort_based)})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["train", "dispatch"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--experts", nargs="+", type=int, default=[8, 16, 32, 64])
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.what == "train":
        runs = [train(v, s, args.steps) for v in args.variants for s in args.seeds]
    else:
        runs = dispatch_benchmark(args.experts)
    RESULTS.mkdir(exist_ok=True)
    command = "OMP_NUM_THREADS=1 python chapters/moe_experiments.py " + " ".join(sys.argv[1:] if argv is None
                                                                                 else argv)
    (RESULTS / args.out).write_text(json.dumps({"command": command, "runs": runs}, indent=1))


if __name__ == "__main__":
    main()
