"""Tests for nanomodels.data: corpus loading, the train/val cut, batch windows, synthetic tasks."""

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomodels.data import (
    IGNORE_INDEX, LETTERS, TASKS, VOCAB, exact_match, get_batch, load_text, make_task, train_val_split,
)

seeds = st.integers(0, 2**32 - 1)
task_names = st.sampled_from(sorted(TASKS))
lengths = st.integers(1, 12)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def solve(name: str, prompt: str) -> str:
    """Independent oracle: the answer string (end marker included) read off the prompt alone."""
    assert prompt.endswith("|"), prompt
    body = prompt[:-1]
    if name == "copy":
        return body + "."
    if name == "reverse":
        return body[::-1] + "."
    if name == "sort":
        return "".join(sorted(body)) + "."
    if name == "add":
        a, b = body.split("+")
        assert len(a) == len(b), prompt
        return str(int(a) + int(b)).zfill(len(a) + 1)[::-1] + "."
    if name == "recall":
        store, query = body.split("?")
        table = dict(zip(store[0::2], store[1::2]))
        assert len(table) == len(store) // 2, f"recall keys repeat in {prompt!r}"
        return table[query] + "."
    raise AssertionError(name)


# ---- corpus -------------------------------------------------------------------------------------------

def test_pydoc_corpus_is_large_and_identical_across_calls():
    text = load_text("pydoc")
    assert len(text) > 400_000, len(text)
    assert text == load_text("pydoc") == load_text()


def test_local_utf8_file_loads_verbatim(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("héllo wörld\n", encoding="utf-8")
    assert load_text(str(path)) == "héllo wörld\n"


def test_missing_file_error_names_path_and_alternatives(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=r"no such file .*nope\.txt.*pydoc"):
        load_text(str(missing))


def test_directory_is_rejected(tmp_path):
    with pytest.raises(IsADirectoryError, match="is a directory"):
        load_text(str(tmp_path))


@pytest.mark.parametrize("payload, problem", [
    (b"abc\x00def", "NUL bytes"),
    (b"caf\xe9 latin-1", "not UTF-8"),
    (b"\x89PNG\r\n\x1a\n\xff\xfe", "not UTF-8"),
])
def test_non_text_file_is_rejected(tmp_path, payload, problem):
    path = tmp_path / "blob.bin"
    path.write_bytes(payload)
    with pytest.raises(ValueError, match=problem):
        load_text(str(path))


def test_empty_file_is_rejected(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        load_text(str(path))


# ---- train/val split ----------------------------------------------------------------------------------

@settings(deadline=None, max_examples=50)
@given(n=st.integers(2, 5000), frac=st.floats(0.01, 0.99))
def test_split_is_train_prefix_then_val_tail(n, frac):
    ids = torch.arange(n)
    if round(frac * n) in (0, n):
        with pytest.raises(ValueError, match="empty"):
            train_val_split(ids, frac)
        return
    train, val = train_val_split(ids, frac)
    assert len(train) + len(val) == n
    assert torch.equal(torch.cat([train, val]), ids), "split must be a single contiguous cut"
    assert len(val) == round(frac * n)


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_split_rejects_fraction_outside_open_unit_interval(frac):
    with pytest.raises(ValueError, match="val_fraction"):
        train_val_split(torch.arange(100), frac)


# ---- get_batch ----------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=40)
@given(n=st.integers(2, 300), batch=st.integers(1, 16), block=st.integers(1, 32), seed=seeds)
def test_batch_rows_are_contiguous_windows_and_y_is_x_shifted(n, batch, block, seed):
    if n <= block:
        return
    data = torch.arange(n) * 3 + 7  # every value unique, so a row's first value fixes its start
    x, y = get_batch(data, batch, block, gen(seed))
    assert x.shape == y.shape == (batch, block)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])
    starts = (x[:, 0] - 7) // 3
    for row, s in enumerate(starts.tolist()):
        assert 0 <= s <= n - block - 1, f"start {s} leaves no room for y in data of length {n}"
        assert torch.equal(x[row], data[s: s + block]), f"row {row} is not data[{s}:{s + block}]"
        assert torch.equal(y[row], data[s + 1: s + block + 1])


def test_batch_reaches_every_start_including_the_last():
    data = torch.arange(13)  # block 10 -> starts 0, 1, 2 are the only valid ones
    x, _ = get_batch(data, 300, 10, gen(0))
    assert set(x[:, 0].tolist()) == {0, 1, 2}


def test_batch_uses_only_the_generator():
    data = torch.randint(50_000, (10_000,), generator=gen(123))
    torch.manual_seed(0)
    random.seed(0)
    x1, y1 = get_batch(data, 8, 64, gen(42))
    torch.manual_seed(999)
    random.seed(999)
    x2, y2 = get_batch(data, 8, 64, gen(42))
    x3, _ = get_batch(data, 8, 64, gen(43))
    assert torch.equal(x1, x2) and torch.equal(y1, y2), "same generator seed must give the same batch"
    assert not torch.equal(x1, x3), "a different seed should give a different batch"


def test_batch_accepts_narrow_integer_dtypes():
    x, y = get_batch(torch.arange(100, dtype=torch.int16), 4, 8, gen(0))
    assert x.dtype == y.dtype == torch.int64


@pytest.mark.parametrize("n", [5, 8])
def test_batch_too_short_data_names_block_size_and_length(n):
    with pytest.raises(ValueError, match=rf"block_size=8.*has {n}"):
        get_batch(torch.arange(n), 2, 8, gen(0))


# ---- synthetic tasks ----------------------------------------------------------------------------------

