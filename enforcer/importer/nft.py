"""Read `nft -j list ruleset` (libnftables JSON) into IRulesets: one per table of family ip, ip6 or
inet, with its base chains (hook, policy) and rules as conditions (model.Cond), like iptables.py.

Understood: payload matches on ip/ip6 saddr, daddr, protocol/nexthdr, tcp/udp/th dport and sport,
icmp/icmpv6 type and code; meta l4proto, nfproto, iifname/oifname, pkttype; ct state; fib daddr type;
values as literals, prefixes, ranges, anonymous sets and named sets (resolved from the ruleset);
verdicts accept, drop, reject, return, jump, goto; counter (ignored) and log. Anything else (limit,
meters, xt compat expressions of iptables-nft, marks, …) is kept as an `unsupported` condition with its
rendering, so the report can say what was left out. JSON has no line numbers: a rule's place is its
table, chain and handle. Cost: O(size of the JSON).
"""
from __future__ import annotations

import json
from typing import Any

from ..analysis.intervals import PORT_END, Span
from ..analysis.packet import icmp_type_number
from .iptables import parse_addresses
from .model import Cond, IChain, IRule, IRuleset, Origin

__all__ = ["parse_nft_json", "render"]

_FAMILIES = {"ip": (4,), "ip6": (6,), "inet": (4, 6)}
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}


def render(x: Any) -> str:
    """nft-like text of an expression or statement (for the report)."""
    if isinstance(x, dict):
        if "match" in x:
            m = x["match"]
            op = m.get("op", "==")
            return f"{render(m['left'])} {'' if op in ('==', 'in') else op + ' '}{render(m['right'])}".replace("  ", " ")
        if "payload" in x:
            p = x["payload"]
            return f"{p.get('protocol', '')} {p.get('field', '')}".strip()
        if "meta" in x:
            return f"meta {x['meta'].get('key')}"
        if "ct" in x:
            return f"ct {x['ct'].get('key')}"
        if "fib" in x:
            f = x["fib"]
            return f"fib {' . '.join(f.get('flags', []))} {f.get('result', '')}"
        if "prefix" in x:
            return f"{x['prefix']['addr']}/{x['prefix']['len']}"
        if "range" in x:
            return f"{render(x['range'][0])}-{render(x['range'][1])}"
        if "set" in x:
            return "{ " + ", ".join(render(e) for e in x["set"]) + " }" if isinstance(x["set"], list) else render(x["set"])
        if "jump" in x or "goto" in x:
            k = "jump" if "jump" in x else "goto"
            return f"{k} {x[k]['target']}"
        k = next(iter(x))
        v = x[k]
        return k if v is None else f"{k} {json.dumps(v, separators=(',', ':'))}"
    if isinstance(x, list):
        return "{ " + ", ".join(render(e) for e in x) + " }"
    return str(x)


def _values(right: Any, sets: dict[str, list]) -> list:
    """A match's right side as a list of elements (literals, prefixes, ranges), sets resolved."""
    if isinstance(right, str) and right.startswith("@"):
        if right[1:] not in sets:
            raise ValueError(f"named set {right} is not in the ruleset")
        return list(sets[right[1:]])
    if isinstance(right, dict) and "set" in right:
        s = right["set"]
        return list(s) if isinstance(s, list) else [s]
    if isinstance(right, list):
        return list(right)
    return [right]


def _addr_span(vals: list) -> dict[int, Span]:
    out: dict[int, Span] = {}
    for v in vals:
        if isinstance(v, dict) and "elem" in v:
            v = v["elem"]["val"]
        if isinstance(v, dict) and "prefix" in v:
            text = f"{v['prefix']['addr']}/{v['prefix']['len']}"
            got = parse_addresses(text)
        elif isinstance(v, dict) and "range" in v:
            from .iptables import parse_range
            got = parse_range(f"{v['range'][0]}-{v['range'][1]}")
        else:
            got = parse_addresses(str(v))
        for f, sp in got.items():
            out[f] = out.get(f, Span()) | sp
    return out


