"""The policy's DNS part (docs/policy.md "FQDN rules"): `fqdns` on egress rules and the `dns:` section
of the proxy that learns their addresses. Loaded by enforcer.policy's builder, which reports every
problem with its path and line; nothing here touches the kernel.

Invariants of what it returns: patterns are normalised (lowercase, no trailing dot), unique and sorted
per rule (the sorted tuple names the rule's dynamic set, docs/datapath.md); fqdns appear only on egress
rules without peers; a policy with fqdns has a DnsConf; min_ttl <= max_ttl.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from hostwall.dnsnames import parse_pattern
from hostwall.units import parse_duration
from hostwall.yamldoc import Issues

__all__ = ["DnsConf", "parse_endpoint", "rule_fqdns", "build_dns", "DEFAULT_LISTEN"]

DEFAULT_LISTEN = "127.0.0.1:53"
DEFAULT_CACHE_SIZE = 10000


@dataclass(frozen=True, slots=True)
class DnsConf:
    """The proxy's settings. Endpoints are (address, port) with the address in canonical text form."""
    listen: tuple[tuple[str, int], ...]
    upstreams: tuple[tuple[str, int], ...]
    min_ttl_s: float = 5.0
    max_ttl_s: float = 3600.0
    max_ips_per_name: int = 256
    refuse_unlisted: bool = False
    upstream_timeout_s: float = 2.0
    cache_size: int = DEFAULT_CACHE_SIZE           # answers the proxy caches (enforcer/dnscache.py); 0: off

    def as_dict(self) -> dict:
        """Plain data (the instance's fqdn config file, `status`)."""
        return {"listen": [f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in self.listen],
                "upstreams": [f"[{a}]:{p}" if ":" in a else f"{a}:{p}" for a, p in self.upstreams],
                "min_ttl_s": self.min_ttl_s, "max_ttl_s": self.max_ttl_s,
                "max_ips_per_name": self.max_ips_per_name, "refuse_unlisted": self.refuse_unlisted,
                "upstream_timeout_s": self.upstream_timeout_s, "cache_size": self.cache_size}

    @classmethod
    def from_dict(cls, d: dict) -> DnsConf:
        return cls(listen=tuple(parse_endpoint(x) for x in d["listen"]),
                   upstreams=tuple(parse_endpoint(x) for x in d["upstreams"]),
                   min_ttl_s=float(d["min_ttl_s"]), max_ttl_s=float(d["max_ttl_s"]),
                   max_ips_per_name=int(d["max_ips_per_name"]), refuse_unlisted=bool(d["refuse_unlisted"]),
                   upstream_timeout_s=float(d.get("upstream_timeout_s", 2.0)),
                   cache_size=int(d.get("cache_size", DEFAULT_CACHE_SIZE)))


def parse_endpoint(text: Any) -> tuple[str, int]:
    """'127.0.0.1:53', '[fd00::1]:5353', '10.0.0.1' (port 53) -> (address, port); ValueError otherwise.
    Names are not accepted: the proxy must not need DNS to find its upstream."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not an address; write 'ADDRESS:PORT' like '127.0.0.1:53' or '[::1]:53'")
    s = text.strip()
    port = "53"
    if s.startswith("["):
        addr, sep, rest = s[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r}: write an IPv6 endpoint as '[ADDRESS]:PORT', like '[::1]:53'")
        port = rest[1:] if rest else port
    elif s.count(":") == 1:
        addr, _, port = s.partition(":")
    else:
        addr = s                                   # a bare IPv4 or IPv6 address
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise ValueError(f"{text!r}: {addr!r} is not an IP address (names are not accepted here; the proxy must "
                         "not need DNS to reach its upstream)") from None
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"{text!r}: port {port!r} is not 1-65535")
    return str(ip), int(port)


def rule_fqdns(issues: Issues, p: tuple, r: dict, has_dns: bool) -> tuple[str, ...] | None:
    """The normalised, sorted, unique fqdns of rule `r` at path `p`, or None. Every bad entry and every
    conflict (ingress rule, peers too, no dns section) is reported with its own path."""
    if "fqdns" not in r:
        return None
    names = r.get("fqdns")
    fp = p + ("fqdns",)
    ok = True
    if r.get("direction") == "ingress" and not issues.bad(p + ("direction",)):
        issues.add(fp, "fqdns apply to egress rules only (they name the destination this host connects to); "
                       "use peers for ingress, or set direction: egress")
        ok = False
    for key in ("peers", "peers_file"):
        if key in r:
            issues.add(fp, f"give either {key} or fqdns, not both: fqdns is the rule's destination condition")
            ok = False
    if not has_dns:
        issues.add(fp, "fqdns need the dns section: the DNS proxy learns the addresses of these names; add "
                       "dns: {upstreams: [...]} and point the host's resolver at dns.listen")
        ok = False
    if not isinstance(names, list):        # the schema reported it
        return None
    out: set[str] = set()
    for j, v in enumerate(names):
        if issues.bad(fp + (j,)):
            ok = False
            continue
        try:
            out.add(parse_pattern(v))
        except ValueError as e:
            issues.add(fp + (j,), str(e))
            ok = False
    return tuple(sorted(out)) if ok else None


def build_dns(issues: Issues, d: Any) -> DnsConf | None:
    """The dns section as a DnsConf (None when absent or wrong); every problem reported with its path."""
    if not isinstance(d, dict) or issues.bad(("dns",)):
        return None
    eps: dict[str, tuple] = {}
    for key in ("listen", "upstreams"):
        vals = d.get(key, [DEFAULT_LISTEN] if key == "listen" else None)
        if not isinstance(vals, list) or issues.bad(("dns", key)):
            continue
        got = []
        for j, v in enumerate(vals):
            if issues.bad(("dns", key, j)):
                continue
            try:
                got.append(parse_endpoint(v))
            except ValueError as e:
                issues.add(("dns", key, j), str(e))
        eps[key] = tuple(got)
    ttl: dict[str, float] = {}
    for key, default in (("min_ttl", 5.0), ("max_ttl", 3600.0), ("upstream_timeout", 2.0)):
        v = d.get(key)
        if v is None:
            ttl[key] = default
        elif not issues.bad(("dns", key)):
            try:
                ttl[key] = parse_duration(v)
            except ValueError as e:
                issues.add(("dns", key), str(e))
    if "min_ttl" in ttl and "max_ttl" in ttl and ttl["min_ttl"] > ttl["max_ttl"]:
        issues.add(("dns", "min_ttl" if "min_ttl" in d else "max_ttl"),
                   f"min_ttl ({ttl['min_ttl']:g} s) is above max_ttl ({ttl['max_ttl']:g} s); an address is kept "
                   "for clamp(TTL, min_ttl, max_ttl), so min_ttl must not exceed max_ttl")
    if issues.tainted(("dns",)) or len(eps) < 2 or len(ttl) < 3:
        return None
    return DnsConf(listen=eps["listen"], upstreams=eps["upstreams"], min_ttl_s=ttl["min_ttl"],
                   max_ttl_s=ttl["max_ttl"], max_ips_per_name=int(d.get("max_ips_per_name", 256)),
                   refuse_unlisted=bool(d.get("refuse_unlisted", False)), upstream_timeout_s=ttl["upstream_timeout"],
                   cache_size=int(d.get("cache_size", DEFAULT_CACHE_SIZE)))
