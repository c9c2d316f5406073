"""Chapter 12's experiments: a 6-layer d=256 teacher, then 4-layer d=128 students trained at equal steps from
scratch, with logit distillation, with MiniLM (last-layer L_AT + L_VR) and with MiniLMv2 (Q-Q, K-K, V-V relations).

    OMP_NUM_THREADS=1 python chapters/minilm_experiments.py teacher
    OMP_NUM_THREADS=1 python chapters/minilm_experiments.py students --seeds 0 1 2 3 4 --steps 150 --out ch12_students.json

The teacher is an ordinary `train` run (nanomodels.train.train) in the cache folder ($NANOMODELS_CACHE, else
~/.cache/nanomodels, under runs/ch12_teacher); its config and metrics are copied to results/ch12_teacher.json
(the weights, ~20 MB, stay in the cache: `teacher` retrains them, bit for bit on one thread, when absent).
Results go to chapters/results/; the chapter (which runs in chapters/) imports this file as `minilm_experiments`.
"""

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from nanomodels.distill import DistillTask
from nanomodels.train import LMTask, TrainConfig, fit, load_model, lr_at, train

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
TEACHER = dict(n_layers=6, d_model=256, n_heads=4, block_size=64, batch_size=16, steps=800, lr=2e-3, min_lr=2e-4,
               warmup=50, eval_interval=200, eval_iters=20, seed=0, sample_tokens=100, threads=1)


def cache_dir() -> Path:
    """Where the teacher run lives: $NANOMODELS_CACHE (as for the BPE merges), else ~/.cache/nanomodels."""
    return Path(os.environ.get("NANOMODELS_CACHE") or Path.home() / ".cache" / "nanomodels")


def teacher_config(**overrides) -> TrainConfig:
    return TrainConfig(**{"name": "ch12_teacher", "out_dir": str(cache_dir() / "runs"), "progress": False,
                          **TEACHER, **overrides})


def train_teacher(cfg: TrainConfig) -> dict:
    """Train the teacher (an ordinary run) unless its run folder already holds a finished one; its metrics."""
    metrics = cfg.run_dir / "metrics.json"
    if not metrics.exists():
        train(cfg if not (cfg.run_dir / "ckpt.pt").exists() else TrainConfig(**{**asdict(cfg), "overwrite": True}))
    return json.loads(metrics.read_text())


STUDENT = dict(n_layers=4, d_model=128, block_size=32, batch_size=16, steps=150, warmup=15, progress=False)
ARMS = {"scratch": dict(n_heads=4), "scratch-8h": dict(n_heads=8), "logits": dict(n_heads=4, distill="logits"),
        "minilm": dict(n_heads=4, distill="minilm"), "minilmv2": dict(n_heads=8, distill="minilmv2", relation_heads=4)}


@torch.no_grad()
def val_loss(model, val_ids: torch.Tensor, block: int) -> float:
    """Mean cross-entropy over the whole validation split, in non-overlapping windows of `block` tokens."""
    model.eval()
    n = (len(val_ids) - 1) // block
    x = val_ids[: n * block].view(n, block)
    y = val_ids[1: n * block + 1].view(n, block)
    losses = [model(x[i:i + 64], y[i:i + 64])[1].item() * len(x[i:i + 64]) for i in range(0, n, 64)]
    return sum(losses) / n


def student(arm: str, seed: int, teacher_dir: Path, **overrides) -> dict:
    """One student, trained through fit: an LMTask from scratch, or a DistillTask; its validation loss."""
    options = {**STUDENT, **ARMS[arm], "seed": seed, "name": f"ch12_{arm}_{seed}", **overrides}
    if "distill" in options:
        cfg = TrainConfig(distill_from=str(teacher_dir), **options)
        task = DistillTask(cfg, torch.device("cpu"))
    else:
        cfg = TrainConfig(**options)
        task = LMTask(cfg, torch.device("cpu"))
    task.setup(None)
    t0 = time.perf_counter()
    fit(task.model, task, cfg.steps, optimizer=task.optimizer, lr=lambda s: lr_at(s, cfg), grad_clip=cfg.grad_clip)
    seconds = time.perf_counter() - t0
    return {"arm": arm, "seed": seed, "val_loss": val_loss(task.model, task.val_ids, cfg.block_size),
            "train_tokens_per_s": cfg.steps * cfg.batch_size * cfg.block_size / seconds,
            "params": task.model.num_params()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("teacher", help="train the teacher (if absent) and write results/ch12_teacher.json")
    st = sub.add_parser("students", help="train every arm for each seed; write results/OUT")
    st.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    st.add_argument("--steps", type=int, default=STUDENT["steps"])
    st.add_argument("--out", default="ch12_students.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.command == "teacher":
        cfg = teacher_config()
        metrics = train_teacher(cfg)
        out = {"command": "OMP_NUM_THREADS=1 python chapters/minilm_experiments.py teacher",
               "machine": f"{platform.machine()}, {platform.python_version()}, torch {torch.__version__}, 1 thread",
               "config": asdict(cfg), "metrics": {k: v for k, v in metrics.items() if k != "sample"},
               "sample": metrics["sample"]}
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "ch12_teacher.json").write_text(json.dumps(out, indent=2))
        print(f"wrote {RESULTS / 'ch12_teacher.json'}")
    else:
        cfg = teacher_config()
        teacher, tok, _ = load_model(cfg.run_dir, "cpu")
        rows = []
        for seed in args.seeds:
            for arm in ARMS:
                rows.append(student(arm, seed, cfg.run_dir, steps=args.steps))
                print(rows[-1], flush=True)
        from nanomodels.data import load_text, train_val_split
        from nanomodels.train import VAL_FRACTION
        ids = torch.tensor(tok.encode(load_text("pydoc")), dtype=torch.long)
        _, val_ids = train_val_split(ids, VAL_FRACTION)
        out = {"command": "OMP_NUM_THREADS=1 python chapters/minilm_experiments.py " + " ".join(argv),
               "machine": f"{platform.machine()}, torch {torch.__version__}, 1 thread, shared loaded machine",
               "student": {**STUDENT, "steps": args.steps}, "arms": ARMS, "rows": rows,
               "teacher": {"val_loss_block32": val_loss(teacher, val_ids, 32), "params": teacher.num_params()}}
        (RESULTS / args.out).write_text(json.dumps(out, indent=2))
        print(f"wrote {RESULTS / args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main(sys.argv[1:])
