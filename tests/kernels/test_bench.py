"""`python -m kernels.bench` on a GPU: every registered benchmark runs and returns timed rows."""

import pytest


@pytest.mark.gpu
def test_every_registered_gpu_benchmark_returns_timed_rows():
    from kernels import bench, cuda_softmax

    rows = bench.gpu_benchmark(quick=True)
    expected = {b.name for _, b in bench.benchmarks() if b.gpu is not None}
    if cuda_softmax.nvcc() is None:  # the CUDA C rows need nvcc to build the library
        expected.discard("cuda_softmax")
    got = {r["kernel"] for r in rows}
    assert got == expected, f"benchmarks {sorted(expected)} gave rows for {sorted(got)}"
    assert all(r["ms"] > 0 and r["pct_peak"] > 0 for r in rows), [r for r in rows if not r["ms"] > 0]
