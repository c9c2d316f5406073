"""Shared test setup: one thread (stable and fast on small ops), hypothesis profiles, the gpu marker, and the
graded checks as property tests: a test module that sets CHAPTER = "04" and asks for a `graded_check` argument
runs once per check of every exercise of that chapter, against the library (exercises/grading/checks/common.py).

TRITON_INTERPRET=1 is set here, before anything imports triton, unless a CUDA device is present: the
kernels' interpreter tier then runs on CPU tensors; with a CUDA device the real compiler runs (the `-m gpu`
tier). Setting TRITON_INTERPRET yourself overrides this.
"""

import os

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
try:  # a GPU machine may lack hypothesis: `pytest -m gpu` must still collect (property tests skip themselves)
    from hypothesis import settings  # noqa: E402
except ImportError:
    settings = None

torch.set_num_threads(1)
HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

if settings is not None:
    settings.register_profile("dev", deadline=None, max_examples=50)
    settings.register_profile("ci", deadline=None, max_examples=20, derandomize=True)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci" if os.environ.get("CI") else "dev"))


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False on this machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_generate_tests(metafunc):
    if "graded_check" in metafunc.fixturenames:
        from exercises.grading.checks.common import library_checks

        checks = library_checks(metafunc.module.CHAPTER)
        metafunc.parametrize("graded_check", checks, ids=[c.id for c in checks])


@pytest.fixture
def float64_default():
    """float64 as torch's default dtype for one test (the exact checks); a module opts in with
    `pytestmark = pytest.mark.usefixtures("float64_default")`."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
