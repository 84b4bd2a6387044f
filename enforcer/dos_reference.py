"""Pure-Python reference of the XDP DoS guards (bpf/hostwall.bpf.c: dos_check), integer for integer.

The datapath is tested against this model through BPF_PROG_TEST_RUN with an injected clock. It states
the semantics: operator bans; then, on an interface with a profile, the per-source guards in order
(SYN, UDP, ICMP, packets/s, bits/s: the first bucket that is empty names the reason), the per-destination-port SYN stage (the SYN proxy's decision), the global SYN bucket, then per-port
limits. A source over a limit for `ban_after` in a row (over-limit packets no more than 1 s apart) is
banned for `ban_duration`; bans expire by themselves. A packet of a tracked connection that the source
guards spare (`Pkt.tracked`, bpf/dos.h dos_spares) passes its source's ban and empty buckets, taking
the tokens there are and extending no streak; the shared limits after them still apply. An ICMP error
quoting one (`Pkt.error`) is spared so only while the profile's one bucket for spared errors, all
sources together, has a token (`error_pps`); else it meets its source's limits as any packet
(docs/dos.md "Tracked connections").

The per-port SYN stage (bpf/dos.h syn_port_stage): a SYN takes a token of its port's bucket (all sources
together). Where the profile's SYN proxy covers the port and answers (`on`, or `auto` while the port is
hot: over its rate within the last `proxy_quiet`), the SYN is to be answered with a cookie ("answer",
in `DosModel.proxy`) and skips the global SYN bucket; once per REFRESH_NS per family one such SYN goes
to the host's stack instead. Else a SYN over the port's rate is dropped (syn_flood). An ACK to a covered
port is marked "check" (proxy answering: its cookie must be valid) or "learn" (auto, idle). Table
pressure (conntrack evictions) is not modelled: tests/bpf/test_syn_proxy.py checks it on its own.
"""
from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

NS = 1_000_000_000
STREAK_GAP_NS = NS
ERR_PPS = 100                   # HW_DOS_ERR_PPS: spared errors/s of a profile without ICMP or packet rates
GLOBAL_ERR = 15                 # HW_DOS_GLOBAL_ERR: its slot in the profile's shared buckets
REFRESH_NS = 30 * NS            # HW_SYN_REFRESH_NS
U64 = (1 << 64) - 1
PROXY_OFF, PROXY_ON, PROXY_AUTO = 0, 1, 2


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
    syn_port_pps: int = 0
    proxy: int = PROXY_OFF
    proxy_quiet_ns: int = 0
    proxy_ranges: list[tuple[int, int]] = field(default_factory=list)  # empty: every port

    @classmethod
    def from_record(cls, rec) -> ProfileParams:
        return cls(**{k: int(rec[k]) for k in ("pps", "burst", "bps", "bps_burst", "syn_pps", "syn_global_pps",
                                               "udp_pps", "icmp_pps", "ban_after_ns", "ban_ns", "prefix_v4",
                                               "prefix_v6", "syn_port_pps", "proxy", "proxy_quiet_ns")},
                   ports=[(int(p["port"]), int(p["proto"]), int(p["pps"])) for p in rec["ports"][: int(rec["nports"])]],
                   proxy_ranges=[(int(r["lo"]), int(r["hi"])) for r in rec["proxy_ranges"][: int(rec["nproxy_ranges"])]])


@dataclass
class Pkt:
    src: str
    proto: int                # 6, 17, 1, 58, ...
    syn: bool = False         # TCP SYN without ACK/RST; a TCP packet without it is a bare ACK
    dport: int = 0
    length: int = 64          # bytes on the wire
    tracked: bool = False     # its connection, or the one an ICMP error quotes, is spared (dos.h dos_spares)
    error: bool = False       # an ICMP error (tracked: about such a connection): spared within the shared bucket


def error_pps(p: ProfileParams) -> int:
    """bpf/dos.h dos_err_pps: the rate of the profile's shared bucket for spared ICMP errors, one
    source's ICMP share (icmp_pps, else pps)."""
    return p.icmp_pps or p.pps or ERR_PPS


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


@dataclass
class _Port:
    tokens: int = 0
    last: int = 0
    hot_until: int = 0
    hot_since: int = 0
    refresh: list[int] = field(default_factory=lambda: [0, 0])


