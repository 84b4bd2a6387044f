"""The cases file of `hostwall-enforcer test POLICY CASES.yaml` (docs/policy.md "Tooling").

    local: [192.0.2.10, "2001:db8::10"]      # optional: this host's addresses (omitted sides of packets)
    cases:
      - name: ssh from the admin network
        packet: ingress tcp 10.20.1.5:40000 -> :22       # or a mapping (analysis/packet.py)
        expect: {verdict: allow, rule: ssh-admin}        # or just: expect: allow
      - name: replies of outbound https
        packet: ingress tcp 198.51.100.7:443 -> :40001 flags SA
        state: reply                                     # new (default) | established | reply
        expect: {verdict: allow, reason: pass_conntrack}
    invariants:
      - name: no ssh from outside the admin network
        never: {direction: ingress, protocol: tcp, ports: [22], from: 0.0.0.0/0, except: [10.20.0.0/16]}
      - name: monitoring always gets in
        always: {direction: ingress, protocol: tcp, ports: [9100], from: 10.30.0.0/24}

`expect` may give verdict, reason and rule (null: decided by the default or by tracking); what it
leaves out is not checked. An invariant's `never` means: no packet of the set is allowed; `always`:
every packet of the set is allowed (would_drop counts as not allowed). Loading reports every problem
at once, each as file:line: path: message (PolicyError), like the policy itself.
"""
from __future__ import annotations

import importlib
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from hostwall.yamldoc import _MISSING, Issues, PolicyError, PolicyIssue, load_yaml

from ..policy import Policy
from ..validation import parse_cidr, parse_port
from .intervals import Span, axis_end
from .packet import DEFAULT_LOCAL, CasePacket, packet_from_mapping, parse_packet
from .table import ICMP_KEYED

__all__ = ["Expect", "Case", "Selector", "Invariant", "CaseFile", "load_cases", "parse_cases", "REASONS",
           "parse_selector"]

VERDICTS = ("allow", "drop", "would_drop")
ALLOW_REASONS = ("pass_rule", "pass_default", "pass_conntrack", "pass_conntrack_out_of_window", "pass_related",
                 "pass_essential")
DROP_REASONS = ("policy_deny", "default_deny", "conntrack_invalid", "fragment_unmatched", "malformed")
REASONS = ALLOW_REASONS + DROP_REASONS
_UNSET = object()


@dataclass(frozen=True)
class Expect:
    verdict: str | None = None
    reason: str | None = None
    rule: Any = _UNSET                 # a name, None (no rule decided), or _UNSET (not checked)

    def misses(self, got) -> Sequence[str]:
        """What of this expectation `got` (an Outcome) does not meet, as phrases (() when met)."""
        if (self.verdict is None or got.verdict == self.verdict) and (self.reason is None or got.reason == self.reason) \
                and (self.rule is _UNSET or got.rule == self.rule):
            return ()
        out = []
        if self.verdict is not None and got.verdict != self.verdict:
            out.append(f"verdict {got.verdict}, expected {self.verdict}")
        if self.reason is not None and got.reason != self.reason:
            out.append(f"reason {got.reason}, expected {self.reason}")
        if self.rule is not _UNSET and got.rule != self.rule:
            out.append(f"rule {got.rule!r}, expected {self.rule!r}")
        return out

    def text(self) -> str:
        parts = [self.verdict or "any verdict"]
        if self.reason:
            parts.append(self.reason)
        if self.rule is not _UNSET:
            parts.append(f"rule {self.rule!r}" if self.rule else "no rule")
        return ", ".join(parts)


@dataclass(frozen=True)
class Case:
    name: str
    line: int | None
    packet: CasePacket
    expect: Expect


@dataclass(frozen=True)
class Selector:
    """A set of packets: one direction; protocols (None: all); ports and ICMP keys restrict tcp/udp and
    icmp/icmpv6; peers per family (a family left out is not in the set)."""
    direction: str
    protocols: tuple[str, ...] | None
    ports: Span | None
    icmp_keys: Span | None
    peers: dict[int, Span]

    def text(self) -> str:
        from .intervals import peers_text, ranges_text
        proto = "/".join(self.protocols) if self.protocols else "any protocol"
        ports = f" port {ranges_text(self.ports)}" if self.ports is not None else ""
        side = "from" if self.direction == "ingress" else "to"
        peers = " or ".join(peers_text(f, s) for f, s in sorted(self.peers.items()) if s)
        return f"{self.direction} {proto}{ports} {side} {peers or 'nothing'}"


@dataclass(frozen=True)
class Invariant:
    name: str
    line: int | None
    kind: str                          # never | always
    selector: Selector


@dataclass
class CaseFile:
    source: str
    local: dict[int, str] = field(default_factory=lambda: dict(DEFAULT_LOCAL))
    cases: list[Case] = field(default_factory=list)
    invariants: list[Invariant] = field(default_factory=list)


