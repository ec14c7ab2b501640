"""The per-tokenizer memo behind NIAH trial building: computed once per (tokenizer, key),
bounded, keyed per tokenizer, released with its tokenizer, immutable values only."""

import dataclasses
import gc

import pytest
import torch

from rh_lens._memo import TokenizerMemo, value_key

pytestmark = pytest.mark.tl4


class FakeTokenizer:
    """Only what the memo reads of a tokenizer: its identity and its vocabulary size."""

    def __init__(self, vocab: int = 10):
        self.vocab = vocab

    def __len__(self) -> int:
        return self.vocab


class Counter:
    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, value):
        def compute():
            self.calls.append(value)
            return value
        return compute


def test_computes_once_per_tokenizer_and_key():
    memo, count = TokenizerMemo(), Counter()
    a, b = FakeTokenizer(), FakeTokenizer()
    assert memo.get(a, "k", count("a")) == "a"
    assert memo.get(a, "k", count("never")) == "a"  # a hit does not compute
    assert memo.get(b, "k", count("b")) == "b"  # same key, other tokenizer: its own value
    assert memo.get(a, "k2", count("a2")) == "a2"
    assert count.calls == ["a", "b", "a2"]


def test_least_recently_used_entries_go_first():
    memo, count = TokenizerMemo(max_entries=2), Counter()
    tok = FakeTokenizer()
    memo.get(tok, 1, count("x1"))
    memo.get(tok, 2, count("x2"))
    memo.get(tok, 1, count("never"))  # 1 is now the most recent
    memo.get(tok, 3, count("x3"))  # evicts 2
    assert memo.sizes() == {id(tok): 2}
    memo.get(tok, 1, count("never"))
    memo.get(tok, 2, count("x2 again"))
    assert count.calls == ["x1", "x2", "x3", "x2 again"]


def test_items_bound_counts_characters_and_elements():
    memo, count = TokenizerMemo(max_items=10), Counter()
    tok = FakeTokenizer()
    memo.get(tok, "a", count("123456"))
    memo.get(tok, "b", count((1, 2, 3, 4)))  # 6 + 4 = 10 items: both kept
    assert memo.sizes() == {id(tok): 2}
    memo.get(tok, "c", count("x"))  # 11 items: the oldest goes
    assert memo.sizes() == {id(tok): 2}
    memo.get(tok, "big", count("y" * 11))  # larger than the bound: returned, never stored
    memo.get(tok, "big", count("y" * 11))
    assert count.calls == ["123456", (1, 2, 3, 4), "x", "y" * 11, "y" * 11]


def test_zero_entries_disables_the_memo():
    memo, count = TokenizerMemo(max_entries=0), Counter()
    tok = FakeTokenizer()
    memo.get(tok, "k", count("a"))
    memo.get(tok, "k", count("b"))
    assert count.calls == ["a", "b"] and memo.sizes() == {id(tok): 0}


def test_a_tokenizer_takes_its_table_with_it():
    memo = TokenizerMemo()
    kept, dropped = FakeTokenizer(), FakeTokenizer()
    memo.get(kept, "k", lambda: "kept")
    memo.get(dropped, "k", lambda: "dropped")
    assert len(memo.sizes()) == 2
    del dropped
    gc.collect()
    assert memo.sizes() == {id(kept): 1}
    assert len(memo._tables) == 1  # the table itself is gone, not only unreachable


def test_a_grown_vocabulary_starts_afresh():
    memo, count = TokenizerMemo(), Counter()
    tok = FakeTokenizer(10)
    memo.get(tok, "k", count("before"))
    tok.vocab = 11  # as after tokenizer.add_tokens
    assert memo.get(tok, "k", count("after")) == "after"
    assert count.calls == ["before", "after"]


def test_mutable_values_are_refused():
    memo = TokenizerMemo()
    with pytest.raises(TypeError, match="immutable.*Tensor"):
        memo.get(FakeTokenizer(), "k", lambda: torch.zeros(3))
    with pytest.raises(TypeError, match="immutable.*list"):
        memo.get(FakeTokenizer(), "k", lambda: [1, 2])
    with pytest.raises(ValueError, match="max_entries=-1"):
        TokenizerMemo(max_entries=-1)


def test_no_tokenizer_computes_every_time():
    count = Counter()
    memo = TokenizerMemo()
    memo.get(None, "k", count("a"))
    memo.get(None, "k", count("b"))
    assert count.calls == ["a", "b"] and memo.sizes() == {}


@dataclasses.dataclass(frozen=True)
class Frozen:
    text: str


@dataclasses.dataclass
class Mutable:
    text: str


@dataclasses.dataclass(frozen=True)
class FrozenHoldingAList:
    parts: list


class Plain:
    def text(self, n_chars: int) -> str:
        return "x" * n_chars


def test_only_frozen_hashable_dataclasses_key_a_haystack():
    assert value_key(Frozen("a"))
    assert not value_key(Mutable("a"))
    assert not value_key(FrozenHoldingAList(["a"]))  # frozen but unhashable
    assert not value_key(Plain())  # could change between calls
    assert not value_key(Frozen)  # the class, not an instance
