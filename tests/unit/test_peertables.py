"""enforcer/peertables.py: the peer lookup the datapath makes (top-16 bucket, a dense bucket's sub-table entry,
bounded binary search; bpf/classify.h peer_class4/6), done here over the compiled tables, must find the
interval holding every address: at every sub-table boundary of a dense bucket, on both sides of it, and at
every interval start. The dense buckets' ranges must be short (docs/datapath.md "Classification")."""
from __future__ import annotations

import bisect

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.enforcer import peertables as PT
from hostwall.enforcer.classify import Classes

FLAG, MASK, POS = L.C["HW_SUB_FLAG"], L.C["HW_SUB_OFF_MASK"], L.C["HW_SUB_SHIFT_POS"]


def lookup(top, sub, starts: list[int], addr: int, bits: int) -> tuple[int, int]:
    """(interval index, length of the searched range) as bpf/classify.h finds them; bits: 32 or 128."""
    lo, hi = int(top[addr >> (bits - 16)]["first"]), int(top[addr >> (bits - 16)]["last"])
    if lo & FLAG:
        next16 = (addr >> (bits - 32)) & 0xFFFF
        e = sub[((lo & MASK) + (next16 >> ((lo >> POS) & 15))) & (len(sub) - 1)]
        lo, hi = int(e["first"]), int(e["last"])
    span = hi - lo + 1
    for _ in range(L.C["HW_SEARCH_STEPS"]):
        if lo >= hi:
            break
        mid = lo + ((hi - lo + 1) >> 1)
        if starts[mid] <= addr:
            lo = mid
        else:
            hi = mid - 1
    return lo, span


def tables(starts: list[int], bits: int):
    c = Classes(starts if bits == 128 else np.asarray(starts, np.uint64), np.arange(len(starts), dtype=np.uint32),
                np.zeros(0))
    return (PT.v6_tables if bits == 128 else PT.v4_tables)(c, 0)


def probes(top, starts: list[int], bits: int) -> set[int]:
    """Every start and its predecessor, and both sides of every sub-table boundary of every dense bucket."""
    out = {s for s in starts} | {s - 1 for s in starts if s}
    for b in np.flatnonzero(top["first"] & FLAG).tolist():
        stride = 16 - ((int(top["first"][b]) >> POS) & 15)
        for j in range(1 << stride):
            at = ((b << 16) | (j << (16 - stride))) << (bits - 32)
            out |= {at, at - 1, at + 1} if at else {at, at + 1}
        out.add(((b + 1) << (bits - 16)) - 1)
    return out


def check(starts: list[int], bits: int, extra: list[int]) -> tuple[np.ndarray, list[int]]:
    top, sub, _ = tables(starts, bits)
    spans = []
    for a in sorted(probes(top, starts, bits) | set(extra)):
        got, span = lookup(top, sub, starts, a, bits)
        assert got == bisect.bisect_right(starts, a) - 1, hex(a)
        spans.append(span)
    return top, spans


def clustered(draw, bits: int) -> list[int]:
    """Sorted unique starts from 0: a few buckets dense with starts, some spread over the axis."""
    pts = {0}
    for b in draw(st.lists(st.integers(0, 0xFFFF), max_size=3)):
        n = draw(st.integers(0, 400))
        low = draw(st.lists(st.integers(0, 2 ** (bits - 16) - 1), min_size=n, max_size=n))
        pts |= {(b << (bits - 16)) | x for x in low}
    pts |= set(draw(st.lists(st.integers(0, 2 ** bits - 1), max_size=50)))
    return sorted(pts)


@settings(max_examples=60, deadline=None)
@given(st.data(), st.sampled_from([32, 128]))
def test_lookup_finds_every_address(data, bits):
    starts = clustered(data.draw, bits)
    check(starts, bits, data.draw(st.lists(st.integers(0, 2 ** bits - 1), max_size=50)))


def test_dense_buckets_search_a_few_intervals():
    """A /16 of 3669 intervals (the bench probe's bucket) and an IPv6 top-16 bucket of 10623: every sub-table
    entry's range holds a few intervals (SUB_TARGET on average), not the bucket's thousands; sub-table
    bounds exactly at a start (v6: with and without low bits) are found."""
    rnd = np.random.default_rng(3)
    for bits, bucket, n in ((32, 0xC612, 3669), (128, 0x2001, 10623)):
        low = rnd.integers(0, 2**63, size=n, dtype=np.uint64).tolist()
        pts = {(bucket << (bits - 16)) | (x >> (79 - bits) if bits == 32 else x << 49 | x) for x in low}
        at = (bucket << (bits - 16)) | (5 << (bits - 24))           # a start at a sub bound (and just past it)
        starts = sorted({0, at, at + 1} | pts)
        top, spans = check(starts, bits, [])
        assert top["first"][bucket] & FLAG
        assert np.mean(spans) <= 2 * PT.SUB_TARGET and max(spans) <= 8 * PT.SUB_TARGET, (np.mean(spans), max(spans))


def test_buckets_past_the_sub_table_keep_the_plain_search(monkeypatch):
    """More dense buckets than HW_SUB_SIZE entries hold: the densest get entries (64 for ~200 intervals),
    the others are searched whole, and every lookup is still right."""
    monkeypatch.setattr(L, "SUB_SIZE", 64)
    rnd = np.random.default_rng(5)
    starts = sorted({0} | {(b << 16) | int(x) for b, n in ((7, 200), (9, 100), (11, 40))
                           for x in rnd.integers(0, 65536, size=n)})
    top, _ = check(starts, 32, [])
    assert [bool(top["first"][b] & FLAG) for b in (7, 9, 11)] == [True, False, False]
