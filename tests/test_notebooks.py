"""Every chapter notebook runs top to bottom in quick mode (NANOMODELS_QUICK=1), in this Python.

The committed notebooks carry the outputs of a full run; these tests also check that they do (a reader
on the web sees results) and that no committed cell holds an error.
"""

import json
import os
import sys
import time
from pathlib import Path

import pytest

CHAPTERS = sorted((Path(__file__).parent.parent / "chapters").glob("[0-9][0-9]_*.ipynb"))
QUICK_BUDGET_S = 150  # the design's budget is 2 minutes per chapter in quick mode; a little slack for load


@pytest.fixture(scope="module")
def kernel_name(tmp_path_factory):
    """A kernel spec that runs *this* interpreter, whatever other 'python3' kernels the machine has."""
    root = tmp_path_factory.mktemp("jupyter")
    spec_dir = root / "kernels" / "nanomodels-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "nanomodels test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = str(root) + (os.pathsep + old if old else "")
    yield "nanomodels-test"
    if old is None:
        os.environ.pop("JUPYTER_PATH")
    else:
        os.environ["JUPYTER_PATH"] = old


def test_there_are_chapters():
    assert CHAPTERS, "no chapters/NN_*.ipynb found"


@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_committed_notebook_has_outputs_and_no_errors(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert any(c.get("outputs") for c in code), f"{path.name} is committed without outputs"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name} is committed with an error output: {errors[0].get('ename')}"


@pytest.mark.slow
@pytest.mark.parametrize("path", CHAPTERS, ids=[p.stem for p in CHAPTERS])
def test_chapter_runs_in_quick_mode(path, kernel_name, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("NANOMODELS_QUICK", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, kernel_name=kernel_name, timeout=600, resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    assert elapsed < QUICK_BUDGET_S, f"{path.name} took {elapsed:.0f} s in quick mode (budget {QUICK_BUDGET_S} s)"
