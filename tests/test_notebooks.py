"""The chapters: each notebook is built from its jupytext source, shows no exercise's solution, and runs.

- A notebook's code cells are exactly its source's (chapters/NN_topic.py); its first cell names the source.
- The committed notebooks carry the outputs of a full run (a reader on the web sees results), with no error.
- No notebook, in its sources or its outputs, holds an exercise marker or the body of an exercise region.
- Every chapter runs top to bottom in quick mode (NANOMODELS_QUICK=1) within the design's budget, through the
  builder's own `execute`, in a temporary copy of chapters/ (the committed notebook is never rewritten).
"""

import ast
import importlib.util
import inspect
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS_DIR = ROOT / "chapters"
SOURCES = sorted(CHAPTERS_DIR.glob("[0-9][0-9]_*.py"))
QUICK_BUDGET_S = 150  # the design's budget is 2 minutes per chapter in quick mode; a little slack for load
BEGIN = re.compile(r"^\s*# BEGIN EXERCISE (\d+\.\d+)")
END = re.compile(r"^\s*# END EXERCISE\s*$")

jupytext = pytest.importorskip("jupytext", reason="the chapter builder needs jupytext (requirements.txt)")
nbformat = pytest.importorskip("nbformat", reason="the chapter builder needs nbformat (requirements.txt)")


def load(name: str):
    """A module of chapters/ (the notebooks import these with chapters/ as their working directory)."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CHAPTERS_DIR / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


build = load("build")
show = load("show")


def exercise_regions() -> dict[str, list[str]]:
    """{"0.1": [the body's lines, stripped, without blank and comment lines], ...} for every marked region of the
    library and the kernels."""
    regions: dict[str, list[str]] = {}
    for path in sorted([*ROOT.glob("nanomodels/**/*.py"), *ROOT.glob("kernels/**/*.py")]):
        open_id, body = None, []
        for line in path.read_text().splitlines():
            if (m := BEGIN.match(line)):
                open_id, body = m[1], []
            elif END.match(line) and open_id:
                regions[open_id] = [s for s in (b.strip() for b in body) if s and not s.startswith("#")]
                open_id = None
            elif open_id:
                body.append(line)
    return regions


def normalized(text: str) -> str:
    """One stripped, non-blank line per line, so that indentation and spacing cannot hide a copy."""
    return "\n".join(s for s in (line.strip() for line in text.splitlines()) if s)


def leaked_regions(text: str, regions: dict[str, list[str]]) -> list[str]:
    """The ids of the regions whose whole body appears in `text` (as consecutive whole lines)."""
    haystack = "\n" + normalized(text) + "\n"
    return [rid for rid, body in regions.items() if body and "\n" + "\n".join(body) + "\n" in haystack]


def notebook_text(nb, sources: bool = True) -> str:
    """Every cell's source (unless sources=False) and every text output (stream, text/plain, error traceback)."""
    parts = []
    for cell in nb.cells:
        parts.append(cell.source if sources else "")
        for out in cell.get("outputs", []):
            parts.append(out.get("text", ""))
            parts.append(str(out.get("data", {}).get("text/plain", "")))
            parts.extend(out.get("traceback", []))
    return "\n".join(parts)


def test_there_is_a_source_for_each_chapter_00_to_05():
    numbers = [p.name[:2] for p in SOURCES]
    assert numbers[:6] == ["00", "01", "02", "03", "04", "05"], f"chapter sources found: {[p.name for p in SOURCES]}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_code_cells_equal_its_source(source):
    notebook = source.with_suffix(".ipynb")
    assert notebook.exists(), f"{source.name} has no notebook: python chapters/build.py {source.name[:2]}"
    want = build.code_sources(build.read_source(source))
    got = build.code_sources(nbformat.read(notebook, as_version=4))
    first = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), min(len(want), len(got)))
    assert want == got, (f"{notebook.name} is out of date with {source.name} from code cell {first} on "
                         f"({len(got)} code cells vs {len(want)} in the source): python chapters/build.py "
                         f"{source.name[:2]} (add --execute if the computation changed)")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_first_cell_names_the_source_and_the_rebuild_command(source):
    first = nbformat.read(source.with_suffix(".ipynb"), as_version=4).cells[0].source
    for needed in (f"chapters/{source.name}", f"python chapters/build.py {source.name[:2]}"):
        assert needed in first, f"{source.stem}.ipynb: the first cell must say {needed!r}; it is {first!r}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_notebook_has_outputs_and_no_errors(source):
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert any(c.get("outputs") for c in code), f"{source.stem}.ipynb is committed without outputs"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{source.stem}.ipynb is committed with an error output: {errors[0].get('ename')}"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_notebook_prints_no_absolute_path_of_the_machine_it_ran_on(source):
    text = notebook_text(nbformat.read(source.with_suffix(".ipynb"), as_version=4))
    for machine_path in {str(ROOT), str(Path.home()), "/tmp/"} - {"/"}:
        assert machine_path not in text, \
            f"{source.stem}.ipynb prints {machine_path!r}: print paths relative to the repository"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_every_command_a_notebook_prints_for_its_results_is_the_one_stored_with_them(source):
    stored = {json.loads(p.read_text()).get("command") for p in (CHAPTERS_DIR / "results").glob("*.json")}
    text = notebook_text(nbformat.read(source.with_suffix(".ipynb"), as_version=4), sources=False)
    printed = re.findall(r"produced by: (.*)", text)
    stale = [command for command in printed if command.strip() not in stored]
    assert not stale, f"{source.stem}.ipynb prints commands no results file holds (moved or renamed?): {stale}"


