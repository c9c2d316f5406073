"""Marked regions of the library -> the student's stub files (one source of truth).

A region is a run of lines inside a module-level function, at the body's indentation:

    # BEGIN EXERCISE 0.2: the causal mask
    ...the reference body...
    # END EXERCISE

The stub keeps the function whole (decorators, signature, docstring, code before and after the region)
and replaces only the region by `raise NotImplementedError("Exercise 0.2: the causal mask")`. It imports
what the reference function uses: the same imports as the library module, and the library's own helpers
(e.g. `_combine`) from the library, so the file runs standalone and grades one function at a time.
"""

import ast
import builtins
import json
import re
import sys
import textwrap
from dataclasses import dataclass
from importlib import import_module
from pathlib import Path

from exercises.grading.registry import CHAPTERS, ROOT, Chapter, chapter_of

BEGIN = re.compile(r"^(?P<indent>\s*)# BEGIN EXERCISE (?P<id>\d+\.\d+): (?P<title>\S.*?)\s*$")
END = re.compile(r"^(?P<indent>\s*)# END EXERCISE\s*$")
FIRST_PARTY = {"nanomodels", "kernels", "exercises"}
WIDTH = 110


class MarkerError(ValueError):
    """A malformed or misplaced exercise marker, reported with its file and line."""


@dataclass(frozen=True)
class Marked:
    id: str  # "0.2"
    title: str
    function: str  # the name of the marked function
    source: str  # the library file, relative to the repository
    module: str  # its dotted module name
    lines: tuple[int, int]  # the function's first (decorators included) and last line, 1-based
    region: tuple[int, int]  # the BEGIN and END marker lines, 1-based
    indent: str

    @property
    def key(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.id.split("."))

    @property
    def message(self) -> str:
        return f"Exercise {self.id}: {self.title}"


