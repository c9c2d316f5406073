"""Load the CUDA C ternary GEMV (kernels/cuda/ternary_gemv.cu) from Python: nvcc builds a shared library, ctypes
calls its host launcher with the tensors' device pointers on torch's current stream (as kernels/cuda_softmax.py).

    y = cuda_ternary_gemv(x_codes, packed, K)    # int8 (K,) x packed uint8 (N, ceil(K/4)) -> int32 (N,), exact

Without a GPU the library still builds and loads; a launch then returns a CUDA error code, raised here.
"""

import ctypes
from pathlib import Path

import torch

from kernels import Benchmark, CudaSpec, cuda_build
from kernels.bitnet import check_packed
from kernels.cuda_build import nvcc

SOURCE = Path(__file__).parent / "cuda" / "ternary_gemv.cu"
_INT, _PTR = ctypes.c_int, ctypes.c_void_p


# ternary_gemv_launch(w, x, y, n, k, stream) -> cudaError_t
LIBRARY = cuda_build.CudaLibrary(SOURCE, "ternary_gemv_launch", [_PTR, _PTR, _PTR, _INT, _INT, _PTR],
                                 "ternary_error_string")
build, load = LIBRARY.build, LIBRARY.load


def check_arguments(x_codes, packed, K: int) -> None:
    """ValueError naming the argument, before anything reaches the GPU: dtypes, shapes, devices (both CUDA, the
    same GPU) and the C int range of N and K. Runs on any device, so the rules are tested without a GPU."""
    if not isinstance(K, int) or not 0 <= K <= 2**31 - 4:
        raise ValueError(f"K: an int in [0, 2**31 - 4] (the launcher's C int), got {K!r}")
    if not isinstance(x_codes, torch.Tensor) or x_codes.dtype != torch.int8 or tuple(x_codes.shape) != (K,):
        raise ValueError(f"x_codes: an int8 tensor of shape (K={K},), got {getattr(x_codes, 'dtype', None)} "
                         f"{tuple(getattr(x_codes, 'shape', ()))}")
    check_packed(packed, K)
    if packed.size(0) > 2**31 - 1:
        raise ValueError(f"packed: N = {packed.size(0)} rows do not fit the launcher's C int")
    cuda_build.check_cuda_tensors(x_codes=x_codes, packed=packed)


def cuda_ternary_gemv(x_codes: torch.Tensor, packed: torch.Tensor, K: int) -> torch.Tensor:
    """W x for one int8 activation vector (K,) on the GPU: packed (N, ceil(K/4)) uint8 -> int32 (N,), exact.
    Any strides (non-contiguous arguments are copied); x is read as 32-bit words, so an x whose data is not on a
    4-byte boundary (a view at an odd offset) is copied to an aligned buffer. N = 0 or K = 0: an empty or zero
    result, no launch."""
    check_arguments(x_codes, packed, K)
    N = packed.size(0)
    if N == 0 or K == 0:
        return torch.zeros(N, dtype=torch.int32, device=x_codes.device)
    x, w = x_codes.contiguous(), packed.contiguous()
    if cuda_build.misaligned(x, 4):
        x = x.clone()  # a fresh allocation is aligned (torch's allocator hands out 512-byte-aligned blocks)
    y = torch.empty(N, dtype=torch.int32, device=x.device)
    with cuda_build.on_device(x) as stream:  # x's GPU, its current stream
        LIBRARY.launch(w.data_ptr(), x.data_ptr(), y.data_ptr(), N, K, stream)
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
