"""Canonical record → OCSF 1.7.0 event dict.

  flow / log / deny / drop_summary / flow_summary → Network Activity (class_uid 4001, category 4)
      activity_id   flow start 1 Open, end 2 Close (3 Reset when ended by RST), update 6 Traffic;
                    log, deny and drop_summary 6 Traffic
      action_id     verdict allow 1 Allowed, drop 2 Denied, would_drop (audit) 1 Allowed
      disposition_id allow 1 Allowed, drop 2 Blocked, would_drop 15 Detected
      src/dst_endpoint  source/destination ip+port; the local side (destination for ingress, source
                    for egress) also carries this host's name, the interface and the container
                    (container profile: uid, name, runtime; the image name has no OCSF home without
                    the image's uid, which OCSF requires, so it goes to unmapped.container)
                    A prefix-keyed record (drop summary) has no host on the peer side: network_endpoint
                    has no attribute for a CIDR, so the prefix stays in unmapped.hostwall.source.prefix
                    and an endpoint left without any identifying attribute (ip, hostname, interface, …:
                    the object's at_least_one constraint) is moved to unmapped.<side> whole
      connection_info   protocol, IP version, direction (ingress 1 Inbound, egress 2 Outbound),
                    community_uid (Community ID)
      traffic       bytes_out/packets_out = from source (initiator), bytes_in/packets_in = from destination
      firewall_rule / policy   rule name + revision / ruleset + revision (security_control profile);
                    absent when no rule (or ruleset) is known: both objects need a name or uid
      count         packets of a drop summary; connections of a flow summary
  anomaly → Detection Finding (2004): activity open 1 Create, update 2 Update, close 3 Close
  audit   → Device Config State Change (5019), activity 99 Other ("Policy Apply", "SYN Proxy Switch")
  dns     → DNS Activity (4003), activity 2 Response (the answer the proxy gave): query {hostname, type,
            class, opcode}, rcode_id/rcode, src_endpoint = the client, dst_endpoint = the proxy (this
            host); refused: action 2 Denied, disposition 2 Blocked; upstream failure: action 3 Observed,
            disposition 27 Error, the upstreams' errors in status_detail

Everything hostwall-specific without an OCSF home (verdict, reason, cgroup, process, anomaly numbers,
prefixes, top talkers) goes to `unmapped`. Times are ms since the epoch (timestamp_t); `metadata.uid`
= event.id, `metadata.logged_time` = event.created. Every event validates against the official OCSF
1.7.0 schema with its profiles and constraints (tests/conformance/ocsf.py).
"""
from __future__ import annotations

from ..records import parse_iso_ns

__all__ = ["to_ocsf", "EncodeError", "OCSF_VERSION"]

OCSF_VERSION = "1.7.0"
_NET_KINDS = frozenset({"flow", "log", "deny", "drop_summary", "flow_summary"})
_ACTION = {"allow": (1, "Allowed"), "drop": (2, "Denied"), "would_drop": (1, "Allowed")}
_DISPOSITION = {"allow": (1, "Allowed"), "drop": (2, "Blocked"), "would_drop": (15, "Detected")}
_DIRECTION = {"ingress": 1, "egress": 2}
_SEVERITY = {"low": 2, "medium": 3, "high": 4, "critical": 5}
_FINDING_ACTIVITY = {"open": 1, "update": 2, "close": 3}
# network_endpoint's at_least_one constraint (OCSF 1.7.0)
_ENDPOINT_IDS = ("ip", "uid", "name", "hostname", "svc_name", "instance_uid", "interface_uid", "interface_name", "domain")


class EncodeError(ValueError):
    """The record cannot be mapped to the requested format (counted as an encoder loss)."""


def _ms(iso: str | None) -> int | None:
    return parse_iso_ns(iso) // 1_000_000 if iso else None


def _prune(d):
    """Drop None and empty containers, recursively (OCSF omits unknown attributes)."""
    if isinstance(d, dict):
        out = {k: _prune(v) for k, v in d.items()}
        return {k: v for k, v in out.items() if v is not None and v != {} and v != []}
    if isinstance(d, list):
        return [_prune(v) for v in d]
    return d