def test_the_library_has_exercise_regions_to_look_for():
    regions = exercise_regions()
    assert len(regions) >= 17 and all(regions.values()), f"regions found: {sorted(regions)}"


def test_leak_detector_finds_a_region_body_shown_with_other_indentation():
    regions = exercise_regions()
    rid, body = next(iter(regions.items()))
    shown = "some output\n" + "\n".join("        " + line for line in body) + "\nmore output"
    assert leaked_regions(shown, regions) == [rid]
    assert leaked_regions("\n".join(body[:-1]), {rid: body}) == [], "a partial body is not the solution"


@pytest.mark.parametrize("path", [p for s in SOURCES for p in (s, s.with_suffix(".ipynb"))],
                         ids=[p.name for s in SOURCES for p in (s, s.with_suffix(".ipynb"))])
def test_no_chapter_shows_an_exercise_marker_or_solution(path):
    text = path.read_text() if path.suffix == ".py" else notebook_text(nbformat.read(path, as_version=4))
    assert "BEGIN EXERCISE" not in text and "END EXERCISE" not in text, f"{path.name} shows an exercise marker"
    leaked = leaked_regions(text, exercise_regions())
    assert not leaked, f"{path.name} shows the solution of exercise(s) {leaked} (use show(): it prints the stub)"


def test_show_prints_an_exercise_function_as_signature_docstring_and_grade_command():
    from nanomodels.attention import attention

    rendered = show.render(attention)
    regions = exercise_regions()
    assert rendered.startswith("def attention(") and attention.__doc__.strip().splitlines()[0] in rendered
    assert "python -m exercises grade 00" in rendered and "Exercise 0.1" in rendered
    assert "BEGIN EXERCISE" not in rendered and not leaked_regions(rendered, regions), rendered
    assert not any(line in normalized(rendered).splitlines() for line in regions["0.1"]), \
        f"a line of the body of 0.1 is shown:\n{rendered}"


def test_show_prints_a_function_without_exercise_whole():
    from nanomodels.attention import sdpa_attention

    assert show.render(sdpa_attention) == inspect.getsource(sdpa_attention)


def test_is_show_cell_accepts_only_imports_and_show_calls():
    assert build.is_show_cell("from nanomodels.attention import attention\n\nshow(attention)\nshow(exp.early_update)")
    assert not build.is_show_cell("import torch")
    assert not build.is_show_cell("show(attention)\nx = 1")
    assert not build.is_show_cell("print(show(attention))")
    assert build.calls_show("x = 1\nshow(attention)") and not build.calls_show("plt.show()")


