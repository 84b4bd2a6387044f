"""trafgen (netsniff-ng) floods for the lab: config, a bounded run, and `trafgen_in` from the test
process. Runs are stopped after their duration (SIGINT to the process group) and capped by a packet
count (-n), and every destination must be a lab address (lab/addresses.py)."""
from __future__ import annotations

import ipaddress
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .addresses import check_lab_address

if TYPE_CHECKING:
    from .netns import Lab

TRAFGEN_MAX_PPS = 20_000_000          # -n cap per second of requested duration (a safety bound)


def trafgen_config(kind: str = "udp", *, src: str, dst: str, src_mac: str, dst_mac: str, dport: int = 5353,
                   sport: int | tuple[int, int] = 40000, size: int = 64, ttl: int = 64) -> str:
    """One trafgen packet definition: UDP datagrams or TCP SYNs from `src` to `dst`.

    src: an address, or a prefix whose host addresses are cycled through (dinc: round robin; for IPv6
    only the last 32 bits vary). sport: fixed or (lo, hi) random range. size: frame length without FCS
    (padding after the L4 header; SYNs carry the padding as payload, which some stacks ignore).
    Checksums are computed by trafgen (per packet when a field changes)."""
    if kind not in ("udp", "syn"):
        raise ValueError("kind must be 'udp' or 'syn'")
    check_lab_address(src)
    check_lab_address(dst)
    net = ipaddress.ip_network(src, strict=False)
    d = ipaddress.ip_address(dst)
    if net.version != d.version:
        raise ValueError(f"source {src} and destination {dst} are different IP versions")
    v4 = net.version == 4
    first, last = int(net.network_address), int(net.broadcast_address)
    if net.num_addresses > 2 and v4:
        first, last = first + 1, last - 1                     # skip network and broadcast addresses
    if "/" not in src or net.num_addresses == 1:
        sa = f"sa={ipaddress.ip_address(src.split('/')[0])}"
    elif v4:
        sa = f"sa={ipaddress.ip_address(first)}, sa=dinc({first}, {last})"
    else:
        lo32, hi32 = max(first & 0xFFFFFFFF, 1), min(last & 0xFFFFFFFF, 0xFFFFFFFF)
        if last - first >= 0xFFFFFFFF:
            lo32, hi32 = 1, 0xFFFFFFFE
        sa = f"sa={ipaddress.ip_address(first + 1)}, sa=dinc({lo32}, {hi32})"
    sp = f"sp={sport}" if isinstance(sport, int) else f"sp=drnd({sport[0]}, {sport[1]})"
    l3 = (f"ipv4({sa}, da={d}, ttl={ttl}, id=drnd())" if v4 else f"ipv6({sa}, da={d}, hl={ttl})")
    eth = f"eth(da={dst_mac}, sa={src_mac}, type={'0x0800' if v4 else '0x86dd'})"
    hdr = 14 + (20 if v4 else 40) + (8 if kind == "udp" else 20)
    pad = max(0, size - hdr)
    l4 = f"udp({sp}, dp={dport})" if kind == "udp" else f"tcp({sp}, dp={dport}, syn, seq=drnd(), win=64240)"
    return "{ " + ", ".join([eth, l3, l4] + ([f"fill(0, {pad})"] if pad else [])) + " }\n"


_TG_PKTS = re.compile(r"(\d+) packets outgoing")
_TG_BYTES = re.compile(r"(\d+) bytes outgoing")
_TG_CPU = re.compile(r"(\d+) sec, (\d+) usec on CPU(\d+) \((\d+) packets\)")


def parse_trafgen(out: str) -> dict:
    pk = _TG_PKTS.search(out)
    by = _TG_BYTES.search(out)
    cpus = [(int(s) + int(us) / 1e6, int(n)) for s, us, _, n in _TG_CPU.findall(out)]
    return {"packets": int(pk[1]) if pk else None, "bytes": int(by[1]) if by else None,
            "cpu_time_s": max((t for t, _ in cpus), default=None)}


def trafgen_argv(conf_path: str, *, dev: str = "eth0", cpus: int = 1, rate_pps: int | None = None,
                 max_packets: int = 0) -> list[str]:
    """trafgen's command line. rate_pps uses trafgen's --rate (sendto mode; approximate, it can be off by
    a factor of 2); without it trafgen sends as fast as it can through its TX ring (qdisc bypassed)."""
    # long options: this trafgen build rejects the short -A/-Q. --no-sock-mem/--notouch-irq keep
    # trafgen from changing system-wide socket buffer sysctls and IRQ affinities.
    argv = ["trafgen", "--dev", dev, "--conf", conf_path, "--cpus", str(cpus), "--no-sock-mem",
            "--notouch-irq", "--num", str(max_packets)]
    if rate_pps:
        argv += ["--rate", f"{int(rate_pps)}pps"]
    return argv