def _port_span(vals: list) -> Span:
    out = []
    for v in vals:
        if isinstance(v, dict) and "elem" in v:
            v = v["elem"]["val"]
        if isinstance(v, dict) and "range" in v:
            out.append((int(v["range"][0]), int(v["range"][1]) + 1))
        else:
            out.append((int(v), int(v) + 1))
    return Span.of(out) & Span(((0, PORT_END),))


def _proto(v: Any) -> str:
    if isinstance(v, int):
        return _PROTO_NAMES.get(v, str(v))
    return {"ipv6-icmp": "icmpv6"}.get(str(v), str(v))


def _match_conds(m: dict, sets: dict[str, list]) -> list[Cond]:
    """Conditions of one match expression; unsupported ones carry their rendering."""
    text = render({"match": m})
    op = m.get("op", "==")
    left, right = m["left"], m["right"]
    if op not in ("==", "!=", "in"):
        return [Cond("unsupported", f"operator {op}", False, text)]
    neg = op == "!="
    vals = _values(right, sets)
    if "payload" in left:
        proto, field = left["payload"].get("protocol"), left["payload"].get("field")
        fam = {"ip": 4, "ip6": 6}.get(proto)
        if fam and field in ("saddr", "daddr"):
            return [Cond("family", fam, False, proto),
                    Cond("src" if field == "saddr" else "dst", _addr_span(vals), neg, text)]
        if fam and field in ("protocol", "nexthdr"):
            return [Cond("family", fam, False, proto), _proto_cond(vals, neg, text)]
        if proto in ("tcp", "udp", "th") and field in ("dport", "sport"):
            out = [] if proto == "th" else [Cond("proto", proto, False, proto)]
            return out + [Cond(field, _port_span(vals), neg, text)]
        if proto in ("icmp", "icmpv6") and field in ("type", "code"):
            fam = 4 if proto == "icmp" else 6
            if field == "code":
                return [Cond("unsupported", "ICMP codes alone", False, text)]
            keys = Span.of(((icmp_type_number(v, fam) << 8), (icmp_type_number(v, fam) + 1) << 8) for v in vals)
            return [Cond("family", fam, False, proto), Cond("proto", proto, False, proto),
                    Cond("icmp", keys, neg, text)]
    if "meta" in left:
        key = left["meta"].get("key")
        if key == "l4proto":
            return [_proto_cond(vals, neg, text)]
        if key == "nfproto":
            fams = {{"ipv4": 4, "ipv6": 6}.get(str(v), 0) for v in vals}
            if neg or len(fams) != 1 or 0 in fams:
                return [Cond("unsupported", "nfproto", False, text)]
            return [Cond("family", fams.pop(), False, text)]
        if key in ("iifname", "oifname") and len(vals) == 1:
            name = str(vals[0])
            name = name[:-1] + "+" if name.endswith("*") else name
            return [Cond("iif" if key == "iifname" else "oif", name, neg, text)]
        if key == "pkttype" and len(vals) == 1:
            return [Cond("pkttype", str(vals[0]), neg, text)]
    if "ct" in left and left["ct"].get("key") == "state":
        flat = []
        for v in vals:
            flat += v if isinstance(v, list) else [v]
        return [Cond("ct", frozenset(str(s).upper() for s in flat), neg, text)]
    if "fib" in left and left["fib"].get("result") == "type" and left["fib"].get("flags") == ["daddr"]:
        return [Cond("addrtype_dst", ",".join(str(v).upper() for v in vals), neg, text)]
    return [Cond("unsupported", "not a match hostwall translates", False, text)]


def _proto_cond(vals: list, neg: bool, text: str) -> Cond:
    names = {_proto(v) for v in vals}
    if len(names) == 1:
        return Cond("proto", names.pop(), neg, text)
    return Cond("unsupported", "a set of protocols (hostwall's rules name one protocol)", False, text)


