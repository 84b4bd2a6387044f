"""Incidents: the anomalies one attack opens, correlated into one (docs/alerting.md "One incident, one page").

A flood from one /24 opens anomalies on several keys at once — its source prefix (drops and new flows),
the destination port it hits, and every drop reason it causes (udp_flood, default_deny, banned, ...).
They are one attack, so they are one incident, and one alert (collector/alert_push.py):

    source   an anomaly keyed by a source prefix names it; any other anomaly (port, reason) takes the
             prefix of its biggest top talker (anomaly records list individual sources with counts;
             masked to anomaly.prefix_v4 / prefix_v6). An anomaly without either joins the incident of
             this host that changed last, if one is open, else it is an incident of its own
             ("<dimension>:<value>").
    key      the source prefix (or that "<dimension>:<value>"): the incident's identity. The alert's labels
             are a function of the key and the host only, so the same attack gives the same label set —
             the same Alertmanager fingerprint — after a retry, a refresh or a collector restart, even one
             that lost this module's state.
    members  the open anomalies in it (by anomaly id, sticky: an anomaly stays in the incident it joined).
             The incident ends when its last member closes; its targets (ports, reasons), signals,
             peak rate, top talkers and highest severity band are what the alert's annotations say.
    paging   once any member reaches `min_severity`; an incident that never pages is never posted.

Restarts: open incidents are persisted (`state()` / `restore()`); a restored incident has no members (the
anomalies of the previous run were closed with it) and stays open `restart_grace_s` for its attack's
anomalies to open again in the new run — with the same key, so Alertmanager sees the same alert go on.

Pure and single-threaded; feed() is O(records × talkers), the tables are bounded by `max_incidents`.
"""
from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass, field

__all__ = ["ALERTNAME", "Correlator", "Incident", "alert_of", "fingerprint"]

ALERTNAME = "HostwallAnomalyHighSeverity"      # the Prometheus rule's name: same runbook, routes, inhibitions
STATE_VERSION = 1
TOP_TALKERS = 5


@dataclass
class Incident:
    key: str                                          # source prefix, or "<dimension>:<value>"
    host: str
    source: str | None                                # the source prefix, when the key is one
    starts_at: float
    updated_at: float
    members: dict[str, str] = field(default_factory=dict)     # anomaly id -> severity band
    targets: dict[str, None] = field(default_factory=dict)    # "udp/5353", "reason udp_flood" (ordered set)
    signals: dict[str, None] = field(default_factory=dict)
    talkers: dict[str, int] = field(default_factory=dict)     # source address -> highest count reported
    peak_rate: float = 0.0
    severity: str = ""
    paging: bool = False
    ended_at: float | None = None
    orphan_until: float | None = None                 # restored after a restart: open until then without members

    @property
    def open(self) -> bool:
        return self.ended_at is None


def fingerprint(labels: dict[str, str]) -> str:
    """A stable id of a label set (Alertmanager's own fingerprint is a hash of the sorted labels too)."""
    text = "\x00".join(f"{k}\x01{v}" for k, v in sorted(labels.items()))
    return hashlib.blake2b(text.encode(), digest_size=8).hexdigest()


