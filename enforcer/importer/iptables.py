"""Read `iptables-save` / `ip6tables-save` output (also hand-written iptables-restore input) into an
IRuleset: the filter table's chains with their policies and rules, each rule's conditions as written
(model.Cond) and its line. Rules of other tables are kept as `foreign` (reported, never translated).

Understood (translated by flatten.py where hostwall can express them): -s -d -p -i -o -f and `!`;
-m tcp/udp (--dport, --sport, --syn, --tcp-flags), multiport (--dports, --sports, --ports), iprange
(--src-range, --dst-range), icmp/icmp6 (--icmp-type, --icmpv6-type), state/conntrack (--state,
--ctstate), comment, addrtype (--src-type, --dst-type), pkttype; -j ACCEPT DROP REJECT RETURN LOG,
-j/-g user chains. Any other match or target is kept as an `unsupported` condition or target with its
text, so the report can say exactly what was left out. Cost: O(lines).
"""
from __future__ import annotations

import ipaddress
import shlex

from ..analysis.intervals import PORT_END, Span
from ..analysis.packet import icmp_type_number
from .model import Cond, IChain, IRule, IRuleset, Origin

__all__ = ["parse_iptables_save", "parse_ports", "parse_addresses", "parse_icmp"]

_HOOKS = {"INPUT": "input", "OUTPUT": "output", "FORWARD": "forward"}
_STD_TARGETS = {"ACCEPT", "DROP", "REJECT", "RETURN", "LOG"}
# options of the modules we read: option -> number of values
_MODULE_OPTS = {
    "tcp": {"--dport": 1, "--destination-port": 1, "--sport": 1, "--source-port": 1, "--syn": 0, "--tcp-flags": 2,
            "--tcp-option": 1},
    "udp": {"--dport": 1, "--destination-port": 1, "--sport": 1, "--source-port": 1},
    "multiport": {"--dports": 1, "--destination-ports": 1, "--sports": 1, "--source-ports": 1, "--ports": 1},
    "iprange": {"--src-range": 1, "--dst-range": 1},
    "icmp": {"--icmp-type": 1},
    "icmp6": {"--icmpv6-type": 1},
    "state": {"--state": 1},
    "conntrack": {"--ctstate": 1},
    "comment": {"--comment": 1},
    "addrtype": {"--src-type": 1, "--dst-type": 1, "--limit-iface-in": 0, "--limit-iface-out": 0},
    "pkttype": {"--pkt-type": 1},
}


def _module_hint(opt: str) -> str:
    """For an option of a module given without `-m MODULE` (iptables loads -p's module implicitly;
    iptables-save always writes it): which module to name."""
    mods = [m for m, opts in _MODULE_OPTS.items() if opt in opts]
    if not mods:
        return ""
    return f" without its module: write {' or '.join(f'-m {m}' for m in mods)} before it, as iptables-save does"


def parse_ports(text: str) -> Span:
    """'22' | '1000:2000' | ':1024' | '1024:' | '22,80,8000:8100' -> ports (ValueError if not numeric)."""
    out = []
    for part in text.split(","):
        if ":" in part:
            a, b = part.split(":", 1)
            lo, hi = int(a or 0), int(b or 65535)
        else:
            lo = hi = int(part)
        if not (0 <= lo <= hi <= 65535):
            raise ValueError(f"bad port range {part!r}")
        out.append((lo, hi + 1))
    return Span.of(out) & Span(((0, PORT_END),))


def parse_addresses(text: str) -> dict[int, Span]:
    """'10.0.0.0/8,192.0.2.1' | 'a/255.0.0.0' | IPv6 -> {family: Span} (ValueError on names and
    non-contiguous masks)."""
    out: dict[int, Span] = {}
    for part in text.split(","):
        net = ipaddress.ip_network(part, strict=False)      # accepts a/len and a/dotted-mask
        out[net.version] = out.get(net.version, Span()) | Span.from_cidrs([net])
    return out


def parse_range(text: str) -> dict[int, Span]:
    a, b = text.split("-", 1)
    lo, hi = ipaddress.ip_address(a), ipaddress.ip_address(b)
    if lo.version != hi.version or int(hi) < int(lo):
        raise ValueError(f"bad address range {text!r}")
    return {lo.version: Span(((int(lo), int(hi) + 1),))}


