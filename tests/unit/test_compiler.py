"""compiler.classify(): the sparse signature algorithm against an obviously-correct model.

The model: the class of a point is the set of rules with a range covering it (plus the any-rules).
classify() must cut the axis exactly where that set changes (equal adjacent intervals merged), give
every interval a class whose bitmap is that set, and give different sets different classes."""
from __future__ import annotations

import bisect
import random

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.enforcer.compiler import classify, compile_policy
from hostwall.enforcer.policy import parse_policy

V6_END = 1 << 128


def model_set(ranges, any_rules, x: int) -> frozenset[int]:
    return frozenset({r for r, s, e in ranges if s <= x < e} | set(any_rules))


def decode(rec, n_rules: int) -> frozenset[int]:
    words = [int(w) for w in rec["words"]]
    assert not any(words[(n_rules + 63) // 64:]), "bits beyond the rule count"
    summary = sum(1 << w for w, v in enumerate(words) if v)
    assert int(rec["summary"]) == summary, "summary word does not match the non-empty words"
    return frozenset(w * 64 + b for w, v in enumerate(words) for b in range(64) if v >> b & 1)


def check(n_rules: int, ranges, any_rules, axis_end: int):
    """Run classify and compare it with the model at every bound and next to it (so every
    elementary interval of the model is probed at both of its ends)."""
    own = [r for r, _, _ in ranges]
    start = [s for _, s, _ in ranges]
    end = [e for _, _, e in ranges]
    if axis_end <= 2**40:
        c = classify(n_rules, np.array(own, np.int64), np.array(start, np.uint64), np.array(end, np.uint64),
                     list(any_rules), axis_end)
    else:
        c = classify(n_rules, own, start, end, list(any_rules), axis_end)
    starts = [int(s) for s in c.starts]
    cls = [int(x) for x in c.cls]
    assert c.bitmaps.dtype == L.DTYPES["hw_class"]
    assert starts[0] == 0 and all(a < b for a, b in zip(starts, starts[1:])) and starts[-1] < axis_end
    assert len(cls) == len(starts)
    sets = [decode(rec, n_rules) for rec in c.bitmaps]
    assert len(set(sets)) == len(sets), "two classes with the same rule set"
    assert set(cls) == set(range(len(sets))), "class ids are not 0..n-1, all used"
    # equal adjacent intervals are merged
    assert all(a != b for a, b in zip(cls, cls[1:]))
    probes = {0, axis_end - 1}
    for b in start + end + starts:
        probes.update(x for x in (b - 1, b, b + 1) if 0 <= x < axis_end)
    for x in sorted(probes):
        i = bisect.bisect_right(starts, x) - 1
        assert sets[cls[i]] == model_set(ranges, any_rules, x), f"point {x}: interval {i} starting {starts[i]}"
    return c


@st.composite
def small_case(draw, axis_end: int = 200, max_rules: int = 140):
    n_rules = draw(st.integers(1, max_rules))
    rule = st.integers(0, n_rules - 1)
    ranges = []
    for _ in range(draw(st.integers(0, 40))):
        r = draw(rule)
        s = draw(st.integers(0, axis_end - 1))
        e = draw(st.integers(s + 1, axis_end))
        ranges.append((r, s, e))
        if draw(st.integers(0, 3)) == 0:                      # the same rule again, nested or touching
            s2 = draw(st.integers(s, e - 1))
            e2 = draw(st.sampled_from([e, min(axis_end, e + draw(st.integers(0, 20))), s2 + 1]))
            ranges.append((r, s2, max(e2, s2 + 1)))
    any_rules = draw(st.lists(rule, max_size=4, unique=True))
    return n_rules, ranges, any_rules


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_case())
def test_small_axis_matches_model(case):
    n_rules, ranges, any_rules = case
    check(n_rules, ranges, any_rules, 200)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(small_case(axis_end=2**16, max_rules=300))
def test_wide_rule_sets_and_many_words(case):
    n_rules, ranges, any_rules = case
    check(n_rules, ranges, any_rules, 2**16)


@st.composite
def prefixes(draw, bits: int, n_rules: int):
    """Nested and overlapping prefixes of a `bits`-wide axis, drawn around a few shared networks."""
    bases = draw(st.lists(st.integers(0, 2**bits - 1), min_size=1, max_size=4))
    out = []
    for _ in range(draw(st.integers(0, 30))):
        ln = draw(st.integers(0, bits))
        base = draw(st.sampled_from(bases)) ^ draw(st.integers(0, 2**min(bits, 12) - 1))
        net = base & ~((1 << (bits - ln)) - 1) & (2**bits - 1)
        out.append((draw(st.integers(0, n_rules - 1)), net, net + (1 << (bits - ln))))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 70).flatmap(lambda n: st.tuples(st.just(n), prefixes(128, n),
                                                      st.lists(st.integers(0, n - 1), max_size=3, unique=True))))
