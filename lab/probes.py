"""Probe packets for comparing packet filters on the lab: what a host's own stack accepted.

- `Sender`: a process inside one lab namespace (pinned to one CPU) that sends IP packets through a
  raw socket — so they traverse the sending host's OUTPUT hooks and TC egress like any of its packets —
  and *fences*: an ARP request on eth0 followed by waiting for the reply. Packets from one CPU through
  veth and the lab bridge are processed in order, and ARP is judged neither by netfilter's ip/ip6
  tables nor by hostwall (pass_not_ip), so the reply to a fence proves the receiver has processed every
  packet sent before it: the tests wait on that, never on time.
- `install_observer` / `observed`: an nftables table at priority 100 of the input hook (after the
  filter at priority 0) that records every TCP/UDP packet and ICMP echo request the host accepted, by
  (family, source, destination, protocol, ports or echo id). Whichever filter runs — iptables,
  nftables, hostwall's XDP/TC — the observer sees exactly what it let in.
- `ipt_counters`: per-rule packet counters of iptables-save -c, to tell which rules a probe matched.

Everything stays inside the lab's namespaces (lab/netns.py). Cost: a probe with its fence ~1 ms.
"""
from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
import time

from .netns import Lab

__all__ = ["Sender", "install_observer", "observed", "ipt_counters", "static_neighbours", "OBSERVER"]

OBSERVER = """table inet hwobs {
  set seen4 { typeof ip saddr . ip daddr . meta l4proto . th sport . th dport; flags dynamic; size 65536; }
  set seen6 { typeof ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport; flags dynamic; size 65536; }
  set echo4 { typeof ip saddr . ip daddr . icmp id; flags dynamic; size 65536; }
  set echo6 { typeof ip6 saddr . ip6 daddr . icmpv6 id; flags dynamic; size 65536; }
  chain in {
    type filter hook input priority 100; policy accept;
    meta nfproto ipv4 meta l4proto { tcp, udp } add @seen4 { ip saddr . ip daddr . meta l4proto . th sport . th dport }
    meta nfproto ipv6 meta l4proto { tcp, udp } add @seen6 { ip6 saddr . ip6 daddr . meta l4proto . th sport . th dport }
    icmp type echo-request add @echo4 { ip saddr . ip daddr . icmp id }
    icmpv6 type echo-request add @echo6 { ip6 saddr . ip6 daddr . icmpv6 id }
  }
}
"""
_PROTO = {6: "tcp", 17: "udp", "tcp": "tcp", "udp": "udp"}


def install_observer(lab: Lab, host: str) -> None:
    lab.run(host, ["nft", "-f", "-"], input=OBSERVER)


def observed(lab: Lab, host: str) -> set[tuple]:
    """Keys of the probes `host` accepted: (family, src, dst, proto, sport, dport) or (family, src, dst,
    'echo', id)."""
    out = set()
    for name, fam in (("seen4", 4), ("seen6", 6), ("echo4", 4), ("echo6", 6)):
        doc = json.loads(lab.run(host, ["nft", "-j", "list", "set", "inet", "hwobs", name]).stdout)
        for it in doc["nftables"]:
            for e in it.get("set", {}).get("elem", []):
                v = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
                c = v["concat"]
                if name.startswith("seen"):
                    out.add((fam, c[0], c[1], _PROTO.get(c[2], str(c[2])), int(c[3]), int(c[4])))
                else:
                    out.add((fam, c[0], c[1], "echo", int(c[2])))
    return {(k[0], str(_norm(k[1])), str(_norm(k[2])), *k[3:]) for k in out}


def _norm(a: str) -> str:
    import ipaddress
    return str(ipaddress.ip_address(a))


def static_neighbours(lab: Lab, hosts: dict[str, list[str]]) -> None:
    """Permanent ARP/ND entries on every host for every other host's addresses (`hosts`: host -> its
    addresses), so no neighbour discovery depends on the filter under test."""
    macs = {h: lab.mac(h) for h in hosts}
    for h in hosts:
        cmds = [f"neigh replace {a} lladdr {macs[o]} dev eth0 nud permanent"
                for o, addrs in hosts.items() if o != h for a in addrs]
        lab.run(h, ["ip", "-batch", "-"], input="\n".join(cmds) + "\n")


