"""A memo bounded in entries and in a caller-given weight (bytes, list items): when a new entry would
pass either bound it starts over, so a hit costs one dict lookup with no per-hit bookkeeping, and a few
long entries fill it sooner instead of holding more. Used for policy parts kept across parses by their
text (hostwall/yamlplain.py flow lines; enforcer/parse_memo.py's inline peers and ports; docs/datapath.md
"Atomic swaps"). Thread-safe: puts and clears take a lock; a get is one dict lookup (atomic under the
GIL)."""
from __future__ import annotations

import threading
from collections.abc import Hashable
from typing import Generic, TypeVar

__all__ = ["BoundedMemo"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class BoundedMemo(Generic[K, V]):
    """At most `size` entries of at most `max_weight` in all; an entry heavier than that is not kept."""

    def __init__(self, size: int, max_weight: int) -> None:
        self.size, self.max_weight = size, max_weight
        self._items: dict[K, V] = {}
        self.weight = 0
        self._lock = threading.Lock()
        self.get = self._items.get

    def put(self, key: K, value: V, weight: int) -> None:
        with self._lock:
            if len(self._items) >= self.size or self.weight + weight > self.max_weight:
                self._items.clear()
                self.weight = 0
            if weight <= self.max_weight:
                self._items[key] = value
                self.weight += weight

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self.weight = 0

    def __len__(self) -> int:
        return len(self._items)
