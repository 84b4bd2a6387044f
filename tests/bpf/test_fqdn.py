"""FQDN rules in the loaded programs judge like the reference model (docs/policy.md "FQDN rules").

Random policies mixing fqdns rules (exact names and wildcards) with peer rules, random learnt names →
addresses (some expired), random egress packets: the datapath, with the dynamic set filled as the proxy
fills it (one entry per (set, address) for every set whose patterns match the name), must agree with
reference.evaluate given the unexpired learnt names. Plus the paths the random search rarely isolates:
expiry at the exact instant, a static rule before the fqdns rule, a set shared by two rules, IPv6."""
from __future__ import annotations

import ipaddress
import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L
from hostwall.bpf.fqdn import MAPS, FqdnMaps, copy_maps, index_slot
from hostwall.dnsnames import matches
from hostwall.enforcer.compiler import fqdn_lists
from hostwall.enforcer.reference import Packet, evaluate

from .packets import frame

pytestmark = pytest.mark.bpf

NAMES = ["a.example.com", "b.example.com", "x.a.example.com", "example.com", "api.pay.example.net", "pay.example.net"]
PATTERNS = NAMES + ["*.example.com", "*.pay.example.net", "*.a.example.com"]
V4 = ["10.0.0.1", "10.0.0.2", "10.0.0.3", "192.168.1.1"]
V6 = ["fd00::1", "fd00::2", "2001:db8::7"]
PORTS = [53, 80, 443, 8443]
NOW = 10**15                            # the datapath's test clock (hw_config.test_now_ns)
DNS = {"upstreams": ["10.0.0.53"]}


@st.composite
def policies(draw):
    rules = []
    for i in range(draw(st.integers(1, 8))):
        r = {"name": f"r{i}", "priority": draw(st.integers(0, 3)), "direction": "egress",
             "action": draw(st.sampled_from(["allow", "deny", "log"])),
             "protocol": draw(st.sampled_from(["tcp", "udp", "any"]))}
        kind = draw(st.sampled_from(["fqdns", "fqdns", "peers", "none"]))
        if kind == "fqdns":
            r["fqdns"] = draw(st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=3, unique=True))
        elif kind == "peers":
            r["peers"] = draw(st.lists(st.sampled_from([f"{a}/32" for a in V4] + [f"{a}/128" for a in V6]),
                                       min_size=1, max_size=3, unique=True))
        if draw(st.booleans()):
            r["ports"] = draw(st.lists(st.sampled_from(PORTS), min_size=1, max_size=2, unique=True))
        rules.append(r)
    d = {"egress": draw(st.sampled_from(["allow", "deny"])), "stateful": False}
    return f"version: 1\nname: fq\ndefaults: {json.dumps(d)}\nrules: {json.dumps(rules)}\ndns: {json.dumps(DNS)}\n"


@st.composite
def learnt(draw):
    """name -> [(ip, expired?)]"""
    out = {}
    for name in draw(st.lists(st.sampled_from(NAMES), max_size=4, unique=True)):
        out[name] = draw(st.lists(st.tuples(st.sampled_from(V4 + V6), st.booleans()), min_size=1, max_size=3))
    return out


def fill(dp, policy, learnt_map) -> None:
    """The dynamic set as the proxy leaves it: every matching set gets every address of the name."""
    fm = FqdnMaps(dp.map_fds)
    for s, ip, _, _ in fm.set_entries():
        fm.set_delete(s, ip)
    sets = {lst: i + 1 for i, lst in enumerate(fqdn_lists(policy))}       # compile_policy's default ids
    best: dict[tuple[int, str], int] = {}
    for name, ips in learnt_map.items():
        for lst, sid in sets.items():
            if any(matches(name, p) for p in lst):
                for ip, expired in ips:
                    exp = NOW - 1 if expired else NOW + 10**9
                    best[(sid, ip)] = max(best.get((sid, ip), 0), exp)
    for (sid, ip), exp in best.items():
        assert fm.set_put(sid, ip, exp, NOW - 10)


