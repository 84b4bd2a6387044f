"""A packet capture for lab checks, taken as tcpdump takes it: an AF_PACKET socket on one interface of
a namespace, every frame in and out, with the kernel's nanosecond timestamp (SO_TIMESTAMPNS,
CLOCK_REALTIME). It is the independent reference the flow records are compared with
(tests/lab/test_capture.py): packets per direction, IP-layer bytes, first and last packet times.

    python -m hostwall.lab.capture --dev eth0 [--max-s 120]     (inside a namespace: Lab.popen)

prints {"ready": true} once the socket is bound, then, on SIGTERM or after --max-s, one JSON line
{"packets": [[ts_ns, outgoing, family, proto, src, dst, sport, dport, ip_len, tcp_flags], ...],
 "kernel_drops": n} with one row per IPv4/IPv6 packet (ip_len: IPv4 total length, IPv6 40 + payload
length: the layer flow records count). Memory is O(packets): for short lab exchanges, not floods.
`start()` runs it in a lab host and `Capture.stop()` returns the rows.
"""
from __future__ import annotations

import argparse
import json
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass

__all__ = ["Packet", "Capture", "start", "parse_frame"]

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
SO_TIMESTAMPNS = 35
SOL_PACKET, PACKET_STATISTICS = 263, 6


@dataclass(frozen=True)
class Packet:
    ts_ns: int           # CLOCK_REALTIME ns, the kernel's timestamp of the frame
    outgoing: bool       # sent by the capturing host (else received)
    family: int
    proto: int
    src: str
    dst: str
    sport: int
    dport: int
    ip_len: int
    tcp_flags: int


def parse_frame(frame: bytes) -> tuple | None:
    """(family, proto, src, dst, sport, dport, ip_len, tcp_flags) of an Ethernet frame carrying IPv4 or
    IPv6 (no VLAN tags, no IPv6 extension headers: the lab sends none); None for anything else."""
    if len(frame) < 14:
        return None
    etype = struct.unpack_from("!H", frame, 12)[0]
    ip = frame[14:]
    if etype == 0x0800 and len(ip) >= 20:
        ihl = (ip[0] & 0x0F) * 4
        fam, proto, ip_len = 4, ip[9], struct.unpack_from("!H", ip, 2)[0]
        src, dst = socket.inet_ntop(socket.AF_INET, ip[12:16]), socket.inet_ntop(socket.AF_INET, ip[16:20])
        l4 = ip[ihl:]
    elif etype == 0x86DD and len(ip) >= 40:
        fam, proto, ip_len = 6, ip[6], 40 + struct.unpack_from("!H", ip, 4)[0]
        src, dst = socket.inet_ntop(socket.AF_INET6, ip[8:24]), socket.inet_ntop(socket.AF_INET6, ip[24:40])
        l4 = ip[40:]
    else:
        return None
    sport = dport = flags = 0
    if proto in (6, 17) and len(l4) >= 4:
        sport, dport = struct.unpack_from("!HH", l4, 0)
        if proto == 6 and len(l4) >= 14:
            flags = l4[13]
    return fam, proto, src, dst, sport, dport, ip_len, flags


def _run(dev: str, max_s: float) -> dict:
    stop = False

    def on_term(*_):
        nonlocal stop
        stop = True
    signal.signal(signal.SIGTERM, on_term)
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    s.bind((dev, ETH_P_ALL))
    s.settimeout(0.1)
    print(json.dumps({"ready": True, "dev": dev}), flush=True)
    rows, deadline = [], time.monotonic() + max_s
    while not stop and time.monotonic() < deadline:
        try:
            frame, anc, _, addr = s.recvmsg(65536, socket.CMSG_SPACE(16))
        except (TimeoutError, InterruptedError):
            continue
        ts = 0
        for level, kind, data in anc:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = struct.unpack("qq", data[:16])
                ts = sec * 1_000_000_000 + nsec
        p = parse_frame(frame)
        if p is not None:
            rows.append([ts or time.time_ns(), int(addr[2] == PACKET_OUTGOING), *p])
    stats = s.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
    s.close()
    return {"packets": rows, "kernel_drops": struct.unpack("II", stats)[1]}


class Capture:
    """A capture running in a lab host (start()); stop() ends it and returns its packets."""

    def __init__(self, lab, proc):
        self.lab, self.proc = lab, proc
        self.packets: list[Packet] | None = None
        self.kernel_drops = 0

    def stop(self) -> list[Packet]:
        if self.packets is None:
            out, err = self.lab.stop(self.proc, signal.SIGTERM, timeout=15)
            lines = [x for x in out.splitlines() if x.startswith("{") and '"packets"' in x]
            if not lines:
                raise RuntimeError(f"capture ended without its report: {err[-1000:]}")
            res = json.loads(lines[-1])
            self.packets = [Packet(r[0], bool(r[1]), *r[2:]) for r in res["packets"]]
            self.kernel_drops = res["kernel_drops"]
        return self.packets


def start(lab, host: str, dev: str = "eth0", max_s: float = 300.0, ready_timeout: float = 10.0) -> Capture:
    """Start a capture on host's `dev`; returns once its socket is bound (bounded wait)."""
    from .netns import first_line
    p = lab.popen(host, [sys.executable, "-m", "hostwall.lab.capture", "--dev", dev, "--max-s", str(max_s)])
    line = first_line(p, ready_timeout)
    if '"ready"' not in line:
        lab.stop(p)
        raise RuntimeError(f"capture in {host} did not start: {line.strip()}")
    return Capture(lab, p)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hostwall.lab.capture", description=__doc__.split("\n")[0])
    ap.add_argument("--dev", default="eth0")
    ap.add_argument("--max-s", type=float, default=300.0)
    a = ap.parse_args(argv)
    print(json.dumps(_run(a.dev, a.max_s)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
