"""Attach and detach the programs on interfaces with pyroute2 (rtnetlink), optionally inside a netns.

XDP: IFLA_XDP with native (driver) or generic (skb) mode; `auto` tries native, then generic — except
on veth, where it tries generic first: veth's native XDP converts (and often copies) every skb into an
XDP frame, and measured in the lab benchmark, generic mode forwards ~15% more packets through the
same program (docs/benchmarks.md).
TC: a clsact qdisc with our bpf filter (direct-action) at our own priority, so other users' filters on
the same qdisc are left alone: egress only where XDP judges ingress (docs/datapath.md "Hooks"; an
ingress one only by hand, as older builds attached it); the clsact qdisc is removed only if we added
it and it holds nothing else.
attach_all: every interface or none; a failure puts back what ran before on each interface it touched
(docs/cli.md "Upgrades").
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from pyroute2.netlink.exceptions import NetlinkError

from hostwall.bpf import bpfsys
from hostwall.bpf.links import (
    TC_EGRESS_PARENT,
    TC_INGRESS_PARENT,
    TC_PRIO,
    LinkError,
    LinkState,
    Programs,
    ifindex,
    link_state,
    programs,
)
from hostwall.bpf.links import has_clsact as _has_clsact
from hostwall.bpf.links import ipr_in as _ipr
from hostwall.bpf.links import our_filters as _our_filters
from hostwall.bpf.state import AttachedInterface

__all__ = ["AttachError", "LinkState", "RolledBack", "attach_all", "attach_tc", "attach_xdp", "detach_tc",
           "detach_xdp", "link_state"]

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


def _empty_clsact(ipr, idx: int) -> bool:
    """A clsact qdisc that holds no filter on either parent (anyone's)."""
    return _has_clsact(ipr, idx) and \
        not any(ipr.get_filters(index=idx, parent=p) for p in (TC_INGRESS_PARENT, TC_EGRESS_PARENT))


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
                _replace_filter(ipr, idx, parent, fd, name)
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


def _replace_filter(ipr, idx: int, parent: int, fd: int, name: str) -> None:
    """Our filter on one clsact parent (atomic replace: packets see the old or the new program)."""
    ipr.tc("replace-filter", "bpf", idx, handle=1, fd=fd, name=name, parent=parent, prio=TC_PRIO,
           classid=1, direct_action=True)


def detach_tc(ifname: str, netns: str | None = None) -> None:
    with _ipr(netns) as ipr:
        try:
            idx = _index(ipr, ifname)
        except AttachError:
            return
        for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT):
            _del_ours(ipr, idx, parent)
        if _empty_clsact(ipr, idx):
            try:
                ipr.tc("del", "clsact", idx)
            except NetlinkError:
                pass


@dataclass
class Before:
    """What ran on one interface before our attach, with an fd held on each of those programs: one that
    another tool attached without pinning it is freed once replaced, and could not be put back."""
    ifname: str
    netns: str | None
    progs: Programs
    fds: dict[int, int] = field(default_factory=dict)        # prog id -> fd

    @property
    def where(self) -> str:
        return self.ifname + (f"@{self.netns}" if self.netns else "")

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()


def capture(ifname: str, netns: str | None = None) -> Before:
    """Read what `ifname` runs at XDP and at our TC priority and hold those programs. Cost: a link and three
    netlink dumps, one bpf syscall per program."""
    b = Before(ifname, netns, programs(ifname, netns))
    try:
        for pid in (b.progs.xdp_generic, b.progs.xdp_native, *(i for i, _ in b.progs.tc.values())):
            if pid and pid not in b.fds:
                b.fds[pid] = bpfsys.prog_get_fd_by_id(pid)
    except OSError:
        b.close()
        raise
    return b


def _ids(p: Programs) -> tuple:
    return p.xdp_generic, p.xdp_native, {parent: pid for parent, (pid, _) in p.tc.items()}


def put_back(b: Before) -> None:
    """Make `b`'s interface run exactly what it ran when captured: each program that ran attached again in
    its mode (an atomic replace of ours: no gap), ours removed where nothing ran, a clsact qdisc we added
    removed when empty. Raises AttachError when the link does not run exactly that afterwards (checked on
    the link: a netlink step may fail), LinkError when the interface is gone."""
    errors: list[str] = []
    with _ipr(b.netns) as ipr:
        idx = ifindex(ipr, b.ifname)
        now = programs(b.ifname, b.netns)
        for hook, step in (("XDP", _xdp_back), ("TC", _tc_back)):
            try:
                step(ipr, idx, b, now)
            except NetlinkError as e:
                errors.append(f"{hook}: {e}")
    if _ids(programs(b.ifname, b.netns)) != _ids(b.progs):
        raise AttachError(f"could not put back what ran on {b.where}{': ' + '; '.join(errors) if errors else ''}")


