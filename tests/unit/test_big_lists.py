"""Big peer lists (blocklists) classified apart and kept across compiles (enforcer/compiler.py
_with_big, classify.refine): the tables must be exactly those of one classification of all rules,
and the kept classes must follow a changed list."""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hostwall.enforcer.compiler as C
from hostwall.enforcer.classify import classify, refine, start_keys
from hostwall.enforcer.compiler import clear_memo, compile_policy
from hostwall.enforcer.policy import clear_peer_file_cache, parse_policy

from .test_compiler import prefixes


def _classify(n_rules, ranges, any_rules, axis_end):
    own = [r for r, _, _ in ranges]
    start = [s for _, s, _ in ranges]
    end = [e for _, _, e in ranges]
    if axis_end <= 2**40:
        return classify(n_rules, np.array(own, np.int64), np.array(start, np.uint64), np.array(end, np.uint64),
                        list(any_rules), axis_end)
    return classify(n_rules, own, start, end, list(any_rules), axis_end)


def _refined(n_rules, ranges, any_rules, axis_end, big):
    """classify the rules in `big` apart (renumbered 0..), the rest with the any-rules, then refine."""
    local = {o: i for i, o in enumerate(big)}
    a = _classify(len(big), [(local[r], s, e) for r, s, e in ranges if r in local], [], axis_end)
    b = _classify(n_rules, [x for x in ranges if x[0] not in local], any_rules, axis_end)
    return refine(a, start_keys(a), big, b)


def _equal(x, y) -> None:
    assert [int(s) for s in x.starts] == [int(s) for s in y.starts]
    assert x.cls.dtype == y.cls.dtype and x.cls.tobytes() == y.cls.tobytes()
    assert x.bitmaps.tobytes() == y.bitmaps.tobytes()
    assert type(x.starts) is type(y.starts)


def _case(bits: int):
    return st.integers(2, 140).flatmap(lambda n: st.tuples(
        st.just(n), prefixes(bits, n), st.lists(st.integers(0, n - 1), min_size=1, max_size=3, unique=True),
        st.lists(st.integers(0, n - 1), max_size=3, unique=True)))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case(32))
def test_refine_is_one_classification_v4(case):
    n_rules, ranges, big, any_rules = case
    any_rules = [r for r in any_rules if r not in big]
    ranges = [x for x in ranges if x[0] not in any_rules]      # as the compiler gathers them
    _equal(_refined(n_rules, ranges, any_rules, 1 << 32, big), _classify(n_rules, ranges, any_rules, 1 << 32))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_case(128))
def test_refine_is_one_classification_v6(case):
    n_rules, ranges, big, any_rules = case
    any_rules = [r for r in any_rules if r not in big]
    ranges = [x for x in ranges if x[0] not in any_rules]
    _equal(_refined(n_rules, ranges, any_rules, 1 << 128, big), _classify(n_rules, ranges, any_rules, 1 << 128))


def _write(d, name: str, v4: list[str], v6: list[str], extra: str = "") -> str:
    with open(os.path.join(d, f"{name}.txt"), "w") as f:
        f.write("\n".join(v4 + v6) + "\n")
    return (f"version: 1\nname: {name}\ndefaults: {{ingress: deny, egress: allow}}\nrules:\n"
            f"  - {{name: block, priority: 0, direction: ingress, action: deny, peers_file: {name}.txt}}\n"
            f"  - {{name: web, priority: 5, direction: ingress, action: allow, protocol: tcp, ports: [80],\n"
            f"     peers: [\"10.1.0.0/16\", \"10.1.2.0/24\", \"fd00:1::/32\"]}}\n{extra}"
            f"  - {{name: again, priority: 9, direction: egress, action: deny, peers_file: {name}.txt}}\n")


def _lists(seed: int):
    rng = np.random.default_rng(seed)
    v4 = [f"10.{a}.{b}.0/24" for a, b in rng.integers(0, 256, size=(60, 2)).tolist()]
    v4 += [f"10.1.{b}.{c}" for b, c in rng.integers(0, 256, size=(20, 2)).tolist()]
    v6 = [f"fd00:{a:x}::/{32 + b % 40}" for a, b in rng.integers(0, 4, size=(30, 2)).tolist()]
    return v4, v6


@pytest.fixture
def small_big(monkeypatch, tmp_path):
    monkeypatch.setattr(C, "BIG_LIST", 10)      # the test lists count as big, the inline ones not
    clear_memo()
    clear_peer_file_cache()
    yield str(tmp_path)
    clear_memo()
    clear_peer_file_cache()


def _compile(text: str, d: str, rev: int = 1):
    pol = parse_policy(text, base_dir=d)
    return compile_policy(pol, {n: i for i, n in enumerate(pol.counter_names())}, rev)


def _whole(text: str, d: str, monkeypatch):
    """The same compile without big lists (one classification of all rules) and no memo."""
    with monkeypatch.context() as m:
        m.setattr(C, "BIG_LIST", 1 << 40)
        clear_memo()
        out = _compile(text, d)
    clear_memo()
    return out