def _metadata(rec: dict, profiles: list[str]) -> dict:
    obs = rec.get("observer", {})
    ev = rec.get("event", {})
    return {"version": OCSF_VERSION, "uid": ev.get("id"), "log_name": ev.get("dataset"), "profiles": profiles,
            "logged_time": _ms(ev.get("created")),
            "product": {"name": obs.get("product", "hostwall"), "vendor_name": obs.get("vendor", "hostwall"),
                        "version": obs.get("version")}}


def _device(rec: dict) -> dict:
    return {"hostname": rec.get("observer", {}).get("hostname"), "type_id": 0}


def to_ocsf(rec: dict) -> dict:
    kind = rec.get("hostwall", {}).get("kind")
    try:
        if kind in _NET_KINDS:
            return _prune(_network_activity(rec, kind))
        if kind == "anomaly":
            return _prune(_detection_finding(rec))
        if kind == "loss":
            return _prune(_application_error(rec))
        if kind == "audit":
            return _prune(_config_change(rec))
        if kind == "dns":
            return _prune(_dns_activity(rec))
    except (KeyError, ValueError, TypeError) as e:
        raise EncodeError(f"ocsf: cannot map {kind} record {rec.get('event', {}).get('id', '?')}: {e!r}") from None
    raise EncodeError(f"ocsf: no OCSF mapping for record kind {kind!r}")


# ------------------------------------------------------------------------------ network activity

def _activity(rec: dict, kind: str) -> tuple[int, str]:
    if kind == "flow":
        types = rec["event"]["type"]
        if "start" in types:
            return 1, "Open"
        if "end" in types:
            return (3, "Reset") if rec["hostwall"].get("flow", {}).get("end_reason") == "rst" else (2, "Close")
    return 6, "Traffic"


def _endpoint(side: dict, local: bool, rec: dict) -> dict:
    ep = {"ip": side.get("ip"), "port": side.get("port")}
    if local:
        ep["hostname"] = rec.get("observer", {}).get("hostname")
        iface = rec["hostwall"].get("interface", {})
        ep["interface_name"] = iface.get("name")
        ep["interface_uid"] = str(iface["id"]) if "id" in iface else None
        c = rec.get("container")
        if c and (c.get("id") or c.get("name")):
            ep["container"] = {"uid": c.get("id"), "name": c.get("name"), "runtime": c.get("runtime"),
                               "pod_uuid": rec.get("orchestrator", {}).get("resource", {}).get("id")}
    return ep


def _named(obj: dict) -> dict | None:
    """firewall_rule / policy: only with a name (both objects need a name or uid)."""
    return obj if obj.get("name") else None


def _network_activity(rec: dict, kind: str) -> dict:
    hw, ev, net = rec["hostwall"], rec["event"], rec.get("network", {})
    verdict = hw.get("verdict", "allow")
    activity_id, activity_name = _activity(rec, kind)
    action_id, action = _ACTION.get(verdict, (0, "Unknown"))
    disp_id, disp = _DISPOSITION.get(verdict, (0, "Unknown"))
    direction = net.get("direction")
    src, dst = rec.get("source", {}), rec.get("destination", {})
    ip_ver = {"ipv4": 4, "ipv6": 6}.get(net.get("type"))
    out = {
        "class_uid": 4001, "class_name": "Network Activity", "category_uid": 4, "category_name": "Network Activity",
        "activity_id": activity_id, "activity_name": activity_name, "type_uid": 4001 * 100 + activity_id,
        "severity_id": 1, "time": _ms(rec["@timestamp"]), "start_time": _ms(ev.get("start")),
        "end_time": _ms(ev.get("end")),
        "duration": ev["duration"] // 1_000_000 if "duration" in ev else None,
        "action_id": action_id, "action": action, "disposition_id": disp_id, "disposition": disp,
        "metadata": _metadata(rec, ["host", "security_control", "container"]),
        "device": _device(rec),
        "src_endpoint": _endpoint(src, direction == "egress", rec),
        "dst_endpoint": _endpoint(dst, direction == "ingress", rec),
        "connection_info": {"protocol_num": int(net["iana_number"]) if "iana_number" in net else None,
                            "protocol_name": net.get("transport"), "protocol_ver_id": ip_ver,
                            "direction_id": _DIRECTION.get(direction, 0), "community_uid": net.get("community_id"),
                            "tcp_flags": hw.get("tcp_flags")},
        "traffic": {"bytes_out": src.get("bytes"), "packets_out": src.get("packets"), "bytes_in": dst.get("bytes"),
                    "packets_in": dst.get("packets"), "bytes": net.get("bytes"), "packets": net.get("packets")},
        "count": net.get("packets") if kind == "drop_summary" else
        hw["summary"]["flows"] if kind == "flow_summary" else None,
        "firewall_rule": _named({"name": rec.get("rule", {}).get("name"), "version": rec.get("rule", {}).get("version")}),
        "policy": _named({"name": rec.get("rule", {}).get("ruleset"), "version": rec.get("rule", {}).get("version")}),
        "message": _message(rec, kind),
        "unmapped": {"hostwall": hw, "process": rec.get("process"), "orchestrator": rec.get("orchestrator"),
                     "container": {"image": rec.get("container", {}).get("image")}},
    }
    for name in ("src_endpoint", "dst_endpoint"):
        ep = _prune(out[name])
        if not any(k in ep for k in _ENDPOINT_IDS):              # e.g. a prefix's port: no host to name
            out["unmapped"][name] = ep or None
            out[name] = None
    if out["src_endpoint"] is None and out["dst_endpoint"] is None:
        # an overflow summary: no key, no direction; the drops were this host's traffic
        out["dst_endpoint"] = {"hostname": rec.get("observer", {}).get("hostname")}
    return out


