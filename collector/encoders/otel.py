"""Canonical record → OpenTelemetry log record fields, as a plain dict:

    {time_unix_nano, observed_time_unix_nano, severity_number, severity_text, body, event_name,
     attributes, schema_url}

The OTLP sink maps this onto the SDK's LogRecord; `schema_url` (https://opentelemetry.io/schemas/
SEMCONV_VERSION) goes on the instrumentation scope and the resource, as OTLP carries it. Attributes
follow the OpenTelemetry semantic conventions of SEMCONV_VERSION where one exists, no deprecated
name, and the `hostwall.` namespace otherwise (tests check every name against the
opentelemetry-semantic-conventions package); values are str/int/float/bool or homogeneous lists of
them (what OTLP AnyValue carries):

  network.transport (tcp | udp), network.type (ipv4 | ipv6), network.interface.name,
  network.io.direction (receive = ingress, transmit = egress, as this host sees it),
  source.address/port, destination.address/port: one host each, never a prefix (a prefix-keyed
      record has hostwall.source.prefix instead),
  client.address/port = the connection's initiator, server.address/port = its responder (flows),
  security_rule.name, security_rule.ruleset.name, security_rule.version (the policy rule),
  process.pid, process.executable.name, process.executable.path,
  container.id, container.name, container.image.name, container.runtime.name,
  k8s.pod.uid, k8s.pod.name, k8s.namespace.name, host.name, log.record.uid (= event.id)
  hostwall.*  everything else, flattened with dots (hostwall.verdict, hostwall.community_id,
              hostwall.source.bytes, hostwall.source.prefix, hostwall.anomaly.score, ...)

The event name (`event.dataset`, e.g. hostwall.flow) is the LogRecord's EventName field, not an
attribute (the `event.name` attribute is deprecated). Severity: allowed traffic and summaries INFO
(9); denied/would-deny packet samples WARN (13); anomalies by band low WARN (13), medium WARN2 (14),
high ERROR (17), critical FATAL (21); audit INFO (9). The body is a one-line human summary.
"""
from __future__ import annotations

from ..records import parse_iso_ns

__all__ = ["to_otel", "SEVERITY_TEXT", "SEMCONV_VERSION", "SCHEMA_URL"]

SEMCONV_VERSION = "1.44.0"
SCHEMA_URL = f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}"
SEVERITY_TEXT = {9: "INFO", 13: "WARN", 14: "WARN2", 17: "ERROR", 21: "FATAL"}
_ANOMALY_SEVERITY = {"low": 13, "medium": 14, "high": 17, "critical": 21}
_OTEL_TRANSPORT = {"tcp": "tcp", "udp": "udp"}          # network.transport's well-known values we see
_IO_DIRECTION = {"ingress": "receive", "egress": "transmit"}


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
    if net.get("transport") in _OTEL_TRANSPORT:
        a["network.transport"] = _OTEL_TRANSPORT[net["transport"]]
    if net.get("type"):
        a["network.type"] = net["type"]
    if net.get("direction") in _IO_DIRECTION:
        a["network.io.direction"] = _IO_DIRECTION[net["direction"]]
    iface = rec.get("hostwall", {}).get("interface", {})
    if iface.get("name"):
        a["network.interface.name"] = iface["name"]
    flow = rec.get("hostwall", {}).get("kind") == "flow"
    for side, d, role in (("source", src, "client"), ("destination", dst, "server")):
        if "ip" in d:                            # one host; a prefix (`address`) has no semconv home
            a[f"{side}.address"] = d["ip"]
            if flow:
                a[f"{role}.address"] = d["ip"]
        if "port" in d and ("ip" in d or side == "destination"):
            a[f"{side}.port"] = d["port"]
            if flow:
                a[f"{role}.port"] = d["port"]
    rule = rec.get("rule", {})
    for k, name in (("name", "security_rule.name"), ("ruleset", "security_rule.ruleset.name"),
                    ("version", "security_rule.version")):
        if rule.get(k):
            a[name] = rule[k]
    proc = rec.get("process", {})
    if "pid" in proc:
        a["process.pid"] = proc["pid"]
    if proc.get("name"):
        a["process.executable.name"] = proc["name"]
    if proc.get("executable"):
        a["process.executable.path"] = proc["executable"]
    c = rec.get("container", {})
    for k, name in (("id", "container.id"), ("name", "container.name"), ("runtime", "container.runtime.name")):
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
    if ev.get("id"):
        a["log.record.uid"] = ev["id"]
    return a


def _vendor(rec: dict) -> dict:
    out: dict = {}
    _flatten("hostwall", rec.get("hostwall", {}), out)
    net = rec.get("network", {})
    if net.get("transport") and net["transport"] not in _OTEL_TRANSPORT:
        out["hostwall.network.transport"] = net["transport"]
    if net.get("community_id"):
        out["hostwall.community_id"] = net["community_id"]
    if net.get("direction"):
        out["hostwall.direction"] = net["direction"]
    for side in ("source", "destination"):
        for k in ("bytes", "packets", "address"):
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
    for k in ("start", "end", "duration", "created"):
        if ev.get(k) is not None:
            out[f"hostwall.event.{k}"] = ev[k]
    return out


def _body(rec: dict) -> str:
    hw, net, ev = rec.get("hostwall", {}), rec.get("network", {}), rec.get("event", {})
    if hw.get("kind") == "anomaly":
        a = hw["anomaly"]
        return (f"anomaly {a['state']}: {a['key']['signal']} {a['key']['dimension']}={a['key']['value']} "
                f"rate {a['rate']:.1f}/s baseline {a['baseline']['rate']:.1f}/s score {a['score']:.1f}")
    if hw.get("kind") == "audit":
        sp = hw.get("syn_proxy")
        if sp:                                   # the SYN proxy switched itself (enforcer/syn_watch.py)
            what = f"port {sp['port']}" if "port" in sp else f"profile {sp.get('profile', '?')}"
            return f"SYN proxy {sp.get('state', '')} for {what} ({sp.get('trigger', '')})"
        p = hw.get("policy", {})
        return f"policy change {p.get('old_revision', '')} -> {p.get('new_revision', '')}"
    src, dst = rec.get("source", {}), rec.get("destination", {})
    s = f"{src.get('ip') or src.get('address', '*')}{':' + str(src['port']) if 'port' in src else ''}"
    d = f"{dst.get('ip') or dst.get('address', '*')}{':' + str(dst['port']) if 'port' in dst else ''}"
    reason = f" {hw['reason']}" if hw.get("reason") else ""
    return f"{ev.get('action', hw.get('kind', ''))} {net.get('transport', '')} {s} -> {d} {hw.get('verdict', '')}{reason}"


def to_otel(rec: dict, observed_ns: int | None = None) -> dict:
    """The OTel log record dict of a canonical record (pure; `observed_ns` defaults to the record time)."""
    t = parse_iso_ns(rec["@timestamp"])
    sev = _severity(rec)
    return {"time_unix_nano": t, "observed_time_unix_nano": observed_ns if observed_ns is not None else t,
            "severity_number": sev, "severity_text": SEVERITY_TEXT[sev], "body": _body(rec),
            "event_name": rec.get("event", {}).get("dataset") or None, "attributes": {**_vendor(rec), **_semconv(rec)},
            "schema_url": SCHEMA_URL}
