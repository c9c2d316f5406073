"""Chapter 06's experiments: what dilated attention costs as T grows, and what it can reach.

scale: time and peak memory of dilated attention against dense attention, 1 thread, one measurement per fresh
process (peak memory = the process's peak resident set during the calls, reset through /proc/self/clear_refs once
the inputs are allocated, minus its resident set at that point). Three methods on q, k, v of shape (1, 1, T, 64), float32, non-causal:
  dilated  nanomodels.dilated.dilated_attention, patterns w = (256, 512, 1024, 2048), r = (1, 2, 4, 8)
  sdpa     torch's scaled_dot_product_attention (on a CPU a fused kernel that never stores the T x T scores)
  dense    nanomodels.attention.attention, the equation as written: the T x T score matrix is materialised

    OMP_NUM_THREADS=1 python chapters/dilated_experiments.py scale --lengths 1024 2048 4096 8192 16384 32768 \
        65536 131072 --out ch06_scale.json

reach: the long-range toy (reference note E5). A sequence of filler tokens holds one value token at distance D
before the last position, which is a query marker; the model must output the value there. Local attention
(w = 64, r = 1) cannot see past 64 tokens; the dilated mix {(64, 1), (256, 4), (1024, 16)} reaches far in two
layers (layer 1 spreads the value to its neighbours, layer 2 reads one of them through a dilated pattern);
dense attention reaches everything, at quadratic cost.

    OMP_NUM_THREADS=1 python chapters/dilated_experiments.py reach --seeds 0 1 2 --out ch06_reach.json
    OMP_NUM_THREADS=1 python chapters/dilated_experiments.py reach --small --seeds 0 1 2   # T = 241, what the chapter runs

Results go to chapters/results/; the chapter (which runs in chapters/) imports this file as `dilated_experiments`.
"""

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nanomodels.attention import attention, sdpa_attention
from nanomodels.dilated import dilated_attention, longnet, num_score_entries
from nanomodels.runtime import median_seconds
from nanomodels.train import FunctionTask, fit
from nanomodels.transformer import Transformer, TransformerConfig

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCALE_PATTERNS = ((256, 512, 1024, 2048), (1, 2, 4, 8))
HEAD_DIM = 64
DENSE_MAX_SCORES = 2 ** 28  # the materialised dense path stops at T = 16K: 1 GiB of float32 scores (x2 with softmax)


def _reset_peak() -> int:
    """Reset the kernel's peak-RSS counter (Linux: write 5 to /proc/self/clear_refs); return the current RSS."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: the peak since process start stands in (it includes importing torch)
        pass
    return _status_bytes("VmRSS")


def _status_bytes(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux and BSD report KiB


def measure_one(method: str, T: int, repeats: int) -> dict:
    """Time (median over `repeats`, after one warm-up) and extra peak memory of one attention call, here."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, HEAD_DIM, generator=gen) for _ in range(3))
    fn = {"dilated": lambda: dilated_attention(q, k, v, *SCALE_PATTERNS),
          "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
          "dense": lambda: attention(q, k, v)}[method]
    base = _reset_peak()  # inputs allocated; the peak from importing torch no longer counts
    ms = 1e3 * median_seconds(fn, repeats)  # the warm-up call runs after the reset, so the peak counts it
    return {"method": method, "T": T, "ms": ms,
            "peak_mib": (_status_bytes("VmHWM") - base) / 2 ** 20, "repeats": repeats}


def fits(method: str, T: int) -> bool:
    return method != "dense" or T * T <= DENSE_MAX_SCORES


def scale(lengths, methods=("dilated", "sdpa", "dense"), repeats: int = 3, max_seconds: float = 5.0,
          fresh_process: bool = True, progress=print) -> list:
    """One fresh process per (method, T), so that each peak memory is that call's alone (fresh_process=False:
    time only, in this process). A method stops once one call took over max_seconds (the next, at 2T, would
    take about 4x as long for dense attention) or once it no longer fits (`fits`)."""
    rows, stopped = [], set()
    for T in lengths:
        for method in methods:
            if method in stopped or not fits(method, T):
                continue
            if fresh_process:
                cmd = [sys.executable, str(Path(__file__).resolve()), "one", method, str(T), str(repeats)]
                done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
                row = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                row = dict(measure_one(method, T, repeats), peak_mib=None)
            row["score_entries"] = num_score_entries(T, *SCALE_PATTERNS) if method == "dilated" else T * T
            rows.append(row)
            memory = "" if row["peak_mib"] is None else f", peak +{row['peak_mib']:8.1f} MiB"
            progress(f"T={T:>7} {method:>8}: {row['ms']:9.1f} ms{memory}")
            if row["ms"] > 1e3 * max_seconds:
                stopped.add(method)
    return rows


