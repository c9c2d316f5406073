"""The graders are tested: the reference scores full marks, the untouched stub zero, and every known-wrong
solution in exercises/grading/mutants/ loses its exercise's points; the stubs are in sync with the library; learner
code that prints, raises, exits, crashes or loops forever is contained.

Grading runs in worker processes (torch is imported once per worker), so each test grades in batches.
"""

import ast
import json
import re
import subprocess
import sys
import textwrap
from dataclasses import replace
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `exercises` sits beside the library; an older editable install may miss it
    sys.path.insert(0, str(ROOT))

from exercises.grading.grader import Source, format_report, grade, grade_many  # noqa: E402
from exercises.grading.registry import CHAPTERS, chapter_of, get_chapter  # noqa: E402
from exercises.grading.mutants import Mutant, PatchError, build, patched_source, region  # noqa: E402
from exercises.grading.mutants import load as load_mutants  # noqa: E402
from exercises.grading.stubs import BEGIN, END, MarkerError, generate, reset, scan, solved, write_stubs  # noqa: E402

CH00 = get_chapter("00")


MUTANTS = [pytest.param(c, m, id=f"{c.number}/{m.name}") for c in CHAPTERS.values() for m in load_mutants(c)]


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


@pytest.mark.parametrize("chapter", CHAPTERS.values(), ids=lambda c: c.number)
def test_readme_lists_every_exercise_with_its_title_and_points(chapter):
    readme = (ROOT / "exercises" / "README.md").read_text()
    spec = import_module(chapter.checks_module).EXERCISES
    row = next((line for line in readme.splitlines() if f"[`ex{chapter.name}.py`]" in line), "")
    assert row, f"exercises/README.md has no row for chapter {chapter.number} (ex{chapter.name}.py)"
    for m in scan(chapter):
        assert f"{m.id} {m.title} ({spec[m.id].points})" in row, f"the README's row lacks `{m.id} {m.title}`"


def test_two_digit_chapters_resolve_in_the_registry_stubs_hints_and_show():
    chapter = get_chapter("10")
    assert get_chapter("ch10") is chapter and get_chapter("ex10") is chapter and chapter_of("10.1") == "10"
    assert get_chapter("1").number == "01" and chapter_of("1.3") == "01"  # "1" is not "10", "10" is not "01"
    assert [m.key for m in scan(chapter)] == [(10, 1), (10, 2), (10, 3), (10, 4)]
    assert chapter.student_file.name == "ex10_retnet_xpos.py" and chapter.checks_module.endswith("ch10_retnet_xpos")
    from exercises.grading.hints import levels

    assert len(levels("10.2")) == 3
    sys.path.insert(0, str(ROOT / "chapters"))
    try:
        from build import source_path
        from show import render
    finally:
        sys.path.remove(str(ROOT / "chapters"))
    from nanomodels.retnet import retention_chunkwise

    assert source_path("10").name == "10_retnet_xpos.py"
    text = render(retention_chunkwise)
    assert "Exercise 10.2 (the chunkwise cross-chunk term): write the body in exercises/ex10_retnet_xpos.py" in text
    assert "python -m exercises grade 10" in text and "xi, zeta" not in text


def test_two_digit_chapters_own_their_exercises():
    assert chapter_of("12.1") == "12" and chapter_of("1.2") == "01" and chapter_of("0.1") == "00"
    assert get_chapter("12") is get_chapter("ch12") is CHAPTERS["12"]
    assert {chapter_of(m.id) for m in scan(CHAPTERS["12"])} == {"12"}


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
            "         'sample_next_token': (torch.zeros(1, 3),), 'train_bpe': ('aa', 257)}\n"
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
# max over sorted pairs, inverse-CDF sampling on probabilities, BPE training that recounts every pair after each
# merge): the checks test the contract, not the code.
ALTERNATIVE_00 = """
from collections import Counter

import regex
import torch

from nanomodels.attention import _combine
from nanomodels.tokenizer import GPT2_PATTERN


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
        k = min(top_k, probs.size(-1))
        kth = probs.sort(dim=-1, descending=True).values[:, k - 1: k]
        probs = torch.where(probs >= kth, probs, torch.zeros_like(probs))
        probs = probs / probs.sum(-1, keepdim=True)
    u = torch.rand(probs.size(0), 1, generator=generator, dtype=probs.dtype)
    return (probs.cumsum(-1) < u).sum(-1, keepdim=True).clamp(max=probs.size(-1) - 1)


def train_bpe(text, vocab_size, pattern=GPT2_PATTERN):
    if vocab_size < 256:
        raise ValueError("vocab_size must be >= 256")
    chunks = Counter(regex.findall(pattern, text))
    words = {tuple(chunk.encode("utf-8")): n for chunk, n in chunks.items()}
    merges = []
    while 256 + len(merges) < vocab_size:
        counts = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                counts[pair] += n
        if not counts or max(counts.values()) < 2:
            break
        pair = most_frequent_pair(dict(counts))
        merges.append(pair)
        words = {tuple(merge_pair(list(word), pair, 255 + len(merges))): n for word, n in words.items()}
    return merges
"""