def test_ipv6_ranks_match_model(case):
    """Python ints beyond 64 bits (ranked first), ends up to 2**128 (a /0 ends at the axis end)."""
    n_rules, ranges, any_rules = case
    check(n_rules, ranges, any_rules, V6_END)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(1, 70).flatmap(lambda n: st.tuples(st.just(n), prefixes(32, n),
                                                      st.lists(st.integers(0, n - 1), max_size=3, unique=True))))
def test_ipv4_prefixes_match_model(case):
    n_rules, ranges, any_rules = case
    check(n_rules, ranges, any_rules, 1 << 32)


def test_equal_adjacent_intervals_are_merged():
    # rule 0 as two touching ranges plus a nested one: one interval [0, 20); the two empty stretches
    # share one class; rules 1 and 2 cover the same range, so one class holds both
    ranges = [(0, 0, 10), (0, 10, 20), (0, 2, 8), (1, 30, 40), (2, 30, 40)]
    c = check(3, ranges, [], 50)
    assert [int(s) for s in c.starts] == [0, 20, 30, 40]
    assert c.cls[1] == c.cls[3] and len(c.bitmaps) == 3
    # an any-rule everywhere and a rule covering the whole axis: one interval, one class
    c = check(2, [(0, 0, 50)], [1], 50)
    assert [int(s) for s in c.starts] == [0] and list(c.cls) == [0]
    # no ranges at all
    c = check(5, [], [3], 50)
    assert [int(s) for s in c.starts] == [0] and decode(c.bitmaps[0], 5) == {3}


def test_ipv6_whole_axis_and_top_of_axis():
    top = V6_END - (1 << 64)
    c = check(3, [(0, 0, V6_END), (1, top, V6_END), (2, 1 << 127, (1 << 127) + 1)], [], V6_END)
    assert c.starts == [0, 1 << 127, (1 << 127) + 1, top]
    assert all(isinstance(s, int) for s in c.starts)


def test_result_does_not_depend_on_range_order():
    rnd = random.Random(5)
    ranges = []
    for _ in range(400):
        s = rnd.randrange(0, 10_000)
        ranges.append((rnd.randrange(100), s, s + rnd.randrange(1, 2_000)))
    a = check(100, ranges, [7], 1 << 20)
    rnd.shuffle(ranges)
    b = check(100, ranges, [7], 1 << 20)
    assert np.array_equal(a.starts, b.starts) and np.array_equal(a.cls, b.cls)
    assert np.array_equal(a.bitmaps, b.bitmaps)


def test_many_prefixes_one_rule_and_a_dense_cluster():
    """The max-policy shape in small: one rule with many host routes inside another rule's /16."""
    rnd = random.Random(9)
    base = 198 << 24 | 18 << 16
    ranges = [(0, base + h, base + h + 1) for h in rnd.sample(range(1 << 16), 3000)]
    ranges += [(1, base, base + (1 << 16)), (2, base + 256, base + 512)]
    ranges += [(rnd.randrange(3, 200), a, a + 256) for a in (base + 256 * k for k in rnd.sample(range(256), 100))]
    c = check(200, ranges, [150, 199], 1 << 32)
    assert len(c.bitmaps) < 400


