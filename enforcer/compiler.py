"""Compile a Policy into the datapath's classification tables (bit-vector first match).

Two fields classify a packet: its peer address and its (direction, protocol, destination port). For
each field the axis of possible values is cut into elementary intervals; all values of an interval
match exactly the same rules, its *class*. A class is stored once as a bitmap over rule order. The
datapath looks up both classes, ANDs the bitmaps and takes the lowest set bit: the first match.

Cost: O((P + R) log(P + R)) for P prefixes and R rules, plus an E x R/64 word XOR scan over the E
elementary intervals (about 0.2 s for 4096 rules + 100k prefixes). Everything is NumPy-vectorised.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import layout as L
from .policy import DosProfile, Policy, Rule

_HASH_SEED = 0x5EED


class CompileError(Exception):
    """The policy is valid but exceeds a datapath capacity (message says which and by how much)."""


@dataclass(frozen=True)
class Classes:
    starts: list | np.ndarray   # sorted interval starts; starts[0] == 0
    cls: np.ndarray             # class id per interval (uint32)
    bitmaps: np.ndarray         # hw_class records, one per class


@dataclass(frozen=True)
class CompiledPolicy:
    hdr: np.ndarray             # hw_policy_hdr, shape (1,)
    rules: np.ndarray           # hw_rule per rule order
    peer_cls: np.ndarray        # hw_class
    l4_cls: np.ndarray          # hw_class
    top4: np.ndarray            # hw_top, TOP_SIZE
    iv4: np.ndarray             # hw_iv4
    top6: np.ndarray            # hw_top, TOP_SIZE
    iv6: np.ndarray             # hw_iv6
    l4: np.ndarray              # hw_l4_elem, L4_ELEMS
    rule_names: tuple[str, ...]
    dos_profiles: np.ndarray    # hw_dos_profile, HW_DOS_PROFILES_MAX (id = position in dos_profile_names)
    dos_ifs: np.ndarray         # hw_dos_if, HW_DOS_IF_SLOTS (ifindex → profile id, open addressing)
    dos_profile_names: tuple[str, ...] = ()

    def describe(self) -> dict:
        return {"rules": len(self.rule_names), "peer_classes": len(self.peer_cls), "l4_classes": len(self.l4_cls),
                "v4_intervals": len(self.iv4), "v6_intervals": len(self.iv6)}


# ---- generic interval classification ------------------------------------------------------------

def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a bijection on uint64 whose every output bit depends on every input bit."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        x = x ^ (x >> np.uint64(27))
        x = x * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _row_hash(m: np.ndarray) -> np.ndarray:
    """64-bit hash per row (sum of mixed, column-salted words). Collisions are checked by the caller."""
    salt = np.random.default_rng(_HASH_SEED).integers(0, 2**63, size=m.shape[1], dtype=np.uint64)
    with np.errstate(over="ignore"):
        return _mix64(m ^ salt).sum(axis=1, dtype=np.uint64)


def _class_records(rows: np.ndarray) -> np.ndarray:
    recs = np.zeros(len(rows), dtype=L.DTYPES["hw_class"])
    recs["words"][:, : rows.shape[1]] = rows
    nz = rows != 0
    weights = np.left_shift(np.uint64(1), np.arange(rows.shape[1], dtype=np.uint64))
    recs["summary"] = (nz * weights).sum(axis=1, dtype=np.uint64)
    return recs


def _merge_per_owner(own: np.ndarray, start: np.ndarray, end: np.ndarray):
    """Merge overlapping [start, end) ranges of the same owner (vectorised; values < 2**40)."""
    o = np.lexsort((start, own))
    own, start, end = own[o], start[o], end[o]
    base = own.astype(np.uint64) << np.uint64(41)
    run = np.maximum.accumulate(base + end)
    new = np.ones(len(own), dtype=bool)
    new[1:] = (base[1:] + start[1:]) > run[:-1]
    grp = np.cumsum(new) - 1
    m_end = np.zeros(int(grp[-1]) + 1, dtype=np.uint64)
    np.maximum.at(m_end, grp, end)
    return own[new], start[new], m_end


def _merge_big(own: list[int], start: list[int], end: list[int]):
    """_merge_per_owner for values beyond 64 bits (IPv6), in Python: v6 lists are short in practice."""
    out_o, out_s, out_e = [], [], []
    for o, s, e in sorted(zip(own, start, end)):
        if out_o and out_o[-1] == o and s <= out_e[-1]:
            out_e[-1] = max(out_e[-1], e)
        else:
            out_o.append(o); out_s.append(s); out_e.append(e)
    return out_o, out_s, out_e


def classify(n_rules: int, own, start, end, any_rules: list[int], axis_end: int) -> Classes:
    """Cut [0, axis_end) into intervals of equal matching-rule sets.

    Rule own[i] matches [start[i], end[i]) (ranges may overlap; merged per rule first so that XOR
    toggling is exact); any_rules match the whole axis. Up to 2**40 the work is NumPy-vectorised;
    wider axes (IPv6) rank their values in Python first."""
    words = max(1, (n_rules + 63) // 64)
    big = axis_end > 2**40
    if big:
        own, start, end = _merge_big(list(own), list(start), list(end))
        pts = sorted({0, *start, *(e for e in end if e < axis_end)})
        rank = {v: i for i, v in enumerate(pts)}
        s_idx = np.fromiter((rank[v] for v in start), dtype=np.int64, count=len(start))
        e_idx = np.fromiter((rank.get(v, len(pts)) for v in end), dtype=np.int64, count=len(end))
        starts: list | np.ndarray = pts
        rr = np.asarray(own, dtype=np.int64)
    else:
        own = np.asarray(own, dtype=np.int64)
        start = np.asarray(start, dtype=np.uint64)
        end = np.asarray(end, dtype=np.uint64)
        if len(own):
            own, start, end = _merge_per_owner(own, start, end)
        starts = np.unique(np.concatenate([np.zeros(1, np.uint64), start, end[end < np.uint64(axis_end)]]))
        s_idx = np.searchsorted(starts, start).astype(np.int64)
        e_idx = np.searchsorted(starts, end).astype(np.int64)
        rr = own
    n = len(starts)
    # toggles at range bounds, XOR-prefix-scan -> membership bitmap per interval
    tog = np.zeros((n + 1, words), dtype=np.uint64)
    bits = np.left_shift(np.uint64(1), (rr % 64).astype(np.uint64))
    np.bitwise_xor.at(tog, (s_idx, rr // 64), bits)
    np.bitwise_xor.at(tog, (e_idx, rr // 64), bits)
    member = np.bitwise_xor.accumulate(tog[:n], axis=0)
    for r in any_rules:
        member[:, r // 64] |= np.uint64(1) << np.uint64(r % 64)
    # drop intervals equal to their predecessor, then number the distinct rule sets
    keep = np.ones(n, dtype=bool)
    keep[1:] = (member[1:] != member[:-1]).any(axis=1)
    member = member[keep]
    starts = [v for v, k in zip(starts, keep) if k] if big else starts[keep]
    h = _row_hash(member)
    _, rep, inv = np.unique(h, return_index=True, return_inverse=True)
    rows = member[rep]
    if not np.array_equal(rows[inv], member):          # hash collision: exact (slower) path
        rows, inv = np.unique(member, axis=0, return_inverse=True)
    return Classes(starts=starts, cls=inv.astype(np.uint32).ravel(), bitmaps=_class_records(rows))


# ---- fields -------------------------------------------------------------------------------------

def _v4_classes(rules: tuple[Rule, ...]) -> Classes:
    own, start, end, any_rules = [], [], [], []
    for order, rule in enumerate(rules):
        ps = rule.peers
        if ps.any:
            any_rules.append(order)
        elif len(ps.v4_net):
            net = ps.v4_net.astype(np.uint64)
            own.append(np.full(len(net), order, dtype=np.int64))
            start.append(net)
            end.append(net + np.left_shift(np.uint64(1), np.uint64(32) - ps.v4_len.astype(np.uint64)))
    cat = lambda xs, dt: np.concatenate(xs) if xs else np.zeros(0, dt)
    return classify(len(rules), cat(own, np.int64), cat(start, np.uint64), cat(end, np.uint64), any_rules, 1 << 32)


def _v6_classes(rules: tuple[Rule, ...]) -> Classes:
    own, start, end, any_rules = [], [], [], []
    for order, rule in enumerate(rules):
        ps = rule.peers
        if ps.any:
            any_rules.append(order)
            continue
        for n, ln in zip(ps.v6_net, ps.v6_len):
            own.append(order); start.append(n); end.append(n + (1 << (128 - ln)))
    return classify(len(rules), own, start, end, any_rules, 1 << 128)


def _l4_classes(rules: tuple[Rule, ...]) -> Classes:
    own, start, end = [], [], []
    for order, rule in enumerate(rules):
        d = L.DIR[rule.direction]
        if rule.ports is not None:
            protos = ["tcp", "udp"] if rule.protocol == "any" else [rule.protocol]
            spans = [(lo, hi + 1) for lo, hi in rule.ports]
        else:
            protos = list(L.PROTO_IDX) if rule.protocol == "any" else [rule.protocol]
            spans = [(0, 65536)]
        for p in protos:
            base = L.l4_key(d, L.PROTO_IDX[p], 0)
            for s, e in spans:
                own.append(order); start.append(base + s); end.append(base + e)
    return classify(len(rules), own, start, end, [], 2 * L.PROTO_IDX_MAX * 65536)


def _top_table(starts_top16: np.ndarray, exact_at_bucket: np.ndarray) -> np.ndarray:
    """DIR-16 first/last interval per top-16-bit bucket. starts_top16: top 16 bits of each interval
    start (non-decreasing); exact_at_bucket[i]: start i is exactly the first address of its bucket."""
    k = np.arange(L.TOP_SIZE)
    lt = np.searchsorted(starts_top16, k, side="left")
    le = np.searchsorted(starts_top16, k, side="right")
    at = np.zeros(L.TOP_SIZE, dtype=bool)
    hit = lt < len(starts_top16)
    at[hit] = exact_at_bucket[lt[hit]] & (starts_top16[lt[hit]] == k[hit])
    top = np.zeros(L.TOP_SIZE, dtype=L.DTYPES["hw_top"])
    top["first"] = lt - 1 + at
    top["last"] = le - 1
    return top


def _v4_tables(c: Classes, cls_offset: int):
    starts = np.asarray(c.starts, dtype=np.uint64)
    iv = np.zeros(len(starts), dtype=L.DTYPES["hw_iv4"])
    iv["start"] = starts
    iv["cls"] = c.cls + cls_offset
    return _top_table((starts >> np.uint64(16)).astype(np.int64), (starts & np.uint64(0xFFFF)) == 0), iv


def _v6_tables(c: Classes, cls_offset: int):
    starts = c.starts
    iv = np.zeros(len(starts), dtype=L.DTYPES["hw_iv6"])
    iv["hi"] = np.fromiter((s >> 64 for s in starts), dtype=np.uint64, count=len(starts))
    iv["lo"] = np.fromiter((s & (2**64 - 1) for s in starts), dtype=np.uint64, count=len(starts))
    iv["cls"] = c.cls + cls_offset
    top16 = (iv["hi"] >> np.uint64(48)).astype(np.int64)
    exact = ((iv["hi"] & np.uint64(2**48 - 1)) == 0) & (iv["lo"] == 0)
    return _top_table(top16, exact), iv


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
    rec["enabled"] = 1
    return rec


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


def compile_policy(policy: Policy, slots: dict[str, int], revision_id: int,
                   dos_interfaces: dict[int, str] | None = None) -> CompiledPolicy:
    """Build every table of one policy generation. slots: rule name -> counter slot (stable);
    dos_interfaces: ifindex -> DoS profile name of each attached interface that has one."""
    rules = policy.rules
    if len(rules) > L.MAX_RULES:
        raise CompileError(f"{len(rules)} rules; the datapath holds at most {L.MAX_RULES}")
    c4 = _v4_classes(rules)
    c6 = _v6_classes(rules)
    # one peer-class space for both families: v6 classes follow v4 ones
    peer_cls = np.concatenate([c4.bitmaps, c6.bitmaps])
    if len(peer_cls) > L.PEER_CLASSES_MAX:
        raise CompileError(f"{len(peer_cls)} distinct peer sets; the datapath holds {L.PEER_CLASSES_MAX}")
    top4, iv4 = _v4_tables(c4, 0)
    top6, iv6 = _v6_tables(c6, len(c4.bitmaps))
    if len(iv4) > L.V4_INTERVALS_MAX or len(iv6) > L.V6_INTERVALS_MAX:
        raise CompileError(f"{len(iv4)} IPv4 / {len(iv6)} IPv6 address intervals; the datapath holds "
                           f"{L.V4_INTERVALS_MAX} / {L.V6_INTERVALS_MAX} (about half as many prefixes)")
    cl4 = _l4_classes(rules)
    if len(cl4.bitmaps) > L.L4_CLASSES_MAX:
        raise CompileError(f"{len(cl4.bitmaps)} distinct protocol/port sets; the datapath holds {L.L4_CLASSES_MAX}")
    starts = np.asarray(cl4.starts, dtype=np.int64)
    lengths = np.diff(np.append(starts, 2 * L.PROTO_IDX_MAX * 65536))
    dense = np.repeat(cl4.cls.astype(np.uint16), lengths)
    l4 = np.zeros(L.L4_ELEMS, dtype=L.DTYPES["hw_l4_elem"])
    l4["cls"] = dense.reshape(L.L4_ELEMS, L.L4_SLOTS_PER_ELEM)

    rule_recs = np.zeros(len(rules), dtype=L.DTYPES["hw_rule"])
    rule_recs["slot"] = [slots[r.name] for r in rules]
    rule_recs["action"] = [L.ACTION[r.action] for r in rules]
    hdr = np.zeros(1, dtype=L.DTYPES["hw_policy_hdr"])
    d = policy.defaults
    hdr["revision_id"] = revision_id
    hdr["nrules"] = len(rules)
    hdr["default_ingress"] = L.ACTION[d.ingress]
    hdr["default_egress"] = L.ACTION[d.egress]
    hdr["stateful"] = d.stateful
    hdr["audit"] = d.audit
    dos_profiles, dos_ifs, dos_names = compile_dos(policy, dos_interfaces or {})
    return CompiledPolicy(hdr=hdr, rules=rule_recs, peer_cls=peer_cls, l4_cls=cl4.bitmaps, top4=top4, iv4=iv4,
                          top6=top6, iv6=iv6, l4=l4, rule_names=tuple(r.name for r in rules),
                          dos_profiles=dos_profiles, dos_ifs=dos_ifs, dos_profile_names=dos_names)
