"""enforcer/xmatch.py: the cross-product first-match table against a brute-force first match (the lowest
set bit of the AND of the two class bitmaps, what bpf/classify.h first_match computes), its incremental
recompute against a fresh one, and the cap (docs/datapath.md "Classification")."""
from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.enforcer import xmatch
from hostwall.enforcer.compiler import clear_memo, compile_policy
from hostwall.enforcer.policy import parse_policy


def _classes(sets: list[set[int]]) -> np.ndarray:
    recs = np.zeros(len(sets), dtype=L.DTYPES["hw_class"])
    for i, s in enumerate(sets):
        for r in s:
            recs["words"][i, r // 64] |= np.uint64(1) << np.uint64(r % 64)
        recs["summary"][i] = sum(1 << w for w in range(L.WORDS) if recs["words"][i, w])
    return recs


def brute(peer: np.ndarray, l4: np.ndarray) -> np.ndarray:
    """(L4 class, peer class) -> lowest common rule + 1, 0 for none, one pair at a time."""
    out = np.zeros((len(l4), len(peer)), np.uint16)
    for li, lrec in enumerate(l4):
        for pi, prec in enumerate(peer):
            for w in range(L.WORDS):
                v = int(prec["words"][w]) & int(lrec["words"][w])
                if v:
                    out[li, pi] = w * 64 + (v & -v).bit_length()
                    break
    return out


@st.composite
def class_sets(draw):
    """Peer and L4 class rule sets over up to 300 rules (five words), with rules in every peer class
    (any-peer rules: the row-wide path) and rules in some (the painted path)."""
    n = draw(st.integers(1, 300))
    rules = st.integers(0, n - 1)
    everywhere = draw(st.sets(rules, max_size=6))
    peer = [draw(st.sets(rules, max_size=12)) | everywhere for _ in range(draw(st.integers(1, 12)))]
    l4 = [draw(st.sets(rules, max_size=40)) for _ in range(draw(st.integers(1, 12)))]
    return _classes(peer), _classes(l4)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(class_sets())
def test_first_match_rows_is_the_lowest_common_rule(case):
    peer, l4 = case
    assert np.array_equal(xmatch.first_match_rows(peer["words"], l4["words"]), brute(peer, l4))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(class_sets(), st.data())
def test_incremental_table_equals_a_fresh_one(case, data):
    """Same peer axis object, L4 classes changed in place and appended (what a re-apply of changed ports
    does): only those rows are recomputed, and the table equals one computed from nothing."""
    peer, l4 = case
    xmatch.clear_memo()
    first, stride = xmatch.table(peer, l4)
    assert stride == len(peer) and first is not None
    again, _ = xmatch.table(peer, l4.copy())
    assert again is first                                  # unchanged: the same read-only records
    changed = l4.copy()
    for i in data.draw(st.sets(st.integers(0, len(l4) - 1), max_size=3)):
        changed[i] = l4[data.draw(st.integers(0, len(l4) - 1))]
    changed = np.concatenate([changed, l4[: data.draw(st.integers(0, 3))]])
    inc, _ = xmatch.table(peer, changed)
    xmatch.clear_memo()
    fresh, _ = xmatch.table(peer, changed)
    assert np.array_equal(inc, fresh)
    cells = fresh["rule"].reshape(-1)[: len(changed) * len(peer)].reshape(len(changed), len(peer))
    assert np.array_equal(cells, brute(peer, changed))


def test_over_the_cap_there_is_no_table(monkeypatch):
    peer, l4 = _classes([{0}, {1}, set()]), _classes([{0, 1}, {1}])
    monkeypatch.setattr(L, "XM_CELLS_MAX", 5)
    xmatch.clear_memo()
    assert xmatch.table(peer, l4) == (None, 0)
    monkeypatch.setattr(L, "XM_CELLS_MAX", 6)
    assert xmatch.table(peer, l4)[1] == 3


POLICY = """\
version: 1
name: xm
defaults: {ingress: deny, egress: allow}
rules:
  - {name: a, priority: 1, direction: ingress, action: deny, protocol: tcp, peers: [10.1.0.0/16], ports: [22]}
  - {name: b, priority: 2, direction: ingress, action: allow, protocol: tcp, ports: [22, 80]}
  - {name: c, priority: 3, direction: ingress, action: log, peers: [10.0.0.0/8, "fd00::/8"]}
  - {name: d, priority: 4, direction: egress, action: allow, protocol: udp, peers: ["fd00:1::/32"]}
"""


def test_compiled_table_is_the_first_match_of_every_class_pair():
    clear_memo()
    cp = compile_policy(parse_policy(POLICY), {n: i for i, n in enumerate("abcd")}, 1)
    stride = int(cp.hdr["xm_stride"][0])
    assert stride == len(cp.peer_cls) and cp.describe()["xmatch_cells"] == stride * len(cp.l4_cls)
    cells = cp.xmatch["rule"].reshape(-1)[: stride * len(cp.l4_cls)].reshape(len(cp.l4_cls), stride)
    assert np.array_equal(cells, brute(cp.peer_cls, cp.l4_cls))
    assert not cp.xmatch.flags.writeable


def _overlapping(nbroad: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """n peer classes x n L4 classes; rules 0..nbroad-1 in every L4 class and every peer class but the
    first (e.g. `peers: [10.0.0.0/8]`, any port, repeated), then one any-peer rule per L4 class. Each
    broad rule's cells are (n - 1) x n: painting them all is nbroad x cells of writes."""
    broad = set(range(nbroad))
    peer = _classes([set()] + [broad] * (n - 1))
    l4 = _classes([broad | {nbroad + i} for i in range(n)])
    full = np.zeros(L.WORDS, np.uint64)                    # the any-peer rules are in every peer class
    for i in range(n):
        full[(nbroad + i) // 64] |= np.uint64(1) << np.uint64((nbroad + i) % 64)
    peer["words"] |= full
    return peer, l4


def test_painting_is_bounded_else_the_scan(monkeypatch):
    """A policy whose painting would write more than XM_PAINT_MAX cells (overlapping rules over many
    classes: ~27 s for 2000 such rules over 2048 x 2048 classes) has no table: the datapath scans, and
    the compile stays bounded. Within the budget the table is built and exact."""
    monkeypatch.setattr(xmatch, "XM_PAINT_MAX", 200 * 200 * 40, raising=False)
    xmatch.clear_memo()
    peer, l4 = _overlapping(60, 200)                      # 60 x 199 x 200 cells to paint: over
    assert xmatch.table(peer, l4) == (None, 0)
    peer, l4 = _overlapping(20, 200)                      # 20 x 199 x 200: within
    got, stride = xmatch.table(peer, l4)
    assert stride == 200
    cells = got["rule"].reshape(-1)[: 200 * 200].reshape(200, 200)
    assert np.array_equal(cells, brute(peer, l4))


def test_status_reports_the_table_cells(monkeypatch):
    """Map pressure (`status`, metrics) has a row for the table: its cells of XM_CELLS_MAX, 0 when the
    datapath scans."""
    from hostwall.bpf.instance import policy_pressure
    clear_memo()
    cp = compile_policy(parse_policy(POLICY), {n: i for i, n in enumerate("abcd")}, 1)
    row = policy_pressure(cp.describe())["policy.xmatch_cells"]
    assert (row["entries"], row["capacity"]) == (len(cp.peer_cls) * len(cp.l4_cls), L.XM_CELLS_MAX)
    monkeypatch.setattr(L, "XM_CELLS_MAX", 1)
    clear_memo()
    cp = compile_policy(parse_policy(POLICY), {n: i for i, n in enumerate("abcd")}, 1)
    assert policy_pressure(cp.describe())["policy.xmatch_cells"]["entries"] == 0
