"""JSON Lines file sink: one encoded record per line, size-based rotation, explicit fsync policy.

Rotation: before a line would take the file past `rotate_bytes`, the file is closed and renamed
PATH → PATH.1 → ... → PATH.<keep> (the oldest is overwritten), and a new PATH is started; at most
keep + 1 files exist. A single line longer than rotate_bytes gets a file of its own.

Durability (fsync policy) — what "delivered" means for this sink:
  none      delivered = written to the kernel (page cache) by write(2). Survives a collector crash;
            a machine crash may lose what the kernel had not written back yet.
  interval  fdatasync at most every fsync_interval (default 1 s) and at flush, rotation and close;
            delivered = covered by one: a machine crash loses nothing delivered.  (default)
  always    fdatasync before send() returns: a record is counted delivered only once it is on disk.
fsync runs in a worker thread (the event loop keeps going); writes are one write(2) per batch and
segment (≈ memcpy into the page cache).

Full-queue policy: block (a local disk is the sink of last resort: slow it down, don't drop).
Losses are counted by reason: encode_error (the encoder rejected a record), disk_full (write(2) failed
with ENOSPC or EDQUOT), write_error (any other write(2) failure — the batch's unwritten records; the
file is reopened on the next batch), fsync_error (policies interval and always: an fdatasync failed, so
the records of every batch that fdatasync covered are not known to be on disk, and never will be: a
failure is final, see `_sync`), each noting its records' hostwall.seq for the loss record (docs/records.md
"Completeness"; for fsync_error the sink keeps the seqs of each written call — ranges, ~O(1) a pipeline
batch — not its records, until its fdatasync decides). The collector keeps running; health is `failing`
until a write succeeds again.

Durability (at_least_once, docs/collector.md "Delivery and loss"): a batch is settled — the pipeline
may release its kernel data — once it is written (policy none) or covered by a successful fdatasync
(interval, always). Under `interval` that is the next periodic or idle flush, so the kernel keeps a
batch for up to ~fsync_interval longer, and counts it delivered then. A failed fdatasync settles the
batches it covered as lost (`fsync_error`). A file closed for writing (rotation, a failed write) is
synced, with the open one, before any batch written to it settles; so is the directory after a file was
created or renamed (start, rotation), else a machine crash could lose the new file's name.

Torn tail: a SIGKILL during a write(2) of many pages can leave a short write, the file ending in part of
a line. That line was never settled (its call had not returned), so its records come again; but the next
run's first line, appended to it, would make one undecodable line of both and lose a record that *was*
settled. Opening the file (start, or again after a failed write whose records were counted lost) therefore
cuts it back to its last newline (counted in `torn_bytes`).
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import os
import time
from pathlib import Path

from ..loss_report import note_record_seqs
from .base import BaseSink, Call, FullQueuePolicy, Health, SinkUnavailable
from .spool_format import fsync_dir, open_append, write_all

log = logging.getLogger("hostwall.collector.sinks")

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
ENCODE_CHUNK = 1024               # records encoded (and their lines held) at a time


def make_encoder(encoding: str):
    """record -> bytes (no trailing newline) in `encoding` (collector.encoders: ecs | ocsf | otel)."""
    from hostwall.collector.encoders import FORMATS, encode
    if encoding not in FORMATS:
        raise SinkUnavailable(f"encoding {encoding!r} is not available; use one of {', '.join(FORMATS)}")
    return functools.partial(encode, fmt=encoding)


def make_line_encoder(encoding: str):
    """record -> its line: make_encoder's bytes and b"\n" (collector.encoders.line_encoder)."""
    from hostwall.collector.encoders import line_encoder
    make_encoder(encoding)                            # the same check and message
    return line_encoder(encoding)


