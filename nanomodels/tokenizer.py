"""Byte-level BPE, trained from scratch (chapter 00), and a char-level tokenizer.

Byte-pair encoding (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019):

1. Text is UTF-8 bytes, so the starting vocabulary is the 256 single bytes: any string is encodable and
   nothing is ever "unknown".
2. A regex first cuts the text into chunks (a word with its leading space, a run of digits, punctuation,
   whitespace). Merges never cross a chunk boundary, so " dog" can become one token but "dog." cannot.
3. Training: count every adjacent pair of ids inside the chunks, merge the most frequent pair (a, b) into a
   new id 256 + i everywhere, record it as merge i, repeat until the vocabulary has `vocab_size` tokens.
   Ties go to the smallest pair (a, b) in lexicographic order, so training is deterministic.
   Each unique chunk is stored once with its multiplicity, and a merge re-scans only the chunks that
   contain the merged pair: that is what makes training take seconds rather than hours.
4. Encoding: cut into chunks the same way and, inside each chunk, apply the merges.

Paper vs official code (tiktoken): tiktoken does not replay the merge list. Inside a chunk it merges the
adjacent pair whose *concatenated bytes* have the lowest rank, and a chunk that is itself a token is
emitted whole. The two rules can disagree (tests/test_tokenizer.py builds a case), so the pure-Python
`encode` below follows tiktoken's rule, and gives the same ids as the fast path.

Can two merges spell the same bytes ("ab"+"c" and "a"+"bc")? A hand-written merge list can (BPETokenizer
rejects it: tiktoken needs bytes <-> id to be a bijection); training cannot. A merge never crosses a token
boundary, so a span that starts and ends on boundaries is tokenized as if it stood alone. If r, s were ever
adjacent with bytes(r) + bytes(s) = bytes(X), X made from (p, q), then just before X was made that span and
X's own span were both tokenized as those bytes alone: as [p, q], with no boundary between r and s.
For trained merges tiktoken's rule also gives the same ids as replaying the merges (the tests check it).
"""

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Iterable
from pathlib import Path

import regex  # the `\p{L}` classes need the `regex` module (a tiktoken dependency), not `re`
import tiktoken

# GPT-2's split (tiktoken's "gpt2" pat_str): contractions, letters, digits, other symbols, whitespace.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def merge_pair(ids: list[int], pair: tuple[int, int], new_id: int) -> list[int]:
    """Replace every occurrence of `pair` in `ids` by `new_id`, scanning left to right.

    Inputs: `ids` a list of token ids; `pair` = (a, b); `new_id` the id of the merged token.
    Output: a new list (`ids` is not modified) where each adjacent a, b is replaced by `new_id`.
    Occurrences are taken greedily from the left and do not overlap: ([1, 1, 1], (1, 1), 9) -> [9, 1].
    Without an occurrence the output equals the input.
    """
    # BEGIN EXERCISE 0.3: one BPE merge step
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
    # END EXERCISE


def most_frequent_pair(counts: dict[tuple[int, int], int]) -> tuple[int, int]:
    """The pair with the largest count; among equal counts, the smallest pair (a, b).

    Inputs: `counts` a non-empty dict {(a, b): count}.
    Output: the key with the highest count. Tie rule: if several keys share that count, return the
    smallest one in lexicographic order of (a, b), e.g. {(5, 1): 3, (2, 7): 3, (2, 9): 3} -> (2, 7).
    """
    # BEGIN EXERCISE 0.4: the most frequent pair, ties to the smallest pair
    return min(counts, key=lambda pair: (-counts[pair], pair))
    # END EXERCISE


