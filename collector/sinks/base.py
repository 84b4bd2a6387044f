"""The sink contract, and a base class that keeps a sink's accounting honest.

A sink receives lists of canonical records (ECS-shaped dicts, shared between sinks: treat them as
read-only) and encodes them itself. The pipeline puts a bounded queue in front of every sink; what
happens when that queue is full is the sink's declared `full_queue_policy`:

    block        the pipeline waits for room; back-pressure reaches the ring-buffer reader, which
                 stops reading, and the kernel counts `ringbuf_full` (local files: nothing is lost in
                 user space for lack of room)
    drop_oldest  the oldest queued batch is dropped and counted (`queue_full`) — fresh data first
                 (network exporters such as OTLP)
    drop_newest  the incoming batch is dropped and counted (`queue_full`)

Accounting contract (checked by the ledger): every record passed to `send()` is, from the moment
send() is called, exactly one of delivered, lost (with a reason) or in flight, as reported by
`stats()` {"policy", "delivered", "lost": {reason: n}, "in_flight"} (cumulative). An exception out
of send() means the sink is broken; BaseSink counts whatever the failed call had not accounted for
as lost ("sink_error") before re-raising, and the pipeline stops the service. A cancelled send (the
shutdown deadline): by default (`_cancelled`) every record of the call not counted yet is lost
("cancelled") and the call settles (best_effort sinks). JSONL, Kafka and OTLP `at_least_once` override
it: what they never made durable stays in flight, its call unsettled, and the shutdown counts it
`requeued` (kept in the kernel); JSONL's written records settle at the next sync (close's flush), Kafka
counts what it did take over when its fate is known (acknowledged, or spooled: carried_over).

Durability (docs/collector.md "Delivery and loss"): a sink is `at_least_once` (JSONL, Kafka: the
pipeline releases kernel data only once they made it durable) or `best_effort` (console, OTLP by
default: never waited for). Every send() call is one pipeline batch, a send_many() call several (what
queued up while the sink was busy, sent as one); a batch is *settled* when each of its records is
durable (written and fdatasync'ed per the sink's policy, acknowledged by a broker, or in a spool that was
synced) or counted lost. Calls settle in order: `settled_calls` is the number of pipeline batches of the
leading calls that are settled (monotone), and `on_settle` (set by the pipeline) is called whenever it
grows. Sinks that track durability themselves set `tracks_durability` and call `_settle(call, n)`;
for the others a call settles when send() returns. Cost: O(1) per call and per settlement.

Health (`health()`): `ok`, `degraded` (delivering, but not the normal way or not right now: e.g. a
Kafka sink spooling while its broker is down — retrying will fix it) or `failing` (retrying cannot
fix it: credentials, permissions, TLS, a missing topic, a full spool or disk; records are counted lost
or wait), with the last error and when the sink last succeeded. State changes are logged once each.
"""
from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable

log = logging.getLogger("hostwall.collector.sinks")


