"""The DNS proxy's answer cache and upstream socket pool (enforcer/dnscache.py, dnsupstream.py), in-process
against a scripted upstream (tests/unit/test_dns_proxy.py's harness) and a clock the test moves.

The cache's promise for listed names: whenever it serves an answer, every address in it is in the
dynamic set, unexpired (test_a_cached_answer_never_names_an_address_the_set_dropped walks random clocks
and TTLs and checks it at every hit)."""
from __future__ import annotations

import random

import dns.message
import dns.rcode
import dns.rrset
import pytest

from hostwall.enforcer import dnslearn, dnsproxy, dnsupstream, fqdnsets
from hostwall.enforcer.dnscache import cacheable
from hostwall.enforcer.dnswire import parse_query

from .test_dns_proxy import NOW, S, Upstream, _proxy, answer, ask, run


class Clock:
    def __init__(self, monkeypatch):
        self.t = NOW
        monkeypatch.setattr(dnsproxy, "now_ns", lambda: self.t)
        monkeypatch.setattr(dnslearn, "now_ns", lambda: self.t)

    def advance(self, s: float) -> None:
        self.t += int(s * 1e9)


def ttls(m: dns.message.Message) -> list[int]:
    return [rr.ttl for rr in m.answer + m.authority]


def negative(q, soa_ttl: int | None, minimum: int = 10, rcode=dns.rcode.NXDOMAIN) -> bytes:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    if soa_ttl is not None:
        r.authority.append(dns.rrset.from_text("example.test.", soa_ttl, "IN", "SOA",
                                               f"ns.example.test. host.example.test. 1 60 60 600 {minimum}"))
    return r.to_wire()


def addrs(m: dns.message.Message) -> list[str]:
    return [rd.address for rr in m.answer for rd in rr if rr.rdtype in (1, 28)]


