"""Traffic for the lab: echo servers, clients that report JSON, ping, a long-lived connection probe
and trafgen floods. Standard library only (starts fast inside a namespace).

Two ways to use it:
- inside a namespace, as a library or CLI:  ip netns exec NS python -m hostwall.lab.traffic tcp-client --host ...
  Every client prints one JSON object on stdout; servers print {"ready": true, ...} once listening and
  a JSON summary when they stop (SIGTERM/SIGINT or --duration).
- from the test process (root namespace), through a Lab: `run_in(lab, host, [...])`, `echo_servers(...)`,
  `start_in(...)` (background client), `ping_in(...)`, `TrafgenRun` / `trafgen_in(...)`.

Bounds: every client has a per-operation timeout and a count; every loop is bounded by count and
time; servers stop after --duration (default 600 s) at the latest; trafgen runs are stopped after their
duration (SIGINT to the process group) and are also capped by a packet count (-n).
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .netns import Lab

SERVER_MAX_S = 600.0
TRAFGEN_MAX_PPS = 20_000_000          # -n cap per second of requested duration (a safety bound)


# The lab's address space (lab/netns.py) plus loopback: the only destinations these helpers accept.
ALLOWED_NETS = tuple(ipaddress.ip_network(n) for n in ("10.66.0.0/16", "fd66::/16", "127.0.0.0/8", "::1/128"))


def check_lab_address(addr: str) -> str:
    """Raise ValueError unless `addr` (address or prefix) lies inside the lab ranges or loopback.
    Every client and the trafgen builder call this, so no helper can send traffic elsewhere."""
    net = ipaddress.ip_network(addr, strict=False)
    if not any(net.version == a.version and net.subnet_of(a) for a in ALLOWED_NETS):
        raise ValueError(f"{addr} is outside the lab (allowed: {', '.join(map(str, ALLOWED_NETS))})")
    return addr


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _latency_summary(lat: list[float]) -> dict:
    if not lat:
        return {"n": 0}
    s = sorted(lat)
    return {"n": len(s), "min": round(s[0], 3), "p50": round(s[len(s) // 2], 3),
            "p99": round(s[min(len(s) - 1, int(len(s) * 0.99))], 3), "max": round(s[-1], 3),
            "mean": round(statistics.fmean(s), 3)}


def _err_kind(e: BaseException) -> str:
    if isinstance(e, (socket.timeout, TimeoutError)):
        return "timeout"
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, ConnectionResetError):
        return "reset"
    if isinstance(e, BrokenPipeError):
        return "broken_pipe"
    if isinstance(e, OSError) and e.errno is not None:
        return f"oserror_{e.errno}"
    return type(e).__name__


# =============================================================================== servers (asyncio)

@dataclass
class ServerStats:
    tcp_connections: int = 0
    tcp_bytes: int = 0
    udp_datagrams: int = 0
    udp_bytes: int = 0
    errors: int = 0

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def _bind_socket(kind: int, family: int, port: int, addr: str | None = None) -> socket.socket:
    s = socket.socket(family, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    s.bind((addr or ("::" if family == socket.AF_INET6 else "0.0.0.0"), port))
    return s


async def _serve(tcp_ports: Sequence[int], udp_ports: Sequence[int], duration: float,
                 families: Sequence[int], stats: ServerStats, on_ready: Callable[[], None]) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):
            pass

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        stats.tcp_connections += 1
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                stats.tcp_bytes += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            stats.errors += 1
        finally:
            writer.close()

    class Echo(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.t = transport

        def datagram_received(self, data, addr):
            stats.udp_datagrams += 1
            stats.udp_bytes += len(data)
            self.t.sendto(data, addr)

        def error_received(self, exc):
            stats.errors += 1

    servers, transports = [], []
    try:
        for port in tcp_ports:
            for fam in families:
                sock = _bind_socket(socket.SOCK_STREAM, fam, port)
                servers.append(await asyncio.start_server(handle, sock=sock, backlog=256))
        for port in udp_ports:
            for fam in families:
                sock = _bind_socket(socket.SOCK_DGRAM, fam, port)
                t, _ = await loop.create_datagram_endpoint(Echo, sock=sock)
                transports.append(t)
        on_ready()
        try:
            await asyncio.wait_for(stop.wait(), timeout=min(duration, SERVER_MAX_S))
        except TimeoutError:
            pass
    finally:
        for s in servers:
            s.close()
        for t in transports:
            t.close()


def run_echo_server(tcp_ports: Sequence[int] = (), udp_ports: Sequence[int] = (), *,
                    duration: float = SERVER_MAX_S, families: Sequence[int] = (4, 6),
                    on_ready: Callable[[], None] | None = None) -> dict:
    """Serve TCP and/or UDP echo on every port, IPv4 and IPv6 (separate v6-only sockets), until
    SIGTERM/SIGINT or `duration` seconds. Returns counters."""
    stats = ServerStats()
    fams = [socket.AF_INET if f == 4 else socket.AF_INET6 for f in families]
    ready = on_ready or (lambda: None)
    asyncio.run(_serve(list(tcp_ports), list(udp_ports), duration, fams, stats, ready))
    return stats.as_dict()


# ====================================================================================== clients

def _recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly n bytes from sock (ConnectionResetError if the peer closes first)."""
    got = b""
    while len(got) < n:
        chunk = sock.recv(n - len(got))
        if not chunk:
            raise ConnectionResetError("closed by peer")
        got += chunk
    return got


