"""Which local process owns an address:port — the ingress half of container attribution.

XDP judges a packet before any socket or cgroup is involved, so an ingress record is attributed by the
local socket that owns its destination address/port:

  sock_diag dump (pyroute2 DiagSocket, in the record's network namespace)
    → socket inode (+ the socket's cgroup id, INET_DIAG_CGROUP_ID, kernel ≥ 5.7)
    → pid, by scanning /proc/*/fd for "socket:[inode]"
    → process name (/proc/pid/comm), executable, cgroup path (/proc/pid/cgroup)

Matching: an exact local address beats a wildcard bind (0.0.0.0 / ::, and :: for IPv4 through a
dual-stack socket); for TCP a listener beats an established socket of the same port.

Threading: pyroute2's synchronous API runs its own event loop, which fails inside a running asyncio
loop, and setns() moves only the calling thread. So every netlink operation runs on one private worker
thread: it enters a namespace, opens that namespace's DiagSocket, returns to its own namespace, and
keeps the socket (a netlink socket stays bound to the namespace it was created in). Callers block on
the result with a timeout; a timed-out lookup is counted and returns None.

Cost: a dump is O(sockets in the namespace) and is shared by all lookups for `dump_ttl_s`; a port
nobody has in a fresh dump is answered on the caller's thread (a dict lookup: a deny flood to random
ports costs no thread hop); the /proc fd scan is O(processes × fds), done at most once per
`proc_scan_interval_s`, and only when an inode is not in the inode → pid index. Lookups are cached
(LRU+TTL, negative entries shorter).
"""
from __future__ import annotations

import ctypes
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

from .cgroup import LruTtlCache, cgroup2_mount, cgroup_id_of

__all__ = ["SocketOwner", "SocketOwnerResolver", "netns_path", "read_process"]

TCP_LISTEN = 10
_CLONE_NEWNET = 0x40000000
_MISSING = object()


@dataclass(frozen=True)
class SocketOwner:
    inode: int
    pid: int = 0                  # 0: no process found (socket owned by the kernel, or exited)
    process_name: str = ""
    executable: str = ""
    cgroup_id: int = 0
    cgroup_path: str = ""


def netns_path(netns: str | None) -> str | None:
    """Path of a named namespace (`ip netns` convention) or of an explicit path; None = our own."""
    if not netns:
        return None
    return netns if "/" in netns else f"/run/netns/{netns}"


class _NsSwitch:
    """setns() for the calling thread only (CLONE_NEWNET affects one thread)."""
    _libc = None

    @classmethod
    def setns(cls, fd: int) -> None:
        if cls._libc is None:
            cls._libc = ctypes.CDLL(None, use_errno=True)
        if cls._libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns: {os.strerror(err)}")


def read_process(pid: int, mount: str | None) -> tuple[str, str, int, str]:
    """(comm, executable, cgroup id, cgroup path) of a pid; empty/0 where unreadable."""
    def rd(p: str) -> str:
        try:
            with open(p) as f:
                return f.read()
        except OSError:
            return ""
    comm = rd(f"/proc/{pid}/comm").strip()
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
    except OSError:
        exe = ""
    path = next((ln[3:].strip() for ln in rd(f"/proc/{pid}/cgroup").splitlines() if ln.startswith("0::")), "")
    cgid = (cgroup_id_of(mount, path) or 0) if (mount and path) else 0
    return comm, exe, cgid, path


