"""A real Alertmanager (Debian's ``prometheus-alertmanager``) on 127.0.0.1, and a webhook receiver for tests.

    with WebhookReceiver() as hook, Alertmanager(webhook_config(hook.url)) as am:
        am.start()                                        # waits for /-/ready and /api/v2/status
        am.post_alerts([alert("HostwallRecordsLost", instance="a:9464", severity="warning")])
        [n] = hook.wait_for(lambda ns: ns, what="a notification")   # parsed webhook JSON (version 4)
        am.alerts(inhibited=True)                          # GET /api/v2/alerts (state, inhibitedBy, ...)

The server never touches the Debian service: its own config (a dict written as JSON, which is YAML, or a
YAML text such as deploy/alertmanager/alertmanager.yml), its own data dir in the work folder, a free port,
clustering off (``--cluster.listen-address=``: no gossip port, no settle wait). ``amtool`` from the same
package checks configs (:func:`amtool`).

:class:`WebhookReceiver` is the other end: an HTTP server on 127.0.0.1 in the test process that records
every POST (the notification JSON, the path, the arrival time) and answers 200. Tests wait on what it
received (:meth:`WebhookReceiver.wait_for`), never for a fixed time.
"""

from __future__ import annotations

import datetime as dt
import http.server
import json
import os
import shutil
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from . import SETUP_HINT, PeerBase, PeerError, PeerNotInstalled, PeerProcess, free_ports, http_get, wait_until

__all__ = ["Alertmanager", "Notification", "WebhookReceiver", "alert", "alertmanager_binary", "amtool",
           "amtool_binary", "rfc3339", "webhook_config"]

T = TypeVar("T")


def _binary(env: str, names: Sequence[str], what: str) -> Path:
    found = os.environ.get(env)
    for name in names:
        if found:
            break
        found = shutil.which(name) or (f"/usr/bin/{name}" if os.path.exists(f"/usr/bin/{name}") else None)
    if not found or not os.access(found, os.X_OK):
        raise PeerNotInstalled(f"{what} is not installed: {SETUP_HINT}")
    return Path(found)


def alertmanager_binary() -> Path:
    """``$HOSTWALL_ALERTMANAGER`` or Debian's ``/usr/bin/prometheus-alertmanager`` (upstream: ``alertmanager``)."""
    return _binary("HOSTWALL_ALERTMANAGER", ("prometheus-alertmanager", "alertmanager"), "alertmanager")


def amtool_binary() -> Path:
    """``$HOSTWALL_AMTOOL`` or ``amtool`` (Debian's prometheus-alertmanager ships it)."""
    return _binary("HOSTWALL_AMTOOL", ("amtool",), "amtool (package prometheus-alertmanager)")


