"""The cross-product first-match table (docs/datapath.md "Classification"): for every (L4 class, peer
class) pair, the first rule whose bit is set in both class bitmaps, so the datapath answers with one
array load instead of ANDing up to 64 bitmap words.

Cell value: rule order + 1, 0 when no rule matches; cell index = L4 class x stride + peer class with
stride = number of peer classes (hw_policy_hdr.xm_stride). Over XM_CELLS_MAX cells there is no table
(stride 0) and the datapath scans the bitmaps as before.

Computed by painting, not by ANDing every pair: a rule in every peer class (an any-peer rule) decides
whole rows at once (the first such rule of an L4 class is that row's answer unless an earlier rule
matches); every other rule, from the last to the first, writes its peer classes x its L4 classes, cut to
the rows whose full-row answer comes after it. Cost: O(cells + sum over those rules of their cells),
~0.04 s for the max policy (0.5 M painted cells, docs/benchmarks.md). Overlapping rules over many classes
paint far more (2000 rules of one broad peer list over 2048 x 2048 classes: 8 G writes, ~27 s), so past
XM_PAINT_MAX painted cells there is no table either: the compile stays bounded, the datapath scans. A
re-apply that keeps the peer axis recomputes only the rows of L4 classes whose bitmap changed or is new
(memo of the last table).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hostwall.bpf import layout as L


def _lowest(words: np.ndarray) -> np.ndarray:
    """Per row of (n, WORDS) u64 bitmaps: the index of its lowest set bit, WORDS * 64 when it has none."""
    nz = words != 0
    w = nz.argmax(axis=1)
    v = words[np.arange(len(words)), w]
    has = nz.any(axis=1)
    out = np.full(len(words), words.shape[1] * 64, np.int64)
    low = v[has] & (~v[has] + np.uint64(1))                 # a power of two: log2 is exact in float64
    out[has] = w[has] * 64 + np.log2(low.astype(np.float64)).astype(np.int64)
    return out


_DIRECT_ROWS = 8      # up to this many L4 rows: ~1.5 MB of ANDs per row of 3000 peer classes, no paint loop
# cells the painting may write (~4 ns each): 4 x the cap, ~0.25 s; the max policy paints 0.5 M
XM_PAINT_MAX = 4 * L.XM_CELLS_MAX


def first_match_rows(peer_words: np.ndarray, l4_words: np.ndarray) -> np.ndarray | None:
    """(len(l4_words), len(peer_words)) u16: first matching rule's order + 1 per (L4 class, peer class),
    0 for none. Exactly the lowest set bit of the two bitmaps' AND (tests/unit/test_xmatch.py). Memory:
    the table and one transposed copy of the peer bitmaps (no per-rule bit matrix). None when painting
    would write more than XM_PAINT_MAX cells (then no table: the scan)."""
    if len(l4_words) <= _DIRECT_ROWS:                 # a few rows (incremental apply): AND them directly
        ands = l4_words[:, None, :] & peer_words[None, :, :]
        low = _lowest(ands.reshape(-1, peer_words.shape[1])).reshape(len(l4_words), len(peer_words))
        return np.where(low < peer_words.shape[1] * 64, low + 1, 0).astype(np.uint16)
    nbits = peer_words.shape[1] * 64
    full = np.bitwise_and.reduce(peer_words, axis=0)                  # rules in every peer class
    first = _lowest(l4_words & full)                                   # first such rule per row
    out = np.repeat(np.where(first < nbits, first + 1, 0).astype(np.uint16)[:, None], len(peer_words), axis=1)
    some = np.bitwise_or.reduce(peer_words, axis=0) & np.bitwise_or.reduce(l4_words, axis=0) & ~full
    partial = np.flatnonzero(np.unpackbits(some.view(np.uint8), bitorder="little"))
    pt, lt = np.ascontiguousarray(peer_words.T), np.ascontiguousarray(l4_words.T)
    one, budget = np.uint64(1), XM_PAINT_MAX
    for r in partial[::-1].tolist():                   # last rule first: earlier rules overwrite
        w, b = r >> 6, np.uint64(r & 63)
        rows = np.flatnonzero(((lt[w] >> b) & one).astype(bool) & (first > r))
        if len(rows):
            cols = np.flatnonzero((pt[w] >> b) & one)
            budget -= len(rows) * len(cols)
            if budget < 0:
                return None
            out[np.ix_(rows, cols)] = r + 1
    return out


@dataclass
class _Last:
    peer: np.ndarray           # the peer bitmaps object (the memoised peer axis: compared by identity)
    l4: np.ndarray             # a copy of the L4 bitmaps the table was computed for
    rows: np.ndarray           # (L4 classes, peer classes) u16
    packed: np.ndarray         # hw_xm_elem, read-only


_LAST: list[_Last] = []


def clear_memo() -> None:
    _LAST.clear()


def table(peer_bitmaps: np.ndarray, l4_bitmaps: np.ndarray) -> tuple[np.ndarray | None, int]:
    """(hw_xm_elem records, stride) of one generation, or (None, 0) when the product of the class counts
    exceeds XM_CELLS_MAX or painting exceeds XM_PAINT_MAX (the datapath then scans). Reuses the last table's rows when the peer axis is the
    same object: only L4 classes whose bitmap changed or is new are recomputed (incremental apply)."""
    npeer, nl4 = len(peer_bitmaps), len(l4_bitmaps)
    if npeer == 0 or npeer * nl4 > L.XM_CELLS_MAX:
        return None, 0
    last = _LAST[0] if _LAST else None
    if last is not None and last.peer is peer_bitmaps:
        k = min(nl4, len(last.l4))
        stale = np.flatnonzero((_u64(last.l4[:k]) != _u64(l4_bitmaps[:k])).any(axis=1))
        todo = np.concatenate([stale, np.arange(k, nl4)])
        if not len(todo) and nl4 == len(last.l4):
            return last.packed, npeer
        fresh = first_match_rows(peer_bitmaps["words"], l4_bitmaps["words"][todo]) if len(todo) else None
        if len(todo) and fresh is None:
            return None, 0
        rows = np.zeros((nl4, npeer), np.uint16)
        rows[:k] = last.rows[:k]
        if fresh is not None:
            rows[todo] = fresh
    else:
        rows = first_match_rows(peer_bitmaps["words"], l4_bitmaps["words"])
        if rows is None:
            return None, 0
    packed = _pack(rows)
    _LAST[:] = [_Last(peer_bitmaps, l4_bitmaps.copy(), rows, packed)]
    return packed, npeer


def _u64(recs: np.ndarray) -> np.ndarray:
    """hw_class records as rows of u64 (one compare per word)."""
    return np.ascontiguousarray(recs).view(np.uint64).reshape(len(recs), -1)


def _pack(rows: np.ndarray) -> np.ndarray:
    """Row-major cells into hw_xm_elem records (XM_SLOTS cells each, the last one zero-padded)."""
    flat = np.zeros(-(-rows.size // L.XM_SLOTS) * L.XM_SLOTS, np.uint16)
    flat[: rows.size] = rows.reshape(-1)
    out = flat.view(L.DTYPES["hw_xm_elem"])
    out.flags.writeable = False
    return out
