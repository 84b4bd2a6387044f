"""Draining the retired instances of the pin dir before collecting from the live one (docs/collector.md
"Detach").

A retired instance (bpf/retired.py) is the kernel instance a clean enforcer stop, or a build upgrade that
replaced it (docs/collector.md "Replaced instances"), left behind while no collector held its maps: its ring may hold events no collector read, its drop maps an interval not
exported, its conntrack tables the connections whose end is `detach`. It is the same kernel instance
the checkpoint names (same map ids) when this collector read it before, so a pipeline on it resumes
exactly (collector/checkpoint.py analyze_restart); one it never read is read from its start.

For each, oldest first: run the whole pipeline on it (same status file, checkpoint, journal and outbox
as the live run) until the ring is committed to its end, then stop it cleanly — the stop exports the
last drop interval and runs the detach scan (collector/shutdown.py) and commits what became durable.
Only when nothing of it is left (ring consumed to its end, no drop interval pending, no conntrack batch
journaled, the detach scan done, a clean stop) is it unpinned; otherwise it stays pinned for the next
start and `run` fails with one line (nothing is lost: the kernel keeps it). Cost: one pipeline start and
stop per retired instance (a second or two; bounded by DRAIN_IDLE_S when a sink stalls, by DRAIN_START_S
when the pipeline does not start).
"""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from hostwall.bpf import retired
from hostwall.bpf.ringbuf import RingBuffer

from .checkpoint import Checkpoint, mark_drained
from .config import CollectorConfig
from .ct_journal import CtJournal
from .pipeline import Pipeline

log = logging.getLogger("hostwall.collector")

__all__ = ["RetiredNotDrained", "drain_retired", "follow", "unpin_if_drained"]

DRAIN_IDLE_S = 30.0     # the ring's committed position did not move for this long: stop and judge what is left
DRAIN_START_S = 60.0    # the drain pipeline did not reach `running` in this long: give up (it stays pinned)
ATTEMPTS = 3            # pipeline runs on one retired instance before `run` gives up (it stays pinned)
POLL_S = 0.05
FOLLOW_POLL_S = 1.0     # how often a running collector looks for a new instance once its own was detached


class RetiredNotDrained(RuntimeError):
    """A retired instance could not be drained; it stays pinned (the message says what is left)."""


async def drain_retired(cfg: CollectorConfig, build) -> list[dict] | None:
    """Drain every retired instance of cfg.pin_dir, oldest first; `build(cfg, path)` makes the pipeline
    (collector/wiring.py build_pipeline). Returns one entry per instance drained, or None when a stop
    signal ended a drain (the caller exits; what is left stays pinned)."""
    done = []
    retired.sweep(cfg.pin_dir)              # what a kill left of an unpin (bpf/retired.py remove)
    for path in retired.listing(cfg.pin_dir):
        entry = None
        for _ in range(ATTEMPTS):
            pipe = build(cfg, path)
            try:
                if not await _run_to_end(pipe, path):
                    return None
                left = leftover(cfg, pipe, path)
                if not left:
                    entry = _unpin_drained(cfg, pipe, path)     # still holding its reader lock
                    break
            finally:
                pipe.release_reader()
            log.warning("retired instance %s not drained yet (%s): trying again", path, "; ".join(left))
        if entry is None:
            raise RetiredNotDrained(f"retired instance {path} not drained: {'; '.join(left)}; it stays pinned "
                                    "for the next start (see `hostwall-collector status`)")
        done.append(entry)
    return done


def _unpin_drained(cfg: CollectorConfig, pipe: Pipeline, path: Path) -> dict:
    entry = {"detached_ns": int(path.name), "events": pipe.counters["events_read"],
             "detach_ends": pipe.counters["ct_detached"], "drop_intervals": pipe.counters["drop_intervals"]}
    _mark_and_remove(cfg, pipe, path)
    log.info("retired instance %s drained and unpinned: %d events, %d detach ends", path, entry["events"],
             entry["detach_ends"])
    return entry


async def _run_to_end(pipe: Pipeline, path: Path) -> bool:
    """Run `pipe` until its ring is committed to the end (or did not move for DRAIN_IDLE_S), then stop it
    cleanly. False when it stopped by itself first (a stop signal); a failure raises PipelineFailed. A
    pipeline that is not `running` within DRAIN_START_S (a sink whose start hangs, a stuck kernel call) is
    cancelled and RetiredNotDrained raised (_give_up): `run` never waits forever on a retired instance."""
    task = asyncio.ensure_future(pipe.run(install_signals=True))
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    stopped_by_us, last, moved_at = False, -1, loop.time()
    while not task.done():
        ring = pipe.ring
        if pipe.state == "starting" and loop.time() - started_at > DRAIN_START_S:
            await _give_up(pipe, task, path)
        if pipe.state == "running" and ring is not None:
            pos = ring.consumer_pos
            if pos == ring.producer_pos or loop.time() - moved_at > DRAIN_IDLE_S:
                stopped_by_us = True
                pipe.stop()
                break
            if pos != last:
                last, moved_at = pos, loop.time()
        await asyncio.sleep(POLL_S)
    await task
    return stopped_by_us