def train_bpe(text: str, vocab_size: int, pattern: str = GPT2_PATTERN) -> list[tuple[int, int]]:
    """Learn vocab_size - 256 merges from `text`; merge i creates token 256 + i. Returns the list of pairs.

    `pattern` cuts the text into chunks (merges never cross a chunk boundary); a chunk is its UTF-8 bytes. Each
    merge takes the most frequent adjacent pair inside the chunks (a chunk that occurs k times counts k times;
    ties go to the smallest pair, `most_frequent_pair`) and replaces it by the new id in every chunk (`merge_pair`).
    Stops early, without error, once no pair occurs at least twice.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size}: byte-level BPE needs vocab_size >= 256 (the bytes)")
    # BEGIN EXERCISE 0.6: BPE training, the merge loop that builds the vocabulary
    chunks = Counter(regex.findall(pattern, text))
    words = [list(chunk.encode("utf-8")) for chunk in chunks]  # each unique chunk once...
    freqs = list(chunks.values())  # ...with its multiplicity
    counts: Counter[tuple[int, int]] = Counter()
    where: defaultdict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> chunks that may hold it
    for i, word in enumerate(words):
        for pair in zip(word, word[1:]):
            counts[pair] += freqs[i]
            where[pair].add(i)
    merges: list[tuple[int, int]] = []
    while 256 + len(merges) < vocab_size and counts:
        pair = most_frequent_pair(counts)
        if counts[pair] < 2:
            break
        new_id = 256 + len(merges)
        merges.append(pair)
        for i in where.pop(pair):
            old = words[i]
            new = merge_pair(old, pair, new_id)
            if len(new) == len(old):
                continue  # `where` is a superset: an earlier merge took this chunk's occurrence
            for p in zip(old, old[1:]):
                counts[p] -= freqs[i]
            for p in zip(new, new[1:]):
                counts[p] += freqs[i]
                where[p].add(i)
            words[i] = new
        counts = +counts  # drop the pairs that no longer occur (count 0)
    return merges
    # END EXERCISE


class BPETokenizer:
    """Byte-level BPE from a merge list: token 256 + i is the concatenation of the two ids of merges[i]."""

    def __init__(self, merges: list[tuple[int, int]], pattern: str = GPT2_PATTERN):
        self.merges = [(int(a), int(b)) for a, b in merges]
        self.pattern = pattern
        self.vocab = [bytes([b]) for b in range(256)]  # id -> bytes
        for i, (a, b) in enumerate(self.merges):
            if not (0 <= a < 256 + i and 0 <= b < 256 + i):
                raise ValueError(f"merges[{i}] = {(a, b)} uses an id that does not exist yet")
            self.vocab.append(self.vocab[a] + self.vocab[b])
        self.ranks = {token: i for i, token in enumerate(self.vocab)}  # bytes -> id (= rank)
        if len(self.ranks) != len(self.vocab):
            raise ValueError("two merges spell the same bytes; mergeable_ranks must be a bijection")
        self._split = regex.compile(pattern)
        self._tiktoken: tiktoken.Encoding | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def to_tiktoken(self) -> tiktoken.Encoding:
        """The same tokenizer as a tiktoken.Encoding (Rust: ~15x faster than fast=False); built once."""
        if self._tiktoken is None:
            self._tiktoken = tiktoken.Encoding(
                f"nanomodels-bpe-{self.vocab_size}",
                pat_str=self.pattern,
                mergeable_ranks=self.ranks,
                special_tokens={},
            )
        return self._tiktoken

    def _encode_chunk(self, chunk: bytes) -> list[int]:
        # tiktoken's rule, not a replay of the merge list: a chunk that is a token is emitted whole;
        # otherwise merge the leftmost adjacent pair whose concatenated bytes have the lowest rank.
        # The pair itself need not be a merge: with merges b+c, a+b, ab+c, the parts [a, bc] still become
        # "abc" here, while replaying merges would stop at [a, bc].
        if chunk in self.ranks:
            return [self.ranks[chunk]]
        parts, absent = [bytes([b]) for b in chunk], len(self.vocab)
        while len(parts) > 1:
            rank, i = min((self.ranks.get(parts[i] + parts[i + 1], absent), i) for i in range(len(parts) - 1))
            if rank == absent:
                break  # no adjacent pair concatenates to a token
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
        return [self.ranks[part] for part in parts]

    def encode(self, text: str, fast: bool = True) -> list[int]:
        """Text -> ids. fast=True: tiktoken; fast=False: the pure-Python reference (identical ids)."""
        if fast:
            return self.to_tiktoken().encode_ordinary(text)
        return [i for chunk in self._split.findall(text) for i in self._encode_chunk(chunk.encode("utf-8"))]

    def decode(self, ids: list[int]) -> str:
        # a slice of ids may cut a multi-byte character: such bytes become U+FFFD instead of an error
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")

    def to_dict(self) -> dict:
        return {"kind": "bpe", "pattern": self.pattern, "merges": [list(m) for m in self.merges]}

    @classmethod
    def from_dict(cls, d: dict) -> "BPETokenizer":
        return cls([tuple(m) for m in d["merges"]], d["pattern"])

    def save(self, path: str | os.PathLike) -> None:
        _write_json_atomically(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BPETokenizer":
        return cls.from_dict(json.loads(Path(path).read_text()))


class CharTokenizer:
    """One id per character; the vocabulary is the sorted set of the characters given (a text or a list)."""

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        self.ids = {ch: i for i, ch in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        for ch in text:
            if ch not in self.ids:
                raise ValueError(f"character {ch!r} is not in the CharTokenizer vocabulary")
        return [self.ids[ch] for ch in text]

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def to_dict(self) -> dict:
        return {"kind": "char", "chars": "".join(self.chars)}

    @classmethod
    def from_dict(cls, d: dict) -> "CharTokenizer":
        return cls(d["chars"])


TOKENIZERS = {"bpe": BPETokenizer, "char": CharTokenizer}


def tokenizer_from_dict(d: dict) -> BPETokenizer | CharTokenizer:
    """Rebuild a tokenizer from its to_dict() (e.g. stored in a training checkpoint)."""
    return TOKENIZERS[d["kind"]].from_dict(d)


def _write_json_atomically(path: Path, obj) -> None:
    # a crash mid-write leaves the old file (or none), never a truncated one that a later load trusts
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def get_tokenizer(
    kind: str, text: str, vocab_size: int = 1024, cache_dir: str | os.PathLike | None = None
) -> BPETokenizer | CharTokenizer:
    """A tokenizer for `text` (vocab_size is for "bpe" only).

    "bpe" merges are cached as JSON under cache_dir (default $NANOMODELS_CACHE, else ~/.cache/nanomodels),
    keyed by sha256(vocab_size, pattern, text): the second call for the same corpus does not retrain.
    """
    if kind not in TOKENIZERS:
        raise ValueError(f"kind={kind!r}: expected one of {sorted(TOKENIZERS)}")
    if kind == "char":
        return CharTokenizer(text)
    cache_dir = Path(cache_dir or os.environ.get("NANOMODELS_CACHE") or Path.home() / ".cache" / "nanomodels")
    key = hashlib.sha256(json.dumps([vocab_size, GPT2_PATTERN, text]).encode("utf-8")).hexdigest()
    path = cache_dir / f"bpe-{key}.json"
    if path.exists():
        return BPETokenizer.load(path)
    tokenizer = BPETokenizer(train_bpe(text, vocab_size), GPT2_PATTERN)
    tokenizer.save(path)
    return tokenizer
