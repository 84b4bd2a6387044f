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

from hostwall.bpf.clock import Clock

__all__ = ["iso_ns", "iso_column", "parse_iso_ns", "wall_ns", "created_now"]


def iso_ns(wall_ns: int) -> str:
    """RFC 3339 UTC with microseconds, e.g. 2024-05-01T12:00:00.123456Z (truncated, never rounded up,
    so a start never prints after the end it precedes)."""
    sec, ns = divmod(int(wall_ns), 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec)) + f".{ns // 1000:06d}Z"


_SAFE_NS = 1 << 62                 # 2116-02-20: datetime64[ns] and int64 arithmetic stay exact below it


def iso_column(mono_ns: np.ndarray, clock) -> list[str]:
    """iso_ns(clock.wall_ns(t)) for every t of a u64 column of monotonic ns, as a list of str.

    With a plain hostwall.bpf.clock.Clock and instants in [1970, 2116) this is vectorised
    (iso_text); anything else (another clock object, out-of-range instants) goes through iso_ns one
    by one, so the text is always iso_ns's. Cost: ~0.05 µs per instant vectorised, ~1.5 µs otherwise."""
    offset = getattr(clock, "offset_ns", None)
    if type(clock).wall_ns is Clock.wall_ns and isinstance(offset, int) and len(mono_ns) \
            and abs(offset) < _SAFE_NS and int(mono_ns.max()) < _SAFE_NS:
        wall = mono_ns.astype(np.int64) + np.int64(offset)
        if int(wall.min()) >= 0 and int(wall.max()) < _SAFE_NS:
            return iso_text(wall)
    wall_of = clock.wall_ns
    return [iso_ns(wall_of(t)) for t in mono_ns.tolist()]


_DIGITS3 = np.array([f"{i:03d}".encode() for i in range(1000)], "S3")     # i → its 3 digits


def iso_text(wall: np.ndarray) -> list[str]:
    """iso_ns of every instant of an int64 column of wall ns in [0, _SAFE_NS): the seconds as text once
    per distinct second (np.datetime_as_string over np.unique: a batch spans few seconds), the
    microseconds (truncated, as iso_ns) by table lookup, 3 digits at a time; each instant's 27 bytes and
    a newline in one array, decoded once and split in C. The text of np.datetime_as_string(unit="us",
    timezone="UTC") on the µs-floored column, ~4x faster (docs/benchmarks.md, issue 17 collector)."""
    secs, us = np.divmod(wall // 1000, 1_000_000)
    uniq, inverse = np.unique(secs, return_inverse=True)
    heads = np.datetime_as_string(uniq.astype("datetime64[s]"), unit="s").astype("S19")
    out = np.empty((len(wall), 28), np.uint8)
    out[:, :19] = heads[inverse.reshape(-1)].view(np.uint8).reshape(-1, 19)
    out[:, 19] = ord(".")
    out[:, 20:23] = _DIGITS3[us // 1000].view(np.uint8).reshape(-1, 3)
    out[:, 23:26] = _DIGITS3[us % 1000].view(np.uint8).reshape(-1, 3)
    out[:, 26] = ord("Z")
    out[:, 27] = ord("\n")
    return out.tobytes()[:-1].decode("ascii").split("\n")


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
