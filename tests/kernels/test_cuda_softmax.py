"""The CUDA C row softmax (kernels/cuda/softmax.cu through kernels/cuda_softmax.py): what nvcc reports for it,
the library's behaviour without a GPU, and (-m gpu) its numerics."""

import pytest
import torch

from tiers import assert_close, compiled_rows, randn


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

        if cuda_softmax.nvcc() is None:
            pytest.skip("nvcc not found")
        lib = cuda_softmax.load()
        with pytest.raises(RuntimeError, match="softmax_rows_launch: CUDA error"):
            cuda_softmax.launch(lib, 0, 0, 4, 100, 2, 0)
        with pytest.raises(RuntimeError, match="invalid argument"):
            cuda_softmax.launch(lib, 0, 0, 0, 100, 2, 0)


@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("version", [1, 2])
    def test_cuda_c_softmax_matches_torch(self, version):
        from kernels.cuda_softmax import cuda_softmax

        for shape in ((4096, 4096), (37, 200), (3, 20000), (5, 1)):
            x = randn(*shape, seed=23, device="cuda") * 4
            assert_close(cuda_softmax(x, version=version), torch.softmax(x.double(), -1), f"v{version} {shape}", 1e-6)