# A correct chapter 10 written differently: einsum, the chunk's rows one at a time, exp(log zeta * exponent) and
# c = -((L + 1) // 2) for XPos, exp((r - c) log gamma) with masked_fill for the decay mask.
ALTERNATIVE_10 = """import math

import torch

from nanomodels.retnet import _check, rotate_pairs


def decay_mask(gamma, n):
    rows = torch.arange(n, device=gamma.device)
    diff = (rows[:, None] - rows[None, :]).to(gamma.dtype)  # (n, n)
    D = torch.exp(diff.clamp(min=0) * torch.log(gamma))
    return D.masked_fill(diff < 0, 0.0)


def retention_recurrent(q, k, v, gamma, state=None):
    g = _check(q, k, v, gamma, state).to(q.dtype)
    B, H, T, Dk = q.shape
    S = torch.zeros(B, H, Dk, v.size(-1), dtype=q.dtype) if state is None else state.clone()
    outs = []
    for n in range(T):
        S = g * S + torch.einsum("bhd,bhe->bhde", k[:, :, n], v[:, :, n])
        outs.append(torch.einsum("bhd,bhde->bhe", q[:, :, n], S))
    return torch.stack(outs, dim=2), S


def retention_chunkwise(q, k, v, gamma, chunk_size, state=None):
    g = _check(q, k, v, gamma, state)
    if type(chunk_size) is not int or chunk_size < 1:
        raise ValueError(f"chunk_size: must be a positive integer, got {chunk_size!r}")
    S = torch.zeros(*q.shape[:2], q.size(-1), v.size(-1), dtype=q.dtype) if state is None else state
    out = []
    for start in range(0, q.size(2), chunk_size):
        end = start + chunk_size
        qc, kc, vc = q[:, :, start:end], k[:, :, start:end], v[:, :, start:end]
        C = qc.size(2)
        inner = ((qc @ kc.transpose(-2, -1)) * decay_mask(g, C).to(q.dtype)) @ vc
        gh = g.flatten()
        rows = []
        for j in range(C):
            rows.append(torch.einsum("bhd,bhde->bhe", qc[:, :, j], S) * (gh ** (j + 1)).to(q.dtype)[None, :, None])
        out.append(inner + torch.stack(rows, dim=2))
        new = S * (gh ** C).to(q.dtype)[None, :, None, None]
        for j in range(C):
            w = (gh ** (C - 1 - j)).to(q.dtype)[None, :, None, None]
            new = new + w * kc[:, :, j, :, None] * vc[:, :, j, None, :]
        S = new
    return torch.cat(out, dim=2), S


def apply_xpos(q, k, *, q_offset=0, scale_base=512):
    if q.dim() < 2 or k.dim() < 2 or q.size(-1) != k.size(-1):
        raise ValueError("q, k: shapes")
    D = q.size(-1)
    if D % 2:
        raise ValueError("q, k: the last dimension D must be even")
    if not isinstance(q_offset, int) or isinstance(q_offset, bool) or q_offset < 0:
        raise ValueError("q_offset: must be an integer >= 0")
    if not scale_base > 0:
        raise ValueError("scale_base: must be > 0")
    Tq, Tk = q.size(-2), k.size(-2)
    work = torch.promote_types(q.dtype, torch.float32)
    qpos = torch.arange(q_offset, q_offset + Tq, device=q.device, dtype=work)
    kpos = torch.arange(Tk, device=k.device, dtype=work)
    L = max(q_offset + Tq, Tk)
    c = -((L + 1) // 2)
    log_zeta = torch.log((2 * torch.arange(D // 2, dtype=work) + 0.4 * D) / (1.4 * D))  # (D/2,)
    inv = 0.0 if math.isinf(scale_base) else 1.0 / scale_base
    q_scale = torch.exp((qpos[:, None] + c) * inv * log_zeta)
    k_scale = torch.exp(-(kpos[:, None] + c) * inv * log_zeta)
    q_scale = torch.stack((q_scale, q_scale), dim=-1).flatten(-2).to(q.dtype)
    k_scale = torch.stack((k_scale, k_scale), dim=-1).flatten(-2).to(q.dtype)
    return rotate_pairs(q, qpos) * q_scale, rotate_pairs(k, kpos) * k_scale
"""
ALTERNATIVES = {"00": ALTERNATIVE_00, "10": ALTERNATIVE_10}


