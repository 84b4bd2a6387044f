"""FQDN egress allowlists end to end (docs/policy.md "FQDN rules"): the real `hostwall-enforcer run` with its
DNS proxy inside the protected host's namespace, a real DNS server (Debian's dnsmasq) in the attacker's
namespace serving a private zone under example.test with short TTLs, TCP echo servers on extra addresses
of the client host, and real packets through the datapath.

The protected host's clients query the proxy on 127.0.0.1:53 and connect right after the answer, from the
same process (lab/dns.py), so "allowed right after a lookup, first connection included" is measured
without a Python start-up in between."""
from __future__ import annotations

import json
import signal
import time

import dns.flags
import dns.rcode
import pytest

from hostwall.lab import traffic
from hostwall.lab.dns import CNAME, A, DnsServer, Wildcard, addresses, connect, query
from hostwall.lab.enforcer_proc import EnforcerProcess

pytestmark = pytest.mark.lab

UPSTREAM = "10.66.3.2"
PORT = 8080
MIRROR, MIRROR6, CDN, OTHER, DEEP, WILD = "10.66.2.10", "fd66:2::10", "10.66.2.11", "10.66.2.12", "10.66.2.13", \
    "10.66.2.14"
ZONE = [A("mirror.example.test", MIRROR, 2), A("mirror.example.test", MIRROR6, 2), A("long.example.test", MIRROR, 300),
        CNAME("a.cdn.example.test", "edge.cdnhost.test", 300), A("edge.cdnhost.test", CDN, 300),
        A("other.example.test", OTHER, 300), A("deep.x.cdn.example.test", DEEP, 300),
        Wildcard("wild.example.test", WILD)]
# Names with 40 addresses each: answers of ~700 bytes (over 512: EDNS0 over UDP, or truncated and asked
# again over TCP without it). The echo servers listen on the last address of each.
BIG = [f"10.66.2.{100 + i}" for i in range(40)]
BIG_TCP = [f"10.66.2.{140 + i}" for i in range(40)]
ZONE += [A("big.example.test", a, 300) for a in BIG] + [A("bigtcp.example.test", a, 300) for a in BIG_TCP]


def policy_text(name="fq", fqdns=("mirror.example.test", "long.example.test", "*.cdn.example.test"), extra="",
                dns_extra="", upstream=f"{UPSTREAM}:53"):
    return f"""
version: 1
name: {name}
defaults: {{ingress: deny, egress: deny}}
rules:
  - {{name: dns-upstream, priority: 1, direction: egress, action: allow, protocol: any, peers: [{UPSTREAM}/32],
     ports: [53, 5399]}}
  - {{name: mirrors, priority: 10, direction: egress, action: allow, protocol: tcp, ports: [{PORT}],
     fqdns: {json.dumps(list(fqdns))}}}
{extra}
dns: {{listen: ["127.0.0.1:53"], upstreams: ["{upstream}"], min_ttl: 1s, max_ttl: 1h{dns_extra}}}
"""


@pytest.fixture
def world(lab, tmp_path):
    """Servers: dnsmasq (att), TCP echo on PORT at the zone's addresses (cli)."""
    lab.add_addresses("cli", [MIRROR, CDN, OTHER, DEEP, WILD, MIRROR6, BIG[-1], BIG_TCP[-1]])
    with DnsServer(lab, "att", ZONE) as srv, traffic.echo_servers(lab, "cli", tcp=[PORT]):
        yield srv


