"""The SYN proxy in XDP through test-run (bpf/dos.h syn_port_stage, bpf/syncookie.h; docs/dos.md).

A SYN to a covered port that the policy allows comes back as a cookie SYN-ACK (XDP_TX) and leaves no
tracking state; the client's ACK with that cookie opens a confirmed connection and passes; an ACK with
a wrong cookie is dropped and counted (syn_cookie_invalid). Scapy builds every packet and reads every
answer, checksums included. `auto` follows the per-port SYN rate and conntrack pressure with an
injected clock, against enforcer/dos_reference.py."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, fragment
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import conntrack, flow_agg, syn_proxy
from hostwall.bpf import layout as L
from hostwall.enforcer.dos_reference import DosModel, Pkt, ProfileParams

from .test_dos import frame as dos_frame

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
LO = 1
T0 = 60_000_000_000_000
NS = 1_000_000_000
ME, ME6 = "10.80.0.1", "fd80::1"
POLICY = """
version: 1
name: synproxy
defaults: {{ingress: deny, egress: allow, stateful: true, audit: {audit}}}
rules:
  - {{name: web, priority: 10, direction: ingress, action: allow, protocol: tcp,
     peers: [10.81.0.0/16, "fd81::/32"], ports: [8080]}}
  - {{name: ssh, priority: 10, direction: ingress, action: allow, protocol: tcp, peers: [10.81.0.0/16], ports: [22]}}
dos:
  profiles:
    p:
      syn: {{{syn}}}
interfaces:
  - {{name: lo, dos_profile: p}}
