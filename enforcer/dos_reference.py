"""Pure-Python reference of the XDP DoS guards (bpf/hostwall.bpf.c: dos_check), integer for integer.

The datapath is tested against this model through BPF_PROG_TEST_RUN with an injected clock. It states
the semantics: operator bans; then, on an interface with a profile, the per-source guards in order
(SYN, UDP, ICMP, packets/s, bits/s: the first bucket that is empty names the reason), the global SYN
bucket, then per-port limits. A source over a limit for `ban_after` in a row (over-limit packets no
more than 1 s apart) is banned for `ban_duration`; bans expire by themselves.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

NS = 1_000_000_000
STREAK_GAP_NS = NS
U64 = (1 << 64) - 1


@dataclass
class ProfileParams:
    """The compiled form (compiler._dos_profile_record) of a DosProfile."""
    pps: int = 0
    burst: int = 0
    bps: int = 0
    bps_burst: int = 0
    syn_pps: int = 0
    syn_global_pps: int = 0
    udp_pps: int = 0
    icmp_pps: int = 0
    ban_after_ns: int = 0
    ban_ns: int = 0
    prefix_v4: int = 32
    prefix_v6: int = 64
    ports: list[tuple[int, int, int]] = field(default_factory=list)   # (port, ipproto, pps)

    @classmethod
    def from_record(cls, rec) -> ProfileParams:
        return cls(**{k: int(rec[k]) for k in ("pps", "burst", "bps", "bps_burst", "syn_pps", "syn_global_pps",
                                               "udp_pps", "icmp_pps", "ban_after_ns", "ban_ns", "prefix_v4",
                                               "prefix_v6")},
                   ports=[(int(p["port"]), int(p["proto"]), int(p["pps"])) for p in rec["ports"][: int(rec["nports"])]])


@dataclass
class Pkt:
    src: str
    proto: int                # 6, 17, 1, 58, ...
    syn: bool = False         # TCP SYN without ACK/RST
    dport: int = 0
    length: int = 64          # bytes on the wire


def _take(tok: int, rate: int, cap: int, dt: int, cost: int) -> tuple[int, bool]:
    t = (tok + rate * dt) & U64
    if t > cap or t < tok:
        t = cap
    if t < cost:
        return t, False
    return t - cost, True


def _bits_take(tok: int, bps: int, cap: int, dt: int, cost: int) -> tuple[int, bool]:
    dt = min(dt, 100_000_000)
    t = tok + (((bps << 20) // 1_000_000) * dt >> 20)
    t = min(t, cap)
    if t < cost:
        return t, False
    return t - cost, True


@dataclass
class _Src:
    last: int
    tok_pkt: int
    tok_bits: int
    tok_syn: int
    tok_udp: int
    tok_icmp: int
    streak_start: int = 0
    streak_last: int = 0
    banned_until: int = 0


class DosModel:
    def __init__(self, profile: ProfileParams | None, manual_bans: list[str] = ()):
        self.p = profile
        self.src: dict[tuple, _Src] = {}
        self.glob: dict[int, list[int]] = {}         # idx -> [tokens, last]
        self.manual = [ipaddress.ip_network(b) for b in manual_bans]

    def _key(self, src: str) -> tuple:
        a = ipaddress.ip_address(src)
        plen = self.p.prefix_v4 if a.version == 4 else self.p.prefix_v6
        return (a.version, ipaddress.ip_network(f"{a}/{plen}", strict=False).network_address, plen)

    def _global(self, idx: int, rate: int, now: int) -> bool:
        b = self.glob.setdefault(idx, [0, 0])
        dt = min((now - b[1]) & U64, NS)
        b[1] = now
        b[0], ok = _take(b[0], rate, rate * NS, dt, NS)
        return ok

    def check(self, pkt: Pkt, now: int) -> str | None:
        """The drop reason for `pkt` at monotonic time `now`, or None if admitted."""
        a = ipaddress.ip_address(pkt.src)
        if any(a in n for n in self.manual):
            return "banned"
        p = self.p
        if p is None:
            return None
        k = self._key(pkt.src)
        s = self.src.get(k)
        if s is None:
            s = self.src[k] = _Src(now, p.burst * NS, p.bps_burst * 1000, p.syn_pps * NS, p.udp_pps * NS, p.icmp_pps * NS)
        if s.banned_until:
            if s.banned_until > now:
                return "banned"
            s.banned_until = 0
            s.streak_start = 0
        dt = min((now - s.last) & U64, 2 * NS)
        s.last = now
        reason = None
        if pkt.proto == 6 and pkt.syn and p.syn_pps:
            s.tok_syn, ok = _take(s.tok_syn, p.syn_pps, p.syn_pps * NS, dt, NS)
            reason = None if ok else "syn_flood"
        elif pkt.proto == 17 and p.udp_pps:
            s.tok_udp, ok = _take(s.tok_udp, p.udp_pps, p.udp_pps * NS, dt, NS)
            reason = None if ok else "udp_flood"
        elif pkt.proto in (1, 58) and p.icmp_pps:
            s.tok_icmp, ok = _take(s.tok_icmp, p.icmp_pps, p.icmp_pps * NS, dt, NS)
            reason = None if ok else "icmp_flood"
        else:
            ok = True
        # the C code is an else-if chain: a guard that admitted the packet falls through to the next
        if reason is None and p.pps:
            s.tok_pkt, ok = _take(s.tok_pkt, p.pps, p.burst * NS, dt, NS)
            reason = None if ok else "rate_limit"
        if reason is None and p.bps:
            s.tok_bits, ok = _bits_take(s.tok_bits, p.bps, p.bps_burst * 1000, dt, pkt.length * 8000)
            reason = None if ok else "rate_limit"
        if reason:
            if not s.streak_start or now - s.streak_last > STREAK_GAP_NS:
                s.streak_start = now
            s.streak_last = now
            if p.ban_after_ns and now - s.streak_start >= p.ban_after_ns:
                s.banned_until = now + p.ban_ns
            return reason
        if pkt.proto == 6 and pkt.syn and p.syn_global_pps and not self._global(0, p.syn_global_pps, now):
            return "syn_flood"
        if pkt.proto in (6, 17):
            for i, (port, proto, pps) in enumerate(p.ports):
                if port == pkt.dport and proto == pkt.proto:
                    return None if self._global(1 + i, pps, now) else "port_limit"
        return None
