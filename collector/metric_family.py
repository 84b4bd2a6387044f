"""One metric family (name, kind, unit, help, labels, samples), as both outputs of the self-metrics
see it: the Prometheus exposition and the OTLP push (docs/metrics.md)."""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class Family:
    """One metric: prom name (without _total), OTel name, kind counter|gauge|histogram, unit (UCUM)."""
    prom: str
    otel: str
    kind: str
    unit: str
    help: str
    labels: tuple[str, ...] = ()
    samples: list = field(default_factory=list)     # (label values, value) | (label values, hist dict)

    def add(self, labels: Iterable[str], value) -> None:
        self.samples.append((tuple(str(v) for v in labels), value))


_UNIT_SUFFIX = {"By": "_bytes", "s": "_seconds"}


def prom_name(otel: str, unit: str) -> str:
    """The Prometheus name of an OTel metric, as the OTel Collector's prometheus exporter derives it
    (dots to underscores, base-unit suffix; `_total` is added for counters by the exposition)."""
    name = otel.replace(".", "_")
    suffix = _UNIT_SUFFIX.get(unit, "")
    return name if name.endswith(suffix) else name + suffix


def _fam(otel: str, kind: str, unit: str, help_: str, labels: tuple[str, ...] = ()) -> Family:
    return Family(prom_name(otel, unit), otel, kind, unit, help_, labels)
