"""The grading worker: imports torch and the checks once, then grades a list of files, one exercise at a time.

Started by exercises/grading/grader.py as `python -m exercises.grading._worker PAYLOAD.json`; it reports on its own pipe
(one JSON event per line), never on stdout, which belongs to the learner's code. The grader kills it when an
exercise runs past its time limit, and starts a fresh one at the next exercise.

Events: ready (with the exercises' points and checks), importing, imported, start, check, result, done.
Each line is `MAC JSON`: an HMAC-SHA256 of `SEQ:JSON` (SEQ counts the lines) under a key the grader writes to a pipe
of its own, read and closed before any learner code runs; the grader drops a run whose line does not verify (a
verdict forged by the learner's code). The checks are frozen (exercises/grading/frozen.py) before a learner's file
is imported: a file that patches them scores zero.
"""

import contextlib
import hashlib
import hmac
import importlib.util
import io
import json
import os
import random
import sys
import traceback
import warnings
from importlib import import_module
from pathlib import Path

# The checks run every kernel on CPU tensors, by Triton's interpreter, on any machine: on a GPU machine `kernels` would
# otherwise send CPU tensors to the PyTorch reference and never run the learner's kernel. Set before triton is imported.
os.environ["TRITON_INTERPRET"] = "1"


class Sink(io.TextIOBase):
    """Stands in for stdout/stderr: counts the lines the learner's code prints, keeps the first few."""

    def __init__(self):
        self.count, self.pending, self.head = 0, False, ""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        s = str(s)
        if s:
            self.count += s.count("\n")
            self.pending = not s.endswith("\n")
            if len(self.head) < 400:
                self.head += s[: 400 - len(self.head)]
        return len(s)

    @property
    def lines(self) -> int:
        return self.count + self.pending


def _error_text(exc: BaseException, path: str) -> str:
    if isinstance(exc, SyntaxError):
        return f"SyntaxError: {exc.msg} (line {exc.lineno}: {(exc.text or '').strip()})"
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == path]
    where = f" (line {frames[-1].lineno}: {(frames[-1].line or '').strip()})" if frames else ""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}" + (f": {text[0][:300]}" if text else "") + where


