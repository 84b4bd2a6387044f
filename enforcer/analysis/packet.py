"""One packet as operators write it (docs/policy.md "Tooling"), for `explain` and the cases of `test`.

Compact form, one line:

    DIRECTION PROTOCOL SRC[:SPORT] -> DST[:DPORT] [flags F] [type T] [code C] [id N] [ttl N] [about ADDR]
              [frag] [on IF] [state S]
    ("to" may stand for "->", which a shell or argparse may take for an option)

    ingress tcp 10.1.2.3:5555 -> 10.0.0.1:22
    ingress tcp [2001:db8::7]:40000 -> :443 flags SA state reply      (":443": this host's address)
    egress udp :5353 -> 8.8.8.8:53
    ingress icmp 10.1.2.3 -> 10.0.0.1 type echo-request id 7
    ingress icmp 10.1.2.3 -> 10.0.0.1 type 3/4 about 10.0.0.1                (an error about our packet)
    ingress icmpv6 fe80::1 -> ff02::1:ff00:1 type neighbor-solicitation ttl 255
    ingress gre 10.1.2.3 -> 10.0.0.1                                  (or "proto 47")

or the same as a YAML mapping (direction, protocol, src, dst, sport, dport, flags, type, code, id, ttl,
about, fragment, interface, state). `ttl` is the IPv4 TTL or IPv6 hop limit (default 64; essential
ICMP asks 255 of neighbour discovery, 1 of MLD); `about` gives an ICMP error an embedded packet with
that source address (essential path-MTU errors are about a packet their destination sent). An omitted address is this host's own (`local`, default 192.0.2.1 /
2001:db8::1, documentation ranges): policies match only the peer's address, so it never changes a
verdict. `state` (new | established | reply) puts a tracked connection in place first: `established`
= this packet's sender opened it (the same tuple, in this direction), `reply` = the other side did
(the reversed tuple, in the other direction); the opener is judged too, and only an allowed one opens
the connection (enforcer/analysis/ctmodel.py).
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Literal, cast

from ..policy import Direction
from ..reference import Packet

__all__ = ["CasePacket", "parse_packet", "packet_from_mapping", "PROTOCOLS", "DEFAULT_LOCAL", "icmp_type_number",
           "STATES", "ICMP_ERRORS"]

PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "ipv6-icmp": 58, "gre": 47, "esp": 50, "ah": 51,
             "ospf": 89, "vrrp": 112, "sctp": 132, "igmp": 2, "ipip": 4, "ipv6": 41}
_PROTO_NAMES = {6: "tcp", 17: "udp", 1: "icmp", 58: "icmpv6"}
DEFAULT_LOCAL = {4: "192.0.2.1", 6: "2001:db8::1"}
STATES = ("new", "established", "reply")
_FLAG_BITS = {"F": 0x01, "S": 0x02, "R": 0x04, "P": 0x08, "A": 0x10, "U": 0x20, "E": 0x40, "C": 0x80}
# ICMP / ICMPv6 type names (IANA names, plus the iptables/nft spellings) — the common ones
_ICMP_TYPES = {
    4: {"echo-reply": 0, "destination-unreachable": 3, "source-quench": 4, "redirect": 5, "echo-request": 8,
        "router-advertisement": 9, "router-solicitation": 10, "time-exceeded": 11, "parameter-problem": 12,
        "timestamp-request": 13, "timestamp-reply": 14, "echo": 8, "ping": 8, "pong": 0, "ttl-exceeded": 11},
    6: {"destination-unreachable": 1, "packet-too-big": 2, "time-exceeded": 3, "parameter-problem": 4,
        "echo-request": 128, "echo-reply": 129, "mld-listener-query": 130, "mld-listener-report": 131,
        "mld-listener-done": 132, "router-solicitation": 133, "nd-router-solicit": 133, "router-advertisement": 134,
        "nd-router-advert": 134, "neighbor-solicitation": 135, "neighbour-solicitation": 135,
        "nd-neighbor-solicit": 135, "neighbor-advertisement": 136, "neighbour-advertisement": 136,
        "nd-neighbor-advert": 136, "redirect": 137, "nd-redirect": 137, "ping": 128, "pong": 129},
}
ECHO = {4: (8, 0), 6: (128, 129)}           # (request, reply)
ICMP_ERRORS = {4: (3, 4, 5, 11, 12), 6: (1, 2, 3, 4)}


def icmp_type_number(text: Any, family: int) -> int:
    """An ICMP type given as a number or a name of the family's registry."""
    if isinstance(text, int) and not isinstance(text, bool):
        v = text
    elif isinstance(text, str) and text.isdigit():
        v = int(text)
    elif isinstance(text, str) and text.lower() in _ICMP_TYPES[family]:
        return _ICMP_TYPES[family][text.lower()]
    else:
        names = ", ".join(sorted(k for k in _ICMP_TYPES[family] if "-" in k)[:8])
        raise ValueError(f"unknown ICMP{'v6' if family == 6 else ''} type {text!r}; give a number 0-255 or a "
                         f"name ({names}, …)")
    if not 0 <= v <= 255:
        raise ValueError(f"ICMP type {v} is not 0-255")
    return v


