"""Benchmark the kernels against PyTorch, or, without a GPU, check them.

    python -m kernels.bench            # on a GPU: the full table (about a minute); --quick: one shape each

On a CUDA device: attention in TFLOP/s (forward 4 B H N^2 D, half that for causal; forward + backward 3.5x the
forward) for our FlashAttention and torch SDPA; softmax in GB/s (one read and one write of the matrix) for
the Triton kernels, the CUDA C kernels, torch.softmax and eager PyTorch. Each is also shown as a percentage of
a peak measured on the same device in the same run: a bf16 GEMM for TFLOP/s, a device-to-device copy for GB/s.
Timings are medians of triton.testing.do_bench (it flushes the L2 cache between runs).

On a CPU there is nothing meaningful to time (the interpreter's speed says nothing about a GPU): the script
says so and runs the correctness sweep instead, every mask kind and dtype against the float64 reference.
"""

import argparse

import torch

import kernels
from kernels.flash_attention import allowed_mask, flash_attention, reference_attention, tile_plan
from kernels.softmax import online_softmax, softmax, softmax_reference

MASK_KINDS = {"none": {}, "causal": {"causal": True}, "prefix": {"prefix_len": "half"},
              "prefix+key_lengths": {"prefix_len": "half", "key_lengths": "3/4"}}


