"""Load the CUDA C row softmax (kernels/cuda/softmax.cu) from Python: nvcc builds a shared library, ctypes calls
its host launcher with the tensors' device pointers on torch's current stream.

The .cu file is torch-free `extern "C"` code: it compiles in about a second with plain nvcc, where a torch
extension (torch/extension.h, load_inline) costs minutes and does not build at all against a CPU torch.
Without a GPU the library still builds and loads; launching then returns a CUDA error code, raised here.
"""

import ctypes
from pathlib import Path

import torch

from kernels import Benchmark, CudaSpec, cuda_build
from kernels.cuda_build import nvcc

SOURCE = Path(__file__).parent / "cuda" / "softmax.cu"
_INT, _PTR = ctypes.c_int, ctypes.c_void_p


# softmax_rows_launch(x, y, n_rows, n_cols, version, stream) -> cudaError_t
LIBRARY = cuda_build.CudaLibrary(SOURCE, "softmax_rows_launch", [_PTR, _PTR, _INT, _INT, _INT, _PTR],
                                 "softmax_error_string")
build, load = LIBRARY.build, LIBRARY.load


def cuda_softmax(x: torch.Tensor, *, version: int = 2) -> torch.Tensor:
    """Softmax over the last dimension of a float32 CUDA tensor with kernel `version` 1 (two reductions) or 2
    (online, one read for both statistics)."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32 or x.dim() < 1 or x.numel() == 0:
        raise ValueError(f"x: the CUDA C softmax takes a non-empty float32 tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if x.device.type != "cuda":
        raise ValueError(f"x: must be on a CUDA device (the kernel reads it through a device pointer), got a tensor "
                         f"on {x.device}; use kernels.softmax.softmax or torch.softmax there")
    if x.size(-1) > 2**31 - 1 or x.numel() // x.size(-1) > 2**31 - 1:
        raise ValueError(f"x: rows and columns must each fit in a C int (< 2**31), got shape {tuple(x.shape)}")
    if version not in (1, 2):
        raise ValueError(f"version: 1 (two reductions) or 2 (online), got {version}")
    rows = x.reshape(-1, x.size(-1)).contiguous()
    y = torch.empty_like(rows)
    with cuda_build.on_device(x) as stream:  # launch on x's GPU, not the current one, and on that GPU's stream
        LIBRARY.launch(rows.data_ptr(), y.data_ptr(), rows.size(0), rows.size(1), version, stream)
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
