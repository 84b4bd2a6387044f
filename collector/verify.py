"""`hostwall-collector verify`: is what landed complete? (docs/records.md "Completeness")

Reads the records a sink wrote — a JSONL file (with its rotated siblings PATH.N … PATH.1, oldest first)
or a Kafka topic from its beginning to the end offsets it had when verify started — and reports, per host
(observer.hostname) and stream (hostwall.stream): the hostwall.seq ranges received, duplicates (a repeated
event.id; sent again under a new seq — a restarted detector re-opening the anomaly it had open — it still
fills that seq), gaps between the lowest and highest seq received, which of those gaps loss records explain
(hostwall.kind "loss", action records-lost: a sink's own report of the seqs it lost and why), and which
gaps nothing explains. A SIEM team can run it on its side of the pipe: it needs only the records.

Loss records are fanned out to every sink, so what one sink wrote carries the others' reports too; only
those of the sink that wrote what is read explain its gaps (docs/records.md "Completeness"): `sinks`, from
--sink or inferred from the target (own_sinks). A gap covered only by another sink's report stays
unexplained and is counted apart (`other_sink`), so a JSONL sink's silent loss cannot hide behind the
Kafka sink's reported loss of the same seqs. No pipeline-wide loss record covers seqs (collector-restart
records carry none: what the collector lost before numbering consumes no seq).

Exit 0 when no gap is unexplained and no seq was reused by another event, 1 otherwise, 2 on bad input.
Records without hostwall.seq (written before it existed) are counted as `unsequenced`. ECS records only
(OCSF sinks carry the same fields under `unmapped.hostwall`, which is read too).

Cost: O(records) time; memory O(event ids + seqs) of what is read (~100 B per record).
"""
from __future__ import annotations

import asyncio
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson

__all__ = ["StreamReport", "Verifier", "own_sinks", "read_jsonl", "read_kafka", "verify"]


def _ranges(seqs: Iterable[int]) -> list[list[int]]:
    out: list[list[int]] = []
    for s in sorted(seqs):
        if out and s == out[-1][1] + 1:
            out[-1][1] = s
        elif not out or s > out[-1][1]:
            out.append([s, s])
    return out


def _count(ranges: list[list[int]]) -> int:
    return sum(b - a + 1 for a, b in ranges)


def _subtract(gaps: list[list[int]], cover: list[list[int]]) -> list[list[int]]:
    """gaps (sorted, disjoint) minus the union of cover (sorted by start; overlaps allowed): O(gaps ×
    cover ranges), never their seqs."""
    out = []
    for a, b in gaps:
        cur = a
        for c, d in cover:
            if d < cur or c > b:
                continue
            if c > cur:
                out.append([cur, c - 1])
            cur = max(cur, d + 1)
            if cur > b:
                break
        if cur <= b:
            out.append([cur, b])
    return out


@dataclass
class StreamReport:
    host: str
    stream: str
    received: int = 0                     # distinct seqs
    duplicates: int = 0                   # records whose event.id was seen before
    conflicts: int = 0                    # a seq carried by two different event ids
    ranges: list[list[int]] = field(default_factory=list)
    gaps: list[list[int]] = field(default_factory=list)
    explained: list[list[int]] = field(default_factory=list)
    unexplained: list[list[int]] = field(default_factory=list)
    lost_reported: dict[str, int] = field(default_factory=dict)   # reason -> records the sink's loss records report
    other_sink: list[list[int]] = field(default_factory=list)     # unexplained, but another sink reported them
    other_sinks: dict[str, int] = field(default_factory=dict)     # other sink -> records its loss records report

    @property
    def ok(self) -> bool:
        return not self.unexplained and not self.conflicts

    def as_dict(self) -> dict:
        return {"host": self.host, "stream": self.stream, "received": self.received, "duplicates": self.duplicates,
                "conflicts": self.conflicts, "ranges": self.ranges, "first": self.ranges[0][0] if self.ranges else None,
                "last": self.ranges[-1][1] if self.ranges else None, "gaps": _count(self.gaps),
                "gap_ranges": self.gaps, "explained": _count(self.explained), "unexplained": _count(self.unexplained),
                "unexplained_ranges": self.unexplained[:100], "lost_reported": self.lost_reported, "ok": self.ok,
                "other_sink": _count(self.other_sink), "other_sink_ranges": self.other_sink[:100],
                "other_sinks": self.other_sinks}

    def line(self) -> str:
        span = f"seq {self.ranges[0][0]}..{self.ranges[-1][1]} in {len(self.ranges)} range(s)" if self.ranges \
            else "no seqs"
        bad = ""
        if self.unexplained:
            shown = ", ".join(f"{a}..{b}" if a != b else str(a) for a, b in self.unexplained[:5])
            bad = f" [{shown}{', ...' if len(self.unexplained) > 5 else ''}]"
        if self.other_sink:
            bad += (f" ({_count(self.other_sink)} covered only by another sink's loss records: "
                    f"{', '.join(sorted(self.other_sinks))})")
        return (f"host {self.host} stream {self.stream}: received {self.received} ({span}), duplicates "
                f"{self.duplicates}, gaps {_count(self.gaps)} (explained by loss records {_count(self.explained)}), "
                f"unexplained {_count(self.unexplained)}{bad}"
                + (f", seq conflicts {self.conflicts}" if self.conflicts else "") + (" ok" if self.ok else " INCOMPLETE"))


