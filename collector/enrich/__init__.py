"""Enrichment: complete canonical records with what the kernel could not know.

  interface   hostwall.interface.{name,netns} and observer.<direction>.interface.name from the ifindex
              (attached interfaces of the instance, namespace-aware); hostwall.dos_profile where the
              instance state names the interface's profile and the reason is a DoS reason
  attribution which local workload a record belongs to:
                egress with a kernel cgroup id → that cgroup (attribution "cgroup")
                otherwise the local socket owning the local address:port (destination for ingress,
                source for egress) via sock_diag in the interface's namespace (attribution "socket")
              → process.{pid,name,executable}, container.{id,runtime,name,image.name},
                orchestrator.{type,namespace,resource.{type,id,name}} (pods), hostwall.{cgroup_id,
                cgroup_path,systemd_unit,pod_qos,attribution}
  domain      destination.domain of flows an fqdns rule allowed: the name asked of the enforcer's DNS
              proxy that put the destination into the rule's dynamic set (enrich/domains.py)
  flow memory a flow's attribution is remembered from its first record (LRU+TTL, keyed by community id
              + opening direction) until its end record, so the end is attributed even after the socket
              is gone; a reused 5-tuple after the end is resolved afresh.

Unknown stays unknown: nothing is set from a guess. Every failure of a resolver is caught, counted in
stats()["errors"] and leaves the record as it was (enrichment is best effort; the record still ships).
Cost per record: a few dict operations on cache hits; misses cost what the resolvers document.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .cgroup import CgroupInfo, CgroupResolver, LruTtlCache
from .domains import DomainNamer
from .host import HostInfo, Iface, InstanceStateView, InterfaceTable
from .sockets import SocketOwner, SocketOwnerResolver

__all__ = ["Enricher", "DOS_REASONS"]

DOS_REASONS = frozenset({"rate_limit", "syn_flood", "udp_flood", "icmp_flood", "port_limit", "banned"})
_ATTRIBUTED_KINDS = frozenset({"flow", "deny", "log"})
ATTRIBUTION_MEMO = 4096           # distinct (cgroup, socket owner) fragments kept ready
_MISSING = object()


class Enricher:
    """enrich(record) mutates the record in place; stats() reports cache hit rates and counters.

    Resolvers are injectable (tests, or to disable one: pass sockets=False / cgroups=False)."""

    def __init__(self, host: HostInfo, instance: InstanceStateView | None = None, *,
                 cgroups: CgroupResolver | None | bool = None, sockets: SocketOwnerResolver | None | bool = None,
                 interfaces: InterfaceTable | None = None, flow_memory: int = 65536, flow_memory_ttl_s: float = 3600.0,
                 clock: Callable[[], float] = time.monotonic, domains: DomainNamer | None | bool = None):
        self.host = host
        self.instance = instance
        self.cgroups = CgroupResolver(clock=clock) if cgroups is None else (cgroups or None)
        self.sockets = SocketOwnerResolver(clock=clock) if sockets is None else (sockets or None)
        self.interfaces = interfaces if interfaces is not None else InterfaceTable(instance)
        self.flow_attr: LruTtlCache[tuple, dict | None] = LruTtlCache(flow_memory, flow_memory_ttl_s, clock)
        self.domains = (DomainNamer(instance) if instance is not None else None) if domains is None \
            else (domains or None)
        self._attr_memo: dict[tuple, tuple] = {}
        self._memo: dict[tuple, tuple] | None = None     # per enrich_batch call: lookup key → resolution
        self.counters = {"records": 0, "attributed_cgroup": 0, "attributed_socket": 0, "unattributed": 0,
                         "from_flow_memory": 0, "errors": 0}

    def close(self) -> None:
        if self.sockets is not None:
            self.sockets.close()
        if self.domains is not None:
            self.domains.close()

    # ---- entry point -----------------------------------------------------------------------------
    def enrich_batch(self, records: list[dict]) -> int:
        """enrich() each record in order; returns how many raised (each counted, the rest go on).

        Within the call, the workload a lookup key resolves to — (direction, cgroup id, namespace,
        protocol, local address, local port): everything the resolvers read — is resolved once and
        reused for the batch's other records of that key (a busy service's records share a few keys),
        so the resolvers' caches see one lookup per distinct key per batch (their hit/miss stats count
        those) and the attribution counters still count every record. While no domain namer is set, a
        record without an interface id has no interface or naming step: it goes straight to _attribute,
        with enrich()'s counters. Cost on a warm host: ~2-4 µs per record (flow memory, the lookup key,
        the merge) plus one resolver lookup per distinct key (docs/benchmarks.md)."""
        errors = 0
        self._memo = {}
        counters = self.counters
        attribute = self._attribute
        per_record = self.domains is not None           # domain naming reads the rule: enrich() does it
        try:
            for r in records:
                try:
                    hw = r.get("hostwall")
                    if per_record or type(hw) is not dict or "interface" in hw:
                        self.enrich(r)
                        continue
                    counters["records"] += 1
                    if hw.get("kind") in _ATTRIBUTED_KINDS:
                        try:
                            attribute(r, hw, None)
                        except Exception:  # noqa: BLE001 — as enrich() counts it: the record ships
                            counters["errors"] += 1
                except Exception:  # noqa: BLE001 — best effort: the record ships un-enriched (counted)
                    errors += 1
        finally:
            self._memo = None
        return errors

    def enrich(self, record: dict) -> None:
        self.counters["records"] += 1
        hw = record.get("hostwall", {})
        iface = None
        try:
            iface = self._interface(record, hw)
        except Exception:  # noqa: BLE001 — enrichment is best effort: counted, the record ships
            self.counters["errors"] += 1
        if hw.get("kind") not in _ATTRIBUTED_KINDS:
            return
        if self.domains is not None and "rule" in record:
            try:
                self.domains.name(record)
            except Exception:  # noqa: BLE001 — best effort, as above
                self.counters["errors"] += 1
        try:
            self._attribute(record, hw, iface)
        except Exception:  # noqa: BLE001 — enrichment is best effort: counted, the record ships
            self.counters["errors"] += 1

    # ---- interface -------------------------------------------------------------------------------
    def _interface(self, record: dict, hw: dict) -> Iface | None:
        ifd = hw.get("interface")
        if not ifd or "id" not in ifd:
            return None
        iface = self.interfaces.lookup(ifd["id"])
        if iface is None:
            return None
        ifd["name"] = iface.name
        if iface.netns:
            ifd["netns"] = iface.netns
        for d in ("ingress", "egress"):
            o = record.get("observer", {}).get(d)
            if o and "interface" in o:
                o["interface"]["name"] = iface.name
        if hw.get("reason") in DOS_REASONS and self.instance is not None:
            for a in self.instance.interfaces():
                prof = getattr(a, "dos_profile", None)
                if prof and a.name == iface.name and a.netns == iface.netns:
                    hw["dos_profile"] = prof
        return iface

    # ---- attribution -----------------------------------------------------------------------------
    def _attribute(self, record: dict, hw: dict, iface: Iface | None) -> None:
        """A flow's attribution from flow memory (kept while it is open, dropped at its end), else the
        resolvers' (one lookup per distinct key per batch while enrich_batch's memo is set). Every
        record of a batch comes here, so the flow key and the memo lookup are written inline
        (docs/benchmarks.md, issue 17 collector)."""
        counters = self.counters
        net = record.get("network", {})
        cid, direction = net.get("community_id"), net.get("direction")
        fkey = (cid, direction) if (cid and hw.get("kind") == "flow") else None
        open_flow = False
        if fkey is not None:
            if hw.get("flow", {}).get("state") == "closed":
                remembered = self.flow_attr.pop(fkey, _MISSING)
            else:
                remembered, open_flow = self.flow_attr.get(fkey, _MISSING), True
            if remembered is not _MISSING:
                if remembered:
                    counters["from_flow_memory"] += 1
                    _apply(record, remembered)
                else:
                    counters["unattributed"] += 1
                return
        memo = self._memo
        if memo is None:
            attr, counter = self._resolve_now(record, hw, iface)
        else:
            local = record.get("destination" if direction == "ingress" else "source", {})
            key = (direction, hw.get("cgroup_id"), iface.netns if iface else None, net.get("iana_number"),
                   local.get("ip"), local.get("port"))
            got = memo.get(key)
            if got is None:
                got = memo[key] = self._resolve_now(record, hw, iface)
            attr, counter = got
        if counter:
            counters[counter] += 1
        if open_flow:
            self.flow_attr.put(fkey, attr)
        if attr:
            _apply(record, attr)
        else:
            counters["unattributed"] += 1

    def _resolve_now(self, record: dict, hw: dict, iface: Iface | None) -> tuple[dict | None, str]:
        """(attribution or None, the counter it counts in, "" if none) through the resolvers."""
        direction = record.get("network", {}).get("direction")
        cgid = int(hw.get("cgroup_id") or 0)
        if direction == "egress" and cgid and self.cgroups is not None:
            info = self.cgroups.resolve(cgid)
            if info is not None:
                return self._attribution_of(info, None, "cgroup"), "attributed_cgroup"
        owner = self._socket_owner(record, direction, iface)
        if owner is None:
            return None, ""
        info = self.cgroups.resolve(owner.cgroup_id) if (self.cgroups is not None and owner.cgroup_id) else None
        if info is None and not owner.pid:
            return None, ""
        return self._attribution_of(info, owner, "socket"), "attributed_socket"

    def _attribution_of(self, info: CgroupInfo | None, owner: SocketOwner | None, how: str) -> dict:
        """_attribution, memoised by the identity of the resolvers' cached objects (a workload's many
        records share one fragment; _apply copies what it puts into a record). Bounded: cleared at
        ATTRIBUTION_MEMO entries. O(1) per hit."""
        key = (id(info), id(owner), how)
        got = self._attr_memo.get(key)
        if got is not None and got[0] is info and got[1] is owner:
            return got[2]
        if len(self._attr_memo) >= ATTRIBUTION_MEMO:
            self._attr_memo.clear()
        attr = _attribution(info, owner, how)
        self._attr_memo[key] = (info, owner, attr)     # holds info/owner: their ids stay theirs
        return attr

    def _socket_owner(self, record: dict, direction: str | None, iface: Iface | None) -> SocketOwner | None:
        if self.sockets is None or direction not in ("ingress", "egress"):
            return None
        local = record.get("destination" if direction == "ingress" else "source", {})
        ip, port = local.get("ip"), local.get("port")
        proto = int(record.get("network", {}).get("iana_number") or 0)
        if not ip or not port or proto not in (6, 17):
            return None
        return self.sockets.lookup(iface.netns if iface else None, proto, ip, int(port))

    def stats(self) -> dict:
        out: dict[str, Any] = {**self.counters, "flow_memory": self.flow_attr.stats(),
                               "interfaces": self.interfaces.stats()}
        if self.cgroups is not None:
            out["cgroups"] = self.cgroups.stats()
        if self.sockets is not None:
            out["sockets"] = self.sockets.stats()
        if self.domains is not None:
            out["domains"] = self.domains.stats()
        return out


def _attribution(info: CgroupInfo | None, owner: SocketOwner | None, how: str) -> dict:
    """The ECS fragments a workload identity adds to a record (only known values), with the plan
    _apply follows (_Attribution.plan)."""
    a: dict[str, Any] = {"hostwall": {"attribution": how}}
    if owner is not None and owner.pid:
        proc = {"pid": owner.pid, "name": owner.process_name, "executable": owner.executable}
        a["process"] = {k: v for k, v in proc.items() if v}
    if info is not None:
        hw = a["hostwall"]
        hw["cgroup_id"] = info.cgroup_id
        hw["cgroup_path"] = info.path
        if info.systemd_unit:
            hw["systemd_unit"] = info.systemd_unit
        if info.pod_qos:
            hw["pod_qos"] = info.pod_qos
        if info.container_id:
            c = {"id": info.container_id, "runtime": info.runtime, "name": info.container_name}
            c = {k: v for k, v in c.items() if v}
            if info.image:
                c["image"] = {"name": info.image}
            a["container"] = c
        if info.pod_uid:
            res = {"type": "pod", "id": info.pod_uid}
            if info.pod_name:
                res["name"] = info.pod_name
            orch = {"type": "kubernetes", "resource": res}
            if info.pod_namespace:
                orch["namespace"] = info.pod_namespace
            a["orchestrator"] = orch
    elif owner is not None and owner.cgroup_path:
        a["hostwall"]["cgroup_path"] = owner.cgroup_path
        if owner.cgroup_id:
            a["hostwall"]["cgroup_id"] = owner.cgroup_id
    return _Attribution(a)


class _Attribution(dict):
    """An attribution fragment {top: {key: value or {key: value}}} with its merge plan: per top-level
    key, the keys whose values are dicts (merged one level deeper). Read-only once made: one fragment
    serves every record of a workload (see _apply)."""
    __slots__ = ("plan",)

    def __init__(self, frag: dict):
        super().__init__(frag)
        self.plan = tuple((top, f, tuple(k for k, v in f.items() if isinstance(v, dict))) for top, f in frag.items())


def _apply(record: dict, attr: dict) -> None:
    """Merge an attribution into a record: each top-level object gets the fragment's keys in the
    fragment's order, dict values merged into a dict already there. Invariant (docs/collector.md
    "Records at line rate"): a top-level object the record lacks is the fragment's own object,
    shared read-only by the records of that workload; `hostwall`, which every record owns, is
    updated in place; any other object the record has already is replaced by a merged copy, so a
    shared object is never changed. Cost: one dict operation per top-level key on the common path."""
    plan = attr.plan if isinstance(attr, _Attribution) else _Attribution(attr).plan
    for top, frag, nested in plan:
        dst = record.get(top)
        if dst is None:
            record[top] = frag if top != "hostwall" else frag.copy()
            continue
        if top != "hostwall":
            dst = record[top] = dict(dst)
        olds = [dst.get(k) for k in nested] if nested else ()
        dst.update(frag)
        for k, old in zip(nested, olds):
            dst[k] = {**old, **frag[k]} if isinstance(old, dict) else frag[k]
