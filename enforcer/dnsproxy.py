"""hostwall's DNS proxy (docs/policy.md "FQDN rules"): the host's resolver points at it; it forwards every
query to the configured upstreams and, for names an fqdns rule lists, enters the answer's addresses into
the datapath's dynamic sets *before* relaying the answer — so the client's first connection after the
lookup is judged by the rule (enforcer/dnslearn.py).

- UDP and TCP on every `dns.listen` endpoint; upstream over the client's transport. EDNS0: queries and
  answers are relayed as bytes with only the ID rewritten, so OPT records pass through; the responses
  the proxy makes itself (REFUSED, SERVFAIL) echo the query's EDNS.
- Only answers to queries the proxy sent are accepted: every upstream query gets a fresh random ID and a
  socket of a pool of connected ones on random ports (enforcer/dnsupstream.py; TCP: a fresh socket), so
  the kernel drops datagrams from anyone else; an answer must carry the ID and echo the question, else
  it is ignored and counted (`mismatched`). An answer for a listed name that dnspython cannot parse is dropped and counted
  (`malformed_answer`); the proxy waits on for a good one until the timeout.
- An upstream that fails (timeout, refused, network error) is counted and the next one is tried; when
  none answers, the client gets SERVFAIL and a record is written (enforcer/dnsrecords.py).
- `refuse_unlisted`: a name no rule lists is answered REFUSED (and recorded), never forwarded.
- An answer cache (enforcer/dnscache.py, `dns.cache_size`): looked up before the query is parsed; a
  listed name's entry ends a renewal slack before its learnt set entries (Learnt.held_ns); emptied on every
  policy change (Learner.generation).
- Counters in hw_dns_stats (bpf/hostwall.h enum hw_dns_stat): queries, answers, failures, latency
  histogram; `status` and the collector's metrics read them.

Bounded: at most MAX_INFLIGHT queries in flight (more are dropped, counted `overload`); at most one
upstream socket per query in flight beyond the pool. A UDP hit is answered in `_Udp.datagram_received`
before anything else; a relayed UDP query is a Relay (enforcer/dnsrelay.py), a TCP one a task. CPU per
query (uvloop, the kernel's work on the datagrams included; docs/benchmarks.md `dns`): a cache hit
~6-12 µs, a relayed query ~55-90 µs (by the machine's load and CPU level).
"""
from __future__ import annotations

import asyncio
import logging
import resource
import socket
import time

from hostwall.bpf import layout as L

from .dnscache import AnswerCache, cacheable, capped
from .dnslearn import Learner
from .dnspolicy import DnsConf
from .dnsrecords import DnsRecordLog
from .dnsrelay import Deadlines, Relay, accept, endpoint_text
from .dnsupstream import UdpPool
from .dnswire import REFUSED, SERVFAIL, Question, make_error, parse_query
from .netsock import SocketMaker

__all__ = ["DnsProxy", "MAX_INFLIGHT"]

log = logging.getLogger("hostwall.enforcer.dns")
MAX_INFLIGHT = 4096
TCP_IDLE_S = 10.0
S = {name: i for i, name in L.DNS_STAT_NAMES.items()}
LAT0, LAT_BUCKETS = L.C["HW_DNS_LAT0"], L.C["HW_DNS_LAT_BUCKETS"]
now_ns = time.monotonic_ns      # CLOCK_MONOTONIC on Linux: hostwall.bpf.fqdn.now_ns's clock (the datapath's), minus
                                # a Python frame per call (a hit reads it twice)
_Q_UDP, _HITS, _LISTED, _LAT_SUM = S["queries_udp"], S["cache_hits"], S["listed"], S["latency_sum_us"]


