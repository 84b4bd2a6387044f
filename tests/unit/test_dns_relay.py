"""The DNS proxy's fast paths (enforcer/dnsproxy.py `_Udp`, enforcer/dnsrelay.py), in-process against a
scripted upstream (tests/unit/test_dns_proxy.py's harness): a cache hit answered before any parsing still
counts as a query, a hit and a latency, and ages its TTLs; relayed answers reach the client that asked
whatever order they come in and whatever IDs the clients chose; timeouts fire per attempt, in order per
timeout value, and never for an answered query."""
from __future__ import annotations

import asyncio
import socket

import dns.message
import dns.name
import pytest

from hostwall.bpf import layout as L
from hostwall.enforcer.dnscache import AGE
from hostwall.enforcer.dnsrelay import Deadlines

from .test_dns_cache import Clock, addrs, ttls
from .test_dns_proxy import S, Upstream, _proxy, answer, ask, run

LAT0, LAT_BUCKETS = L.C["HW_DNS_LAT0"], L.C["HW_DNS_LAT_BUCKETS"]


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    return tmp_path


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
    assert [ttls(m) for m in got] == [[59], [49], [49], [48]], "aged by whole seconds"
    assert all(addrs(m) == ["10.66.2.10"] for m in got)
    assert entry[AGE] == 11, "the aged body is kept for the next hit in the same second"
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
            return fm, await ask(port, "other.example.test"), proxy.inflight, proxy.pool
        finally:
            await proxy.close()
            up.close()
            good.close()

    fm, m, inflight, pool = run(go())
    silent.close()
    assert addrs(m) == ["10.66.2.11"]
    st = fm.stats()
    assert st[S["upstream_timeout"]] == 1 and st[S["servfail"]] == 0 and st[S["answered"]] == 1
    assert inflight == 0 and pool.open.get(quiet, 0) == 0, "the timed-out attempt's socket was closed"


class _FakeRelay:
    def __init__(self, name, fired):
        self.name, self.fired, self.sk, self.idx = name, fired, object(), 1

    def expired(self, attempt):
        if self.sk is not None and attempt == self.idx:
            self.fired.append(self.name)


def test_deadlines_fire_in_order_across_timeout_values_and_skip_answered_queries():
    async def go():
        fired: list[str] = []
        d = Deadlines()
        slow, fast, answered = (_FakeRelay(n, fired) for n in ("slow", "fast", "answered"))
        d.add(0.3, slow, 1)
        d.add(0.05, fast, 1)
        d.add(0.05, answered, 1)
        answered.sk = None                                    # its answer came
        loop = asyncio.get_running_loop()
        end = loop.time() + 5
        while len(fired) < 2 and loop.time() < end:
            await asyncio.sleep(0.01)
        d.close()
        return fired

    assert run(go()) == ["fast", "slow"]
