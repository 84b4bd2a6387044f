"""Judge packets with the real BPF programs through BPF_PROG_TEST_RUN: the datapath half of
`hostwall-enforcer test` (docs/policy.md "Tooling"). No interface is touched: the programs are loaded
(BCC) into a private, unpinned instance, the policy is installed into it, and every packet runs on the
hooks that could see it: XDP and TC ingress for ingress packets (the enforcer attaches only XDP there,
docs/datapath.md "Hooks"; tc_ingress judges them too, as a second check), TC egress for egress. What the datapath decided is read from its one counted exit (the
hw_stats counter that moved: hook, verdict, reason) and the rule counter that moved (docs/datapath.md
"Counters"; essential ICMP moves its pseudo-rule's counter, as in a running instance). A case with a
`state` first runs its opener on the opener's hook; tracked connections are forgotten after every
packet, so cases never see each other. fqdns rules: a names → addresses snapshot (`learnt`) is learnt
into the instance's maps and fills the dynamic sets by the swap's own code (fqdnsets.fill_sets), so the
kernel judges against the same addresses as the reference model; without one the sets stay empty.

Cost: loading ≈ 1-3 s (BCC compile, verifier, clock calibration); then ~0.1-0.3 ms a packet and hook
(test-run syscall, two counter reads, a scan of the conntrack tables' slot states). Needs root.
"""
from __future__ import annotations

import numpy as np

from hostwall.bpf import bpfsys, conntrack
from hostwall.bpf import layout as L
from hostwall.bpf.fqdn import FqdnMaps, now_ns

from .analysis.ctmodel import Outcome
from .analysis.frames import frame
from .analysis.packet import CasePacket
from .compiler import compile_policy, fqdn_lists
from .datapath import Datapath
from .fqdnsets import fill_sets
from .policy import Policy
from .reference import Learnt

__all__ = ["TestRun", "HOOKS"]

HOOKS = {"ingress": ("xdp_ingress", "tc_ingress"), "egress": ("tc_egress",)}
_PASS = {"xdp_ingress": 2, "tc_ingress": 0, "tc_egress": 0}        # XDP_PASS, TC_ACT_OK
_DAY_NS = 86_400 * 10**9
_HOOK_IDX = {"xdp_ingress": L.C["HW_HOOK_XDP_INGRESS"], "tc_ingress": L.C["HW_HOOK_TC_INGRESS"],
             "tc_egress": L.C["HW_HOOK_TC_EGRESS"]}


class DatapathError(RuntimeError):
    """The datapath did not leave through exactly one counted exit (a bug in hostwall)."""


