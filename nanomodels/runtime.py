"""Hardware and run-mode decisions, in one place.

- `pick_device`: cuda, then mps, then cpu; the environment variable NANOMODELS_DEVICE overrides.
- `autocast_dtype`: the mixed-precision policy. bfloat16 autocast on a CUDA device that supports it,
  float32 everywhere else (CPU float32 is what the exact tests and the chapters' numbers assume).
- `quick_mode`: NANOMODELS_QUICK=1 shrinks every chapter experiment so that CI runs all chapters in minutes.
- `median_seconds`: the wall time of a call, the median of repeats after a warm-up (a shared machine is noisy).
"""

import os
import statistics
import time
from typing import Callable, Optional

import torch

DEVICES = ("auto", "cpu", "cuda", "mps")


def pick_device(preference: Optional[str] = None) -> torch.device:
    """The device to run on: `preference` ('auto', 'cpu', 'cuda', 'cuda:1', 'mps'), else NANOMODELS_DEVICE, else auto."""
    pref = preference or os.environ.get("NANOMODELS_DEVICE", "auto")
    kind = pref.split(":")[0]
    if kind not in DEVICES:
        raise ValueError(f"device: must be one of {DEVICES} (optionally 'cuda:N'), got {pref!r}")
    if kind == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {pref!r} was asked for but torch sees no CUDA device (try 'auto' or 'cpu')")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"device: {pref!r} was asked for but MPS is not available (try 'auto' or 'cpu')")
    return torch.device(pref)


def autocast_dtype(device: torch.device) -> Optional[torch.dtype]:
    """bfloat16 autocast where the hardware has it (CUDA, compute capability >= 8.0); None = plain float32."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def quick_mode() -> bool:
    """True when NANOMODELS_QUICK is set to a true value ('1', 'true', 'yes'): experiments shrink for CI."""
    return os.environ.get("NANOMODELS_QUICK", "").strip().lower() in ("1", "true", "yes")


def median_seconds(call: Callable[[], object], repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of call(), after one warm-up call that is not timed."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats: must be a positive integer, got {repeats!r}")
    call()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