def unexpired(learnt_map) -> dict[str, list[str]]:
    return {n: [ip for ip, expired in ips if not expired] for n, ips in learnt_map.items()}


@st.composite
def packets(draw):
    fam = draw(st.sampled_from([4, 6]))
    dst = draw(st.sampled_from(V4 if fam == 4 else V6))
    src = "10.9.9.9" if fam == 4 else "fd09::9"
    proto = draw(st.sampled_from([6, 17]))
    return Packet("egress", fam, src, dst, proto, 40000, draw(st.sampled_from(PORTS)))


def judge(harness, policy, pkt, learnt_map):
    got = harness.run("tc_egress", frame(pkt, flags="A"))
    want = evaluate(policy, pkt, unexpired(learnt_map))
    slot = harness.slots.get(want.rule) if want.rule else None
    assert (got.verdict, got.rule_slot) == (want.verdict, slot), (pkt, want, got)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(policy_text=policies(), lm=learnt(), pkts=st.lists(packets(), min_size=1, max_size=8))
def test_fqdn_rules_match_reference(harness, policy_text, lm, pkts):
    policy = harness.install(policy_text)
    harness.dp.set_config(test_now_ns=NOW)
    fill(harness.dp, policy, lm)
    for pkt in pkts:
        judge(harness, policy, pkt, lm)
        harness.dp.clear_conntrack()


POLICY = f"""
version: 1
name: fq-fixed
defaults: {{egress: deny, stateful: false}}
rules:
  - {{name: early-deny, priority: 1, direction: egress, action: deny, protocol: tcp, ports: [8443], peers: [10.0.0.2/32]}}
  - {{name: mirrors, priority: 5, direction: egress, action: allow, protocol: tcp, ports: [443, 8443],
     fqdns: ["mirror.example.com", "*.cdn.example.com"]}}
  - {{name: mirrors-too, priority: 6, direction: egress, action: log, protocol: tcp,
     fqdns: ["*.cdn.example.com", "mirror.example.com"]}}
  - {{name: pay, priority: 7, direction: egress, action: allow, protocol: any, fqdns: ["api.pay.example.net"]}}
dns: {json.dumps(DNS)}
"""


def test_fixed_paths(harness):
    policy = harness.install(POLICY)
    sets = {lst: i + 1 for i, lst in enumerate(fqdn_lists(policy))}
    assert len(sets) == 2, "mirrors and mirrors-too share one set (same list, any order)"
    fm = FqdnMaps(harness.dp.map_fds)
    harness.dp.set_config(test_now_ns=NOW)
    before = harness.dp.fqdn_stats()
    s_mirror = sets[("*.cdn.example.com", "mirror.example.com")]
    for s, ip, _, _ in fm.set_entries():
        fm.set_delete(s, ip)

    def verdict(dst, port=443, proto=6):
        fam = 6 if ":" in dst else 4
        src = "fd09::9" if fam == 6 else "10.9.9.9"
        o = harness.run("tc_egress", frame(Packet("egress", fam, src, dst, proto, 40000, port), flags="A"))
        harness.dp.clear_conntrack()
        rule = {v: k for k, v in harness.slots.items()}.get(o.rule_slot)
        return o.verdict, o.reason, rule

    assert verdict("10.0.0.1") == ("drop", "default_deny", None)           # nothing learnt yet
    assert fm.set_put(s_mirror, "10.0.0.1", NOW + 1, NOW - 5)
    assert verdict("10.0.0.1") == ("allow", "pass_rule", "mirrors")
    assert verdict("10.0.0.1", 80) == ("allow", "pass_rule", "mirrors-too")  # other port: the log rule
    assert verdict("10.0.0.1", 53, 17) == ("drop", "default_deny", None)   # udp: no fqdns rule of that set
    harness.dp.set_config(test_now_ns=NOW + 1)                              # expires_ns == now: expired
    assert verdict("10.0.0.1") == ("drop", "default_deny", None)
    harness.dp.set_config(test_now_ns=NOW)
    assert fm.set_put(s_mirror, "10.0.0.2", NOW + 10, NOW)
    assert verdict("10.0.0.2", 8443) == ("drop", "policy_deny", "early-deny")  # a static rule comes first
    assert fm.set_put(s_mirror, "fd00::2", NOW + 10, NOW)
    assert verdict("fd00::2") == ("allow", "pass_rule", "mirrors")
    assert verdict("fd00::1") == ("drop", "default_deny", None)
    # one count per packet that probed the set (the 8443 packet probed nothing): docs/datapath.md "FQDN rules"
    after = harness.dp.fqdn_stats()
    assert {k: after[k] - before[k] for k in after} == {"hit": 3, "expired": 1, "miss": 3}
    assert int(harness.dp.active_header()["fqdn_rules"]) == 3
    assert L.FQDN_RULES_MAX == 64


