"""The grader: runs a chapter's graded checks against a learner's file in a separate, killable process.

Containment. The checks run in a worker process (exercises/grading/_worker.py) that reports on its own pipe. Each
check has a time limit (DEFAULT_TIMEOUT_S; importing the learner's file too): past it, the worker is killed,
that exercise is "timed out", and a fresh worker carries on with the next exercise. Whatever the learner's
code does (raise, print, exit, loop forever, crash the interpreter), this process only reads events, so it
reports and returns.
Output printed by the learner's code is counted, not shown (the table stays readable).
The worker's events are signed (an HMAC under a per-run key the learner's code never sees on a channel it can
read): a forged line on the pipe makes that exercise, or the whole file when forged at import, "tampered" with 0
points. The worker freezes the checks before the learner's file is imported (exercises/grading/frozen.py): a file
that patches them is "tampered" too (tests/test_grader_cheats.py).

Scoring: all or nothing per exercise. An exercise earns its points when every one of its checks passes;
the table still shows how many checks passed.
"""

import hashlib
import hmac
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from exercises.grading.registry import ROOT, Chapter

DEFAULT_TIMEOUT_S = 20.0  # per check (each check runs its examples, then shrinks a failure)
STARTUP_LIMIT_S = 120.0  # importing torch and the checks, before any learner code runs
WIDTH = 110
FORGED_TEXT = ("your code wrote to the grader's result channel (a line without the run's key: a forged verdict); "
               "a file that forges results earns no points")


class GraderError(RuntimeError):
    """The grader itself could not run (not the learner's fault): e.g. torch missing or a broken library."""


@dataclass(frozen=True)
class Source:
    """What to grade: a learner's file, the reference (the library itself), or a mutant (the reference with
    one exercise's region patched, by name from exercises/grading/mutants/chNN_<topic>.md)."""

    kind: str  # "file" | "reference" | "mutant"
    path: str | None = None  # the file, for kind "file"
    exercises: tuple[str, ...] | None = None  # grade only these (None: those grade_many is asked for)
    mutant: str | None = None  # the mutant's name, for kind "mutant"

    def label(self) -> str:
        if self.kind == "reference":
            return "the reference solutions (the library itself)"
        if self.kind == "mutant":
            return f"mutant {self.mutant} (the reference with this patch)"
        path = Path(self.path)
        return f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}"


class _Events:
    """JSON lines from the worker's pipe, each awaited until a deadline and authenticated: `MAC JSON`, the MAC an
    HMAC-SHA256 of `seq:JSON` under this run's key. A line that is not (forged by the learner's code) is FORGED."""

    TIMEOUT, EOF, FORGED = "timeout", "eof", "forged"

    def __init__(self, fd: int, key: bytes):
        self.fd, self.buf, self.key, self.seq = fd, b"", key, 0

    def next(self, deadline: float):
        while b"\n" not in self.buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                return self.TIMEOUT
            chunk = os.read(self.fd, 1 << 16)
            if not chunk:
                return self.EOF
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        mac, _, body = line.partition(b" ")
        want = hmac.new(self.key, f"{self.seq}:".encode() + body, hashlib.sha256).hexdigest().encode()
        if not hmac.compare_digest(mac, want):
            return self.FORGED
        self.seq += 1
        return json.loads(body)


def _kill(proc: subprocess.Popen) -> None:
    try:  # the worker leads its own session: whatever the learner's code started goes with it
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        try:
            return f"killed by signal {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _failed(meta: dict, kind: str, message: str) -> list[dict]:
    return [{"name": name, "invariant": invariant, "passed": False, "kind": kind, "message": message,
             "counterexample": ""} for name, invariant in meta["checks"]]


def grade_many(chapter: Chapter, sources: list[Source], exercises: list[str] | None = None, *,
               timeout: float = DEFAULT_TIMEOUT_S, max_examples: int | None = None) -> list[dict]:
    """Grade several files in one worker (torch is imported once); one report per source, in order."""
    from exercises.grading.stubs import scan

    ids = [m.id for m in scan(chapter)]
    wanted = [list(s.exercises or exercises or ids) for s in sources]
    unknown = sorted({e for w in wanted for e in w if e not in ids})
    if unknown:
        raise ValueError(f"chapter {chapter.number} has no exercise {', '.join(unknown)} "
                          f"(it has {', '.join(ids)})")
    sources = [Source(s.kind, str(Path(s.path).resolve()) if s.path else None, s.exercises, s.mutant)
               for s in sources]
    jobs = [{"source": {"kind": s.kind, "path": s.path, "mutant": s.mutant}, "exercises": w}
            for s, w in zip(sources, wanted)]
    todo = [(j, ex) for j, w in enumerate(wanted) for ex in w]
    if not todo:
        raise ValueError("nothing to grade")
    results: dict[tuple[int, str], dict] = {}
    imports: dict[int, dict] = {}
    meta: dict = {}
    extra_output = [0] * len(jobs)  # lines written straight to the file descriptors, by any job
    i = 0
    with tempfile.TemporaryDirectory(prefix="nanomodels-grade-") as tmp:
        while i < len(todo):
            i = _run_worker(chapter, jobs, todo, i, results, imports, meta, extra_output, Path(tmp), timeout,
                            max_examples)
    return [_report(chapter, s, j, wanted[j], results, imports, meta, extra_output[j])
            for j, s in enumerate(sources)]


