"""The namespace lab: three hosts on one Linux bridge, each in its own network namespace.

Everything lives in namespaces this module creates (names `<p>-<host>`, p = "hwl" + 4 random hex, so
concurrent or leftover labs never collide); the root namespace is never touched: no link, route,
address, qdisc or firewall rule is created there, and no packet can leave the lab (the bridge has no
uplink). Addresses come from 10.66.0.0/16 and fd66::/16 (ULA) only.

    ns <p>-cli (client)           ns <p>-att (attacker)          ns <p>-prot (protected host)
    eth0 10.66.2.2/16             eth0 10.66.3.2/16              eth0 10.66.1.2/16
         fd66:2::2/48                  fd66:3::2/48                   fd66:1::2/48
         | veth                        | veth  (+ extra 10.66.3.x     | veth   (hostwall, nftables or
         |                             |    for spoofed floods)       |    iptables sit on this eth0)
    +----+-----------------------------+------------------------------+----+
    |   cli                           att                            prot  |  ns <p>-sw
    |                     br0 (Linux bridge, STP off)                      |  (switch)
    +----------------------------------------------------------------------+

- The three /48s are made on-link with a `fd66::/16 dev eth0` route, so hosts reach each other directly.
  (fd66:1::/48, fd66:2::/48 and fd66:3::/48 are three /48s of the ULA prefix fd66::/16; they are not
  inside fd66::/48 itself. Every IPv6 address the lab uses is under fd66::/16 and exists only here.)
- IPv6 comes up at once: DAD is off (sysctl + `nodad`), so no address is "tentative".
- `lo` is up everywhere. The switch namespace has IPv6 off and bridge netfilter off (bridged frames
  do not pass any netfilter hook there), so the only filter on a path is the one under test.
- A Lab holds an flock on /run/hostwall-lab/<p>.lock while it lives; cleanup_stale() removes a lab's
  namespaces only if that lock is free and no process runs inside any of them (`ip netns pids`).

Cost: build ≈ 40 `ip` commands (~0.2-0.5 s); close ≈ 4 namespace deletions. Every subprocess call has a
timeout; close() is idempotent and runs from __exit__ even when the body raised.
"""
from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import re
import secrets
import selectors
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from hostwall.enforcer.netsock import SocketMaker

__all__ = ["Lab", "LabError", "HostSpec", "HOSTS", "SWITCH", "LAB_V4", "LAB_V6",
           "cleanup_stale", "first_line", "lab_available", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCK_DIR = Path("/run/hostwall-lab")
LAB_V4 = ipaddress.ip_network("10.66.0.0/16")
LAB_V6 = ipaddress.ip_network("fd66::/16")
SWITCH = "sw"
CMD_TIMEOUT = 20.0            # default timeout of one command run inside a namespace, seconds
# Bound on the start-up banner of the enforcer and collector processes: it catches a hung start, it is
# no speed expectation. The enforcer compiles the datapath with BCC first (~15 s on an idle 2-vCPU VM,
# over 60 s when the machine is shared with other test runs); a process that exits is seen at once.
START_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class HostSpec:
    name: str
    v4: str                    # address/prefix
    v6: str


HOSTS: dict[str, HostSpec] = {
    "prot": HostSpec("prot", "10.66.1.2/16", "fd66:1::2/48"),
    "cli": HostSpec("cli", "10.66.2.2/16", "fd66:2::2/48"),
    "att": HostSpec("att", "10.66.3.2/16", "fd66:3::2/48"),
}


class LabError(RuntimeError):
    """A lab command failed; the message carries the command, exit code and stderr."""


def _ip(argv: Sequence[str], timeout: float = CMD_TIMEOUT, check: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    """Run `ip ...` (or another tool) in the caller's namespace; raise LabError on failure."""
    try:
        cp = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, input=input)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv)}: timed out after {timeout:g} s") from None
    if check and cp.returncode != 0:
        raise LabError(f"{' '.join(argv)}: exit {cp.returncode}: {cp.stderr.strip()[-2000:]}")
    return cp


