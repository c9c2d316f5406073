"""Load the CUDA C row softmax (kernels/cuda/softmax.cu) from Python: nvcc builds a shared library, ctypes calls
its host launcher with the tensors' device pointers on torch's current stream.

The .cu file is torch-free `extern "C"` code: it compiles in about a second with plain nvcc, where a torch
extension (torch/extension.h, load_inline) costs minutes and does not build at all against a CPU torch.
Without a GPU the library still builds and loads; launching then returns a CUDA error code, raised here.
"""

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

from kernels import Benchmark, CudaSpec

SOURCE = Path(__file__).parent / "cuda" / "softmax.cu"
CACHE = Path(os.environ.get("NANOMODELS_CACHE", Path.home() / ".cache" / "nanomodels")) / "kernels"


def nvcc() -> Optional[str]:
    """Path of nvcc (PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin), or None."""
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and home and (Path(home) / "bin" / "nvcc").exists():
            found = str(Path(home) / "bin" / "nvcc")
    return found


def build(arch: Optional[str] = None) -> Path:
    """Compile softmax.cu into a shared library for `arch` (e.g. "sm_90"; default: the current GPU, else sm_80).
    Cached by source hash and arch."""
    compiler = nvcc()
    if compiler is None:
        raise RuntimeError("nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): the CUDA softmax needs the "
                           "CUDA toolkit")
    if arch is None:
        major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)
        arch = f"sm_{major}{minor}"
    digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]
    lib = CACHE / f"softmax_{digest}_{arch}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        out = subprocess.run([compiler, "-O3", f"-arch={arch}", "-Xcompiler", "-fPIC", "-shared", str(SOURCE), "-o",
                              str(tmp)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"nvcc failed to build {SOURCE.name} for {arch} (exit {out.returncode}):\n"
                               f"{(out.stderr or out.stdout).strip()}")
        tmp.replace(lib)  # atomic: a concurrent build never sees half a file
    return lib


@functools.lru_cache(maxsize=None)
def load(arch: Optional[str] = None) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(arch)))
    lib.softmax_rows_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                        ctypes.c_void_p]
    lib.softmax_rows_launch.restype = ctypes.c_int
    lib.softmax_error_string.argtypes = [ctypes.c_int]
    lib.softmax_error_string.restype = ctypes.c_char_p
    return lib


def launch(lib: ctypes.CDLL, x_ptr: int, y_ptr: int, n_rows: int, n_cols: int, version: int, stream: int) -> None:
    """Call the host launcher; raise RuntimeError with CUDA's message on a nonzero cudaError_t."""
    code = lib.softmax_rows_launch(x_ptr, y_ptr, n_rows, n_cols, version, stream)
    if code != 0:
        raise RuntimeError(f"softmax_rows_launch: CUDA error {code}: {lib.softmax_error_string(code).decode()}")


def cuda_softmax(x: torch.Tensor, *, version: int = 2) -> torch.Tensor:
    """Softmax over the last dimension of a float32 CUDA tensor with kernel `version` 1 (two reductions) or 2
    (online, one read for both statistics)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x: the CUDA C softmax takes a non-empty float32 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if x.device.type != "cuda":
        raise ValueError(f"x: must be on a CUDA device (the kernel reads it through a device pointer), got a tensor "
                         f"on {x.device}; use kernels.softmax.softmax or torch.softmax there")
    if version not in (1, 2):
        raise ValueError(f"version: 1 (two reductions) or 2 (online), got {version}")
    rows = x.reshape(-1, x.size(-1)).contiguous()
    y = torch.empty_like(rows)
    with torch.cuda.device(x.device):  # launch on x's GPU, not the current one, and on that GPU's stream
        launch(load(), rows.data_ptr(), y.data_ptr(), rows.size(0), rows.size(1), version,
               torch.cuda.current_stream(x.device).cuda_stream)
    return y.view(x.shape)


# ----------------------------------------------------------------------------- registry

AOT_SPECS = [CudaSpec("softmax.cu", SOURCE, sass=("SHFL.BFLY",))]


def _bench_gpu(quick: bool, time_ms) -> list:
    if nvcc() is None:
        return []
    x = torch.randn(4096, 4096, device="cuda")
    rows = []
    for version, impl in ((1, "CUDA C v1 (two reductions)"), (2, "CUDA C v2 (online)")):
        ms = time_ms(lambda: cuda_softmax(x, version=version))
        rows.append({"impl": impl, "mode": "fwd", "shape": "4096x4096 float32", "case": "-", "ms": ms,
                     "gbs": 2 * x.numel() * x.element_size() / ms / 1e6})
    return rows


BENCHMARKS = [Benchmark("cuda_softmax", gpu=_bench_gpu)]
