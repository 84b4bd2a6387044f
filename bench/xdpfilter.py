"""xdp-filter (Debian's xdp-tools) as a baseline measured in the same run as hostwall (docs/benchmarks.md
"xdp-filter, the peer").

How it is loaded: by its own CLI, as a user would (`xdp-filter load IFACE`, `xdp-filter port`,
`xdp-filter ip`), on an interface inside a network namespace (the datapath suite makes its own with a veth
pair; the lab suite uses the protected host's eth0). Every CLI call runs in a private mount namespace
with a fresh bpffs instance mounted on /sys/fs/bpf (`nsenter --net … unshare --mount`), so its pins
(maps under xdp-filter/, the program under xdp-filter/programs/IFACE/) never touch the host's
/sys/fs/bpf, where another run could hold the same names; they vanish when the command exits, and the
program stays loaded because it is attached. LIBXDP_SKIP_DISPATCHER=1: libxdp attaches xdp-filter's
own XDP program directly (no xdp-dispatcher in front), so test-run times that program and nothing else.

The program is then reached by id (the interface's IFLA_XDP_PROG_ID → BPF_PROG_GET_FD_BY_ID), its maps
by the program's map ids. Its deny tables are per-CPU hashes of exact addresses (10 000 entries each in
1.3.1): the CLI adds one address per family, and the rest are written in bulk into the same maps with
the value the CLI wrote (one syscall per 8192 addresses instead of one process per address).

What xdp-filter can hold of a prefix list: see host_entries(). Its policy is "allow unmatched, drop
listed" (`--policy allow`, the default) or the reverse; it cannot combine a deny list of addresses with
an allow list of ports in one program, so the port list holds ports to deny (e.g. the port no hostwall
rule names). Cost: the CLI calls take ~0.1 s; the bulk fill a few ms.
"""
from __future__ import annotations

import ipaddress
import os
import secrets
import shlex
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager

from hostwall.bpf import bpfsys

__all__ = ["available", "host_entries", "XdpFilter", "scratch_netns", "XDP_ABORTED", "XDP_DROP", "XDP_PASS"]

XDP_ABORTED, XDP_DROP, XDP_PASS = 0, 1, 2
MAP_FLAG_SRC, MAP_FLAG_DST, MAP_FLAG_TCP, MAP_FLAG_UDP = 1, 2, 4, 8      # xdp-filter's common_kern_user.h
COUNTER_SHIFT = 6                                                       # hit counter above the flag bits
_CHUNK = 8192
_CLI_TIMEOUT = 60.0


def _binary() -> str | None:
    return shutil.which("xdp-filter") or shutil.which("xdp-filter", path="/usr/sbin:/sbin")


def available() -> tuple[bool, str]:
    """(True, version) when xdp-filter, nsenter and unshare are installed and we are root; else (False, why)."""
    if os.geteuid() != 0:
        return False, "xdp-filter needs root"
    b = _binary()
    if b is None:
        return False, "xdp-filter not installed (Debian package xdp-tools; scripts/setup.sh installs it)"
    for tool in ("nsenter", "unshare", "ip"):
        if shutil.which(tool) is None:
            return False, f"{tool} not installed"
    out = subprocess.run([b, "load", "--version"], capture_output=True, text=True, timeout=10)
    text = (out.stdout or out.stderr).strip()
    return True, (text.splitlines()[0] if text else "xdp-filter")


def host_entries(prefixes: Iterable[str], capacity: int, first: Sequence[str] = ()) -> list[str]:
    """What a table of exact addresses can hold of a prefix list, at most `capacity` entries: the
    addresses `first` (hosts inside the list, e.g. a probe's source), then the list's host routes (/32,
    /128) in list order, then one host (network address + 1) of each remaining prefix in list order.
    Every entry lies inside the list, so whatever xdp-filter drops the list denies; prefixes already
    covered by a `first` address add nothing."""
    out: list[str] = list(dict.fromkeys(first))[:capacity]
    taken = {ipaddress.ip_address(a) for a in out}
    nets = [ipaddress.ip_network(p.strip(), strict=False) for p in prefixes if p.strip() and not p.startswith("#")]
    hosts = [n for n in nets if n.num_addresses == 1]
    wide = [n for n in nets if n.num_addresses > 1 and not any(t in n for t in taken)]
    for n in hosts:
        if len(out) >= capacity:
            break
        if n.network_address not in taken:
            out.append(str(n.network_address))
            taken.add(n.network_address)
    for n in wide:
        if len(out) >= capacity:
            break
        out.append(str(n.network_address + 1))
    return out


