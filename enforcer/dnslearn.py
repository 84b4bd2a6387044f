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
Cost per answer: ~2 + (addresses x matching sets) map updates (~3 µs each); a renewal that would extend
an expiry by less than min(RENEW_SLACK_NS, a quarter of the clamped TTL) costs no syscall (this process
remembers what it wrote), so a name asked again and again writes at most about once a second, and an
address is always held for at least three quarters of its TTL after any relayed answer that named it
(after a cached one, for at least that slack: enforcer/dnscache.py). `listed()` re-reads the config at most
every LISTED_RECHECK_S; learn() always re-checks it after writing (the order above).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from hostwall.bpf.fqdn import FqdnMaps, now_ns
from hostwall.bpf.state import fqdn_config_path

from . import fqdnsets

__all__ = ["Learner", "Learnt", "RENEW_SLACK_NS"]

RENEW_SLACK_NS = 1_000_000_000          # renewals that gain less than this (or a quarter of the TTL) are not written
LISTED_RECHECK_S = 0.1


@dataclass
class Learnt:
    entered: int = 0            # addresses entered or renewed in the name's record
    set_entries: int = 0        # (set, address) entries written
    overflow: int = 0           # new addresses over max_ips_per_name
    full: int = 0               # refused by a full name map, or evicted another from a full set bucket
    held_ns: int = 0            # every address of the answer is in the name's record and in each live set
                                # listing the name until at least then (as this process wrote it; 0: not)
    slack_ns: int = 0           # what a skipped renewal may leave short: min(RENEW_SLACK_NS, life / 4)


class Learner:
    """One per proxy; not thread-safe (the proxy's loop owns it)."""

    def __init__(self, fm: FqdnMaps, pin_dir: str):
        self.fm = fm
        self.pin_dir = pin_dir
        self.path = fqdn_config_path(pin_dir)
        self.cfg = fqdnsets.FqdnConfig()
        self._sig: tuple | None = ()
        self.generation = 0                             # bumped whenever the config changes (cache keys)
        self._checked = 0.0
        self.names: dict[str, dict[str, int]] = {}      # name -> {address: expires_ns}
        self.mirror: dict[tuple[int, str], int] = {}    # (set, address) -> expiry this process knows is there
        self.refresh()
        now = now_ns()
        for e in fm.learnt(now):
            self.names.setdefault(e.name, {})[e.ip] = e.expires_ns

    def refresh(self) -> bool:
        """Re-read the live sets if the config changed (one stat()). True when it did."""
        self._checked = time.monotonic()
        sig = fqdnsets.config_sig(self.pin_dir, self.path)
        if sig == self._sig:
            return False
        self._sig = sig
        self.generation += 1
        self.cfg = fqdnsets.FqdnConfig.read(self.pin_dir) or fqdnsets.FqdnConfig()
        self.mirror.clear()
        return True

    def current(self) -> int:
        """The config's generation, re-checked at most every LISTED_RECHECK_S."""
        if time.monotonic() - self._checked >= LISTED_RECHECK_S:
            self.refresh()
        return self.generation

    def listed(self, name: str) -> set[int]:
        """Sets whose patterns match `name` (empty: no rule lists it); the config as of at most
        LISTED_RECHECK_S ago (learn() checks it afresh)."""
        self.current()
        return self.cfg.listed(name)

    def learn(self, name: str, ips: list[str], ttl: int, now: int | None = None) -> Learnt:
        out = Learnt()
        dns = self.cfg.dns
        if dns is None or not ips:
            return out
        now = now_ns() if now is None else now
        life = int(min(max(float(ttl), dns.min_ttl_s), dns.max_ttl_s) * 1e9)
        exp = now + life
        slack = out.slack_ns = min(RENEW_SLACK_NS, life // 4)   # what a skipped renewal may leave short
        prev = self.names.get(name, {})
        cur = {ip: e for ip, e in prev.items() if e > now}   # as written to the maps
        keep: list[str] = []
        write: list[str] = []
        for ip in dict.fromkeys(ips):
            if ip in cur or len(cur) < dns.max_ips_per_name:
                if exp > cur.get(ip, 0) + slack:
                    write.append(ip)
                    cur[ip] = exp
                keep.append(ip)
            else:
                out.overflow += 1
        self.names[name] = cur
        out.entered += len(keep)
        if not write:                                   # every address held for at least as long already
            self.refresh()
            if not self._missing(name, keep):
                out.held_ns = self._held(name, keep, cur)
                return out
        if not self.fm.name_put(name, now):
            out.full += 1
        refused = [ip for ip in write if not self.fm.name_ip_put(name, ip, cur[ip], now)]
        out.full += len(refused)
        evicted = self.fm.evicted
        with self.fm.writing():
            self._enter(self.cfg.listed(name), keep, cur, now, slack, out)
            if self.refresh():                          # a swap published new sets meanwhile
                self._enter(self.cfg.listed(name), keep, cur, now, slack, out)
        out.full += self.fm.evicted - evicted
        out.held_ns = self._held(name, keep, cur)
        if refused:                                     # not in the record: the next answer writes them again
            out.held_ns = 0
            for ip in refused:                          # cur is self.names[name]
                if prev.get(ip, 0) > now:
                    cur[ip] = prev[ip]                  # the record keeps its earlier expiry
                else:
                    del cur[ip]
        return out

    def _held(self, name: str, ips: list[str], exp: dict[str, int]) -> int:
        """Until when every one of `ips` is in the name's record and in every live set that lists `name`
        (what this process wrote or read there; 0 when it does not know of one)."""
        held = min((exp[ip] for ip in ips), default=0)
        for sid in self.cfg.listed(name):
            for ip in ips:
                held = min(held, self.mirror.get((sid, ip), 0))
        return held

    def _missing(self, name: str, ips: list[str]) -> bool:
        """Does a live set that lists `name` lack one of `ips` as far as this process knows (a set a swap
        just published)?"""
        return any((sid, ip) not in self.mirror for sid in self.cfg.listed(name) for ip in ips)

    def _enter(self, sets: set[int], ips: list[str], exp: dict[str, int], now: int, slack: int, out: Learnt) -> None:
        for sid in sets:
            for ip in ips:
                want = exp[ip]
                have = self.mirror.get((sid, ip))
                if have is None:
                    got = self.fm.set_get(sid, ip)
                    have = got[0] if got else 0
                if have + slack >= want:
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
