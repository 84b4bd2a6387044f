"""The pipeline's stop (part of collector.pipeline.Pipeline, docs/collector.md "Delivery and loss").

A healthy stop builds and ships everything read, exports a last drop interval, closes the sinks
within the shutdown timeout and commits what became durable; whatever is left is counted, never
dropped silently: records a sink accepted but never confirmed and events read but not built are
`requeued` (they stay in the kernel for the next collector) when the sink acknowledges, `shutdown`
otherwise. After a failure nothing more is released from the kernel. The checkpoint's clean_stop
tells the next start which of the two it was.
"""
from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("hostwall.collector")

__all__ = ["Shutdown"]


class Shutdown:
    """Mixin of collector.pipeline.Pipeline: its stop."""

    async def _shutdown(self) -> None:
        self._stopping = True
        self.state = "stopping"
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.shutdown_timeout_s
        for name in ("drops", "ct", "tick", "status", "ring"):
            await _cancel(self._tasks.get(name))
        if self._runs:                                   # let a drain / scan in progress finish
            done, _ = await asyncio.wait(set(self._runs), timeout=max(0.1, deadline - loop.time()))
            for r in done:
                if not r.cancelled() and r.exception() is not None and self._failure is None:
                    self._fail("periodic", r.exception())
        events = self._tasks.get("events")
        if self._failure is None and self.ring is not None and events is not None and not events.done():
            # healthy stop: everything read is built and shipped, and a last drop interval exported.
            # After a failure the rest stays in the kernel (ring, drop maps) for the next collector.
            try:
                async with asyncio.timeout(max(0.1, deadline - loop.time())):
                    await self._final_ring_drain()
                    await events
                    await self._export_drops()
                    await self._final_detach_scan()      # the enforcer detached: the ends of what it tracked
                    await self._fold_kernel()            # kernel losses since the last tick
                    await self._report_sink_losses()
            except TimeoutError:
                log.error("shutdown: record building did not finish in time; the rest stays in the kernel")
            except Exception as e:                      # noqa: BLE001 — reported, shutdown goes on
                log.error("shutdown: final drain failed: %s: %s", type(e).__name__, e)
        await _cancel(self._tasks.get("events"))
        # the commit loop may be fanning out a loss record (waiting for room): stop it before what is in
        # flight is counted; the last _commit_ready below does what it would have done
        await _cancel(self._tasks.get("commit"))
        self._count_abandoned()
        for s in self.slots:
            s.queue.close()
        workers = [self._tasks[f"sink {s.name}"] for s in self.slots if f"sink {s.name}" in self._tasks]
        if workers:
            _, pending = await asyncio.wait(workers, timeout=max(0.1, deadline - loop.time()))
            for t in pending:
                await _cancel(t)
        for s in self.slots:
            try:
                await asyncio.wait_for(s.sink.close(), timeout=max(0.5, deadline - loop.time()))
            except Exception as e:                      # noqa: BLE001
                log.error("shutdown: closing sink %s failed: %s", s.name, e)
            self._sync_sink(s)
            why = "requeued" if s.acknowledges else "shutdown"
            left = s.queue.clear()
            if left:
                self.ledger.sink_lose(s.name, why, left)
            st = s.sink.stats()
            if st.get("in_flight", 0) > 0:                 # accepted by the sink, never confirmed
                self.ledger.sink_lose(s.name, why, st["in_flight"])
                s.abandoned = st["in_flight"]
        await _cancel(self._tasks.get("commit"))
        if self._failure is None:                       # after a failure nothing more is released
            try:
                await self._commit_ready(last=True)
            except Exception as e:                      # noqa: BLE001
                log.error("shutdown: last commit failed: %s: %s", type(e).__name__, e)
        else:       # what best_effort sinks lost was released with earlier commits: its loss records are
            self._stash_sink_losses("best_effort")   # due (at_least_once seqs stay and come again)
        self.counters["abandoned_tickets"] += self.acks.abandon()
        if self._runs:                                  # runs that waited on an abandoned ticket end now
            await asyncio.wait(set(self._runs), timeout=1.0)
        self.checkpoint["clean_stop"] = self._failure is None
        self.checkpoint.save(sync=True)
        self.state = "failed" if self._failure else "stopped"
        await self._write_status(final=True)        # then the kernel-loss baseline, if it landed
        if self.metrics is not None:                    # last OTLP push of the final counters
            await asyncio.to_thread(self.metrics.close)
        self._close()

    def _count_abandoned(self) -> None:
        """Events read but never built, and records produced but never fanned out: they stay in the
        kernel (uncommitted) for the next collector — counted `requeued`, not lost."""
        n = 0
        while not self._events_q.empty():
            b = self._events_q.get_nowait()
            n += len(b[0]) if b is not None else 0
        if self._carry is not None:
            n += len(self._carry[0])
            self._carry = None
        n += self._building
        self._building = 0
        if n:
            self.ledger.lose("pipeline", "requeued", n, produced="events")
        if self._pending:                       # a run still fanning out them does not count them again
            self.ledger.lose("pipeline", "requeued", self._pending)
            self._pending = 0
        self._abandons += 1

    def _close(self) -> None:
        if self.ring is not None:
            self.ring.close()
            self.ring = None
        if self._close_source:
            self.source.close()
        if self.enricher is not None:
            self.enricher.close()
        if self._kexec is not None:
            self._kexec.shutdown(wait=False)


async def _cancel(task: asyncio.Task | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except (asyncio.CancelledError, Exception):     # noqa: BLE001 — already reported by _watch
        pass
