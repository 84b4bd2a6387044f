"""Lab helpers for SYN floods against the protected host (tests/lab/test_synflood_lab.py, bench `dos`).

- `route_spoofed`: the flood's spoofed source prefixes are routed from the protected host towards the
  attacker, which owns none of those addresses and does not forward: replies to them (SYN-ACKs, cookie
  SYN-ACKs sent back by XDP) end there, and the protected host needs one neighbour entry, not 65 534.
- `hold` (in a namespace): N idle, established TCP connections to an echo server, checked on request
  (a line "check" on stdin → one echo round trip on each, JSON report; "exit" → close them all).
- `cookie_ack` / `cookie_handshake` (in a namespace, scapy): a bare ACK with a made-up cookie; a whole
  handshake answered by a SYN cookie, ending with a data segment whose echo proves the host's stack
  accepted it. The namespace's own stack would reset the SYN-ACK of a handshake it did not start, so
  `cookie_handshake` adds an nftables rule there dropping its outgoing RSTs to that port, and removes it.

Every address must lie in the lab's ranges; every run is bounded in time.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import subprocess
import sys
import time
from collections.abc import Sequence

from .endpoints import _recv_exact
from .netns import Lab

SPOOF_V4 = "10.66.128.0/17"          # 32 766 sources
SPOOF_V6 = "fd66:80::/32"


def route_spoofed(lab: Lab, host: str = "prot", via: str = "att") -> None:
    """Route the spoofed prefixes (both families) from `host` to `via`; the routes go with the lab."""
    lab.run(host, ["ip", "route", "replace", SPOOF_V4, "via", lab.addr(via, 4)])
    lab.run(host, ["ip", "-6", "route", "replace", SPOOF_V6, "via", lab.addr(via, 6)])


def protect_sysctls(lab: Lab, host: str = "prot", *, full_options: bool = False) -> None:
    """What docs/dos.md asks of the operator for the SYN proxy: the stack answers and accepts cookies
    (tcp_syncookies=2); with full options, timestamps without a per-connection offset."""
    values: dict[str, object] = {"net.ipv4.tcp_syncookies": 2}
    if full_options:
        values["net.ipv4.tcp_timestamps"] = 2
    lab.sysctl(host, values)


# ---- idle established connections ----------------------------------------------------------------

def _hold(host: str, port: int, count: int, timeout: float) -> int:
    socks, errors = [], {}
    for _ in range(count):
        try:
            s = socket.create_connection((host, port), timeout=timeout)
            s.settimeout(timeout)
            socks.append(s)
        except OSError as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
    print(json.dumps({"ready": True, "open": len(socks), "errors": errors}), flush=True)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        r, _, _ = select.select([sys.stdin], [], [], 1.0)
        if not r:
            continue
        cmd = sys.stdin.readline().strip()
        if cmd == "check":
            ok, errs = 0, {}
            for i, s in enumerate(socks):
                msg = f"hold-{i}-{random.random()}".encode()
                try:
                    s.sendall(msg)
                    ok += _recv_exact(s, len(msg)) == msg
                except OSError as e:
                    errs[type(e).__name__] = errs.get(type(e).__name__, 0) + 1
            print(json.dumps({"checked": len(socks), "ok": ok, "errors": errs}), flush=True)
        elif cmd in ("exit", ""):
            break
    for s in socks:
        s.close()
    return 0


class Held:
    """Connections held by `python -m hostwall.lab.synflood hold` inside a lab host."""

    def __init__(self, lab: Lab, host: str, dst: str, port: int, count: int, timeout: float = 1.0):
        self.lab, self.count, self.timeout = lab, count, timeout
        self.proc = lab.popen(host, [sys.executable, "-m", "hostwall.lab.synflood", "hold", "--host", dst, "--port",
                                     str(port), "--count", str(count), "--op-timeout", str(timeout)],
                              stdin=subprocess.PIPE)
        self.ready = self._line(timeout * count + 20)

    def _line(self, timeout: float) -> dict:
        # poll, not select: a long test session's process may hold file descriptors above select's 1024
        p = select.poll()
        p.register(self.proc.stdout, select.POLLIN | select.POLLHUP)
        if not p.poll(timeout * 1000):
            raise RuntimeError(f"hold: no answer within {timeout:g} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"hold ended: {self.proc.stderr.read()[-1000:]}")
        return json.loads(line)

    def check(self) -> dict:
        """One echo round trip on every held connection: {"checked", "ok", "errors"} (a dead one costs
        its timeout)."""
        self.proc.stdin.write("check\n")
        self.proc.stdin.flush()
        return self._line(self.count * self.timeout + 30)

    def close(self) -> None:
        try:
            self.proc.stdin.write("exit\n")
            self.proc.stdin.flush()
        except OSError:
            pass
        self.lab.stop(self.proc)

    def __enter__(self) -> Held:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- scapy: cookies on the wire --------------------------------------------------------------------

def _ip(src: str, dst: str):
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    return IPv6(src=src, dst=dst) if ":" in dst else IP(src=src, dst=dst)


def _cookie_ack(src: str, dst: str, port: int, count: int) -> dict:
    from scapy.layers.inet import TCP
    from scapy.sendrecv import send
    pkts = [_ip(src, dst) / TCP(sport=random.randint(20000, 60000), dport=port, flags="A",
                                seq=random.getrandbits(32), ack=random.getrandbits(32)) for _ in range(count)]
    send(pkts, verbose=False)
    return {"sent": count}


def _cookie_handshake(src: str, dst: str, port: int, timeout: float) -> dict:
    from scapy.layers.inet import TCP
    from scapy.packet import Raw
    from scapy.sendrecv import AsyncSniffer, send, sr1
    sport = random.randint(20000, 60000)
    fam = "ip6" if ":" in dst else "ip"
    rule = ["nft", "add", "table", "inet", "hwlcookie"]
    subprocess.run(rule, check=True)
    try:
        subprocess.run(["nft", "add", "chain", "inet", "hwlcookie", "out", "{ type filter hook output priority 0; }"],
                       check=True)
        subprocess.run(["nft", "add", "rule", "inet", "hwlcookie", "out", fam, "daddr", dst, "tcp", "sport",
                        str(sport), "tcp", "flags", "rst", "drop"], check=True)
        isn = random.getrandbits(32)
        sa = sr1(_ip(src, dst) / TCP(sport=sport, dport=port, flags="S", seq=isn, options=[("MSS", 1460)]),
                 timeout=timeout, verbose=False)
        if sa is None or sa[TCP].flags != "SA":
            return {"ok": False, "why": "no SYN-ACK"}
        cookie = sa[TCP].seq
        data = b"cookie-handshake"
        sniffer = AsyncSniffer(filter=f"tcp and src port {port} and dst port {sport}", count=1,
                               lfilter=lambda p: Raw in p)
        sniffer.start()
        time.sleep(0.2)                                 # the capture is open before anything is sent
        send([_ip(src, dst) / TCP(sport=sport, dport=port, flags="A", seq=isn + 1, ack=cookie + 1),
              _ip(src, dst) / TCP(sport=sport, dport=port, flags="PA", seq=isn + 1, ack=cookie + 1) / Raw(data)],
             verbose=False)
        sniffer.join(timeout + 1)
        got = next((bytes(p[Raw].load) for p in (sniffer.results or [])), b"")
        return {"ok": got == data, "synack_options": [o[0] for o in sa[TCP].options], "echo": got.decode(errors="replace")}
    finally:
        subprocess.run(["nft", "delete", "table", "inet", "hwlcookie"], check=False)


def in_namespace(lab: Lab, host: str, command: str, timeout: float = 60.0, **params) -> dict:
    """Run one of this module's commands inside host's namespace; its JSON result."""
    argv = [sys.executable, "-m", "hostwall.lab.synflood", command]
    for k, v in params.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    cp = lab.run(host, argv, timeout=timeout, check=False)
    if cp.returncode != 0:
        raise RuntimeError(f"[{host}] synflood {command}: exit {cp.returncode}: {cp.stderr[-1500:]}")
    return json.loads(cp.stdout.strip().splitlines()[-1])


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hostwall.lab.synflood", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    q = sub.add_parser("hold")
    q.add_argument("--host", required=True)
    q.add_argument("--port", type=int, required=True)
    q.add_argument("--count", type=int, default=50)
    q.add_argument("--op-timeout", type=float, default=2.0)
    for name in ("cookie-ack", "cookie-handshake"):
        q = sub.add_parser(name)
        q.add_argument("--src", required=True)
        q.add_argument("--dst", required=True)
        q.add_argument("--port", type=int, required=True)
        q.add_argument("--count", type=int, default=10)
        q.add_argument("--op-timeout", type=float, default=3.0)
    a = ap.parse_args(argv)
    from .traffic import check_lab_address
    check_lab_address(a.host if a.cmd == "hold" else a.dst)
    if a.cmd == "hold":
        return _hold(a.host, a.port, a.count, a.op_timeout)
    res = _cookie_ack(a.src, a.dst, a.port, a.count) if a.cmd == "cookie-ack" else \
        _cookie_handshake(a.src, a.dst, a.port, a.op_timeout)
    print(json.dumps(res), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