class Verifier:
    """Feed records (dicts) with add(); report() analyses them. Loss records of `sinks` (exact names, as
    in hostwall.loss.sink) explain gaps; those of any other sink do not."""

    def __init__(self, sinks: set[str] | None = None) -> None:
        self.sinks: set[str] = set(sinks or ())
        self.sink_names: set[str] = set()             # every sink a loss record named
        self.records = 0
        self.unsequenced = 0
        self.undecodable = 0
        self._ids: set[str] = set()
        self._seqs: dict[tuple[str, str], dict[int, str]] = defaultdict(dict)
        self._dups: dict[tuple[str, str], int] = defaultdict(int)
        self._conflicts: dict[tuple[str, str], int] = defaultdict(int)
        # (host, stream) -> sink -> the ranges / reason -> count its loss records report
        self._covered: dict[tuple[str, str], dict[str, list[list[int]]]] = defaultdict(lambda: defaultdict(list))
        self._reported: dict[tuple[str, str], dict[str, dict[str, int]]] = defaultdict(
            lambda: defaultdict(lambda: defaultdict(int)))

    def add(self, rec: dict) -> None:
        self.records += 1
        hw = rec.get("hostwall") or (rec.get("unmapped") or {}).get("hostwall") or {}
        host = (rec.get("observer") or {}).get("hostname") or (rec.get("device") or {}).get("hostname") or ""
        eid = (rec.get("event") or {}).get("id") or (rec.get("metadata") or {}).get("uid") or ""
        if eid and eid in self._ids:
            if "seq" in hw:
                self._dups[(host, hw.get("stream", ""))] += 1
                # the same event sent again under a new seq (a restarted detector re-opening the same
                # anomaly): that seq arrived, with a copy; it is not a gap
                seq, key = hw.get("seq"), (host, hw.get("stream", ""))
                if isinstance(seq, int) and seq not in self._seqs[key]:
                    self._seqs[key][seq] = eid
            return
        if eid:
            self._ids.add(eid)
        if hw.get("kind") == "loss":
            loss = hw.get("loss") or {}
            if loss.get("stream") and loss.get("ranges"):
                key, sink = (host, loss["stream"]), loss.get("sink", "")
                self.sink_names.add(sink)
                self._covered[key][sink] += [list(r) for r in loss["ranges"]]
                self._reported[key][sink][loss.get("reason", "")] += int(loss.get("count", 0))
        seq = hw.get("seq")
        if not isinstance(seq, int):
            self.unsequenced += 1
            return
        key = (host, hw.get("stream", ""))
        have = self._seqs[key].get(seq)
        if have is not None and have != eid:
            self._conflicts[key] += 1
            return
        self._seqs[key][seq] = eid

    def report(self) -> list[StreamReport]:
        out = []
        for key in sorted(set(self._seqs) | set(self._covered)):
            host, stream = key
            seqs = self._seqs.get(key, {})
            rs = StreamReport(host, stream, received=len(seqs), duplicates=self._dups.get(key, 0),
                              conflicts=self._conflicts.get(key, 0), ranges=_ranges(seqs))
            rs.gaps = [[a[1] + 1, b[0] - 1] for a, b in zip(rs.ranges, rs.ranges[1:])]
            covered, reported = self._covered.get(key, {}), self._reported.get(key, {})
            own = sorted(r for s, rr in covered.items() if s in self.sinks for r in rr)
            other = sorted(r for s, rr in covered.items() if s not in self.sinks for r in rr)
            rs.unexplained = _subtract(rs.gaps, own)
            rs.explained = _subtract(rs.gaps, rs.unexplained)
            rs.other_sink = _subtract(rs.unexplained, _subtract(rs.unexplained, other))
            for s, by_reason in reported.items():
                if s in self.sinks:
                    for reason, n in by_reason.items():
                        rs.lost_reported[reason] = rs.lost_reported.get(reason, 0) + n
                else:
                    rs.other_sinks[s] = sum(by_reason.values())
            out.append(rs)
        return out


