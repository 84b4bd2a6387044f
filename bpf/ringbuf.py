"""Consumer of a pinned BPF ring buffer (BPF_MAP_TYPE_RINGBUF) without BCC or libbpf.

Memory layout (kernel/bpf/ringbuf.c), as this process maps it from the map fd:

    offset 0         consumer page, read-write, one page: u64 consumer_pos at byte 0
    offset PAGE      producer page, read-only: u64 producer_pos at byte 0
    offset 2*PAGE    data area of `size` bytes, mapped TWICE back to back, so a record that wraps
                     around the end is still contiguous in our view (records never need stitching)

A record is an 8-byte header `u32 len | u32 pgoff` followed by `len` bytes, padded to 8 bytes.
`len` bit 31 (BUSY) means reserved but not yet committed; bit 30 (DISCARD) means the producer threw
it away. Positions are free-running byte counters; `pos & (size - 1)` is the offset in the data area.

Protocol (same as libbpf's ringbuf_process_ring): read producer_pos, walk from consumer_pos, stop at
the first BUSY record (order is preserved: nothing behind it is consumed), skip DISCARD records,
then store consumer_pos; then read producer_pos again, until nothing new arrived. On x86-64 (TSO)
plain aligned 8-byte loads/stores are acquire/release; that is the platform bpfsys supports.

Acknowledged consumption (`read(commit=False)` + `commit(pos)`, docs/collector.md "Delivery and
loss"): the walk may run ahead of consumer_pos on a private read position, and consumer_pos moves only
when the caller commits a position it has read up to. Until then the kernel keeps those records (they
count against the ring's space, so a consumer that never commits back-pressures the producer, which
counts `ringbuf_full`), and because the ring is a pinned map that outlives this process, a consumer
killed at any instant leaves every uncommitted record for the next one. Invariant:
consumer_pos <= read position <= producer_pos; commit() never moves consumer_pos backwards.

Batch decode: hostwall records are fixed size (struct hw_event), so a run of committed records is a
strided array. `read()` views up to N record slots at once as a NumPy structured array, checks every
length in one vector compare, and copies the good prefix out with one strided copy. Python work is
O(1) per batch plus O(1) per irregular record (busy, discarded, wrong length); the copy is ~memcpy.
Records whose length differs from the record size are skipped and counted as decode errors
("length"), never silently dropped. Events with an unknown type or family are counted too.

Wake-up: the ring buffer map fd supports poll (readable while data is available). `wait()` arms a
one-shot `loop.add_reader` on it: no busy polling, no thread. The kernel signals only when the
consumer has caught up (adaptive wake-up), which is exactly when we sleep; level-triggered readiness
covers the case where we stopped early. Backlog (`available_bytes`) is producer_pos - consumer_pos,
like cilium/ebpf's Reader.AvailableBytes. While records are read but not committed, the map fd is
always readable (poll compares producer_pos with consumer_pos), so `wait()` then sleeps in short steps
(WAIT_STEP_S) instead of polling.
"""
from __future__ import annotations

import asyncio
import mmap
import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from . import bpfsys
from . import layout as L

MAP_TYPE_RINGBUF = 27
HDR_SIZE = 8
BUSY_BIT = 1 << 31
DISCARD_BIT = 1 << 30
PAGE = mmap.PAGESIZE

EVENT_DTYPE: np.dtype = L.DTYPES["hw_event"]
KNOWN_TYPES = np.array(sorted(L.EVENT_TYPE_NAMES), dtype=np.uint8)
DEFAULT_BATCH = 65536
WAIT_STEP_S = 0.005          # wait() step while read-but-uncommitted records make poll useless


def slot_size(record_size: int) -> int:
    """Bytes a committed record of `record_size` occupies in the ring (header + data, 8-aligned)."""
    return (record_size + HDR_SIZE + 7) & ~7


@dataclass
class Batch:
    """What one `read()` consumed. `records` is a contiguous copy (safe after the ring moves on)."""
    records: np.ndarray
    errors: Counter = field(default_factory=Counter)   # decode errors by reason, in records
    discarded: int = 0                                 # records the producer discarded (not loss)
    consumed_bytes: int = 0
    end_pos: int = 0                                   # ring position after the last record read

    @property
    def read(self) -> int:
        """Records taken off the ring: decoded + decode errors."""
        return len(self.records) + sum(self.errors.values())