def _rule(r: dict, origin: Origin, sets: dict[str, list]) -> IRule:
    rule = IRule(origin, comment=r.get("comment"))
    for x in r.get("expr", []):
        if "match" in x:
            try:
                rule.conds += _match_conds(x["match"], sets)
            except (ValueError, KeyError, TypeError) as e:
                rule.conds.append(Cond("unsupported", f"cannot read it: {e}", False, render(x)))
        elif "counter" in x:
            continue
        elif any(k in x for k in ("accept", "drop", "reject", "return")):
            k = next(k for k in ("accept", "drop", "reject", "return") if k in x)
            rule.log = rule.target == "LOG"
            rule.target, rule.target_text = k.upper(), render(x)
            break
        elif "jump" in x or "goto" in x:
            k = "jump" if "jump" in x else "goto"
            rule.target, rule.chain_target, rule.target_text = k.upper(), x[k]["target"], render(x)
            break
        elif "log" in x:
            rule.target, rule.target_text = "LOG", render(x)          # nft log continues: like -j LOG
        else:
            rule.conds.append(Cond("unsupported", "not a match or verdict hostwall translates", False, render(x)))
    return rule


def parse_nft_json(text: str, source: str) -> list[IRuleset]:
    """One IRuleset per ip/ip6/inet table; other families' rules are foreign (reported)."""
    try:
        doc = json.loads(text)
        items = doc["nftables"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{source}: not `nft -j list ruleset` output ({e})") from None
    sets: dict[tuple[str, str], dict[str, list]] = {}
    out: dict[tuple[str, str], IRuleset] = {}
    foreign: list[tuple[Origin, str]] = []
    for it in items:
        if "set" in it:
            s = it["set"]
            sets.setdefault((s["family"], s["table"]), {})[s["name"]] = list(s.get("elem", []))
        elif "chain" in it:
            c = it["chain"]
            key = (c["family"], c["table"])
            if c["family"] not in _FAMILIES:
                continue
            rs = out.setdefault(key, IRuleset(source, _FAMILIES[c["family"]]))
            hook = c.get("hook") if c.get("type", "filter") == "filter" else None
            pol = {"accept": "ACCEPT", "drop": "DROP"}.get(c.get("policy", "accept")) if hook else None
            rs.chains[c["name"]] = IChain(c["name"], hook, pol,
                                          origin=Origin(source, 0, f"chain {c['family']} {c['table']} {c['name']}"
                                                        + (f" {{ hook {hook}; policy {c.get('policy', 'accept')} }}" if hook else ""),
                                                        f"{c['family']} {c['table']} {c['name']}"))
    for it in items:
        if "rule" not in it:
            continue
        r = it["rule"]
        key = (r["family"], r["table"])
        where = f"{r['family']} {r['table']} {r['chain']}"
        text_ = f"[handle {r.get('handle')}] " + " ".join(render(x) for x in r.get("expr", []))
        if key not in out or r["chain"] not in out[key].chains:
            foreign.append((Origin(source, 0, text_, where, 0), f"table family {r['family']}: not translated "
                                                               "(hostwall filters IPv4 and IPv6 of its interfaces)"))
            continue
        ch = out[key].chains[r["chain"]]
        origin = Origin(source, 0, text_, where, len(ch.rules))
        ch.rules.append(_rule(r, origin, sets.get(key, {})))
    # one base chain per hook and family: several would all have to accept (not translated)
    seen: dict[tuple[int, str], str] = {}
    result = list(out.values())
    for rs in result:
        for ch in rs.chains.values():
            if ch.hook not in ("input", "output"):
                continue
            for fam in rs.families:
                other = seen.get((fam, ch.hook))
                if other:
                    for r in ch.rules:
                        rs.foreign.append((r.origin, f"a second {ch.hook} base chain for IPv{fam} (the first: {other}): "
                                                     "every base chain must accept a packet; not translated"))
                    ch.rules = []
                    ch.hook = None
                    break
                seen[(fam, ch.hook)] = ch.origin.chain if ch.origin else ch.name
    if result:
        result[0].foreign += foreign
    return result
