"""Time in records: RFC 3339 text with microseconds, and the instants a record carries.

Kernel times are CLOCK_MONOTONIC ns from the datapath's precise clock (bpf/env.h hw_precise); the
record builder turns them into wall time with hostwall.bpf.clock.Clock and writes them here. The
datapath's tick clock (4 ms here) ages conntrack entries and never reaches a record
(docs/datapath.md "Clock"). Resolution in the text is 1 µs; `event.duration` keeps ns as an integer.
"""
from __future__ import annotations

import time
from datetime import UTC, datetime

import numpy as np

__all__ = ["iso_ns", "parse_iso_ns", "wall_ns", "created_now"]


def iso_ns(wall_ns: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2024-05-01T12:00:00.123456Z (truncated, never rounded up,
    so a start never prints after the end it precedes)."""
    sec, ns = divmod(int(wall_ns), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns // 1000:06d}Z"


def parse_iso_ns(s: str) -> int:
    """Inverse of iso_ns (any RFC 3339 'Z' or offset timestamp), in ns since the epoch."""
    dt = datetime.fromisoformat(s.replace("Z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return (int(dt.timestamp()) * 1_000_000_000) + dt.microsecond * 1000


def wall_ns(t: float | int) -> int:
    """Window bounds may come as seconds since the epoch (float) or ns since the epoch (int)."""
    return int(t) if isinstance(t, (int, np.integer)) and t > 10**14 else int(round(float(t) * 1e9))


def created_now() -> str:
    """`event.created`: when the collector makes a record (one clock read per batch)."""
    return iso_ns(time.time_ns())
