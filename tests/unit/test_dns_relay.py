"""The DNS proxy's fast paths (enforcer/dnsproxy.py `_Udp`, enforcer/dnsrelay.py), in-process against a
scripted upstream (tests/unit/test_dns_proxy.py's harness): a cache hit answered before any parsing still
counts as a query, a hit and a latency, and ages its TTLs; relayed answers reach the client that asked
whatever order they come in and whatever IDs the clients chose; timeouts fire per attempt, in due-time
order, and never for an answered query; each attempt has its own ID; finished queries are never pinned
by a stuck one; a socket goes back to the pool only with its leftover datagrams read."""
from __future__ import annotations

import asyncio
import errno
import socket
import time

import dns.message
import dns.name
import pytest

from hostwall.bpf import layout as L
from hostwall.enforcer import dnsupstream
from hostwall.enforcer.dnscache import _AGE as AGE
from hostwall.enforcer.dnspolicy import DnsConf
from hostwall.enforcer.dnsrelay import Deadlines, Relay
from hostwall.enforcer.dnsupstream import UdpPool
from hostwall.enforcer.dnswire import parse_query
from hostwall.enforcer.netsock import SocketMaker

from .test_dns_cache import Clock, addrs, ttls
from .test_dns_proxy import S, Upstream, _proxy, answer, ask, run

LAT0, LAT_BUCKETS = L.C["HW_DNS_LAT0"], L.C["HW_DNS_LAT_BUCKETS"]


def test_a_hit_on_the_fast_path_counts_and_ages_its_ttls(env, monkeypatch):
    clock = Clock(monkeypatch)

    def handler(q, raw, peer):
        return [answer(q, ("mirror.example.test", 60, "A", ["10.66.2.10"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, cache=100)
        slow = []
        on_query = proxy.on_query

        def counted(*a):                                   # the path that parses: misses only
            slow.append(a[0])
            on_query(*a)

        monkeypatch.setattr(proxy, "on_query", counted)
        try:
            got = [await ask(port, "mirror.example.test", qid=1)]
            for step in (10.5, 0.3, 1.0):
                clock.advance(step)
                got.append(await ask(port, "mirror.example.test", qid=len(got) + 1))
            (entry,) = proxy.cache.entries.values()
            return up, fm, got, slow, entry
        finally:
            await proxy.close()
            up.close()

    up, fm, got, slow, entry = run(go())
    assert len(slow) == 1 and len(up.seen) == 1, "three hits answered without parsing or asking"
    assert [m.id for m in got] == [1, 2, 3, 4], "each client gets its own ID"
    # 59: a listed name's TTL ends the renewal slack (1 s) before its set entries do
    assert [ttls(m) for m in got] == [[59], [48], [48], [47]], "aged by whole seconds, rounded up"
    assert all(addrs(m) == ["10.66.2.10"] for m in got)
    assert entry[AGE] == 12, "the aged body is kept for the next hit in the same second"
    st = fm.stats()
    assert (st[S["queries_udp"]], st[S["cache_hits"]], st[S["cache_misses"]], st[S["answered"]]) == (4, 3, 1, 1)
    assert st[S["listed"]] == 4, "a hit for a listed name counts as listed, as a relayed one"
    assert sum(int(st[LAT0 + i]) for i in range(LAT_BUCKETS)) == 4, "every answer is in the latency histogram"


def test_relayed_answers_reach_their_client_out_of_order_and_with_colliding_ids(env):
    """Two clients use the same ID for different names at once; the upstream answers the second query
    first, and sends it to the first query's socket as well (the wrong ID and question there)."""
    held: list = []
    upstream: dict = {}

    def handler(q, raw, peer):
        name = q.question[0].name.to_text().rstrip(".")
        held.append((answer(q, (name, 60, "A", ["10.66.2.1" if name.startswith("a.") else "10.66.2.2"])), peer))
        if len(held) == 2:
            (a, a_peer), (b, b_peer) = held
            for data, to in ((b, a_peer), (b, b_peer), (a, a_peer)):
                upstream["up"].udp.sendto(data, to)
        return []

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)
        upstream["up"] = up
        try:
            first = asyncio.create_task(ask(port, "a.cdn.example.test", qid=7))
            while not held:                                   # the first query is at the upstream
                await asyncio.sleep(0.01)
            second = await ask(port, "b.cdn.example.test", qid=7)
            return fm, await first, second
        finally:
            await proxy.close()
            up.close()

    fm, first, second = run(go())
    assert first.id == second.id == 7
    assert addrs(first) == ["10.66.2.1"] and addrs(second) == ["10.66.2.2"]
    assert first.question[0].name == dns.name.from_text("a.cdn.example.test")
    st = fm.stats()
    assert st[S["mismatched"]] == 1 and st[S["answered"]] == 2
    assert {ip for _, ip in fm.sets} == {"10.66.2.1", "10.66.2.2"}


def test_a_silent_first_upstream_times_out_and_the_next_one_answers(env):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))                            # bound, never answers: a timeout, no error
    quiet = silent.getsockname()

    def handler(q, raw, peer):
        return [answer(q, ("other.example.test", 60, "A", ["10.66.2.11"]))]

    async def go():
        good = Upstream(handler)
        await good.serve()
        up, proxy, fm, port = await _proxy(env, handler, timeout=0.2, upstreams=[quiet, ("127.0.0.1", good.port)])
        try:
            return fm, await ask(port, "other.example.test"), proxy.inflight, dict(proxy.pool.open)
        finally:
            await proxy.close()
            up.close()
            good.close()

    fm, m, inflight, open_ = run(go())
    silent.close()
    assert addrs(m) == ["10.66.2.11"]
    st = fm.stats()
    assert st[S["upstream_timeout"]] == 1 and st[S["servfail"]] == 0 and st[S["answered"]] == 1
    assert inflight == 0 and open_.get(quiet, 0) == 0, "the timed-out attempt's socket was closed (before close())"


