"""One query the DNS proxy relays, as a state machine instead of a task (docs/policy.md "DNS proxy:
upstream sockets and answer cache").

A task per relayed query (the task, its coroutine frames, a future, an asyncio.timeout with its timer
handle) was a fifth of a relayed query's Python time. A `Relay` holds the query's state; the pool
socket it waits on (enforcer/dnsupstream.py) hands it every datagram (`offer`) and socket error
(`failed`), and `Deadlines` (one FIFO per timeout value, one loop timer for its head) fires its
timeout. The first upstream that gives an acceptable answer ends it; a timeout or an error moves it to
the next upstream on a fresh socket; when none is left the proxy answers SERVFAIL. Each attempt has its
own socket with its own random ID (`new_id`: each retry draws one other than the previous attempt's,
over TCP as well), so a late answer to an earlier attempt never reaches this one (the socket it came
to is closed, and its ID is not this attempt's) and answers are matched to their query by socket, then
by ID and question: clients that use the same ID, or answers that arrive out of order, cannot be confused.

TCP queries keep a task (enforcer/dnsproxy.py `_ask_tcp`) but share `accept` and the end (`done`).
"""
from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

from hostwall.bpf import layout as L

from .dnspolicy import DnsConf
from .dnsupstream import UdpPool, rand16
from .dnswire import MalformedAnswer, Question, addresses, answer_matches, rcode_of, truncated

__all__ = ["Relay", "Deadlines", "accept", "endpoint_text"]

log = logging.getLogger("hostwall.enforcer.dns")
S = {name: i for i, name in L.DNS_STAT_NAMES.items()}
_MISMATCHED, _MALFORMED = S["mismatched"], S["malformed_answer"]
_TIMEOUT, _ERROR = S["upstream_timeout"], S["upstream_error"]


def endpoint_text(ep: tuple[str, int]) -> str:
    return f"[{ep[0]}]:{ep[1]}" if ":" in ep[0] else f"{ep[0]}:{ep[1]}"


def accept(resp: bytes, newid: int, q: Question, learn: bool, st) -> tuple[bytes, Any] | None:
    """(answer, (addresses, ttl) or None) when `resp` answers our query `newid` for `q`, else None
    (counted: `mismatched`; an unparsable answer for a listed name `malformed_answer`)."""
    if not answer_matches(resp, newid, q):
        st[_MISMATCHED] += 1
        return None
    if not learn or truncated(resp) or rcode_of(resp) != 0:
        return resp, None
    try:
        return resp, addresses(resp, q)
    except MalformedAnswer:
        st[_MALFORMED] += 1
        return None


class Proxy(Protocol):
    """What a Relay needs of its proxy (enforcer/dnsproxy.py DnsProxy)."""

    pool: UdpPool
    deadlines: Deadlines
    stats: Any

    def done(self, r: Relay, got: tuple[bytes, Any] | None, err: str) -> None: ...


class Relay:
    """One query from a client to the upstreams and back (both transports: TCP only uses the fields)."""

    __slots__ = ("proxy", "data", "q", "client", "server", "reply", "transport", "listed", "dns", "key", "gen",
                 "t0", "learn", "newid", "wire", "idx", "errors", "sk", "up")

    def __init__(self, proxy: Proxy, data: bytes, q: Question, client, server, reply: Callable[[bytes], None],
                 transport: str, listed: bool, dns: DnsConf, key, gen: int, t0: int):
        self.proxy, self.data, self.q, self.client, self.server, self.reply = proxy, data, q, client, server, reply
        self.transport, self.listed, self.dns, self.key, self.gen, self.t0 = transport, listed, dns, key, gen, t0
        self.learn = listed and q.qtype in (1, 28)
        self.newid = rand16()
        self.wire = self.newid.to_bytes(2, "big") + data[2:]
        self.idx = 0                                    # the next upstream to ask
        self.errors: list[str] = []
        self.sk = None                                  # the pool socket of the attempt in flight
        self.up: tuple[str, int] = ("", 0)

    def start(self) -> None:
        """Send to the next upstream that takes it; when none is left, end with SERVFAIL."""
        proxy, ups = self.proxy, self.dns.upstreams
        while self.idx < len(ups):
            up = ups[self.idx]
            if self.idx:                                # a retry: a late answer to a previous attempt
                self.new_id()                           # must not match this one, even on another port
            self.idx += 1
            try:
                self.sk = proxy.pool.send(up, self.wire, self)
            except OSError as e:
                self.error(up, e)
                continue
            self.up = up
            proxy.deadlines.add(self.dns.upstream_timeout_s, self, self.idx)
            return
        proxy.done(self, None, "; ".join(self.errors))

    def new_id(self) -> None:
        """A fresh random ID for the next attempt, never the previous attempt's (65535 values left)."""
        self.newid = (self.newid + 1 + rand16() % 0xFFFF) & 0xFFFF  # bias under 0.002 %
        self.wire = self.newid.to_bytes(2, "big") + self.data[2:]

    def offer(self, resp: bytes) -> None:
        got = accept(resp, self.newid, self.q, self.learn, self.proxy.stats)
        if got is not None:
            self.proxy.pool.release(self.up, self.sk, True)
            self.sk = None
            self.proxy.done(self, got, "")

    def failed(self, exc: OSError) -> None:
        self.proxy.pool.release(self.up, self.sk, False)
        self.sk = None
        self.error(self.up, exc)
        self.start()

    def expired(self, attempt: int) -> None:
        """The deadline of attempt number `attempt` passed: if that attempt still waits, it failed."""
        if self.sk is None or attempt != self.idx:
            return
        self.proxy.pool.release(self.up, self.sk, False)
        self.sk = None
        self.timed_out(self.up)
        self.start()

    def abandon(self) -> None:
        """The proxy closes: free the socket, answer nothing."""
        if self.sk is not None:
            self.proxy.pool.release(self.up, self.sk, False)
            self.sk = None
        self.idx = len(self.dns.upstreams)

    def timed_out(self, up: tuple[str, int]) -> None:
        """An attempt at `up` got no answer in time: counted, and named in the SERVFAIL's reason."""
        self.proxy.stats[_TIMEOUT] += 1
        self.errors.append(f"{endpoint_text(up)}: no answer within {self.dns.upstream_timeout_s:g} s")

    def error(self, up: tuple[str, int], e: Exception) -> None:
        """An attempt at `up` failed (a socket error; over TCP also a cut connection): counted and named."""
        self.proxy.stats[_ERROR] += 1
        self.errors.append(f"{endpoint_text(up)}: {getattr(e, 'strerror', None) or e}")


