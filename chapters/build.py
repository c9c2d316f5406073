"""Build a chapter notebook from its source: chapters/NN_topic.py (jupytext percent format) -> chapters/NN_topic.ipynb.

    python chapters/build.py 04                     # rewrite the notebook from the source, keeping the outputs
                                                    # of every code cell whose source did not change
    python chapters/build.py 04 --execute           # ... and run it top to bottom (a full run: minutes), saving outputs
    python chapters/build.py all --execute --quick  # every chapter in quick mode (NANOMODELS_QUICK=1)

The source is what one edits; the notebook is what readers open (on the web too), with the outputs of a full run.
Without --execute a text edit keeps the outputs of a full run; a code cell whose source changed loses its outputs
until the next --execute. One kind of cell is brought up to date at every build: a *show cell*, made only of
imports and `show(...)` calls, prints library source and nothing that depends on a run, so the builder re-renders
it (the same `show` in this process) and a notebook never prints code the library no longer has. `execute` is
also what tests/test_notebooks.py runs (quick mode, in a temporary copy of chapters/).
"""

import argparse
import ast
import contextlib
import copy
import hashlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import jupytext
import nbformat

HERE = Path(__file__).resolve().parent
KERNEL = "python3"
KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": KERNEL}


def sources() -> dict[str, Path]:
    """{"00": chapters/00_tiny_transformer.py, ...}: every chapter source, by number."""
    return {p.name[:2]: p for p in sorted(HERE.glob("[0-9][0-9]_*.py"))}


def source_path(number: str) -> Path:
    """The source of chapter `number` ('4', '04' or '04_deepnet')."""
    key = number[:2] if number[:2].isdigit() else number.zfill(2)
    found = sources()
    if key not in found:
        raise ValueError(f"chapter: no chapters/{key}_*.py; the chapters are {', '.join(found)} (or 'all')")
    return found[key]


def code_sources(nb: nbformat.NotebookNode) -> list[str]:
    """The source of every code cell, in order: what must agree between a source and its notebook."""
    return [cell.source for cell in nb.cells if cell.cell_type == "code"]


def read_source(path: Path) -> nbformat.NotebookNode:
    """The notebook a source describes, without outputs; its first cell must name the source."""
    nb = jupytext.read(path, fmt="py:percent")
    if not nb.cells or f"chapters/{path.name}" not in nb.cells[0].source:
        raise ValueError(f"{path.name}: the first cell must say where the source is (chapters/{path.name}) "
                         "and how to rebuild the notebook")
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    seen: dict[str, int] = {}
    for cell in nb.cells:
        cell.metadata.pop("lines_to_next_cell", None)  # jupytext's layout hint for the .py, not the notebook's
        # an id from the content, so that a rebuild does not rename every cell (diffs stay small)
        digest = hashlib.sha1(f"{cell.cell_type}\n{cell.source}".encode()).hexdigest()[:10]
        seen[digest] = seen.get(digest, 0) + 1
        cell.id = digest if seen[digest] == 1 else f"{digest}-{seen[digest]}"
    return nb


def keep_outputs(nb: nbformat.NotebookNode, previous: nbformat.NotebookNode) -> int:
    """Copy outputs from `previous` into the code cells of `nb` whose source is unchanged; returns how many.

    Cells are matched by their exact source, in order, so two identical cells keep their own outputs."""
    pool: dict[str, list] = {}
    for cell in previous.cells:
        if cell.cell_type == "code":
            pool.setdefault(cell.source, []).append(cell)
    kept = 0
    for cell in nb.cells:
        if cell.cell_type == "code" and pool.get(cell.source):
            old = pool[cell.source].pop(0)
            cell.outputs, cell.execution_count = old.outputs, old.execution_count
            kept += bool(old.outputs)
    return kept


def is_show_cell(source: str) -> bool:
    """True for a cell made only of imports and `show(...)` calls, with at least one call."""
    shows = 0
    for node in ast.parse(source).body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call) and \
                isinstance(node.value.func, ast.Name) and node.value.func.id == "show":
            shows += 1
        elif not isinstance(node, (ast.Import, ast.ImportFrom)):
            return False
    return shows > 0


def calls_show(source: str) -> bool:
    """True for a cell that calls `show(...)` anywhere."""
    return any(isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "show"
               for node in ast.walk(ast.parse(source)))


