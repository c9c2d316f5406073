"""The compile tier for every registered kernel: each AotSpec / CudaSpec in a kernel module's AOT_SPECS is built
for its archs (sm_80, sm_90) and must pass the checks it declares (shared memory fits, spills within bounds,
tensor-core instructions where declared, SASS patterns). A new kernels/<name>.py is covered with no test code."""

import pytest

import kernels


@pytest.mark.slow
@pytest.mark.parametrize("module", kernels.KERNEL_MODULES)
def test_registered_specs_build_for_every_arch_and_pass_their_checks(module, compiled):
    if module in compiled["errors"]:
        pytest.fail(f"kernels.{module} does not import: {compiled['errors'][module]}")
    specs = getattr(kernels.kernel_module(module), "AOT_SPECS", [])
    if not specs:
        pytest.skip(f"kernels.{module} registers no AOT_SPECS")
    triton_specs = [s for s in specs if isinstance(s, kernels.AotSpec)]
    cuda_specs = [s for s in specs if isinstance(s, kernels.CudaSpec)]
    rows = [r for r in compiled["triton"] + compiled["cuda"] if r["module"] == module]
    if triton_specs and not any(r in compiled["triton"] for r in rows):
        pytest.skip(f"compile tier skipped: {'; '.join(compiled['missing'])}")
    if cuda_specs and not any(r in compiled["cuda"] for r in rows):
        pytest.skip(f"CUDA compile tier skipped: {'; '.join(compiled['missing'])}")
    built = {(r["kernel"], r["arch"]) for r in rows}
    expected = {(s.name, f"sm_{a}") for s in triton_specs for a in s.archs}
    assert expected <= built, f"specs without a build: {sorted(expected - built)}"
    for s in cuda_specs:
        assert {f"sm_{a}" for a in s.archs} <= {r["arch"] for r in rows if r["kernel"].startswith(s.name + " ")}, \
            f"{s.name}: not built for every arch in {s.archs}"
    found = [p for r in rows for p in r["problems"]]
    assert not found, "compile-tier checks failed:\n" + "\n".join(found)
