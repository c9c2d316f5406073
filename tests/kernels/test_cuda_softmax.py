"""The CUDA C row softmax (kernels/cuda/softmax.cu through kernels/cuda_softmax.py): what nvcc reports for it,
the library's behaviour without a GPU, and (-m gpu) its numerics."""

import pytest
import torch

from tiers import assert_close, check_library_reports_cuda_errors, compiled_rows, randn


class TestCompile:
    def test_cuda_softmax_builds_with_nvcc_without_spills(self, compiled):
        rows = compiled_rows(compiled, "cuda_softmax", "cuda")
        assert {(r["kernel"], r["arch"]) for r in rows} == {(f"softmax.cu {f}", a) for f in
                                                            ("softmax_rows", "softmax_rows_online")
                                                            for a in ("sm_80", "sm_90")}
        for r in rows:
            assert r["spill_bytes"] == 0, f"{r['kernel']} {r['arch']}: {r['spill_bytes']} B spilled"
            assert r["sass"]["SHFL.BFLY"] > 0 if "sass" in r else True, f"{r['kernel']}: no warp shuffle in the SASS"
            per_warp = 4 if r["kernel"].endswith("_rows") else 8  # one or two floats per warp slot, 32 slots
            assert r["shared_bytes"] == 32 * per_warp, f"{r['kernel']}: {r['shared_bytes']} B of shared memory"

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour; the GPU tier runs it")
    def test_cuda_library_loads_and_reports_a_cuda_error_without_a_gpu(self):
        from kernels import cuda_softmax
        check_library_reports_cuda_errors(cuda_softmax.LIBRARY, (0, 0, 4, 100, 2, 0), (0, 0, 0, 100, 2, 0))


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("version", [1, 2])
    def test_cuda_c_softmax_matches_torch(self, version):
        from kernels.cuda_softmax import cuda_softmax

        for shape in ((4096, 4096), (37, 200), (3, 20000), (5, 1)):
            x = randn(*shape, seed=23, device="cuda") * 4
            assert_close(cuda_softmax(x, version=version), torch.softmax(x.double(), -1), f"v{version} {shape}", 1e-6)


# The block's reduction order, run on the host with softmax.cu's own merge() (it is __host__ __device__): each
# thread's running (m, l) over its columns, the shuffle butterfly inside each warp (every lane merges with lane
# ^ offset, reading the values from before the step), then the warps' partials through the same butterfly.
HOST_EMULATION = r"""
#include "softmax.cu"
#include <stdio.h>
#include <stdlib.h>

static void butterfly(float* m, float* l) {
    for (int offset = WARP / 2; offset > 0; offset /= 2) {
        float om[WARP], ol[WARP];
        for (int lane = 0; lane < WARP; lane++) { om[lane] = m[lane]; ol[lane] = l[lane]; }
        for (int lane = 0; lane < WARP; lane++) merge(m[lane], l[lane], om[lane ^ offset], ol[lane ^ offset]);
    }
}

int main(void) {
    int n;
    if (scanf("%d", &n) != 1) return 1;
    float* x = (float*)malloc(n * sizeof(float));
    for (int j = 0; j < n; j++) {
        char word[64];
        if (scanf("%63s", word) != 1) return 1;
        x[j] = strtof(word, NULL);
    }
    int threads = ((n + WARP - 1) / WARP) * WARP;  // as softmax_rows_launch chooses
    if (threads > 256) threads = 256;
    float m[256], l[256];
    for (int t = 0; t < threads; t++) {
        m[t] = -INFINITY;
        l[t] = 0.0f;
        for (int j = t; j < n; j += threads) merge(m[t], l[t], x[j], 1.0f);
    }
    for (int w = 0; w < threads / WARP; w++) butterfly(m + w * WARP, l + w * WARP);
    float pm[WARP], pl[WARP];
    for (int lane = 0; lane < WARP; lane++) {
        pm[lane] = lane < threads / WARP ? m[lane * WARP] : -INFINITY;
        pl[lane] = lane < threads / WARP ? l[lane * WARP] : 0.0f;
    }
    butterfly(pm, pl);
    for (int j = 0; j < n; j++) printf("%.9g\n", fast_exp(x[j] - pm[0]) * (1.0f / pl[0]));
    return 0;
}
"""


