"""Which of our programs an interface carries, read over rtnetlink (pyroute2), optionally in a netns.

Read-only: the enforcer attaches and detaches (hostwall.enforcer.attach); the enforcer's `status`
and the collector's kernel metrics both read the attachment state here.
"""
from __future__ import annotations

import struct
from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

XDP_ATTACHED = {None: "none", "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}

TC_PRIO = 0xC0DE & 0x7FFF          # our filter priority on clsact (visible in `tc filter show`)
TC_INGRESS_PARENT = 0xFFFFFFF2
TC_EGRESS_PARENT = 0xFFFFFFF3
_TCA_BPF_NAME, _TCA_BPF_ID = 7, 11  # linux/pkt_cls.h; pyroute2 0.9 does not decode TCA_BPF_ID


class LinkError(RuntimeError):
    """The interface (or its netns) is not there."""


@dataclass(frozen=True)
class LinkState:
    ifname: str
    ifindex: int
    xdp_mode: str          # none | native | generic | ...
    xdp_prog_id: int
    tc_ingress: bool
    tc_egress: bool


@contextmanager
def ipr_in(netns: str | None):
    ipr = IPRoute(netns=netns) if netns else IPRoute()
    try:
        yield ipr
    finally:
        ipr.close()


def ifindex(ipr, ifname: str) -> int:
    idx = ipr.link_lookup(ifname=ifname)
    if not idx:
        raise LinkError(f"interface {ifname!r} not found" + (" in that netns" if ipr.status.get("netns") else ""))
    return idx[0]


def our_filters(ipr, idx: int, parent: int) -> list:
    try:
        fs = ipr.get_filters(index=idx, parent=parent)
    except NetlinkError:
        return []
    return [f for f in fs if (f["info"] >> 16) == TC_PRIO and f.get_attr("TCA_KIND") == "bpf"]


def link_state(ifname: str, netns: str | None = None) -> LinkState:
    with ipr_in(netns) as ipr:
        idx = ifindex(ipr, ifname)
        link = ipr.get_links(idx)[0]
        xdp = link.get_attr("IFLA_XDP")
        mode, pid = "none", 0
        if xdp is not None:
            mode = XDP_ATTACHED.get(xdp.get_attr("IFLA_XDP_ATTACHED"), "unknown")
            pid = xdp.get_attr("IFLA_XDP_PROG_ID") or 0
        return LinkState(ifname, idx, mode, pid, bool(our_filters(ipr, idx, TC_INGRESS_PARENT)),
                         bool(our_filters(ipr, idx, TC_EGRESS_PARENT)))


@dataclass(frozen=True)
class Programs:
    """The programs an interface runs at our hooks, by id (0: none): what an attach replaces there.
    `tc` holds, per clsact parent, (prog id, filter name) of the bpf filter at our priority."""
    xdp_generic: int
    xdp_native: int
    tc: dict[int, tuple[int, str]]
    clsact: bool


def programs(ifname: str, netns: str | None = None) -> Programs:
    """What runs at XDP (per mode) and at our TC priority on `ifname`. Cost: one link and three dumps."""
    with ipr_in(netns) as ipr:
        idx = ifindex(ipr, ifname)
        xdp = ipr.get_links(idx)[0].get_attr("IFLA_XDP")
        ids = {k: (xdp.get_attr(k) or 0) if xdp is not None else 0
               for k in ("IFLA_XDP_SKB_PROG_ID", "IFLA_XDP_DRV_PROG_ID")}
        tc = {}
        for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT):
            for f in our_filters(ipr, idx, parent):
                got = _bpf_filter(f)
                if got[0]:
                    tc[parent] = got
        return Programs(ids["IFLA_XDP_SKB_PROG_ID"], ids["IFLA_XDP_DRV_PROG_ID"], tc, has_clsact(ipr, idx))


def has_clsact(ipr, idx: int) -> bool:
    """A clsact qdisc on link `idx` (ours or another user's)."""
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx))


def _bpf_filter(f) -> tuple[int, str]:
    """(prog id, name) of a cls_bpf filter message, from the raw TCA_OPTIONS attributes; (0, "") for the
    filter chain's head message, which carries no options."""
    opts = f.get_attr("TCA_OPTIONS")
    if opts is None:
        return 0, ""
    raw = bytes(opts.data[opts.offset + 4: opts.offset + opts.length])
    pid, name, pos = 0, "", 0
    while pos + 4 <= len(raw):
        length, kind = struct.unpack_from("<HH", raw, pos)
        if length < 4:
            break
        body = raw[pos + 4: pos + length]
        if kind & 0x3FFF == _TCA_BPF_ID and len(body) >= 4:
            pid = struct.unpack_from("<I", body)[0]
        elif kind & 0x3FFF == _TCA_BPF_NAME:
            name = body.split(b"\0", 1)[0].decode(errors="replace")
        pos += (length + 3) & ~3
    return pid, name
