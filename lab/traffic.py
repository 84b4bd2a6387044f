"""Traffic for the lab, driven from the test process (root namespace) through a Lab: clients that run
inside a namespace and return their JSON report (`run_in`, `tcp_client_in`, `udp_client_in`,
`ping_in`, `long_lived_in`), background clients (`start_in`), echo servers (`echo_servers`) and trafgen
floods (`trafgen_in`, from lab/trafgen.py). The endpoints themselves are lab/endpoints.py, run as
`python -m hostwall.lab.endpoints COMMAND ...` inside the namespace.
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .addresses import check_lab_address
from .endpoints import parse_ping, ping_argv
from .trafgen import TrafgenRun, run_trafgen, trafgen_config, trafgen_in

if TYPE_CHECKING:
    from collections.abc import Sequence

    from .netns import Lab

__all__ = ["Background", "EchoServers", "TrafgenRun", "check_lab_address", "echo_servers", "long_lived_in",
           "ping_in", "run_in", "run_trafgen", "start_in", "tcp_client_in", "trafgen_config", "trafgen_in",
           "udp_client_in"]


def _cli_args(params: dict) -> list[str]:
    out = []
    for k, v in params.items():
        if v is None or v is False:
            continue
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        elif isinstance(v, (list, tuple)):
            out += [flag, ",".join(map(str, v))]
        else:
            out += [flag, str(v)]
    return out


def _last_json(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            return json.loads(line)
    raise ValueError(f"no JSON result in output: {text[-500:]!r}")


def run_in(lab: Lab, host: str, command: str, /, *, timeout: float = 60.0, **params) -> dict:
    """Run `python -m hostwall.lab.endpoints COMMAND --param value ...` inside host's namespace; return its JSON."""
    cp = lab.python(host, ["-m", "hostwall.lab.endpoints", command, *_cli_args(params)], timeout=timeout, check=False)
    if cp.returncode != 0:
        raise RuntimeError(f"[{host}] lab.endpoints {command} failed (exit {cp.returncode}): {cp.stderr[-1500:]}")
    return _last_json(cp.stdout)


def tcp_client_in(lab: Lab, host: str, dst: str, port: int, count: int = 5, *, timeout: float = 1.0,
                  **kw) -> dict:
    """TCP round trips from host's namespace to dst:port (kw: size, reuse, interval)."""
    return run_in(lab, host, "tcp-client", timeout=count * (2 * timeout + 1) + 15,
                  **{"host": dst, "port": port, "count": count, "op_timeout": timeout, **kw})


def udp_client_in(lab: Lab, host: str, dst: str, port: int, count: int = 5, *, timeout: float = 1.0,
                  **kw) -> dict:
    return run_in(lab, host, "udp-client", timeout=count * (timeout + 1) + 15,
                  **{"host": dst, "port": port, "count": count, "op_timeout": timeout, **kw})


def ping_in(lab: Lab, host: str, dst: str, count: int = 3, *, timeout: float = 1.0,
            interval: float = 0.2) -> dict:
    """ping from host's namespace (no Python start-up: runs the ping binary directly)."""
    argv = ping_argv(dst, count, timeout=timeout, interval=interval)
    cp = lab.run(host, argv, check=False, timeout=count * interval + timeout + 5)
    return {"host": dst, **parse_ping(cp.stdout, cp.returncode)}


class Background:
    """A lab.endpoints command running in a namespace; result() waits (bounded) for its JSON."""

    def __init__(self, lab: Lab, host: str, proc: subprocess.Popen, what: str):
        self.lab, self.host, self.proc, self.what = lab, host, proc, what

    def result(self, timeout: float = 60.0) -> dict:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            out, err = self.lab.stop(self.proc)
            raise RuntimeError(f"[{self.host}] {self.what} did not finish within {timeout:g} s") from None
        if self.proc.returncode != 0:
            raise RuntimeError(f"[{self.host}] {self.what} failed (exit {self.proc.returncode}): {err[-1500:]}")
        return _last_json(out)

    def stop(self) -> dict | None:
        out, _ = self.lab.stop(self.proc, signal.SIGTERM)
        try:
            return _last_json(out)
        except ValueError:
            return None


def start_in(lab: Lab, host: str, command: str, /, **params) -> Background:
    """Start `python -m hostwall.lab.endpoints COMMAND ...` in the background inside host's namespace."""
    argv = [sys.executable, "-m", "hostwall.lab.endpoints", command, *_cli_args(params)]
    return Background(lab, host, lab.popen(host, argv), command)


def long_lived_in(lab: Lab, host: str, dst: str, port: int, *, interval_ms: float = 50, duration: float = 5,
                  timeout: float = 1.0) -> Background:
    """Start the long-lived connection probe in the background; .result() gives its report."""
    return start_in(lab, host, "long-lived", host=dst, port=port, interval_ms=interval_ms, duration=duration,
                    op_timeout=timeout)


@dataclass
class EchoServers:
    lab: Lab
    host: str
    proc: subprocess.Popen
    tcp: list[int] = field(default_factory=list)
    udp: list[int] = field(default_factory=list)
    summary: dict | None = None

    def stop(self) -> dict | None:
        if self.summary is None:
            out, _ = self.lab.stop(self.proc, signal.SIGTERM)
            try:
                self.summary = _last_json(out)
            except ValueError:
                self.summary = None
        return self.summary


@contextmanager
def echo_servers(lab: Lab, host: str, *, tcp: Sequence[int] = (), udp: Sequence[int] = (),
                 duration: float = 300.0, ready_timeout: float = 10.0) -> Iterator[EchoServers]:
    """TCP and UDP echo servers (v4 + v6) in host's namespace, listening when this yields."""
    argv = [sys.executable, "-m", "hostwall.lab.endpoints", "echo-server", *_cli_args(
        {"tcp": list(tcp) or None, "udp": list(udp) or None, "duration": duration})]
    proc = lab.popen(host, argv)
    srv = EchoServers(lab, host, proc, list(tcp), list(udp))
    try:
        _wait_ready(proc, ready_timeout, f"echo server in {host}")
        yield srv
    finally:
        srv.stop()


def _wait_ready(proc: subprocess.Popen, timeout: float, what: str) -> dict:
    """Read lines until {"ready": true ...} (bounded by time and line count)."""
    import selectors
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    deadline = time.monotonic() + timeout
    try:
        for _ in range(100):
            left = deadline - time.monotonic()
            if left <= 0 or not sel.select(left):
                break
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("{") and (msg := json.loads(line)).get("ready"):
                return msg
    finally:
        sel.close()
    err = ""
    if proc.poll() is not None:
        err = proc.stderr.read()[-1500:]
    raise RuntimeError(f"{what} not ready within {timeout:g} s {err}")
