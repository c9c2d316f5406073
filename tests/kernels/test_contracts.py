"""Runs the contract harness (tests/kernels/contracts.py): every registered kernel wrapper over its generated
layouts, dtypes and guard bands. `python tests/kernels/test_contracts.py` prints the cases per kernel and the
time."""

import time

import pytest
import torch

from contracts import CONTRACTS, cases, run_case
from kernels import GRID_MAX, kernel_module

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


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")  # a shape past a grid limit, with no memory behind it


GRID_CASES = {  # (call, the argument the ValueError must name): one axis of each launch one past CUDA's limit
    "softmax rows": (lambda: kernel_module("softmax").softmax(_meta(2**31, 1)), "x"),
    "online_softmax rows": (lambda: kernel_module("softmax").online_softmax(_meta(2**31, 1)), "x"),
    "layer_norm rows": (lambda: kernel_module("layernorm").layer_norm(_meta(2**31, 1), _meta(1)), "x"),
    "adaln rows": (lambda: kernel_module("adaln").adaln_modulate(*[_meta(2**31, 1)] * 3), "x"),
    "rmsnorm_quant rows": (lambda: kernel_module("bitnet").rmsnorm_quant(_meta(2**31, 1), _meta(1)), "x"),
    "ternary_matmul N / 64 tiles": (lambda: kernel_module("bitnet").ternary_matmul(
        _meta(1, 4, dtype=torch.int8), _meta(65535 * 64 + 1, 1, dtype=torch.uint8), 4), "packed"),
    "flash_attention H": (lambda: kernel_module("flash_attention").flash_attention(*[_meta(1, 65536, 1, 16)] * 3), "q"),
    "grouped_gemm N / 64 tiles": (lambda: kernel_module("grouped_gemm").launch_grids(1, 2, 65535 * 64 + 1, 64), "w"),
    "grouped_gemm dW K / 64 tiles": (lambda: kernel_module("grouped_gemm").launch_grids(1, 2, 64, 65535 * 64 + 1), "w"),
}


@pytest.mark.parametrize("name", list(GRID_CASES))
def test_a_grid_axis_past_its_cuda_limit_raises_before_any_launch(name):
    """Meta tensors (shapes, no data) one program past GRID_MAX on the axis each wrapper's size sets: a ValueError
    naming the argument, from the wrapper's checks or `kernels.check_grid` just before the launch."""
    call, arg = GRID_CASES[name]
    with pytest.raises(ValueError, match=f"^{arg}"):
        call()


def test_retention_rejects_b_times_h_past_grid_axis_x_before_any_launch(monkeypatch):
    """Retention's rules on log_decay (finite, <= 0) read its values, which meta tensors do not have: they are
    skipped here so that the B * H limit itself is what raises."""
    retention = kernel_module("retention")
    monkeypatch.setattr(retention, "check_shapes", lambda *args: None)
    with pytest.raises(ValueError, match=r"^q: B \* H must be <= 2147483647"):
        retention.gated_retention(*[_meta(2**16, 2**15, 1, 16)] * 3, _meta(2**16, 2**15, 1))


def test_grids_at_the_largest_accepted_shapes_are_within_the_limits():
    gg = kernel_module("grouped_gemm")
    for _, grid in gg.launch_grids(2**20, 256, 65535 * 64, 65535 * 64):
        assert all(g <= lim for g, lim in zip(grid, GRID_MAX))


if __name__ == "__main__":
    for contract in CONTRACTS:
        start, outcomes = time.perf_counter(), []
        for case in cases(contract):
            reason = contract.skip() if contract.skip else None
            outcomes.append("skipped" if reason else run_case(case))
        print(f"{contract.module:18s} {contract.name:22s} {len(outcomes):3d} cases "
              f"({outcomes.count('ok')} ok, {outcomes.count('rejected')} rejected, {outcomes.count('skipped')} "
              f"skipped) {time.perf_counter() - start:.1f} s")
