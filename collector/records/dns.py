"""DNS records: the enforcer's DNS proxy decisions (names refused under refuse_unlisted, queries answered
SERVFAIL because no upstream answered), read from its DNS log (enforcer/dnsrecords.py) and completed
here as audit records are: event.id (hash of the canonical line), event.created, ecs.version, observer,
hostwall.kind "dns" and hostwall.schema_version. The line's own fields are ECS: dns.{id, type, op_code,
response_code, question.{name, type, class}}, source (the client), destination (the proxy's listen
address), network.protocol "dns", error.message for upstream failures (docs/records.md "DNS records")."""
from __future__ import annotations

import json

from .base import ECS_VERSION, SCHEMA_VERSION

__all__ = ["DnsRecords"]


class DnsRecords:
    """RecordBuilder's DNS part (a mixin over records.base.BuilderBase)."""

    def on_dns(self, rec: dict) -> dict:
        self._batch_started()
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in rec.items()}
        ident = json.dumps(rec, sort_keys=True, separators=(",", ":")).encode()
        out["event"] = {**rec.get("event", {}), "id": self._event_id("dns", ident), "created": self._created}
        out["ecs"] = {"version": ECS_VERSION}
        out["observer"] = self._observer()
        out["hostwall"] = {**rec.get("hostwall", {}), "kind": "dns", "schema_version": SCHEMA_VERSION}
        self.counters["records"] += 1
        return out
