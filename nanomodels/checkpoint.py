"""Checkpoints: atomic writes, weights-only loads, clear errors.

A checkpoint is one `torch.save` of tensors and plain values (weights, optimizer state, the step, the batch
generator's state, the run's options, the tokenizer as a dict; for a LatentLM run the "tokenizer" is its
sigma-VAE and latent normalization, and "kind" says which trainer wrote it). It is loaded with weights_only=True, so a
checkpoint can never run code; it is written to a temporary file and renamed, so a crash mid-write leaves
the previous checkpoint intact.
"""

import os
from pathlib import Path

import torch

CHECKPOINT = "ckpt.pt"  # the file name inside a run folder
KINDS = {"text": "train", "latentlm": "train-latentlm"}  # what a run holds -> the command that trains it


def save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: the old checkpoint stays intact until the new one is complete


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no file at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated file, wrong format, pickled code: all refused the same way
        raise ValueError(f"checkpoint: {path} is corrupted or not a nanomodels checkpoint ({type(err).__name__})")
    if not isinstance(state, dict) or not {"model", "config", "tokenizer", "step"} <= state.keys():
        raise ValueError(f"checkpoint: {path} is not a nanomodels checkpoint (missing keys)")
    if run_kind(state) not in KINDS:
        raise ValueError(f"checkpoint: {path} holds an unknown kind of run {run_kind(state)!r}")
    return state


def run_kind(state: dict) -> str:
    """'text' (a tiny GPT, written by `train`; checkpoints without "kind" are these) or 'latentlm'."""
    return state.get("kind", "text")