@pytest.mark.slow
@pytest.mark.parametrize("chapter", CHAPTERS.values(), ids=lambda c: c.number)
def test_reference_scores_full_marks_and_untouched_stub_scores_zero(chapter, tmp_path):
    sources = [Source("reference"), Source("file", str(chapter.student_file))]
    if chapter.number in ALTERNATIVES:
        (tmp_path / "alternative.py").write_text(ALTERNATIVES[chapter.number])
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
def test_every_exercise_has_at_least_three_described_mutants(chapter):
    marked = {m.id: m for m in scan(chapter)}
    per_exercise = {ex: [] for ex in marked}
    for mutant in load_mutants(chapter):
        prefix = marked[mutant.exercise].function.rstrip("_") + "_"
        assert mutant.name.startswith(prefix), f"{mutant.name}: name it {prefix}<the mistake>"
        assert len(mutant.description) > 20, f"{mutant.name}: the description says what it gets wrong"
        per_exercise[mutant.exercise].append(mutant.name)
    for ex, names in per_exercise.items():
        assert len(names) >= 3, f"exercise {ex} has {len(names)} mutants ({names}); it needs at least 3"


@pytest.mark.parametrize("chapter, mutant", MUTANTS)
def test_mutant_patch_applies_once_to_its_region_and_changes_the_code(chapter, mutant):
    marked = next(m for m in scan(chapter) if m.id == mutant.exercise)
    source = patched_source(marked, mutant)  # PatchError when `old` is no longer in the region exactly once
    original = (ROOT / marked.source).read_text().splitlines()[marked.lines[0] - 1: marked.lines[1]]
    assert ast.dump(ast.parse(source)) != ast.dump(ast.parse("\n".join(original))), (
        f"{mutant.name}: the patch changes only comments or layout, not the code")
    assert callable(build(marked, mutant))


# Parameters a region reads that no mutant ignores, with why: the primary inputs of a computation (a mutant that
# ignores q returns nothing of the contract), sizes a given line already derives, and masks whose lanes are
# never stored or multiply zeros. Every other parameter the region reads has a mutant naming it.
NO_IGNORING_MUTANT = {
    "1.3": {"q": "the primary input", "q_pos": "the query positions feed only _visible, covered by MASK_KIND"},
    "2.2": {"n": "sizes the given span ids only"},
    "2.3": {"model": "the primary input", "prefix": "the primary input"},
    "3.1": {"x": "the primary input"},
    "6.2": {"q": "the primary input", "k": "the primary input", "v": "the primary input"},
    "6.3": {"lses": "the primary input"},
    "6.5": {"q": "the primary input", "k": "the primary input", "v": "the primary input"},
    "7.2": {"probs": "the primary input"},
    "8.5": {"packed": "the primary input"},
    "8.6": {"N": "masks columns n >= N, which are never stored", "K": "masks rows k >= K, whose x is 0"},
    "9.4": {"width": "sizes the layer only"},
    "9.5": {"x0": "the primary input"},
    "9.6": {"mu": "the primary input"},
    "10.2": {"q": "the primary input"},
}


def _region_parameters(marked) -> list[str]:
    """The graded function's parameters (inspect.signature of the reference) that its region reads."""
    import inspect

    fn = getattr(import_module(marked.module), marked.function)
    fn = getattr(fn, "fn", fn)  # a @triton.jit kernel: the Python function behind it
    names = {n.id for n in ast.walk(ast.parse(region(marked))) if isinstance(n, ast.Name)}
    return [p for p in inspect.signature(fn).parameters if p in names]


