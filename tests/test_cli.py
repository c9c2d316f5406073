"""The command line under a student's hands: misuse gives one line and exit code 2, Ctrl-C leaves a checkpoint
that resumes exactly, a copied run folder resumes under its new name, --help explains every option."""

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import fields

import pytest
import torch

from nanomodels.__main__ import main
from nanomodels.train import TrainConfig, deferred_interrupt, load_checkpoint, min_tokens, train

TEXT = "the quick brown fox jumps over the lazy dog. " * 200
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "NANOMODELS_DEVICE": "cpu"}
TINY = {"tokenizer": "char", "n_layers": 2, "d_model": 32, "n_heads": 2, "block_size": 16, "batch_size": 4,
        "warmup": 3, "eval_iters": 2, "sample_tokens": 5, "progress": False, "threads": 1}


def tiny(corpus, out_dir, **overrides):
    return TrainConfig(**{"name": "t", "out_dir": str(out_dir), "data": str(corpus), "steps": 20,
                          "eval_interval": 5, **TINY, **overrides})


def cli_args(**options) -> list[str]:
    return [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items()]


def nanomodels(*args, cwd=None, cache=None) -> subprocess.Popen:
    env = ENV if cache is None else {**ENV, "NANOMODELS_CACHE": str(cache)}  # BPE merges of test texts go there
    # a Ctrl-C must reach the command even when this test runs in the background (SIGINT ignored there, and a
    # process started with SIGINT ignored rightly keeps ignoring it): start it with the default disposition
    return subprocess.Popen([sys.executable, "-m", "nanomodels", *args], env=env, text=True, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def finish(run: subprocess.Popen, timeout: float = 300) -> tuple[int | None, str, str]:
    """(exit code, stdout, stderr) of a started command; killed (code None) if it outlives the timeout."""
    try:
        out, err = run.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.kill()
        out, err = run.communicate()
        return None, out, err
    return run.returncode, out, err


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys()
    for key in a:
        diff = (a[key] - b[key]).abs()
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs (max {diff.max():.3g}, mean {diff.mean():.3g})"


@pytest.fixture(scope="module")
def place(tmp_path_factory):
    """A folder with a char-level corpus, a 3-byte text, and a plain file where a folder could be expected."""
    root = tmp_path_factory.mktemp("cli")
    (root / "corpus.txt").write_text(TEXT)
    (root / "three.txt").write_text("abc")
    (root / "a_file").write_text("not a folder")
    return root


# (id, arguments after `python -m nanomodels`, text the one error line must contain)
MISUSES = [
    ("name_parent", ["train", "--name", "../escape"], "--name: must be one folder name"),
    ("name_absolute", ["train", "--name", "{root}/absolute"], "--name: must be one folder name"),
    ("name_empty", ["train", "--name="], "--name: must be one folder name"),
    ("name_with_separator", ["train", "--name", "a/b"], "--name: must be one folder name"),
    ("out_dir_is_a_file", ["train", "--out_dir", "{root}/a_file"], "--out_dir: '{root}/a_file' is a file"),
    ("negative_lr", ["train", "--lr", "-1"], "--lr: must be > 0"),
    ("three_byte_data", ["train", "--data", "{root}/three.txt"], "--data: '{root}/three.txt' is 3 tokens long"),
    ("vocab_larger_than_the_text_supports", ["train", "--data", "{root}/corpus.txt", "--vocab_size", "100000"],
     "--vocab_size: this text supports at most"),
    # the ones above are issue 15's list, also run from the shell below; these run in-process only
    ("name_dot", ["train", "--name", "."], "--name: must be one folder name"),
    ("sample_name_parent", ["sample", "--name", "../escape"], "--name: must be one folder name"),
    ("out_dir_below_a_file", ["train", "--out_dir", "{root}/a_file/runs"], "--out_dir: '{root}/a_file' is a file"),
    ("run_folder_is_a_file", ["train", "--out_dir", "{root}", "--name", "a_file"], "--name: '{root}/a_file' is a file"),
    ("nan_lr", ["train", "--lr", "nan"], "--lr: must be a finite number"),
    ("heads_do_not_divide_width", ["train", "--n_heads", "3"], "--n_heads: must divide d_model (128), got 3"),
    ("not_an_integer", ["train", "--steps", "ten"], "argument --steps: invalid int value: 'ten'"),
    ("unknown_norm", ["train", "--norm", "deep"], "argument --norm: invalid choice: 'deep'"),
    ("unknown_option", ["train", "--learning_rate", "1"], "unrecognized arguments: --learning_rate"),
    ("missing_data_file", ["train", "--data", "{root}/nope.txt"], "data: no such file"),
    ("resume_without_a_run", ["train", "--name", "never", "--resume"], "--resume: no checkpoint at"),
]
FROM_THE_SHELL = 8


def misuse_argv(place, command, *args) -> list[str]:
    """Safe options first, so that a misuse that slipped through would be a short run; the case's own options
    come after them and win."""
    safe = ["--out_dir", str(place / "runs")]
    if command == "train":
        safe += ["--steps", "2", "--progress", "false", "--sample_tokens", "0"]
    return [command, *safe, *[a.format(root=place) for a in args]]


def assert_one_error_line(case: str, code, err: str, expected: str) -> None:
    assert "Traceback" not in err, f"{case}: a traceback instead of an error line:\n{err}"
    assert code == 2, f"{case}: exit code {code}, expected 2; stderr:\n{err}"
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{case}: not one 'error:' line:\n{err}"
    assert expected in lines[0], f"{case}: the error does not say {expected!r}:\n{lines[0]}"


@pytest.mark.parametrize("case,args,expected", MISUSES, ids=[c for c, _, _ in MISUSES])
def test_misuse_returns_2_with_one_error_line(place, case, args, expected, capsys, monkeypatch):
    monkeypatch.setenv("NANOMODELS_CACHE", str(place / "cache"))
    try:
        code = main(misuse_argv(place, *args))
    except SystemExit as exit:  # argparse's errors
        code = exit.code
    assert_one_error_line(case, code, capsys.readouterr().err, expected.format(root=place))


@pytest.fixture(scope="module")
def shell_results(place):
    """Issue 15's misuses as commands, all started at once (the machine is shared: that is cheaper)."""
    runs = {case: nanomodels(*misuse_argv(place, *args), cwd=place, cache=place / "cache")
            for case, args, _ in MISUSES[:FROM_THE_SHELL]}
    return {case: finish(run) for case, run in runs.items()}


@pytest.mark.parametrize("case,expected", [(c, e) for c, _, e in MISUSES[:FROM_THE_SHELL]],
                         ids=[c for c, _, _ in MISUSES[:FROM_THE_SHELL]])
def test_misuse_from_the_shell_exits_2_with_one_error_line_and_no_traceback(shell_results, place, case, expected):
    code, _, err = shell_results[case]
    assert_one_error_line(case, code, err, expected.format(root=place))


def test_rejected_names_write_nothing_outside_out_dir(shell_results, place):
    assert not (place / "escape").exists(), "--name ../escape wrote next to --out_dir"
    assert not (place / "absolute").exists(), "an absolute --name wrote outside --out_dir"
    assert not (place / "runs" / "config.json").exists(), "--name '' wrote straight into --out_dir"


def test_sigint_writes_the_current_step_and_resume_continues_exactly(place, tmp_path):
    steps = 200  # long enough that the interrupt lands mid-run even on a busy machine
    options = {"name": "t", "data": str(place / "corpus.txt"), "steps": steps, "eval_interval": steps, **TINY}
    run = nanomodels("train", *cli_args(out_dir=tmp_path / "cut", **options))
    started = run.stdout.readline()
    assert started.startswith("training "), f"no start-up line; stdout {started!r}, stderr {run.stderr.read()}"
    run.send_signal(signal.SIGINT)
    code, _, err = finish(run)
    assert code == 130, f"exit code {code} after SIGINT, expected 130; stderr:\n{err}"
    state = load_checkpoint(tmp_path / "cut" / "t" / "ckpt.pt")
    cut = state["step"]
    assert 0 < cut < steps, f"the checkpoint is at step {cut}: the interrupt did not land mid-run"
    assert state["history"] == [], "an evaluation ran: the test must interrupt before the first one"
    assert f"interrupted: checkpoint of step {cut} written to " in err and "--resume" in err, err
    assert "Traceback" not in err, err

    train(TrainConfig(out_dir=str(tmp_path / "cut"), resume=True, **options))
    train(TrainConfig(out_dir=str(tmp_path / "straight"), **options))
    resumed = load_checkpoint(tmp_path / "cut" / "t" / "ckpt.pt")["model"]
    straight = load_checkpoint(tmp_path / "straight" / "t" / "ckpt.pt")["model"]
    assert_same_weights(straight, resumed, f"interrupted at {cut} + resumed vs {steps} steps straight")
    assert not torch.equal(state["model"]["embed.wte.weight"], resumed["embed.wte.weight"]), "resuming changed nothing"


def test_a_first_interrupt_sets_the_flag_and_a_second_one_raises():
    # SIGINT as in an interactive shell: pytest may run as a background job, which starts with SIGINT ignored
    original = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = signal.getsignal(signal.SIGINT)
        with deferred_interrupt(enabled=True) as interrupt:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs in this thread at the next bytecode; sleep returns early if it raises
            assert interrupt.is_set(), "the first Ctrl-C did not set the flag"
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(10)
        assert signal.getsignal(signal.SIGINT) is before, "the previous SIGINT handler was not restored"
    finally:
        signal.signal(signal.SIGINT, original)


def test_a_forced_interrupt_says_which_checkpoint_the_run_holds(place, tmp_path, monkeypatch):
    import nanomodels.train as trainer

    calls = []

    def interrupted_batch(*args):
        calls.append(1)
        if len(calls) == 8:  # inside step 8: steps 1..7 are done, the eval after step 5 wrote a checkpoint
            raise KeyboardInterrupt
        return real_batch(*args)

    real_batch = trainer.get_batch
    monkeypatch.setattr(trainer, "get_batch", interrupted_batch)
    monkeypatch.setattr(trainer, "evaluate", lambda *args: 0.0)  # eval batches do not count as steps here
    with pytest.raises(trainer.Interrupted, match=r"holds the checkpoint of step 5; continue with --resume"):
        train(tiny(place / "corpus.txt", tmp_path / "a"))
    calls.clear()
    with pytest.raises(trainer.Interrupted, match="interrupted before the first checkpoint: no checkpoint written"):
        train(tiny(place / "corpus.txt", tmp_path / "b", eval_interval=10))
    assert not (tmp_path / "b" / "t" / "ckpt.pt").exists()


def test_a_copied_run_folder_resumes_under_its_new_name(place, tmp_path):
    corpus = place / "corpus.txt"
    train(tiny(corpus, tmp_path / "a"))
    train(tiny(corpus, tmp_path / "b", stop_at=10))
    shutil.copytree(tmp_path / "b" / "t", tmp_path / "elsewhere" / "branch")
    train(tiny(corpus, tmp_path / "elsewhere", name="branch", resume=True))
    straight = load_checkpoint(tmp_path / "a" / "t" / "ckpt.pt")["model"]
    branch = load_checkpoint(tmp_path / "elsewhere" / "branch" / "ckpt.pt")
    assert branch["step"] == 20 and branch["config"]["name"] == "branch"
    assert_same_weights(straight, branch["model"], "copied at step 10 + resumed vs 20 steps straight")


def test_resume_refuses_to_go_back_before_the_checkpoint(place, tmp_path):
    train(tiny(place / "corpus.txt", tmp_path, stop_at=10))
    with pytest.raises(ValueError, match="--steps: .* is at step 10; --steps must be at least that, got 5"):
        train(tiny(place / "corpus.txt", tmp_path, steps=5, resume=True))
    with pytest.raises(ValueError, match="--stop_at: .* is at step 10; --stop_at must be after it"):
        train(tiny(place / "corpus.txt", tmp_path, stop_at=10, resume=True))


def test_start_up_line_states_the_thread_count(place, tmp_path, capsys):
    try:
        train(tiny(place / "corpus.txt", tmp_path, steps=2, threads=2))
    finally:
        torch.set_num_threads(1)
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith("training ") and "CPU threads 2 (--threads)" in first, first


def test_help_explains_every_option(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # argparse wraps at the terminal width: one line per option
    with pytest.raises(SystemExit) as done:
        main(["train", "--help"])
    assert done.value.code == 0
    text = capsys.readouterr().out
    for f in fields(TrainConfig):
        assert f"--{f.name}" in text, f"--{f.name} is missing from train --help"
        assert f"{f.metadata['help']}" in text, f"--{f.name}: its explanation is missing from train --help"
    for needle in ("or the path to a UTF-8 text file (default: pydoc)", "--tokenizer {bpe,char}", "--norm {pre,post}",
                   "--residual {pre,post,deepnorm,subln}", "--attention {softmax,dilated,retention}", "--ffn {mlp,moe}",
                   "--router {linear,xmoe}", "--linear {dense,bitlinear}", "--segment_lengths W [W ...]",
                   "0 = run to --steps", "0 = torch's choice (one per core", "--threads 1 is often faster",
                   "(default: 0)", "(default: 500)"):
        assert needle in text, f"train --help does not say {needle!r}"


def test_min_tokens_is_the_smallest_length_that_train_val_split_can_serve():
    from nanomodels.data import train_val_split

    for block_size in (1, 16, 128):
        need = min_tokens(block_size)
        for n, ok in ((need, True), (need - 1, False)):
            train_ids, val_ids = train_val_split(torch.arange(n), 0.1)
            fits = len(train_ids) > block_size and len(val_ids) > block_size
            assert fits == ok, f"block_size {block_size}: {n} tokens give splits {len(train_ids)}/{len(val_ids)}"


def test_sample_cli_reads_a_trained_run(place, tmp_path):
    train(tiny(place / "corpus.txt", tmp_path, steps=5))
    run = nanomodels("sample", "--out_dir", str(tmp_path), "--name", "t", "--prompt", "the ", "--tokens", "10")
    code, (out, err) = run.wait(timeout=300), run.communicate()
    assert code == 0, err
    assert out.startswith("the ") and len(out.strip()) >= 10


def test_doctor_runs_and_says_which_thread_count_train_uses(capsys):
    assert main(["doctor"]) == 0
    out = capsys.readouterr().out
    assert "train uses --threads, default 0 = this" in out and "kernel test tiers:" in out, out
