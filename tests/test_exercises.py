"""The graders are tested: the reference scores full marks, the untouched stub zero, and every known-wrong
solution in exercises/mutants/ loses its exercise's points; the stubs are in sync with the library; learner
code that prints, raises, exits, crashes or loops forever is contained.

Grading runs in worker processes (torch is imported once per worker), so each test grades in batches.
"""

import ast
import json
import subprocess
import sys
from dataclasses import replace
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `exercises` sits beside the library; an older editable install may miss it
    sys.path.insert(0, str(ROOT))

from exercises.grader import Source, format_report, grade, grade_many  # noqa: E402
from exercises.registry import CHAPTERS, chapter_of, get_chapter  # noqa: E402
from exercises.stubs import BEGIN, END, MarkerError, generate, reset, scan, solved, write_stubs  # noqa: E402

CH00 = get_chapter("00")


def mutant_function(path: Path, chapter) -> str:
    """The one exercise function a mutant file defines."""
    names = {f.function for f in scan(chapter)}
    tree = ast.parse(path.read_text())
    defined = [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
    assert len(defined) == 1, f"{path.name}: a mutant defines exactly one exercise function, found {defined}"
    return defined[0]


MUTANTS = [pytest.param(c, p, id=f"{c.number}/{p.stem}") for c in CHAPTERS.values()
           for p in sorted(c.mutants_dir.glob("*.py"))]


def exercise_of(path: Path, chapter) -> str:
    function = mutant_function(path, chapter)
    return next(m.id for m in scan(chapter) if m.function == function)


def summary(report: dict) -> str:
    return "\n".join(f"{e['id']} {e['points']}/{e['max_points']} {e['status']}" for e in report["exercises"])


# ---- one source of truth -----------------------------------------------------------------------------------

@pytest.mark.parametrize("chapter", CHAPTERS.values(), ids=lambda c: c.number)
def test_committed_stubs_are_in_sync_with_the_library(chapter):
    assert chapter.student_file.read_text() == generate(chapter), (
        f"{chapter.student_file.name} is out of sync with {', '.join(chapter.sources)}: "
        "run `python -m exercises stubs` and commit the result")


@pytest.mark.parametrize("chapter", CHAPTERS.values(), ids=lambda c: c.number)
def test_every_marked_exercise_has_points_a_hint_and_checks(chapter):
    spec = import_module(chapter.checks_module).EXERCISES
    ids = [m.id for m in scan(chapter)]
    assert sorted(spec) == sorted(ids), f"checks for {sorted(spec)}, marked regions for {ids}"
    for ex, e in spec.items():
        assert chapter_of(ex) == chapter.number
        assert isinstance(e.points, int) and 1 <= e.points <= 5, f"{ex}: points {e.points}"
        assert e.hint.strip() and e.checks, f"{ex}: a hint and at least one check"
        assert len({c.name for c in e.checks}) == len(e.checks), f"{ex}: check names repeat"
        assert all(c.invariant.strip() for c in e.checks)


def test_chapter_00_has_the_four_required_exercises():
    titles = " | ".join(m.title for m in scan(CH00))
    assert len(scan(CH00)) >= 4
    for topic in ("attention", "causal mask", "BPE", "temperature and top-k"):
        assert topic in titles, f"chapter 00 lacks an exercise on {topic}: {titles}"


def test_stub_keeps_code_outside_the_region_and_imports_helpers_from_the_library():
    text = CH00.student_file.read_text()
    assert "    allowed = _combine(allowed, causal, q.size(-2), k.size(-2), q.device)\n" \
           '    raise NotImplementedError("Exercise 0.1: masked scaled dot-product attention")' in text
    assert "from nanomodels.attention import _combine" in text
    assert not any(BEGIN.match(line) or END.match(line) for line in text.splitlines())
    for m in scan(CH00):  # no line of a reference solution leaks into the stub
        region = (ROOT / m.source).read_text().splitlines()[m.region[0]: m.region[1] - 1]
        assert not [line for line in region if len(line.strip()) > 12 and line in text], m.id


def test_stub_file_runs_standalone_and_every_exercise_raises_its_number():
    code = ("import runpy, torch\n"
            f"ns = runpy.run_path({str(CH00.student_file)!r})\n"
            "calls = {'attention': (torch.zeros(1, 1, 2, 2),) * 3, 'causal_mask': (3,),\n"
            "         'merge_pair': ([1], (1, 1), 9), 'most_frequent_pair': ({(1, 2): 1},),\n"
            "         'sample_next_token': (torch.zeros(1, 3),)}\n"
            "for name, args in calls.items():\n"
            "    try:\n"
            "        ns[name](*args)\n"
            "    except NotImplementedError as e:\n"
            "        print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    raised = [line.split(":")[0] for line in out.stdout.splitlines()]
    assert raised == [f"Exercise {m.id}" for m in scan(CH00)]


def test_generator_replaces_only_the_region_and_rejects_bad_markers(tmp_path):
    lib = tmp_path / "lib.py"
    lib.write_text('import math\n\nSCALE = 2.0\n\n\ndef helper(x):\n    return x\n\n\n'
                   'def f(x: float) -> float:\n    """Doc: f(x) = helper(x) * SCALE."""\n    y = helper(x)\n'
                   '    # BEGIN EXERCISE 0.1: double it\n    y = y * SCALE\n    # END EXERCISE\n'
                   '    return math.floor(y)\n')
    chapter = replace(CH00, sources=(str(lib),), directory=tmp_path)
    text = generate(chapter)
    assert ('    y = helper(x)\n    raise NotImplementedError("Exercise 0.1: double it")\n'
            '    return math.floor(y)') in text
    assert "import math" in text and "from lib import SCALE, helper" in text and "y * SCALE" not in text
    compile(text, "stub", "exec")
    for bad in ("    # BEGIN EXERCISE 0.1: x\n    y = 1\n",  # no END
                "    # END EXERCISE\n",  # no BEGIN
                "    # BEGIN EXERCISE 3.1: wrong chapter\n    y = 1\n    # END EXERCISE\n",
                "    # BEGIN EXERCISE 0.1 missing colon\n    y = 1\n    # END EXERCISE\n"):
        lib.write_text(f"def g(y):\n{bad}    return y\n")
        with pytest.raises(MarkerError):
            scan(chapter)


def test_stubs_check_flags_an_out_of_sync_file_and_never_overwrites_solutions(tmp_path):
    chapter = replace(CH00, directory=tmp_path)
    lines = []
    assert write_stubs([chapter], check=True, out=lines.append) == 1 and "OUT OF SYNC" in lines[-1]  # missing
    assert write_stubs([chapter], out=lines.append) == 0
    assert write_stubs([chapter], check=True, out=lines.append) == 0 and "in sync" in lines[-1]
    stub = chapter.student_file.read_text()
    solved_text = stub.replace('raise NotImplementedError("Exercise 0.4: the most frequent pair, ties to the '
                               'smallest pair")', "return min(counts, key=lambda p: (-counts[p], p))")
    chapter.student_file.write_text(solved_text)
    assert solved(chapter, solved_text) == ["0.4"]
    assert write_stubs([chapter], check=True, out=lines.append) == 1
    assert write_stubs([chapter], out=lines.append) == 1 and "NOT overwritten" in lines[-1]
    assert chapter.student_file.read_text() == solved_text
    assert reset([chapter], yes=False, out=lines.append) == 1 and "0.4 would be lost" in lines[-1]
    assert chapter.student_file.read_text() == solved_text
    assert reset([chapter], yes=True, out=lines.append) == 0
    assert chapter.student_file.read_text() == stub


# ---- the graders are tested ------------------------------------------------------------------------------

# A correct chapter 00 written differently from the library (einsum, -inf then nan_to_num, tril, a for loop,
# max over sorted pairs, inverse-CDF sampling on probabilities): the checks test the contract, not the code.
ALTERNATIVE_00 = """
import torch

from nanomodels.attention import _combine


def attention(q, k, v, allowed=None, *, causal=False):
    allowed = _combine(allowed, causal, q.size(-2), k.size(-2), q.device)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * q.size(-1) ** -0.5
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    weights = torch.nan_to_num(torch.softmax(scores, dim=-1), nan=0.0)
    return torch.einsum("bhqk,bhkd->bhqd", weights, v)


def causal_mask(n_queries, n_keys=None, device=None):
    n_keys = n_queries if n_keys is None else n_keys
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=n_keys - n_queries)


def merge_pair(ids, pair, new_id):
    out, skip = [], False
    for i, x in enumerate(ids):
        if skip:
            skip = False
        elif i + 1 < len(ids) and (x, ids[i + 1]) == tuple(pair):
            out.append(new_id)
            skip = True
        else:
            out.append(x)
    return out


def most_frequent_pair(counts):
    return max(sorted(counts), key=lambda p: counts[p])


def sample_next_token(logits, temperature=1.0, top_k=None, generator=None):
    if temperature == 0:
        return torch.max(logits, dim=-1, keepdim=True).indices
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_k is not None:
        kth = probs.sort(dim=-1, descending=True).values[:, top_k - 1: top_k]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=probs.dtype)
    return (probs.cumsum(-1) < u).sum(-1, keepdim=True).clamp(max=probs.size(-1) - 1)
"""


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS.values(), ids=lambda c: c.number)
def test_reference_scores_full_marks_and_untouched_stub_scores_zero(chapter, tmp_path):
    sources = [Source("reference"), Source("file", str(chapter.student_file))]
    if chapter.number == "00":
        (tmp_path / "alternative.py").write_text(ALTERNATIVE_00)
        sources.append(Source("file", str(tmp_path / "alternative.py")))
    reference, stub, *alternative = grade_many(chapter, sources)
    assert reference["full_marks"], format_report(reference)
    assert reference["score"] == reference["max_score"] > 0
    assert stub["score"] == 0, format_report(stub)
    assert {e["status"] for e in stub["exercises"]} == {"not implemented"}, summary(stub)
    assert all(e["checks_passed"] == 0 for e in stub["exercises"]), summary(stub)
    for report in alternative:  # a correct solution that is not the library's code also gets full marks
        assert report["full_marks"], format_report(report)


@pytest.mark.parametrize("chapter", CHAPTERS.values(), ids=lambda c: c.number)
def test_every_exercise_has_at_least_three_commented_mutants(chapter):
    per_exercise = {m.id: [] for m in scan(chapter)}
    for path in sorted(chapter.mutants_dir.glob("*.py")):
        function = mutant_function(path, chapter)
        prefix = function.rstrip("_") + "_"
        assert path.stem.startswith(prefix), f"{path.name}: name it {prefix}<the mistake>.py"
        first = path.read_text().splitlines()[0]
        assert first.startswith("# ") and len(first) > 20, f"{path.name}: first line says what it gets wrong"
        per_exercise[exercise_of(path, chapter)].append(path.name)
    for ex, names in per_exercise.items():
        assert len(names) >= 3, f"exercise {ex} has {len(names)} mutants ({names}); it needs at least 3"


@pytest.fixture(scope="module")
def mutant_reports():
    """Every mutant graded on its own exercise, one worker per chapter."""
    reports = {}
    for chapter in CHAPTERS.values():
        paths = sorted(chapter.mutants_dir.glob("*.py"))
        sources = [Source("mutant", str(p), (exercise_of(p, chapter),)) for p in paths]
        for path, report in zip(paths, grade_many(chapter, sources)):
            reports[path] = report
    return reports


@pytest.mark.slow
@pytest.mark.parametrize("chapter, path", MUTANTS)
def test_mutant_loses_its_exercise_points(chapter, path, mutant_reports):
    (e,) = mutant_reports[path]["exercises"]
    assert e["id"] == exercise_of(path, chapter)
    assert e["points"] < e["max_points"], (f"the grader gives {path.name} (a wrong {e['function']}: "
                                           f"{path.read_text().splitlines()[0][2:]}) full marks")
    assert e["status"] == "failed", summary(mutant_reports[path])  # it runs and is caught by a check
    assert all(c["message"] for c in e["checks"] if not c["passed"])


# ---- containment -------------------------------------------------------------------------------------------

UNRULY = '''
import os

import torch

from nanomodels.transformer import sample_next_token  # a correct 0.5, imported

print("hello from import time")


def attention(q, k, v, allowed=None, *, causal=False):
    for _ in range(1000):
        print("debugging...")
    return q


def causal_mask(n_queries, n_keys=None, device=None):
    while True:
        pass


def merge_pair(ids, pair, new_id):
    return ids[0] / 0


def most_frequent_pair(counts):
    os._exit(3)
'''


@pytest.mark.slow
def test_code_that_prints_loops_raises_or_exits_is_contained(tmp_path):
    student = tmp_path / "student.py"
    student.write_text(UNRULY)
    report = grade(CH00, Source("file", str(student)), timeout=4)
    status = {e["id"]: e for e in report["exercises"]}
    assert status["0.1"]["status"] == "failed" and status["0.1"]["points"] == 0
    assert status["0.2"]["status"] == "timed out"
    assert "timed out after 4 s" in status["0.2"]["checks"][0]["message"]
    assert status["0.3"]["status"] == "failed"
    line = UNRULY.splitlines().index("    return ids[0] / 0") + 1
    where = f"ZeroDivisionError: division by zero (line {line}"
    assert any(where in c["message"] for c in status["0.3"]["checks"]), status["0.3"]["checks"]
    assert status["0.4"]["status"] == "crashed" and "exit status 3" in status["0.4"]["checks"][0]["message"]
    assert status["0.5"]["status"] == "passed", summary(report)
    assert report["score"] == status["0.5"]["max_points"]
    assert report["printed_lines"] > 1000
    text = format_report(report)
    assert "debugging..." not in text and f"printed {report['printed_lines']} line(s)" in text


@pytest.mark.slow
def test_a_file_that_cannot_be_imported_scores_zero_with_the_error(tmp_path):
    syntax, raises, hangs, empty = (tmp_path / f"{n}.py" for n in ("syntax", "raises", "hangs", "empty"))
    syntax.write_text("def attention(q, k, v:\n    pass\n")
    raises.write_text("import sys\nraise RuntimeError('boom at import')\n")
    hangs.write_text("while True:\n    pass\n")
    empty.write_text("x = 1\n")
    sources = [Source("file", str(p)) for p in (syntax, raises, hangs, empty)]
    reports = grade_many(CH00, sources, ["0.2", "0.3"], timeout=3)
    needles = ("SyntaxError", "RuntimeError: boom at import", "timed out after 3 s")
    for report, needle in zip(reports[:3], needles):
        assert needle in report["import_error"], report["import_error"]
        assert report["score"] == 0 and {e["status"] for e in report["exercises"]} == {"import error"}
        assert needle in format_report(report)
    assert reports[3]["import_error"] is None
    assert {e["status"] for e in reports[3]["exercises"]} == {"missing"}


# ---- the command line ------------------------------------------------------------------------------------

def run_cli(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "exercises", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout)


@pytest.mark.slow
def test_cli_json_has_the_fields_and_exit_status_is_zero_only_at_full_marks():
    full = run_cli("grade", "00", "--reference", "--exercise", "0.2", "--exercise", "0.4", "--json")
    assert full.returncode == 0, full.stderr
    data = json.loads(full.stdout)
    assert data["full_marks"] and data["score"] == data["max_score"] == 4
    (chapter,) = data["chapters"]
    assert [e["id"] for e in chapter["exercises"]] == ["0.2", "0.4"]
    for e in chapter["exercises"]:
        assert {"id", "title", "function", "points", "max_points", "status", "checks"} <= set(e)
        assert {"name", "invariant", "passed", "message", "counterexample"} <= set(e["checks"][0])
    stub = run_cli("grade", "00", "--exercise", "0.2")
    assert stub.returncode == 1, stub.stderr
    assert "0.2  the causal mask" in stub.stdout and "not implemented" in stub.stdout and "0/2" in stub.stdout
    assert run_cli("grade", "00", "--file", "no/such/file.py").returncode == 2
    assert run_cli("grade", "00", "--exercise", "9.9").returncode == 2
    assert run_cli("stubs", "--check").returncode == 0
