"""Kernel facts → canonical ECS-shaped records (schemas/flow.schema.json; `hostwall.schema_version`
SCHEMA_VERSION, `ecs.version` ECS_VERSION).

Inputs are NumPy batches in the layouts of bpf/hostwall.h (hostwall.bpf.layout.DTYPES); outputs are
plain dicts, one per record, that the enricher completes and the encoders serialise. One module per
concept:

  base        the ECS skeleton every record shares, event.id, rules, endpoints, flow times; audit
  events      ring-buffer events: flow start, flow end (RST / displaced), deny, log
  conntrack   the conntrack scan: flows closed by FINs after the close grace period, idle expiry,
              active-timeout updates
  drops       drop summaries (and map-overflow summaries)
  timefmt     RFC 3339 text with µs (per instant and per column); batch: kernel batches as NumPy
              arrays, name tables and flow-tuple keys; endpoints: addresses as text and Community ID
              once per distinct flow tuple; flowtable: open flows

Record kinds (`hostwall.kind`):

  flow          flow_start → event.type ["start"]; flow_end → ["end"] with totals per direction
                (source = initiator, IP-layer bytes) and end_reason rst / fin (closed by FINs, reported
                once quiet for the close grace period, so the last ACK counts) / idle_timeout /
                evicted_unconfirmed (a full conntrack bucket evicts unconfirmed connections first) /
                evicted_established (the bucket held no unconfirmed one) / reused (a new connection
                took its tuple while it was still tracked); conntrack active-timeout
                update → ["info"] with running totals
  log           a packet judged by an `action: log` rule → event.type ["connection", "allowed"]
  deny          the sampled first dropped packet of an aggregation key → ["denied"] (audit mode:
                verdict would_drop, ["allowed"], outcome success: the packet passed)
  drop_summary  one per drop-aggregation key per interval: packets/bytes per (peer prefix, reason,
                destination port, protocol, direction, interface), its largest individual peers and
                the interval bounds; event.kind "metric"
  flow_summary  connections counted in aggregate under a flood and the SYN proxy's cookie answers, per
                (peer prefix, destination port, protocol, direction, kind) per interval
                (collector/flow_summary.py: its own module, it needs the datapath's flow aggregation)
  audit         a policy change from the enforcer's audit log (on_audit adds id/version/observer)
  dns           a DNS proxy decision from the enforcer's DNS log: a name refused (refuse_unlisted) or a
                query answered SERVFAIL (no upstream answered); ECS dns.* fields (records/dns.py)

Invariants
- ECS purity: top-level keys are fields of ECS_VERSION; ours sit under `hostwall.*`.
- Time (docs/collector.md "Records"): `@timestamp` is when it happened (first packet of a flow start,
  last packet of a flow end, the packet of a deny/log, the interval end of a summary), from the
  datapath's precise clock; flows carry event.start/end and event.duration (integer ns, end - start ≥
  0); `event.created` is when the collector made the record. The datapath's tick clock never stamps
  a record.
- `source.ip` / `destination.ip` hold one host; prefix-keyed records carry the CIDR in `*.address`
  and `hostwall.source.prefix`.
- Unknown stays unknown: a field is absent rather than guessed (rule names resolve only through the
  revision that stamped the record; see collector.enrich.host.InstanceStateView).
- `event.id` is deterministic: the first 128 bits of BLAKE2b over (boot id, pin dir, record kind, the
  identity of the kernel fact: the raw 120-byte event; the conntrack key + created/last timestamps
  (+ totals for updates; a FIN close: key + created only, since its entry stays live after the report); the drop key + value + interval). The same kernel fact always gets the same
  id (a re-export after a collector crash deduplicates downstream), and distinct facts differ.
  boot id is included because CLOCK_MONOTONIC restarts at boot.
- `network.community_id` is Community ID v1 of the 5-tuple. It is absent when it cannot be formed
  exactly: drop summaries (no 5-tuple) and ICMP messages other than echo (the event does not carry
  the ICMP code).
- The flow table holds open flows (start seen), keyed by 5-tuple + opening direction, bounded by
  `max_flows`; when full the least recently active flow is evicted and counted. Its end record still
  comes out (the kernel's flow_end carries start time and totals); it only loses the interface the
  start was seen on when the end comes from conntrack.
- Nothing is dropped silently: batches with an unknown event type or family count as decode errors
  (stats() and ledger.lost("decode", reason, n)).

Cost: ring-buffer events are built batch-shaped (records/events.py): ~3-5 µs per record in CPython
(one dict literal per kind and one BLAKE2b; inet_ntop and SHA-1 once per distinct flow tuple);
conntrack, drop and audit records, a few per second, ~10-20 µs each through the BuilderBase helpers.
"""
from __future__ import annotations

from .base import ECS_VERSION, SCHEMA_VERSION, TRANSPORT_NAMES, BuilderBase
from .conntrack import ConntrackRecords
from .dns import DnsRecords
from .drops import DropRecords
from .events import EventRecords
from .timefmt import iso_ns, parse_iso_ns

__all__ = ["RecordBuilder", "SCHEMA_VERSION", "ECS_VERSION", "iso_ns", "parse_iso_ns", "TRANSPORT_NAMES"]


class RecordBuilder(EventRecords, ConntrackRecords, DropRecords, DnsRecords, BuilderBase):
    """Builds canonical records from kernel batches: on_events (ring buffer), on_conntrack (scan),
    on_drop_summaries / on_drop_overflow (drop aggregation), on_audit, on_dns; tick() for housekeeping.
    Not thread-safe: one pipeline task owns it. Constructor: records.base.BuilderBase."""
