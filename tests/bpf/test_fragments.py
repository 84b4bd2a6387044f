"""IP fragments through test-run: a later fragment follows its first fragment (docs/datapath.md
"Fragments"). First fragments are judged like whole packets and, when they pass (rule, default or a
tracked connection), note their datagram; later fragments of a noted datagram pass (pass_fragment),
every other later fragment is fragment_unmatched; entries expire, a full bucket evicts its oldest, and
the fragment counters add up to the verdict counters. Real fragmentation is in tests/lab/test_fragments_lab.py."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, TCP, UDP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Ether
from scapy.packet import Raw, raw

from hostwall.bpf import frag
from hostwall.bpf import layout as L

pytestmark = pytest.mark.bpf

E = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
ME, PEER = "10.0.0.1", "192.0.2.9"
ME6, PEER6 = "fd00::1", "fd00:99::9"
POLICY = """
version: 1
name: frag
defaults: {ingress: deny, egress: %s, audit: %s}
rules:
  - {name: mdns-in, priority: 1, direction: ingress, action: allow, protocol: udp, ports: [5353]}
  - {name: tcp-in, priority: 1, direction: ingress, action: allow, protocol: tcp, ports: [8080]}
  - {name: syslog-out, priority: 1, direction: egress, action: allow, protocol: udp, ports: [514]}