def _netns_list() -> list[str]:
    cp = _ip(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in cp.stdout.splitlines() if line.strip()]


def _netns_pids(ns: str) -> list[int]:
    cp = _ip(["ip", "netns", "pids", ns], check=False)
    return [int(x) for x in cp.stdout.split() if x.isdigit()]


def lab_available() -> tuple[bool, str]:
    """Can this kernel/user build a lab? (root, netns, veth, bridge). Returns (ok, reason)."""
    if os.geteuid() != 0:
        return False, "the lab needs root (network namespaces)"
    for tool in ("ip",):
        if not any(os.access(os.path.join(d, tool), os.X_OK) for d in os.environ.get("PATH", "").split(":") + ["/usr/sbin", "/sbin"]):
            return False, f"{tool} (iproute2) is not installed"
    ns = f"hwlprobe{secrets.token_hex(2)}"
    try:
        cp = _ip(["ip", "netns", "add", ns], check=False)
        if cp.returncode:
            return False, f"cannot create a network namespace: {cp.stderr.strip()}"
        cp = _ip(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"], check=False)
        if cp.returncode:
            return False, f"kernel lacks veth: {cp.stderr.strip()}"
        cp = _ip(["ip", "-n", ns, "link", "add", "b0", "type", "bridge"], check=False)
        if cp.returncode:
            return False, f"kernel lacks bridge: {cp.stderr.strip()}"
        return True, ""
    finally:
        _ip(["ip", "netns", "del", ns], check=False)


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal the process group of a child started with start_new_session (its pgid is its pid).
    The group is ours as long as the leader is unreaped or its group still has members."""
    if p.returncode is None:            # leader not reaped yet: its pid (= pgid) cannot be reused
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        return
    for pid in _group_members(p.pid):   # leader gone: signal members still in its session, by pid
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _group_members(pgid: int) -> list[int]:
    """Pids whose process group and session are both `pgid` (children of a setsid'ed leader)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
        except OSError:
            continue
        fields = st[st.rfind(")") + 2:].split()
        if len(fields) > 3 and int(fields[2]) == pgid and int(fields[3]) == pgid:
            out.append(int(d))
    return out


def first_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line `proc` writes to its (text) stdout pipe, or "" if none comes within `timeout` s
    (the start-up banner of the enforcer and collector processes)."""
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        ready = sel.select(timeout)
    finally:
        sel.close()
    return proc.stdout.readline() if ready else ""


def _pdeathsig() -> None:          # runs in the child between fork and exec
    try:
        import ctypes
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


class Lab:
    """A fresh three-host lab. Use as a context manager (or call close()).

    lab.ns(host) -> namespace name; lab.addr(host, 4|6) -> address without prefix length;
    lab.run(host, argv) / lab.popen(host, argv) run a command inside a namespace.
    Hosts: "prot", "cli", "att"; the switch is "sw".
    """

    def __init__(self, prefix: str | None = None, *, build: bool = True, mtu: int = 1500, direct: bool = False):
        """direct=True: no switch — client and protected host joined by one veth pair, and the
        attacker is a second address on the client's eth0 (`ns("att")` is the client's namespace;
        bind to `addr("att")` to send as the attacker). For packet-rate benchmarks: the bridge hop
        of the default topology costs about half the rate."""
        self.prefix = prefix or f"hwl{secrets.token_hex(2)}"
        self.direct = direct
        if not re.fullmatch(r"[a-z0-9]{2,12}", self.prefix):
            raise ValueError(f"bad lab prefix {self.prefix!r}: use 2-12 of [a-z0-9]")
        self.mtu = mtu
        self.hosts = dict(HOSTS)
        self._procs: list[subprocess.Popen] = []
        self._created: list[str] = []
        self._lock_fd: int | None = None
        self._closed = False
        self._extra: dict[str, list[str]] = {h: [] for h in self.hosts}
        self._makers: dict[str, SocketMaker] = {}
        if build:
            try:
                self.build()
            except BaseException:
                self.close()
                raise

    # ---- naming -----------------------------------------------------------------------------
    def ns(self, host: str) -> str:
        if host != SWITCH and host not in self.hosts:
            raise KeyError(f"unknown lab host {host!r} (hosts: {', '.join(self.hosts)}, {SWITCH})")
        if self.direct and host == "att":
            host = "cli"
        return f"{self.prefix}-{host}"

    def addr(self, host: str, family: int = 4) -> str:
        spec = self.hosts[host]
        return (spec.v4 if family == 4 else spec.v6).split("/")[0]

    def namespaces(self) -> list[str]:
        """The namespaces this lab makes, hosts first (deleting a host removes its veth pair)."""
        if self.direct:
            return [self.ns("prot"), self.ns("cli")]
        return [self.ns(h) for h in (*self.hosts, SWITCH)]

    # ---- build ------------------------------------------------------------------------------
    def build(self) -> None:
        LOCK_DIR.mkdir(parents=True, exist_ok=True)
        fd = os.open(LOCK_DIR / f"{self.prefix}.lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise LabError(f"lab prefix {self.prefix!r} is in use by another process") from None
        self._lock_fd = fd                 # only now is the lock (and its file) ours to remove
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        existing = set(_netns_list())
        clash = [n for n in self.namespaces() if n in existing]
        if clash:
            raise LabError(f"namespaces already exist: {', '.join(clash)}; pick another prefix or run "
                           "lab.netns.cleanup_stale()")
        for n in self.namespaces():
            _ip(["ip", "netns", "add", n])
            self._created.append(n)
        if self.direct:
            self._build_direct()
            return
        sw = self.ns(SWITCH)
        batch = [
            "link set lo up",
            "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0",
            "link set br0 up",
        ]
        self.sysctl(SWITCH, {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1})
        self.sysctl(SWITCH, {"net.bridge.bridge-nf-call-iptables": 0, "net.bridge.bridge-nf-call-ip6tables": 0,
                             "net.bridge.bridge-nf-call-arptables": 0}, check=False)
        for h in self.hosts:
            batch += [f"link add {h} mtu {self.mtu} type veth peer name eth0 netns {self.ns(h)}",
                      f"link set {h} master br0 up"]
        _ip(["ip", "-n", sw, "-batch", "-"], input="\n".join(batch) + "\n")
        for h, spec in self.hosts.items():
            self.sysctl(h, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                            "net.ipv6.conf.eth0.accept_dad": 0, "net.ipv6.conf.eth0.router_solicitations": 0,
                            "net.ipv6.conf.eth0.mtu": self.mtu})
            cmds = ["link set lo up", f"link set eth0 mtu {self.mtu} up",
                    f"addr add {spec.v4} dev eth0", f"addr add {spec.v6} dev eth0 nodad",
                    f"route add {LAB_V6} dev eth0"]
            _ip(["ip", "-n", self.ns(h), "-batch", "-"], input="\n".join(cmds) + "\n")
        self.wait_ready()

    def _host_config(self, h: str, extra: list[HostSpec] = ()) -> None:
        spec = self.hosts[h]
        self.sysctl(h, {"net.ipv6.conf.all.accept_dad": 0, "net.ipv6.conf.default.accept_dad": 0,
                        "net.ipv6.conf.eth0.accept_dad": 0, "net.ipv6.conf.eth0.router_solicitations": 0,
                        "net.ipv6.conf.eth0.mtu": self.mtu})
        cmds = ["link set lo up", f"link set eth0 mtu {self.mtu} up",
                f"addr add {spec.v4} dev eth0", f"addr add {spec.v6} dev eth0 nodad"]
        for x in extra:
            cmds += [f"addr add {x.v4} dev eth0", f"addr add {x.v6} dev eth0 nodad"]
        cmds.append(f"route add {LAB_V6} dev eth0")
        _ip(["ip", "-n", self.ns(h), "-batch", "-"], input="\n".join(cmds) + "\n")

    def _build_direct(self) -> None:
        _ip(["ip", "link", "add", "eth0", "netns", self.ns("cli"), "mtu", str(self.mtu), "type", "veth",
             "peer", "name", "eth0", "netns", self.ns("prot"), "mtu", str(self.mtu)])
        self._host_config("prot")
        self._host_config("cli", extra=[self.hosts["att"]])
        self.wait_ready()

    def wait_ready(self, timeout: float = 5.0) -> None:
        """Wait until every eth0 is up with its addresses usable (no tentative IPv6)."""
        deadline = time.monotonic() + timeout
        pending = set(self.hosts)
        while pending and time.monotonic() < deadline:
            for h in list(pending):
                out = _ip(["ip", "-n", self.ns(h), "-o", "addr", "show", "dev", "eth0"], check=False).stdout
                up = _ip(["ip", "-n", self.ns(h), "-o", "link", "show", "dev", "eth0"], check=False).stdout
                if "tentative" not in out and self.addr(h, 6) in out and ("state UP" in up or "LOWER_UP" in up):
                    pending.discard(h)
            if pending:
                time.sleep(0.05)
        if pending:
            raise LabError(f"lab hosts not ready after {timeout:g} s: {', '.join(sorted(pending))}")

    # ---- running things inside ----------------------------------------------------------------
    def _argv(self, host: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *map(str, argv)]

    @staticmethod
    def _env(env: dict | None) -> dict:
        e = dict(os.environ)
        e["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
        if env:
            e.update(env)
        return e

    def run(self, host: str, argv: Sequence[str], *, check: bool = True, timeout: float = CMD_TIMEOUT,
            input: str | None = None, env: dict | None = None, text: bool = True) -> subprocess.CompletedProcess:
        """Run argv inside host's namespace, capture output. Raises LabError on a non-zero exit
        (check=True) or on timeout (the child is killed)."""
        full = self._argv(host, argv)
        try:
            cp = subprocess.run(full, capture_output=True, text=text, timeout=timeout, input=input,
                                env=self._env(env), cwd=REPO_ROOT)
        except subprocess.TimeoutExpired as e:
            raise LabError(f"[{host}] {' '.join(map(str, argv))}: timed out after {timeout:g} s; "
                           f"stderr: {(e.stderr or b'')[-500:]!r}") from None
        if check and cp.returncode != 0:
            raise LabError(f"[{host}] {' '.join(map(str, argv))}: exit {cp.returncode}: "
                           f"{(cp.stderr or '')[-2000:]}")
        return cp

    def popen(self, host: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """Start argv inside host's namespace, in its own process group; close() stops the group if still
        running, and when called from the main thread the kernel kills it if this process dies
        (PR_SET_PDEATHSIG). stdout/stderr default to text pipes."""
        kw.setdefault("stdout", subprocess.PIPE)
        kw.setdefault("stderr", subprocess.PIPE)
        kw.setdefault("text", True)
        kw.setdefault("cwd", REPO_ROOT)
        kw["env"] = self._env(kw.get("env"))
        if self._closed:
            raise LabError("lab is closed")
        # own process group: stop()/close() signal the group, so helpers that fork (trafgen forks one
        # worker per CPU) stop with their parent
        # PR_SET_PDEATHSIG fires when the creating *thread* exits, so it is set only from the main thread
        pre = _pdeathsig if threading.current_thread() is threading.main_thread() else None
        p = subprocess.Popen(self._argv(host, argv), preexec_fn=pre, start_new_session=True, **kw)
        self._procs.append(p)
        return p

    def python(self, host: str, args: Sequence[str], **kw) -> subprocess.CompletedProcess:
        """Run `python args...` (this interpreter) inside host's namespace."""
        return self.run(host, [sys.executable, *args], **kw)

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 5.0) -> tuple[str, str]:
        """Signal a process started by popen(), wait (bounded), kill if needed; return (stdout, stderr)."""
        _signal_group(p, sig)
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal_group(p, signal.SIGKILL)
            try:
                out, err = p.communicate(timeout=5)
            except subprocess.TimeoutExpired:       # a grandchild holds the pipes open: give up on them
                out, err = "", ""
        return out or "", err or ""

    # ---- configuration helpers ----------------------------------------------------------------
    def sysctl(self, host: str, values: dict[str, object], check: bool = True) -> None:
        args = [f"{k}={v}" for k, v in values.items()]
        self.run(host, ["sysctl", "-q", "-w", *args], check=check)

    def add_addresses(self, host: str, addrs: Iterable[str]) -> list[str]:
        """Add addresses (CIDR or bare; bare → /16 or /48 to stay on-link) to host's eth0.
        All must lie inside the lab ranges. Returns the addresses as added."""
        cmds, added = [], []
        for a in addrs:
            iface = ipaddress.ip_interface(a if "/" in a else (f"{a}/16" if ":" not in a else f"{a}/48"))
            if iface.ip not in (LAB_V4 if iface.version == 4 else LAB_V6):
                raise ValueError(f"{a} is outside the lab ranges {LAB_V4} / {LAB_V6}")
            cmds.append(f"addr add {iface.with_prefixlen} dev eth0" + (" nodad" if iface.version == 6 else ""))
            added.append(iface.with_prefixlen)
        if cmds:
            self.run(host, ["ip", "-batch", "-"], input="\n".join(cmds) + "\n", timeout=60)
            self._extra[host] += added
        return added

    def add_attacker_addresses(self, prefix: str = "10.66.3.0/24", count: int = 32, start: int = 10) -> list[str]:
        """Give the attacker `count` more addresses inside `prefix` (host numbers start, start+1, ...),
        so packets with those (spoofed) sources get ARP/ND answers and replies come back."""
        net = ipaddress.ip_network(prefix)
        hosts = []
        for i in range(start, start + count):
            if i >= net.num_addresses - 1:
                break
            ip = net.network_address + i
            if str(ip) != self.addr("att", net.version):
                hosts.append(f"{ip}/{16 if net.version == 4 else 48}")
        return self.add_addresses("att", hosts)

    def mac(self, host: str, ifname: str = "eth0") -> str:
        return self.read(host, f"/sys/class/net/{ifname}/address").strip()

    def read(self, host: str, path: str) -> str:
        """Read a /proc or /sys file as seen inside host's namespace."""
        return self.run(host, ["cat", path]).stdout

    def link_stats(self, host: str, ifname: str = "eth0") -> dict[str, int]:
        """Interface counters (rx/tx packets, bytes, dropped, ...) from /sys/class/net/IF/statistics."""
        d = f"/sys/class/net/{ifname}/statistics"
        out = self.run(host, ["sh", "-c", f"cd {d} && grep -H . *"]).stdout
        stats = {}
        for line in out.splitlines():
            k, _, v = line.partition(":")
            if v.strip().lstrip("-").isdigit():
                stats[k] = int(v)
        return stats

    def snmp(self, host: str) -> dict[str, dict[str, int]]:
        """/proc/net/snmp of host's namespace as {"Ip": {...}, "Udp": {...}, ...}."""
        return parse_snmp(self.read(host, "/proc/net/snmp"))

    def warm(self, pairs: Iterable[tuple[str, str]] = (("cli", "prot"), ("att", "prot")), families=(4, 6)) -> None:
        """One ping per pair and family: fills ARP/ND caches and the bridge's FDB (no failure if lost)."""
        for src, dst in pairs:
            for fam in families:
                self.run(src, ["ping", "-c", "1", "-W", "1", self.addr(dst, fam)], check=False, timeout=5)

    # ---- teardown ---------------------------------------------------------------------------
    def socket_maker(self, host: str) -> SocketMaker:
        """Sockets made inside host's namespace from this process (one maker per namespace, kept for
        the lab's life: each holds the namespace open and a reserve of sockets, closed in close())."""
        ns = self.ns(host)
        if ns not in self._makers:
            self._makers[ns] = SocketMaker(ns)
        return self._makers[ns]

    def close(self) -> None:
        """Stop processes started by popen(), close the socket makers, delete the namespaces (links go
        with them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for m in self._makers.values():
            m.close()
        self._makers.clear()
        for p in self._procs:
            _signal_group(p, signal.SIGTERM)
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            _signal_group(p, signal.SIGKILL)     # also reaps forked workers that outlived their parent
            try:
                p.wait(timeout=3)
            except subprocess.TimeoutExpired:
                pass
            for f in (p.stdout, p.stderr, p.stdin):
                if f:
                    try:
                        f.close()
                    except OSError:
                        pass
        self._procs.clear()
        existing = set(_netns_list())
        errors = []
        # hosts first, then the switch; deleting a namespace destroys its veth ends and their peers
        for n in self.namespaces():
            if n in existing and n in self._created:      # never a namespace this lab did not make
                cp = _ip(["ip", "netns", "del", n], check=False)
                if cp.returncode:
                    errors.append(f"{n}: {cp.stderr.strip()}")
        if self._lock_fd is not None:
            try:
                os.unlink(LOCK_DIR / f"{self.prefix}.lock")
            except OSError:
                pass
            os.close(self._lock_fd)
            self._lock_fd = None
        if errors:
            raise LabError("lab cleanup: " + "; ".join(errors))

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Lab({self.prefix!r}{', closed' if self._closed else ''})"


def parse_snmp(text: str) -> dict[str, dict[str, int]]:
    """Parse /proc/net/snmp (pairs of header/value lines per protocol)."""
    out: dict[str, dict[str, int]] = {}
    lines = text.splitlines()
    for head, vals in zip(lines[::2], lines[1::2]):
        proto, _, keys = head.partition(":")
        proto2, _, nums = vals.partition(":")
        if proto != proto2:
            continue
        out[proto] = {k: int(v) for k, v in zip(keys.split(), nums.split())}
    return out


_LAB_NS = re.compile(r"^(?P<prefix>[a-z]+[0-9a-f]{4})-(?P<host>prot|cli|att|sw)$")


def cleanup_stale(prefix: str = "hwl") -> list[str]:
    """Delete namespaces of labs that are gone: names `<prefix>XXXX-{prot,cli,att,sw}` whose lab lock is
    free (the owning process has exited) and in which no process runs. Returns the deleted names.
    A lab with any process inside, or whose owner still holds its lock, is left alone."""
    groups: dict[str, list[str]] = {}
    for n in _netns_list():
        m = _LAB_NS.match(n)
        if m and m["prefix"].startswith(prefix) and len(m["prefix"]) == len(prefix) + 4:
            groups.setdefault(m["prefix"], []).append(n)
    deleted = []
    for lab_prefix, names in sorted(groups.items()):
        lock = LOCK_DIR / f"{lab_prefix}.lock"
        fd = None
        if lock.exists():
            try:
                fd = os.open(lock, os.O_RDWR)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if fd is not None:
                    os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    continue                    # its owner is alive
                fd = None
        try:
            if any(_netns_pids(n) for n in names):
                continue
            for n in sorted(names, key=lambda x: x.endswith(f"-{SWITCH}")):
                if _ip(["ip", "netns", "del", n], check=False).returncode == 0:
                    deleted.append(n)
            if fd is not None:
                try:
                    os.unlink(lock)
                except OSError:
                    pass
        finally:
            if fd is not None:
                os.close(fd)
    return deleted
