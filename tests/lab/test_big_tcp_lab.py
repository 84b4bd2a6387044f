"""IPv4 BIG TCP (kernel >= 6.3): with gso_ipv4_max_size above 64k the stack hands TC egress GSO
super-packets whose IPv4 total length is 0. They are judged as the packets they are, not dropped as
malformed (docs/datapath.md "BIG TCP"). Real packets across a veth pair in the lab's namespaces."""
from __future__ import annotations

import os
import sys

import pytest

from hostwall.bpf import layout as L
from hostwall.enforcer.policy import parse_policy
from hostwall.lab.netns import Lab, first_line

from .conftest import _available, hostwall_attached

pytestmark = pytest.mark.lab

BIG = 185000
PORT = 5001
SIZE = 32 << 20
POLICY = f"""
version: 1
name: big-tcp
defaults: {{ingress: allow, egress: deny, stateful: true}}
rules:
  - {{name: stream-out, priority: 1, direction: egress, action: allow, protocol: tcp, ports: [{PORT}]}}
"""
# `ip link set dev eth0 gso_ipv4_max_size N gro_ipv4_max_size N` by rtnetlink (iproute2 < 6.3 lacks it)
SET_BIG = """
import os, socket, struct, sys
IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE, RTM_NEWLINK, NLM_F_REQUEST, NLM_F_ACK = 63, 64, 16, 1, 4
size = int(sys.argv[1])
attrs = b"".join(struct.pack("=HHI", 8, t, size) for t in (IFLA_GSO_IPV4_MAX_SIZE, IFLA_GRO_IPV4_MAX_SIZE))
body = struct.pack("=BxHiII", socket.AF_UNSPEC, 0, socket.if_nametoindex("eth0"), 0, 0) + attrs
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.send(struct.pack("=IHHII", 16 + len(body), RTM_NEWLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0) + body)
err = struct.unpack_from("=i", s.recv(65536), 16)[0]
sys.exit(f"RTM_NEWLINK gso_ipv4_max_size: {os.strerror(-err)}" if err else 0)
"""
SINK = f"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", {PORT})); s.listen(1); print("ready", flush=True)
c, _ = s.accept(); c.settimeout(20); n = 0
while (b := c.recv(1 << 20)):
    n += len(b)
print(n, flush=True)
"""
SEND = f"""
import socket, sys
c = socket.create_connection((sys.argv[1], {PORT}), timeout=20)
c.sendall(b"x" * {SIZE}); c.shutdown(socket.SHUT_WR); c.recv(1)
"""


def _counter(dp, hook: str, verdict: str, reason: str) -> tuple[int, int]:
    idx = L.stats_index(L.C[f"HW_HOOK_{hook.upper()}"], L.C[f"HW_V_{verdict.upper()}"],
                        L.C[f"HW_R_{reason.upper()}"])
    s = dp.stats()
    return int(s["packets"][idx]), int(s["bytes"][idx])


@pytest.fixture
def big_tcp_lab():
    ok, why = _available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) < (6, 3):
        pytest.skip("IPv4 BIG TCP (IFLA_GSO_IPV4_MAX_SIZE) needs Linux >= 6.3")
    with Lab(direct=True) as lab:
        for host in ("prot", "cli"):
            lab.run(host, [sys.executable, "-c", SET_BIG, str(BIG)])
        yield lab


def test_ipv4_big_tcp_super_packets_pass_tc_egress(big_tcp_lab, datapath):
    lab = big_tcp_lab
    sink = lab.popen("cli", [sys.executable, "-c", SINK])
    assert first_line(sink, 10).strip() == "ready"
    with hostwall_attached(lab, datapath, parse_policy(POLICY)):
        lab.run("prot", [sys.executable, "-c", SEND, lab.addr("cli")], timeout=60)
        out, err = lab.stop(sink, timeout=30)
        egress = _counter(datapath, "tc_egress", "allow", "pass_conntrack")
        opened = _counter(datapath, "tc_egress", "allow", "pass_rule")
        malformed = _counter(datapath, "tc_egress", "drop", "malformed")
    assert out.split()[-1:] == [str(SIZE)], (out, err)
    assert malformed == (0, 0)
    # packets over 64k went through the hook: more bytes than that many packets of at most 65535 bytes
    # could carry (so at least one was longer; ordinary 64k TSO cannot pass this)
    assert opened[0] >= 1 and egress[1] > 65535 * egress[0], egress
    assert egress[1] >= SIZE