def _load_file(path: str, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load(source: dict, marked, job: int, chapter) -> tuple[dict, str | None]:
    """The functions to grade, by name. source: {"kind": "file" | "reference" | "mutant", "path": ...,
    "mutant": the mutant's name}."""
    if source["kind"] != "file":
        reference = {m.function: getattr(import_module(m.module), m.function) for m in marked}
        if source["kind"] == "mutant":  # the reference with one function patched
            from exercises.grading.mutants import build, find

            mutant = find(chapter, source["mutant"])
            target = next(m for m in marked if m.id == mutant.exercise)
            reference[target.function] = build(target, mutant)
        return reference, None
    name = f"_graded_{job}"
    try:
        module = _load_file(source["path"], name)
    except BaseException as exc:  # noqa: BLE001 - a learner's file may raise anything at import, SystemExit too
        return {}, _error_text(exc, source["path"])
    return {m.function: getattr(module, m.function) for m in marked if hasattr(module, m.function)}, None


def _guard_library(marked, student_module: str) -> dict:
    """Replace each exercise function in its library module by a guard that raises when the learner's file
    calls it (a wrapper around the library's answer), and otherwise calls the library. Installed before the
    learner's file is imported, so `from nanomodels... import f` binds the guard: detected by identity.
    Returns {(module, name): (original, guard)}."""
    from exercises.grading.checking import Violation

    guards = {}
    for m in marked:
        module = import_module(m.module)
        original = getattr(module, m.function)

        def guard(*args, __original=original, __name=m.function, __module=m.module, **kwargs):
            if sys._getframe(1).f_globals.get("__name__") == student_module:
                raise Violation(f"your code calls the library's own `{__name}` ({__module}): it earns no "
                                "points; write the mechanism yourself")
            return __original(*args, **kwargs)

        guard.__name__, guard.__module__, guard.__wrapped_library__ = m.function, m.module, original
        setattr(module, m.function, guard)
        guards[(module, m.function)] = (original, guard)
    return guards


def _use_references(source: dict, module_name: str, graded, marked, guards) -> dict:
    """While one exercise of a learner's file is graded, the file's OTHER exercise functions are the library's
    (a given line that calls subln_gamma works before 5.1 is solved): each exercise is graded on its own.
    Returns what to put back afterwards."""
    module = sys.modules.get(module_name)
    if source["kind"] != "file" or module is None:
        return {}
    originals = {(mod.__name__, name): original for (mod, name), (original, _) in guards.items()}
    saved = {}
    for m in marked:
        if m.id != graded.id and hasattr(module, m.function):
            saved[m.function] = getattr(module, m.function)
            setattr(module, m.function, originals.get((m.module, m.function),
                                                      getattr(import_module(m.module), m.function)))
    return saved


def _library_object(fn, m, guards) -> str | None:
    """Why fn is the library's own function (imported from nanomodels), or None."""
    originals = {g: o for o, g in guards.values()}
    original = originals.get(fn, fn)
    if original is not fn or getattr(fn, "__module__", "").split(".")[0] == "nanomodels":
        return (f"`{m.function}` in your file is the library's own function (from {original.__module__}), "
                "imported, not written: it earns no points")
    return None


def _sender(fd: int, key_fd: int):
    """send(**event): one signed line. The key is read from its pipe and closed here; only the HMAC object keeps it."""
    signer = hmac.new(os.read(key_fd, 64), digestmod=hashlib.sha256)
    os.close(key_fd)
    channel, seq = os.fdopen(fd, "w", buffering=1), [0]

    def send(**event):
        line, mac = json.dumps(event), signer.copy()
        mac.update(f"{seq[0]}:{line}".encode())
        seq[0] += 1
        channel.write(f"{mac.hexdigest()} {line}\n")
        channel.flush()
    return send


def _tampered(what: str) -> str:
    return (f"your code changed the grader ({what}) while it was graded: a file that patches the checks earns no "
            "points")


def main() -> None:
    payload = json.loads(open(sys.argv[1]).read())
    send = _sender(payload["fd"], payload["key_fd"])

    warnings.simplefilter("ignore")
    import torch

    torch.set_num_threads(1)
    from exercises.grading.checking import run_check
    from exercises.grading.frozen import Snapshot
    from exercises.grading.registry import Chapter
    from exercises.grading.stubs import scan

    fields = payload["chapter"]
    fields.update(sources=tuple(fields["sources"]), directory=Path(fields["directory"]))
    chapter = Chapter(**fields)
    marked = {m.id: m for m in scan(chapter)}
    spec = import_module(chapter.checks_module).EXERCISES
    send(event="ready", exercises={
        i: {"title": m.title, "function": m.function, "points": spec[i].points, "hint": spec[i].hint,
            "checks": [[c.name, c.invariant] for c in spec[i].checks]} for i, m in marked.items()})
    import exercises.grading.mutants  # noqa: F401 - imported now, so it is frozen with the rest

    frozen = Snapshot(modules=("__main__",))  # this worker, the checks and what they call, before any learner code
    start_job, start_exercise = payload["start"]
    for j, job in enumerate(payload["jobs"]):
        if j < start_job:
            continue
        send(event="importing", job=j)
        sink = Sink()
        guards = _guard_library(marked.values(), f"_graded_{j}") if job["source"]["kind"] == "file" else {}
        with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            functions, error = load(job["source"], marked.values(), j, chapter)
        tampered = frozen.changed()  # a file that patched the grader at import scores 0 on every exercise
        if tampered:
            frozen.restore()
            tampered = _tampered(tampered)
        send(event="imported", job=j, error=error, printed=sink.lines, output=sink.head)
        path = job["source"].get("path")
        for n, ex in enumerate(job["exercises"]):
            if j == start_job and n < start_exercise:
                continue
            send(event="start", job=j, exercise=ex)
            m, sink = marked[ex], Sink()
            fn = functions.get(m.function)
            if error is not None or not callable(fn) or tampered:
                message = (f"your file could not be imported: {error}" if error is not None else tampered or
                           f"your file defines no function `{m.function}`")
                kind = "import error" if error is not None else "tampered" if tampered else "missing"
                checks = [{"name": c.name, "invariant": c.invariant, "passed": False, "kind": kind,
                           "message": message, "counterexample": ""} for c in spec[ex].checks]
            else:
                torch.manual_seed(0)  # code that draws from the global state grades the same each time
                random.seed(0)
                others = _use_references(job["source"], f"_graded_{j}", m, marked.values(), guards)
                checks = []
                library = _library_object(fn, m, guards) if job["source"]["kind"] == "file" else None
                for c in spec[ex].checks:  # each check reports when done: the time limit is per check
                    if library:
                        checks.append({"name": c.name, "invariant": c.invariant, "passed": False,
                                       "kind": "library", "message": library, "counterexample": ""})
                        continue
                    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
                        result = run_check(c, fn, max_examples=payload["max_examples"], student_file=path,
                                           exercise=spec[ex])
                    changed = frozen.changed()  # the learner's function patched the grader while it ran
                    if changed:
                        frozen.restore()
                        result.update(passed=False, kind="tampered", message=_tampered(changed), counterexample="")
                    checks.append(result)
                    send(event="check", job=j, exercise=ex, result=checks[-1], printed=sink.lines)
                for name, value in others.items():
                    setattr(sys.modules[f"_graded_{j}"], name, value)
            send(event="result", job=j, exercise=ex, checks=checks, printed=sink.lines, output=sink.head)
        for (module, name), (original, _) in guards.items():
            setattr(module, name, original)
    send(event="done")


if __name__ == "__main__":
    main()
