"""Real test peers: Kafka (KRaft), the OpenTelemetry Collector, Prometheus and Alertmanager, started by tests.

Each peer runs as a child process in its own process group, listens on 127.0.0.1 only, on free ports, in a
private temporary folder, and is stopped (TERM, then KILL) and cleaned up by ``close()`` or at interpreter
exit. Every wait is bounded. The binaries come from ``scripts/setup-peers.sh`` which caches them under
``$HOSTWALL_CACHE`` (default ``/var/cache/hostwall``); when one is missing the helpers raise
:class:`PeerNotInstalled`, which the pytest fixtures in :mod:`tests.peers.fixtures` turn into a failure.

Modules: :mod:`tests.peers.kafka` (:class:`KafkaBroker`), :mod:`tests.peers.otelcol` (:class:`OtelCollector`),
:mod:`tests.peers.prometheus` (:class:`PrometheusServer`), :mod:`tests.peers.alertmanager`
(:class:`Alertmanager`, and the :class:`WebhookReceiver` its notifications go to). This module holds what they share: locating the
cache and the versions the repo declares, free ports, bounded waits and process-group management.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Self, TypeVar

__all__ = [
    "PeerError",
    "PeerNotInstalled",
    "PeerProcess",
    "cache_dir",
    "file_tail",
    "free_ports",
    "http_get",
    "repo_root",
    "tcp_open",
    "wait_until",
]

T = TypeVar("T")

SETUP_HINT = ("run scripts/setup-peers.sh (installs and caches Kafka, the OTel Collector, Prometheus and "
              "Alertmanager)")


class PeerError(RuntimeError):
    """A peer failed to start, died, or did not become ready in time (message carries its log tail)."""


class PeerNotInstalled(PeerError):
    """The peer's binaries are not in the cache: ``scripts/setup-peers.sh`` has not been run (for this version)."""


def repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def cache_dir() -> Path:
    """``$HOSTWALL_CACHE`` or ``/var/cache/hostwall``: where scripts/setup-peers.sh keeps the installs."""
    return Path(os.environ.get("HOSTWALL_CACHE") or "/var/cache/hostwall")


def declared_version(path: Path, pattern: str) -> str:
    """The version the repo pins for a peer, read from the file that pins it (one source of truth)."""
    m = re.search(pattern, path.read_text(), re.M)
    if not m:
        raise PeerError(f"cannot find the peer version in {path} (pattern {pattern!r})")
    return m.group(1)


# ----------------------------------------------------------------------------------------------- ports


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct TCP ports on 127.0.0.1 that were free a moment ago (all sockets held until all chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tcp_open(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """True when ``host:port`` accepts a TCP connection within ``timeout`` seconds."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def http_get(url: str, timeout: float = 5.0, *, method: str = "GET", data: bytes | None = None,
             headers: Mapping[str, str] | None = None) -> tuple[int, bytes]:
    """One HTTP request with a deadline; returns (status, body) for any HTTP status, raises OSError otherwise."""
    req = urllib.request.Request(url, data=data, method=method, headers=dict(headers or {}))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def wait_until(check: Callable[[], T], timeout: float, what: str, *, interval: float = 0.2,
               alive: Callable[[], None] | None = None) -> T:
    """Poll ``check`` until it returns a truthy value (returned) or ``timeout`` seconds pass (TimeoutError).

    ``check`` may raise: the exception counts as "not yet" and the last one is reported on timeout. ``alive``
    is called before each try and should raise (e.g. :class:`PeerError`) when waiting is pointless, such as
    when the peer's process has exited.
    """
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        if alive is not None:
            alive()
        try:
            result = check()
            if result:
                return result
        except Exception as e:  # noqa: BLE001 - any failure means "not ready yet"
            last = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last is not None else ""
            raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
        time.sleep(interval)


# ------------------------------------------------------------------------------------------- processes


def file_tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file, under a header naming it (for error messages)."""
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return f"--- last {len(text)} lines of {path} ---\n" + "\n".join(text)


_PR_SET_PDEATHSIG = 1
try:  # resolved in the parent: the child (between fork and exec) only makes the call
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # pragma: no cover - non-glibc
    _prctl = None
_live: dict[int, PeerProcess] = {}
_live_lock = threading.Lock()


def _preexec_pdeathsig() -> None:  # runs in the child between fork and exec
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))


