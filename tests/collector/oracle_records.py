"""Test oracle: the record builder's per-record ring-buffer path as it was before the batch-shaped
path (collector/records/events.py at commit 366d3d8), kept only to check that the batch-shaped path
builds byte-for-byte the same records (test_records_batch.py). It composes each record from the
BuilderBase helpers the conntrack and drop records still use (records/base.py: _base, _network,
_endpoints, _rule, _interface, _totals, _flow_times, _event_id; timefmt.iso_ns), so the test also
keeps ring records consistent with them. Not part of the package; never imported by it."""
from __future__ import annotations

import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.clock import Clock
from hostwall.collector.records import RecordBuilder
from hostwall.collector.records.base import DIR_NAMES, ECHO_TYPES
from hostwall.collector.records.batch import as_dtype, packed, pairs
from hostwall.collector.records.flowtable import OpenFlow
from hostwall.collector.records.timefmt import iso_ns
from hostwall.gcpause import GcPaused

END_REASON = {"closed": "rst", "closing": "fin", "fin_wait": "fin"}
_END_CAUSE_REASON = {L.C["HW_END_IDLE"]: ("idle_timeout", "idle timeout"),
                     L.C["HW_END_EVICTED_ESTABLISHED"]: ("evicted_established",
                                                         "conntrack bucket full of established connections: evicted"),
                     L.C["HW_END_EVICTED_UNCONFIRMED"]: ("evicted_unconfirmed",
                                                         "conntrack bucket full: unconfirmed connection evicted"),
                     L.C["HW_END_REUSED"]: ("reused", "tuple reused by a new connection")}
_COLS = ("ts_ns", "start_ns", "cgroup_id", "sport", "dport", "ifindex", "rule_slot", "revision_id", "type", "family",
         "proto", "verdict", "reason", "hook", "direction", "tcp_flags", "ct_state", "icmp_type", "end_cause")


