"""Load the CUDA C ternary GEMV (kernels/cuda/ternary_gemv.cu) from Python: nvcc builds a shared library, ctypes
calls its host launcher with the tensors' device pointers on torch's current stream (as kernels/cuda_softmax.py).

    y = cuda_ternary_gemv(x_codes, packed, K)    # int8 (K,) x packed uint8 (N, ceil(K/4)) -> int32 (N,), exact

Without a GPU the library still builds and loads; a launch then returns a CUDA error code, raised here.
"""

import ctypes
import functools
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Optional

import torch

from kernels import Benchmark, CudaSpec
from kernels.cuda_softmax import CACHE, nvcc

SOURCE = Path(__file__).parent / "cuda" / "ternary_gemv.cu"


def build(arch: Optional[str] = None) -> Path:
    """Compile ternary_gemv.cu into a shared library for `arch` (default: the current GPU, else sm_80); cached by
    source hash and arch."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA ternary GEMV needs "
                           "the CUDA toolkit")
    if arch is None:
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)
        arch = f"sm_{major}{minor}"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib = CACHE / f"ternary_gemv_{digest}_{arch}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        subprocess.run([compiler, "-O3", f"-arch={arch}", "-Xcompiler", "-fPIC", "-shared", str(SOURCE), "-o",
                        str(tmp)], check=True, capture_output=True, text=True)
        tmp.replace(lib)  # atomic: a concurrent build never sees half a file
    return lib


@functools.lru_cache(maxsize=None)
def load(arch: Optional[str] = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(arch)))
    lib.ternary_gemv_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int,
                                        ctypes.c_int, ctypes.c_void_p]
    lib.ternary_gemv_launch.restype = ctypes.c_int
    lib.ternary_error_string.argtypes = [ctypes.c_int]
    lib.ternary_error_string.restype = ctypes.c_char_p
    return lib


def launch(lib: ctypes.CDLL, w_ptr: int, x_ptr: int, y_ptr: int, n: int, k: int, stream: int) -> None:
    """Call the host launcher; raise RuntimeError with CUDA's message on a nonzero cudaError_t."""
    code = lib.ternary_gemv_launch(w_ptr, x_ptr, y_ptr, n, k, stream)
    if code != 0:
        raise RuntimeError(f"ternary_gemv_launch: CUDA error {code}: {lib.ternary_error_string(code).decode()}")


def cuda_ternary_gemv(x_codes: torch.Tensor, packed: torch.Tensor, K: int) -> torch.Tensor:
    """W x for one int8 activation vector (K,) on the GPU: packed (N, ceil(K/4)) uint8 -> int32 (N,), exact."""
    if not isinstance(x_codes, torch.Tensor) or not x_codes.is_cuda or x_codes.dtype != torch.int8 \
            or tuple(x_codes.shape) != (K,):
        raise ValueError(f"x_codes: an int8 CUDA tensor of shape (K={K},), got {getattr(x_codes, 'dtype', None)} "
                         f"{tuple(getattr(x_codes, 'shape', ()))} on {getattr(x_codes, 'device', '?')}")
    if not isinstance(packed, torch.Tensor) or not packed.is_cuda or packed.dtype != torch.uint8 \
            or packed.dim() != 2 or packed.size(1) != (K + 3) // 4:
        raise ValueError(f"packed: a uint8 CUDA tensor of shape (N, ceil(K/4) = {(K + 3) // 4}), got "
                         f"{getattr(packed, 'dtype', None)} {tuple(getattr(packed, 'shape', ()))}")
    x, w = x_codes.contiguous(), packed.contiguous()
    y = torch.empty(w.size(0), dtype=torch.int32, device=x.device)
    launch(load(), w.data_ptr(), x.data_ptr(), y.data_ptr(), w.size(0), K,
           torch.cuda.current_stream(x.device).cuda_stream)
    return y


AOT_SPECS = [CudaSpec("ternary_gemv.cu", SOURCE, sass=("IDP.4A", "SHFL.BFLY"))]


def _bench_gpu(quick: bool, time_ms) -> list:
    from nanomodels.bitlinear import pack_ternary

    if nvcc() is None:
        return []
    rows = []
    for n, k in [(8192, 8192)] if quick else [(8192, 8192), (20480, 3200), (3200, 10240)]:
        codes = torch.randint(-1, 2, (n, k), dtype=torch.int8, device="cuda")
        packed, x = pack_ternary(codes), torch.randint(-127, 128, (k,), dtype=torch.int8, device="cuda")
        wb, xb = codes.bfloat16(), x.bfloat16()
        for impl, fn, nbytes in (("cuda dp4a 2-bit", lambda: cuda_ternary_gemv(x, packed, k), packed.numel()),
                                 ("torch.mv bf16", lambda: torch.mv(wb, xb), wb.numel() * 2)):
            ms = time_ms(fn)
            rows.append({"impl": impl, "mode": "gemv", "shape": f"{n}x{k}", "case": "-", "ms": ms,
                         "gbs": nbytes / ms / 1e6})
    return rows


BENCHMARKS = [Benchmark("cuda_ternary", gpu=_bench_gpu)]