def write(tmp_path, text, name="p.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def can_connect(lab, addr, timeout=0.6) -> bool:
    s = connect(lab, "prot", addr, PORT, timeout)
    if s is None:
        return False
    s.close()
    return True


def lookup(lab, name, rdtype="A", **kw):
    return query(lab, "prot", "127.0.0.1", name, rdtype, **kw)


def until(pred, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_learnt_address_allowed_from_the_first_connection(lab, world, tmp_path):
    with EnforcerProcess(lab, write(tmp_path, policy_text())) as enf:
        assert "enforcing" in enf.banner
        for addr in (MIRROR, MIRROR6, CDN, OTHER):
            assert not can_connect(lab, addr), f"{addr} must be blocked before any lookup"
        # A lookup, then at once the first connection: the address was in the datapath before the answer
        assert addresses(lookup(lab, "mirror.example.test")) == [MIRROR]
        s = connect(lab, "prot", MIRROR, PORT, 1.0)
        assert s is not None, "the first connection right after the lookup was blocked"
        s.sendall(b"ping")
        assert s.recv(16) == b"ping"
        s.close()
        assert addresses(lookup(lab, "mirror.example.test", "AAAA", tcp=True)) == [MIRROR6]     # TCP path, IPv6
        assert can_connect(lab, MIRROR6)
        # wildcard + CNAME chain: a.cdn.example.test -> edge.cdnhost.test -> CDN
        assert addresses(lookup(lab, "a.cdn.example.test")) == [CDN]
        assert can_connect(lab, CDN)
        # unlisted names resolve (refuse_unlisted is off) but their addresses stay blocked; so do names two
        # labels under the wildcard
        assert addresses(lookup(lab, "other.example.test")) == [OTHER]
        assert addresses(lookup(lab, "deep.x.cdn.example.test")) == [DEEP]
        assert not can_connect(lab, OTHER) and not can_connect(lab, DEEP)
        # status: mirror.example.test's entries (TTL 2 s) may have lapsed by now on a busy machine, so the
        # live rows are checked with a.cdn.example.test (300 s) and mirror's learning by the counters
        st = enf.status()
        fq = st["fqdn"]
        assert "a.cdn.example.test" in {n["name"] for n in fq["names"]}
        assert "other.example.test" not in {n["name"] for n in fq["names"]}
        assert fq["sets"][0]["rules"] == ["mirrors"] and fq["sets"][0]["addresses"] >= 1
        c = fq["proxy"]["counters"]
        assert c["queries_udp"] >= 4 and c["queries_tcp"] == 1 and c["listed"] == 3 and c["learnt"] >= 3
        assert fq["datapath"]["hit"] >= 3
        assert st["map_pressure"]["hw_fqdn"]["entries"] >= 1
        rules = {r["name"]: r["packets"] for r in st["rules"]}
        assert rules["mirrors"] >= 3


def test_large_answers_over_udp_with_edns0_and_over_tcp_after_truncation(lab, world, tmp_path):
    """Every address of a ~700-byte answer enters the set: over UDP with EDNS0, and for a client without
    EDNS0 the truncated UDP answer (TC) and the whole answer over TCP that it asks for next."""
    fqdns = ("big.example.test", "bigtcp.example.test")
    with EnforcerProcess(lab, write(tmp_path, policy_text(fqdns=fqdns))) as enf:
        assert not can_connect(lab, BIG[-1]) and not can_connect(lab, BIG_TCP[-1])
        big = lookup(lab, "big.example.test")                                   # EDNS0: 1232-byte UDP
        assert len(big.to_wire()) > 512 and not big.flags & dns.flags.TC
        assert sorted(addresses(big)) == sorted(BIG)
        assert can_connect(lab, BIG[-1]), "the last address of a large UDP answer was not learnt"

        cut = lookup(lab, "bigtcp.example.test", edns=False)                   # plain DNS: 512 bytes, TC
        assert cut.flags & dns.flags.TC, "a 40-address answer must not fit 512 bytes"
        full = lookup(lab, "bigtcp.example.test", edns=False, tcp=True)
        assert sorted(addresses(full)) == sorted(BIG_TCP)
        assert can_connect(lab, BIG_TCP[-1]), "the last address of the TCP answer was not learnt"
        names = {n["name"]: n["addresses"] for n in enf.status()["fqdn"]["names"]}
        assert names["big.example.test"] == 40 and names["bigtcp.example.test"] == 40
        assert not can_connect(lab, OTHER), "an unlisted name's address stays blocked"


def test_expiry_blocks_new_connections_but_not_an_open_one(lab, world, tmp_path):
    with EnforcerProcess(lab, write(tmp_path, policy_text())) as enf:
        assert addresses(lookup(lab, "mirror.example.test")) == [MIRROR]          # TTL 2 s
        t0 = time.monotonic()
        open_conn = connect(lab, "prot", MIRROR, PORT, 1.0)
        assert open_conn is not None
        until(lambda: not can_connect(lab, MIRROR, 0.3), 10, "the learnt address expires for new connections")
        assert time.monotonic() - t0 >= 1.5, "expired before its TTL"
        for i in range(5):                                     # the open connection keeps passing data
            open_conn.sendall(f"data{i}".encode())
            assert open_conn.recv(16) == f"data{i}".encode()
        open_conn.close()
        st = enf.status()
        assert st["fqdn"]["datapath"]["expired"] >= 1
        # a new lookup allows it again
        lookup(lab, "mirror.example.test")
        assert can_connect(lab, MIRROR)


def test_cached_answers_never_outlive_their_set_entries(lab, world, tmp_path):
    """long.example.test has TTL 300, but max_ttl 4 s keeps its address in the set for 4 s: the proxy's
    answer cache serves the answer only while the address stays in the set for the renewal slack (1 s)
    more, then asks dnsmasq again (and learns the address again before answering). The TTL the client
    sees is lowered to what the set entry has left."""
    with EnforcerProcess(lab, write(tmp_path, policy_text().replace("max_ttl: 1h", "max_ttl: 4s"))) as enf:
        assert addresses(lookup(lab, "long.example.test")) == [MIRROR]
        hit = lookup(lab, "long.example.test")                                  # from the cache
        assert can_connect(lab, MIRROR), "a cached answer's address must be in the set"
        # the client is told no more than the set entry's life less the slack (4 s - 1 s), not 300 s
        assert addresses(hit) == [MIRROR] and hit.answer[0].ttl <= 3, hit.answer[0].ttl
        c = enf.status()["fqdn"]["proxy"]["counters"]
        assert (c["cache_hits"], c["cache_misses"], c["answered"]) == (1, 1, 1)
        until(lambda: not can_connect(lab, MIRROR, 0.3), 10, "the learnt address expires (max_ttl 4 s)")
        assert addresses(lookup(lab, "long.example.test")) == [MIRROR]
        assert can_connect(lab, MIRROR), "the answer after expiry came with its address in the set again"
        c = enf.status()["fqdn"]["proxy"]["counters"]
        assert (c["cache_hits"], c["cache_misses"], c["answered"]) == (1, 2, 2), "the expired entry was not served"


def test_restarts_and_policy_swaps_keep_learnt_entries(lab, world, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    p1 = write(tmp_path, policy_text("fq1"), "p1.yaml")
    enf = EnforcerProcess(lab, p1, keep_attached=True, state_dir=str(state))
    enf.start()
    try:
        lookup(lab, "long.example.test")                       # TTL 300 s
        lookup(lab, "a.cdn.example.test")
        assert can_connect(lab, MIRROR) and can_connect(lab, CDN)
        # the datapath's counts (in hw_tc_pkt, pinned with the instance) survive the takeovers below
        hits = enf.status()["fqdn"]["datapath"]["hit"]
        assert hits >= 2
        # enforcer restart (SIGTERM, programs stay attached), then a crash (SIGKILL): no new lookups
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if sig == signal.SIGKILL:
                enf.proc.kill()
                enf.proc.wait()
            else:
                enf.stop(sig)
            enf = EnforcerProcess(lab, p1, keep_attached=True, state_dir=str(state), pin_dir=enf.pin_dir)
            enf.start()
            assert "took over" in enf.banner
            assert can_connect(lab, MIRROR) and can_connect(lab, CDN), f"learnt entries lost by {sig.name}"
            now_hits = enf.status()["fqdn"]["datapath"]["hit"]
            assert now_hits >= hits + 2, f"the datapath's fqdn counts were reset by {sig.name}: {hits} -> {now_hits}"
            hits = now_hits
            names = {n["name"] for n in enf.status()["fqdn"]["names"]}
            assert {"long.example.test", "a.cdn.example.test"} <= names
        # the proxy serves again after the restart (and a new name is learnt)
        assert addresses(lookup(lab, "mirror.example.test")) == [MIRROR]
        # swap 1: another rule added, the fqdns list unchanged: same set, entries untouched
        set_id = enf.status()["fqdn"]["sets"][0]["id"]
        extra = "  - {name: other-rule, priority: 20, direction: egress, action: allow, protocol: udp, ports: [9]}"
        r = enf.apply(write(tmp_path, policy_text("fq2", extra=extra), "p2.yaml"))
        assert "→" in r.stdout
        assert enf.status()["fqdn"]["sets"][0]["id"] == set_id
        assert can_connect(lab, MIRROR) and can_connect(lab, CDN)
        # swap 2: the list changes (a name added): a new set, filled from the learnt names before the switch
        p3 = write(tmp_path, policy_text("fq3", fqdns=("long.example.test", "*.cdn.example.test", "new.example.test")),
                   "p3.yaml")
        enf.apply(p3)
        sets = enf.status()["fqdn"]["sets"]
        assert [s["id"] for s in sets] != [set_id] and sets[0]["addresses"] >= 2
        assert can_connect(lab, MIRROR) and can_connect(lab, CDN), "learnt entries lost by a policy swap"
        # swap 3: a name dropped from the list: its addresses are no longer allowed
        enf.apply(write(tmp_path, policy_text("fq4", fqdns=("*.cdn.example.test",)), "p4.yaml"))
        assert can_connect(lab, CDN) and not can_connect(lab, MIRROR)
        # SIGHUP reload of the run process itself (back to p1): still serving and learning
        enf.proc.send_signal(signal.SIGHUP)
        until(lambda: enf.status()["policy"] == "fq1", 20, "the SIGHUP reload")
        until(lambda: can_connect(lab, MIRROR), 10, "long.example.test allowed again after the reload")
        assert addresses(lookup(lab, "a.cdn.example.test")) == [CDN]
    finally:
        enf.close()


def test_refuse_unlisted_and_upstream_failures(lab, world, tmp_path):
    with EnforcerProcess(lab, write(tmp_path, policy_text(dns_extra=", refuse_unlisted: true, upstream_timeout: 500ms"))) \
            as enf:
        assert lookup(lab, "other.example.test").rcode() == dns.rcode.REFUSED
        assert lookup(lab, "mirror.example.test").rcode() == dns.rcode.NOERROR
        # upstream down: a port nobody listens on (ICMP port unreachable), then an address nobody has
        for up in (f"{UPSTREAM}:5399", "10.66.3.99:53"):
            enf.apply(write(tmp_path, policy_text("down", upstream=up,
                                                  dns_extra=", refuse_unlisted: true, upstream_timeout: 500ms"),
                            "down.yaml"))
            until(lambda: lookup(lab, "long.example.test", timeout=3).rcode() == dns.rcode.SERVFAIL, 10,
                  f"SERVFAIL with upstream {up}")
        c = enf.status()["fqdn"]["proxy"]["counters"]
        assert c["refused"] == 1 and c["servfail"] >= 2 and c["upstream_error"] >= 1 and c["upstream_timeout"] >= 1
        log = _dns_log(enf)
        actions = [r["event"]["action"] for r in log]
        assert actions[0] == "dns-refused" and "dns-upstream-failure" in actions
        refused = log[0]
        assert refused["dns"]["question"]["name"] == "other.example.test"
        assert refused["source"]["ip"] == "127.0.0.1" and refused["network"]["transport"] == "udp"
        fail = next(r for r in log if r["event"]["action"] == "dns-upstream-failure")
        assert fail["dns"]["response_code"] == "SERVFAIL" and fail["error"]["message"]


def _dns_log(enf) -> list[dict]:
    from pathlib import Path
    path = next(Path(enf.state_dir).glob("*.dns.jsonl"))
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_collector_ships_dns_records_and_names_fqdn_flows(lab, world, tmp_path):
    """The real collector next to the enforcer: flows allowed by the fqdns rule carry destination.domain
    (the name asked), the refused name is a DNS record; both valid ECS 8.11 / OCSF 1.7 (4001, 4003)."""
    from hostwall.collector.encoders import to_ocsf
    from hostwall.lab.collector_proc import CollectorProcess, read_jsonl
    from tests.conformance import ecs, ocsf

    text = policy_text(dns_extra=", refuse_unlisted: true")
    with EnforcerProcess(lab, write(tmp_path, text)) as enf, CollectorProcess(enf, tmp_path / "out") as col:
        assert addresses(lookup(lab, "a.cdn.example.test")) == [CDN]
        s = connect(lab, "prot", CDN, PORT, 1.0)
        assert s is not None
        s.sendall(b"hello")
        assert s.recv(16) == b"hello"
        s.close()
        assert lookup(lab, "other.example.test").rcode() == dns.rcode.REFUSED

        def shipped():
            recs = read_jsonl(col.jsonl) if col.jsonl.exists() else []
            flows = [r for r in recs if r["hostwall"]["kind"] == "flow" and r.get("destination", {}).get("ip") == CDN]
            dnsr = [r for r in recs if r["hostwall"]["kind"] == "dns"]
            return (flows, dnsr) if any("start" in f["event"]["type"] for f in flows) and dnsr else None

        until(lambda: shipped() is not None, 20, "the flow start and the DNS record in the collector's output")
        flows, dnsr = shipped()
        start = next(f for f in flows if "start" in f["event"]["type"])
        assert start["rule"]["name"] == "mirrors" and start["destination"]["domain"] == "a.cdn.example.test"
        assert dnsr[0]["dns"]["question"]["name"] == "other.example.test"
        assert dnsr[0]["dns"]["response_code"] == "REFUSED" and dnsr[0]["event"]["action"] == "dns-refused"
        assert (dnsr[0]["hostwall"]["stream"], dnsr[0]["hostwall"]["seq"]) == ("dns", 0), "numbered in its stream"
        assert isinstance(start["hostwall"]["seq"], int) and start["hostwall"]["stream"] in ("events", "conntrack")
        for r in (start, dnsr[0]):
            assert ecs.validate(r) == [], r
            assert ocsf.validate(to_ocsf(r)) == [], to_ocsf(r)
        assert to_ocsf(dnsr[0])["class_uid"] == 4003
        # the proxy's record counters (pinned hw_dns_stats) reach the collector's ledger
        st = col.wait_status(lambda s: s["ledger"]["kernel_events"].get("dns", {}).get("emitted", 0) >= 1)
        assert st["ledger"]["kernel_events"]["dns"] == {"emitted": 1, "budget": 0, "write_error": 0}