async def _give_up(pipe: Pipeline, task: asyncio.Future, path: Path) -> None:
    """Cancel a drain pipeline stuck in its start (its shutdown runs, bounded by its shutdown timeout; a
    kernel call stuck in its thread is left behind) and raise RetiredNotDrained: nothing of the instance
    was committed past what its checkpoint says, so the next start drains it."""
    task.cancel()
    await asyncio.wait({task}, timeout=pipe.shutdown_timeout_s + 1.0)
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.debug("drain pipeline of %s after its cancel", path, exc_info=task.exception())
    raise RetiredNotDrained(f"retired instance {path} not drained: its pipeline did not start within "
                            f"{DRAIN_START_S:g} s (a sink or the kernel did not answer); it stays pinned for the "
                            "next start (see `hostwall-collector status`)")


async def follow(cfg: CollectorConfig, pipe: Pipeline, task: asyncio.Task) -> bool:
    """Wait for the running `pipe` to end; True when it was stopped here to follow a new instance: its own
    was detached (the detach scan reported its ends), its ring is committed to the producer, and another
    instance is pinned at the pin dir (polled every FOLLOW_POLL_S). The caller then unpins the drained
    instance and runs on the new one (collector/cli.py; docs/collector.md "Detach"). False: it stopped by
    itself (a stop signal, a failure)."""
    ours = (pipe.checkpoint["kernel"] or {}).get("ring_map_id")
    while not task.done():
        await asyncio.wait({task}, timeout=FOLLOW_POLL_S)
        ring = pipe.ring
        if task.done() or pipe.state != "running" or not pipe.detach_reported or ring is None:
            continue
        live = retired.ring_id(cfg.pin_dir)
        if live is not None and live != ours and ring.consumer_pos == ring.producer_pos:
            log.info("the instance read was detached and is read to its end; following the new instance "
                     "pinned at %s", cfg.pin_dir)
            pipe.stop()
            await task
            return True
    await task
    return False


def unpin_if_drained(cfg: CollectorConfig, pipe: Pipeline) -> bool:
    """After a run that read its instance through the detach: that instance was retired under its
    detached_ns; unpin it if nothing of it is left (the next start need not drain it). True if unpinned."""
    path = retired.root(cfg.pin_dir) / str(pipe.detached_ns)
    if not pipe.detached_ns or not (path / "maps").is_dir() or leftover(cfg, pipe, path):
        return False
    _mark_and_remove(cfg, pipe, path)
    log.info("the detached instance %s is drained: unpinned", path)
    return True


def _mark_and_remove(cfg: CollectorConfig, pipe: Pipeline, path: Path) -> None:
    """Note in the checkpoint that its instance was drained (the next run says `drained`, not `reloaded`),
    then unpin it (the caller still holds its reader lock)."""
    ring = retired.ring_id(path)
    if ring is not None:
        mark_drained(cfg.state_path(pipe.status_path), ring)
    stale = [d for d in retired.discarded(cfg.pin_dir) if int(d["detached_ns"]) == int(path.name)]
    retired.forget_discarded(cfg.pin_dir, stale)    # a discard killed before its unpin: delivered, not lost
    retired.remove(cfg.pin_dir, path)


def leftover(cfg: CollectorConfig, pipe: Pipeline, path: Path) -> list[str]:
    """What of the retired instance at `path` is not durable yet after `pipe` stopped (empty: drained)."""
    ck = Checkpoint.load(cfg.state_path(pipe.status_path))
    out = []
    if not ck["clean_stop"]:
        out.append("the pipeline did not stop cleanly")
    if ck["drain"]:
        out.append("a drop interval is not durable")
    with RingBuffer.open(path / "maps" / "hw_events") as ring:
        if ring.consumer_pos != ring.producer_pos:
            out.append(f"{ring.producer_pos - ring.consumer_pos} ring bytes not committed")
    if CtJournal(cfg.ct_journal_path(pipe.status_path)).load()[0]:
        out.append("a conntrack batch is not durable")
    if not pipe.detach_reported:
        out.append("the detach scan did not run")
    return out
