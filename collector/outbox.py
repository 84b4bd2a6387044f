"""The outbox: records the collector makes from its own state (anomaly open/update/close, restart and
loss reports) survive a crash (docs/collector.md "Delivery and loss").

Kernel facts can be read again after a crash (the ring buffer, the drop maps, claimed conntrack entries,
the enforcer's audit log), but an anomaly record comes from the detector's memory. So such a batch is
appended to this file and fdatasync'ed *before* it is fanned out, and leaves the file once every
at_least_once sink has it durable; a collector that starts with records in the outbox sends them first
(same event.id and hostwall.seq: a duplicate at worst, never a loss).

Format: JSON Lines, one record per line, in fan-out order. A settled batch names its records (stream and
hostwall.seq), not a count: a restart resends the outbox grouped by stream, so batches may settle in
another order than they were appended, and a batch whose append failed has no lines here. Removing the
settled records rewrites the file (tmp, fdatasync, rename, directory fsync: after a machine crash the
file holds the old records or the new ones, never an empty file in their place; a crash before the
rename only sends the settled ones again). An append that creates the file fsyncs the directory too,
so the new name is as durable as its lines. A line torn by a kill during the append (records never fanned out, counted `outbox_torn` by the
caller) is cut by load(), which rewrites the file without it: the next append must not be glued to it.
Cost: one write + fdatasync per batch (anomaly records are a few per minute; + a directory fsync when
the file is new), one rewrite + fdatasync + directory fsync per settled batch; memory: the records not
settled yet.
"""
from __future__ import annotations

import os
from pathlib import Path

import orjson

from .sinks.spool_format import fsync_dir, open_append

__all__ = ["Outbox"]


class Outbox:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._pending: dict[tuple, bytes] = {}   # record key -> encoded line, not settled yet, in order
        self.damaged = 0                    # lines found unreadable at load (a torn last line)
        self.appended = 0
        self._torn_tail = False             # the file ends in a fragment load could not cut

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
                r = orjson.loads(line)
            except orjson.JSONDecodeError:
                self.damaged += 1
                continue
            out.append(r)
            self._pending[record_key(r)] = line + b"\n"
        if self.damaged or not raw.endswith(b"\n"):
            # cut the torn line before anything is appended after it; if the file cannot be rewritten
            # (a full disk), the next append starts with a newline so it is not glued to the fragment
            self._torn_tail = not self._rewrite() and not raw.endswith(b"\n")
        return out

    def append(self, records: list[dict]) -> None:
        """Make `records` durable here before they are fanned out (raises OSError: the caller counts)."""
        lines = [orjson.dumps(r) + b"\n" for r in records]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, created = open_append(self.path)
        try:
            os.write(fd, (b"\n" if self._torn_tail else b"") + b"".join(lines))
            os.fdatasync(fd)
        finally:
            os.close(fd)
        self._torn_tail = False
        for r, line in zip(records, lines):
            self._pending[record_key(r)] = line
        self.appended += len(lines)
        if created:                         # (a failure raises with the lines pending: settle removes them)
            fsync_dir(self.path.parent)

    def settle(self, records: list[dict]) -> None:
        """`records` are durable in every at_least_once sink: forget them (records not here: ignored)."""
        gone = [self._pending.pop(record_key(r), None) for r in records]
        if any(g is not None for g in gone):
            self._rewrite()

    def _rewrite(self) -> bool:
        """The file := the records not settled (tmp, fdatasync, rename, directory fsync; removed when none:
        an unlink lost to a crash only sends settled records again). False if it failed."""
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            if not self._pending:
                self.path.unlink(missing_ok=True)
                return True
            with open(tmp, "wb") as f:
                f.write(b"".join(self._pending.values()))
                f.flush()
                os.fdatasync(f.fileno())
            os.replace(tmp, self.path)
            fsync_dir(self.path.parent)
            return True
        except OSError:
            return False                    # settle: sent again after a restart (a duplicate, not a loss)

    def __len__(self) -> int:
        return len(self._pending)


def record_key(record: dict) -> tuple:
    """(stream, hostwall.seq): one record's name in its stream (its sorted encoding if it has no seq)."""
    h = record.get("hostwall") or {}
    seq = h.get("seq")
    if isinstance(seq, int):
        return h.get("stream"), seq
    return None, orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
