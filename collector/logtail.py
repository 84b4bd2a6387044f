"""Following an append-only JSONL file the enforcer writes in the instance state dir (the DNS proxy's
decision records, enforcer/dnsrecords.py), from a position the collector's status file remembers.

A position is (inode, offset). The writer rotates by renaming the file aside and starting a new one:
a new inode (or a file shorter than the offset) restarts at 0, so lines written to the old file after
the last read are not read (the writer rotates at tens of MB, the collector reads every second).
Whole lines only: a line being written stays for the next read. Cost: one stat(), and one read of
what was appended.
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

    @classmethod
    def resume(cls, path: str | os.PathLike, status_path: str | os.PathLike, key: str) -> JsonlTail:
        """Continue where the collector's last status file says (its `key` section: inode and offset), or
        from the start (re-shipped records keep their event.id: consumers deduplicate)."""
        try:
            prev = orjson.loads(Path(status_path).read_bytes()).get(key, {})
            return cls(path, (int(prev["inode"]), int(prev["offset"])))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(path)

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
        if st.st_ino != self.inode or st.st_size < self.offset:
            self.inode, self.offset = st.st_ino, 0              # new or truncated file
        if st.st_size == self.offset:
            return [], 0
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(min(st.st_size - self.offset, self.max_bytes))
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
