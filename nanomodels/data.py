"""Data: a text corpus for language modelling, and synthetic tasks with exact-match evaluation.

Everything is offline. The default corpus, "pydoc", is Python's own documentation (the help topics of
`pydoc_data.topics`, ~465 KB), which ships with every Python, so a notebook runs without a download.
The text differs a little between Python versions, but within one version it is fixed.

Language modelling (nanoGPT style): tokenize the corpus once into a 1-D tensor `ids`, cut it with
`train_val_split`, then draw random windows with `get_batch`:

    x = ids[s : s + block_size],   y = ids[s + 1 : s + block_size + 1]     (s uniform, one per row)

Synthetic tasks: each problem is a (prompt, answer) pair of strings over one tiny vocabulary shared by
all tasks. '|' ends the prompt and '.' ends the answer. All prompts of a task have the same length, and so
do all answers, so batches need no padding. With length n and digits d1..dn:

    copy     "31415926|"   -> "31415926."   the digits again
    reverse  "31415926|"   -> "62951413."   the digits backwards
    sort     "31415926|"   -> "11234569."   the digits in ascending order
    add      "123+989|"    -> "2111."       a + b for two n-digit numbers (leading zeros kept); the n+1
                                            answer digits are written REVERSED, least significant first,
                                            so a causal model emits each digit after the carry it needs
    recall   "a3c7b1?c|"   -> "7."          n distinct key letters with digit values, then '?' and a query
                                            key; the answer is the value stored under that key

Held out: training batches and evaluation problems are fresh random draws from the same distribution,
by design, so exact match measures whether the model learned the rule. With small lengths the same
problem can appear in both (copy with n=2 has only 100 problems); that is fine, the score then also
rewards memorization, which is why the interesting lengths are the larger ones.

No global RNG: every random draw takes the caller's `torch.Generator`, so a seed reproduces a run.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pydoc_data.topics
import torch

from nanomodels.transformer import IGNORE_INDEX  # targets that take no loss



def load_text(source: str = "pydoc") -> str:
    """The corpus named `source` ("pydoc"), or the contents of the UTF-8 text file at path `source`."""
    if source == "pydoc":
        return "\n".join(text for _, text in sorted(pydoc_data.topics.topics.items()))
    path = Path(source)
    hint = "(give 'pydoc' or a path to a UTF-8 text file)"
    if not path.exists():
        raise FileNotFoundError(f"data: no such file '{source}' {hint}")
    if path.is_dir():
        raise IsADirectoryError(f"data: '{source}' is a directory, not a text file {hint}")
    raw = path.read_bytes()
    if not raw:
        raise ValueError(f"data: '{source}' is empty, there is no text to train on")
    if b"\x00" in raw:  # valid UTF-8 can hold NUL, but text never does: this is a binary file
        raise ValueError(f"data: '{source}' contains NUL bytes, it is binary, not UTF-8 text")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"data: '{source}' is not UTF-8 text ({err.reason} at byte {err.start})") from err


def train_val_split(ids: torch.Tensor, val_fraction: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids[:n - m], ids[n - m:]) with m = round(val_fraction * n): the last tokens are validation.

    The cut is contiguous on purpose. A window of length T shifted by one shares T - 1 tokens with its
    neighbour, so a random per-window or per-token split would put nearly every validation window's text
    inside some training window, and validation loss would measure memorization. With one cut, only the
    windows that would straddle it are lost; no text is on both sides.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"data: val_fraction must be in (0, 1), got {val_fraction}")
    if ids.dim() != 1:
        raise ValueError(f"data: ids must be 1-D, got shape {tuple(ids.shape)}")
    n_val = round(val_fraction * len(ids))
    if n_val == 0 or n_val == len(ids):
        raise ValueError(f"data: val_fraction={val_fraction} of {len(ids)} tokens leaves a split empty")
    return ids[: len(ids) - n_val], ids[len(ids) - n_val :]


def get_batch(
    data: torch.Tensor, batch_size: int, block_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """batch_size random windows: x = data[s : s+T], y = data[s+1 : s+T+1], each (batch_size, T) int64."""
    if data.dim() != 1:
        raise ValueError(f"data: data must be 1-D, got shape {tuple(data.shape)}")
    if len(data) <= block_size:
        raise ValueError(f"data: block_size={block_size} needs more than {block_size} tokens, "
                         f"data has {len(data)}")
    # s + block_size is the last index read (for y), so s ranges over [0, len - block_size)
    starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator,
                           device=generator.device)
    index = starts[:, None] + torch.arange(block_size + 1, device=generator.device)  # (B, T+1)
    window = data[index.to(data.device)].long()  # one gather for the whole batch, (B, T+1)
    return window[:, :-1], window[:, 1:]


DIGITS = "0123456789"
LETTERS = "abcdefghijklmnopqrstuvwxyz"  # recall keys
VOCAB = DIGITS + LETTERS + "+?|."  # '|' ends the prompt, '.' ends the answer


def _digits(n: int, length: int, generator: torch.Generator) -> list[str]:
    """n random strings of `length` uniform decimal digits."""
    rows = torch.randint(10, (n, length), generator=generator, device=generator.device).tolist()
    return ["".join(DIGITS[d] for d in row) for row in rows]


def _copy(n, length, generator):
    return [(s + "|", s + ".") for s in _digits(n, length, generator)]


def _reverse(n, length, generator):
    return [(s + "|", s[::-1] + ".") for s in _digits(n, length, generator)]


def _sort(n, length, generator):
    return [(s + "|", "".join(sorted(s)) + ".") for s in _digits(n, length, generator)]


def _add(n, length, generator):
    pairs = []
    for a, b in zip(_digits(n, length, generator), _digits(n, length, generator)):
        total = str(int(a) + int(b)).zfill(length + 1)  # n-digit + n-digit has at most n+1 digits
        pairs.append((f"{a}+{b}|", total[::-1] + "."))
    return pairs


def _recall(n, length, generator):
    noise = torch.rand(n, len(LETTERS), generator=generator, device=generator.device)
    keys = noise.argsort(dim=1)[:, :length].tolist()  # (n, length) distinct letters per row
    values = _digits(n, length, generator)
    queries = torch.randint(length, (n,), generator=generator, device=generator.device).tolist()
    pairs = []
    for k, v, q in zip(keys, values, queries):
        store = "".join(LETTERS[i] + d for i, d in zip(k, v))
        pairs.append((f"{store}?{LETTERS[k[q]]}|", v[q] + "."))
    return pairs


# name -> (sampler, prompt_len(n), answer_len(n))
TASKS = {
    "copy": (_copy, lambda n: n + 1, lambda n: n + 1),
    "reverse": (_reverse, lambda n: n + 1, lambda n: n + 1),
    "sort": (_sort, lambda n: n + 1, lambda n: n + 1),
    "add": (_add, lambda n: 2 * n + 2, lambda n: n + 2),
    "recall": (_recall, lambda n: 2 * n + 3, lambda n: 2),
}


@dataclass(frozen=True)
class SyntheticTask:
    """One synthetic task at one length n; see the module docstring for the string formats."""

    name: str
    length: int
    vocab: str = VOCAB

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def prompt_len(self) -> int:
        return TASKS[self.name][1](self.length)

    @property
    def answer_len(self) -> int:
        """Answer tokens, the end marker '.' included."""
        return TASKS[self.name][2](self.length)

    def encode(self, text: str) -> list[int]:
        unknown = sorted(set(text) - set(self.vocab))
        if unknown:
            raise ValueError(f"data: characters {unknown} are not in the task vocabulary {self.vocab!r}")
        return [self.vocab.index(c) for c in text]

    def decode(self, ids) -> str:
        return "".join(self.vocab[i] for i in torch.as_tensor(ids).tolist())

    def sample(self, n: int, generator: torch.Generator) -> list[tuple[str, str]]:
        """n fresh (prompt, answer) pairs."""
        return TASKS[self.name][0](n, self.length, generator)

    def batch(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token training pairs over prompt + answer: x = seq[:, :-1], y = seq[:, 1:], each (n, L-1).

        y[:, t] is the target seq[:, t+1]; it belongs to the prompt for t < prompt_len - 1 and is set to
        IGNORE_INDEX there, so the loss counts only answer tokens.
        """
        seq = torch.tensor([self.encode(p + a) for p, a in self.sample(n, generator)])  # (n, L)
        x, y = seq[:, :-1], seq[:, 1:].clone()
        y[:, : self.prompt_len - 1] = IGNORE_INDEX
        return x, y