def cdn_set_emptied(harness) -> tuple[int, FqdnMaps]:
    """POLICY installed, the datapath's clock at NOW, hw_fqdn emptied (through FqdnMaps, the index with it):
    the set id of the cdn / mirror rule and a writer (the caller closes it)."""
    policy = harness.install(POLICY)
    s = {lst: i + 1 for i, lst in enumerate(fqdn_lists(policy))}[("*.cdn.example.com", "mirror.example.com")]
    harness.dp.set_config(test_now_ns=NOW)
    fm = FqdnMaps(harness.dp.map_fds)
    for sid, ip, _, _ in fm.set_entries():
        fm.set_delete(sid, ip)
    return s, fm


def test_counts_once_per_packet(harness):
    """hw_fqdn_stats counts each egress first packet that probed the dynamic set once, by outcome: hit if a
    candidate matched, else expired if one found its entry past its expiry, else miss, however many candidate
    rules it probed (tcp/443 here: mirrors, mirrors-too, pay). A packet whose static match comes first
    probes nothing and is not counted (docs/metrics.md hostwall_fqdn_lookups_total)."""
    s, fm = cdn_set_emptied(harness)
    pay = 3 - s                                                             # the other of the two sets

    def counted(dst, port=443):
        before = harness.dp.fqdn_stats()
        o = harness.run("tc_egress", frame(Packet("egress", 4, "10.9.9.9", dst, 6, 40000, port), flags="A"))
        harness.dp.clear_conntrack()
        after = harness.dp.fqdn_stats()
        return o.verdict, {k: after[k] - before[k] for k in after if after[k] != before[k]}

    assert counted("10.0.0.7") == ("drop", {"miss": 1})                     # three candidates, none matched
    assert fm.set_put(pay, "10.0.0.7", NOW + 10, NOW)
    assert counted("10.0.0.7") == ("allow", {"hit": 1})                     # two misses, then pay's hit
    assert fm.set_put(s, "10.0.0.8", NOW, NOW - 5)                          # expires_ns == now: expired
    assert counted("10.0.0.8") == ("drop", {"expired": 1})                  # expired twice, then a miss
    assert fm.set_put(s, "10.0.0.2", NOW + 10, NOW)
    assert counted("10.0.0.2", 8443) == ("drop", {})                        # early-deny comes first
    fm.close()


