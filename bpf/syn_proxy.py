"""The SYN proxy's kernel state from user space (bpf/dos.h, bpf/syncookie.h; docs/dos.md).

- hw_syn_ports[dport] (mmap): the per-destination-port SYN bucket and, for `auto` profiles, until when
  the proxy answers for the port (hot_until_ns) and since when (hot_since_ns).
- hw_syn_state[profile] (mmap): until when an `auto` profile's proxy answers for all its ports because
  conntrack was evicting entries (pressure_until_ns).
- hw_syn_stats (per-CPU): SYNs answered with cookies, SYNs let through to refresh the host's cookie
  window, cookie ACKs valid and invalid, SYNs that could not be answered, SYNs the per-port guard dropped.

`ProxyState.read()` turns these into the set of ports (and profiles) whose proxy answers now, so the
enforcer (audit records) and the collector (anomaly records) see the same switches. Reading is one
vectorised pass over 65536 slots (~3 MB, no syscalls).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import bpfsys
from . import layout as L
from .slot_table import SlotTable

PORTS_MAP, STATE_MAP, STATS_MAP, PRESSURE_MAP = "hw_syn_ports", "hw_syn_state", "hw_syn_stats", "hw_ct_pressure"


@dataclass(frozen=True)
class ProxyState:
    """What the datapath's `auto` proxies do at `now_ns` (the datapath's clock)."""
    now_ns: int
    ports: dict[int, int]          # port → hot_since_ns, for ports an auto proxy answers for now (SYN rate)
    pressure: dict[int, int]       # profile id → pressure_since_ns, for profiles answering for all their ports

    def keys(self) -> set[tuple[str, int]]:
        """("port", port) and ("pressure", profile id) for everything switched on."""
        return {("port", p) for p in self.ports} | {("pressure", i) for i in self.pressure}


def read(map_fds: dict[str, int], now_ns: int) -> ProxyState:
    """The switched-on ports and profiles at `now_ns`."""
    with SlotTable(map_fds[PORTS_MAP], L.DTYPES["hw_syn_port"], L.C["HW_SYN_PORTS"], ()) as t:
        hot = np.flatnonzero(t.slots["hot_until_ns"] > np.uint64(now_ns))
        ports = {int(p): int(t.slots["hot_since_ns"][p]) for p in hot}
    with SlotTable(map_fds[STATE_MAP], L.DTYPES["hw_syn_state"], L.C["HW_DOS_PROFILES_MAX"], ()) as t:
        on = np.flatnonzero(t.slots["pressure_until_ns"] > np.uint64(now_ns))
        pressure = {int(i): int(t.slots["pressure_since_ns"][i]) for i in on}
    return ProxyState(now_ns, ports, pressure)


def port_rows(map_fds: dict[str, int], ports: list[int]) -> np.ndarray:
    """hw_syn_port rows of some ports (a copy)."""
    with SlotTable(map_fds[PORTS_MAP], L.DTYPES["hw_syn_port"], L.C["HW_SYN_PORTS"], ()) as t:
        return t.slots[np.asarray(ports, dtype=np.int64)].copy()


def stats(map_fds: dict[str, int], ncpus: int) -> dict[str, int]:
    """The proxy's work since load (hw_syn_stats summed over CPUs)."""
    n = L.C["HW_SS_STATS"]
    dt = L.DTYPES["hw_counter"]
    raw = bpfsys.array_slots(map_fds[STATS_MAP], 0, n, dt.itemsize * ncpus)
    pk = np.frombuffer(raw, dtype=dt).reshape(n, ncpus)["packets"].sum(axis=1)
    return {name: int(pk[i]) for i, name in L.SYN_STAT_NAMES.items()}


def clear(map_fds: dict[str, int]) -> None:
    """Forget every port's and profile's SYN state and the eviction window (tests, benchmarks)."""
    with SlotTable(map_fds[PORTS_MAP], L.DTYPES["hw_syn_port"], L.C["HW_SYN_PORTS"], ()) as t:
        t.clear()
    with SlotTable(map_fds[STATE_MAP], L.DTYPES["hw_syn_state"], L.C["HW_DOS_PROFILES_MAX"], ()) as t:
        t.clear()
    bpfsys.map_update(map_fds[PRESSURE_MAP], b"\0" * 4, bytes(L.DTYPES["hw_ct_pressure"].itemsize))
