"""Which library files feed which student file: one row per chapter.

Adding a chapter's exercises:
  1. mark the regions in the library (`# BEGIN EXERCISE 2.1: title` ... `# END EXERCISE`, inside a function);
  2. add its row below;
  3. write exercises/checks/chNN.py (points, hint and graded checks per exercise; copy ch00.py's shape);
  4. add at least 3 known-wrong solutions under exercises/mutants/exNN/;
  5. run `python -m exercises stubs` and commit the generated exercises/exNN_<topic>.py.
tests/test_exercises.py picks the new chapter and its mutants up by itself.
"""

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent  # the repository
EXERCISES_DIR = ROOT / "exercises"


@dataclass(frozen=True)
class Chapter:
    number: str  # "00"; exercise "0.1" belongs to chapter 00, "4.3" to chapter 04
    topic: str  # the student file is exercises/ex<number>_<topic>.py
    title: str
    sources: tuple[str, ...]  # library files (relative to the repository) whose marked regions are exercises
    directory: Path = EXERCISES_DIR  # where the student file and mutants live (tests point it elsewhere)

    @property
    def student_file(self) -> Path:
        return self.directory / f"ex{self.number}_{self.topic}.py"

    @property
    def checks_module(self) -> str:
        return f"exercises.checks.ch{self.number}"

    @property
    def mutants_dir(self) -> Path:
        return self.directory / "mutants" / f"ex{self.number}"


CHAPTERS = {c.number: c for c in [
    Chapter("00", "tiny_transformer", "a tiny transformer from scratch",
            ("nanomodels/attention.py", "nanomodels/tokenizer.py", "nanomodels/transformer.py")),
    Chapter("02", "unilm_masks", "UniLM attention masks", ("nanomodels/masks.py",)),
    Chapter("03", "pseudo_masked_lm", "the pseudo-masked language model", ("nanomodels/pmlm.py",)),
    Chapter("04", "deepnet", "DeepNet: DeepNorm for very deep Post-LN Transformers", ("nanomodels/deepnet.py",)),
    Chapter("05", "subln_magneto", "Sub-LN and Magneto", ("nanomodels/subln.py",)),
]}


def get_chapter(number: str) -> Chapter:
    """'0', '00' and 'ch00' all name chapter 00."""
    key = number.removeprefix("ch").removeprefix("ex")
    key = key.zfill(2) if key.isdigit() else key
    if key not in CHAPTERS:
        raise KeyError(f"no chapter {number!r}; the chapters with exercises: {', '.join(sorted(CHAPTERS))}")
    return CHAPTERS[key]


def chapter_of(exercise_id: str) -> str:
    """'0.1' -> '00', '4.3' -> '04'."""
    return exercise_id.split(".")[0].zfill(2)