def check_events(records: np.ndarray) -> tuple[np.ndarray, Counter]:
    """Keep hw_event records with a known type and family (4 or 6); count the others by reason.

    Cost: two vector compares; a copy only when something is rejected."""
    errors: Counter = Counter()
    if not len(records):
        return records, errors
    good_type = np.isin(records["type"], KNOWN_TYPES)
    good_fam = (records["family"] == 4) | (records["family"] == 6)
    ok = good_type & good_fam
    if ok.all():
        return records, errors
    if n := int((~good_type).sum()):
        errors["unknown_type"] += n
    if n := int((good_type & ~good_fam).sum()):
        errors["bad_family"] += n
    return records[ok], errors


class RingWalker:
    """The record walk over any buffers laid out like a mapped BPF ring buffer (tests use bytearrays).

    consumer: writable buffer whose first 8 bytes are consumer_pos; producer: buffer whose first 8
    bytes are producer_pos; data: 2 * size bytes (the double mapping), size a power of two."""

    def __init__(self, consumer, producer, data, size: int, record_dtype: np.dtype = EVENT_DTYPE,
                 validate=None):
        if size <= 0 or size & (size - 1):
            raise ValueError(f"ring size {size} is not a power of two")
        self.size = size
        self._mask = size - 1
        self._cons = np.frombuffer(consumer, dtype=np.uint64, count=1)
        self._prod = np.frombuffer(producer, dtype=np.uint64, count=1)
        self._data = np.frombuffer(data, dtype=np.uint8, count=2 * size)
        self._hdr = self._data.view(np.uint32)
        self.record_dtype = np.dtype(record_dtype)
        self.record_size = self.record_dtype.itemsize
        self.stride = slot_size(self.record_size)
        self._slot_dt = np.dtype({"names": ["len", "rec"], "formats": ["<u4", self.record_dtype],
                                  "offsets": [0, HDR_SIZE], "itemsize": self.stride})
        self._validate = validate
        self._read_pos: int | None = None     # ahead of consumer_pos while reads are uncommitted

    # ---- positions -------------------------------------------------------------------------------
    @property
    def consumer_pos(self) -> int:
        return int(self._cons[0])

    @property
    def producer_pos(self) -> int:
        return int(self._prod[0])

    @property
    def read_pos(self) -> int:
        """Where the next read() starts: consumer_pos, or further when reads are not committed yet."""
        cons = int(self._cons[0])
        return cons if self._read_pos is None or self._read_pos < cons else self._read_pos

    def available_bytes(self) -> int:
        """Backlog as the kernel sees it: bytes not consumed yet, read or not (0 <= n <= size)."""
        return int(self._prod[0]) - int(self._cons[0])

    def unread_bytes(self) -> int:
        """Bytes not read yet (the part of the backlog a read() would see)."""
        return int(self._prod[0]) - self.read_pos

    def uncommitted_bytes(self) -> int:
        """Bytes read but not committed: the kernel still holds them for us."""
        return self.read_pos - int(self._cons[0])

    def commit(self, pos: int) -> None:
        """Release everything before ring position `pos` to the producer. `pos` must be a position a
        read() ended at (Batch.end_pos); positions behind consumer_pos are ignored (never backwards)."""
        if pos > self.read_pos:
            raise ValueError(f"commit to {pos} beyond the read position {self.read_pos}")
        if pos > int(self._cons[0]):
            self._cons[0] = pos              # release store (x86-64 TSO)

    def rewind(self) -> None:
        """Forget uncommitted reads: the next read() starts at consumer_pos again."""
        self._read_pos = None

    def pending_records(self) -> int:
        """Committed records between consumer_pos and producer_pos, whatever their size (a ring of another
        build's record layout too): a walk of the kernel's record headers, discarded ones skipped, up to
        the first busy one. Reads only; cost: one header read per record."""
        pos, prod, n = int(self._cons[0]), int(self._prod[0]), 0
        while pos < prod:
            hdr = int(self._hdr[(pos & self._mask) >> 2])
            if hdr & BUSY_BIT:
                break
            n += not hdr & DISCARD_BIT
            pos += slot_size(hdr & ~(BUSY_BIT | DISCARD_BIT))
        return n

    # ---- reading ---------------------------------------------------------------------------------
    def read(self, max_records: int = DEFAULT_BATCH, *, commit: bool = True) -> Batch:
        """Read up to `max_records` committed records; never blocks. commit=True releases them at once
        (consumer_pos moves); commit=False only moves the private read position (see `commit()`).
        See the module docstring."""
        chunks: list[np.ndarray] = []
        errors: Counter = Counter()
        discarded = 0
        start = cons = self.read_pos
        n = 0
        busy = False
        while n < max_records and not busy:
            prod = int(self._prod[0])
            if cons >= prod:
                break
            while cons < prod and n < max_records:
                k = min((prod - cons) // self.stride, max_records - n)
                off = cons & self._mask
                if k:
                    good = self._take_run(off, k, chunks)
                    n += good
                    cons += good * self.stride
                    if good == k:
                        continue
                hdr = int(self._hdr[(cons & self._mask) >> 2])
                if hdr & BUSY_BIT:
                    busy = True
                    break
                length = hdr & ~(BUSY_BIT | DISCARD_BIT)
                if hdr & DISCARD_BIT:
                    discarded += 1
                else:
                    errors["length"] += 1
                    n += 1
                cons += slot_size(length)
            if commit:
                self._cons[0] = cons         # release: the producer may reuse the space
                self._read_pos = None
            else:
                self._read_pos = cons
        records = _concat(chunks, self.record_dtype)
        if self._validate is not None:
            records, bad = self._validate(records)
            errors.update(bad)
        return Batch(records, errors, discarded, cons - start, cons)

    def _take_run(self, off: int, k: int, out: list[np.ndarray]) -> int:
        """Copy the longest prefix of the next k slots whose length is exactly the record size."""
        slots = np.ndarray((k,), dtype=self._slot_dt, buffer=self._data, offset=off)
        lens = slots["len"]
        bad = np.flatnonzero(lens != self.record_size)
        good = int(bad[0]) if bad.size else k
        if good:
            out.append(slots["rec"][:good].copy())
        return good


def _concat(chunks: list[np.ndarray], dtype: np.dtype) -> np.ndarray:
    if not chunks:
        return np.empty(0, dtype=dtype)
    return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)


