"""End to end with the real `hostwall-enforcer` process and real packets across the lab's veths:
stateful replies, audit mode, atomic swaps under a packet stream, and an enforcer restart."""
from __future__ import annotations

import time

import pytest

from hostwall.lab import traffic
from hostwall.lab.enforcer_proc import EnforcerProcess, drops, rule_packets

pytestmark = pytest.mark.lab

BASE = """
version: 1
name: {name}
defaults: {{ingress: deny, egress: allow, stateful: {stateful}, audit: {audit}}}
rules:
  - {{name: block-attacker, priority: 10, direction: ingress, action: deny, peers: [10.66.3.0/24, "fd66:3::/64"]}}
  - {{name: client-ssh, priority: 100, direction: ingress, action: allow, protocol: tcp,
     peers: [10.66.2.0/24, "fd66:2::/64"], ports: [22]}}
  - {{name: nd, priority: 200, direction: ingress, action: allow, protocol: icmpv6, peers: ["fe80::/10", "fd66::/16"]}}
"""


def policy(tmp_path, name="lab", stateful="true", audit="false", text=None):
    p = tmp_path / f"{name}.yaml"
    p.write_text(text if text is not None else BASE.format(name=name, stateful=stateful, audit=audit))
    return p


@pytest.mark.parametrize("fam", [4, 6])
def test_replies_pass_ingress_deny_only_when_stateful(lab, tmp_path, fam):
    with traffic.echo_servers(lab, "cli", tcp=[9000], udp=[9001]), traffic.echo_servers(lab, "prot", tcp=[9000]):
        with EnforcerProcess(lab, policy(tmp_path)) as enf:
            dst = lab.addr("cli", fam)
            assert traffic.tcp_client_in(lab, "prot", dst, 9000, count=3)["ok"] == 3
            assert traffic.udp_client_in(lab, "prot", dst, 9001, count=3)["ok"] == 3
            assert traffic.ping_in(lab, "prot", dst, count=3)["received"] == 3
            # the same port opened from the other side is not a reply: default deny
            assert traffic.tcp_client_in(lab, "cli", lab.addr("prot", fam), 9000, count=2, timeout=0.5)["ok"] == 0
            st = enf.status()
            assert st["counters"]["xdp_ingress"]["allow"]["pass_conntrack"]["packets"] >= 9
            assert drops(st).get("default_deny", 0) >= 2
            enf.apply(policy(tmp_path, "stateless", stateful="false"))
            assert traffic.tcp_client_in(lab, "prot", dst, 9000, count=2, timeout=0.5)["ok"] == 0


def test_audit_mode_passes_and_counts_would_drop(lab, tmp_path):
    with traffic.echo_servers(lab, "prot", tcp=[80]):
        with EnforcerProcess(lab, policy(tmp_path, "audit", audit="true")) as enf:
            r = traffic.tcp_client_in(lab, "att", lab.addr("prot"), 80, count=4)
            assert r["ok"] == 4
            st = enf.status()
            assert st["drops_by_reason"]["policy_deny"]["would_drop"] >= 4
            assert st["totals"]["drop"]["packets"] == 0
            assert rule_packets(st)["block-attacker"] >= 4
            enf.apply(policy(tmp_path, "enforce"))
            assert traffic.tcp_client_in(lab, "att", lab.addr("prot"), 80, count=2, timeout=0.5)["ok"] == 0
            assert drops(enf.status())["policy_deny"] >= 2


