"""Compile a Policy into the datapath's classification tables (bit-vector first match).

Two fields classify a packet: its peer address and its (direction, protocol, destination port). For
each field the axis of possible values is cut into elementary intervals; all values of an interval
match exactly the same rules, its *class*. A class is stored once as a bitmap over rule order. The
datapath looks up both classes, ANDs the bitmaps and takes the lowest set bit: the first match.

Cost: O((P + R) log(P + R) + C x R/64) for P prefixes, R rules and C classes: classes come from
128-bit signatures of the elementary intervals, bitmaps from one representative interval per class
(see classify), never an E x R/64 matrix over the E elementary intervals. About 0.1 s for the max
policy (4096 rules + 100k IPv4 + 10k IPv6 prefixes, ~2 x 10^5 intervals) on an idle core; everything
but the IPv6 ranking is NumPy-vectorised.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import numpy as np

from hostwall.bpf import layout as L

from . import peertables, xmatch
from .classify import Classes, CompileError, classify, refine, start_keys
from .compile_memo import AxisMemo, LastCompile, same
from .policy import ESSENTIAL_ICMP, DosProfile, PeerSet, Policy, Rule


@dataclass(frozen=True)
class CompiledPolicy:
    hdr: np.ndarray             # hw_policy_hdr, shape (1,)
    rules: np.ndarray           # hw_rule per rule order
    peer_cls: np.ndarray        # hw_class
    l4_cls: np.ndarray          # hw_class
    top4: np.ndarray            # hw_top, TOP_SIZE (dense buckets point into sub4: enforcer/peertables.py)
    iv4: np.ndarray             # hw_iv4
    top6: np.ndarray            # hw_top, TOP_SIZE
    iv6: np.ndarray             # hw_iv6
    sub4: np.ndarray            # hw_top, SUB_SIZE: the dense IPv4 buckets' second level
    sub6: np.ndarray            # hw_top, SUB_SIZE
    l4: np.ndarray              # hw_l4_elem, L4_ELEMS
    rule_names: tuple[str, ...]
    dos_profiles: np.ndarray    # hw_dos_profile, HW_DOS_PROFILES_MAX (id = position in dos_profile_names)
    dos_ifs: np.ndarray         # hw_dos_if, HW_DOS_IF_SLOTS (ifindex → profile id, open addressing)
    dos_profile_names: tuple[str, ...] = ()
    fqdn_rules: np.ndarray | None = None    # hw_fqdn_rule per fqdns rule, in rule order
    fqdn_l4: np.ndarray | None = None       # hw_fqdn_l4 per L4 class
    xmatch: np.ndarray | None = None        # hw_xm_elem: the first-match table (None: over the cap, the scan)

    def describe(self) -> dict:
        return {"rules": len(self.rule_names), "peer_classes": len(self.peer_cls), "l4_classes": len(self.l4_cls),
                "v4_intervals": len(self.iv4), "v6_intervals": len(self.iv6),
                "xmatch_cells": int(self.hdr["xm_stride"][0]) * len(self.l4_cls)}


# ---- fields -------------------------------------------------------------------------------------

def _v4_classes(rules: tuple[Rule, ...]) -> Classes:
    """The rules' IPv4 prefixes gathered in rule order, then converted in one vectorised pass (not
    three small NumPy operations per rule: ~40 ms for the max policy's 3000 rules with inline peers).
    Rules with BIG_LIST prefixes or more are classified apart and kept (_big_classes)."""
    nets, lens, orders, counts, any_rules, big = [], [], [], [], [], []
    for order, rule in enumerate(rules):
        if rule.fqdns is not None:                # in no peer class: the dynamic set decides (fqdn tables)
            continue
        ps = rule.peers
        if ps.any:
            any_rules.append(order)
        elif (n := len(ps.v4_net)) >= BIG_LIST:
            big.append(order)
        elif n:
            nets.append(ps.v4_net)
            lens.append(ps.v4_len)
            orders.append(order)
            counts.append(n)
    c = classify(len(rules), *_v4_ranges(nets, lens, orders, counts), any_rules, 1 << 32)
    return _with_big(c, rules, big, 4)


def _v4_ranges(nets: list, lens: list, orders: list[int],
               counts: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    own = np.repeat(np.asarray(orders, dtype=np.int64), counts)
    start = _cat(nets, np.uint32).astype(np.uint64)
    end = start + np.left_shift(np.uint64(1), np.uint64(32) - _cat(lens, np.uint8).astype(np.uint64))
    return own, start, end


def _v6_classes(rules: tuple[Rule, ...]) -> Classes:
    own: list[int] = []
    start: list[int] = []
    end: list[int] = []
    any_rules, big = [], []
    for order, rule in enumerate(rules):
        if rule.fqdns is not None:
            continue
        ps = rule.peers
        if ps.any:
            any_rules.append(order)
        elif len(ps.v6_net) >= BIG_LIST:
            big.append(order)
        elif ps.v6_net:
            _v6_ranges(ps, order, own, start, end)
    return _with_big(classify(len(rules), own, start, end, any_rules, 1 << 128), rules, big, 6)


def _v6_ranges(ps, order: int, own: list[int], start: list[int], end: list[int]) -> None:
    own.extend([order] * len(ps.v6_net))
    start.extend(ps.v6_net)
    end.extend([n + (1 << (128 - ln)) for n, ln in zip(ps.v6_net, ps.v6_len)])


# A rule with this many prefixes of one family (a blocklist from a peers file) is classified apart:
# its classes are kept (_BIG_MEMO) and refined with the other rules' (classify.refine), so a new
# policy over the same blocklists classifies only its inline peers (docs/datapath.md "Atomic swaps").
BIG_LIST = 4096


def _with_big(rest: Classes, rules: tuple[Rule, ...], big: list[int], family: int) -> Classes:
    """`rest` (the classes of every other rule) refined with those of the big-list rules `big`."""
    if not big:
        return rest
    sets = tuple(rules[o].peers for o in big)
    key = tuple(_FamilyOf(ps, family) for ps in sets)
    part, keys = _BIG_MEMO.get_or_compute(key, lambda: _big_classes(sets, family))
    return refine(part, keys, big, rest)


@dataclass(frozen=True, eq=False)
class _FamilyOf:
    """One family's prefixes of a PeerSet as a memo key: the same object (a peers file served from
    policy.py's cache), else equal arrays of that family (a file whose other family changed still hits)."""
    peers: PeerSet
    family: int

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, _FamilyOf) or other.family != self.family:
            return False
        a, b = self.peers, other.peers
        if a is b:
            return True
        if self.family == 4:
            return a.v4_net.tobytes() == b.v4_net.tobytes() and a.v4_len.tobytes() == b.v4_len.tobytes()
        return a.v6_net == b.v6_net and a.v6_len == b.v6_len

    __hash__ = None     # type: ignore[assignment]   # compared, never hashed (AxisMemo)


