"""The pieces a chapter's graded checks are made of (exercises/grading/checks/chNN.py).

    @check("the weights of one query sum to 1: softmax runs over the keys", case=attention_cases())
    def weights_sum_to_one(attention, case):
        ...
        if bad:
            raise Violation(f"query {i}'s weights sum to {s:.3f}")

A check receives the learner's function first, then one value per hypothesis strategy (none: it runs once).
It raises `Violation` with what went wrong, in words; any other exception comes from the learner's code.
`Exercise` gives an exercise its points, hint and checks; all checks must pass to earn the points.

Every call a check makes goes through `guarded`: the learner's function gets the check's real arguments, and
after the call each must be unchanged (a function that edits its input in place corrupts a caller's KV cache,
logits or ids), a returned tensor must not share memory with an argument, and for a `pure` exercise (same
arguments, same result: the masks) a second call must not return what the caller edited in the first result
(a memoized tensor). `mutates` names the arguments an exercise changes on purpose (an in-place init).
`Check(max_examples=...)` runs a cheap check on more examples; `examples=[{...}]` always tries known hard cases.
"""

import builtins
import copy
import functools
import inspect
import re
import traceback
from dataclasses import dataclass, field
from typing import Callable

from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis.reporting import with_reporter

MAX_EXAMPLES = 25  # per check; grades are reproducible: derandomized, no example database
SHRINK_LIMIT_S = 4.0  # hypothesis shrinks a failure for up to 300 s by default; a learner waits for the table

try:  # a private constant, read at each shrink: capped where it exists (without it, grading still works)
    from hypothesis.internal.conjecture import engine as _engine

    if hasattr(_engine, "MAX_SHRINKING_SECONDS"):
        _engine.MAX_SHRINKING_SECONDS = SHRINK_LIMIT_S
except ImportError:
    pass


_GROUPS = tuple(getattr(builtins, name) for name in ("BaseExceptionGroup",) if hasattr(builtins, name))
try:  # Python 3.10: hypothesis raises the backport's groups
    from exceptiongroup import BaseExceptionGroup as _Backport

    _GROUPS += (_Backport,)
except ImportError:
    pass


class Violation(AssertionError):
    """A graded invariant does not hold; the message says how, with the numbers."""


@dataclass
class Check:
    name: str
    invariant: str  # one sentence: what must hold
    body: Callable
    strategies: dict = field(default_factory=dict)
    max_examples: int | None = None  # None: MAX_EXAMPLES
    examples: list = field(default_factory=list)  # explicit cases (dicts of strategy values), always run first


def check(invariant: str, *, max_examples: int | None = None, examples=(), **strategies) -> Callable[[Callable],
                                                                                                    Check]:
    def wrap(body: Callable) -> Check:
        return Check(body.__name__, invariant, body, strategies, max_examples, list(examples))
    return wrap


@dataclass
class Exercise:
    points: int
    hint: str
    checks: list[Check]
    hints: tuple[str, ...] = ()  # the next levels after `hint` (level 1): `python -m exercises hint 4.3`
    pure: bool = False  # same arguments, same result: a second call must not return an edited first result
    mutates: tuple[str, ...] = ()  # arguments the function changes on purpose (an in-place init)


# ---- the guard around every call of the learner's function ------------------------------------------------

def _snapshot(value):
    if type(value).__name__ == "Tensor" and hasattr(value, "detach"):
        return value.detach().clone()
    if hasattr(value, "state_dict") and callable(value.state_dict):  # a module: its parameters and buffers
        return {k: v.detach().clone() for k, v in value.state_dict().items()}
    if isinstance(value, (list, dict, tuple, set)):
        try:
            return copy.deepcopy(value)
        except Exception:  # noqa: BLE001 - an argument that cannot be copied is not compared
            return None
    return None


def _same(value, snap) -> bool:
    import torch

    if isinstance(value, torch.Tensor):
        if not isinstance(snap, torch.Tensor):
            return False
        if value.device.type == "meta":  # no values to compare
            return value.shape == snap.shape and value.dtype == snap.dtype
        return (value.shape == snap.shape and value.dtype == snap.dtype
                and bool(torch.equal(value.detach(), snap) or (value.isnan().any() and torch.allclose(
                    value.detach(), snap, rtol=0, atol=0, equal_nan=True))))
    if isinstance(snap, dict) and hasattr(value, "state_dict"):
        now = value.state_dict()
        return now.keys() == snap.keys() and all(torch.equal(now[k], snap[k]) for k in snap)
    if type(value) is not type(snap):
        return False
    if isinstance(value, (list, tuple)):  # containers of tensors: element by element, type-exact
        return len(value) == len(snap) and all(_same(a, b) for a, b in zip(value, snap))
    if isinstance(value, dict):
        return value.keys() == snap.keys() and all(_same(value[k], snap[k]) for k in value)
    try:
        return value is snap or bool(value == snap)  # `is` first: a float NaN deep-copies to itself
    except (RuntimeError, ValueError, TypeError):  # no single truth value (an array): not compared
        return True


def _tensors(value):
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _storage(t) -> int | None:
    try:
        return t.untyped_storage().data_ptr() if t.numel() else None
    except (RuntimeError, NotImplementedError):  # meta tensors have no storage to share
        return None


def _edit_in_place(value) -> None:
    import torch

    for t in _tensors(value):
        if t.numel() and t.device.type != "meta":
            with torch.no_grad():
                if t.dtype == torch.bool:
                    t.logical_not_()
                else:
                    t.add_(1)


