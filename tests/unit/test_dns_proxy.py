"""The DNS proxy's contract without a kernel (enforcer/dnsproxy.py, dnslearn.py, dnswire.py): the proxy runs
in-process against a scripted upstream on 127.0.0.1, with the pinned maps replaced by an in-memory twin.

Security checks: every upstream query has a fresh random ID and source port; answers with a wrong ID
or question are ignored (counted), answers from another address never reach the proxy's socket; a
malformed answer for a listed name is counted and dropped; only the asked name's CNAME chain is learnt.
Plus: REFUSED and SERVFAIL (with records), EDNS echo, TCP, truncation, TTL clamping, max_ips_per_name."""
from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import socket
import struct

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.bpf.fqdn import Learnt as LearntRow
from hostwall.enforcer import fqdnsets
from hostwall.enforcer.dnslearn import Learner
from hostwall.enforcer.dnspolicy import DnsConf
from hostwall.enforcer.dnsproxy import DnsProxy
from hostwall.enforcer.dnsrecords import DnsRecordLog
from hostwall.enforcer.dnswire import MalformedAnswer, addresses, parse_query

S = {n: i for i, n in L.DNS_STAT_NAMES.items()}
NOW = 10**15


class FakeMaps:
    """In-memory twin of hostwall.bpf.fqdn.FqdnMaps (same methods the learner uses)."""

    def __init__(self, capacity: int = 1000):
        self.evicted = 0
        self.sets: dict[tuple[int, str], tuple[int, int]] = {}
        self.names: dict[str, int] = {}
        self.name_ips: dict[tuple[str, str], tuple[int, int]] = {}
        self.capacity = capacity
        self._stats = np.zeros(L.C["HW_DNS_STATS"], dtype=np.uint64)

    @contextlib.contextmanager
    def writing(self):
        yield

    def set_get(self, sid, ip):
        return self.sets.get((sid, ip))

    def set_put(self, sid, ip, exp, learnt):
        if (sid, ip) not in self.sets and len(self.sets) >= self.capacity:
            return False
        self.sets[(sid, ip)] = (exp, learnt)
        return True

    def name_put(self, name, learnt):
        self.names[name] = learnt
        return True

    def name_ip_put(self, name, ip, exp, learnt):
        self.name_ips[(name, ip)] = (exp, learnt)
        return True

    def learnt(self, now=None):
        return [LearntRow(n, ip, e, lt) for (n, ip), (e, lt) in self.name_ips.items() if now is None or e > now]

    def sweep(self, now):
        return {}

    def stats(self):
        return self._stats


def _port_pair() -> tuple[socket.socket, socket.socket, int]:
    """A UDP and a TCP socket bound to one port of 127.0.0.1. The port the kernel picks for UDP may be
    taken for TCP (other tests, other processes on this machine): pick again, a bounded number of times."""
    for _ in range(200):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind(("127.0.0.1", port))
        except OSError as e:
            udp.close()
            tcp.close()
            if e.errno != errno.EADDRINUSE:
                raise
            continue
        return udp, tcp, port
    raise RuntimeError("no port of 127.0.0.1 free for both UDP and TCP in 200 tries")


def _bind_listener(proxy: DnsProxy) -> tuple[tuple[tuple[str, int], ...], list[socket.socket]]:
    """The proxy's UDP + TCP listening sockets on a free port (bound by the proxy's own bind(); a port
    taken between the probe and the bind is picked again, a bounded number of times)."""
    for _ in range(200):
        udp, tcp, port = _port_pair()
        udp.close()
        tcp.close()
        listen = (("127.0.0.1", port),)
        try:
            return listen, proxy.bind(listen)
        except OSError as e:
            if e.errno != errno.EADDRINUSE:
                raise
    raise RuntimeError("no port of 127.0.0.1 free for the proxy in 200 tries")


