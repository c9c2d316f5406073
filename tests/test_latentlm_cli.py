"""`train-latentlm` and image `sample` under a student's hands: a tiny run trains end to end, a run stopped or
interrupted in either phase (sigma-VAE, LatentLM) resumes to the same weights as a run straight through, the
grid has one row per class and is a function of the seed, and misuse gives one error line and exit code 2."""

import contextlib
from dataclasses import fields

import pytest
import torch
from matplotlib.image import imread
from test_cli import TINY, assert_one_error_line, assert_same_weights, finish, nanomodels

import nanomodels.train as trainer  # the one loop, which train-latentlm runs too
from nanomodels.__main__ import main
from nanomodels.train import Interrupted, TrainConfig, load_checkpoint, train
from nanomodels.digits import image_grid
from nanomodels.train_latentlm import LatentTrainConfig, train_latentlm

LM_TINY = {"images": 200, "latent_dim": 2, "vae_steps": 6, "n_layers": 1, "d_model": 16, "n_heads": 2,
           "head_width": 16, "head_depth": 1, "batch_size": 8, "steps": 8, "eval_interval": 4, "progress": False,
           "threads": 1}


def tiny_lm(out_dir, **overrides) -> LatentTrainConfig:
    return LatentTrainConfig(**{"name": "t", "out_dir": str(out_dir), **LM_TINY, **overrides})


def grid_shape(per_class: int, rows: int = 10, side: int = 16, pad: int = 1, zoom: int = 4) -> tuple:
    return ((rows * (side + pad) + pad) * zoom, (per_class * (side + pad) + pad) * zoom)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A folder with a trained tiny LatentLM run 't' and a trained tiny text run 'text'."""
    root = tmp_path_factory.mktemp("latentlm_cli")
    train_latentlm(tiny_lm(root))
    (root / "corpus.txt").write_text("the quick brown fox jumps over the lazy dog. " * 200)
    train(TrainConfig(name="text", out_dir=str(root), data=str(root / "corpus.txt"), steps=2, eval_interval=2,
                      **TINY))
    return root


def test_a_tiny_run_writes_checkpoint_metrics_loss_plot_and_a_grid_with_one_row_per_class(runs):
    run = runs / "t"
    state = load_checkpoint(run / "ckpt.pt")
    assert state["kind"] == "latentlm" and state["step"] == 8 and state["vae_step"] == 6
    assert state["tokenizer"]["norm"] is not None and state["vae_optimizer"] is None
    assert [h["step"] for h in state["history"]] == [4, 8]
    for name in ("config.json", "metrics.json", "loss.png"):
        assert (run / name).is_file(), f"{name} missing from the run folder"
    grid = imread(run / "samples_cfg3_dpm20_seed0.png")
    assert grid.shape[:2] == grid_shape(per_class=8), f"grid of {grid.shape[:2]}, expected 10 rows of 8"


def test_image_grid_puts_image_i_at_row_i_div_cols():
    images = torch.arange(6, dtype=torch.float32).view(6, 1, 1, 1).expand(6, 1, 2, 2) / 10
    grid = image_grid(images, rows=3, pad=1, zoom=1)
    assert grid.shape == (3 * 3 + 1, 2 * 3 + 1)
    for i in range(6):
        r, c = divmod(i, 2)
        assert torch.all(grid[1 + 3 * r:3 + 3 * r, 1 + 3 * c:3 + 3 * c] == i / 10), f"image {i} misplaced"


def test_stop_at_and_resume_give_the_weights_of_a_straight_run(tmp_path):
    train_latentlm(tiny_lm(tmp_path / "a"))
    options = {**LM_TINY, "out_dir": tmp_path / "b", "name": "t", "stop_at": 3}  # this leg from the command line
    assert main(["train-latentlm", *[f"--{k}={str(v).lower() if isinstance(v, bool) else v}"
                                     for k, v in options.items()]]) == 0
    assert load_checkpoint(tmp_path / "b" / "t" / "ckpt.pt")["step"] == 3
    train_latentlm(tiny_lm(tmp_path / "b", resume=True))
    straight, resumed = (load_checkpoint(tmp_path / d / "t" / "ckpt.pt") for d in ("a", "b"))
    assert_same_weights(straight["model"], resumed["model"], "stopped at 3 + resumed vs 8 steps straight")
    assert_same_weights(straight["tokenizer"]["vae"], resumed["tokenizer"]["vae"], "the sigma-VAE")
    losses = {h["step"]: (h["train_loss"], h["val_loss"]) for h in resumed["history"]}  # + the eval at step 3
    assert all(losses[h["step"]] == (h["train_loss"], h["val_loss"]) for h in straight["history"])


class InterruptAt:
    """deferred_interrupt's stand-in: the flag reads as set from its n-th check on (one check per step)."""

    def __init__(self, n: int):
        self.n, self.calls = n, 0

    def is_set(self) -> bool:
        self.calls += 1
        return self.calls >= self.n

    @contextlib.contextmanager
    def __call__(self, enabled):
        yield self


