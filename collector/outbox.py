"""The outbox: records the collector makes from its own state (anomaly open/update/close, restart and
loss reports) survive a crash (docs/collector.md "Delivery and loss").

Kernel facts can be read again after a crash (the ring buffer, the drop maps, claimed conntrack entries,
the enforcer's audit log), but an anomaly record comes from the detector's memory. So such a batch is
appended to this file and fdatasync'ed *before* it is fanned out, and leaves the file once every
at_least_once sink has it durable; a collector that starts with records in the outbox sends them first
(same event.id and hostwall.seq: a duplicate at worst, never a loss).

Format: JSON Lines, one record per line, in fan-out order. Removing the leading settled records rewrites
the file (tmp + rename, no fsync: a crash before the rename only sends them again). Cost: one write +
fdatasync per batch (anomaly records are a few per minute), one rewrite per settled batch; memory: the
records not settled yet.
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._pending: list[bytes] = []     # encoded lines not settled yet, in order
        self.damaged = 0                    # lines found unreadable at load (a torn last line)
        self.appended = 0

    def load(self) -> list[dict]:
        """Records left by an earlier run, in order (a torn last line is dropped and counted)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return []
        out = []
        for line in raw.split(b"\n"):
            if not line.strip():
                continue
            try:
                out.append(orjson.loads(line))
                self._pending.append(line + b"\n")
            except orjson.JSONDecodeError:
                self.damaged += 1
        return out

    def append(self, records: list[dict]) -> None:
        """Make `records` durable here before they are fanned out (raises OSError: the caller counts)."""
        lines = [orjson.dumps(r) + b"\n" for r in records]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            os.write(fd, b"".join(lines))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._pending += lines
        self.appended += len(lines)

    def settle(self, n: int) -> None:
        """The first `n` pending records are durable in every at_least_once sink: forget them."""
        if n <= 0:
            return
        del self._pending[:n]
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            if not self._pending:
                self.path.unlink(missing_ok=True)
                return
            tmp.write_bytes(b"".join(self._pending))
            os.replace(tmp, self.path)
        except OSError:
            pass                            # sent again after a restart: a duplicate, not a loss

    def __len__(self) -> int:
        return len(self._pending)