class Correlator:
    """feed(anomaly records) -> the incidents they changed; expire(now) ends restored incidents whose
    attack did not come back. `bands`: anomaly.severity_bands (name -> minimum score)."""

    def __init__(self, host: str, bands: dict[str, float], *, min_severity: str = "high", prefix_v4: int = 24,
                 prefix_v6: int = 64, max_incidents: int = 1000, restart_grace_s: float = 60.0):
        self.host = host
        self.rank = {name: i for i, (name, _) in enumerate(sorted(bands.items(), key=lambda kv: kv[1]))}
        self.min_rank = self.rank.get(min_severity, len(self.rank))
        self.prefix_v4, self.prefix_v6 = prefix_v4, prefix_v6
        self.max_incidents = max_incidents
        self.restart_grace_s = restart_grace_s
        self.incidents: dict[str, Incident] = {}
        self._member_of: dict[str, str] = {}           # anomaly id -> incident key
        self.counters = {"incidents": 0, "ended": 0, "refused": 0, "restored": 0, "rejoined": 0}

    # ---- input ---------------------------------------------------------------------------------------
    def feed(self, records, now: float) -> list[Incident]:
        changed: dict[str, Incident] = {}
        for rec in records:
            a = (rec.get("hostwall") or {}).get("anomaly")
            if not a or not a.get("id"):
                continue
            inc = self._on_anomaly(a, now)
            if inc is not None:
                changed[inc.key] = inc
        return list(changed.values())

    def expire(self, now: float) -> list[Incident]:
        """Restored incidents whose grace ran out without an anomaly of theirs: ended now."""
        out = []
        for inc in self.incidents.values():
            if inc.open and not inc.members and inc.orphan_until is not None and now >= inc.orphan_until:
                self._end(inc, now)
                out.append(inc)
        return out

    def forget_ended(self) -> None:
        """Drop ended incidents (after their resolve was handed to the pusher)."""
        for k in [k for k, inc in self.incidents.items() if not inc.open]:
            del self.incidents[k]

    def open_incidents(self) -> list[Incident]:
        return [inc for inc in self.incidents.values() if inc.open]

    def _on_anomaly(self, a: dict, now: float) -> Incident | None:
        aid, state = a["id"], a.get("state")
        key = self._member_of.get(aid)
        inc = self.incidents.get(key) if key else None
        if state == "close":
            if inc is None:
                return None
            inc.members.pop(aid, None)
            self._member_of.pop(aid, None)
            self._absorb(inc, a, now)
            if not inc.members and inc.open:
                self._end(inc, now)
            return inc
        if inc is None or not inc.open:
            inc = self._incident_for(a, now)
            if inc is None:
                return None
            self._member_of[aid] = inc.key
        if inc.orphan_until is not None:
            inc.orphan_until = None
            self.counters["rejoined"] += 1
        inc.members[aid] = a.get("severity") or ""
        self._absorb(inc, a, now)
        return inc

    def _incident_for(self, a: dict, now: float) -> Incident | None:
        k = a.get("key") or {}
        source = self._source_of(a)
        if source is not None:
            key = source
        else:
            recent = [i for i in self.incidents.values() if i.open]
            if recent:
                return max(recent, key=lambda i: i.updated_at)
            key = f"{k.get('dimension', '')}:{k.get('value', '')}"
        inc = self.incidents.get(key)
        if inc is not None and inc.open:
            return inc
        if len(self.open_incidents()) >= self.max_incidents:
            self.counters["refused"] += 1
            return None
        self.counters["incidents"] += 1
        inc = self.incidents[key] = Incident(key, self.host, source, now, now)
        return inc

    def _source_of(self, a: dict) -> str | None:
        k = a.get("key") or {}
        if k.get("dimension") == "source_prefix" and k.get("value"):
            return str(k["value"])
        talkers = [t for t in a.get("top_talkers") or () if t.get("source")]
        if not talkers:
            return None
        top = max(talkers, key=lambda t: (t.get("count", 0), t["source"]))
        try:
            ip = ipaddress.ip_address(top["source"])
        except ValueError:
            return None
        plen = self.prefix_v4 if ip.version == 4 else self.prefix_v6
        return str(ipaddress.ip_network(f"{ip}/{plen}", strict=False))

    def _absorb(self, inc: Incident, a: dict, now: float) -> None:
        """The anomaly's facts into the incident: targets, signal, peak rate, talkers, severity."""
        k = a.get("key") or {}
        dim, value = k.get("dimension"), k.get("value")
        if dim == "destination_port" and value:
            inc.targets.setdefault(str(value), None)
        elif dim == "reason" and value:
            inc.targets.setdefault(f"reason {value}", None)
        if k.get("signal"):
            inc.signals.setdefault(str(k["signal"]), None)
        inc.peak_rate = max(inc.peak_rate, float(a.get("peak_rate") or a.get("rate") or 0.0))
        for t in a.get("top_talkers") or ():
            src = t.get("source")
            if src:
                inc.talkers[src] = max(inc.talkers.get(src, 0), int(t.get("packets") or t.get("count") or 0))
        if len(inc.talkers) > 4 * TOP_TALKERS:
            inc.talkers = dict(sorted(inc.talkers.items(), key=lambda kv: -kv[1])[: 2 * TOP_TALKERS])
        sev = a.get("severity") or ""
        if self.rank.get(sev, -1) > self.rank.get(inc.severity, -1):
            inc.severity = sev
        if self.rank.get(inc.severity, -1) >= self.min_rank:
            inc.paging = True
        inc.updated_at = now

    def _end(self, inc: Incident, now: float) -> None:
        inc.ended_at, inc.updated_at = now, now
        for aid in list(inc.members):
            self._member_of.pop(aid, None)
        inc.members.clear()
        self.counters["ended"] += 1

    # ---- persistence -------------------------------------------------------------------------------
    def state(self) -> dict:
        """The open incidents, JSON-ready (members are not kept: a restart closes them)."""
        return {"version": STATE_VERSION, "incidents": [
            {"key": i.key, "host": i.host, "source": i.source, "starts_at": i.starts_at, "severity": i.severity,
             "paging": i.paging, "targets": list(i.targets), "signals": list(i.signals), "peak_rate": i.peak_rate,
             "talkers": dict(sorted(i.talkers.items(), key=lambda kv: -kv[1])[:TOP_TALKERS])}
            for i in self.open_incidents()]}

    def restore(self, data: dict, now: float) -> int:
        """Open incidents of the previous run, kept open `restart_grace_s` for their attack to come back."""
        if not isinstance(data, dict) or data.get("version") != STATE_VERSION:
            return 0
        n = 0
        for d in data.get("incidents") or ():
            try:
                inc = Incident(str(d["key"]), str(d.get("host") or self.host), d.get("source"),
                               float(d["starts_at"]), now, severity=str(d.get("severity") or ""),
                               paging=bool(d.get("paging")), peak_rate=float(d.get("peak_rate") or 0.0),
                               targets=dict.fromkeys(d.get("targets") or ()),
                               signals=dict.fromkeys(d.get("signals") or ()),
                               talkers={str(s): int(c) for s, c in (d.get("talkers") or {}).items()},
                               orphan_until=now + self.restart_grace_s)
            except (KeyError, TypeError, ValueError):
                continue
            self.incidents[inc.key] = inc
            n += 1
        self.counters["restored"] += n
        return n


