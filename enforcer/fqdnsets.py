"""The dynamic sets of FQDN rules across policy swaps and restarts (docs/datapath.md "FQDN rules").

A set is named by an fqdns list (its sorted patterns) and gets a stable id: a swap that keeps a list
keeps its id and so every learnt entry, untouched. A swap that brings a new list fills its set from the
names the proxy learnt (hw_dns_names / hw_dns_name_ips, pinned) *before* the switch, and empties the sets
it retires only after the switch and one RCU grace period, so every packet sees wholly the old or wholly
the new policy's sets.

The running proxy (enforcer/dnsproxy.py, in the `run` process) and a swap (any process: `apply`, SIGHUP,
`run` starting) both write the sets, without a lock, in this order:

    swap:  publish the config with old + new sets  →  read the learnt names  →  fill the new sets  →  switch
    proxy: write the learnt name + addresses       →  read the config (re-read if it changed meanwhile)
           →  enter the addresses into every set whose patterns match

If the proxy's name write comes before the swap reads the names, the swap fills it; otherwise the
swap's publication came first and the proxy sees the new sets. Either way no learnt address misses a
new set. The config is a small JSON file beside the instance state (atomic rename); readers compare
its (inode, mtime, size) with one stat() per answer.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hostwall.bpf.fqdn import FqdnMaps, now_ns
from hostwall.bpf.state import fqdn_config_path
from hostwall.dnsnames import PatternIndex, matches

from .dnspolicy import DnsConf

__all__ = ["FqdnConfig", "allocate_sets", "publish", "fill_sets", "set_key", "config_sig", "remove", "status",
           "snapshot", "restore"]


def set_key(patterns: tuple[str, ...]) -> str:
    """The state file's key of an fqdns list (JSON keys are strings)."""
    return "\n".join(patterns)


def allocate_sets(current: dict[str, int], lists: list[tuple[str, ...]]) -> tuple[dict[str, int], list[int]]:
    """Set ids for the fqdns lists of a new policy: a list that stays keeps its id; a new list gets the
    lowest id (from 1) that neither the new nor the current policy uses (the current policy stays live
    until the switch, so an id is reused only one swap after it was retired). Returns (list key -> id,
    ids newly handed out)."""
    keys = [set_key(lst) for lst in lists]
    keep = {k: current[k] for k in keys if k in current}
    busy = set(current.values())
    fresh = []
    nxt = 1
    for k in keys:
        if k in keep:
            continue
        while nxt in busy or nxt in keep.values():
            nxt += 1
        keep[k] = nxt
        fresh.append(nxt)
        nxt += 1
    return keep, fresh


@dataclass
class FqdnConfig:
    """What the proxy needs from the active policy: the live sets (id -> patterns) and the dns section.
    `index` answers "which sets list this name" in O(1)."""
    sets: dict[int, tuple[str, ...]] = field(default_factory=dict)
    dns: DnsConf | None = None
    revision: str = ""
    index: PatternIndex = field(default_factory=PatternIndex)

    def __post_init__(self) -> None:
        self.index = PatternIndex((p, sid) for sid, pats in self.sets.items() for p in pats)

    def listed(self, name: str) -> set[int]:
        return self.index.lookup(name)

    @classmethod
    def read(cls, pin_dir: str) -> FqdnConfig | None:
        try:
            d = json.loads(fqdn_config_path(pin_dir).read_text())
        except (OSError, ValueError):
            return None
        return cls(sets={int(k): tuple(v) for k, v in d.get("sets", {}).items()},
                   dns=DnsConf.from_dict(d["dns"]) if d.get("dns") else None, revision=d.get("revision", ""))


def publish(pin_dir: str, sets: dict[int, tuple[str, ...]], dns: DnsConf | None, revision: str) -> None:
    """Write the config the proxy follows (atomic: tmp + rename)."""
    p = fqdn_config_path(pin_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"revision": revision, "sets": {str(k): list(v) for k, v in sorted(sets.items())},
                               "dns": dns.as_dict() if dns else None}, indent=1))
    os.replace(tmp, p)


