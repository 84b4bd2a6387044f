"""Policy v2, pure Python: icmp_types (names, numbers, type/code) and defaults.essential_icmp —
parsing, validation errors with line and path, compiled L4 classes and the reference model."""
from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from hostwall.bpf import layout as L
from hostwall.enforcer.compiler import compile_policy
from hostwall.enforcer.icmp import CODES, TYPES, icmp_key, parse_icmp_type
from hostwall.enforcer.policy import ESSENTIAL_ICMP, PolicyError, load_policy, parse_policy
from hostwall.enforcer.reference import Packet, essential_icmp, evaluate

DATA = Path(__file__).resolve().parents[1] / "data" / "policies"


def issues(text: str) -> list[str]:
    with pytest.raises(PolicyError) as ei:
        parse_policy(textwrap.dedent(text))
    return [str(i) for i in ei.value.issues]


# ---------------------------------------------------------------- entries

@pytest.mark.parametrize("entry,proto,want", [
    ("echo-request", "icmp", (0x800, 0x8FF)),
    ("ping", "icmp", (0x800, 0x8FF)),
    (11, "icmp", (0xB00, 0xBFF)),
    ("11", "icmp", (0xB00, 0xBFF)),
    ("3/4", "icmp", (0x304, 0x304)),
    ("destination-unreachable/fragmentation-needed", "icmp", (0x304, 0x304)),
    (" Destination-Unreachable / Frag-Needed ", "icmp", (0x304, 0x304)),
    ("3/fragmentation-needed", "icmp", (0x304, 0x304)),
    ("destination-unreachable/4", "icmp", (0x304, 0x304)),
    ("8/0", "icmp", (0x800, 0x800)),
    ("255/255", "icmp", (0xFFFF, 0xFFFF)),
    (0, "icmp", (0, 0xFF)),
    ("echo-request", "icmpv6", (0x8000, 0x80FF)),
    ("packet-too-big", "icmpv6", (0x200, 0x2FF)),
    ("neighbour-solicitation", "icmpv6", (0x8700, 0x87FF)),
    ("neighbor-solicitation", "icmpv6", (0x8700, 0x87FF)),
    ("destination-unreachable/port-unreachable", "icmpv6", (0x104, 0x104)),
    ("time-exceeded/ttl-zero-during-reassembly", "icmpv6", (0x301, 0x301)),
])
def test_entries(entry, proto, want):
    assert parse_icmp_type(entry, proto) == want


@pytest.mark.parametrize("entry,proto,words", [
    ("echo-requets", "icmp", ["unknown icmp type 'echo-requets'", "did you mean 'echo-request'"]),
    ("packet-too-big", "icmp", ["icmpv6 type, not icmp"]),
    ("timestamp-request", "icmpv6", ["icmp type, not icmpv6"]),
    (256, "icmp", ["out of range", "0-255"]),
    (-1, "icmp", ["out of range"]),
    ("3/256", "icmp", ["code 256", "out of range"]),
    ("300/1", "icmp", ["type 300", "out of range"]),
    ("3/frag-need", "icmp", ["unknown code 'frag-need' of destination-unreachable", "did you mean"]),
    ("echo-request/weird", "icmp", ["has no named codes", "'8/0'"]),
    ("3/", "icmp", ["malformed"]),
    ("/4", "icmp", ["malformed"]),
    ("3/4/5", "icmp", ["unknown code"]),
    (True, "icmp", ["not an ICMP type"]),
])
def test_bad_entries(entry, proto, words):
    with pytest.raises(ValueError) as ei:
        parse_icmp_type(entry, proto)
    for w in words:
        assert w in str(ei.value), str(ei.value)


def test_name_tables_are_consistent():
    for fam, names in TYPES.items():
        assert all(0 <= t <= 255 and n == n.lower().strip() and " " not in n for n, t in names.items())
        assert names["echo-request"] == {4: 8, 6: 128}[fam]
    for (fam, t), codes in CODES.items():
        assert t in TYPES[fam].values() and all(0 <= c <= 255 for c in codes.values())


# ---------------------------------------------------------------- policies

