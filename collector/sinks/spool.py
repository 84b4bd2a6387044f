"""A bounded, crash-safe, in-order on-disk spool: the Kafka sink's buffer while the broker is down or slow.

Layout and framing: collector/sinks/spool_format.py (segments named by their first record's sequence
number, CRC-framed records, a cursor file with the replay progress and how far appends had reached).

Invariants
- Append-only and in order: seqs grow by one per record across segments; read() returns them in order.
- A record is reported acknowledged only through `ack()`; the cursor moves over contiguous acknowledged
  seqs and a segment is deleted only when the cursor has passed its last record. So a crash at any point
  re-reads from the last durable cursor: duplicates are possible, loss is not (at-least-once).
- Bounded: `size_bytes <= max_bytes` (the sum of segment files). append() accepts the prefix that fits
  and reports the rest as refused: the caller counts them (overflow policy drop_newest), or waits for
  room (`wait_room`, overflow policy block). Memory: segment metadata + the acknowledged ranges beyond
  the cursor (bounded by what is in flight); read() returns at most max_bytes.
- Durable frontier: `synced_seq` — every record below it survives a machine crash (fdatasync'ed; with
  policy none: written, which survives a collector crash). It only grows; `on_synced` is called when it
  does, so the Kafka sink can settle batches that reached the spool (docs/collector.md "Delivery and loss").
  Records whose fdatasync failed, or whose segment was closed before one ran, are unproven for good (a
  retry proves nothing on Linux): `synced_seq` stays below them until the broker acknowledged them.

Durability (fsync policy), for the segment files:
  none      written with write(2): survives a collector crash (kill -9), not a machine crash.
  interval  as none, plus fdatasync at most every fsync_interval (default 1 s) and at segment rotation
            and close: a machine crash loses at most ~one interval of spooled records.   (default)
  always    fdatasync before append() returns.
The cursor file (cursor + next_seq) is rewritten with tmp + rename after every fdatasync and when the
cursor moves (at most every 0.2 s), fsynced only at close and under `always`.

Crash recovery (open): segments whose header is damaged are renamed *.corrupt; the last segment is
scanned frame by frame and cut at the first incomplete or CRC-failing frame (a torn write: the process
died mid-append, or a machine crash lost pages that were never synced). `Recovery.torn_records` counts
the records cut off that had been settled: every seq between the last good frame and the next_seq the
cursor file last recorded (exact if synced). Under interval/always a frame cut past it was never settled
(a kill mid-append, or appended after the last fdatasync): the kernel holds it, no loss. Under none an
append settles when it returns: a cut frame counts at least 1 (a kill mid-append too: one too many). A bad
frame found while reading an earlier segment skips the rest of that segment; the seqs skipped are
reported by `take_lost()` (exact, from the next segment's first seq). Open reads the last segment once.

Not thread-safe: use from one event loop; fdatasync runs in a worker thread, and a descriptor it runs on is
closed only after it (an acknowledgement that empties the spool meanwhile drops the writer, never under it).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path

from .spool_format import (
    FRAME,
    FRAME_OVERHEAD,
    READ_CHUNK,
    SEG_HDR,
    Recovery,
    Segment,
    crc,
    frame,
    fsync_dir,
    lock_directory,
    recover_segments,
    segment_name,
    write_all,
    write_cursor,
)

__all__ = ["Spool", "SpoolError", "Recovery", "FSYNC_POLICIES", "FRAME_OVERHEAD"]

FSYNC_POLICIES = ("none", "interval", "always")
CURSOR_WRITE_INTERVAL_S = 0.2               # cursor file rewrite at most this often (and when a segment goes)


class SpoolError(RuntimeError):
    """The spool directory cannot be used (permissions, not a directory, a record too large)."""


class Spool:
    def __init__(self, directory: str | os.PathLike, *, max_bytes: int = 1 << 30, segment_bytes: int = 64 << 20,
                 fsync: str = "interval", fsync_interval_s: float = 1.0, max_record_bytes: int = 16 << 20):
        if fsync not in FSYNC_POLICIES:
            raise ValueError(f"fsync policy {fsync!r} is not one of {', '.join(FSYNC_POLICIES)}")
        if segment_bytes < 4096 or max_bytes < segment_bytes:
            raise ValueError(f"need 4096 <= segment_bytes ({segment_bytes}) <= max_bytes ({max_bytes})")
        self.dir = Path(directory)
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self.max_record_bytes = max_record_bytes
        self.segments: list[Segment] = []
        self.next_seq = 0
        self.cursor = 0
        self._acked = bytearray()                 # byte i = 1: seq cursor + i acknowledged (beyond the cursor)
        self._acked_n = 0                         # ones in _acked
        self._wfd = -1
        self._dirty = False
        self._last_sync = time.monotonic()
        self._syncing: asyncio.Future | None = None
        self._sync_lock = asyncio.Lock()
        self._syncing_fd = -1                     # the descriptor that fdatasync runs on
        self._appending = False                   # an append() is under way (it may be awaiting a sync)
        self._cursor_written = (-1, -1)
        self._cursor_at = 0.0
        self.synced_seq = 0                       # every seq below it is durable per the fsync policy
        self._proven = 0                          # every seq below it was covered by a successful fdatasync
        self._unproven: tuple[int, int] | None = None  # [a, b): a failed fdatasync (or none) left them on
                                                       # disk unproven: synced_seq stays ≤ a until acked past b
        self.on_synced: Callable[[], None] | None = None
        # reader
        self._rseg = 0                            # index into segments
        self._rfd = -1
        self._rfd_seg: Segment | None = None
        self._roff = SEG_HDR.size
        self.read_seq = 0                         # next seq read() may return
        self._rnext = 0                           # seq the next frame of the segment being read must have
        self._lost: list[tuple[int, int]] = []    # [start, end) found corrupt while reading
        self._room: asyncio.Event | None = None
        self.opened = False
        self._lockfd = -1
        # counters
        self.appended = 0
        self.refused = 0
        self.bytes_appended = 0
        self.fsyncs = 0
        self.fsync_errors = 0
        self.cursor_errors = 0
        self.corrupt_records = 0
        self.deleted_segments = 0
        self.recovery = Recovery()

    # ---- open / recovery ---------------------------------------------------------------------------
    def open(self) -> Recovery:
        """Create or recover the spool (see the module docstring). Raises SpoolError."""
        self._unproven, self._dirty = None, False
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o750)
            if not os.access(self.dir, os.W_OK | os.X_OK):
                raise SpoolError(f"spool directory {self.dir} is not writable")
        except OSError as e:
            raise SpoolError(f"cannot create spool directory {self.dir}: {e.strerror or e}") from None
        self._lock()
        self.segments, self.next_seq, cur, rec = recover_segments(self.dir, self.max_record_bytes, self.fsync)
        self.cursor = cur
        while self.segments and self.segments[0].end <= self.cursor:
            self._unlink(self.segments.pop(0))     # fully acknowledged before the crash
        self.rewind()
        rec.segments = len(self.segments)
        rec.pending = self.next_seq - self.cursor
        self.recovery = rec
        self.synced_seq = self._proven = self.next_seq   # what recovery kept is on disk
        self.opened = True
        self._write_cursor(force=True)
        return rec

    def _lock(self) -> None:
        self._lockfd, holder = lock_directory(self.dir)
        if self._lockfd < 0:
            raise SpoolError(f"spool directory {self.dir} is in use by another process (pid {holder}); "
                             "give each collector its own spool directory")

    def _write_cursor(self, *, force: bool = False, sync: bool = False, upto: int | None = None) -> None:
        """Cursor + the records claimed written (`upto`, default: proven by an fdatasync — recovery counts
        every one of them that a torn tail cut as lost)."""
        state = (self.cursor, self._proven if upto is None else upto)
        if not force and self._cursor_written == state:
            return
        try:
            write_cursor(self.dir, *state, sync=sync or self.fsync == "always")
        except OSError:                          # a full disk: an older cursor file replays duplicates only;
            self.cursor_errors += 1              # written again at the next move
            return
        self._cursor_written = state
        self._cursor_at = time.monotonic()

    # ---- append --------------------------------------------------------------------------------------
    @property
    def size_bytes(self) -> int:
        return sum(s.size for s in self.segments)

    @property
    def pending(self) -> int:
        """Records appended and not acknowledged (acknowledged ranges beyond the cursor excluded)."""
        return self.next_seq - self.cursor - self._acked_n

    @property
    def unread(self) -> int:
        return self.next_seq - self.read_seq

    def room(self) -> int:
        return self.max_bytes - self.size_bytes

    async def append(self, payloads: list[bytes]) -> int:
        """Append records in order; returns how many were accepted (a prefix of `payloads`): the rest did
        not fit in max_bytes. Cost: one write(2) per segment touched (+ fdatasync per the fsync policy).
        Raises SpoolError for a record larger than max_record_bytes; OSError if the disk fails, with
        `.written` = how many of the records made it (a partial frame is cut off again)."""
        if not payloads:
            return 0
        hdr = SEG_HDR.size
        groups: list[list[bytes]] = [[]] if self._wfd >= 0 else []
        seg_size = self.segments[-1].size if self._wfd >= 0 else None
        total, seq = self.size_bytes, self.next_seq
        for p in payloads:
            if len(p) > self.max_record_bytes:
                raise SpoolError(f"record of {len(p)} bytes exceeds the spool's max_record_bytes "
                                 f"({self.max_record_bytes})")
            f = frame(seq, p)
            rotate = seg_size is None or (seg_size + len(f) > self.segment_bytes and seg_size > hdr)
            need = len(f) + (hdr if rotate else 0)
            if total + need > self.max_bytes:
                break
            if rotate:
                groups.append([])
                seg_size = hdr
            groups[-1].append(f)
            seg_size += len(f)
            total += need
            seq += 1
        accepted = seq - self.next_seq
        first = self.next_seq
        self._appending = True                   # _gc keeps the segment being written (see _gc)
        try:
            for k, g in enumerate(groups):
                try:
                    if k > 0 or self._wfd < 0:
                        await self._new_segment()
                    if not g:
                        continue
                    buf = b"".join(g)
                    write_all(self._wfd, buf)
                except OSError as e:             # ENOSPC, EIO: roll back a partial frame, then report
                    if self._wfd >= 0 and self.segments:
                        with contextlib.suppress(OSError):
                            os.ftruncate(self._wfd, self.segments[-1].size)
                        self._drop_writer()
                    e.written = self.next_seq - first    # records before the failure are in the spool
                    raise
                seg = self.segments[-1]
                seg.size += len(buf)
                self.next_seq += len(g)
                seg.end = self.next_seq
                self._dirty = True
                self.appended += len(g)          # per segment: a cancel at the next one's sync keeps it
                self.bytes_appended += len(buf)
        finally:
            self._appending = False
        self.refused += len(payloads) - accepted
        if accepted:
            if self.fsync == "none":
                self._synced(self.next_seq)
            elif self.fsync == "always":
                await self.sync()
            elif self.sync_due():
                await self.sync()
        return accepted

    def sync_due(self) -> bool:
        """Policy interval: unsynced records and fsync_interval has passed since the last fdatasync."""
        return (self.fsync == "interval" and self.synced_seq < self.next_seq
                and time.monotonic() - self._last_sync >= self.fsync_interval_s)

    def _synced(self, seq: int) -> None:
        """Records below `seq` are proven durable: synced_seq moves there, except past an unproven range
        the cursor has not passed (their fdatasync failed: a later one proves nothing about them), and
        at least to the cursor (the broker acknowledged every record below it)."""
        self._proven = max(self._proven, seq)
        if self._unproven is not None and self.cursor >= self._unproven[1]:
            self._unproven = None
        upto = self._proven if self._unproven is None else min(self._proven, self._unproven[0])
        upto = max(upto, min(self.cursor, self.next_seq))
        if upto > self.synced_seq:
            self.synced_seq = upto
            if self.on_synced is not None:
                self.on_synced()

    def _unprove(self, start: int, end: int) -> None:
        """[start, end) were written but no fdatasync proved them, and none can now: on Linux a failed
        writeback is reported once and its pages are then clean, so a retry succeeds without writing them
        (docs/collector.md "Delivery and loss"). They settle only once the broker acknowledged them."""
        if end > start:
            a, b = self._unproven or (start, end)
            self._unproven = (min(a, start), max(b, end))

    async def _close_writer(self) -> None:
        """fdatasync (unless policy none) and close the segment being appended to, if any."""
        if self._wfd >= 0:
            if self.fsync != "none":
                await self.sync()
            self._drop_writer()             # (an acknowledgement may have dropped it during the sync)

    def _drop_writer(self) -> None:
        """Close the segment being appended to now, or once the fdatasync on it ends (closed under it, the
        thread fails with EBADF or syncs whatever file got the number next). Records written to it since
        the last fdatasync are unproven (policy none aside)."""
        if self._dirty and self.fsync != "none":
            self._unprove(self._proven, self.next_seq)
        self._dirty = False
        fd, self._wfd = self._wfd, -1
        if fd >= 0 and self._syncing is not None and not self._syncing.done() and self._syncing_fd == fd:
            self._syncing.add_done_callback(lambda _f: os.close(fd))
        elif fd >= 0:
            os.close(fd)

    async def _new_segment(self) -> None:
        await self._close_writer()
        if self.segments and self.segments[-1].first == self.next_seq:   # no record made it into the last
            self._forget_last()                                             # one: its file is reused
        seg = Segment(self.next_seq, self.dir / segment_name(self.next_seq), SEG_HDR.size, self.next_seq)
        fd = os.open(seg.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            write_all(fd, SEG_HDR.pack(b"HWSPOOL1", seg.first))
        except OSError:
            os.close(fd)
            raise
        self._wfd = fd
        self.segments.append(seg)
        if self.fsync != "none":                   # the new name must survive a machine crash too
            await asyncio.to_thread(fsync_dir, self.dir)

    def _forget_last(self) -> None:
        """Drop the entry of a last segment that holds no record (an append failed before its first
        frame), so a new segment of the same first seq — same file name — is not deleted with it."""
        if self._rfd_seg is self.segments.pop():
            self._close_reader()
        self._rseg = min(self._rseg, len(self.segments))

    async def sync(self) -> bool:
        """fdatasync the segment being written (worker thread); False (counted) on error. On success every
        record appended before it is durable (`_synced`); earlier segments were synced when sealed, or
        are unproven (`_unprove`). One at a time: a second caller could otherwise report records that the
        first one's fdatasync is still writing."""
        async with self._sync_lock:
            if self._syncing is not None:                # the fdatasync of a sync whose caller was cancelled
                await asyncio.shield(self._syncing)      # (it records its own outcome)
            ok = True
            upto = self.next_seq
            if self._wfd >= 0 and self._dirty:
                self._dirty = False
                fd = self._syncing_fd = self._wfd
                self._syncing = asyncio.ensure_future(self._fdatasync(fd, self._proven))
                try:
                    ok = await asyncio.shield(self._syncing)
                finally:
                    if self._syncing is not None and self._syncing.done():
                        self._syncing = None
            self._last_sync = time.monotonic()
            if ok:
                self._synced(upto)
                if self.opened:
                    self._write_cursor()
            return ok

    async def _fdatasync(self, fd: int, start: int) -> bool:
        """fdatasync the writer (records from `start` on it) and record the outcome, whether or not the
        sync that started it is still waiting: a failure leaves them unproven, whoever syncs next."""
        try:
            await asyncio.to_thread(os.fdatasync, fd)
        except OSError:                         # also what was appended meanwhile: the error is reported
            self.fsync_errors += 1               # once, and their pages may have shared its fate
            self._unprove(start, self.next_seq)
            return False
        self.fsyncs += 1
        return True

    async def wait_room(self, nbytes: int, timeout: float | None = None) -> bool:
        """Wait until nbytes (+ framing) fit, or timeout. True if they fit."""
        if self._room is None:
            self._room = asyncio.Event()
        loop = asyncio.get_running_loop()
        end = None if timeout is None else loop.time() + timeout
        while self.room() < nbytes + FRAME.size + SEG_HDR.size:
            self._room.clear()
            left = None if end is None else end - loop.time()
            if left is not None and left <= 0:
                return False
            try:
                await asyncio.wait_for(self._room.wait(), left)
            except TimeoutError:
                return False
        return True

    # ---- read / ack ----------------------------------------------------------------------------------
    def rewind(self) -> None:
        """Read again from the cursor (after a failed delivery). Acknowledged seqs are skipped.
        Cost: re-scans the frame headers of the first segment up to the cursor."""
        self._close_reader()
        self._rseg, self._roff, self.read_seq = 0, SEG_HDR.size, self.cursor
        self._rnext = self.segments[0].first if self.segments else self.cursor

    def read(self, max_records: int = 4096, max_bytes: int = 4 << 20) -> list[tuple[int, bytes]]:
        """Up to max_records unacknowledged records from the read position, in seq order, with at most
        ~max_bytes of payload (at least one record if any is unread). Cost: pread of those bytes + a
        CRC-32 per record. Corrupt frames end their segment (reported by take_lost())."""
        out: list[tuple[int, bytes]] = []
        nbytes = 0
        H = FRAME.size
        while len(out) < max_records and nbytes < max_bytes and self._rseg < len(self.segments):
            seg = self.segments[self._rseg]
            tail = self._rseg == len(self.segments) - 1
            if self._roff >= seg.size:
                if tail:
                    break                               # caught up with the writer
                self._next_segment()
                continue
            if self._rfd_seg is not seg:
                self._close_reader()
                try:
                    self._rfd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    self._corrupt(seg)
                    continue
                self._rfd_seg = seg
            buf = os.pread(self._rfd, min(READ_CHUNK, seg.size - self._roff), self._roff)
            pos = 0
            while len(out) < max_records and nbytes < max_bytes:
                if pos + H > len(buf):
                    if pos == 0:                        # a frame header cut short
                        self._corrupt(seg)
                    break
                n, c, s = FRAME.unpack_from(buf, pos)
                if n > self.max_record_bytes or s != self._rnext or self._roff + H + n > seg.size:
                    self._corrupt(seg)
                    break
                if pos + H + n > len(buf):
                    if pos == 0:                        # one record larger than the chunk: read exactly it
                        buf = os.pread(self._rfd, H + n, self._roff)
                        continue
                    break
                payload = buf[pos + H: pos + H + n]
                if crc(n, s, payload) != c:
                    self._corrupt(seg)
                    break
                pos += H + n
                self._roff += H + n
                self._rnext = s + 1
                if s < self.read_seq:                   # re-scan after rewind: before the read position
                    continue
                self.read_seq = s + 1
                if not self.is_acked(s):
                    out.append((s, payload))
                    nbytes += n
        return out

    def _next_segment(self) -> None:
        self._close_reader()
        self._rseg += 1
        self._roff = SEG_HDR.size
        nxt = self.segments[self._rseg]
        self._rnext = nxt.first
        if nxt.first > self.read_seq:                   # a gap: records lost to corruption before
            self._report_lost(self.read_seq, nxt.first)
            self.read_seq = nxt.first

    def _corrupt(self, seg: Segment) -> None:
        """Bad frame: skip the rest of this segment; the seqs up to where the next one starts are lost."""
        tail = seg is self.segments[-1]
        end = self.next_seq if tail else seg.end
        if end > self.read_seq:
            self._report_lost(self.read_seq, end)
            self.read_seq = end
        self._close_reader()
        self._roff = seg.size
        self._rnext = end
        if tail and self._wfd >= 0:                     # appends continue in a fresh segment
            self._drop_writer()

    def _report_lost(self, start: int, end: int) -> None:
        if end > start:
            self.corrupt_records += end - start
            self._lost.append((start, end))
            self.ack(start, end)

    def take_lost(self) -> list[tuple[int, int]]:
        """[start, end) seq ranges found corrupt since the last call (already acknowledged)."""
        out, self._lost = self._lost, []
        return out

    def _close_reader(self) -> None:
        if self._rfd >= 0:
            os.close(self._rfd)
        self._rfd, self._rfd_seg = -1, None

    def is_acked(self, seq: int) -> bool:
        i = seq - self.cursor
        return i < 0 or (i < len(self._acked) and self._acked[i] == 1)

    def _room_for(self, end: int) -> None:
        need = end - self.cursor - len(self._acked)
        if need > 0:
            self._acked.extend(bytes(need))

    def ack(self, start: int, end: int) -> None:
        """Acknowledge seqs [start, end) (idempotent). Moves the cursor over contiguous acknowledged seqs,
        deletes segments the cursor passed, and writes the cursor file (cheap: tmp + rename). Cost: O(end -
        start) in C (a byte per seq beyond the cursor: ~1 MB per million unacknowledged records)."""
        start = max(start, self.cursor)
        if end <= start:
            return
        self._room_for(end)
        a, b = start - self.cursor, end - self.cursor
        self._acked_n += (b - a) - self._acked.count(1, a, b)
        self._acked[a:b] = b"\x01" * (b - a)
        self._advance()

    def ack_seqs(self, seqs: list[int]) -> None:
        """Acknowledge individual seqs in any order (a replayed batch: one partition's records of a read,
        interleaved with the other partitions'). Cost: O(len(seqs)) simple steps, then the cursor advance."""
        c = self.cursor
        if not seqs:
            return
        self._room_for(max(seqs) + 1)
        acked, new = self._acked, 0
        for q in seqs:
            i = q - c
            if i >= 0 and not acked[i]:
                acked[i] = 1
                new += 1
        self._acked_n += new
        self._advance()

    def _advance(self) -> None:
        if not self._acked or not self._acked[0]:
            return
        k = self._acked.find(0)
        k = len(self._acked) if k < 0 else k
        del self._acked[:k]
        self._acked_n -= k
        self.cursor += k
        if self.cursor > self.synced_seq:
            self._synced(self._proven)                   # the broker has them: synced_seq may pass them now
        self._gc()

    def _gc(self) -> None:
        """Delete segments whose every record is acknowledged; keep the reader on a live segment."""
        freed = False
        while self.segments:
            seg = self.segments[0]
            last = len(self.segments) == 1
            if (self.next_seq if last else seg.end) > self.cursor or (last and self._appending):
                break                                    # (an append is sealing it or about to write to it)
            if last and self._wfd >= 0:
                self._drop_writer()
                self._dirty = False
            if self._rfd_seg is seg:
                self._close_reader()
            self.segments.pop(0)
            if self._rseg == 0:                          # the reader was in it: start of the next one
                self._roff = SEG_HDR.size
                self._rnext = self.segments[0].first if self.segments else self.next_seq
            else:
                self._rseg -= 1
            self._unlink(seg)
            freed = True
        self.read_seq = max(self.read_seq, self.cursor)
        if freed or time.monotonic() - self._cursor_at >= CURSOR_WRITE_INTERVAL_S:
            self._write_cursor()
        if freed and self._room is not None:
            self._room.set()

    def skip_to(self, seq: int) -> None:
        """Move the read position forward to `seq` (records before it are delivered by someone else,
        e.g. batches already handed to the producer that were spooled only for crash safety)."""
        self.read_seq = max(self.read_seq, min(seq, self.next_seq))

    def _unlink(self, seg: Segment) -> None:
        try:
            os.unlink(seg.path)
            self.deleted_segments += 1
        except FileNotFoundError:
            pass

    # ---- close / stats -------------------------------------------------------------------------------
    async def close(self) -> None:
        """fdatasync (unless policy none), write the cursor durably, close files (also when cancelled).
        The cursor file then names every record appended: the sink carries them over to the next run,
        so recovery counts any of them a machine crash cut."""
        try:
            await self._close_writer()
        finally:
            self._drop_writer()
            self._close_reader()
            if self.opened:
                self._write_cursor(force=True, sync=True, upto=self.next_seq)
            self.opened = False
            if self._lockfd >= 0:
                os.close(self._lockfd)
                self._lockfd = -1

    def stats(self) -> dict:
        return {"dir": str(self.dir), "size_bytes": self.size_bytes, "max_bytes": self.max_bytes,
                "segments": len(self.segments), "pending": self.pending, "unread": self.unread,
                "cursor": self.cursor, "next_seq": self.next_seq, "appended": self.appended,
                "refused": self.refused, "bytes_appended": self.bytes_appended, "fsync": self.fsync,
                "fsyncs": self.fsyncs, "fsync_errors": self.fsync_errors,
                "cursor_errors": self.cursor_errors, "corrupt_records": self.corrupt_records,
                "deleted_segments": self.deleted_segments, "synced_seq": self.synced_seq,
                "recovery": dataclasses.asdict(self.recovery)}
