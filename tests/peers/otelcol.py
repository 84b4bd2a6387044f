"""A real OpenTelemetry Collector (our build, deploy/otelcol/manifest.yaml) on 127.0.0.1 for tests.

    col = OtelCollector()
    col.start()                                  # waits for health_check + both OTLP ports
    exporter endpoint: col.grpc_endpoint ("127.0.0.1:p", insecure) or col.http_endpoint ("http://127.0.0.1:p")
    col.wait_for_log_records(lambda r: r["body"] == "hello")    # from the file exporter's JSON lines
    col.wait_for_metric("hostwall.flows")                       # ditto, metrics
    col.wait_for_prometheus("hostwall_flows_total")             # prometheus exporter (col.prometheus_url)
    col.close()

Pipelines: logs, metrics and traces from the ``otlp`` receiver (gRPC + HTTP) to a ``file`` exporter per
signal (``logs.jsonl``, ``metrics.jsonl``, ``traces.jsonl`` in the work folder: one OTLP-JSON export request
per line) and to ``debug``; metrics also to ``prometheus``. No batch processor, so what a client exported is
written within ``file_flush_interval``. The collector's own metrics (e.g. ``otelcol_receiver_accepted_log_records``)
are on :attr:`telemetry_url`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import (
    SETUP_HINT,
    PeerBase,
    PeerError,
    PeerNotInstalled,
    PeerProcess,
    cache_dir,
    declared_version,
    free_ports,
    http_get,
    repo_root,
    tcp_open,
    wait_until,
)

__all__ = ["OtelCollector", "otelcol_binary", "otelcol_version", "any_value"]

SIGNALS = ("logs", "metrics", "traces")


def otelcol_version() -> str:
    """The collector version of deploy/otelcol/manifest.yaml (its otlpreceiver line)."""
    return declared_version(repo_root() / "deploy" / "otelcol" / "manifest.yaml",
                            r"go\.opentelemetry\.io/collector/receiver/otlpreceiver (v\S+)")


def otelcol_binary() -> Path:
    """``$HOSTWALL_OTELCOL`` or ``$HOSTWALL_CACHE/otelcol/<version>/otelcol-hostwall``."""
    env = os.environ.get("HOSTWALL_OTELCOL")
    path = Path(env) if env else cache_dir() / "otelcol" / otelcol_version() / "otelcol-hostwall"
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise PeerNotInstalled(f"OpenTelemetry Collector {otelcol_version()} is not installed at {path}: {SETUP_HINT}")
    return path


def any_value(v: Mapping[str, Any] | None) -> Any:
    """Decode an OTLP-JSON AnyValue (``{"stringValue": "x"}`` -> ``"x"``, kvlists/arrays recursively)."""
    if not v:
        return None
    (kind, val), = v.items()
    if kind == "intValue":
        return int(val)
    if kind == "arrayValue":
        return [any_value(x) for x in val.get("values", [])]
    if kind == "kvlistValue":
        return attributes(val.get("values", []))
    return val


def attributes(kvs: list[Mapping[str, Any]] | None) -> dict[str, Any]:
    """OTLP-JSON attribute list -> plain dict."""
    return {kv["key"]: any_value(kv.get("value")) for kv in kvs or []}


class OtelCollector(PeerBase):
    """The hostwall collector build, configured for tests; see the module docstring for the pipelines.

    ``config_overrides`` is merged (recursively, dicts only) into the generated config before start, e.g.
    ``{"exporters": {"debug": {"verbosity": "detailed"}}}``.
    """

    name = "otelcol"

    def __init__(self, *, workdir: str | os.PathLike[str] | None = None, binary: Path | None = None,
                 file_flush_interval: str = "100ms", debug_verbosity: str = "basic",
                 prometheus_namespace: str = "", config_overrides: Mapping[str, Any] | None = None) -> None:
        self.binary = Path(binary) if binary else otelcol_binary()
        super().__init__(workdir)
        self.version = otelcol_version()
        (self.grpc_port, self.http_port, self.prometheus_port,
         self.health_port, self.telemetry_port) = free_ports(5)
        self.host = "127.0.0.1"
        self.file_flush_interval = file_flush_interval
        self.debug_verbosity = debug_verbosity
        self.prometheus_namespace = prometheus_namespace
        self.config_overrides = dict(config_overrides or {})
        self.config_path = self.workdir / "config.yaml"
        self.files = {sig: self.workdir / f"{sig}.jsonl" for sig in SIGNALS}

    # -- connection info
    @property
    def grpc_endpoint(self) -> str:
        """``127.0.0.1:<port>``: OTLP/gRPC (plaintext: ``insecure=True``)."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_endpoint(self) -> str:
        """``http://127.0.0.1:<port>``: OTLP/HTTP base URL (signals at /v1/logs, /v1/metrics, /v1/traces)."""
        return f"http://{self.host}:{self.http_port}"

    @property
    def prometheus_url(self) -> str:
        """Prometheus exporter scrape URL (metrics received over OTLP)."""
        return f"http://{self.host}:{self.prometheus_port}/metrics"

    @property
    def prometheus_target(self) -> str:
        """``host:port`` of the prometheus exporter, for a Prometheus scrape config."""
        return f"{self.host}:{self.prometheus_port}"

    @property
    def health_url(self) -> str:
        return f"http://{self.host}:{self.health_port}/"

    @property
    def telemetry_url(self) -> str:
        """The collector's own metrics (otelcol_receiver_accepted_*, otelcol_exporter_sent_*, ...)."""
        return f"http://{self.host}:{self.telemetry_port}/metrics"

    # -- configuration
    def config(self) -> dict[str, Any]:
        h = self.host
        file_exporters = {f"file/{sig}": {"path": str(path), "format": "json",
                                          "flush_interval": self.file_flush_interval}
                          for sig, path in self.files.items()}
        prom: dict[str, Any] = {"endpoint": f"{h}:{self.prometheus_port}", "metric_expiration": "10m"}
        if self.prometheus_namespace:
            prom["namespace"] = self.prometheus_namespace
        cfg: dict[str, Any] = {
            "receivers": {"otlp": {"protocols": {"grpc": {"endpoint": f"{h}:{self.grpc_port}"},
                                                 "http": {"endpoint": f"{h}:{self.http_port}"}}}},
            "exporters": {"debug": {"verbosity": self.debug_verbosity}, **file_exporters, "prometheus": prom},
            "extensions": {"health_check": {"endpoint": f"{h}:{self.health_port}"}},
            "service": {
                "extensions": ["health_check"],
                "telemetry": {
                    "logs": {"level": "info"},
                    "metrics": {"level": "detailed", "readers": [{"pull": {"exporter": {"prometheus": {
                        "host": h, "port": self.telemetry_port}}}}]},
                },
                "pipelines": {
                    "logs": {"receivers": ["otlp"], "exporters": ["file/logs", "debug"]},
                    "metrics": {"receivers": ["otlp"], "exporters": ["file/metrics", "prometheus", "debug"]},
                    "traces": {"receivers": ["otlp"], "exporters": ["file/traces", "debug"]},
                },
            },
        }
        return _merge(cfg, self.config_overrides)

    # -- life cycle
    def _launch(self, timeout: float) -> None:
        """Write the config (JSON, which is YAML) and start; ready = health_check 200 + OTLP ports open."""
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        self.process = PeerProcess([self.binary, "--config", self.config_path], name="otelcol",
                                   log_path=self.log_path, cwd=self.workdir)
        self._wait_ready(self._ready, timeout, f"health check {self.health_url} and OTLP ports")

    def _ready(self) -> bool:
        status, _ = http_get(self.health_url, timeout=1.0)
        return status == 200 and tcp_open(self.grpc_port) and tcp_open(self.http_port)

    # -- what it received (file exporter)
    def read_exports(self, signal: str) -> list[dict[str, Any]]:
        """Every export request the file exporter wrote for ``signal`` (one JSON object per line).
        A trailing line still being written is skipped."""
        path = self.files[signal]
        if not path.exists():
            return []
        out = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def log_records(self) -> list[dict[str, Any]]:
        """Flattened log records: the OTLP-JSON record plus ``resource``/``scope`` and decoded ``attrs``,
        ``body_value`` (body as a plain value) and ``resource_attrs``."""
        return list(_flatten(self.read_exports("logs"), "resourceLogs", "scopeLogs", "logRecords"))

    def metrics(self) -> list[dict[str, Any]]:
        """Flattened metrics (one dict per metric per export, with ``resource_attrs`` and ``scope``)."""
        return list(_flatten(self.read_exports("metrics"), "resourceMetrics", "scopeMetrics", "metrics"))

    def spans(self) -> list[dict[str, Any]]:
        return list(_flatten(self.read_exports("traces"), "resourceSpans", "scopeSpans", "spans"))

    def wait_for_log_records(self, match: Callable[[dict[str, Any]], bool] = lambda r: True, *,
                             count: int = 1, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until at least ``count`` flattened log records satisfy ``match``; returns those records."""
        def check():
            found = [r for r in self.log_records() if match(r)]
            return found if len(found) >= count else None
        return wait_until(check, timeout, f"{count} matching log record(s) in {self.files['logs']}",
                          alive=self._check_alive)

    def wait_for_metric(self, name: str, *, timeout: float = 30.0) -> list[dict[str, Any]]:
        """Wait until the file exporter wrote a metric called ``name``; returns every copy of it."""
        def check():
            return [m for m in self.metrics() if m.get("name") == name] or None
        return wait_until(check, timeout, f"metric {name!r} in {self.files['metrics']}", alive=self._check_alive)

    # -- what it exposes (prometheus exporter, self-telemetry)
    def scrape(self, url: str | None = None, timeout: float = 5.0) -> str:
        status, body = http_get(url or self.prometheus_url, timeout=timeout)
        if status != 200:
            raise PeerError(f"otelcol: GET {url or self.prometheus_url} -> {status}")
        return body.decode()

    def wait_for_prometheus(self, metric: str, *, timeout: float = 30.0, url: str | None = None) -> list[str]:
        """Wait until the exposition at ``url`` (default: prometheus exporter) has samples of ``metric``
        (exact family name, labels allowed); returns those sample lines."""
        def check():
            return [line for line in self.scrape(url).splitlines()
                    if not line.startswith("#") and (line.split("{", 1)[0].split(" ", 1)[0] == metric)] or None
        return wait_until(check, timeout, f"{metric!r} on {url or self.prometheus_url}", alive=self._check_alive)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<OtelCollector {self.version} otlp-grpc={self.grpc_endpoint} {state} {self.workdir}>"


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            base[k] = _merge(base[k], v)
        else:
            base[k] = v
    return base


def _flatten(exports: list[dict[str, Any]], res_key: str, scope_key: str, item_key: str) -> Iterator[dict[str, Any]]:
    for export in exports:
        for res in export.get(res_key, []):
            res_attrs = attributes(res.get("resource", {}).get("attributes"))
            for sc in res.get(scope_key, []):
                scope = sc.get("scope", {})
                for item in sc.get(item_key, []):
                    flat = dict(item)
                    flat["resource_attrs"] = res_attrs
                    flat["scope"] = scope
                    flat["resource_schema_url"] = res.get("schemaUrl", "")
                    flat["scope_schema_url"] = sc.get("schemaUrl", "")
                    if "attributes" in item:
                        flat["attrs"] = attributes(item["attributes"])
                    if "body" in item:
                        flat["body_value"] = any_value(item["body"])
                    yield flat