class _Recorder:
    """A relay as Deadlines sees it; `expired` records every call (Relay decides what a call means)."""

    def __init__(self, name, fired, fail=False):
        self.name, self.fired, self.fail, self.sk, self.idx = name, fired, fail, object(), 1

    def expired(self, attempt):
        self.fired.append(self.name)
        if self.fail:
            raise RuntimeError("broken relay")


async def _until(cond, what, limit=5.0):
    loop = asyncio.get_running_loop()
    end = loop.time() + limit
    while not cond():
        assert loop.time() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.005)


def test_deadlines_fire_in_due_time_order_across_timeout_values():
    """Both entries come due before the timer can fire (the loop is held): the earlier one first, not
    the one of the queue made first."""
    async def go():
        fired: list[str] = []
        d = Deadlines(64)
        d.add(0.2, _Recorder("later", fired), 1)
        d.add(0.1, _Recorder("earlier", fired), 1)
        time.sleep(0.25)                                      # both due at the same _fire
        await _until(lambda: len(fired) == 2, "both deadlines")
        d.close()
        return fired

    assert run(go()) == ["earlier", "later"]


def test_a_failing_relay_neither_stops_the_other_deadlines_nor_the_timer(caplog):
    async def go():
        fired: list[str] = []
        d = Deadlines(64)
        d.add(0.05, _Recorder("bad", fired, fail=True), 1)
        d.add(0.05, _Recorder("same_turn", fired), 1)
        d.add(0.3, _Recorder("re_armed", fired), 1)
        await _until(lambda: len(fired) == 3, "all three deadlines")
        d.close()
        return fired

    assert run(go()) == ["bad", "same_turn", "re_armed"]
    assert "broken relay" in caplog.text, "the failure is logged, not lost"


class _Pool:
    """The pool as a Relay uses it: send hands out a token, release records it."""

    def __init__(self):
        self.sent: list = []
        self.released: list = []

    def send(self, up, wire, waiter):
        self.sent.append((up, wire))
        return object()

    def release(self, up, sk, ok):
        self.released.append((up, ok))


class _Proxy:
    def __init__(self, limit=64):
        self.pool, self.deadlines, self.stats = _Pool(), Deadlines(limit), [0] * 64
        self.ended: list = []

    def done(self, r, got, err):
        self.ended.append((r, got, err, asyncio.get_running_loop().time()))


def _relay(proxy, name, *, timeout=30.0, upstreams=(("127.0.0.1", 5301),)):
    data = dns.message.make_query(name, "A").to_wire()
    dns_conf = DnsConf(listen=(("127.0.0.1", 5300),), upstreams=tuple(upstreams), upstream_timeout_s=timeout)
    return Relay(proxy, data, parse_query(data), None, None, lambda b: None, "udp", True, dns_conf, None, 0, 0)


