"""Which library files feed which student file: one row per chapter.

One name per chapter: chapter 04 with topic "deepnet" is exercises/ex04_deepnet.py (the learner's file),
exercises/grading/checks/ch04_deepnet.py (points, hints, graded checks) and exercises/grading/mutants/ch04_deepnet.md (known-wrong
solutions as patches of the reference).

Adding a chapter's exercises:
  1. mark the regions in the library (`# BEGIN EXERCISE 6.1: title` ... `# END EXERCISE`, inside a function);
  2. add its row below;
  3. write exercises/grading/checks/chNN_<topic>.py (points, hints and graded checks per exercise; copy
     ch04_deepnet.py's shape, and take strategies and oracles from exercises/grading/checks/common.py);
  4. write exercises/grading/mutants/chNN_<topic>.md: at least 3 patches per exercise (the format: mutants/__init__.py);
  5. run `python -m exercises stubs` and commit the generated exercises/exNN_<topic>.py.
tests/test_exercises.py picks the new chapter and its mutants up by itself.
"""

from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]  # the repository
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
        return self.directory / f"ex{self.name}.py"

    @property
    def name(self) -> str:
        return f"{self.number}_{self.topic}"  # "04_deepnet"

    @property
    def checks_module(self) -> str:
        return f"exercises.grading.checks.ch{self.name}"

    @property
    def mutants_file(self) -> Path:
        return ROOT / "exercises" / "grading" / "mutants" / f"ch{self.name}.md"


CHAPTERS = {c.number: c for c in [
    Chapter("00", "tiny_transformer", "a tiny transformer from scratch",
            ("nanomodels/attention.py", "nanomodels/tokenizer.py", "nanomodels/transformer.py")),
    Chapter("01", "kernels_flash_attention", "kernels: a fused softmax, the online softmax, FlashAttention",
            ("kernels/softmax.py", "kernels/flash_attention.py")),
    Chapter("02", "unilm_masks", "UniLM attention masks", ("nanomodels/masks.py",)),
    Chapter("03", "pseudo_masked_lm", "the pseudo-masked language model", ("nanomodels/pmlm.py",)),
    Chapter("04", "deepnet", "DeepNet: DeepNorm for very deep Post-LN Transformers",
            ("nanomodels/deepnet.py", "nanomodels/transformer.py", "kernels/layernorm.py")),
    Chapter("05", "subln_magneto", "Sub-LN and Magneto", ("nanomodels/subln.py",)),
    Chapter("06", "dilated_attention", "LongNet dilated attention",
            ("nanomodels/dilated.py", "kernels/dilated_attention.py")),
    Chapter("07", "mixture_of_experts", "sparse mixture of experts: routing, load balance, X-MoE",
            ("nanomodels/moe.py", "kernels/grouped_gemm.py")),
    Chapter("08", "bitlinear", "BitNet b1.58: ternary weights, 8-bit activations",
            ("nanomodels/bitlinear.py", "kernels/bitnet.py")),
    Chapter("09", "next_token_diffusion", "LatentLM: next-token diffusion",
            ("nanomodels/diffusion.py", "nanomodels/sigma_vae.py", "kernels/adaln.py")),
    Chapter("10", "retnet_xpos", "RetNet retention and XPos: recurrent, chunkwise, the decay and the scale",
            ("nanomodels/retnet.py",)),
    Chapter("11", "yoco", "YOCO: gated retention and one global KV cache",
            ("nanomodels/gated_retention.py", "nanomodels/yoco.py")),
    Chapter("12", "minilm", "MiniLM: distilling a Transformer through its self-attention", ("nanomodels/minilm.py",)),
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
