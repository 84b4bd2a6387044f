"""A TCP tuple reused while its conntrack entry still holds the old connection (docs/datapath.md
"Reused tuples"), through test-run with an injected clock: the host's own SYN-ACK to a SYN the entry
does not know, or its own new SYN, proves the old connection over — its flow ends once (end_cause
reused, at its last packet, with its totals) and the slot carries the new one from zero. A SYN from the
peer alone (a spoofer's, answered by the host's challenge ACK) changes nothing."""
from __future__ import annotations

import pytest

from hostwall.bpf import conntrack
from hostwall.bpf import layout as L

from .test_conntrack import POLICY, in_tcp, out_tcp

pytestmark = pytest.mark.bpf

T0 = 5_000 * 10**9
S = 10**9
CLIENT, SERVER = 50000, 22                  # the peer connects to the host's ssh-in port
P1, H1 = 7_000_000, 3_000                   # the first connection's ISNs (peer, host)
P2, H2 = 900_000_000, 2_000_000_000         # the second's: far from the first's, as new ISNs are
DATA = 100


def _at(harness, t_ns: int) -> None:
    harness.dp.set_config(test_now_ns=t_ns)


def _peer(harness, flags: str, seq: int, ack: int = 0, data: bytes = b"", v6: bool = False, t: int = 0) -> str:
    _at(harness, t)
    return harness.run("xdp", in_tcp(flags, sport=CLIENT, dport=SERVER, v6=v6, seq=seq, ack=ack, data=data)).reason


def _host(harness, flags: str, seq: int, ack: int = 0, v6: bool = False, t: int = 0) -> str:
    _at(harness, t)
    return harness.run("tc_egress", out_tcp(flags, sport=SERVER, dport=CLIENT, v6=v6, seq=seq, ack=ack)).reason


def _entry(harness, v6: bool):
    with conntrack.CtTable(harness.dp.map_fds[conntrack.MAPS[6 if v6 else 4]], 6 if v6 else 4) as t:
        idx = t.live()
        assert len(idx) == 1
        return t.slots["e"][idx[0]].copy()


def _flows(events) -> list[tuple[str, int, int, list[int], str]]:
    """(type, start_ns, ts_ns, packets, end_cause) of the flow events since the last drain."""
    out = []
    for e in events.drain():
        kind = L.EVENT_TYPE_NAMES[int(e["type"])]
        if kind in ("flow_start", "flow_end"):
            cause = L.CT_END_CAUSE_NAMES[int(e["end_cause"])] if kind == "flow_end" else ""
            out.append((kind, int(e["start_ns"]), int(e["ts_ns"]), e["packets"].tolist(), cause))
    return out


def _first_connection(harness, events, v6: bool) -> None:
    """The peer's connection to the host, established, 100 bytes each way; its last packet at T0 + 5 s."""
    harness.install(POLICY % "true")
    assert _peer(harness, "S", P1, v6=v6, t=T0 + 1 * S) == "pass_rule"
    assert _host(harness, "SA", H1, P1 + 1, v6=v6, t=T0 + 2 * S) == "pass_conntrack"
    assert _peer(harness, "A", P1 + 1, H1 + 1, v6=v6, t=T0 + 3 * S) == "pass_conntrack"
    assert _peer(harness, "PA", P1 + 1, H1 + 1, b"x" * DATA, v6=v6, t=T0 + 4 * S) == "pass_conntrack"
    assert _host(harness, "A", H1 + 1, P1 + 1 + DATA, v6=v6, t=T0 + 5 * S) == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "established"
    assert [f[0] for f in _flows(events)] == ["flow_start"]


