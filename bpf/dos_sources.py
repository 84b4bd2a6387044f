"""The DoS per-source table (hw_dos_src) from user space: an mmap'ed view of its slots.

A set-associative table like conntrack's (enforcer/slot_table.py): a source key (prefix, family,
prefix length, profile) lives in one of the HW_DOS_WAYS slots of the bucket the seeded hash of its
three 64-bit words names. The datapath inserts and evicts (counted in hw_dos_src_stats); user space
counts live sources and lifts bans in place.
"""
from __future__ import annotations

import numpy as np

from . import layout as L
from . import slot_table
from .slot_table import LIVE, SlotTable

MAP = "hw_dos_src"
SLOT_DT = L.DTYPES["hw_dos_slot"]
KEY_DT = L.DTYPES["hw_dos_key"]
WAYS = L.C["HW_DOS_WAYS"]
SLOTS = L.C["HW_DOS_SRC_MAX"]
STAT_NAMES = {L.C["HW_DSS_INSERTED"]: "inserted", L.C["HW_DSS_EVICTED"]: "evicted",
              L.C["HW_DSS_CLAIM_LOST"]: "claim_lost"}


def table(fd: int) -> SlotTable:
    """The table mapped into this process (~104 MB of address space, touched only where read)."""
    return SlotTable(fd, SLOT_DT, SLOTS)


def first_slot(keys: np.ndarray, seed: int) -> np.ndarray:
    """First slot of each key's bucket, as the datapath's dos_base computes it (hw_dos_key array)."""
    return slot_table.first_slot(np.asarray(keys, dtype=KEY_DT), seed, SLOTS, WAYS)


def find_all(t: SlotTable, key: np.void, seed: int) -> list[int]:
    """Indexes of the LIVE slots holding `key`, in way order. Usually one; two CPUs inserting the same
    new source at once can leave two, and the datapath uses the first (bpf/dos.h dos_source)."""
    first = int(first_slot(np.array([key], dtype=KEY_DT), seed)[0])
    ways = t.slots[first:first + WAYS]
    hit = np.flatnonzero((ways["slot_state"] == LIVE) & (ways["k"] == np.array(key, dtype=KEY_DT)))
    return [first + int(i) for i in hit]