def _functions(tree: ast.Module):
    return [node for node in tree.body if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def scan_file(path: str) -> list[Marked]:
    """Every marked region of one library file (path relative to the repository)."""
    text = (ROOT / path).read_text()
    lines = text.splitlines()
    functions = _functions(ast.parse(text, filename=path))
    full = (ROOT / path).resolve()
    module = (full.relative_to(ROOT).with_suffix("").as_posix().replace("/", ".") if full.is_relative_to(ROOT)
              else full.stem)
    found, open_ = [], None
    for n, line in enumerate(lines, start=1):
        begin, end = BEGIN.match(line), END.match(line)
        if begin:
            if open_:
                raise MarkerError(f"{path}:{n}: BEGIN EXERCISE inside the region opened at line {open_[0]}")
            open_ = (n, begin)
        elif end:
            if not open_:
                raise MarkerError(f"{path}:{n}: END EXERCISE without a BEGIN EXERCISE")
            start, match = open_
            open_ = None
            if match["indent"] != end["indent"]:
                raise MarkerError(f"{path}:{n}: END EXERCISE is not indented like its BEGIN (line {start})")
            # the region's code is inside the function; the END comment may follow its last statement
            owner = [f for f in functions if f.lineno < start < f.end_lineno]
            if not owner:
                raise MarkerError(f"{path}:{start}: exercise {match['id']} is not inside a module-level "
                                  "function")
            fn = owner[0]
            if any(f.lineno <= n for f in functions if f.lineno > fn.lineno):
                raise MarkerError(f"{path}:{n}: the END EXERCISE of {match['id']} is outside `{fn.name}`")
            first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
            found.append(Marked(match["id"], match["title"], fn.name, path, module,
                                (first, max(fn.end_lineno, n)), (start, n), match["indent"]))
        elif "EXERCISE" in line and line.strip().startswith("#") and ("BEGIN" in line or "END" in line):
            raise MarkerError(f"{path}:{n}: malformed marker {line.strip()!r}; expected "
                              "'# BEGIN EXERCISE N.M: title' or '# END EXERCISE'")
    if open_:
        raise MarkerError(f"{path}:{open_[0]}: BEGIN EXERCISE {open_[1]['id']} has no END EXERCISE")
    return found


def scan(chapter: Chapter) -> list[Marked]:
    """The chapter's exercises in order, checked: ids in the chapter, unique, one region per function."""
    marked = [m for path in chapter.sources for m in scan_file(path)]
    # a file may feed several chapters (the core holds exercises of 00 and 04): each takes its own regions
    marked = [m for m in marked if chapter_of(m.id) == chapter.number
              or m.source not in CHAPTERS.get(chapter_of(m.id), chapter).sources]
    seen: dict[str, Marked] = {}
    for m in marked:
        where = f"{m.source}:{m.region[0]}"
        if chapter_of(m.id) != chapter.number:
            raise MarkerError(f"{where}: exercise {m.id} belongs to chapter {chapter_of(m.id)}, "
                              f"but {m.source} feeds chapter {chapter.number}")
        for other in seen.values():
            if other.id == m.id:
                raise MarkerError(f"{where}: exercise {m.id} is also marked at "
                                  f"{other.source}:{other.region[0]}")
            if other.function == m.function:
                raise MarkerError(f"{where}: `{m.function}` holds two exercises ({other.id} and {m.id}); "
                                  "mark one region per function")
        seen[m.id] = m
    return sorted(marked, key=lambda m: m.key)


# ---- the names a function needs, and the imports that provide them -------------------------------------

def _free_names(fn: ast.AST) -> set[str]:
    """Names the function reads but does not bind itself (parameters, assignments, nested defs)."""
    bound, used = set(), set()
    for node in ast.walk(fn):
        if isinstance(node, ast.Name):
            (used if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node is not fn:
            bound.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            bound.update((a.asname or a.name).split(".")[0] for a in node.names)
    return used - bound


def _module_bindings(tree: ast.Module, module: str) -> dict[str, tuple]:
    """name -> how the library module binds it: ("import", module, asname) or ("from", module, name)."""
    package = module.rsplit(".", 1)[0]
    out: dict[str, tuple] = {}
    for node in tree.body:
        if isinstance(node, ast.Import):
            for a in node.names:
                top = a.name.split(".")[0]
                out[a.asname or top] = ("import", a.name if a.asname else top, a.asname)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + [base]).strip(".")
            for a in node.names:
                out[a.asname or a.name] = ("from", base, f"{a.name} as {a.asname}" if a.asname else a.name)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = ("from", module, node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for t in targets:
                for name in ast.walk(t):
                    if isinstance(name, ast.Name):
                        out[name.id] = ("from", module, name.id)
    return out


def _group(module: str) -> int:
    top = module.split(".")[0]
    return 0 if top in sys.stdlib_module_names else 2 if top in FIRST_PARTY else 1


def _import_block(needed: set[tuple]) -> str:
    """isort-like: stdlib, third party, first party; `import x` before `from x import y` in each group."""
    groups: list[list[str]] = [[], [], []]
    plain = sorted({(m, a) for kind, m, a in needed if kind == "import"})
    for m, a in plain:
        groups[_group(m)].append(f"import {m}" + (f" as {a}" if a else ""))
    froms: dict[str, set[str]] = {}
    for kind, m, name in needed:
        if kind == "from":
            froms.setdefault(m, set()).add(name)
    for m in sorted(froms):
        groups[_group(m)].append(f"from {m} import {', '.join(sorted(froms[m]))}")
    return "\n\n".join("\n".join(g) for g in groups if g)


# ---- the stub file ----------------------------------------------------------------------------------

def _stub_function(m: Marked, lines: list[str]) -> str:
    first, last = m.lines
    begin, end = m.region
    body = lines[first - 1: begin - 1] + [f"{m.indent}raise NotImplementedError({json.dumps(m.message)})"]
    return "\n".join(body + lines[end: last])


def _comment(prefix: str, text: str) -> str:
    return textwrap.fill(text, WIDTH, initial_indent=f"# {prefix}",
                         subsequent_indent="#" + " " * (len(prefix) + 1))


def generate(chapter: Chapter) -> str:
    """The stub file's text for one chapter."""
    spec = import_module(chapter.checks_module).EXERCISES
    marked = scan(chapter)
    exercise_functions = {m.function for m in marked}
    sources: dict[str, tuple[list[str], ast.Module]] = {}
    needed: set[tuple] = set()
    for m in marked:
        if m.source not in sources:
            text = (ROOT / m.source).read_text()
            sources[m.source] = (text.splitlines(), ast.parse(text))
        lines, tree = sources[m.source]
        bindings = _module_bindings(tree, m.module)
        fn = next(f for f in _functions(tree) if f.name == m.function)
        for name in sorted(_free_names(fn) - exercise_functions):
            if name in bindings:
                needed.add(bindings[name])
            elif not hasattr(builtins, name):
                raise MarkerError(f"{m.source}: `{m.function}` uses `{name}`, which the stub cannot import "
                                  "(bind it at module level in the library)")
    files = ", ".join(sorted({m.source for m in marked}))
    total = sum(spec[m.id].points for m in marked)
    header = f'''"""Chapter {chapter.number}: {chapter.title} ({len(marked)} exercises, {total} points).

Replace each `raise NotImplementedError(...)` by your code, then grade it: `python -m exercises grade {chapter.number}`.
{textwrap.fill(f"Generated by `python -m exercises stubs` from the `# BEGIN EXERCISE` regions of {files} (the spec, signatures and docstrings, is the library's own); `python -m exercises reset {chapter.number} --yes` starts it over (it overwrites this file). See exercises/README.md.", WIDTH)}
"""'''
    parts = [header + "\n\n" + _import_block(needed)]
    for m in marked:
        lines = sources[m.source][0]
        ex = spec[m.id]
        rule = "# " + "-" * (WIDTH - 2)
        points = f"{ex.points} point" + ("s" if ex.points != 1 else "")
        title = _comment("", f"Exercise {m.id}: {m.title} ({points})")
        intro = "\n".join([rule, title, _comment("Hint: ", ex.hint)])
        parts.append(intro + "\n" + _stub_function(m, lines))
    return "\n\n\n".join(parts) + "\n"


def stub_status(chapter: Chapter) -> str:
    """'missing', 'in sync', 'stale' (an untouched stub the library has moved on from) or 'edited'."""
    path = chapter.student_file
    if not path.exists():
        return "missing"
    text = path.read_text()
    if text == generate(chapter):
        return "in sync"
    return "edited" if solved(chapter, text) else "stale"


def solved(chapter: Chapter, text: str) -> list[str]:
    """The exercises whose function in `text` no longer raises its NotImplementedError: the learner's work."""
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return [m.id for m in scan(chapter)]
    bodies = {f.name: ast.get_source_segment(text, f) or "" for f in _functions(tree)}
    return [m.id for m in scan(chapter) if m.function in bodies
            and f"raise NotImplementedError({json.dumps(m.message)})" not in bodies[m.function]]


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def write_stubs(chapters=None, *, check: bool = False, force: bool = False, out=print) -> int:
    """Regenerate (or with check=True, compare) the stub files. Returns an exit status."""
    status = 0
    for chapter in chapters or CHAPTERS.values():
        path, text = chapter.student_file, generate(chapter)
        rel = _shown(path)
        current = path.read_text() if path.exists() else None
        if current == text:
            out(f"{rel}: in sync")
            continue
        if check:
            out(f"{rel}: OUT OF SYNC with {', '.join(chapter.sources)}; run `python -m exercises stubs`")
            status = 1
            continue
        work = solved(chapter, current) if current is not None else []
        if work and not force:
            out(f"{rel}: NOT overwritten: it holds your solutions to {', '.join(work)}. "
                f"`python -m exercises stubs --force` overwrites it (or `reset {chapter.number} --yes`).")
            status = 1
            continue
        path.write_text(text)
        out(f"{rel}: written")
    return status


def reset(chapters, *, yes: bool, out=print) -> int:
    """Overwrite the student files with their stubs (yes=True); otherwise say what would be lost."""
    status = 0
    for chapter in chapters:
        path, text = chapter.student_file, generate(chapter)
        rel = _shown(path)
        current = path.read_text() if path.exists() else None
        if current == text:
            out(f"{rel} is already the stub: nothing to do")
        elif not yes:
            work = solved(chapter, current) if current is not None else []
            old, new = (current or "").splitlines(), text.splitlines()
            changed = sum(a != b for a, b in zip(old, new)) + abs(len(old) - len(new))
            out(f"would overwrite {rel} with the stub ({changed} line(s) differ"
                + (f"; your solutions to {', '.join(work)} would be lost" if work else "")
                + f"). Run `python -m exercises reset {chapter.number} --yes` to do it.")
            status = 1
        else:
            path.write_text(text)
            out(f"{rel} reset to the stub")
    return status
