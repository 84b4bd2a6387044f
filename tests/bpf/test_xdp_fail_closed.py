"""XDP judges ingress alone (docs/datapath.md "Hooks"): when xdp_ingress cannot reach xdp_judge (its
tail call fails: hw_jump empty) it drops the packet, counted judge_unreachable, in audit mode too; and
tc_ingress, kept for test-run, judges every packet itself."""
from __future__ import annotations

import contextlib

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L

pytestmark = pytest.mark.bpf

POLICY = """
version: 1
name: dns-{mode}
defaults: {{ingress: deny, egress: allow, audit: {audit}}}
rules:
  - {{name: dns, priority: 1, direction: ingress, action: {action}, protocol: udp, ports: [53]}}
"""
# a datagram no connection knows: xdp_ingress hands it to xdp_judge by the tail call
FRAME = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="10.1.1.1", dst="10.2.2.2") / UDP(sport=4000, dport=53) / (b"x" * 30))
ZERO = b"\0" * 4


@contextlib.contextmanager
def no_judge(dp):
    """hw_jump[0] (xdp_judge) emptied for the block, then restored."""
    assert bpfsys.map_delete(dp.map_fds["hw_jump"], ZERO)
    try:
        yield
    finally:
        bpfsys.map_update(dp.map_fds["hw_jump"], ZERO, dp.prog_fds["xdp_judge"].to_bytes(4, "little"))


@pytest.mark.parametrize("audit", ["false", "true"])
def test_xdp_without_its_judge_fails_closed(harness, audit):
    """A datagram the policy allows is dropped, counted once as judge_unreachable with its IP bytes."""
    harness.install(POLICY.format(mode="allow", audit=audit, action="allow"))
    assert harness.run("xdp", FRAME).reason == "pass_rule"             # with its judge: the rule passes it
    harness.dp.clear_conntrack()
    i = L.stats_index(L.C["HW_HOOK_XDP_INGRESS"], L.C["HW_V_DROP"], L.C["HW_R_JUDGE_UNREACHABLE"])
    before = harness.dp.stats()[i].copy()
    with no_judge(harness.dp):
        out = harness.run("xdp", FRAME)
    assert (out.passed, out.verdict, out.reason, out.rule_slot) == (False, "drop", "judge_unreachable", None)
    after = harness.dp.stats()[i]
    assert int(after["packets"] - before["packets"]) == 1
    assert int(after["bytes"] - before["bytes"]) == len(FRAME) - 14    # IP-layer bytes
    assert harness.run("xdp", FRAME).reason == "pass_rule"             # restored


def test_tc_ingress_judges_every_packet(harness):
    """tc_ingress (test-run only) judges itself: the rule drops the datagram."""
    harness.install(POLICY.format(mode="deny", audit="false", action="deny"))
    out = harness.run("tc_ingress", FRAME)
    assert (out.passed, out.verdict, out.reason) == (False, "drop", "policy_deny")