def test_hits_skip_the_upstream_keep_the_client_id_and_age_ttls(env, monkeypatch):
    clock = Clock(monkeypatch)

    def handler(q, raw, peer):
        return [answer(q, ("other.example.test", 60, "A", ["10.66.2.11"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, cache=100)
        try:
            first = await ask(port, "other.example.test", qid=1)
            clock.advance(10.5)
            second = await ask(port, "other.example.test", qid=2)
            tcp = await ask(port, "other.example.test", qid=3, tcp=True)     # its own entry
            clock.advance(50)
            third = await ask(port, "other.example.test", qid=4)             # expired: asked again
            return up, fm, first, second, tcp, third
        finally:
            await proxy.close()
            up.close()

    up, fm, first, second, tcp, third = run(go())
    assert [m.id for m in (first, second, tcp, third)] == [1, 2, 3, 4]
    assert ttls(first) == [60] and ttls(second) == [49] and ttls(third) == [60]      # aged 10.5 s: 11, rounded up
    assert addrs(second) == ["10.66.2.11"] and len(up.seen) == 3, up.seen
    st = fm.stats()
    assert (st[S["cache_hits"]], st[S["cache_misses"]], st[S["answered"]]) == (1, 3, 3)


@pytest.mark.parametrize("min_ttl,steps", [(5.0, (0, 0.4, 1, 2.5, 6, 14)),
                                           (2.667, (0, 0.3, 0.45, 0.9, 1.7, 2.6, 3.1))])
def test_a_cached_answer_never_names_an_address_the_set_dropped(env, monkeypatch, min_ttl, steps):
    """Random TTLs (some above max_ttl, some below min_ttl) and clock steps: at every answer the proxy
    gives for a listed name, each address is in the set with an expiry after the clock, and no TTL in it
    outlives that entry. A fractional min_ttl makes entries whose life is not whole seconds, and a
    renewal slack below a second (a quarter of the clamped TTL)."""
    clock = Clock(monkeypatch)
    rng = random.Random(7)
    names = ["a.cdn.example.test", "b.cdn.example.test", "mirror.example.test"]
    ttl_of: dict[str, int] = {}

    def handler(q, raw, peer):
        name = q.question[0].name.to_text().rstrip(".")
        ttl_of[name] = rng.choice([1, 2, 3, 8, 20, 40, 300])
        return [answer(q, (name, ttl_of[name], "A", [f"10.66.2.{names.index(name) + 1}"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, cache=100, min_ttl=min_ttl, max_ttl=15.0)
        served = []
        try:
            for _ in range(150):
                clock.advance(rng.choice(steps))
                name = rng.choice(names)
                m = await ask(port, name)
                for ip in addrs(m):
                    exp = fm.sets.get((1, ip), (0, 0))[0]
                    served.append((name, ip, exp - clock.t))
                    # a client honouring the TTL never connects after the set dropped the address
                    over = [t for t in ttls(m) if t * 1_000_000_000 > exp - clock.t]
                    assert not over, f"{name}: TTL {over} s outlives the set entry ({(exp - clock.t) / 1e9:.1f} s)"
            return fm, served
        finally:
            await proxy.close()
            up.close()

    fm, served = run(go())
    late = [s for s in served if s[2] <= 0]
    assert not late, f"answers naming addresses already dropped from the set: {late[:5]}"
    # and the client has time to connect: held for at least the learner's renewal slack
    # (min(RENEW_SLACK_NS, a quarter of clamp(TTL, min_ttl, 15) s)), as after a relayed answer
    short = [s for s in served if s[2] < min(dnslearn.RENEW_SLACK_NS, min_ttl * 1e9 / 4)]
    assert not short, f"answers naming addresses about to leave the set: {short[:5]}"
    st = fm.stats()
    assert st[S["cache_hits"]] >= 20 and st[S["cache_misses"]] >= 20, "both paths were walked"


def test_negative_answers_need_an_soa_and_failures_are_never_cached(env, monkeypatch):
    clock = Clock(monkeypatch)

    def handler(q, raw, peer):
        name = q.question[0].name.to_text()
        if name.startswith("nx."):
            return [negative(q, soa_ttl=30, minimum=10)]
        if name.startswith("nosoa."):
            return [negative(q, soa_ttl=None)]
        return [negative(q, soa_ttl=30, rcode=dns.rcode.SERVFAIL)]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, cache=100)
        try:
            got = {}
            for name in ("nx.example.test", "nosoa.example.test", "fail.example.test"):
                got[name] = [await ask(port, name)]
                clock.advance(9)
                got[name].append(await ask(port, name))
                clock.advance(2)
                got[name].append(await ask(port, name))
            return up, got
        finally:
            await proxy.close()
            up.close()

    up, got = run(go())
    asked = [q for q, _ in up.seen]
    assert len(asked) == 2 + 3 + 3, "nx: cached for min(SOA TTL 30, MINIMUM 10) s; the others never"
    nx = got["nx.example.test"]
    assert [m.rcode() for m in nx] == [dns.rcode.NXDOMAIN] * 3 and [ttls(m) for m in nx] == [[30], [21], [30]]
    assert all(m.rcode() == dns.rcode.SERVFAIL for m in got["fail.example.test"])


def test_policy_changes_and_a_full_cache(env, monkeypatch):
    Clock(monkeypatch)
    monkeypatch.setattr(dnslearn, "LISTED_RECHECK_S", 0.0)

    def handler(q, raw, peer):
        name = q.question[0].name.to_text().rstrip(".")
        return [answer(q, (name, 300, "A", ["10.66.2.7"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, cache=2)
        try:
            await ask(port, "x.example.test")
            await ask(port, "x.example.test")                       # a hit: unlisted, nothing learnt
            assert len(up.seen) == 1 and not fm.sets
            conf = proxy.learner.cfg.dns
            fqdnsets.publish("/pins/t", {1: ("mirror.example.test",), 2: ("x.example.test",)}, conf, "r2")
            await ask(port, "x.example.test")                       # the swap listed it: asked and learnt
            assert len(up.seen) == 2 and (2, "10.66.2.7") in fm.sets
            for name in ("y.example.test", "z.example.test"):       # room for 2: x goes
                await ask(port, name)
            await ask(port, "x.example.test")
            return up, fm
        finally:
            await proxy.close()
            up.close()

    up, fm = run(go())
    st = fm.stats()
    assert len(up.seen) == 5 and st[S["cache_evictions"]] >= 1 and st[S["cache_hits"]] == 1


def test_cacheable_frames_the_whole_answer():
    q = dns.message.make_query("mirror.example.test", "A", use_edns=0)
    pq = parse_query(q.to_wire())
    wire = answer(q, ("mirror.example.test", 40, "CNAME", ["edge.example.test."]), ("edge.example.test", 25, "A", ["10.66.2.1"]))
    life, offs = cacheable(wire, pq)
    assert life == 25 and len(offs) == 2, "OPT's TTL field is no TTL"
    assert cacheable(wire + b"\0", pq) is None and cacheable(wire[:-2], pq) is None
    tc = bytearray(wire)
    tc[2] |= 0x02
    assert cacheable(bytes(tc), pq) is None
    assert cacheable(answer(q, ("mirror.example.test", 0, "A", ["10.66.2.1"])), pq) is None, "TTL 0: not cached"


def test_upstream_sockets_come_from_a_bounded_pool_picked_at_random(env, monkeypatch):
    monkeypatch.setattr(dnsupstream, "POOL_SIZE", 4)

    def handler(q, raw, peer):
        return [answer(q, ("other.example.test", 60, "A", ["10.66.2.11"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)           # cache off: every query goes up
        try:
            for _ in range(40):
                await ask(port, "other.example.test")
            return up, proxy.pool
        finally:
            await proxy.close()
            up.close()

    up, pool = run(go())
    ports = [p for _, p in up.seen]
    assert len(ports) == 40 and len(set(ports[:4])) == 4, "the pool fills with fresh sockets first"
    assert pool.opened <= 4 + 40 // dnsupstream.MAX_USES, "then idle sockets are reused"
    assert len(set(ports[4:])) >= 3, "a random idle socket per query, not always the same one"


def test_a_policy_change_closes_the_idle_sockets_of_dropped_upstreams(env, monkeypatch):
    monkeypatch.setattr(dnslearn, "LISTED_RECHECK_S", 0.0)

    def handler(q, raw, peer):
        return [answer(q, ("other.example.test", 60, "A", ["10.66.2.11"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)
        up2 = Upstream(handler)
        await up2.serve()
        try:
            old, new = ("127.0.0.1", up.port), ("127.0.0.1", up2.port)
            for _ in range(3):
                await ask(port, "other.example.test")
            idle_before = len(proxy.pool.idle[old])
            conf = proxy.learner.cfg.dns
            fqdnsets.publish("/pins/t", {1: ("mirror.example.test",)}, type(conf)(
                listen=conf.listen, upstreams=(new,), cache_size=0), "r2")
            await ask(port, "other.example.test")
            return idle_before, old in proxy.pool.idle, proxy.pool.open[old], proxy.pool.open[new], len(up2.seen)
        finally:
            await proxy.close()
            up.close()
            up2.close()

    idle_before, old_idle, old_open, new_open, asked_new = run(go())
    assert idle_before >= 1 and not old_idle and old_open == 0, "the old upstream's sockets closed"
    assert asked_new == 1 and new_open == 1


def test_an_answer_whose_learning_hit_a_full_map_is_not_cached(env, monkeypatch):
    """A full learnt-name map refuses the address (`set_full`): the learner still believes it wrote it
    (held_ns says so), but the name's record lacks it, so the next swap's sets would too. Such an answer
    empties the cache and is not cached itself: the next ask goes upstream again."""
    Clock(monkeypatch)

    def handler(q, raw, peer):
        return [answer(q, ("mirror.example.test", 300, "A", ["10.66.2.9"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, cache=100)
        monkeypatch.setattr(fm, "name_ip_put", lambda *a: False)   # the name map is full
        try:
            first = await ask(port, "mirror.example.test")
            second = await ask(port, "mirror.example.test")
            return up, fm, first, second
        finally:
            await proxy.close()
            up.close()

    up, fm, first, second = run(go())
    st = fm.stats()
    assert addrs(first) == addrs(second) == ["10.66.2.9"]
    assert st[S["set_full"]] >= 1 and st[S["cache_hits"]] == 0 and len(up.seen) == 2, up.seen


def test_served_ttls_never_outlive_the_set_entries_and_unlisted_ttls_are_untouched(env, monkeypatch):
    """An upstream TTL of 300 s under max_ttl 15 s: the client is told at most the set entries' life
    less the renewal slack (14 s), relayed and cached alike; an unlisted name keeps its 300 s."""
    clock = Clock(monkeypatch)

    def handler(q, raw, peer):
        name = q.question[0].name.to_text().rstrip(".")
        return [answer(q, (name, 300, "A", ["10.66.2.9"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, cache=100, min_ttl=5.0, max_ttl=15.0)
        try:
            relayed = await ask(port, "mirror.example.test")
            clock.advance(4.2)
            hit = await ask(port, "mirror.example.test")
            other = await ask(port, "other.example.test")
            return fm, relayed, hit, other
        finally:
            await proxy.close()
            up.close()

    fm, relayed, hit, other = run(go())
    assert ttls(relayed) == [14] and ttls(hit) == [9], (ttls(relayed), ttls(hit))    # aged 4.2 s: 5, rounded up
    assert ttls(other) == [300]
    assert fm.stats()[S["cache_hits"]] == 1


def test_idle_upstream_sockets_close_after_max_idle(env, monkeypatch):
    """At a low query rate the pool does not keep its ports open: a socket idle for MAX_IDLE_S is closed
    by the next query's sweep and that query gets a fresh socket on a new port."""
    t = {"now": 1000.0}
    monkeypatch.setattr(dnsupstream.time, "monotonic", lambda: t["now"])

    def handler(q, raw, peer):
        return [answer(q, ("other.example.test", 60, "A", ["10.66.2.11"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)           # cache off: every query goes up
        try:
            pool = proxy.pool
            for _ in range(3):
                await ask(port, "other.example.test")
                t["now"] += 2.0                                     # busy enough: nothing swept
            kept = sum(map(len, pool.idle.values()))
            t["now"] += dnsupstream.MAX_IDLE_S
            await ask(port, "other.example.test")
            return up, kept, sum(map(len, pool.idle.values())), sum(pool.open.values())
        finally:
            await proxy.close()
            up.close()

    up, kept, idle_after, open_after = run(go())
    assert kept == 3, "the first queries each opened a socket, all kept idle"
    assert idle_after == 1 and open_after == 1, "the stale ones closed; only the last query's socket is left"
    assert up.seen[-1][1] not in {p for _, p in up.seen[:3]}, "the last query went out on a new port"
