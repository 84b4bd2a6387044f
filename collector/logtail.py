"""Following an append-only JSONL file the enforcer writes in the instance state dir (its audit log and
the DNS proxy's decision records, enforcer/dnsrecords.py), from a position the collector checkpoints once
the records of the lines before it are durable (collector/sources.py).

A position is (inode, offset). The writer rotates by renaming the file to `<name>.1` and starting a new
one: on a new inode the rest of `.1` is read first when it is the file of the position (lines written
after the last read, or while no collector ran), then the new file from 0. A file shorter than the
offset was truncated: read from 0. Two rotations between reads lose the middle file (the writer rotates
at tens of MB, the collector reads every second).
Whole lines only: a line being written stays for the next read. Cost: one stat(), and one read of
what was appended (at most max_bytes per call; the rest is read by the next).
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson

__all__ = ["JsonlTail"]


class JsonlTail:
    def __init__(self, path: str | os.PathLike, position: tuple[int, int] = (0, 0), max_bytes: int = 8 << 20):
        self.path = Path(path)
        self.inode, self.offset = position
        self.max_bytes = max_bytes

    @property
    def position(self) -> tuple[int, int]:
        return self.inode, self.offset

    def status(self) -> dict:
        return {"path": str(self.path), "inode": self.inode, "offset": self.offset}

    def read(self) -> tuple[list[dict], int]:
        """(new records, lines that were not JSON objects)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return [], 0
        if st.st_ino != self.inode:
            rest = self._rotated_rest()
            if rest is not None:
                return rest
            self.inode, self.offset = st.st_ino, 0              # a new file
        elif st.st_size < self.offset:
            self.offset = 0                                     # truncated
        return self._read(self.path, st.st_size)

    def _rotated_rest(self) -> tuple[list[dict], int] | None:
        """What is left of the file being read when the writer rotated it to `.1` meanwhile (None: not
        ours, or read to its end: go on with the new file)."""
        try:
            st = os.stat(self.path.with_name(self.path.name + ".1"))
        except FileNotFoundError:
            return None
        if not self.inode or st.st_ino != self.inode or st.st_size <= self.offset:
            return None
        before = self.offset
        got = self._read(self.path.with_name(self.path.name + ".1"), st.st_size)
        return got if self.offset != before else None           # a torn last line: the writer moved on

    def _read(self, path: Path, size: int) -> tuple[list[dict], int]:
        if size == self.offset:
            return [], 0
        with open(path, "rb") as f:
            f.seek(self.offset)
            data = f.read(min(size - self.offset, self.max_bytes))
        end = data.rfind(b"\n") + 1
        out, bad = [], 0
        for line in data[:end].splitlines():
            if not line.strip():
                continue
            try:
                rec = orjson.loads(line)
            except orjson.JSONDecodeError:
                bad += 1
                continue
            if isinstance(rec, dict):
                out.append(rec)
            else:
                bad += 1
        self.offset += end
        return out, bad
