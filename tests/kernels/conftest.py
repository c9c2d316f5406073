"""Fixtures shared by the kernel tests: the compile tier runs once per session for every registered kernel."""

import pytest

from kernels import aot


@pytest.fixture(scope="session")
def compiled():
    """`python -m kernels.aot --json` over every kernel module (about 30 s with a cold Triton cache)."""
    missing = aot.missing_toolchains()
    if "triton is not installed" in missing and "nvcc not found" in missing:
        pytest.skip("no triton and no nvcc: nothing to compile")
    return aot.report()
