"""The anomaly detector with direct alert push (docs/alerting.md "Direct push"): wraps
collector.anomaly.AnomalyDetector (the pipeline's Detector, collector/parts.py) so that the anomaly
records each tick returns are correlated into incidents (collector/incidents.py) and the incidents that
page are posted to Alertmanager (collector/alert_push.py):

    open      an incident reaches alerting.min_severity: posted at once (endsAt = now + hold)
    refresh   every alerting.refresh_interval while open, and whenever it changes (a target, a talker,
              a higher band joins): posted again with the same labels, endsAt moved on
    resolve   its last anomaly closed: posted with endsAt = the close
    restart   open incidents are kept in `<status stem>.alerts.json` (rewritten when they change); the
              next run restores them and goes on refreshing them while the attack's anomalies open again
              (incidents.Correlator.restore), so Alertmanager sees one alert throughout — no second page,
              no resolve-and-fire. A clean stop does not resolve anything for the same reason: an alert
              nobody refreshes any more resolves by itself after `hold`.

Nothing here blocks the pipeline: tick() does dict work and a small file write when incidents changed;
the HTTP requests run in the pusher's task. The pusher's state (posted, failures by reason, last error)
is part of the detector's stats, hence of the status file and the self-metrics (collector/metrics.py).
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson

from .alert_push import AlertPusher
from .incidents import Correlator, Incident, alert_of

log = logging.getLogger("hostwall.collector.alerting")

__all__ = ["AlertingDetector", "default_labels"]


def default_labels(cfg) -> tuple[tuple[str, str], ...]:
    """alerting.labels, with `instance` = metrics.prometheus when that names a host (not 0.0.0.0 / [::]):
    the instance label Prometheus gives this collector's alerts, so the deployed inhibitions (collector down,
    the backstop rule held back by the pushed alert) match both kinds. Set it when Prometheus scrapes
    another address."""
    labels = dict(cfg.alerting.labels)
    listen = cfg.metrics.prometheus or ""
    host = listen.rsplit(":", 1)[0].strip("[]")
    if "instance" not in labels and listen and host not in ("", "0.0.0.0", "::"):
        labels["instance"] = listen
    return tuple(sorted(labels.items()))


class AlertingDetector:
    """A Detector (collector/parts.py) that also pushes incidents. `inner`: the AnomalyDetector."""

    def __init__(self, inner: Any, pusher: AlertPusher, correlator: Correlator, *, hold_s: float,
                 refresh_interval_s: float, runbook_url: str, labels: tuple[tuple[str, str], ...] = (),
                 state_path: str | os.PathLike | None = None):
        self.inner, self.pusher, self.correlator = inner, pusher, correlator
        self.hold_s, self.refresh_s, self.runbook_url, self.labels = hold_s, refresh_interval_s, runbook_url, labels
        self.state_path = Path(state_path) if state_path else None
        self._refreshed = 0.0
        self.state_errors = 0
        self._restored: dict | None = self._load() if self.state_path is not None else None

    @classmethod
    def from_config(cls, cfg, inner: Any, hostname: str, state_path: str | os.PathLike | None) -> AlertingDetector:
        a, an = cfg.alerting, inner.cfg
        pusher = AlertPusher(a.alertmanager, timeout_s=a.timeout_s, max_alerts=a.max_alerts,
                             retry_cap_s=a.refresh_interval_s, hold_s=a.hold_s)
        # a restored incident waits for its attack's anomalies to open again: one warm-up if the
        # baselines are gone, a couple of windows if not
        grace = max(2 * a.refresh_interval_s, (an.warmup_windows + 2) * an.window_s)
        corr = Correlator(hostname, an.severity_bands, min_severity=a.min_severity, prefix_v4=an.prefix_v4,
                          prefix_v6=an.prefix_v6, max_incidents=a.max_alerts, restart_grace_s=grace)
        return cls(inner, pusher, corr, hold_s=a.hold_s, refresh_interval_s=a.refresh_interval_s,
                   runbook_url=a.runbook_url, labels=default_labels(cfg), state_path=state_path)

    # ---- the Detector protocol ------------------------------------------------------------------------
    @property
    def bucket_s(self) -> float:
        return self.inner.bucket_s

    def observe(self, records: list[dict]) -> None:
        self.inner.observe(records)

    def open_anomalies(self) -> list[dict]:
        return self.inner.open_anomalies()

    def tick(self, now: float | None = None) -> list[dict]:
        recs = self.inner.tick(now)
        self.pusher.start()                              # on the pipeline's loop (no-op without one)
        self.step(recs, time.time() if now is None else float(now))
        return recs

    def stats(self) -> dict:
        st = self.inner.stats()
        st["alerting"] = {**self.pusher.stats(), "incidents_open": len(self.correlator.open_incidents()),
                          "incidents_paging": sum(i.paging for i in self.correlator.open_incidents()),
                          **self.correlator.counters, "state_errors": self.state_errors}
        return st

    # ---- incidents → alerts ----------------------------------------------------------------------------
    def step(self, records: list[dict], now: float) -> list[Incident]:
        """Correlate this tick's anomaly records, post what changed and what is due for a refresh."""
        if self._restored is not None:                   # the grace of restored incidents starts now
            n = self.correlator.restore(self._restored, now)
            self._restored = None
            if n:
                log.info("restored %d open incident(s) of the previous run from %s", n, self.state_path)
        changed = self.correlator.feed(records, now) + self.correlator.expire(now)
        due = now - self._refreshed >= self.refresh_s
        posted = {i.key: i for i in changed if i.paging}
        if due:
            self._refreshed = now
            posted.update((i.key, i) for i in self.correlator.open_incidents() if i.paging)
        for inc in posted.values():
            self.pusher.put(alert_of(inc, now=now, hold_s=self.hold_s, runbook_url=self.runbook_url,
                                     labels=self.labels))
        if changed:
            self.correlator.forget_ended()
            self._save()
        return list(posted.values())

    def _save(self) -> None:
        if self.state_path is None:
            return
        tmp = self.state_path.with_name(f".{self.state_path.name}.tmp{os.getpid()}")
        try:
            self.state_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(orjson.dumps(self.correlator.state()))
            os.replace(tmp, self.state_path)
        except OSError as e:
            self.state_errors += 1
            if self.state_errors in (1, 10, 100):
                log.warning("cannot write the incident state %s: %s", self.state_path, e)

    def _load(self) -> dict | None:
        try:
            return orjson.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError) as e:
            log.warning("incident state %s unusable (%s): starting without it", self.state_path, e)
            return None
