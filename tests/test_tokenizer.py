"""Tests for nanomodels/tokenizer.py: the BPE steps, training, tiktoken agreement, char tokenizer, cache."""

import json

import pydoc_data.topics
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from nanomodels import tokenizer as tok_module
from nanomodels.tokenizer import (
    GPT2_PATTERN,
    BPETokenizer,
    CharTokenizer,
    get_tokenizer,
    merge_pair,
    most_frequent_pair,
    tokenizer_from_dict,
    train_bpe,
)

CORPUS = "\n".join(v for k, v in sorted(pydoc_data.topics.topics.items()))
TRAIN_SLICE = CORPUS[:50_000]
HELD_OUT = CORPUS[50_000:70_000]
a, b, c, d = b"abcd"  # byte ids 97..100, for hand-made merge lists

small_ids = st.lists(st.integers(0, 3), max_size=30)
small_pairs = st.tuples(st.integers(0, 3), st.integers(0, 3))


@pytest.fixture(scope="module")
def bpe() -> BPETokenizer:
    return BPETokenizer(train_bpe(TRAIN_SLICE, 400))


def replay_merges(merges: list[tuple[int, int]], text: str) -> list[int]:
    """The textbook encoder: apply merge 0, then merge 1, ... to every chunk."""
    out = []
    for chunk in regex.findall(GPT2_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        for i, pair in enumerate(merges):
            ids = merge_pair(ids, pair, 256 + i)
        out += ids
    return out


# ---- merge_pair (exercise 0.3) ----


def test_merge_pair_replaces_every_occurrence():
    assert merge_pair([1, 2, 3, 1, 2], (1, 2), 9) == [9, 3, 9]


def test_merge_pair_overlapping_run_merges_from_the_left():
    assert merge_pair([a, a, a], (a, a), 256) == [256, a]
    assert merge_pair([a, a, a, a], (a, a), 256) == [256, 256]


def test_merge_pair_without_occurrence_returns_input():
    assert merge_pair([2, 1, 3], (1, 2), 9) == [2, 1, 3]
    assert merge_pair([], (1, 2), 9) == []
    assert merge_pair([1], (1, 2), 9) == [1]


def test_merge_pair_at_the_end():
    assert merge_pair([3, 1, 2], (1, 2), 9) == [3, 9]


def test_merge_pair_does_not_modify_its_input():
    ids = [1, 2, 1, 2]
    merge_pair(ids, (1, 2), 9)
    assert ids == [1, 2, 1, 2]


@settings(deadline=None)
@given(ids=small_ids, pair=small_pairs)
def test_merge_pair_expands_back_to_input_and_leaves_no_occurrence(ids, pair):
    out = merge_pair(ids, pair, 9)
    expanded = [x for t in out for x in (pair if t == 9 else (t,))]
    assert expanded == ids, f"expanding {out} gives {expanded}, not the input {ids}"
    assert pair not in zip(out, out[1:]), f"{pair} still adjacent in {out}"


# ---- most_frequent_pair (exercise 0.4) ----


def test_most_frequent_pair_picks_the_highest_count():
    assert most_frequent_pair({(0, 0): 1, (9, 9): 5, (1, 2): 4}) == (9, 9)


def test_most_frequent_pair_ties_go_to_the_smallest_pair():
    assert most_frequent_pair({(5, 1): 3, (2, 9): 3, (2, 7): 3, (0, 0): 1}) == (2, 7)
    assert most_frequent_pair({(3, 0): 2, (2, 9): 2}) == (2, 9)


@settings(deadline=None)
@given(counts=st.dictionaries(small_pairs, st.integers(1, 3), min_size=1))
def test_most_frequent_pair_is_the_max_count_then_the_min_pair(counts):
    best = most_frequent_pair(counts)
    tied = [p for p, n in counts.items() if n == max(counts.values())]
    assert best == min(tied), f"counts={counts}: got {best}, expected the smallest of {sorted(tied)}"


# ---- train_bpe ----


def test_train_rejects_vocab_size_below_256():
    with pytest.raises(ValueError, match="vocab_size.*256"):
        train_bpe("hello", 255)
    assert train_bpe("hello hello", 256) == []


def test_train_first_merge_is_the_most_frequent_pair_and_ties_follow_the_rule():
    # "aaabdaaabac": aa occurs 4 times -> 256. Then (256, a) and (a, b) both occur twice: the tie goes to
    # the smaller pair (a, b) = (97, 98) -> 257. Then (256, 257) twice -> 258; every other pair once: stop.
    assert train_bpe("aaabdaaabac", 1000) == [(a, a), (a, b), (256, 257)]


def test_train_ties_across_chunks_follow_the_rule():
    # chunks "ab", " ab", " cd", " cd": (32, c), (a, b), (c, d) all occur twice -> (32, 99) first
    assert train_bpe("ab ab cd cd", 1000) == [(32, c), (a, b), (256, d)]


def test_merges_never_cross_chunk_boundaries():
    # (b, "!") occurs 50 times but spans the chunks "ab" | "!"; only (a, b) may be merged
    assert train_bpe("ab!" * 50, 1000) == [(a, b)]


def test_smaller_vocab_is_a_prefix_and_compresses_less():
    merges_300, merges_500 = train_bpe(TRAIN_SLICE, 300), train_bpe(TRAIN_SLICE, 500)
    assert merges_300 == merges_500[:44]
    n_300 = len(BPETokenizer(merges_300).encode(TRAIN_SLICE))
    n_500 = len(BPETokenizer(merges_500).encode(TRAIN_SLICE))
    assert n_500 < n_300 < len(TRAIN_SLICE.encode("utf-8")), f"tokens: vocab 300 -> {n_300}, 500 -> {n_500}"


@settings(deadline=None)
@given(text=st.text(alphabet="ab \n.", max_size=300))
def test_training_never_gives_two_tokens_the_same_bytes(text):
    tokenizer = BPETokenizer(train_bpe(text, 400))  # the constructor raises on a duplicate
    assert len(set(tokenizer.vocab)) == len(tokenizer.vocab)


def test_constructor_rejects_hand_made_duplicate_or_unknown_ids():
    with pytest.raises(ValueError, match="same bytes"):
        BPETokenizer([(a, b), (b, c), (256, c), (a, 257)])  # "ab"+"c" and "a"+"bc"
    with pytest.raises(ValueError, match="does not exist"):
        BPETokenizer([(a, 300)])


# ---- encoding: pure Python == tiktoken ----


@settings(deadline=None)
@given(text=st.text())
def test_bpe_decode_inverts_encode(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text
    assert bpe.decode(bpe.encode(text, fast=False)) == text


@settings(deadline=None)
@given(text=st.text())
def test_pure_python_encode_matches_tiktoken(bpe, text):
    assert bpe.encode(text, fast=False) == bpe.encode(text, fast=True)


@pytest.mark.parametrize("text", [TRAIN_SLICE, HELD_OUT])
def test_pure_python_encode_matches_tiktoken_on_corpus(bpe, text):
    slow, fast = bpe.encode(text, fast=False), bpe.encode(text, fast=True)
    first = next((i for i, (s, f) in enumerate(zip(slow, fast)) if s != f), min(len(slow), len(fast)))
    assert slow == fast, f"first difference at token {first}: {slow[first:][:5]} vs {fast[first:][:5]}"


def test_trained_merges_encode_like_replaying_the_merge_list(bpe):
    assert bpe.encode(HELD_OUT) == replay_merges(bpe.merges, HELD_OUT)


def test_concatenation_rank_rule_differs_from_merge_replay():
    # merges b+c, a+b, ab+c: "abc" -> [a, bc] (bc has the lower rank) and (a, bc) is not a merge, so
    # replay stops there; but a+bc concatenates to "abc" = token 258, so tiktoken's rule gives [258]
    merges = [(b, c), (a, b), (257, c)]
    tokenizer = BPETokenizer(merges)
    assert replay_merges(merges, "abc") == [a, 256]
    assert tokenizer.encode("abc", fast=False) == tokenizer.encode("abc", fast=True) == [258]


def test_chunk_that_is_a_token_is_emitted_whole():
    # merges b+c, a+b, c+d, ab+cd: pair merging on "abcd" gets stuck at [a, bc, d], but the chunk is token 259
    tokenizer = BPETokenizer([(b, c), (a, b), (c, d), (257, 258)])
    assert tokenizer.encode("abcd", fast=False) == tokenizer.encode("abcd", fast=True) == [259]
    assert tokenizer.encode(" abcd", fast=False) == tokenizer.encode(" abcd", fast=True) == [32, a, 256, d]


def test_tiktoken_export_has_bytes_then_merges(bpe):
    ranks = bpe.to_tiktoken()._mergeable_ranks
    assert all(ranks[bytes([i])] == i for i in range(256))
    assert all(ranks[bpe.vocab[x] + bpe.vocab[y]] == 256 + i for i, (x, y) in enumerate(bpe.merges))
    assert bpe.to_tiktoken().n_vocab == bpe.vocab_size == 400


# ---- char tokenizer ----


@settings(deadline=None)
@given(text=st.text())
def test_char_decode_inverts_encode(text):
    tokenizer = CharTokenizer(text)
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.vocab_size == len(set(text))


def test_char_vocab_is_sorted_and_unknown_char_is_named():
    tokenizer = CharTokenizer("hello")
    assert tokenizer.encode("ehlo") == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="'z'"):
        tokenizer.encode("hez")


# ---- persistence and cache ----


def test_save_load_round_trip(bpe, tmp_path):
    path = tmp_path / "sub" / "bpe.json"
    bpe.save(path)
    loaded = BPETokenizer.load(path)
    assert loaded.merges == bpe.merges and loaded.pattern == bpe.pattern
    assert loaded.encode(HELD_OUT) == bpe.encode(HELD_OUT)
    assert [p.name for p in path.parent.iterdir()] == ["bpe.json"], "the temporary file was left behind"


@pytest.mark.parametrize("kind", ["bpe", "char"])
def test_dict_round_trip_gives_identical_encodings(bpe, kind):
    tokenizer = bpe if kind == "bpe" else CharTokenizer(HELD_OUT)
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(tokenizer.to_dict())))
    assert type(rebuilt) is type(tokenizer) and rebuilt.vocab_size == tokenizer.vocab_size
    assert rebuilt.encode(HELD_OUT) == tokenizer.encode(HELD_OUT)


def test_get_tokenizer_second_call_reads_the_cache(tmp_path, monkeypatch):
    text = CORPUS[:5_000]
    first = get_tokenizer("bpe", text, vocab_size=300, cache_dir=tmp_path)
    assert len(list(tmp_path.iterdir())) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("train_bpe called although the merges are cached")

    monkeypatch.setattr(tok_module, "train_bpe", no_training)
    second = get_tokenizer("bpe", text, vocab_size=300, cache_dir=tmp_path)
    assert second.merges == first.merges
    with pytest.raises(AssertionError, match="cached"):  # another vocab_size is another key
        get_tokenizer("bpe", text, vocab_size=301, cache_dir=tmp_path)


def test_get_tokenizer_default_cache_dir_comes_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOMODELS_CACHE", str(tmp_path))
    get_tokenizer("bpe", "ab ab ab", vocab_size=260)
    assert len(list(tmp_path.glob("bpe-*.json"))) == 1


def test_get_tokenizer_kinds():
    assert isinstance(get_tokenizer("char", "hello"), CharTokenizer)
    with pytest.raises(ValueError, match=r"kind='wordpiece'.*\['bpe', 'char'\]"):
        get_tokenizer("wordpiece", "hello")
