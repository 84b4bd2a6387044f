"""`fqdns` rules in the policy tooling (docs/policy.md "FQDN rules" and "Tooling").

An fqdns rule's destinations are a dynamic set: the addresses the DNS proxy learnt for its names, known
only at run time. The compiler leaves it out of every peer class (docs/datapath.md "FQDN rules"), so the
cells of table.py never hold it; its L4 condition (protocol, ports) is classified like any rule's. The
tooling therefore reads an fqdns rule two ways:
- without addresses (lint, diff): it *may* match any destination of its L4 cells. Claims about it hold
  for every DNS answer: it is shadowed only where earlier rules certainly decide (a rule over every peer,
  or an earlier fqdns rule whose names cover its names: the proxy enters a name's addresses into every
  set whose patterns match it, so covered names mean a contained set), and it never shadows a static
  rule by address;
- with a snapshot of names → addresses (explain: `--fqdn-addresses FILE`, or the running instance's
  learnt names with `--pin-dir`): the reference model's `learnt` (reference.py), exact for that snapshot,
  and the names that put a destination into a rule's set.
Pure: no kernel, no I/O but reading a snapshot file. Cost: O(names × patterns) per question.
"""
from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable

import yaml

from hostwall.dnsnames import matches, normalize_name, parse_pattern

from ..policy import PeerSet, Policy, Rule
from ..reference import PROTO_NUMBERS, Learnt, Packet, evaluate, fqdn_names

__all__ = ["load_addresses", "pattern_covers", "covers", "names_holding", "upstream_blocked", "is_fqdn", "name_classes",
           "with_names", "set_addresses", "with_addresses"]


def is_fqdn(rule: Rule) -> bool:
    return getattr(rule, "fqdns", None) is not None


def load_addresses(path: str) -> dict[str, tuple[str, ...]]:
    """A names → addresses snapshot from a YAML or JSON file: a mapping of DNS names to an address or a
    list of addresses, e.g. `{deb.debian.org: [151.101.2.132, "2a04:4e42::644"]}`. ValueError naming the
    file and the entry for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the fqdn addresses: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of DNS names to addresses, e.g. "
                         "'deb.debian.org: [151.101.2.132]'")
    out: dict[str, tuple[str, ...]] = {}
    for name, addrs in data.items():
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"{path}: {name!r} is not a DNS name")
        if "*" in name:
            raise ValueError(f"{path}: {name!r}: a snapshot lists what names resolved to: a name, not a pattern")
        try:                             # as the proxy could learn it (the kernel's name map holds no longer)
            parse_pattern(name)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None
        vals = [addrs] if isinstance(addrs, str) else addrs
        if not isinstance(vals, list):
            raise ValueError(f"{path}: {name}: expected an address or a list of addresses")
        for i, a in enumerate(vals):
            try:
                ipaddress.ip_address(str(a).strip())
            except ValueError:
                raise ValueError(f"{path}: {name}[{i}]: {a!r} is not an IP address") from None
        key = normalize_name(name.strip())
        out[key] = tuple(dict.fromkeys([*out.get(key, ()), *(str(ipaddress.ip_address(str(a).strip())) for a in vals)]))
    return out


def pattern_covers(a: str, b: str) -> bool:
    """Does every name pattern `b` matches also match pattern `a`? (equal, or `b` an exact name one
    label under `a`'s wildcard)"""
    return a == b or (not b.startswith("*.") and matches(b, a))


def covers(a: Iterable[str], b: Iterable[str]) -> bool:
    """Does every name some pattern of `b` matches match a pattern of `a` (so a's set holds b's)?"""
    pa = tuple(a)
    return all(any(pattern_covers(x, y) for x in pa) for y in b)


def names_holding(rule: Rule, addr: str, learnt: Learnt | None) -> list[str]:
    """The learnt names, matched by one of `rule`'s patterns, that hold `addr` (sorted)."""
    return sorted(fqdn_names(rule, ipaddress.ip_address(addr), learnt))


def upstream_blocked(policy: Policy) -> list[str] | None:
    """When the policy drops the DNS proxy's UDP queries to every upstream (so no fqdns set is ever
    filled): one line per upstream saying what drops it; None when some upstream is reachable (or there
    is no dns section). Loopback upstreams never cross the protected interface: reachable."""
    dns = policy.dns
    if dns is None or not dns.upstreams:
        return None
    why = []
    for addr, port in dns.upstreams:
        ip = ipaddress.ip_address(addr)
        if ip.is_loopback:
            return None
        local = "192.0.2.1" if ip.version == 4 else "2001:db8::1"
        d = evaluate(policy, Packet("egress", ip.version, local, str(ip), PROTO_NUMBERS["udp"], 40000, port))
        if d.verdict != "drop":                   # allow, or would_drop (audit): the query leaves
            return None
        by = f"rule {d.rule!r}" if d.rule else "the egress default"
        why.append(f"udp to {f'[{ip}]' if ip.version == 6 else ip}:{port} ({by}, {d.reason})")
    return why


def name_classes(*policies: Policy) -> dict[tuple[frozenset[str], ...], list[str]]:
    """The names of the policies' fqdns rules cut into classes that every policy treats alike: each exact
    name listed, and per wildcard `*.x` the other names under it (represented by the pattern itself:
    `matches("*.x", "*.x")` holds, and no exact pattern matches it). Keyed by the rules (names, per
    policy) whose patterns match the class, i.e. whose sets receive its addresses; classes matched by no
    rule of any policy are left out. Cost: O(names × patterns)."""
    pats = sorted({p for pol in policies for r in pol.rules if is_fqdn(r) for p in r.fqdns or ()})
    out: dict[tuple[frozenset[str], ...], list[str]] = {}
    for n in pats:
        key = tuple(frozenset(r.name for r in pol.rules if is_fqdn(r) and any(matches(n, p) for p in r.fqdns or ()))
                    for pol in policies)
        out.setdefault(key, []).append(n)
    return out


def with_names(policy: Policy, rules: frozenset[str]) -> Policy:
    """`policy` for a destination learnt for names that exactly the fqdns rules `rules` list: those rules
    match every destination (a static rule over every peer), the other fqdns rules none (as compiled)."""
    return dataclasses.replace(policy, rules=tuple(dataclasses.replace(r, fqdns=None) if r.name in rules else r
                                                   for r in policy.rules))


def set_addresses(rule: Rule, learnt: Learnt | None) -> list[str]:
    """The addresses of the snapshot `learnt` in an fqdns rule's set: those of every name one of its
    patterns matches (as the proxy enters them, docs/datapath.md "FQDN rules"), in first-seen order."""
    out: dict[str, None] = {}
    for name, ips in (learnt or {}).items():
        if any(matches(name, p) for p in rule.fqdns or ()):
            out.update((str(ipaddress.ip_address(a)), None) for a in ips)
    return list(out)


def with_addresses(policy: Policy, learnt: Learnt | None) -> Policy:
    """`policy` with each fqdns rule turned into a static rule over its set's addresses in the snapshot
    `learnt` (host prefixes; none: it matches nothing, as compiled). Same names, order and conditions,
    so every packet gets the outcome `reference.evaluate(policy, p, learnt)` gives it; the batch model
    and the invariants judge a snapshot through it. The policy itself when it has no fqdns rule."""
    if not any(is_fqdn(r) for r in policy.rules):
        return policy
    return dataclasses.replace(policy, rules=tuple(
        dataclasses.replace(r, fqdns=None, peers=PeerSet.from_cidrs(set_addresses(r, learnt))) if is_fqdn(r) else r
        for r in policy.rules))
