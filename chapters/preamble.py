"""What chapters 10 and 11 do first: `begin()` and `stored(name)`.

The notebooks run with chapters/ as their working directory, so a chapter's stored results are results/<name>,
the JSON files its experiments script (chapters/<topic>_experiments.py) writes with a full run.
"""

import json
from pathlib import Path

import torch

from nanomodels.runtime import quick_mode

RESULTS = Path("results")


def begin() -> None:
    """One thread, seed 0, and a line naming the mode (quick_mode()), torch's version and the threads."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    print(f"{'quick mode' if quick_mode() else 'full run'} | torch {torch.__version__} | "
          f"{torch.get_num_threads()} thread(s)")


def stored(name: str):
    """results/<name> as a dict, after a line naming how long its run took, where, and its command; None in quick
    mode (the chapter then runs a small version itself) or when the file is missing."""
    path = RESULTS / name
    if quick_mode() or not path.exists():
        return None
    data = json.loads(path.read_text())
    print(f"{name}: {data['seconds'] / 60:.1f} min on {data['machine']}\n  produced by: {data['command']}")
    return data