def value_version(value) -> int | None:
    """A tensor's in-place write counter (None for anything else)."""
    return getattr(value, "_version", None) if type(value).__name__ == "Tensor" else None


def guarded(fn: Callable, name: str, exercise: Exercise | None = None) -> Callable:
    """fn with the guard: real arguments unchanged, fresh results, no memoized result (pure exercises)."""
    mutates = exercise.mutates if exercise else ()
    pure = exercise.pure if exercise else False
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        signature = None

    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            named = dict(signature.bind(*args, **kwargs).arguments) if signature else {}
        except TypeError:
            named = {}
        named = named or {f"argument {i + 1}": a for i, a in enumerate(args)} | kwargs
        watched = {k: (v, _snapshot(v)) for k, v in named.items() if k not in mutates}
        versions = {k: t._version for k, (t, _) in watched.items() if type(t).__name__ == "Tensor"}
        out = fn(*args, **kwargs)
        for arg, (value, snap) in watched.items():
            # an in-place write counts even when it keeps the values (it breaks autograd on the caller's tensor)
            if snap is not None and (not _same(value, snap) or versions.get(arg, value_version(value)) !=
                                     value_version(value)):
                raise Violation(f"{name} changed its argument `{arg}` in place: a caller's tensor (a KV cache, "
                                "logits, token ids, a model) must come back as it went in; compute on a copy")
        inputs = {_storage(t): arg for arg, (value, _) in watched.items() for t in _tensors(value)}
        for t in _tensors(out):
            if _storage(t) is not None and _storage(t) in inputs:
                raise Violation(f"{name} returned a view of its argument `{inputs[_storage(t)]}`: when the "
                                "caller edits the result, its own tensor changes; return a new tensor")
        if pure and any(True for _ in _tensors(out)):
            first = copy.deepcopy(out)
            _edit_in_place(out)  # the caller edits the result it got
            again = fn(*args, **kwargs)
            if any(not _same(a, b) for a, b in zip(_tensors(again), _tensors(first))):
                raise Violation(f"{name} returned a tensor it keeps (a cached or global buffer): after the caller "
                                "edited the first result, a second call with the same arguments returned the "
                                "edited values; return a new tensor each call")
            return again
        return out
    return call


def _leaf(exc: BaseException) -> BaseException:
    while True:
        if isinstance(exc, _GROUPS) and exc.exceptions:  # hypothesis' Flaky* errors wrap the real failure
            exc = exc.exceptions[0]
        elif type(exc).__name__ == "InterpreterError" and exc.__cause__ is not None:
            exc = exc.__cause__  # Triton's interpreter wraps what a kernel raised (once per nested @jit call)
        else:
            return exc


def _counterexample(exc: BaseException) -> str:
    notes = [n for e in (exc, _leaf(exc)) for n in getattr(e, "__notes__", [])]
    out = []
    for note in dict.fromkeys(notes):
        for prefix in ("Failing test case: ", "Falsifying example: "):
            if note.startswith(prefix):
                head, _, rest = note[len(prefix):].partition("(")
                note = rest.rstrip().removesuffix(")").strip("\n") or "(no arguments)"
                note = "\n".join(re.sub(r"^\w+=(?=\w+=)", "", line.removeprefix("    ").rstrip(","))
                                 for line in note.splitlines())
        out.append(note)
    return "\n".join(out)


def _where(exc: BaseException, student_file: str | None) -> str:
    if not student_file:
        return ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == student_file]
    return f" (line {frames[-1].lineno}: {frames[-1].line.strip()})" if frames else ""


def run_check(chk: Check, fn: Callable, *, max_examples: int | None = None, student_file: str | None = None,
              exercise: Exercise | None = None) -> dict:
    """Run one check against the learner's function (guarded); never raises. Returns a JSON-able result.
    max_examples: None for the check's own count (or MAX_EXAMPLES)."""
    graded = guarded(fn, getattr(fn, "__name__", "your function"), exercise)

    def test(**kwargs):
        chk.body(graded, **kwargs)

    test.__name__ = chk.name
    if chk.strategies:
        n = max_examples or chk.max_examples or MAX_EXAMPLES
        test = given(**chk.strategies)(test)
        for case in reversed(chk.examples):
            test = example(**case)(test)
        test = settings(max_examples=n, deadline=None, derandomize=True, database=None,
                        report_multiple_bugs=False, print_blob=False,
                        phases=[Phase.explicit, Phase.generate, Phase.shrink],
                        suppress_health_check=list(HealthCheck))(test)
    result = {"name": chk.name, "invariant": chk.invariant, "passed": False, "kind": None,
              "message": "", "counterexample": ""}
    try:
        with with_reporter(lambda *_: None):  # hypothesis' own messages are not the learner's output
            test()
    except BaseException as exc:  # noqa: BLE001 - learner code may raise anything, SystemExit included
        leaf = _leaf(exc)
        flaky = leaf is not exc and type(exc).__name__.startswith("Flaky")
        if isinstance(leaf, Violation):
            result.update(kind="violation", message=str(leaf))
        elif isinstance(leaf, NotImplementedError):
            result.update(kind="not implemented", message=f"raises NotImplementedError: {leaf}")
        else:
            text = str(leaf).strip().splitlines()
            result.update(kind="error", message=f"your code raised {type(leaf).__name__}"
                          + (f": {text[0][:300]}" if text else "") + _where(leaf, student_file))
        if flaky:
            result["message"] += " (not every run: the function gave different results on the same input)"
        result["counterexample"] = _counterexample(exc)
        return result
    result["passed"] = True
    return result
