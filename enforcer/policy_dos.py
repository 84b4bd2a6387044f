"""DoS profiles of a policy (docs/dos.md, docs/policy.md "dos"): the DosProfile model and the policy
builder's part that checks and builds them (per-source limits, SYN limits per source, globally and per
destination port, the SYN proxy, port limits, bans).

policy._Builder inherits DosBuilder; like every builder check, these add problems to the builder's
Issues (never raise) and skip paths the schema already flagged. Invariants of a built DosProfile: rates
are positive integers (bps parsed from units), a burst is at least its pps, ports are unique per
(port, protocol), the proxy's port ranges are merged and at most HW_PROXY_RANGES_MAX (8), and a proxy
other than off appears only in a stateful policy. Cost: O(ports) per profile.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from hostwall.units import parse_duration, parse_rate
from hostwall.yamldoc import Issues

from .validation import get_in as _get
from .validation import merge_ranges, parse_port

__all__ = ["DosProfile", "DosBuilder"]


@dataclass(frozen=True, slots=True)
class DosProfile:
    """DoS limits of one profile (validated; enforcement is separate). Rates in pps / bits per s."""
    name: str
    per_source_pps: int | None
    per_source_burst: int | None
    per_source_bps: int | None
    syn_per_source_pps: int | None
    syn_global_pps: int | None
    udp_per_source_pps: int | None
    icmp_per_source_pps: int | None
    ports: tuple[tuple[int, str, int], ...]      # (port, "tcp"|"udp", pps)
    ban_after_s: float | None
    ban_duration_s: float | None
    source_prefix_v4: int = 32
    source_prefix_v6: int = 64
    # SYNs to one destination port (all sources) and the SYN proxy (docs/dos.md); ranges are inclusive
    syn_per_port_pps: int | None = None
    syn_proxy: Literal["off", "on", "auto"] = "off"
    syn_proxy_ports: tuple[tuple[int, int], ...] | None = None     # None: every port
    syn_proxy_quiet_s: float = 30.0
    syn_proxy_pressure: int | None = None                          # auto: evictions/s (None: the default)
    syn_proxy_mss: int = 1460
    syn_proxy_options: Literal["mss", "full"] = "mss"
    syn_proxy_wscale: int = 7


class DosBuilder:
    """policy._Builder's DoS part (a mixin: needs the builder's `ok`, `_num` and `issues`)."""

    issues: Issues
    if TYPE_CHECKING:                      # the builder's, declared for the type checker
        def ok(self, path: tuple, value: Any, *types: type) -> bool: ...
        def _num(self, path: tuple, value: Any, parse: Callable[[Any], Any] | None = None) -> Any: ...

    def _profiles(self, profiles: Any) -> dict[str, DosProfile]:
        out: dict[str, DosProfile] = {}
        if not isinstance(profiles, dict):
            return out
        for name, prof in profiles.items():
            p = ("dos", "profiles", name)
            if not isinstance(prof, dict) or not isinstance(name, str):
                continue
            out[name] = self._profile(p, name, prof)
        return out

    def _profile(self, p: tuple, name: str, d: dict) -> DosProfile:
        ps, syn = _get(d, "per_source", {}), _get(d, "syn", {})
        pps = self._num(p + ("per_source", "pps"), _get(ps, "pps"))
        burst = self._num(p + ("per_source", "burst"), _get(ps, "burst"))
        if burst is not None:
            if pps is None and _get(ps, "pps") is None:
                self.issues.add(p + ("per_source", "burst"), "burst needs per_source.pps; add pps or remove burst")
            elif pps is not None and burst < pps:
                self.issues.add(p + ("per_source", "burst"), f"burst {burst} is below pps {pps}; burst is the "
                                                             "bucket size and must be >= pps")
        ports: list[tuple[int, str, int]] = []
        seen: dict[tuple[int, str], int] = {}
        plist = _get(d, "ports")
        for j, e in enumerate(plist if isinstance(plist, list) else []):
            pj = p + ("ports", j)
            if self.issues.tainted(pj) or not isinstance(e, dict):
                continue
            key = (int(e["port"]), e["protocol"])
            if key in seen:
                self.issues.add(pj, f"port {key[0]}/{key[1]} is listed twice (first at ports[{seen[key]}])")
                continue
            seen[key] = j
            ports.append((key[0], key[1], int(e["pps"])))
        ban = _get(d, "ban", {})
        return DosProfile(
            name=name, per_source_pps=pps, per_source_burst=burst,
            per_source_bps=self._num(p + ("per_source", "bps"), _get(ps, "bps"), parse_rate),
            syn_per_source_pps=self._num(p + ("syn", "per_source_pps"), _get(syn, "per_source_pps")),
            syn_global_pps=self._num(p + ("syn", "global_pps"), _get(syn, "global_pps")),
            udp_per_source_pps=self._num(p + ("udp", "per_source_pps"), _get(_get(d, "udp"), "per_source_pps")),
            icmp_per_source_pps=self._num(p + ("icmp", "per_source_pps"), _get(_get(d, "icmp"), "per_source_pps")),
            ports=tuple(ports),
            ban_after_s=self._num(p + ("ban", "after"), _get(ban, "after"), parse_duration),
            ban_duration_s=self._num(p + ("ban", "duration"), _get(ban, "duration"), parse_duration),
            source_prefix_v4=_int_or(d.get("source_prefix_v4"), 32),
            source_prefix_v6=_int_or(d.get("source_prefix_v6"), 64),
            syn_per_port_pps=self._num(p + ("syn", "per_port_pps"), _get(syn, "per_port_pps")),
            syn_proxy=_proxy_mode(_get(syn, "proxy")),
            syn_proxy_ports=self._proxy_ports(p + ("syn", "proxy_ports"), _get(syn, "proxy_ports")),
            syn_proxy_quiet_s=self._num(p + ("syn", "proxy_quiet"), _get(syn, "proxy_quiet"), parse_duration) or 30.0,
            syn_proxy_pressure=self._num(p + ("syn", "proxy_pressure"), _get(syn, "proxy_pressure")),
            syn_proxy_mss=_int_or(_get(syn, "proxy_mss"), 1460),
            syn_proxy_options="full" if _get(syn, "proxy_options") == "full" else "mss",
            syn_proxy_wscale=_int_or(_get(syn, "proxy_wscale"), 7),
        )

    def _proxy_needs_state(self, profiles: dict[str, DosProfile], stateful: bool) -> None:
        """The SYN proxy admits a connection once, at its cookie ACK: later packets pass only as a tracked
        connection, so it needs stateful tracking."""
        if stateful:
            return
        for name, prof in profiles.items():
            if prof.syn_proxy != "off":
                self.issues.add(("dos", "profiles", name, "syn", "proxy"),
                                f"proxy: {prof.syn_proxy} needs defaults.stateful: true (a connection admitted by its "
                                "cookie is then tracked); set stateful or proxy: off")

    def _proxy_ports(self, p: tuple, ports: Any) -> tuple[tuple[int, int], ...] | None:
        if not isinstance(ports, list) or self.issues.bad(p):
            return None
        ranges = []
        for j, v in enumerate(ports):
            pj = p + (j,)
            if not self.ok(pj, v, int, float, str):
                continue
            try:
                ranges.append(parse_port(v))
            except ValueError as e:
                self.issues.add(pj, str(e))
        merged = merge_ranges(ranges)
        if len(merged) > 8:                     # the datapath holds 8 ranges (HW_PROXY_RANGES_MAX)
            self.issues.add(p, f"{len(merged)} separate port ranges after merging; the proxy holds 8: "
                               "merge neighbouring ports into ranges")
        return merged or None


def _proxy_mode(v: Any) -> Literal["off", "on", "auto"]:
    """syn.proxy: YAML 1.1 reads unquoted off/on as booleans; they mean the same."""
    if v is True or v == "on":
        return "on"
    return "auto" if v == "auto" else "off"


def _int_or(v: Any, default: int) -> int:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else default
