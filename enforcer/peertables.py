"""The peer lookup tables of one generation: the sorted elementary intervals (hw_iv4 / hw_iv6), the DIR-16
table of each top-16-bit bucket's interval range (hw_top4 / hw_top6), and for dense buckets a second level
(hw_sub4 / hw_sub6) that narrows that range by the next address bits (docs/datapath.md "Classification").

The datapath reads the bucket's entry, in a dense bucket one sub-table entry more, then binary-searches the
range: a bucket of 3669 intervals costs 12 search steps, its sub-table range ~2.
"""
from __future__ import annotations

import numpy as np

from hostwall.bpf import layout as L

from .classify import Classes

SUB_MIN = 16        # a bucket with more intervals than this gets sub-table entries (while they fit)
SUB_TARGET = 4      # ... 2^stride of them, stride the least giving at most this many intervals per entry on average
_FLAG = L.C["HW_SUB_FLAG"]
_SHIFT_POS = L.C["HW_SUB_SHIFT_POS"]


def top_table(starts_top16: np.ndarray, exact_at_bucket: np.ndarray) -> np.ndarray:
    """DIR-16 first/last interval per top-16-bit bucket. starts_top16: top 16 bits of each interval
    start (non-decreasing); exact_at_bucket[i]: start i is exactly the first address of its bucket.
    The starts before / up to each bucket are counts: one bincount and a prefix sum (~0.3 ms for the
    max policy's 110k IPv4 starts; two searchsorted calls of 65536 keys cost ~5 ms)."""
    k = np.arange(L.TOP_SIZE)
    counts = np.bincount(starts_top16, minlength=L.TOP_SIZE)
    if len(counts) != L.TOP_SIZE:
        raise ValueError("top_table: a start's top 16 bits exceed the table")
    le = np.cumsum(counts)          # = np.searchsorted(starts_top16, k, side="right")
    lt = le - counts                # = np.searchsorted(starts_top16, k, side="left")
    at = np.zeros(L.TOP_SIZE, dtype=bool)
    hit = lt < len(starts_top16)
    at[hit] = exact_at_bucket[lt[hit]] & (starts_top16[lt[hit]] == k[hit])
    top = np.zeros(L.TOP_SIZE, dtype=L.DTYPES["hw_top"])
    top["first"] = lt - 1 + at
    top["last"] = le - 1
    return top


def sub_table(top: np.ndarray, keys: np.ndarray, exact: np.ndarray, below: int) -> np.ndarray:
    """hw_sub4/6 of one generation; marks the dense buckets of `top` in place (first = HW_SUB_FLAG |
    (16 - stride) << 24 | offset). keys: the interval starts' leading 64 bits or fewer (non-decreasing),
    `below` bits below the 16 address bits after the top 16 (v4: the start itself, 0; v6: its high
    word, 32); exact[i]: start i has no bits set below its key. Buckets densest first, while HW_SUB_SIZE
    entries last (the rest keep the plain search). Cost: one searchsorted per dense bucket (110 of ~90
    entries on average for the max policy: ~1 ms)."""
    sub = np.zeros(L.SUB_SIZE, dtype=L.DTYPES["hw_top"])
    count = top["last"].astype(np.int64) - top["first"] + 1
    at = 0
    dense = np.flatnonzero(count > SUB_MIN)
    for b in dense[np.argsort(-count[dense], kind="stable")].tolist():
        stride = min(16, max(1, int(np.ceil(np.log2(count[b] / SUB_TARGET)))))
        if at + (1 << stride) > L.SUB_SIZE:
            continue
        bounds = ((b << 16) + (np.arange((1 << stride) + 1, dtype=np.uint64) << np.uint64(16 - stride))) << np.uint64(below)
        lt = np.searchsorted(keys, bounds, side="left")
        hit = lt[:-1] < len(keys)
        first = lt[:-1] - 1
        first[hit] += exact[lt[:-1][hit]] & (keys[lt[:-1][hit]] == bounds[:-1][hit])
        sub["first"][at: at + (1 << stride)] = first
        sub["last"][at: at + (1 << stride)] = lt[1:] - 1
        sub["last"][at + (1 << stride) - 1] = top["last"][b]         # the bucket's end (no bound past 2^32)
        top["first"][b] = _FLAG | (16 - stride) << _SHIFT_POS | at
        at += 1 << stride
    return sub


def v4_tables(c: Classes, cls_offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hw_top4, hw_sub4, hw_iv4) of the IPv4 classes `c`, class ids from cls_offset."""
    starts = np.asarray(c.starts, dtype=np.uint64)
    iv = np.zeros(len(starts), dtype=L.DTYPES["hw_iv4"])
    iv["start"] = starts
    iv["cls"] = c.cls + cls_offset
    top = top_table((starts >> np.uint64(16)).astype(np.int64), (starts & np.uint64(0xFFFF)) == 0)
    return top, sub_table(top, starts, np.ones(len(starts), dtype=bool), 0), iv


def v6_tables(c: Classes, cls_offset: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(hw_top6, hw_sub6, hw_iv6) of the IPv6 classes `c`, class ids from cls_offset."""
    starts = c.starts
    iv = np.zeros(len(starts), dtype=L.DTYPES["hw_iv6"])
    # each start as 16 big-endian bytes, split into two words: one Python step a start, not two
    words = np.frombuffer(b"".join([s.to_bytes(16, "big") for s in starts]), dtype=">u8").reshape(-1, 2)
    iv["hi"] = words[:, 0]
    iv["lo"] = words[:, 1]
    iv["cls"] = c.cls + cls_offset
    top16 = (iv["hi"] >> np.uint64(48)).astype(np.int64)
    top = top_table(top16, ((iv["hi"] & np.uint64(2**48 - 1)) == 0) & (iv["lo"] == 0))
    return top, sub_table(top, np.ascontiguousarray(iv["hi"]), iv["lo"] == 0, 32), iv
