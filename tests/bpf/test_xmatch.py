"""The datapath's first match through the cross-product table (hw_xmatch) and through the bit-vector scan
when a policy's table would be over the cap (docs/datapath.md "Classification"): both judge like the
reference; the table is what the loaded programs read, per generation, and it flips with a swap."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.bpf.names import POLICY_MAPS
from hostwall.enforcer import xmatch
from hostwall.enforcer.compiler import clear_memo
from hostwall.enforcer.reference import Packet, evaluate

from .packets import frame
from .test_differential import check, packets, policies

pytestmark = pytest.mark.bpf

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])


@SETTINGS
@given(policy_text=policies(), pkts=st.lists(packets(), min_size=1, max_size=20))
def test_table_path_matches_reference(harness, policy_text, pkts):
    policy = harness.install(policy_text)
    assert int(harness.compiled.hdr["xm_stride"][0]) == len(harness.compiled.peer_cls)
    for pkt in pkts:
        check(harness, policy, pkt)


@SETTINGS
@given(policy_text=policies(), pkts=st.lists(packets(), min_size=1, max_size=20))
def test_scan_over_the_cap_matches_reference(harness, monkeypatch, policy_text, pkts):
    """A policy whose class product is over the cap has no table (stride 0): the programs scan."""
    monkeypatch.setattr(L, "XM_CELLS_MAX", 0)
    xmatch.clear_memo()
    policy = harness.install(policy_text)
    assert int(harness.compiled.hdr["xm_stride"][0]) == 0 and harness.compiled.xmatch is None
    for pkt in pkts:
        check(harness, policy, pkt)


def _policy(priority: int = 1) -> str:
    return f"""\
version: 1
name: flip
defaults: {{ingress: deny, egress: allow, stateful: false}}
rules:
  - {{name: first, priority: {priority}, direction: ingress, action: deny, protocol: tcp, ports: [22], peers: [10.1.0.0/16]}}
  - {{name: second, priority: 2, direction: ingress, action: allow, protocol: tcp, ports: [22, 80]}}
"""


def _half(dp, gen: int, n: int) -> np.ndarray:
    per_gen = POLICY_MAPS["hw_xmatch"][1]
    return dp.view("hw_xmatch")[gen * per_gen: gen * per_gen + n]


def test_the_programs_read_the_table(harness):
    """Rewriting the active half's cells of rule `first` to rule `second` changes the verdict: the
    datapath's answer is the table's, not a scan's."""
    clear_memo()
    policy = harness.install(_policy())
    pkt = Packet("ingress", 4, "10.1.0.5", "192.0.2.1", 6, 40000, 22)
    assert evaluate(policy, pkt).rule == "first"
    check(harness, policy, pkt)
    half = _half(harness.dp, harness.dp.active_gen(), len(harness.compiled.xmatch))
    cells = half["rule"]
    cells[cells == 1] = 2                       # order 0 ("first") + 1 -> order 1 ("second") + 1
    got = harness.run("xdp", frame(pkt))
    assert (got.passed, got.rule_slot) == (True, harness.slots["second"])


def test_table_flips_with_the_generation(harness):
    """Each swap writes its table into the standby half and the flip makes it the one read: the verdict
    follows the policy in force, and each half holds the table of the policy installed there."""
    clear_memo()
    pkt = Packet("ingress", 4, "10.1.0.5", "192.0.2.1", 6, 40000, 22)
    seen = {}
    for priority, rule in ((1, "first"), (3, "second"), (1, "first"), (3, "second")):
        policy = harness.install(_policy(priority))
        gen = harness.dp.active_gen()
        assert evaluate(policy, pkt).rule == rule
        check(harness, policy, pkt)
        seen[gen] = harness.compiled.xmatch
        assert np.array_equal(_half(harness.dp, gen, len(seen[gen])), seen[gen])
    assert set(seen) == {0, 1} and not np.array_equal(seen[0], seen[1])     # rule orders swapped


def _table_in_force(harness, table: bool) -> None:
    """The half in force has the stride of its policy and, with a table, exactly the first matches of
    the bitmaps written beside it (a fresh computation, no memo)."""
    cp, gen = harness.compiled, harness.dp.active_gen()
    assert int(harness.dp.view("hw_policy")[gen]["xm_stride"]) == (len(cp.peer_cls) if table else 0)
    if table:
        want = xmatch.first_match_rows(cp.peer_cls["words"], cp.l4_cls["words"]).reshape(-1)
        assert np.array_equal(_half(harness.dp, gen, len(cp.xmatch))["rule"].reshape(-1)[: len(want)], want)


def _variant(ports: str, priority: int = 1) -> str:
    return _policy(priority).replace("ports: [22, 80]", f"ports: [{ports}]")


def test_swaps_between_table_scan_and_patched_tables(harness, monkeypatch):
    """One Datapath object (its same-array shortcuts on) through table, patched-table (a port change
    recomputes only some rows, or reuses the last array), scan and back: after every swap the half in
    force holds exactly the table of its policy's bitmaps (not rows of a policy two swaps back) and
    every packet is judged like the reference."""
    clear_memo()
    steps = [("22, 80", 1, True), ("22, 80, 443", 1, True), ("22", 3, False), ("22, 80, 443", 1, True),
             ("22, 80", 1, True), ("22, 80", 3, True), ("22, 80, 443", 1, False), ("22, 80, 443", 1, True),
             ("22", 1, True), ("22, 80", 1, True)]
    pkts = [Packet("ingress", 4, src, "192.0.2.1", 6, 40000, port)
            for src in ("10.1.0.5", "10.2.0.5") for port in (22, 80, 443, 8080)]
    for ports, priority, table in steps:
        with monkeypatch.context() as m:
            if not table:
                m.setattr(L, "XM_CELLS_MAX", 0)
            policy = harness.install(_variant(ports, priority))
        _table_in_force(harness, table)
        for pkt in pkts:
            check(harness, policy, pkt)


def _rotated(shift: int, n: int = 70) -> str:
    """n any-peer rules on one port each, the port of rule i being 1000 + (i + shift) % n, after a peer
    rule: a shift changes more rules than a patched compile takes (LastCompile.MAX_CHANGED), so the L4
    axis is classified afresh (same class count, other rule sets per class id) while the peer axis is
    the memoised object: the table's rows are all stale."""
    rules = ["  - {name: peer, priority: 0, direction: ingress, action: deny, peers: [10.1.0.0/16], ports: [1003]}"]
    rules += [f"  - {{name: p{i}, priority: 1, direction: ingress, action: {('allow', 'log')[i % 2]}, protocol: tcp, "
              f"ports: [{1000 + (i + shift) % n}]}}" for i in range(n)]
    return "version: 1\nname: rot\ndefaults: {ingress: deny, egress: allow, stateful: false}\nrules:\n" + \
        "\n".join(rules) + "\n"


def test_reclassified_l4_axis_under_the_same_peer_axis(harness, monkeypatch):
    clear_memo()
    pkts = [Packet("ingress", 4, src, "192.0.2.1", 6, 40000, port)
            for src in ("10.1.0.5", "10.2.0.5") for port in (1000, 1003, 1005, 1069, 1070)]
    for shift, table in ((0, True), (1, True), (0, True), (5, False), (1, True), (5, True)):
        with monkeypatch.context() as m:
            if not table:
                m.setattr(L, "XM_CELLS_MAX", 0)
            policy = harness.install(_rotated(shift))
        _table_in_force(harness, table)
        for pkt in pkts:
            check(harness, policy, pkt)
