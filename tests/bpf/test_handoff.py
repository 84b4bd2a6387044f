"""TC ingress behind XDP (docs/datapath.md, the programs' diagram; "Counters"): with XDP attached
(hw_config.xdp_ingress) a packet XDP judged passes TC ingress unjudged, counted once as pass_judged with
the frame less its Ethernet header, and with no per-packet set-up (docs/benchmarks.md "TC ingress behind
XDP": every packet pays it)."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L

pytestmark = pytest.mark.bpf

DENY_ALL = """
version: 1
name: closed
defaults: {ingress: deny, egress: allow}
rules:
  - {name: dns, priority: 1, direction: ingress, action: deny, protocol: udp, ports: [53]}
"""
# a datagram the policy denies by its rule: judged, TC ingress would drop it
FRAME = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="10.1.1.1", dst="10.2.2.2") / UDP(sport=4000, dport=53) / (b"x" * 30))
PATTERN = 0xA5


def _scratch_bytes(dp) -> int:
    """Bytes of hw_tc_pkt's one entry over all CPUs (per-CPU values are padded to 8 bytes)."""
    return (bpfsys.map_info(dp.map_fds["hw_tc_pkt"]).value_size + 7) // 8 * 8 * dp.ncpus


@pytest.fixture
def behind_xdp(harness):
    harness.install(DENY_ALL)
    harness.dp.set_config(xdp_ingress=1)
    yield harness
    harness.dp.set_config(xdp_ingress=0)


def test_judged_packet_passes_tc_ingress_counted_in_aggregate(behind_xdp):
    h = behind_xdp
    dp = h.dp
    i = L.stats_index(L.C["HW_HOOK_TC_INGRESS"], L.C["HW_V_ALLOW"], L.C["HW_R_PASS_JUDGED"])
    before, ports = dp.stats()[i].copy(), dp.port_stats().copy()
    out = h.run("tc_ingress", FRAME)
    assert (out.passed, out.verdict, out.reason, out.rule_slot) == (True, "allow", "pass_judged", None)
    after = dp.stats()[i]
    assert int(after["packets"] - before["packets"]) == 1
    assert int(after["bytes"] - before["bytes"]) == len(FRAME) - 14       # the frame less its Ethernet header
    assert np.array_equal(dp.port_stats(), ports)                          # XDP counted the port


def test_judged_packet_costs_no_parse_setup(behind_xdp):
    """The judged path leaves before the parse scratch is cleared (a 144-byte memset per packet)."""
    dp = behind_xdp.dp
    fd = dp.map_fds["hw_tc_pkt"]
    size = _scratch_bytes(dp)
    pattern = bytes([PATTERN]) * size
    bpfsys.map_update(fd, b"\0" * 4, pattern)
    assert behind_xdp.run("tc_ingress", FRAME).reason == "pass_judged"
    assert bpfsys.map_lookup(fd, b"\0" * 4, size) == pattern


def test_unjudged_packet_is_judged_by_tc_ingress(harness):
    """Without XDP (xdp_ingress 0) TC ingress judges: the rule drops the datagram."""
    harness.install(DENY_ALL)
    out = harness.run("tc_ingress", FRAME)
    assert (out.passed, out.verdict, out.reason) == (False, "drop", "policy_deny")
