"""Hand-written Triton and CUDA kernels, each a drop-in replacement for a PyTorch reference in nanomodels.

Every hardware decision is made here, once, when `kernels` is imported:

    CUDA device, TRITON_INTERPRET unset  -> "triton"       compiled Triton kernels on the GPU
    TRITON_INTERPRET=1 (set for you when  -> "interpreter"  the same kernels run by Triton's CPU interpreter
      there is no CUDA device)                                (slow, exact enough to test every kernel in CI)
    no triton installed (macOS), or CPU   -> "reference"    the PyTorch reference, with a one-time warning
      tensors with TRITON_INTERPRET=0

TRITON_INTERPRET must be set before triton is imported, which is why this module does it first.

    from kernels.softmax import softmax, online_softmax          # Triton row softmax, one-pass and online
    from kernels.flash_attention import flash_attention         # FlashAttention-2 fwd + bwd, UniLM masks
    from kernels.cuda_softmax import cuda_softmax               # the CUDA C softmax (GPU only)
"""

import os
import warnings

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


__all__ = ["HAS_CUDA", "HAS_TRITON", "INTERPRET", "backend"]