@pytest.mark.parametrize("close", ["rst", "fin"])
@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_peer_reusing_the_tuple_ends_the_old_flow_once_and_tracks_the_new(harness, events, v6, close):
    _first_connection(harness, events, v6)
    old = _entry(harness, v6)
    # the client reuses its port with a new ISN: the SYN alone proves nothing (the host may still hold the
    # old socket and answer with a challenge ACK), so it passes and changes nothing
    assert _peer(harness, "S", P2, v6=v6, t=T0 + 60 * S) == "pass_conntrack_out_of_window"
    same = _entry(harness, v6)
    assert (same["packets"].tolist(), int(same["last_ns"]), int(same["end_ns"])) == \
        (old["packets"].tolist(), int(old["last_ns"]), int(old["end_ns"]))
    # the host's SYN-ACK to it: the host has no socket for the old connection any more
    assert _host(harness, "SA", H2, P2 + 1, v6=v6, t=T0 + 61 * S) == "pass_conntrack"
    assert _flows(events) == [("flow_end", T0 + 1 * S, T0 + 5 * S, [3, 2], "reused")]   # its last packet, totals
    new = _entry(harness, v6)
    assert L.CT_STATE_NAMES[int(new["state"])] == "syn_recv"
    assert (int(new["created_ns"]), new["packets"].tolist(), int(new["reported"]), int(new["fin_seen"])) == \
        (T0 + 61 * S, [0, 1], 0, 0)
    assert (int(new["origin"]), int(new["initiator"])) == (int(old["origin"]), int(old["initiator"]))
    # a blind ACK does not confirm it; the client's ACK of the new SYN-ACK does, and its start is reported
    assert _peer(harness, "A", P2 + 1, H1 + 1, v6=v6, t=T0 + 62 * S) == "pass_conntrack_out_of_window"
    assert _peer(harness, "A", P2 + 1, H2 + 1, v6=v6, t=T0 + 62 * S) == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "established"
    assert _flows(events) == [("flow_start", T0 + 61 * S, T0 + 61 * S, [1, 0], "")]
    # the new connection's close is in its window (it would not be in the old one's)
    if close == "rst":
        assert _peer(harness, "R", P2 + 1, v6=v6, t=T0 + 63 * S) == "pass_conntrack"
        assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "closed"
        assert _flows(events) == [("flow_end", T0 + 61 * S, T0 + 63 * S, [2, 1], "closed")]
    else:
        assert _peer(harness, "FA", P2 + 1, H2 + 1, v6=v6, t=T0 + 63 * S) == "pass_conntrack"
        assert _host(harness, "FA", H2 + 1, P2 + 2, v6=v6, t=T0 + 63 * S) == "pass_conntrack"
        assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "closing"
        assert _flows(events) == []                 # a FIN close is the collector's, after its grace period


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_peers_syn_alone_changes_nothing(harness, events, v6):
    """A spoofed SYN on an established tuple (the host's live socket answers it with a challenge ACK, RFC
    5961 §4), and the host's SYN-ACK retransmitted after the client's data (its final ACK was dropped
    after XDP, e.g. a full accept queue): neither ends the entry or its record."""
    _first_connection(harness, events, v6)
    old = _entry(harness, v6)
    assert _peer(harness, "S", P2, v6=v6, t=T0 + 60 * S) == "pass_conntrack_out_of_window"
    assert _host(harness, "A", H1 + 1, P1 + 1 + DATA, v6=v6, t=T0 + 60 * S) == "pass_conntrack"   # challenge ACK
    assert _host(harness, "SA", H1, P1 + 1, v6=v6, t=T0 + 61 * S) == "pass_conntrack_out_of_window"
    e = _entry(harness, v6)
    assert L.CT_STATE_NAMES[int(e["state"])] == "established"
    assert (int(e["created_ns"]), e["packets"].tolist()) == (int(old["created_ns"]), [3, 3])
    assert _flows(events) == []
    # the connection carries on in its own window, and its end is one record from its first packet
    assert _peer(harness, "R", P1 + 1 + DATA, v6=v6, t=T0 + 62 * S) == "pass_conntrack"
    assert _flows(events) == [("flow_end", T0 + 1 * S, T0 + 62 * S, [4, 3], "closed")]


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_syn_cookie_answer_in_syn_recv_changes_nothing(harness, events, v6):
    """Unconfirmed: a host that answers SYNs with cookies (`tcp_syncookies=2`, the SYN proxy's setting,
    docs/dos.md; or under a SYN flood) keeps no state for the handshake, so it answers a spoofed SYN with
    a new ISN with a SYN-ACK too: that proves nothing about the handshake in progress. Neither changes the
    entry, and the client's ACK still confirms it; a retransmission of its SYN counts in its flow."""
    harness.install(POLICY % "true")
    assert _peer(harness, "S", P1, v6=v6, t=T0 + 1 * S) == "pass_rule"
    assert _host(harness, "SA", H1, P1 + 1, v6=v6, t=T0 + 2 * S) == "pass_conntrack"
    assert _peer(harness, "S", P1, v6=v6, t=T0 + 3 * S) == "pass_conntrack"                  # retransmitted
    assert _peer(harness, "S", P2, v6=v6, t=T0 + 4 * S) == "pass_conntrack_out_of_window"    # spoofed
    assert _host(harness, "SA", H2, P2 + 1, v6=v6, t=T0 + 4 * S) == "pass_conntrack_out_of_window"   # its cookie
    e = _entry(harness, v6)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["created_ns"]), e["packets"].tolist()) == \
        ("syn_recv", T0 + 1 * S, [2, 1])
    assert [f[0] for f in _flows(events)] == ["flow_start"]
    assert _peer(harness, "A", P1 + 1, H1 + 1, v6=v6, t=T0 + 5 * S) == "pass_conntrack"
    e = _entry(harness, v6)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["created_ns"]), e["packets"].tolist()) == \
        ("established", T0 + 1 * S, [3, 1])
    assert _flows(events) == []


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_host_reusing_its_tuple_ends_the_old_flow_once(harness, events, v6):
    """The host connects again from the same port (its kernel reuses a tuple only once its old socket is
    gone): its new SYN is judged afresh, opens the new connection in the slot, and the old flow ends
    (reused) at its last packet; a retransmission of that SYN changes nothing."""
    harness.install(POLICY % "true")
    out = {"sport": CLIENT, "dport": 443, "v6": v6}
    back = {"sport": 443, "dport": CLIENT, "v6": v6}

    def host(flags, seq, ack, t):
        _at(harness, t)
        return harness.run("tc_egress", out_tcp(flags, seq=seq, ack=ack, **out)).reason

    def peer(flags, seq, ack, t):
        _at(harness, t)
        return harness.run("xdp", in_tcp(flags, seq=seq, ack=ack, **back)).reason

    assert host("S", H1, 0, T0 + 1 * S) == "pass_default"
    assert peer("SA", P1, H1 + 1, T0 + 2 * S) == "pass_conntrack"
    assert host("A", H1 + 1, P1 + 1, T0 + 3 * S) == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "established"
    events.drain()
    assert host("S", H2, 0, T0 + 60 * S) == "pass_default"
    assert _flows(events) == [("flow_end", T0 + 1 * S, T0 + 3 * S, [2, 1], "reused"),
                              ("flow_start", T0 + 60 * S, T0 + 60 * S, [1, 0], "")]
    assert host("S", H2, 0, T0 + 61 * S) == "pass_conntrack"                   # retransmitted
    e = _entry(harness, v6)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["created_ns"]), e["packets"].tolist()) == \
        ("syn_sent", T0 + 60 * S, [2, 0])
    assert peer("SA", P2, H2 + 1, T0 + 62 * S) == "pass_conntrack"
    assert host("A", H2 + 1, P2 + 1, T0 + 62 * S) == "pass_conntrack"
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "established"
    assert _flows(events) == []


