"""This host and this enforcer instance, as records need them.

HostInfo: hostname, boot id, versions — fixed for the life of the collector (cheap to pass around).
InstanceStateView: the enforcer's instance state (enforcer/state.py), re-read when its file changes,
  resolving the numbers the kernel stamps on records (revision_id, rule_slot) into names. Counter slots
  are reused across policy swaps, so a slot is resolved only through a snapshot of the revision that
  stamped it: the state's revision_info (the current and REVISIONS_KEEP older revisions, whether or not
  the collector saw them live) plus the snapshots taken live. Unknown stays "" — never guessed (the
  record builder counts such records, docs/records.md "Rule fields"). Revision ids are per enforcer
  instance: the view resolves only the instance it first saw (the one whose maps the collector reads).
InterfaceTable: ifindex → (interface name, network namespace) for the attached interfaces. An ifindex is
  unique only inside its namespace: when two attached interfaces in different namespaces share one,
  the lookup answers None (counted as ambiguous) rather than pick one.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from hostwall.bpf.state import InstanceState, audit_log_path, dns_log_path, state_path
from hostwall.bpf.state import boot_id as current_boot_id

__all__ = ["HostInfo", "InstanceStateView", "InterfaceTable", "Iface", "NO_RULE_SLOT", "collector_version"]

NO_RULE_SLOT = 0xFFFFFFFF
REVISIONS_KEPT = 64
RELOAD_ON_MISS_S = 0.1       # at most one state re-read per this interval for a revision newer than known


def collector_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("hostwall")
    except PackageNotFoundError:
        return "0.0.0"


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    boot_id: str = ""              # /proc/sys/kernel/random/boot_id: monotonic timestamps are per boot
    pin_dir: str = ""
    version: str = ""              # hostwall version, observer.version
    kernel: str = ""

    @classmethod
    def detect(cls, pin_dir: str = "") -> HostInfo:
        return cls(hostname=socket.gethostname(), boot_id=current_boot_id(),
                   pin_dir=pin_dir, version=collector_version(), kernel=os.uname().release)


@dataclass(frozen=True)
class _Revision:
    revision: str
    policy: str = ""
    slot_names: dict = field(default_factory=dict)      # slot -> rule name (empty: revision string only)


class InstanceStateView:
    """Read-only, reload-on-change view of an enforcer instance's state file.

    refresh() costs one stat() when nothing changed. Snapshots of up to REVISIONS_KEPT revisions are
    kept so records stamped by an older policy still resolve while they drain.

    Invariant: a revision id resolves only through the table of the instance the view first saw. A
    state of another instance (another instance_id, or revision ids that went down: a detached enforcer
    started anew numbers from 1 again) empties the table for good (`foreign`): the collector still reads
    the first instance's maps, whose records then stay unnamed (counted), never named after the new
    instance's rules."""

    def __init__(self, pin_dir: str, state: InstanceState | None = None, state_file: Path | None = None):
        self.pin_dir = pin_dir
        self._state_file = state_file         # a retired instance's copy (bpf/retired.py), else the live state
        self.state: InstanceState | None = None
        self.generation = 0                   # bumps on every (re)load; caches keyed on it
        self._revs: dict[int, _Revision] = {}
        self._sig: tuple | None = None
        self.instance_id = ""                 # the instance resolved (the first non-empty id seen)
        self.foreign = False                  # the state file now describes another instance
        self.newest = 0                       # highest revision id known
        self.reload_interval_s = RELOAD_ON_MISS_S
        self._miss_reload_at = float("-inf")
        if state is not None:
            self._adopt(state)
        else:
            self.refresh()

    @property
    def state_file(self) -> Path:
        return self._state_file or state_path(self.pin_dir)

    @property
    def audit_log(self) -> Path:
        return audit_log_path(self.pin_dir)

    @property
    def dns_log(self) -> Path:
        """The DNS proxy's decision records (enforcer/dnsrecords.py)."""
        return dns_log_path(self.pin_dir)

    def refresh(self) -> bool:
        """Re-read the state file if it changed (mtime, size, inode). True when reloaded."""
        try:
            st = os.stat(self.state_file)
            sig = (st.st_mtime_ns, st.st_size, st.st_ino)
        except OSError:
            sig = None
        if sig == self._sig:
            return False
        self._sig = sig
        state = None
        if sig is not None:
            try:
                state = InstanceState.load_file(self.state_file)
            except (OSError, ValueError, TypeError):
                state = None                  # half-written or foreign file: keep what we had
                if self.state is not None:
                    return False
        if state is not None:
            self._adopt(state)
        return True

    def reload_for(self, revision_id: int) -> bool:
        """A record names a revision newer than any known: the enforcer swapped since the last refresh.
        Re-read the state at most once per reload_interval_s (one stat() when unchanged). True when
        reloaded."""
        if self.foreign or revision_id <= self.newest:
            return False
        now = time.monotonic()
        if now - self._miss_reload_at < self.reload_interval_s:
            return False
        self._miss_reload_at = now
        return self.refresh()

    def _other_instance(self, state: InstanceState) -> bool:
        if not self.foreign:
            ours = self.instance_id or state.instance_id
            self.foreign = state.instance_id not in ("", ours) or state.revision_id < self.newest
            self.instance_id = ours
        return self.foreign

    def _adopt(self, state: InstanceState) -> None:
        self.state = state
        self.generation += 1
        if self._other_instance(state):
            self._revs.clear()
            return
        for rid, rev in state.revisions.items():
            try:
                i = int(rid)
            except ValueError:
                continue
            self._revs.setdefault(i, _Revision(revision=rev))
        for rid, info in state.revision_info.items():
            with contextlib.suppress(ValueError, TypeError, AttributeError):
                slots = {int(s): n for n, s in (info.get("slots") or {}).items()}
                rev = info.get("revision") or state.revisions.get(rid, "")
                self._revs[int(rid)] = _Revision(rev, info.get("policy", ""), slots)
        slot_names = {int(s): n for n, s in state.slots.items()}
        self._revs[state.revision_id] = _Revision(state.revision, state.policy_name, slot_names)
        for old in sorted(self._revs)[:-REVISIONS_KEPT]:
            del self._revs[old]
        self.newest = max(self._revs)

    # ---- resolution -----------------------------------------------------------------------------
    def revision(self, revision_id: int) -> str:
        r = self._revs.get(int(revision_id))
        return r.revision if r else ""

    def ruleset(self, revision_id: int) -> str:
        r = self._revs.get(int(revision_id))
        return r.policy if r else ""

    def rule_name(self, revision_id: int, slot: int) -> str:
        if slot == NO_RULE_SLOT:
            return ""
        r = self._revs.get(int(revision_id))
        return r.slot_names.get(int(slot), "") if r else ""

    def interfaces(self) -> list:
        return list(self.state.interfaces) if self.state else []


