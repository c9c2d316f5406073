"""A learner's file that cheats scores zero: one that patches the checks at import or while it is graded, and one
that writes a forged verdict to the grader's result pipe and exits. Each cheat here scored full marks on a grader
without exercises/grading/frozen.py and the signed pipe."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exercises.grading.grader import Source, format_report, grade_many  # noqa: E402
from exercises.grading.registry import get_chapter  # noqa: E402

CH00 = get_chapter("00")
WANTED = ["0.1", "0.2"]

WRONG = '''
import torch


def attention(q, k, v, allowed=None, *, causal=False):
    return torch.zeros_like(q)


def causal_mask(n_queries, n_keys=None, device=None):
    return torch.zeros(1)
'''

PATCHES = {  # at import, or (in_call) the first time the learner's function is called
    "check bodies replaced through the checks module": '''
import exercises.grading.checks.ch00_tiny_transformer as target
for exercise in target.EXERCISES.values():
    for c in exercise.checks:
        c.body = lambda *args, **kwargs: None
''',
    "the code object of every check body swapped": '''
import exercises.grading.checks.ch00_tiny_transformer as target
for exercise in target.EXERCISES.values():
    for c in exercise.checks:
        c.body.__code__ = (lambda *args, **kwargs: None).__code__
''',
    "each exercise's check list emptied": '''
from exercises.grading.checks import ch00_tiny_transformer as target
for exercise in target.EXERCISES.values():
    exercise.checks[:] = exercise.checks[:0]
''',
    "the exercises replaced in the registry dict": '''
import exercises.grading.checks.ch00_tiny_transformer as target
from exercises.grading.checking import Exercise
for key in list(target.EXERCISES):
    old = target.EXERCISES[key]
    target.EXERCISES[key] = Exercise(old.points, old.hint, [])
''',
    "the checking helpers patched (guard and hypothesis' given)": '''
import exercises.grading.checking as checking
checking.given = lambda **strategies: (lambda test: (lambda: None))
checking.guarded = lambda fn, name, exercise=None: (lambda *a, **k: None)
''',
    # while 0.1's checks run, its function patches every check: 0.2's (a wrong causal_mask) would then pass
    "a check body patched by the learner's function while it runs": '''
import exercises.grading.checks.ch00_tiny_transformer as target
_real = attention


def attention(q, k, v, allowed=None, *, causal=False):
    for exercise in target.EXERCISES.values():
        for c in exercise.checks:
            c.body.__code__ = (lambda *args, **kwargs: None).__code__
    return _real(q, k, v, allowed, causal=causal)
''',
}

FORGE = '''
import json, os, sys

payload = json.load(open(sys.argv[1]))
out = os.fdopen(payload["fd"], "w")
for j, job in enumerate(payload["jobs"]):
    for ex in job["exercises"]:
        ok = {"name": "all", "invariant": "all", "passed": True, "kind": None, "message": "", "counterexample": ""}
        out.write(json.dumps({"event": "start", "job": j, "exercise": ex}) + "\\n")
        out.write(json.dumps({"event": "result", "job": j, "exercise": ex, "checks": [ok], "printed": 0,
                              "output": ""}) + "\\n")
out.write(json.dumps({"event": "done"}) + "\\n")
out.flush()
os._exit(0)
'''


@pytest.mark.slow
def test_a_file_that_patches_the_checks_scores_zero_and_the_next_file_is_graded_by_the_real_checks(tmp_path):
    sources = []
    for i, patch in enumerate(PATCHES.values()):
        (tmp_path / f"cheat{i}.py").write_text(WRONG + patch)
        sources.append(Source("file", str(tmp_path / f"cheat{i}.py")))
    sources.append(Source("reference"))  # graded after the cheats, in the same worker: full marks still
    reports = grade_many(CH00, sources, WANTED)
    for name, report in zip(PATCHES, reports):
        assert report["score"] == 0, (name, format_report(report))
        for e in report["exercises"]:
            want = "failed" if "while it runs" in name and e["id"] == "0.2" else "tampered"
            assert e["status"] == want, (name, e["id"], e["status"], format_report(report))
        assert "changed the grader" in format_report(report), name
    assert reports[-1]["full_marks"], format_report(reports[-1])


@pytest.mark.slow
def test_a_file_that_forges_the_verdict_on_the_pipe_scores_zero(tmp_path):
    (tmp_path / "forge.py").write_text(WRONG + FORGE)
    report = grade_many(CH00, [Source("file", str(tmp_path / "forge.py"))], WANTED)[0]
    assert report["score"] == 0, format_report(report)
    assert {e["status"] for e in report["exercises"]} == {"tampered"}, format_report(report)
    assert "forged verdict" in format_report(report)