def test_v2_example_loads():
    p = load_policy(DATA / "icmp-v2.yaml")
    assert p.defaults.essential_icmp is True
    ping = next(r for r in p.rules if r.name == "ping-in")
    assert ping.icmp_types == ((0x304, 0x304), (0x800, 0x8FF), (0xB00, 0xBFF))     # merged, sorted
    assert next(r for r in p.rules if r.name == "no-redirects").icmp_types == ((0x500, 0x5FF), (0xD00, 0xDFF))
    assert p.counter_names()[-1] == ESSENTIAL_ICMP and len(p.counter_names()) == len(p.rules) + 1


def test_essential_icmp_defaults_to_true_and_can_be_turned_off():
    base = "version: 1\nname: t\n"
    assert parse_policy(base).defaults.essential_icmp is True
    p = parse_policy(base + "defaults: {essential_icmp: false}\n")
    assert p.defaults.essential_icmp is False and ESSENTIAL_ICMP not in p.counter_names()
    assert any("defaults.essential_icmp" in i and "true or false" in i
               for i in issues(base + "defaults: {essential_icmp: yes-please}\n"))


def test_every_icmp_error_is_reported_with_line_and_path():
    got = issues("""\
        version: 1
        name: t
        rules:
          - {name: a, priority: 1, direction: ingress, action: allow, protocol: tcp, icmp_types: [8]}
          - name: b
            priority: 1
            direction: ingress
            action: allow
            protocol: icmp
            icmp_types:
              - echo-requets
              - 300
              - "3/99"
              - packet-too-big
              - "3/bogus"
          - {name: c, priority: 1, direction: ingress, action: allow, protocol: icmpv6, ports: [1]}
          - {name: essential_icmp, priority: 1, direction: ingress, action: allow}
          - {name: d, priority: 1, direction: ingress, action: allow, icmp_types: [echo-request]}
          - {name: e, priority: 1, direction: ingress, action: allow, protocol: icmp, icmp_types: []}
        """)
    want = [
        ("<string>:4: rules[0].icmp_types:", "need protocol icmp or icmpv6", "not tcp"),
        ("<string>:11: rules[1].icmp_types[0]:", "unknown icmp type 'echo-requets'"),
        ("<string>:12: rules[1].icmp_types[1]:", "out of range"),
        ("<string>:14: rules[1].icmp_types[3]:", "is an icmpv6 type"),
        ("<string>:15: rules[1].icmp_types[4]:", "unknown code 'bogus'"),
        ("<string>:16: rules[2].ports:", "not icmpv6"),
        ("<string>:17: rules[3].name:", "'essential_icmp' is reserved"),
        ("<string>:18: rules[4].icmp_types:", "not any"),
        ("<string>:19: rules[5].icmp_types:", "list is empty"),
    ]
    assert len(got) == len(want), "\n".join(got)
    for line, (where, *words) in zip(got, want):
        assert line.startswith(where) and all(w in line for w in words), line


# ---------------------------------------------------------------- compiled classes

