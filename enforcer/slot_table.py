"""Set-associative kernel tables (conntrack hw_ct4/hw_ct6, DoS sources hw_dos_src) from user space.

The datapath keeps these tables in BPF_F_MMAPABLE arrays rather than BPF hash maps, because array
lookups are inlined where a hash-map lookup is a helper call (bpf/hostwall.h, docs/datapath.md): a key
lives in one of the `ways` consecutive slots of the bucket its seeded hash names, and each slot has a
slot_state FREE → BUSY → LIVE. Here they are mmap'ed NumPy views: reads touch no syscall, a slot is
freed with one aligned store, and `bucket_first_slot` is the user-space twin of the kernel's hash.
"""
from __future__ import annotations

import mmap

import numpy as np

from . import layout as L
from ._internal import bpfsys

FREE, BUSY, LIVE = L.C["HW_SLOT_FREE"], L.C["HW_SLOT_BUSY"], L.C["HW_SLOT_LIVE"]
_K = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


class SlotTable:
    """One table mapped into this process: `slots` is a writable structured view of every slot;
    `state_path` names the slot_state field (nested fields as a path). Close before the fd."""

    def __init__(self, fd: int, dtype: np.dtype, count: int, state_path: tuple[str, ...] = ("slot_state",)):
        self._mm: mmap.mmap | None = bpfsys.mmap_array(fd)
        self.slots = np.frombuffer(self._mm, dtype=dtype, count=count)
        self._state_path = state_path

    def state(self) -> np.ndarray:
        a = self.slots
        for f in self._state_path:
            a = a[f]
        return a

    def live(self) -> np.ndarray:
        """Indexes of LIVE slots: one vectorised pass over the table."""
        return np.flatnonzero(self.state() == LIVE)

    def clear(self) -> None:
        self.slots[...] = np.zeros(1, dtype=self.slots.dtype)

    def close(self) -> None:
        self.slots = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:         # a caller still holds a view; the mapping goes with it
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def mix(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """One step of the kernel's ct_mix: (h ^ w) * K, then h ^= h >> 29 (uint64, wrapping)."""
    with np.errstate(over="ignore"):
        h = (h ^ w.astype(np.uint64)) * np.uint64(_K)
    return h ^ (h >> np.uint64(29))


def bucket_first_slot(h: np.ndarray, buckets: int, ways: int) -> np.ndarray:
    """Index of a bucket's first slot from the final hash, as the kernel computes it."""
    return ((h >> np.uint64(32)).astype(np.uint32) & np.uint32(buckets - 1)).astype(np.int64) * ways


def seeded(n: int, seed: int) -> np.ndarray:
    return np.full(n, seed & _M64, dtype=np.uint64)
