"""The one loader of the CUDA C kernels (kernels/cuda/*.cu): nvcc builds a shared library, ctypes calls its host
launcher with the tensors' device pointers on torch's current stream of the tensors' GPU.

The .cu files are torch-free `extern "C"` code: each compiles in about a second with plain nvcc, where a torch
extension (torch/extension.h, load_inline) costs minutes and does not build at all against a CPU torch. Without a
GPU a library still builds and loads; a launch then returns a CUDA error code, raised by `launch`.

    LIBRARY = CudaLibrary(SOURCE, "softmax_rows_launch", [c_void_p, ...], "softmax_error_string")
    check_cuda_tensors(x=x, packed=packed)         # ValueError naming the argument: not CUDA, or another GPU
    with on_device(x) as stream:                   # x's GPU is current; stream is its current stream
        LIBRARY.launch(..., stream)
"""

import contextlib
import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Optional

import torch

CACHE = Path(os.environ.get("NANOMODELS_CACHE", Path.home() / ".cache" / "nanomodels")) / "kernels"


def nvcc() -> Optional[str]:
    """Path of nvcc (PATH, then $CUDA_HOME/bin, then /usr/local/cuda/bin), or None."""
    found = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if not found and home and (Path(home) / "bin" / "nvcc").exists():
            found = str(Path(home) / "bin" / "nvcc")
    return found


def default_arch() -> str:
    """sm_XY of the current GPU, else sm_80."""
    major, minor = torch.cuda.get_device_capability() if torch.cuda.is_available() else (8, 0)
    return f"sm_{major}{minor}"


def build(source: Path, arch: Optional[str] = None, compiler: Optional[str] = None) -> Path:
    """Compile `source` into a shared library for `arch` (default: `default_arch()`), cached by source hash and
    arch. RuntimeError without nvcc, or with nvcc's own error text when the build fails."""
    compiler = compiler or nvcc()
    if compiler is None:
        raise RuntimeError(f"nvcc not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin): {source.name} needs the "
                           f"CUDA toolkit")
    arch = arch or default_arch()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    lib = CACHE / f"{source.stem}_{digest}_{arch}.so"
    if not lib.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        out = subprocess.run([compiler, "-O3", f"-arch={arch}", "-Xcompiler", "-fPIC", "-shared", str(source), "-o",
                              str(tmp)], capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"nvcc failed to build {source.name} for {arch} (exit {out.returncode}):\n"
                               f"{(out.stderr or out.stdout).strip()}")
        tmp.replace(lib)  # atomic: a concurrent build never sees half a file
    return lib


@functools.lru_cache(maxsize=None)
def _load(source: Path, arch: Optional[str], signatures: tuple, error_string: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(build(source, arch)))
    for name, argtypes in signatures:
        getattr(lib, name).argtypes = list(argtypes)
        getattr(lib, name).restype = ctypes.c_int  # a cudaError_t
    getattr(lib, error_string).argtypes = [ctypes.c_int]
    getattr(lib, error_string).restype = ctypes.c_char_p
    lib.error_string = getattr(lib, error_string)
    return lib


def load(source: Path, signatures: dict, *, error_string: str, arch: Optional[str] = None) -> ctypes.CDLL:
    """The library of `source` (built once, loaded once) with each launcher's ctypes `signatures` {name: argtypes}
    (each returns a cudaError_t) and `error_string`, the library's `const char *(int)` for an error code."""
    return _load(Path(source), arch, tuple((k, tuple(v)) for k, v in signatures.items()), error_string)


def launch(lib: ctypes.CDLL, name: str, *args) -> None:
    """Call the host launcher `name`; raise RuntimeError with CUDA's message on a nonzero cudaError_t."""
    code = getattr(lib, name)(*args)
    if code != 0:
        raise RuntimeError(f"{name}: CUDA error {code}: {lib.error_string(code).decode()}")


class CudaLibrary:
    """One kernels/cuda/*.cu file with one host launcher: `build` (nvcc, cached), `load` (ctypes, once) and
    `launch(*args)` (device pointers, sizes, stream; RuntimeError with CUDA's message on an error code)."""

    def __init__(self, source: Path, launcher: str, argtypes: list, error_string: str):
        self.source, self.launcher, self.argtypes, self.error_string = Path(source), launcher, argtypes, error_string

    def build(self, arch: Optional[str] = None) -> Path:
        """The shared library for `arch` (e.g. "sm_90"; default: the current GPU, else sm_80), cached by source
        hash and arch; nvcc's error text on a failed build."""
        return build(self.source, arch)

    def load(self, arch: Optional[str] = None) -> ctypes.CDLL:
        return load(self.source, {self.launcher: self.argtypes}, error_string=self.error_string, arch=arch)

    def launch(self, *args) -> None:
        launch(self.load(), self.launcher, *args)


def check_cuda_tensors(**tensors: torch.Tensor) -> None:
    """ValueError naming the first argument that is not on a CUDA device, or on another GPU than the first."""
    first = None
    for name, t in tensors.items():
        if t.device.type != "cuda":
            raise ValueError(f"{name}: must be on a CUDA device (the kernel reads it through a device pointer), "
                             f"got a tensor on {t.device}")
        first = first or (name, t.device)
        if t.device != first[1]:
            raise ValueError(f"{name}: must be on {first[0]}'s device {first[1]}, got {t.device}")


@contextlib.contextmanager
def on_device(x: torch.Tensor):
    """Make x's GPU current (launch there, not on the current GPU) and yield that GPU's current stream handle."""
    with torch.cuda.device(x.device):
        yield torch.cuda.current_stream(x.device).cuda_stream


def misaligned(t: torch.Tensor, nbytes: int) -> bool:
    """True when t's first element is not on an `nbytes` boundary (a view at an odd offset: contiguous, but a
    kernel's 32-bit loads of it would fault with a misaligned address)."""
    return t.data_ptr() % nbytes != 0