def _answer_to(r: Relay) -> bytes:
    q = dns.message.from_wire(r.wire)
    return answer(q, (q.question[0].name.to_text(), 60, "A", ["10.66.2.30"]))


def test_one_stuck_query_does_not_pin_the_answered_ones():
    """The first query never gets an answer; the thousand after it do: the queue stays within its limit
    (without the rebuild it would hold all of them until the first one's timeout)."""
    async def go():
        proxy = _Proxy(limit=16)
        stuck = _relay(proxy, "stuck.example.test")
        stuck.start()
        longest = 0
        for i in range(1000):
            r = _relay(proxy, f"n{i}.example.test")
            r.start()
            r.offer(_answer_to(r))
            longest = max(longest, len(proxy.deadlines.queues[30.0]))
        queue = list(proxy.deadlines.queues[30.0])
        proxy.deadlines.close()
        return proxy, stuck, longest, queue

    proxy, stuck, longest, queue = run(go())
    assert len(proxy.ended) == 1000 and all(got is not None for _, got, _, _ in proxy.ended)
    assert longest <= 16, f"the queue grew to {longest} entries"
    assert queue[0][1] is stuck, "the stuck query's deadline is kept"


def test_an_answered_query_does_not_time_out_and_an_unanswered_one_does():
    """The answer comes after a later query's deadline was added (so the head is still live then): the
    due entry is skipped by the relay, not by the queue."""
    async def go():
        proxy = _Proxy()
        answered, silent = _relay(proxy, "a.example.test", timeout=0.05), _relay(proxy, "s.example.test", timeout=0.05)
        answered.start()
        silent.start()
        answered.offer(_answer_to(answered))
        await _until(lambda: len(proxy.ended) == 2, "the silent query's SERVFAIL")
        proxy.deadlines.close()
        return proxy, answered, silent

    proxy, answered, silent = run(go())
    (r1, got1, _, _), (r2, got2, err2, _) = proxy.ended
    assert (r1, r2) == (answered, silent) and got1 is not None and got2 is None
    assert "no answer within 0.05 s" in err2
    assert proxy.stats[S["upstream_timeout"]] == 1, "only the unanswered query timed out"


def test_a_retry_after_an_early_error_gets_its_full_timeout():
    """Attempt 1 fails half-way to its deadline; attempt 2 runs until its own deadline, not attempt 1's."""
    timeout = 0.3

    async def go():
        proxy = _Proxy()
        r = _relay(proxy, "r.example.test", timeout=timeout, upstreams=[("127.0.0.1", 5301), ("127.0.0.1", 5302)])
        r.start()
        await asyncio.sleep(timeout / 2)
        t_fail = asyncio.get_running_loop().time()
        r.failed(OSError(errno.ECONNREFUSED, "Connection refused"))
        await _until(lambda: proxy.ended, "the second attempt's timeout")
        proxy.deadlines.close()
        return proxy, t_fail

    proxy, t_fail = run(go())
    (_, got, err, t_end), = proxy.ended
    assert got is None and "Connection refused" in err and "no answer within" in err
    assert t_end - t_fail >= timeout - 0.005, f"attempt 2 was cut short after {t_end - t_fail:.3f} s"
    assert proxy.stats[S["upstream_timeout"]] == 1 and proxy.stats[S["upstream_error"]] == 1


@pytest.mark.parametrize("tcp", [False, True])
def test_every_attempt_has_its_own_id_and_an_earlier_attempts_id_is_mismatched(env, tcp):
    """Attempt 1 goes to an upstream that never answers (UDP: a timeout; TCP: the connection closes);
    attempt 2's upstream first answers with attempt 1's ID, then properly."""
    def silent_handler(q, raw, peer):
        return []

    def good_handler(q, raw, peer):
        right = answer(q, (q.question[0].name.to_text(), 60, "A", ["10.66.2.12"]))
        return [silent.seen[-1][0].to_bytes(2, "big") + right[2:], right]

    silent = Upstream(silent_handler)

    async def go():
        good = Upstream(good_handler)
        await silent.serve()
        await good.serve()
        up, proxy, fm, port = await _proxy(env, silent_handler, timeout=0.2,
                                           upstreams=[("127.0.0.1", silent.port), ("127.0.0.1", good.port)])
        try:
            got = [await ask(port, f"h{i}.cdn.example.test", tcp=tcp) for i in range(5)]
            return fm, got, good.seen
        finally:
            await proxy.close()
            up.close()
            silent.close()
            good.close()

    fm, got, good_seen = run(go())
    ids = [(a[0], b[0]) for a, b in zip(silent.seen, good_seen, strict=True)]
    assert len(ids) == 5 and all(a != b for a, b in ids), f"attempt IDs (1, 2): {ids}"
    assert all(addrs(m) == ["10.66.2.12"] for m in got)
    st = fm.stats()
    if not tcp:                                               # TCP reads one answer per connection: the first
        assert st[S["mismatched"]] == 5, "attempt 1's ID on attempt 2's socket is not its answer"
    assert st[S["answered"]] == 5 and st[S["servfail"]] == 0


