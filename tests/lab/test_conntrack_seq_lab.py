"""Spoofed RSTs against a real TCP connection under `ingress: deny` (docs/datapath.md "Sequence checks").

The protected host opens two connections to the client namespace (sockets made from this process in
each namespace: lab.socket_maker), so their replies pass only by conntrack. From the client's namespace
a burst of RSTs with the connections' exact 4-tuples and random sequence numbers follows (the off-path
attacker's port sweep, on the right ports). Without sequence checks the first one closes the entry while
the kernel, which checks the RST's sequence itself, keeps the socket: the next reply is dropped and the
connection hangs. With them every spoofed RST passes as `pass_conntrack_out_of_window`, the entries stay
established, both connections still carry data both ways, and the peer's real close still ends each
flow: an abort (the kernel's RST at its own next sequence) closes the entry and the datapath emits the
flow's end; a FIN close moves it to closing (its end is the collector's, after the close grace period).

A random 32-bit sequence number hits one of the two a RST may carry with odds of 2^-31 per packet
(400 packets: ~2e-7 per run).
"""
from __future__ import annotations

import random
import socket
import struct
from typing import NamedTuple

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6
from scapy.packet import raw

from hostwall.bpf import conntrack
from hostwall.bpf import layout as L
from hostwall.enforcer.datapath import Datapath
from hostwall.lab.enforcer_proc import EnforcerProcess
from hostwall.lab.probes import Sender
from tests.lab.test_capture import until

pytestmark = pytest.mark.lab

POLICY = """
version: 1
name: ct-seq-lab
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: nd, priority: 200, direction: ingress, action: allow, protocol: icmpv6, peers: ["fe80::/10", "fd66::/16"]}
"""
SPOOFED = 200            # RSTs per connection, half with ACK set
OP_TIMEOUT = 5.0         # a bound on each socket operation: a round trip takes milliseconds here


class Conn(NamedTuple):
    host: socket.socket            # in the protected host's namespace (the initiator)
    peer: socket.socket            # in the client's namespace
    host_port: int
    peer_port: int


def connect(lab, fam: int) -> Conn:
    """A TCP connection opened by the protected host to a listener in the client's namespace."""
    af = socket.AF_INET6 if fam == 6 else socket.AF_INET
    ls = lab.socket_maker("cli").socket(af, socket.SOCK_STREAM)
    try:
        ls.settimeout(OP_TIMEOUT)
        ls.bind((lab.addr("cli", fam), 0))
        ls.listen(1)
        host = lab.socket_maker("prot").socket(af, socket.SOCK_STREAM)
        host.settimeout(OP_TIMEOUT)
        host.connect((lab.addr("cli", fam), ls.getsockname()[1]))
        peer, _ = ls.accept()
        peer.settimeout(OP_TIMEOUT)
    finally:
        ls.close()
    return Conn(host, peer, host.getsockname()[1], host.getpeername()[1])


def recv_exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def round_trip(c: Conn, tag: bytes) -> bool:
    """tag host → peer, its upper case back (the way back passes only by the conntrack entry)."""
    try:
        c.host.sendall(tag)
        got = recv_exact(c.peer, len(tag))
        c.peer.sendall(got.upper())
        return recv_exact(c.host, len(tag)) == tag.upper()
    except TimeoutError:
        return False


def spoofed_rsts(lab, fam: int, c: Conn, rng: random.Random) -> list[tuple[int, str, bytes]]:
    """RSTs from the peer's address and port to the host's, each with a random sequence number."""
    ip = IPv6 if fam == 6 else IP
    dst = lab.addr("prot", fam)
    return [(fam, dst, raw(ip(src=lab.addr("cli", fam), dst=dst) /
                           TCP(sport=c.peer_port, dport=c.host_port, flags="RA" if i % 2 else "R",
                               seq=rng.getrandbits(32), ack=rng.getrandbits(32))))
            for i in range(SPOOFED)]


def entry(dp: Datapath, fam: int, c: Conn) -> tuple[str, int]:
    """(state name, fin_seen) of the connection's conntrack entry."""
    with conntrack.CtTable(dp.map_fds[conntrack.MAPS[fam]], fam) as t:
        s = t.slots[t.live()]
        ports = (c.host_port, c.peer_port)
        k = s["k"]
        ours = ((k["port_a"] == ports[0]) & (k["port_b"] == ports[1])) | ((k["port_a"] == ports[1]) & (k["port_b"] == ports[0]))
        hit = s[(k["proto"] == 6) & ours]
        assert len(hit) == 1, hit
        return L.CT_STATE_NAMES[int(hit[0]["e"]["state"])], int(hit[0]["e"]["fin_seen"])


def closed_and_reported(e: tuple[str, int]) -> bool:
    return e[0] == "closed" and bool(e[1] & conntrack.END_EMITTED)


def out_of_window(status: dict) -> int:
    return sum(h.get("allow", {}).get("pass_conntrack_out_of_window", {}).get("packets", 0)
               for h in status["counters"].values())


@pytest.mark.parametrize("fam", [4, 6], ids=["v4", "v6"])
def test_spoofed_rsts_leave_a_real_connection_working(lab, tmp_path, fam):
    pol = tmp_path / "ct-seq.yaml"
    pol.write_text(POLICY)
    rng = random.Random(29)
    conns: list[Conn] = []
    with EnforcerProcess(lab, pol) as enf:
        dp = Datapath.open(enf.pin_dir)
        sender = Sender(lab, "cli")
        try:
            for _ in range(2):
                conns.append(connect(lab, fam))
            aborted, finished = conns
            for i, c in enumerate(conns):
                assert round_trip(c, b"before-%d" % i)
                assert entry(dp, fam, c)[0] == "established"
            errs = sender.send([p for c in conns for p in spoofed_rsts(lab, fam, c, rng)])
            assert errs == [0] * (2 * SPOOFED)
            sender.fence(lab.addr("prot"))          # the host has processed every spoofed RST
            for i, c in enumerate(conns):           # the kernel ignored them; so must the datapath
                assert round_trip(c, b"after-%d" % i), f"connection {i} stalled after the spoofed RSTs"
                assert entry(dp, fam, c)[0] == "established"
            until(lambda: out_of_window(enf.status()) >= 2 * SPOOFED, 10, "spoofed RSTs counted")
            assert out_of_window(enf.status()) == 2 * SPOOFED
            # the peer's real close still ends the flow: an abort (RST at its own next sequence) ...
            aborted.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            aborted.peer.close()
            with pytest.raises(ConnectionResetError):
                aborted.host.recv(1)
            until(lambda: closed_and_reported(entry(dp, fam, aborted)), 10, "aborted: closed, its end emitted")
            # ... and a FIN each way
            finished.peer.close()
            assert finished.host.recv(1) == b""
            finished.host.close()
            until(lambda: entry(dp, fam, finished)[0] == "closing", 10, "finished connection closing")
            assert entry(dp, fam, finished)[1] & 3 == 3
        finally:
            for c in conns:
                c.host.close()
                c.peer.close()
            sender.close()
            dp.close()
