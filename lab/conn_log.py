"""A traffic generator that keeps its own log: short TCP connections to an echo server at a steady rate,
one JSON line per connection (the ground truth the crash tests compare the flow records with).

    ip netns exec NS python -m hostwall.lab.conn_log --host 10.66.1.10 --port 80 --rate 200 \\
        --duration 600 --out /tmp/conns.jsonl

Each connection: connect, send 32 bytes, read the echo, close (shutdown of the write side, then read to
EOF, so both FINs are exchanged and the connection is complete). Logged after the close:
{"src", "sport", "dst", "dport", "t0", "t1", "ok", "error"} (wall-clock seconds; t0 before connect, t1
after close). Bounded: --duration and --count, a per-operation timeout, and it stops on SIGTERM/SIGINT
after the connection in progress (the log is flushed per line). Standard library only; only lab
addresses (lab.addresses.check_lab_address).
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time

from .addresses import check_lab_address

__all__ = ["run", "main"]


def _one(host: str, port: int, timeout: float) -> dict:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    t0 = time.time()
    rec: dict = {"dst": host, "dport": port, "t0": t0}
    s = socket.socket(fam, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.connect((host, port))
        rec["src"], rec["sport"] = s.getsockname()[:2]
        payload = os.urandom(32)
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(len(payload) - len(got))
            if not chunk:
                raise ConnectionError("closed before the echo")
            got += chunk
        if got != payload:
            raise ValueError("echo mismatch")
        s.shutdown(socket.SHUT_WR)
        while s.recv(64):                     # to EOF: the server's FIN
            pass
        rec["ok"] = True
    except (OSError, ValueError) as e:
        rec["ok"], rec["error"] = False, type(e).__name__
    finally:
        s.close()
    rec["t1"] = time.time()
    return rec


def run(host: str, port: int, *, rate: float, duration: float, count: int, out: str, timeout: float = 1.0) -> dict:
    check_lab_address(host)
    stop = {"now": False}
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.update(now=True))
    ok = fail = 0
    t_start = time.monotonic()
    step = 1.0 / rate
    with open(out, "a", buffering=1) as log:
        print(json.dumps({"ready": True, "pid": os.getpid()}), flush=True)
        n = 0
        while not stop["now"] and n < count and time.monotonic() - t_start < duration:
            rec = _one(host, port, timeout)
            log.write(json.dumps(rec) + "\n")
            ok += rec["ok"]
            fail += not rec["ok"]
            n += 1
            delay = t_start + n * step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
    return {"connections": ok + fail, "ok": ok, "fail": fail, "seconds": round(time.monotonic() - t_start, 3)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hostwall.lab.conn_log", description=__doc__.split("\n")[0])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--rate", type=float, default=100.0, help="connections per second")
    ap.add_argument("--duration", type=float, default=600.0)
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--op-timeout", type=float, default=1.0)
    ap.add_argument("--out", required=True, help="the connection log (JSON Lines, appended)")
    a = ap.parse_args(argv)
    print(json.dumps(run(a.host, a.port, rate=a.rate, duration=a.duration, count=a.count, out=a.out,
                         timeout=a.op_timeout)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