def _echo(sock: socket.socket, payload: bytes) -> None:
    """One echo round trip; ValueError if the echo differs from what was sent."""
    sock.sendall(payload)
    if _recv_exact(sock, len(payload)) != payload:
        raise ValueError("echo mismatch")


def tcp_client(host: str, port: int, count: int = 5, *, timeout: float = 1.0, size: int = 32,
               reuse: bool = False, interval: float = 0.0, max_time: float | None = None) -> dict:
    """`count` request/response round trips to a TCP echo server. New connection per round trip
    unless reuse=True (then one connection; after an error the next trip reconnects).
    Returns {"count", "ok", "fail", "errors": {kind: n}, "latency_ms": {...}} (latency includes the
    connect when not reusing)."""
    check_lab_address(host)
    deadline = time.monotonic() + (max_time if max_time is not None else count * (2 * timeout + interval) + 5)
    ok, errors, lat = 0, {}, []
    sock: socket.socket | None = None
    done = 0
    for i in range(count):
        if time.monotonic() > deadline:
            break
        done += 1
        payload = struct.pack("!I", i) + os.urandom(max(0, size - 4))
        t0 = time.perf_counter()
        try:
            if sock is None:
                sock = socket.create_connection((host, port), timeout=timeout)
            sock.settimeout(timeout)
            _echo(sock, payload)
            ok += 1
            lat.append((time.perf_counter() - t0) * 1000)
        except (OSError, ValueError) as e:
            k = "mismatch" if isinstance(e, ValueError) else _err_kind(e)
            errors[k] = errors.get(k, 0) + 1
            if sock is not None:
                sock.close()
                sock = None
        if not reuse and sock is not None:
            sock.close()
            sock = None
        if interval:
            time.sleep(interval)
    if sock is not None:
        sock.close()
    return {"proto": "tcp", "host": host, "port": port, "count": done, "ok": ok, "fail": done - ok,
            "errors": errors, "latency_ms": _latency_summary(lat)}


def udp_client(host: str, port: int, count: int = 5, *, timeout: float = 1.0, size: int = 32,
               interval: float = 0.0, max_time: float | None = None) -> dict:
    """`count` datagrams, each waiting up to `timeout` for its own echo (matched by sequence number;
    late echoes of earlier datagrams are skipped)."""
    check_lab_address(host)
    deadline = time.monotonic() + (max_time if max_time is not None else count * (timeout + interval) + 5)
    ok, errors, lat = 0, {}, []
    done = 0
    with socket.socket(_family(host), socket.SOCK_DGRAM) as s:
        s.connect((host, port))
        tag = os.urandom(4)
        for i in range(count):
            if time.monotonic() > deadline:
                break
            done += 1
            payload = tag + struct.pack("!I", i) + os.urandom(max(0, size - 8))
            t0 = time.perf_counter()
            end = time.monotonic() + timeout
            try:
                s.send(payload)
                for _ in range(64):               # bounded: skip at most 64 stale echoes
                    left = end - time.monotonic()
                    if left <= 0:
                        raise TimeoutError()
                    s.settimeout(left)
                    data = s.recv(65536)
                    if data == payload:
                        ok += 1
                        lat.append((time.perf_counter() - t0) * 1000)
                        break
                else:
                    raise TimeoutError()
            except OSError as e:
                k = _err_kind(e)
                errors[k] = errors.get(k, 0) + 1
            if interval:
                time.sleep(interval)
    return {"proto": "udp", "host": host, "port": port, "count": done, "ok": ok, "fail": done - ok,
            "errors": errors, "latency_ms": _latency_summary(lat)}


