"""Run the real `hostwall-collector` next to a lab's enforcer, as an operator would.

The collector is started as its own process in the root namespace (the enforcer's pins live on the
root bpffs) with the enforcer's environment: the same pin dir and the same state dir, where it finds
the instance state (rule names per revision), tails the enforcer's audit log and writes its own
status file (so `hostwall-collector status` works with that environment too).

Everything it writes that is meant to outlive the lab goes to `out_dir`: the JSONL sink(s), the
config it ran with (hostwall.collector.yaml) and its log (hostwall.collector.log: its stdout — banner
and exit ledger — and stderr). The status file lives in the enforcer's state dir; `final_status` keeps
the last one read after stop().

Every wait is bounded: start() waits for the "collecting from" banner, stop() for a clean exit after
SIGTERM (then SIGKILL); close() is idempotent and safe after a failure.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from .netns import REPO_ROOT, START_TIMEOUT_S, first_line

# Lab-tuned settings: a lab run lasts a minute, not a day, so the anomaly windows are seconds long.
# Drop summaries every 250 ms and 0.5 s buckets keep detection latency (flood start → anomaly
# record in the sink) well under 2 s; a 5 s window, 1 warm-up window and 3 quiet seconds let an
# anomaly open and close within a short demo. Thresholds (score 6, at least 50 drops/s) stay the
# production defaults.
LAB_CONFIG: dict[str, Any] = {
    "drop_summary_interval": "250ms",
    "conntrack_scan_interval": "1s",
    "status_interval": "500ms",
    "jsonl": {"fsync": "interval", "fsync_interval": "250ms"},   # = the drop interval (docs/collector.md "Drop summary windows")
    "anomaly": {"window_s": 5.0, "bucket_s": 0.5, "warmup_windows": 1, "quiet_s": 3.0,
                "update_interval_s": 2.0},
}


class CollectorError(RuntimeError):
    """The collector did not start or did not stop cleanly; the message carries its log tail."""


class CollectorProcess:
    """`hostwall-collector run` for one enforcer instance (lab.enforcer_proc.EnforcerProcess).

    sinks: sink URLs ("jsonl:PATH", ...) or {"url": ..., "encoding": ...} entries; default one JSONL
    file `out_dir/flows.jsonl`. URL-only lists are passed as --sink (the operator's command line);
    a list with per-sink encodings goes into the config file (the command line has no per-sink
    encoding). config: settings merged over LAB_CONFIG."""

    def __init__(self, enforcer, out_dir: str | os.PathLike, *, sinks: list | None = None,
                 config: dict | None = None, extra: tuple[str, ...] = ()):
        self.enforcer = enforcer
        self.pin_dir = enforcer.pin_dir
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = self.out_dir / "flows.jsonl"
        self.sinks = list(sinks) if sinks else [f"jsonl:{self.jsonl}"]
        self.config = _merge(LAB_CONFIG, config or {})
        self.config_path = self.out_dir / "hostwall.collector.yaml"
        self.log_path = self.out_dir / "hostwall.collector.log"
        self.env = dict(enforcer.env, PYTHONPATH=str(REPO_ROOT))
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.banner = ""
        self.exit_output = ""
        self.final_status: dict | None = None
        self._log: IO[str] | None = None
        self._out: list[str] = []                  # stdout after the banner (also in the log)
        self._tee: threading.Thread | None = None

    # ---- lifecycle -------------------------------------------------------------------------------
    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "hostwall.collector.cli", "run", "--config", str(self.config_path),
                "--pin-dir", self.pin_dir]
        if all(isinstance(s, str) for s in self.sinks):
            for s in self.sinks:
                argv += ["--sink", s]
        return argv + list(self.extra)

    def write_config(self) -> Path:
        cfg = dict(self.config)
        if not all(isinstance(s, str) for s in self.sinks):
            cfg["sinks"] = self.sinks
        text = ("# hostwall-collector settings of a lab run (lab/collector_proc.py LAB_CONFIG)\n"
                + yaml.safe_dump(cfg, sort_keys=False, default_flow_style=False))
        self.config_path.write_text(text)
        return self.config_path

    def start(self, timeout: float = START_TIMEOUT_S) -> CollectorProcess:
        self.write_config()
        self._log = log = open(self.log_path, "a", buffering=1)   # O_APPEND: stderr and the tee interleave by line
        self.proc = subprocess.Popen(self.argv(), env=self.env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                     stderr=log, text=True)
        self.banner = first_line(self.proc, timeout)
        log.write(self.banner)
        self._tee = threading.Thread(target=self._copy_stdout, args=(log,), name="collector-stdout", daemon=True)
        self._tee.start()
        if "collecting from" not in self.banner:
            self.close()
            raise CollectorError(f"collector did not start within {timeout:g} s: {self.banner.strip()} "
                                 f"{self.log_tail()}")
        return self

    def _copy_stdout(self, log: IO[str]) -> None:
        """Keep the collector's stdout in its log (and in memory for exit_output) until it closes."""
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._out.append(line)
            log.write(line)

    def _join_tee(self) -> None:
        """Bounded: the pipe closes when the process exits."""
        if self._tee is not None:
            self._tee.join(timeout=10)
            self._tee = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait for the clean exit (sinks flushed, last drop interval exported, ledger
        printed), then read the final status. Returns the exit code (-9 if it had to be killed)."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._join_tee()
        self.exit_output = "".join(self._out)
        try:
            self.final_status = self.status()
        except CollectorError:
            self.final_status = None
        return self.proc.returncode

    def close(self) -> None:
        """Kill if still running; idempotent. The files in out_dir stay."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        self._join_tee()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> CollectorProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- observing -------------------------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "hostwall.collector.cli", *args], env=self.env, cwd=REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)

    def status(self) -> dict:
        """`hostwall-collector status --json --pin-dir PIN` (the operator's view)."""
        r = self.cli("status", "--json", "--pin-dir", self.pin_dir)
        if r.returncode:
            raise CollectorError(f"hostwall-collector status failed ({r.returncode}): {r.stderr.strip()}")
        return json.loads(r.stdout)

    def status_text(self) -> str:
        return self.cli("status", "--pin-dir", self.pin_dir).stdout

    def wait_status(self, pred: Callable[[dict], bool], timeout: float = 20.0, every: float = 0.25) -> dict:
        """Poll status until pred(status) holds; CollectorError with the last status on timeout."""
        deadline = time.monotonic() + timeout
        st: dict = {}
        while time.monotonic() < deadline:
            try:
                st = self.status()
                if pred(st):
                    return st
            except (CollectorError, ValueError):
                pass
            if not self.alive():
                break
            time.sleep(every)
        raise CollectorError(f"status condition not reached within {timeout:g} s "
                             f"(alive={self.alive()}): {json.dumps(st.get('ledger', st))[:1500]} {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- reading what the collector wrote ------------------------------------------------------------

def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """Every record of a JSONL file (one JSON object per line)."""
    with open(path, "rb") as f:
        return [json.loads(line) for line in f if line.strip()]


def kind(rec: dict) -> str:
    return rec.get("hostwall", {}).get("kind", "")


class JsonlFollower:
    """Follow a JSONL file from a thread (poll every `every` s) and note when each record arrived
    (wall clock). Only complete lines are parsed. Used to measure detection latency as a reader of
    the flow log sees it. Bounded by the file: it keeps what it read."""

    def __init__(self, path: str | os.PathLike, every: float = 0.05,
                 keep: Callable[[dict], bool] = lambda r: kind(r) == "anomaly"):
        self.path = Path(path)
        self.every = every
        self.keep = keep
        self.arrivals: list[tuple[float, dict]] = []
        self.lines = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="jsonl-follower", daemon=True)

    def start(self) -> JsonlFollower:
        self._thread.start()
        return self

    def _run(self) -> None:
        pos, buf = 0, b""
        while not self._stop.is_set():
            try:
                with open(self.path, "rb") as f:
                    f.seek(pos)
                    data = f.read()
            except FileNotFoundError:
                data = b""
            now = time.time()
            if data:
                pos += len(data)
                buf += data
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if not line.strip():
                        continue
                    self.lines += 1
                    rec = json.loads(line)
                    if self.keep(rec):
                        self.arrivals.append((now, rec))
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def __enter__(self) -> JsonlFollower:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
