"""Canonical record → OpenTelemetry log record fields, as a plain dict:

    {time_unix_nano, observed_time_unix_nano, severity_number, severity_text, body, attributes}

The OTLP sink maps this onto the SDK's LogRecord. Attributes use OpenTelemetry semantic-convention
names where one exists and the `hostwall.` namespace otherwise; values are str/int/float/bool or
homogeneous lists of them (what OTLP AnyValue carries):

  network.transport, network.type, network.interface.name,
  source.address/port, destination.address/port,
  process.pid, process.executable.name, process.executable.path,
  container.id, container.name, container.image.name, container.runtime,
  k8s.pod.uid, k8s.pod.name, k8s.namespace.name, host.name, event.name, log.record.uid (= event.id)
  hostwall.*  everything else, flattened with dots (hostwall.verdict, hostwall.rule.name,
              hostwall.community_id, hostwall.source.bytes, hostwall.anomaly.score, ...)

Severity: allowed traffic and summaries INFO (9); denied/would-deny packet samples WARN (13);
anomalies by band low WARN (13), medium WARN2 (14), high ERROR (17), critical FATAL (21);
audit INFO (9). The body is a one-line human summary.
"""
from __future__ import annotations

from ..records import parse_iso_ns

__all__ = ["to_otel", "SEVERITY_TEXT"]

SEVERITY_TEXT = {9: "INFO", 13: "WARN", 14: "WARN2", 17: "ERROR", 21: "FATAL"}
_ANOMALY_SEVERITY = {"low": 13, "medium": 14, "high": 17, "critical": 21}
_OTEL_TRANSPORT = {"tcp": "tcp", "udp": "udp", "icmp": "icmp", "ipv6-icmp": "icmp", "sctp": "sctp"}


def _severity(rec: dict) -> int:
    hw = rec.get("hostwall", {})
    kind = hw.get("kind")
    if kind == "anomaly":
        return _ANOMALY_SEVERITY.get(hw.get("anomaly", {}).get("severity"), 13)
    if kind == "deny":
        return 13
    return 9


def _flatten(prefix: str, value, out: dict) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}", v, out)
    elif isinstance(value, list):
        if value and all(isinstance(v, (str, int, float, bool)) for v in value) \
                and len({type(v) for v in value}) == 1:
            out[prefix] = list(value)
        elif value:
            for i, v in enumerate(value):          # lists of objects (top talkers): index them
                _flatten(f"{prefix}.{i}", v, out)
    elif value is not None and value != "":
        out[prefix] = value


def _semconv(rec: dict) -> dict:
    a: dict = {}
    net, src, dst = rec.get("network", {}), rec.get("source", {}), rec.get("destination", {})
    if net.get("transport"):
        a["network.transport"] = _OTEL_TRANSPORT.get(net["transport"], net["transport"])
    if net.get("type"):
        a["network.type"] = net["type"]
    iface = rec.get("hostwall", {}).get("interface", {})
    if iface.get("name"):
        a["network.interface.name"] = iface["name"]
    for side, d in (("source", src), ("destination", dst)):
        if "ip" in d:
            a[f"{side}.address"] = d["ip"]
        if "port" in d:
            a[f"{side}.port"] = d["port"]
    proc = rec.get("process", {})
    if "pid" in proc:
        a["process.pid"] = proc["pid"]
    if proc.get("name"):
        a["process.executable.name"] = proc["name"]
    if proc.get("executable"):
        a["process.executable.path"] = proc["executable"]
    c = rec.get("container", {})
    for k, name in (("id", "container.id"), ("name", "container.name"), ("runtime", "container.runtime")):
        if c.get(k):
            a[name] = c[k]
    if c.get("image", {}).get("name"):
        a["container.image.name"] = c["image"]["name"]
    orch = rec.get("orchestrator", {})
    res = orch.get("resource", {})
    if res.get("type") == "pod":
        if res.get("id"):
            a["k8s.pod.uid"] = res["id"]
        if res.get("name"):
            a["k8s.pod.name"] = res["name"]
    if orch.get("namespace"):
        a["k8s.namespace.name"] = orch["namespace"]
    if rec.get("observer", {}).get("hostname"):
        a["host.name"] = rec["observer"]["hostname"]
    ev = rec.get("event", {})
    if ev.get("dataset"):
        a["event.name"] = ev["dataset"]
    if ev.get("id"):
        a["log.record.uid"] = ev["id"]
    return a


def _vendor(rec: dict) -> dict:
    out: dict = {}
    _flatten("hostwall", rec.get("hostwall", {}), out)
    if rec.get("rule"):
        _flatten("hostwall.rule", rec["rule"], out)
    net = rec.get("network", {})
    if net.get("community_id"):
        out["hostwall.community_id"] = net["community_id"]
    if net.get("direction"):
        out["hostwall.direction"] = net["direction"]
    for side in ("source", "destination"):
        for k in ("bytes", "packets"):
            if k in rec.get(side, {}):
                out[f"hostwall.{side}.{k}"] = rec[side][k]
    for k in ("bytes", "packets"):
        if k in net:
            out[f"hostwall.network.{k}"] = net[k]
    ev = rec.get("event", {})
    for k in ("action", "outcome", "kind"):
        if ev.get(k):
            out[f"hostwall.event.{k}"] = ev[k]
    if ev.get("type"):
        out["hostwall.event.type"] = list(ev["type"])
    out["hostwall.schema_version"] = rec.get("schema_version", "")
    return out


def _body(rec: dict) -> str:
    hw, net, ev = rec.get("hostwall", {}), rec.get("network", {}), rec.get("event", {})
    if hw.get("kind") == "anomaly":
        a = hw["anomaly"]
        return (f"anomaly {a['state']}: {a['key']['signal']} {a['key']['dimension']}={a['key']['value']} "
                f"rate {a['rate']:.1f}/s baseline {a['baseline']['rate']:.1f}/s score {a['score']:.1f}")
    if hw.get("kind") == "audit":
        p = hw.get("policy", {})
        return f"policy change {p.get('old_revision', '')} -> {p.get('new_revision', '')}"
    src, dst = rec.get("source", {}), rec.get("destination", {})
    s = f"{src.get('ip', '*')}{':' + str(src['port']) if 'port' in src else ''}"
    d = f"{dst.get('ip', '*')}{':' + str(dst['port']) if 'port' in dst else ''}"
    reason = f" {hw['reason']}" if hw.get("reason") else ""
    return f"{ev.get('action', hw.get('kind', ''))} {net.get('transport', '')} {s} -> {d} {hw.get('verdict', '')}{reason}"


def to_otel(rec: dict, observed_ns: int | None = None) -> dict:
    """The OTel log record dict of a canonical record (pure; `observed_ns` defaults to the record time)."""
    t = parse_iso_ns(rec["@timestamp"])
    sev = _severity(rec)
    return {"time_unix_nano": t, "observed_time_unix_nano": observed_ns if observed_ns is not None else t,
            "severity_number": sev, "severity_text": SEVERITY_TEXT[sev], "body": _body(rec),
            "attributes": {**_vendor(rec), **_semconv(rec)}}