@pytest.mark.parametrize("chapter", CHAPTERS.values(), ids=lambda c: c.number)
def test_every_parameter_a_region_reads_has_a_mutant_that_ignores_it(chapter):
    mutants = load_mutants(chapter)
    missing = []
    for marked in scan(chapter):
        text = [f"{m.name} {m.description}" for m in mutants if m.exercise == marked.id]
        exempt = NO_IGNORING_MUTANT.get(marked.id, {})
        for param in _region_parameters(marked):
            named = any(re.search(rf"(?<![A-Za-z0-9]){re.escape(param)}(?![A-Za-z0-9])", s) for s in text)
            if param in exempt:
                assert not named, f"{marked.id}: `{param}` has a mutant now; drop it from NO_IGNORING_MUTANT"
            elif not named:
                missing.append(f"{marked.id} {marked.function}: `{param}`")
    assert not missing, ("parameters the region reads with no mutant naming them (write one that ignores it, "
                         "its name or description naming the parameter): " + "; ".join(missing))


def test_a_patch_that_no_longer_applies_fails_naming_the_mutant():
    marked = next(m for m in scan(CH00) if m.id == "0.2")
    stale = Mutant("0.2", "causal_mask_stale", "a patch of code that is gone",
                    old="this line is not in the region", new="pass")
    with pytest.raises(PatchError, match="causal_mask_stale.*occurs 0 times"):
        patched_source(marked, stale)
    assert "this line is not in the region" not in region(marked)


class _MutantReports(dict):
    """(chapter, mutant) -> report; a chapter's mutants are graded (one worker) when the first one is asked for,
    so `-k 01` grades chapter 01's mutants only."""

    def __missing__(self, key):
        chapter = get_chapter(key[0])
        mutants = load_mutants(chapter)
        sources = [Source("mutant", exercises=(m.exercise,), mutant=m.name) for m in mutants]
        for mutant, report in zip(mutants, grade_many(chapter, sources)):
            self[chapter.number, mutant.name] = report
        return self[key]


@pytest.fixture(scope="module")
def mutant_reports():
    """Every mutant graded on its own exercise, one worker per chapter."""
    return _MutantReports()


@pytest.mark.slow
@pytest.mark.parametrize("chapter, mutant", MUTANTS)
def test_mutant_loses_its_exercise_points(chapter, mutant, mutant_reports):
    report = mutant_reports[chapter.number, mutant.name]
    (e,) = report["exercises"]
    assert e["id"] == mutant.exercise
    assert e["points"] < e["max_points"], (f"the grader gives mutant {mutant.name} (a wrong {e['function']}: "
                                           f"{mutant.description}) full marks")
    assert e["status"] == "failed", summary(report)  # it runs and is caught by a check
    assert all(c["message"] for c in e["checks"] if not c["passed"])


# ---- the classes of misses: each has mutants the previous grader passed, caught now with a faithful message ----

