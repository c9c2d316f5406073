"""Helpers shared by the kernel tests, which run in four tiers (kernels/README.md, "Tests"):

1. reference     PyTorch references and argument checks: float64, any CPU, no triton needed.
2. interpreter   Triton kernels under TRITON_INTERPRET=1 on CPU tensors (`needs_interpreter`).
3. compile       kernels built ahead of time for sm_80 / sm_90 (the session fixture `compiled` in conftest.py).
4. gpu           `pytest -m gpu`: numerics and benchmarks on a CUDA device.
"""

import math

import pytest
import torch

import kernels

try:
    from hypothesis import given  # noqa: F401  (re-exported: the test modules import it from here)
    from hypothesis import strategies as st
except ImportError:  # a GPU machine may lack it: the property tests skip with the reason, the rest still runs
    def given(*args, **kwargs):
        return pytest.mark.skip(reason="hypothesis is not installed: the property tests need it")

    class _NoStrategies:
        def __getattr__(self, name):
            return lambda *args, **kwargs: None

    st = _NoStrategies()

SENTINEL = 12345.0  # guard-band value: no kernel output in these tests can equal it
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3)}


def assert_close(actual, expected, what, atol, rtol=0.0):
    """|actual - expected| <= atol + rtol |expected| everywhere (infinities of one sign match; NaN never does);
    the message names the invariant and prints the max and mean difference and the first bad element."""
    actual, expected = actual.double(), expected.double()
    both_inf = torch.isinf(actual) & torch.isinf(expected) & (actual.sign() == expected.sign())
    diff = torch.where(both_inf, 0.0, (actual - expected).abs()).nan_to_num(nan=math.inf)
    bad = diff > atol + rtol * expected.abs().nan_to_num(posinf=0, neginf=0)
    if bad.any():
        idx = tuple(int(i) for i in bad.nonzero()[0])
        raise AssertionError(f"{what}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g} (atol {atol}, rtol "
                             f"{rtol}); first bad index {idx}: got {actual[idx]:.6g}, expected {expected[idx]:.6g}")


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float32).to(device=device, dtype=dtype)


def _interpreter_problem():
    """Why the interpreter tier cannot run here, or None. Triton 3.6's interpreter raises a TypeError under
    numpy 2 on a loop with runtime bounds (every kernel here has one): probe exactly that."""
    if not kernels.HAS_TRITON:
        return "triton is not installed"
    if not kernels.INTERPRET:
        return ("TRITON_INTERPRET is not 1 (tests/conftest.py sets it when there is no CUDA device; on a GPU "
                "machine run `TRITON_INTERPRET=1 pytest tests/kernels` for this tier, `pytest -m gpu` for the GPU "
                "tier)")
    import numpy
    import triton
    import triton.language as tl

    @triton.jit
    def probe(X, n):
        for i in range(0, n):
            tl.store(X + i, i)

    x = torch.zeros(3, dtype=torch.int32)
    try:
        probe[(1,)](x, 3)
    except Exception as e:  # Triton wraps it in an InterpreterError; anything but that TypeError is a real failure
        if "TypeError" not in repr(e):
            raise
        return (f"the interpreter of triton {triton.__version__} fails with numpy {numpy.__version__} ({e!r}); "
                f"this tier needs triton >= 3.9 or numpy < 2; the GPU and compile tiers are what run here")
    return None


INTERPRETER_PROBLEM = _interpreter_problem()
needs_interpreter = pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=f"interpreter tier: "
                                       f"{INTERPRETER_PROBLEM}")


def check_library_reports_cuda_errors(library, args, empty_grid_args):
    """Without a GPU: the nvcc-built library (a kernels.cuda_build.CudaLibrary) loads, a launch raises CUDA's
    error by name, and a launch with an empty grid raises "invalid argument"."""
    from kernels.cuda_build import nvcc
    if nvcc() is None:
        pytest.skip("nvcc not found")
    library.load()
    with pytest.raises(RuntimeError, match=f"{library.launcher}: CUDA error"):
        library.launch(*args)
    with pytest.raises(RuntimeError, match="invalid argument"):
        library.launch(*empty_grid_args)


def compiled_rows(compiled, module, part="triton"):
    """The compile-tier rows of one kernel module ("triton" or "cuda"), or a skip with the reason."""
    rows = [r for r in compiled[part] if r["module"] == module]
    if not rows:
        pytest.skip(f"compile tier ({part}) skipped: {'; '.join(compiled['missing']) or 'no rows'}")
    return rows