def table(rows) -> str:
    """Aligned text table: per T, each method's time and memory, and the dense/dilated ratios."""
    by = {(r["method"], r["T"]): r for r in rows}
    lines = [f"{'T':>7} | {'dilated ms':>10} {'MiB':>7} | {'sdpa ms':>9} {'MiB':>7} | {'dense ms':>9} {'MiB':>7} |"
             f" {'sdpa/dil':>8} {'dense/dil':>9} | {'scores %':>8}"]
    for T in sorted({r["T"] for r in rows}):
        cells, d = [], by.get(("dilated", T))
        for method in ("dilated", "sdpa", "dense"):
            r = by.get((method, T))
            mib = "-" if r is None or r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
            cells.append(f"{r['ms']:>10.1f} {mib:>7}" if r else f"{'-':>10} {'-':>7}")
        ratio = [f"{by[(m, T)]['ms'] / d['ms']:>8.1f}x" if d and (m, T) in by else f"{'-':>9}" for m in ("sdpa", "dense")]
        share = f"{100 * num_score_entries(T, *SCALE_PATTERNS) / T ** 2:>8.2f}"
        lines.append(f"{T:>7} | " + " | ".join(cells) + f" | {ratio[0]} {ratio[1]} | {share}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- reach: the long-range toy

FILLER, MARKER, FIRST_VALUE = 0, 1, 2
REACH = dict(T=1009, span=16, n_values=16, patterns={"local": ((64,), (1,)),
                                                    "dilated": ((64, 256, 1024), (1, 4, 16)), "dense": None},
             distances=(16, 40, 100, 200, 400, 600, 800, 990), d_model=64, n_heads=4, n_layers=1, batch=16,
             steps=300, lr=3e-3, eval_per_distance=64)
SMALL_REACH = dict(REACH, T=241, span=16, patterns={"local": ((16,), (1,)), "dilated": ((16, 64, 256), (1, 4, 16)),
                                                   "dense": None},
                   distances=(8, 40, 120, 220), steps=150, eval_per_distance=32)


def reach_batch(batch: int, cfg: dict, gen: torch.Generator, distance=None):
    """(x, y): filler sequences of length T with one value written over `span` positions ending D before the last
    position, which holds the query marker; y is -100 except at the marker, where it is the value.
    D is drawn log-uniformly from [1, T - span] unless given (short and long distances equally often)."""
    T, span = cfg["T"], cfg["span"]
    x = torch.full((batch, T), FILLER, dtype=torch.long)
    y = torch.full((batch, T), -100, dtype=torch.long)
    values = torch.randint(FIRST_VALUE, FIRST_VALUE + cfg["n_values"], (batch,), generator=gen)
    if distance is None:
        u = torch.rand(batch, generator=gen, dtype=torch.float64)
        d = torch.exp(u * math.log(T - span)).long().clamp(1, T - span)
    else:
        d = torch.full((batch,), distance)
    for i in range(batch):
        end = T - 1 - int(d[i])  # the last copy of the value
        x[i, end - span + 1:end + 1] = values[i]
    x[:, -1] = MARKER
    y[:, -1] = values
    return x, y


def reach_model(kind: str, cfg: dict, seed: int) -> Transformer:
    """The same tiny model for every kind; only the attention part differs (the one-line swap)."""
    torch.manual_seed(seed)
    config = TransformerConfig(vocab_size=FIRST_VALUE + cfg["n_values"], block_size=cfg["T"],
                               n_layers=cfg["n_layers"], d_model=cfg["d_model"], n_heads=cfg["n_heads"])
    patterns = cfg["patterns"][kind]
    if patterns is None:
        return Transformer(config, attention_fn=sdpa_attention)
    return Transformer(config, attention=longnet(*patterns))


def reach_run(kind: str, seed: int, cfg: dict = REACH, progress=None) -> dict:
    """Train one model on the toy; exact match at the marker for each distance in cfg["distances"]."""
    model = reach_model(kind, cfg, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=0.0)
    gen = torch.Generator().manual_seed(1000 + seed)
    def report(done, loss):
        if progress and done % 50 == 0:
            progress(f"{kind} seed {seed}: step {done} loss {loss.item():.3f}")

    start = time.perf_counter()
    losses = fit(model, FunctionTask(lambda step: reach_batch(cfg["batch"], cfg, gen)), cfg["steps"], optimizer=opt,
                 on_step=report)
    train_s = time.perf_counter() - start
    eval_gen = torch.Generator().manual_seed(99)
    accuracy = {}
    with torch.no_grad():
        for d in cfg["distances"]:
            x, y = reach_batch(cfg["eval_per_distance"], cfg, eval_gen, distance=d)
            logits, _ = model(x)
            accuracy[d] = (logits[:, -1].argmax(-1) == y[:, -1]).float().mean().item()
    return {"kind": kind, "seed": seed, "accuracy": accuracy, "final_loss": sum(losses[-20:]) / len(losses[-20:]),
            "train_s": train_s}


def reach(seeds, kinds=("local", "dilated", "dense"), cfg: dict = REACH, progress=print) -> list:
    return [reach_run(kind, seed, cfg, progress) for seed in seeds for kind in kinds]


def reach_table(rows, distances) -> str:
    """Exact match per distance D: mean over seeds (min-max), per kind."""
    lines = [f"{'attention':>10} | " + " ".join(f"{'D=' + str(d):>13}" for d in distances) + " | train s"]
    for kind in dict.fromkeys(r["kind"] for r in rows):
        mine = [r for r in rows if r["kind"] == kind]
        cells = []
        for d in distances:
            accs = [r["accuracy"][d] if d in r["accuracy"] else r["accuracy"][str(d)] for r in mine]
            cells.append(f"{statistics.mean(accs):>5.2f} ({min(accs):.2f}-{max(accs):.2f})")
        lines.append(f"{kind:>10} | " + " ".join(cells) + f" | {statistics.median(r['train_s'] for r in mine):7.1f}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- sequence parallel: bytes per rank

def _comm_worker(rank, world, port, chunk, patterns, path):
    import torch.distributed as dist

    from nanomodels.dilated_parallel import sequence_parallel_dilated_attention

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 4, world * chunk, 8, generator=g, dtype=torch.float64) for _ in range(3))
    mine = slice(rank * chunk, (rank + 1) * chunk)
    stats = {}
    out = sequence_parallel_dilated_attention(q[:, :, mine], k[:, :, mine], v[:, :, mine], *patterns, causal=True,
                                              stats=stats)
    err = (out - dilated_attention(q, k, v, *patterns, causal=True)[:, :, mine]).abs().max().item()
    dist.destroy_process_group()
    Path(f"{path}.{rank}").write_text(json.dumps({"bytes": stats.get("bytes_received", 0), "err": err}))