def parse_icmp(text: str, family: int) -> Span:
    """'8' | '8/0' | 'echo-request' | 'any' -> ICMP keys (type << 8 | code)."""
    if text == "any":
        return Span(((0, PORT_END),))
    t, _, c = text.partition("/")
    typ = icmp_type_number(t, family)
    if c:
        code = int(c)
        return Span.point(typ << 8 | code)
    return Span(((typ << 8, (typ + 1) << 8),))


def _cond(kind: str, opt: str, val: str, neg: bool, family: int) -> Cond:
    """One module option as a Cond; values we cannot read become `unsupported`."""
    text = f"{'! ' if neg else ''}{opt} {val}".strip()
    try:
        if kind in ("dport", "sport"):
            return Cond(kind, parse_ports(val), neg, text)
        if kind == "range":
            return Cond("src" if opt == "--src-range" else "dst", parse_range(val), neg, text)
        if kind == "icmp":
            return Cond("icmp", parse_icmp(val, family), neg, text)
        if kind == "ct":
            return Cond("ct", frozenset(s.strip().upper() for s in val.split(",")), neg, text)
    except ValueError as e:
        return Cond("unsupported", f"cannot read {text!r}: {e}", neg, text)
    return Cond(kind, val, neg, text)


_OPT_KIND = {"--dport": "dport", "--destination-port": "dport", "--dports": "dport", "--destination-ports": "dport",
             "--sport": "sport", "--source-port": "sport", "--sports": "sport", "--source-ports": "sport",
             "--ports": "anyport", "--src-range": "range", "--dst-range": "range", "--icmp-type": "icmp",
             "--icmpv6-type": "icmp", "--state": "ct", "--ctstate": "ct", "--src-type": "addrtype_src",
             "--dst-type": "addrtype_dst", "--pkt-type": "pkttype", "--syn": "tcpflags", "--tcp-flags": "tcpflags",
             "--tcp-option": "tcpflags", "--limit-iface-in": "addrtype_iface", "--limit-iface-out": "addrtype_iface"}


def parse_rule(toks: list[str], origin: Origin, family: int, chains: set[str]) -> tuple[str, IRule]:
    """The chain and the rule of one `-A CHAIN …` line (tokens after shlex)."""
    rule = IRule(origin)
    chain = ""
    module: str | None = None
    neg = False
    i, n = 0, len(toks)

    def val() -> str:
        nonlocal i, neg
        if i + 1 < n and toks[i + 1] == "!":            # old style: --dport ! 22
            neg = not neg
            i += 1
        if i + 1 >= n:
            raise ValueError(f"{toks[i]} needs a value")
        i += 1
        return toks[i]
    while i < n:
        t = toks[i]
        if t == "!":
            neg = True
            i += 1
            continue
        if t in ("-A", "--append"):
            chain = val()
        elif t in ("-s", "--source", "--src", "-d", "--destination", "--dst"):
            v = val()
            kind = "src" if t in ("-s", "--source", "--src") else "dst"
            try:
                rule.conds.append(Cond(kind, parse_addresses(v), neg, f"{'! ' if neg else ''}{t} {v}"))
            except ValueError as e:
                rule.conds.append(Cond("unsupported", f"cannot read address {v!r}: {e}", neg, f"{t} {v}"))
        elif t in ("-p", "--protocol"):
            v = val()
            rule.conds.append(Cond("proto", v.lower(), neg, f"{'! ' if neg else ''}-p {v}"))
        elif t in ("-i", "--in-interface", "-o", "--out-interface"):
            v = val()
            rule.conds.append(Cond("iif" if t in ("-i", "--in-interface") else "oif", v, neg, f"{'! ' if neg else ''}{t} {v}"))
        elif t in ("-f", "--fragment"):
            rule.conds.append(Cond("frag", True, neg, f"{'! ' if neg else ''}-f"))
        elif t in ("-m", "--match"):
            module = val()
            if module not in _MODULE_OPTS:
                j = i + 1
                while j < n and not (toks[j] in ("-m", "--match", "-j", "--jump", "-g", "--goto") or
                                     (toks[j].startswith("-") and len(toks[j]) == 2 and toks[j] != "-")):
                    j += 1
                rule.conds.append(Cond("unsupported", f"match -m {module}", False,
                                       " ".join(["-m", module, *toks[i + 1:j]])))
                i = j
                neg = False
                continue
        elif t in ("-j", "--jump", "-g", "--goto"):
            target = val()
            rule.target_text = " ".join(toks[i - 1:])
            if t in ("-g", "--goto"):
                rule.target, rule.chain_target = "GOTO", target
            elif target in _STD_TARGETS:
                rule.target = target
            elif target in chains:
                rule.target, rule.chain_target = "JUMP", target
            else:
                rule.target = target                       # MARK, NFLOG, CT, …: not translated
            break                                          # target options follow; they do not match
        elif t.startswith("--") and module is not None and t in _MODULE_OPTS.get(module, {}):
            nvals = _MODULE_OPTS[module][t]
            if nvals == 0:
                rule.conds.append(Cond(_OPT_KIND.get(t, "unsupported"), t, neg, f"{'! ' if neg else ''}{t}"))
            elif nvals == 2:
                a = val()
                b = val()
                rule.conds.append(Cond(_OPT_KIND.get(t, "unsupported"), f"{a} {b}", neg, f"{'! ' if neg else ''}{t} {a} {b}"))
            elif t == "--comment":
                rule.comment = val()
            else:
                v = val()
                kind = _OPT_KIND.get(t, "unsupported")
                if kind == "anyport":
                    rule.conds.append(Cond("unsupported", "--ports matches the source or the destination port", neg,
                                           f"--ports {v}"))
                else:
                    rule.conds.append(_cond(kind, t, v, neg, family))
        else:
            raise ValueError(f"unknown option {t!r}" + _module_hint(t))
        neg = False
        i += 1
    if not chain:
        raise ValueError("a rule line needs -A CHAIN")
    return chain, rule