def _message(rec: dict, kind: str) -> str:
    hw, net = rec["hostwall"], rec.get("network", {})
    src, dst = rec.get("source", {}), rec.get("destination", {})
    what = rec["event"].get("action", kind)
    tup = f"{net.get('transport', net.get('iana_number', ''))} {src.get('ip', '*')}" \
          f"{':' + str(src['port']) if 'port' in src else ''} -> {dst.get('ip', '*')}" \
          f"{':' + str(dst['port']) if 'port' in dst else ''}"
    reason = f" ({hw['reason']})" if hw.get("reason") else ""
    return f"{what} {tup} {hw.get('verdict', '')}{reason}".strip()


# ---------------------------------------------------------------------------------- anomaly

def _detection_finding(rec: dict) -> dict:
    a = rec["hostwall"]["anomaly"]
    act = _FINDING_ACTIVITY[a["state"]]
    key = a["key"]
    return {
        "class_uid": 2004, "class_name": "Detection Finding", "category_uid": 2, "category_name": "Findings",
        "activity_id": act, "type_uid": 2004 * 100 + act, "severity_id": _SEVERITY.get(a.get("severity"), 0),
        "time": _ms(rec["@timestamp"]), "start_time": _ms(a["window"]["start"]), "end_time": _ms(a["window"]["end"]),
        "is_alert": a["state"] != "close",
        "metadata": _metadata(rec, ["host"]),
        "device": _device(rec),
        "finding_info": {"uid": a["id"], "title": f"Traffic anomaly: {key['signal']} by {key['dimension']} {key['value']}",
                         "desc": f"rate {a['rate']:.1f}/s vs baseline {a['baseline']['rate']:.1f}/s "
                                 f"(score {a['score']:.1f}, {a.get('severity', '')})",
                         "types": ["hostwall.anomaly", key["dimension"], key["signal"]],
                         "first_seen_time": _ms(a.get("opened_at")), "last_seen_time": _ms(a["window"]["end"])},
        "message": rec.get("message"),
        "unmapped": {"hostwall": rec["hostwall"]},
    }


# ------------------------------------------------------------------------------------ loss

def _application_error(rec: dict) -> dict:
    """A loss record (collector/loss_report.py): Application Error (6008), General Error; severity Medium
    for a sink's counted loss, High for a restart after a crash or reboot."""
    ev, loss = rec.get("event", {}), rec["hostwall"].get("loss", {})
    return {
        "class_uid": 6008, "class_name": "Application Error", "category_uid": 6,
        "category_name": "Application Activity", "activity_id": 1, "activity_name": "General Error",
        "type_uid": 6008 * 100 + 1, "severity_id": 4 if ev.get("action") == "collector-restart" else 3,
        "time": _ms(rec["@timestamp"]), "metadata": _metadata(rec, ["host"]), "device": _device(rec),
        "count": loss.get("count"), "message": rec.get("message"),
        "status_detail": f"{ev.get('action', '')}: {ev.get('reason', '')}",
        "unmapped": {"hostwall": rec["hostwall"]},
    }


