"""Quantities with units in configuration files: durations and bit rates (docs/policy.md)."""
from __future__ import annotations

import math
import re

_QTY = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([A-Za-z]*)\s*$")
_RATE_UNITS = {"": 1, "bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9, "tbit": 10**12}
_DURATION_UNITS = {"": 1.0, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_rate(v: int | float | str) -> int:
    """Bits per second: 20000000, '20Mbit', '1Gbit', '500kbit' (decimal prefixes). Must be > 0."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a rate; use bits/s like 20Mbit")
    if isinstance(v, (int, float)):
        val = float(v)
    else:
        m = _QTY.match(v)
        if not m:
            raise ValueError(f"malformed rate {v!r}; use a number with a unit, like 20Mbit or 500kbit")
        unit = m.group(2).lower()
        if unit not in _RATE_UNITS:
            raise ValueError(f"unknown rate unit {m.group(2)!r} in {v!r}; use bit, kbit, Mbit, Gbit or Tbit "
                             "(bits per second)")
        val = float(m.group(1)) * _RATE_UNITS[unit]
    out = int(round(val))
    if out <= 0:
        raise ValueError(f"rate {v!r} must be greater than 0")
    return out


def parse_duration(v: int | float | str) -> float:
    """Seconds: 3, 1.5, '500ms', '3s', '2m', '1h'. Must be > 0."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a duration; use e.g. 500ms, 3s, 2m, 1h")
    if isinstance(v, (int, float)):
        val = float(v)
    else:
        m = _QTY.match(v)
        if not m:
            raise ValueError(f"malformed duration {v!r}; use e.g. 500ms, 3s, 2m, 1h")
        unit = m.group(2).lower()
        if unit not in _DURATION_UNITS:
            raise ValueError(f"unknown duration unit {m.group(2)!r} in {v!r}; use ms, s, m or h")
        val = float(m.group(1)) * _DURATION_UNITS[unit]
    if not val > 0 or math.isinf(val):
        raise ValueError(f"duration {v!r} must be greater than 0")
    return val