class OracleEvents:
    """The per-record ring-buffer path as it was before the batch-shaped one (commit 366d3d8); a mixin
    over RecordBuilder, whose BuilderBase helpers it calls."""

    def on_events(self, batch: np.ndarray, clock: Clock) -> list[dict]:
        """One record per event of a hw_event batch: a structured array (hw_event layout, or the same
        fields in another byte order) or the raw bytes of consecutive events."""
        arr = as_dtype(batch, L.DTYPES["hw_event"])
        if arr is None:
            self._lost("decode", "bad_event_layout", 1)
            return []
        batch = arr
        n = len(batch)
        self.counters["events"] += n
        if n == 0:
            return []
        self._batch_started()
        raw = np.ascontiguousarray(batch).tobytes()
        size = L.DTYPES["hw_event"].itemsize
        cols = {f: batch[f].tolist() for f in _COLS}
        # (n, 2) fields column by column (two 1-D tolist() calls) rather than a nested tolist() of the
        # 2-D sub-array field, which some NumPy builds take a slow path for. Measured on NumPy 2.4:
        # both ~0.02 µs per record; building the dicts (~10-20 µs per record) dominates either way.
        pk = pairs(batch["packets"])
        by = pairs(batch["bytes"])
        saddr, daddr = batch["saddr"].tobytes(), batch["daddr"].tobytes()
        out: list[dict] = []
        bad: dict[str, int] = {}
        names = tuple(cols)
        with GcPaused():
            for i, row in enumerate(zip(*cols.values())):
                ev = dict(zip(names, row))
                ev["packets"], ev["bytes"] = pk[i], by[i]
                ev["saddr"], ev["daddr"] = saddr[16 * i:16 * i + 16], daddr[16 * i:16 * i + 16]
                ev["raw"] = raw[size * i:size * (i + 1)]
                why = self._check(ev)
                if why:
                    bad[why] = bad.get(why, 0) + 1
                    continue
                out.append(self._from_event(ev, clock))
        for why, k in bad.items():
            self._lost("decode", why, k)
        self.counters["records"] += len(out)
        return out

    @staticmethod
    def _check(ev: dict) -> str:
        if ev["type"] not in L.EVENT_TYPE_NAMES:
            return "unknown_event_type"
        if ev["family"] not in (4, 6):
            return "bad_family"
        return ""

    def _from_event(self, ev: dict, clock: Clock) -> dict:
        t = L.EVENT_TYPE_NAMES[ev["type"]]
        if t == "flow_start":
            return self._flow_start(ev, clock)
        if t == "flow_end":
            return self._flow_end(ev, clock)
        if t == "deny":
            return self._deny(ev, clock)
        return self._log(ev, clock)

    def _packet_record(self, ev: dict, clock: Clock, kind: str, dataset: str, ts_ns: int) -> dict:
        """The fields every ring-buffer record shares."""
        fam, proto = ev["family"], ev["proto"]
        direction = DIR_NAMES.get(ev["direction"])
        rec = self._base(kind, dataset, clock.wall_ns(ts_ns))
        rec["network"] = self._network(fam, proto, direction)
        self._endpoints(rec, fam, proto, ev["saddr"], ev["daddr"], ev["sport"], ev["dport"],
                        ev["icmp_type"] if proto in ECHO_TYPES else None)
        self._rule(rec, ev["revision_id"], ev["rule_slot"])
        if self.instance is not None and self.unresolved(rec.get("rule", {}), ev["revision_id"], ev["rule_slot"]):
            self.counters["rule_unresolved"] += 1
        self._interface(rec, ev["ifindex"], direction)
        hw = rec["hostwall"]
        hw["verdict"] = L.VERDICT_NAMES.get(ev["verdict"], "")
        reason = L.REASON_NAMES.get(ev["reason"], "")
        if reason:
            hw["reason"] = reason
        hw["hook"] = L.HOOK_NAMES.get(ev["hook"], "")
        hw["cgroup_id"] = int(ev["cgroup_id"])
        if proto == 6 and ev["tcp_flags"]:
            hw["tcp_flags"] = int(ev["tcp_flags"])
        return rec

    @staticmethod
    def _flow_key(ev: dict) -> tuple:
        fam = ev["family"]
        return (fam, ev["proto"], packed(fam, ev["saddr"]), packed(fam, ev["daddr"]), ev["sport"], ev["dport"],
                ev["direction"])

    def _flow_start(self, ev: dict, clock: Clock) -> dict:
        # the first packet: the conntrack entry's created_ns, which the flow's end and update records
        # start from too, so start and end records agree exactly
        rec = self._packet_record(ev, clock, "flow", "hostwall.flow", ev["start_ns"])
        start = iso_ns(clock.wall_ns(ev["start_ns"]))
        rec["event"].update(type=["start"], action="flow_start", outcome="success", start=start,
                            id=self._event_id("flow_start", ev["raw"]))
        rec["hostwall"].update(flow={"start": start, "state": "open"}, sample_rate=1)
        if ev["ct_state"] in L.CT_STATE_NAMES:
            rec["hostwall"]["ct_state"] = L.CT_STATE_NAMES[ev["ct_state"]]
        self.flows.open(self._flow_key(ev), OpenFlow(ev["start_ns"], ev["ts_ns"], ev["ifindex"], ev["hook"]))
        return rec

    def _flow_end(self, ev: dict, clock: Clock) -> dict:
        end_ns = max(ev["ts_ns"], ev["start_ns"])
        rec = self._packet_record(ev, clock, "flow", "hostwall.flow", end_ns)
        if self.flows.close(self._flow_key(ev)) is None:
            self.counters["end_without_start"] += 1
        state = L.CT_STATE_NAMES.get(ev["ct_state"], "")
        self._totals(rec, ev["packets"], ev["bytes"])
        reason = END_REASON.get(state, "fin")
        if ev["end_cause"] in _END_CAUSE_REASON:
            reason, rec["event"]["reason"] = _END_CAUSE_REASON[ev["end_cause"]]
            self.counters[f"flow_end_{reason}"] += 1
        self._flow_times(rec, clock, ev["start_ns"], end_ns, "closed", reason)
        rec["event"].update(type=["end"], action="flow_end", outcome="success", id=self._event_id("flow_end", ev["raw"]))
        if state:
            rec["hostwall"]["ct_state"] = state
        rec["hostwall"]["sample_rate"] = 1
        return rec

    def _deny(self, ev: dict, clock: Clock) -> dict:
        rec = self._packet_record(ev, clock, "deny", "hostwall.deny", ev["ts_ns"])
        would = ev["verdict"] == L.C["HW_V_WOULD_DROP"]
        rec["event"].update(type=["allowed"] if would else ["denied"], action="would_deny" if would else "deny",
                            outcome="success" if would else "failure", id=self._event_id("deny", ev["raw"]))
        self._totals(rec, [ev["packets"][0], 0], [ev["bytes"][0], 0])
        return rec

    def _log(self, ev: dict, clock: Clock) -> dict:
        rec = self._packet_record(ev, clock, "log", "hostwall.flow", ev["ts_ns"])
        dropped = ev["verdict"] == L.C["HW_V_DROP"]
        rec["event"].update(type=["connection", "denied" if dropped else "allowed"], action="log",
                            outcome="failure" if dropped else "success", id=self._event_id("log", ev["raw"]))
        self._totals(rec, [ev["packets"][0], 0], [ev["bytes"][0], 0])
        rec["hostwall"]["sample_rate"] = 1
        return rec


class OracleBuilder(OracleEvents, RecordBuilder):
    """RecordBuilder with the old ring-buffer path."""