@pytest.fixture(scope="module")
def host_softmax(tmp_path_factory):
    """softmax_rows_online's arithmetic and reduction order as a host program built by nvcc from softmax.cu."""
    import subprocess

    from kernels import cuda_softmax

    compiler = cuda_softmax.nvcc()
    if compiler is None:
        pytest.skip("nvcc not found: the host emulation of softmax.cu needs it to compile")
    tmp = tmp_path_factory.mktemp("host_softmax")
    (tmp / "emulate.cu").write_text(HOST_EMULATION)
    exe = tmp / "emulate"
    out = subprocess.run([compiler, "-arch=sm_80", "-I", str(cuda_softmax.SOURCE.parent), str(tmp / "emulate.cu"),
                          "-o", str(exe)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr

    def run(row):
        text = f"{len(row)} " + " ".join(repr(float(v)) for v in row)
        done = subprocess.run([str(exe)], input=text, capture_output=True, text=True, check=True)
        return torch.tensor([float(v) for v in done.stdout.split()], dtype=torch.float64)
    return run


class TestHostEmulation:
    @pytest.mark.parametrize("n, nan_at", [(40, 0), (40, 7), (400, 0), (400, 300), (400, 399)],
                             ids=["first element of thread 0", "first element of thread 7",
                                  "256 threads, thread 0 first", "256 threads, second element of thread 44",
                                  "last element"])
    def test_a_nan_anywhere_in_the_row_makes_every_output_nan_like_torch(self, host_softmax, n, nan_at):
        row = randn(n, seed=50)
        row[nan_at] = float("nan")
        assert torch.isnan(torch.softmax(row, -1)).all()  # the behaviour to match
        y = host_softmax(row.tolist())
        assert torch.isnan(y).all(), (f"NaN at column {nan_at} of {n}: {int(torch.isnan(y).sum())} of {n} outputs "
                                      f"are NaN, expected all (a thread dropped the NaN it saw first)")

    @pytest.mark.parametrize("n", [1, 40, 400, 1000])
    def test_without_nan_the_emulated_reduction_is_the_softmax(self, host_softmax, n):
        row = randn(n, seed=51) * 4
        row[: n // 3] = -float("inf")  # some threads see only -inf: the (-inf, 0) state
        assert_close(host_softmax(row.tolist()), torch.softmax(row.double(), -1), f"host-emulated softmax, n={n}", 1e-6)


class TestArguments:
    def test_a_cpu_tensor_is_rejected_with_the_reason(self):
        from kernels.cuda_softmax import cuda_softmax

        with pytest.raises(ValueError, match="x: must be on a CUDA device.*got a tensor on cpu"):
            cuda_softmax(torch.zeros(3, 5))
        with pytest.raises(ValueError, match="x: the CUDA C softmax takes a non-empty float32 tensor"):
            cuda_softmax(torch.zeros(3, 5, dtype=torch.float16))

    def test_a_failing_nvcc_build_shows_nvccs_error_text(self, tmp_path, monkeypatch):
        from kernels import cuda_build, cuda_softmax

        if cuda_softmax.nvcc() is None:
            pytest.skip("nvcc not found")
        broken = tmp_path / "softmax.cu"
        broken.write_text('extern "C" __global__ void k(float* x) { x[0] = undefined_name; }\n')
        monkeypatch.setattr(cuda_softmax.LIBRARY, "source", broken)
        monkeypatch.setattr(cuda_build, "CACHE", tmp_path / "cache")
        with pytest.raises(RuntimeError, match="(?s)nvcc failed to build softmax.cu.*undefined_name"):
            cuda_softmax.build("sm_80")
