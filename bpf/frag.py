"""The fragment tables (hw_frag4, hw_frag6) from user space: mmap'ed views, counters and pressure.

A later IP fragment passes only if the first fragment of its datagram passed (bpf/frag.h,
docs/datapath.md "Fragments"): the datapath notes each passed first fragment in a set-associative
table like conntrack's (bpf/slot_table.py) and counts what became of inserts and later fragments in
hw_frag_stats. Entries expire HW_FRAG_TIMEOUT_NS after their first fragment; nobody frees them (a
new datagram takes an expired slot first), so the fill that matters is of entries still live.
"""
from __future__ import annotations

import time

import numpy as np

from . import layout as L
from . import slot_table
from .slot_table import LIVE, SlotTable

MAPS = {4: "hw_frag4", 6: "hw_frag6"}
STATS_MAP = "hw_frag_stats"
SLOT_DT = {4: L.DTYPES["hw_frag4_slot"], 6: L.DTYPES["hw_frag6_slot"]}
KEY_DT = {4: L.DTYPES["hw_frag4_key"], 6: L.DTYPES["hw_frag6_key"]}
SLOTS = L.FRAG_MAX
WAYS = L.FRAG_WAYS
TIMEOUT_NS = L.C["HW_FRAG_TIMEOUT_NS"]


def table(fd: int, family: int) -> SlotTable:
    """One family's table mapped into this process (~0.8 / 1.2 MB). Close before the fd."""
    return SlotTable(fd, SLOT_DT[family], SLOTS, ("e", "slot_state"))


def live_count(map_fds: dict[str, int], now_ns: int | None = None) -> dict[int, int]:
    """Per family: entries that still serve later fragments (LIVE and younger than the timeout).
    now_ns: the datapath's clock (default CLOCK_MONOTONIC, which it follows within a tick or two)."""
    now = time.monotonic_ns() if now_ns is None else now_ns
    out = {}
    for fam, name in MAPS.items():
        with table(map_fds[name], fam) as t:
            e = t.slots["e"]
            age = (np.uint64(now) - e["created_ns"]).astype(np.int64)
            out[fam] = int(np.count_nonzero((e["slot_state"] == LIVE) & (age <= TIMEOUT_NS)))
    return out


def clear(map_fds: dict[str, int]) -> None:
    """Forget every noted datagram (tests, benchmarks): their later fragments become unmatched."""
    for fam, name in MAPS.items():
        with table(map_fds[name], fam) as t:
            t.clear()


def first_slot(keys: np.ndarray, family: int, seed: int) -> np.ndarray:
    """First slot of each key's bucket, as the datapath's frag.h computes it (tbl_first_slot)."""
    return slot_table.first_slot(np.asarray(keys, dtype=KEY_DT[family]), seed, SLOTS, WAYS)
