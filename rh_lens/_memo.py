"""A bounded memo per tokenizer, for what the trials of one sweep share.

A sweep of 10 depths x 10 lengths x N needles asks for the same needle's token count and the
same haystack cut to the same length many times over.  :class:`TokenizerMemo` keeps such
results keyed by ``(tokenizer, key)``: the same function of the same inputs gives the cached
output, so a trial built from the memo is the trial built without it.

- Tables are held per tokenizer through a weak reference: a tokenizer that is garbage-collected
  takes its table with it, and a tokenizer whose vocabulary grows (``add_tokens``) starts afresh.
- Each table is bounded in entries and in items (characters of a string, elements of a tuple);
  the least recently used entries go first.
- Values must be immutable (``str``, ``int``, ``tuple``, ``frozenset``, None): a caller can
  never alter what the memo hands to the next caller.  Tensors are never stored.
- A key holds only hashable value objects: :func:`value_key` tells whether a haystack may be
  part of one (a frozen dataclass, compared by its fields, not an object that could change).
"""

import dataclasses
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

T = TypeVar("T")
_IMMUTABLE = (str, int, tuple, frozenset, type(None))


def value_key(obj) -> bool:
    """Whether ``obj`` may be part of a memo key: a hashable frozen dataclass (its equality and
    hash are those of its fields, which cannot be reassigned)."""
    if not (dataclasses.is_dataclass(obj) and not isinstance(obj, type)):
        return False
    if not obj.__dataclass_params__.frozen:
        return False
    try:
        hash(obj)
    except TypeError:
        return False
    return True


def _cost(value) -> int:
    return len(value) if isinstance(value, (str, tuple, frozenset)) else 1


class _Table:
    __slots__ = ("ref", "vocab", "entries", "items")

    def __init__(self, ref: weakref.ref, vocab: int):
        self.ref, self.vocab = ref, vocab
        self.entries: OrderedDict[Hashable, object] = OrderedDict()
        self.items = 0


class TokenizerMemo:
    """``get(tokenizer, key, compute)``: ``compute()``'s value, computed once per
    ``(tokenizer, key)`` while it stays in the table."""

    def __init__(self, *, max_entries: int = 256, max_items: int = 1 << 23):
        if max_entries < 0 or max_items < 0:
            raise ValueError(f"memo bounds must be >= 0, got max_entries={max_entries}, "
                             f"max_items={max_items}")
        self.max_entries, self.max_items = max_entries, max_items
        self._tables: dict[int, _Table] = {}
        self._lock = threading.Lock()

    def get(self, tokenizer, key: Hashable, compute: Callable[[], T]) -> T:
        if tokenizer is None:  # nothing to key on: compute raises its own error
            return compute()
        table = self._table(tokenizer)
        with self._lock:
            if key in table.entries:
                table.entries.move_to_end(key)
                return table.entries[key]  # type: ignore[return-value]
        value = compute()
        if not isinstance(value, _IMMUTABLE):
            raise TypeError(f"memo values must be immutable, got {type(value).__name__}")
        cost = _cost(value)
        with self._lock:
            if key in table.entries or cost > self.max_items or self.max_entries == 0:
                return value
            table.entries[key] = value
            table.items += cost
            while len(table.entries) > self.max_entries or table.items > self.max_items:
                _, old = table.entries.popitem(last=False)
                table.items -= _cost(old)
        return value

    def clear(self) -> None:
        with self._lock:
            self._tables.clear()

    def sizes(self) -> dict[int, int]:
        """Entries per live table, by the tokenizer's ``id`` (for tests and inspection)."""
        with self._lock:
            return {k: len(t.entries) for k, t in self._tables.items() if t.ref() is not None}

    def _table(self, tokenizer) -> _Table:
        key, vocab = id(tokenizer), len(tokenizer)
        with self._lock:
            table = self._tables.get(key)
            if table is not None and table.ref() is tokenizer and table.vocab == vocab:
                return table
            tables = self._tables

            def drop(_ref, key=key):
                tables.pop(key, None)

            table = self._tables[key] = _Table(weakref.ref(tokenizer, drop), vocab)
            return table