def test_keep_outputs_keeps_unchanged_cells_and_drops_changed_ones():
    v4 = nbformat.v4
    old = v4.new_notebook(cells=[v4.new_code_cell("a = 1", outputs=[v4.new_output("stream", text="one")]),
                                 v4.new_code_cell("b = 2", outputs=[v4.new_output("stream", text="two")]),
                                 v4.new_code_cell("a = 1", outputs=[v4.new_output("stream", text="again")])])
    new = v4.new_notebook(cells=[v4.new_markdown_cell("text edited"), v4.new_code_cell("a = 1"),
                                 v4.new_code_cell("b = 3"), v4.new_code_cell("a = 1")])
    assert build.keep_outputs(new, old) == 2
    texts = [[o.text for o in c.get("outputs", [])] for c in new.cells]
    assert texts == [[], ["one"], [], ["again"]], texts


def test_experiment_modules_import_and_classify_a_run():
    exp = load("deepnet_experiments")
    assert exp.RESULTS == CHAPTERS_DIR / "results"
    assert exp.verdict(float("nan")) == "diverges" and exp.verdict(0.7) == "trains" and exp.verdict(3.4) == "stalls"
    subln = load("subln_experiments")
    assert subln.build is exp.build and subln.main is exp.main


def test_pmlm_experiment_run_returns_its_curve_and_final_exact_match():
    exp = load("pmlm_experiments")
    assert (exp.MASK, exp.P) == (exp.V, exp.V + 1) and exp.CONFIG["block_size"] == exp.S + exp.T
    r = exp.run("pseudo masks", seed=0, steps=2, eval_every=1, n_eval=4)
    assert [step for step, _, _ in r["curve"]] == [1, 2] and r["curve"][-1][2] == r["final"]
    assert 0.0 <= r["final"] <= 1.0 and r["seconds"] > 0


def test_unilm_experiment_trains_and_scores_cloze_on_the_reversal_toy():
    exp = load("unilm_experiments")
    assert exp.MASK == exp.task.vocab_size and exp.CONFIG["block_size"] == exp.S + exp.T
    model, losses = exp.train(exp.new_model(0), 2, exp.unilm_loss, seed=0)
    assert len(losses) == 2 and not model.training
    src, tgt = exp.cloze_accuracy(model, lambda: None, n=8)
    assert 0.0 <= src <= 1.0 and 0.0 <= tgt <= 1.0


def test_results_name_the_command_that_reproduces_them():
    for path in sorted((CHAPTERS_DIR / "results").glob("*.json")):
        command = json.loads(path.read_text()).get("command")
        assert isinstance(command, str), f"{path.name}: no 'command' that reproduces it"
        scripts = [word for word in command.split() if word.endswith(".py")]
        assert scripts and (ROOT / scripts[0]).is_file(), \
            f"{path.name}: its command {command!r} must run a script by its path from the repository root"


def test_every_code_cell_of_every_source_is_valid_python():
    for source in SOURCES:
        for i, code in enumerate(build.code_sources(build.read_source(source))):
            try:
                ast.parse(code)
            except SyntaxError as err:
                pytest.fail(f"{source.name}, code cell {i}: {err}")


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_chapter_runs_in_quick_mode(source, tmp_path):
    pytest.importorskip("nbclient", reason="running a notebook needs nbclient (requirements.txt)")
    pytest.importorskip("ipykernel", reason="running a notebook needs ipykernel (requirements.txt)")
    work = tmp_path / "chapters"
    shutil.copytree(CHAPTERS_DIR, work, ignore=shutil.ignore_patterns("*.ipynb", "__pycache__"))
    _, seconds = build.execute(build.read_source(source), quick=True, cwd=work, timeout=600)
    assert seconds < QUICK_BUDGET_S, f"{source.stem} took {seconds:.0f} s in quick mode (budget {QUICK_BUDGET_S} s)"
