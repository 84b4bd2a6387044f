"""Build wire frames (scapy) for a reference Packet, so the BPF programs and the Python reference
judge the very same packet."""
from __future__ import annotations

import struct

from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
    IPerror6,
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw, raw

from hostwall.enforcer.reference import Packet

ETH = dict(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def _icmp_any(pkt: Packet, t: int, code: int):
    """Any ICMP/ICMPv6 type and code: the 8-byte header (checksum 0: the datapath does not check it),
    then, for an error with inner_src, the embedded packet (IP header + UDP header) it reports."""
    body = struct.pack("!BBHHH", t, code, 0, pkt.sport or 1, 1)
    if pkt.inner_src is not None:
        inner = (IPerror(src=pkt.inner_src, dst=pkt.src) if pkt.family == 4 else IPerror6(src=pkt.inner_src, dst=pkt.src))
        body += raw(inner / UDPerror(sport=4000, dport=53))
    return Raw(body)


def l4(pkt: Packet, flags: str = "A", icmp_type: int | None = None):
    if pkt.protocol == 6:
        return TCP(sport=pkt.sport, dport=pkt.dport, flags=flags)
    if pkt.protocol == 17:
        return UDP(sport=pkt.sport, dport=pkt.dport)
    if pkt.protocol in (1, 58) and (pkt.icmp_type is not None or pkt.icmp_code or pkt.inner_src):
        t, code = pkt.icmp
        return _icmp_any(pkt, t if icmp_type is None else icmp_type, code)
    if pkt.protocol == 1:
        return ICMP(type=8 if icmp_type is None else icmp_type, id=pkt.sport or 1)
    if pkt.protocol == 58:
        return ICMPv6EchoRequest(id=pkt.sport or 1) if icmp_type in (None, 128) else ICMPv6EchoReply(id=pkt.sport or 1)
    return Raw(b"\0" * 8)


def frame(pkt: Packet, flags: str = "A", ext: tuple[str, ...] = (), vlan: bool = False,
          icmp_type: int | None = None) -> bytes:
    """Ethernet frame for `pkt`. ext: IPv6 extension headers to insert (hbh, rt, dst, frag)."""
    if pkt.family == 4:
        ip = IP(src=pkt.src, dst=pkt.dst, proto=pkt.protocol, flags=0, frag=100 if pkt.fragment else 0,
                ttl=pkt.hop_limit)
        body = Raw(b"\0" * 16) if pkt.fragment else l4(pkt, flags, icmp_type)
        p = ip / body
    else:
        p = IPv6(src=pkt.src, dst=pkt.dst, hlim=pkt.hop_limit)
        for e in ext:
            p = p / {"hbh": IPv6ExtHdrHopByHop, "rt": IPv6ExtHdrRouting, "dst": IPv6ExtHdrDestOpt,
                     "frag": lambda: IPv6ExtHdrFragment(offset=0, m=1)}[e]()
        if pkt.fragment:
            p = p / IPv6ExtHdrFragment(offset=10, nh=pkt.protocol) / Raw(b"\0" * 16)
        else:
            p = p / l4(pkt, flags, icmp_type)
            if isinstance(p.lastlayer(), Raw) and pkt.protocol == 58:
                p.lastlayer().underlayer.nh = 58          # a raw ICMPv6 message (scapy would write 59)
            if pkt.protocol not in (6, 17, 1, 58):
                p.lastlayer().underlayer.nh = pkt.protocol if p.lastlayer().underlayer else None
    eth = Ether(**ETH)
    if vlan:
        eth = eth / Dot1Q(vlan=7)
    f = raw(eth / p)
    if pkt.family == 6 and pkt.protocol not in (6, 17, 1, 58) and not pkt.fragment:
        f = _set_v6_last_nh(f, pkt.protocol, vlan, ext)
    return f


def _set_v6_last_nh(f: bytes, proto: int, vlan: bool, ext) -> bytes:
    """Scapy writes nh=59 (no next header) before Raw; point the last next-header at `proto`."""
    b = bytearray(f)
    off = 14 + (4 if vlan else 0)
    if not ext:
        b[off + 6] = proto
        return bytes(b)
    pos = off + 40
    nh_at = off + 6
    for _ in ext:
        nh_at = pos
        hdr_len = 8 if b[off + 6] == 44 and pos == off + 40 else (b[pos + 1] + 1) * 8
        pos += hdr_len
    b[nh_at] = proto
    return bytes(b)