def long_lived(host: str, port: int, *, interval_ms: float = 50.0, duration: float = 5.0,
               timeout: float = 1.0, size: int = 16) -> dict:
    """One TCP connection; send a small message every interval_ms for `duration` s and wait for its echo.
    Reports sent/ok/fail, the largest gap between consecutive good echoes (max_gap_ms; also from the
    start and to the end), and broken=True if the connection died (then it stops: no reconnect, since
    the point is to prove an enforcer restart or a policy swap keeps existing connections)."""
    check_lab_address(host)
    interval = interval_ms / 1000.0
    n_max = int(duration / interval) + 1 if interval > 0 else 1
    t_start = time.monotonic()
    deadline = t_start + duration
    sent = ok = fail = 0
    broken, error = False, None
    last_ok = t_start
    max_gap = 0.0
    lat = []
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        return {"proto": "tcp", "host": host, "port": port, "connected": False, "error": _err_kind(e),
                "sent": 0, "ok": 0, "fail": 0, "broken": True, "max_gap_ms": None, "duration_s": 0.0}
    with sock:
        sock.settimeout(timeout)
        for i in range(n_max):
            now = time.monotonic()
            if now >= deadline:
                break
            payload = struct.pack("!Q", i) + b"x" * max(0, size - 8)
            sent += 1
            t0 = time.perf_counter()
            try:
                _echo(sock, payload)
                ok += 1
                t = time.monotonic()
                max_gap = max(max_gap, t - last_ok)
                last_ok = t
                lat.append((time.perf_counter() - t0) * 1000)
            except TimeoutError:
                fail += 1                       # the echo may still arrive: keep the stream aligned
                error = "timeout"
                try:
                    sock.settimeout(timeout)
                    _recv_exact(sock, len(payload))      # drain the late echo
                except OSError as e:
                    broken, error = True, _err_kind(e)
                    break
            except (OSError, ValueError) as e:
                fail += 1
                broken, error = True, "mismatch" if isinstance(e, ValueError) else _err_kind(e)
                break
            sleep = (t_start + (i + 1) * interval) - time.monotonic()
            if sleep > 0:
                time.sleep(min(sleep, max(0.0, deadline - time.monotonic())))
    end = time.monotonic()
    if not broken:
        max_gap = max(max_gap, end - last_ok)
    return {"proto": "tcp", "host": host, "port": port, "connected": True, "sent": sent, "ok": ok,
            "fail": fail, "broken": broken, "error": error, "max_gap_ms": round(max_gap * 1000, 3),
            "interval_ms": interval_ms, "duration_s": round(end - t_start, 3),
            "latency_ms": _latency_summary(lat)}


# ========================================================================================= ping

_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) (?:packets )?received")
_PING_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def ping_argv(host: str, count: int = 3, *, timeout: float = 1.0, interval: float = 0.2,
              size: int | None = None) -> list[str]:
    check_lab_address(host)
    argv = ["ping", "-6" if ":" in host else "-4", "-n", "-q", "-c", str(count), "-i", str(interval),
            "-W", f"{timeout:g}", "-w", str(int(count * interval + timeout + 1.999))]
    if size is not None:
        argv += ["-s", str(size)]
    return argv + [host]


def parse_ping(out: str, returncode: int | None = None) -> dict:
    m = _PING_SUMMARY.search(out)
    sent, recv = (int(m[1]), int(m[2])) if m else (0, 0)
    r = _PING_RTT.search(out)
    rtt = {"min": float(r[1]), "avg": float(r[2]), "max": float(r[3])} if r else None
    return {"sent": sent, "received": recv, "loss": (1 - recv / sent) if sent else 1.0, "rtt_ms": rtt,
            "returncode": returncode}


def ping(host: str, count: int = 3, *, timeout: float = 1.0, interval: float = 0.2) -> dict:
    """Run ping in the current namespace; {"sent", "received", "loss", "rtt_ms"}."""
    check_lab_address(host)
    argv = ping_argv(host, count, timeout=timeout, interval=interval)
    cp = subprocess.run(argv, capture_output=True, text=True, timeout=count * interval + timeout + 5)
    return {"host": host, **parse_ping(cp.stdout, cp.returncode)}


# ====================================================================================== trafgen

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


