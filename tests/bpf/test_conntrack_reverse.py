"""A SYN in the reverse direction on a live tuple (docs/datapath.md "Reused tuples"), through test-run
with an injected clock: the peer's bare SYN from the responder's side of a connection the host opened —
a blind spoofer's, who guessed the host's ephemeral port — is judged by the policy as an untracked packet
(denied: dropped as before) but never takes the slot: allowed, it passes out of window and the host's
connection keeps its entry and its one record. A closing or closed tuple, and the host's own SYN, are
judged afresh as before."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, TCP, fragment
from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, fragment6
from scapy.layers.l2 import Dot1Q
from scapy.packet import Raw, raw

from hostwall.bpf import layout as L

from . import test_syn_proxy as sp
from .test_conntrack import ME, ME6, PEER, PEER6, POLICY, E, in_tcp, out_tcp
from .test_conntrack_reuse import DATA, H1, H2, P1, P2, T0, S, _at, _entry, _flows

pytestmark = pytest.mark.bpf

ALLOW_IN = POLICY.replace("ingress: deny", "ingress: allow") % "true"       # monitor mode at adoption
RULE_IN = (POLICY % "true") + (
    "  - {name: ephemeral-in, priority: 2, direction: ingress, action: allow, protocol: tcp,"
    " ports: [\"32768-60999\"]}\n")
HOST, SERVER = 40000, 443                   # the host's ephemeral port, the server it connected to
HOOKS = ["xdp", "tc_ingress"]               # XDP's fast path then xdp_judge; TC ingress without XDP


def _peer(harness, flags: str, seq: int, ack: int = 0, data: bytes = b"", v6: bool = False, t: int = 0,
          hook: str = "xdp"):
    _at(harness, t)
    return harness.run(hook, in_tcp(flags, sport=SERVER, dport=HOST, v6=v6, seq=seq, ack=ack, data=data))


def _host(harness, flags: str, seq: int, ack: int = 0, v6: bool = False, t: int = 0) -> str:
    _at(harness, t)
    return harness.run("tc_egress", out_tcp(flags, sport=HOST, dport=SERVER, v6=v6, seq=seq, ack=ack)).reason


def _host_connection(harness, events, policy: str, v6: bool) -> None:
    """The host's connection to the server, established, 100 bytes from the server; last packet T0 + 5 s."""
    harness.install(policy)
    assert _host(harness, "S", H1, v6=v6, t=T0 + 1 * S) == "pass_default"
    assert _peer(harness, "SA", P1, H1 + 1, v6=v6, t=T0 + 2 * S).reason == "pass_conntrack"
    assert _host(harness, "A", H1 + 1, P1 + 1, v6=v6, t=T0 + 3 * S) == "pass_conntrack"
    assert _peer(harness, "PA", P1 + 1, H1 + 1, b"x" * DATA, v6=v6, t=T0 + 4 * S).reason == "pass_conntrack"
    assert _host(harness, "A", H1 + 1, P1 + 1 + DATA, v6=v6, t=T0 + 5 * S) == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "established"
    assert [f[0] for f in _flows(events)] == ["flow_start"]


def _spoof(harness, v6: bool, hook: str, t: int):
    """The spoofer's SYN from the server's address and port to the host's port, a new ISN."""
    return _peer(harness, "S", P2, v6=v6, t=t, hook=hook)