"""
T0 = 2_000 * 10**9


def install(harness, egress="allow", audit="false"):
    return harness.install(POLICY % (egress, audit))


def datagram(v6: bool, dport: int, ident: int, size: int = 4000, inbound: bool = True, proto: str = "udp",
             sport: int = 40000) -> list[bytes]:
    """A datagram of `size` payload bytes fragmented as a kernel would (1500-byte MTU): frames in order."""
    src, dst = ((PEER6, ME6) if inbound else (ME6, PEER6)) if v6 else ((PEER, ME) if inbound else (ME, PEER))
    l4 = UDP(sport=sport, dport=dport) if proto == "udp" else TCP(sport=sport, dport=dport, flags="A")
    if v6:
        frags = fragment6(IPv6(src=src, dst=dst) / IPv6ExtHdrFragment(id=ident) / l4 / Raw(b"x" * size), 1500)
    else:
        frags = fragment(IP(src=src, dst=dst, id=ident) / l4 / Raw(b"x" * size), fragsize=1480)
    assert len(frags) >= 3
    return [raw(E / f) for f in frags]


def reasons(harness, hook: str, frames: list[bytes]) -> list[str]:
    return [harness.run(hook, f).reason for f in frames]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
@pytest.mark.parametrize("hook", ["xdp", "tc_ingress"])
def test_later_fragments_follow_an_allowed_first_fragment(harness, v6, hook):
    install(harness)
    allowed = datagram(v6, 5353, 0x1234)
    assert reasons(harness, hook, allowed) == ["pass_rule"] + ["pass_fragment"] * (len(allowed) - 1)
    denied = datagram(v6, 5354, 0x1235)
    assert reasons(harness, hook, denied) == ["default_deny"] + ["fragment_unmatched"] * (len(denied) - 1)
    # a later fragment of a datagram whose first fragment was never seen (another identification)
    stray = datagram(v6, 5353, 0x1236)
    assert reasons(harness, hook, stray[1:]) == ["fragment_unmatched"] * (len(stray) - 1)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_first_fragment_that_arrives_late_lets_only_the_rest_through(harness, v6):
    """Out of order: a later fragment that overtakes its first fragment is dropped (its datagram cannot
    be reassembled: lost, as on a lossy path); the fragments after the first one pass."""
    install(harness)
    f = datagram(v6, 5353, 0x2222, size=6000)
    assert reasons(harness, "xdp", [f[2], f[0], f[1], f[3]]) == \
        ["fragment_unmatched", "pass_rule", "pass_fragment", "pass_fragment"]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_fragmented_answer_of_a_tracked_flow_passes(harness, v6):
    install(harness)
    src, dst = (ME6, PEER6) if v6 else (ME, PEER)
    ip = IPv6(src=src, dst=dst) if v6 else IP(src=src, dst=dst)
    assert harness.run("tc_egress", raw(E / ip / UDP(sport=40000, dport=53) / Raw(b"q" * 30))).reason == "pass_default"
    answer = datagram(v6, 40000, 0x0202, sport=53)
    assert reasons(harness, "xdp", answer) == ["pass_conntrack"] + ["pass_fragment"] * (len(answer) - 1)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_egress_fragments_follow_too_and_directions_do_not_mix(harness, v6):
    install(harness, egress="deny")
    out = datagram(v6, 514, 0x0303, inbound=False)
    assert reasons(harness, "tc_egress", out) == ["pass_rule"] + ["pass_fragment"] * (len(out) - 1)
    blocked = datagram(v6, 515, 0x0304, inbound=False)
    assert reasons(harness, "tc_egress", blocked) == ["default_deny"] + ["fragment_unmatched"] * (len(blocked) - 1)
    # the very same later fragments arriving on ingress (spoofed as ours): the entry is for egress only
    assert set(reasons(harness, "xdp", out[1:])) == {"fragment_unmatched"}
    assert reasons(harness, "tc_egress", out[1:]) == ["pass_fragment"] * (len(out) - 1)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_entries_expire(harness, v6):
    install(harness)
    harness.dp.set_config(test_now_ns=T0)
    f = datagram(v6, 5353, 0x4444)
    assert harness.run("xdp", f[0]).reason == "pass_rule"
    harness.dp.set_config(test_now_ns=T0 + frag.TIMEOUT_NS)
    assert harness.run("xdp", f[1]).reason == "pass_fragment"
    harness.dp.set_config(test_now_ns=T0 + frag.TIMEOUT_NS + 1)
    assert harness.run("xdp", f[2]).reason == "fragment_unmatched"


def test_audit_mode_passes_unmatched_fragments_as_would_drop(harness):
    install(harness, audit="true")
    f = datagram(False, 5354, 0x5555)
    got = [harness.run("xdp", x) for x in f]
    assert [(g.verdict, g.reason, g.passed) for g in got] == \
        [("would_drop", "default_deny", True)] + [("would_drop", "fragment_unmatched", True)] * (len(f) - 1)


def test_tiny_first_fragment_is_malformed(harness):
    """RFC 1858: a first fragment too short to hold its L4 header (here 8 bytes of a 20-byte TCP
    header, the rest in the next fragment) is malformed; what follows it finds no entry."""
    install(harness)
    tcp = raw(TCP(sport=40000, dport=8080, flags="S")) + b"y" * 40
    first = raw(E / IP(src=PEER, dst=ME, id=7, flags="MF", frag=0, proto=6) / Raw(tcp[:8]))
    rest = raw(E / IP(src=PEER, dst=ME, id=7, flags=0, frag=1, proto=6) / Raw(tcp[8:]))
    assert harness.run("xdp", first).reason == "malformed"
    assert harness.run("xdp", rest).reason == "fragment_unmatched"
    # IPv6: the first fragment ends inside the extension chain (RFC 7112: the whole chain must be in it)
    chain = raw(IPv6ExtHdrDestOpt(nh=17, options=[])) + raw(UDP(sport=1, dport=5353))
    first6 = raw(E / IPv6(src=PEER6, dst=ME6) / IPv6ExtHdrFragment(nh=60, m=1, offset=0, id=9) / Raw(chain[:8]))
    assert harness.run("xdp", first6).reason == "malformed"


def test_later_fragment_payload_is_not_parsed_as_headers(harness):
    """A later IPv6 fragment's payload after a fragment header whose next header names an extension
    header is data: it is not stepped over as headers (whatever lengths its bytes claim)."""
    install(harness)
    f = datagram(True, 5353, 0x6666)
    b = bytearray(f[1])
    b[14 + 40] = 60                          # fragment header: next header = destination options
    b[14 + 48:14 + 50] = b"\x11\xff"         # "header" claiming 2 KiB in the payload
    assert harness.run("xdp", f[0]).reason == "pass_rule"
    # read as headers it would be malformed (2 KiB past the frame); as data it follows its first fragment
    # (the IPv6 key has no protocol: the identification is unique per address pair, RFC 8200)
    assert harness.run("xdp", bytes(b)).reason == "pass_fragment"


def _same_bucket_ids(dp, n: int) -> list[int]:
    """n IPv4 identifications of PEER→ME UDP datagrams whose entries share one bucket (this seed)."""
    keys = np.zeros(65536, dtype=frag.KEY_DT[4])
    keys["saddr"] = np.frombuffer(bytes(map(int, PEER.split("."))), np.uint8)
    keys["daddr"] = np.frombuffer(bytes(map(int, ME.split("."))), np.uint8)
    keys["id"] = np.arange(65536, dtype=np.uint32) << 16       # the wire's two bytes first
    keys["proto"] = 17
    keys["dir"] = L.DIR["ingress"]
    first = frag.first_slot(keys, 4, int(dp.config()["table_seed"]))
    vals, counts = np.unique(first, return_counts=True)
    assert counts.max() >= n
    return np.flatnonzero(first == vals[np.argmax(counts)])[:n].tolist()


def test_full_bucket_evicts_the_oldest_and_counters_add_up(harness):
    install(harness)
    ids = _same_bucket_ids(harness.dp, frag.WAYS + 1)
    dgs = [datagram(False, 5353, i, sport=41000 + k) for k, i in enumerate(ids)]     # distinct flows
    s0, st0 = harness.dp.frag_stats()[4], harness.dp.stats()
    for k, d in enumerate(dgs[:-1]):
        harness.dp.set_config(test_now_ns=T0 + k * 10**6)
        assert harness.run("xdp", d[0]).reason == "pass_rule"
    assert harness.dp.map_pressure()["hw_frag4"]["entries"] == frag.WAYS
    harness.dp.set_config(test_now_ns=T0 + 10**8)
    assert harness.run("xdp", dgs[-1][0]).reason == "pass_rule"       # evicts the oldest: ids[0]
    assert harness.run("xdp", dgs[0][1]).reason == "fragment_unmatched"
    for d in dgs[1:]:
        assert reasons(harness, "xdp", d[1:]) == ["pass_fragment"] * (len(d) - 1)
    s1, st1 = harness.dp.frag_stats()[4], harness.dp.stats()
    d = {k: s1[k] - s0[k] for k in s1}
    assert d == {"inserted": frag.WAYS + 1, "evicted": 1, "claim_lost": 0,
                 "followed": sum(len(x) - 1 for x in dgs[1:]), "unmatched": 1}
    moved = st1["packets"] - st0["packets"]
    xdp = L.C["HW_HOOK_XDP_INGRESS"]
    assert moved[L.stats_index(xdp, L.C["HW_V_ALLOW"], L.C["HW_R_PASS_FRAGMENT"])] == d["followed"]
    assert moved[L.stats_index(xdp, L.C["HW_V_DROP"], L.C["HW_R_FRAGMENT_UNMATCHED"])] == d["unmatched"]
    p = harness.dp.map_pressure()["hw_frag4"]
    assert (p["entries"], p["capacity"], p["evicted"]) == (frag.WAYS, frag.SLOTS, s1["evicted"])
    harness.dp.set_config(test_now_ns=T0 + 10**8 + frag.TIMEOUT_NS + 1)
    assert harness.dp.map_pressure()["hw_frag4"]["entries"] == 0     # expired entries do not count


def test_unfragmented_packets_leave_no_entry(harness):
    install(harness)
    before = harness.dp.frag_stats()
    for v6 in (False, True):
        ip = IPv6(src=PEER6, dst=ME6) if v6 else IP(src=PEER, dst=ME, flags="DF")
        assert harness.run("xdp", raw(E / ip / UDP(sport=1, dport=5353))).reason == "pass_rule"
        atomic = IPv6(src=PEER6, dst=ME6) / IPv6ExtHdrFragment(m=0, offset=0, id=5) if v6 else IP(src=PEER, dst=ME)
        assert harness.run("xdp", raw(E / atomic / UDP(sport=2, dport=5353))).reason == "pass_rule"
    assert harness.dp.frag_stats() == before


def test_tc_fragments_fail_closed_without_their_judge_program(harness):
    """TC hands fragments to tc_frag_ingress / tc_frag_egress by a tail call; with that program missing
    (never the case once loaded) a fragment is dropped and counted, not passed unjudged."""
    from hostwall.bpf import bpfsys
    install(harness)
    fd, key = harness.dp.map_fds["hw_jump_tc"], (1).to_bytes(4, "little")      # FRAG_JUMP_EGRESS
    out = datagram(False, 514, 0x7777, inbound=False)
    assert bpfsys.map_delete(fd, key)
    try:
        got = harness.run("tc_egress", out[1])
        assert (got.passed, got.verdict, got.reason) == (False, "drop", "malformed")
        whole = raw(E / IP(src=ME, dst=PEER) / UDP(sport=1, dport=53))
        assert harness.run("tc_egress", whole).reason == "pass_default"        # whole packets never jump
    finally:
        bpfsys.map_update(fd, key, harness.dp.prog_fds["tc_frag_egress"].to_bytes(4, "little"))
    assert harness.run("tc_egress", out[0]).reason == "pass_rule"