def test_ipv4_keys_after_ipv6_packets_on_every_egress_path(harness):
    """The probe's key words come from the packet memory (fqdn.h fqdn_match: an IPv4 address in daddr[0], the
    rest of the words zero, as bpf/fqdn.py keys it): after an IPv6 packet filled all of daddr on this CPU, an
    IPv4 first fragment (judged by tc_frag_egress on tc_egress's parse) and an IPv4 ICMP error (its quoted
    addresses elsewhere in the packet) to a learnt address still match the fqdns rule, by the index's copy
    and by hw_fqdn."""
    from scapy.compat import raw
    from scapy.layers.inet import ICMP, IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw
    s, fm = cdn_set_emptied(harness)
    pay = 3 - s
    eth = Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
    frames = {"first fragment": eth / IP(src="10.9.9.9", dst="10.0.0.7", flags="MF", id=7) / UDP(sport=40000, dport=5000)
              / Raw(b"x" * 32),
              "icmp error": eth / IP(src="10.9.9.9", dst="10.0.0.7") / ICMP(type=3, code=3)
              / IP(src="10.0.0.7", dst="10.9.9.9") / UDP(sport=5000, dport=40000)}
    six = frame(Packet("egress", 6, "fd09::9", "fd00:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 6, 40000, 443), flags="A")
    key = np.zeros(1, L.DTYPES["hw_fqdn_key"])
    key["set"], key["family"], key["addr"][0, :4] = pay, 4, [10, 0, 0, 7]
    slot = int(index_slot(key)[0])
    assert fm.set_put(pay, "10.0.0.7", NOW + 10, NOW)
    seq = int(fm.index()["seq"][slot])
    try:
        for how in ("index", "hw_fqdn"):
            if how == "hw_fqdn":                         # the slot cannot tell (odd sequence): the hash lookup
                fm.index()["seq"][slot] = seq | 1
            for what, f in frames.items():
                harness.run("tc_egress", six)
                o = harness.run("tc_egress", raw(f))
                harness.dp.clear_conntrack()
                rule = {v: k for k, v in harness.slots.items()}.get(o.rule_slot)
                assert (o.verdict, rule) == ("allow", "pay"), (how, what, o)
    finally:
        fm.index()["seq"][slot] = seq
        fm.close()


def test_counts_are_summed_over_cpus_and_served_as_metrics(harness):
    """The counts live in each CPU's hw_tc_pkt value: a packet judged on one CPU and one on another both
    show in Instance.fqdn_stats, `status`'s source, and in hostwall_fqdn_lookups_total (collector/dns_metrics.py),
    which read the same numbers. Test-run judges on the CPU its caller runs on."""
    from hostwall.collector.dns_metrics import dns_families
    from hostwall.collector.metric_spec import spec_family
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("one CPU: nothing to sum")
    s, fm = cdn_set_emptied(harness)
    assert fm.set_put(s, "10.0.0.7", NOW + 10, NOW)
    before = harness.dp.fqdn_stats()
    try:
        for cpu, dst in ((cpus[0], "10.0.0.7"), (cpus[1], "10.0.0.9"), (cpus[1], "10.0.0.7")):
            os.sched_setaffinity(0, {cpu})
            harness.run("tc_egress", frame(Packet("egress", 4, "10.9.9.9", dst, 6, 40000, 443), flags="A"))
            harness.dp.clear_conntrack()
    finally:
        os.sched_setaffinity(0, cpus)
        fm.close()
    after = harness.dp.fqdn_stats()
    assert {k: after[k] - before[k] for k in after} == {"hit": 2, "expired": 0, "miss": 1}
    [fam] = [f for f in dns_families(harness.dp, spec_family) if f.prom == "hostwall_fqdn_lookups"]
    assert dict(fam.samples) == {(k,): v for k, v in after.items()}


def test_another_builds_packet_memory_is_not_read_as_counts(harness):
    """An instance of a build before the fold (its hw_tc_pkt holds the packet alone: another value size),
    read by this build's `status` or collector, has no counts here (None: not shown, no metric samples),
    never its packets' addresses read as counts. hostwall.h HW_PKT_MEM_BYTES is this build's size."""
    from hostwall.bpf.instance import Instance
    from hostwall.collector.dns_metrics import dns_families
    from hostwall.collector.metric_spec import spec_family
    assert bpfsys.map_info(harness.dp.map_fds["hw_tc_pkt"]).value_size == L.C["HW_PKT_MEM_BYTES"]
    old_size = L.C["HW_PKT_MEM_BYTES"] - L.C["HW_FQDN_STATS"] * L.DTYPES["hw_counter"].itemsize
    fd = bpfsys.map_create(6, 4, old_size, 1, name="hw_tc_pkt")          # BPF_MAP_TYPE_PERCPU_ARRAY
    bpfsys.map_update(fd, b"\0" * 4, bytes(range(1, old_size + 1)) * harness.dp.ncpus)     # a packet's bytes
    fds = {**harness.dp.map_fds, "hw_tc_pkt": fd}
    old = Instance({}, fds)
    try:
        assert old.fqdn_stats() is None
        [fam] = [f for f in dns_families(old, spec_family) if f.prom == "hostwall_fqdn_lookups"]
        assert list(fam.samples) == []
    finally:
        old.map_fds = {}                   # the harness's fds are not this object's to close
        os.close(fd)


def test_index_never_changes_an_answer(harness):
    """hw_fqdn_index (hostwall.h struct hw_fqdn_slot) spares the hash lookup and nothing else: two keys
    of one slot both match (one from the slot's copy, one from hw_fqdn), a deleted key's copy goes with
    it, a copy read across a writer's change (odd sequence) or past its expiry asks hw_fqdn, a slot that
    counts no entry answers "not in the set", and rebuild_index derives the index from hw_fqdn again."""
    s, fm = cdn_set_emptied(harness)
    # two addresses of 10.64.0.0/14 whose keys fall in one slot
    base = int(ipaddress.IPv4Address("10.64.0.0"))
    keys = np.zeros(1 << 18, L.DTYPES["hw_fqdn_key"])
    keys["set"], keys["family"] = s, 4
    keys["addr"][:, :4] = (base + np.arange(len(keys), dtype=np.uint32)).astype(">u4").view(np.uint8).reshape(-1, 4)
    slots = index_slot(keys)
    seen: dict[int, int] = {}
    for i, sl in enumerate(slots.tolist()):
        if sl in seen:
            a, b, slot = str(ipaddress.IPv4Address(base + seen[sl])), str(ipaddress.IPv4Address(base + i)), sl
            break
        seen[sl] = i
    ix = fm.index()

    def allowed(dst):
        o = harness.run("tc_egress", frame(Packet("egress", 4, "10.9.9.9", dst, 6, 40000, 443), flags="A"))
        harness.dp.clear_conntrack()
        return o.verdict == "allow"

    assert fm.set_put(s, a, NOW + 10, NOW) and fm.set_put(s, b, NOW + 10, NOW)
    assert int(ix["entries"][slot]) == 2 and allowed(a) and allowed(b)      # b from the copy, a from hw_fqdn
    hits = harness.dp.fqdn_stats()["hit"]
    assert fm.set_delete(s, b)
    assert not allowed(b) and allowed(a)                                   # the copy of b went with it
    assert harness.dp.fqdn_stats()["hit"] == hits + 1
    assert fm.set_delete(s, a) and int(ix["entries"][slot]) == 0 and not allowed(a)
    # a copy the set no longer backs (only a writer bypassing FqdnMaps could leave one): it answers alone
    # while its sequence is even, and asks hw_fqdn while it is odd
    assert fm.set_put(s, a, NOW + 10, NOW)
    key = keys[int(ipaddress.IPv4Address(a)) - base].tobytes()
    bpfsys.map_delete(harness.dp.map_fds["hw_fqdn"], key)
    assert allowed(a)
    ix["seq"][slot] += 1
    assert not allowed(a)
    ix["seq"][slot] += 1
    # a copy past its expiry asks hw_fqdn, which a renewal may have extended
    bpfsys.map_update(harness.dp.map_fds["hw_fqdn"], key, (NOW + 1000).to_bytes(8, "little") + NOW.to_bytes(8, "little"))
    harness.dp.set_config(test_now_ns=NOW + 20)
    assert allowed(a)
    harness.dp.set_config(test_now_ns=NOW)
    # hw_fqdn filled without the index (an older build's entries copied over): no lookup until rebuilt
    c = str(ipaddress.IPv4Address(base + len(keys) - 1))                  # after the first pair: neither
    bpfsys.map_update(harness.dp.map_fds["hw_fqdn"], keys[-1].tobytes(), (NOW + 10).to_bytes(8, "little") + bytes(8))
    if int(ix["entries"][slots[-1]]) == 0:
        assert not allowed(c)
    assert fm.rebuild_index() == 2 and allowed(c) and allowed(a)
    assert int(ix["entries"].sum()) == 2 and int(ix["seq"][slot]) % 2 == 0
    fm.close()


def test_a_copied_set_is_indexed(harness):
    """copy_maps (an upgrade carrying the set into a new build's instance, enforcer/control.py
    _migrate_fqdn) fills hw_fqdn without its index: it rebuilds the index, or the copied addresses would
    stay unmatched (their slots counting no entry)."""
    from hostwall.enforcer.datapath import Datapath
    s, fm = cdn_set_emptied(harness)
    src = Datapath.load()
    try:
        sfm = FqdnMaps(src.map_fds)
        assert sfm.set_put(s, "10.0.0.1", NOW + 10, NOW) and sfm.set_put(s, "fd00::2", NOW + 10, NOW)
        sfm.close()
        assert copy_maps(src.map_fds, harness.dp.map_fds) == 2
    finally:
        src.close()
    for dst, fam, sender in (("10.0.0.1", 4, "10.9.9.9"), ("fd00::2", 6, "fd09::9")):
        o = harness.run("tc_egress", frame(Packet("egress", fam, sender, dst, 6, 40000, 443), flags="A"))
        harness.dp.clear_conntrack()
        assert o.verdict == "allow", dst
    for sid, ip, _, _ in fm.set_entries():
        fm.set_delete(sid, ip)
    assert int(fm.index()["entries"].sum()) == 0
    fm.close()


def test_a_reader_opens_the_maps_without_the_index(harness):
    """The collector's names (collector/enrich/domains.py) open fqdn.MAPS of the pinned instance only: a
    reader needs no index, a writer does."""
    fm = FqdnMaps({n: harness.dp.map_fds[n] for n in MAPS})
    try:
        assert isinstance(fm.set_entries(), list) and isinstance(fm.learnt(), list)
        with pytest.raises(KeyError):
            fm.set_put(1, "10.0.0.1", NOW + 10, NOW)
        assert fm.set_get(1, "10.0.0.1") is None, "nothing written without the index"
    finally:
        fm.close()


def test_a_slot_left_odd_by_a_killed_writer_is_even_again(harness):
    """A writer killed between its two sequence stores (FqdnMaps._slot_write) leaves the slot's sequence
    odd. The slot's next write and rebuild_index end with it even, the copy answering again: a +1 / +1
    writer would keep it odd at rest and even while it changes the copy, so that a packet could take a
    half-written copy (a key made of two keys' words, or another key's expiry) for a whole one."""
    s, fm = cdn_set_emptied(harness)
    a = "10.77.0.1"
    key = np.zeros(1, L.DTYPES["hw_fqdn_key"])
    key["set"], key["family"], key["addr"][0, :4] = s, 4, list(ipaddress.IPv4Address(a).packed)
    slot = int(index_slot(key)[0])
    ix = fm.index()

    def from_the_copy_alone() -> bool:
        """Does the slot's copy answer by itself? (hw_fqdn's entry removed behind FqdnMaps' back, as
        test_index_never_changes_an_answer does; put back after.)"""
        raw = bpfsys.map_lookup(harness.dp.map_fds["hw_fqdn"], key.tobytes(), 16)
        bpfsys.map_delete(harness.dp.map_fds["hw_fqdn"], key.tobytes())
        o = harness.run("tc_egress", frame(Packet("egress", 4, "10.9.9.9", a, 6, 40000, 443), flags="A"))
        harness.dp.clear_conntrack()
        bpfsys.map_update(harness.dp.map_fds["hw_fqdn"], key.tobytes(), raw)
        return o.verdict == "allow"

    ix["seq"][slot] |= 1                                # killed mid-write
    assert fm.set_put(s, a, NOW + 10, NOW)
    assert int(ix["seq"][slot]) % 2 == 0 and ix["key"][slot].tobytes() == key.tobytes() and from_the_copy_alone()
    ix["seq"][slot] |= 1
    assert fm.rebuild_index() == 1
    assert int(ix["seq"][slot]) % 2 == 0 and from_the_copy_alone()
    assert int((ix["seq"] % 2).sum()) == 0
    assert fm.set_delete(s, a) and int(ix["entries"].sum()) == 0
    fm.close()