@pytest.mark.parametrize("close", ["rst", "fin"])
@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_an_allowed_reverse_syn_passes_and_keeps_the_hosts_connection(harness, events, v6, hook, close):
    """Ingress default allow: the spoofed reverse SYN passes (the host's live socket answers with a
    challenge ACK) as pass_conntrack_out_of_window; the entry is byte for byte the same (state, counters,
    start, clock, sequence state), no record ends, and the real connection's close ends it once."""
    _host_connection(harness, events, ALLOW_IN, v6)
    old = _entry(harness, v6)
    got = _spoof(harness, v6, hook, T0 + 60 * S)
    assert (got.passed, got.verdict, got.reason, got.rule_slot) == (True, "allow", "pass_conntrack_out_of_window", None)
    assert _entry(harness, v6).tobytes() == old.tobytes()
    assert _flows(events) == []
    assert _host(harness, "A", H1 + 1, P1 + 1 + DATA, v6=v6, t=T0 + 60 * S) == "pass_conntrack"   # challenge ACK
    if close == "rst":
        assert _peer(harness, "R", P1 + 1 + DATA, v6=v6, t=T0 + 61 * S, hook=hook).reason == "pass_conntrack"
        assert _flows(events) == [("flow_end", T0 + 1 * S, T0 + 61 * S, [4, 3], "closed")]
        return
    assert _peer(harness, "FA", P1 + 1 + DATA, H1 + 1, v6=v6, t=T0 + 61 * S, hook=hook).reason == "pass_conntrack"
    assert _host(harness, "FA", H1 + 1, P1 + 2 + DATA, v6=v6, t=T0 + 62 * S) == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "closing"
    assert _flows(events) == []                     # a FIN close is the collector's, after its grace period
    # its one end from the datapath comes when the host reuses the tuple (the create path)
    assert _host(harness, "S", H2, v6=v6, t=T0 + 63 * S) == "pass_default"
    ends = [f for f in _flows(events) if f[0] == "flow_end"]
    assert ends == [("flow_end", T0 + 1 * S, T0 + 62 * S, [5, 3], "closed")]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_reverse_syn_a_rule_allows_passes_counted_on_the_rule(harness, events, v6):
    """A rule allowing inbound to the host's ephemeral range: the reverse SYN is judged by it (counted on
    the rule) and passes out of window, the entry unchanged."""
    _host_connection(harness, events, RULE_IN, v6)
    old = _entry(harness, v6)
    got = _spoof(harness, v6, "xdp", T0 + 60 * S)
    assert (got.passed, got.reason, got.rule_slot) == \
        (True, "pass_conntrack_out_of_window", harness.slots["ephemeral-in"])
    assert _entry(harness, v6).tobytes() == old.tobytes()
    assert _flows(events) == []


@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_reverse_syn_the_policy_denies_is_dropped(harness, events, v6, hook):
    """No bypass: ingress default deny and no rule for the host's port — the reverse SYN is dropped as an
    invalid continuation, whatever the tuple's entry in the other orientation; the entry unchanged."""
    _host_connection(harness, events, POLICY % "true", v6)
    old = _entry(harness, v6)
    got = _spoof(harness, v6, hook, T0 + 60 * S)
    assert (got.passed, got.verdict, got.reason) == (False, "drop", "conntrack_invalid")
    assert _entry(harness, v6).tobytes() == old.tobytes()
    assert _flows(events) == []


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_half_closed_host_connection_keeps_its_entry_against_a_reverse_syn(harness, events, v6):
    """The host closed its side (fin_wait) while the server still sends: the allowed reverse SYN passes
    out of window and changes nothing; the server's FIN then closes the connection (closing)."""
    _host_connection(harness, events, ALLOW_IN, v6)
    assert _host(harness, "FA", H1 + 1, P1 + 1 + DATA, v6=v6, t=T0 + 6 * S) == "pass_conntrack"
    assert _peer(harness, "PA", P1 + 1 + DATA, H1 + 2, b"y" * DATA, v6=v6, t=T0 + 7 * S).reason == "pass_conntrack"
    old = _entry(harness, v6)
    assert L.CT_STATE_NAMES[int(old["state"])] == "fin_wait"
    assert _spoof(harness, v6, "xdp", T0 + 8 * S).reason == "pass_conntrack_out_of_window"
    assert _entry(harness, v6).tobytes() == old.tobytes()
    assert _flows(events) == []
    assert _peer(harness, "FA", P1 + 1 + 2 * DATA, H1 + 2, v6=v6, t=T0 + 9 * S).reason == "pass_conntrack"
    e = _entry(harness, v6)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["created_ns"])) == ("closing", T0 + 1 * S)