def _mask(kind: str, batch: int, n: int) -> dict:
    values = {"half": n // 2, "3/4": [3 * n // 4] * batch}
    return {k: values.get(v, v) for k, v in MASK_KINDS[kind].items()}


def visible_fraction(kind: str, n: int) -> float:
    """Fraction of the N x N (query, key) pairs a mask keeps: the FLOPs a perfect kernel does. Row i sees
    min(key_len, max(prefix, i + 1)) keys; causal counts as exactly one half (the usual convention)."""
    if kind in ("none", "causal"):
        return 1.0 if kind == "none" else 0.5
    mask = _mask(kind, 1, n)
    key_len = mask.get("key_lengths", [n])[0]
    seen = torch.arange(1, n + 1).clamp(min=mask.get("prefix_len", 0)).clamp(max=key_len)
    return seen.sum().item() / n**2


def tile_fractions(kind: str, n: int, block_m: int = 128, block_n: int = 64) -> dict:
    """Share of the (query tile, key tile) pairs visited with and without the mask, and skipped."""
    plan = tile_plan(allowed_mask(n, n, batch=1, **_mask(kind, 1, n))[0, 0], block_m, block_n)
    total = plan.numel()
    return {"full": (plan == 2).sum().item() / total, "masked": (plan == 1).sum().item() / total,
            "skipped": (plan == 0).sum().item() / total}


# ------------------------------------------------------------------------------------------------ GPU

def _ms(fn, grads=None) -> float:
    from triton.testing import do_bench

    return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")


def measure_peaks(quick: bool = False) -> dict:
    n = 4096 if quick else 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    tflops = 2 * n**3 / _ms(lambda: a @ b) / 1e9
    src = torch.empty(2**28, device="cuda", dtype=torch.uint8)  # 256 MiB, far larger than L2
    dst = torch.empty_like(src)
    gbs = 2 * src.numel() / _ms(lambda: dst.copy_(src)) / 1e6
    return {"gemm_tflops": tflops, "copy_gbs": gbs, "gemm_n": n}


def _attention_impls(q, k, v, kind, mask):
    sdpa = torch.nn.functional.scaled_dot_product_attention
    impls = {"flash (ours)": lambda: flash_attention(q, k, v, **mask)}
    if kind == "prefix":  # SDPA has no prefix mask: it gets the dense boolean mask (N^2 bytes)
        dense = allowed_mask(q.size(2), k.size(2), batch=1, device=q.device, **mask)
        impls["SDPA + dense mask"] = lambda: sdpa(q, k, v, attn_mask=dense)
    else:
        impls["SDPA"] = lambda: sdpa(q, k, v, is_causal=kind == "causal")
    return impls


def _attention_rows(quick, peak):
    rows = []
    B, H = 4, 16
    sizes = (1024,) if quick else (1024, 2048, 4096, 8192, 16384)
    for n in sizes:
        for d in (64, 128):
            for kind in ("none", "causal", "prefix"):
                q, k, v = (torch.randn(B, H, n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                           for _ in range(3))
                flops = 4 * B * H * n * n * d * visible_fraction(kind, n)
                for name, fn in _attention_impls(q, k, v, kind, _mask(kind, B, n)).items():
                    do = torch.randn_like(q)
                    for mode, mult in (("fwd", 1.0), ("fwd+bwd", 3.5)):
                        ms = _ms(fn) if mode == "fwd" else _ms(lambda: fn().backward(do), grads=[q, k, v])
                        tf = mult * flops / ms / 1e9
                        rows.append({"kernel": "attention", "impl": name, "mode": mode, "mask": kind, "ms": ms,
                                     "shape": f"B{B} H{H} N{n} D{d}", "tflops": tf,
                                     "pct_peak": 100 * tf / peak["gemm_tflops"]})
    return rows


def _softmax_rows(quick, peak):
    from kernels import cuda_softmax

    rows = []
    m = n = 4096
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(m, n, device="cuda", dtype=dtype)
        impls = {"triton one-pass": lambda: softmax(x), "triton online": lambda: online_softmax(x),
                 "torch.softmax": lambda: torch.softmax(x, -1), "eager (5 kernels)": lambda: softmax_reference(x)}
        if dtype == torch.float32 and cuda_softmax.nvcc() is not None:
            impls["CUDA C v1 (two reductions)"] = lambda: cuda_softmax.cuda_softmax(x, version=1)
            impls["CUDA C v2 (online)"] = lambda: cuda_softmax.cuda_softmax(x, version=2)
        for name, fn in impls.items():
            ms = _ms(fn)
            gbs = 2 * x.numel() * x.element_size() / ms / 1e6
            rows.append({"kernel": "softmax", "impl": name, "mode": "fwd", "shape": f"{m}x{n} {str(dtype)[6:]}",
                         "mask": "-", "ms": ms, "gbs": gbs, "pct_peak": 100 * gbs / peak["copy_gbs"]})
    return rows


def gpu_benchmark(quick: bool = False) -> list:
    peak = measure_peaks(quick)
    print(f"device: {torch.cuda.get_device_name()}; measured peaks: bf16 GEMM {peak['gemm_n']}^3 "
          f"{peak['gemm_tflops']:.0f} TFLOP/s, device copy {peak['copy_gbs']:.0f} GB/s (read + write)")
    rows = _attention_rows(quick, peak) + _softmax_rows(quick, peak)
    print(f"{'kernel':<10} {'impl':<28} {'mode':<8} {'shape':<22} {'mask':<7} {'ms':>9} {'rate':>14} {'% peak':>7}")
    for r in rows:
        rate = f"{r['tflops']:.1f} TFLOP/s" if "tflops" in r else f"{r['gbs']:.0f} GB/s"
        print(f"{r['kernel']:<10} {r['impl']:<28} {r['mode']:<8} {r['shape']:<22} {r['mask']:<7} {r['ms']:>9.3f} "
              f"{rate:>14} {r['pct_peak']:>6.1f}%")
    return rows


# ------------------------------------------------------------------------------------------------ CPU

def correctness_sweep(quick: bool = False) -> list:
    """Every mask kind x dtype x head size through the kernels (interpreter on a CPU) vs the float64
    reference: max |error| of O, LSE and the three gradients."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    B, H, T = 2, 1, 200
    for dtype in (torch.float32, torch.float16):
        for d in ((64,) if quick else (32, 64)):
            for kind in MASK_KINDS:
                g = torch.Generator().manual_seed(d)
                q, k, v, do = (torch.randn(B, H, T, d, generator=g).to(device, dtype) for _ in range(4))
                mask = _mask(kind, B, T)
                leaves = [x.clone().requires_grad_() for x in (q, k, v)]
                out, lse = flash_attention(*leaves, return_lse=True, **mask)
                out.backward(do)
                ref = [x.double().requires_grad_() for x in (q, k, v)]
                ref_out, ref_lse = reference_attention(*ref, return_lse=True, **mask)
                ref_out.backward(do.double())
                errs = [(out.double() - ref_out).abs().max().item(), (lse.double() - ref_lse).abs().max().item()]
                errs += [(a.grad.double() - r.grad).abs().max().item() for a, r in zip(leaves, ref)]
                rows.append({"dtype": str(dtype)[6:], "D": d, "mask": kind, "errors": errs})
    x = torch.randn(37, 1000, generator=torch.Generator().manual_seed(0)).to(device)
    for name, fn in (("softmax", softmax), ("online_softmax", lambda t: online_softmax(t, block_n=128))):
        rows.append({"dtype": "float32", "D": "-", "mask": name,
                     "errors": [(fn(x).double() - softmax_reference(x.double())).abs().max().item()]})
    return rows


def print_sweep(rows) -> None:
    print(f"{'dtype':<8} {'D':>3} {'mask / kernel':<20} {'O':>9} {'LSE':>9} {'dQ':>9} {'dK':>9} {'dV':>9}")
    for r in rows:
        print(f"{r['dtype']:<8} {r['D']:>3} {r['mask']:<20} " + " ".join(f"{e:>9.1e}" for e in r["errors"]))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one shape per kernel (a smoke test)")
    args = parser.parse_args(argv)
    if torch.cuda.is_available() and not kernels.INTERPRET:
        gpu_benchmark(args.quick)
        return
    print("GPU timings unavailable: no CUDA device here (or TRITON_INTERPRET=1). Interpreter speed says nothing "
          "about a GPU,\nso this runs the correctness sweep instead: the kernels vs the float64 reference, "
          "max |error|.\n")
    print_sweep(correctness_sweep(args.quick))
    print("\nWhat the masks save, independent of hardware (N = 4096, the GPU default 128 x 64 tiles):")
    print(f"{'mask':<20} {'visible pairs':>14} {'tiles unmasked':>15} {'tiles masked':>13} {'tiles skipped':>14}")
    for kind in MASK_KINDS:
        if kind == "prefix+key_lengths":
            continue
        f = tile_fractions(kind, 4096)
        exact = allowed_mask(4096, 4096, batch=1, **_mask(kind, 1, 4096)).float().mean().item()
        print(f"{kind:<20} {exact:>14.1%} {f['full']:>15.1%} {f['masked']:>13.1%} {f['skipped']:>14.1%}")
    print("\nOn a GPU machine the same command prints the timing table instead.")

if __name__ == "__main__":
    main()