class DosModel:
    def __init__(self, profile: ProfileParams | None, manual_bans: Iterable[str] = ()):
        self.p = profile
        self.src: dict[tuple, _Src] = {}
        self.glob: dict[int, list[int]] = {}         # idx -> [tokens, last]
        self.ports: dict[int, _Port] = {}            # per destination port (hw_syn_ports)
        self.manual = [ipaddress.ip_network(b) for b in manual_bans]
        self.proxy: str | None = None                # the SYN proxy's decision for the last packet
        self.spared: str | None = None               # the source guard's reason the last packet was spared

    @staticmethod
    def _covers(p: ProfileParams, port: int) -> bool:
        return not p.proxy_ranges or any(lo <= port <= hi for lo, hi in p.proxy_ranges)

    def _syn_port(self, p: ProfileParams, pkt: Pkt, now: int) -> str | None:
        """bpf/dos.h syn_port_stage for a TCP packet."""
        covered = p.proxy != PROXY_OFF and self._covers(p, pkt.dport)
        st = self.ports.setdefault(pkt.dport, _Port())
        if not pkt.syn:
            if covered:
                self.proxy = "check" if p.proxy == PROXY_ON or st.hot_until > now else "learn"
            return None
        if not covered and not p.syn_port_pps:
            return None
        over = False
        if p.syn_port_pps:
            dt = min(max(now - st.last, 0), NS)
            st.last = now
            st.tokens, ok = _take(st.tokens, p.syn_port_pps, p.syn_port_pps * NS, dt, NS)
            over = not ok
        if covered:
            on = p.proxy == PROXY_ON
            if p.proxy == PROXY_AUTO:
                if over:
                    if st.hot_until <= now:
                        st.hot_since = now
                    st.hot_until = now + p.proxy_quiet_ns
                on = st.hot_until > now
            if on:
                fam = ":" in pkt.src
                if now - st.refresh[fam] >= REFRESH_NS:
                    st.refresh[fam] = now        # this SYN goes to the host's stack
                    return None
                self.proxy = "answer"
                return None
        return "syn_flood" if over else None

    @staticmethod
    def _key(p: ProfileParams, src: str) -> tuple:
        a = ipaddress.ip_address(src)
        plen = p.prefix_v4 if a.version == 4 else p.prefix_v6
        return (a.version, ipaddress.ip_network(f"{a}/{plen}", strict=False).network_address, plen)

    def _global(self, idx: int, rate: int, now: int) -> bool:
        b = self.glob.setdefault(idx, [0, 0])
        dt = min((now - b[1]) & U64, NS)
        b[1] = now
        b[0], ok = _take(b[0], rate, rate * NS, dt, NS)
        return ok

    def check(self, pkt: Pkt, now: int) -> str | None:
        """The drop reason for `pkt` at monotonic time `now`, or None if admitted (then `self.proxy`
        says what the SYN proxy does with it, or None, and `self.spared` the source guard's reason its
        tracked connection spared it, or None)."""
        self.proxy = self.spared = None
        a = ipaddress.ip_address(pkt.src)
        if any(a in n for n in self.manual):
            return "banned"
        p = self.p
        if p is None:
            return None
        k = self._key(p, pkt.src)
        s = self.src.get(k)
        if s is None:
            s = self.src[k] = _Src(now, p.burst * NS, p.bps_burst * 1000, p.syn_pps * NS, p.udp_pps * NS, p.icmp_pps * NS)
        reason = self._buckets(p, s, pkt, now)
        if reason and pkt.tracked and (not pkt.error or self._global(GLOBAL_ERR, error_pps(p), now)):
            self.spared = reason
        elif reason:
            if reason != "banned":
                self._streak(p, s, now)
            return reason
        return self._shared(p, pkt, now)

    @staticmethod
    def _streak(p: ProfileParams, s: _Src, now: int) -> None:
        if not s.streak_start or now - s.streak_last > STREAK_GAP_NS:
            s.streak_start = now
        s.streak_last = now
        if p.ban_after_ns and now - s.streak_start >= p.ban_after_ns:
            s.banned_until = now + p.ban_ns

    @staticmethod
    def _buckets(p: ProfileParams, s: _Src, pkt: Pkt, now: int) -> str | None:
        """bpf/dos.h dos_buckets: the source's ban, then its buckets."""
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
        # the C returns at the first empty bucket: a guard that admitted the packet falls through to the next
        if reason is None and p.pps:
            s.tok_pkt, ok = _take(s.tok_pkt, p.pps, p.burst * NS, dt, NS)
            reason = None if ok else "rate_limit"
        if reason is None and p.bps:
            s.tok_bits, ok = _bits_take(s.tok_bits, p.bps, p.bps_burst * 1000, dt, pkt.length * 8000)
            reason = None if ok else "rate_limit"
        return reason

    def _shared(self, p: ProfileParams, pkt: Pkt, now: int) -> str | None:
        """The limits all sources share: per-port SYN stage, global SYN bucket, per-port limits."""
        if pkt.proto == 6 and (r := self._syn_port(p, pkt, now)):
            return r
        if pkt.proto == 6 and pkt.syn and p.syn_global_pps and self.proxy != "answer" and \
                not self._global(0, p.syn_global_pps, now):
            return "syn_flood"
        if pkt.proto in (6, 17):
            for i, (port, proto, pps) in enumerate(p.ports):
                if port == pkt.dport and proto == pkt.proto:
                    return None if self._global(1 + i, pps, now) else "port_limit"
        return None
