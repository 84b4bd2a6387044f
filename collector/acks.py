"""End-to-end acknowledgement (docs/collector.md "Delivery and loss"): which fanned-out batches every
at_least_once sink has made durable, and the commits that wait for them.

Every batch the pipeline fans out gets a Ticket with its fan-out index. Each at_least_once sink settles
its batches in order (collector.sinks.base: `settled_calls`), and its k-th batch is fan-out batch k, so the
*frontier* — the smallest `settled_calls` over those sinks — says that every batch below it is durable
in every at_least_once sink or counted lost. `advance(frontier)` resolves the tickets below it (True);
`abandon()` resolves the rest (False: the service stopped before they were durable, so their kernel data
stays where it is for the next collector).

The CommitLog keeps the actions that release kernel data or move a checkpoint, in fan-out order: an
entry runs when its ticket resolved True and every entry before it ran; an entry without a ticket (e.g.
a ring read that held only undecodable events) runs as soon as it is first in line. Because tickets
resolve in index order, one FIFO serves every source. Cost: O(1) per batch and per entry.
"""
from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

__all__ = ["Acks", "CommitEntry", "CommitLog", "Ticket"]


class Ticket:
    """One fanned-out batch. `done` is a future: True once durable, False if abandoned."""
    __slots__ = ("index", "done")

    def __init__(self, index: int, done: asyncio.Future):
        self.index = index
        self.done = done

    async def wait(self) -> bool:
        return await asyncio.shield(self.done)


class Acks:
    def __init__(self) -> None:
        self.issued = 0
        self.frontier = 0
        self._open: deque[Ticket] = deque()

    def issue(self) -> Ticket:
        t = Ticket(self.issued, asyncio.get_running_loop().create_future())
        self.issued += 1
        self._open.append(t)
        return t

    def dead(self) -> Ticket:
        """The ticket of a batch never fanned out (the shutdown closed the sinks' queues): resolved not
        durable, outside the issued sequence (index -1), so nothing waits on it and nothing commits."""
        t = Ticket(-1, asyncio.get_running_loop().create_future())
        t.done.set_result(False)
        return t

    def advance(self, frontier: int) -> int:
        """Resolve every ticket below `frontier` as durable; returns how many were resolved."""
        frontier = min(frontier, self.issued)
        if frontier <= self.frontier:
            return 0
        self.frontier = frontier
        n = 0
        while self._open and self._open[0].index < frontier:
            t = self._open.popleft()
            if not t.done.done():
                t.done.set_result(True)
            n += 1
        return n

    def abandon(self) -> int:
        """Resolve every open ticket as not durable (shutdown); returns how many."""
        n = len(self._open)
        while self._open:
            t = self._open.popleft()
            if not t.done.done():
                t.done.set_result(False)
        return n

    @property
    def open(self) -> int:
        return len(self._open)


@dataclass
class CommitEntry:
    """before(): bookkeeping run in order once durable (moves the in-memory checkpoint); after():
    the kernel-side effect, run once the checkpoint that includes it has been written (or None)."""
    ticket: Ticket | None
    before: Callable[[], None]
    after: Callable[[], Awaitable[None]] | None = None


class CommitLog:
    def __init__(self) -> None:
        self._q: deque[CommitEntry] = deque()
        self.committed = 0

    def add(self, entry: CommitEntry) -> None:
        self._q.append(entry)

    def __len__(self) -> int:
        return len(self._q)

    def take_ready(self) -> tuple[list[CommitEntry], bool]:
        """The leading entries whose tickets are durable (their `before` already run, in order), and
        whether an abandoned ticket blocks the rest for good."""
        ready: list[CommitEntry] = []
        while self._q:
            e = self._q[0]
            if e.ticket is not None:
                if not e.ticket.done.done():
                    break
                if not e.ticket.done.result():
                    return ready, True
            self._q.popleft()
            e.before()
            ready.append(e)
        self.committed += len(ready)
        return ready, False

    def drop_all(self) -> int:
        n = len(self._q)
        self._q.clear()
        return n
