"""Load the CPU ternary GEMV/GEMM (kernels/cpu/ternary_gemv.c) through ctypes, and time it against torch.mv.

The C file is built with the system C compiler ($CC, else cc, gcc or clang) into a shared library, cached by
source hash. Without a compiler, `available()` says why and the tests skip with that reason.

    from kernels.cpu_ternary import ternary_gemm_cpu
    y = ternary_gemm_cpu(x_codes, packed, K)     # int8 (M, K) x packed (N, ceil(K/4)) -> int32 (M, N), exact
    TernaryLinear.from_bitlinear(layer, gemm=ternary_gemm_cpu)    # the drop-in integer matmul of a BitLinear
    use_cpu_kernel(to_ternary(model))      # every BitLinear's inference (norm, quant, GEMV, rescale) in one C call

    python -m kernels.cpu_ternary [--n 8192] [--repeats 15]      # the benchmark (1 thread, medians)
"""

import argparse
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Optional

import torch

from kernels import Benchmark

SOURCE = Path(__file__).parent / "cpu" / "ternary_gemv.c"
CACHE = Path(os.environ.get("NANOMODELS_CACHE", Path.home() / ".cache" / "nanomodels")) / "kernels"
VERSIONS = ("avx2", "scalar")


def c_compiler() -> Optional[str]:
    """$CC, else the first of cc, gcc, clang on PATH, or None."""
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def build() -> Path:
    """Compile ternary_gemv.c into a shared library (cached by source hash and machine)."""
    compiler = c_compiler()
    if compiler is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc, clang): the CPU ternary kernel needs one")
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib = CACHE / f"ternary_gemv_{digest}_{platform.machine()}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, "-O3", "-std=c11", "-shared", "-fPIC", str(SOURCE), "-o", str(tmp), "-lm"],
                       check=True, capture_output=True, text=True)
        tmp.replace(lib)  # atomic: a concurrent build never sees half a file
    return lib


@functools.lru_cache(maxsize=None)
def load() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build()))
    args = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    for name in ("ternary_gemm_avx2", "ternary_gemm_scalar"):
        getattr(lib, name).argtypes = args
        getattr(lib, name).restype = None
    lib.ternary_has_avx2.restype = ctypes.c_int
    lib.bitlinear_f32.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_float,
                                  ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64]
    lib.bitlinear_f32.restype = None
    return lib


@functools.lru_cache(maxsize=None)
def available(version: str = "avx2") -> tuple:
    """(True, "") when `version` can run here, else (False, the reason)."""
    if c_compiler() is None:
        return False, "no C compiler found ($CC, cc, gcc, clang)"
    try:
        lib = load()
    except (RuntimeError, OSError, subprocess.CalledProcessError) as err:
        return False, f"building {SOURCE.name} failed: {getattr(err, 'stderr', '') or err}"
    if version == "avx2" and not lib.ternary_has_avx2():
        return False, f"this CPU ({platform.machine()}) has no AVX2"
    return True, ""