class RingBuffer(RingWalker):
    """A pinned ring buffer map, mmap'ed into this process. Owns the fd and the mappings."""

    def __init__(self, fd: int, record_dtype: np.dtype = EVENT_DTYPE, validate=check_events):
        info = bpfsys.map_info(fd)
        if info.type != MAP_TYPE_RINGBUF:
            raise ValueError(f"map {info.name!r} is type {info.type}, not a ring buffer ({MAP_TYPE_RINGBUF})")
        size = info.max_entries
        self._fd = fd
        self._cons_mm = mmap.mmap(fd, PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod_mm = mmap.mmap(fd, PAGE + 2 * size, mmap.MAP_SHARED, mmap.PROT_READ, offset=PAGE)
        data = memoryview(self._prod_mm)[PAGE:]
        super().__init__(self._cons_mm, self._prod_mm, data, size, record_dtype, validate)
        self._data_mv = data

    @classmethod
    def open(cls, path: str | os.PathLike, **kw) -> RingBuffer:
        """Open the ring buffer pinned at `path` (e.g. <pin_dir>/maps/hw_events)."""
        return cls(bpfsys.obj_get(os.fspath(path)), **kw)

    def fileno(self) -> int:
        return self._fd

    async def wait(self, timeout: float | None = None) -> bool:
        """Sleep until the kernel reports data (poll on the map fd) or `timeout` s; True if data.

        One-shot reader: registered only while sleeping, so a backlog we leave unread on purpose
        (back-pressure) never spins the event loop. With read-but-uncommitted records the fd is always
        readable: then it checks every WAIT_STEP_S instead (no busy loop either)."""
        if self.unread_bytes() > 0:
            return True
        loop = asyncio.get_running_loop()
        if self.uncommitted_bytes() > 0:
            end = None if timeout is None else loop.time() + timeout
            while self.unread_bytes() <= 0 and self.uncommitted_bytes() > 0:
                left = WAIT_STEP_S if end is None else min(WAIT_STEP_S, end - loop.time())
                if left <= 0:
                    return False
                await asyncio.sleep(left)
            if self.unread_bytes() > 0:
                return True
            timeout = None if end is None else max(0.0, end - loop.time())
        fut = loop.create_future()
        loop.add_reader(self._fd, lambda: fut.done() or fut.set_result(None))
        try:
            async with asyncio.timeout(timeout):
                await fut
        except TimeoutError:
            pass
        finally:
            loop.remove_reader(self._fd)
        return self.unread_bytes() > 0

    def close(self) -> None:
        """Drop the views, unmap, close the fd. Idempotent."""
        if self._fd < 0:
            return
        self._cons = self._prod = self._data = self._hdr = None     # release buffer exports
        self._data_mv.release()
        self._cons_mm.close()
        self._prod_mm.close()
        os.close(self._fd)
        self._fd = -1

    def __enter__(self) -> RingBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