def parse_iptables_save(text: str, source: str, family: int) -> IRuleset:
    """Parse a whole iptables-save file of one family. Unreadable lines go to `problems`."""
    rs = IRuleset(source, (family,))
    table = None
    lines = text.split("\n")
    declared: dict[str, set[str]] = {}
    cur = None
    for raw in lines:            # first pass: chain names per table (targets need them)
        s = raw.strip()
        if s.startswith("*"):
            cur = s[1:].strip()
            declared.setdefault(cur, set())
        elif s.startswith(":") and cur is not None:
            declared[cur].add(s[1:].split()[0])
    for ln, raw in enumerate(lines, 1):
        s = raw.strip()
        if not s or s.startswith("#"):
            continue
        origin = Origin(source, ln, s)
        if s.startswith("*"):
            table = s[1:].strip()
            continue
        if s == "COMMIT":
            table = None
            continue
        if table is None:
            rs.problems.append((origin, "outside a table: start tables with *filter (iptables-save format)"))
            continue
        if s.startswith(":"):
            parts = s[1:].split()
            if table == "filter":
                name, pol = parts[0], parts[1] if len(parts) > 1 else "-"
                rs.chains[name] = IChain(name, _HOOKS.get(name), pol if pol in ("ACCEPT", "DROP") else None,
                                         origin=origin)
            continue
        if s.startswith("["):                        # iptables-save -c: "[packets:bytes] -A ..."
            s = s.split("]", 1)[1].strip()
        try:
            toks = shlex.split(s)
        except ValueError as e:
            rs.problems.append((origin, f"cannot split the line: {e}"))
            continue
        if not toks or toks[0] not in ("-A", "--append"):
            rs.problems.append((origin, f"unsupported command {toks[0] if toks else ''!r}; iptables-save "
                                        "writes only chain lines (:NAME), rules (-A) and COMMIT"))
            continue
        if table != "filter":
            rs.foreign.append((origin, f"table {table}: only the filter table is translated (hostwall filters; "
                                       "it does not rewrite, mark or NAT packets)"))
            continue
        try:
            chain, rule = parse_rule(toks, origin, family, declared.get("filter", set()))
        except ValueError as e:
            rs.problems.append((origin, str(e)))
            continue
        if chain not in rs.chains:
            rs.problems.append((origin, f"chain {chain!r} is not declared (':{chain} - [0:0]')"))
            continue
        rule.origin = Origin(source, ln, s, chain, len(rs.chains[chain].rules))
        rs.chains[chain].rules.append(rule)
    return rs
