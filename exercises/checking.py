"""The pieces a chapter's graded checks are made of (exercises/checks/chNN.py).

    @check("the weights of one query sum to 1: softmax runs over the keys", case=attention_cases())
    def weights_sum_to_one(attention, case):
        ...
        if bad:
            raise Violation(f"query {i}'s weights sum to {s:.3f}")

A check receives the learner's function first, then one value per hypothesis strategy (none: it runs once).
It raises `Violation` with what went wrong, in words; any other exception comes from the learner's code.
`Exercise` gives an exercise its points, hint and checks; all checks must pass to earn the points.
"""

import builtins
import re
import traceback
from dataclasses import dataclass, field
from typing import Callable

from hypothesis import HealthCheck, Phase, given, settings
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


def check(invariant: str, **strategies) -> Callable[[Callable], Check]:
    def wrap(body: Callable) -> Check:
        return Check(body.__name__, invariant, body, strategies)
    return wrap


@dataclass
class Exercise:
    points: int
    hint: str
    checks: list[Check]


def _leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, _GROUPS) and exc.exceptions:  # hypothesis' Flaky* errors wrap the real failure
        exc = exc.exceptions[0]
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


def run_check(chk: Check, fn: Callable, *, max_examples: int = MAX_EXAMPLES,
              student_file: str | None = None) -> dict:
    """Run one check against the learner's function; never raises. Returns a JSON-able result."""
    def test(**kwargs):
        chk.body(fn, **kwargs)

    test.__name__ = chk.name
    if chk.strategies:
        test = settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
                        report_multiple_bugs=False, print_blob=False,
                        phases=[Phase.explicit, Phase.generate, Phase.shrink],
                        suppress_health_check=list(HealthCheck))(given(**chk.strategies)(test))
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
