"""xdp-filter from xdp-tools, the peer of the datapath and lab benchmarks (bench/xdpfilter.py): loaded by its
own CLI on a veth in a namespace the test makes, it drops a listed source (CLI-added and bulk-added
entries alike) and a listed port, and passes anything else, through BPF_PROG_TEST_RUN; its own counters
say which entry decided. Afterwards nothing is left: no program on the interface, no namespace, no pin on
the host's bpffs."""
from __future__ import annotations

import os
import subprocess

import pytest

from hostwall.bench import xdpfilter as XF
from hostwall.bench.datapath import TCP_ACK, tcp_frame
from hostwall.bpf import bpfsys
from hostwall.bpf.links import link_state
from hostwall.enforcer.reference import Packet

_OK, _WHY = XF.available()
pytestmark = pytest.mark.skipif(not _OK, reason=f"xdp-filter baseline unavailable: {_WHY}")

LIST = ["203.0.113.0/24", "198.51.100.7/32", "192.0.2.128/25", "2001:db8:5::/48", "2001:db8:6::9/128"]
DENY = {4: "203.0.113.9", 6: "2001:db8:5::77"}          # inside the list; added by the CLI
BULK = {4: "198.51.100.7", 6: "2001:db8:6::9"}          # host routes of the list; written in bulk
OTHER = {4: "198.18.7.10", 6: "2001:2:0:7::10"}          # in no entry
LOCAL = {4: "192.0.2.1", 6: "2001:db8::1"}
DENIED_PORT = 50003


def _frame(fam: int, src: str, dport: int = 443) -> bytes:
    return tcp_frame(Packet("ingress", fam, src, LOCAL[fam], 6, 40000, dport), TCP_ACK)


def _netns() -> set[str]:
    return {line.split()[0] for line in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                      text=True).stdout.splitlines() if line.strip()}


def test_xdp_filter_loads_drops_listed_passes_others_and_cleans_up():
    host_pin = "/sys/fs/bpf/xdp-filter"                          # where the CLI pins on the host's bpffs
    pinned_before = os.path.exists(host_pin)
    with XF.scratch_netns() as (ns, ifname):
        with XF.XdpFilter(ns, ifname, deny_ports=[DENIED_PORT], deny_src=[DENY[4], DENY[6]]) as xf:
            assert link_state(ifname, ns).xdp_prog_id != 0
            for fam in (4, 6):
                entries = XF.host_entries([p for p in LIST if (":" in p) == (fam == 6)], xf.capacity(fam),
                                          first=[DENY[fam]])
                assert BULK[fam] in entries and OTHER[fam] not in entries
                assert xf.add_src(entries) == len(entries)
            for fam in (4, 6):
                for src, port, want, counter in (
                        (DENY[fam], 443, XF.XDP_DROP, lambda a=DENY[fam]: xf.hits(a)),
                        (BULK[fam], 443, XF.XDP_DROP, lambda a=BULK[fam]: xf.hits(a)),
                        (OTHER[fam], DENIED_PORT, XF.XDP_DROP, lambda: xf.port_hits(DENIED_PORT)),
                        (OTHER[fam], 443, XF.XDP_PASS, lambda: xf.action_packets(XF.XDP_PASS))):
                    before = counter()
                    got = bpfsys.prog_test_run(xf.prog_fd, _frame(fam, src, port)).retval
                    assert got == want, f"v{fam} {src}:{port}: returned {got}, expected {want}"
                    assert counter() == before + 1, f"v{fam} {src}:{port}: its deciding counter did not move"
            assert xf.hits(OTHER[4]) == 0
        assert link_state(ifname, ns).xdp_prog_id == 0            # close() detached it
    assert ns not in _netns()
    assert os.path.exists(host_pin) == pinned_before               # its pins lived in a private bpffs only


def test_xdp_filter_failed_load_leaves_nothing():
    with XF.scratch_netns() as (ns, _):
        with pytest.raises(RuntimeError, match="xdp-filter load"):
            XF.XdpFilter(ns, "nosuch0")
    assert ns not in _netns()
