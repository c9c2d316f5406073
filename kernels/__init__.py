"""Hand-written Triton and CUDA kernels, each a drop-in replacement for a PyTorch reference in nanomodels.

Every hardware decision is made here, once, when `kernels` is imported:

    CUDA device, TRITON_INTERPRET unset  -> "triton"       compiled Triton kernels on the GPU
    TRITON_INTERPRET=1 (set for you when  -> "interpreter"  the same kernels run by Triton's CPU interpreter
      there is no CUDA device)                                (slow, exact enough to test every kernel in CI)
    no triton installed (macOS), or CPU   -> "reference"    the PyTorch reference, with a one-time warning
      tensors with TRITON_INTERPRET=0

TRITON_INTERPRET must be set before triton is imported, which is why this module does it first.

It also holds the registry: every kernels/<name>.py (other than aot.py and bench.py) is a kernel module, and
`python -m kernels.aot` (compile tier) and `python -m kernels.bench` (benchmark) iterate over KERNEL_MODULES,
reading each module's AOT_SPECS (a list of AotSpec / CudaSpec) and BENCHMARKS (a list of Benchmark). A new
kernel registers itself by defining those two lists; see kernels/README.md, "Adding a kernel".

    from kernels.softmax import softmax, online_softmax          # Triton row softmax, one-pass and online
    from kernels.flash_attention import flash_attention         # FlashAttention-2 fwd + bwd, UniLM masks
    from kernels.cuda_softmax import cuda_softmax               # the CUDA C softmax (GPU only)
"""

import importlib
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # pin Triton 3.9's default (it changes in 3.10)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # no triton wheel for this platform: kernels stay importable and fall back
    HAS_TRITON = False

    class _Stub:
        """Stands in for `triton` and `triton.language` so kernel definitions parse; they are never launched."""

        constexpr = int

        @staticmethod
        def jit(fn=None, **kwargs):
            return fn if fn is not None else (lambda f: f)

        @staticmethod
        def autotune(*args, **kwargs):
            return lambda f: f

        @staticmethod
        def Config(*args, **kwargs):
            return None

    triton = tl = _Stub()

GRID_MAX = (2**31 - 1, 65535, 65535)  # CUDA's limit on each grid axis (x, y, z): a launch past one fails


def check_grid(grid: tuple, arg: str, what: str) -> tuple:
    """`grid` itself when every axis is within GRID_MAX; otherwise a ValueError naming `arg`, the argument whose
    size sets the axis, and `what` the axis counts (called before a launch, so nothing has run)."""
    for axis, (n, limit) in enumerate(zip(grid, GRID_MAX)):
        if n > limit:
            raise ValueError(f"{arg}: {what} = {n} programs on grid axis {'xyz'[axis]}, past CUDA's limit of "
                             f"{limit} (grid {tuple(grid)})")
    return grid

_warned = set()


def backend(x: torch.Tensor) -> str:
    """Which implementation runs for tensor `x`: "triton", "interpreter" or "reference"."""
    if not HAS_TRITON:
        reason = "triton is not installed (no wheel for this platform)"
    elif INTERPRET:
        return "interpreter"
    elif x.is_cuda:
        return "triton"
    else:
        reason = "the tensors are on the CPU and TRITON_INTERPRET=0"
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"kernels: {reason}; using the PyTorch reference instead", stacklevel=3)
    return "reference"


# ----------------------------------------------------------------------------- the registry

_NOT_KERNELS = {"__init__", "__main__", "aot", "bench"}
KERNEL_MODULES = tuple(sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                              if p.stem not in _NOT_KERNELS and not p.stem.startswith("_")))


@dataclass
class AotSpec:
    """One Triton kernel, one config, compiled ahead of time by `python -m kernels.aot` for each arch in `archs`.

    kernel: the @triton.jit function (or the @triton.autotune wrapper around it).
    pointers: {argument: Triton pointer type}, e.g. {"X": "*fp16", "LSE": "*fp32"}; every pointer gets the
        divisible-by-16 hint a launch with torch tensors gets.
    scalars: {argument: type} for non-pointer arguments that are not "i32" (e.g. {"sm_scale": "fp32"}).
    constexprs: {argument: value}, every tl.constexpr argument the config fixes (block sizes included), and
        integer arguments a launch specialises (a stride of 1 becomes a compile-time constant in Triton).
    divisible: integer arguments that a real launch passes as multiples of 16 (strides of rows of D >= 16
        elements); None: every argument whose name starts with "stride_".
    The checks, read by `kernels.aot.problems`: shared memory must fit the arch; spills at most
    `max_spill_bytes`; with `mma`, the PTX must hold tensor-core instructions (mma.sync on sm_80,
    wgmma.mma_async on sm_90).
    """

    name: str
    kernel: Any
    pointers: dict
    constexprs: dict
    scalars: dict = field(default_factory=dict)
    num_warps: int = 4
    num_stages: int = 1
    archs: tuple = (80, 90)
    divisible: Optional[tuple] = None
    max_spill_bytes: int = 0
    mma: bool = False


@dataclass
class CudaSpec:
    """A torch-free CUDA C source compiled by `nvcc -cubin -Xptxas -v` for each arch in `archs`. One result row
    per __global__ entry function. Checks: spills at most `max_spill_bytes`; each pattern of `sass` (e.g.
    "SHFL.BFLY") must appear in the SASS when the wheel's cuobjdump is present."""

    name: str
    source: Path
    archs: tuple = (80, 90)
    max_spill_bytes: int = 0
    sass: tuple = ()


@dataclass
class Benchmark:
    """What `python -m kernels.bench` runs for one kernel.

    gpu(quick, time_ms) -> rows, on a CUDA device. time_ms(fn, grads=None) is the median milliseconds of fn()
        (triton.testing.do_bench; grads are set to None between runs). Each row is a dict with "impl",
        "mode", "shape", "case" (e.g. the mask, or "-"), "ms", and either "tflops" (compared with a measured
        bf16 GEMM) or "gbs" (compared with a measured device-to-device copy).
    cpu(quick) -> rows, without a GPU: a correctness sweep or hardware-independent facts. Each row is a
        dict with "case" and any number of float metrics, e.g. {"case": "fp16 causal", "O err": 3e-4}.
    """

    name: str
    gpu: Optional[Callable] = None
    cpu: Optional[Callable] = None


def kernel_module(name: str):
    """Import kernels.<name> (one of KERNEL_MODULES)."""
    if name not in KERNEL_MODULES:
        raise ValueError(f"name: one of KERNEL_MODULES {KERNEL_MODULES}, got {name!r}")
    return importlib.import_module(f"kernels.{name}")


__all__ = ["GRID_MAX", "check_grid", "HAS_CUDA", "HAS_TRITON", "INTERPRET", "KERNEL_MODULES", "AotSpec",
           "Benchmark", "CudaSpec", "backend", "kernel_module"]