def make_task(name: str, length: int = 8) -> SyntheticTask:
    """The task `name` (one of TASKS) on problems of size `length` (digits, operand digits, or pairs)."""
    if name not in TASKS:
        raise ValueError(f"data: unknown task '{name}', known tasks: {', '.join(TASKS)}")
    if length < 1:
        raise ValueError(f"data: length must be >= 1, got {length}")
    if name == "recall" and length > len(LETTERS):
        raise ValueError(f"data: recall needs distinct key letters, so length <= {len(LETTERS)}, "
                         f"got {length}")
    return SyntheticTask(name, length)


def exact_match(
    task: SyntheticTask,
    predict: Callable[[torch.Tensor, int], torch.Tensor],
    n: int,
    generator: torch.Generator,
) -> float:
    """Fraction of n fresh problems whose whole answer predict(prompts (n, P), answer_len) gets right.

    `predict` is where the caller wires in a model's greedy generation; it returns (n, answer_len) ids.
    """
    pairs = task.sample(n, generator)
    prompts = torch.tensor([task.encode(p) for p, _ in pairs])  # (n, prompt_len)
    answers = torch.tensor([task.encode(a) for _, a in pairs])  # (n, answer_len)
    predicted = torch.as_tensor(predict(prompts, task.answer_len)).cpu()
    if predicted.shape != answers.shape:
        raise ValueError(f"data: predict returned shape {tuple(predicted.shape)}, "
                         f"expected {tuple(answers.shape)} (n, answer_len)")
    return (predicted == answers).all(dim=1).float().mean().item()


