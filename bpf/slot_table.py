"""Set-associative kernel tables (conntrack hw_ct4/hw_ct6, DoS sources hw_dos_src) from user space.

The datapath keeps these tables in BPF_F_MMAPABLE arrays rather than BPF hash maps, because array
lookups are inlined where a hash-map lookup is a helper call (bpf/hostwall.h, docs/datapath.md): a key
lives in one of the `ways` consecutive slots of the bucket its seeded hash names, and each slot has a
slot_state FREE → BUSY → LIVE. Here they are mmap'ed NumPy views: reads touch no syscall, a slot is
freed with one aligned store, and `first_slot` is the user-space twin of the kernel's hash.
"""
from __future__ import annotations

import mmap

import numpy as np

from . import bpfsys
from . import layout as L

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


def first_slot(keys: np.ndarray, seed: int, slots: int, ways: int) -> np.ndarray:
    """First slot of each key's bucket, as the kernel's tbl_first_slot computes it: a seeded
    multiply-xorshift over the key's 64-bit words (keys: a structured array of a key struct whose
    size is a multiple of 8, pad bytes zero)."""
    words = np.frombuffer(np.ascontiguousarray(keys).tobytes(), dtype="<u8").reshape(len(keys), -1)
    h = np.full(len(keys), seed & _M64, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(words.shape[1]):
            h = (h ^ words[:, i]) * np.uint64(_K)
            h ^= h >> np.uint64(29)
    return ((h >> np.uint64(32)).astype(np.uint32) & np.uint32(slots // ways - 1)).astype(np.int64) * ways