@pytest.mark.parametrize("end", ["closing", "closed"])
def test_a_reverse_syn_on_an_ended_tuple_is_judged_afresh(harness, events, end):
    """Both FINs (closing) or a RST (closed): the connection is over, so the reverse SYN, allowed, opens
    its own connection in the slot (origin ingress, syn_sent); the old flow ends once (closed)."""
    _host_connection(harness, events, ALLOW_IN, False)
    if end == "closing":
        assert _peer(harness, "FA", P1 + 1 + DATA, H1 + 1, t=T0 + 6 * S).reason == "pass_conntrack"
        assert _host(harness, "FA", H1 + 1, P1 + 2 + DATA, t=T0 + 7 * S) == "pass_conntrack"
    else:
        assert _peer(harness, "R", P1 + 1 + DATA, t=T0 + 7 * S).reason == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, False)["state"])] == end
    ended = [("flow_end", T0 + 1 * S, T0 + 7 * S, [4, 3] if end == "closing" else [3, 3], "closed")]
    assert _spoof(harness, False, "xdp", T0 + 60 * S).reason == "pass_default"
    assert [f for f in _flows(events) if f[0] == "flow_end"] == ended
    e = _entry(harness, False)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["origin"]), int(e["created_ns"])) == \
        ("syn_sent", L.C["HW_DIR_INGRESS"], T0 + 60 * S)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_the_hosts_own_reverse_syn_still_takes_the_slot(harness, events, v6):
    """A connection the peer opened (host = responder): the host's SYN from its port to the peer's is
    trusted (its kernel reuses a tuple only once the old socket is gone) and judged afresh as before: it
    opens its connection in the slot and the old flow ends `reused`."""
    harness.install(ALLOW_IN)
    _at(harness, T0 + 1 * S)
    assert harness.run("xdp", in_tcp("S", sport=50000, dport=22, v6=v6, seq=P1, ack=0)).reason == "pass_rule"
    _at(harness, T0 + 2 * S)
    assert harness.run("tc_egress", out_tcp("SA", sport=22, dport=50000, v6=v6, seq=H1, ack=P1 + 1)).reason == \
        "pass_conntrack"
    _at(harness, T0 + 3 * S)
    assert harness.run("xdp", in_tcp("A", sport=50000, dport=22, v6=v6, seq=P1 + 1, ack=H1 + 1)).reason == \
        "pass_conntrack"
    events.drain()
    _at(harness, T0 + 60 * S)
    assert harness.run("tc_egress", out_tcp("S", sport=22, dport=50000, v6=v6, seq=H2, ack=0)).reason == "pass_default"
    assert [f for f in _flows(events) if f[0] == "flow_end"] == [("flow_end", T0 + 1 * S, T0 + 3 * S, [2, 1], "reused")]
    e = _entry(harness, v6)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["origin"])) == ("syn_sent", L.C["HW_DIR_EGRESS"])


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_real_reverse_connection_runs_inside_the_old_entry(harness, events, v6):
    """What a real connection in the reverse direction gets while the old entry is live (documented,
    docs/datapath.md "Reused tuples"): its SYN passes out of window, the host's SYN-ACK is judged by the
    egress policy (the old initiator answering is no continuation), its plain segments pass as the old
    connection's (counted in its flow), the FINs and the host's RST out of the old window; the peer's RST,
    at the end the host's trusted ACKs moved the peer's side to, closes the old entry: one record."""
    _host_connection(harness, events, ALLOW_IN, v6)

    def host(flags, seq, ack, t, data=b""):
        _at(harness, t)
        return harness.run("tc_egress", out_tcp(flags, sport=HOST, dport=SERVER, v6=v6, seq=seq, ack=ack,
                                                 data=data)).reason

    assert _spoof(harness, v6, "xdp", T0 + 60 * S).reason == "pass_conntrack_out_of_window"
    assert host("SA", H2, P2 + 1, T0 + 61 * S) == "pass_default"
    assert _peer(harness, "A", P2 + 1, H2 + 1, v6=v6, t=T0 + 62 * S).reason == "pass_conntrack"
    assert _peer(harness, "PA", P2 + 1, H2 + 1, b"z" * 10, v6=v6, t=T0 + 63 * S).reason == "pass_conntrack"
    assert host("PA", H2 + 1, P2 + 11, T0 + 64 * S, b"q" * 5) == "pass_conntrack"
    assert host("FA", H2 + 6, P2 + 11, T0 + 64 * S) == "pass_conntrack_out_of_window"
    assert _peer(harness, "FA", P2 + 11, H2 + 7, v6=v6, t=T0 + 65 * S).reason == "pass_conntrack_out_of_window"
    assert host("A", H2 + 7, P2 + 12, T0 + 65 * S) == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "established"
    assert _flows(events) == []
    assert _peer(harness, "R", P2 + 12, v6=v6, t=T0 + 66 * S).reason == "pass_conntrack"
    assert _flows(events) == [("flow_end", T0 + 1 * S, T0 + 66 * S, [5, 5], "closed")]