def amtool(*args: str | os.PathLike[str], timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``amtool ARGS...`` (e.g. ``"check-config", path``); returns the completed process, never raises on
    a non-zero exit."""
    return subprocess.run([str(amtool_binary()), *map(str, args)], capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ alerts


def rfc3339(t: float | dt.datetime) -> str:
    """A Unix time (or datetime) as the API's timestamps: ``2026-01-02T03:04:05.678Z``."""
    if not isinstance(t, dt.datetime):
        t = dt.datetime.fromtimestamp(t, dt.UTC)
    return t.astimezone(dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def alert(alertname: str, *, annotations: Mapping[str, str] | None = None, starts_at: float | None = None,
          ends_at: float | None = None, generator_url: str = "", **labels: str) -> dict[str, Any]:
    """One alert as ``POST /api/v2/alerts`` takes it (what Prometheus sends): labels incl. ``alertname``.
    Without ``ends_at`` Alertmanager keeps it firing for ``resolve_timeout``; ``ends_at`` in the past resolves it."""
    a: dict[str, Any] = {"labels": {"alertname": alertname, **{k: str(v) for k, v in labels.items()}},
                         "annotations": dict(annotations or {})}
    if starts_at is not None:
        a["startsAt"] = rfc3339(starts_at)
    if ends_at is not None:
        a["endsAt"] = rfc3339(ends_at)
    if generator_url:
        a["generatorURL"] = generator_url
    return a


def webhook_config(url: str, *, group_by: Sequence[str] = ("alertname", "instance"), group_wait: str = "200ms",
                   group_interval: str = "1s", repeat_interval: str = "1h",
                   inhibit_rules: Sequence[Mapping[str, Any]] = ()) -> dict[str, Any]:
    """A minimal config: every alert to one webhook receiver ``webhook``, short waits for tests."""
    return {
        "route": {"receiver": "webhook", "group_by": list(group_by), "group_wait": group_wait,
                  "group_interval": group_interval, "repeat_interval": repeat_interval},
        "receivers": [{"name": "webhook", "webhook_configs": [{"url": url, "send_resolved": True}]}],
        "inhibit_rules": [dict(r) for r in inhibit_rules],
    }


# ------------------------------------------------------------------------------------------ server


class Alertmanager(PeerBase):
    """Alertmanager with ``config`` (a dict, or the YAML text of a config file; default: one webhook receiver
    at an address nothing listens on, for tests that only use the API)."""

    name = "alertmanager"
    start_timeout = 30.0

    def __init__(self, config: Mapping[str, Any] | str | None = None, *,
                 workdir: str | os.PathLike[str] | None = None, binary: Path | None = None,
                 extra_args: Iterable[str] = ()) -> None:
        self.binary = Path(binary) if binary else alertmanager_binary()
        super().__init__(workdir)
        self.host = "127.0.0.1"
        (self.port,) = free_ports(1)
        self.config_source: Mapping[str, Any] | str = (
            config if config is not None else webhook_config(f"http://{self.host}:9/unused"))
        self.extra_args = list(extra_args)
        self.config_path = self.workdir / "alertmanager.yml"
        self.data_dir = self.workdir / "data"

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:40123`` (API under /api/v2)."""
        return f"http://{self.host}:{self.port}"

    @property
    def version(self) -> str:
        out = subprocess.run([self.binary, "--version"], capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).split("\n", 1)[0]

    def _write_config(self) -> None:
        text = self.config_source if isinstance(self.config_source, str) else json.dumps(self.config_source, indent=2)
        tmp = self.config_path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(self.config_path)

    # -- life cycle
    def _launch(self, timeout: float) -> None:
        self._write_config()
        argv = [self.binary, f"--config.file={self.config_path}", f"--storage.path={self.data_dir}",
                f"--web.listen-address={self.host}:{self.port}", f"--web.external-url={self.url}",
                "--cluster.listen-address=", "--log.level=debug", *self.extra_args]
        self.process = PeerProcess(argv, name="alertmanager", log_path=self.log_path, cwd=self.workdir)
        self._wait_ready(lambda: http_get(f"{self.url}/-/ready", timeout=1.0)[0] == 200, timeout,
                         f"{self.url}/-/ready")

    def reload(self, config: Mapping[str, Any] | str | None = None, timeout: float = 30.0) -> None:
        """Write ``config`` (or the current one again) and POST /-/reload; PeerError if it is rejected."""
        if config is not None:
            self.config_source = config
        self._write_config()
        if self.running:
            status, body = http_get(f"{self.url}/-/reload", method="POST", data=b"", timeout=timeout)
            if status != 200:
                raise PeerError(f"alertmanager: reload failed ({status}): {body.decode(errors='replace')}")

    # -- HTTP API v2
    def api(self, path: str, *, method: str = "GET", body: Any = None, params: Mapping[str, Any] | None = None,
            timeout: float = 10.0) -> Any:
        """``/api/v2/<path>``; returns the decoded JSON answer (None when empty), PeerError on a non-2xx status."""
        qs = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        status, raw = http_get(f"{self.url}/api/v2/{path}{qs}", method=method, data=data, headers=headers,
                               timeout=timeout)
        if not 200 <= status < 300:
            raise PeerError(f"alertmanager: {method} /api/v2/{path} -> {status}: {raw[:500].decode(errors='replace')}")
        return json.loads(raw) if raw.strip() else None

    def status(self) -> dict[str, Any]:
        """GET /api/v2/status: cluster, config (``original``: the loaded YAML), versionInfo, uptime."""
        return self.api("status")

    def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """POST /api/v2/alerts (what Prometheus' notifier does); see :func:`alert`."""
        self.api("alerts", method="POST", body=list(alerts))

    def alerts(self, *, active: bool = True, silenced: bool = True, inhibited: bool = True,
               filter: Sequence[str] = ()) -> list[dict[str, Any]]:
        """GET /api/v2/alerts: each with labels, ``status`` {state: active|suppressed, inhibitedBy, silencedBy},
        ``receivers`` and ``fingerprint``. ``filter``: matchers such as ``'instance="a"'``."""
        params: dict[str, Any] = {"active": str(active).lower(), "silenced": str(silenced).lower(),
                                  "inhibited": str(inhibited).lower()}
        if filter:
            params["filter"] = list(filter)
        return self.api("alerts", params=params)

    def alert_groups(self) -> list[dict[str, Any]]:
        """GET /api/v2/alerts/groups: the aggregation groups (labels, receiver, alerts)."""
        return self.api("alerts/groups")

    def wait_for_alerts(self, match: Callable[[list[dict[str, Any]]], T], *, timeout: float = 30.0,
                        what: str = "alerts") -> T:
        """Poll GET /api/v2/alerts until ``match(alerts)`` is truthy; returns it."""
        return wait_until(lambda: match(self.alerts()), timeout, f"alertmanager: {what}", interval=0.1,
                          alive=self._check_alive)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<Alertmanager {self.url} {state} {self.workdir}>"


# --------------------------------------------------------------------------------- webhook receiver


@dataclass(frozen=True)
class Notification:
    """One POST the receiver got: the path, the parsed body (Alertmanager's webhook JSON, version 4:
    receiver, status, groupKey, groupLabels, commonLabels, alerts[...]) and when it arrived (time.monotonic())."""

    path: str
    body: Any
    received: float
    headers: Mapping[str, str] = field(default_factory=dict)

    @property
    def receiver(self) -> str:
        return self.body.get("receiver", "")

    @property
    def status(self) -> str:
        return self.body.get("status", "")

    @property
    def alerts(self) -> list[dict[str, Any]]:
        return list(self.body.get("alerts", []))

    def alert_labels(self, name: str) -> list[str]:
        """The values of label ``name`` over this notification's alerts (in order)."""
        return [a["labels"].get(name, "") for a in self.alerts]


class WebhookReceiver:
    """An HTTP server on 127.0.0.1 (a free port, a thread of the test process) that records every POST.

    ``url`` is ``http://127.0.0.1:PORT/PATH``; any path is accepted and recorded. A body that is not JSON is
    recorded as ``{"_raw": text}`` and answered 400 (Alertmanager would retry it). ``close()`` stops it.
    """

    def __init__(self, path: str = "/hook") -> None:
        self._cond = threading.Condition()
        self._received: list[Notification] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    body, code = json.loads(raw), 200
                except (ValueError, UnicodeDecodeError):
                    body, code = {"_raw": raw.decode(errors="replace")}, 400
                receiver._record(Notification(self.path, body, time.monotonic(), dict(self.headers.items())))
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self.path = path if path.startswith("/") else f"/{path}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"webhook-{self.port}", daemon=True)
        self._thread.start()
        self._closed = False

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{self.path}"

    def _record(self, n: Notification) -> None:
        with self._cond:
            self._received.append(n)
            self._cond.notify_all()

    @property
    def notifications(self) -> list[Notification]:
        """Everything received so far, in arrival order (a copy)."""
        with self._cond:
            return list(self._received)

    def clear(self) -> None:
        with self._cond:
            self._received.clear()

    def wait_for(self, match: Callable[[list[Notification]], T], *, timeout: float = 30.0,
                 what: str = "a webhook notification") -> T:
        """Block until ``match(notifications)`` is truthy (re-checked on every arrival); returns that value.
        TimeoutError lists what did arrive."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = match(list(self._received))
                if result:
                    return result
                left = deadline - time.monotonic()
                if left <= 0:
                    got = [(n.receiver, n.status, [a["labels"].get("alertname") for a in n.alerts])
                           for n in self._received]
                    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}; received {got}")
                self._cond.wait(min(left, 0.5))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)

    def __enter__(self) -> WebhookReceiver:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<WebhookReceiver {self.url} received={len(self.notifications)}>"
