"""The collector's status snapshot: what `hostwall-collector status` shows and self-metrics are made
from (collector/metrics.py). Written by the pipeline every status_interval as JSON (atomic rename).

Sections: state, error, ledger (collector/accounting.py), ring (backlog, read but not committed),
delivery (acknowledgement tickets and the commit queue), seq (next hostwall.seq per stream), restart
(what this start found: collector/checkpoint.py) and previous_run (the last status of a collector that
did not stop), queues, sinks (each sink's stats with its health: ok / degraded / failing, last error,
time since the last success, spool size and age), drops, conntrack, builder/enricher/anomaly stats,
audit, config. Cost: O(sinks + streams) dict building, ~100 µs.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson

from .config import describe

__all__ = ["build_status", "write_status"]


def build_status(p: Any, *, final: bool = False) -> dict:
    """The status of pipeline `p` (collector.pipeline.Pipeline)."""
    for s in p.slots:
        p._sync_sink(s)
    obs = p.observed_in_flight()
    ledger = p.ledger.snapshot(obs)
    if final:
        ledger["quiescent_violations"] = p.ledger.check(obs, quiescent=True)
    ring = {}
    if p.ring is not None:
        ring = {"backlog_bytes": p.ring.available_bytes(), "size_bytes": p.ring.size,
                "uncommitted_bytes": p.ring.uncommitted_bytes(), "consumer_pos": p.ring.consumer_pos,
                "records_read": p.counters["events_read"], "decode_errors": p.counters["decode_errors"],
                "discarded": p.counters["ring_discarded"], "waits": p.counters["ring_waits"]}
    now = time.time()
    out = {
        "pid": os.getpid(), "state": p.state, "pin_dir": p.cfg.pin_dir,
        "started_at": p._started, "updated_at": now, "uptime_s": round(now - p._started, 3),
        "error": f"{p._failure[0]}: {type(p._failure[1]).__name__}: {p._failure[1]}" if p._failure else None,
        "ledger": ledger,
        "ring": ring,
        "delivery": {"batches": p.acks.issued, "durable": p.acks.frontier, "waiting": p.acks.open,
                     "commits_pending": len(p.commits), "commits": p.counters["commits"],
                     "outbox_pending": len(p.outbox), "checkpoint": str(p.checkpoint.path),
                     "checkpoint_writes": p.checkpoint.writes, "checkpoint_errors": p.checkpoint.write_errors,
                     "acknowledging_sinks": [s.name for s in p.slots if s.acknowledges]},
        "seq": dict(sorted(p.seq.items())),
        "restart": {**p.restart.as_dict(), "kernel_while_down": dict(p.kernel_while_down)} if p.restart else None,
        "retired_drained": list(getattr(p, "retired_drained", [])),
        "previous_run": p.previous_run,
        "queues": {"events": {"depth": p._events_q.qsize() if p._events_q else 0,
                              "capacity_batches": p.cfg.queues.events},
                   "sinks": {s.name: {"depth": s.queue.size, "capacity": s.queue.capacity,
                                      "policy": s.policy.value, "dropped": s.queue_dropped, "dead": s.dead}
                             for s in p.slots}},
        "sinks": {s.name: s.sink.stats() for s in p.slots},
        "drops": {"intervals": p.counters["drop_intervals"], "last": p.last_drain,
                  "packets": p.ledger.drop_packets.get("summarized", 0),
                  "overflow_packets": p.ledger.drop_packets.get("overflow", 0)},
        "conntrack": {"scans": p.counters["ct_scans"], "expired": p.counters["ct_expired"],
                      "updates": p.counters["ct_updates"], "closed": p.counters["ct_closed"],
                      "raced": p.counters["ct_raced"],
                      "released": p.counters["ct_released"], "reclaimed": p.counters["ct_reclaimed"],
                      "detached": p.counters["ct_detached"], "detach_stale": p.counters["ct_detach_stale"],
                      "last": p.last_scan},
        "pipeline": {k: v for k, v in sorted(p.counters.items())},
        "config": describe(p.cfg),
    }
    for name, comp in (("builder", p.builder), ("enricher", p.enricher), ("anomaly", p.anomaly)):
        if comp is not None:
            try:
                out[name] = comp.stats()
            except Exception as e:                  # noqa: BLE001 — status must not fail
                out[name] = {"error": repr(e)}
    for stream, (tail, _) in p.logs.items():      # the enforcer's logs: "audit", "dns"
        out[stream] = tail.status()
    return out


def write_status(path: Path, data: dict) -> None:
    """Atomic (tmp + rename) JSON write; readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
                                 | orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS, default=str))
    os.replace(tmp, path)