class FullQueuePolicy(enum.StrEnum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


class Durability(enum.StrEnum):
    AT_LEAST_ONCE = "at_least_once"
    BEST_EFFORT = "best_effort"


class Health(enum.StrEnum):
    OK = "ok"
    DEGRADED = "degraded"
    FAILING = "failing"


class SinkUnavailable(RuntimeError):
    """This build cannot run the requested sink (or encoding), or it cannot work with its destination
    (credentials, TLS, a missing topic); raised at start, not at parse. The message is one line."""


@runtime_checkable
class Sink(Protocol):
    """What the pipeline needs of a sink (collector.parts lists the pipeline's other parts)."""
    name: str
    full_queue_policy: FullQueuePolicy
    durability: Durability
    settled_calls: int
    on_settle: Callable[[], None] | None

    async def start(self) -> None: ...

    async def send(self, records: list[dict]) -> None: ...

    # optional: async def send_many(self, batches: list[list[dict]]) -> None (BaseSink has it)

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    def stats(self) -> dict: ...

    def health(self) -> dict: ...


class Call:
    """One send() or send_many() call — `batches` pipeline batches — until each of its records is settled."""
    __slots__ = ("remaining", "batches")

    def __init__(self, n: int, batches: int = 1):
        self.remaining = n
        self.batches = batches


class BaseSink:
    """Counters, durability bookkeeping and the send() template. Subclasses implement `_send(records)`
    and call `_deliver(n)` / `_lose(reason, n)` for every record of it (and `_settle` when they set
    `tracks_durability`). Cost: O(1) per call."""

    full_queue_policy = FullQueuePolicy.BLOCK
    durability = Durability.AT_LEAST_ONCE
    tracks_durability = False

    def __init__(self, name: str):
        self.name = name
        self.delivered = 0
        self.lost: Counter = Counter()
        self.in_flight = 0
        self.batches = 0
        self.last_error: str | None = None
        self.settled_calls = 0
        self.on_settle: Callable[[], None] | None = None
        self._calls: deque[Call] = deque()
        self._call: Call | None = None             # the call send() is working on
        self._lost_seqs: dict[tuple[str, str], Any] = {}   # (stream, reason) -> SeqRanges, until taken
        self._health = Health.OK
        self._health_why = ""
        self.last_success_at: float | None = None
        self.health_changes = 0

    async def start(self) -> None:
        pass

    async def send(self, records: list[dict]) -> None:
        await self._send_call(records, 1)

    async def send_many(self, batches: list[list[dict]]) -> None:
        """Several pipeline batches in one call (the pipeline's sink worker takes what queued up while the
        sink was busy: docs/collector.md "Delivery and loss"). Settles as len(batches) calls, in order."""
        if len(batches) == 1:
            await self._send_call(batches[0], 1)
        else:
            await self._send_call([r for b in batches for r in b], len(batches))

    async def _send_call(self, records: list[dict], batches: int) -> None:
        n = len(records)
        self.in_flight += n
        before = self.delivered + sum(self.lost.values())
        call = self._call = Call(n, batches)
        self._calls.append(call)
        try:
            await self._send(records)
        except BaseException as e:
            done = self.delivered + sum(self.lost.values()) - before
            self.last_error = f"{type(e).__name__}: {e}"
            if isinstance(e, asyncio.CancelledError):
                self._cancelled(call, n - done)
            else:
                self._lose("sink_error", n - done)
                self._settle(call, call.remaining)      # counted lost: nothing left to wait for
            raise
        finally:
            self.batches += batches
            self._call = None
        if not self.tracks_durability:
            self._settle(call, call.remaining)

    def _cancelled(self, call: Call, left: int) -> None:
        """A send cancelled (the shutdown deadline): the `left` records it had not counted are lost
        (`cancelled`) and the call is settled. A sink that keeps records past a cancelled send (Kafka: a
        batch in the producer, records in the spool) overrides this and counts only what it never took."""
        self._lose("cancelled", left)
        self._settle(call, call.remaining)

    def _settle(self, call: Call | None, n: int) -> None:
        """n more records of `call` are durable or counted lost. Idempotence is the caller's job."""
        if call is None or n <= 0:
            return
        call.remaining -= n
        if call.remaining > 0 or not self._calls or self._calls[0] is not call:
            return
        done = 0
        while self._calls and self._calls[0].remaining <= 0:
            done += self._calls.popleft().batches
        self.settled_calls += done
        if self.on_settle is not None:
            self.on_settle()

    @property
    def unsettled_calls(self) -> int:
        """Pipeline batches whose call began and is not settled yet."""
        return sum(c.batches for c in self._calls)

    # ---- health ------------------------------------------------------------------------------
    def _set_health(self, state: Health, why: str = "") -> None:
        """Move to `state`; one log line per change (never per retry)."""
        if state is self._health:
            if why:
                self._health_why = why
            return
        old, self._health, self._health_why = self._health, state, why
        self.health_changes += 1
        level = logging.INFO if state is Health.OK else logging.WARNING if state is Health.DEGRADED else logging.ERROR
        log.log(level, "sink %s: %s -> %s%s", self.name, old.value, state.value, f": {why}" if why else "")

    def _succeeded(self) -> None:
        self.last_success_at = time.time()

    def health(self) -> dict:
        """{state, reason, last_error, last_success_at, since_success_s} (JSON-ready)."""
        now = time.time()
        return {"state": self._health.value, "reason": self._health_why or None, "last_error": self.last_error,
                "last_success_at": self.last_success_at,
                "since_success_s": None if self.last_success_at is None else round(now - self.last_success_at, 3),
                "durability": self.durability.value}

    async def _send(self, records: list[dict]) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _deliver(self, n: int) -> None:
        self.delivered += n
        self.in_flight -= n
        if n > 0:
            self._succeeded()

    def _lose(self, reason: str, n: int) -> None:
        if n > 0:
            self.lost[reason] += n
            self.in_flight -= n

    def _lose_records(self, reason: str, records: list[dict]) -> None:
        """Count `records` lost for `reason`, and remember their hostwall.seq per stream so the pipeline
        can publish a loss record that explains the gap (collector/loss_report.py)."""
        from hostwall.collector.loss_report import note_record_seqs
        self._lose(reason, len(records))
        note_record_seqs(self._lost_seqs, reason, records)

    def _lose_noted(self, reason: str, n: int, noted: dict[tuple[str, str], Any]) -> None:
        """Count n records lost whose hostwall.seq were noted beforehand ({(stream, reason): SeqRanges},
        collector/loss_report.py note_seqs): a sink that keeps their seqs, not the records, until their
        fate is known (JSONL until its fdatasync)."""
        self._lose(reason, n)
        for key, ranges in noted.items():
            acc = self._lost_seqs.get(key)
            if acc is None:
                self._lost_seqs[key] = ranges
            else:
                acc.merge(ranges)

    def _note_seqs(self, reason: str, hws) -> None:
        from hostwall.collector.loss_report import note_seqs
        note_seqs(self._lost_seqs, reason, hws)

    def take_lost_seqs(self) -> dict[tuple[str, str], Any]:
        """{(stream, reason): SeqRanges} noted since the last call."""
        out, self._lost_seqs = self._lost_seqs, {}
        return out

    def stats(self) -> dict[str, Any]:
        return {"policy": self.full_queue_policy.value, "delivered": self.delivered, "lost": dict(self.lost),
                "in_flight": self.in_flight, "batches": self.batches, "last_error": self.last_error,
                "durability": self.durability.value, "settled_calls": self.settled_calls,
                "unsettled_calls": self.unsettled_calls, "health": self.health()}
