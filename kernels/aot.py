"""The compile tier: build every kernel for sm_80 (A100) and sm_90 (H100/H200) on a machine with no GPU, and read
what the hardware would get: shared memory, registers, spills, and whether tensor-core instructions appear.

Triton: triton.compile(ASTSource(...), target=GPUTarget("cuda", 80 | 90, 32)) runs the real lowering (TTIR ->
TTGIR -> LLVM -> PTX -> cubin) with each spec's config; the ptxas shipped in the Triton wheel
(the same binary and flags Triton uses, plus -v) reports registers and spills. Pointers and strides are given
the divisibility-by-16 hints a real launch with torch tensors gets: without them loads are not vectorised and
the register counts would be those of a kernel nobody runs.
CUDA C: nvcc -cubin -Xptxas -v. Neither checks numerics or speed: that is the interpreter and GPU tiers.

What to compile comes from the registry: every module in kernels.KERNEL_MODULES lists AotSpec (Triton) and
CudaSpec (nvcc) entries in its AOT_SPECS, each with the checks it must pass (shared memory, spills, tensor-core
instructions); `problems(row)` applies them and every row carries the result.

    python -m kernels.aot                      # a table; exit status 1 when a check fails
    python -m kernels.aot --only layernorm     # some modules; --archs 80: some archs; --json: for the tests

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

from kernels import CudaSpec

ARCHS = (80, 90)
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (A100, H100)


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


def collect(modules=None):
    """(specs, errors): [(module name, AotSpec | CudaSpec)] from each kernel module's AOT_SPECS, and
    {module: error text} for the modules that fail to import (the others still compile)."""
    import kernels

    specs, errors = [], {}
    for name in modules or kernels.KERNEL_MODULES:
        try:
            module = kernels.kernel_module(name)
        except Exception as e:  # a broken kernel file must not hide the report on the others
            errors[name] = f"{type(e).__name__}: {e}"
            continue
        specs += [(name, spec) for spec in getattr(module, "AOT_SPECS", ())]
    return specs, errors


def _jit_function(kernel):
    """The JITFunction under any @triton.autotune / @triton.heuristics wrappers."""
    from triton.runtime.jit import JITFunction

    while not isinstance(kernel, JITFunction):
        kernel = kernel.fn
    return kernel


def compile_triton(specs=None, archs=ARCHS) -> list:
    """Compile [(module, AotSpec)] (default: every registered one) -> one row per spec and arch."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if specs is None:
        specs = [(m, s) for m, s in collect()[0] if not isinstance(s, CudaSpec)]
    ptxas = ptxas_path()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for module, spec in specs:
            fn = _jit_function(spec.kernel)
            signature, attrs = {}, {}
            for i, p in enumerate(fn.params):
                if p.is_constexpr or p.name in spec.constexprs:  # an int fixed to 1 is how Triton specialises
                    signature[p.name] = "constexpr"
                elif p.name in spec.pointers:
                    signature[p.name] = spec.pointers[p.name]
                    attrs[(i,)] = [["tt.divisibility", 16]]  # what the launcher sees for torch allocations
                else:
                    signature[p.name] = spec.scalars.get(p.name, "i32")
                    aligned = (p.name in spec.divisible if spec.divisible is not None
                               else p.name.startswith("stride_"))
                    if aligned and signature[p.name] in ("i32", "i64"):
                        attrs[(i,)] = [["tt.divisibility", 16]]
            for arch in (a for a in spec.archs if a in archs):
                start = time.perf_counter()
                kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=spec.constexprs,
                                                  attrs=attrs),
                                        target=GPUTarget("cuda", arch, 32),
                                        options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
                ptx = kernel.asm["ptx"]
                row = {"module": module, "kernel": spec.name, "arch": f"sm_{arch}",
                       "shared_bytes": kernel.metadata.shared, "smem_limit": SMEM_LIMIT[arch],
                       "mma_sync": ptx.count("mma.sync"), "wgmma": ptx.count("wgmma.mma_async"),
                       "registers": None, "spill_bytes": None, "compile_s": round(time.perf_counter() - start, 2),
                       "max_spill_bytes": spec.max_spill_bytes, "mma": spec.mma}
                if ptxas:  # the ptxas and flags Triton itself uses to build this cubin, plus -v
                    target = re.search(r"^\.target\s+(\S+)", ptx, re.M).group(1).rstrip(",")
                    path = Path(tmp) / f"k{len(results)}.ptx"
                    path.write_text(ptx)
                    out = subprocess.run([_triton_ptxas(arch), "-lineinfo", "-v", "--regAllocOptLevel=2",
                                          f"--gpu-name={target}", str(path), "-o", str(path) + ".o"],
                                         capture_output=True, text=True, check=True)
                    row.update(_ptxas_info(out.stdout + out.stderr))
                row["problems"] = problems(row)
                results.append(row)
    return results


def problems(row: dict) -> list:
    """What a compiled row violates among its spec's checks (an empty list: it passes)."""
    found = []
    where = f"{row['kernel']} on {row['arch']}"
    if "smem_limit" in row and not row["shared_bytes"] <= row["smem_limit"]:
        found.append(f"{where}: {row['shared_bytes']} B of shared memory, over the {row['smem_limit']} B limit")
    if row["spill_bytes"] is not None and row["spill_bytes"] > row["max_spill_bytes"]:
        found.append(f"{where}: {row['spill_bytes']} B of register spills ({row['registers']} registers), "
                     f"allowed {row['max_spill_bytes']}")
    if row.get("mma"):
        count, what = (row["mma_sync"], "mma.sync") if row["arch"] == "sm_80" else (row["wgmma"], "wgmma.mma_async")
        if not count:
            found.append(f"{where}: no {what} in the PTX (tl.dot fell off the tensor cores)")
    for pattern, count in row.get("sass", {}).items():
        if not count:
            found.append(f"{where}: no {pattern} in the SASS")
    return found


