"""The DNS proxy's upstream UDP sockets (docs/policy.md "DNS proxy: upstream sockets and answer cache").

A fresh socket per query (socket, connect, epoll add/del, close: ~25 µs of CPU in CPython) was a fifth
of a relayed query's cost. Instead each upstream has a pool of connected UDP sockets, each registered
with the loop once and used for **one outstanding query at a time**:

- the first POOL_SIZE queries to an upstream each open a socket (a port picked at random by the kernel
  on connect); after that a query takes a *random* idle socket of the pool, so the port a spoofer must
  guess is one of up to POOL_SIZE random ports, and the ID (random per query, enforcer/dnsproxy.py) is
  16 more bits;
- a socket is closed after MAX_USES queries (and a fresh one, on a new random port, takes its place on
  demand), after any error or timeout (a late answer never reaches a later query) and when the pool
  is full (more queries in flight than POOL_SIZE: extra sockets serve one query each), and after
  MAX_IDLE_S without a query (a sweep at most once a second): at a low query rate the pool shrinks
  instead of keeping its ports open for hours, which would help an off-path spoofer find them by
  probing (the SAD DNS side channel);
- sockets stay connected to their upstream, so the kernel drops datagrams from anyone else; answers
  are still checked against the outstanding ID and question (enforcer/dnsrelay.py `accept`). Datagrams
  left on a socket when its query is answered (a duplicated answer) are read before it goes back to the
  pool, and those that arrive while it is idle (late answers) when they come; both are counted through
  `stray`, so the next query on the socket is never offered them.
"""
from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, Collection
from typing import Protocol

from .netsock import SocketMaker

__all__ = ["UdpPool", "Waiter", "POOL_SIZE", "MAX_USES", "MAX_IDLE_S", "rand16"]

POOL_SIZE = 256
MAX_USES = 16
MAX_IDLE_S = 10.0
MAX_DRAIN = 64                               # leftovers read when a socket goes idle; more: it is closed
_RAND = {"buf": b"", "pos": 0}


def rand16() -> int:
    """16 random bits from the kernel's CSPRNG, read 4 KiB at a time (one getrandom(2) per 2048 calls
    instead of one per call: secrets.randbits costs a syscall each)."""
    r = _RAND
    pos = r["pos"]
    if pos >= len(r["buf"]):
        r["buf"], pos = os.urandom(4096), 0
    r["pos"] = pos + 2
    return (r["buf"][pos] << 8) | r["buf"][pos + 1]


class Waiter(Protocol):
    """The query a busy socket serves (enforcer/dnsrelay.py)."""

    def offer(self, resp: bytes) -> None: ...
    def failed(self, exc: OSError) -> None: ...


class _Sock:
    __slots__ = ("s", "fd", "uses", "waiter", "idle_since")

    def __init__(self, s: socket.socket):
        self.s, self.fd, self.uses, self.idle_since = s, s.fileno(), 0, 0.0
        self.waiter: Waiter | None = None


class UdpPool:
    """Pooled connected UDP sockets per upstream endpoint; one loop owns it."""

    def __init__(self, maker: SocketMaker, stray: Callable[[], None]):
        self.maker, self.stray = maker, stray
        self.idle: dict[tuple[str, int], list[_Sock]] = {}
        self.open: dict[tuple[str, int], int] = {}
        self.opened = 0                         # sockets opened (tests: ports in use stay bounded)
        self.swept = time.monotonic()

    def _new(self, up: tuple[str, int]) -> _Sock:
        s = self.maker.socket(socket.AF_INET6 if ":" in up[0] else socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.connect(up)                        # the kernel picks a random port and drops other sources
        except OSError:
            s.close()
            raise
        sk = _Sock(s)
        asyncio.get_running_loop().add_reader(sk.fd, self._readable, sk)
        self.open[up] = self.open.get(up, 0) + 1
        self.opened += 1
        return sk

    def _take(self, up: tuple[str, int]) -> _Sock:
        now = time.monotonic()
        if now - self.swept >= 1.0:
            self._sweep(now)
        idle = self.idle.setdefault(up, [])
        if self.open.get(up, 0) < POOL_SIZE or not idle:
            return self._new(up)
        i = rand16() % len(idle)                 # len <= POOL_SIZE: the modulo bias is under 0.4 %
        idle[i], idle[-1] = idle[-1], idle[i]
        return idle.pop()

    def _sweep(self, now: float) -> None:
        """Close the sockets idle for MAX_IDLE_S or more (O(idle sockets), at most once a second)."""
        self.swept = now
        for up, idle in self.idle.items():
            stale = [sk for sk in idle if now - sk.idle_since >= MAX_IDLE_S]
            if stale:
                idle[:] = [sk for sk in idle if now - sk.idle_since < MAX_IDLE_S]
                for sk in stale:
                    self._drop(up, sk)

    def _drop(self, up: tuple[str, int], sk: _Sock) -> None:
        asyncio.get_running_loop().remove_reader(sk.fd)
        sk.s.close()
        self.open[up] -= 1

    def _readable(self, sk: _Sock) -> None:
        while True:
            try:
                resp = sk.s.recv(65535)
            except BlockingIOError:
                return
            except OSError as e:                 # ICMP port unreachable: ECONNREFUSED
                if sk.waiter is not None:
                    sk.waiter.failed(e)
                return
            w = sk.waiter
            if w is None:
                self.stray()
                continue
            w.offer(resp)
            if sk.waiter is not w:               # its query ended (release read any leftovers)
                return

    def send(self, up: tuple[str, int], wire: bytes, waiter: Waiter) -> _Sock:
        """Send `wire` to `up` on a pool socket that reports to `waiter` until `release`: every datagram
        to `waiter.offer`, a socket error to `waiter.failed`. OSError when no socket can send (the
        socket is then released)."""
        sk = self._take(up)
        sk.waiter = waiter
        try:
            sk.s.send(wire)
        except OSError:
            self.release(up, sk, False)
            raise
        return sk

    def release(self, up: tuple[str, int], sk: _Sock, ok: bool) -> None:
        """The query on `sk` ended: back to the idle pool when it ended with an answer (`ok`), the socket
        has uses left and its leftover datagrams are read (`_drain`), else closed (after an error or
        timeout a late answer must never reach a later query)."""
        sk.waiter = None
        sk.uses += 1
        idle = self.idle.get(up)
        if ok and sk.uses < MAX_USES and idle is not None and len(idle) < POOL_SIZE and self._drain(sk):
            sk.idle_since = time.monotonic()
            idle.append(sk)
        else:
            self._drop(up, sk)

    def _drain(self, sk: _Sock) -> bool:
        """Read the datagrams left on `sk` (each counted through `stray`); True when it is empty, False
        when it must be closed (an error queued, or more than MAX_DRAIN left: a flood). Costs one recv
        (EAGAIN) per answered query."""
        for _ in range(MAX_DRAIN):
            try:
                sk.s.recv(65535)
            except BlockingIOError:
                return True
            except OSError:
                return False
            self.stray()
        return False

    def close(self, keep: Collection[tuple[str, int]] = ()) -> None:
        """Close the idle sockets of every upstream not in `keep` (busy ones close when their query ends:
        the pool no longer takes them back)."""
        for up in [u for u in self.idle if u not in keep]:
            for sk in self.idle.pop(up):
                self._drop(up, sk)
