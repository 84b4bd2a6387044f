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
        self.counters = {"records": 0, "attributed_cgroup": 0, "attributed_socket": 0, "unattributed": 0,
                         "from_flow_memory": 0, "errors": 0}

    def close(self) -> None:
        if self.sockets is not None:
            self.sockets.close()
        if self.domains is not None:
            self.domains.close()

    # ---- entry point -----------------------------------------------------------------------------
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
    @staticmethod
    def _flow_key(record: dict, hw: dict) -> tuple | None:
        net = record.get("network", {})
        cid = net.get("community_id")
        return (cid, net.get("direction")) if (hw.get("kind") == "flow" and cid) else None

    def _attribute(self, record: dict, hw: dict, iface: Iface | None) -> None:
        fkey = self._flow_key(record, hw)
        if fkey is not None:
            ending = hw.get("flow", {}).get("state") == "closed"
            remembered = (self.flow_attr.pop if ending else self.flow_attr.get)(fkey, _MISSING)
            if remembered is not _MISSING:
                if remembered:
                    self.counters["from_flow_memory"] += 1
                    _apply(record, remembered)
                else:
                    self.counters["unattributed"] += 1
                return
        attr = self._resolve(record, hw, iface)
        if fkey is not None and hw.get("flow", {}).get("state") != "closed":
            self.flow_attr.put(fkey, attr)
        if attr:
            _apply(record, attr)
        else:
            self.counters["unattributed"] += 1

    def _resolve(self, record: dict, hw: dict, iface: Iface | None) -> dict | None:
        direction = record.get("network", {}).get("direction")
        cgid = int(hw.get("cgroup_id") or 0)
        if direction == "egress" and cgid and self.cgroups is not None:
            info = self.cgroups.resolve(cgid)
            if info is not None:
                self.counters["attributed_cgroup"] += 1
                return _attribution(info, None, "cgroup")
        owner = self._socket_owner(record, direction, iface)
        if owner is None:
            return None
        info = self.cgroups.resolve(owner.cgroup_id) if (self.cgroups is not None and owner.cgroup_id) else None
        if info is None and not owner.pid:
            return None
        self.counters["attributed_socket"] += 1
        return _attribution(info, owner, "socket")

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
    """The ECS fragments a workload identity adds to a record (only known values)."""
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
    return a


def _apply(record: dict, attr: dict) -> None:
    for top, frag in attr.items():
        dst = record.setdefault(top, {})
        for k, v in frag.items():
            if isinstance(v, dict):
                dst[k] = {**dst.get(k, {}), **v} if isinstance(dst.get(k), dict) else dict(v)
            else:
                dst[k] = v
