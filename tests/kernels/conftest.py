"""Fixtures shared by the kernel tests (helpers live in tiers.py)."""

import pytest
import torch

from kernels import aot


@pytest.fixture(autouse=True)
def float32_default():
    """Other test modules switch the default dtype to float64; these tests spell out every dtype anyway."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    yield
    torch.set_default_dtype(old)


@pytest.fixture(scope="session")
def compiled():
    """`python -m kernels.aot --json` over every kernel module, once per session (about 30 s with a cold Triton
    cache, 10 s warm)."""
    missing = aot.missing_toolchains()
    if "triton is not installed" in missing and "nvcc not found" in missing:
        pytest.skip("no triton and no nvcc: nothing to compile")
    return aot.report()
