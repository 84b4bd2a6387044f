"""Jittered exponential backoff, the one helper every retry loop of the collector uses (the Kafka
sink's reconnects and replays, the OTLP sink's pause after a failed export): step n waits
min(cap, base * 2**n) scaled by a uniform jitter in [jitter_lo, 1] (full-ish jitter, so many collectors
that lost the same broker do not retry in lockstep), and reset() starts over after a success.
Cost: O(1); no sleeping here (callers sleep, and check for shutdown while they do).
"""
from __future__ import annotations

import random

__all__ = ["Backoff"]


class Backoff:
    def __init__(self, base_s: float, cap_s: float, *, jitter_lo: float = 0.5, rng: random.Random | None = None):
        if not 0 < base_s <= cap_s or not 0 <= jitter_lo <= 1:
            raise ValueError(f"need 0 < base ({base_s}) <= cap ({cap_s}) and 0 <= jitter_lo ({jitter_lo}) <= 1")
        self.base_s, self.cap_s, self.jitter_lo = base_s, cap_s, jitter_lo
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The next delay (s), and count one more failure."""
        d = min(self.cap_s, self.base_s * (2 ** min(self.failures, 60)))
        self.failures += 1
        return d * self._rng.uniform(self.jitter_lo, 1.0)

    def reset(self) -> None:
        self.failures = 0
