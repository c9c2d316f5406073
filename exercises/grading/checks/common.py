"""What every chapter's checks share: strategies, oracles, result checks, and the library's own checks as tests.

The grader's checks ARE the ideas' property tests: tests/test_<idea>.py runs every check of its chapter against
the library (`library_checks`, wired in by tests/conftest.py), so an invariant is written once, here in
exercises/grading/checks/, and tests/ keeps only what the grader does not check (error messages, integration, training).
"""

import contextlib
import math
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

import torch
from hypothesis import strategies as st

from exercises.grading.checking import Check, Exercise, Violation, run_check

F64 = torch.float64

# tensor entries are multiples of 1/2 in [-3, 3]: enough to break most wrong mechanisms, quick to shrink, and a
# shrunk counterexample reads well (0, 0.5, -1 rather than 1.2870939124)
halves = st.integers(-6, 6).map(lambda n: n / 2)
seeds = st.integers(0, 2 ** 16)


def fmt(t) -> str:
    """A tensor or nested list as a short readable list: floats to 4 significant digits."""
    values = t.tolist() if isinstance(t, torch.Tensor) else t
    if isinstance(values, (list, tuple)):
        return "[" + ", ".join(fmt(x) for x in values) + "]"
    return f"{values:.4g}" if isinstance(values, float) else str(values)


class Inputs(dict):
    """A check's drawn inputs; a counterexample prints them as `name=values (shape ...)`, one per line."""

    def _repr_pretty_(self, p, cycle):
        shape = lambda v: f" (shape {tuple(v.shape)})" if isinstance(v, torch.Tensor) else ""  # noqa: E731
        p.text("\n".join(f"{k}={fmt(v)}{shape(v)}" for k, v in self.items()))


@st.composite
def tensors(draw, shape: tuple, elements=halves, dtype=F64):
    values = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
    return torch.tensor(values, dtype=dtype).reshape(shape)


def expect_tensor(out, shape: tuple, dtype, what: str) -> torch.Tensor:
    """The result is exactly a torch.Tensor (not a subclass, not a list) of this shape and dtype."""
    if type(out) is not torch.Tensor:
        raise Violation(f"{what} returned a {type(out).__name__}, expected a tensor of shape {shape} and "
                        f"dtype {dtype}")
    if tuple(out.shape) != tuple(shape):
        raise Violation(f"{what} returned shape {tuple(out.shape)}, expected {tuple(shape)} (a wrong shape, "
                        "before any value is compared)")
    if out.dtype != dtype:
        raise Violation(f"{what} returned dtype {out.dtype}, expected {dtype}")
    return out


def expect_unchanged(before, after, what: str) -> None:
    """An argument is bit-identical after the call: the function must not edit its inputs in place."""
    if isinstance(before, torch.Tensor):
        same = (type(after) is torch.Tensor and before.shape == after.shape and before.dtype == after.dtype
                and torch.equal(before, after))
    else:
        same = type(before) is type(after) and before == after
    if not same:
        raise Violation(f"{what} was changed by the call (from {fmt(before)} to {fmt(after)}): edit a copy, "
                        "never the caller's argument")


def expect_fresh(out: torch.Tensor, inputs, what: str) -> None:
    """The result shares no memory with an input: a caller may edit it (and a cached result) freely."""
    for name, t in inputs.items():
        if isinstance(t, torch.Tensor) and t.numel() and out.numel() and out.untyped_storage().data_ptr() == \
                t.untyped_storage().data_ptr():
            raise Violation(f"{what} returned a view of its argument `{name}`: editing the result would edit "
                            "the caller's tensor; return a new tensor")


def nan_note(got, want=None, what: str = "your output") -> str:
    """'' when `got` has no NaN where `want` has none; else where the first NaN is (index, count), as a clause that
    follows a difference: a NaN in the learner's output is named as such, never only as 'differs by nan'."""
    if not isinstance(got, torch.Tensor) or not got.is_floating_point() and not got.is_complex():
        return ""
    bad = got.detach().isnan()
    if want is not None and isinstance(want, torch.Tensor) and want.shape == got.shape:
        bad &= ~want.detach().isnan()
    if not bad.any():
        return ""
    first = tuple(int(i) for i in bad.nonzero()[0])
    where = first[0] if len(first) == 1 else first
    return (f" ({what} holds NaN: {int(bad.sum())} of {got.numel()} entries, the first at index {where}; look "
            "for 0/0, inf - inf or exp() overflowing before it)")


def max_diff(got, want) -> float:
    """max |got - want| in float64, NaN counted as infinitely wrong (inf where the shapes differ)."""
    if got.shape != want.shape:
        return math.inf
    return (got.detach().double() - want.detach().double()).abs().nan_to_num(nan=math.inf).max().item() \
        if got.numel() else 0.0


def differs(got, want, what: str = "your output") -> str:
    """'{max |got - want|:.3g}' and, when `got` holds NaN, where: for 'the output differs from X by {differs(..)}'."""
    d = max_diff(got, want)
    return ("NaN" if d == math.inf and got.detach().isnan().any() else f"{d:.3g}") + nan_note(got, want, what)