class TrafgenRun:
    """A running trafgen. Start with TrafgenRun.start(config, ...); stop() (SIGINT to its process group,
    bounded wait, then SIGKILL) returns {"packets", "bytes", "wall_s", "pps", ...}.
    Use as a context manager so it stops even if the caller fails; it also ends by itself after
    max_duration seconds (coreutils timeout) and after max_duration × rate packets (-n)."""

    def __init__(self, proc: subprocess.Popen, conf_path: str, duration_cap: float):
        self.proc = proc
        self.conf_path = conf_path
        self.t0 = time.monotonic()
        self.duration_cap = duration_cap
        self.result: dict | None = None

    @classmethod
    def start(cls, config: str, *, dev: str = "eth0", cpus: int = 1, rate_pps: int | None = None,
              max_duration: float = 30.0, popen: Callable[[list[str]], subprocess.Popen] | None = None
              ) -> TrafgenRun:
        fd, path = tempfile.mkstemp(prefix="hwl-trafgen-", suffix=".cfg")
        with os.fdopen(fd, "w") as f:
            f.write(config)
        cap = int(max_duration * (rate_pps or TRAFGEN_MAX_PPS))
        # hard time bound even if nobody calls stop(): coreutils timeout signals its whole process
        # group (trafgen and its forked workers), SIGINT first so trafgen still prints its totals
        argv = ["timeout", "-s", "INT", "-k", "5", f"{max_duration:g}",
                *trafgen_argv(path, dev=dev, cpus=cpus, rate_pps=rate_pps, max_packets=max(1, cap))]
        if popen is None:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        else:
            proc = popen(argv)
        return cls(proc, path, max_duration)

    def running(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout: float = 5.0) -> dict:
        if self.result is not None:
            return self.result
        wall = time.monotonic() - self.t0
        _killpg(self.proc, signal.SIGINT)
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _killpg(self.proc, signal.SIGKILL)
            try:
                out, err = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                out, err = "", ""
        try:
            os.unlink(self.conf_path)
        except OSError:
            pass
        r = parse_trafgen((out or "") + (err or ""))
        r["wall_s"] = round(wall, 3)
        t = r["cpu_time_s"] or wall
        r["pps"] = round(r["packets"] / t, 1) if r["packets"] and t else 0.0
        r["returncode"] = self.proc.returncode
        if r["packets"] is None:
            r["error"] = ((err or "") + (out or "")).strip()[-500:]
        self.result = r
        return r

    def __enter__(self) -> TrafgenRun:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _killpg(p: subprocess.Popen, sig: int) -> None:
    if p.returncode is None:                 # unreaped leader: pgid == pid is still ours
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def run_trafgen(config: str, *, duration: float = 3.0, dev: str = "eth0", cpus: int = 1,
                rate_pps: int | None = None, popen=None) -> dict:
    """Send `config` for `duration` seconds (≤ 60); returns packets sent and pps."""
    duration = min(float(duration), 60.0)
    with TrafgenRun.start(config, dev=dev, cpus=cpus, rate_pps=rate_pps, max_duration=duration + 5,
                          popen=popen) as run:
        end = time.monotonic() + duration
        while time.monotonic() < end and run.running():
            time.sleep(min(0.1, max(0.0, end - time.monotonic())))
        return run.stop()


def trafgen_in(lab: Lab, host: str, *, kind: str = "udp", dst_host: str = "prot", family: int = 4,
               src: str | None = None, dport: int = 5353, sport: int | tuple[int, int] = 40000, size: int = 64,
               duration: float | None = 3.0, rate_pps: int | None = None, cpus: int = 1,
               dst: str | None = None) -> dict | TrafgenRun:
    """trafgen from `host`'s eth0 to `dst_host` (MACs looked up in the lab; src defaults to host's own
    address, or a prefix for spoofed floods). With duration=None returns the running TrafgenRun
    (the caller stops it); else runs for `duration` s and returns the report."""
    cfg = trafgen_config(kind, src=src or lab.addr(host, family), dst=dst or lab.addr(dst_host, family),
                         src_mac=lab.mac(host), dst_mac=lab.mac(dst_host), dport=dport, sport=sport, size=size)
    popen = lambda argv: lab.popen(host, argv)                                  # noqa: E731
    if duration is None:
        return TrafgenRun.start(cfg, rate_pps=rate_pps, cpus=cpus, max_duration=60.0, popen=popen)
    return run_trafgen(cfg, duration=duration, rate_pps=rate_pps, cpus=cpus, popen=popen)
