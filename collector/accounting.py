"""Loss ledger: every record the collector was meant to ship is delivered, counted as lost (with a
stage and a reason), or still in flight. Never silent.

Unit: records. Something that never became a record still counts as one record produced and lost:
an event the kernel could not put in the ring buffer (kernel: budget, ringbuf_full — folded in from
hw_ev_stats) and an event read from the ring that could not be decoded (decode: length, ...).

Records flow through two parts, each with its own balance:

    upstream   produced = lost_upstream + fanned_out + in_flight_upstream
    each sink  fanned_out = delivered + lost_sink + in_flight_sink        (every sink gets every record)

so for every sink:  produced = delivered + (lost_upstream + lost_sink) + (in_flight_upstream + in_flight_sink),
which is what `status` shows. In-flight counts are derived from the counters; `check()` compares
them with what the pipeline observes in its queues (a miscount shows up as a mismatch or as a
negative in-flight count), and at quiescence they must be 0.

Cost: dict updates per batch (not per record). Single-threaded: call from the event loop only.
"""
from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass, field


@dataclass
class _Lane:
    delivered: int = 0
    lost: Counter = field(default_factory=Counter)     # reason -> records


class Ledger:
    def __init__(self, sinks=()):
        self.produced_by: Counter = Counter()                        # source -> records
        self.lost_by: defaultdict[str, Counter] = defaultdict(Counter)   # stage -> reason -> records
        self.fanned_out = 0
        self.lanes: dict[str, _Lane] = {s: _Lane() for s in sinks}
        self.kernel_totals: dict[str, dict[str, int]] = {}
        self.flow_counts: dict[str, dict[str, int]] = {}    # flow aggregation drained, per kind
        self._kernel_last: dict[tuple[str, str], int] | None = None
        self.drop_packets: Counter = Counter()                       # summarized | overflow -> packets

    # ---- counting --------------------------------------------------------------------------------
    def produce(self, source: str, n: int) -> None:
        if n:
            self.produced_by[source] += n

    def lose(self, stage: str, reason: str, n: int, *, produced: str | None = None) -> None:
        """n records lost before fan-out. `produced`: also count them as produced by that source
        (for things that were never records, e.g. undecodable events)."""
        if n:
            if produced:
                self.produced_by[produced] += n
            self.lost_by[stage][reason] += n

    def lost(self, stage: str, reason: str, n: int) -> None:
        """A record that could never be built (e.g. the record builder rejected an event): counted as
        produced by `stage` and lost there. (RecordBuilder's ledger hook.)"""
        self.lose(stage, reason, n, produced=stage)

    def fan_out(self, n: int) -> None:
        """n records handed to every sink lane."""
        self.fanned_out += n

    def add_sink(self, name: str) -> None:
        if name in self.lanes:
            raise ValueError(f"duplicate sink {name!r}")
        if self.fanned_out:
            raise RuntimeError("sinks must be registered before the first record is fanned out")
        self.lanes[name] = _Lane()

    def deliver(self, sink: str, n: int) -> None:
        self.lanes[sink].delivered += n

    def sink_lose(self, sink: str, reason: str, n: int) -> None:
        if n:
            self.lanes[sink].lost[reason] += n

    def fold_kernel(self, totals: dict[str, dict[str, int]]) -> None:
        """Fold cumulative kernel event outcomes ({type: {emitted, budget, ringbuf_full, aggregated}}).

        The first call is the baseline (losses before this collector started are not its own);
        later calls add the increase of `budget` and `ringbuf_full` as records produced and lost at
        stage "kernel" (a counter that went down, i.e. a reloaded datapath, restarts from 0).
        Emitted events are counted when they are read from the ring; `aggregated` ones are not lost:
        they arrive in the flow summaries (docs/collector.md, "Flows under a flood")."""
        self.kernel_totals = {t: dict(o) for t, o in totals.items()}
        flat = {(t, o): v for t, outs in totals.items() for o, v in outs.items()
                if o not in ("emitted", "aggregated")}
        last, self._kernel_last = self._kernel_last, flat
        if last is None:
            return
        for key, v in flat.items():
            prev = last.get(key, 0)
            new = v - prev if v >= prev else v
            if new > 0:
                self.lose("kernel", key[1], new, produced="kernel")

    def count_flows(self, totals: dict[str, dict[str, int]]) -> None:
        """Flows the datapath counted in aggregate (hostwall.bpf.flow_agg.FlowDrain.totals), per kind:
        not records, counts; they add up to hw_flow_stats (docs/collector.md)."""
        for kind, c in totals.items():
            acc = self.flow_counts.setdefault(kind, {})
            for f, n in c.items():
                acc[f] = acc.get(f, 0) + n

    def set_kernel_baseline(self, totals: dict[str, dict[str, int]]) -> None:
        """Continue from the counters a previous run folded last (its checkpoint), instead of taking the
        kernel's current counters as a new zero: what the kernel counted while no collector ran is then
        counted by the next fold_kernel() (docs/collector.md "Restarts")."""
        self._kernel_last = {(t, o): int(v) for t, outs in (totals or {}).items() for o, v in outs.items()
                             if o not in ("emitted", "aggregated")}

    def kernel_baseline(self) -> dict[str, dict[str, int]]:
        """The loss counters as last folded ({type: {outcome: count}}), what set_kernel_baseline() takes:
        a restart that continues from them counts only what the kernel counted after this fold."""
        out: dict[str, dict[str, int]] = {}
        for (t, o), v in (self._kernel_last or {}).items():
            out.setdefault(t, {})[o] = v
        return out

    def count_drops(self, summarized_packets: int, overflow_packets: int) -> None:
        self.drop_packets["summarized"] += summarized_packets
        self.drop_packets["overflow"] += overflow_packets

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def produced(self) -> int:
        return sum(self.produced_by.values())

    @property
    def lost_upstream(self) -> int:
        return sum(sum(c.values()) for c in self.lost_by.values())

    @property
    def in_flight_upstream(self) -> int:
        return self.produced - self.lost_upstream - self.fanned_out

    def in_flight(self, sink: str) -> int:
        lane = self.lanes[sink]
        return self.fanned_out - lane.delivered - sum(lane.lost.values())

    def balance(self, sink: str) -> dict[str, int]:
        """produced = delivered + lost + in_flight, as seen by one sink."""
        lane = self.lanes[sink]
        return {"produced": self.produced, "delivered": lane.delivered,
                "lost": self.lost_upstream + sum(lane.lost.values()),
                "in_flight": self.in_flight_upstream + self.in_flight(sink)}

    def check(self, observed: dict[str, int] | None = None, *, quiescent: bool = False) -> list[str]:
        """Violations of the invariants (empty list = consistent).

        observed: in-flight counts the pipeline sees, keys "upstream" and sink names. quiescent:
        nothing may be in flight (after a flush)."""
        bad = []
        flights = {"upstream": self.in_flight_upstream} | {s: self.in_flight(s) for s in self.lanes}
        for where, n in flights.items():
            if n < 0:
                bad.append(f"{where}: in_flight {n} < 0 (counted out more than in)")
            if quiescent and n != 0:
                bad.append(f"{where}: {n} records in flight at quiescence (neither delivered nor counted lost)")
            if observed is not None and where in observed and observed[where] != n:
                bad.append(f"{where}: ledger says {n} in flight, queues hold {observed[where]}")
        for s in self.lanes:
            b = self.balance(s)
            if b["produced"] != b["delivered"] + b["lost"] + b["in_flight"]:
                bad.append(f"{s}: produced {b['produced']} != delivered + lost + in_flight {b}")
        return bad

    def snapshot(self, observed: dict[str, int] | None = None) -> dict:
        """JSON-ready state for the status file."""
        violations = self.check(observed)
        return {
            "produced": self.produced,
            "produced_by_source": dict(sorted(self.produced_by.items())),
            "lost_upstream": self.lost_upstream,
            "lost_by_stage": {st: dict(sorted(c.items())) for st, c in sorted(self.lost_by.items()) if c},
            "fanned_out": self.fanned_out,
            "in_flight_upstream": self.in_flight_upstream,
            "sinks": {s: {**self.balance(s), "lost_in_sink": dict(sorted(lane.lost.items())),
                          "in_flight_in_sink": self.in_flight(s)} for s, lane in self.lanes.items()},
            "kernel_events": self.kernel_totals,
            "flow_aggregates": self.flow_counts,
            "drop_packets": dict(self.drop_packets),
            "ok": not violations,
            "violations": violations,
        }