# class -> (chapter, mutant, text a failing check's message must contain, or None)
CLASSES = {
    "an argument edited in place": [("00", "sample_next_token_divides_the_logits_in_place",
                                     "changed its argument `logits` in place"),
                                    ("00", "attention_scales_q_in_place", "changed its argument `q` in place"),
                                    ("04", "deepnorm_scales_x_in_place", "changed its argument `x` in place")],
    "wide values: scores far beyond +-30": [("00", "attention_fill_minus_1e4", "fill value"),
                                            ("00", "attention_unshifted_softmax", "NaN"),
                                            ("00", "sample_next_token_unshifted_softmax", None),
                                            ("10", "decay_mask_multiplies_by_the_mask", "NaN"),
                                            ("10", "apply_xpos_not_centred", "inf"),
                                            ("12", "relation_unshifted_softmax", "exp overflowed")],
    "ids of several digits and past a byte": [("00", "merge_pair_string_replace", "expected"),
                                              ("00", "most_frequent_pair_ties_by_string", "the tie goes to")],
    "rows of a batch that differ": [("00", "sample_next_token_threshold_from_the_first_row", None),
                                    ("02", "cloze_decode_first_row_decides", "greedy choices"),
                                    ("12", "attention_kl_first_batch_mask_for_all", "each batch has its own mask")],
    "spans unsorted and not contiguous": [("03", "pmlm_layout_assumes_contiguous_spans", "expected"),
                                          ("03", "pmlm_layout_sorts_each_span", "expected")],
    "sizes above 16": [("00", "causal_mask_fixed_buffer", None),
                       ("10", "decay_mask_at_most_16", "expected (2, 20, 20)")],
    "arguments and paths never exercised": [("00", "causal_mask_ignores_the_device", "device"),
                                            ("00", "sample_next_token_top_k_above_the_vocabulary_fails", None),
                                            ("00", "sample_next_token_generator_dropped_with_top_k", "generator"),
                                            ("02", "cloze_decode_zero_steps_fail", None),
                                            ("04", "init_branches_returns_nothing", "return model"),
                                            ("04", "init_branches_ignores_qk_gain", "qk_gain"),
                                            ("12", "minilm_v2_loss_ignores_the_mask", "the mask ignored"),
                                            ("12", "relation_scale_by_sqrt_d", "instead of 1/√(d / n_heads)")],
    "float32 and float16": [("00", "attention_fill_minus_1e9", "Half"),
                            ("00", "attention_computes_in_float64", "dtype"),
                            ("04", "deepnorm_in_float64", "dtype"),
                            ("05", "subln_ffn_returns_float64", "dtype"),
                            ("10", "retention_chunkwise_xi_in_float32", "dtype"),
                            ("10", "apply_xpos_scale_in_float32", "dtype"),
                            ("12", "attention_kl_in_float64", "dtype")],
    "fresh returned tensors and lists": [("00", "causal_mask_memoized", "a tensor it keeps"),
                                         ("02", "seq2seq_mask_memoized", "a tensor it keeps"),
                                         ("00", "merge_pair_returns_its_input_when_absent", "input list itself")],
    "statistics that pin the distribution, exact values": [
        ("04", "init_branches_xavier_uniform", "uniform"),
        ("04", "deepnorm_constants_copies_the_table", "do not copy the table"),
        ("05", "subln_gamma_copies_the_table", "log(2N)")],
    "hard cases as @example": [("00", "most_frequent_pair_ties_by_first_element", "the tie goes to"),
                               ("10", "apply_xpos_centre_not_floored", "odd L"),
                               ("10", "retention_chunkwise_full_length_last_chunk", "the last chunk has")],
    "faithful diagnoses": [("04", "init_branches_leaves_queries_and_keys", "was not re-initialized"),
                           ("00", "attention_softmax_over_heads", "its own q, k and v"),
                           ("04", "deepnorm_layernorm_written_out_without_eps", "eps"),
                           ("05", "magneto_encoder_decoder_swaps_the_gammas", "each stack takes its own row"),
                           ("03", "pmlm_mask_unbatched", "a batch"),
                           ("10", "retention_recurrent_ignores_the_state", "ignores the given state"),
                           ("10", "apply_xpos_centre_ignores_q_offset", "q_offset"),
                           ("10", "decay_mask_one_gamma_for_all_heads", "its own gamma"),
                           ("12", "attention_kl_student_to_teacher", "KL(student ‖ teacher)"),
                           ("12", "attention_kl_xlogy_nan_gradient", "NaN at entries where teacher and student are both 0"),
                           ("00", "attention_unshifted_softmax_nan_replaced", "shifted by its maximum"),
                           ("05", "subln_ffn_never_calls_the_inner_norm", "was never called"),
                           ("04", "deepnorm_layer_norm_with_its_own_eps", "with eps = 1e-05, but the norm's eps"),
                           ("06", "dilated_branch_kernel_drops_the_short_segment", "the last (short) segment"),
                           ("06", "dilated_branch_kernel_one_head_per_batch", "heads [1] were never computed")],
    "type-exact comparisons": [("00", "merge_pair_list_equal_to_everything", "plain list"),
                               ("04", "deepnorm_constants_returns_tensors", "Python floats")],
}