@pytest.mark.parametrize("check,phase,message", [
    (3, "sigma-VAE", "checkpoint of sigma-VAE step 3 written to"),
    (6 + 1 + 5, "LatentLM", "checkpoint of step 5 written to"),  # 6 VAE steps, the check after them, step 5
], ids=["in_the_vae_phase", "in_the_latentlm_phase"])
def test_an_interrupted_run_resumes_to_the_weights_of_a_straight_run(tmp_path, monkeypatch, check, phase, message):
    train_latentlm(tiny_lm(tmp_path / "a"))
    with monkeypatch.context() as patch:
        patch.setattr(trainer, "deferred_interrupt", InterruptAt(check))
        with pytest.raises(Interrupted, match=message):
            train_latentlm(tiny_lm(tmp_path / "b"))
    train_latentlm(tiny_lm(tmp_path / "b", resume=True))
    straight, resumed = (load_checkpoint(tmp_path / d / "t" / "ckpt.pt") for d in ("a", "b"))
    assert_same_weights(straight["model"], resumed["model"], f"interrupted in the {phase} phase + resumed")
    assert_same_weights(straight["tokenizer"]["vae"], resumed["tokenizer"]["vae"], "the sigma-VAE")


def test_vae_from_reuses_the_trained_sigma_vae(runs, tmp_path):
    train_latentlm(tiny_lm(runs, name="reuse", vae_steps=1000, vae_from="t"))
    source, reuse = (load_checkpoint(runs / n / "ckpt.pt") for n in ("t", "reuse"))
    assert_same_weights(source["tokenizer"]["vae"], reuse["tokenizer"]["vae"], "--vae_from t")
    assert reuse["tokenizer"]["norm"] == source["tokenizer"]["norm"]
    assert reuse["vae_metrics"]["from"] == "t" and reuse["step"] == 8


def test_sample_writes_a_grid_that_depends_only_on_the_seed(runs, capsys):
    def grid(seed, out):
        path = runs / out
        assert main(["sample", "--out_dir", str(runs), "--name", "t", "--per_class", "2", "--steps", "3",
                     "--sampler", "ddim", "--cfg", "2", "--seed", str(seed), "--out", str(path)]) == 0
        assert f"wrote {path}: 2 generated digits per class" in capsys.readouterr().out
        return imread(path)

    first, again, other = grid(0, "s0.png"), grid(0, "s0_again.png"), grid(1, "s1.png")
    assert first.shape[:2] == grid_shape(per_class=2)
    assert (first == again).all(), "the same seed gave another grid"
    assert not (first == other).all(), "another seed gave the same grid"


def test_sample_with_the_defaults_reproduces_the_grid_written_at_the_end_of_training(runs, capsys):
    path = runs / "t" / "samples_cfg3_dpm20_seed0.png"
    at_the_end = imread(path)
    path.unlink()
    assert main(["sample", "--out_dir", str(runs), "--name", "t"]) == 0
    assert (imread(path) == at_the_end).all()


def test_sample_from_the_shell_prints_the_grid_path_relative_to_the_working_folder(runs):
    code, out, err = finish(nanomodels("sample", "--out_dir", runs.name, "--name", "t", "--per_class", "1",
                                       "--steps", "2", cwd=runs.parent))
    assert code == 0 and "Traceback" not in err, err
    assert out.startswith(f"wrote {runs.name}/t/samples_cfg3_dpm2_seed0.png: 1 generated digits per class"), out
    assert imread(runs / "t" / "samples_cfg3_dpm2_seed0.png").shape[:2] == grid_shape(per_class=1)


