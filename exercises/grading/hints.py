"""python -m exercises hint 4.3: progressive hints, none of which is the solution.

Level 1 says what to think about, level 2 how to go about it, level 3 the steps in words. Each call shows the
next level (1, then 2, then 3, then 3 again); `--level N` shows level N. Which level an exercise has reached is
kept in $NANOMODELS_CACHE/exercise_hints.json (default ~/.cache/nanomodels).
"""

import json
import os
import textwrap
from importlib import import_module
from pathlib import Path

from exercises.grading.registry import chapter_of, get_chapter

WIDTH = 110


def state_path() -> Path:
    root = os.environ.get("NANOMODELS_CACHE") or Path.home() / ".cache" / "nanomodels"
    return Path(root) / "exercise_hints.json"


def levels(exercise_id: str) -> list[str]:
    """The exercise's hints, level 1 first. KeyError naming the chapter's exercises when unknown."""
    spec = import_module(get_chapter(chapter_of(exercise_id)).checks_module).EXERCISES
    if exercise_id not in spec:
        raise KeyError(f"no exercise {exercise_id!r}; chapter {chapter_of(exercise_id)} has {', '.join(spec)}")
    exercise = spec[exercise_id]
    return [exercise.hint, *exercise.hints]


def show(exercise_id: str, level: int | None = None, *, path: Path | None = None, out=print) -> int:
    """Print hint `level` (default: the one after the last shown) and remember it. Returns an exit status."""
    texts = levels(exercise_id)
    path = path or state_path()
    try:
        seen = json.loads(path.read_text())
    except (OSError, ValueError):
        seen = {}
    if level is None:
        level = min(seen.get(exercise_id, 0) + 1, len(texts))
    if not 1 <= level <= len(texts):
        out(f"exercise {exercise_id} has hint levels 1 to {len(texts)}, not {level}")
        return 2
    out(f"Hint {level} of {len(texts)} for exercise {exercise_id}:")
    out(textwrap.fill(texts[level - 1], WIDTH, initial_indent="  ", subsequent_indent="  "))
    out(f"(`python -m exercises hint {exercise_id}` again shows hint {level + 1})" if level < len(texts) else
        "(that is the last hint; the grader's counterexample shows what your code does wrong)")
    seen[exercise_id] = level
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(seen, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home still gets its hint, it just starts from level 1 next time
    return 0
