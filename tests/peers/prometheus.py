"""A real Prometheus server (Debian's package) on 127.0.0.1 for tests.

    prom = PrometheusServer({"collector": ["127.0.0.1:9464"]}, scrape_interval="1s")
    prom.start()                                            # waits for /-/ready
    prom.set_targets({"smoke": ["127.0.0.1:8000"]})         # rewrite config + POST /-/reload
    prom.wait_for_targets_up("smoke")
    prom.wait_for_query('my_metric{job="smoke"}')           # instant query through /api/v1/query
    prom.query("sum(rate(x[1m]))")                          # -> data.result (list of series)
    prom.close()

    PrometheusServer(targets, rule_files=["dashboards/alerts/hostwall.rules.yml"],
                     alertmanagers=[am.url])                # evaluates the rules, sends alerts (API v2)

The server never touches the Debian service: its own config, its own TSDB in the work folder, a free port,
``--web.enable-lifecycle`` for reloads. Scrape and evaluation interval default to 1 s so tests wait little.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.parse
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from . import SETUP_HINT, PeerBase, PeerError, PeerNotInstalled, PeerProcess, free_ports, http_get, wait_until

__all__ = ["PrometheusServer", "prometheus_binary"]

Targets = Mapping[str, Iterable[str]] | Iterable[str] | None


def prometheus_binary() -> Path:
    """``$HOSTWALL_PROMETHEUS`` or ``prometheus`` in PATH (Debian: /usr/bin/prometheus)."""
    env = os.environ.get("HOSTWALL_PROMETHEUS")
    found = env or shutil.which("prometheus") or ("/usr/bin/prometheus" if os.path.exists("/usr/bin/prometheus")
                                                   else None)
    if not found or not os.access(found, os.X_OK):
        raise PeerNotInstalled(f"prometheus is not installed: {SETUP_HINT}")
    return Path(found)


def _jobs(targets: Targets) -> dict[str, list[str]]:
    if targets is None:
        return {}
    if isinstance(targets, Mapping):
        return {job: list(ts) for job, ts in targets.items()}
    return {"test": list(targets)}


class PrometheusServer(PeerBase):
    """Prometheus scraping ``targets`` (``{job: ["host:port", ...]}`` or a list for job ``test``).

    ``rule_files`` are copied into the config (checked by Prometheus at start/reload); ``scrape_configs``
    (raw dicts) are appended as they are, for relabelling or a metrics_path other than /metrics.
    ``alertmanagers`` (``http://host:port`` or ``host:port``) get the alerts of those rules (``alerting:``
    section, API v2); the rules are evaluated every ``scrape_interval``, and firing alerts are re-sent as often
    (``--rules.alert.resend-delay``, 1 m by default): a fresh server evaluates its rules before its notifier
    has discovered the Alertmanager and drops those first sends (prometheus_notifications_dropped_total), so
    with the default the first notification would come a minute late.
    """

    name = "prometheus"

    def __init__(self, targets: Targets = None, *, scrape_interval: str = "1s",
                 workdir: str | os.PathLike[str] | None = None, binary: Path | None = None,
                 rule_files: Iterable[str | os.PathLike[str]] = (),
                 scrape_configs: Iterable[Mapping[str, Any]] = (), extra_args: Iterable[str] = (),
                 alertmanagers: Iterable[str] = ()) -> None:
        self.binary = Path(binary) if binary else prometheus_binary()
        super().__init__(workdir)
        self.host = "127.0.0.1"
        (self.port,) = free_ports(1)
        self.scrape_interval = scrape_interval
        self.jobs = _jobs(targets)
        self.rule_files = [str(Path(p).resolve()) for p in rule_files]
        self.extra_scrape_configs = [dict(c) for c in scrape_configs]
        self.extra_args = list(extra_args)
        self.alertmanagers = [a.split("://", 1)[-1].rstrip("/") for a in alertmanagers]
        self.config_path = self.workdir / "prometheus.yml"
        self.data_dir = self.workdir / "data"

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (API under /api/v1)."""
        return f"http://{self.host}:{self.port}"

    @property
    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).split("\n", 1)[0]

    # -- configuration
    def config(self) -> dict[str, Any]:
        scrape = [{"job_name": job, "scrape_interval": self.scrape_interval, "scrape_timeout": self.scrape_interval,
                   "static_configs": [{"targets": targets}]} for job, targets in self.jobs.items()]
        doc: dict[str, Any] = {
            "global": {"scrape_interval": self.scrape_interval, "evaluation_interval": self.scrape_interval},
            "rule_files": self.rule_files,
            "scrape_configs": scrape + self.extra_scrape_configs,
        }
        if self.alertmanagers:
            doc["alerting"] = {"alertmanagers": [{"api_version": "v2",
                                                  "static_configs": [{"targets": self.alertmanagers}]}]}
        return doc

    def _write_config(self) -> None:
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.config(), indent=2))  # JSON is YAML
        tmp.replace(self.config_path)

    # -- life cycle
    def _launch(self, timeout: float) -> None:
        self._write_config()
        argv = [self.binary, f"--config.file={self.config_path}", f"--storage.tsdb.path={self.data_dir}",
                f"--web.listen-address={self.host}:{self.port}", "--web.enable-lifecycle",
                "--storage.tsdb.retention.time=1d", "--log.level=info", *self.extra_args]
        if self.alertmanagers and not any(a.startswith("--rules.alert.resend-delay") for a in self.extra_args):
            argv.append(f"--rules.alert.resend-delay={self.scrape_interval}")
        self.process = PeerProcess(argv, name="prometheus", log_path=self.log_path, cwd=self.workdir)
        self._wait_ready(lambda: http_get(f"{self.url}/-/ready", timeout=1.0)[0] == 200, timeout,
                         f"{self.url}/-/ready")

    def set_targets(self, targets: Targets, *, replace: bool = True, timeout: float = 30.0) -> None:
        """Change the scrape targets (``replace=False`` adds jobs) and reload the running server."""
        jobs = _jobs(targets)
        self.jobs = jobs if replace else {**self.jobs, **jobs}
        if self.running:
            self.reload(timeout=timeout)

    def reload(self, timeout: float = 30.0) -> None:
        """Rewrite the config and POST /-/reload; raises PeerError if Prometheus rejects it."""
        self._write_config()
        status, body = http_get(f"{self.url}/-/reload", method="POST", data=b"", timeout=timeout)
        if status != 200:
            raise PeerError(f"prometheus: reload failed ({status}): {body.decode(errors='replace')}")

    # -- HTTP API
    def api(self, path: str, params: Mapping[str, Any] | None = None, timeout: float = 10.0) -> Any:
        """GET /api/v1/<path>; returns ``data`` of a success answer, raises PeerError otherwise."""
        qs = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, body = http_get(f"{self.url}/api/v1/{path}{qs}", timeout=timeout)
        try:
            doc = json.loads(body)
        except json.JSONDecodeError:
            raise PeerError(f"prometheus: /api/v1/{path} -> {status}: {body[:500]!r}") from None
        if status != 200 or doc.get("status") != "success":
            raise PeerError(f"prometheus: /api/v1/{path} -> {status}: {doc.get('errorType')}: {doc.get('error')}")
        return doc["data"]

    def query(self, expr: str, *, time: float | None = None, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Instant query: ``data.result`` (for a vector, a list of ``{"metric": {...}, "value": [ts, "v"]}``)."""
        params: dict[str, Any] = {"query": expr}
        if time is not None:
            params["time"] = time
        data = self.api("query", params, timeout=timeout)
        return data["result"]

    def query_value(self, expr: str) -> float | None:
        """The single value of an instant query (None when the result is empty; error if several series)."""
        res = self.query(expr)
        if not res:
            return None
        if isinstance(res, list) and len(res) == 1:
            return float(res[0]["value"][1])
        if isinstance(res, list) and len(res) == 2 and not isinstance(res[0], dict):  # scalar/string
            return float(res[1])
        raise PeerError(f"prometheus: {expr!r} returned {len(res)} series, expected one")

    def wait_for_query(self, expr: str, match: Callable[[list[dict[str, Any]]], bool] = bool, *,
                       timeout: float = 30.0) -> list[dict[str, Any]]:
        """Poll an instant query until ``match(result)`` holds (default: non-empty); returns the result."""
        def check():
            res = self.query(expr)
            return res if match(res) else None
        return wait_until(check, timeout, f"query {expr!r}", interval=0.5, alive=self._check_alive)

    def targets(self) -> list[dict[str, Any]]:
        """Active targets (job, scrapeUrl, health, lastError, ...)."""
        return self.api("targets", {"state": "active"})["activeTargets"]

    def wait_for_targets_up(self, job: str | None = None, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until every active target (of ``job``) has been scraped successfully."""
        def check():
            ts = [t for t in self.targets() if job is None or t["labels"].get("job") == job]
            return ts if ts and all(t["health"] == "up" for t in ts) else None
        return wait_until(check, timeout, f"targets of job {job or '*'} up", interval=0.5, alive=self._check_alive)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<PrometheusServer {self.url} jobs={list(self.jobs)} {state} {self.workdir}>"
