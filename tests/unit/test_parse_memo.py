"""Inline peers and ports kept across parses by their text (enforcer/parse_memo.py, policy.py): a
re-parse hands out the same objects, a changed text is parsed anew, the memos are bounded, and an
error report is the same with the memos full or empty."""
from __future__ import annotations

import pytest

import hostwall.enforcer.policy as policy_mod
from hostwall.boundedmemo import BoundedMemo
from hostwall.enforcer.parse_memo import ContentCache, text_key
from hostwall.enforcer.policy import PolicyError, clear_peer_file_cache, parse_policy

POLICY = """\
version: 1
name: memo
rules:
  - {name: a, priority: 0, direction: ingress, action: allow, protocol: tcp, ports: [80, "8000-8080"],
     peers: ["10.1.0.0/16", "fd00:1::/32"]}
  - {name: b, priority: 1, direction: ingress, action: deny, protocol: udp, ports: [53],
     peers: ["10.2.0.0/16"]}
  - {name: c, priority: 2, direction: egress, action: allow, protocol: tcp, ports: [80, "8000-8080"],
     peers: ["10.1.0.0/16", "fd00:1::/32"]}
"""


@pytest.fixture(autouse=True)
def _empty():
    clear_peer_file_cache()
    yield
    clear_peer_file_cache()


def test_reparse_hands_out_the_same_objects():
    first = parse_policy(POLICY)
    assert len(policy_mod._INLINE_PEERS) == 2 and len(policy_mod._PORTS) == 2   # distinct texts
    again = parse_policy(POLICY)
    for x, y in zip(first.rules, again.rules):
        assert x.peers is y.peers and x.ports is y.ports
    assert first.rules[0].peers is first.rules[2].peers


def test_changed_text_is_parsed_anew():
    first = parse_policy(POLICY)
    other = parse_policy(POLICY.replace('"10.2.0.0/16"', '"10.3.0.0/16"').replace("[53]", "[54]"))
    assert other.rules[1].peers is not first.rules[1].peers
    assert other.rules[1].peers.cidrs() == ["10.3.0.0/16"] and other.rules[1].ports == ((54, 54),)
    assert other.rules[0].peers is first.rules[0].peers
    clear_peer_file_cache()
    fresh = parse_policy(POLICY.replace('"10.2.0.0/16"', '"10.3.0.0/16"').replace("[53]", "[54]"))
    assert fresh.rules == other.rules


def test_memos_are_bounded(monkeypatch):
    monkeypatch.setattr(policy_mod, "_INLINE_PEERS", BoundedMemo(2, 100))
    monkeypatch.setattr(policy_mod, "_PORTS", BoundedMemo(2, 100))
    texts = [POLICY.replace("10.2.0.0/16", f"10.{i}.0.0/16").replace("[53]", f"[{100 + i}]") for i in range(5)]
    for t in texts:
        pol = parse_policy(t)
        assert len(policy_mod._INLINE_PEERS) <= 2 and len(policy_mod._PORTS) <= 2
    clear_peer_file_cache()
    assert pol.rules == parse_policy(texts[-1]).rules
    m: BoundedMemo[tuple, str] = BoundedMemo(3, 5)
    for i in range(10):
        m.put((i,), str(i), 1)
        assert len(m) <= 3 and m.get((i,)) == str(i)
    m.clear()
    m.put((1, 2, 3), "a", 3)
    m.put((4, 5, 6), "b", 3)                          # weight 6 > 5: starts over
    assert m.get((1, 2, 3)) is None and m.get((4, 5, 6)) == "b"
    m.put(tuple(range(6)), "too long", 6)             # never kept: heavier than the whole budget
    assert m.get(tuple(range(6))) is None and len(m) == 0 and m.weight == 0
    c = ContentCache(2)
    for i in range(4):
        c.put(bytes([i]), i)
    assert c.get(bytes([0])) is None and c.get(bytes([3])) == 3 and c.get(bytes([2])) == 2


def test_keys_tell_types_apart():
    assert text_key([80, "8000-8080"], int, str) == (80, "8000-8080")
    assert text_key([True], int, str) is None and text_key([80.0], int, str) is None
    assert text_key(["10.0.0.0/8", 1], str) is None


@pytest.mark.parametrize("bad", [
    POLICY.replace('"10.2.0.0/16"', '"10.2.0.0/33"'),                 # a bad entry in a memoised-looking list
    POLICY.replace("[53]", "[70000]"),
    POLICY.replace("name: a,", "name: b,"),                            # an issue before the memoised lists
    POLICY.replace("protocol: udp, ports: [53]", "protocol: icmp, ports: [53]"),
])
def test_error_reports_are_the_same_with_full_memos(bad):
    with pytest.raises(PolicyError) as empty:
        parse_policy(bad)
    parse_policy(POLICY)                                   # every list of POLICY memoised
    assert len(policy_mod._INLINE_PEERS) and len(policy_mod._PORTS)
    with pytest.raises(PolicyError) as full:
        parse_policy(bad)
    assert str(full.value) == str(empty.value) and full.value.issues == empty.value.issues
