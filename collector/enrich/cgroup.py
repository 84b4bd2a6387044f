"""cgroup id → cgroup v2 path → container / pod / systemd unit.

The datapath stamps egress records with the sender's cgroup id (bpf_skb_cgroup_id). On cgroup v2 a
cgroup's id is the inode number of its directory in the unified hierarchy, so the path is found by
walking the cgroup2 mount and indexing directory inodes. The mount is read from /proc/self/mountinfo
(hybrid systems mount it at /sys/fs/cgroup/unified, pure v2 systems at /sys/fs/cgroup).

What the path tells (and nothing more — unknown stays empty):
  docker      .../docker-<id>.scope (systemd driver), /docker/<id> (cgroupfs driver)
  containerd  .../cri-containerd-<id>.scope
  cri-o       .../crio-<id>.scope          (crio-conmon-<id>.scope is the monitor, not the container)
  podman      .../libpod-<id>.scope, /machine.slice/libpod-<id>.scope/container, /libpod_parent/libpod-<id>
  kubernetes  kubepods[-<qos>]-pod<uid>.slice (systemd; uid with '_' for '-'), /kubepods[/<qos>]/pod<uid>/<cid>
              qos: guaranteed when no besteffort/burstable level is present
  systemd     the innermost <name>.service
Names, images and pod namespace/name are never read from the path: RuntimeMetadata reads them from the
runtime's own state (docker config.v2.json, OCI bundle annotations of containerd and CRI-O) when present.

Cost: a full walk is O(number of cgroups) (a few ms for thousands); it runs only on a cache miss and
at most once per `min_walk_interval_s`, so a burst of unknown ids costs one walk. Results are held in
bounded LRU+TTL caches; ids not found are cached negatively for a short time.
"""
from __future__ import annotations

import json
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field, replace
from typing import Generic, TypeVar

