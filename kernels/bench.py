"""Benchmark the kernels against PyTorch, or, without a GPU, check them.

    python -m kernels.bench                  # on a GPU: the full table (minutes); --quick: one shape each
    python -m kernels.bench --only softmax   # some kernel modules

What runs comes from the registry: every module in kernels.KERNEL_MODULES lists Benchmark entries in its
BENCHMARKS (see kernels/__init__.py and kernels/README.md, "Adding a kernel").

On a CUDA device each benchmark's `gpu` function returns timed rows: attention in TFLOP/s (forward 4 B H N^2 D,
half that for causal; forward + backward 3.5x the forward), row kernels in GB/s (bytes read and written).
Each rate is also shown as a percentage of a peak measured on the same device in the same run: a bf16 GEMM for
TFLOP/s, a device-to-device copy for GB/s. Timings are medians of triton.testing.do_bench (it flushes the L2
cache between runs).

On a CPU there is nothing meaningful to time (the interpreter's speed says nothing about a GPU): the script
says so and runs each benchmark's `cpu` function instead: correctness sweeps against the float64 references
and facts that do not depend on the hardware (the tiles a mask skips).
"""

import argparse

import torch

import kernels
from kernels.flash_attention import correctness_sweep, print_sweep, tile_fractions, visible_fraction  # noqa: F401
# (chapter 01 imports the four names above from here)


def time_ms(fn, grads=None) -> float:
    """Median milliseconds of fn() on the GPU (triton.testing.do_bench flushes the L2 cache between runs)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def measure_peaks(quick: bool = False) -> dict:
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * n**3 / time_ms(lambda: a @ b) / 1e9
    src = torch.empty(2**28, device="cuda", dtype=torch.uint8)  # 256 MiB, far larger than L2
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() / time_ms(lambda: dst.copy_(src)) / 1e6
    return {"gemm_tflops": tflops, "copy_gbs": gbs, "gemm_n": n}


def benchmarks(modules=None) -> list:
    """[(module name, Benchmark)] from the registry; a module that fails to import is reported and skipped."""
    found = []
    for name in modules or kernels.KERNEL_MODULES:
        try:
            module = kernels.kernel_module(name)
        except Exception as e:  # a broken kernel file must not hide the other benchmarks
            print(f"skipped kernels.{name}: it does not import ({type(e).__name__}: {e})")
            continue
        found += [(name, b) for b in getattr(module, "BENCHMARKS", ())]
    return found


def gpu_benchmark(quick: bool = False, modules=None) -> list:
    peak = measure_peaks(quick)
    print(f"device: {torch.cuda.get_device_name()}; measured peaks: bf16 GEMM {peak['gemm_n']}^3 "
          f"{peak['gemm_tflops']:.0f} TFLOP/s, device copy {peak['copy_gbs']:.0f} GB/s (read + write)")
    print(f"{'kernel':<16} {'impl':<28} {'mode':<8} {'shape':<26} {'case':<20} {'ms':>9} {'rate':>14} {'% peak':>7}")
    rows = []
    for _, bench in benchmarks(modules):
        if bench.gpu is None:
            continue
        for r in bench.gpu(quick, time_ms):
            if "tflops" in r:
                rate, pct = f"{r['tflops']:.1f} TFLOP/s", 100 * r["tflops"] / peak["gemm_tflops"]
            else:
                rate, pct = f"{r['gbs']:.0f} GB/s", 100 * r["gbs"] / peak["copy_gbs"]
            r = {"kernel": bench.name, **r, "pct_peak": pct}
            print(f"{r['kernel']:<16} {r['impl']:<28} {r['mode']:<8} {r['shape']:<26} {r['case']:<20} "
                  f"{r['ms']:>9.3f} {rate:>14} {pct:>6.1f}%", flush=True)
            rows.append(r)
    return rows


def cpu_checks(quick: bool = False, modules=None) -> list:
    """Each benchmark's cpu rows, printed as tables (one header per set of metrics)."""
    rows = []
    for _, bench in benchmarks(modules):
        if bench.cpu is None:
            continue
        print(f"\n{bench.name}")
        header = None
        try:
            checked = bench.cpu(quick)
        except Exception as e:  # e.g. Triton 3.6's interpreter under numpy 2: say so, go on with the others
            print(f"  could not run: {type(e).__name__}: {e}")
            rows.append({"kernel": bench.name, "case": "error", "error": repr(e)})
            continue
        for r in checked:
            metrics = [k for k in r if k != "case"]
            if metrics != header:
                header = metrics
                print(f"  {'case':<36} " + " ".join(f"{m:>14}" for m in metrics))
            print(f"  {r['case']:<36} " + " ".join(f"{r[m]:>14.3g}" for m in metrics), flush=True)
            rows.append({"kernel": bench.name, **r})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per kernel (a smoke test)")
    parser.add_argument("--only", nargs="+", choices=kernels.KERNEL_MODULES, help="these kernel modules only")
    args = parser.parse_args(argv)
    if torch.cuda.is_available() and not kernels.INTERPRET:
        gpu_benchmark(args.quick, args.only)
        return
    print("GPU timings unavailable: no CUDA device here (or TRITON_INTERPRET=1). Interpreter speed says nothing "
          "about a GPU,\nso this runs each kernel's CPU checks instead (errors: max |kernel - float64 reference|).")
    failed = [r["kernel"] for r in cpu_checks(args.quick, args.only) if "error" in r]
    print("\nOn a GPU machine the same command prints the timing table instead.")
    if failed:
        raise SystemExit(f"the CPU checks of {', '.join(failed)} could not run (see above)")


if __name__ == "__main__":
    main()
