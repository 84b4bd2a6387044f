"""The Kafka spool's on-disk format (collector/sinks/spool.py): segment headers, CRC-framed records,
the cursor file, the directory lock, and crash recovery's scan (segments found, torn tail cut).

    <dir>/00000000000000000042.seg   segment = 16-byte header (magic b"HWSPOOL1" + u64 first seq, LE) + frames
    <dir>/cursor                     b"HWCURSR2" + u64 cursor + u64 next_seq + u32 CRC-32 of the first 24 bytes
                                     (version 1, without next_seq, is still read)

Frame = `u32 payload length | u32 CRC-32 | u64 seq | payload`, CRC-32 over the length, the seq and the
payload. Records get consecutive sequence numbers, so a gap between what a segment holds and where the
next one starts is an exact count of records lost, and `next_seq` in the cursor file (rewritten after
every fdatasync) bounds what a torn tail cut off: records the spool had made durable are never past it.

Pure functions and constants; cost is stated per function. Nothing here keeps state.
"""
from __future__ import annotations

import fcntl
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["CURSOR_NAME", "FRAME", "FRAME_OVERHEAD", "MAGIC", "READ_CHUNK", "SEG_HDR", "SEG_SUFFIX", "Cursor",
           "Recovery", "Segment", "crc", "frame", "fsync_dir", "lock_directory", "open_append", "read_cursor", "read_header",
           "recover_segments", "scan_tail", "segment_name", "write_all", "write_cursor"]

MAGIC = b"HWSPOOL1"
SEG_HDR = struct.Struct("<8sQ")               # magic, first seq
FRAME = struct.Struct("<IIQ")                 # payload length, crc32, seq
_LEN_SEQ = struct.Struct("<IQ")               # what the CRC covers before the payload
_CURSOR_V1 = struct.Struct("<8sQI")           # magic, cursor seq, crc32 of the first 16 bytes
_CURSOR_V2 = struct.Struct("<8sQQI")          # magic, cursor seq, next seq, crc32 of the first 24 bytes
CURSOR_MAGIC_V1, CURSOR_MAGIC = b"HWCURSR1", b"HWCURSR2"
CURSOR_NAME = "cursor"
FRAME_OVERHEAD = FRAME.size
SEG_SUFFIX = ".seg"
READ_CHUNK = 1 << 20


@dataclass
class Recovery:
    """What open() found: segments, records pending replay, and what it had to repair."""
    segments: int = 0
    pending: int = 0                  # records from earlier runs still to replay
    truncated_bytes: int = 0          # torn tail cut off the last segment
    torn_records: int = 0             # records cut off with it (see the module docstring)
    corrupt_segments: list[str] = field(default_factory=list)   # renamed *.corrupt (header damaged)
    cursor: str = "none"              # file | reset (missing or damaged: replay from the oldest segment) | none


@dataclass
class Segment:
    """One segment file as the spool tracks it."""
    first: int
    path: Path
    size: int = SEG_HDR.size
    end: int = -1                     # seq after its last record (known once sealed or scanned)


def crc(length: int, seq: int, payload) -> int:
    return zlib.crc32(payload, zlib.crc32(_LEN_SEQ.pack(length, seq)))


def frame(seq: int, payload: bytes) -> bytes:
    """One framed record (header + payload)."""
    n = len(payload)
    return FRAME.pack(n, crc(n, seq, payload), seq) + payload


def segment_name(first: int) -> str:
    return f"{first:020d}{SEG_SUFFIX}"


def read_header(p: Path) -> int | None:
    """First seq of segment `p`, or None when its header is missing, damaged or does not match its name."""
    try:
        with open(p, "rb") as f:
            hdr = f.read(SEG_HDR.size)
    except OSError:
        return None
    if len(hdr) != SEG_HDR.size:
        return None
    magic, first = SEG_HDR.unpack(hdr)
    if magic != MAGIC or p.name != segment_name(first):
        return None
    return first


def scan_tail(path: Path, first: int, max_record_bytes: int) -> tuple[int, int, int]:
    """Validate a segment frame by frame and cut it at the first incomplete or CRC-failing frame (a torn
    write). Returns (seq after the last good frame, bytes cut, size kept). Cost: one read of the file."""
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        size = os.fstat(fd).st_size
        off, seq = SEG_HDR.size, first
        buf, boff = b"", off
        while off < size:
            if off + FRAME.size > boff + len(buf):
                buf, boff = os.pread(fd, max(READ_CHUNK, FRAME.size), off), off
            if len(buf) - (off - boff) < FRAME.size:
                break
            n, c, s = FRAME.unpack_from(buf, off - boff)
            if n > max_record_bytes or s != seq or off + FRAME.size + n > size:
                break
            if off + FRAME.size + n > boff + len(buf):
                buf, boff = os.pread(fd, max(READ_CHUNK, FRAME.size + n), off), off
            p = memoryview(buf)[off - boff + FRAME.size: off - boff + FRAME.size + n]
            if crc(n, s, p) != c:
                break
            off += FRAME.size + n
            seq += 1
        cut = size - off
        if cut:
            os.ftruncate(fd, off)
            os.fsync(fd)
        return seq, cut, off
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Cursor:
    """The cursor file: every seq < `cursor` was acknowledged; `next_seq` is where appends had reached
    when the file was written (None in version-1 files)."""
    cursor: int
    next_seq: int | None