class SocketOwnerResolver:
    """lookup(netns, proto, ip, port) → SocketOwner | None. Thread-safe; blocking (bounded by timeout_s)."""

    def __init__(self, *, maxsize: int = 8192, ttl_s: float = 30.0, negative_ttl_s: float = 2.0,
                 dump_ttl_s: float = 1.0, proc_scan_interval_s: float = 2.0, timeout_s: float = 2.0,
                 cgroup_mount: str | None = None, clock: Callable[[], float] = time.monotonic):
        self.cache: LruTtlCache[tuple, SocketOwner | None] = LruTtlCache(maxsize, ttl_s, clock)
        self.negative_ttl_s = negative_ttl_s
        self.dump_ttl_s = dump_ttl_s
        self.proc_scan_interval_s = proc_scan_interval_s
        self.timeout_s = timeout_s
        self.mount = cgroup_mount if cgroup_mount is not None else cgroup2_mount()
        self._clock = clock
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="hostwall-sockdiag")
        self._diag: dict[str | None, object] = {}                     # worker thread only
        self._dumps: dict[tuple, tuple[float, dict]] = {}             # (netns, proto) -> (time, index)
        self._inode_pid: dict[int, int] = {}
        self._last_scan = float("-inf")
        self._lock = threading.Lock()
        self.counters = {"lookups": 0, "dumps": 0, "dump_errors": 0, "proc_scans": 0, "timeouts": 0,
                         "no_socket": 0, "no_pid": 0, "netns_errors": 0}

    # ---- public ----------------------------------------------------------------------------------
    def lookup(self, netns: str | None, proto: int, ip: str, port: int) -> SocketOwner | None:
        if proto not in (socket.IPPROTO_TCP, socket.IPPROTO_UDP) or not port:
            return None
        key = (netns, proto, ip, port)
        hit = self.cache.get(key, _MISSING)
        if hit is not _MISSING:
            return hit
        self.counters["lookups"] += 1
        fresh = self._dumps.get((netns, proto))         # read-only peek: the worker replaces, never mutates
        if fresh and self._clock() - fresh[0] < self.dump_ttl_s and port not in fresh[1]:
            self.counters["no_socket"] += 1             # nobody has this port: no thread hop, no syscall
            self.cache.put(key, None, ttl_s=self.negative_ttl_s)
            return None
        try:
            owner = self._pool.submit(self._lookup, netns, proto, ip, port).result(self.timeout_s)
        except FutureTimeout:
            self.counters["timeouts"] += 1
            return None
        self.cache.put(key, owner, ttl_s=None if owner else self.negative_ttl_s)
        return owner

    def close(self) -> None:
        def _close():
            for ds in self._diag.values():
                try:
                    ds.close()
                except OSError:
                    pass
            self._diag.clear()
        try:
            self._pool.submit(_close).result(self.timeout_s)
        except (TimeoutError, OSError):
            pass
        self._pool.shutdown(wait=False)

    def stats(self) -> dict:
        return {"cache": self.cache.stats(), **self.counters, "inode_index": len(self._inode_pid),
                "namespaces": len(self._diag)}

    # ---- worker thread ---------------------------------------------------------------------------
    def _lookup(self, netns, proto, ip, port) -> SocketOwner | None:
        index = self._dump(netns, proto)
        if index is None:
            return None
        inode, cgid = _best_match(index.get(port, ()), ip, proto)
        if not inode:
            self.counters["no_socket"] += 1
            return None
        pid = self._pid_of(inode)
        if not pid:
            self.counters["no_pid"] += 1
            return SocketOwner(inode=inode, cgroup_id=cgid)
        comm, exe, pcgid, path = read_process(pid, self.mount)
        return SocketOwner(inode=inode, pid=pid, process_name=comm, executable=exe,
                           cgroup_id=cgid or pcgid, cgroup_path=path)

    def _dump(self, netns, proto) -> dict | None:
        """port → [(local ip, state, inode, cgroup id)] of every v4 and v6 socket of proto, cached."""
        now = self._clock()
        cached = self._dumps.get((netns, proto))
        if cached and now - cached[0] < self.dump_ttl_s:
            return cached[1]
        ds = self._diag_socket(netns)
        if ds is None:
            return None
        index: dict[int, list] = {}
        try:
            for fam in (socket.AF_INET, socket.AF_INET6):
                for m in ds.get_sock_stats(family=fam, protocol=proto, states=0xFFFFFFFF):
                    index.setdefault(m["idiag_sport"], []).append(
                        (m["idiag_src"], m["idiag_state"], m["idiag_inode"], m.get_attr("INET_DIAG_CGROUP_ID") or 0))
        except Exception:  # noqa: BLE001 — any netlink failure: counted, the socket is rebuilt next time
            self.counters["dump_errors"] += 1
            self._drop_socket(netns)
            return None
        self.counters["dumps"] += 1
        dumps = dict(self._dumps)                         # copy-on-write: callers peek without a lock
        dumps[(netns, proto)] = (now, index)
        if len(dumps) > 256:                              # bounded: forget the oldest namespaces' dumps
            for k in sorted(dumps, key=lambda k: dumps[k][0])[:64]:
                del dumps[k]
        self._dumps = dumps
        return index

    def _diag_socket(self, netns):
        ds = self._diag.get(netns)
        if ds is not None:
            return ds
        from pyroute2 import DiagSocket
        path = netns_path(netns)
        try:
            if path is None:
                ds = DiagSocket()
            else:
                ds = self._open_in(path, DiagSocket)
            ds.bind()
        except OSError:
            self.counters["netns_errors"] += 1
            return None
        self._diag[netns] = ds
        return ds

    @staticmethod
    def _open_in(path: str, factory):
        """Create factory() inside the namespace at `path`, then return this thread to its own."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        target = os.open(path, os.O_RDONLY)
        try:
            _NsSwitch.setns(target)
            try:
                return factory()
            finally:
                _NsSwitch.setns(own)
        finally:
            os.close(target)
            os.close(own)

    def _drop_socket(self, netns) -> None:
        ds = self._diag.pop(netns, None)
        if ds is not None:
            try:
                ds.close()
            except OSError:
                pass

    def _pid_of(self, inode: int) -> int:
        pid = self._inode_pid.get(inode)
        if pid and os.path.exists(f"/proc/{pid}"):
            return pid
        now = self._clock()
        if now - self._last_scan < self.proc_scan_interval_s:
            return 0
        self._last_scan = now
        self.counters["proc_scans"] += 1
        self._inode_pid = _scan_proc_sockets()
        return self._inode_pid.get(inode, 0)


def _best_match(entries, ip: str, proto: int) -> tuple[int, int]:
    """(inode, cgroup id) of the socket that receives traffic for ip on this port, or (0, 0)."""
    try:
        want = ipaddress.ip_address(ip)
    except ValueError:
        return 0, 0
    best, best_rank = None, -1
    for src, state, inode, cgid in entries:
        try:
            a = ipaddress.ip_address(src)
        except ValueError:
            continue
        if a.version == 6 and a.ipv4_mapped is not None:
            a = a.ipv4_mapped
        if a == want:
            rank = 4
        elif a.is_unspecified and (a.version == want.version or a.version == 6):
            rank = 2
        else:
            continue
        if proto == socket.IPPROTO_TCP and state == TCP_LISTEN:
            rank += 1
        if rank > best_rank:
            best, best_rank = (inode, cgid), rank
    return best or (0, 0)


def _scan_proc_sockets() -> dict[int, int]:
    """socket inode → pid for every process (first pid wins for shared sockets)."""
    out: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        fd_dir = f"/proc/{d}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                out.setdefault(int(link[8:-1]), int(d))
    return out