def snapshot(pin_dir: str) -> bytes | None:
    """The config file's bytes (None: there is none), for `restore` after a start that failed."""
    try:
        return fqdn_config_path(pin_dir).read_bytes()
    except FileNotFoundError:
        return None


def restore(pin_dir: str, saved: bytes | None) -> None:
    """Put the config back as `snapshot` read it (atomic), or remove it if there was none."""
    p = fqdn_config_path(pin_dir)
    if saved is None:
        p.unlink(missing_ok=True)
        return
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_bytes(saved)
    os.replace(tmp, p)


def fill_sets(fm: FqdnMaps, sets: dict[int, tuple[str, ...]], now: int | None = None) -> dict[str, int]:
    """Enter every unexpired learnt address into each of `sets` whose patterns match its name, with the
    latest expiry over those names. Returns {"entered": n, "full": refused by a full map}.
    Cost: one dump of the learnt names, one map update per (set, address)."""
    now = now_ns() if now is None else now
    best: dict[tuple[int, str], tuple[int, int]] = {}
    if not sets:
        return {"entered": 0, "full": 0}
    for e in fm.learnt(now):
        for sid, pats in sets.items():
            if any(matches(e.name, p) for p in pats):
                cur = best.get((sid, e.ip))
                if cur is None or e.expires_ns > cur[0]:
                    best[(sid, e.ip)] = (e.expires_ns, e.learnt_ns)
    out = {"entered": 0, "full": 0}
    for (sid, ip), (exp, learnt) in best.items():
        out["entered" if fm.set_put(sid, ip, exp, learnt) else "full"] += 1
    return out


def status(fm: FqdnMaps, pin_dir: str, rule_meta: dict, proxy_alive: bool, now: int | None = None,
           top_names: int = 1000) -> dict:
    """`status`'s fqdn section: the live sets (patterns, rules, unexpired addresses), the learnt names
    (unexpired addresses, expiry; the `top_names` most recently learnt), the proxy's settings and counters
    and the datapath's lookups. Cost: dumps of hw_fqdn and the learnt names (O(entries))."""
    now = now_ns() if now is None else now
    cfg = FqdnConfig.read(pin_dir) or FqdnConfig()
    live: dict[int, int] = {}
    expired = 0
    for sid, _, exp, _ in fm.set_entries():
        if exp > now:
            live[sid] = live.get(sid, 0) + 1
        else:
            expired += 1
    rules_of: dict[tuple[str, ...], list[str]] = {}
    for name, meta in rule_meta.items():
        if meta.get("fqdns") is not None:
            rules_of.setdefault(tuple(meta["fqdns"]), []).append(name)
    sets = [{"id": sid, "fqdns": list(pats), "rules": rules_of.get(pats, []), "addresses": live.get(sid, 0)}
            for sid, pats in sorted(cfg.sets.items())]
    by_name: dict[str, dict] = {}
    for e in fm.learnt(now):
        row = by_name.setdefault(e.name, {"name": e.name, "addresses": 0, "expires_in_s": 0.0, "learnt_s_ago": 1e18})
        row["addresses"] += 1
        row["expires_in_s"] = round(max(row["expires_in_s"], (e.expires_ns - now) / 1e9), 1)
        row["learnt_s_ago"] = round(min(row["learnt_s_ago"], (now - e.learnt_ns) / 1e9), 1)
        row["sets"] = sorted(cfg.listed(e.name))
    names = sorted(by_name.values(), key=lambda r: r["learnt_s_ago"])[:top_names]
    return {"sets": sets, "names": names, "names_total": len(by_name), "expired_entries": expired,
            "proxy": {"running": proxy_alive, "dns": cfg.dns.as_dict() if cfg.dns else None,
                      "counters": fm.stats_dict()}}


def config_sig(pin_dir: str, path: Path | None = None) -> tuple | None:
    """(inode, mtime, size) of the config file: changes with every publish."""
    try:
        st = os.stat(path or fqdn_config_path(pin_dir))
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def remove(pin_dir: str) -> None:
    Path(fqdn_config_path(pin_dir)).unlink(missing_ok=True)