class TestRun:
    """A private datapath instance with one policy installed. Use as a context manager."""
    __test__ = False                     # not a pytest test class, despite its name

    def __init__(self, policy: Policy, dp: Datapath | None = None, learnt: Learnt | None = None):
        self.own = dp is None
        self.dp = dp or Datapath.load()
        self.names = policy.counter_names()          # the rules, then essential_icmp when it is on
        self.sets = {lst: i + 1 for i, lst in enumerate(fqdn_lists(policy))}
        self.dp.install(compile_policy(policy, {n: i for i, n in enumerate(self.names)}, 1, fqdn_sets=self.sets))
        self.tables = conntrack.tables(self.dp.map_fds)
        self.learnt = {n: tuple(ips) for n, ips in (learnt or {}).items()}
        try:
            self._fill()
            self._forget()
        except BaseException:            # no close() follows a failed constructor: a shared instance
            self.close()                 # keeps no half-learnt snapshot, an own one is not leaked
            raise

    def _fill(self) -> None:
        """Learn the snapshot's names as the DNS proxy does (hw_dns_names, hw_dns_name_ips), then fill
        the policy's dynamic sets from them as a policy swap does (fqdnsets.fill_sets: every set whose
        patterns match a name gets its addresses), valid for a day of the datapath's clock. The sets
        start empty. A full map raises: a snapshot the kernel cannot hold is not judged."""
        if not self.sets:
            return
        fm = FqdnMaps(self.dp.map_fds)
        now = int(self.dp.config()["test_now_ns"]) or now_ns()     # the datapath's clock (bpf/env.h)
        try:
            fm.delete_sets(set(self.sets.values()))  # a shared instance may hold an earlier user's entries
            for name, ips in self.learnt.items():
                ok = fm.name_put(name, now) and all(fm.name_ip_put(name, ip, now + _DAY_NS, now) for ip in ips)
                if not ok:
                    raise DatapathError(f"the fqdn snapshot does not fit the learnt-name maps (at {name!r})")
            got = fill_sets(fm, {sid: lst for lst, sid in self.sets.items()}, now)
            if got["full"]:
                raise DatapathError(f"the fqdn snapshot does not fit the dynamic set ({got['full']} refused)")
        finally:
            fm.close()

    def _unfill(self) -> None:
        """Remove what _fill entered (a shared instance serves the next policy clean)."""
        if not self.learnt:
            return
        fm = FqdnMaps(self.dp.map_fds)
        try:
            fm.delete_sets(set(self.sets.values()))
            for name, ips in self.learnt.items():
                for ip in ips:
                    fm.name_ip_delete(name, ip)
            fm.sweep(now_ns())                   # drops the names left without addresses
        finally:
            fm.close()

    def close(self) -> None:
        for t in self.tables:
            t.close()
        self.tables = []
        if self.own:
            self.dp.close()
        else:
            self._unfill()

    def __enter__(self) -> TestRun:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _forget(self) -> None:
        """Free every live conntrack slot (one vectorised scan of the slot states per family)."""
        for t in self.tables:
            idx = t.live()
            if len(idx):
                t.slots[idx] = np.zeros(1, dtype=t.slots.dtype)

    def run(self, hook: str, pkt: CasePacket) -> Outcome:
        """Run one packet through one program; the outcome its counted exit recorded."""
        n = max(len(self.names), 1)
        before = self.dp.stats()["packets"]
        rules_before = self.dp.rule_stats(n)["packets"]
        res = bpfsys.prog_test_run(self.dp.prog_fds[hook], frame(pkt))
        moved = np.flatnonzero(self.dp.stats()["packets"] - before)
        if len(moved) != 1:
            raise DatapathError(f"{hook} `{pkt.text()}`: {len(moved)} counted exits moved, expected exactly one")
        h, rest = divmod(int(moved[0]), L.VERDICTS * L.REASONS)
        v, r = divmod(rest, L.REASONS)
        if h != _HOOK_IDX[hook]:
            raise DatapathError(f"{hook} `{pkt.text()}`: counted on hook {L.HOOK_NAMES.get(h, h)}")
        verdict = L.VERDICT_NAMES[v]
        if (res.retval == _PASS[hook]) != (verdict != "drop"):
            raise DatapathError(f"{hook} `{pkt.text()}`: returned {res.retval} but counted {verdict}")
        rmoved = np.flatnonzero(self.dp.rule_stats(n)["packets"] - rules_before)
        rule = self.names[int(rmoved[0])] if len(rmoved) == 1 else None
        if len(rmoved) > 1:
            raise DatapathError(f"{hook} `{pkt.text()}`: {len(rmoved)} rule counters moved")
        return Outcome(verdict, L.REASON_NAMES[r], rule)

    def judge(self, packets: list[CasePacket]) -> list[dict[str, Outcome]]:
        """Per packet, the outcome on every hook that sees it (after its opener, if it has a state)."""
        out = []
        for p in packets:
            op = p.opener()
            got = {}
            for hook in HOOKS[p.direction]:
                if op is not None:
                    self.run(HOOKS[op[0].direction][0], op[0])
                got[hook] = self.run(hook, p)
                self._forget()
            out.append(got)
        return out
