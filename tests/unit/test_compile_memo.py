"""The compile of a policy derived from the last one (a few rules replaced) patches the last compile's
tables (enforcer/compile_memo.py); it must equal a full compile of the same policy."""
from __future__ import annotations

import dataclasses

from hostwall.enforcer.compiler import clear_memo, compile_policy
from hostwall.enforcer.policy import parse_policy

POLICY = """\
version: 1
name: memo
defaults: {ingress: deny, egress: allow}
rules:
  - {name: block, priority: 0, direction: ingress, action: deny, peers: ["172.16.0.0/24", "fd00:9::/32"]}
  - {name: web, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [80, 443],
     peers: ["10.1.0.0/16", "fd00:1::/32"]}
  - {name: ssh, priority: 20, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: ["10.2.0.0/16"]}
  - {name: dns, priority: 30, direction: ingress, action: allow, protocol: udp, ports: [53]}
  - {name: ping, priority: 40, direction: ingress, action: allow, protocol: icmp, icmp_types: [echo-request]}
"""


def _replace(policy, name: str, **change):
    return dataclasses.replace(policy, rules=tuple(dataclasses.replace(r, **change) if r.name == name else r
                                                   for r in policy.rules))


def _same(a, b) -> None:
    """Equal tables, except that L4 class ids may differ (a patched compile keeps the previous ids):
    every L4 key must map to the same rule set (and fqdns-rule set)."""
    for f in dataclasses.fields(b):
        if f.name in ("l4", "l4_cls", "fqdn_l4", "xmatch"):
            continue
        x, y = getattr(a, f.name), getattr(b, f.name)
        assert (x.tobytes() == y.tobytes()) if hasattr(x, "tobytes") else x == y, f.name
    ka, kb = a.l4["cls"].reshape(-1), b.l4["cls"].reshape(-1)
    assert a.l4_cls[ka].tobytes() == b.l4_cls[kb].tobytes()
    assert a.fqdn_l4[ka].tobytes() == b.fqdn_l4[kb].tobytes()
    assert _xm_rows(a)[ka].tobytes() == _xm_rows(b)[kb].tobytes()      # the first-match table, per key


def _xm_rows(cp):
    """The cross-product table as (L4 class, peer class) cells."""
    n, stride = len(cp.l4_cls), int(cp.hdr["xm_stride"][0])
    return cp.xmatch["rule"].reshape(-1)[: n * stride].reshape(n, stride)


def test_patched_compile_equals_full_compile():
    base = parse_policy(POLICY)
    slots = {n: i for i, n in enumerate(base.counter_names())}
    clear_memo()
    compile_policy(base, slots, 1)
    steps = [("dns", {"ports": ((53, 53), (5353, 5353))}), ("web", {"action": "log"}),
             ("ssh", {"direction": "egress"}), ("ping", {"icmp_types": None}), ("ssh", {"ports": None})]
    p = base
    for name, change in steps:
        p = _replace(p, name, **change)
        patched = compile_policy(p, slots, 2)
        clear_memo()
        _same(patched, compile_policy(p, slots, 2))


def test_changed_peers_or_slots_are_not_patched_over():
    base = parse_policy(POLICY)
    slots = {n: i for i, n in enumerate(base.counter_names())}
    clear_memo()
    compile_policy(base, slots, 1)
    other = parse_policy(POLICY.replace("10.2.0.0/16", "10.3.0.0/16"))
    p = _replace(base, "ssh", peers=next(r.peers for r in other.rules if r.name == "ssh"))
    moved = {n: i + 7 for n, i in slots.items()}
    patched = compile_policy(p, moved, 2)
    clear_memo()
    _same(patched, compile_policy(p, moved, 2))