def _xdp_back(ipr, idx: int, b: Before, now: Programs) -> None:
    """Modes that ran nothing are emptied first: the kernel runs native and generic XDP never together."""
    want = {XDP_FLAGS_SKB_MODE: b.progs.xdp_generic, XDP_FLAGS_DRV_MODE: b.progs.xdp_native}
    have = {XDP_FLAGS_SKB_MODE: now.xdp_generic, XDP_FLAGS_DRV_MODE: now.xdp_native}
    for flags in want:
        if have[flags] and not want[flags]:
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", -1), ("IFLA_XDP_FLAGS", flags)]})
    for flags, pid in want.items():
        if pid and have[flags] != pid:
            ipr.link("set", index=idx, xdp={"attrs": [("IFLA_XDP_FD", b.fds[pid]), ("IFLA_XDP_FLAGS", flags)]})


def _tc_back(ipr, idx: int, b: Before, now: Programs) -> None:
    for parent in (TC_INGRESS_PARENT, TC_EGRESS_PARENT):
        want, have = b.progs.tc.get(parent), now.tc.get(parent)
        if want and (have is None or have[0] != want[0]):
            if not _has_clsact(ipr, idx):
                ipr.tc("add", "clsact", idx)
            _replace_filter(ipr, idx, parent, b.fds[want[0]], want[1])
        elif want is None and have is not None:
            _del_ours(ipr, idx, parent)
    if not b.progs.clsact and _empty_clsact(ipr, idx):
        ipr.tc("del", "clsact", idx)            # we added it and it holds nothing


class RolledBack(AttachError):
    """An attach_all that failed and put back what ran before; `restored`: where that worked, `failed`:
    interface -> why not (each still runs what `runs` says)."""

    def __init__(self, where: str, err: BaseException, restored: list[str], failed: dict[str, str]):
        self.where, self.err, self.restored, self.failed = where, err, restored, failed
        text = f"attaching on {where} failed: {str(err) or type(err).__name__}"   # KeyboardInterrupt: no text
        if restored:
            text += f"; {', '.join(restored)} run again exactly what they ran before"
        for w, why in failed.items():
            text += f"; putting back what ran on {w} FAILED ({why}), it now runs {why_runs(w)}"
        super().__init__(text)


def why_runs(where: str) -> str:
    """What an interface (`name` or `name@netns`) runs now, in words, for an operator."""
    name, _, netns = where.partition("@")
    try:
        p = programs(name, netns or None)
    except (LinkError, NetlinkError, OSError) as e:
        return f"nothing we can read ({e})"
    if not (p.xdp_generic or p.xdp_native or p.tc):
        return "no XDP program and no TC filter of ours: it is UNFILTERED"
    tc = ", ".join(f"TC {'ingress' if k == TC_INGRESS_PARENT else 'egress'} prog {i}" for k, (i, _) in p.tc.items())
    return f"XDP prog {p.xdp_generic or p.xdp_native or 'none'}" + (f", {tc}" if tc else "")


def attach_all(dp, interfaces: list, netns: str | None, dos_profiles: dict[str, str | None]) -> list[AttachedInterface]:
    """Attach `dp` (Datapath.attach) on every interface in order, or on none: when one fails (the kernel
    refuses its XDP mode, a driver or TC errs, the link vanished) every interface touched so far, the failing
    one too (maybe half done: XDP replaced, TC refused), gets back what ran there before, newest first, and
    RolledBack says so. Whatever was raised, an interrupt too (a half-done attach must not stay: control._start
    holds the stop signals meanwhile), and whatever one put_back raises, the others are still tried. Cost per
    interface, besides the attach: one capture."""
    before: list[Before] = []
    attached, where = [], ""
    try:
        for i in interfaces:
            where = i.name + (f"@{netns}" if netns else "")
            before.append(capture(i.name, netns))
            mode = dp.attach(i.name, i.xdp_mode, netns)
            attached.append(AttachedInterface(i.name, netns, i.xdp_mode, mode, link_state(i.name, netns).ifindex,
                                              dos_profiles.get(i.name)))
        return attached
    except BaseException as e:      # whatever failed: what ran before is put back, then RolledBack raised
        restored, failed = [], {}
        for b in reversed(before):
            try:
                put_back(b)
                restored.insert(0, b.where)
            except Exception as pe:     # noqa: BLE001 - counted in `failed`, said in the error
                failed[b.where] = str(pe) or type(pe).__name__
        raise RolledBack(where, e, restored, failed) from e
    finally:
        for b in before:
            b.close()
