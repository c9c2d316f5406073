"""BitNet b1.58 kernels in their tiers: the CPU C kernel (kernels/cpu_ternary.py), the Triton fused
RMSNorm -> int8 quantizer and ternary matmul (kernels/bitnet.py), the CUDA C GEMV (kernels/cuda_ternary.py).

1. reference + CPU   the C kernel (scalar and AVX2) exact against int64 sums, any shape; skipped with the
                     reason when there is no C compiler or no AVX2. Argument checks.
2. interpreter       the Triton kernels under TRITON_INTERPRET=1 against the PyTorch reference, guard bands.
3. compile           nvcc builds the CUDA GEMV with __dp4a and warp shuffles, without spills (the Triton specs
                     are checked by tests/kernels/test_compile.py).
4. gpu               (-m gpu) both GPU kernels exact on the device.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import triton
from kernels.bitnet import (GPU_BLOCKS, _ternary_matmul_kernel, rmsnorm_quant, rmsnorm_quant_reference,
                            ternary_gemm_triton, ternary_matmul)
from kernels.cpu_ternary import available, ternary_gemm_cpu
from nanomodels.bitlinear import BitLinear, TernaryLinear, pack_ternary
from tiers import assert_close, check_library_reports_cuda_errors, compiled_rows, needs_interpreter, randn

SENTINEL_INT = -77  # guard value for integer outputs: never an int8 code of these inputs' padding


def int_operands(m, n, k, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (m, k), generator=g, dtype=torch.int8)  # -128 too: the kernels must not care
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return x, codes


def int64_oracle(x, codes):
    """sum_k x[m, k] w[n, k], in int64 (no overflow possible), then int32."""
    return (x.to(torch.int64) @ codes.to(torch.int64).T).to(torch.int32)


def assert_equal_ints(actual, expected, what):
    bad = actual != expected
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} results differ; max |diff| "
                           f"{int((actual.long() - expected.long()).abs().max())}")


# ------------------------------------------------------------------------------------------------ tier 1: CPU C

def needs_cpu_kernel(version):
    ok, why = available(version)
    return pytest.mark.skipif(not ok, reason=f"CPU ternary kernel ({version}): {why}")


@pytest.mark.parametrize("version", [pytest.param("avx2", marks=needs_cpu_kernel("avx2")),
                                     pytest.param("scalar", marks=needs_cpu_kernel("scalar"))])
class TestCPU:
    @settings(deadline=None, max_examples=30)
    @given(st.integers(1, 3), st.integers(1, 19), st.integers(1, 700), st.integers(0, 2 ** 16))
    def test_cpu_kernel_is_exact_for_every_shape(self, version, m, n, k, seed):
        x, codes = int_operands(m, n, k, seed)
        got = ternary_gemm_cpu(x, pack_ternary(codes), k, version=version)
        assert got.dtype == torch.int32 and got.shape == (m, n)
        assert_equal_ints(got, int64_oracle(x, codes), f"{version} {m}x{n}x{k}")

    def test_extreme_activations_do_not_saturate(self, version):
        k = 1024  # all weights +1 or all -1 against x = -128 or 127: the int16 partial sums are at their largest
        for w, v in ((1, -128), (-1, -128), (1, 127), (-1, 127)):
            x = torch.full((1, k), v, dtype=torch.int8)
            codes = torch.full((3, k), w, dtype=torch.int8)
            assert_equal_ints(ternary_gemm_cpu(x, pack_ternary(codes), k, version=version),
                              int64_oracle(x, codes), f"{version} w={w} x={v}")

    def test_drop_in_integer_matmul_of_ternary_linear(self, version):
        torch.manual_seed(0)
        layer = BitLinear(300, 40, bias=False)
        x = randn(2, 5, 300, seed=1)
        fast = TernaryLinear.from_bitlinear(layer, gemm=lambda a, p, k: ternary_gemm_cpu(a, p, k, version=version))
        assert_close(fast(x), layer(x), f"TernaryLinear with the {version} C kernel vs BitLinear", 1e-4)


@needs_cpu_kernel("scalar")
def test_fused_c_bitlinear_equals_the_ternary_linear_forward():
    from kernels.cpu_ternary import bitlinear_cpu, use_cpu_kernel
    from nanomodels.bitlinear import BitNetResidual, to_ternary
    from nanomodels.transformer import Transformer, TransformerConfig

    torch.manual_seed(2)
    layer = BitLinear(300, 40, bias=True)
    with torch.no_grad():
        layer.norm_weight.uniform_(0.5, 1.5)
    fast = TernaryLinear.from_bitlinear(layer)
    x = randn(2, 5, 300, seed=3)
    assert_close(bitlinear_cpu(x, fast), fast(x), "one C call vs TernaryLinear (RMSNorm, quant, GEMV, rescale)", 1e-4)
    cfg = TransformerConfig(vocab_size=40, block_size=16, n_layers=2, d_model=64, n_heads=4, bias=False,
                            tie_weights=False)
    model = to_ternary(Transformer(cfg, linear=BitLinear, residual=BitNetResidual).eval())
    idx = torch.randint(0, 40, (2, 12))
    reference, _ = model(idx)
    fused, _ = use_cpu_kernel(model)(idx)
    assert_close(fused, reference, "model logits with every BitLinear in one C call", 1e-4)
    with pytest.raises(ValueError, match="x:"):
        bitlinear_cpu(x.double(), fast)


def test_cpu_kernel_rejects_bad_arguments():
    x, codes = int_operands(2, 3, 10, 0)
    packed = pack_ternary(codes)
    with pytest.raises(ValueError, match="x_codes"):
        ternary_gemm_cpu(x.int(), packed, 10)
    with pytest.raises(ValueError, match="packed"):
        ternary_gemm_cpu(x, packed[:, :2], 10)
    with pytest.raises(ValueError, match="version"):
        ternary_gemm_cpu(x, packed, 10, version="avx512")


# ------------------------------------------------------------------------------------------------ tier 2: Triton

def near_tie(y):
    """Where round() may go either way between float32 and float64 arithmetic: within 1e-3 of a .5 tie."""
    return ((y - y.floor()) - 0.5).abs() < 1e-3


@needs_interpreter
class TestInterpreter:
    @pytest.mark.parametrize("rows, cols", [(1, 1), (7, 37), (3, 256), (2, 1000)])
    def test_rmsnorm_quant_matches_the_float64_reference(self, rows, cols):
        x, w = randn(rows, cols, seed=cols) * 3, randn(cols, seed=cols + 1).abs() + 0.5
        codes, scale = rmsnorm_quant(x, w)
        ref_codes, ref_scale = rmsnorm_quant_reference(x.double(), w.double())
        assert codes.dtype == torch.int8 and scale.shape == (rows, 1)
        assert_close(scale, ref_scale, "per-token scale 127 / max|RMSNorm(x)|", 0, rtol=1e-5)
        from nanomodels.bitlinear import rms_norm
        y = rms_norm(x.double(), w.double(), 1e-5) * ref_scale
        off = (codes != ref_codes) & ~near_tie(y)
        assert not off.any(), f"{int(off.sum())} codes differ away from a rounding tie"
        assert ((codes.int() - ref_codes.int()).abs() <= 1).all()
        assert codes.abs().max() == 127, "the row's absmax must map to +-127"

    def test_rmsnorm_quant_rounds_half_away_from_zero_and_takes_3d_input(self):
        x = randn(2, 3, 64, seed=5)
        codes, scale = rmsnorm_quant(x, torch.ones(64))
        ref_codes, _ = rmsnorm_quant_reference(x.double(), torch.ones(64, dtype=torch.float64))
        assert codes.shape == (2, 3, 64) and scale.shape == (2, 3, 1)
        assert (codes.int() - ref_codes.int()).abs().max() <= 1

    def test_rmsnorm_quant_writes_nothing_outside_its_output(self):
        rows, cols = 5, 37
        buf = torch.full((rows + 2, cols + 9), SENTINEL_INT, dtype=torch.int8)
        view = buf[1:rows + 1, 3:cols + 3]
        rmsnorm_quant(randn(rows, cols, seed=6), torch.ones(cols), out=view)
        band = torch.ones_like(buf, dtype=torch.bool)
        band[1:rows + 1, 3:cols + 3] = False
        assert (buf[band] == SENTINEL_INT).all(), f"{int((buf[band] != SENTINEL_INT).sum())} guard cells written"

    @pytest.mark.parametrize("gain", ["strided", "offset", "expanded"])
    def test_rmsnorm_quant_reads_a_gain_of_any_stride(self, gain):
        rows, cols = 6, 96
        x = randn(rows, cols, seed=8) * 2
        base = randn(2 * cols + 1, seed=9).abs() + 0.5
        w = {"strided": base[::2][:cols], "offset": base[1:cols + 1],
             "expanded": torch.tensor([1.7]).expand(cols)}[gain]
        codes, scale = rmsnorm_quant(x, w)
        want_codes, want_scale = rmsnorm_quant(x, w.contiguous())
        assert torch.equal(codes, want_codes), f"{int((codes != want_codes).sum())} codes differ with a {gain} gain"
        assert torch.equal(scale, want_scale)

    def test_rmsnorm_quant_refuses_an_out_it_cannot_write(self):
        x = randn(4, 16, seed=10)
        for bad, rule in ((torch.empty(16, 4, dtype=torch.int8).t(), "unit column stride"),
                          (torch.empty(4, 16, dtype=torch.int32), "int8"),
                          (torch.empty(4, 15, dtype=torch.int8), "shape")):
            with pytest.raises(ValueError, match=f"out: .*{rule}"):
                rmsnorm_quant(x, torch.ones(16), out=bad)

    @pytest.mark.parametrize("layout", ["transposed", "column-strided", "offset"])
    @pytest.mark.parametrize("rescale", [False, True])
    def test_ternary_matmul_writes_any_out_view_and_nothing_around_it(self, layout, rescale):
        m, n, k = 3, 5, 9
        x, codes = int_operands(m, n, k, seed=11)
        scales = (torch.rand(m, 1) + 0.5, torch.tensor(0.7)) if rescale else ()
        want = ternary_matmul(x, pack_ternary(codes), k, *scales)
        sentinel = -7
        buf = torch.full((2 * n + 3, 2 * m + 3), sentinel, dtype=want.dtype)
        out = {"transposed": buf[1:n + 1, 1:m + 1].t(), "column-strided": buf.t()[1:m + 1, 1:2 * n + 1:2],
               "offset": buf.view(-1)[1:1 + m * n].view(m, n)}[layout]
        got = ternary_matmul(x, pack_ternary(codes), k, *scales, out=out)
        assert got.data_ptr() == out.data_ptr() and torch.equal(out, want), f"{layout} out written wrong"
        written = torch.zeros_like(buf, dtype=torch.bool)
        written.view(-1)[torch.as_strided(torch.arange(buf.numel()), out.shape, out.stride(),
                                          out.storage_offset()).reshape(-1)] = True
        assert (buf[~written] == sentinel).all(), "a write outside out"

    def test_ternary_matmul_refuses_an_out_of_the_wrong_dtype_or_shape(self):
        x, codes = int_operands(2, 3, 4, seed=12)
        for bad in (torch.empty(2, 3), torch.empty(3, 2, dtype=torch.int32)):
            with pytest.raises(ValueError, match="out: must be a torch.int32 tensor of shape"):
                ternary_matmul(x, pack_ternary(codes), 4, out=bad)
        with pytest.raises(ValueError, match="out: must be a torch.float32 tensor"):
            ternary_matmul(x, pack_ternary(codes), 4, torch.ones(2, 1), torch.tensor(1.0),
                           out=torch.empty(2, 3, dtype=torch.int32))

    @pytest.mark.parametrize("m, n, k", [(1, 1, 1), (1, 33, 130), (17, 40, 7), (20, 70, 300)])
    def test_ternary_matmul_is_exact(self, m, n, k):
        x, codes = int_operands(m, n, k, seed=m + n + k)
        got = ternary_matmul(x, pack_ternary(codes), k)
        assert got.dtype == torch.int32
        assert_equal_ints(got, int64_oracle(x, codes), f"triton {m}x{n}x{k}")

    @pytest.mark.parametrize("config", sorted(GPU_BLOCKS))
    def test_ternary_matmul_is_exact_with_each_gpu_block_config(self, config):
        bm, bn, bk, _ = GPU_BLOCKS[config]
        m, n, k = bm + 3, bn + 5, 2 * bk + 9  # a partial tile in M and N, two full K blocks and a tail
        x, codes = int_operands(m, n, k, seed=bk)
        y = torch.empty(m, n, dtype=torch.int32)
        grid = (triton.cdiv(m, bm), triton.cdiv(n, bn))
        _ternary_matmul_kernel[grid](x, pack_ternary(codes), y, y, y, m, n, k, k, (k + 3) // 4, n, RESCALE=False,
                                     BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
        assert_equal_ints(y, int64_oracle(x, codes), f"{config} blocks {bm}x{bn}x{bk}, {m}x{n}x{k}")

    def test_ternary_matmul_rescales_and_writes_nothing_outside_its_output(self):
        m, n, k = 18, 35, 100
        x, codes = int_operands(m, n, k, seed=3)
        xs, ws = torch.rand(m, 1) + 0.5, torch.tensor(0.7)
        buf = torch.full((m + 2, n + 7), 12345.0)
        view = buf[1:m + 1, 2:n + 2]
        ternary_matmul(x, pack_ternary(codes), k, xs, ws, out=view)
        band = torch.ones_like(buf, dtype=torch.bool)
        band[1:m + 1, 2:n + 2] = False
        assert (buf[band] == 12345.0).all(), "guard cells written"
        assert_close(view, int64_oracle(x, codes).double() / xs.double() / 0.7, "acc / s_x / s_W", 0, rtol=1e-6)

    def test_triton_path_of_a_ternary_linear_equals_the_fake_quant_layer(self):
        torch.manual_seed(1)
        layer = BitLinear(96, 24, bias=True)
        x = randn(3, 96, seed=2)
        fast = TernaryLinear.from_bitlinear(layer, gemm=ternary_gemm_triton)
        assert_close(fast(x), layer(x), "TernaryLinear (Triton) vs BitLinear", 1e-4)

    def test_bad_arguments_raise_before_any_launch(self):
        with pytest.raises(ValueError, match="weight"):
            rmsnorm_quant(torch.randn(2, 8), torch.ones(7))
        with pytest.raises(ValueError, match="x:"):
            rmsnorm_quant(torch.randn(2, 8).double(), torch.ones(8))
        with pytest.raises(ValueError, match="weight: .*float32"):
            rmsnorm_quant(torch.randn(2, 8), torch.ones(8, dtype=torch.float64))
        x, codes = int_operands(2, 3, 8, 0)
        with pytest.raises(ValueError, match="x_scale, w_scale"):
            ternary_matmul(x, pack_ternary(codes), 8, x_scale=torch.ones(2, 1))
        with pytest.raises(ValueError, match="packed"):
            ternary_matmul(x, pack_ternary(codes).int(), 8)


# ------------------------------------------------------------------------------------------------ tier 3: compile

class TestCompile:
    def test_cuda_gemv_builds_with_dp4a_and_warp_shuffles_without_spills(self, compiled):
        rows = compiled_rows(compiled, "cuda_ternary", "cuda")
        assert {(r["kernel"], r["arch"]) for r in rows} == {("ternary_gemv.cu ternary_gemv_warp", a)
                                                            for a in ("sm_80", "sm_90")}
        for r in rows:
            assert r["spill_bytes"] == 0, f"{r['kernel']} {r['arch']}: {r['spill_bytes']} B spilled"
            if "sass" in r:
                assert r["sass"]["IDP.4A"] > 0, f"{r['arch']}: no __dp4a (IDP.4A) in the SASS"

    def test_ternary_matmul_uses_integer_tensor_cores(self, compiled):
        rows = [r for r in compiled_rows(compiled, "bitnet") if r["kernel"].startswith("ternary_matmul")]
        assert {r["arch"] for r in rows} == {"sm_80", "sm_90"}
        for r in rows:  # sm_90: wgmma for tiles of 64 rows or more, mma.sync (still int8 tensor cores) below
            mma = r["mma_sync"] if r["arch"] == "sm_80" else r["wgmma"] + r["mma_sync"]
            assert mma > 0, f"{r['kernel']} {r['arch']}: no tensor-core MMA"

    def test_every_gpu_launch_config_of_ternary_matmul_builds_without_spills(self, compiled):
        rows = [r for r in compiled_rows(compiled, "bitnet") if r["kernel"].startswith("ternary_matmul")]
        for config, (bm, bn, bk, warps) in GPU_BLOCKS.items():
            mine = [r for r in rows if f"{bm}x{bn}x{bk}, {warps} warps" in r["kernel"]]
            assert {r["arch"] for r in mine} == {"sm_80", "sm_90"}, f"the {config} config is not compiled"
            for r in mine:
                assert r["spill_bytes"] in (None, 0), f"{r['kernel']} {r['arch']}: {r['spill_bytes']} B spilled"

    @pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour; the GPU tier runs it")
    def test_cuda_library_loads_and_reports_a_cuda_error_without_a_gpu(self):
        from kernels import cuda_ternary
        check_library_reports_cuda_errors(cuda_ternary.LIBRARY, (0, 0, 0, 4, 100, 0), (0, 0, 0, 0, 100, 0))


# ------------------------------------------------------------------------------------------------ tier 4: gpu

@pytest.mark.gpu
class TestGPU:
    @pytest.mark.parametrize("n, k", [(8192, 8192), (37, 130), (5, 7), (20480, 3200)])
    def test_cuda_gemv_and_triton_matmul_are_exact_on_the_device(self, n, k):
        from kernels.cuda_ternary import cuda_ternary_gemv

        x, codes = int_operands(3, n, k, seed=n)
        expected = int64_oracle(x, codes)
        packed = pack_ternary(codes).cuda()
        assert_equal_ints(cuda_ternary_gemv(x[0].cuda(), packed, k).cpu(), expected[0], f"CUDA GEMV {n}x{k}")
        assert_equal_ints(ternary_matmul(x.cuda(), packed, k).cpu(), expected, f"Triton matmul {n}x{k}")

    def test_ternary_linear_on_the_device_equals_the_fake_quant_layer(self):
        torch.manual_seed(0)
        layer = BitLinear(512, 256, bias=False).cuda()
        x = randn(4, 512, seed=1, device="cuda")
        for gemm in (None, ternary_gemm_triton):
            fast = TernaryLinear.from_bitlinear(layer, gemm=gemm)
            assert fast.packed.is_cuda
            assert_close(fast(x), layer(x), f"TernaryLinear on the GPU, gemm={gemm}", 1e-3)

    def test_rmsnorm_quant_on_the_device(self):
        x, w = randn(64, 4096, seed=1, device="cuda", dtype=torch.float16), torch.ones(4096, device="cuda")
        codes, scale = rmsnorm_quant(x, w)
        ref_codes, ref_scale = rmsnorm_quant_reference(x.double().cpu(), w.double().cpu())
        assert (codes.cpu().int() - ref_codes.int()).abs().max() <= 1
        assert_close(scale.cpu(), ref_scale, "scale", 0, rtol=1e-3)