@settings(deadline=None, max_examples=60)
@given(name=task_names, length=lengths, seed=seeds)
def test_task_answers_match_independent_oracle_and_lengths_are_fixed(name, length, seed):
    task = make_task(name, length)
    for prompt, answer in task.sample(32, gen(seed)):
        assert len(prompt) == task.prompt_len and len(answer) == task.answer_len, (prompt, answer)
        assert answer == solve(name, prompt), f"{name}: {prompt!r} -> {answer!r}"
        assert task.decode(task.encode(prompt + answer)) == prompt + answer


def test_docstring_examples():
    assert solve("add", "123+989|") == "2111."
    assert solve("recall", "a3c7b1?c|") == "7."
    assert (make_task("add", 3).prompt_len, make_task("add", 3).answer_len) == (8, 5)
    assert (make_task("recall", 3).prompt_len, make_task("recall", 3).answer_len) == (9, 2)


def test_recall_queries_every_position_and_add_produces_carries():
    prompts = [p for p, _ in make_task("recall", 4).sample(400, gen(1))]
    assert {p.index(p[-2]) for p in prompts} == {0, 2, 4, 6}, "query must hit every stored key position"
    answers = [a for _, a in make_task("add", 4).sample(400, gen(1))]
    assert {a[-2] for a in answers} == {"0", "1"}, "the top (carry) digit should take both values"


@settings(deadline=None, max_examples=30)
@given(text=st.text(alphabet=VOCAB, max_size=40))
def test_encode_decode_round_trip(text):
    task = make_task("copy")
    ids = task.encode(text)
    assert all(0 <= i < task.vocab_size for i in ids)
    assert task.decode(ids) == text
    assert task.decode(torch.tensor(ids, dtype=torch.long)) == text


def test_encode_rejects_characters_outside_vocab():
    with pytest.raises(ValueError, match="not in the task vocabulary"):
        make_task("copy").encode("12X")


@settings(deadline=None, max_examples=40)
@given(name=task_names, length=lengths, seed=seeds)
def test_batch_ignores_exactly_prompt_targets(name, length, seed):
    task = make_task(name, length)
    n = 6
    x, y = task.batch(n, gen(seed))
    pairs = task.sample(n, gen(seed))  # same seed -> the same problems batch() saw
    seq_len = task.prompt_len + task.answer_len
    assert x.shape == y.shape == (n, seq_len - 1) and x.dtype == y.dtype == torch.int64
    ignored = y == IGNORE_INDEX
    assert ignored[:, : task.prompt_len - 1].all() and not ignored[:, task.prompt_len - 1:].any()
    for row, (prompt, answer) in enumerate(pairs):
        assert task.decode(x[row]) == (prompt + answer)[:-1]
        assert task.decode(y[row][~ignored[row]]) == answer


def test_task_sampling_uses_only_the_generator():
    for name in TASKS:
        torch.manual_seed(0)
        random.seed(0)
        a = make_task(name).sample(16, gen(5))
        torch.manual_seed(1)
        random.seed(1)
        b = make_task(name).sample(16, gen(5))
        c = make_task(name).sample(16, gen(6))
        assert a == b, f"{name}: same generator seed must give the same problems"
        assert a != c, f"{name}: a different seed should give different problems"


def test_make_task_rejects_bad_arguments():
    with pytest.raises(ValueError, match="known tasks: .*copy.*reverse.*sort.*add.*recall"):
        make_task("multiply")
    with pytest.raises(ValueError, match="length must be >= 1"):
        make_task("copy", 0)
    with pytest.raises(ValueError, match="recall"):
        make_task("recall", len(LETTERS) + 1)
    make_task("recall", len(LETTERS))


# ---- exact match --------------------------------------------------------------------------------------

def oracle_for(task):
    def predict(prompts, answer_len):
        rows = [task.encode(solve(task.name, task.decode(p))) for p in prompts]
        out = torch.tensor(rows)
        assert out.shape == (len(prompts), answer_len)
        return out
    return predict


@settings(deadline=None, max_examples=20)
@given(name=task_names, length=lengths, seed=seeds)
def test_exact_match_oracle_scores_one_and_zeros_score_zero(name, length, seed):
    task = make_task(name, length)
    assert exact_match(task, oracle_for(task), 50, gen(seed)) == 1.0
    def zeros(prompts, answer_len):
        return torch.zeros(len(prompts), answer_len, dtype=torch.long)

    assert exact_match(task, zeros, 50, gen(seed)) == 0.0, "every answer ends with '.', never '0'"


@pytest.mark.parametrize("name", sorted(TASKS))
def test_exact_match_zero_digits_with_end_marker_scores_low(name):
    task = make_task(name, 4)
    dot = task.encode(".")[0]

    def zeros_then_dot(prompts, answer_len):
        out = torch.zeros(len(prompts), answer_len, dtype=torch.long)
        out[:, -1] = dot
        return out

    assert exact_match(task, zeros_then_dot, 500, gen(0)) < 0.2


@pytest.mark.parametrize("name", sorted(TASKS))
def test_exact_match_counts_whole_rows(name):
    task = make_task(name, 5)
    oracle = oracle_for(task)

    def half_right(prompts, answer_len):
        out = oracle(prompts, answer_len)
        out[1::2, 0] = (out[1::2, 0] + 1) % task.vocab_size  # one wrong token spoils the whole row
        return out

    assert exact_match(task, half_right, 100, gen(3)) == 0.5


def test_exact_match_rejects_wrong_prediction_shape():
    task = make_task("copy", 3)
    with pytest.raises(ValueError, match="expected"):
        exact_match(task, lambda p, a: torch.zeros(len(p), a + 1, dtype=torch.long), 4, gen(0))