def expect_close(got, want, tol: float, what: str, why: str = "", output: str = "your output") -> None:
    """The compare-and-fail stanza: unless max |got - want| <= tol (NaN never is), raise
    Violation(f"{what} by {differs(got, want, output)}{why}"), e.g. what = 'the output differs from LN(x)'."""
    if not max_diff(got, want) <= tol:
        raise Violation(f"{what} by {differs(got, want, output)}{why}")


# ---- statistics of random draws -------------------------------------------------------------------------------
# A check on random draws accepts an estimate within Z standard errors of its expectation, the standard error
# computed for a CORRECT answer from the number of draws (never from the learner's own draws, which a wrong answer
# could make noisy). A correct answer lands more than 6 standard errors off with probability 2e-9 (normal tail),
# so a check that makes up to a few hundred such comparisons rejects a correct solution with probability < 1e-6,
# whatever order it draws its random numbers in. Each check's invariant names its draws and tolerance.
Z = 6.0


def expect_estimate(estimate: float, want: float, se: float, what: str, why: str = "") -> None:
    """A statistic of random draws lies within Z standard errors (se, for a correct answer) of `want`."""
    if not abs(estimate - want) <= Z * se:  # `not <=`: a NaN estimate fails too
        raise Violation(f"{what} = {estimate:.4g}, expected {want:.4g} (a correct answer lies within {Z * se:.2g}, "
                        f"{Z:g} standard errors){why}")


def std_tolerance(n: int, floor: float = 0.06) -> float:
    """The relative tolerance on the sample std of n normal draws: Z standard errors (1 / sqrt(2 (n - 1))),
    at least `floor`. A correct init misses it with probability < 2e-9 per tensor (normal tail of Z = 6; the
    floor only widens it): a check over at most a few dozen tensors rejects a correct answer with P < 1e-7."""
    return max(floor, Z / math.sqrt(2 * (n - 1)))


def fraction_tolerance(p: float, n: int, floor: float) -> float:
    """The tolerance on the fraction of n independent draws that fall in a set of probability p."""
    return max(floor, Z * math.sqrt(p * (1 - p) / n))


def naive_layer_norm(x, weight=None, bias=None, eps: float = 0.0):
    """(x - mean) / sqrt(var + eps) * weight + bias over the last axis, variance with 1/d (biased), written out."""
    mean = x.sum(-1, keepdim=True) / x.size(-1)
    var = ((x - mean) ** 2).sum(-1, keepdim=True) / x.size(-1)
    out = (x - mean) / torch.sqrt(var + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


def xavier_std(weight: torch.Tensor, gain: float = 1.0) -> float:
    """gain * sqrt(2 / (fan_in + fan_out)) for a Linear weight (fan_out, fan_in)."""
    fan_out, fan_in = weight.shape
    return gain * math.sqrt(2.0 / (fan_in + fan_out))


# ---- the library's checks as tests ----------------------------------------------------------------------------

@dataclass(frozen=True)
class LibraryCheck:
    """One graded check run against the library's own function (the reference solution)."""

    exercise: str
    function: Callable
    check: Check
    spec: Exercise

    @property
    def id(self) -> str:
        return f"{self.exercise}-{self.check.name}"

    def __call__(self, max_examples: int | None = None) -> None:
        """Run it; AssertionError naming the invariant, what broke, and the counterexample if it fails."""
        result = run_check(self.check, self.function, max_examples=max_examples, exercise=self.spec)
        if not result["passed"]:
            raise AssertionError(f"exercise {self.exercise}, invariant: {self.check.invariant}\n"
                                 f"violated: {result['message']}\n{result['counterexample']}")


def library_checks(chapter_number: str) -> list[LibraryCheck]:
    """Every check of every exercise of a chapter, paired with the library function it grades."""
    from exercises.grading.registry import get_chapter
    from exercises.grading.stubs import scan

    chapter = get_chapter(chapter_number)
    spec = import_module(chapter.checks_module).EXERCISES
    return [LibraryCheck(m.id, getattr(import_module(m.module), m.function), c, spec[m.id])
            for m in scan(chapter) for c in spec[m.id].checks]


# ---- running a learner's code in the library's place -------------------------------------------------------

@contextlib.contextmanager
def float32_default():
    """torch's default dtype is float32 inside (the property tests run the checks with float64 as the default)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


@contextlib.contextmanager
def installed(module, name: str, graded):
    """The library's launcher runs with the learner's kernel in place of its own (restored afterwards); what the
    kernel raises comes out as itself, not wrapped in the interpreter's InterpreterError."""
    kernel = getattr(graded, "__wrapped__", graded)  # the @triton.jit function behind the grader's guard
    saved = vars(module)[name]
    setattr(module, name, kernel)
    try:
        yield
    except Exception as exc:
        while type(exc).__name__ == "InterpreterError" and exc.__cause__ is not None:
            exc = exc.__cause__  # once per nested @triton.jit call
        raise exc from None
    finally:
        setattr(module, name, saved)