@dataclass(frozen=True)
class CasePacket:
    """A packet with everything the datapath looks at. sport/dport: ports of tcp/udp (0 for a
    fragment); icmp_id: the echo identifier (the datapath tracks echo by it)."""
    direction: str
    protocol: int
    src: str
    dst: str
    sport: int = 0
    dport: int = 0
    flags: str = ""
    icmp_type: int | None = None
    icmp_code: int = 0
    icmp_id: int = 1
    fragment: bool = False
    interface: str | None = None
    state: str = "new"
    hop_limit: int = 64              # IPv4 TTL / IPv6 hop limit
    about: str | None = None         # ICMP error: the embedded packet's source address (None: none embedded)

    @property
    def family(self) -> Literal[4, 6]:
        return 6 if ":" in self.src else 4           # src is a validated address (packet_from_mapping)

    @property
    def proto_name(self) -> str:
        return _PROTO_NAMES.get(self.protocol, str(self.protocol))

    @property
    def peer(self) -> str:
        return self.src if self.direction == "ingress" else self.dst

    @property
    def tcp_flag_bits(self) -> int:
        return sum(_FLAG_BITS[c] for c in self.flags)

    @property
    def icmp(self) -> tuple[int, int]:
        """(type, code); an echo request of the family when no type was given."""
        return (ECHO[self.family][0] if self.icmp_type is None else self.icmp_type), self.icmp_code

    def is_echo(self) -> bool:
        return self.protocol in (1, 58) and self.icmp[0] in ECHO[self.family]

    def is_error(self) -> bool:
        """An ICMP error, which embeds the packet it is about (bpf/parse.h is_icmp4_error / is_icmp6_error)."""
        if self.protocol not in (1, 58) or self.fragment:
            return False
        return self.icmp[0] in ICMP_ERRORS[self.family]

    def reference(self) -> Packet:
        """The reference model's view (enforcer/reference.py): ports only for tcp/udp; ICMP type, code,
        hop limit and embedded source when the model has them (policy v2)."""
        ported = self.protocol in (6, 17) and not self.fragment
        kw: dict[str, Any] = {}
        if self.protocol in (1, 58) and "icmp_type" in Packet.__dataclass_fields__:
            kw = {"icmp_type": self.icmp[0], "icmp_code": self.icmp_code, "hop_limit": self.hop_limit,
                  "inner_src": self.about}
        direction = cast(Direction, self.direction)  # ingress/egress (packet_from_mapping; Packet checks it)
        return Packet(direction, self.family, self.src, self.dst, self.protocol,
                      self.sport if ported else 0, self.dport if ported else 0, self.fragment, **kw)

    def text(self) -> str:
        def side(addr: str, port: int) -> str:
            a = f"[{addr}]" if ":" in addr and port else addr
            return f"{a}:{port}" if port and self.protocol in (6, 17) and not self.fragment else addr
        out = f"{self.direction} {self.proto_name} {side(self.src, self.sport)} -> {side(self.dst, self.dport)}"
        if self.protocol == 6 and self.flags:
            out += f" flags {self.flags}"
        if self.protocol in (1, 58):
            t, c = self.icmp
            out += f" type {t}" + (f" code {c}" if c else "") + (f" id {self.icmp_id}" if self.is_echo() else "")
        if self.hop_limit != 64:
            out += f" ttl {self.hop_limit}"
        if self.about:
            out += f" about {self.about}"
        if self.fragment:
            out += " frag"
        if self.interface:
            out += f" on {self.interface}"
        if self.state != "new":
            out += f" state {self.state}"
        return out

    def opener(self) -> tuple[CasePacket, str] | None:
        """The packet that opened this packet's connection, and how it relates ("established": same
        tuple and direction; "reply": reversed, other direction); None for state new."""
        if self.state == "new":
            return None
        opens = {"flags": "S" if self.protocol == 6 else "", "state": "new", "icmp_code": 0,
                 "icmp_type": ECHO[self.family][0] if self.protocol in (1, 58) else None}
        if self.state == "established":
            return self._with(opens), "same"
        opens.update(direction="egress" if self.direction == "ingress" else "ingress", src=self.dst, dst=self.src,
                     sport=self.dport, dport=self.sport)
        return self._with(opens), "reversed"

    def _with(self, changes: dict[str, Any]) -> CasePacket:
        """A copy with `changes` (dataclasses.replace without its per-call field walk: `test` makes one
        opener per case with a state; the fields are already validated)."""
        new = object.__new__(CasePacket)
        d = new.__dict__
        d.update(self.__dict__)
        d.update(changes)
        return new