def _lat_bucket(us: int) -> int:
    """The hw_dns_stats index of the latency histogram bucket for `us` µs (bpf/hostwall.h)."""
    return LAT0 + min(LAT_BUCKETS - 1, ((us - 1) // 125).bit_length() if us else 0)


def _counters(stats):
    """hw_dns_stats (a numpy view of the mmap) as a memoryview of u64: an increment costs half of a numpy
    element's (~0.5 µs; a cache hit makes five). Same memory: readers see every increment."""
    if stats is None:
        return None
    return memoryview(stats).cast("B").cast("Q")


def _family(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class _Udp(asyncio.DatagramProtocol):
    """A listening UDP socket. A cache hit is answered here, before any parsing, with the fewest steps
    (docs/benchmarks.md `dns`): one AnswerCache.get (TTLs re-aged at most once a second per entry,
    enforcer/dnscache.py), one clock read for expiry and age and one for the latency."""

    def __init__(self, proxy: DnsProxy, server: tuple[str, int]):
        self.proxy, self.server, self.transport = proxy, server, None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        p = self.proxy
        if p.learner.current() == p._gen:
            now = now_ns()
            hit = p.cache.get(data[2:], data[:2], now)
            if hit is not None:
                self.transport.sendto(hit[0], addr)
                st = p.stats
                st[_Q_UDP] += 1
                st[_HITS] += 1
                st[_LISTED] += hit[1]
                us = (now_ns() - now) // 1000
                st[_LAT_SUM] += us
                st[LAT0 if us <= 125 else _lat_bucket(us)] += 1
                return
        send = self.transport.sendto
        p.on_query(data, addr, self.server, lambda resp: send(resp, addr), "udp")

    def error_received(self, exc: Exception) -> None:      # ICMP errors about our replies: nothing to do
        pass


class DnsProxy:
    """The proxy of one instance. `learner` owns the dynamic sets; `stats` is hw_dns_stats (mmap view)."""

    def __init__(self, learner: Learner, records: DnsRecordLog, stats, maker: SocketMaker | None = None):
        self.learner, self.records, self.stats = learner, records, _counters(stats)
        self.maker = maker or SocketMaker()
        self.listen: tuple[tuple[str, int], ...] = ()
        self._udp: list = []
        self._tcp: list = []
        self._tasks: set[asyncio.Task] = set()
        self.inflight = 0
        self.pool = UdpPool(self.maker, self._stray)
        self.deadlines = Deadlines(2 * MAX_INFLIGHT)
        self._relays: dict[Relay, None] = {}           # UDP queries in flight (close() frees their sockets)
        self.cache = AnswerCache()
        self._gen = 0                                  # the learner generation the cache holds answers of

    # ---- listeners ----------------------------------------------------------------------------------
    def _bind(self, ep: tuple[str, int], kind: int) -> socket.socket:
        s = self.maker.socket(_family(ep[0]), kind)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if ep[0] == "::" or _family(ep[0]) == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(ep)
            if kind == socket.SOCK_STREAM:
                s.listen(256)
        except OSError as e:
            s.close()
            raise OSError(e.errno, f"cannot listen on {endpoint_text(ep)} "
                                   f"({'tcp' if kind == socket.SOCK_STREAM else 'udp'}): {e.strerror or e}") from None
        return s

    def bind(self, listen: tuple[tuple[str, int], ...]) -> list[socket.socket]:
        """Bind UDP + TCP sockets for every endpoint (synchronously: a failure raises OSError naming the
        endpoint, with nothing left bound)."""
        socks: list[socket.socket] = []
        try:
            for ep in listen:
                socks.append(self._bind(ep, socket.SOCK_DGRAM))
                socks.append(self._bind(ep, socket.SOCK_STREAM))
        except OSError:
            for s in socks:
                s.close()
            raise
        return socks

    async def start(self, listen: tuple[tuple[str, int], ...], socks: list[socket.socket] | None = None) -> None:
        """Serve on `listen` (socks: already bound by bind(), in that order). Raises the resource limit on
        open files to its hard limit (one socket per query in flight)."""
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft < min(hard, 2 * MAX_INFLIGHT + 256):
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 2 * MAX_INFLIGHT + 256), hard))
        socks = socks if socks is not None else self.bind(listen)
        loop = asyncio.get_running_loop()
        udp, tcp = [], []
        for i, ep in enumerate(listen):
            t, _ = await loop.create_datagram_endpoint(lambda ep=ep: _Udp(self, ep), sock=socks[2 * i])
            udp.append(t)
            tcp.append(await asyncio.start_server(lambda r, w, ep=ep: self._tcp_client(r, w, ep), sock=socks[2 * i + 1]))
        old_udp, old_tcp = self._udp, self._tcp
        self._udp, self._tcp, self.listen = udp, tcp, tuple(listen)
        for t in old_udp:
            t.close()
        for srv in old_tcp:
            srv.close()

    async def configure(self, dns: DnsConf) -> None:
        """Follow a new dns section: rebind when the listen endpoints changed (new ones first; on a bind
        error the old ones stay and the error is raised). Upstreams, TTL bounds and refuse_unlisted are
        read per query from the learner's config."""
        if tuple(dns.listen) == self.listen:
            return
        keep = [ep for ep in dns.listen if ep in self.listen]
        if keep:                                        # partly the same: close first to free the ports
            await self.stop_listening()
        await self.start(dns.listen)

    async def stop_listening(self) -> None:
        for t in self._udp:
            t.close()
        for srv in self._tcp:
            srv.close()
        for srv in self._tcp:
            await srv.wait_closed()
        self._udp, self._tcp, self.listen = [], [], ()

    async def close(self) -> None:
        await self.stop_listening()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in list(self._relays):
            r.abandon()
        self.inflight -= len(self._relays)
        self._relays.clear()
        self.deadlines.close()
        self.pool.close()

    def _stray(self) -> None:
        self.stats[S["mismatched"]] += 1

    # ---- queries ------------------------------------------------------------------------------------
    def on_query(self, data: bytes, client, server, reply, transport: str) -> None:
        """Answer at once what needs no upstream (a cache hit, before any parsing; REFUSED); else relay
        (UDP: a Relay, enforcer/dnsrelay.py; TCP: a task). UDP hits mostly end earlier, in _Udp."""
        st = self.stats
        st[S["queries_udp" if transport == "udp" else "queries_tcp"]] += 1
        t0 = time.perf_counter_ns()
        learner = self.learner
        if learner.current() != self._gen:
            self._policy_changed()
        dns = learner.cfg.dns
        key: bytes | tuple[str, bytes] | None = None
        if dns is not None and dns.cache_size:
            key = ("t", data[2:]) if transport == "tcp" else data[2:]
            hit = self.cache.get(key, data[:2], now_ns())
            if hit is not None:                        # the same bytes as a query answered under this policy
                st[S["cache_hits"]] += 1
                st[S["listed"]] += hit[1]
                reply(hit[0])
                self._latency(t0)
                return
        try:
            q = parse_query(data)
        except ValueError:
            st[S["malformed_query"]] += 1
            return
        sets = learner.listed(q.name)
        dns = learner.cfg.dns
        if dns is None:
            return                                     # the policy dropped its dns section: not serving
        if sets:
            st[S["listed"]] += 1
        elif dns.refuse_unlisted:
            st[S["refused"]] += 1
            self.records.refused(q, client, server, transport)
            resp = make_error(data, REFUSED)
            if resp is not None:
                reply(resp)
            self._latency(t0)
            return
        if key is not None and dns.cache_size:
            st[S["cache_misses"]] += 1
        else:
            key = None
        if self.inflight >= MAX_INFLIGHT:
            st[S["overload"]] += 1
            return
        self.inflight += 1
        r = Relay(self, data, q, client, server, reply, transport, bool(sets), dns, key, learner.generation, t0)
        if transport == "udp":
            self._relays[r] = None
            r.start()
            return
        t = asyncio.get_running_loop().create_task(self._serve_tcp(r))
        self._tasks.add(t)                             # _task_done ends its in-flight count, even if
                                                       # cancelled before its first step
        t.add_done_callback(self._task_done)

    def _policy_changed(self) -> None:
        """The sets or the dns section moved: cached answers go, and so do the idle sockets of upstreams
        no longer configured."""
        self.cache.clear()
        self._gen = self.learner.generation
        dns = self.learner.cfg.dns
        self.pool.close(keep=dns.upstreams if dns is not None else ())

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        self.inflight -= 1
        if not t.cancelled() and t.exception() is not None:
            log.error("dns query failed: %s: %s", type(t.exception()).__name__, t.exception())

    def _latency(self, t0: int) -> None:
        us = max(0, (time.perf_counter_ns() - t0) // 1000)
        self.stats[_LAT_SUM] += us
        self.stats[_lat_bucket(us)] += 1

    async def _serve_tcp(self, r: Relay) -> None:
        got, err = await self._ask_tcp(r)
        self.done(r, got, err)

    def done(self, r: Relay, got, err: str) -> None:
        """Learn, then relay (or SERVFAIL when `got` is None); cache the answer only when the policy it
        was judged under (`r.gen`: the config that `r.listed` and `r.dns` came from) is still the one
        the cache holds. An exception is logged and the query answered nothing, as a failed task was."""
        if r in self._relays:                          # UDP; a TCP query's task ends its count (_task_done)
            del self._relays[r]
            self.inflight -= 1
        try:
            self._answer(r, got, err)
        except Exception as e:                         # noqa: BLE001 - one query's failure, never the loop's
            log.error("dns query failed: %s: %s", type(e).__name__, e)

    def _answer(self, r: Relay, got, err: str) -> None:
        st, q, dns = self.stats, r.q, r.dns
        if got is None:
            st[S["servfail"]] += 1
            self.records.upstream_failure(q, r.client, r.server, r.transport,
                                          [endpoint_text(u) for u in dns.upstreams], err)
            resp = make_error(r.data, SERVFAIL)
        else:
            answer, found = got
            held: int | None = None                    # no learnt addresses bound the cache entry
            if found and found[0]:
                lr = self.learner.learn(q.name, found[0], found[1])
                st[S["learnt"]] += lr.entered
                st[S["overflow"]] += lr.overflow
                st[S["set_full"]] += lr.full
                # some address not learnt (over max_ips_per_name, or refused by a full map although the
                # learner counts it held): this answer is never cached
                # a hit must leave the client time to connect: the entry ends `slack_ns` before the set
                # entries do (docs/policy.md "DNS proxy: upstream sockets and answer cache")
                held = 0 if lr.overflow or lr.full else lr.held_ns - lr.slack_ns
                if lr.full:                            # a full set may have evicted what an entry relies on
                    self.cache.clear()
                elif held > 0:                         # no TTL outlives the set entries (max_ttl below the TTL)
                    answer = capped(answer, q, max(0, (held - now_ns()) // 1_000_000_000))
            st[S["answered"]] += 1
            resp = r.data[:2] + answer[2:]
            if r.key is not None and r.gen == self.learner.generation == self._gen:
                self._store(r.key, answer, q, held, dns.cache_size, r.listed)
        if resp is not None:
            r.reply(resp)
        self._latency(r.t0)

    def _store(self, key: bytes, answer: bytes, q: Question, held: int | None, size: int, listed: bool) -> None:
        """Cache an answer for min(its TTLs, `held`: the learnt set entries' end) when cacheable."""
        c = cacheable(answer, q)
        if c is None:
            return
        now = now_ns()
        exp = now + c[0] * 1_000_000_000
        if held is not None:
            exp = min(exp, held)
        if exp > now:
            self.stats[S["cache_evictions"]] += self.cache.put(key, answer, c[1], now, exp, size, listed)

    async def _ask_tcp(self, r: Relay):
        """((answer, (addresses, ttl) or None), "") from the first upstream that answers over TCP (a fresh
        connection each), or (None, why)."""
        st = self.stats
        for i, up in enumerate(r.dns.upstreams):
            if i:
                r.new_id()                             # each attempt its own ID (enforcer/dnsrelay.py)
            try:
                async with asyncio.timeout(r.dns.upstream_timeout_s):
                    return await self._tcp_exchange(up, r.wire, lambda resp: accept(resp, r.newid, r.q, r.learn, st)), ""
            except TimeoutError:
                r.timed_out(up)
            except (OSError, asyncio.IncompleteReadError) as e:
                r.error(up, e)
        return None, "; ".join(r.errors)

    async def _tcp_exchange(self, up: tuple[str, int], wire: bytes, check):
        loop = asyncio.get_running_loop()
        s = self.maker.socket(_family(up[0]), socket.SOCK_STREAM)
        try:
            await loop.sock_connect(s, up)
            await loop.sock_sendall(s, len(wire).to_bytes(2, "big") + wire)
            while True:
                n = int.from_bytes(await _recv_exact(loop, s, 2), "big")
                got = check(await _recv_exact(loop, s, n))
                if got is not None:
                    return got
        finally:
            s.close()

    async def _tcp_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, server) -> None:
        """RFC 7766: length-prefixed queries, pipelined; answers in any order; idle connections close."""
        peer = writer.get_extra_info("peername")
        mine: set[asyncio.Task] = set()

        def reply(resp: bytes) -> None:
            if not writer.is_closing():
                writer.write(len(resp).to_bytes(2, "big") + resp)

        try:
            while True:
                async with asyncio.timeout(TCP_IDLE_S):
                    n = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(n)
                before = set(self._tasks)
                self.on_query(data, peer, server, reply, "tcp")
                mine |= self._tasks - before
                mine = {t for t in mine if not t.done()}
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            if mine:
                await asyncio.wait(mine, timeout=TCP_IDLE_S)
            writer.close()


async def _recv_exact(loop, s: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(s, n - len(buf))
        if not chunk:
            raise asyncio.IncompleteReadError(bytes(buf), n)
        buf += chunk
    return bytes(buf)
