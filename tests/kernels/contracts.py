"""The kernel contract harness: every public kernel wrapper, registered once, run over generated layouts.

A registration (`Contract`) names the wrapper, its float64 reference and its tensor arguments (`Arg`: a shape
built from the case's sizes, the accepted dtypes, whether a stride-0 expansion is legal). From it `cases`
generates, for a sampled (sizes, dtype, argument, layout):

    layout   contiguous | transposed (a (.., n, m) view of an (.., m, n) buffer) | sliced ([::2] rows of a buffer
             twice as tall) | offset (one element into a flat buffer) | expanded (stride 0 along dim 0) | empty
             (0 rows)
    dtype    each accepted dtype; one rejected dtype must raise ValueError naming the argument
    out=     when the wrapper takes one: a view (contiguous, transposed, every other row) into a sentinel-filled
             buffer whose slack must stay untouched

and `run_case` checks the contract: the wrapper returns the reference's values (within the registration's
tolerance for the dtype) or raises ValueError before any launch; it never returns garbage, writes outside its
output or raises anything else. A contiguous input must always be accepted. A kernel added later registers with
one `Contract(...)` entry in CONTRACTS.

Kernel modules covered (the repository check greps this file for each): adaln, bitnet, cpu_ternary, cuda_build,
cuda_softmax, cuda_ternary, dilated_attention, flash_attention, grouped_gemm, layernorm, retention, softmax. The CUDA
modules (cuda_softmax, cuda_ternary, and cuda_build, the nvcc loader they share) are registered with their
specs and skipped with a reason when no GPU with an nvcc-built library runs; cpu_ternary (pure C) runs.
"""

import math
import random
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

import kernels
from kernels import cuda_build

SENTINEL = 12345.0
LAYOUTS = ("contiguous", "transposed", "sliced", "offset", "expanded", "empty")
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
ATOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2, torch.int8: 0, torch.int32: 0}


@dataclass
class Arg:
    name: str
    shape: Callable[[dict], tuple]  # the case's sizes -> this argument's shape
    dtypes: tuple = FLOATS  # accepted; the first rejected one of FLOATS + (float64,) must raise ValueError
    expandable: bool = True  # a stride-0 expansion along dim 0 is a legal input
    make: Optional[Callable] = None  # (shape, dtype, generator) -> values; default randn
    build: Optional[Callable] = None  # sizes -> the one legal value (routing metadata tied to the sizes)


@dataclass
class Contract:
    module: str  # kernels/<module>.py
    name: str
    wrapper: Callable  # (**tensors, **kwargs) -> tensor (or tuple, compared elementwise)
    reference: Callable  # (**float64 tensors, **kwargs) -> the same
    args: list
    sizes: list  # dicts of sizes: include 1, primes, non-multiples of the blocks
    out_shape: Optional[Callable] = None  # sizes -> shape of `out=` when the wrapper takes one
    out_dtype: Optional[Callable] = None  # the case's dtype -> the dtype of `out=` (default: the same)
    same_dtype: bool = True  # every float argument has the first one's dtype
    skip: Optional[Callable[[], Optional[str]]] = None  # -> a reason when it cannot run here
    atol: dict = field(default_factory=lambda: dict(ATOL))
    samples: int = 12  # generated layout cases (sampled from the cross product)


def _values(arg: Arg, sizes: dict, dtype, gen) -> torch.Tensor:
    if arg.build is not None:
        return arg.build(sizes)
    shape = arg.shape(sizes)
    if arg.make is not None:
        return arg.make(shape, dtype, gen).to(dtype)  # a rejected dtype reaches the wrapper as that dtype
    return torch.randn(shape, generator=gen).to(dtype)


def layout(t: torch.Tensor, kind: str) -> torch.Tensor:
    """t's values (for kind 'expanded': row 0's, repeated) in the named memory layout."""
    if kind in ("contiguous", "empty") or t.dim() == 0:  # empty: the sizes already hold 0 rows
        return t.contiguous()
    if kind == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t.contiguous()
    if kind == "sliced":
        buf = torch.zeros((2 * t.size(0),) + t.shape[1:], dtype=t.dtype)
        buf[::2] = t
        return buf[::2]
    if kind == "offset":
        buf = torch.zeros(t.numel() + 1, dtype=t.dtype)
        view = buf[1:].view(t.shape)
        view.copy_(t)
        return view
    if kind == "expanded":
        return t[:1].expand(t.shape)
    raise ValueError(f"kind: one of {LAYOUTS}, got {kind!r}")


