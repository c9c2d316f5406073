"""The trainer: exact resume, data-parallel equivalence, atomic checkpoints, clear errors before any work."""

import os
import subprocess
import sys

import pytest
import torch

from nanomodels.train import TrainConfig, load_checkpoint, lr_at, train, unigram_loss

TEXT = "the quick brown fox jumps over the lazy dog. " * 200


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text(TEXT)
    return str(path)


def tiny(corpus, out_dir, **overrides):
    options = dict(name="t", out_dir=str(out_dir), data=corpus, tokenizer="char", n_layers=2, d_model=32,
                   n_heads=2, block_size=16, batch_size=4, steps=20, warmup=3, eval_interval=5, eval_iters=2,
                   sample_tokens=5, progress=False, threads=1)
    options.update(overrides)
    return TrainConfig(**options)


def weights(out_dir, name="t"):
    return load_checkpoint(out_dir / name / "ckpt.pt")["model"]


def test_resume_continues_exactly(corpus, tmp_path):
    train(tiny(corpus, tmp_path / "a"))
    train(tiny(corpus, tmp_path / "b", stop_at=10))
    halfway = load_checkpoint(tmp_path / "b" / "t" / "ckpt.pt")
    assert halfway["step"] == 10
    train(tiny(corpus, tmp_path / "b", resume=True))
    straight, resumed = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), f"{key} differs after 10 + resume + 10 steps"
    assert not torch.equal(halfway["model"]["embed.wte.weight"], resumed["embed.wte.weight"]), "the resumed steps changed nothing"


def test_resume_must_change_something_to_be_exact(corpus, tmp_path):
    # the resume test above is only meaningful if a different seed gives different weights
    train(tiny(corpus, tmp_path / "a"))
    train(tiny(corpus, tmp_path / "c", seed=7))
    assert not torch.equal(weights(tmp_path / "a")["embed.wte.weight"], weights(tmp_path / "c")["embed.wte.weight"])


@pytest.mark.slow
def test_two_processes_match_one_with_the_same_global_batch(corpus, tmp_path):
    common = ["--name", "t", "--data", corpus, "--tokenizer", "char", "--n_layers", "2", "--d_model", "32",
              "--n_heads", "2", "--block_size", "16", "--batch_size", "8", "--steps", "6", "--eval_interval", "3",
              "--eval_iters", "1", "--sample_tokens", "3", "--progress", "false", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NANOMODELS_DEVICE": "cpu"}
    one = [sys.executable, "-m", "nanomodels", "train", "--out_dir", str(tmp_path / "one")] + common
    two = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "nanomodels",
           "train", "--out_dir", str(tmp_path / "two")] + common
    for cmd in (one, two):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    moved = (a["embed.wte.weight"] - load_initial(corpus, tmp_path)).abs().max()
    assert moved > 1e-3, "training did not move the weights: the comparison would be vacuous"
    for key in a:
        diff = (a[key] - b[key]).abs().max().item()
        assert diff < 1e-5, f"{key}: 2-process DDP differs from 1 process by {diff:.3g}"


def load_initial(corpus, tmp_path):
    from nanomodels.tokenizer import get_tokenizer
    from nanomodels.train import build_model
    cfg = tiny(corpus, tmp_path / "init", block_size=16, batch_size=8)
    torch.manual_seed(cfg.seed)
    return build_model(cfg, get_tokenizer("char", TEXT).vocab_size).embed.wte.weight.detach()


def test_existing_run_is_never_overwritten_silently(corpus, tmp_path):
    train(tiny(corpus, tmp_path, steps=5))
    before = (tmp_path / "t" / "ckpt.pt").read_bytes()
    with pytest.raises(FileExistsError, match="--resume to continue it, --overwrite to start over"):
        train(tiny(corpus, tmp_path, steps=5))
    assert (tmp_path / "t" / "ckpt.pt").read_bytes() == before


def test_resume_with_other_options_names_them(corpus, tmp_path):
    train(tiny(corpus, tmp_path, steps=5))
    with pytest.raises(ValueError, match=r"--d_model: checkpoint 32, now 64"):
        train(tiny(corpus, tmp_path, steps=10, d_model=64, resume=True))


def test_corrupted_checkpoint_gives_clear_error_and_is_left_alone(corpus, tmp_path):
    train(tiny(corpus, tmp_path, steps=5))
    path = tmp_path / "t" / "ckpt.pt"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="corrupted or not a nanomodels checkpoint"):
        train(tiny(corpus, tmp_path, steps=10, resume=True))
    assert len(path.read_bytes()) == 100


def test_checkpoint_refuses_pickled_code(tmp_path):
    path = tmp_path / "ckpt.pt"
    torch.save({"model": {}, "config": {}, "tokenizer": {}, "step": 0, "evil": TrainConfig()}, path)
    with pytest.raises(ValueError, match="corrupted or not a nanomodels checkpoint"):
        load_checkpoint(path)


def test_missing_data_fails_before_anything_is_written(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        train(tiny(str(tmp_path / "nope.txt"), tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("option,value,rule", [
    ("steps", 0, "--steps: must be >= 1"), ("n_heads", 3, "--n_heads: must divide d_model"),
    ("tokenizer", "word", "--tokenizer: must be 'bpe' or 'char'"), ("norm", "deep", "--norm: must be one of"),
    ("min_lr", 1.0, r"--min_lr: must be in \(0, --lr=0.003\]"), ("lr", -1.0, "--lr: must be > 0, got -1.0"),
    ("lr", float("inf"), "--lr: must be a finite number"), ("vocab_size", 100, "--vocab_size: a byte-level BPE"),
    ("name", "../escape", "--name: must be one folder name"), ("name", "", "--name: must be one folder name"),
    ("name", "/tmp/run", "--name: must be one folder name"), ("name", "..", "--name: must be one folder name"),
])
def test_invalid_options_are_rejected_at_construction(option, value, rule):
    with pytest.raises(ValueError, match=rule):
        TrainConfig(**{option: value})


def test_learning_rate_schedule_warms_up_then_decays_to_min():
    cfg = TrainConfig(steps=100, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(99, cfg) == pytest.approx(1e-4, rel=1e-2)
    lrs = [lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:])), "the cosine must not increase"


def test_unigram_baseline_is_the_entropy_of_token_frequencies():
    train_ids = torch.tensor([0, 0, 1, 1])
    val = torch.tensor([0, 1])
    # add-one smoothing over 2 tokens: p = (3/6, 3/6), loss = ln 2
    assert unigram_loss(train_ids, val, 2) == pytest.approx(0.6931471805599453)