class Deadlines:
    """Timeouts of relayed queries: one FIFO per timeout value (so deadlines are in order within it) and
    one loop timer for the earliest due head. Adding costs a deque append instead of a timer handle per
    query. Finished entries (answered, or an attempt since replaced) are dropped from a queue's head as
    new ones come, skipped when they come due, and, so that one stuck query at the head cannot pin every
    later query until it times out, dropped all at once when a queue grows past `limit` entries: the
    queue is rebuilt with its live entries (at most one per query in flight, so with `limit` at least
    twice the in-flight bound a rebuild at least halves it: amortised O(1) per add)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.queues: dict[float, deque[tuple[float, Relay, int]]] = {}
        self.timer: asyncio.TimerHandle | None = None
        self.when = float("inf")
        self.loop: asyncio.AbstractEventLoop | None = None   # the loop of the first add (one loop owns the proxy)

    def add(self, timeout: float, relay: Relay, attempt: int) -> None:
        loop = self.loop
        if loop is None:                                # asyncio.get_running_loop() costs a getpid()
            loop = self.loop = asyncio.get_running_loop()
        due = loop.time() + timeout
        q = self.queues.get(timeout)
        if q is None:
            q = self.queues[timeout] = deque()
        while q and not _live(q[0]):                    # finished: no longer due
            q.popleft()
        if len(q) >= self.limit:
            q = self.queues[timeout] = deque(e for e in q if _live(e))
        q.append((due, relay, attempt))
        if due < self.when:
            self._arm(loop, due)

    def _arm(self, loop: asyncio.AbstractEventLoop, due: float) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.when = due
        self.timer = loop.call_at(due, self._fire)

    def _fire(self) -> None:
        """Expire the due entries in due-time order across queues (bounded: each is popped once); one
        relay's exception is logged and the others still expire, and the timer is always re-armed."""
        loop = self.loop
        assert loop is not None
        self.timer, self.when = None, float("inf")
        try:
            now = loop.time()
            while True:
                q = min((q for q in self.queues.values() if q), key=lambda q: q[0][0], default=None)
                if q is None or q[0][0] > now:
                    break
                _, relay, attempt = q.popleft()
                try:
                    relay.expired(attempt)
                except Exception as e:                  # noqa: BLE001 - one query's failure, never the timer's
                    log.error("dns relay timeout failed: %s: %s", type(e).__name__, e)
        finally:
            for timeout in [t for t, q in self.queues.items() if not q]:
                del self.queues[timeout]
            heads = [q[0][0] for q in self.queues.values()]
            if heads and (self.timer is None or min(heads) < self.when):
                self._arm(loop, min(heads))

    def close(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.timer, self.when, self.loop = None, float("inf"), None
        self.queues.clear()


def _live(entry: tuple[float, Relay, int]) -> bool:
    """The entry's attempt still waits for an answer (not answered, failed or replaced by a retry)."""
    relay = entry[1]
    return relay.sk is not None and entry[2] == relay.idx