class JsonlSink(BaseSink):
    full_queue_policy = FullQueuePolicy.BLOCK
    tracks_durability = True

    def __init__(self, path: str | os.PathLike, *, encoding: str = "ecs", rotate_bytes: int = 256 << 20,
                 rotate_keep: int = 5, fsync: str = "interval", fsync_interval_s: float = 1.0,
                 name: str | None = None):
        super().__init__(name or f"jsonl:{path}")
        self.path = Path(path)
        self.encoding = encoding
        self.rotate_bytes = rotate_bytes
        self.rotate_keep = rotate_keep
        self.fsync = fsync
        self.fsync_interval_s = fsync_interval_s
        self._encode = None
        self._line = None
        self._fd = -1
        self._size = 0
        self._dirty = False
        self._last_sync = time.monotonic()
        self.rotations = 0
        self.bytes_written = 0
        self.fsyncs = 0
        self.fsync_errors = 0
        self.torn_bytes = 0                           # a torn last line cut at start (see the module docstring)
        # written, waiting for an fdatasync: (call, records it wrote, their seqs: loss_report.note_record_seqs)
        self._unsynced: list[tuple[Call, int, dict]] = []
        self._stale: list[int] = []                   # closed for writing (rotation, failed write) unsynced
        self._syncing: asyncio.Future | None = None   # the fdatasyncs under way (they outlive a cancelled caller)
        self._sync_failed = False                     # an fdatasync failed since the last settlement
        self._dir_dirty = False                       # a file created or renamed since the directory's last fsync
        self.dir_fsyncs = 0

    @classmethod
    def from_spec(cls, spec, config) -> JsonlSink:
        o = config.jsonl
        return cls(spec.target, encoding=spec.encoding, rotate_bytes=o.rotate_bytes, rotate_keep=o.rotate_keep,
                   fsync=o.fsync, fsync_interval_s=o.fsync_interval_s, name=spec.name)

    # ---- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the encoder and open the file (append); raises OSError with the path if it cannot."""
        self._encode = make_encoder(self.encoding)
        self._line = make_line_encoder(self.encoding)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open()

    def _cut_torn_tail(self) -> None:
        """Cut a last line without its newline (a write torn by a kill: never settled, so sent again; or by
        a failed write: counted lost). Cost: reads back to the last newline (one block, a line is ~1 KB)."""
        if not self._size:
            return
        keep, step = 0, 1 << 16
        with open(self.path, "rb") as f:
            for stop in range(self._size, 0, -step):         # find the last newline, backwards
                f.seek(max(0, stop - step))
                chunk = f.read(min(step, stop))
                if stop == self._size and chunk.endswith(b"\n"):
                    return
                i = chunk.rfind(b"\n")
                if i >= 0:
                    keep = max(0, stop - step) + i + 1
                    break
        try:
            os.ftruncate(self._fd, keep)                 # the file this sink has open, whatever its name now
        except OSError as e:                             # e.g. append-only (chattr +a): end the fragment instead
            log.warning("sink %s: cannot cut a torn last line (%s); ending it with a newline", self.name, e)
            write_all(self._fd, b"\n")
            self.torn_bytes += self._size - keep
            self._size += 1
            return
        self.torn_bytes += self._size - keep
        log.warning("sink %s: cut a torn last line (%d bytes) left by a crash; its records come again",
                    self.name, self._size - keep)
        self._size = keep

    def _open(self) -> None:
        """Open PATH for appending; a file this creates makes the directory dirty (its entry is synced
        with the data: docs/collector.md "Delivery and loss")."""
        self._fd, created = open_append(self.path)
        self._dir_dirty |= created
        self._size = os.fstat(self._fd).st_size
        self._cut_torn_tail()

    async def flush(self) -> None:
        if self.fsync != "none":
            await self._sync()

    async def close(self) -> None:
        try:
            await self.flush()
        finally:                                     # (cancelled by the shutdown deadline too: no fd left)
            fds, self._stale = [self._fd, *self._stale], []   # never synced: their calls stay unsettled
            self._fd, self._dirty = -1, False
            fds = [fd for fd in fds if fd >= 0]
            if self._syncing is not None and not self._syncing.done():    # not under a running fdatasync
                self._syncing.add_done_callback(lambda _f: [os.close(fd) for fd in fds])
            else:
                for fd in fds:
                    os.close(fd)

    def _cancelled(self, call: Call, left: int) -> None:
        """A send cancelled (the shutdown deadline) — only ever in its `_sync`, so every record it did not
        count is written and waits in `_unsynced`: it stays in flight, its call unsettled. The fdatasync
        under way (shielded) and the next sync (close's flush) decide its fate — delivered or `fsync_error`;
        if none runs, the shutdown counts it `requeued` and the kernel keeps it (docs/collector.md "The
        loss ledger"). Never `cancelled`: that would release kernel data of records a sync may yet lose."""

    # ---- writing ---------------------------------------------------------------------------------
    async def _send(self, records: list[dict]) -> None:
        """Encode and write a batch, ENCODE_CHUNK records at a time (the encoded lines of one chunk
        are held at once, not the batch's: ~1.5 MB instead of ~12 MB for 8192 ECS records). After a
        failed open or write the batch's remaining records are still encoded, so each is counted
        lost exactly once with its reason (encode_error, else disk_full / write_error)."""
        call = self._call
        written = encoded = 0
        failed: int | None = None                           # errno (kept, not the exception: its traceback
                                                             # would hold this batch alive until a GC cycle)
        wrote: dict = {}                                     # the seqs written (an fsync_error loses them)
        for i in range(0, len(records), ENCODE_CHUNK):
            lines, recs = self._encode_all(records[i:i + ENCODE_CHUNK])
            encoded += len(lines)
            if not lines:
                continue
            if failed is None and self._fd < 0:
                try:
                    self._open()
                except OSError as e:
                    self._write_failed(e, recs)
                    failed = e.errno or 0
                    continue
            if failed is not None:
                self._lose_records("disk_full" if failed in DISK_FULL_ERRNOS else "write_error", recs)
                continue
            done = 0
            for seg_lines, seg_bytes in self._segments(lines):
                try:
                    if self._size and self._size + seg_bytes > self.rotate_bytes:
                        self._rotate()
                    write_all(self._fd, b"".join(seg_lines))
                except OSError as e:
                    self._write_failed(e, recs[done:])
                    failed = e.errno or 0
                    break
                done += len(seg_lines)
                self._size += seg_bytes
                self.bytes_written += seg_bytes
                self._dirty = True
            written += done
            if self.fsync != "none" and done:
                note_record_seqs(wrote, "fsync_error", recs[:done])
        if not encoded:
            self._settle(call, call.remaining)
            return
        if failed is None:
            self._set_health(Health.OK)
        if self.fsync == "none" or not written:
            self._deliver(written)
            self._settle(call, call.remaining)
        else:
            self._unsynced.append((call, written, wrote))
        if self.fsync != "none" and (self.fsync == "always" or self._stale
                                     or time.monotonic() - self._last_sync >= self.fsync_interval_s):
            await self._sync()                 # (a failed write retired the file: sync what it holds now)

    def _encode_all(self, records: list[dict]) -> tuple[list[bytes], list[dict]]:
        """(lines, the records they encode): a loss notes its records' hostwall.seq, so the pipeline's
        loss record explains the gap (docs/records.md "Completeness")."""
        line = self._line
        try:
            return [line(r) for r in records], records      # fast path: no per-record try
        except Exception:  # noqa: BLE001 — fall back to one record at a time to find the bad one
            enc = self._encode
            out, ok = [], []
            for r in records:
                try:
                    out.append(enc(r) + b"\n")
                    ok.append(r)
                except Exception as e:  # noqa: BLE001 — an unencodable record is counted lost, the rest go on
                    self._lose_records("encode_error", [r])
                    self.last_error = f"encode: {type(e).__name__}: {e}"
            return out, ok

    def _segments(self, lines: list[bytes]):
        """Split lines into runs that fit the current file, then whole new files: (lines, bytes).
        Lines that all fit are one run (one sum over their lengths, no per-line loop)."""
        room = self.rotate_bytes - self._size if self._size else self.rotate_bytes
        total = sum(map(len, lines))
        if total <= room:
            yield lines, total
            return
        start, acc = 0, 0
        for i, ln in enumerate(lines):
            if acc and acc + len(ln) > room:
                yield lines[start:i], acc
                start, acc, room = i, 0, self.rotate_bytes
            acc += len(ln)
        yield lines[start:], acc

    def _write_failed(self, e: OSError, lost: list[dict]) -> None:
        full = e.errno in DISK_FULL_ERRNOS
        self._lose_records("disk_full" if full else "write_error", lost)
        self.last_error = f"write {self.path}: {e.strerror or e}"
        self._set_health(Health.FAILING, f"{'disk full' if full else 'write failed'}: {self.last_error}; "
                         "records are counted lost until a write succeeds")
        self._retire_fd()                                # the next batch opens the file again

    def _retire_fd(self) -> None:
        """Stop writing to the open file. Written to since the last fdatasync (and a policy that syncs): kept
        in `_stale` for the next `_sync` (which the send that retired it runs), so no call settles on data
        nothing synced."""
        fd, self._fd = self._fd, -1
        if fd >= 0 and self._dirty and self.fsync != "none":
            self._stale.append(fd)
        elif fd >= 0:
            os.close(fd)
        self._dirty = False

    async def _sync(self) -> bool:
        """fdatasync (worker thread) the files written since the last one — retired ones, then the open
        one — and settle the calls written before it started: delivered, or, if any fdatasync failed,
        counted lost (`fsync_error`). A failure is final: Linux reports a writeback error once and marks
        the pages clean, so a retry would succeed without writing them (docs/collector.md "Delivery and
        loss"). Cost: one fdatasync per file written to."""
        if self._syncing is not None:                   # one whose caller was cancelled: its outcome counts
            await asyncio.shield(self._syncing)
        covered = len(self._unsynced)                   # calls written before these fdatasyncs start
        stale, self._stale = self._stale, []
        fd = self._fd if self._fd >= 0 and self._dirty else -1
        self._dirty = False
        sync_dir, self._dir_dirty = self._dir_dirty, False
        self._syncing = asyncio.ensure_future(self._fdatasync_files(stale, fd, sync_dir))
        try:
            await asyncio.shield(self._syncing)
        finally:
            if self._syncing is not None and self._syncing.done():
                self._syncing = None
        self._last_sync = time.monotonic()
        ok, self._sync_failed = not self._sync_failed, False
        done, self._unsynced = self._unsynced[:covered], self._unsynced[covered:]
        for call, n, seqs in done:
            if call.remaining <= 0:                     # settled already (counted lost: nothing left to settle)
                continue
            if ok:
                self._deliver(n)
            else:
                self._lose_noted("fsync_error", n, seqs)
            self._settle(call, call.remaining)
        return ok

    async def _fdatasync_files(self, stale: list[int], fd: int, sync_dir: bool) -> None:
        """fdatasync retired files (then close them) and the open one (fd, or -1), then fsync the directory
        if a file was created or renamed (`sync_dir`: without it a machine crash can lose a new file's name,
        data and all); a failure sets `_sync_failed`, whoever is waiting (a task: a cancelled send does not
        abandon it)."""
        for s in stale:
            try:
                await self._fdatasync(s)
            finally:
                try:
                    os.close(s)
                except OSError:                         # (NFS, FUSE): its data's fate is unknown: lost
                    self._sync_failed = True
        if fd >= 0:
            await self._fdatasync(fd)
        if sync_dir:
            await self._fsync_dir()

    async def _fsync_dir(self) -> None:
        """fsync the file's directory (worker thread). A failure loses what this sync covers, like an
        fdatasync's, and leaves the directory dirty: the next sync tries again (a failing directory fsync
        on Linux is a journal that keeps failing, not a one-time report). Cost: once per new file."""
        try:
            await asyncio.to_thread(fsync_dir, self.path.parent)
        except OSError as e:
            self._dir_dirty = True
            self._sync_error(f"fsync directory {self.path.parent}", e)
            return
        self.dir_fsyncs += 1

    async def _fdatasync(self, fd: int) -> None:
        try:
            await asyncio.to_thread(os.fdatasync, fd)
        except OSError as e:
            self._sync_error(f"fdatasync {self.path}", e)
            return
        self.fsyncs += 1

    def _sync_error(self, what: str, e: OSError) -> None:
        """A failed fdatasync or directory fsync: what the running sync covers is lost (`_sync_failed`)."""
        self.fsync_errors += 1
        self._sync_failed = True
        self.last_error = f"{what}: {e.strerror or e}"
        self._set_health(Health.FAILING, f"{what.split()[0]} failed: {self.last_error}")

    def _rotate(self) -> None:
        """PATH → PATH.1 → ... → PATH.<keep>; cost: keep renames. The old file's fdatasync is the `_sync`
        that ends this send (it covers this call, part of which the old file may hold)."""
        self._retire_fd()
        for i in range(self.rotate_keep - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        self._dir_dirty = True                                  # the renames, and the new PATH
        self._open()
        self.rotations += 1

    def stats(self) -> dict:
        return {**super().stats(), "path": str(self.path), "encoding": self.encoding, "fsync": self.fsync,
                "bytes_written": self.bytes_written, "rotations": self.rotations, "fsyncs": self.fsyncs, "fsync_errors": self.fsync_errors,
                "dir_fsyncs": self.dir_fsyncs,
                "torn_bytes": self.torn_bytes,
                "file_bytes": self._size}
