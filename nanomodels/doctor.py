"""`python -m nanomodels doctor`: what this machine has, and what it can and cannot run here."""

import importlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

from nanomodels.runtime import autocast_dtype, pick_device


def _version(module: str) -> str:
    try:
        return getattr(importlib.import_module(module), "__version__", "installed")
    except Exception:
        return "not installed"


def ptxas_in_triton() -> str | None:
    """The ptxas binary shipped inside the triton wheel (used by the ahead-of-time compile tier), if any."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        for candidate in sorted(Path(base, "backends", "nvidia", "bin").glob("ptxas*")):
            if os.access(candidate, os.X_OK):
                return str(candidate)
    return None


def doctor() -> dict:
    device = pick_device()
    has_triton = _version("triton") != "not installed"
    nvcc = shutil.which("nvcc")
    ptxas = ptxas_in_triton()
    facts = {
        "python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
        "triton": _version("triton"), "numpy": _version("numpy"), "tiktoken": _version("tiktoken"),
        "device": str(device),
        "threads": f"{torch.get_num_threads()} (torch's default here; train uses --threads, default 0 = this)",
    }
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability()
        facts["cuda device"] = f"{torch.cuda.get_device_name()} (sm_{major}{minor}), CUDA {torch.version.cuda}"
    facts["mixed precision"] = str(autocast_dtype(device) or "float32 (no autocast)")
    tiers = {
        "reference tier (PyTorch on CPU)": (True, "always"),
        "interpreter tier (TRITON_INTERPRET=1)": (has_triton, "needs triton (Linux: pip install triton)"),
        "ahead-of-time compile tier (sm_80/sm_90)": (has_triton and ptxas is not None,
                                                     "needs triton with its NVIDIA backend (ptxas)"),
        "CUDA C compile tier (nvcc)": (nvcc is not None, "needs nvcc (the CUDA toolkit) on PATH"),
        "GPU tier (pytest -m gpu, kernel benchmarks)": (device.type == "cuda", "needs a CUDA device"),
    }
    width = max(map(len, facts))
    for key, value in facts.items():
        print(f"{key:<{width}}  {value}")
    print("\nkernel test tiers:")
    for name, (ok, why) in tiers.items():
        print(f"  [{'x' if ok else ' '}] {name}" + ("" if ok else f"  -- {why}"))
    print("\nyou can: train and sample every chapter's model" + (" on the GPU" if device.type == "cuda" else
          " on this CPU (the GPU is found by itself when there is one)"))
    if not has_triton:
        print("you cannot: run the Triton kernels here; kernels/ falls back to the PyTorch references")
    return {"facts": facts, "tiers": {k: ok for k, (ok, _) in tiers.items()}}
