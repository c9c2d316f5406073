"""The compile tier: build every kernel for sm_80 (A100) and sm_90 (H100/H200) on a machine with no GPU, and read
what the hardware would get: shared memory, registers, spills, and whether tensor-core instructions appear.

Triton: triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32)) runs the real lowering (TTIR ->
TTGIR -> LLVM -> PTX -> cubin) with each kernel's default config; the ptxas shipped in the Triton wheel
(the same binary and flags Triton uses, plus -v) reports registers and spills. Pointers and strides are given
the divisibility-by-16 hints a real launch with torch tensors gets: without them loads are not vectorised and
the register counts would be those of a kernel nobody runs.
CUDA C: nvcc -cubin -Xptxas -v. Neither checks numerics or speed: that is the interpreter and GPU tiers.

    python -m kernels.aot          # a table      (--json: machine-readable, used by the tests)

Triton must not be in interpreter mode here (@triton.jit then builds interpreter objects, not compilable ones),
so the module re-runs itself with TRITON_INTERPRET=0 when needed.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (A100, H100)
CU_SOURCE = Path(__file__).parent / "cuda" / "softmax.cu"


def _ptxas_info(text: str) -> dict:
    """Registers and spill bytes from `ptxas -v` output (summed over the entry functions it lists)."""
    regs = [int(r) for r in re.findall(r"Used (\d+) registers", text)]
    stores = sum(int(s) for s in re.findall(r"(\d+) bytes spill stores", text))
    loads = sum(int(s) for s in re.findall(r"(\d+) bytes spill loads", text))
    return {"registers": max(regs) if regs else None, "spill_bytes": stores + loads}


def ptxas_path():
    """The ptxas inside the Triton wheel that accepts the PTX Triton emits, or None."""
    try:
        import triton
    except ImportError:
        return None
    for name in ("ptxas-blackwell", "ptxas"):
        path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
        if path.exists():
            return str(path)
    return None


def _triton_ptxas(arch: int) -> str:
    """Triton picks the ptxas per arch (the CUDA 12.9 one below sm_90, ptxas-blackwell from sm_90 on)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path
    except (ImportError, AttributeError, TypeError):  # another Triton version: the wheel's newest ptxas
        return ptxas_path()


def _triton_specs():
    """(name, jit function, pointer dtypes, float args, constexprs, num_warps, num_stages) for each kernel's
    default config: the first GPU autotune config of the attention kernels, fp16 inputs, D = 64 and 128."""
    from kernels import flash_attention as fa
    from kernels import softmax as sm

    specs = [("softmax (BLOCK 4096)", sm._softmax_kernel, {"X": "*fp32", "Y": "*fp32"}, (), {"BLOCK": 4096},
              sm._num_warps(4096), 1),
             ("softmax (BLOCK 8192, the fused limit)", sm._softmax_kernel, {"X": "*fp32", "Y": "*fp32"}, (),
              {"BLOCK": 8192}, sm._num_warps(8192), 1),
             ("online_softmax (BLOCK_N 1024)", sm._online_softmax_kernel, {"X": "*fp32", "Y": "*fp32"}, (),
              {"BLOCK_N": 1024}, sm._num_warps(1024), 1)]
    half = dict.fromkeys(["Q", "K", "V", "OUT", "DO", "DQ", "DK", "DV"], "*fp16")
    half.update(LSE="*fp32", DELTA="*fp32", KEY_LEN="*i32", PREFIX_LEN="*i32", TILES="*i32")
    for d in (64, 128):
        for name, tuner, gpu in (("attn_fwd", fa._fwd, fa.FWD_CONFIGS), ("attn_bwd_dkdv", fa._dkdv, fa.DKDV_CONFIGS),
                                 ("attn_bwd_dq", fa._dq, fa.DQ_CONFIGS)):
            bm, bn, warps, stages = gpu[0]
            consts = {"HEAD_DIM": d, "BLOCK_M": bm, "BLOCK_N": bn, "MASK_KIND": fa.MASK_PREFIX}
            if name == "attn_fwd":
                consts["COUNT_TILES"] = False
            specs.append((f"{name} fp16 D={d} prefix mask ({bm}x{bn}, {warps} warps, {stages} stages)", tuner.fn,
                          half, ("sm_scale",), consts, warps, stages))
        specs.append((f"attn_bwd_delta fp16 D={d}", fa._attn_bwd_delta_kernel, half, (),
                      {"HEAD_DIM": d, "BLOCK_M": 64}, 4, 1))
    from kernels import layernorm
    return specs + layernorm.aot_specs()


