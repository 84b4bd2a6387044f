"""`diff` is exact: checked against the reference model (enforcer/reference.py) on random policy pairs.

- every sampled packet whose verdict changes lies inside a reported region, whose old and new
  verdicts and rules are the reference model's;
- every reported region is non-empty and changes: packets at its corners and inside it get the
  reported old verdict under OLD and the reported new verdict under NEW.
ICMP is keyed by type and code, and a region may carry a condition of the stages before the rules
(essential ICMP met or not, later fragments): a packet is inside a region only if it meets it.
"""
from __future__ import annotations

import ipaddress

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer.analysis.diff import diff, diff_tables
from hostwall.enforcer.analysis.intervals import addr_text
from hostwall.enforcer.analysis.stages import COND_FRAG, COND_NONE, COND_NOT_ESS, cond_kind, essential_fields
from hostwall.enforcer.analysis.table import decision_table
from hostwall.enforcer.icmp import icmp_key
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.reference import Packet, essential_icmp, evaluate

from .strategies import packets, policy_pairs

_PROTO = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
_NUM = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "other": 47}


def _key(p: Packet) -> int:
    if p.protocol in (1, 58):
        return icmp_key(*p.icmp)
    return (0 if p.fragment else p.dport) if p.protocol in (6, 17) else 0


def _meets(cond: int, p: Packet) -> bool:
    if p.fragment or cond == COND_FRAG:
        return p.fragment and cond == COND_FRAG
    if cond == COND_NOT_ESS:
        return not essential_icmp(p)
    if cond_kind(cond):
        return essential_icmp(p)
    return cond == COND_NONE


def _inside(reg, p: Packet) -> bool:
    proto = _PROTO.get(p.protocol, "other")
    return (reg.direction == p.direction and reg.family == p.family and reg.protocol in (proto, "any")
            and (reg.protocol == "any" or _key(p) in reg.keys) and int(p.peer) in reg.peers
            and _meets(reg.cond, p))


