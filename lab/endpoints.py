"""Traffic endpoints that run inside a lab namespace: echo servers, clients that report JSON, ping,
a long-lived connection probe — as a library or as the CLI `python -m hostwall.lab.endpoints`
(also the `trafgen` command of lab/trafgen.py). Standard library only (starts fast in a namespace).

Every client prints one JSON object on stdout; servers print {"ready": true, ...} once listening and a
JSON summary when they stop (SIGTERM/SIGINT or --duration). Bounds: every client has a per-operation
timeout and a count; every loop is bounded by count and time; servers stop after --duration (default
600 s) at the latest. The test process drives these through lab/traffic.py.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .addresses import check_lab_address
from .trafgen import run_trafgen, trafgen_config

SERVER_MAX_S = 600.0


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


# ========================================================================================== CLI

def _ports(s: str) -> list[int]:
    return [int(p) for p in s.split(",") if p.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hostwall.lab.endpoints", description=__doc__.split("\n")[0])
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
