"""Wire bytes of a CasePacket: the IP packet (for raw sockets) and the Ethernet frame (for test-run).

Correct lengths and checksums (IPv4 header, TCP/UDP/ICMPv6 pseudo-header sums), so the same bytes can
be handed to BPF_PROG_TEST_RUN or sent through a raw socket into a lab namespace, where netfilter's
conntrack checks checksums. A non-first fragment carries 16 bytes of payload at offset 800 and no
L4 header; ICMP echo carries the packet's id; an ICMP error with `about` embeds an IP header (source
`about`, destination the error's sender, UDP) and the first 8 bytes of a UDP header, as RFC 792 and
RFC 4443 §2.4 have it, after an MTU of 1280; the TTL / hop limit is the packet's. Pure Python (struct), no scapy at run time; the unit
tests compare with scapy. Cost: a few µs per packet.
"""
from __future__ import annotations

import socket
import struct

from .packet import CasePacket

__all__ = ["ip_packet", "frame", "ETH_SRC", "ETH_DST"]

ETH_SRC = bytes.fromhex("020000000001")
ETH_DST = bytes.fromhex("020000000002")
_PAYLOAD = b"hostwall-probe!!"          # 16 bytes
# Every TCP segment's sequence number; an ACK acknowledges the end of a bare SYN with the payload
# (analysis/ctmodel.py: a case's SYN-ACK answers its SYN opener, docs/datapath.md "Sequence checks").
_SEQ = 1000
_SYN_END = _SEQ + len(_PAYLOAD) + 1


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071) of `data`, odd lengths padded with a zero byte."""
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _l4(p: CasePacket, src: bytes, dst: bytes) -> bytes:
    """L4 header + payload with its checksum over the family's pseudo-header."""
    v6 = len(src) == 16
    if p.protocol == 6:
        hdr = struct.pack("!HHIIBBHHH", p.sport, p.dport, _SEQ, _SYN_END if "A" in p.flags else 0, 5 << 4,
                          p.tcp_flag_bits, 65535, 0, 0)
        body = hdr + _PAYLOAD
    elif p.protocol == 17:
        body = struct.pack("!HHHH", p.sport, p.dport, 8 + len(_PAYLOAD), 0) + _PAYLOAD
    elif p.protocol in (1, 58):
        t, c = p.icmp
        if p.about and p.is_error():          # the rest of the header: unused, or the MTU of a path-MTU error
            body = struct.pack("!BBHI", t, c, 0, 1280) + _embedded(p, dst_of_inner=src, v6=v6)
        else:
            body = struct.pack("!BBHHH", t, c, 0, p.icmp_id if p.is_echo() else 0, 1) + _PAYLOAD
    else:
        return _PAYLOAD
    if p.protocol == 1:
        ck = inet_checksum(body)
        return body[:2] + struct.pack("!H", ck) + body[4:]
    pseudo = (src + dst + struct.pack("!IxxxB", len(body), p.protocol) if v6
              else src + dst + struct.pack("!xBH", p.protocol, len(body)))
    ck = inet_checksum(pseudo + body)
    if p.protocol == 17 and ck == 0:
        ck = 0xFFFF
    off = {6: 16, 17: 6, 58: 2}[p.protocol]
    return body[:off] + struct.pack("!H", ck) + body[off + 2:]


def _embedded(p: CasePacket, dst_of_inner: bytes, v6: bool) -> bytes:
    """The packet an ICMP error is about: its IP header (from `p.about` to the error's sender) and the
    first 8 bytes of its UDP datagram (ports 40000 → 53)."""
    assert p.about is not None                  # the caller checks it
    src = socket.inet_pton(socket.AF_INET6 if v6 else socket.AF_INET, p.about)
    udp = struct.pack("!HHHH", 40000, 53, 8 + len(_PAYLOAD), 0)
    if v6:
        return struct.pack("!IHBB16s16s", 6 << 28, len(udp) + len(_PAYLOAD), 17, 64, src, dst_of_inner) + udp
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp) + len(_PAYLOAD), 1, 0, 64, 17, 0, src, dst_of_inner)
    return hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:] + udp


def ip_packet(p: CasePacket, ident: int = 1) -> bytes:
    """The IPv4 or IPv6 packet (no link layer)."""
    fam = p.family
    ttl = p.hop_limit
    src = socket.inet_pton(socket.AF_INET if fam == 4 else socket.AF_INET6, p.src)
    dst = socket.inet_pton(socket.AF_INET if fam == 4 else socket.AF_INET6, p.dst)
    if fam == 4:
        body = _PAYLOAD if p.fragment else _l4(p, src, dst)
        frag = 100 if p.fragment else 0          # offset in 8-byte units
        hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), ident & 0xFFFF, frag, ttl, p.protocol, 0, src, dst)
        hdr = hdr[:10] + struct.pack("!H", inet_checksum(hdr)) + hdr[12:]
        return hdr + body
    if p.fragment:
        body = struct.pack("!BBHI", p.protocol, 0, 100 << 3, ident) + _PAYLOAD
        nh = 44
    else:
        body = _l4(p, src, dst)
        nh = p.protocol
    return struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, ttl, src, dst) + body


def frame(p: CasePacket, ident: int = 1) -> bytes:
    """Ethernet frame around ip_packet (fixed locally administered MACs)."""
    return ETH_DST + ETH_SRC + struct.pack("!H", 0x0800 if p.family == 4 else 0x86DD) + ip_packet(p, ident)