# chapter 11 (YOCO): its mutants in the classes above, each caught with the message that names it
for _cls, _cases in {
    "an argument edited in place": [("11", "gated_retention_recurrent_updates_the_state_in_place",
                                     "changed its argument `state` in place")],
    "wide values: scores far beyond +-30": [("11", "gated_retention_recurrent_inverse_decays", "NaN")],
    "rows of a batch that differ": [("11", "gated_retention_recurrent_one_decay_per_head", "batch row 0")],
    "arguments and paths never exercised": [("11", "gated_retention_recurrent_ignores_state", "S_0 = 0"),
                                            ("11", "shared_kv_cross_decoder_ignores_past_kv", "past and new"),
                                            ("11", "shared_kv_cross_decoder_ignores_n_queries", "n_queries"),
                                            ("11", "shared_kv_cross_decoder_ignores_later_layers", "called 0 times")],
    "faithful diagnoses": [("11", "gated_retention_recurrent_reads_before_the_update", "before k_t^T v_t is added"),
                           ("11", "gated_retention_recurrent_decays_the_new_token", "decays only the past"),
                           ("11", "shared_kv_cross_decoder_ignores_kv_norm", "RMSNorm (kv_norm) is missing"),
                           ("11", "shared_kv_cross_decoder_ignores_k_proj", "K comes from k_proj"),
                           ("11", "shared_kv_cross_decoder_kv_per_layer", "computes K, V ONCE"),
                           ("11", "shared_kv_cross_decoder_past_after_the_new_positions", "past positions must come"),
                           ("11", "shared_kv_cross_decoder_normed_queries", "the norm feeds K and V only"),
                           ("11", "yoco_prefill_no_early_exit", "no early exit"),
                           ("11", "yoco_prefill_one_dict_for_all_layers", "the same dict"),
                           ("11", "yoco_prefill_no_self_decoder_cache", "is empty"),
                           ("11", "yoco_prefill_pos_off_by_one", "counts the prompt's tokens")],
}.items():
    CLASSES[_cls] = CLASSES[_cls] + _cases


@pytest.mark.slow
@pytest.mark.parametrize("cls, number, name, needle", [pytest.param(k, *v, id=f"{k}: {v[1]}")
                                                        for k, vs in CLASSES.items() for v in vs])
def test_each_class_of_miss_is_caught_with_a_faithful_message(cls, number, name, needle, mutant_reports):
    report = mutant_reports[number, name]
    (e,) = report["exercises"]
    assert e["points"] == 0, f"{cls}: mutant {name} keeps its points\n{format_report(report)}"
    messages = " | ".join(c["message"] for c in e["checks"] if not c["passed"])
    assert needle is None or needle in messages, f"{cls}: mutant {name} is caught, but the message does not say " \
                                                 f"{needle!r}: {messages}"


LIBRARY = """
import nanomodels.tokenizer as library_tokenizer
import torch

from nanomodels.attention import attention  # noqa: F401 - the library's own 0.1, imported


def causal_mask(n_queries, n_keys=None, device=None):
    n_keys = n_queries if n_keys is None else n_keys
    return torch.ones(n_queries, n_keys, dtype=torch.bool, device=device).tril(diagonal=n_keys - n_queries)


def most_frequent_pair(counts):  # a wrapper around the library's own 0.4
    return library_tokenizer.most_frequent_pair(counts)
"""


@pytest.mark.slow
def test_the_library_own_functions_imported_or_wrapped_earn_no_points(tmp_path):
    student = tmp_path / "library.py"
    student.write_text(LIBRARY)
    report = grade(CH00, Source("file", str(student)), ["0.1", "0.2", "0.4"])
    status = {e["id"]: e for e in report["exercises"]}
    assert status["0.1"]["status"] == "library" and status["0.1"]["points"] == 0, summary(report)
    assert "imported, not written" in status["0.1"]["checks"][0]["message"]
    assert status["0.4"]["points"] == 0, summary(report)
    assert any("calls the library's own `most_frequent_pair`" in c["message"] for c in status["0.4"]["checks"])
    assert status["0.2"]["status"] == "passed", summary(report)  # written by the learner: full marks
    assert "library" in format_report(report)


def test_a_nan_in_the_output_is_named_with_where_it_first_appears():
    import torch

    from exercises.grading.checks.common import differs, max_diff, nan_note

    want = torch.zeros(2, 3, dtype=torch.float64)
    got = want.clone()
    got[1, 2] = float("nan")
    assert max_diff(got, want) == float("inf")
    text = differs(got, want)
    assert text.startswith("NaN") and "holds NaN: 1 of 6 entries, the first at index (1, 2)" in text, text
    assert nan_note(got, got) == ""  # a NaN the oracle has too is not the learner's
    assert differs(want + 0.5, want) == "0.5"