class Upstream:
    """A UDP+TCP DNS server on 127.0.0.1 whose answers the test scripts: handler(query Message, raw bytes,
    peer) -> list of raw datagrams to send back (each may be wrong on purpose)."""

    def __init__(self, handler):
        self.handler = handler
        self.seen: list[tuple[int, int]] = []           # (query id, source port)
        self.udp, self.tcp, self.port = _port_pair()
        self.tcp.listen(8)
        self.udp.setblocking(False)
        self.tcp.setblocking(False)

    async def serve(self):
        loop = asyncio.get_running_loop()

        def readable():
            while True:
                try:
                    data, peer = self.udp.recvfrom(65535)
                except BlockingIOError:
                    return
                q = dns.message.from_wire(data)
                self.seen.append((q.id, peer[1]))
                for out in self.handler(q, data, peer):
                    if isinstance(out, tuple):           # (data, from another socket)
                        out[1].sendto(out[0], peer)
                    else:
                        self.udp.sendto(out, peer)

        loop.add_reader(self.udp.fileno(), readable)

        async def tcp_client(r, w):
            n = int.from_bytes(await r.readexactly(2), "big")
            data = await r.readexactly(n)
            q = dns.message.from_wire(data)
            self.seen.append((q.id, w.get_extra_info("peername")[1]))
            for out in self.handler(q, data, None):
                w.write(len(out).to_bytes(2, "big") + out)
            await w.drain()
            w.close()

        self.server = await asyncio.start_server(tcp_client, sock=self.tcp)

    def close(self):
        asyncio.get_event_loop().remove_reader(self.udp.fileno())
        self.server.close()
        self.udp.close()


def answer(q: dns.message.Message, *rrsets: tuple[str, int, str, list[str]], rcode=dns.rcode.NOERROR, tc=False) -> bytes:
    r = dns.message.make_response(q)
    r.set_rcode(rcode)
    for name, ttl, rdtype, values in rrsets:
        r.answer.append(dns.rrset.from_text_list(name.rstrip(".") + ".", ttl, "IN", rdtype, values))
    if tc:
        r.flags |= dns.flags.TC
    return r.to_wire(want_shuffle=False)     # deterministic: hypothesis draws the order


async def _proxy(env, handler, *, sets=None, refuse=False, max_ips=256, min_ttl=5.0, max_ttl=3600.0, timeout=1.0,
                 upstreams=None, cache=0):
    up = Upstream(handler)
    await up.serve()
    listen, socks = _bind_listener(DnsProxy(None, None, None))   # only to bind, as the runner does
    conf = DnsConf(listen=listen, upstreams=tuple(upstreams or [("127.0.0.1", up.port)]),
                   min_ttl_s=min_ttl, max_ttl_s=max_ttl, max_ips_per_name=max_ips, refuse_unlisted=refuse,
                   upstream_timeout_s=timeout, cache_size=cache)
    fqdnsets.publish("/pins/t", sets if sets is not None else {1: ("mirror.example.test", "*.cdn.example.test")},
                     conf, "r1")
    fm = FakeMaps()
    proxy = DnsProxy(Learner(fm, "/pins/t"), DnsRecordLog("/pins/t", fm.stats()), fm.stats())
    await proxy.start(conf.listen, socks)
    port = proxy._udp[0].get_extra_info("sockname")[1]
    return up, proxy, fm, port


async def ask(port: int, name: str, rdtype="A", *, tcp=False, edns=True, qid=None) -> dns.message.Message:
    q = dns.message.make_query(name, rdtype, use_edns=0 if edns else None)
    if qid is not None:
        q.id = qid
    wire = q.to_wire()
    loop = asyncio.get_running_loop()
    if tcp:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(len(wire).to_bytes(2, "big") + wire)
        n = int.from_bytes(await asyncio.wait_for(r.readexactly(2), 5), "big")
        data = await r.readexactly(n)
        w.close()
        return dns.message.from_wire(data)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    s.connect(("127.0.0.1", port))
    s.send(wire)
    try:
        data = await asyncio.wait_for(loop.sock_recv(s, 65535), 5)
    finally:
        s.close()
    return dns.message.from_wire(data)


def run(coro):
    return asyncio.run(coro)


