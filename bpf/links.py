"""Which of our programs an interface carries, read over rtnetlink (pyroute2), optionally in a netns.

Read-only: the enforcer attaches and detaches (hostwall.enforcer.attach); the enforcer's `status`
and the collector's kernel metrics both read the attachment state here.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

XDP_ATTACHED = {None: "none", "xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}

TC_PRIO = 0xC0DE & 0x7FFF          # our filter priority on clsact (visible in `tc filter show`)
TC_INGRESS_PARENT = 0xFFFFFFF2
TC_EGRESS_PARENT = 0xFFFFFFF3


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