@pytest.mark.parametrize("state", ["closing", "closing_claimed"])
def test_new_syn_on_a_closing_tuple_reports_the_old_end_once(harness, events, state):
    """A closing entry (both FINs) judges a new SYN afresh (docs/datapath.md "Reused tuples"): the new
    connection takes the slot and the old flow ends once — by the datapath (end_cause closed), or by the
    collector when it has claimed the close already (`reported`), then not by the datapath."""
    _first_connection(harness, events, False)
    assert _peer(harness, "FA", P1 + 1 + DATA, H1 + 1, t=T0 + 6 * S) == "pass_conntrack"
    assert _host(harness, "FA", H1 + 1, P1 + 2 + DATA, t=T0 + 7 * S) == "pass_conntrack"
    if state == "closing_claimed":
        with conntrack.CtTable(harness.dp.map_fds["hw_ct4"], 4) as t:
            t.slots["e"]["reported"][t.live()] = conntrack.REPORTED_CLAIMED
    assert L.CT_STATE_NAMES[int(_entry(harness, False)["state"])] == state.removesuffix("_claimed")
    assert _peer(harness, "S", P2, t=T0 + 60 * S) == "pass_rule"
    ends = [f for f in _flows(events) if f[0] == "flow_end"]
    if state == "closing_claimed":
        assert ends == []
    else:
        assert ends == [("flow_end", T0 + 1 * S, T0 + 7 * S, [4, 3], "closed")]
    e = _entry(harness, False)
    assert (L.CT_STATE_NAMES[int(e["state"])], int(e["reported"]), int(e["created_ns"])) == ("syn_sent", 0, T0 + 60 * S)


@pytest.mark.parametrize("v6", [False, True], ids=["v4", "v6"])
def test_a_half_closed_connection_keeps_its_entry_against_a_peers_syn(harness, events, v6):
    """The peer closed its side (its FIN: fin_wait) while the host still sends: a half-closed connection
    is alive (netfilter ignores a SYN in FIN_WAIT and CLOSE_WAIT too). A SYN from the peer's tuple with a
    new ISN — a blind spoofer's — neither ends its record nor takes its slot; the host's SYN-ACK to it
    (its socket gone: the half-close timed out) ends it once, `reused`, as from established."""
    _first_connection(harness, events, v6)
    assert _peer(harness, "FA", P1 + 1 + DATA, H1 + 1, v6=v6, t=T0 + 6 * S) == "pass_conntrack"
    assert _host(harness, "PA", H1 + 1, P1 + 2 + DATA, v6=v6, t=T0 + 7 * S) == "pass_conntrack"
    old = _entry(harness, v6)
    assert L.CT_STATE_NAMES[int(old["state"])] == "fin_wait"
    assert _peer(harness, "S", P2, v6=v6, t=T0 + 8 * S) == "pass_conntrack_out_of_window"
    same = _entry(harness, v6)
    assert (L.CT_STATE_NAMES[int(same["state"])], int(same["created_ns"]), same["packets"].tolist()) == \
        ("fin_wait", int(old["created_ns"]), old["packets"].tolist())
    assert _flows(events) == []
    assert _host(harness, "SA", H2, P2 + 1, v6=v6, t=T0 + 9 * S) == "pass_conntrack"
    assert _flows(events) == [("flow_end", T0 + 1 * S, T0 + 7 * S, [4, 3], "reused")]
    assert L.CT_STATE_NAMES[int(_entry(harness, v6)["state"])] == "syn_recv"