def test_icmp_types_become_l4_classes_of_type_and_code():
    p = load_policy(DATA / "icmp-v2.yaml")
    slots = {n: i for i, n in enumerate(p.counter_names())}
    cp = compile_policy(p, slots, 1)
    dense = cp.l4["cls"].reshape(-1)
    order = {r.name: i for i, r in enumerate(p.rules)}

    def rules_at(proto: str, t: int, code: int) -> set[str]:
        cls = int(dense[L.l4_key(L.DIR["ingress"], L.PROTO_IDX[proto], icmp_key(t, code))])
        words = cp.l4_cls[cls]["words"]
        return {n for n, i in order.items() if int(words[i // 64]) >> (i % 64) & 1}

    assert rules_at("icmp", 8, 0) == rules_at("icmp", 8, 255) == {"ping-in"}
    assert rules_at("icmp", 3, 4) == {"ping-in"} and rules_at("icmp", 3, 3) == set()
    assert rules_at("icmp", 5, 1) == rules_at("icmp", 13, 0) == {"no-redirects"}
    assert rules_at("icmp", 0, 0) == set()
    assert rules_at("icmpv6", 128, 0) == {"ping6-in"} and rules_at("icmpv6", 1, 4) == {"ping6-in"}
    assert rules_at("icmpv6", 1, 3) == set() and rules_at("icmpv6", 8, 0) == set()
    hdr = cp.hdr[0]
    assert (int(hdr["essential_icmp"]), int(hdr["essential_slot"])) == (1, slots[ESSENTIAL_ICMP])
    off = parse_policy("version: 1\nname: t\ndefaults: {essential_icmp: false}\n")
    hdr = compile_policy(off, {}, 1).hdr[0]
    assert (int(hdr["essential_icmp"]), int(hdr["essential_slot"])) == (0, L.NO_SLOT)


# ---------------------------------------------------------------- reference

ME, ME6, PEER6 = "10.0.0.1", "fd00::1", "fd00::9"


@pytest.mark.parametrize("pkt,want", [
    (Packet("ingress", 6, "fe80::1", ME6, 58, icmp_type=135, hop_limit=255), True),
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=135, hop_limit=255), True),     # NS from a global address
    (Packet("ingress", 6, "::", ME6, 58, icmp_type=135, hop_limit=255), True),      # DAD
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=135, hop_limit=254), False),
    (Packet("egress", 6, ME6, PEER6, 58, icmp_type=136, hop_limit=255), True),
    (Packet("ingress", 6, "fe80::1", ME6, 58, icmp_type=137, hop_limit=255), True),
    (Packet("ingress", 6, "fe80::1", ME6, 58, icmp_type=130, hop_limit=1), True),
    (Packet("ingress", 6, "::", ME6, 58, icmp_type=143, hop_limit=1), True),
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=130, hop_limit=1), False),
    (Packet("ingress", 6, "fe80::1", ME6, 58, icmp_type=130, hop_limit=255), False),
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=2, inner_src=ME6), True),
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=2, inner_src=PEER6), False),
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=2), False),
    (Packet("ingress", 4, "192.0.2.1", ME, 1, icmp_type=3, icmp_code=4, inner_src=ME), True),
    (Packet("ingress", 4, "192.0.2.1", ME, 1, icmp_type=3, icmp_code=3, inner_src=ME), False),
    (Packet("ingress", 4, "192.0.2.1", ME, 1, icmp_type=8), False),
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=128), False),
    (Packet("ingress", 6, PEER6, ME6, 58, icmp_type=135, hop_limit=255, fragment=True), False),
])
def test_reference_essential_icmp(pkt, want):
    assert essential_icmp(pkt) is want


def test_reference_essential_passes_first_unless_off():
    deny_all = "version: 1\nname: t\ndefaults: {{ingress: deny, essential_icmp: {}}}\nrules:\n" \
               "  - {{name: no-icmp6, priority: 1, direction: ingress, action: deny, protocol: icmpv6}}\n"
    ns = Packet("ingress", 6, PEER6, ME6, 58, icmp_type=135, hop_limit=255)
    d = evaluate(parse_policy(deny_all.format("true")), ns)
    assert (d.verdict, d.reason, d.rule) == ("allow", "pass_essential", ESSENTIAL_ICMP)
    d = evaluate(parse_policy(deny_all.format("false")), ns)
    assert (d.verdict, d.reason, d.rule) == ("drop", "policy_deny", "no-icmp6")


@given(t=st.integers(0, 255), code=st.integers(0, 255), entry=st.one_of(
    st.integers(0, 255), st.tuples(st.integers(0, 255), st.integers(0, 255)).map(lambda tc: f"{tc[0]}/{tc[1]}"),
    st.sampled_from(sorted(TYPES[4]))))
def test_reference_icmp_types_match_like_an_oracle(t, code, entry):
    """An entry matches a message iff its type matches and (a code was given) its code matches."""
    p = parse_policy("version: 1\nname: t\ndefaults: {ingress: deny, essential_icmp: false}\nrules:\n"
                     f"  - {{name: r, priority: 1, direction: ingress, action: allow, protocol: icmp, "
                     f"icmp_types: [{entry!r}]}}\n".replace("'", '"'))
    if isinstance(entry, int):
        want = t == entry
    elif "/" in entry:
        et, ec = map(int, entry.split("/"))
        want = (t, code) == (et, ec)
    else:
        want = t == TYPES[4][entry]
    got = evaluate(p, Packet("ingress", 4, "10.0.0.9", ME, 1, icmp_type=t, icmp_code=code)).rule == "r"
    assert got is want
    assert np.uint16(icmp_key(t, code)) == icmp_key(t, code)
