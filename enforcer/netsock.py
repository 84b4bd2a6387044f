"""Sockets in a given network namespace, made from a process that lives in another one.

`hostwall-enforcer run --netns NS` protects interfaces inside NS; its DNS proxy must listen and reach its
upstreams there too. A socket belongs for life to the namespace its creator thread was in at socket(2),
so the maker switches the calling thread into NS (setns(2), CLONE_NEWNET moves one thread only), creates
the socket, and switches back at once: nothing else runs on the thread meanwhile (the asyncio loop is
single-threaded and this is synchronous). Cost: ~27 µs per switch here, so sockets made in another
namespace come from a reserve refilled RESERVE at a time in one switch (~5 µs per socket then); none
without a namespace.
"""
from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

__all__ = ["SocketMaker", "netns_path"]

_CLONE_NEWNET = 0x40000000
RESERVE = 64
_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> str:
    """A name under /run/netns (ip netns), or a path to a namespace file."""
    return netns if "/" in netns else str(Path("/run/netns") / netns)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class SocketMaker:
    """socket.socket(...) inside `netns` (None: this process's own namespace)."""

    def __init__(self, netns: str | None = None):
        self.netns = netns
        self._target: int | None = None
        self._reserve: dict[tuple[int, int], list[socket.socket]] = {}
        if netns:
            self._target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)

    def _make(self, family: int, kind: int, n: int) -> list[socket.socket]:
        if self._target is None:
            return [socket.socket(family, kind) for _ in range(n)]
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _setns(self._target)
            try:
                return [socket.socket(family, kind) for _ in range(n)]
            finally:
                _setns(own)
        finally:
            os.close(own)

    def socket(self, family: int, kind: int) -> socket.socket:
        """A new, unbound, non-blocking socket (never handed out twice: each has its own port once used)."""
        if self._target is None:
            s = socket.socket(family, kind)
        else:
            pool = self._reserve.setdefault((family, kind), [])
            if not pool:
                pool.extend(self._make(family, kind, RESERVE))
            s = pool.pop()
        s.setblocking(False)
        return s

    def close(self) -> None:
        for pool in self._reserve.values():
            for s in pool:
                s.close()
        self._reserve.clear()
        if self._target is not None:
            os.close(self._target)
            self._target = None
