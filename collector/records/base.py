"""What every record of the builder shares: the ECS skeleton (`@timestamp`, `ecs.version`, `event.*`,
`observer.*`, `hostwall.kind` and `hostwall.schema_version`), deterministic `event.id`, rule names,
endpoints with Community ID, totals and flow times, plus audit records and housekeeping.

ECS purity (docs/collector.md "Records"): top-level keys are ECS field sets of ECS_VERSION only;
everything of ours sits under `hostwall.*`. `source.ip` / `destination.ip` hold one host; a record
keyed by a prefix carries the CIDR in `source.address` and `hostwall.source.prefix` instead.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock

from ..community_id import community_id
from ..enrich.host import NO_RULE_SLOT, HostInfo, InstanceStateView
from .batch import ntop, packed
from .flowtable import FlowTable
from .timefmt import created_now, iso_ns

__all__ = ["BuilderBase", "SCHEMA_VERSION", "ECS_VERSION", "PRODUCT", "TRANSPORT_NAMES", "ECHO_TYPES", "DIR_NAMES"]

SCHEMA_VERSION = "1.1.0"          # 1.1: hostwall.schema_version, hostwall.source.prefix, event.created
ECS_VERSION = "8.11.0"
PRODUCT = "hostwall"

TRANSPORT_NAMES = {1: "icmp", 2: "igmp", 4: "ipv4", 6: "tcp", 17: "udp", 41: "ipv6", 47: "gre", 50: "esp",
                   51: "ah", 58: "ipv6-icmp", 89: "ospf", 103: "pim", 112: "vrrp", 132: "sctp"}
ECHO_TYPES = {1: (8, 0), 58: (128, 129)}          # proto -> (request, reply)
DIR_NAMES = {L.DIR["ingress"]: "ingress", L.DIR["egress"]: "egress"}


class BuilderBase:
    """State and shared pieces of RecordBuilder (collector/records/__init__.py). Not thread-safe: one
    pipeline task owns it.

    host: this host (observer.*); instance: resolves revision_id / rule_slot to names (may be None:
    every rule field then stays absent); ledger: optional, gets ledger.lost(stage, reason, n) for
    records that could not be built."""

    def __init__(self, host: HostInfo, instance: InstanceStateView | None, ledger: Any = None, *,
                 max_flows: int = 65536, flow_stale_s: float = float(L.C["HW_CT_TO_ESTABLISHED"]) + 3600.0,
                 community_id_seed: int = 0):
        self.host = host
        self.instance = instance
        self.ledger = ledger
        self.flows = FlowTable(max_flows)
        self.flow_stale_ns = int(flow_stale_s * 1e9)
        self.seed = community_id_seed
        self._id_prefix = f"{host.boot_id}\x1f{host.pin_dir}\x1f".encode()
        self._rule_memo: dict[tuple[int, int], tuple] = {}
        self._rule_gen = -1
        self._created = created_now()
        self.counters: dict[str, int] = {
            "events": 0, "records": 0, "decode_errors": 0, "end_without_start": 0, "ct_end_already_emitted": 0,
            "ct_end_event_lost": 0, "flows_stale_expired": 0, "drop_summaries": 0, "overflow_summaries": 0,
            "flow_end_idle_timeout": 0, "flow_end_evicted_established": 0, "flow_end_evicted_unconfirmed": 0,
            "flow_end_reused": 0, "flow_end_closed_after_grace": 0, "flow_end_detached": 0, "rule_unresolved": 0}

    # ---- accounting ------------------------------------------------------------------------------
    def _lost(self, stage: str, reason: str, n: int) -> None:
        self.counters["decode_errors"] += n
        if self.ledger is not None and hasattr(self.ledger, "lost"):
            self.ledger.lost(stage, reason, n)

    def stats(self) -> dict:
        return {**self.counters, "open_flows": len(self.flows.d), "flow_table_evicted": self.flows.evicted,
                "flow_table_max": self.flows.max_flows}

    def _event_id(self, kind: str, *parts: bytes) -> str:
        h = hashlib.blake2b(self._id_prefix + kind.encode(), digest_size=16)
        for p in parts:
            h.update(b"\x1f")
            h.update(p)
        return h.hexdigest()

    def _batch_started(self) -> None:
        """A batch of records is being made now: its `event.created` (one clock read per batch)."""
        self._created = created_now()

    # ---- common pieces ---------------------------------------------------------------------------
    def _observer(self) -> dict:
        obs = {"hostname": self.host.hostname, "type": "firewall", "product": PRODUCT, "vendor": PRODUCT}
        if self.host.version:
            obs["version"] = self.host.version
        return obs

    def _base(self, kind: str, dataset: str, ts_wall_ns: int) -> dict:
        return {"@timestamp": iso_ns(ts_wall_ns), "ecs": {"version": ECS_VERSION},
                "event": {"kind": "event", "category": ["network"], "dataset": dataset, "created": self._created},
                "observer": self._observer(), "hostwall": {"kind": kind, "schema_version": SCHEMA_VERSION}}

    def _rule(self, rec: dict, revision_id: int, slot: int) -> None:
        """rule.{name,ruleset,version}; memoised per instance-state generation (O(1) per record). The
        caller counts unresolved records (see unresolved)."""
        inst = self.instance
        if inst is None or not revision_id:           # revision 0: judged by no policy (malformed packet)
            return
        if self._rule_gen != inst.generation:
            self._rule_memo, self._rule_gen = {}, inst.generation
        got = self._rule_memo.get((revision_id, slot))
        if got is None:
            got = self._resolve(inst, revision_id, slot)
            if not got and inst.reload_for(revision_id):      # swapped since the last refresh: bounded re-read
                self._rule_memo, self._rule_gen = {}, inst.generation
                got = self._resolve(inst, revision_id, slot)
            if len(self._rule_memo) < 65536 and (got or revision_id <= inst.newest):
                self._rule_memo[(revision_id, slot)] = got   # a newer id's miss is retried (reload_for)
        if got:
            rec["rule"] = dict(got)

    @staticmethod
    def _resolve(inst: InstanceStateView, revision_id: int, slot: int) -> tuple:
        return tuple((k, v) for k, v in (("name", inst.rule_name(revision_id, slot)),
                                         ("ruleset", inst.ruleset(revision_id)),
                                         ("version", inst.revision(revision_id))) if v)

    @staticmethod
    def unresolved(rule: dict, revision_id: int, slot: int) -> bool:
        """The record's revision is unknown (older than the state's revision_info keeps, or of another
        enforcer instance), or it names a rule slot that revision does not name: counted as
        rule_unresolved (docs/records.md "Rule fields"). Revision 0 (no policy judged it) is not."""
        return bool(revision_id) and ("version" not in rule or (slot != NO_RULE_SLOT and "name" not in rule))

    def _interface(self, rec: dict, ifindex: int, direction: str | None) -> None:
        """Interface id now; the enricher fills names (and netns)."""
        if not ifindex:
            return
        rec["hostwall"]["interface"] = {"id": int(ifindex)}
        if direction in ("ingress", "egress"):
            rec["observer"][direction] = {"interface": {"id": str(int(ifindex))}}

    @staticmethod
    def _network(fam: int, proto: int, direction: str | None) -> dict:
        net = {"type": "ipv4" if fam == 4 else "ipv6", "iana_number": str(proto)}
        name = TRANSPORT_NAMES.get(proto)
        if name:
            net["transport"] = name
        if direction:
            net["direction"] = direction
        return net

    def _endpoints(self, rec: dict, fam: int, proto: int, sraw: bytes, draw: bytes, sport: int, dport: int,
                   icmp_type: int | None) -> None:
        """source/destination ip+port, related.ip, community id, ICMP details."""
        sip, dip = ntop(fam, sraw), ntop(fam, draw)
        rec["source"], rec["destination"] = {"ip": sip}, {"ip": dip}
        rec["related"] = {"ip": [sip] if sip == dip else [sip, dip]}
        if proto in (6, 17, 132):
            rec["source"]["port"], rec["destination"]["port"] = int(sport), int(dport)
            cid = community_id(packed(fam, sraw), packed(fam, draw), proto, sport, dport, self.seed)
        elif proto in ECHO_TYPES:
            cid = ""
            if icmp_type is not None:
                rec["hostwall"]["icmp"] = {"type": int(icmp_type)}
                if icmp_type in ECHO_TYPES[proto]:            # echo: the code is 0 by definition
                    rec["hostwall"]["icmp"]["id"] = int(sport)
                    cid = community_id(packed(fam, sraw), packed(fam, draw), proto, icmp_type, 0, self.seed)
        else:
            cid = community_id(packed(fam, sraw), packed(fam, draw), proto, seed=self.seed)
        if cid:
            rec["network"]["community_id"] = cid

    @staticmethod
    def _totals(rec: dict, packets, bytes_) -> None:
        """Packets and IP-layer bytes per direction (source = initiator) and both ways."""
        p0, p1, b0, b1 = int(packets[0]), int(packets[1]), int(bytes_[0]), int(bytes_[1])
        rec["source"].update(packets=p0, bytes=b0)
        if p1 or b1 or rec["hostwall"]["kind"] == "flow":
            rec["destination"].update(packets=p1, bytes=b1)
        rec["network"].update(packets=p0 + p1, bytes=b0 + b1)

    @staticmethod
    def _flow_times(rec: dict, clock: Clock, start_ns: int, end_ns: int, state: str, end_reason: str | None) -> None:
        """event.start/end/duration and hostwall.flow from the first and last packet (monotonic ns of the
        precise clock). The end never precedes the start (another CPU may have stored an older reading
        of the clock last), so a flow's start record never sorts after its end record."""
        end_ns = max(int(end_ns), int(start_ns))
        start, end = iso_ns(clock.wall_ns(start_ns)), iso_ns(clock.wall_ns(end_ns))
        dur = end_ns - int(start_ns)
        rec["event"].update(start=start, end=end, duration=dur)
        flow = {"start": start, "end": end, "duration_ns": dur, "state": state}
        if end_reason:
            flow["end_reason"] = end_reason
        rec["hostwall"]["flow"] = flow

    # ---- audit -----------------------------------------------------------------------------------
    def on_audit(self, rec: dict) -> dict:
        """A policy-change record from the enforcer's audit log (enforcer/state.py record_change),
        completed with event.id (hash of its canonical JSON), event.created, hostwall.schema_version and
        observer. The input is not modified; a line of an older enforcer that still has a top-level
        `schema_version` gets it moved under hostwall.*."""
        self._batch_started()
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rec.items() if k != "schema_version"}
        ident = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        out["event"] = {**rec.get("event", {}), "id": self._event_id("audit", ident), "created": self._created}
        out.setdefault("ecs", {"version": ECS_VERSION})
        out["observer"] = self._observer()
        out["hostwall"] = {**rec.get("hostwall", {}), "kind": "audit", "schema_version": SCHEMA_VERSION}
        self.counters["records"] += 1
        return out

    # ---- housekeeping ----------------------------------------------------------------------------
    def tick(self, now: int | None = None) -> list[dict]:
        """Periodic work (call every few seconds): reload the instance state if its file changed;
        forget open flows silent for longer than flow_stale_s (their end was never reported: e.g. the
        datapath displaced the connection while the event budget was spent, or the enforcer cleared its
        tables) — counted in flows_stale_expired. Returns no records
        today; the list is the contract for future periodic records."""
        now = Clock.now() if now is None else int(now)
        if self.instance is not None:
            self.instance.refresh()
        self.counters["flows_stale_expired"] += self.flows.expire(now - self.flow_stale_ns)
        return []