def _identical(x, y) -> None:
    for f in dataclasses.fields(x):
        a, b = getattr(x, f.name), getattr(y, f.name)
        assert (a.tobytes() == b.tobytes()) if hasattr(a, "tobytes") else a == b, f.name


def test_kept_classes_hit_miss_and_changed_list(small_big, monkeypatch):
    d = small_big
    v4, v6 = _lists(1)
    text = _write(d, "p", v4, v6)
    hits, misses = C._BIG_MEMO.hits, C._BIG_MEMO.misses
    first = _compile(text, d)
    assert (C._BIG_MEMO.hits - hits, C._BIG_MEMO.misses - misses) == (0, 2)             # v4 and v6 classified once
    # a new rule set over the same lists: the lists' classes are reused, the tables are the whole's
    other = text.replace("ports: [80]", "ports: [81]").replace("10.1.2.0/24", "10.1.3.0/25")
    C._LAST.clear()
    got = _compile(other, d)
    assert (C._BIG_MEMO.hits - hits, C._BIG_MEMO.misses - misses) == (2, 2)
    _identical(got, _whole(other, d, monkeypatch))
    _identical(first, _whole(text, d, monkeypatch))
    # the list changes (a re-parsed file with other content): classified again, never the old classes
    clear_memo()
    _compile(text, d)
    hits, misses = C._BIG_MEMO.hits, C._BIG_MEMO.misses
    v4b = v4[:-1] + ["10.1.2.128/25"]
    changed = _write(d, "p", v4b, v6)
    got = _compile(changed, d)
    assert (C._BIG_MEMO.hits - hits, C._BIG_MEMO.misses - misses) == (1, 1)    # v4 missed, v6 hit
    _identical(got, _whole(changed, d, monkeypatch))
    assert got.iv4.tobytes() != first.iv4.tobytes()


def test_kept_classes_are_bounded(small_big):
    d = small_big
    misses = C._BIG_MEMO.misses
    for seed in range(6):
        v4, v6 = _lists(seed)
        _compile(_write(d, f"p{seed}", v4, v6), d)
    assert C._BIG_MEMO.misses - misses == 12 and len(C._BIG_MEMO._items) == C._BIG_MEMO.size == 4


def test_inline_rule_with_many_peers_and_any_rules(small_big, monkeypatch):
    """A big inline list and an any-rule beside the blocklists: the same tables as one classification."""
    d = small_big
    v4, v6 = _lists(7)
    inline = ", ".join(f'"192.168.{i}.0/24"' for i in range(12))
    extra = (f"  - {{name: many, priority: 6, direction: ingress, action: log, peers: [{inline}]}}\n"
             "  - {name: all, priority: 7, direction: ingress, action: allow, protocol: udp, ports: [53]}\n")
    text = _write(d, "q", v4, v6, extra)
    _identical(_compile(text, d), _whole(text, d, monkeypatch))


def test_refine_takes_memory_in_the_pairs_that_occur_not_all_class_pairs():
    """13 big lists whose overlaps make ~8k classes, and 4000 one-address rules (~4k classes): a table
    over every (big class, other class) pair would be ~400 MB; the pairs that occur are ~12k."""
    import ipaddress
    import tracemalloc
    base, other = int(ipaddress.ip_address("10.0.0.0")), int(ipaddress.ip_address("11.0.0.0"))
    lines = ["version: 1", "name: refine-memory", "defaults: {ingress: deny, egress: allow}", "rules:"]
    for r in range(13):
        big = [f"{ipaddress.ip_address(base + 4 * i)}/32" for i in range(8192) if (i >> r) & 1][:4096]
        lines.append(f"  - {{name: big{r}, priority: {100 + r}, direction: ingress, action: deny, "
                     f"peers: [{', '.join(big)}]}}")
    for k in range(4000):
        lines.append(f"  - {{name: one{k}, priority: {1000 + k}, direction: ingress, action: allow, protocol: tcp, "
                     f"ports: [80], peers: [{ipaddress.ip_address(other + k)}/32]}}")
    pol = parse_policy("\n".join(lines) + "\n", source="refine-memory.yaml")
    clear_memo()
    tracemalloc.start()
    try:
        cp = compile_policy(pol, {n: i for i, n in enumerate(pol.counter_names())}, 1)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        clear_memo()
    assert cp is not None and peak < 100 << 20, f"peak {peak >> 20} MB"


@pytest.mark.parametrize("n_codes", [50, 5000, 10**7])
def test_first_occurrence_table_and_sparse_agree(n_codes):
    from hostwall.enforcer.classify import first_occurrence
    rng = np.random.default_rng(n_codes)
    values = rng.integers(0, n_codes, 3000).astype(np.int64)
    rep, idx = first_occurrence(values, n_codes)
    seen: dict[int, int] = {}
    for v in values.tolist():
        seen.setdefault(v, len(seen))
    assert rep.tolist() == list(seen) and idx.tolist() == [seen[v] for v in values.tolist()]