def test_wrong_id_and_wrong_question_are_ignored_and_ids_ports_are_random(env):
    def handler(q, raw, peer):
        bad_id = bytearray(answer(q, ("mirror.example.test", 60, "A", ["10.66.9.9"])))
        struct.pack_into("!H", bad_id, 0, (q.id + 1) & 0xFFFF)
        other = dns.message.make_query("evil.example.test", "A")
        other.id = q.id
        return [bytes(bad_id), answer(other, ("evil.example.test", 60, "A", ["10.66.6.6"])),
                answer(q, ("mirror.example.test", 60, "A", ["10.66.2.10"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)
        try:
            got = [await ask(port, "mirror.example.test", qid=4242) for _ in range(4)]
        finally:
            await proxy.close()
            up.close()
        return up, fm, got

    up, fm, got = run(go())
    assert all(m.id == 4242 for m in got), "the client gets its own ID back"
    assert all([rd.address for rr in m.answer for rd in rr] == ["10.66.2.10"] for m in got)
    st = fm.stats()
    assert st[S["mismatched"]] == 8 and st[S["answered"]] == 4
    ids = [i for i, _ in up.seen]
    ports = [p for _, p in up.seen]
    assert 4242 not in ids and len(set(ids)) == 4 and len(set(ports)) == 4, up.seen
    assert set(ip for (_, ip) in fm.sets) == {"10.66.2.10"}, "nothing of the ignored answers was learnt"


def test_answer_from_another_source_never_reaches_the_proxy(env):
    spoofer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    spoofer.bind(("127.0.0.1", 0))

    def handler(q, raw, peer):
        # the right ID and question, but from another port: the proxy's connected socket never sees it
        return [(answer(q, ("mirror.example.test", 60, "A", ["10.66.6.6"])), spoofer),
                answer(q, ("mirror.example.test", 60, "A", ["10.66.2.10"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)
        try:
            return fm, await ask(port, "mirror.example.test")
        finally:
            await proxy.close()
            up.close()

    fm, m = run(go())
    spoofer.close()
    assert [rd.address for rr in m.answer for rd in rr] == ["10.66.2.10"]
    assert ("10.66.6.6" not in {ip for _, ip in fm.sets}) and fm.stats()[S["mismatched"]] == 0


def test_malformed_answer_for_a_listed_name_is_counted_and_dropped(env):
    def handler(q, raw, peer):
        good = answer(q, ("mirror.example.test", 60, "A", ["10.66.2.10"]))
        broken = good[:12] + good[12:-3]                 # header and question fine, the record cut short
        return [broken, good]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)
        try:
            return fm, await ask(port, "mirror.example.test")
        finally:
            await proxy.close()
            up.close()

    fm, m = run(go())
    assert fm.stats()[S["malformed_answer"]] == 1
    assert [rd.address for rr in m.answer for rd in rr] == ["10.66.2.10"]


def test_cname_chain_is_followed_and_other_names_are_ignored(env):
    def handler(q, raw, peer):
        return [answer(q, ("a.cdn.example.test", 300, "CNAME", ["edge.cdnhost.test."]),
                       ("edge.cdnhost.test", 20, "A", ["10.66.2.11", "10.66.2.12"]),
                       ("unrelated.example.test", 60, "A", ["10.66.6.6"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)
        try:
            await ask(port, "a.cdn.example.test")
            await ask(port, "x.y.cdn.example.test")        # two labels under the wildcard: not listed
            return fm
        finally:
            await proxy.close()
            up.close()

    fm = run(go())
    assert {ip for (_, ip) in fm.sets} == {"10.66.2.11", "10.66.2.12"}
    assert {n for n, _ in fm.name_ips} == {"a.cdn.example.test"}
    exp, learnt = fm.sets[(1, "10.66.2.11")]
    assert 19.0 <= (exp - learnt) / 1e9 <= 20.5, "the chain's smallest TTL (20 s)"
    assert fm.stats()[S["listed"]] == 1


def test_ttl_clamped_and_max_ips_per_name(env):
    def handler(q, raw, peer):
        return [answer(q, ("mirror.example.test", 1 if q.question[0].rdtype == dns.rdatatype.A else 99999, "A"
                           if q.question[0].rdtype == dns.rdatatype.A else "AAAA",
                           ["10.66.2.1", "10.66.2.2", "10.66.2.3"] if q.question[0].rdtype == dns.rdatatype.A
                           else ["fd66::1", "fd66::2"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, max_ips=4, min_ttl=5.0, max_ttl=60.0)
        try:
            await ask(port, "mirror.example.test", "A")
            await ask(port, "mirror.example.test", "AAAA")
            return fm
        finally:
            await proxy.close()
            up.close()

    fm = run(go())
    lives = {ip: (e - lt) / 1e9 for (_, ip), (e, lt) in fm.sets.items()}
    v6 = [ip for ip in lives if ":" in ip]
    assert len(lives) == 4 and len(v6) == 1, "4 per name: the first answer's 3, then the first of the second's"
    assert 4.9 <= lives["10.66.2.1"] <= 5.1 and 59.9 <= lives[v6[0]] <= 60.1, lives
    assert fm.stats()[S["overflow"]] == 1 and fm.stats()[S["learnt"]] == 4


def test_refuse_unlisted_answers_refused_with_edns_and_records_it(env):
    def handler(q, raw, peer):
        return [answer(q, (q.question[0].name.to_text(), 60, "A", ["10.66.2.10"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler, refuse=True)
        try:
            refused = await ask(port, "other.example.test", qid=777)
            plain = await ask(port, "other.example.test", edns=False)
            ok = await ask(port, "mirror.example.test")
            return up, fm, refused, plain, ok
        finally:
            await proxy.close()
            up.close()

    up, fm, refused, plain, ok = run(go())
    assert refused.rcode() == dns.rcode.REFUSED and refused.id == 777 and refused.edns == 0
    assert plain.rcode() == dns.rcode.REFUSED and plain.edns == -1, "EDNS only when the query had it"
    assert ok.rcode() == dns.rcode.NOERROR and len(up.seen) == 1, "refused names never reach the upstream"
    recs = [json.loads(line) for line in (env / "pins_t.dns.jsonl").read_text().splitlines()]
    assert [r["event"]["action"] for r in recs] == ["dns-refused", "dns-refused"]
    assert recs[0]["dns"]["question"]["name"] == "other.example.test" and recs[0]["dns"]["response_code"] == "REFUSED"
    assert fm.stats()[S["refused"]] == 2


def test_upstream_down_gives_servfail_counted_and_recorded(env):
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    dead_port = dead.getsockname()[1]
    dead.close()                                             # nothing listens: ICMP port unreachable

    def silent(q, raw, peer):
        return []

    async def go():
        up, proxy, fm, port = await _proxy(env, silent, timeout=0.3, upstreams=[("127.0.0.1", dead_port)])
        try:
            return fm, await ask(port, "mirror.example.test")
        finally:
            await proxy.close()
            up.close()

    fm, m = run(go())
    assert m.rcode() == dns.rcode.SERVFAIL
    st = fm.stats()
    assert st[S["servfail"]] == 1 and st[S["upstream_error"]] >= 1
    rec = json.loads((env / "pins_t.dns.jsonl").read_text().splitlines()[-1])
    assert rec["event"]["action"] == "dns-upstream-failure" and rec["dns"]["response_code"] == "SERVFAIL"
    assert str(dead_port) in rec["error"]["message"]


def test_silent_upstream_times_out(env):
    async def go():
        up, proxy, fm, port = await _proxy(env, lambda q, raw, peer: [], timeout=0.3)
        try:
            return fm, await ask(port, "other.example.test")
        finally:
            await proxy.close()
            up.close()

    fm, m = run(go())
    assert m.rcode() == dns.rcode.SERVFAIL and fm.stats()[S["upstream_timeout"]] == 1


def test_tcp_and_truncation(env):
    def handler(q, raw, peer):
        if peer is not None:                                 # UDP: truncated, no records
            return [answer(q, tc=True)]
        return [answer(q, ("mirror.example.test", 60, "A", ["10.66.2.10"]))]

    async def go():
        up, proxy, fm, port = await _proxy(env, handler)
        try:
            udp = await ask(port, "mirror.example.test")
            learnt_after_udp = dict(fm.sets)
            tcp = await ask(port, "mirror.example.test", tcp=True)
            return fm, udp, learnt_after_udp, tcp
        finally:
            await proxy.close()
            up.close()

    fm, udp, after_udp, tcp = run(go())
    assert udp.flags & dns.flags.TC and after_udp == {}, "a truncated answer is relayed, nothing learnt"
    assert [rd.address for rr in tcp.answer for rd in rr] == ["10.66.2.10"] and (1, "10.66.2.10") in fm.sets
    assert fm.stats()[S["queries_tcp"]] == 1


def test_malformed_queries_are_dropped_and_counted(env):
    async def go():
        up, proxy, fm, port = await _proxy(env, lambda q, raw, peer: [])
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for junk in (b"\x00", b"\x12\x34\x81\x00" + b"\0" * 8, b"\x12\x34\x01\x00\x00\x02" + b"\0" * 6):
            s.sendto(junk, ("127.0.0.1", port))
        for _ in range(50):
            if fm.stats()[S["malformed_query"]] >= 3:
                break
            await asyncio.sleep(0.02)
        s.close()
        await proxy.close()
        up.close()
        return fm

    fm = run(go())
    assert fm.stats()[S["malformed_query"]] == 3 and fm.stats()[S["answered"]] == 0


def test_wire_helpers():
    q = dns.message.make_query("Mirror.Example.TEST.", "AAAA")
    pq = parse_query(q.to_wire())
    assert (pq.name, pq.qtype, pq.type_name) == ("mirror.example.test", 28, "AAAA")
    for bad in (b"", b"\0" * 11, b"\0\1\x80\0\0\1" + b"\0" * 6):
        with pytest.raises(ValueError):
            parse_query(bad)
    with pytest.raises(MalformedAnswer):
        addresses(answer(q, ("mirror.example.test", 5, "AAAA", ["fd66::1"]))[:-4])
    assert addresses(answer(q, ("mirror.example.test", 5, "AAAA", ["fd66::1"]))) == (["fd66::1"], 5)


@st.composite
def chained_answers(draw):
    """An answer to a random A/AAAA question: a CNAME chain (0-3 links, random case), the addresses at its
    end, unrelated records, all in random order, compressed by dnspython's renderer."""
    rdtype = draw(st.sampled_from(["A", "AAAA"]))
    edns = draw(st.booleans())
    labels = st.text("abcXYZ019-", min_size=1, max_size=8).filter(lambda x: not x.startswith("-") and not x.endswith("-"))
    names = draw(st.lists(st.builds(lambda a, b: f"{a}.{b}.test", labels, labels), min_size=1, max_size=4, unique_by=str.lower))
    q = dns.message.make_query(names[0], rdtype, use_edns=0 if edns else None, id=draw(st.integers(0, 65535)))
    rrs = [(names[i], draw(st.integers(0, 5000)), "CNAME", [names[i + 1].swapcase() + "."]) for i in range(len(names) - 1)]
    if draw(st.booleans()):
        addrs = draw(st.lists(st.sampled_from(["10.66.2.1", "10.66.2.2", "10.0.0.9"] if rdtype == "A"
                                              else ["fd66::1", "fd66::2", "2001:db8::5"]), min_size=1, max_size=3, unique=True))
        rrs.append((names[-1], draw(st.integers(0, 5000)), rdtype, addrs))
    if draw(st.booleans()):
        rrs.append(("unrelated.test", 60, rdtype, ["10.6.6.6"] if rdtype == "A" else ["fd66::666"]))
    rrs = draw(st.permutations(rrs))
    wire = answer(q, *rrs)
    cut = draw(st.sampled_from([0, 0, 0, 1, 3, 11]))           # sometimes broken at the end
    junk = draw(st.sampled_from([b"", b"", b"", b"\0"]))       # or with trailing bytes
    return q, (wire[:-cut] if cut else wire) + junk, not cut and not junk


@settings(max_examples=300, deadline=None)
@given(chained_answers())
def test_the_small_answer_parser_agrees_with_dnspython(qa):
    from hostwall.enforcer.dnswire import _fast
    q, wire, intact = qa
    pq = parse_query(q.to_wire())
    fast = _fast(wire, pq)
    assert fast is not None or not intact, "the small parser must take every well-formed answer of this shape"
    try:
        slow = addresses(wire)                           # dnspython's resolve_chaining
    except MalformedAnswer:
        assert fast is None, "the small parser took an answer dnspython rejects"
        return
    if fast is not None:
        assert (sorted(fast[0]), fast[1] if fast[0] else 0) == (sorted(slow[0]), slow[1] if slow[0] else 0)


def test_an_address_a_full_name_map_refused_is_written_again_by_the_next_answer(env):
    """name_ip_put refused by a full map: the learner must not remember the address as written (it would
    skip the next answer's write, and the name's record, which the next swap's sets are filled from,
    would lack the address until a renewal falls due)."""
    fqdnsets.publish("/pins/t", {1: ("mirror.example.test",)}, DnsConf(listen=(("127.0.0.1", 53),),
                     upstreams=(("127.0.0.1", 53),)), "r1")
    fm = FakeMaps()
    learner = Learner(fm, "/pins/t")
    real = fm.name_ip_put
    fm.name_ip_put = lambda *a: False                  # the name map is full
    first = learner.learn("mirror.example.test", ["10.66.2.9"], 300, now=NOW)
    assert first.full == 1 and first.held_ns == 0 and not fm.name_ips
    fm.name_ip_put = real                              # room again
    learner.learn("mirror.example.test", ["10.66.2.9"], 300, now=NOW + 10**8)
    assert ("mirror.example.test", "10.66.2.9") in fm.name_ips, "the refused address was not written again"
