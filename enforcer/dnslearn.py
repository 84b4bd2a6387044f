"""From an answer for a listed name to dynamic-set entries, before the answer is relayed
(docs/datapath.md "FQDN rules", docs/policy.md "FQDN rules").

For the asked name: its addresses (after the CNAME chain) are kept for clamp(TTL, min_ttl, max_ttl) — in
the learnt-name maps (the source every set is derived from) and in each live set whose patterns match the
name. A name holds at most max_ips_per_name unexpired addresses: an answer's further new addresses are
not learnt (counted as overflow) until some expire; addresses it already holds are renewed. An address
never loses time: renewals keep the later expiry. Expiry only stops new connections (tracked ones pass
by conntrack).

Order against a concurrent policy swap (enforcer/fqdnsets.py): the name is written first, then the
live sets are read from the config (one stat(); re-read and entered again if it changed meanwhile).
Cost per answer: ~2 + (addresses x matching sets) map updates (~3 µs each); a renewal that changes
nothing costs no syscall for the sets (this process remembers what it entered).
"""
from __future__ import annotations

from dataclasses import dataclass

from hostwall.bpf.fqdn import FqdnMaps, now_ns

from . import fqdnsets

__all__ = ["Learner", "Learnt"]


@dataclass
class Learnt:
    entered: int = 0            # addresses entered or renewed in the name's record
    set_entries: int = 0        # (set, address) entries written
    overflow: int = 0           # new addresses over max_ips_per_name
    full: int = 0               # refused by a full name map, or evicted another from a full set bucket


class Learner:
    """One per proxy; not thread-safe (the proxy's loop owns it)."""

    def __init__(self, fm: FqdnMaps, pin_dir: str):
        self.fm = fm
        self.pin_dir = pin_dir
        self.cfg = fqdnsets.FqdnConfig()
        self._sig: tuple | None = ()
        self.names: dict[str, dict[str, int]] = {}      # name -> {address: expires_ns}
        self.mirror: dict[tuple[int, str], int] = {}    # (set, address) -> expiry this process knows is there
        self.refresh()
        now = now_ns()
        for e in fm.learnt(now):
            self.names.setdefault(e.name, {})[e.ip] = e.expires_ns

    def refresh(self) -> bool:
        """Re-read the live sets if the config changed (one stat()). True when it did."""
        sig = fqdnsets.config_sig(self.pin_dir)
        if sig == self._sig:
            return False
        self._sig = sig
        self.cfg = fqdnsets.FqdnConfig.read(self.pin_dir) or fqdnsets.FqdnConfig()
        self.mirror.clear()
        return True

    def listed(self, name: str) -> set[int]:
        """Sets whose patterns match `name` (empty: no rule lists it)."""
        self.refresh()
        return self.cfg.listed(name)

    def learn(self, name: str, ips: list[str], ttl: int, now: int | None = None) -> Learnt:
        out = Learnt()
        dns = self.cfg.dns
        if dns is None or not ips:
            return out
        now = now_ns() if now is None else now
        life = min(max(float(ttl), dns.min_ttl_s), dns.max_ttl_s)
        exp = now + int(life * 1e9)
        cur = {ip: e for ip, e in self.names.get(name, {}).items() if e > now}
        keep: list[str] = []
        for ip in dict.fromkeys(ips):
            if ip in cur or len(cur) < dns.max_ips_per_name:
                cur[ip] = max(cur.get(ip, 0), exp)
                keep.append(ip)
            else:
                out.overflow += 1
        self.names[name] = cur
        if not keep:
            return out
        if not self.fm.name_put(name, now):
            out.full += 1
        for ip in keep:
            if self.fm.name_ip_put(name, ip, cur[ip], now):
                out.entered += 1
            else:
                out.full += 1
        evicted = self.fm.evicted
        with self.fm.writing():
            self._enter(self.cfg.listed(name), keep, cur, now, out)
            if self.refresh():                          # a swap published new sets meanwhile
                self._enter(self.cfg.listed(name), keep, cur, now, out)
        out.full += self.fm.evicted - evicted
        return out

    def _enter(self, sets: set[int], ips: list[str], exp: dict[str, int], now: int, out: Learnt) -> None:
        for sid in sets:
            for ip in ips:
                want = exp[ip]
                have = self.mirror.get((sid, ip))
                if have is None:
                    got = self.fm.set_get(sid, ip)
                    have = got[0] if got else 0
                if have >= want:
                    self.mirror[(sid, ip)] = have
                    continue
                if self.fm.set_put(sid, ip, want, now):
                    self.mirror[(sid, ip)] = want
                    out.set_entries += 1
                else:
                    out.full += 1

    def sweep(self, now: int | None = None) -> dict[str, int]:
        """Free the room of expired entries (the datapath ignores them already)."""
        now = now_ns() if now is None else now
        gone = self.fm.sweep(now)
        for name in list(self.names):
            live = {ip: e for ip, e in self.names[name].items() if e > now}
            if live:
                self.names[name] = live
            else:
                del self.names[name]
        self.mirror = {k: e for k, e in self.mirror.items() if e > now}
        return gone