def compile_cuda(specs=None, archs=ARCHS) -> list:
    """Compile [(module, CudaSpec)] (default: every registered one) -> one row per entry function and arch."""
    from kernels.cuda_build import nvcc

    compiler = nvcc()
    if compiler is None:
        return []
    if specs is None:
        specs = [(m, s) for m, s in collect()[0] if isinstance(s, CudaSpec)]
    cuobjdump = Path(ptxas_path() or "/nonexistent").with_name("cuobjdump")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for module, spec in specs:
            for arch in (a for a in spec.archs if a in archs):
                cubin = Path(tmp) / f"{module}_{len(results)}_sm{arch}.cubin"
                out = subprocess.run([compiler, f"-arch=sm_{arch}", "-cubin", "-Xptxas", "-v", str(spec.source),
                                      "-o", str(cubin)], capture_output=True, text=True)
                if out.returncode:
                    raise RuntimeError(f"nvcc failed on {spec.source} for sm_{arch}:\n{out.stderr[-4000:]}")
                text = out.stdout + out.stderr
                sass = ""
                if spec.sass and cuobjdump.exists():
                    sass = subprocess.run([str(cuobjdump), "--dump-sass", str(cubin)], capture_output=True,
                                          text=True, check=True).stdout
                entries = re.findall(r"Compiling entry function '(\w+)' for 'sm_\d+'\n(.*?)(?=Compiling entry|\Z)",
                                     text, re.S)
                for fn, body in entries:
                    row = {"module": module, "kernel": f"{spec.name} {fn}", "arch": f"sm_{arch}",
                           **_ptxas_info(body), "max_spill_bytes": spec.max_spill_bytes,
                           "shared_bytes": int(m.group(1)) if (m := re.search(r"(\d+) bytes smem", body)) else 0}
                    if sass:  # counted over the whole cubin: every entry shares the helpers that shuffle
                        row["sass"] = {pattern: sass.count(pattern) for pattern in spec.sass}
                    row["problems"] = problems(row)
                    results.append(row)
    return results


def report(archs=ARCHS, modules=None) -> dict:
    """Run the compile tier in a fresh process with TRITON_INTERPRET=0: {"triton": [...], "cuda": [...],
    "missing": [reasons], "errors": {module: import error}}. `modules`: a subset of KERNEL_MODULES."""
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    argv = ["--json", *(["--only", *modules] if modules else []), "--archs", *map(str, archs)]
    out = subprocess.run([sys.executable, "-m", "kernels.aot", *argv], capture_output=True, text=True, env=env,
                         cwd=Path(__file__).parent.parent)
    if out.returncode:
        raise RuntimeError(f"python -m kernels.aot failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def missing_toolchains() -> list:
    from kernels.cuda_build import nvcc

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
    lines = [f"{'kernel':<62} {'arch':<6} {'smem B':>7} {'regs':>5} {'spill B':>8} {'mma.sync':>8} {'wgmma':>6}  "
             f"checks"]
    for r in result["triton"] + result["cuda"]:
        lines.append(f"{r['kernel']:<62} {r['arch']:<6} {r['shared_bytes']:>7} {str(r['registers']):>5} "
                     f"{str(r['spill_bytes']):>8} {str(r.get('mma_sync', '-')):>8} {str(r.get('wgmma', '-')):>6}  "
                     + ("ok" if not r["problems"] else "FAIL"))
    lines += [f"FAIL: {p}" for r in result["triton"] + result["cuda"] for p in r["problems"]]
    lines += [f"skipped: {m}" for m in result["missing"]]
    lines += [f"not imported: kernels.{m}: {e}" for m, e in result["errors"].items()]
    return "\n".join(lines)


def _option(argv, flag):
    """The values after `flag` up to the next --option, or None."""
    if flag not in argv:
        return None
    values = argv[argv.index(flag) + 1:]
    return [v for v in values[:next((i for i, v in enumerate(values) if v.startswith("--")), len(values))]]


def main(argv):
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        os.execve(sys.executable, [sys.executable, "-m", "kernels.aot", *argv],
                  {**os.environ, "TRITON_INTERPRET": "0"})
    archs = tuple(int(a) for a in _option(argv, "--archs") or ARCHS)
    missing = missing_toolchains()
    specs, errors = collect(_option(argv, "--only"))
    can_compile_triton = not any("triton" in reason for reason in missing)  # triton and its ptxas
    triton_specs = [(m, s) for m, s in specs if not isinstance(s, CudaSpec)]
    cuda_specs = [(m, s) for m, s in specs if isinstance(s, CudaSpec)]
    result = {"triton": compile_triton(triton_specs, archs) if can_compile_triton else [],
              "cuda": compile_cuda(cuda_specs, archs), "missing": missing, "errors": errors}
    if "--json" in argv:
        print(json.dumps(result))
        return
    print(table(result))
    if errors or any(r["problems"] for r in result["triton"] + result["cuda"]):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