def test_guard_same_sees_a_tensor_edited_in_place_inside_a_list_argument():
    import torch

    from exercises.grading.checking import Violation, _same, guarded

    def total(tensors):
        return sum(t.sum() for t in tensors)

    def total_after_editing(tensors):
        tensors[1].add_(1)  # the caller's tensor, inside the caller's list
        return total(tensors)

    fresh = lambda: [torch.ones(3), torch.zeros(2, dtype=torch.float64)]  # noqa: E731
    assert guarded(total, "total")(fresh()) == 3  # an untouched list of tensors passes (no ambiguous truth value)
    with pytest.raises(Violation, match="changed its argument `tensors` in place"):
        guarded(total_after_editing, "total_after_editing")(fresh())
    nested = {"k": (torch.ones(2), [torch.zeros(1)]), "n": float("nan")}
    assert _same(nested, {"k": (torch.ones(2), [torch.zeros(1)]), "n": nested["n"]})
    assert not _same(nested, {"k": (torch.ones(2), [torch.ones(1)]), "n": nested["n"]})
    assert not _same([torch.ones(2)], (torch.ones(2),))  # type-exact: a tuple is not the list it replaced
    assert not _same([torch.ones(2)], [torch.ones(2, dtype=torch.float64)])


# ---- hints ------------------------------------------------------------------------------------------------

def test_hint_levels_advance_on_repeated_calls_and_level_chooses_one(tmp_path):
    from exercises.grading.hints import levels, show

    state, lines = tmp_path / "hints.json", []
    for want in (1, 2, 3, 3):
        assert show("4.3", path=state, out=lines.append) == 0
        assert lines[-3].startswith(f"Hint {want} of 3 for exercise 4.3")
        assert lines[-2].strip().split()[:4] == levels("4.3")[want - 1].split()[:4]
    assert show("4.3", 1, path=state, out=lines.append) == 0 and lines[-3].startswith("Hint 1 of 3")
    assert show("4.3", path=state, out=lines.append) == 0 and lines[-3].startswith("Hint 2 of 3")
    assert show("4.3", 4, path=state, out=lines.append) == 2
    assert run_cli("hint", "0.2", "--level", "3").stdout.startswith("Hint 3 of 3 for exercise 0.2")


OWN_HINTS = tuple(CHAPTERS)  # every chapter has three levels per exercise


@pytest.mark.parametrize("chapter", [c for c in CHAPTERS.values() if c.number in OWN_HINTS], ids=lambda c: c.number)
def test_no_hint_gives_a_line_of_the_solution(chapter):
    from exercises.grading.hints import levels

    for m in scan(chapter):
        solution = [line.strip() for line in region(m).splitlines()
                    if len(line.strip()) > 15 and not line.strip().startswith("#")]
        hints = levels(m.id)
        if chapter.number in OWN_HINTS:
            assert len(hints) == 3 and len(set(hints)) == 3, f"{m.id}: three distinct levels"
        for level, text in enumerate(hints, start=1):
            flat = " ".join(text.split())
            leaked = [line for line in solution if line in flat]
            assert not leaked, f"hint {level} of {m.id} contains the solution's line {leaked[0]!r}"


@pytest.mark.slow
def test_each_exercise_is_graded_on_its_own_even_when_given_code_calls_another(tmp_path):
    chapter = get_chapter("05")  # magneto_encoder_decoder's given line calls subln_gamma, exercise 5.1
    (m,) = [m for m in scan(chapter) if m.id == "5.3"]
    stub = chapter.student_file.read_text()
    solved_text = stub.replace(f'{m.indent}raise NotImplementedError("{m.message}")',
                               textwrap.indent(region(m), m.indent))
    (tmp_path / "only_5_3.py").write_text(solved_text)
    report = grade(chapter, Source("file", str(tmp_path / "only_5_3.py")))
    status = {e["id"]: e["status"] for e in report["exercises"]}
    assert status == {"5.1": "not implemented", "5.2": "not implemented", "5.3": "passed"}, summary(report)


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
    assert status["0.5"]["status"] == "library", summary(report)  # imported, not written: no points
    assert report["score"] == 0
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
    both = run_cli("grade", "all", "--reference", "--exercise", "0.2", "--exercise", "4.1")
    assert both.returncode == 0, both.stderr
    assert "Chapter 00" in both.stdout and "Chapter 04" in both.stdout
    assert re.search(r"grand total\s+4/4", both.stdout), both.stdout[-500:]