def _split_addr(text: str) -> tuple[str | None, int | None]:
    """'10.0.0.1:22' | '10.0.0.1' | '[2001:db8::1]:22' | '2001:db8::1' | ':22' -> (addr or None, port or None)."""
    if text.startswith("["):
        addr, _, rest = text[1:].partition("]")
        if not rest:
            return addr, None
        if not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}; write [IPv6]:PORT")
        return addr, _port(rest[1:])
    if text.startswith(":") and text[1:].isdigit():
        return None, _port(text[1:])
    if text.count(":") == 1:
        a, p = text.split(":")
        return a, _port(p)
    return text, None


def _port(v: Any) -> int:
    return _number(v, "port", 1, 65535)


def _proto(v: Any) -> int:
    if isinstance(v, int) and not isinstance(v, bool):
        n = v
    elif isinstance(v, str) and v.isdigit():
        n = int(v)
    elif isinstance(v, str) and v.lower() in PROTOCOLS:
        return PROTOCOLS[v.lower()]
    else:
        raise ValueError(f"unknown protocol {v!r}; use tcp, udp, icmp, icmpv6, a name such as gre, or a number")
    if not 0 <= n <= 255:
        raise ValueError(f"protocol {n} is not 0-255")
    return n


def _number(v: Any, what: str, lo: int = 0, hi: int = 255) -> int:
    """An integer field in [lo, hi] (a port, a code, a TTL); ValueError naming the field."""
    try:
        n = int(v)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {v!r} is not a number") from None
    if not lo <= n <= hi:
        raise ValueError(f"{what} {n} is not {lo}-{hi}")
    return n


def _addr(v: Any, what: str) -> str:
    try:
        return str(ipaddress.ip_address(str(v)))
    except ValueError:
        raise ValueError(f"{what} {v!r} is not an IP address") from None


