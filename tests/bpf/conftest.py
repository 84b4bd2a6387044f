"""Fixtures for tests that run the real programs through BPF_PROG_TEST_RUN."""
from __future__ import annotations

import ctypes
import os
import struct
from dataclasses import dataclass

import numpy as np
import pytest

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L
from hostwall.enforcer.compiler import compile_policy
from hostwall.enforcer.datapath import Datapath
from hostwall.enforcer.policy import Policy, parse_policy

XDP_DROP, XDP_PASS, XDP_TX = 1, 2, 3
TC_ACT_OK, TC_ACT_SHOT = 0, 2
HOOKS = {"xdp": L.C["HW_HOOK_XDP_INGRESS"], "tc_ingress": L.C["HW_HOOK_TC_INGRESS"],
         "tc_egress": L.C["HW_HOOK_TC_EGRESS"]}
PROGS = {"xdp": "xdp_ingress", "tc_ingress": "tc_ingress", "tc_egress": "tc_egress"}


@dataclass(frozen=True)
class Outcome:
    passed: bool          # what the program returned: pass or drop
    verdict: str          # allow | drop | would_drop, from the counter that moved
    reason: str           # hw_reason name from the counter that moved
    rule_slot: int | None # rule counter slot that moved, if any
    sent_back: bytes | None = None  # XDP_TX: the frame the program sent back out (the SYN proxy's SYN-ACK)


class Harness:
    """Runs one packet through one program and reports the single counted exit it took."""

    def __init__(self, dp: Datapath):
        self.dp = dp
        self.slots: dict[str, int] = {}

    def install(self, policy: Policy | str, dos_interfaces: dict[int, str] | None = None) -> Policy:
        if isinstance(policy, str):
            policy = parse_policy(policy)
        self.slots = {n: i for i, n in enumerate(policy.counter_names())}     # rules, then essential_icmp
        self.compiled = compile_policy(policy, self.slots, 1, dos_interfaces)
        self.dp.install(self.compiled)
        self.dp.clear_conntrack()
        return policy

    def run(self, hook: str, frame: bytes, ifindex: int = 0, ctx: bytes | None = None) -> Outcome:
        """ifindex (XDP only): the interface the packet arrives on (must exist: 1 = lo); ctx: the
        program's context as test-run takes it (a TC hook's struct __sk_buff: skb_ctx)."""
        before = self.dp.stats()
        rules_before = self.dp.rule_stats()["packets"][: max(len(self.slots), 1)].copy()
        if ifindex:
            ctx = struct.pack("<6I", 0, len(frame), 0, ifindex, 0, 0)   # struct xdp_md
        res = bpfsys.prog_test_run(self.dp.prog_fds[PROGS[hook]], frame, ctx=ctx)
        moved = np.nonzero(self.dp.stats()["packets"] - before["packets"])[0]
        assert len(moved) == 1, f"expected exactly one counted exit, got {moved.tolist()}"
        idx = int(moved[0])
        h, rest = divmod(idx, L.VERDICTS * L.REASONS)
        v, r = divmod(rest, L.REASONS)
        assert h == HOOKS[hook], f"counted on hook {h}, ran {hook}"
        rmoved = np.nonzero(self.dp.rule_stats()["packets"][: max(len(self.slots), 1)] - rules_before)[0]
        passed = res.retval == (XDP_PASS if hook == "xdp" else TC_ACT_OK)
        tx = hook == "xdp" and res.retval == XDP_TX
        if not passed and not tx:
            assert res.retval == (XDP_DROP if hook == "xdp" else TC_ACT_SHOT), f"unexpected retval {res.retval}"
        return Outcome(passed, L.VERDICT_NAMES[v], L.REASON_NAMES[r], int(rmoved[0]) if len(rmoved) else None,
                       res.data_out if tx else None)


@pytest.fixture(scope="session")
def datapath():
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)")
    dp = Datapath.load()
    yield dp
    dp.close()


@pytest.fixture
def harness(datapath):
    h = Harness(datapath)
    yield h
    datapath.clear_conntrack()
    datapath.set_config(test_now_ns=0)          # a test that injected time must not leak it
    # nor the event budget's buckets, which last saw that (future) time and would not refill until then
    bpfsys.map_update(datapath.map_fds["hw_ev_budget"], b"\0" * 4,
                      bytes(L.DTYPES["hw_ev_budget"].itemsize * datapath.ncpus))


class Events:
    """Reads the datapath's ring buffer through BCC (the collector has its own consumer)."""

    def __init__(self, dp):
        self.got: list[np.void] = []
        dt = L.DTYPES["hw_event"]

        def cb(_ctx, data, size):
            assert size == dt.itemsize
            self.got.append(np.frombuffer(ctypes.string_at(data, size), dtype=dt)[0].copy())

        self.bpf = dp._bpf
        self.bpf[b"hw_events"].open_ring_buffer(cb)
        self.drain()
        self.got.clear()

    def drain(self) -> list[np.void]:
        self.bpf.ring_buffer_consume()
        out, self.got = self.got, []
        return out


@pytest.fixture
def events(harness):
    ev = getattr(harness.dp, "_test_events", None)      # BCC opens a ring buffer once per map
    if ev is None:
        ev = harness.dp._test_events = Events(harness.dp)
    ev.drain()
    yield ev
    harness.dp.set_config(test_now_ns=0)