OUT_VIEWS = ("out", "out.T", "out[::2]")  # out= as a contiguous view, a transposed one, every other row


def _out_strides(shape: tuple, view: str) -> tuple:
    """The strides of an `out=` view of this kind inside the guard-band buffer (room for twice its elements)."""
    strides = list(torch.empty(shape).stride())
    if view == "out.T" and len(shape) >= 2:
        strides[-2:] = 1, shape[-2]
    if view == "out[::2]":
        strides[0] *= 2
    return tuple(strides)


def _flat(result) -> list:
    return list(result) if isinstance(result, (tuple, list)) else [result]


@dataclass
class Case:
    contract: Contract
    sizes: dict
    dtype: torch.dtype
    arg: Optional[str]  # the argument laid out (or given the rejected dtype); None: all contiguous
    kind: str  # a layout, "reject-dtype" or "out"

    @property
    def id(self) -> str:
        size = ",".join(f"{k}={v}" for k, v in self.sizes.items())
        return f"{self.contract.name}[{size}|{str(self.dtype)[6:]}|{self.arg}:{self.kind}]"


def cases(contract: Contract, seed: int = 0) -> list:
    """Every dtype and rejected dtype on the first sizes, the out= guard band per dtype, and `samples` layout
    cases drawn from sizes x dtypes x arguments x LAYOUTS (seeded)."""
    rng = random.Random(seed)
    first = contract.args[0]
    out = [Case(contract, contract.sizes[0], d, None, "contiguous") for d in first.dtypes]
    rejected = [d for d in FLOATS + (torch.float64,) if d not in first.dtypes]
    if rejected:
        out += [Case(contract, contract.sizes[0], rejected[0], a.name, "reject-dtype") for a in contract.args
                if a.dtypes == first.dtypes]
    if contract.out_shape is not None:
        out += [Case(contract, s, first.dtypes[0], "out", "out") for s in contract.sizes]
        out += [Case(contract, contract.sizes[-1], first.dtypes[0], view, "out") for view in OUT_VIEWS[1:]]
    space = [(s, d, a.name, k) for s in contract.sizes for d in first.dtypes[:2] for a in contract.args
             for k in LAYOUTS[1:] if k != "expanded" or a.expandable]
    out += [Case(contract, *c) for c in rng.sample(space, min(contract.samples, len(space)))]
    return out