def read_cursor(directory: Path) -> tuple[Cursor | None, str]:
    """(Cursor or None, how: "file" | "none" (no file) | "reset" (unreadable or damaged))."""
    try:
        raw = (directory / CURSOR_NAME).read_bytes()
    except FileNotFoundError:
        return None, "none"
    except OSError:
        return None, "reset"
    if len(raw) == _CURSOR_V2.size and raw[:8] == CURSOR_MAGIC:
        magic, cur, nxt, c = _CURSOR_V2.unpack(raw)
        return (Cursor(cur, nxt), "file") if zlib.crc32(raw[:24]) == c else (None, "reset")
    if len(raw) == _CURSOR_V1.size and raw[:8] == CURSOR_MAGIC_V1:
        magic, cur, c = _CURSOR_V1.unpack(raw)
        return (Cursor(cur, None), "file") if zlib.crc32(raw[:16]) == c else (None, "reset")
    return None, "reset"


def write_cursor(directory: Path, cursor: int, next_seq: int, *, sync: bool) -> None:
    """Atomic (tmp + rename); fsync of the file only when `sync` (the rename itself is not synced: after a
    machine crash the cursor may be older than the truth, which replays records twice, never loses)."""
    head = struct.pack("<8sQQ", CURSOR_MAGIC, cursor, next_seq)
    tmp = directory / ".cursor.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        os.write(fd, head + struct.pack("<I", zlib.crc32(head)))
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, directory / CURSOR_NAME)


def write_all(fd: int, buf: bytes) -> None:
    """write(2) until every byte is out (OSError, e.g. ENOSPC, propagates)."""
    mv = memoryview(buf)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


def open_append(path: Path, mode: int = 0o640) -> tuple[int, bool]:
    """(fd open for appending, whether this call created the file: its directory entry then needs an
    fsync_dir to survive a machine crash). Cost: one open(2), two when it creates."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        return os.open(path, flags), False
    except FileNotFoundError:
        return os.open(path, flags | os.O_CREAT, mode), True


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_directory(directory: Path) -> tuple[int, str]:
    """(descriptor, "") holding an exclusive flock on directory/lock with this pid in it, or (-1, the
    holder's pid) if another process holds it. The kernel releases it when the process dies."""
    fd = os.open(directory / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        return -1, holder
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd, ""


def recover_segments(directory: Path, max_record_bytes: int, fsync: str = "interval",
                     ) -> tuple[list[Segment], int, int, Recovery]:
    """(segments in order, next_seq, cursor, what was repaired) of a spool directory after a crash: empty
    segments deleted, damaged headers renamed *.corrupt, the last segment's torn tail cut (see spool.py's
    docstring; fsync: the policy, which says what an append settled). Cost: one read of the last segment."""
    segs: list[Segment] = []
    next_seq = 0
    rec = Recovery()
    for p in sorted(directory.glob("*" + SEG_SUFFIX)):
        if p.stat().st_size == 0:              # created, header never written: holds nothing
            p.unlink()
            continue
        first = read_header(p)
        if first is None:
            bad = p.with_name(p.name + ".corrupt")
            os.replace(p, bad)
            rec.corrupt_segments.append(bad.name)
            continue
        segs.append(Segment(first, p, p.stat().st_size))
    segs.sort(key=lambda s: s.first)
    for a, b in zip(segs, segs[1:]):
        a.end = b.first                        # exact unless corrupt: read() reports the gap then
    c, rec.cursor = read_cursor(directory)
    cur = c.cursor if c is not None else None
    if segs:
        last = segs[-1]
        last.end, cut, last.size = scan_tail(last.path, last.first, max_record_bytes)
        rec.truncated_bytes = cut
        next_seq = last.end
        recorded = c.next_seq if c is not None and c.next_seq is not None else 0
        # a cut frame past it was settled only under none (an append settles when it returns)
        rec.torn_records = max(recorded - next_seq, 1 if cut and fsync == "none" else 0)
        if cur is None:
            rec.cursor = "reset"                 # missing or damaged: replay all (duplicates, no loss)
        if cur is None or cur < segs[0].first:
            cur = segs[0].first
        cur = min(cur, next_seq)
    else:
        cur = cur or 0
        next_seq = max(cur, c.next_seq or 0) if c is not None else cur
    return segs, next_seq, cur, rec
