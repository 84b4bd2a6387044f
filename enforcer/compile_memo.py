"""Memo of compiled policy parts, so a re-apply recomputes only what changed (docs/benchmarks.md "swap").

An apply that changes one rule's ports or action leaves the peer axis (the 100k-prefix blocklist's
classes and interval tables, most of a max policy's compile time) exactly as it was; `AxisMemo`
returns it without recomputing when the axis's input is equal to one of the last few inputs.

Keys are tuples compared item by item, identity first: the rules of a policy derived from the previous
one (or peers files served from policy.py's content-hash cache) share their PeerSet objects, so the
check costs ~0.1 µs per rule; equal but distinct objects fall back to __eq__ (array compares).
Cached arrays are read-only, so no caller can change what a later compile returns.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


class AxisMemo:
    """The last `size` (key, value) pairs of one pure function of its key. Thread-safe."""

    def __init__(self, size: int = 2):
        self.size = size
        self._items: list[tuple[tuple, Any]] = []
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get_or_compute(self, key: tuple, compute: Callable[[], T]) -> T:
        with self._lock:
            for i, (k, v) in enumerate(self._items):
                if _same_items(k, key):
                    self._items.insert(0, self._items.pop(i))
                    self.hits += 1
                    return v
        value = compute()
        _freeze(value)
        with self._lock:
            self.misses += 1
            self._items.insert(0, (key, value))
            del self._items[self.size:]
        return value

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


def same(a: Any, b: Any) -> bool:
    """Equal, identity first: PeerSet objects shared with the last policy skip the array compare."""
    return a is b or a == b


def _same_items(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(map(same, a, b))


def _freeze(value: Any) -> None:
    """Make every array in `value` (nested tuples and dataclasses) read-only."""
    if isinstance(value, np.ndarray):
        value.setflags(write=False)
    elif isinstance(value, tuple):
        for v in value:
            if not isinstance(v, str):       # e.g. the rule names: 4096 of them, nothing to freeze
                _freeze(v)
    elif hasattr(value, "__dataclass_fields__"):
        for v in vars(value).values():
            _freeze(v)


class LastCompile:
    """The rules and per-rule inputs of the last compile, to diff the next one against.

    Rules are frozen: a policy derived from the last one (one rule replaced) shares every other Rule
    object, so one identity pass over the rules (~0.1 µs each) finds what changed; a re-parsed file
    has new objects, compared by what the compile reads of them. Up to MAX_CHANGED
    changed rules are patched in; more, or another rule count, and the caller compiles in full."""

    MAX_CHANGED = 64

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state: tuple | None = None

    def changed(self, rules: tuple, equal: Callable[[Any, Any], bool]) -> tuple[tuple, list[int], Any] | None:
        """(previous rules, indexes of the rules that are other objects and not `equal`, saved extra)
        or None. `equal` serves a re-parsed file, whose rules are all new objects (~2 µs a rule)."""
        with self._lock:
            st = self._state
        if st is None or len(st[0]) != len(rules):
            return None
        prev, extra = st
        out: list[int] = []
        for i, (a, b) in enumerate(zip(prev, rules)):
            if a is not b and not equal(a, b):
                out.append(i)
                if len(out) > self.MAX_CHANGED:
                    return None
        return prev, out, extra

    def save(self, rules: tuple, extra: Any) -> None:
        _freeze(extra)
        with self._lock:
            self._state = (rules, extra)

    def clear(self) -> None:
        with self._lock:
            self._state = None