"""


def install(harness, syn: str = "proxy: on", audit: bool = False, now: int = T0) -> ProfileParams:
    harness.install(POLICY.format(syn=syn, audit=str(audit).lower()), dos_interfaces={LO: "p"})
    harness.dp.set_config(test_now_ns=now)
    syn_proxy.clear(harness.dp.map_fds)
    return ProfileParams.from_record(harness.compiled.dos_profiles[0])


def ip_of(src: str):
    return IPv6(src=src, dst=ME6) if ":" in src else IP(src=src, dst=ME)


def syn(src: str, sport: int = 40000, dport: int = 8080, seq: int = 1000, options=(("MSS", 1460),)) -> bytes:
    return raw(E / ip_of(src) / TCP(sport=sport, dport=dport, flags="S", seq=seq, options=list(options)))


def ack(src: str, sport: int, seq: int, ack_no: int, flags: str = "A", dport: int = 8080, options=()) -> bytes:
    return raw(E / ip_of(src) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack_no, options=list(options)))


def send(harness, frame: bytes, now: int | None = None):
    if now is not None:
        harness.dp.set_config(test_now_ns=now)
    return harness.run("xdp", frame, ifindex=LO)


def live(harness) -> int:
    return sum(len(t.live()) for t in conntrack.tables(harness.dp.map_fds))


def refresh(harness, src: str) -> None:
    """The first SYN of a port and family while the proxy answers goes to the host's stack, which keeps
    its cookie window open (bpf/syncookie.h): take that one out of the way."""
    o = send(harness, syn(src, sport=1))
    assert (o.verdict, o.reason, o.sent_back) == ("allow", "pass_rule", None)


def answered(harness, src: str, sport: int = 40000, seq: int = 1000, **kw):
    o = send(harness, syn(src, sport=sport, seq=seq, **kw))
    assert (o.passed, o.verdict, o.reason) == (False, "allow", "pass_syn_cookie"), o
    assert o.sent_back is not None
    return Ether(o.sent_back)


def flow_stats(dp) -> dict[str, dict[str, int]]:
    return flow_agg.stats(dp.map_fds, dp.ncpus)


@pytest.mark.parametrize("src", ["10.81.0.7", "fd81::7"], ids=["v4", "v6"])
def test_syn_is_answered_with_a_cookie_and_no_state_is_kept(harness, src):
    install(harness)
    refresh(harness, src)
    before_live, before = live(harness), flow_stats(harness.dp)["syn_cookie"]
    stats0 = syn_proxy.stats(harness.dp.map_fds, harness.dp.ncpus)
    sa = answered(harness, src, sport=40001, seq=5000)
    v6 = ":" in src
    ip = sa[IPv6] if v6 else sa[IP]
    t = sa[TCP]
    assert (ip.src, ip.dst) == ((ME6, src) if v6 else (ME, src))
    assert (t.sport, t.dport, str(t.flags), t.ack) == (8080, 40001, "SA", 5001)
    assert (sa.src, sa.dst) == (E.dst, E.src)                  # MACs swapped: back where it came from
    assert dict(t.options) == {"MSS": 1460 if not v6 else 1440}
    assert (ip.hlim if v6 else ip.ttl) == 64 and len(sa) == 14 + (40 if v6 else 20) + 24
    # checksums as the receiver checks them: scapy recomputes both from scratch
    again = Ether(raw(sa))
    del again[TCP].chksum
    if not v6:
        del again[IP].chksum
    again = Ether(raw(again))
    assert again[TCP].chksum == t.chksum and (v6 or again[IP].chksum == ip.chksum)
    assert live(harness) == before_live                        # nothing tracked for an unanswered cookie
    after = flow_stats(harness.dp)["syn_cookie"]
    assert (after["flows"] - before["flows"], after["packets"] - before["packets"]) == (1, 1)
    assert syn_proxy.stats(harness.dp.map_fds, harness.dp.ncpus)["answered"] - stats0["answered"] == 1


@pytest.mark.parametrize("src", ["10.81.0.8", "fd81::8"], ids=["v4", "v6"])
def test_valid_cookie_ack_opens_a_confirmed_connection(harness, src):
    install(harness)
    refresh(harness, src)
    sa = answered(harness, src, sport=40002, seq=7000)
    cookie = sa[TCP].seq
    o = send(harness, ack(src, 40002, seq=7001, ack_no=cookie + 1))
    assert (o.passed, o.verdict, o.reason) == (True, "allow", "pass_rule")
    fam = 6 if ":" in src else 4
    with conntrack.CtTable(harness.dp.map_fds[conntrack.MAPS[fam]], fam) as tb:
        states = [L.CT_STATE_NAMES[int(e["state"])] for e in tb.slots[tb.live()]["e"]]
    assert states.count("established") == 1                   # confirmed from the start
    # the connection's later packets are tracked
    o = send(harness, ack(src, 40002, seq=7001, ack_no=cookie + 1, flags="PA"))
    assert o.reason == "pass_conntrack"


@pytest.mark.parametrize("src", ["10.81.0.9", "fd81::9"], ids=["v4", "v6"])
def test_forged_ack_with_a_wrong_cookie_is_dropped_and_counted(harness, src):
    install(harness)
    refresh(harness, src)
    sa = answered(harness, src, sport=40003, seq=9000)
    stats0 = syn_proxy.stats(harness.dp.map_fds, harness.dp.ncpus)
    n0 = live(harness)
    # (the cookie's low bits are the MSS index: a neighbour of a valid cookie may be valid for another
    # MSS, by the kernel's own check too; these differ in the hash)
    for forged in ((sa[TCP].seq + 0x1000) & 0xffffffff, sa[TCP].seq ^ 0x5a5a5a5a, 12345):
        o = send(harness, ack(src, 40003, seq=9001, ack_no=forged))
        assert (o.passed, o.verdict, o.reason) == (False, "drop", "syn_cookie_invalid")
    # a right cookie for another client's tuple is wrong too
    o = send(harness, ack(src, 40004, seq=9001, ack_no=sa[TCP].seq + 1))
    assert o.reason == "syn_cookie_invalid"
    assert syn_proxy.stats(harness.dp.map_fds, harness.dp.ncpus)["cookie_invalid"] - stats0["cookie_invalid"] == 4
    assert live(harness) == n0


def test_invalid_cookie_in_audit_mode_is_would_drop(harness):
    install(harness, audit=True)
    refresh(harness, "10.81.0.10")
    answered(harness, "10.81.0.10")
    o = send(harness, ack("10.81.0.10", 40000, seq=1001, ack_no=1))
    assert (o.passed, o.verdict, o.reason) == (True, "would_drop", "syn_cookie_invalid")


def test_only_allowed_syns_to_covered_ports_are_answered(harness):
    install(harness, 'proxy: on, proxy_ports: [8080, "9000-9100"]')
    refresh(harness, "10.81.0.11")
    assert send(harness, syn("10.82.0.1")).reason == "default_deny"             # the policy's peers
    assert send(harness, syn("10.81.0.11", dport=9050)).reason == "default_deny"  # covered, not allowed
    o = send(harness, syn("10.81.0.11", dport=22))                              # allowed, not covered
    assert (o.reason, o.sent_back) == ("pass_rule", None)
    answered(harness, "10.81.0.11", sport=40005)


def test_full_options_ride_in_the_timestamp(harness):
    install(harness, "proxy: on, proxy_options: full, proxy_wscale: 9")
    refresh(harness, "10.81.0.12")
    opts = [("MSS", 1400), ("SAckOK", b""), ("Timestamp", (424242, 0)), ("NOP", None), ("WScale", 6)]
    sa = answered(harness, "10.81.0.12", sport=40006, options=opts)
    got = dict(sa[TCP].options)
    assert got["MSS"] == 1460 and got["WScale"] == 9 and "SAckOK" in got
    tsval, tsecr = got["Timestamp"]
    assert tsecr == 424242
    assert tsval & 0x3f == 6 | 0x10                            # the client's wscale and SACK (kernel layout)
    assert sa[TCP].dataofs == 10
    # without a timestamp there is nowhere to keep them: MSS only
    sa = answered(harness, "10.81.0.12", sport=40007, options=[("MSS", 1400), ("WScale", 6), ("SAckOK", b"")])
    assert dict(sa[TCP].options) == {"MSS": 1460} and sa[TCP].dataofs == 6


def test_refresh_lets_one_syn_per_family_through_every_30s(harness):
    install(harness)
    kinds = []
    for i, now in enumerate((T0, T0 + NS, T0 + 29 * NS, T0 + 31 * NS, T0 + 32 * NS)):
        o = send(harness, syn("10.81.1.1", sport=41000 + i), now)
        kinds.append(o.reason)
    assert kinds == ["pass_rule", "pass_syn_cookie", "pass_syn_cookie", "pass_rule", "pass_syn_cookie"]
    assert send(harness, syn("fd81::1:1", sport=41010), T0 + 32 * NS).reason == "pass_rule"   # its own window


def _step(model: DosModel, harness, src: str, sport: int, now: int, is_syn: bool = True) -> tuple[str, str]:
    """Run one packet through the kernel and the model; (kernel outcome, model outcome)."""
    pkt = Pkt(src, 6, syn=is_syn, dport=8080)
    want_drop = model.check(pkt, now)
    want = want_drop or {"answer": "pass_syn_cookie"}.get(model.proxy or "", "pass")
    f = syn(src, sport=sport) if is_syn else ack(src, sport, 1, 1)
    o = send(harness, f, now)
    got = o.reason if o.verdict != "allow" or o.reason == "pass_syn_cookie" else "pass"
    return got, want


def test_auto_switches_on_over_the_port_rate_and_off_after_quiet(harness):
    params = install(harness, "proxy: auto, per_port_pps: 5, proxy_quiet: 2s")
    model = DosModel(params)
    seen = []
    for i in range(12):                         # 12 SYNs at once from 12 sources: 5 fit the port's bucket
        got, want = _step(model, harness, f"10.81.2.{i + 1}", 42000 + i, T0)
        assert got == want, (i, got, want)
        seen.append(got)
    assert seen[:5] == ["pass"] * 5 and seen[5] == "pass" and set(seen[6:]) == {"pass_syn_cookie"}
    st = syn_proxy.read(harness.dp.map_fds, T0 + NS)
    assert st.ports == {8080: T0}
    # quiet: 2 s without going over the rate turns it off (the bucket has refilled by then)
    got, want = _step(model, harness, "10.81.2.100", 42100, T0 + 2 * NS + 1)
    assert got == want == "pass"
    assert syn_proxy.read(harness.dp.map_fds, T0 + 2 * NS + 1).ports == {}


def test_auto_idle_learns_valid_cookies_and_judges_invalid_ones_by_policy(harness):
    install(harness, "proxy: auto, per_port_pps: 2, proxy_quiet: 1s")
    for i in range(5):                          # over the rate: on (the 3rd is the refresh)
        send(harness, syn(f"10.81.3.{i + 1}", sport=43000 + i), T0)
    sa = answered(harness, "10.81.3.50", sport=43050, seq=100)
    harness.dp.set_config(test_now_ns=T0 + 3 * NS)           # quiet: idle again
    o = send(harness, ack("10.81.3.50", 43050, seq=101, ack_no=sa[TCP].seq + 1))
    assert o.reason == "pass_rule"                            # the late ACK still opens its connection
    assert send(harness, ack("10.81.3.50", 43050, seq=101, ack_no=sa[TCP].seq + 1, flags="PA")).reason == \
        "pass_conntrack"
    o = send(harness, ack("10.81.3.51", 43051, seq=5, ack_no=77))     # no cookie, proxy idle: the policy judges
    assert (o.verdict, o.reason) == ("allow", "pass_rule")


def test_auto_switches_on_under_conntrack_pressure(harness):
    """Evictions over proxy_pressure per second turn an auto proxy on for all its ports."""
    from .test_conntrack import _same_bucket_flows, out_tcp
    install(harness, "proxy: auto, proxy_pressure: 2, proxy_quiet: 5s")
    flows = _same_bucket_flows(harness.dp, 4, conntrack.WAYS + 4)
    for f in flows:                             # 4 fill the bucket, the next 4 each evict one
        assert harness.run("tc_egress", out_tcp("S", sport=f[0], dport=f[1])).verdict == "allow"
    assert harness.dp.ct_stats()[4]["evicted_unconfirmed"] >= 3
    send(harness, syn("10.81.4.1", sport=44000), T0)          # the refresh SYN also notes the pressure
    assert syn_proxy.read(harness.dp.map_fds, T0).pressure == {0: T0}
    answered(harness, "10.81.4.2", sport=44001)
    assert send(harness, syn("10.81.4.3", sport=44002), T0 + 6 * NS).reason == "pass_rule"   # quiet: off


def test_port_guard_drops_syns_over_the_port_rate_when_the_proxy_is_off(harness):
    install(harness, "per_port_pps: 3")
    got = [send(harness, syn(f"10.81.5.{i + 1}", sport=45000 + i), T0).reason for i in range(6)]
    assert got == ["pass_rule"] * 3 + ["syn_flood"] * 3
    assert syn_proxy.stats(harness.dp.map_fds, harness.dp.ncpus)["port_guard"] >= 3
    # the per-port SYN rate is counted whatever became of the SYNs (the anomaly signal)
    ps = harness.dp.port_stats()
    assert int(ps[8080]["syns"]) >= 6


def test_many_sources_flood_leaves_no_state_with_the_proxy_on(harness):
    install(harness)
    refresh(harness, "10.81.6.1")
    n0 = live(harness)
    rng = np.random.default_rng(20)
    for a, b, sport in zip(rng.integers(0, 256, 300), rng.integers(1, 255, 300), rng.integers(1024, 65535, 300)):
        o = send(harness, syn(f"10.81.{a}.{b}", sport=int(sport)))
        assert o.reason == "pass_syn_cookie"
    assert live(harness) == n0


def test_cookie_check_uses_the_kernel_helpers_tuple(harness):
    """A cookie is bound to the client's address, port and ISN: answered for one tuple, it fails for
    another source address of the same port."""
    install(harness)
    refresh(harness, "10.81.7.1")
    sa = answered(harness, "10.81.7.1", sport=46000, seq=3000)
    o = send(harness, ack("10.81.7.2", 46000, seq=3001, ack_no=sa[TCP].seq + 1))
    assert o.reason == "syn_cookie_invalid"
    o = send(harness, ack("10.81.7.1", 46000, seq=3001, ack_no=sa[TCP].seq + 1))
    assert o.reason == "pass_rule"


def test_a_fragmented_syn_is_not_answered_but_tracked(harness):
    """A SYN in a first fragment (more fragments follow) is not answered from XDP: its cookie SYN-ACK
    would answer half a datagram. It is counted not_answerable and tracked as without the proxy; its
    later fragment follows it (docs/dos.md "What it does not answer")."""
    install(harness)
    refresh(harness, "10.81.9.1")
    stats0 = syn_proxy.stats(harness.dp.map_fds, harness.dp.ncpus)
    n0 = live(harness)
    whole = E / IP(src="10.81.9.1", dst=ME, id=777) / TCP(sport=47000, dport=8080, flags="S", seq=1,
                                                           options=[("MSS", 1460)]) / (b"x" * 64)
    first, later = (raw(E / f) for f in fragment(whole[IP], fragsize=48))
    o = send(harness, first)
    assert (o.passed, o.verdict, o.reason, o.sent_back) == (True, "allow", "pass_rule", None), o
    assert send(harness, later).reason == "pass_fragment"
    assert live(harness) == n0 + 1
    stats = syn_proxy.stats(harness.dp.map_fds, harness.dp.ncpus)
    assert stats["not_answerable"] - stats0["not_answerable"] == 1 and stats["answered"] == stats0["answered"]


def test_dos_frame_and_proxy_agree_on_non_syn_tcp(harness):
    """The DoS tests' TCP frames without SYN are bare ACKs: to a covered port with the proxy on they are
    cookie checks (an untracked ACK without a cookie is dropped)."""
    install(harness)
    o = send(harness, dos_frame(Pkt("10.81.8.1", 6, syn=False, dport=8080)), T0)
    assert o.reason == "syn_cookie_invalid"


def test_enforcer_audits_each_automatic_switch(harness, tmp_path, monkeypatch):
    """enforcer/syn_watch.py: what the datapath switched on and off becomes audit records, which the
    collector ships (they validate as audit records)."""
    import json

    from hostwall.bpf.state import audit_log_path
    from hostwall.collector.records import RecordBuilder
    from hostwall.enforcer.syn_watch import ProxyWatch
    from tests.collector.test_records import HOST, validator
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    install(harness, "proxy: auto, per_port_pps: 2, proxy_quiet: 2s")
    w = ProxyWatch(harness.dp, "/sys/fs/bpf/test-watch", ("p",))
    assert w.poll() == []
    for i in range(4):
        send(harness, syn(f"10.81.9.{i + 1}", sport=47000 + i), T0)
    on = w.poll()
    assert [(r["event"]["action"], r["hostwall"]["syn_proxy"]["port"]) for r in on] == [("syn-proxy-on", 8080)]
    assert w.poll() == []
    harness.dp.set_config(test_now_ns=T0 + 3 * NS)
    off = w.poll()
    assert [r["event"]["action"] for r in off] == ["syn-proxy-off"]
    lines = audit_log_path("/sys/fs/bpf/test-watch").read_text().splitlines()
    assert len(lines) == 2
    b = RecordBuilder(HOST, None)
    for line in lines:
        assert not list(validator("audit.schema.json").iter_errors(b.on_audit(json.loads(line))))
