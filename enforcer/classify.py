"""Generic interval classification for the compiler (enforcer/compiler.py): cut an axis into maximal
intervals that match the same rules, number the distinct rule sets (classes) and build one bitmap over
rule order per class. The algorithm and its cost are in classify()'s docstring.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hostwall.bpf import layout as L

__all__ = ["Classes", "CompileError", "classify", "refine", "sorted_unique", "start_keys"]


class CompileError(Exception):
    """The policy is valid but exceeds a datapath capacity (message says which and by how much)."""


@dataclass(frozen=True)
class Classes:
    starts: list | np.ndarray   # sorted interval starts; starts[0] == 0
    cls: np.ndarray             # class id per interval (uint32)
    bitmaps: np.ndarray         # hw_class records, one per class


# ---- generic interval classification ------------------------------------------------------------

_KEY_SEED = 0x5EED


def _class_records(rows: np.ndarray) -> np.ndarray:
    recs = np.zeros(len(rows), dtype=L.DTYPES["hw_class"])
    recs["words"][:, : rows.shape[1]] = rows
    nz = rows != 0
    weights = np.left_shift(np.uint64(1), np.arange(rows.shape[1], dtype=np.uint64))
    recs["summary"] = (nz * weights).sum(axis=1, dtype=np.uint64)
    return recs


def _merge_per_owner(own: np.ndarray, start: np.ndarray, end: np.ndarray):
    """Merge overlapping or touching [start, end) ranges of the same owner (vectorised; values < 2**40).
    Returns (own, start, end) sorted by (owner, start), the ranges of one owner disjoint."""
    o = np.lexsort((start, own))
    own, start, end = own[o], start[o], end[o]
    base = own.astype(np.uint64) << np.uint64(41)
    run = np.maximum.accumulate(base + end)
    new = np.ones(len(own), dtype=bool)
    new[1:] = (base[1:] + start[1:]) > run[:-1]
    grp = np.cumsum(new) - 1
    m_end = np.zeros(int(grp[-1]) + 1, dtype=np.uint64)
    np.maximum.at(m_end, grp, end)
    return own[new], start[new], m_end


def sorted_unique(x: np.ndarray) -> np.ndarray:
    """np.unique(x) by one sort and a neighbour mask: np.unique's hash path is slower for mostly
    distinct values (~0.2 s on a 10^5-prefix axis)."""
    u = np.sort(x)
    keep = np.ones(len(u), dtype=bool)
    keep[1:] = u[1:] != u[:-1]
    return u[keep]


def _rank_small(start: np.ndarray, end: np.ndarray, axis_end: int):
    """Elementary points (0 and every bound below axis_end, sorted, unique) and each bound's index
    among them (axis_end -> len(points))."""
    pts = sorted_unique(np.concatenate([np.zeros(1, np.uint64), start, end]))
    pts = pts[pts < np.uint64(axis_end)]
    return pts, np.searchsorted(pts, start), np.searchsorted(pts, end)


def _rank_big(start: list[int], end: list[int], axis_end: int):
    """_rank_small for Python ints beyond 64 bits (IPv6): one set, one sort, one dict over the
    distinct bounds (~1 us per bound); everything after works on the indexes."""
    vals = {0, *start, *end}
    vals.discard(axis_end)
    pts = sorted(vals)
    rank = dict(zip(pts, range(len(pts))))
    rank[axis_end] = len(pts)
    get = rank.__getitem__
    return (pts, np.fromiter(map(get, start), np.int64, count=len(start)),
            np.fromiter(map(get, end), np.int64, count=len(end)))


def classify(n_rules: int, own, start, end, any_rules: list[int], axis_end: int) -> Classes:
    """Cut [0, axis_end) into maximal intervals of equal matching-rule sets and number the sets.

    Rule own[i] matches [start[i], end[i]) (ranges may overlap and nest, also within one rule);
    any_rules match the whole axis. Result: `starts` (sorted, starts[0] == 0, no two adjacent
    intervals with the same set), `cls` (class id per interval; classes numbered by first occurrence
    along the axis, so the numbering depends on the input only) and one hw_class bitmap per class.

    Sparse algorithm, O((P + R) log(P + R) + C * R/64) for P ranges, R rules, C classes, nothing of
    size E x R for the E elementary intervals:
    1. Rank every bound among the elementary points (NumPy up to 2**40; wider axes such as IPv6 are
       ranked in Python first, after that everything works on ranks), and merge the ranges of each
       rule so that one rule's ranges are disjoint (ranges of an any-rule are dropped: it covers
       the whole axis anyway).
    2. Signature of an interval: two independent 64-bit sums, mod 2**64, of random per-rule keys
       over the rules covering it: +key at each range's start index, -key at its end index, then a
       prefix sum. any_rules would add the same keys to every interval, which changes no equality, so
       they are left out of the signature. Adjacent intervals with equal signatures are merged; one
       lexsort of the 128-bit signatures groups the intervals into classes and gives each class a
       representative (its first interval).
    3. Bitmaps from the representatives only: they are a sorted subsequence of the intervals, so
       the representatives inside range [s, e) of rule r are a contiguous run [lo, hi) found by two
       searchsorted calls; XOR bit r at lo and at hi into a (C + 1) x R/64 toggle array and
       XOR-prefix-scan it (exact, since one rule's ranges are disjoint). any_rules are OR-ed in.

    Collisions: for two different rule sets S and T, sig(S) - sig(T) is a +-1 combination of the
    keys of the rules in S ^ T (at least one), and each key is uniform on 2**64 values independent of
    the others, so one 64-bit sum collides with probability exactly 2**-64 and the pair of two
    independent sums with 2**-128. The keys come from a fixed seed but do not depend on the policy,
    so for any given policy a union bound over the at most E**2 / 2 pairs of intervals bounds the
    chance that two different sets share a class (or that adjacent ones are merged) by E**2 / 2**129:
    below 2**-90 for the 2**19 IPv4 intervals the datapath holds.
    """
    words = max(1, (n_rules + 63) // 64)
    big = axis_end > 2**40
    own = np.asarray(own, dtype=np.int64)
    if any_rules and len(own):                    # an any-rule's own ranges add nothing to its set
        rest = ~np.isin(own, np.asarray(any_rules, dtype=np.int64))
        if not rest.all():
            own = own[rest]
            start = [v for v, k in zip(start, rest.tolist()) if k] if big else np.asarray(start)[rest]
            end = [v for v, k in zip(end, rest.tolist()) if k] if big else np.asarray(end)[rest]
    if big:
        pts, s_idx, e_idx = _rank_big(list(start), list(end), axis_end)
    else:
        pts, s_idx, e_idx = _rank_small(np.asarray(start, np.uint64), np.asarray(end, np.uint64), axis_end)
    if len(own):
        own, s_idx, e_idx = _merge_per_owner(own, s_idx.astype(np.uint64), e_idx.astype(np.uint64))
        s_idx, e_idx = s_idx.astype(np.intp), e_idx.astype(np.intp)
    n = len(pts)

    # 2. signatures per elementary interval; keep the first of every run of equal ones
    keys = np.random.default_rng(_KEY_SEED).integers(0, 2**64, size=(2, max(1, n_rules)), dtype=np.uint64)
    sig = []
    for k in keys:
        d = np.zeros(n + 1, dtype=np.uint64)
        np.add.at(d, s_idx, k[own])
        np.subtract.at(d, e_idx, k[own])          # wraps mod 2**64, as the sums are meant to
        sig.append(d[:n])
    keep = (sig[0] != 0) | (sig[1] != 0)
    keep[0] = True
    first_iv = np.flatnonzero(keep)               # elementary index of each merged interval's start
    h1 = np.cumsum(sig[0])[first_iv]
    h2 = np.cumsum(sig[1])[first_iv]
    m = len(first_iv)

    # classes: group equal 128-bit signatures (stable sort: a group's first member is its first
    # occurrence), then number the groups by first occurrence
    o = np.lexsort((h2, h1))
    a1, a2 = h1[o], h2[o]
    new = np.ones(m, dtype=bool)
    new[1:] = (a1[1:] != a1[:-1]) | (a2[1:] != a2[:-1])
    grp = np.cumsum(new) - 1
    first = o[new]                                # merged-interval index of each group's first member
    by_first = np.argsort(first)
    rank = np.empty(len(first), dtype=np.int64)
    rank[by_first] = np.arange(len(first))
    cls = np.empty(m, dtype=np.uint32)
    cls[o] = rank[grp]
    n_cls = len(first)

    # 3. bitmaps: representatives (elementary index, ascending = class order) inside each range
    reps = first_iv[first[by_first]]
    rows = np.zeros((n_cls + 1) * words, dtype=np.uint64)
    if len(own):
        lo = np.searchsorted(reps, s_idx)
        hi = np.searchsorted(reps, e_idx)
        word = own >> 6
        bit = np.left_shift(np.uint64(1), (own & 63).astype(np.uint64))
        np.bitwise_xor.at(rows, lo * words + word, bit)
        np.bitwise_xor.at(rows, hi * words + word, bit)
    rows = np.bitwise_xor.accumulate(rows.reshape(n_cls + 1, words)[:n_cls], axis=0)
    for r in any_rules:
        rows[:, r // 64] |= np.uint64(1) << np.uint64(r % 64)

    starts: list | np.ndarray = [pts[i] for i in first_iv.tolist()] if isinstance(pts, list) else pts[first_iv]
    return Classes(starts=starts, cls=cls, bitmaps=_class_records(rows))


# ---- two disjoint rule groups classified apart, then combined -------------------------------------

def start_keys(c: Classes) -> np.ndarray:
    """Sortable keys of c's interval starts for refine(): the uint64 starts, or for IPv6's Python ints
    16 big-endian bytes each ("S16" compares bytewise, i.e. numerically; ~0.3 us a start)."""
    if isinstance(c.starts, list):
        return np.frombuffer(b"".join(v.to_bytes(16, "big") for v in c.starts), dtype="S16")
    return np.asarray(c.starts, np.uint64)


DENSE_CODES_PER_VALUE = 4      # first_occurrence: a table over every code while ≤ this many per value


def first_occurrence(values: np.ndarray, n_codes: int) -> tuple[np.ndarray, np.ndarray]:
    """(the distinct values in order of first occurrence, each value's index in that order) for int64
    codes in [0, n_codes). A table over every code (12 bytes each) while n_codes is small against the
    values (~3 ms for 200k), else over the distinct values only (np.unique, ~20 ms for 200k): a
    refinement of 16k x 16k classes must not cost gigabytes."""
    n = len(values)
    if n_codes <= max(DENSE_CODES_PER_VALUE * n, 1 << 16):
        first = np.full(n_codes, n, dtype=np.int64)
        np.minimum.at(first, values, np.arange(n))
        codes = np.flatnonzero(first < n)
        rep = codes[np.argsort(first[codes])]
        lut = np.empty(n_codes, dtype=np.uint32)
        lut[rep] = np.arange(len(rep), dtype=np.uint32)
        return rep, lut[values]
    u, inv = np.unique(values, return_inverse=True)
    first = np.full(len(u), n, dtype=np.int64)
    np.minimum.at(first, inv, np.arange(n))
    order = np.argsort(first)
    lut = np.empty(len(u), dtype=np.uint32)
    lut[order] = np.arange(len(u), dtype=np.uint32)
    return u[order], lut[inv]


def refine(a: Classes, a_keys: np.ndarray, a_orders: list[int], b: Classes) -> Classes:
    """classify() of the union of two disjoint rule groups, from each group's own Classes: `a` of
    rules numbered 0..len(a_orders)-1 (its rule i is rule a_orders[i] of the whole; a_keys =
    start_keys(a)), `b` of the whole numbering (the other rules and the any-rules). Exactly
    classify()'s result for all rules at once: the set of an interval is the union of its sets in a
    and in b, and two such unions differ exactly when their (a class, b class) pairs do, so the
    intervals are the common refinement with adjacent equal pairs merged, classes numbered by first
    occurrence.

    Cost: O(A + B log A) NumPy work for A and B intervals (the two sorted axes merged, no sort of
    the whole) and `first_occurrence` for numbering the P ≤ A + B pairs that occur (memory O(A + B),
    never A x B classes); used to keep a large list's classes (the blocklists) across compiles (compiler.py _with_big).
    """
    sb = start_keys(b)
    n = len(a_keys) + len(sb)
    # merge: a b start goes after an equal a start, and of a run of equal starts the last is kept,
    # where both indexes are right (starts[0] == 0 on both axes)
    is_b = np.zeros(n, dtype=bool)
    is_b[np.searchsorted(a_keys, sb, side="right") + np.arange(len(sb))] = True
    merged = np.empty(n, dtype=a_keys.dtype)
    merged[is_b], merged[~is_b] = sb, a_keys
    last = np.ones(n, dtype=bool)
    last[:-1] = merged[:-1] != merged[1:]
    ia = (np.cumsum(~is_b) - 1)[last]
    ib = (np.cumsum(is_b) - 1)[last]
    nb = len(b.bitmaps)
    pair = a.cls[ia].astype(np.int64) * nb + b.cls[ib]
    keep = np.ones(len(pair), dtype=bool)
    keep[1:] = pair[1:] != pair[:-1]
    first_iv = np.flatnonzero(keep)
    pair = pair[first_iv]
    rep, cls = first_occurrence(pair, len(a.bitmaps) * nb)
    rows = b.bitmaps["words"][rep % nb]
    a_words = a.bitmaps["words"][rep // nb]
    for j, order in enumerate(a_orders):
        bit = (a_words[:, j // 64] >> np.uint64(j % 64)) & np.uint64(1)
        rows[:, order // 64] |= bit << np.uint64(order % 64)
    at = np.flatnonzero(last)[first_iv]
    if isinstance(b.starts, list):
        vals = np.empty(n, dtype=object)
        vals[is_b], vals[~is_b] = b.starts, a.starts
        starts: list | np.ndarray = vals[at].tolist()
    else:
        starts = merged[at]
    return Classes(starts=starts, cls=cls, bitmaps=_class_records(rows))
