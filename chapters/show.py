"""`show(obj)`: how a chapter prints library code. The chapters import the library; they never redefine it.

A function, class or Triton kernel is printed as its source, except a function that holds a graded exercise
(`# BEGIN EXERCISE N.M: title` ... `# END EXERCISE` in the library): the chapter would hand the solution away, so
only its signature and docstring are printed, followed by the exercise's number and the command that grades it.
"""

import ast
import inspect
import re
import textwrap
from pathlib import Path

BEGIN = re.compile(r"^\s*# BEGIN EXERCISE (?P<id>\d+)\.(?P<sub>\d+): (?P<title>\S.*?)\s*$")
EXERCISES = Path(__file__).resolve().parent.parent / "exercises"


def unwrap(obj):
    """The Python function behind Triton's JIT / interpreter / autotune wrappers (each keeps it as `.fn`)."""
    while hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def exercises_in(source: str) -> list[re.Match]:
    """The BEGIN EXERCISE markers in a piece of source code, in order."""
    return [m for m in map(BEGIN.match, source.splitlines()) if m]


def stub(source: str) -> str:
    """A function's decorators, signature and docstring, then what to do instead of reading its body."""
    tree = ast.parse(textwrap.dedent(source))
    fn = tree.body[0]
    if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
        raise TypeError(f"stub: expected the source of one function, got {type(fn).__name__}")
    lines = source.splitlines()
    head_end = fn.body[0].end_lineno if ast.get_docstring(fn) is not None else fn.body[0].lineno - 1
    indent = re.match(r"\s*", lines[fn.body[0].lineno - 1]).group()
    kept = lines[:head_end]
    for m in exercises_in(source):
        chapter = m["id"].zfill(2)
        files = sorted(EXERCISES.glob(f"ex{chapter}_*.py"))
        where = f"exercises/{files[0].name}" if files else "your exercises file"
        kept.append(f"{indent}# Exercise {m['id']}.{m['sub']} ({m['title']}): write the body in {where},")
        kept.append(f"{indent}# then check it with: python -m exercises grade {chapter}")
    kept.append(f"{indent}...")
    return "\n".join(kept) + "\n"


def render(obj) -> str:
    """What `show(obj)` prints: the source, or the stub of a function that holds an exercise."""
    source = inspect.getsource(unwrap(obj))
    return stub(source) if exercises_in(source) else source


def show(obj) -> None:
    """Print the library's code for `obj` (see the module docstring)."""
    print(render(obj))
