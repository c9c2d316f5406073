"""Runs the contract harness (tests/kernels/contracts.py): every registered kernel wrapper over its generated
layouts, dtypes and guard bands. `python tests/kernels/test_contracts.py` prints the cases per kernel and the
time."""

import time

import pytest

from contracts import CONTRACTS, cases, run_case

# Contract breaks the harness found and that are not fixed yet (strict: a fix turns them into failures to remove)
KNOWN = {}
CASES = [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=KNOWN[c.id])] if c.id in KNOWN
                      else []) for contract in CONTRACTS for c in cases(contract)]


@pytest.mark.parametrize("case", CASES)
def test_kernel_contract(case):
    reason = case.contract.skip() if case.contract.skip else None
    if reason:
        pytest.skip(f"{case.contract.module}: {reason}")
    assert run_case(case) in ("ok", "rejected")


def test_every_kernel_module_is_registered():
    from kernels import KERNEL_MODULES
    registered = {c.module for c in CONTRACTS}
    names = {m.rsplit(".", 1)[-1] for m in KERNEL_MODULES}
    assert names - registered - {"cuda_build"} == set()  # cuda_build: the nvcc loader of the two CUDA wrappers


if __name__ == "__main__":
    for contract in CONTRACTS:
        start, outcomes = time.perf_counter(), []
        for case in cases(contract):
            reason = contract.skip() if contract.skip else None
            outcomes.append("skipped" if reason else run_case(case))
        print(f"{contract.module:18s} {contract.name:22s} {len(outcomes):3d} cases "
              f"({outcomes.count('ok')} ok, {outcomes.count('rejected')} rejected, {outcomes.count('skipped')} "
              f"skipped) {time.perf_counter() - start:.1f} s")