def load_cases(path: str | os.PathLike, policy: Policy | None = None) -> CaseFile:
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8-sig") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise PolicyError([PolicyIssue("", None, f"cannot read cases file: {e}", source)]) from None
    return parse_cases(text, source, policy)


def _cidr_span(v: Any) -> tuple[int, Span]:
    fam, net, ln = parse_cidr(str(v))
    return fam, Span(((net, net + (1 << ((32 if fam == 4 else 128) - ln))),))


def parse_selector(d: Any, issues: Issues, p: tuple) -> Selector | None:
    """An invariant's packet set; every problem goes to `issues` under path `p`."""
    if not isinstance(d, dict):
        issues.add(p, "give the packet set as a mapping: {direction, protocol, ports, from|to, except}")
        return None
    known = {"direction", "protocol", "ports", "icmp_types", "from", "to", "peers", "except"}
    for k in sorted(set(d) - known):
        issues.add(p + (k,), f"unknown key {k!r}; known: {', '.join(sorted(known))}")
    direction = d.get("direction")
    if direction not in ("ingress", "egress"):
        issues.add(p + ("direction",), f"direction must be ingress or egress, not {direction!r}")
        return None
    proto = d.get("protocol", "any")
    names = ("tcp", "udp", "icmp", "icmpv6", "other", "any")
    if proto not in names:
        issues.add(p + ("protocol",), f"protocol must be one of {', '.join(names)}, not {proto!r}")
        return None
    protocols: tuple[str, ...] | None = None if proto == "any" else (proto,)
    ports = None
    if "ports" in d:
        if proto not in ("tcp", "udp", "any") or not isinstance(d["ports"], list):
            issues.add(p + ("ports",), "ports need protocol tcp, udp or any and a list (e.g. [22, '8000-8100'])")
            return None
        pr = []
        for j, v in enumerate(d["ports"]):
            try:
                lo, hi = parse_port(v)
                pr.append((lo, hi + 1))
            except ValueError as e:
                issues.add(p + ("ports", j), str(e))
        ports = Span.of(pr)
        if protocols is None:
            protocols = ("tcp", "udp")
    icmp_keys = None
    if "icmp_types" in d:
        if not ICMP_KEYED:
            issues.add(p + ("icmp_types",), "this policy language has no icmp_types yet (policy v2); leave it out")
        else:
            parse_icmp_type = importlib.import_module("..icmp", __package__).parse_icmp_type   # policy v2
            ks = []
            for j, v in enumerate(d["icmp_types"] if isinstance(d["icmp_types"], list) else []):
                try:
                    lo, hi = parse_icmp_type(v, proto)
                    ks.append((lo, hi + 1))
                except ValueError as e:
                    issues.add(p + ("icmp_types", j), str(e))
            icmp_keys = Span.of(ks)
    peer_key = "from" if direction == "ingress" else "to"
    other = "to" if direction == "ingress" else "from"
    if other in d:
        issues.add(p + (other,), f"{direction} packets are matched by their {'source' if peer_key == 'from' else 'destination'} "
                                 f"only ('{peer_key}'); '{other}' is this host's own address, which no rule "
                                 "matches: leave it out")
    raw = d.get(peer_key, d.get("peers"))
    peers: dict[int, Span] = {}
    if raw is None:
        peers = {4: Span.full(axis_end(4)), 6: Span.full(axis_end(6))}
    else:
        for j, v in enumerate(raw if isinstance(raw, list) else [raw]):
            try:
                fam, sp = _cidr_span(v)
                peers[fam] = peers.get(fam, Span()) | sp
            except ValueError as e:
                issues.add(p + (peer_key if peer_key in d else "peers",) + ((j,) if isinstance(raw, list) else ()), str(e))
    ex = d.get("except", [])
    for j, v in enumerate(ex if isinstance(ex, list) else [ex]):
        try:
            fam, sp = _cidr_span(v)
            if fam in peers:
                peers[fam] = peers[fam] - sp
        except ValueError as e:
            issues.add(p + ("except", j), str(e))
    if protocols is not None and "icmp" in protocols:
        peers.pop(6, None)
    if protocols is not None and "icmpv6" in protocols:
        peers.pop(4, None)
    return Selector(direction, protocols, ports, icmp_keys if icmp_keys is not None else None,
                    {f: s for f, s in peers.items() if s})


