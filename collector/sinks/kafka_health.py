"""The Kafka sink's health: which errors retrying can fix, delivery latency, and the age of the oldest
spooled record (collector/sinks/kafka.py; states in collector/sinks/base.py).

Errors are classified by aiokafka.errors (and ssl) class, never by message text:
  REJECTED   a record the broker will never take (too large, corrupt, bad timestamp or format): counted
             lost (`rejected`), the rest goes on
  FATAL      retrying cannot fix it — authentication, authorization, TLS: the sink is `failing`, keeps
             spooling (bounded), and says what to change; a connection probe (kafka_probe.py) also
             reports an unknown topic with auto-creation off this way
  anything else (connection, timeouts, leader changes, a dead sender) is retried with backoff while
  the sink is `degraded` (spooling)
Health: ok (direct delivery), degraded (spooling while the broker is down or slow, or replaying),
failing (a FATAL error, or the spool is full so new records are counted lost).
"""
from __future__ import annotations

import bisect
import ssl
import time
from collections import deque

import aiokafka.errors as Errors

__all__ = ["FATAL", "LATENCY_BUCKETS_S", "REJECTED", "LatencyHistogram", "SpoolAge", "is_fatal", "is_rejected"]

REJECTED = (Errors.MessageSizeTooLargeError, Errors.RecordTooLargeError, Errors.RecordListTooLargeError,
            Errors.CorruptRecordException, Errors.InvalidTimestampError, Errors.UnsupportedForMessageFormatError)
FATAL = (Errors.SaslAuthenticationFailed, Errors.AuthenticationFailedError, Errors.AuthenticationMethodNotSupported,
         Errors.UnsupportedSaslMechanismError, Errors.IllegalSaslStateError, Errors.TopicAuthorizationFailedError,
         Errors.ClusterAuthorizationFailedError, Errors.TransactionalIdAuthorizationFailed, ssl.SSLError)
LATENCY_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
                     120.0, 300.0)


def is_rejected(e: BaseException | None) -> bool:
    return isinstance(e, REJECTED)


def is_fatal(e: BaseException | None) -> bool:
    return isinstance(e, FATAL)


def err_name(e: BaseException) -> str:
    return type(e).__name__


class LatencyHistogram:
    """Enqueue → broker acknowledgement, per record (weighted by batch size). O(log buckets) per batch."""

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.sum_s = 0.0
        self.n = 0

    def add(self, s: float, n: int) -> None:
        self.counts[bisect.bisect_left(LATENCY_BUCKETS_S, s)] += n
        self.sum_s += s * n
        self.n += n

    def quantile(self, q: float) -> float | None:
        """Upper bucket bound holding quantile q of delivered records (s); None before any delivery."""
        if not self.n:
            return None
        want, acc = q * self.n, 0
        for i, c in enumerate(self.counts):
            acc += c
            if acc >= want:
                return LATENCY_BUCKETS_S[i] if i < len(LATENCY_BUCKETS_S) else float("inf")
        return float("inf")

    def stats(self) -> dict:
        p99 = self.quantile(0.99)
        return {"buckets_s": list(LATENCY_BUCKETS_S), "counts": list(self.counts), "sum_s": round(self.sum_s, 6),
                "count": self.n, "p99_s": p99 if p99 != float("inf") else None}


class SpoolAge:
    """When the oldest record still in the spool was enqueued: (first spool seq, enqueue time) marks, one
    per append, dropped as the spool's cursor passes them. O(1) amortised per append and per query."""

    def __init__(self) -> None:
        self._marks: deque[tuple[int, int, float]] = deque()     # [first, end) seqs, enqueue time

    def mark(self, first: int, end: int, t_enq: float) -> None:
        if end > first:
            self._marks.append((first, end, t_enq))

    def oldest(self, cursor: int, pending: int) -> float | None:
        """Enqueue time of the oldest unacknowledged record, None when the spool holds none."""
        while self._marks and self._marks[0][1] <= cursor:
            self._marks.popleft()
        if not pending:
            return None
        return self._marks[0][2] if self._marks else None

    def age_s(self, cursor: int, pending: int) -> float | None:
        t = self.oldest(cursor, pending)
        return None if t is None else max(0.0, time.time() - t)
