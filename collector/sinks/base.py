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
as lost ("sink_error") before re-raising, and the pipeline stops the service.
"""
from __future__ import annotations

import asyncio
import enum
from collections import Counter
from typing import Any, Protocol, runtime_checkable


class FullQueuePolicy(enum.StrEnum):
    BLOCK = "block"
    DROP_OLDEST = "drop_oldest"
    DROP_NEWEST = "drop_newest"


class SinkUnavailable(RuntimeError):
    """This build cannot run the requested sink (or encoding); raised at start, not at parse."""


@runtime_checkable
class Sink(Protocol):
    name: str
    full_queue_policy: FullQueuePolicy

    async def start(self) -> None: ...

    async def send(self, records: list[dict]) -> None: ...

    async def flush(self) -> None: ...

    async def close(self) -> None: ...

    def stats(self) -> dict: ...


class BaseSink:
    """Counters and the send() template. Subclasses implement `_send(records)` and call
    `_deliver(n)` / `_lose(reason, n)` for every record of it. Cost: O(1) per call."""

    full_queue_policy = FullQueuePolicy.BLOCK

    def __init__(self, name: str):
        self.name = name
        self.delivered = 0
        self.lost: Counter = Counter()
        self.in_flight = 0
        self.batches = 0
        self.last_error: str | None = None

    async def start(self) -> None:
        pass

    async def send(self, records: list[dict]) -> None:
        n = len(records)
        self.in_flight += n
        before = self.delivered + sum(self.lost.values())
        try:
            await self._send(records)
        except BaseException as e:
            done = self.delivered + sum(self.lost.values()) - before
            self._lose("cancelled" if isinstance(e, asyncio.CancelledError) else "sink_error", n - done)
            self.last_error = f"{type(e).__name__}: {e}"
            raise
        finally:
            self.batches += 1

    async def _send(self, records: list[dict]) -> None:
        raise NotImplementedError

    async def flush(self) -> None:
        pass

    async def close(self) -> None:
        pass

    def _deliver(self, n: int) -> None:
        self.delivered += n
        self.in_flight -= n

    def _lose(self, reason: str, n: int) -> None:
        if n > 0:
            self.lost[reason] += n
            self.in_flight -= n

    def stats(self) -> dict[str, Any]:
        return {"policy": self.full_queue_policy.value, "delivered": self.delivered, "lost": dict(self.lost),
                "in_flight": self.in_flight, "batches": self.batches, "last_error": self.last_error}
