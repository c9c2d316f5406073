"""Chapter 06's experiments: what dilated attention costs as T grows, and what it can reach.

scale: time and peak memory of dilated attention against dense attention, 1 thread, one measurement per fresh
process (peak memory = the process's peak resident set after the call minus its resident set with the inputs
allocated). Three methods on q, k, v of shape (1, 1, T, 64), float32, non-causal:
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

Results go to chapters/results/; the chapter (which runs in chapters/) imports this file as `dilated_experiments`.
"""

import argparse
import json
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

from nanomodels.attention import attention
from nanomodels.dilated import dilated_attention, num_score_entries

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
SCALE_PATTERNS = ((256, 512, 1024, 2048), (1, 2, 4, 8))
HEAD_DIM = 64
DENSE_MAX_SCORES = 2 ** 28  # the materialised dense path stops at T = 16K: 1 GiB of float32 scores (x2 with softmax)


def _rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def measure_one(method: str, T: int, repeats: int) -> dict:
    """Time (median over `repeats`, after one warm-up) and extra peak memory of one attention call, here."""
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 1, T, HEAD_DIM, generator=gen) for _ in range(3))
    fn = {"dilated": lambda: dilated_attention(q, k, v, *SCALE_PATTERNS),
          "sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
          "dense": lambda: attention(q, k, v)}[method]
    base = _rss_peak_bytes()
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"method": method, "T": T, "ms": 1e3 * statistics.median(times),
            "peak_mib": (_rss_peak_bytes() - base) / 2 ** 20, "repeats": repeats}


def fits(method: str, T: int) -> bool:
    return method != "dense" or T * T <= DENSE_MAX_SCORES


def scale(lengths, methods=("dilated", "sdpa", "dense"), repeats: int = 3, max_seconds: float = 20.0,
          progress=print) -> list:
    """One fresh process per (method, T). A method stops once one call took over max_seconds (the next, at 2T,
    would take about 4x as long for dense attention) or once it no longer fits (`fits`)."""
    rows, stopped = [], set()
    for T in lengths:
        for method in methods:
            if method in stopped or not fits(method, T):
                continue
            cmd = [sys.executable, str(Path(__file__).resolve()), "one", method, str(T), str(repeats)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True,
                                  env={**os.environ, "OMP_NUM_THREADS": "1"})
            row = json.loads(done.stdout.strip().splitlines()[-1])
            row["score_entries"] = num_score_entries(T, *SCALE_PATTERNS) if method == "dilated" else T * T
            rows.append(row)
            progress(f"T={T:>7} {method:>8}: {row['ms']:9.1f} ms, peak +{row['peak_mib']:8.1f} MiB")
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
            cells.append(f"{r['ms']:>10.1f} {r['peak_mib']:>7.1f}" if r else f"{'-':>10} {'-':>7}")
        ratio = [f"{by[(m, T)]['ms'] / d['ms']:>8.1f}x" if d and (m, T) in by else f"{'-':>9}" for m in ("sdpa", "dense")]
        share = f"{100 * num_score_entries(T, *SCALE_PATTERNS) / T ** 2:>8.2f}"
        lines.append(f"{T:>7} | " + " | ".join(cells) + f" | {ratio[0]} {ratio[1]} | {share}")
    return "\n".join(lines)


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
    args = parser.parse_args(argv)
    if args.what == "one":
        print(json.dumps(measure_one(args.method, args.T, args.repeats)))
        return
    if args.what == "scale":
        rows = scale(args.lengths, repeats=args.repeats)
        print(table(rows))
        print("saved", save(args.out, {"command": " ".join(sys.argv), "machine": machine(), "rows": rows}))


def machine() -> str:
    return f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, 1 thread".strip()


if __name__ == "__main__":
    main()