# ------------------------------------------------------------------------------------ audit

def _config_change(rec: dict) -> dict:
    pol = rec["hostwall"].get("policy", {})
    sp = rec["hostwall"].get("syn_proxy")
    if sp:                                   # the SYN proxy switched itself (enforcer/syn_watch.py)
        what = f"port {sp['port']}" if "port" in sp else f"profile {sp.get('profile', '?')}"
        message = f"SYN proxy {sp['state']} for {what} ({sp['trigger']})"
    else:
        message = f"policy {pol.get('old_revision', '')} -> {pol.get('new_revision', '')} " \
                  f"({pol.get('old_rules', '?')} -> {pol.get('new_rules', '?')} rules)"
    return {
        "class_uid": 5019, "class_name": "Device Config State Change", "category_uid": 5, "category_name": "Discovery",
        "activity_id": 99, "activity_name": "SYN Proxy Switch" if sp else "Policy Apply", "type_uid": 5019 * 100 + 99,
        "severity_id": 1,
        "time": _ms(rec["@timestamp"]),
        "metadata": _metadata(rec, ["host"]),
        "device": _device(rec),
        "actor": {"user": {"name": rec.get("user", {}).get("name")}},
        "message": message,
        "unmapped": {"hostwall": rec["hostwall"]},
    }


# -------------------------------------------------------------------------------------- dns

_RCODE = {"NOERROR": (0, "NoError"), "FORMERR": (1, "FormError"), "SERVFAIL": (2, "ServError"),
          "NXDOMAIN": (3, "NXDomain"), "NOTIMP": (4, "NotImp"), "REFUSED": (5, "Refused")}


def _dns_activity(rec: dict) -> dict:
    d, net, hw = rec["dns"], rec.get("network", {}), rec["hostwall"]
    q = d.get("question", {})
    refused = hw.get("dns", {}).get("decision") == "refused"
    rcode_id, rcode = _RCODE.get(d.get("response_code", ""), (99, d.get("response_code", "Other")))
    src, dst = rec.get("source", {}), rec.get("destination", {})
    return {
        "class_uid": 4003, "class_name": "DNS Activity", "category_uid": 4, "category_name": "Network Activity",
        "activity_id": 2, "activity_name": "Response", "type_uid": 4003 * 100 + 2, "severity_id": 1 if refused else 2,
        "time": _ms(rec["@timestamp"]),
        "metadata": _metadata(rec, ["host", "security_control"]),
        "device": _device(rec),
        "src_endpoint": {"ip": src.get("ip"), "port": src.get("port")},
        "dst_endpoint": {"ip": dst.get("ip"), "port": dst.get("port"),
                         "hostname": rec.get("observer", {}).get("hostname")},
        "query": {"hostname": q.get("name") or ".", "type": q.get("type"), "class": q.get("class"),
                  "opcode": "Query", "opcode_id": 0, "packet_uid": int(d["id"]) if str(d.get("id", "")).isdigit() else None},
        "rcode_id": rcode_id, "rcode": rcode,
        "action_id": 2 if refused else 3, "action": "Denied" if refused else "Observed",
        "disposition_id": 2 if refused else 27, "disposition": "Blocked" if refused else "Error",
        "connection_info": {"protocol_name": net.get("transport"),
                            "protocol_num": int(net["iana_number"]) if "iana_number" in net else None,
                            "protocol_ver_id": {"ipv4": 4, "ipv6": 6}.get(net.get("type")), "direction_id": 0},
        "status_detail": rec.get("error", {}).get("message"),
        "message": f"{rec['event'].get('action', 'dns')}: {q.get('name', '')} {q.get('type', '')} -> {rcode}"
                   + (f" ({rec['event']['reason']})" if rec["event"].get("reason") else ""),
        "unmapped": {"hostwall": hw},
    }
