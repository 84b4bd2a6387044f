"""Sockets in a given network namespace, made from a process that lives in another one.

`hostwall-enforcer run --netns NS` protects interfaces inside NS; its DNS proxy must listen and reach its
upstreams there too. A socket belongs for life to the namespace its creator thread was in at socket(2),
so the maker switches the calling thread into NS (setns(2), CLONE_NEWNET moves one thread only), creates
the socket, and switches back at once: nothing else runs on the thread meanwhile (the asyncio loop is
single-threaded and this is synchronous). Cost: two setns calls per socket made in another namespace
(~10 µs); none without one.
"""
from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

__all__ = ["SocketMaker", "netns_path"]

_CLONE_NEWNET = 0x40000000
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
        if netns:
            self._target = os.open(netns_path(netns), os.O_RDONLY | os.O_CLOEXEC)

    def socket(self, family: int, kind: int) -> socket.socket:
        if self._target is None:
            s = socket.socket(family, kind)
        else:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _setns(self._target)
                try:
                    s = socket.socket(family, kind)
                finally:
                    _setns(own)
            finally:
                os.close(own)
        s.setblocking(False)
        return s

    def close(self) -> None:
        if self._target is not None:
            os.close(self._target)
            self._target = None
