"""Kernel clocks from user space.

- `Clock`: CLOCK_MONOTONIC ns (bpf_ktime_get_ns and its coarse variant) → wall time (records).
- `calibrate_clock`: the datapath's own clock, scaled jiffies, fitted to CLOCK_MONOTONIC at load
  (docs/datapath.md "Clock").
"""
from __future__ import annotations

import time

import numpy as np

from . import bpfsys


class Clock:
    """CLOCK_MONOTONIC ns (what bpf_ktime_get_ns and the coarse variant read) → wall time.

    wall_ns = mono_ns + offset_ns. calibrate() measures the offset from the narrowest of a few
    (monotonic, realtime, monotonic) brackets, so the error is below a microsecond; call it again
    (cheap) after a wall-clock step if the pipeline wants to follow NTP steps."""

    def __init__(self, offset_ns: int):
        self.offset_ns = int(offset_ns)

    @classmethod
    def calibrate(cls, samples: int = 7) -> Clock:
        best = None
        for _ in range(samples):
            a = time.monotonic_ns()
            w = time.time_ns()
            b = time.monotonic_ns()
            if best is None or b - a < best[0]:
                best = (b - a, w - (a + b) // 2)
        return cls(best[1])

    @staticmethod
    def now() -> int:
        """Current CLOCK_MONOTONIC ns (the kernel timestamps' clock)."""
        return time.monotonic_ns()

    def wall_ns(self, mono_ns: int) -> int:
        return int(mono_ns) + self.offset_ns

    def __repr__(self) -> str:
        return f"Clock(offset_ns={self.offset_ns})"


_KNOWN_HZ = (100, 250, 300, 1000)     # CONFIG_HZ choices (x86 and most arches)


def calibrate_clock(probe_fd: int, span_s: float = 0.1, timeout_s: float = 2.0) -> tuple[int, int]:
    """(tick_ns, base_ns) such that jiffies * tick_ns + base_ns follows CLOCK_MONOTONIC at tick
    resolution, never ahead of it (1-2 ticks behind, like the kernel's coarse clock).

    The datapath reads time as scaled jiffies because the verifier inlines bpf_jiffies64 (one load)
    where clock helpers cost 20-35 ns a packet. Probes over ≥ span_s and ≥ 20 ticks give the tick rate;
    jiffies may lag a tick at either end (a busy machine), so the estimate is snapped to the nearest
    CONFIG_HZ choice when within 10 % of one; tick_ns is the kernel's TICK_NSEC for that HZ. Jiffies
    never lead the clock, so every probe's ktime - jiffies * tick bounds the offset from above; the
    smallest, less one tick, is at or below it. base_ns is stored modulo 2^64. Cost: ≈ span_s."""
    def probe() -> tuple[int, int, int]:     # (jiffies, coarse ns, ktime ns), read together
        return tuple(np.frombuffer(bpfsys.prog_test_run(probe_fd, bytes(64)).data_out[:24], dtype="<u8").tolist())
    samples = [probe()]
    start = time.monotonic()
    while samples[-1][0] - samples[0][0] < 20 or time.monotonic() - start < span_s:
        if time.monotonic() - start > timeout_s:
            raise RuntimeError("clock calibration: jiffies did not advance (is the kernel tick running?)")
        time.sleep(0.002)
        samples.append(probe())
    return clock_fit(samples)


def clock_fit(samples: list[tuple[int, int, int]]) -> tuple[int, int]:
    """calibrate_clock's arithmetic on (jiffies, coarse ns, ktime ns) probes, first and last ≥ 20 ticks apart."""
    (j0, c0, _), (j1, c1, _) = samples[0], samples[-1]
    measured = 1e9 * (j1 - j0) / (c1 - c0)
    known = min(_KNOWN_HZ, key=lambda hz: abs(hz - measured))
    hz = known if abs(known - measured) <= 0.1 * known else round(measured)
    tick = (1_000_000_000 + hz // 2) // hz
    return tick, (min(k - j * tick for j, _, k in samples) - tick) % (1 << 64)
