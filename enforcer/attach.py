"""Attach and detach the programs on interfaces with pyroute2 (rtnetlink), optionally inside a netns.

XDP: IFLA_XDP with native (driver) or generic (skb) mode; `auto` tries native, then generic — except
on veth, where it tries generic first: veth's native XDP converts (and often copies) every skb into an
XDP frame, and measured in the lab benchmark, generic mode forwards ~15% more packets through the
same program (docs/benchmarks.md).
TC: a clsact qdisc with our bpf filter (direct-action) at our own priority, so other users' filters on
the same qdisc are left alone: egress only where XDP judges ingress (docs/datapath.md "Hooks"; an
ingress one only by hand, as older builds attached it); the clsact qdisc is removed only if we added
it and it holds nothing else.
"""
from __future__ import annotations

from pyroute2.netlink.exceptions import NetlinkError

from hostwall.bpf.links import TC_EGRESS_PARENT, TC_INGRESS_PARENT, TC_PRIO, LinkError, LinkState, ifindex, link_state
from hostwall.bpf.links import ipr_in as _ipr
from hostwall.bpf.links import our_filters as _our_filters

__all__ = ["AttachError", "LinkState", "attach_tc", "attach_xdp", "detach_tc", "detach_xdp", "link_state"]

XDP_FLAGS_UPDATE_IF_NOEXIST = 1
XDP_FLAGS_SKB_MODE = 2
XDP_FLAGS_DRV_MODE = 4


class AttachError(RuntimeError):
    pass


def _index(ipr, ifname: str) -> int:
    try:
        return ifindex(ipr, ifname)
    except LinkError as e:
        raise AttachError(str(e)) from None


def _kind(ipr, idx: int) -> str | None:
    info = ipr.get_links(idx)[0].get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info is not None else None


def attach_xdp(ifname: str, prog_fd: int, mode: str, netns: str | None = None) -> str:
    """Attach (or atomically replace) the XDP program. Returns the mode that took."""
    with _ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        auto = [XDP_FLAGS_SKB_MODE, XDP_FLAGS_DRV_MODE] if _kind(ipr, idx) == "veth" else \
            [XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE]
        order = {"native": [XDP_FLAGS_DRV_MODE], "generic": [XDP_FLAGS_SKB_MODE], "auto": auto}[mode]
        last = None
        for flags in order:
            try:
                ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", prog_fd), ("IFLA_XDP_FLAGS", flags)]})
                return "native" if flags == XDP_FLAGS_DRV_MODE else "generic"
            except NetlinkError as e:
                last = e
        raise AttachError(f"XDP attach on {ifname} in mode {mode} failed: {last}")


def detach_xdp(ifname: str, netns: str | None = None) -> None:
    with _ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        for flags in (XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE):
            try:
                ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})
            except NetlinkError:
                pass


def _has_clsact(ipr, idx: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index=idx))


def attach_tc(ifname: str, ingress_fd: int | None, egress_fd: int, netns: str | None = None) -> None:
    """Add (or replace) our egress filter, and our ingress filter when `ingress_fd` is given, on a clsact
    qdisc. `ingress_fd` None: our ingress filter, if one is there (an older build's), is removed after
    the egress one is in place."""
    with _ipr(netns) as ipr:
        idx = _index(ipr, ifname)
        if not _has_clsact(ipr, idx):
            ipr.tc("add", "clsact", idx)
        for parent, fd, name in ((TC_INGRESS_PARENT, ingress_fd, "hostwall_in"),
                                 (TC_EGRESS_PARENT, egress_fd, "hostwall_eg")):
            if fd is None:
                continue
            try:
                ipr.tc("replace-filter", "bpf", idx, handle=1, fd=fd, name=name, parent=parent, prio=TC_PRIO,
                       classid=1, direct_action=True)
            except NetlinkError as e:
                raise AttachError(f"TC attach on {ifname} failed: {e}") from None
        if ingress_fd is None and not _del_ours(ipr, idx, TC_INGRESS_PARENT):
            raise AttachError(f"TC detach of an older build's ingress filter on {ifname} failed")


def _del_ours(ipr, idx: int, parent: int) -> bool:
    """Delete our filter on `parent` if it is there; True if none of ours is left (read back)."""
    for _ in _our_filters(ipr, idx, parent):
        try:
            ipr.tc("del-filter", "bpf", idx, handle=1, parent=parent, prio=TC_PRIO)
        except NetlinkError:
            pass
    return not _our_filters(ipr, idx, parent)


def detach_tc(ifname: str, netns: str | None = None) -> None:
    with _ipr(netns) as ipr:
        try:
            idx = _index(ipr, ifname)
        except AttachError:
            return
        for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT):
            _del_ours(ipr, idx, parent)
        left = any(ipr.get_filters(index=idx, parent=p) for p in (TC_INGRESS_PARENT, TC_EGRESS_PARENT))
        if not left and _has_clsact(ipr, idx):
            try:
                ipr.tc("del", "clsact", idx)
            except NetlinkError:
                pass


