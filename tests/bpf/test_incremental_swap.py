"""An incremental apply (one rule changed) rewrites only that rule's records in the standby half and
the datapath then judges by the new policy: the changed rule's new verdict, every other verdict as
before (docs/benchmarks.md "swap"; enforcer/compile_memo.py, Datapath.install)."""
from __future__ import annotations

import dataclasses
import ipaddress
import random

import numpy as np
import pytest

from hostwall.bpf.names import POLICY_MAPS
from hostwall.enforcer.compiler import clear_memo, compile_policy
from hostwall.enforcer.policy import load_policy
from hostwall.enforcer.reference import Packet, evaluate

from .test_differential import check

pytestmark = pytest.mark.bpf

PEER_MAPS = ("hw_peer_cls", "hw_top4", "hw_iv4", "hw_top6", "hw_iv6")
POLICY = """\
version: 1
name: incremental
defaults: {ingress: deny, egress: allow, stateful: false}
rules:
  - {name: block, priority: 0, direction: ingress, action: deny, peers_file: block.txt}
  - {name: web, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [80, 443],
     peers: ["10.1.0.0/16", "fd00:1::/32"]}
  - {name: ssh, priority: 20, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: ["10.2.0.0/16"]}
  - {name: dns, priority: 30, direction: ingress, action: allow, protocol: udp, ports: [53]}
"""
SOURCES = ["10.1.0.5", "10.2.0.7", "10.3.0.9", "172.16.0.1", "fd00:1::5", "fd00:2::5"]


def _policy(tmp_path):
    rng = random.Random(13)
    nets = {f"{ipaddress.IPv4Address(rng.randrange(2**32) & ~0xFF)}/24" for _ in range(3000)}
    nets |= {f"{ipaddress.IPv6Address(rng.randrange(2**128) & ~(2**80 - 1))}/48" for _ in range(300)}
    nets.add("172.16.0.0/24")
    nets = {n for n in nets if not any(ipaddress.ip_network(n).overlaps(ipaddress.ip_network(s))
                                       for s in ("10.0.0.0/8", "fd00::/8"))}
    (tmp_path / "block.txt").write_text("\n".join(sorted(nets)) + "\n")
    (tmp_path / "p.yaml").write_text(POLICY)
    return load_policy(tmp_path / "p.yaml")


def _replace(policy, name: str, **change):
    return dataclasses.replace(policy, rules=tuple(dataclasses.replace(r, **change) if r.name == name else r
                                                   for r in policy.rules))


def _packets():
    for src in SOURCES:
        fam = 6 if ":" in src else 4
        dst = "fd00::1" if fam == 6 else "192.0.2.1"
        for proto, port in ((6, 22), (6, 80), (6, 443), (6, 8080), (17, 53)):
            yield Packet("ingress", fam, src, dst, proto, 40000, port)


def _check_all(harness, policy):
    for pkt in _packets():
        check(harness, policy, pkt)


def test_incremental_apply_rewrites_only_the_changed_rule(harness, tmp_path):
    base = _policy(tmp_path)
    harness.slots = {n: i for i, n in enumerate(base.counter_names())}
    dp = harness.dp
    clear_memo()
    dp.install(compile_policy(base, harness.slots, 1))
    dp.install(compile_policy(base, harness.slots, 2))       # both halves hold the base policy
    dp.clear_conntrack()
    _check_all(harness, base)

    # one rule's action: its record and the header, nothing else
    p1 = _replace(base, "ssh", action="deny")
    st = dp.install(compile_policy(p1, harness.slots, 3))
    assert {k: v for k, v in st.written.items() if v} == {"hw_policy": 1, "hw_rules": 1}
    ssh = Packet("ingress", 4, "10.2.0.7", "192.0.2.1", 6, 40000, 22)
    assert evaluate(p1, ssh).rule == "ssh" and evaluate(p1, ssh).verdict == "drop"
    _check_all(harness, p1)

    # one rule's ports: the L4 tables change, the peer tables (3000 + 300 prefixes) are not touched. The
    # standby half still holds the base policy, so the ssh record of p1 is written as well.
    p2 = _replace(p1, "web", ports=((8080, 8080),))
    st = dp.install(compile_policy(p2, harness.slots, 4))
    assert all(st.written[m] == 0 for m in PEER_MAPS), st.written
    assert set(PEER_MAPS) <= set(st.known), st.known      # the memo's arrays it wrote there: not compared
    assert st.written["hw_rules"] == 1 and st.written["hw_policy"] == 1, st.written
    assert 0 < st.written["hw_l4"] + st.written["hw_l4_cls"] <= 64, st.written
    web_80 = Packet("ingress", 4, "10.1.0.5", "192.0.2.1", 6, 40000, 80)
    web_8080 = Packet("ingress", 4, "10.1.0.5", "192.0.2.1", 6, 40000, 8080)
    assert evaluate(p2, web_80).rule is None and evaluate(p2, web_8080).rule == "web"
    _check_all(harness, p2)

    # and back: the datapath judges by the base policy again
    st = dp.install(compile_policy(base, harness.slots, 5))
    assert all(st.written[m] == 0 for m in PEER_MAPS), st.written
    _check_all(harness, base)


def test_install_rewrites_what_a_killed_apply_left_in_the_standby_half(harness, tmp_path):
    """An apply from another process (`hostwall-enforcer apply` on the same pinned instance) that is killed
    between its writes and its flip changes the standby half but neither the generation nor the revision
    in force: the next install must not skip the tables it wrote there itself before."""
    base = _policy(tmp_path)
    harness.slots = {n: i for i, n in enumerate(base.counter_names())}
    dp = harness.dp
    clear_memo()
    dp.install(compile_policy(base, harness.slots, 1))
    dp.install(compile_policy(base, harness.slots, 2))
    standby = dp.active_gen() ^ 1
    per_gen = POLICY_MAPS["hw_iv4"][1]
    iv4 = dp.view("hw_iv4")[standby * per_gen: (standby + 1) * per_gen]
    # what the killed apply wrote (through the shared mmap, as its process would): its header first, then
    # the start of the IPv4 interval table
    dp.view("hw_policy")["revision_id"][standby] = 99
    iv4[:1000] = iv4[1000:2000].copy()
    cp = compile_policy(base, harness.slots, 3)
    st = dp.install(cp)
    assert st.written["hw_iv4"] > 0 and not st.known, (st.written, st.known)
    assert np.array_equal(iv4[:len(cp.iv4)], cp.iv4)
    dp.clear_conntrack()
    _check_all(harness, base)