__all__ = ["CgroupInfo", "CgroupResolver", "LruTtlCache", "RuntimeMetadata", "cgroup2_mount",
           "parse_cgroup_path", "cgroup_id_of"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")
_MISSING = object()


class LruTtlCache(Generic[K, V]):
    """Bounded map with least-recently-used eviction and a per-entry time to live.

    Invariant: len(self) <= maxsize. get/put are O(1). Thread-safe (one lock). Counts hits, misses
    (including expired entries), evictions (capacity) and expirations, for the hit-rate stats."""

    def __init__(self, maxsize: int, ttl_s: float, clock: Callable[[], float] = time.monotonic):
        if maxsize < 1 or ttl_s <= 0:
            raise ValueError("maxsize must be >= 1 and ttl_s > 0")
        self.maxsize, self.ttl_s, self._clock = maxsize, ttl_s, clock
        self._d: OrderedDict = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.expirations = 0

    def get(self, key: K, default=None):
        now = self._clock()
        with self._lock:
            item = self._d.get(key, _MISSING)
            if item is _MISSING:
                self.misses += 1
                return default
            expires, value = item
            if expires <= now:
                del self._d[key]
                self.expirations += 1
                self.misses += 1
                return default
            self._d.move_to_end(key)
            self.hits += 1
            return value

    def put(self, key: K, value: V, ttl_s: float | None = None) -> None:
        expires = self._clock() + (self.ttl_s if ttl_s is None else ttl_s)
        with self._lock:
            self._d[key] = (expires, value)
            self._d.move_to_end(key)
            while len(self._d) > self.maxsize:
                self._d.popitem(last=False)
                self.evictions += 1

    def pop(self, key: K, default=None):
        """Remove and return a live entry (counted like get; one lock, one clock read)."""
        now = self._clock()
        with self._lock:
            item = self._d.pop(key, _MISSING)
            if item is _MISSING:
                self.misses += 1
                return default
            if item[0] <= now:
                self.expirations += 1
                self.misses += 1
                return default
            self.hits += 1
            return item[1]

    def contains(self, key: K) -> bool:
        """True if a live entry exists (does not count as a hit or miss)."""
        with self._lock:
            item = self._d.get(key, _MISSING)
            return item is not _MISSING and item[0] > self._clock()

    def clear(self) -> None:
        with self._lock:
            self._d.clear()

    def __len__(self) -> int:
        return len(self._d)

    def stats(self) -> dict:
        total = self.hits + self.misses
        return {"size": len(self._d), "maxsize": self.maxsize, "hits": self.hits, "misses": self.misses,
                "hit_rate": round(self.hits / total, 4) if total else 0.0, "evictions": self.evictions,
                "expirations": self.expirations}


# ---------------------------------------------------------------------------------------- mount

def cgroup2_mount(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Mount point of the cgroup2 (unified) hierarchy, or None. Prefers the shortest mount point
    whose root is '/' (a container may see bind mounts of sub-trees too)."""
    best = None
    try:
        with open(mountinfo) as f:
            for line in f:
                left, sep, right = line.partition(" - ")
                if not sep or not right.startswith("cgroup2 "):
                    continue
                parts = left.split()
                root, mnt = parts[3], _unescape(parts[4])
                if root == "/" and (best is None or len(mnt) < len(best)):
                    best = mnt
    except OSError:
        return None
    return best


def _unescape(s: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)


def cgroup_id_of(mount: str, path: str) -> int | None:
    """cgroup id of a cgroup path (relative to the cgroup2 mount): its directory's inode number."""
    try:
        return os.stat(os.path.join(mount, path.lstrip("/"))).st_ino
    except OSError:
        return None


# ----------------------------------------------------------------------------------------- parse

@dataclass(frozen=True)
class CgroupInfo:
    """What a cgroup path says. Empty strings mean unknown."""
    cgroup_id: int
    path: str                        # relative to the cgroup2 mount, starts with '/'
    container_id: str = ""
    runtime: str = ""                # docker | containerd | cri-o | podman | "" (kubepods cgroupfs: unknown)
    pod_uid: str = ""
    pod_qos: str = ""                # guaranteed | burstable | besteffort
    systemd_unit: str = ""
    container_name: str = ""         # from RuntimeMetadata only
    image: str = ""
    pod_name: str = ""
    pod_namespace: str = ""


_HEX64 = r"[0-9a-f]{64}"
_SCOPE_RUNTIMES = (
    (re.compile(rf"^docker-({_HEX64})\.scope$"), "docker"),
    (re.compile(rf"^cri-containerd-({_HEX64})\.scope$"), "containerd"),
    (re.compile(rf"^crio-({_HEX64})\.scope$"), "cri-o"),
    (re.compile(rf"^libpod-({_HEX64})\.scope$"), "podman"),
)
_PARENT_RUNTIMES = {"docker": "docker", "libpod_parent": "podman"}   # cgroupfs drivers: /<parent>/<id>
_POD_SLICE = re.compile(r"^kubepods(?:-(besteffort|burstable))?-pod([0-9a-f_]{36})\.slice$")
_POD_DIR = re.compile(r"^pod([0-9a-f-]{36})$")
_LIBPOD_DIR = re.compile(rf"^libpod-({_HEX64})$")


def parse_cgroup_path(path: str, cgroup_id: int = 0) -> CgroupInfo:
    """Container / pod / unit facts of a cgroup v2 path (pure; see the module docstring)."""
    parts = [p for p in path.split("/") if p]
    cid = runtime = pod_uid = qos = unit = ""
    in_kubepods = False
    for i, part in enumerate(parts):
        if part.endswith(".service"):
            unit = part
        if part.startswith("kubepods"):
            in_kubepods = True
        m = _POD_SLICE.match(part)
        if m:
            pod_uid, qos = m.group(2).replace("_", "-"), m.group(1) or "guaranteed"
            continue
        m = _POD_DIR.match(part)
        if m and in_kubepods:
            pod_uid = m.group(1)
            qos = parts[i - 1] if i > 0 and parts[i - 1] in ("besteffort", "burstable") else "guaranteed"
            continue
        for rx, rt in _SCOPE_RUNTIMES:
            m = rx.match(part)
            if m:
                cid, runtime = m.group(1), rt
                break
        else:
            if re.fullmatch(_HEX64, part) and i > 0:
                parent = parts[i - 1]
                if parent in _PARENT_RUNTIMES:
                    cid, runtime = part, _PARENT_RUNTIMES[parent]
                elif pod_uid and _POD_DIR.match(parent):
                    cid, runtime = part, ""          # cgroupfs kubelet: runtime not in the path
            m = _LIBPOD_DIR.match(part)
            if m and i > 0 and parts[i - 1] == "libpod_parent":
                cid, runtime = m.group(1), "podman"
    return CgroupInfo(cgroup_id=cgroup_id, path="/" + "/".join(parts), container_id=cid, runtime=runtime,
                      pod_uid=pod_uid, pod_qos=qos, systemd_unit=unit)


# ------------------------------------------------------------------------------- runtime metadata

@dataclass
class RuntimeMetadata:
    """Container name / image / pod namespace+name, read from the runtime's own state files.

    Only what a runtime wrote about the container is used (never the cgroup path). Roots are
    configurable so tests (and unusual installs) can point elsewhere. Each lookup reads one small
    JSON file; results are cached by the caller."""
    docker_root: str = "/var/lib/docker/containers"
    containerd_roots: tuple[str, ...] = ("/run/containerd/io.containerd.runtime.v2.task/k8s.io",
                                         "/run/containerd/io.containerd.runtime.v2.task/moby",
                                         "/run/containerd/io.containerd.runtime.v2.task/default")
    crio_roots: tuple[str, ...] = ("/run/containers/storage/overlay-containers",
                                   "/var/lib/containers/storage/overlay-containers")
    errors: int = field(default=0)

    def lookup(self, runtime: str, container_id: str) -> dict:
        """{name, image, pod_name, pod_namespace} (keys only when known)."""
        if not re.fullmatch(_HEX64, container_id):
            return {}
        if runtime == "docker":
            return self._docker(container_id)
        for fn in (self._oci_bundle, self._crio):
            got = fn(container_id)
            if got:
                return got
        return {}

    def _read(self, path: str) -> dict | None:
        try:
            with open(path, "rb") as f:
                return json.loads(f.read(4 << 20))
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            self.errors += 1
            return None

    def _docker(self, cid: str) -> dict:
        d = self._read(os.path.join(self.docker_root, cid, "config.v2.json"))
        if not d:
            return {}
        cfg = d.get("Config") or {}
        labels = cfg.get("Labels") or {}
        out = {"name": str(d.get("Name") or "").lstrip("/"), "image": str(cfg.get("Image") or "")}
        out["pod_name"] = labels.get("io.kubernetes.pod.name", "")
        out["pod_namespace"] = labels.get("io.kubernetes.pod.namespace", "")
        if labels.get("io.kubernetes.container.name"):
            out["name"] = labels["io.kubernetes.container.name"]
        return {k: v for k, v in out.items() if v}

    def _oci_bundle(self, cid: str) -> dict:
        return self._annotated((os.path.join(root, cid, "config.json") for root in self.containerd_roots),
                               _CONTAINERD_KEYS)

    def _crio(self, cid: str) -> dict:
        return self._annotated((os.path.join(root, cid, "userdata", "config.json") for root in self.crio_roots),
                               _CRIO_KEYS)

    def _annotated(self, paths, keys: dict[str, str]) -> dict:
        """The `keys` (ours → annotation) of the first readable OCI config among `paths`."""
        for path in paths:
            d = self._read(path)
            if d:
                a = d.get("annotations") or {}
                return {k: a[src] for k, src in keys.items() if a.get(src)}
        return {}


_CONTAINERD_KEYS = {"name": "io.kubernetes.cri.container-name", "image": "io.kubernetes.cri.image-name",
                    "pod_name": "io.kubernetes.cri.sandbox-name",
                    "pod_namespace": "io.kubernetes.cri.sandbox-namespace"}
_CRIO_KEYS = {"name": "io.kubernetes.container.name", "image": "io.kubernetes.cri-o.ImageName",
              "pod_name": "io.kubernetes.pod.name", "pod_namespace": "io.kubernetes.pod.namespace"}


# ------------------------------------------------------------------------------------- resolver

class CgroupResolver:
    """cgroup id → CgroupInfo with bounded caches.

    resolve(): cache hit → O(1). Miss → (at most once per min_walk_interval_s) walk the cgroup2 tree,
    refreshing the id → path index (bounded by max_index entries; cgroups past it are counted in
    stats()["index_truncated"]), then parse. Not found → negative entry for negative_ttl_s."""

    def __init__(self, mount: str | None = None, *, maxsize: int = 4096, ttl_s: float = 300.0,
                 negative_ttl_s: float = 5.0, min_walk_interval_s: float = 1.0, max_index: int = 200_000,
                 runtime_meta: RuntimeMetadata | None = None, clock: Callable[[], float] = time.monotonic):
        self.mount = mount if mount is not None else cgroup2_mount()
        self.cache: LruTtlCache[int, CgroupInfo | None] = LruTtlCache(maxsize, ttl_s, clock)
        self.negative_ttl_s = negative_ttl_s
        self.min_walk_interval_s = min_walk_interval_s
        self.max_index = max_index
        self.meta = runtime_meta if runtime_meta is not None else RuntimeMetadata()
        self._clock = clock
        self._index: dict[int, str] = {}
        self._last_walk = float("-inf")
        self._lock = threading.Lock()
        self.walks = self.walk_errors = self.index_truncated = self.not_found = 0

    def resolve(self, cgroup_id: int) -> CgroupInfo | None:
        if not cgroup_id or self.mount is None:
            return None
        hit = self.cache.get(cgroup_id, _MISSING)
        if hit is not _MISSING:
            return hit
        path = self.path_of(cgroup_id)
        if path is None:
            self.not_found += 1
            self.cache.put(cgroup_id, None, ttl_s=self.negative_ttl_s)
            return None
        info = self._with_meta(parse_cgroup_path(path, cgroup_id))
        self.cache.put(cgroup_id, info)
        return info

    def path_of(self, cgroup_id: int) -> str | None:
        """Path (relative to the mount) of a cgroup id; walks the tree on an index miss (rate-limited)."""
        with self._lock:
            path = self._index.get(cgroup_id)
            if path is not None:            # ids are never reused (64-bit kernfs ino): a stale path is still true
                return path
            if self._clock() - self._last_walk < self.min_walk_interval_s:
                return None
            self._walk()
            return self._index.get(cgroup_id)

    def _walk(self) -> None:
        self._last_walk = self._clock()
        self.walks += 1
        try:
            index: dict[int, str] = {os.stat(self.mount).st_ino: "/"}
        except OSError:
            self.walk_errors += 1
            return
        stack = [(self.mount, "")]
        while stack:
            d, rel = stack.pop()
            try:
                with os.scandir(d) as it:
                    for e in it:
                        if not e.is_dir(follow_symlinks=False):
                            continue
                        if len(index) >= self.max_index:
                            self.index_truncated += 1
                            continue
                        child = f"{rel}/{e.name}"
                        index[e.inode()] = child          # d_ino of a kernfs dirent = the cgroup id
                        stack.append((e.path, child))
            except OSError:
                self.walk_errors += 1      # a cgroup removed mid-walk: expected, counted
        self._index = index

    def _with_meta(self, info: CgroupInfo) -> CgroupInfo:
        if not info.container_id:
            return info
        m = self.meta.lookup(info.runtime, info.container_id)
        if not m:
            return info
        return replace(info, container_name=m.get("name", ""), image=m.get("image", ""),
                       pod_name=m.get("pod_name", ""), pod_namespace=m.get("pod_namespace", ""))

    def stats(self) -> dict:
        return {"mount": self.mount or "", "cache": self.cache.stats(), "walks": self.walks,
                "walk_errors": self.walk_errors, "index_size": len(self._index),
                "index_truncated": self.index_truncated, "not_found": self.not_found,
                "runtime_meta_errors": self.meta.errors}