def own_sinks(target: str, names: Iterable[str]) -> set[str]:
    """Which of the sink `names` wrote `target`: for a JSONL file `jsonl:PATH` with PATH the same file
    (the sink names its absolute path, config.parse_sink); for a topic `kafka://HOST:PORT` with HOST:PORT
    one of the target's bootstrap servers (sink names carry no topic). Empty when none matches."""
    kind, where, _ = parse_target(target)
    if kind == "jsonl":
        return {n for n in names if n.startswith("jsonl:") and _same_file(n.removeprefix("jsonl:"), where)}
    brokers = {b.strip().lower() for b in where.split(",")}
    return {n for n in names if n.startswith("kafka://") and n.removeprefix("kafka://").rstrip("/").lower() in brokers}


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:                                   # a path absent here (e.g. only its rotated siblings)
        return os.path.realpath(a) == os.path.realpath(b)


# ---- readers -------------------------------------------------------------------------------------

def _rotated(path: Path) -> list[Path]:
    """PATH.N … PATH.1, PATH: oldest first (collector/sinks/jsonl.py rotation)."""
    olds = []
    for p in path.parent.glob(path.name + ".*"):
        m = re.fullmatch(re.escape(path.name) + r"\.([0-9]+)", p.name)
        if m:
            olds.append((int(m.group(1)), p))
    return [p for _, p in sorted(olds, reverse=True)] + ([path] if path.exists() else [])


def read_jsonl(path: str | os.PathLike, counter: Verifier | None = None) -> Iterator[dict]:
    files = _rotated(Path(path))
    if not files:
        raise FileNotFoundError(f"{path}: no such file")
    for p in files:
        with open(p, "rb") as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    yield orjson.loads(line)
                except orjson.JSONDecodeError:
                    if counter is not None:
                        counter.undecodable += 1


async def read_kafka(bootstrap: str, topic: str, options=None, timeout_s: float = 120.0) -> list[dict]:
    """Every message of `topic` from the beginning to its end offsets as of now (KafkaOptions for TLS/SASL)."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka.structs import TopicPartition

    from .sinks.kafka_client import client_kwargs, sasl_password, ssl_context
    kw = {}
    if options is not None:
        kw = client_kwargs(options, ssl_context(options, f"kafka://{bootstrap}"), sasl_password(options, bootstrap))
    c = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False,
                         group_id=None, fetch_max_bytes=64 << 20, max_partition_fetch_bytes=16 << 20, **kw)
    await asyncio.wait_for(c.start(), 30)
    out: list[dict] = []
    try:
        cluster = await asyncio.wait_for(c._client.fetch_all_metadata(), 30)     # aiokafka is pinned
        parts = cluster.partitions_for_topic(topic)
        if not parts:
            raise LookupError(f"kafka://{bootstrap}/{topic}: no such topic")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        await c.seek_to_beginning(*tps)
        end = await c.end_offsets(tps)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            behind = [tp for tp in tps if await c.position(tp) < end[tp]]
            if not behind:
                break
            if loop.time() > deadline:
                raise TimeoutError(f"kafka://{bootstrap}/{topic}: not read to its end within {timeout_s:g}s")
            got = await c.getmany(timeout_ms=500, max_records=50_000)
            for msgs in got.values():
                for m in msgs:
                    if m.offset < end[TopicPartition(m.topic, m.partition)]:
                        out.append(orjson.loads(m.value))
    finally:
        await c.stop()
    return out


def parse_target(target: str) -> tuple[str, str, str]:
    """("jsonl", path, "") | ("kafka", "host:port", topic)."""
    m = re.fullmatch(r"kafka://([^/]+)/(.+)", target)
    if m:
        return "kafka", m.group(1), m.group(2)
    if target.startswith("kafka://"):
        raise ValueError(f"{target}: give the topic, kafka://HOST:PORT/TOPIC")
    return "jsonl", target.removeprefix("jsonl:"), ""


def verify(targets: list[str], options=None, timeout_s: float = 120.0,
           sinks: Iterable[str] = ()) -> tuple[list[StreamReport], Verifier]:
    """Read every target into one Verifier (records of several files or topics of one pipeline may be
    checked together) and report. `sinks`: the names whose loss records explain gaps; none given, the
    sinks own_sinks infers for the targets."""
    v = Verifier(set(sinks))
    for t in targets:
        kind, where, topic = parse_target(t)
        if kind == "jsonl":
            for rec in read_jsonl(where, v):
                v.add(rec)
        else:
            for rec in asyncio.run(read_kafka(where, topic, options, timeout_s)):
                v.add(rec)
    if not v.sinks:
        v.sinks = set().union(*(own_sinks(t, v.sink_names) for t in targets))
    return v.report(), v