def ipt_counters(lab: Lab, host: str, family: int) -> dict[tuple[str, str, int], int]:
    """Packets per rule, keyed (table, chain, position in chain), and per chain policy, keyed
    (table, chain, -1), from iptables-save -c (ip6tables-save for family 6)."""
    text = lab.run(host, ["iptables-save" if family == 4 else "ip6tables-save", "-c"]).stdout
    out: dict[tuple[str, str, int], int] = {}
    pos: dict[tuple[str, str], int] = {}
    table = ""
    for line in text.splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith(":"):
            name, _, rest = line[1:].partition(" ")
            if "[" in rest:
                out[(table, name, -1)] = int(rest.split("[", 1)[1].split(":")[0])
        elif line.startswith("["):
            cnt, _, rule = line[1:].partition("]")
            chain = rule.split()[1]
            k = (table, chain)
            out[(table, chain, pos.get(k, 0))] = int(cnt.split(":")[0])
            pos[k] = pos.get(k, 0) + 1
    return out


class Sender:
    """A probe sender inside one namespace (see module docstring). send() and fence() raise on failure."""

    def __init__(self, lab: Lab, host: str, cpu: int = 0):
        self.lab, self.host = lab, host
        self.proc = lab.popen(host, ["taskset", "-c", str(cpu), sys.executable, "-m", "hostwall.lab.probes", "serve"],
                              stdin=subprocess.PIPE)
        assert self._reply()["ready"]

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"probe sender in {self.host} died: {self.proc.stderr.read()[-2000:]}")
        return json.loads(line)

    def _ask(self, req: dict) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        r = self._reply()
        if "error" in r:
            raise RuntimeError(f"probe sender in {self.host}: {r['error']}")
        return r

    def send(self, packets: list[tuple[int, str, bytes]]) -> list[int]:
        """(family, destination, IP packet bytes) each; returns each sendto's errno (0 = sent: EPERM means
        this host's OUTPUT filter dropped it)."""
        return self._ask({"op": "send", "packets": [[f, d, p.hex()] for f, d, p in packets]})["errno"]

    def fence(self, target_ip: str, timeout: float = 5.0) -> None:
        """ARP request for target_ip; returns when its owner answered (it processed everything before)."""
        self._ask({"op": "fence", "target": target_ip, "timeout": timeout})

    def close(self) -> None:
        if self.proc.poll() is None:
            self.lab.stop(self.proc)


# ---- the sender process ------------------------------------------------------------------------

def _arp_fence(iface: str, target: str, timeout: float) -> None:
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0806))
    try:
        s.bind((iface, 0))
        mac = s.getsockname()[4]
        me = _my_ipv4(iface)
        tgt = socket.inet_aton(target)
        req = (b"\xff" * 6 + mac + b"\x08\x06" + struct.pack("!HHBBH", 1, 0x0800, 6, 4, 1) + mac + me +
               b"\0" * 6 + tgt)
        s.send(req)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            s.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                f = s.recv(2048)
            except TimeoutError:
                break
            if len(f) >= 42 and f[12:14] == b"\x08\x06" and f[20:22] == b"\x00\x02" and f[28:32] == tgt:
                return
        raise TimeoutError(f"no ARP reply from {target} within {timeout} s")
    finally:
        s.close()


def _my_ipv4(iface: str) -> bytes:
    import fcntl
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        r = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", iface.encode()[:15]))     # SIOCGIFADDR
        return r[20:24]
    finally:
        s.close()


def serve() -> None:
    raw4 = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    raw6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "send":
                errs = []
                for fam, dst, hexp in req["packets"]:
                    try:
                        (raw4 if fam == 4 else raw6).sendto(bytes.fromhex(hexp), (dst, 0))
                        errs.append(0)
                    except OSError as e:
                        errs.append(e.errno or -1)
                print(json.dumps({"errno": errs}), flush=True)
            elif req["op"] == "fence":
                _arp_fence("eth0", req["target"], float(req["timeout"]))
                print(json.dumps({"ok": True}), flush=True)
        except Exception as e:  # noqa: BLE001 — reported to the caller, which raises with it
            print(json.dumps({"error": f"{type(e).__name__}: {e}"}), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["serve"]:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        serve()