def run_case(case: Case) -> str:
    """Check one case: 'ok' (matched the reference), 'rejected' (a ValueError naming the argument, allowed for
    non-contiguous layouts and empty inputs). An AssertionError says what broke."""
    c = case.contract
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))  # str hash() is salted per process
    sizes = dict(case.sizes)
    if case.kind == "empty":
        sizes = {**sizes, next(iter(sizes)): 0}  # the first size (the rows) becomes 0
    tensors = {}
    for a in c.args:
        dtype = case.dtype if a.dtypes == c.args[0].dtypes or case.dtype in a.dtypes else a.dtypes[0]
        if case.kind == "reject-dtype" and a.name == case.arg:
            dtype = case.dtype
        elif case.kind == "reject-dtype":
            dtype = a.dtypes[0]
        t = _values(a, sizes, dtype, gen)
        tensors[a.name] = layout(t, case.kind) if a.name == case.arg and case.kind in LAYOUTS else t
    if case.kind == "reject-dtype":
        try:
            c.wrapper(**tensors)
        except ValueError as e:
            assert case.arg in str(e) or "dtype" in str(e), f"{case.id}: ValueError without the name: {e}"
            return "rejected"
        raise AssertionError(f"{case.id}: dtype {case.dtype} of {case.arg} accepted")
    kwargs, buf = {}, None
    if case.kind == "out":
        shape, dtype = c.out_shape(sizes), (c.out_dtype or (lambda d: d))(case.dtype)
        sentinel = SENTINEL if dtype.is_floating_point else torch.iinfo(dtype).min  # no kernel here writes iinfo.min
        buf = torch.full((2 * math.prod(shape) + 64,), sentinel, dtype=dtype)
        kwargs["out"] = buf.as_strided(shape, _out_strides(shape, case.arg), 32)
    try:
        got = c.wrapper(**tensors, **kwargs)
    except ValueError as e:
        assert case.kind != "contiguous" and case.arg != "out", f"{case.id}: a contiguous input was rejected: {e}"
        name = "out" if case.kind == "out" else case.arg
        assert name in str(e) or case.kind == "empty", f"{case.id}: ValueError without the name: {e}"
        return "rejected"
    want = c.reference(**{k: (v.double() if v.is_floating_point() else v) for k, v in tensors.items()})
    for i, (g, w) in enumerate(zip(_flat(got), _flat(want))):
        assert g.shape == w.shape, f"{case.id}: output {i} shape {tuple(g.shape)}, want {tuple(w.shape)}"
        tol = c.atol[g.dtype if g.dtype in c.atol else torch.float32]
        diff = (g.double() - w.double()).abs().nan_to_num(nan=math.inf)
        assert diff.numel() == 0 or diff.max() <= tol, f"{case.id}: output {i} off by {diff.max():.3g} (atol {tol})"
        if not g.is_floating_point() and tol > 0:  # integer codes allowed off by one only at the rare rounding tie
            off = int((diff > 0).sum())
            assert off <= 1 + diff.numel() // 100, f"{case.id}: output {i}: {off} of {diff.numel()} codes differ"
    if buf is not None:
        inside = torch.zeros(buf.shape, dtype=torch.bool)
        inside.as_strided(kwargs["out"].shape, kwargs["out"].stride(), 32).fill_(True)
        slack = buf[~inside]
        assert (slack == sentinel).all(), f"{case.id}: {int((slack != sentinel).sum())} guard cells written"
    return "ok"


# ----------------------------------------------------------------------------- registrations

def _needs_interpreter_or_gpu() -> Optional[str]:
    if not kernels.HAS_TRITON:
        return "triton is not installed"
    return None


def _needs_cuda_library() -> Optional[str]:
    if not torch.cuda.is_available():
        return "no CUDA device: the nvcc-built library (kernels/cuda_build.py) cannot run"
    if cuda_build.nvcc() is None:
        return "nvcc not found: kernels/cuda_build.py cannot build the library"
    return None


def _needs_c_compiler() -> Optional[str]:
    from kernels import cpu_ternary
    return None if cpu_ternary.c_compiler() else "no C compiler for kernels/cpu_ternary.py"