def _expect(v: Any, issues: Issues, p: tuple, rules: set[str] | None) -> Expect | None:
    if isinstance(v, str):
        v = {"verdict": v}
    if not isinstance(v, dict):
        issues.add(p, "expect is a verdict (allow | drop | would_drop) or a mapping {verdict, reason, rule}")
        return None
    bad = False
    for k in sorted(set(v) - {"verdict", "reason", "rule"}):
        issues.add(p + (k,), f"unknown key {k!r}; expect has verdict, reason and rule")
        bad = True
    verdict, reason = v.get("verdict"), v.get("reason")
    if verdict is not None and verdict not in VERDICTS:
        issues.add(p + ("verdict",), f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
        bad = True
    if reason is not None and reason not in REASONS:
        issues.add(p + ("reason",), f"unknown reason {reason!r}; one of {', '.join(REASONS)}")
        bad = True
    elif reason and verdict and (reason in ALLOW_REASONS) != (verdict == "allow"):
        issues.add(p + ("reason",), f"reason {reason} never goes with verdict {verdict}")
        bad = True
    rule: Any = _UNSET
    if "rule" in v:
        rule = v["rule"]
        if rule is not None and not isinstance(rule, str):
            issues.add(p + ("rule",), "rule is a rule name, or null for the default")
            bad = True
        elif rule is not None and rules is not None and rule not in rules:
            import difflib
            near = difflib.get_close_matches(rule, sorted(rules), 1)
            issues.add(p + ("rule",), f"the policy has no rule {rule!r}" + (f"; did you mean {near[0]!r}?" if near else ""))
            bad = True
    if verdict is None and reason is None and rule is _UNSET:
        issues.add(p, "expect checks nothing; give a verdict, a reason or a rule")
        bad = True
    return None if bad else Expect(verdict, reason, rule)


def parse_cases(text: str, source: str = "<cases>", policy: Policy | None = None) -> CaseFile:
    """Validate a cases document; PolicyError lists every problem."""
    issues = Issues(source)
    data = load_yaml(text, issues)
    if data is _MISSING:
        raise PolicyError(issues.sorted())
    out = CaseFile(source)
    if not isinstance(data, dict):
        issues.add((), "the cases file is a mapping with 'cases' and/or 'invariants'")
        raise PolicyError(issues.sorted())
    for k in sorted(set(data) - {"local", "cases", "invariants"}):
        issues.add((k,), f"unknown key {k!r}; a cases file has local, cases and invariants")
    loc = data.get("local")
    for j, a in enumerate(loc if isinstance(loc, list) else ([] if loc is None else [loc])):
        try:
            ip = ipaddress.ip_address(str(a))
            out.local[ip.version] = str(ip)
        except ValueError:
            issues.add(("local", j) if isinstance(loc, list) else ("local",), f"{a!r} is not an IP address")
    rules = set(policy.counter_names()) if policy is not None else None    # rules, and essential_icmp when on
    names: dict[str, int] = {}
    cases = data.get("cases", [])
    if not isinstance(cases, list):
        issues.add(("cases",), "cases is a list")
        cases = []
    for i, c in enumerate(cases):
        p = ("cases", i)
        if not isinstance(c, dict):
            issues.add(p, "a case is a mapping with name, packet and expect")
            continue
        for k in sorted(set(c) - {"name", "packet", "state", "expect"}):
            issues.add(p + (k,), f"unknown key {k!r}; a case has name, packet, state and expect")
        name = c["name"] if isinstance(c.get("name"), str) else f"case {i + 1}"
        if name in names:
            issues.add(p + ("name",), f"duplicate case name {name!r} (first at line {names[name]})")
        names[name] = issues.index.line(p) or 0
        pk = None
        raw = c.get("packet")
        try:
            if isinstance(raw, str):
                pk = parse_packet(raw + (f" state {c['state']}" if c.get("state") else ""), out.local)
            elif isinstance(raw, dict):
                pk = packet_from_mapping({**raw, **({"state": c["state"]} if c.get("state") else {})}, out.local)
            else:
                issues.add(p + ("packet",), "packet is missing: one line ('ingress tcp 10.1.2.3:5555 -> :22') or "
                                            "a mapping")
        except ValueError as e:
            issues.add(p + ("packet",), str(e))
        exp = _expect(c.get("expect"), issues, p + ("expect",), rules) if "expect" in c else None
        if "expect" not in c:
            issues.add(p, "expect is missing (e.g. expect: allow, or {verdict: drop, rule: deny-ssh})")
        if pk is not None and exp is not None:
            out.cases.append(Case(name, issues.index.line(p), pk, exp))
    invs = data.get("invariants", [])
    if not isinstance(invs, list):
        issues.add(("invariants",), "invariants is a list")
        invs = []
    for i, v in enumerate(invs):
        p = ("invariants", i)
        if not isinstance(v, dict) or len({"never", "always"} & set(v)) != 1:
            issues.add(p, "an invariant has a name and exactly one of never: {…} or always: {…}")
            continue
        for k in sorted(set(v) - {"name", "never", "always"}):
            issues.add(p + (k,), f"unknown key {k!r}; an invariant has name and never or always")
        kind = "never" if "never" in v else "always"
        sel = parse_selector(v[kind], issues, p + (kind,))
        if sel is not None:
            nm = v["name"] if isinstance(v.get("name"), str) else f"invariant {i + 1}"
            out.invariants.append(Invariant(nm, issues.index.line(p), kind, sel))
    if not out.cases and not out.invariants and not len(issues):
        issues.add((), "the cases file has no cases and no invariants")
    if len(issues):
        raise PolicyError(issues.sorted())
    return out