# ---- procedural digits: tiny images for the next-token diffusion chapter (offline, from a seed) ----------

# A 5x7 bitmap font: 7 rows of 5 pixels per digit.
DIGIT_FONT = (
    (" ### ", "#   #", "#  ##", "# # #", "##  #", "#   #", " ### "),
    ("  #  ", " ##  ", "  #  ", "  #  ", "  #  ", "  #  ", " ### "),
    (" ### ", "#   #", "    #", "   # ", "  #  ", " #   ", "#####"),
    ("#####", "   # ", "  #  ", "   # ", "    #", "#   #", " ### "),
    ("   # ", "  ## ", " # # ", "#  # ", "#####", "   # ", "   # "),
    ("#####", "#    ", "#### ", "    #", "    #", "#   #", " ### "),
    ("  ## ", " #   ", "#    ", "#### ", "#   #", "#   #", " ### "),
    ("#####", "    #", "   # ", "  #  ", " #   ", " #   ", " #   "),
    (" ### ", "#   #", "#   #", " ### ", "#   #", "#   #", " ### "),
    (" ### ", "#   #", "#   #", " ####", "    #", "   # ", " ##  "),
)


def _digit_glyphs() -> torch.Tensor:
    """(10, 1, 7, 5) float glyphs of DIGIT_FONT."""
    return torch.tensor([[[float(ch == "#") for ch in row] for row in glyph] for glyph in DIGIT_FONT]).unsqueeze(1)


def procedural_digits(n: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 1, size, size) in [0, 1] of the digits 0-9 and their labels (n,), deterministic in seed.

    Each image renders a 5x7 bitmap glyph through a random affine map (rotation within +-12 degrees, shear
    within +-0.2, scale 0.9-1.1, shift within +-1 pixel at size 16) with bilinear sampling, then a random
    threshold sets the stroke width: clamp((v - thr) * 4, 0, 1), thr in [0.15, 0.45] (lower is bolder).
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive integer, got {n!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: must be an integer >= 8, got {size!r}")
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 10, (n,), generator=g)

    def uniform(lo, hi):
        return lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)

    angle = uniform(-12, 12) * torch.pi / 180
    shear, scale = uniform(-0.2, 0.2), uniform(0.9, 1.1)
    shift_x, shift_y = uniform(-2 / size, 2 / size), uniform(-2 / size, 2 / size)
    thr = uniform(0.15, 0.45).float().view(n, 1, 1, 1)
    # theta maps output coordinates in [-1, 1] to glyph coordinates; the glyph spans 3/4 of the height and
    # about half the width of the image.
    extent = torch.tensor([[0.55, 0.0], [0.0, 0.75]], dtype=torch.float64)
    cos, sin = torch.cos(angle), torch.sin(angle)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)  # (n, 2, 2)
    shear_m = torch.eye(2, dtype=torch.float64).repeat(n, 1, 1)
    shear_m[:, 0, 1] = shear
    forward = rot @ shear_m * scale.view(n, 1, 1) @ extent  # glyph -> image
    inverse = torch.linalg.inv(forward)  # image -> glyph
    offset = -(inverse @ torch.stack([shift_x, shift_y], -1).unsqueeze(-1))  # (n, 2, 1)
    theta = torch.cat([inverse, offset], dim=-1).float()  # (n, 2, 3)
    grid = torch.nn.functional.affine_grid(theta, (n, 1, size, size), align_corners=False)
    glyphs = _digit_glyphs()[labels]  # (n, 1, 7, 5)
    v = torch.nn.functional.grid_sample(glyphs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return ((v - thr) * 4).clamp(0, 1), labels
