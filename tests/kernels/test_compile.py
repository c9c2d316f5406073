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


@pytest.mark.parametrize("module, warps", [
    ("adaln", lambda m, b: m._num_warps(b)),
    ("layernorm", lambda m, b: m._num_warps(b, backward=False)),
    ("layernorm", lambda m, b: m._num_warps(b, backward=True)),
    ("bitnet", lambda m, b: m._quant_warps(b))])
def test_row_kernels_compile_the_largest_block_of_every_warp_count_they_launch(module, warps):
    """The row kernels pick BLOCK = next_power_of_2(N) for N <= MAX_COLS and a warp count per BLOCK; registers per
    thread grow with BLOCK / warps, so the largest BLOCK of each choice of warps is the one that would spill."""
    m = kernels.kernel_module(module)
    blocks = [2 ** i for i in range(m.MAX_COLS.bit_length()) if 2 ** i <= m.MAX_COLS]
    worst = {max(b for b in blocks if warps(m, b) == w) for w in {warps(m, b) for b in blocks}}
    built = {s.constexprs["BLOCK"] for s in m.AOT_SPECS if "BLOCK" in s.constexprs}
    assert worst <= built, f"kernels.{module}: no AOT spec for BLOCK {sorted(worst - built)}"