def ternary_gemm_cpu(x_codes: torch.Tensor, packed: torch.Tensor, K: int, *, version: str = "avx2") -> torch.Tensor:
    """X_int8 W_tern^T, exact: int8 (M, K) x 2-bit packed uint8 (N, ceil(K/4)) -> int32 (M, N)."""
    if version not in VERSIONS:
        raise ValueError(f"version: one of {VERSIONS}, got {version!r}")
    if not isinstance(x_codes, torch.Tensor) or x_codes.dtype != torch.int8 or x_codes.dim() != 2 \
            or x_codes.size(1) != K or x_codes.is_cuda:
        raise ValueError(f"x_codes: must be a CPU int8 tensor of shape (M, K={K}), got "
                         f"{getattr(x_codes, 'dtype', type(x_codes))} {tuple(getattr(x_codes, 'shape', ()))}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2 \
            or packed.size(1) != (K + 3) // 4 or packed.is_cuda:
        raise ValueError(f"packed: must be a CPU uint8 tensor of shape (N, ceil(K/4) = {(K + 3) // 4}), got "
                         f"{getattr(packed, 'dtype', type(packed))} {tuple(getattr(packed, 'shape', ()))}")
    ok, why = available(version)
    if not ok:
        raise RuntimeError(f"ternary_gemm_cpu({version!r}): {why}")
    x, w = x_codes.contiguous(), packed.contiguous()
    y = torch.empty(x.size(0), w.size(0), dtype=torch.int32)
    fn = load().ternary_gemm_avx2 if version == "avx2" else load().ternary_gemm_scalar
    fn(w.data_ptr(), x.data_ptr(), y.data_ptr(), x.size(0), w.size(0), K)
    return y


def bitlinear_cpu(x: torch.Tensor, layer) -> torch.Tensor:
    """A TernaryLinear's forward in one C call (version 3): RMSNorm, int8 codes, the 2-bit GEMV, the rescales.
    x: float32 CPU (..., in_features) -> float32 (..., out_features)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.is_cuda or x.size(-1) != layer.in_features:
        raise ValueError(f"x: a float32 CPU tensor with last dimension {layer.in_features}, got "
                         f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
    ok, why = available("scalar")
    if not ok:
        raise RuntimeError(f"bitlinear_cpu: {why}")
    rows = x.reshape(-1, layer.in_features).contiguous()
    gain = layer.norm_weight.float().contiguous()
    y = torch.empty(rows.size(0), layer.out_features, dtype=torch.float32)
    load().bitlinear_f32(rows.data_ptr(), gain.data_ptr(), layer.eps, layer.packed.data_ptr(),
                         float(layer.weight_scale), y.data_ptr(), rows.size(0), layer.out_features,
                         layer.in_features)
    y = y.view(*x.shape[:-1], layer.out_features)
    return y if layer.bias is None else y + layer.bias


def use_cpu_kernel(model: torch.nn.Module) -> torch.nn.Module:
    """In place: every TernaryLinear of `model` runs its forward by `bitlinear_cpu` (the same buffers and
    state_dict). Returns the model."""
    from nanomodels.bitlinear import TernaryLinear

    for m in model.modules():
        if isinstance(m, TernaryLinear):
            m.forward = functools.partial(bitlinear_cpu, layer=m)
    return model


def _median_ms(fn, repeats: int) -> float:
    fn()  # warm up (and page in the weights)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def benchmark(n: int = 8192, repeats: int = 15, scalar: bool = True, seed: int = 0) -> dict:
    """Median ms of y = W x at N = K = n on one thread: fp32 torch.mv against the 2-bit packed kernels (int8 x),
    and whether each kernel is exact against an int64 reference."""
    from nanomodels.bitlinear import pack_ternary

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        g = torch.Generator().manual_seed(seed)
        codes = torch.randint(-1, 2, (n, n), generator=g, dtype=torch.int8)
        x = torch.randint(-127, 128, (1, n), generator=g, dtype=torch.int8)
        packed = pack_ternary(codes)
        w32, x32 = codes.float(), x[0].float()
        exact = (codes.to(torch.int64) @ x[0].to(torch.int64)).to(torch.int32)
        result = {"n": n, "repeats": repeats, "torch_mv_fp32_ms": _median_ms(lambda: torch.mv(w32, x32), repeats),
                  "packed_mib": packed.numel() / 2 ** 20, "fp32_mib": w32.numel() * 4 / 2 ** 20}
        for version in VERSIONS if scalar else ("avx2",):
            if available(version)[0]:
                result[f"{version}_ms"] = _median_ms(lambda: ternary_gemm_cpu(x, packed, n, version=version),
                                                     repeats if version == "avx2" else max(3, repeats // 5))
                result[f"{version}_exact"] = bool(torch.equal(ternary_gemm_cpu(x, packed, n, version=version)[0],
                                                              exact))
        if "avx2_ms" in result:
            result["speedup_vs_fp32"] = result["torch_mv_fp32_ms"] / result["avx2_ms"]
        return result
    finally:
        torch.set_num_threads(threads)


def _bench_cpu(quick: bool) -> list:
    """For `python -m kernels.bench` without a GPU: one size (quick) or two, median ms and exactness."""
    rows = []
    for n in (2048,) if quick else (4096, 8192):
        r = benchmark(n, repeats=5 if quick else 15, scalar=False)
        rows.append({"case": f"ternary GEMV {n}x{n} (1 thread)", "torch.mv fp32 ms": r["torch_mv_fp32_ms"],
                     "AVX2 2-bit ms": r.get("avx2_ms", float("nan")),
                     "exact": float(r.get("avx2_exact", float("nan")))})
    return rows


BENCHMARKS = [Benchmark("cpu_ternary", cpu=_bench_cpu)]


def main():
    parser = argparse.ArgumentParser(description="CPU ternary GEMV vs torch.mv fp32, one thread, medians")
    parser.add_argument("--n", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    print(f"{'N=K':>6} {'torch.mv fp32 ms':>17} {'2-bit AVX2 ms':>14} {'speedup':>8} {'2-bit scalar ms':>16} "
          f"{'exact':>6} {'packed MiB':>11}")
    for n in args.n:
        r = benchmark(n, args.repeats)
        print(f"{n:>6} {r['torch_mv_fp32_ms']:>17.2f} {r.get('avx2_ms', float('nan')):>14.3f} "
              f"{r.get('speedup_vs_fp32', float('nan')):>7.1f}x {r.get('scalar_ms', float('nan')):>16.2f} "
              f"{str(r.get('avx2_exact', '-')):>6} {r['packed_mib']:>11.1f}")


if __name__ == "__main__":
    main()
