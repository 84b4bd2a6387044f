"""Parsed parts of a policy kept across parses, by content (docs/benchmarks.md "swap"): a re-apply of
a policy whose blocklists or rules did not change skips their parse and hands the compiler the same
objects, whose identity its memos check first (enforcer/compile_memo.py).

Both kinds are bounded, thread-safe and hold only values parsed without an issue; a parse that
reports anything takes the uncached path (enforcer/policy.py), so every error report is unchanged.
"""
from __future__ import annotations

import hashlib
import threading
from typing import Generic, TypeVar

T = TypeVar("T")


class ContentCache(Generic[T]):
    """Values by the sha256 of their source bytes (peers files), the last `size` of them (LRU)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: dict[bytes, T] = {}
        self._lock = threading.Lock()

    def get(self, content: bytes) -> T | None:
        key = hashlib.sha256(content).digest()
        with self._lock:
            if (hit := self._items.pop(key, None)) is not None:
                self._items[key] = hit                    # most recent last
            return hit

    def put(self, content: bytes, value: T) -> None:
        with self._lock:
            self._items[hashlib.sha256(content).digest()] = value
            while len(self._items) > self.size:
                del self._items[next(iter(self._items))]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def text_key(items: list, *types: type) -> tuple | None:
    """`items` as a key of the memos of inline lists (hostwall.boundedmemo, weighed by their length)
    when each is exactly of one of `types` (so equal keys were written the same way: no bool, no float
    meeting an equal int), else None (not memoised)."""
    key = tuple(items)
    return key if set(types).issuperset(map(type, key)) else None