def _contracts() -> list:
    from kernels.adaln import adaln_modulate, modulate_reference
    from kernels.dilated_attention import dilated_branch_kernel
    from kernels.flash_attention import flash_attention, reference_attention
    from kernels.layernorm import add_norm_reference, layer_norm, rms_norm
    from kernels.retention import retention
    from kernels.softmax import online_softmax, softmax, softmax_reference
    from nanomodels.bitlinear import pack_ternary
    from nanomodels.dilated import dilated_branch
    from nanomodels.retnet import retention_parallel

    rows = [{"m": 1, "n": 1}, {"m": 7, "n": 37}, {"m": 5, "n": 128}, {"m": 3, "n": 131}]
    x, w = Arg("x", lambda s: (s["m"], s["n"])), Arg("weight", lambda s: (s["n"],), expandable=False)
    cond = [Arg(k, lambda s: (s["m"], s["n"])) for k in ("shift", "scale")]
    attn = [{"t": 1, "d": 16}, {"t": 37, "d": 16}, {"t": 67, "d": 32}]
    qkv = [Arg(k, lambda s: (1, 2, s["t"], s["d"])) for k in "qkv"]
    codes = Arg("x_codes", lambda s: (s["m"], s["k"]), dtypes=(torch.int8,),
                make=lambda shape, d, g: torch.randint(-127, 128, shape, generator=g).to(torch.int8))
    ternary = Arg("packed", lambda s: (s["n"], -(-s["k"] // 4)), dtypes=(torch.uint8,), expandable=False,
                  make=lambda shape, d, g: pack_ternary(torch.randint(-1, 2, (shape[0], 4 * shape[1]), generator=g)))

    def ternary_ref(x_codes, packed):
        from nanomodels.bitlinear import unpack_ternary
        return (x_codes.long() @ unpack_ternary(packed, x_codes.size(1)).long().t()).to(torch.int32)

    from kernels import cpu_ternary, cuda_softmax, cuda_ternary
    from kernels.bitnet import rmsnorm_quant, ternary_matmul
    from kernels.grouped_gemm import grouped_gemm

    scales = [Arg("x_scale", lambda s: (s["m"], 1), dtypes=(torch.float32,),
                  make=lambda shape, d, g: 100 + 100 * torch.rand(shape, generator=g)),  # 127 / max|h| of real rows
              Arg("w_scale", lambda s: (), dtypes=(torch.float32,), expandable=False,
                  make=lambda shape, d, g: 0.5 + torch.rand(shape, generator=g))]

    def rescaled_ref(x_codes, packed, x_scale, w_scale):
        return ternary_ref(x_codes, packed).double() / x_scale / w_scale

    moe = [{"m": 1, "k": 1, "n": 1, "e": 1}, {"m": 37, "k": 37, "n": 5, "e": 3}, {"m": 70, "k": 33, "n": 67, "e": 2}]
    routing = [Arg(name, None, dtypes=(dtype,), expandable=False, build=lambda s, i=i: _routing(s)[i])
               for i, (name, dtype) in enumerate((("a_rows", torch.int64), ("c_rows", torch.int64),
                                                  ("block_expert", torch.int32), ("expert_blocks", torch.int32)))]
    return [
        Contract("softmax", "softmax", softmax, softmax_reference, [x], rows, out_shape=lambda s: (s["m"], s["n"]),
                 skip=_needs_interpreter_or_gpu),
        Contract("softmax", "online_softmax", online_softmax, softmax_reference, [x], rows,
                 skip=_needs_interpreter_or_gpu),
        Contract("layernorm", "layer_norm", layer_norm,
                 lambda x, weight: add_norm_reference(x, None, weight), [x, w], rows,
                 skip=_needs_interpreter_or_gpu),
        Contract("layernorm", "rms_norm", rms_norm,
                 lambda x, weight: add_norm_reference(x, None, weight, rms=True), [x, w], rows,
                 skip=_needs_interpreter_or_gpu),
        Contract("adaln", "adaln_modulate", adaln_modulate, modulate_reference, [x] + cond, rows,
                 skip=_needs_interpreter_or_gpu),
        Contract("flash_attention", "flash_attention", flash_attention, reference_attention, qkv, attn,
                 skip=_needs_interpreter_or_gpu, samples=6),
        Contract("dilated_attention", "dilated_branch_kernel",
                 lambda q, k, v, **kw: dilated_branch_kernel(q, k, v, 16, 2, **kw)[0],
                 lambda q, k, v: dilated_branch(q, k, v, 16, 2)[0], qkv, attn, skip=_needs_interpreter_or_gpu,
                 samples=6),
        Contract("retention", "retention",
                 lambda q, k, v: retention(q, k, v, torch.tensor([0.9, 0.99])),
                 lambda q, k, v: retention_parallel(q, k, v, torch.tensor([0.9, 0.99], dtype=q.dtype)), qkv, attn,
                 skip=_needs_interpreter_or_gpu, samples=6,
                 # unnormalised sums of up to 67 decayed q.k v terms (outputs up to ~130 here): the rounding of the inputs'
                 # dtype times that size, not the per-element bounds of a normalised kernel
                 atol={**ATOL, torch.float32: 5e-4, torch.float16: 0.1, torch.bfloat16: 0.5}),
        Contract("cpu_ternary", "ternary_gemm_cpu",
                 lambda x_codes, packed: cpu_ternary.ternary_gemm_cpu(x_codes, packed, x_codes.size(1)),
                 ternary_ref, [codes, ternary], [{"m": 1, "k": 1, "n": 1}, {"m": 3, "k": 37, "n": 5}],
                 skip=_needs_c_compiler, samples=6),
        Contract("cuda_softmax", "cuda_softmax", cuda_softmax.cuda_softmax, softmax_reference, [x], rows,
                 skip=_needs_cuda_library),
        Contract("cuda_ternary", "cuda_ternary_gemv",
                 lambda x_codes, packed: cuda_ternary.cuda_ternary_gemv(x_codes, packed, x_codes.size(1)),
                 ternary_ref, [codes, ternary], [{"m": 1, "k": 16, "n": 4}], skip=_needs_cuda_library),
        Contract("bitnet", "rmsnorm_quant", rmsnorm_quant, _rmsnorm_quant_ref,
                 [x, Arg("weight", lambda s: (s["n"],), expandable=False,
                         make=lambda shape, d, g: (torch.rand(shape, generator=g) + 0.5).to(d))], rows,
                 out_shape=lambda s: (s["m"], s["n"]), out_dtype=lambda d: torch.int8, skip=_needs_interpreter_or_gpu,
                 # float32 in the kernel, float64 in the reference: a code at a rounding tie may round either way
                 atol={**ATOL, torch.int8: 1}),
        Contract("bitnet", "ternary_matmul",
                 lambda x_codes, packed, x_scale, w_scale, **kw: ternary_matmul(x_codes, packed, x_codes.size(1),
                                                                                x_scale, w_scale, **kw),
                 rescaled_ref, [codes, ternary] + scales, [{"m": 1, "k": 1, "n": 1}, {"m": 17, "k": 37, "n": 33}],
                 out_shape=lambda s: (s["m"], s["n"]), out_dtype=lambda d: torch.float32,
                 skip=_needs_interpreter_or_gpu, samples=8),
        Contract("grouped_gemm", "grouped_gemm",
                 lambda a, w, **meta: grouped_gemm(a, w, **meta, out_rows=a.size(0)), _grouped_gemm_ref,
                 [Arg(name, shape, make=lambda shape, d, g: (torch.randn(shape, generator=g) / 4).to(d))  # |out| < 4:
                  for name, shape in (("a", lambda s: (s["m"], s["k"])),  # the output's own rounding within ATOL
                                      ("w", lambda s: (s["e"], s["n"], s["k"])))] + routing, moe,
                 skip=_needs_interpreter_or_gpu, samples=8),
    ]


def _rmsnorm_quant_ref(x, weight):
    from kernels.bitnet import rmsnorm_quant_reference
    if x.numel() == 0:  # nanomodels' quantizer refuses empty rows; the kernel's answer is the empty pair
        return torch.empty(x.shape, dtype=torch.int8), torch.empty(*x.shape[:-1], 1, dtype=torch.float64)
    return rmsnorm_quant_reference(x, weight)


def _routing(sizes: dict) -> tuple:
    """align_by_expert's metadata for m tokens, one expert each (seeded by the sizes): a_rows, c_rows (the token
    itself, padding rows 0), block_expert, expert_blocks."""
    from kernels.grouped_gemm import align_by_expert
    gen = torch.Generator().manual_seed(sizes["m"] * 1000 + sizes["e"])
    order, block_expert, expert_blocks = align_by_expert(torch.randint(0, sizes["e"], (sizes["m"],), generator=gen),
                                                         sizes["e"])
    return order, order.clamp(min=0), block_expert, expert_blocks


def _grouped_gemm_ref(a, w, a_rows, c_rows, block_expert, expert_blocks):
    """out[c_rows[p]] = a[a_rows[p]] @ w[e]^T for each live p, e the expert of p's block, written out."""
    from kernels.grouped_gemm import BLOCK_M
    out = a.new_zeros(a.size(0), w.size(1))
    for p in (a_rows >= 0).nonzero().flatten().tolist():
        out[c_rows[p]] = a[a_rows[p]] @ w[block_expert[p // BLOCK_M]].t()
    return out


CONTRACTS = _contracts()
