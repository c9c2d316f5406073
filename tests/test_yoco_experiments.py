"""Chapter 11's experiment script: the recall toy's sequences say what its docstring says, and the cache byte
counts are the arithmetic of the models' shapes."""

import importlib.util
import sys
from pathlib import Path

import torch

from nanomodels.transformer import IGNORE_INDEX

CHAPTERS = Path(__file__).resolve().parent.parent / "chapters"


def load(name: str):
    if str(CHAPTERS) not in sys.path:
        sys.path.insert(0, str(CHAPTERS))  # the experiment scripts import each other from chapters/
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, CHAPTERS / f"{name}.py")
        sys.modules[name] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return sys.modules[name]


exp = load("yoco_experiments")


def test_recall_targets_are_the_values_of_the_queried_keys_and_distances_point_at_the_pair():
    cfg = dict(exp.RECALL, n_pairs=6, n_keys=8, n_values=5)
    vocab = exp.recall_vocab(cfg)
    inputs, targets, distance = exp.recall_batch(dict(cfg, T=100), 3, torch.Generator().manual_seed(0))
    assert inputs.shape == targets.shape == distance.shape == (3, 100)
    for b in range(3):
        asked = (distance[b] >= 0).nonzero().flatten().tolist()
        assert len(asked) == 6 and asked[-1] == 99, asked
        pairs = [int(t) for t in inputs[b] if t < vocab["queries"]]
        assert len({p // 5 for p in pairs}) == 6, f"the keys of a sequence must be distinct: {pairs}"
        for n in asked:
            key = int(inputs[b, n]) - vocab["queries"]
            pair = int(inputs[b, n - int(distance[b, n])])
            assert 0 <= key < 8 and pair // 5 == key, (n, key, pair)
            assert int(targets[b, n]) == vocab["values"] + pair % 5
        others = [n for n in range(100) if n not in asked]
        assert bool((targets[b, others] == IGNORE_INDEX).all())


def test_cache_bytes_are_per_layer_keys_and_values_for_the_transformer_and_one_layer_for_yoco():
    rows = exp.memory_vs_context([64, 128, 192], n_layers=4, measure_max={a: 192 for a in exp.ARCHS},
                                 progress=lambda s: None)
    d = exp.MODEL["d_model"]
    per_token = {r["arch"]: r["bytes_per_token"] for r in rows}
    const = {r["arch"]: r["const_bytes"] for r in rows}
    assert per_token == {"transformer": 2 * 4 * d * 4, "yoco_gret": 2 * d * 4, "yoco_swa": 2 * d * 4}
    head = d // exp.MODEL["n_heads"]
    assert const == {"transformer": 0, "yoco_gret": 2 * exp.MODEL["n_heads"] * head * head * 4,
                     "yoco_swa": 2 * 32 * 2 * d * 4}
    assert all(r["bytes"] == r["line_bytes"] and r["how"] == "measured" for r in rows)
