"""The bounded queues between the pipeline's stages (docs/collector.md "Delivery and loss").

RecordQueue holds record batches in front of one sink, bounded in records; SinkSlot is one sink with
its queue and the counters the pipeline keeps for it. Cost: O(1) per batch.
"""
from __future__ import annotations

import asyncio
from collections import Counter, deque

from .loss_report import note_seqs
from .sinks.base import Durability, FullQueuePolicy, Sink

__all__ = ["RecordQueue", "SinkSlot"]


class RecordQueue:
    """FIFO of record batches bounded in records (not batches). Single consumer, many producers.

    wait_room(n) returns once n more records fit (or the queue is empty: a batch larger than the
    capacity is still accepted alone); put_nowait never blocks, so producers that awaited room
    and then put without awaiting can overshoot by at most one batch each (≤ 4 producers)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.size = 0
        self.closed = False
        self._dq: deque[list] = deque()
        self._data = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return self.size

    def has_room(self, n: int) -> bool:
        return self.size == 0 or self.size + n <= self.capacity

    async def wait_room(self, n: int) -> None:
        while not self.has_room(n):
            self._room.clear()
            await self._room.wait()

    def put_nowait(self, batch: list) -> None:
        self._dq.append(batch)
        self.size += len(batch)
        self._data.set()

    def pop_oldest(self) -> list:
        b = self._dq.popleft()
        self.size -= len(b)
        self._room.set()
        return b

    async def get(self, timeout: float | None = None) -> list | None:
        """Next batch; None when closed and empty, or on timeout (check `.closed`)."""
        while not self._dq:
            if self.closed:
                return None
            self._data.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._data.wait()
            except TimeoutError:
                return None
        return self.pop_oldest()

    async def get_many(self, max_records: int, timeout: float | None = None) -> list[list] | None:
        """The next batch and the batches queued behind it, up to max_records in all (the first batch
        whatever its size); None as get(). The adaptive part of the sink's batching: a sink that keeps up
        gets each batch alone, one that was busy gets everything that waited meanwhile in one call."""
        first = await self.get(timeout)
        if first is None:
            return None
        out, n = [first], len(first)
        while self._dq and n + len(self._dq[0]) <= max_records:
            b = self.pop_oldest()
            out.append(b)
            n += len(b)
        return out

    def close(self) -> None:
        self.closed = True
        self._data.set()

    def clear(self) -> int:
        n = self.size
        self._dq.clear()
        self.size = 0
        self._room.set()
        return n


class SinkSlot:
    """One sink, its queue, and the pipeline's counters for it. An at_least_once sink must block when
    its queue is full (it receives every batch, in order: the k-th batch it is sent — one per send(),
    several per send_many() — is fan-out batch k, which is what the acknowledgement frontier relies on)."""

    def __init__(self, sink: Sink, capacity: int):
        self.sink = sink
        self.name = sink.name
        self.policy = FullQueuePolicy(sink.full_queue_policy)
        self.durability = Durability(sink.durability)
        if self.durability is Durability.AT_LEAST_ONCE and self.policy is not FullQueuePolicy.BLOCK:
            raise ValueError(f"sink {self.name}: an at_least_once sink must block when full, not {self.policy.value}")
        self.queue = RecordQueue(capacity)
        self.dead = False
        self.seen_delivered = 0
        self.seen_lost: Counter = Counter()
        self.queue_dropped = 0
        self.abandoned = 0          # sink-internal in-flight records counted lost at shutdown
        self._shed_seqs: dict = {}  # (stream, reason) -> SeqRanges the pipeline shed for this sink, until taken

    def shed(self, reason: str, records: list[dict]) -> None:
        """Note the seqs of records the pipeline dropped in front of this sink (queue_full), for the loss
        record (docs/records.md "Completeness"). Cost: one pass over them."""
        note_seqs(self._shed_seqs, reason, ((r.get("hostwall") or {}) for r in records))

    def take_lost_seqs(self) -> list[tuple[tuple[str, str], object]]:
        """[((stream, reason), SeqRanges)] lost since the last call: shed here, and counted by the sink."""
        mine, self._shed_seqs = self._shed_seqs, {}
        return [*mine.items(), *self.sink.take_lost_seqs().items()]

    @property
    def acknowledges(self) -> bool:
        """Does the pipeline wait for this sink before releasing kernel data?"""
        return self.durability is Durability.AT_LEAST_ONCE
