"""os.fdatasync replaced for sink tests (unit level: the kernel's writeback errors cannot be made on
demand). Modelled on Linux: a writeback error is reported once, and a later fdatasync of the same file
succeeds without writing the failed pages (docs/collector.md "Delivery and loss")."""
from __future__ import annotations

import asyncio
import errno
import os
import threading

import pytest


def failing_by_name(monkeypatch, *names: str) -> set[str]:
    """fdatasync fails once (EIO) for each file whose name is in the returned set (add names later too)."""
    real, failing = os.fdatasync, set(names)

    def sync(fd):
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if name in failing:
            failing.discard(name)                       # reported once
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fdatasync", sync)
    return failing


def held(monkeypatch, *, fails: bool) -> threading.Event:
    """fdatasync blocks in its worker thread until the returned event is set, then fails (EIO) or syncs."""
    gate, real = threading.Event(), os.fdatasync

    def sync(fd):
        assert gate.wait(30)
        if fails:
            raise OSError(errno.EIO, "Input/output error")
        real(fd)
    monkeypatch.setattr(os, "fdatasync", sync)
    return gate


async def syncing(sink, aw) -> asyncio.Future:
    """`aw` as a task, returned once `sink` has an fdatasync under way (held by `held`)."""
    task = asyncio.ensure_future(aw)
    while sink._syncing is None:
        await asyncio.sleep(0.001)
    return task


async def cancelled_while_syncing(sink, aw) -> None:
    """Run `aw` until `sink` has an fdatasync under way, then cancel it (as the shutdown deadline does)."""
    task = await syncing(sink, aw)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
