"""Fixtures for the netns lab tests: a fresh Lab per test, and hostwall attached through the Python API.

Everything a fixture creates is removed in its teardown (namespaces, links, qdiscs, XDP programs),
also when the test fails. Tests skip only when the kernel/user cannot build a lab (no root, netns,
veth or bridge) or BCC is not installed; a datapath that fails to compile or verify is an error.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest

from hostwall.lab.netns import Lab, cleanup_stale, lab_available

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_POLICY = REPO / "examples" / "policy.yaml"

# Used when examples/policy.yaml is missing: the same shape as the example (deny list first).
INLINE_POLICY = """
version: 1
name: lab-inline
defaults: {ingress: deny, egress: allow, stateful: true, audit: false}
rules:
  - {name: block-attacker, priority: 10, direction: ingress, action: deny,
     peers: [10.66.3.0/24, "fd66:3::/64"]}
  - {name: client-ssh, priority: 100, direction: ingress, action: allow, protocol: tcp,
     peers: [10.66.2.0/24, "fd66:2::/64"], ports: [22]}
  - {name: client-web, priority: 100, direction: ingress, action: allow, protocol: tcp,
     peers: [10.66.2.0/24, "fd66:2::/64"], ports: [80, "8000-8100"]}
  - {name: client-mdns, priority: 100, direction: ingress, action: allow, protocol: udp,
     peers: [10.66.2.0/24, "fd66:2::/64"], ports: [5353]}
  - {name: client-ping, priority: 100, direction: ingress, action: allow, protocol: icmp, peers: [10.66.2.0/24],
     icmp_types: [echo-request]}
  - {name: client-ping6, priority: 100, direction: ingress, action: allow, protocol: icmpv6, peers: ["fd66:2::/64"],
     icmp_types: [echo-request]}
"""

_AVAILABLE: tuple[bool, str] | None = None


def _available() -> tuple[bool, str]:
    global _AVAILABLE
    if _AVAILABLE is None:
        _AVAILABLE = lab_available()
        if _AVAILABLE[0]:
            cleanup_stale()          # leftovers of crashed runs (never a live lab: lock + pids checked)
    return _AVAILABLE


@pytest.fixture
def lab():
    ok, why = _available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    with Lab() as lb:
        yield lb


@pytest.fixture(scope="module")
def datapath():
    """hostwall programs and maps, loaded once per module (BCC compile ≈ 3 s)."""
    ok, why = _available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    try:
        import bcc  # noqa: F401
    except ImportError as e:                     # pragma: no cover - depends on the machine
        pytest.fail(f"BCC is not importable (run scripts/setup.sh): {e}")
    from hostwall.enforcer.datapath import Datapath
    dp = Datapath.load()                         # a compile or verifier failure is an error, not a skip
    try:
        yield dp
    finally:
        dp.close()


def lab_policy():
    """The example policy (examples/policy.yaml) or, if it is missing, the inline equivalent."""
    from hostwall.enforcer.policy import load_policy, parse_policy
    if EXAMPLE_POLICY.exists():
        return load_policy(EXAMPLE_POLICY)
    return parse_policy(INLINE_POLICY)


@contextmanager
def hostwall_attached(lab: Lab, dp, policy, host: str = "prot", ifname: str = "eth0", xdp_mode: str = "auto"):
    """Install `policy` into `dp` and attach XDP + TC to host's eth0; always detach on exit.
    Yields (slots, xdp mode that took); slots maps rule name -> counter slot."""
    from hostwall.enforcer import attach
    from hostwall.enforcer.compiler import compile_policy
    slots = {n: i for i, n in enumerate(policy.counter_names())}      # rules, then essential_icmp
    dp.install(compile_policy(policy, slots, 1))
    dp.clear_conntrack()
    ns = lab.ns(host)
    try:
        mode = dp.attach(ifname, xdp_mode, netns=ns)
        yield slots, mode
    finally:
        try:
            attach.detach_xdp(ifname, netns=ns)
        finally:
            attach.detach_tc(ifname, netns=ns)
