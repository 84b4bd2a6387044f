"""hostwall.bpf.clock.clock_fit: the datapath clock's calibration arithmetic, on synthetic probes."""
from __future__ import annotations

import pytest

from hostwall.bpf.clock import clock_fit

OFF = 7_000_123_456          # CLOCK_MONOTONIC at jiffies 0 of the synthetic kernel


def probes(hz: int, n: int, lag_at: dict[int, int] | None = None, step_ns: int = 5_000_000):
    """(jiffies, coarse, ktime) every step_ns; lag_at: probe index -> ticks its jiffies lag behind."""
    tick = (1_000_000_000 + hz // 2) // hz
    out = []
    for i in range(n):
        kt = OFF + 10_000_000_000 + i * step_ns + 1234
        j = (kt - OFF) // tick - (lag_at or {}).get(i, 0)
        out.append((j, OFF + j * tick, kt))
    return out, tick


@pytest.mark.parametrize("hz", [100, 250, 300, 1000])
def test_tick_and_base_never_ahead(hz):
    samples, tick = probes(hz, 40)
    got_tick, base = clock_fit(samples)
    assert got_tick == tick
    assert all(0 <= k - ((j * tick + base) % (1 << 64)) <= 2 * tick for j, _, k in samples)


def test_a_lagging_jiffy_at_either_end_does_not_skew_the_tick():
    samples, tick = probes(250, 21, lag_at={0: 0, 20: 1}, step_ns=4_000_000)   # 20 ticks measured as 19
    assert clock_fit(samples)[0] == tick
    samples, _ = probes(250, 21, lag_at={0: 1}, step_ns=4_000_000)
    assert clock_fit(samples)[0] == tick


def test_an_unknown_hz_is_taken_as_measured():
    samples, tick = probes(64, 40, step_ns=20_000_000)
    assert clock_fit(samples)[0] == tick