# Any mix of the two generations' tables judges the stream's packets as a drop; only a packet judged
# wholly by A or wholly by B is allowed. (A's client peer class is {a-allow}, B's tcp|udp/80 class is
# {b-allow}: order 1 vs order 0. A's rule 0 denies, B's rule 1 denies.)
SWAP_A = """
version: 1
name: swap-a
defaults: {ingress: deny, egress: allow, stateful: false}
rules:
  - {name: a-deny, priority: 1, direction: ingress, action: deny, peers: [10.66.9.0/24], ports: [80]}
  - {name: a-allow, priority: 2, direction: ingress, action: allow, peers: [10.66.2.0/24], ports: [80]}
"""
SWAP_B = """
version: 1
name: swap-b
defaults: {ingress: deny, egress: allow, stateful: false}
rules:
  - {name: b-allow, priority: 1, direction: ingress, action: allow, peers: [10.66.2.0/24], ports: [80]}
  - {name: b-deny, priority: 2, direction: ingress, action: deny, peers: [10.66.2.0/24], ports: [81]}
"""


def test_apply_during_stream_never_mixes_and_loses_nothing(lab, tmp_path, monkeypatch):
    from hostwall.enforcer import control
    from hostwall.enforcer.policy import load_policy
    a = policy(tmp_path, "a", text=SWAP_A)
    b = policy(tmp_path, "b", text=SWAP_B)
    pa, pb = load_policy(a), load_policy(b)
    with traffic.echo_servers(lab, "prot", tcp=[80]), EnforcerProcess(lab, a) as enf:
        monkeypatch.setenv("HOSTWALL_STATE_DIR", enf.state_dir)      # swap in-process: ~50 swaps/s
        before = enf.status()
        probe = traffic.long_lived_in(lab, "cli", lab.addr("prot"), 80, interval_ms=20, duration=6)
        flood = traffic.trafgen_in(lab, "cli", kind="udp", dport=80, duration=None, rate_pps=50_000)
        swaps = 0
        deadline = time.monotonic() + 4.0
        while time.monotonic() < deadline and swaps < 200:
            control.apply(pb if swaps % 2 == 0 else pa, enf.pin_dir)
            swaps += 1
        sent = flood.stop()
        pr = probe.result(timeout=30)
        st = enf.status()
    assert swaps >= 50
    assert sent["packets"] and sent["packets"] > 1000
    # every packet to port 80 that reached the hook was allowed by a rule of one whole policy; any mix
    # of generations would have dropped it (policy_deny or default_deny). Packets the veth/bridge
    # backlog lost before the hook on this shared 2-core machine were never judged, so the stream
    # only has to have really passed through the filter.
    port80 = next(p for p in st["ports"] if p["port"] == 80)
    assert port80["dropped"] == 0 and port80["would_drop"] == 0, port80
    assert drops(st).get("policy_deny", 0) == 0
    def allowed(s):
        return s["counters"].get("xdp_ingress", {}).get("allow", {}).get("pass_rule", {}).get("packets", 0)
    assert allowed(st) - allowed(before) >= 0.8 * sent["packets"], (st["counters"], sent)
    assert pr["fail"] == 0 and pr["ok"] == pr["sent"] and not pr["broken"], pr


def test_enforcer_restart_keeps_tracked_connection(lab, tmp_path):
    """A connection the protected host opened (its replies need conntrack under ingress deny) survives
    a stop (--keep-attached) and restart of the enforcer with no failed round trip."""
    pol = policy(tmp_path)
    with traffic.echo_servers(lab, "cli", tcp=[9000]):
        enf = EnforcerProcess(lab, pol, keep_attached=True).start()
        try:
            prog = enf.status()["interfaces"][0]["xdp_prog_id"]
            probe = traffic.long_lived_in(lab, "prot", lab.addr("cli"), 9000, interval_ms=20, duration=6)
            time.sleep(1.5)
            out = enf.stop()
            assert "stay attached" in out
            time.sleep(1.0)                       # nothing runs; the kernel keeps enforcing
            enf.start()
            assert "took over" in enf.banner
            pr = probe.result(timeout=30)
            st = enf.status()
            assert st["interfaces"][0]["xdp_prog_id"] == prog
            assert pr["fail"] == 0 and not pr["broken"] and pr["ok"] == pr["sent"] > 100, pr
            assert st["counters"]["xdp_ingress"]["allow"]["pass_conntrack"]["packets"] >= pr["ok"]
        finally:
            enf.close()
