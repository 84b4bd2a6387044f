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