def packet_from_mapping(d: dict, local: dict[int, str] | None = None) -> CasePacket:
    """Build and check a packet from named fields (the YAML mapping form); ValueError says what is wrong."""
    local = local or DEFAULT_LOCAL
    known = {"direction", "protocol", "src", "dst", "sport", "dport", "flags", "type", "code", "id", "fragment",
             "interface", "state", "ttl", "about"}
    extra = sorted(set(d) - known)
    if extra:
        raise ValueError(f"unknown packet field(s) {', '.join(map(repr, extra))}; known: {', '.join(sorted(known))}")
    direction = d.get("direction")
    if direction not in ("ingress", "egress"):
        raise ValueError(f"direction must be ingress or egress, not {direction!r}")
    if "protocol" not in d:
        raise ValueError("protocol is missing (tcp, udp, icmp, icmpv6, a name or a number)")
    proto = _proto(d["protocol"])
    src = _addr(d["src"], "src") if d.get("src") is not None else None
    dst = _addr(d["dst"], "dst") if d.get("dst") is not None else None
    given = src if src is not None else dst
    if given is None:
        raise ValueError("give at least the peer's address (src for ingress, dst for egress)")
    fam = ipaddress.ip_address(given).version
    src, dst = src or local[fam], dst or local[fam]
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise ValueError(f"src {src} and dst {dst} are of different address families")
    frag = bool(d.get("fragment", False))
    sport = dport = 0
    flags = ""
    if proto in (6, 17) and not frag:
        if d.get("dport") is None:
            raise ValueError("tcp and udp packets need a destination port (dport, or ADDR:PORT)")
        dport = _port(d["dport"])
        sport = _port(d["sport"]) if d.get("sport") is not None else 40000
    elif d.get("sport") is not None or d.get("dport") is not None:
        raise ValueError("ports belong to tcp and udp packets (not to fragments or other protocols)")
    if proto == 6 and not frag:
        flags = str(d.get("flags", "S")).upper()
        bad = sorted(set(flags) - set(_FLAG_BITS))
        if bad or not flags:
            raise ValueError(f"TCP flags {d.get('flags')!r}: use letters of FSRPAUEC (e.g. S, SA, A, PA, R)")
    elif d.get("flags") is not None:
        raise ValueError("flags belong to tcp packets")
    itype, icode, iid = None, 0, 1
    if proto in (1, 58):
        if (proto == 1) != (fam == 4):
            raise ValueError(f"{'icmp' if proto == 1 else 'icmpv6'} over IPv{fam} is malformed; use "
                             f"{'icmpv6' if fam == 6 else 'icmp'}")
        if d.get("type") is not None:
            t = d["type"]
            if isinstance(t, str) and "/" in t:
                t, c = t.split("/", 1)
                d = {**d, "code": c}
            itype = icmp_type_number(t, fam)
        if d.get("code") is not None:
            icode = _number(d["code"], "ICMP code")
        if d.get("id") is not None:
            iid = int(d["id"])
            if not 0 <= iid <= 65535:
                raise ValueError(f"ICMP id {iid} is not 0-65535")
    elif any(d.get(k) is not None for k in ("type", "code", "id")):
        raise ValueError("type, code and id belong to icmp and icmpv6 packets")
    state = d.get("state", "new") or "new"
    if state not in STATES:
        raise ValueError(f"state must be one of {', '.join(STATES)}, not {state!r}")
    ttl = _number(d["ttl"], "ttl") if d.get("ttl") is not None else 64
    about = _addr(d["about"], "about") if d.get("about") is not None else None
    pkt = CasePacket(direction, proto, src, dst, sport, dport, flags, itype, icode, iid, frag,
                     str(d["interface"]) if d.get("interface") is not None else None, state, ttl, about)
    if about is not None:
        if not pkt.is_error():
            raise ValueError("about (the embedded packet's source) belongs to ICMP errors (icmp types "
                             f"{', '.join(map(str, ICMP_ERRORS[4]))}; icmpv6 types "
                             f"{', '.join(map(str, ICMP_ERRORS[6]))})")
        if ipaddress.ip_address(about).version != fam:
            raise ValueError(f"about {about} is not an IPv{fam} address")
    if state != "new":
        if frag:
            raise ValueError("a fragment has no connection state (state needs a whole tcp, udp or icmp echo packet)")
        if proto not in (6, 17) and not pkt.is_echo():
            raise ValueError("state applies to tcp, udp and icmp echo packets (the connections the datapath tracks)")
    return pkt


def parse_packet(text: str, local: dict[int, str] | None = None) -> CasePacket:
    """Parse the compact one-line form (module docstring); ValueError names what is wrong."""
    toks = ["->" if t == "to" else t for t in text.replace("->", " -> ").split()]
    if len(toks) < 3:
        raise ValueError(f"packet {text!r}: write DIRECTION PROTOCOL SRC -> DST (e.g. 'ingress tcp 10.1.2.3:5555 "
                         "-> 10.0.0.1:22')")
    d: dict[str, Any] = {"direction": toks[0]}
    i = 1
    if toks[i] == "proto" and i + 1 < len(toks):
        i += 1
    d["protocol"] = toks[i]
    i += 1
    src, sport = _split_addr(toks[i])
    i += 1
    dst = dport = None
    if i < len(toks) and toks[i] == "->":
        if i + 1 >= len(toks):
            raise ValueError(f"packet {text!r}: nothing after '->'")
        dst, dport = _split_addr(toks[i + 1])
        i += 2
    d.update(src=src, dst=dst, sport=sport, dport=dport)
    opts = {"flags": "flags", "type": "type", "code": "code", "id": "id", "on": "interface", "if": "interface",
            "iface": "interface", "state": "state", "ttl": "ttl", "hop-limit": "ttl", "about": "about"}
    while i < len(toks):
        t = toks[i]
        if t in ("frag", "fragment"):
            d["fragment"] = True
            i += 1
        elif t in opts and i + 1 < len(toks):
            d[opts[t]] = toks[i + 1]
            i += 2
        else:
            raise ValueError(f"packet {text!r}: unexpected {t!r}; options are flags F, type T, code C, id N, ttl N, "
                             "about ADDR, frag, on IF, state new|established|reply")
    try:
        return packet_from_mapping(d, local)
    except ValueError as e:
        raise ValueError(f"packet {text!r}: {e}") from None