def alert_of(inc: Incident, *, now: float, hold_s: float, runbook_url: str,
             labels: tuple[tuple[str, str], ...] = ()) -> dict:
    """The incident as one alert of Alertmanager's API v2 (POST /api/v2/alerts). Labels depend on the host
    and the key only (a stable fingerprint); what changes while it lasts is in the annotations. endsAt: the
    end, or now + hold_s while open (Alertmanager resolves it by itself if no refresh comes)."""
    lab = {"alertname": ALERTNAME, "service": "hostwall", "severity": "critical", "host": inc.host,
           "incident": inc.key, "dimension": "source_prefix" if inc.source else inc.key.split(":", 1)[0],
           "key": inc.source or inc.key.split(":", 1)[-1], **dict(labels)}
    targets = ", ".join(inc.targets) or "-"
    talkers = ", ".join(f"{s} ({c})" for s, c in sorted(inc.talkers.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_TALKERS])
    who = f"from {inc.source}" if inc.source else f"on {inc.key}"
    ann = {
        "summary": f"attack {who} on {inc.host}: {targets} ({inc.severity or 'anomaly'})",
        "description": (f"The collector's anomaly detector correlated {len(inc.members) or 'the'} open anomalies of one "
                        f"attack {who} ({', '.join(inc.signals) or 'drops'}): targets {targets}; peak "
                        f"{inc.peak_rate:.0f}/s; top talkers {talkers or '-'}. Pushed by the collector itself "
                        "(alerting.alertmanager); the Prometheus rule of the same name is the backstop."),
        "runbook_url": runbook_url, "targets": targets, "top_talkers": talkers or "-",
        "peak_rate": f"{inc.peak_rate:.1f}/s", "anomaly_severity": inc.severity or "-",
        "signals": ",".join(inc.signals) or "-",
    }
    end = inc.ended_at if inc.ended_at is not None else now + hold_s
    return {"labels": lab, "annotations": ann, "startsAt": _rfc3339(inc.starts_at), "endsAt": _rfc3339(end)}


def _rfc3339(t: float) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