# =============================================================== driving it from outside a namespace

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
    """Run `python -m hostwall.lab.traffic COMMAND --param value ...` inside host's namespace; return its JSON."""
    cp = lab.python(host, ["-m", "hostwall.lab.traffic", command, *_cli_args(params)], timeout=timeout, check=False)
    if cp.returncode != 0:
        raise RuntimeError(f"[{host}] lab.traffic {command} failed (exit {cp.returncode}): {cp.stderr[-1500:]}")
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
    """A lab.traffic command running in a namespace; result() waits (bounded) for its JSON."""

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
    """Start `python -m hostwall.lab.traffic COMMAND ...` in the background inside host's namespace."""
    argv = [sys.executable, "-m", "hostwall.lab.traffic", command, *_cli_args(params)]
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
    argv = [sys.executable, "-m", "hostwall.lab.traffic", "echo-server", *_cli_args(
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


# ========================================================================================== CLI

def _ports(s: str) -> list[int]:
    return [int(p) for p in s.split(",") if p.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hostwall.lab.traffic", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("echo-server", help="TCP and/or UDP echo servers, IPv4 + IPv6")
    p.add_argument("--tcp", type=_ports, default=[])
    p.add_argument("--udp", type=_ports, default=[])
    p.add_argument("--duration", type=float, default=SERVER_MAX_S)
    p.add_argument("--families", type=_ports, default=[4, 6])
    for name, proto in (("tcp-echo-server", "tcp"), ("udp-echo-server", "udp")):
        q = sub.add_parser(name, help=f"{proto.upper()} echo server")
        q.add_argument("--ports", type=_ports, required=True)
        q.add_argument("--duration", type=float, default=SERVER_MAX_S)
        q.add_argument("--families", type=_ports, default=[4, 6])

    for name in ("tcp-client", "udp-client"):
        q = sub.add_parser(name, help="N request/response round trips, JSON report")
        q.add_argument("--host", required=True)
        q.add_argument("--port", type=int, required=True)
        q.add_argument("--count", type=int, default=5)
        q.add_argument("--op-timeout", type=float, default=1.0, help="per round trip, seconds")
        q.add_argument("--size", type=int, default=32)
        q.add_argument("--interval", type=float, default=0.0, help="pause between trips, seconds")
        if name == "tcp-client":
            q.add_argument("--reuse", action="store_true", help="one connection for all trips")

    q = sub.add_parser("long-lived", help="one TCP connection, a message every interval, gap report")
    q.add_argument("--host", required=True)
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--interval-ms", type=float, default=50.0)
    q.add_argument("--duration", type=float, default=5.0)
    q.add_argument("--op-timeout", type=float, default=1.0)

    q = sub.add_parser("ping", help="ping wrapper with a JSON report")
    q.add_argument("--host", required=True)
    q.add_argument("--count", type=int, default=3)
    q.add_argument("--op-timeout", type=float, default=1.0)
    q.add_argument("--interval", type=float, default=0.2)

    q = sub.add_parser("trafgen", help="UDP or TCP SYN flood for a fixed duration, JSON report")
    q.add_argument("--kind", choices=["udp", "syn"], default="udp")
    q.add_argument("--src", required=True, help="address or prefix (cycled)")
    q.add_argument("--dst", required=True)
    q.add_argument("--src-mac", required=True)
    q.add_argument("--dst-mac", required=True)
    q.add_argument("--dport", type=int, default=5353)
    q.add_argument("--sport", default="40000", help="port or LO-HI (random)")
    q.add_argument("--size", type=int, default=64)
    q.add_argument("--duration", type=float, default=3.0)
    q.add_argument("--rate-pps", type=int)
    q.add_argument("--cpus", type=int, default=1)
    q.add_argument("--dev", default="eth0")
    q.add_argument("--print-config", action="store_true", help="print the trafgen config and exit")

    a = ap.parse_args(argv)

    def emit(obj: dict) -> None:
        print(json.dumps(obj), flush=True)

    if a.cmd in ("echo-server", "tcp-echo-server", "udp-echo-server"):
        tcp = a.tcp if a.cmd == "echo-server" else (a.ports if a.cmd == "tcp-echo-server" else [])
        udp = a.udp if a.cmd == "echo-server" else (a.ports if a.cmd == "udp-echo-server" else [])
        if not tcp and not udp:
            ap.error("give --tcp and/or --udp ports")
        ready = lambda: emit({"ready": True, "pid": os.getpid(), "tcp": tcp, "udp": udp})   # noqa: E731
        emit({"stopped": True, **run_echo_server(tcp, udp, duration=a.duration, families=a.families,
                                                 on_ready=ready)})
    elif a.cmd == "tcp-client":
        emit(tcp_client(a.host, a.port, a.count, timeout=a.op_timeout, size=a.size, reuse=a.reuse,
                        interval=a.interval))
    elif a.cmd == "udp-client":
        emit(udp_client(a.host, a.port, a.count, timeout=a.op_timeout, size=a.size, interval=a.interval))
    elif a.cmd == "long-lived":
        emit(long_lived(a.host, a.port, interval_ms=a.interval_ms, duration=a.duration, timeout=a.op_timeout))
    elif a.cmd == "ping":
        emit(ping(a.host, a.count, timeout=a.op_timeout, interval=a.interval))
    elif a.cmd == "trafgen":
        sport: int | tuple[int, int] = int(a.sport) if "-" not in a.sport else \
            tuple(int(x) for x in a.sport.split("-", 1))                     # type: ignore[assignment]
        cfg = trafgen_config(a.kind, src=a.src, dst=a.dst, src_mac=a.src_mac, dst_mac=a.dst_mac, dport=a.dport,
                             sport=sport, size=a.size)
        if a.print_config:
            print(cfg, end="")
            return 0
        emit(run_trafgen(cfg, duration=a.duration, dev=a.dev, cpus=a.cpus, rate_pps=a.rate_pps))
    return 0


if __name__ == "__main__":
    sys.exit(main())
