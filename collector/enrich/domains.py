"""destination.domain for the flows an fqdns rule allowed (docs/records.md "FQDN rules"): the name the
client asked the enforcer's DNS proxy for, whose answer put the destination address into the rule's
dynamic set.

Source: the learnt-name maps the proxy keeps pinned with the instance (hw_dns_names, hw_dns_name_ips;
hostwall.bpf.fqdn), written before the answer reached the client, so they hold the name by the time the
flow's first record is built. Among the names that resolved to the destination and that a pattern of the
flow's rule matches (the rule's fqdns from the instance state), the most recently learnt one is taken.
A flow keeps the name of its first record until its end (LRU memory keyed by Community ID + direction),
so a long flow whose name expired meanwhile still ends with it. No match: the field stays absent.

Cost: a dict lookup per flow record of an fqdns rule; a miss re-reads the maps (batched dumps, O(learnt
entries)) at most every `refresh_s`.
"""
from __future__ import annotations

import time
from collections.abc import Callable

from hostwall.dnsnames import matches

from .cgroup import LruTtlCache
from .host import InstanceStateView

__all__ = ["DomainNamer"]

_KINDS = frozenset({"flow", "log"})
_MISSING = object()


class DomainNamer:
    def __init__(self, instance: InstanceStateView, *, refresh_s: float = 0.5, memory: int = 65536,
                 memory_ttl_s: float = 86400.0, clock: Callable[[], float] = time.monotonic, maps=None):
        self.instance = instance
        self.refresh_s, self.clock = refresh_s, clock
        self._maps = maps                               # hostwall.bpf.fqdn.FqdnMaps (opened lazily)
        self._inst = None
        self._open_at = -1e18
        self._by_ip: dict[str, list[tuple[str, int]]] = {}
        self._read_at = -1e18
        self.memory: LruTtlCache[tuple, str | None] = LruTtlCache(memory, memory_ttl_s, clock)
        self.counters = {"named": 0, "unnamed": 0, "reads": 0}

    def _fqdns(self, rule: str) -> list[str] | None:
        meta = (getattr(getattr(self.instance, "state", None), "rule_meta", None) or {}).get(rule)
        return meta.get("fqdns") if isinstance(meta, dict) else None

    def _open(self):
        if self._maps is None and self.clock() - self._open_at >= 5.0:
            self._open_at = self.clock()
            from hostwall.bpf import fqdn
            from hostwall.bpf.instance import Instance
            inst = Instance.open_maps(self.instance.pin_dir, fqdn.MAPS)
            if inst is not None:
                self._inst, self._maps = inst, fqdn.FqdnMaps(inst.map_fds)
        return self._maps

    def _read(self) -> None:
        maps = self._open()
        if maps is None:
            return
        by_ip: dict[str, list[tuple[str, int]]] = {}
        for e in maps.learnt():
            by_ip.setdefault(e.ip, []).append((e.name, e.learnt_ns))
        self._by_ip = by_ip
        self._read_at = self.clock()
        self.counters["reads"] += 1

    def _lookup(self, ip: str, patterns: list[str]) -> str | None:
        best = None
        for name, learnt in self._by_ip.get(ip, ()):
            if any(matches(name, p) for p in patterns) and (best is None or learnt > best[1]):
                best = (name, learnt)
        return best[0] if best else None

    def name(self, record: dict) -> None:
        """Set destination.domain on a flow/log record of an fqdns rule (the record's `destination`
        replaced by a copy with it: the old object may be shared, docs/collector.md "Records at line rate")."""
        hw = record.get("hostwall", {})
        if hw.get("kind") not in _KINDS:
            return
        patterns = self._fqdns(record.get("rule", {}).get("name", ""))
        dst = record.get("destination")
        if not patterns or not dst or not dst.get("ip"):
            return
        net = record.get("network", {})
        key = (net.get("community_id"), net.get("direction")) if net.get("community_id") else None
        name = self.memory.get(key, _MISSING) if key else _MISSING
        if name is _MISSING:
            name = self._lookup(dst["ip"], patterns)
            if name is None and self.clock() - self._read_at >= self.refresh_s:
                self._read()
                name = self._lookup(dst["ip"], patterns)
            if key and hw.get("flow", {}).get("state") != "closed":
                self.memory.put(key, name)
        elif key and hw.get("flow", {}).get("state") == "closed":
            self.memory.pop(key, None)
        if name:        # a new object: the builder's `destination` may be shared by other records
            record["destination"] = {**dst, "domain": name}
            self.counters["named"] += 1
        else:
            self.counters["unnamed"] += 1

    def stats(self) -> dict:
        return dict(self.counters)

    def close(self) -> None:
        if self._maps is not None:
            self._maps.close()
        if self._inst is not None:
            self._inst.close()
        self._maps = self._inst = None