def _communication_here(world_sizes, chunk: int, patterns) -> list:
    import socket
    import tempfile

    import torch.multiprocessing as mp

    rows = []
    for world in world_sizes:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_comm_worker, args=(world, port, chunk, patterns, f"{tmp}/r"), nprocs=world, join=True)
            ranks = [json.loads(Path(f"{tmp}/r.{r}").read_text()) for r in range(world)]
        rows.append({"world": world, "T": world * chunk, "max_bytes": max(r["bytes"] for r in ranks),
                     "max_err": max(r["err"] for r in ranks)})
    return rows


def communication(world_sizes, chunk: int = 16, patterns=((16, 32, 64), (1, 2, 4))) -> list:
    """Sequence-parallel dilated attention (causal) on P processes over gloo, each holding `chunk` positions,
    T = P chunk: the bytes each rank receives, and the largest difference from one process on the whole sequence.
    Runs in a child process (`comm` below), so that a notebook or script calling it is never re-imported."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "comm", "--chunk", str(chunk),
           "--segment_lengths", *map(str, patterns[0]), "--dilation_rates", *map(str, patterns[1]),
           "--world_sizes", *map(str, world_sizes)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(done.stdout.strip().splitlines()[-1])


def save(name: str, payload) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / name
    path.write_text(json.dumps(payload, indent=1))
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    one = sub.add_parser("one", help="one measurement in this process (used by scale)")
    one.add_argument("method", choices=["dilated", "sdpa", "dense"])
    one.add_argument("T", type=int)
    one.add_argument("repeats", type=int)
    sc = sub.add_parser("scale", help="time and peak memory against T")
    sc.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072])
    sc.add_argument("--repeats", type=int, default=3)
    sc.add_argument("--out", default="ch06_scale.json")
    co = sub.add_parser("comm", help="bytes per rank of sequence-parallel dilated attention (prints JSON)")
    co.add_argument("--world_sizes", type=int, nargs="+", default=[1, 2, 4, 8])
    co.add_argument("--chunk", type=int, default=16)
    co.add_argument("--segment_lengths", type=int, nargs="+", default=[16, 32, 64])
    co.add_argument("--dilation_rates", type=int, nargs="+", default=[1, 2, 4])
    re_ = sub.add_parser("reach", help="the long-range toy: exact match per distance")
    re_.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    re_.add_argument("--kinds", nargs="+", default=["local", "dilated", "dense"])
    re_.add_argument("--small", action="store_true", help="the small configuration (T = 241) the chapter runs")
    re_.add_argument("--out", default="ch06_reach.json")
    args = parser.parse_args(argv)
    if args.what == "one":
        print(json.dumps(measure_one(args.method, args.T, args.repeats)))
        return
    if args.what == "scale":
        rows = scale(args.lengths, repeats=args.repeats)
        print(table(rows))
        print("saved", save(args.out, {"command": command(), "machine": machine(), "rows": rows}))
    if args.what == "comm":
        print(json.dumps(_communication_here(args.world_sizes, args.chunk, (args.segment_lengths, args.dilation_rates))))
    if args.what == "reach":
        torch.set_num_threads(1)
        cfg = SMALL_REACH if args.small else REACH
        rows = reach(args.seeds, args.kinds, cfg)
        print(reach_table(rows, cfg["distances"]))
        payload = {"command": command(), "machine": machine(), "config": {**cfg, "patterns": {
            k: v for k, v in cfg["patterns"].items()}}, "rows": rows}
        print("saved", save(args.out, payload))


def command() -> str:
    """This run's command line, from the repository root (what tests/test_notebooks.py expects of a result)."""
    return "OMP_NUM_THREADS=1 python chapters/dilated_experiments.py " + " ".join(sys.argv[1:])


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, 1 thread".strip()


if __name__ == "__main__":
    main()