@dataclass(frozen=True)
class Iface:
    name: str
    netns: str | None


class InterfaceTable:
    """ifindex → Iface for the instance's attached interfaces; rebuilt when the state generation changes.

    Rebuild cost: one `ip -j link` per distinct namespace (root namespace: socket.if_nametoindex)."""

    def __init__(self, instance: InstanceStateView | None):
        self.instance = instance
        self._gen = -1
        self._map: dict[int, Iface | None] = {}
        self.ambiguous = self.unknown = self.errors = 0
        self.built_at = 0.0

    def lookup(self, ifindex: int) -> Iface | None:
        if self.instance is not None and self.instance.generation != self._gen:
            self.rebuild()
        got = self._map.get(int(ifindex), _ABSENT)
        if got is _ABSENT:
            self.unknown += 1
            return None
        if got is None:
            self.ambiguous += 1
        return got

    def rebuild(self) -> None:
        self._gen = self.instance.generation if self.instance else -1
        by_ns: dict[str | None, list[str]] = {}
        for a in (self.instance.interfaces() if self.instance else []):
            by_ns.setdefault(a.netns, []).append(a.name)
        m: dict[int, Iface | None] = {}
        for ns, names in by_ns.items():
            idx = self._indexes(ns)
            for n in names:
                i = idx.get(n)
                if i is None:
                    continue
                m[i] = None if (i in m and m[i] != Iface(n, ns)) else Iface(n, ns)
        self._map = m
        self.built_at = time.time()

    def _indexes(self, netns: str | None) -> dict[str, int]:
        if netns is None:
            return {name: i for i, name in socket.if_nameindex()}
        try:
            cp = subprocess.run(["ip", "-j", "-n", netns, "link", "show"], capture_output=True, text=True, timeout=5)
            return {link["ifname"]: int(link["ifindex"]) for link in json.loads(cp.stdout or "[]")}
        except (OSError, ValueError, subprocess.TimeoutExpired, KeyError):
            self.errors += 1
            return {}

    def stats(self) -> dict:
        return {"interfaces": len(self._map), "ambiguous": self.ambiguous, "unknown": self.unknown,
                "errors": self.errors}


_ABSENT = object()
