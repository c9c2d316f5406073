"""The opening every training chapter shares: quick or full, one thread, seed 0; and reading stored results.

    QUICK = start()                      # chapters 06, 10, 11, 12
    QUICK = start(flush_denormal=True)   # chapters 04, 05: a stalled Post-LN has subnormal gradients
    data = load("ch04_sweep.json")       # a results file a sweep script wrote, with the command that wrote it
    saved = stored("ch10_decode.json")   # chapters 10, 11: a full run's results, None in quick mode (the chapter
                                         # then runs a small version itself) or when the file is missing

A chapter imports these as it imports `show` (chapters/show.py); it runs from chapters/, so `results/` is
chapters/results/.
"""

import json
from pathlib import Path

import torch

from nanomodels.runtime import quick_mode


def start(flush_denormal: bool = False) -> bool:
    """Set up a chapter's run and print one line saying how; True in quick mode (NANOMODELS_QUICK=1)."""
    quick = quick_mode()
    torch.set_num_threads(1)
    if flush_denormal:  # subnormal floats are ~100x slower on x86 CPUs
        torch.set_flush_denormal(True)
    torch.manual_seed(0)
    mode = "quick mode" if quick else "full run"
    print(f"{mode} | torch {torch.__version__} | {torch.get_num_threads()} thread(s)")
    return quick


def load(name: str) -> dict:
    """A results file written by a sweep script (the command that produced it is stored inside)."""
    data = json.loads((Path("results") / name).read_text())
    print(f"{name}: {len(data['runs'])} runs, {data['seconds'] / 60:.1f} min on {data['threads']} thread(s), "
          f"torch {data['torch']}\n  produced by: {data['command']}")
    return data


def stored(name: str):
    """results/<name> as a dict, after a line naming how long its run took, where, and its command; None in quick
    mode or when the file is missing."""
    path = Path("results") / name
    if quick_mode() or not path.exists():
        return None
    data = json.loads(path.read_text())
    print(f"{name}: {data['seconds'] / 60:.1f} min on {data['machine']}\n  produced by: {data['command']}")
    return data