def refresh_show_cells(nb: nbformat.NotebookNode, cwd: Path = HERE) -> int:
    """Re-render the output of every show cell in this process; returns how many.

    The imports of all earlier code cells run first (only the imports: a show cell may name a module that the
    setup cell imported), with `cwd` on sys.path as it is for the notebook's kernel."""
    namespace: dict = {}
    sys.path.insert(0, str(cwd))
    refreshed = 0
    try:
        for cell in nb.cells:
            if cell.cell_type != "code":
                continue
            if is_show_cell(cell.source):
                printed = io.StringIO()
                with contextlib.redirect_stdout(printed):
                    exec(compile(cell.source, "<show cell>", "exec"), namespace)
                cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=printed.getvalue())]
                refreshed += 1
            else:
                imports = [n for n in ast.parse(cell.source).body if isinstance(n, (ast.Import, ast.ImportFrom))]
                exec(compile(ast.Module(body=imports, type_ignores=[]), "<imports>", "exec"), namespace)
    finally:
        sys.path.remove(str(cwd))
    return refreshed


def execute(nb: nbformat.NotebookNode, *, quick: bool, cwd: Path = HERE, timeout: int = 1800) -> tuple:
    """Run a copy of `nb` top to bottom in this Python, in `cwd`; returns (the executed copy, seconds).

    The kernel is 'python3' pointing at this interpreter (whatever other python3 kernels the machine has);
    quick=True sets NANOMODELS_QUICK=1 and a non-interactive matplotlib backend, a full run keeps the inline
    backend so that the figures are saved in the notebook."""
    from nbclient import NotebookClient

    nb = copy.deepcopy(nb)
    saved = {k: os.environ.get(k) for k in ("JUPYTER_PATH", "NANOMODELS_QUICK", "MPLBACKEND", "OMP_NUM_THREADS")}
    with tempfile.TemporaryDirectory() as root:
        spec = Path(root) / "kernels" / KERNEL
        spec.mkdir(parents=True)
        (spec / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": KERNELSPEC["display_name"], "language": "python"}))
        os.environ["JUPYTER_PATH"] = root + (os.pathsep + saved["JUPYTER_PATH"] if saved["JUPYTER_PATH"] else "")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        if quick:
            os.environ["NANOMODELS_QUICK"] = "1"
            os.environ["MPLBACKEND"] = "Agg"
        else:
            os.environ.pop("NANOMODELS_QUICK", None)
            os.environ.pop("MPLBACKEND", None)
        try:
            start = time.perf_counter()
            NotebookClient(nb, kernel_name=KERNEL, timeout=timeout,
                           resources={"metadata": {"path": str(cwd)}}).execute()
            seconds = time.perf_counter() - start
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    return nb, seconds


def build(number: str, *, run: bool = False, quick: bool = False) -> Path:
    """Write chapter `number`'s notebook from its source (see the module docstring); returns its path."""
    source = source_path(number)
    path = source.with_suffix(".ipynb")
    nb = read_source(source)
    if run:
        nb, seconds = execute(nb, quick=quick)
        note = f"executed ({'quick mode' if quick else 'full run'}) in {seconds:.0f} s"
    else:
        kept = keep_outputs(nb, nbformat.read(path, as_version=4)) if path.exists() else 0
        shown = refresh_show_cells(nb)
        note = f"kept the outputs of {kept} unchanged code cells, re-rendered {shown} show cells"
        frozen = [i for i, code in enumerate(code_sources(nb)) if calls_show(code) and not is_show_cell(code)]
        if frozen:
            note += (f"; code cells {frozen} call show() among other code: the source they print is refreshed only "
                     "by --execute (a show cell of its own is refreshed at every build)")
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print(f"wrote chapters/{path.name}: {note}")
    return path


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("chapter", help="the chapter number (00, 4, ...) or 'all'")
    parser.add_argument("--execute", action="store_true", help="run the notebook and save its outputs")
    parser.add_argument("--quick", action="store_true",
                        help="with --execute: quick mode (NANOMODELS_QUICK=1); its outputs are not for committing")
    args = parser.parse_args(argv)
    if args.quick and not args.execute:
        parser.error("--quick only applies with --execute")
    try:
        for number in (sources() if args.chapter == "all" else [args.chapter]):
            build(number, run=args.execute, quick=args.quick)
    except ValueError as err:
        parser.error(str(err))


if __name__ == "__main__":
    main()
