"""No TC ingress hook behind XDP (docs/datapath.md "Hooks"): `control.start` on a lab's protected host
attaches XDP and the TC egress filter only, XDP alone enforces the ingress policy, and a start over an
interface that still carries our ingress filter (an older build attached it: simulated by attaching
tc_ingress by hand) removes it, on a build upgrade as on an adopt; detach removes it as well."""
from __future__ import annotations

import pytest

from hostwall.bpf.state import InstanceState
from hostwall.enforcer import attach, control
from hostwall.enforcer.policy import parse_policy
from hostwall.lab import traffic
from tests.enforcer_instance import started_instance

pytestmark = [pytest.mark.bpf, pytest.mark.lab]

POLICY = """
version: 1
name: tcin
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: block-attacker, priority: 10, direction: ingress, action: deny, peers: [10.66.3.0/24]}
  - {name: web, priority: 100, direction: ingress, action: allow, protocol: tcp, peers: [10.66.2.0/24], ports: [80]}
interfaces:
  - {name: eth0}
"""


def _count(st: dict, hook: str, verdict: str, reason: str) -> int:
    return st["counters"].get(hook, {}).get(verdict, {}).get(reason, {}).get("packets", 0)


def _hooks(lab) -> tuple[bool, bool, bool]:
    ls = attach.link_state("eth0", lab.ns("prot"))
    return bool(ls.xdp_prog_id), ls.tc_ingress, ls.tc_egress


def _older_builds_ingress_filter(lab, dp) -> None:
    """Our TC ingress filter, as builds before this one attached it next to XDP."""
    attach.attach_tc("eth0", dp.prog_fds["tc_ingress"], dp.prog_fds["tc_egress"], lab.ns("prot"))
    assert _hooks(lab) == (True, True, True)


def _xdp_enforces_ingress(lab, pin: str) -> None:
    """The client's SYNs to port 80 pass by the rule, the attacker's is dropped by its deny rule, both
    counted on xdp_ingress; TC ingress counts nothing."""
    s0 = control.status(pin)
    with traffic.echo_servers(lab, "prot", tcp=[80]):
        assert traffic.tcp_client_in(lab, "cli", lab.addr("prot"), 80, count=2)["ok"] == 2
        r = traffic.tcp_client_in(lab, "att", lab.addr("prot"), 80, count=1, timeout=0.5)
        assert r["ok"] == 0 and r["errors"].get("timeout") == 1, r
    s1 = control.status(pin)
    assert _count(s1, "xdp_ingress", "allow", "pass_rule") - _count(s0, "xdp_ingress", "allow", "pass_rule") >= 2
    assert _count(s1, "xdp_ingress", "drop", "policy_deny") - _count(s0, "xdp_ingress", "drop", "policy_deny") >= 1
    assert "tc_ingress" not in s1["counters"], s1["counters"].get("tc_ingress")


def test_start_attaches_xdp_and_tc_egress_but_no_tc_ingress():
    with started_instance(POLICY, "tcin") as (lab, dp, pin, _):
        dp.close()
        assert _hooks(lab) == (True, False, True)
        iface = control.status(pin)["interfaces"][0]
        assert (iface["tc_ingress"], iface["tc_egress"]) == (False, True)
        _xdp_enforces_ingress(lab, pin)


@pytest.mark.parametrize("how", ["upgrade", "adopt"])
def test_start_removes_an_older_builds_ingress_filter(how):
    """upgrade: pins of another build (conntrack migrated into a new datapath, the old one replaced);
    adopt: pins of this build left attached (`--keep-attached`)."""
    with started_instance(POLICY, f"tcin-{how}") as (lab, dp, pin, _):
        _older_builds_ingress_filter(lab, dp)
        dp.close()
        if how == "upgrade":
            st = InstanceState.load(pin)
            st.build = "an-older-build"
            st.save()
        pol = parse_policy(POLICY)
        dp2, _, res = control.start(pol, pin, list(pol.interfaces), netns=lab.ns("prot"))
        dp2.close()
        assert res.adopted == (how == "adopt")
        assert _hooks(lab) == (True, False, True)
        _xdp_enforces_ingress(lab, pin)


def test_status_and_detach_with_an_older_builds_ingress_filter():
    with started_instance(POLICY, "tcin-detach") as (lab, dp, pin, _):
        _older_builds_ingress_filter(lab, dp)
        dp.close()
        assert control.status(pin)["interfaces"][0]["tc_ingress"] is True
        iface = InstanceState.load(pin).interfaces[0]
        assert not control._runs_nothing(iface)
        assert control.detach(pin) == [f"eth0@{lab.ns('prot')}"]
        assert _hooks(lab) == (False, False, False) and control._runs_nothing(iface)
