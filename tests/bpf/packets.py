"""Build wire frames (scapy) for a reference Packet, so the BPF programs and the Python reference
judge the very same packet."""
from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    ICMPv6EchoReply,
    ICMPv6EchoRequest,
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


def l4(pkt: Packet, flags: str = "A", icmp_type: int | None = None):
    if pkt.protocol == 6:
        return TCP(sport=pkt.sport, dport=pkt.dport, flags=flags)
    if pkt.protocol == 17:
        return UDP(sport=pkt.sport, dport=pkt.dport)
    if pkt.protocol == 1:
        return ICMP(type=8 if icmp_type is None else icmp_type, id=pkt.sport or 1)
    if pkt.protocol == 58:
        return ICMPv6EchoRequest(id=pkt.sport or 1) if icmp_type in (None, 128) else ICMPv6EchoReply(id=pkt.sport or 1)
    return Raw(b"\0" * 8)


def frame(pkt: Packet, flags: str = "A", ext: tuple[str, ...] = (), vlan: bool = False,
          icmp_type: int | None = None) -> bytes:
    """Ethernet frame for `pkt`. ext: IPv6 extension headers to insert (hbh, rt, dst, frag)."""
    if pkt.family == 4:
        ip = IP(src=pkt.src, dst=pkt.dst, proto=pkt.protocol, flags=0, frag=100 if pkt.fragment else 0)
        body = Raw(b"\0" * 16) if pkt.fragment else l4(pkt, flags, icmp_type)
        p = ip / body
    else:
        p = IPv6(src=pkt.src, dst=pkt.dst)
        for e in ext:
            p = p / {"hbh": IPv6ExtHdrHopByHop, "rt": IPv6ExtHdrRouting, "dst": IPv6ExtHdrDestOpt,
                     "frag": lambda: IPv6ExtHdrFragment(offset=0, m=1)}[e]()
        if pkt.fragment:
            p = p / IPv6ExtHdrFragment(offset=10, nh=pkt.protocol) / Raw(b"\0" * 16)
        else:
            p = p / l4(pkt, flags, icmp_type)
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