def _points(reg) -> list[Packet]:
    """Packets at the corners and in the middle of a region."""
    local = "192.0.2.1" if reg.family == 4 else "2001:db8::1"
    peers = []
    for s, e in list(reg.peers)[:3]:
        peers += sorted({s, e - 1, (s + e) // 2})
    keys = []
    for s, e in list(reg.keys)[:3]:
        keys += sorted({s, e - 1})
    protos = ["tcp", "udp", "icmp" if reg.family == 4 else "icmpv6", "other"] if reg.protocol == "any" else [reg.protocol]
    frag = reg.cond == COND_FRAG
    out = []
    for a, k, name in ((a, k, n) for a in peers for k in keys for n in protos):
        peer = addr_text(reg.family, a)
        src, dst = (peer, local) if reg.direction == "ingress" else (local, peer)
        proto = _NUM[name]
        if frag:
            out.append(Packet(reg.direction, reg.family, src, dst, proto, fragment=True))
        elif name in ("tcp", "udp"):
            if k or reg.protocol == "any":
                out.append(Packet(reg.direction, reg.family, src, dst, proto, 4000, k or 80))
        elif name in ("icmp", "icmpv6"):
            if reg.protocol == "any":
                k = 0x0800 if reg.family == 4 else 0x8000        # echo request: never essential
            kw = {"icmp_type": k >> 8, "icmp_code": k & 255}
            if cond_kind(reg.cond):
                kw.update(essential_fields(cond_kind(reg.cond), reg.direction, reg.family, peer, local))
                src = kw.pop("src", src)
                out.append(Packet(reg.direction, reg.family, src, dst, proto, **kw))
            else:                                            # hop limits and embedded packets that are not essential
                out += [Packet(reg.direction, reg.family, src, dst, proto, hop_limit=h, **kw) for h in (64, 254)]
                out.append(Packet(reg.direction, reg.family, src, dst, proto, inner_src=src, **kw))
        else:
            out.append(Packet(reg.direction, reg.family, src, dst, proto))
    return out


def _check(old_text: str, new_text: str, pkts: list[Packet], by_rule: bool) -> None:
    old, new = parse_policy(old_text, "old.yaml"), parse_policy(new_text, "new.yaml")
    changes = diff_tables(decision_table(old), decision_table(new), by_rule)
    for c in changes:                                  # no region is empty, and every packet of it changes
        pts = _points(c.region)
        assert pts, f"empty region {c.text()}"
        for p in pts:
            a, b = evaluate(old, p), evaluate(new, p)
            assert (a.verdict, a.rule) == c.old and (b.verdict, b.rule) == c.new, (c.text(), p, a, b)
    for p in pkts:                                     # every packet that changes is reported
        a, b = evaluate(old, p), evaluate(new, p)
        changed = a.verdict != b.verdict or (by_rule and a.rule != b.rule)
        hits = [c for c in changes if _inside(c.region, p)]
        assert len(hits) <= 1, (p, [h.text() for h in hits])
        if changed:
            assert hits, f"{p}: {a} → {b} is in no reported region:\n" + "\n".join(c.text() for c in changes)
            assert (a.verdict, a.rule) == hits[0].old and (b.verdict, b.rule) == hits[0].new
        else:
            assert not hits, (p, hits[0].text())


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=policy_pairs(), pkts=st.lists(packets(), min_size=1, max_size=40), by_rule=st.booleans())
def test_diff_is_exact_against_the_reference_model(pair, pkts, by_rule):
    _check(*pair, pkts, by_rule)


def test_diff_reports_regions_rules_and_settings():
    old = parse_policy("""
version: 1
name: t
defaults: {ingress: deny, egress: allow}
rules:
  - {name: block, priority: 1, direction: ingress, action: deny, peers: [10.0.0.0/8]}
  - {name: ssh, priority: 2, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.1.0.0/16, 192.168.0.0/16]}
""", "old.yaml")
    new = parse_policy("""
version: 1
name: t
defaults: {ingress: deny, egress: deny}
rules:
  - {name: ssh, priority: 2, direction: ingress, action: allow, protocol: tcp, ports: [22], peers: [10.1.0.0/16]}
  - {name: block, priority: 3, direction: ingress, action: deny, peers: [10.0.0.0/8]}
""", "new.yaml")
    d = diff(old, new)
    texts = [c.text() for c in d.changes]
    assert "ingress tcp port 22 from 10.1.0.0/16: drop (rule 'block') → allow (rule 'ssh')" in texts
    assert "ingress tcp port 22 from 192.168.0.0/16: allow (rule 'ssh') → drop (default)" in texts
    assert "egress any protocol to any IPv4 except essential ICMP: allow (default) → drop (default)" in texts
    kinds = {(r.kind, r.name) for r in d.rules}
    assert {("changed", "ssh"), ("changed", "block"), ("moved", "ssh")} <= kinds
    assert "defaults.egress: allow → deny" in d.settings
    j = d.to_json()
    assert j["verdict_changes"][0]["old"]["verdict"] in ("allow", "drop")
    assert diff(old, old).empty


def test_settings_are_written_as_the_policy_file_spells_them():
    """Booleans as `true`/`false` and interfaces by their keys (docs/policy.md), not Python reprs."""
    old = parse_policy("version: 1\nname: t\n", "old.yaml")
    new = parse_policy("""
version: 1
name: t
defaults: {audit: true, stateful: false}
interfaces:
  - {name: eth0, xdp_mode: generic}
""", "new.yaml")
    assert diff(old, new).settings == ["defaults.stateful: true → false", "defaults.audit: false → true",
                                       "interface eth0: none → xdp_mode generic, dos_profile none"]


def test_icmp_types_and_essential_icmp():
    """ICMP regions are type/code ranges; switching essential_icmp off reports the essential messages
    with their condition, and a rule that takes over the rest of a type is reported without it."""
    old = parse_policy("""
version: 1
name: t
defaults: {ingress: deny, egress: allow}
rules:
  - {name: ping, priority: 2, direction: ingress, action: allow, protocol: icmpv6, icmp_types: [echo-request, 135]}
""", "old.yaml")
    new = parse_policy("""
version: 1
name: t
defaults: {ingress: deny, egress: allow, essential_icmp: false}
rules:
  - {name: ping, priority: 2, direction: ingress, action: allow, protocol: icmpv6, icmp_types: [echo-request, 2]}
  - {name: unreach, priority: 3, direction: ingress, action: deny, protocol: icmp, icmp_types: ["3/4"]}
""", "new.yaml")
    d = diff(old, new)
    texts = [c.text() for c in d.changes]
    assert ("ingress icmp type 3 code 4 from any IPv4 about a packet this host sent (essential ICMP): "
            "allow (rule 'essential_icmp') → drop (rule 'unreach')") in texts
    assert "ingress icmp type 3 code 4 from any IPv4 not about a packet this host sent: drop (default) → drop (rule 'unreach')" \
        not in texts                                     # the verdict stays: not a verdict change
    assert ("ingress icmpv6 type 2 from any IPv6 not about a packet this host sent: drop (default) → allow (rule 'ping')"
            in texts)
    assert ("ingress icmpv6 type 133-137 from any IPv6 with hop limit 255 (essential ICMP): "
            "allow (rule 'essential_icmp') → drop (default)") in texts
    assert ("ingress icmpv6 type 135 from any IPv6 with a hop limit other than 255: allow (rule 'ping') → drop (default)"
            in texts)
    assert ("ingress icmpv6 type 130-132, type 143 from ::/128, fe80::/10 with hop limit 1 (essential ICMP): "
            "allow (rule 'essential_icmp') → drop (default)") in texts
    assert not any(c.region.direction == "egress" and c.old[0] == "allow" and c.new[0] == "allow" for c in d.changes)
    ping = next(r for r in d.rules if r.name == "ping")
    assert "icmp_types [type 128, type 135] → [type 2, type 128]" in ping.details
    by_rule = [c.text() for c in diff_tables(decision_table(old), decision_table(new), by_rule=True)]
    assert any(t.startswith("ingress icmp type 3 code 4 from any IPv4 not about a packet this host sent: "
                            "drop (default) → drop (rule 'unreach')") for t in by_rule)
    j = d.to_json()["verdict_changes"]
    assert {"condition": "with hop limit 255 (essential ICMP)", "icmp_keys": [[133 << 8, (137 << 8) + 255]]}.items() \
        <= next(c for c in j if c.get("condition", "").startswith("with hop limit 255")).items()


def test_identical_policies_have_no_change():
    p = parse_policy("version: 1\nname: t\nrules:\n  - {name: a, priority: 1, direction: ingress, action: allow}\n")
    assert diff_tables(decision_table(p), decision_table(p), by_rule=True) == []
    assert ipaddress.ip_address("10.0.0.1")          # keeps the import used by _points' helpers
