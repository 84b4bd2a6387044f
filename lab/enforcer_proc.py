"""Run the real `hostwall-enforcer` against a lab's protected host, as an operator would.

The enforcer process stays in the root namespace (pins live on the root bpffs at its own pin dir) and
attaches to `eth0` inside the protected host's namespace with `--netns`. Each instance has a private
pin dir and state dir, removed by close() even when the body raised.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile

from .netns import REPO_ROOT, START_TIMEOUT_S, Lab, first_line


class EnforcerProcess:
    def __init__(self, lab: Lab, policy: str | os.PathLike, *, host: str = "prot", keep_attached: bool = False,
                 pin_dir: str | None = None, state_dir: str | None = None, extra: tuple[str, ...] = ()):
        self.lab, self.host = lab, host
        self.policy = str(policy)
        self.pin_dir = pin_dir or f"/sys/fs/bpf/hostwall-lab/{lab.prefix}-{secrets.token_hex(2)}"
        self._own_state = state_dir is None
        self.state_dir = state_dir or tempfile.mkdtemp(prefix="hostwall-state-")
        self.env = dict(os.environ, HOSTWALL_STATE_DIR=self.state_dir, HOSTWALL_PIN_DIR=self.pin_dir,
                        PYTHONPATH=str(REPO_ROOT))
        self.keep_attached = keep_attached
        self.extra = extra
        self.proc: subprocess.Popen | None = None
        self.banner = ""

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self, timeout: float = START_TIMEOUT_S) -> EnforcerProcess:
        """Start the run process (entering the context does it); one at a time: a second start while the
        first runs would orphan it (still enforcing, never stopped)."""
        if self.proc is not None and self.proc.poll() is None:
            raise RuntimeError("enforcer already running: stop() it before starting it again")
        argv = [sys.executable, "-m", "hostwall.enforcer.cli", "run", "--policy", self.policy, "--netns", self.lab.ns(self.host),
                "--interface", "eth0", *self.extra]
        if self.keep_attached:
            argv.append("--keep-attached")
        self.proc = subprocess.Popen(argv, env=self.env, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.banner = first_line(self.proc, timeout)
        if "enforcing" not in self.banner:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=10)
            raise RuntimeError(f"enforcer did not start: {self.banner}{err[-2000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> str:
        """Signal the run process; returns what it printed after the banner."""
        if self.proc is None or self.proc.poll() is not None:
            return ""
        self.proc.send_signal(sig)
        try:
            out, _ = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate()
        return out

    def close(self) -> None:
        """Stop, detach, unpin and remove the state dir; idempotent."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.cli("detach", "--discard-retired", check=False)     # retired instances too (bpf/retired.py)
        if self._own_state:
            shutil.rmtree(self.state_dir, ignore_errors=True)

    def __enter__(self) -> EnforcerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- control ---------------------------------------------------------------------------------
    def cli(self, *args: str, check: bool = True, timeout: float = 120.0) -> subprocess.CompletedProcess:
        r = subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", *args], env=self.env, cwd=REPO_ROOT,
                           capture_output=True, text=True, timeout=timeout)
        if check and r.returncode:
            raise RuntimeError(f"hostwall-enforcer {' '.join(args)} failed ({r.returncode}): {r.stderr[-2000:]}")
        return r

    def apply(self, policy: str | os.PathLike, check: bool = True) -> subprocess.CompletedProcess:
        return self.cli("apply", str(policy), check=check)

    def status(self) -> dict:
        return json.loads(self.cli("status", "--json").stdout)


def rule_packets(status: dict) -> dict[str, int]:
    return {r["name"]: r["packets"] for r in status["rules"]}


def drops(status: dict) -> dict[str, int]:
    """Dropped packets per reason (actual drops, not would-drops)."""
    return {k: v["drop"] for k, v in status["drops_by_reason"].items()}


def events_admitted(dp) -> int:
    """Events that passed the event budget (emitted, or found the ring buffer full) since the load of
    `dp` (an enforcer.datapath.Datapath), summed over event types and CPUs."""
    import numpy as np

    from hostwall.bpf import bpfsys
    from hostwall.bpf import layout as L
    stride = L.DTYPES["hw_counter"].itemsize * dp.ncpus
    n = 0
    for t in L.EVENT_TYPE_NAMES:
        for o in (L.C["HW_EO_EMITTED"], L.C["HW_EO_RINGBUF_FULL"]):
            k = (t * L.C["HW_EV_OUTCOMES"] + o).to_bytes(4, "little")
            n += int(np.frombuffer(bpfsys.map_lookup(dp.map_fds["hw_ev_stats"], k, stride),
                                   dtype=L.DTYPES["hw_counter"])["packets"].sum())
    return n
