"""DNS in the lab: a real DNS server (Debian's dnsmasq) serving a private test zone inside a lab
namespace, and clients that query and connect from inside a namespace without a subprocess.

    with DnsServer(lab, "att", records=[A("mirror.example.test", "10.66.2.10", ttl=2)]) as srv:
        msg = query(lab, "prot", "127.0.0.1", "mirror.example.test")      # dnspython Message
        s = connect(lab, "prot", "10.66.2.10", 8080)                      # a connected socket or None

dnsmasq runs with no upstream (--no-resolv), no hosts file, no cache, answering only the zone given
(`--local` makes every other name under the zone's domains NXDOMAIN), in the foreground in its own
process group (Lab.popen: stopped with the lab). Addresses must be the lab's (lab/addresses.py).
Clients use sockets made inside the namespace (enforcer/netsock.py): a query costs one round trip, not a
Python start-up, so "query, then connect at once" measures the proxy's promise that the address is in
the datapath before the answer arrives.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import dns.message
import dns.rdatatype

from .addresses import check_lab_address
from .netns import Lab

__all__ = ["DnsServer", "A", "CNAME", "Wildcard", "query", "connect", "dnsmasq_binary"]


@dataclass(frozen=True)
class A:
    """name -> address (A for IPv4, AAAA for IPv6)."""
    name: str
    addr: str
    ttl: int = 60


@dataclass(frozen=True)
class CNAME:
    name: str
    target: str
    ttl: int = 60


@dataclass(frozen=True)
class Wildcard:
    """Every name under `domain` (and `domain` itself) -> addr (dnsmasq --address=/domain/addr)."""
    domain: str
    addr: str


def dnsmasq_binary() -> str:
    found = shutil.which("dnsmasq") or ("/usr/sbin/dnsmasq" if Path("/usr/sbin/dnsmasq").exists() else None)
    if not found:
        raise RuntimeError("dnsmasq is not installed: run scripts/setup.sh (Debian's dnsmasq-base)")
    return found


class DnsServer:
    """dnsmasq on `addr`:`port` in host's namespace (default: the host's lab IPv4 address)."""

    def __init__(self, lab: Lab, host: str, records: list, *, local_domains: tuple[str, ...] = ("test",),
                 addr: str | None = None, port: int = 53, local_ttl: int = 60):
        self.lab, self.host = lab, host
        self.addr = check_lab_address(addr or lab.addr(host))
        self.port = port
        self.records = list(records)
        self.local_domains, self.local_ttl = local_domains, local_ttl
        self.dir = Path(tempfile.mkdtemp(prefix="hostwall-dnsmasq-"))
        self.proc: subprocess.Popen | None = None

    def config(self) -> str:
        lines = ["no-resolv", "no-hosts", "no-poll", "cache-size=0", "bind-interfaces", "keep-in-foreground",
                 f"listen-address={self.addr}", f"port={self.port}", f"local-ttl={self.local_ttl}",
                 "log-facility=-", "user=root", "group=root"]
        lines += [f"local=/{d}/" for d in self.local_domains]
        for r in self.records:
            if isinstance(r, A):
                check_lab_address(r.addr)
                lines.append(f"host-record={r.name},{r.addr},{r.ttl}")
            elif isinstance(r, CNAME):
                lines.append(f"cname={r.name},{r.target},{r.ttl}")
            elif isinstance(r, Wildcard):
                check_lab_address(r.addr)
                lines.append(f"address=/{r.domain}/{r.addr}")
        return "\n".join(lines) + "\n"

    def start(self, timeout: float = 10.0) -> DnsServer:
        conf = self.dir / "dnsmasq.conf"
        conf.write_text(self.config())
        self.proc = self.lab.popen(self.host, [dnsmasq_binary(), f"--conf-file={conf}",
                                               f"--pid-file={self.dir / 'pid'}"])
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dnsmasq exited ({self.proc.returncode}): {self.proc.stderr.read()[-1500:]}")
            try:
                query(self.lab, self.host, self.addr, "ready.probe.test", port=self.port, timeout=0.3)
                return self
            except (TimeoutError, OSError) as e:
                last = e
        self.close()
        raise RuntimeError(f"dnsmasq in {self.host} did not answer on {self.addr}:{self.port} within {timeout:g} s: "
                           f"{last}")

    def close(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


def _fam(addr: str) -> int:
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


def query(lab: Lab, host: str, server: str, name: str, rdtype: str = "A", *, port: int = 53, tcp: bool = False,
          timeout: float = 2.0, edns: bool = True) -> dns.message.Message:
    """One query from inside host's namespace; the parsed answer, or TimeoutError."""
    check_lab_address(server)
    q = dns.message.make_query(name, dns.rdatatype.from_text(rdtype), use_edns=0 if edns else None)
    wire = q.to_wire()
    s = lab.socket_maker(host).socket(_fam(server), socket.SOCK_STREAM if tcp else socket.SOCK_DGRAM)
    s.setblocking(True)
    s.settimeout(timeout)
    try:
        s.connect((server, port))
        if tcp:
            s.sendall(len(wire).to_bytes(2, "big") + wire)
            n = int.from_bytes(_exact(s, 2), "big")
            data = _exact(s, n)
        else:
            s.send(wire)
            data = s.recv(65535)
        return dns.message.from_wire(data)
    except TimeoutError:
        raise TimeoutError(f"no answer from {server}:{port} for {name} {rdtype}") from None
    finally:
        s.close()


def _exact(s: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise TimeoutError("connection closed")
        buf += chunk
    return buf


def connect(lab: Lab, host: str, addr: str, port: int, timeout: float = 1.0) -> socket.socket | None:
    """A TCP connection from inside host's namespace (blocking socket with `timeout`), or None if it could
    not be made within `timeout` (e.g. the firewall dropped the SYN)."""
    check_lab_address(addr)
    s = lab.socket_maker(host).socket(_fam(addr), socket.SOCK_STREAM)
    s.setblocking(True)
    s.settimeout(timeout)
    try:
        s.connect((addr, port))
        return s
    except OSError:
        s.close()
        return None


def addresses(msg: dns.message.Message) -> list[str]:
    """Every A/AAAA address in the answer section."""
    return [rd.address for rrset in msg.answer if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA)
            for rd in rrset]
