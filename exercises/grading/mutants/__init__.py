"""Mutants: known-wrong solutions, each a patch of one exercise's reference region (the library's own code).

One file per chapter, `exercises/grading/mutants/chNN_<topic>.md`, readable as it is: a title, prose, then one
section per mutant, the exercise and the mutant's name in its heading, one sentence saying what it gets wrong,
the reference text and what replaces it:

    ## 0.1 attention_no_scale

    forgets the 1/sqrt(d) scaling: ...

    ```python
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, H, Tq, Tk)
    ```
    becomes
    ```python
    scores = q @ k.transpose(-2, -1)
    ```

The first block (`old`) must occur exactly once in the exercise's marked region, written without the region's
indentation (lines nested deeper keep their extra indentation); the second (`new`) replaces it. Prose after the
second block, up to the next heading, is a comment. The mutant function is the library function with that one
change, run in a copy of the library module's namespace, so a patch needs no imports. A patch that no longer
applies (the region changed) raises PatchError, and tests/test_exercises.py fails.

A mutant must be *observably* wrong: the grader's self-test requires each one to lose its exercise's points.
"""

import re
import textwrap
from dataclasses import dataclass
from importlib import import_module
from typing import Callable

from exercises.grading.registry import ROOT, Chapter
from exercises.grading.stubs import Marked, scan


class PatchError(ValueError):
    """A mutant's patch does not apply to its exercise's region (or names an unknown exercise)."""


@dataclass(frozen=True)
class Mutant:
    exercise: str  # "0.1"
    name: str  # unique in the chapter: <function>_<the mistake>
    description: str  # what it gets wrong, in one sentence
    old: str  # text of the reference region (dedented), found exactly once
    new: str  # what replaces it


HEADING = re.compile(r"^## (\S+) (\S+)$", re.M)
BLOCK = re.compile(r"```python\n(.*?)\n?```", re.S)


def parse(text: str, where: str = "<mutants>") -> list[Mutant]:
    """The mutants of one chapter file's text (see the module docstring for the format)."""
    heads = list(HEADING.finditer(text))
    mutants = []
    for head, nxt in zip(heads, heads[1:] + [None]):
        body = text[head.end(): nxt.start() if nxt else len(text)]
        blocks = list(BLOCK.finditer(body))
        if len(blocks) < 2 or body[blocks[0].end(): blocks[1].start()].strip() != "becomes":
            raise PatchError(f"{where}: mutant {head[2]} needs two ```python blocks with `becomes` between them")
        description = " ".join(body[: blocks[0].start()].split())
        mutants.append(Mutant(head[1], head[2], description, blocks[0][1], blocks[1][1]))
    return mutants


def load(chapter: Chapter) -> list[Mutant]:
    """The chapter's mutants, checked: unique names, known exercises."""
    path = chapter.mutants_file
    mutants = parse(path.read_text(), str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path))
    ids = {m.id for m in scan(chapter)}
    seen = set()
    for mutant in mutants:
        if mutant.exercise not in ids:
            raise PatchError(f"mutant {mutant.name}: chapter {chapter.number} has no exercise {mutant.exercise}")
        if mutant.name in seen:
            raise PatchError(f"mutant {mutant.name}: the name is used twice in {path.name}")
        seen.add(mutant.name)
    return mutants


def find(chapter: Chapter, name: str) -> Mutant:
    by_name = {m.name: m for m in load(chapter)}
    if name not in by_name:
        raise KeyError(f"chapter {chapter.number} has no mutant {name!r} (it has {', '.join(sorted(by_name))})")
    return by_name[name]


def region(marked: Marked) -> str:
    """The reference region's text, markers excluded, without the region's indentation."""
    lines = (ROOT / marked.source).read_text().splitlines()
    return textwrap.dedent("\n".join(lines[marked.region[0]: marked.region[1] - 1]))


def patched_source(marked: Marked, mutant: Mutant) -> str:
    """The library function's source (decorators to last line) with the mutant's patch applied to its region."""
    text = region(marked)
    found = text.count(mutant.old) if mutant.old else 0
    if found != 1:
        raise PatchError(f"mutant {mutant.name}: its `old` text occurs {found} times in the region of exercise "
                         f"{mutant.exercise} ({marked.source}:{marked.region[0]}); it must occur exactly once. "
                         "Update the patch to the region's current code.")
    patched = textwrap.indent(text.replace(mutant.old, mutant.new), marked.indent)
    lines = (ROOT / marked.source).read_text().splitlines()
    first, last = marked.lines
    begin, end = marked.region
    return "\n".join(lines[first - 1: begin - 1] + patched.splitlines() + lines[end: last]) + "\n"


def build(marked: Marked, mutant: Mutant) -> Callable:
    """The mutant function: the patched source executed in a copy of the library module's namespace."""
    namespace = dict(vars(import_module(marked.module)))
    exec(compile(patched_source(marked, mutant), f"<mutant {mutant.name}>", "exec"), namespace)  # noqa: S102
    return namespace[marked.function]