@contextmanager
def scratch_netns(prefix: str = "hwxf") -> Iterator[tuple[str, str]]:
    """A namespace of our own with an up veth pair (xf0, xf1) to load xdp-filter on; deleted on exit
    (which detaches whatever is attached). Yields (netns name, interface)."""
    ns = f"{prefix}{secrets.token_hex(3)}"
    subprocess.run(["ip", "netns", "add", ns], check=True, capture_output=True, timeout=30)
    try:
        for cmd in (["link", "add", "xf0", "type", "veth", "peer", "name", "xf1"], ["link", "set", "xf0", "up"],
                    ["link", "set", "xf1", "up"]):
            subprocess.run(["ip", "-n", ns, *cmd], check=True, capture_output=True, timeout=30)
        yield ns, "xf0"
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


class XdpFilter:
    """xdp-filter loaded by its CLI on `ifname` in netns `netns` (policy allow: listed addresses and ports
    are dropped), its program fd for test-run and its maps by name. close() detaches it and closes fds;
    use as a context manager."""

    def __init__(self, netns: str, ifname: str, *, mode: str = "native", deny_ports: Sequence[int] = (),
                 deny_src: Sequence[str] = ()):
        self.netns, self.ifname, self.mode = netns, ifname, mode
        self.prog_fd = -1
        self.maps: dict[str, int] = {}
        self.ncpu = bpfsys.possible_cpus()
        self.entries = {4: 0, 6: 0}
        self._seeded: list[str] = []
        try:
            self._cli_load(deny_ports, deny_src)
            self._open()
        except BaseException:
            self.close()
            raise

    # ---- loading --------------------------------------------------------------------------------
    def _cli_load(self, deny_ports: Sequence[int], seeds: Sequence[str]) -> None:
        """One shell in the netns and a private mount namespace: fresh bpffs, load, ports, seed addresses."""
        b = shlex.quote(_binary() or "xdp-filter")
        cmds = ["mount -t bpf bpf /sys/fs/bpf", f"{b} load -m {shlex.quote(self.mode)} -p allow {shlex.quote(self.ifname)}"]
        cmds += [f"{b} port {int(p)} -m dst" for p in deny_ports]
        cmds += [f"{b} ip {shlex.quote(a)} -m src" for a in seeds]
        argv = ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--propagation", "private",
                "sh", "-ec", " && ".join(cmds)]
        env = dict(os.environ, LIBXDP_SKIP_DISPATCHER="1")
        for _ in range(40):                            # bounded: another xdp-filter may hold /run/xdp-filter.lck
            cp = subprocess.run(argv, capture_output=True, text=True, timeout=_CLI_TIMEOUT, env=env)
            if cp.returncode == 0:
                self._seeded = list(seeds)
                return
            if "program lock" not in cp.stderr:
                break
            time.sleep(0.25)
        raise RuntimeError(f"xdp-filter load on {self.ifname} in {self.netns} failed (exit {cp.returncode}): "
                           f"{(cp.stderr or cp.stdout)[-1500:]}")

    def _open(self) -> None:
        from hostwall.bpf.links import link_state
        st = link_state(self.ifname, self.netns)
        if not st.xdp_prog_id:
            raise RuntimeError(f"xdp-filter reported success but no XDP program is attached to {self.ifname}")
        self.attached_mode = st.xdp_mode
        self.prog_fd = bpfsys.prog_get_fd_by_id(st.xdp_prog_id)
        for mid in bpfsys.prog_map_ids(self.prog_fd):
            fd = bpfsys.map_get_fd_by_id(mid)
            self.maps[bpfsys.map_info(fd).name] = fd
        missing = {"filter_ipv4", "filter_ipv6", "filter_ports", "xdp_stats_map"} - set(self.maps)
        if missing:
            raise RuntimeError(f"xdp-filter's program uses maps {sorted(self.maps)}; missing {sorted(missing)}")
        for a in self._seeded:
            self.entries[ipaddress.ip_address(a).version] += 1

    def capacity(self, family: int) -> int:
        return bpfsys.map_info(self.maps["filter_ipv4" if family == 4 else "filter_ipv6"]).max_entries

    # ---- entries --------------------------------------------------------------------------------
    @staticmethod
    def _key(addr: str) -> bytes:
        return ipaddress.ip_address(addr).packed           # the kernel compares saddr as stored: network order

    def _value(self, fd: int, key: bytes) -> bytes | None:
        return bpfsys.map_lookup(fd, key, 8 * self.ncpu)

    def add_src(self, addrs: Sequence[str]) -> int:
        """Deny-by-source entries, written in bulk with the value the CLI wrote for a seed address of the
        same family (same flags, counter 0). Returns how many entries the family's map holds now."""
        if not addrs:
            return 0
        fam = ipaddress.ip_address(addrs[0]).version
        fd = self.maps["filter_ipv4" if fam == 4 else "filter_ipv6"]
        seed = next((a for a in self._seeded if ipaddress.ip_address(a).version == fam), None)
        tmpl = self._value(fd, self._key(seed)) if seed else None
        if tmpl is None or not int.from_bytes(tmpl[:8], "little") & MAP_FLAG_SRC:
            raise RuntimeError(f"no CLI-written IPv{fam} source entry to copy (seed {seed})")
        new = [a for a in dict.fromkeys(addrs) if a not in self._seeded]
        for i in range(0, len(new), _CHUNK):
            part = new[i:i + _CHUNK]
            bpfsys.map_update_batch(fd, b"".join(self._key(a) for a in part), tmpl * len(part), len(part))
        self.entries[fam] = bpfsys.count_entries(fd, 4 if fam == 4 else 16, 8 * self.ncpu)
        return self.entries[fam]

    def hits(self, addr: str) -> int:
        """Packets the entry for `addr` matched (its hit counter, summed over CPUs)."""
        fd = self.maps["filter_ipv4" if ipaddress.ip_address(addr).version == 4 else "filter_ipv6"]
        v = self._value(fd, self._key(addr))
        return 0 if v is None else sum(int.from_bytes(v[i:i + 8], "little") >> COUNTER_SHIFT
                                       for i in range(0, len(v), 8))

    def port_hits(self, port: int) -> int:
        key = int.from_bytes(port.to_bytes(2, "big"), "little").to_bytes(4, "little")   # tcphdr->dest as a u32
        v = self._value(self.maps["filter_ports"], key) or b""
        return sum(int.from_bytes(v[i:i + 8], "little") >> COUNTER_SHIFT for i in range(0, len(v), 8))

    def action_packets(self, action: int) -> int:
        """Packets the program returned `action` for (xdp_stats_map: per-CPU {rx_packets, rx_bytes})."""
        v = bpfsys.map_lookup(self.maps["xdp_stats_map"], action.to_bytes(4, "little"), 16 * self.ncpu) or b""
        return sum(int.from_bytes(v[i:i + 8], "little") for i in range(0, len(v), 16))

    # ---- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        from hostwall.enforcer import attach
        try:
            attach.detach_xdp(self.ifname, netns=self.netns)
        except Exception:                     # noqa: BLE001 — the interface or netns may be gone already
            pass
        for fd in [self.prog_fd, *self.maps.values()]:
            if fd >= 0:
                os.close(fd)
        self.prog_fd, self.maps = -1, {}

    def __enter__(self) -> XdpFilter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
