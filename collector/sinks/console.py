"""Console sink: a live, readable summary for demos and on-call eyes (rich), not a data store.

Shows top flows by bytes, drops by reason (from drop summaries), recent deny samples and anomalies,
and record counts per kind. Aggregation is O(1) per record into bounded tables (at most
`max_flows` flows, LRU-trimmed); rendering runs at `refresh_hz` from its own task.
Full-queue policy: drop_oldest (a screen shows the present; it must never slow the pipeline), so it is
best_effort: the pipeline never waits for it before releasing kernel data (docs/collector.md "End-to-end
acknowledgement"). Records are "delivered" once folded into the summary.
"""
from __future__ import annotations

import asyncio
from collections import Counter, OrderedDict, deque
from typing import Any

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from .base import BaseSink, Durability, FullQueuePolicy


def _get(d: Any, *path: str, default: Any = None) -> Any:
    for p in path:
        if not isinstance(d, dict) or p not in d:
            return default
        d = d[p]
    return d


def kind_of(record: dict) -> str:
    """Record kind: flow, log, deny, drop_summary, anomaly, audit (hostwall.kind, else event.dataset)."""
    k = _get(record, "hostwall", "kind")
    if k:
        return str(k)
    ds = _get(record, "event", "dataset", default="") or ""
    return ds.split(".", 1)[1] if ds.startswith("hostwall.") else (ds or "other")


def _human(n: float) -> str:
    for unit in ("", "k", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
        n /= 1000
    return f"{n:.1f}P"


def _plain(*cells) -> list[Text]:
    """Record data as literal text: never interpreted as rich markup ('[high]', IPv6 brackets)."""
    return [Text(str(c)) for c in cells]


class Summary:
    """The aggregates behind the screen (separate from rendering so tests can check them)."""

    def __init__(self, max_flows: int = 1000, recent: int = 8):
        self.kinds: Counter = Counter()
        self.flows: OrderedDict[tuple, list[int]] = OrderedDict()    # key -> [bytes, packets]
        self.drops: Counter = Counter()                               # (reason, verdict) -> packets
        self.denies: deque = deque(maxlen=recent)
        self.anomalies: deque = deque(maxlen=recent)
        self.max_flows = max_flows

    def add(self, r: dict) -> None:
        k = kind_of(r)
        self.kinds[k] += 1
        if k == "flow":
            key = (_get(r, "network", "transport", default="?"), _get(r, "source", "ip"), _get(r, "source", "port"),
                   _get(r, "destination", "ip"), _get(r, "destination", "port"))
            v = self.flows.pop(key, None) or [0, 0]
            v[0] = max(v[0], int(_get(r, "network", "bytes", default=0) or 0))
            v[1] = max(v[1], int(_get(r, "network", "packets", default=0) or 0))
            self.flows[key] = v
            while len(self.flows) > self.max_flows:
                self.flows.popitem(last=False)
        elif k == "drop_summary":
            pk = _get(r, "network", "packets", default=None)
            if pk is None:
                pk = _get(r, "source", "packets", default=0)
            self.drops[(_get(r, "hostwall", "reason", default="?"), _get(r, "hostwall", "verdict", default="drop"))] \
                += int(pk or 0)
        elif k == "deny":
            self.denies.append(r)
        elif k == "anomaly":
            self.anomalies.append(r)

    def render(self, top: int = 10) -> Group:
        flows = Table(title="top flows (bytes)", expand=True)
        for c in ("proto", "source", "destination", "bytes", "packets"):
            flows.add_column(c, justify="right" if c in ("bytes", "packets") else "left")
        for key, (b, p) in sorted(self.flows.items(), key=lambda kv: -kv[1][0])[:top]:
            flows.add_row(*_plain(key[0], f"{key[1]}:{key[2]}", f"{key[3]}:{key[4]}", _human(b), _human(p)))
        drops = Table(title="drops by reason (packets)", expand=True)
        drops.add_column("reason")
        drops.add_column("verdict")
        drops.add_column("packets", justify="right")
        for (reason, verdict), n in self.drops.most_common(top):
            drops.add_row(*_plain(reason, verdict, _human(n)))
        recent = Table(title="recent denies / anomalies", expand=True)
        recent.add_column("what")
        recent.add_column("detail")
        for r in list(self.denies)[-4:]:
            recent.add_row(*_plain("deny", f"{_get(r, 'source', 'ip')} → {_get(r, 'destination', 'ip')}:"
                                           f"{_get(r, 'destination', 'port')} {_get(r, 'hostwall', 'reason', default='')}"))
        for r in self.anomalies:
            a = _get(r, "hostwall", "anomaly", default={}) or {}
            key = a.get("key") or {}
            recent.add_row(*_plain(f"anomaly {a.get('state', '')} [{a.get('severity', '')}]",
                                   r.get("message") or f"{key.get('dimension', '')} {key.get('value', '')} "
                                                        f"score {a.get('score', '')}"))
        counts = " · ".join(f"{k} {v}" for k, v in sorted(self.kinds.items())) or "no records yet"
        return Group(Text.assemble(("hostwall collector", "bold"), f"  records: {counts}"), flows, drops, recent)


class ConsoleSink(BaseSink):
    full_queue_policy = FullQueuePolicy.DROP_OLDEST
    durability = Durability.BEST_EFFORT

    def __init__(self, *, refresh_hz: float = 2.0, console: Console | None = None, name: str = "console"):
        super().__init__(name)
        self.summary = Summary()
        self.console = console or Console()
        self.refresh_hz = refresh_hz
        self._live: Live | None = None
        self._task: asyncio.Task | None = None

    @classmethod
    def from_spec(cls, spec, config) -> ConsoleSink:
        return cls(name=spec.name)

    async def start(self) -> None:
        self._live = Live(self.summary.render(), console=self.console, auto_refresh=False, transient=False)
        self._live.start()
        self._task = asyncio.create_task(self._refresh(), name="console-refresh")

    async def _refresh(self) -> None:
        while True:
            await asyncio.sleep(1.0 / self.refresh_hz)
            self._live.update(self.summary.render(), refresh=True)

    async def _send(self, records: list[dict]) -> None:
        for r in records:
            self.summary.add(r)
        self._deliver(len(records))

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._live:
            self._live.update(self.summary.render(), refresh=True)
            self._live.stop()
            self.console.line()
            self._live = None