def _big_classes(sets: tuple, family: int) -> tuple[Classes, np.ndarray]:
    """Classes of the big lists alone, rule i = sets[i] (refine maps them to their rule orders), and
    their start keys for refine."""
    if family == 4:
        nets = [ps.v4_net for ps in sets]
        ranges = _v4_ranges(nets, [ps.v4_len for ps in sets], list(range(len(sets))), [len(n) for n in nets])
        c = classify(len(sets), *ranges, [], 1 << 32)
    else:
        own: list[int] = []
        start: list[int] = []
        end: list[int] = []
        for i, ps in enumerate(sets):
            _v6_ranges(ps, i, own, start, end)
        c = classify(len(sets), own, start, end, [], 1 << 128)
    return c, start_keys(c)


def _l4_classes(rules: tuple[Rule, ...], spans: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Classes:
    """Classes over the (direction, protocol, key) axis: the key is the destination port for tcp/udp
    and type << 8 | code for icmp/icmpv6 (enforcer/icmp.py), so icmp_types cost the datapath nothing
    more than ports do: one load from the dense hw_l4 table. spans: _l4_spans(rules) if known."""
    own, start, end = spans if spans is not None else _l4_spans(rules)
    return classify(len(rules), own, start, end, [], 2 * L.PROTO_IDX_MAX * 65536)


def _l4_spans(rules: tuple[Rule, ...], first: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(owner, start, end) of every rule's ranges on the L4 axis, in rule order; owners from `first`."""
    start: list[int] = []
    end: list[int] = []
    counts: list[int] = []
    memo = _SPANS
    for rule in rules:
        key = _l4_key(rule)
        se = memo.get(key)
        if se is None:
            if len(memo) >= 4 * L.MAX_RULES:
                memo.clear()
            se = memo[key] = _rule_l4_spans(*key)
        start += se[0]
        end += se[1]
        counts.append(len(se[0]))
    own = np.repeat(np.arange(first, first + len(rules), dtype=np.int64), counts)
    return own, np.asarray(start, dtype=np.uint64), np.asarray(end, dtype=np.uint64)


def _patch_spans(old: tuple[np.ndarray, np.ndarray, np.ndarray], rules: tuple[Rule, ...], changed: list[int]):
    """_l4_spans(rules) from the spans of a rule list that differs at the `changed` indexes only."""
    own, start, end = old
    bounds = np.searchsorted(own, np.asarray(changed, dtype=np.int64))
    stops = np.searchsorted(own, np.asarray(changed, dtype=np.int64), side="right")
    pieces: list[tuple[np.ndarray, ...]] = []
    at = 0
    for i, lo, hi in zip(changed, bounds.tolist(), stops.tolist()):
        pieces.append((own[at:lo], start[at:lo], end[at:lo]))
        pieces.append(_l4_spans(rules[i:i + 1], i))
        at = hi
    pieces.append((own[at:], start[at:], end[at:]))
    return tuple(np.concatenate([p[k] for p in pieces]) for k in range(3))


_SPANS: dict[tuple, tuple[list[int], list[int]]] = {}    # _rule_l4_spans by its arguments


def _rule_l4_spans(direction: str, protocol: str, ports, icmp_types) -> tuple[list[int], list[int]]:
    """[start, end) ranges of one rule on the L4 axis (memoised in _SPANS: most rules of a re-apply are
    unchanged)."""
    d = L.DIR[direction]
    if ports is not None:
        protos: list[str] = ["tcp", "udp"] if protocol == "any" else [protocol]
        spans = ports
    elif icmp_types is not None:              # validation: only on icmp / icmpv6 rules
        protos = [protocol]
        spans = icmp_types
    else:
        protos = list(L.PROTO_IDX) if protocol == "any" else [protocol]
        spans = ((0, 65535),)
    starts: list[int] = []
    ends: list[int] = []
    for p in protos:
        base = L.l4_key(d, L.PROTO_IDX[p], 0)
        for lo, hi in spans:
            starts.append(base + lo)
            ends.append(base + hi + 1)
    return starts, ends


def _dos_profile_record(p: DosProfile) -> np.void:
    rec = np.zeros(1, dtype=L.DTYPES["hw_dos_profile"])[0]
    rec["pps"] = p.per_source_pps or 0
    rec["burst"] = p.per_source_burst or p.per_source_pps or 0          # default: one second worth
    rec["bps"] = p.per_source_bps or 0
    rec["bps_fp"] = (rec["bps"] << 20) // 1_000_000
    # bits burst: 100 ms worth (the datapath refills at most 100 ms at once), at least 8 full frames
    rec["bps_burst"] = max((p.per_source_bps or 0) // 10, 8 * 1514 * 8) if p.per_source_bps else 0
    rec["syn_pps"] = p.syn_per_source_pps or 0
    rec["syn_global_pps"] = p.syn_global_pps or 0
    rec["udp_pps"] = p.udp_per_source_pps or 0
    rec["icmp_pps"] = p.icmp_per_source_pps or 0
    if p.ban_after_s and p.ban_duration_s:
        rec["ban_after_ns"] = int(p.ban_after_s * 1e9)
        rec["ban_ns"] = int(p.ban_duration_s * 1e9)
    rec["prefix_v4"], rec["prefix_v6"] = p.source_prefix_v4, p.source_prefix_v6
    if len(p.ports) > L.C["HW_DOS_PORTS_MAX"]:
        raise CompileError(f"DoS profile {p.name!r} has {len(p.ports)} port limits; the datapath holds "
                           f"{L.C['HW_DOS_PORTS_MAX']}")
    rec["nports"] = len(p.ports)
    for i, (port, proto, pps) in enumerate(p.ports):
        rec["ports"][i] = (port, 6 if proto == "tcp" else 17, 0, pps)
    _syn_proxy_fields(rec, p)
    rec["enabled"] = 1
    return rec


DEFAULT_AUTO_PORT_PPS = 1000         # auto without per_port_pps: SYNs/s to one port that turn the proxy on
DEFAULT_AUTO_PRESSURE = 1000         # auto without proxy_pressure: conntrack evictions/s that turn it on


def _syn_proxy_fields(rec: np.void, p: DosProfile) -> None:
    """The per-port SYN rate and the SYN proxy of a profile (docs/dos.md). `auto` always has both
    triggers: the per-port rate (per_port_pps, default DEFAULT_AUTO_PORT_PPS) and table pressure."""
    auto = p.syn_proxy == "auto"
    rec["syn_port_pps"] = p.syn_per_port_pps or (DEFAULT_AUTO_PORT_PPS if auto else 0)
    rec["proxy"] = L.SYN_PROXY_MODES[p.syn_proxy]
    rec["proxy_quiet_ns"] = int(p.syn_proxy_quiet_s * 1e9)
    rec["proxy_pressure"] = (p.syn_proxy_pressure or DEFAULT_AUTO_PRESSURE) if auto else 0
    rec["proxy_mss"] = p.syn_proxy_mss
    rec["proxy_full"] = p.syn_proxy_options == "full"
    rec["proxy_wscale"] = p.syn_proxy_wscale
    ranges = p.syn_proxy_ports or ()
    if len(ranges) > L.C["HW_PROXY_RANGES_MAX"]:
        raise CompileError(f"DoS profile {p.name!r}: {len(ranges)} SYN proxy port ranges; the datapath holds "
                           f"{L.C['HW_PROXY_RANGES_MAX']}")
    rec["nproxy_ranges"] = len(ranges)
    for i, (lo, hi) in enumerate(ranges):
        rec["proxy_ranges"][i] = (lo, hi)


def compile_dos(policy: Policy, interfaces: dict[int, str]) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """DoS tables of one generation. interfaces: ifindex → profile name for the attached interfaces."""
    names = tuple(sorted(policy.dos_profiles))
    if len(names) > L.C["HW_DOS_PROFILES_MAX"]:
        raise CompileError(f"{len(names)} DoS profiles; the datapath holds {L.C['HW_DOS_PROFILES_MAX']}")
    profiles = np.zeros(L.C["HW_DOS_PROFILES_MAX"], dtype=L.DTYPES["hw_dos_profile"])
    for i, n in enumerate(names):
        profiles[i] = _dos_profile_record(policy.dos_profiles[n])
    slots = L.C["HW_DOS_IF_SLOTS"]
    ifs = np.zeros(slots, dtype=L.DTYPES["hw_dos_if"])
    for ifindex, prof in sorted(interfaces.items()):
        for probe in range(L.C["HW_DOS_IF_PROBES"]):
            s = (ifindex + probe) % slots
            if ifs[s]["ifindex"] == 0:
                ifs[s] = (ifindex, names.index(prof))
                break
        else:
            raise CompileError(f"too many interfaces share DoS table slots near ifindex {ifindex}")
    return profiles, ifs, names


def fqdn_lists(policy: Policy) -> list[tuple[str, ...]]:
    """The distinct fqdns lists of the policy's rules, in rule order: each names one dynamic set."""
    return list(dict.fromkeys(r.fqdns for r in policy.rules if r.fqdns is not None))


def _fqdn_tables(fq: list[tuple[int, Rule]], l4_bitmaps: np.ndarray, sets: dict[tuple[str, ...], int]):
    """hw_fqdn_rules (the fqdns rules `fq`, (order, rule) in rule order, with their set) and hw_fqdn_l4 (per
    L4 class, bit i when the i-th fqdns rule is in the class, and the first such rule's order and set),
    docs/datapath.md "FQDN rules". Cost:
    O(fqdns rules x classes)."""
    if len(fq) > L.FQDN_RULES_MAX:
        raise CompileError(f"{len(fq)} rules with fqdns; the datapath holds {L.FQDN_RULES_MAX}: merge the fqdns "
                           "lists of rules with the same action, protocol and ports")
    recs = np.zeros(len(fq), dtype=L.DTYPES["hw_fqdn_rule"])
    l4 = np.zeros(len(l4_bitmaps), dtype=L.DTYPES["hw_fqdn_l4"])
    words = l4_bitmaps["words"]
    for i, (order, r) in enumerate(fq):
        if r.fqdns not in sets:
            raise CompileError(f"rule {r.name!r}: no dynamic set for its fqdns list (internal error)")
        recs[i] = (order, sets[r.fqdns])
        bit = (words[:, order // 64] >> np.uint64(order % 64)) & np.uint64(1)
        first = (bit != 0) & (l4["rules"] == 0)         # the class's first candidate: inlined (order0, set0)
        l4["order0"][first] = order
        l4["set0"][first] = recs[i]["set"]
        l4["rules"] |= bit << np.uint64(i)
    return recs, l4


# the last two inputs of each axis (docs/benchmarks.md "swap"): a re-apply that changes a rule's
# ports or action reuses the peer axis, one that changes only actions reuses both
_PEER_MEMO = AxisMemo()
_L4_MEMO = AxisMemo()
_LAST = LastCompile()
# classes of the big lists (_with_big): the last 4 (family, lists) keys, i.e. 2 blocklist sets per family,
# each holding its prefixes' classes (~1 KB per 100 prefixes): 3.4 MB for the max policy's two (100k IPv4,
# 10k IPv6 prefixes) (docs/datapath.md)
_BIG_MEMO = AxisMemo(4)


def clear_memo() -> None:
    """Forget the memoised axes (benchmarks of a cold compile)."""
    _PEER_MEMO.clear()
    _L4_MEMO.clear()
    _LAST.clear()
    _SPANS.clear()
    _BIG_MEMO.clear()
    xmatch.clear_memo()


def _peer_axis(rules: tuple[Rule, ...]):
    """(peer_cls, top4, iv4, top6, iv6, sub4, sub6): one peer-class space for both families, v6 classes after v4."""
    c4 = _v4_classes(rules)
    c6 = _v6_classes(rules)
    peer_cls = np.concatenate([c4.bitmaps, c6.bitmaps])
    if len(peer_cls) > L.PEER_CLASSES_MAX:
        raise CompileError(f"{len(peer_cls)} distinct peer sets; the datapath holds {L.PEER_CLASSES_MAX}")
    top4, sub4, iv4 = peertables.v4_tables(c4, 0)
    top6, sub6, iv6 = peertables.v6_tables(c6, len(c4.bitmaps))
    if len(iv4) > L.V4_INTERVALS_MAX or len(iv6) > L.V6_INTERVALS_MAX:
        raise CompileError(f"{len(iv4)} IPv4 / {len(iv6)} IPv6 address intervals; the datapath holds "
                           f"{L.V4_INTERVALS_MAX} / {L.V6_INTERVALS_MAX} (about half as many prefixes)")
    return peer_cls, top4, iv4, top6, iv6, sub4, sub6


def _l4_axis(rules: tuple[Rule, ...], spans=None, prev: Classes | None = None):
    """(L4 classes, the dense hw_l4 table, the rules' L4 spans). With `prev`, classes keep prev's ids
    (_keep_ids), so a changed rule rewrites only the table entries whose class changed."""
    spans = spans if spans is not None else _l4_spans(rules)
    cl4 = _l4_classes(rules, spans)
    if prev is not None and max(len(cl4.bitmaps), len(prev.bitmaps)) <= L.L4_CLASSES_MAX:
        cl4 = _keep_ids(cl4, prev)
    if len(cl4.bitmaps) > L.L4_CLASSES_MAX:
        raise CompileError(f"{len(cl4.bitmaps)} distinct protocol/port sets; the datapath holds {L.L4_CLASSES_MAX}")
    starts = np.asarray(cl4.starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, 2 * L.PROTO_IDX_MAX * 65536))
    dense = np.repeat(cl4.cls.astype(np.uint16), lengths)
    l4 = np.zeros(L.L4_ELEMS, dtype=L.DTYPES["hw_l4_elem"])
    l4["cls"] = dense.reshape(L.L4_ELEMS, L.L4_SLOTS_PER_ELEM)
    return cl4, l4, spans


def _keep_ids(new: Classes, prev: Classes) -> Classes:
    """`new` renumbered so that a class with the same rule set as a class of `prev` keeps its id; other
    classes take the ids prev's vanished classes left, then new ids at the end (those vacated and not
    reused keep their old bitmap: no interval points to them). Cost: one dict over the classes."""
    old_ids = {b.tobytes(): i for i, b in enumerate(prev.bitmaps)}
    keys = [b.tobytes() for b in new.bitmaps]
    ids = [old_ids.get(k, -1) for k in keys]
    free = sorted(set(range(len(prev.bitmaps))) - set(ids))[::-1]
    n = len(prev.bitmaps)
    for j, i in enumerate(ids):
        if i < 0:
            ids[j] = free.pop() if free else n
            n += ids[j] == n
    bitmaps = np.zeros(n, dtype=prev.bitmaps.dtype)
    bitmaps[: len(prev.bitmaps)] = prev.bitmaps
    idx = np.asarray(ids, dtype=np.int64)
    bitmaps[idx] = new.bitmaps
    return Classes(starts=new.starts, cls=idx.astype(np.uint32)[new.cls], bitmaps=bitmaps)


def _toggle_l4(axis, rules: tuple[Rule, ...], changed: list[int]):
    """The L4 axis after the rules at `changed` changed their spans, from the previous axis: only the
    keys inside a changed rule's old or new spans move, each to the class of its old rule set with that
    rule's bit set or cleared (an existing class if one has that set, else a new one). Cost:
    O(keys moved + classes), no classification. Classes no key uses any more stay in the table; None
    when the table would outgrow L4_CLASSES_MAX (the caller then classifies afresh). The result's
    Classes has no intervals (starts, cls): the dense table is the axis."""
    cl4, l4, spans = axis
    new_spans = _patch_spans(spans, rules, changed)
    dense = l4["cls"].reshape(-1).copy()
    recs = list(cl4.bitmaps)
    index = {r.tobytes(): i for i, r in enumerate(recs)}
    for k in changed:
        pieces = []
        for own, start, end in (spans, new_spans):
            lo, hi = np.searchsorted(own, [k, k + 1])
            pieces.append([(int(a), int(b)) for a, b in zip(start[lo:hi], end[lo:hi])])
        keys = np.unique(np.concatenate([np.arange(a, b) for a, b in pieces[0] + pieces[1]]))
        inside = np.zeros(len(keys), dtype=bool)
        for a, b in pieces[1]:
            inside |= (keys >= a) & (keys < b)
        combo = dense[keys].astype(np.int64) * 2 + inside
        uniq, inv = np.unique(combo, return_inverse=True)
        word, bit = k // 64, np.uint64(1) << np.uint64(k % 64)
        target = np.empty(len(uniq), dtype=np.int64)
        for j, c in enumerate(uniq.tolist()):
            rec = recs[c >> 1].copy()
            rec["words"][word] = (rec["words"][word] | bit) if c & 1 else (rec["words"][word] & ~bit)
            summary = np.uint64(1) << np.uint64(word)
            rec["summary"] = (rec["summary"] | summary) if rec["words"][word] else (rec["summary"] & ~summary)
            target[j] = index.setdefault(rec.tobytes(), len(recs))
            if target[j] == len(recs):
                recs.append(rec)
        dense[keys] = target[inv.reshape(-1)]
    if len(recs) > L.L4_CLASSES_MAX:
        return None
    out = np.zeros(L.L4_ELEMS, dtype=L.DTYPES["hw_l4_elem"])
    out["cls"] = dense.reshape(L.L4_ELEMS, L.L4_SLOTS_PER_ELEM)
    bitmaps = np.array(recs, dtype=cl4.bitmaps.dtype)
    return Classes(starts=np.zeros(0, np.uint64), cls=np.zeros(0, np.uint32), bitmaps=bitmaps), out, new_spans


def _peer_key(r: Rule):
    return None if r.fqdns is not None else r.peers


# what the L4 axis reads of a rule: (direction, protocol, ports, icmp_types), by one C call a rule
_l4_key = operator.attrgetter("direction", "protocol", "ports", "icmp_types")


def _same_rule(a: Rule, b: Rule) -> bool:
    """Equal for the compile: every field it reads (not the rule's line or file position)."""
    return (a.name == b.name and a.action == b.action and _l4_key(a) == _l4_key(b) and a.fqdns == b.fqdns
            and same(a.peers, b.peers))


def _axes(rules: tuple[Rule, ...], slots: dict[str, int]):
    """(peer axis, L4 axis, hw_rule records, rule names, orders of the fqdns rules): patched from the
    last compile when only a few rules changed (docs/benchmarks.md "swap"), else from the memos, else
    computed. The patch path makes no pass over all rules but the identity check."""
    last = _LAST.changed(rules, _same_rule)
    if last is not None:
        prev, changed, (peer, l4, recs, prev_slots, names, fq) = last
        if all(same(_peer_key(prev[i]), _peer_key(rules[i])) for i in changed):
            if not all(same(_l4_key(prev[i]), _l4_key(rules[i])) for i in changed):
                l4 = _toggle_l4(l4, rules, changed) or _l4_axis(rules, _patch_spans(l4[2], rules, changed),
                                                                 prev=l4[0])
            if slots != prev_slots:
                recs = _rule_records(rules, slots)
            elif changed:
                recs = recs.copy()
                for i in changed:
                    recs["slot"][i], recs["action"][i] = slots[rules[i].name], L.ACTION[rules[i].action]
            if any(prev[i].name != rules[i].name for i in changed):
                names = tuple(r.name for r in rules)
            if any(prev[i].fqdns is not None or rules[i].fqdns is not None for i in changed):
                fq = tuple(order for order, r in enumerate(rules) if r.fqdns is not None)
            out = (peer, l4, recs, dict(slots), names, fq)
            _LAST.save(rules, out)
            return out
    peer = _PEER_MEMO.get_or_compute(tuple(map(_peer_key, rules)), lambda: _peer_axis(rules))
    l4 = _L4_MEMO.get_or_compute(tuple(map(_l4_key, rules)), lambda: _l4_axis(rules))
    out = (peer, l4, _rule_records(rules, slots), dict(slots), tuple(r.name for r in rules),
           tuple(order for order, r in enumerate(rules) if r.fqdns is not None))
    _LAST.save(rules, out)
    return out


def _rule_records(rules: tuple[Rule, ...], slots: dict[str, int]) -> np.ndarray:
    recs = np.zeros(len(rules), dtype=L.DTYPES["hw_rule"])
    recs["slot"] = [slots[r.name] for r in rules]
    recs["action"] = [L.ACTION[r.action] for r in rules]
    return recs


def compile_policy(policy: Policy, slots: dict[str, int], revision_id: int,
                   dos_interfaces: dict[int, str] | None = None,
                   fqdn_sets: dict[tuple[str, ...], int] | None = None) -> CompiledPolicy:
    """Build every table of one policy generation. slots: rule name -> counter slot (stable), and
    the pseudo-rule essential_icmp's slot (Policy.counter_names(); without one, essential ICMP is
    counted by reason only); dos_interfaces: ifindex -> DoS profile name of each attached interface
    that has one; fqdn_sets: fqdns list -> dynamic set id (stable across swaps, allocated by the caller;
    default: 1, 2, ... in rule order)."""
    rules = policy.rules
    if len(rules) > L.MAX_RULES:
        raise CompileError(f"{len(rules)} rules; the datapath holds at most {L.MAX_RULES}")
    peer_axis, (cl4, l4, _), rule_recs, _, names, fq = _axes(rules, slots)
    peer_cls, top4, iv4, top6, iv6, sub4, sub6 = peer_axis
    hdr = np.zeros(1, dtype=L.DTYPES["hw_policy_hdr"])
    d = policy.defaults
    hdr["revision_id"] = revision_id
    hdr["nrules"] = len(rules)
    hdr["default_ingress"] = L.ACTION[d.ingress]
    hdr["default_egress"] = L.ACTION[d.egress]
    hdr["stateful"] = d.stateful
    hdr["audit"] = d.audit
    hdr["ct_unconfirmed_s"] = int(round(policy.unconfirmed_timeout_s or 0))      # 0: the datapath's default
    hdr["essential_icmp"] = d.essential_icmp
    hdr["essential_slot"] = slots.get(ESSENTIAL_ICMP, L.NO_SLOT) if d.essential_icmp else L.NO_SLOT
    dos_profiles, dos_ifs, dos_names = compile_dos(policy, dos_interfaces or {})
    if fqdn_sets is None:
        fqdn_sets = {lst: i + 1 for i, lst in enumerate(dict.fromkeys(rules[o].fqdns for o in fq))}
    fq_rules, fq_l4 = _fqdn_tables([(o, rules[o]) for o in fq], cl4.bitmaps, fqdn_sets)
    hdr["fqdn_rules"] = len(fq_rules)
    xm, hdr["xm_stride"] = xmatch.table(peer_cls, cl4.bitmaps)
    return CompiledPolicy(hdr=hdr, rules=rule_recs, peer_cls=peer_cls, l4_cls=cl4.bitmaps, top4=top4, iv4=iv4,
                          top6=top6, iv6=iv6, l4=l4, rule_names=names,
                          dos_profiles=dos_profiles, dos_ifs=dos_ifs, dos_profile_names=dos_names,
                          fqdn_rules=fq_rules, fqdn_l4=fq_l4, xmatch=xm, sub4=sub4, sub6=sub6)


def _cat(xs: list, dt) -> np.ndarray:
    return np.concatenate(xs) if xs else np.zeros(0, dt)