# (id, arguments after `python -m nanomodels`, text the one error line must contain); {root}: the runs fixture
MISUSES = [
    ("cfg_negative", ["sample", "--name", "t", "--cfg", "-1"], "--cfg: must be a finite number >= 0 (1 = no guidance)"),
    ("cfg_nan", ["sample", "--name", "t", "--cfg", "nan"], "--cfg: must be a finite number >= 0"),
    ("cfg_not_a_number", ["sample", "--name", "t", "--cfg", "high"], "argument --cfg: invalid float value: 'high'"),
    ("steps_zero", ["sample", "--name", "t", "--steps", "0"], "--steps: must be >= 1, got 0"),
    ("steps_beyond_the_schedule", ["sample", "--name", "t", "--steps", "1001"],
     "--steps: must be in [1, 1000] (the training schedule's T), got 1001"),
    ("unknown_sampler", ["sample", "--name", "t", "--sampler", "euler"], "argument --sampler: invalid choice: 'euler'"),
    ("per_class_zero", ["sample", "--name", "t", "--per_class", "0"], "--per_class: must be >= 1, got 0"),
    ("out_not_png", ["sample", "--name", "t", "--out", "{root}/grid.jpg"], "--out: must be a .png file name"),
    ("text_run_with_image_options", ["sample", "--name", "text", "--cfg", "2", "--steps", "5"],
     "--cfg, --steps: options for image runs, but {root}/text is a text run (trained by `train`); its options "
     "are --prompt, --tokens, --temperature, --top_k"),
    ("image_run_with_text_options", ["sample", "--name", "t", "--prompt", "The "],
     "--prompt: an option for text runs, but {root}/t is a latentlm run (trained by `train-latentlm`); its "
     "options are --cfg, --steps, --sampler, --per_class, --out"),
    ("sample_missing_run", ["sample", "--name", "never"], "checkpoint: no file at {root}/never/ckpt.pt"),
    ("heads_do_not_divide_width", ["train-latentlm", "--n_heads", "3"], "--n_heads: must divide d_model (16), got 3"),
    ("odd_head_width", ["train-latentlm", "--head_width", "63"], "--head_width: must be even"),
    ("class_dropout_one", ["train-latentlm", "--class_dropout", "1"], "--class_dropout: must be in [0, 1), got 1.0"),
    ("zero_vae_steps", ["train-latentlm", "--vae_steps", "0"], "--vae_steps: must be >= 1, got 0"),
    ("negative_lr", ["train-latentlm", "--lr", "-1"], "--lr: must be > 0"),
    ("name_parent", ["train-latentlm", "--name", "../escape"], "--name: must be one folder name"),
    ("vae_from_a_path", ["train-latentlm", "--vae_from", "../t"], "--vae_from: must be one folder name"),
    ("vae_from_itself", ["train-latentlm", "--name", "x", "--vae_from", "x"], "--vae_from: must name another run"),
    ("vae_from_a_missing_run", ["train-latentlm", "--name", "x", "--vae_from", "never"],
     "--vae_from: no checkpoint at {root}/never/ckpt.pt"),
    ("vae_from_a_text_run", ["train-latentlm", "--name", "x", "--vae_from", "text"],
     "--vae_from: {root}/text/ckpt.pt holds no trained sigma-VAE (a text run)"),
    ("vae_from_another_latent_dim", ["train-latentlm", "--name", "x", "--vae_from", "t", "--latent_dim", "3"],
     "--latent_dim: the sigma-VAE of t has latent_dim 2, got 3"),
    ("resume_a_text_run_as_latentlm", ["train-latentlm", "--name", "text", "--resume"],
     "--resume: {root}/text/ckpt.pt is a text run; continue it with `python -m nanomodels train --resume`"),
    ("resume_a_latentlm_run_as_text", ["train", "--name", "t", "--resume", "--data", "{root}/corpus.txt"],
     "--resume: {root}/t/ckpt.pt is a latentlm run; continue it with `python -m nanomodels train-latentlm --resume`"),
    ("resume_with_other_options", ["train-latentlm", "--name", "t", "--resume", "--d_model", "32"],
     "--resume: {root}/t/ckpt.pt was trained with other options (--d_model: checkpoint 16, now 32"),
    ("existing_run_without_resume", ["train-latentlm", "--name", "t"], "{root}/t/ckpt.pt exists: pass --resume"),
]


@pytest.mark.parametrize("case,args,expected", MISUSES, ids=[c for c, _, _ in MISUSES])
def test_misuse_returns_2_with_one_error_line(runs, case, args, expected, capsys):
    argv = [args[0], "--out_dir", str(runs), *[a.format(root=runs) for a in args[1:]]]
    if args[0] == "train-latentlm":  # a misuse that slipped through would train a tiny run
        argv[1:1] = [f"--{k}={v}" for k, v in LM_TINY.items()]
    try:
        code = main(argv)
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    assert_one_error_line(case, code, capsys.readouterr().err, expected.format(root=runs))


def test_help_explains_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal width: one line per option
    with pytest.raises(SystemExit):
        main(["train-latentlm", "--help"])
    text = capsys.readouterr().out
    for f in fields(LatentTrainConfig):
        assert f"--{f.name}" in text and f.metadata["help"] in text, f"--{f.name} is not explained in --help"
    with pytest.raises(SystemExit):
        main(["sample", "--help"])
    text = capsys.readouterr().out
    for needle in ("text runs (train):", "image runs (train-latentlm):", "--cfg SCALE", "1 = no guidance",
                   "(default: 3)", "--steps N", "in [1, 1000]", "(default: 20)", "--sampler {dpm,ddim}",
                   "DPM-Solver++(2M)", "DDIM", "--per_class N", "(default: 8)", "--out PATH.png", "(default: 200)"):
        assert needle in text, f"sample --help does not say {needle!r}"