def compile_triton(archs=ARCHS) -> list:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    ptxas = ptxas_path()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn, pointers, floats, consts, warps, stages in _triton_specs():
            signature, attrs = {}, {}
            for i, p in enumerate(fn.params):
                if p.is_constexpr:
                    signature[p.name] = "constexpr"
                elif p.name in pointers:
                    signature[p.name] = pointers[p.name]
                    attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher sees for torch allocations
                else:
                    signature[p.name] = "fp32" if p.name in floats else "i32"
                    if p.name.startswith("stride_") and not p.name.startswith("stride_l"):
                        attrs[(i,)] = [["tt.divisibility", 16]]  # multiples of D >= 16 (not so the LSE's)
            for arch in archs:
                start = time.perf_counter()
                kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                        target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": warps, "num_stages": stages})
                ptx = kernel.asm["ptx"]
                row = {"kernel": name, "arch": f"sm_{arch}", "shared_bytes": kernel.metadata.shared,
                       "smem_limit": SMEM_LIMIT[arch], "mma_sync": ptx.count("mma.sync"),
                       "wgmma": ptx.count("wgmma.mma_async"), "registers": None, "spill_bytes": None,
                       "compile_s": round(time.perf_counter() - start, 2)}
                if ptxas:  # the ptxas and flags Triton itself uses to build this cubin, plus -v
                    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
                    path = Path(tmp) / f"k{len(results)}.ptx"
                    path.write_text(ptx)
                    out = subprocess.run([_triton_ptxas(arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                          f"--gpu-name={target}", str(path), "-o", str(path) + ".o"],
                                         capture_output=True, text=True, check=True)
                    row.update(_ptxas_info(out.stdout + out.stderr))
                results.append(row)
    return results


def compile_cuda(archs=ARCHS) -> list:
    from kernels.cuda_softmax import nvcc

    compiler = nvcc()
    if compiler is None:
        return []
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            cubin = Path(tmp) / f"softmax_sm{arch}.cubin"
            out = subprocess.run([compiler, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", str(CU_SOURCE), "-o",
                                  str(cubin)], capture_output=True, text=True, check=True)
            text = out.stdout + out.stderr
            for fn, body in re.findall(r"Compiling entry function '(\w+)' for 'sm_\d+'\n(.*?)(?=Compiling entry|\Z)",
                                       text, re.S):
                row = {"kernel": f"softmax.cu {fn}", "arch": f"sm_{arch}", **_ptxas_info(body)}
                row["shared_bytes"] = int(re.search(r"(\d+) bytes smem", body).group(1))
                results.append(row)
            cuobjdump = Path(ptxas_path() or "/nonexistent").with_name("cuobjdump")
            if cuobjdump.exists():
                sass = subprocess.run([str(cuobjdump), "--dump-sass", str(cubin)], capture_output=True, text=True,
                                      check=True).stdout
                for row in results[-2:]:
                    row["shfl_in_sass"] = sass.count("SHFL.BFLY")
    return results


def report(archs=ARCHS) -> dict:
    """Run the compile tier in a fresh process with TRITON_INTERPRET=0: {"triton": [...], "cuda": [...],
    "missing": [reasons]}."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    out = subprocess.run([sys.executable, "-m", "kernels.aot", "--json", "--archs", *map(str, archs)],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parent.parent)
    if out.returncode:
        raise RuntimeError(f"python -m kernels.aot failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def missing_toolchains() -> list:
    from kernels.cuda_softmax import nvcc

    reasons = []
    try:
        import triton  # noqa: F401
    except ImportError:
        reasons.append("triton is not installed")
    if ptxas_path() is None:
        reasons.append("no ptxas in the triton wheel (triton/backends/nvidia/bin)")
    if nvcc() is None:
        reasons.append("nvcc not found")
    return reasons


def table(result: dict) -> str:
    """The report as an aligned text table."""
    lines = [f"{'kernel':<62} {'arch':<6} {'smem B':>7} {'regs':>5} {'spill B':>8} {'mma.sync':>8} {'wgmma':>6}"]
    for r in result["triton"] + result["cuda"]:
        lines.append(f"{r['kernel']:<62} {r['arch']:<6} {r['shared_bytes']:>7} {str(r['registers']):>5} "
                     f"{str(r['spill_bytes']):>8} {str(r.get('mma_sync', '-')):>8} {str(r.get('wgmma', '-')):>6}")
    lines += [f"skipped: {m}" for m in result["missing"]]
    return "\n".join(lines)


def main(argv):
    archs = tuple(int(a) for a in argv[argv.index("--archs") + 1:]) if "--archs" in argv else ARCHS
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        os.execve(sys.executable, [sys.executable, "-m", "kernels.aot", *argv],
                  {**os.environ, "TRITON_INTERPRET": "0"})
    missing = missing_toolchains()
    can_compile_triton = not any("triton" in reason for reason in missing)  # triton and its ptxas
    result = {"triton": compile_triton(archs) if can_compile_triton else [], "cuda": compile_cuda(archs),
              "missing": missing}
    print(json.dumps(result) if "--json" in argv else table(result))


if __name__ == "__main__":
    main(sys.argv[1:])