@pytest.mark.parametrize("policy", ["deny", "rule"])
@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_simultaneous_opens_syn_resent_after_established_is_judged(harness, events, v6, hook, policy):
    """TCP hole punching (docs/policy.md "stateful"): both SYNs cross, and the peer's SYN resent with its
    own ISN arrives after the handshake. It is judged as any reverse SYN, not passed as the connection's
    (as the initiator's resent SYN is): the peer knows its ISN, so an unjudged one would let it reach a
    listener on the host's port once the host's socket is gone (docs/datapath.md "Reused tuples").
    Denied: dropped (conntrack_invalid); allowed by a rule: passed out of window; the entry unchanged."""
    harness.install(POLICY % "true" if policy == "deny" else RULE_IN)
    assert _host(harness, "S", H1, v6=v6, t=T0 + 1 * S) == "pass_default"
    assert _peer(harness, "S", P1, v6=v6, t=T0 + 2 * S).reason == "pass_conntrack"
    assert _host(harness, "SA", H1, P1 + 1, v6=v6, t=T0 + 3 * S) == "pass_conntrack"
    assert _peer(harness, "SA", P1, H1 + 1, v6=v6, t=T0 + 4 * S).reason == "pass_conntrack"
    assert _host(harness, "A", H1 + 1, P1 + 1, v6=v6, t=T0 + 5 * S) == "pass_conntrack"
    old = _entry(harness, v6)
    assert L.CT_STATE_NAMES[int(old["state"])] == "established"
    assert [f[0] for f in _flows(events)] == ["flow_start"]
    got = _peer(harness, "S", P1, v6=v6, t=T0 + 6 * S, hook=hook)
    want = (False, "conntrack_invalid") if policy == "deny" else (True, "pass_conntrack_out_of_window")
    assert (got.passed, got.reason) == want
    assert _entry(harness, v6).tobytes() == old.tobytes()
    assert _flows(events) == []


@pytest.mark.parametrize("hook", HOOKS)
def test_audit_mode_counts_a_denied_reverse_syn_as_would_drop(harness, events, hook):
    """Audit: the denied reverse SYN passes as would_drop (conntrack_invalid), still no slot taken."""
    _host_connection(harness, events, (POLICY % "true").replace("stateful: true", "stateful: true, audit: true"), False)
    old = _entry(harness, False)
    got = _spoof(harness, False, hook, T0 + 60 * S)
    assert (got.passed, got.verdict, got.reason) == (True, "would_drop", "conntrack_invalid")
    assert _entry(harness, False).tobytes() == old.tobytes()
    assert _flows(events) == []


@pytest.mark.parametrize("policy", ["allow", "deny"])
@pytest.mark.parametrize("hook", HOOKS)
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_reverse_syn_in_a_first_fragment_or_vlan_tag_is_judged_the_same(harness, events, v6, hook, policy):
    """A first fragment carrying the reverse SYN (xdp_ingress skips its fast path; TC: tc_frag_ingress)
    and a VLAN-tagged one: allowed, out of window (the later fragments follow it); denied, dropped (the
    later fragments unmatched); the entry unchanged."""
    _host_connection(harness, events, ALLOW_IN if policy == "allow" else POLICY % "true", v6)
    old = _entry(harness, v6)
    ip = IPv6(src=PEER6, dst=ME6) if v6 else IP(src=PEER, dst=ME)
    l4 = TCP(sport=SERVER, dport=HOST, flags="S", seq=P2)
    frags = fragment6(ip / IPv6ExtHdrFragment(id=77) / l4 / Raw(b"x" * 4000), 1500) if v6 else \
        fragment(ip / l4 / Raw(b"x" * 4000), fragsize=1480)
    _at(harness, T0 + 60 * S)
    got = [harness.run(hook, raw(E / f)).reason for f in frags]
    first, later = ("pass_conntrack_out_of_window", "pass_fragment") if policy == "allow" else \
        ("conntrack_invalid", "fragment_unmatched")
    assert got == [first] + [later] * (len(frags) - 1)
    assert harness.run(hook, raw(E / Dot1Q(vlan=7) / ip / l4)).reason == first
    assert _entry(harness, v6).tobytes() == old.tobytes()
    assert _flows(events) == []


def test_the_syn_proxy_does_not_answer_a_reverse_syn(harness, events):
    """The SYN proxy on for every port (no ranges): the reverse SYN to the port of the host's connection,
    allowed by a rule, passes out of window to the host's live socket; no cookie SYN-ACK from the
    host's tuple (XDP_TX), and no entry added or changed."""
    sp.install(harness)
    server = "10.81.0.5"
    sp.refresh(harness, server)
    harness.dp.clear_conntrack()            # the refresh SYN went to the stack, tracked: out of the way

    def host(flags: str, seq: int, ack: int = 0) -> str:
        f = raw(E / IP(src=sp.ME, dst=server) / TCP(sport=8080, dport=443, flags=flags, seq=seq, ack=ack))
        return harness.run("tc_egress", f).reason

    assert host("S", H1) == "pass_default"
    assert sp.send(harness, sp.ack(server, 443, P1, H1 + 1, flags="SA")).reason == "pass_conntrack"
    assert host("A", H1 + 1, P1 + 1) == "pass_conntrack"
    old = _entry(harness, False)
    got = sp.send(harness, sp.syn(server, sport=443, seq=P2))
    assert (got.passed, got.reason, got.rule_slot, got.sent_back) == \
        (True, "pass_conntrack_out_of_window", harness.slots["web"], None)
    assert _entry(harness, False).tobytes() == old.tobytes()