@atexit.register
def _kill_leftovers() -> None:
    """Safety net: a peer whose owner never called stop() dies with the interpreter, not after it."""
    with _live_lock:
        procs = list(_live.values())
    for p in procs:
        p.stop(timeout=5)


class PeerProcess:
    """A child process in its own session/process group, logging to a file, stopped as a group.

    Started from the main thread, the child also gets PR_SET_PDEATHSIG=SIGKILL, so a test run that is
    killed outright (SIGKILL, CI timeout) does not leave a JVM behind. (Not from other threads: the signal
    fires when the *thread* that forked exits.)
    """

    def __init__(self, argv: Sequence[str], *, name: str, log_path: Path, cwd: Path | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = Path(log_path)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(self.log_path, "ab") as log:
            log.write(f"\n==== {time.strftime('%H:%M:%S')} start: {' '.join(self.argv)}\n".encode())
            log.flush()
            in_main = threading.current_thread() is threading.main_thread()
            self.popen = subprocess.Popen(
                self.argv, cwd=cwd, env=full_env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_preexec_pdeathsig if in_main and _prctl else None,
            )
        self.pid = self.popen.pid
        with _live_lock:
            _live[self.pid] = self

    @property
    def running(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        """Raise PeerError (with the log tail) if the process has exited."""
        rc = self.popen.poll()
        if rc is not None:
            raise PeerError(f"{self.name} exited with status {rc}\n{self.log_tail()}")

    def log_tail(self, lines: int = 40) -> str:
        return file_tail(self.log_path, lines)

    def send_signal(self, sig: int) -> None:
        try:
            os.killpg(self.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, timeout: float = 30.0, *, sig: int = signal.SIGTERM) -> int | None:
        """Send ``sig`` to the group, wait up to ``timeout`` s, then SIGKILL the group. Returns the exit status."""
        try:
            if self.popen.poll() is None:
                self.send_signal(sig)
                try:
                    self.popen.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    pass
            # The leader may be gone while group members live on: always sweep the group.
            self.send_signal(signal.SIGKILL)
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            return self.popen.returncode
        finally:
            with _live_lock:
                _live.pop(self.pid, None)

    def kill(self) -> int | None:
        """SIGKILL the group at once (a crash, for outage tests)."""
        return self.stop(timeout=0, sig=signal.SIGKILL)


class PeerBase:
    """Shared life cycle: a private work folder, one process at a time, context manager, close() cleans up.

    Subclasses implement :meth:`_launch` (start the process, wait until ready) and set ``start_timeout``.
    """

    name = "peer"
    start_timeout = 60.0

    def __init__(self, workdir: str | os.PathLike[str] | None) -> None:
        self._owns_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix=f"hostwall-{self.name}-")) if workdir is None else Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.process: PeerProcess | None = None
        self._closed = False

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.running

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log_tail(self, lines: int = 40) -> str:
        return self.process.log_tail(lines) if self.process else "(never started)"

    def _check_alive(self) -> None:
        if self.process is None:
            raise PeerError(f"{self.name} is not started")
        self.process.check_alive()

    def _wait_ready(self, check: Callable[[], T], timeout: float, what: str) -> T:
        """Wait for ``check``; on timeout or early exit stop the process and raise PeerError with its log."""
        try:
            return wait_until(check, timeout, f"{self.name}: {what}", alive=self._check_alive)
        except TimeoutError as e:
            tail = self.log_tail()
            self.stop()
            raise PeerError(f"{e}\n{tail}") from None
        except PeerError:
            self.stop()
            raise

    def start(self, timeout: float | None = None) -> Self:
        """Start and wait until ready (``start_timeout`` seconds unless given); a running peer is left as is."""
        if self._closed:
            raise PeerError(f"{self.name} is closed")
        if not self.running:
            self._launch(self.start_timeout if timeout is None else timeout)
        return self

    def _launch(self, timeout: float) -> None:
        raise NotImplementedError

    def restart(self, timeout: float | None = None) -> Self:
        self.stop()
        return self.start(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None:
            self.process.stop(timeout)
            self.process = None

    def close(self) -> None:
        """Stop the process and remove the work folder (if this object created it). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop()
        if self._owns_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # last resort; close() is the contract
        try:
            if not self._closed and self.process is not None and self.process.running:
                self.process.stop(timeout=5)
        except Exception:  # noqa: BLE001
            pass