def test_a_duplicated_answer_is_read_before_the_socket_serves_another_query(monkeypatch):
    """A pool of one socket: query A's answer comes twice; A accepts the first and, in the same loop turn,
    query B takes the socket. B must see only its own answer; the duplicate is counted."""
    monkeypatch.setattr(dnsupstream, "POOL_SIZE", 1)
    srv = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    srv.bind(("127.0.0.1", 0))
    srv.settimeout(5)
    upstream = srv.getsockname()
    strays: list[int] = []

    class Waiter:
        def __init__(self, then=None):
            self.got: list = []
            self.then = then

        def offer(self, resp):
            self.got.append(resp)
            if len(self.got) == 1:
                pool.release(upstream, self.sk, True)         # as Relay.offer does with an accepted answer
                if self.then is not None:
                    self.then()

        def failed(self, e):
            self.got.append(e)

    async def go():
        b = Waiter()
        a = Waiter(then=lambda: setattr(b, "sk", pool.send(upstream, b"query-B", b)))
        a.sk = pool.send(upstream, b"query-A", a)
        _, peer = srv.recvfrom(100)
        srv.sendto(b"answer-A", peer)
        srv.sendto(b"answer-A-again", peer)                 # both queued before the loop reads the socket
        await _until(lambda: a.got, "A's answer")
        data, peer = srv.recvfrom(100)
        srv.sendto(b"answer-B", peer)
        await _until(lambda: b.got, "B's answer")
        same = a.sk is b.sk
        pool.release(upstream, b.sk, True)
        pool.close()
        return a.got, b.got, data, same

    pool = UdpPool(SocketMaker(), lambda: strays.append(1))
    try:
        a_got, b_got, b_query, same = run(go())
    finally:
        srv.close()
    assert same and b_query == b"query-B", "B was sent on A's socket"
    assert a_got == [b"answer-A"] and b_got == [b"answer-B"]
    assert strays == [1], "the duplicate was read and counted"


def test_close_with_udp_queries_in_flight_frees_everything_and_answers_nothing(env):
    def handler(q, raw, peer):
        return []                                             # never answers

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, timeout=30.0)
        client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        client.setblocking(False)
        client.connect(("127.0.0.1", port))
        try:
            for i in range(3):
                client.send(dns.message.make_query(f"c{i}.cdn.example.test", "A").to_wire())
            await _until(lambda: len(up.seen) == 3, "three queries at the upstream")
            before, timer = proxy.inflight, proxy.deadlines.timer
            await proxy.close()
            await asyncio.sleep(0)
            try:
                client.recv(65535)
                replied = True
            except BlockingIOError:
                replied = False
            return before, timer, proxy, fm, replied
        finally:
            client.close()
            up.close()

    before, timer, proxy, fm, replied = run(go())
    assert before == 3 and proxy.inflight == 0
    assert sum(proxy.pool.open.values()) == 0, "every upstream socket closed"
    assert timer is not None and timer.cancelled() and proxy.deadlines.timer is None
    assert not replied and fm.stats()[S["servfail"]] == 0


def test_a_tcp_query_cancelled_before_its_first_step_leaves_no_in_flight_count(env):
    async def go():
        up, proxy, fm, port = await _proxy(env, lambda q, raw, peer: [])
        replies: list = []
        proxy.on_query(dns.message.make_query("mirror.example.test", "A").to_wire(),
                       ("127.0.0.1", 40000), ("127.0.0.1", 53), replies.append, "tcp")
        before = proxy.inflight
        await proxy.close()                                   # cancels the task before it ever ran
        up.close()
        return before, proxy.inflight, replies

    assert run(go()) == (1, 0, [])
