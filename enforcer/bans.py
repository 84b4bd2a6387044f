"""Bans: operator bans (LPM tries, any prefix, optional expiry) and automatic DoS bans (listed from
hw_dos_banned, enforced through the per-source bucket entry). All times shown are wall clock; the
kernel keeps CLOCK_MONOTONIC, converted here.
"""
from __future__ import annotations

import ipaddress
import time

import numpy as np

from hostwall.bpf import bpfsys, dos_sources
from hostwall.bpf import layout as L

from .datapath import Datapath


def _mono_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _wall(mono_ns: int) -> float:
    return time.time() + (mono_ns - _mono_ns()) / 1e9


def _key(net: ipaddress._BaseNetwork) -> tuple[str, bytes]:
    """(hw_manual_ban4 | hw_manual_ban6, LPM key: prefix length + network address)."""
    return f"hw_manual_ban{net.version}", net.prefixlen.to_bytes(4, "little") + net.network_address.packed


def parse_prefix(text: str) -> ipaddress._BaseNetwork:
    """A CIDR or address; host bits set is an error (say what was meant)."""
    try:
        return ipaddress.ip_network(text, strict=True)
    except ValueError as e:
        raise ValueError(f"{text!r} is not a prefix: {e}") from None


def _count_manual(dp: Datapath) -> int:
    n = 0
    for name, dt in (("hw_manual_ban4", "hw_ban4_key"), ("hw_manual_ban6", "hw_ban6_key")):
        n += sum(1 for _ in bpfsys.map_keys(dp.map_fds[name], L.DTYPES[dt].itemsize))
    return n


def add(dp: Datapath, prefix: str, duration_s: float | None) -> ipaddress._BaseNetwork:
    net = parse_prefix(prefix)
    name, key = _key(net)
    now = _mono_ns()
    val = np.zeros(1, dtype=L.DTYPES["hw_manual_ban"])
    val["until_ns"] = now + int(duration_s * 1e9) if duration_s else 0
    val["added_ns"] = now
    bpfsys.map_update(dp.map_fds[name], key, val.tobytes())
    dp.set_config(manual_bans=_count_manual(dp))
    return net


def delete(dp: Datapath, prefix: str) -> bool:
    """Remove an operator ban, or lift the automatic ban of that source prefix. True if one was found."""
    net = parse_prefix(prefix)
    name, key = _key(net)
    found = bpfsys.map_delete(dp.map_fds[name], key)
    dp.set_config(manual_bans=_count_manual(dp))
    kdt = L.DTYPES["hw_dos_key"]
    seed = int(dp.config()["table_seed"])
    with dos_sources.table(dp.map_fds[dos_sources.MAP]) as t:
        for k in list(bpfsys.map_keys(dp.map_fds["hw_dos_banned"], kdt.itemsize)):
            rec = np.frombuffer(k, dtype=kdt)[0]
            if _auto_prefix(rec) == net:
                bpfsys.map_delete(dp.map_fds["hw_dos_banned"], k)
                for i in dos_sources.find_all(t, rec, seed):   # every slot the datapath may look in
                    t.slots["s"]["banned_until_ns"][i] = 0         # (two 8-byte stores each)
                    t.slots["s"]["streak_start_ns"][i] = 0
                found = True
    return found


def _auto_prefix(rec: np.void) -> ipaddress._BaseNetwork:
    raw = bytes(rec["addr"])
    addr = ipaddress.IPv4Address(raw[:4]) if rec["family"] == 4 else ipaddress.IPv6Address(raw)
    return ipaddress.ip_network(f"{addr}/{int(rec['prefix_len'])}", strict=False)


def listing(dp: Datapath, profile_names: tuple[str, ...] = ()) -> list[dict]:
    """Current bans, operator and automatic; expired automatic bans are left out."""
    now = _mono_ns()
    out = []
    for name, dt, fam in (("hw_manual_ban4", "hw_ban4_key", 4), ("hw_manual_ban6", "hw_ban6_key", 6)):
        vdt = L.DTYPES["hw_manual_ban"]
        for k in bpfsys.map_keys(dp.map_fds[name], L.DTYPES[dt].itemsize):
            v = bpfsys.map_lookup(dp.map_fds[name], k, vdt.itemsize)
            if v is None:
                continue
            val = np.frombuffer(v, dtype=vdt)[0]
            plen = int.from_bytes(k[:4], "little")
            addr = ipaddress.ip_address(k[4:8] if fam == 4 else k[4:20])
            until = int(val["until_ns"])
            if until and until <= now:
                continue
            out.append({"prefix": str(ipaddress.ip_network(f"{addr}/{plen}")), "kind": "operator",
                        "since": _wall(int(val["added_ns"])), "until": _wall(until) if until else None})
    kdt, vdt = L.DTYPES["hw_dos_key"], L.DTYPES["hw_dos_ban"]
    for k in bpfsys.map_keys(dp.map_fds["hw_dos_banned"], kdt.itemsize):
        v = bpfsys.map_lookup(dp.map_fds["hw_dos_banned"], k, vdt.itemsize)
        if v is None:
            continue
        b = np.frombuffer(v, dtype=vdt)[0]
        if int(b["until_ns"]) <= now:
            continue
        rec = np.frombuffer(k, dtype=kdt)[0]
        pid = int(rec["profile"])
        out.append({"prefix": str(_auto_prefix(rec)), "kind": "automatic",
                    "profile": profile_names[pid] if pid < len(profile_names) else str(pid),
                    "reason": L.REASON_NAMES.get(int(b["reason"]), "?"), "since": _wall(int(b["since_ns"])),
                    "until": _wall(int(b["until_ns"]))})
    return out