@pytest.mark.slow
def test_kernel_exercises_run_the_learners_kernel_even_where_the_interpreter_is_off(monkeypatch):
    # A GPU machine runs with TRITON_INTERPRET unset, and `kernels` sends CPU tensors to the PyTorch reference there:
    # an untouched stub of a kernel exercise would pass. The worker runs every kernel by the interpreter instead.
    # TRITON_INTERPRET=0 on this CPU machine is the same situation.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    chapter = get_chapter("06")
    report = grade(chapter, Source("file", str(chapter.student_file)), ["6.4"])
    assert [(e["id"], e["points"], e["status"]) for e in report["exercises"]] == [("6.4", 0, "not implemented")], \
        summary(report)


# ---- statistical checks never reject a correct answer (false-rejection < 1e-6 each, by construction) -------------

def _sigma_vae_eps_first(mu, noise_std=0.75, generator=None):  # a correct 9.6 that draws eps before sigma
    import torch

    eps = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
    sigma = torch.randn((mu.size(0),) + (1,) * (mu.dim() - 1), generator=generator, dtype=mu.dtype)
    return mu + sigma * (noise_std / 0.8) * eps


def _sigma_vae_normal_(mu, noise_std=0.75, generator=None):  # a correct 9.6 drawn with Tensor.normal_
    import torch

    sigma = torch.empty(mu.size(0), *([1] * (mu.dim() - 1)), dtype=mu.dtype).normal_(0, noise_std / 0.8,
                                                                                       generator=generator)
    return mu + sigma * torch.empty_like(mu).normal_(generator=generator)


def _q_sample_eps_first(x0, alphas_cumprod, generator=None):  # a correct 9.5 that draws eps before t
    import torch

    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)
    t = torch.randint(0, alphas_cumprod.numel(), (x0.size(0),), generator=generator)
    a = alphas_cumprod.to(x0.dtype)[t][:, None]
    return a.sqrt() * x0 + (1 - a).sqrt() * eps, t, eps


@pytest.mark.slow
@pytest.mark.parametrize("exercise, fn", [("9.6", _sigma_vae_eps_first), ("9.6", _sigma_vae_normal_),
                                          ("9.5", _q_sample_eps_first)], ids=lambda v: getattr(v, "__name__", v))
def test_statistical_checks_pass_correct_answers_in_any_draw_order_and_seed(exercise, fn):
    from exercises.grading.checking import run_check

    spec = import_module(get_chapter(chapter_of(exercise)).checks_module).EXERCISES[exercise]
    for c in spec.checks:  # each seeded check on 40 seeds (the grader draws 4 to 6)
        result = run_check(c, fn, max_examples=40 if c.strategies else None, exercise=spec)
        assert result["passed"], f"{exercise} {c.name} rejects a correct answer: {result['message']}"


# exercise -> seeds per check: the statistical checks with a seed strategy (frequencies, rates and fractions of many
# draws, each bound documented in its check with a false-rejection rate below 1e-6) on the reference
STATISTICAL = {"0.5": 40, "2.4": 12, "8.1": 40, "9.6": 40}


@pytest.mark.slow
@pytest.mark.parametrize("exercise", STATISTICAL)
def test_statistical_checks_pass_the_reference_under_many_seeds(exercise):
    from exercises.grading.checking import run_check

    chapter = get_chapter(chapter_of(exercise))
    spec = import_module(chapter.checks_module).EXERCISES[exercise]
    marked = next(m for m in scan(chapter) if m.id == exercise)
    fn = getattr(import_module(marked.module), marked.function)
    seeded = [c for c in spec.checks if "seed" in c.strategies]
    assert seeded, f"{exercise}: no check draws a seed"
    for c in seeded:
        result = run_check(c, fn, max_examples=STATISTICAL[exercise], exercise=spec)
        assert result["passed"], f"{exercise} {c.name} rejects the reference: {result['message']}"


def test_a_mutant_file_section_without_its_two_blocks_fails_naming_the_mutant():
    from exercises.grading.mutants import parse
    good = "# title\n\n## 0.2 causal_mask_x\n\nsays what\nit gets wrong\n\n```python\na = 1\n```\nbecomes\n```python\n```\n"
    (m,) = parse(good)
    assert (m.exercise, m.name, m.description, m.old, m.new) == ("0.2", "causal_mask_x", "says what it gets wrong",
                                                                  "a = 1", "")
    with pytest.raises(PatchError, match="causal_mask_x.*two ```python blocks"):
        parse(good.replace("becomes\n", ""))
    with pytest.raises(PatchError, match="causal_mask_x"):
        parse("## 0.2 causal_mask_x\n\nonly prose\n")