def _run_worker(chapter, jobs, todo, i, results, imports, meta, extra_output, tmp: Path, timeout,
                max_examples) -> int:
    """Start a worker at todo[i]; collect its events until it ends or fails. Returns the next todo index."""
    read_fd, write_fd = os.pipe()
    key_read, key_write = os.pipe()  # the key travels on a pipe the worker reads and closes before any learner code
    key = os.urandom(32)
    os.write(key_write, key)
    os.close(key_write)
    payload = tmp / f"payload-{i}.json"
    start_job, start_ex = todo[i]
    chapter_fields = {**asdict(chapter), "directory": str(chapter.directory)}
    payload.write_text(json.dumps({"chapter": chapter_fields, "jobs": jobs, "fd": write_fd, "key_fd": key_read,
                                   "start": [start_job, jobs[start_job]["exercises"].index(start_ex)],
                                   "max_examples": max_examples}))
    log = tmp / f"output-{i}.txt"
    paths = [str(ROOT), os.environ.get("PYTHONPATH")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in paths if p))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env.setdefault(var, "1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "exercises.grading._worker", str(payload)], cwd=tmp, env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                pass_fds=(write_fd, key_read), start_new_session=True)
    os.close(write_fd)
    os.close(key_read)
    events = _Events(read_fd, key)
    state, job = "startup", start_job
    partial, printed = {}, {}  # the checks an exercise has finished so far, and the lines printed meanwhile
    deadline = time.monotonic() + STARTUP_LIMIT_S
    try:
        while True:
            event = events.next(deadline)
            if isinstance(event, str):  # the worker timed out or died
                if event == events.EOF:
                    try:
                        proc.wait(timeout=5)  # let it finish dying, for its exit status
                    except subprocess.TimeoutExpired:
                        pass
                _kill(proc)
                last = log.read_text(errors="replace").strip().splitlines()[-1:]
                why = (f"timed out after {timeout:g} s" if event == events.TIMEOUT else FORGED_TEXT
                       if event == events.FORGED else f"the grading process died ({_exit_text(proc.returncode)}"
                       + (f"; its last output: {last[0][:200]!r})" if last else ")"))
                if state == "startup":
                    tail = log.read_text(errors="replace")[-3000:]
                    raise GraderError(f"the grading worker did not start ({why}):\n{tail}")
                if state == "import":
                    forged = event == events.FORGED
                    imports[job] = {"error": None if forged else f"importing your file {why}", "printed": 0,
                                    "output": ""}
                    kind = "tampered" if forged else "import error"
                    while i < len(todo) and todo[i][0] == job:
                        checks = _failed(meta[todo[i][1]], kind, why if forged else imports[job]["error"])
                        results[todo[i]] = {"checks": checks, "status": kind, "printed": 0, "output": ""}
                        i += 1
                    return i
                status = {events.TIMEOUT: "timed out", events.FORGED: "tampered"}.get(event, "crashed")
                done = partial.get(todo[i], []) if event != events.FORGED else []
                message = f"your code {why}" if event == events.TIMEOUT else why
                rest = _failed(meta[todo[i][1]], status, message)
                results[todo[i]] = {"checks": done + rest[len(done):], "status": status,
                                    "printed": printed.get(todo[i], 0), "output": ""}
                return i + 1
            kind = event["event"]
            deadline = time.monotonic() + timeout
            if kind == "ready":
                meta.update(event["exercises"])
                state = "between"
            elif kind == "importing":
                state, job = "import", event["job"]
            elif kind == "imported":
                imports[event["job"]] = {k: event[k] for k in ("error", "printed", "output")}
                state = "between"
            elif kind == "start":
                state = "exercise"
            elif kind == "check":  # the limit is per check: each finished check restarts the clock
                key = (event["job"], event["exercise"])
                partial.setdefault(key, []).append(event["result"])
                printed[key] = event["printed"]
            elif kind == "result":
                key = (event["job"], event["exercise"])
                results[key] = {k: event[k] for k in ("checks", "printed", "output")}
                i, state = i + 1, "between"
            elif kind == "done":
                return len(todo)
    finally:
        os.close(read_fd)
        _kill(proc)
        text = log.read_text(errors="replace") if log.exists() else ""
        extra_output[job] += text.count("\n") + (bool(text) and not text.endswith("\n"))


def _status(checks: list[dict]) -> str:
    kinds = {c["kind"] for c in checks if not c["passed"]}
    if not kinds:
        return "passed"
    for kind in ("tampered", "timed out", "crashed"):
        if kind in kinds:
            return kind
    for kind in ("import error", "missing", "library"):
        if kind in kinds:
            return kind
    return "not implemented" if "not implemented" in kinds else "failed"


def _report(chapter, source, j, wanted, results, imports, meta, extra_output) -> dict:
    exercises = []
    for ex in wanted:
        r, m = results[(j, ex)], meta.get(ex, {})
        checks = r["checks"]
        status = r.get("status") or _status(checks)
        passed = sum(c["passed"] for c in checks)
        exercises.append({
            "id": ex, "title": m.get("title", ""), "function": m.get("function", ""),
            "points": m.get("points", 0) if status == "passed" else 0, "max_points": m.get("points", 0),
            "status": status, "checks_passed": passed, "checks_total": len(checks), "checks": checks,
            "hint": m.get("hint", ""), "printed_lines": r["printed"]})
    imported = imports.get(j, {"error": None, "printed": 0, "output": ""})
    score, max_score = sum(e["points"] for e in exercises), sum(e["max_points"] for e in exercises)
    printed = imported["printed"] + sum(e["printed_lines"] for e in exercises) + extra_output
    sample = imported["output"] or "".join(results[(j, ex)]["output"] for ex in wanted)
    return {"chapter": chapter.number, "title": chapter.title, "file": source.label(), "source": source.kind,
            "score": score, "max_score": max_score, "full_marks": score == max_score,
            "import_error": imported["error"], "printed_lines": printed, "printed_sample": sample[:200],
            "exercises": exercises}


def grade(chapter: Chapter, source: Source, exercises: list[str] | None = None, **kwargs) -> dict:
    return grade_many(chapter, [source], exercises, **kwargs)[0]


# ---- the text report -----------------------------------------------------------------------------------

def _indent(text: str, prefix: str) -> str:
    return textwrap.indent(text, prefix)


def _wrap(text: str, first: str, rest: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=first, subsequent_indent=rest)


def format_report(report: dict) -> str:
    width = max([len(f"{e['id']}  {e['title']}") for e in report["exercises"]] + [20])
    lines = [f"Chapter {report['chapter']}: {report['title']}", f"graded: {report['file']}", ""]
    if report["import_error"]:
        lines += [_wrap("Your file could not be imported, so every exercise scores 0: "
                        f"{report['import_error']}", "", "  "), ""]
    lines.append(f"  {'exercise':<{width}}  points  status")
    for e in report["exercises"]:
        status = e["status"]
        if status in ("failed", "not implemented") and e["checks_passed"]:
            status += f" ({e['checks_passed']} of {e['checks_total']} checks pass)"
        name, points = f"{e['id']}  {e['title']}", f"{e['points']:>2}/{e['max_points']:<2}"
        lines.append(f"  {name:<{width}}  {points}  {status}")
    lines.append(f"  {'total':<{width}}  {report['score']:>2}/{report['max_score']:<2}")
    for e in report["exercises"]:
        if e["status"] != "passed":
            lines += ["", *_details(e)]
    if report["printed_lines"]:
        first = report["printed_sample"].splitlines()[0][:80] if report["printed_sample"].strip() else ""
        lines += ["", f"Your code printed {report['printed_lines']} line(s) while it was graded (not shown"
                  + (f"; the first: {first!r}" if first else "") + ")."]
    lines += ["", "Full marks." if report["full_marks"] else
              f"{report['score']} of {report['max_score']} points. Fix a failing exercise and grade again."]
    return "\n".join(line.rstrip() for line in lines)


def _details(e: dict) -> list[str]:
    head = f"{e['id']}  {e['title']}"
    failing = [c for c in e["checks"] if not c["passed"]]
    if e["status"] == "not implemented" and all(c["kind"] == "not implemented" for c in failing):
        return [_wrap(f"{head}: not implemented yet (`{e['function']}` raises NotImplementedError).", "",
                      "    "),
                _wrap(e["hint"], "  hint: ", "        ")]
    if e["status"] in ("tampered", "timed out", "crashed", "missing", "import error", "library"):
        return [_wrap(f"{head}: {failing[0]['message']}.", "", "    ")]
    out = [f"{head}: {len(failing)} of {e['checks_total']} checks fail."]
    for c in failing:
        out.append(_wrap(c["invariant"], "  - invariant: ", "               "))
        out.append(_wrap(c["message"], "    violated:  ", "               "))
        if c["counterexample"]:
            out.append("    counterexample (shrunk by hypothesis):")
            out.append(_indent(c["counterexample"], "      "))
    out.append(_wrap(e["hint"] + f" (more: `python -m exercises hint {e['id']}`)", "  hint: ", "        "))
    return out


def format_total(reports: list[dict]) -> str:
    """The grand total over several chapters, one line per chapter."""
    width = max(len(f"{r['chapter']}  {r['title']}") for r in reports)
    lines = ["All chapters:"]
    for r in reports:
        name = f"{r['chapter']}  {r['title']}"
        lines.append(f"  {name:<{width}}  {r['score']:>3}/{r['max_score']}")
    score, max_score = sum(r["score"] for r in reports), sum(r["max_score"] for r in reports)
    lines.append(f"  {'grand total':<{width}}  {score:>3}/{max_score}")
    return "\n".join(lines)


def format_json(reports: list[dict]) -> str:
    score, max_score = sum(r["score"] for r in reports), sum(r["max_score"] for r in reports)
    return json.dumps({"score": score, "max_score": max_score, "full_marks": score == max_score,
                       "chapters": reports}, indent=2)