def test_compiled_policy_classes_match_peer_sets():
    """Through compile_policy: each v4/v6 interval's class bitmap is the set of rules whose peers
    contain the interval's first address."""
    import ipaddress
    rnd = random.Random(3)
    v4 = ["10.0.0.0/8", "10.1.0.0/16", "10.1.2.0/24", "10.1.2.3/32", "0.0.0.0/0", "192.168.0.0/16"]
    v6 = ["fd00::/16", "fd00:1::/32", "::/0", "fd00:1:2::3/128", "ffff::/16"]
    rules = []
    for i in range(150):
        peers = rnd.sample(v4 + v6, rnd.randrange(0, 4))
        r = f"  - {{name: r{i}, priority: {rnd.randrange(5)}, direction: ingress, action: allow"
        rules.append(r + (f", peers: {peers}" if peers else "") + "}")
    pol = parse_policy("version: 1\nname: t\nrules:\n" + "\n".join(rules) + "\n")
    cp = compile_policy(pol, {r.name: i for i, r in enumerate(pol.rules)}, 1)
    for iv, fam in ((cp.iv4, 4), (cp.iv6, 6)):
        for rec in iv:
            addr = int(rec["start"]) if fam == 4 else int(rec["hi"]) << 64 | int(rec["lo"])
            ip = ipaddress.ip_address(addr) if fam == 4 else ipaddress.IPv6Address(addr)
            want = frozenset(k for k, r in enumerate(pol.rules) if r.peers.contains(ip))
            assert decode(cp.peer_cls[rec["cls"]], len(pol.rules)) == want, f"{ip}"


@pytest.mark.parametrize("seed", [1, 2])
def test_signature_keys_are_fixed(seed):
    """Same input, same output (the keys come from a fixed seed; numbering by first occurrence)."""
    rnd = random.Random(seed)
    ranges = [(rnd.randrange(64), s, s + rnd.randrange(1, 50)) for s in (rnd.randrange(1000) for _ in range(200))]
    a, b = check(64, ranges, [], 2000), check(64, ranges, [], 2000)
    assert np.array_equal(a.cls, b.cls) and np.array_equal(a.bitmaps, b.bitmaps)


def _top_table_by_search(top16: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """The DIR-16 table as it was built before bincount: two searchsorted calls of every bucket."""
    k = np.arange(L.TOP_SIZE)
    lt, le = np.searchsorted(top16, k, side="left"), np.searchsorted(top16, k, side="right")
    at = np.zeros(L.TOP_SIZE, dtype=bool)
    hit = lt < len(top16)
    at[hit] = exact[lt[hit]] & (top16[lt[hit]] == k[hit])
    top = np.zeros(L.TOP_SIZE, dtype=L.DTYPES["hw_top"])
    top["first"], top["last"] = lt - 1 + at, le - 1
    return top


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=300), st.booleans())
def test_top_tables_are_the_searched_ones(starts, v6):
    """peertables.v4_tables / v6_tables (bincount, bytes split) give the tables of the searchsorted and
    per-word way, on starts at bucket bounds, in one bucket, at the top of the axis (a dense bucket's
    first points into the sub-table instead: tests/unit/test_peertables.py)."""
    from hostwall.enforcer import peertables as PT
    from hostwall.enforcer.classify import Classes
    pts = sorted({0, 65536, 2**32 - 65536, 2**32 - 1, *starts})
    if v6:
        pts = sorted({p << 96 | (p & 1) for p in pts} | {2**128 - 1})
        top, _, iv = PT.v6_tables(Classes(pts, np.arange(len(pts), dtype=np.uint32), np.zeros(0)), 3)
        assert iv["hi"].tolist() == [p >> 64 for p in pts] and iv["lo"].tolist() == [p & (2**64 - 1) for p in pts]
        hi = iv["hi"]
        want = _top_table_by_search((hi >> np.uint64(48)).astype(np.int64),
                                    ((hi & np.uint64(2**48 - 1)) == 0) & (iv["lo"] == 0))
    else:
        top, _, iv = PT.v4_tables(Classes(np.asarray(pts, np.uint64), np.arange(len(pts), dtype=np.uint32),
                                          np.zeros(0)), 3)
        s = np.asarray(pts, np.uint64)
        want = _top_table_by_search((s >> np.uint64(16)).astype(np.int64), (s & np.uint64(0xFFFF)) == 0)
    plain = (top["first"] & L.C["HW_SUB_FLAG"]) == 0
    assert np.array_equal(top["last"], want["last"]) and np.array_equal(top["first"][plain], want["first"][plain])
    assert iv["cls"].tolist() == list(range(3, 3 + len(pts)))
