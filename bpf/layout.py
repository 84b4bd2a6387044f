"""User-space view of bpf/hostwall.h, the one header that defines every kernel↔user layout.

Constants and enum values are read from the header at import (no second copy). Struct layouts are
NumPy dtypes declared here and checked field by field against the header compiled by the C compiler
(tests/unit/test_layout.py), so a drift fails the build instead of corrupting maps.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

HEADER = Path(__file__).resolve().with_name("hostwall.h")
BPF_SOURCE = HEADER.with_name("hostwall.bpf.c")
SOURCES = (*sorted(HEADER.parent.glob("*.h")), BPF_SOURCE)     # the C that makes one build (build hash)
_LOCAL_INCLUDE = re.compile(r'^#include "(\w+\.h)"\s*$', re.M)


def program_text() -> str:
    """hostwall.bpf.c with its concern headers inlined (hostwall.h stays an include).

    BCC rewrites map accesses (`hw_config.lookup(...)`) only in the main file it compiles, so the
    headers that own maps are pasted in where they are included. Cost: reading ~10 small files."""
    def expand(m: re.Match) -> str:
        name = m.group(1)
        return m.group(0) if name == HEADER.name else HEADER.with_name(name).read_text()
    return _LOCAL_INCLUDE.sub(expand, BPF_SOURCE.read_text())


def _parse_constants(text: str) -> dict[str, int]:
    """#define NAME <int expr> and enum members (explicit or implicit values), in file order."""
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    consts: dict[str, int] = {}

    def ev(expr: str) -> int:
        expr = re.sub(r"\b(\d+|0x[0-9a-fA-F]+)[uUlL]+\b", r"\1", expr.strip())
        return int(eval(expr, {"__builtins__": {}}, dict(consts)))  # header-only, trusted input

    for m in re.finditer(r"^#define\s+(HW_\w+)\s+(.+)$", text, flags=re.M):
        try:
            consts[m.group(1)] = ev(m.group(2))
        except (NameError, SyntaxError):
            pass
    for body in re.findall(r"enum\s+\w+\s*\{(.*?)\}", text, flags=re.S):
        nxt = 0
        for item in filter(None, (s.strip() for s in body.split(","))):
            name, _, val = item.partition("=")
            nxt = ev(val) if val else nxt
            consts[name.strip()] = nxt
            nxt += 1
    return consts


def _enum_members(text: str, enum: str) -> list[str]:
    """Member names of one `enum <name> { ... }` of the header, in order."""
    body = re.search(rf"enum\s+{enum}\s*\{{(.*?)\}}", re.sub(r"/\*.*?\*/", "", text, flags=re.S), flags=re.S)
    if body is None:
        raise ValueError(f"enum {enum} not found in the header")
    return [m.partition("=")[0].strip() for m in body.group(1).split(",") if m.strip()]


C = _parse_constants(HEADER.read_text())

MAX_RULES = C["HW_MAX_RULES"]
WORDS = C["HW_WORDS"]
MAX_RULE_SLOTS = C["HW_MAX_RULE_SLOTS"]
PEER_CLASSES_MAX = C["HW_PEER_CLASSES_MAX"]
L4_CLASSES_MAX = C["HW_L4_CLASSES_MAX"]
V4_INTERVALS_MAX = C["HW_V4_INTERVALS_MAX"]
V6_INTERVALS_MAX = C["HW_V6_INTERVALS_MAX"]
TOP_SIZE = C["HW_TOP_SIZE"]
TOP_BITS = C["HW_TOP_BITS"]
SUB_SIZE = C["HW_SUB_SIZE"]
PROTO_IDX_MAX = C["HW_PROTO_IDX_MAX"]
L4_SLOTS_PER_ELEM = C["HW_L4_SLOTS_PER_ELEM"]
L4_ELEMS = C["HW_L4_ELEMS"]
XM_SLOTS = C["HW_XM_SLOTS"]
XM_ELEMS = C["HW_XM_ELEMS"]
XM_CELLS_MAX = C["HW_XM_CELLS_MAX"]
HOOKS = C["HW_HOOKS"]
VERDICTS = C["HW_VERDICTS"]
REASONS = C["HW_REASONS"]
CT_MAX = C["HW_CT_MAX"]

HOOK_NAMES = {C["HW_HOOK_XDP_INGRESS"]: "xdp_ingress", C["HW_HOOK_TC_INGRESS"]: "tc_ingress",
              C["HW_HOOK_TC_EGRESS"]: "tc_egress"}
VERDICT_NAMES = {C["HW_V_ALLOW"]: "allow", C["HW_V_DROP"]: "drop", C["HW_V_WOULD_DROP"]: "would_drop"}
REASON_NAMES = {v: k[len("HW_R_"):].lower() for k, v in C.items()
                if k.startswith("HW_R_") and k not in ("HW_R_NONE",)}
DROP_REASONS = {v: n for v, n in REASON_NAMES.items() if v < 16}
ACTION = {"allow": C["HW_ACT_ALLOW"], "deny": C["HW_ACT_DENY"], "log": C["HW_ACT_LOG"]}
PROTO_IDX = {"tcp": C["HW_P_TCP"], "udp": C["HW_P_UDP"], "icmp": C["HW_P_ICMP"], "icmpv6": C["HW_P_ICMPV6"],
             "other": C["HW_P_OTHER"]}
DIR = {"ingress": C["HW_DIR_INGRESS"], "egress": C["HW_DIR_EGRESS"]}
EVENT_TYPE_NAMES = {v: k[len("HW_EV_"):].lower() for k, v in C.items()
                    if k.startswith("HW_EV_") and k not in ("HW_EV_TYPES", "HW_EV_OUTCOMES", "HW_EV_NONE")}
EV_OUTCOME_NAMES = {C["HW_EO_EMITTED"]: "emitted", C["HW_EO_BUDGET"]: "budget", C["HW_EO_RINGBUF_FULL"]: "ringbuf_full",
                    C["HW_EO_AGGREGATED"]: "aggregated"}
CT_STATE_NAMES = {C[k]: k[len("HW_CT_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_ct_state")}
CT_END_CAUSE_NAMES = {C[k]: k[len("HW_END_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_ct_end_cause")}
CT_STAT_NAMES = {C[k]: k[len("HW_CTS_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_ct_stat")
                 if k.startswith("HW_CTS_")}
CT_WAYS = C["HW_CT_WAYS"]
CT_REPORT_NAMES = {C[k]: k[len("HW_REP_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_ct_report")}
AGG_KIND_NAMES = {C[k]: k[len("HW_AGG_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_agg_kind")
                  if k != "HW_AGG_KINDS"}
SYN_PROXY_MODES = {"off": C["HW_PROXY_OFF"], "on": C["HW_PROXY_ON"], "auto": C["HW_PROXY_AUTO"]}
SYN_STAT_NAMES = {C[k]: k[len("HW_SS_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_syn_stat")
                  if k != "HW_SS_STATS"}
UNCONFIRMED_STATES = frozenset({C["HW_CT_NEW"], C["HW_CT_SYN_SENT"], C["HW_CT_SYN_RECV"]})
FRAG_MAX = C["HW_FRAG_MAX"]
FRAG_WAYS = C["HW_FRAG_WAYS"]
FRAG_STAT_NAMES = {C[k]: k[len("HW_FS_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_frag_stat")
                   if k.startswith("HW_FS_")}
FQDN_RULES_MAX = C["HW_FQDN_RULES_MAX"]
FQDN_IPS_MAX = C["HW_FQDN_IPS_MAX"]
FQDN_STAT_NAMES = {C[k]: k[len("HW_FQS_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_fqdn_stat")
                   if k.startswith("HW_FQS_")}
DNS_STAT_NAMES = {C[k]: k[len("HW_DNS_"):].lower() for k in _enum_members(HEADER.read_text(), "hw_dns_stat")
                  if k not in ("HW_DNS_STATS",)}
NO_SLOT = 0xFFFFFFFF      # a rule_slot / essential_slot that names no counter slot (~0 in the C)

u8, u16, u32, u64 = np.uint8, np.uint16, np.uint32, np.uint64

# struct name -> dtype; every dtype's itemsize equals the C sizeof (checked by the layout test). The table
# slots (hw_*_slot), made of other dtypes, are added below the literal.
DTYPES: dict[str, np.dtype] = {
    "hw_config": np.dtype([("gen", u32), ("ncpus", u32), ("test_now_ns", u64), ("manual_bans", u32), ("unused", u32),
                           ("tick_ns", u64), ("tick_base_ns", u64), ("table_seed", u64), ("detached_ns", u64)]),
    "hw_collect": np.dtype([("agg_gen", u32), ("event_budget", u32), ("agg_prefix_v4", u8), ("agg_prefix_v6", u8),
                            ("pad", u16), ("source_share", u32)]),
    "hw_policy_hdr": np.dtype([("revision_id", u32), ("nrules", u32), ("default_ingress", u8),
                               ("default_egress", u8), ("stateful", u8), ("audit", u8), ("essential_icmp", u8),
                               ("pad", u8, 3), ("essential_slot", u32), ("fqdn_rules", u32),
                               ("ct_unconfirmed_s", u32), ("xm_stride", u32)]),
    "hw_rule": np.dtype([("slot", u32), ("action", u8), ("pad", u8, 3)]),
    "hw_class": np.dtype([("summary", u64), ("words", u64, WORDS)]),
    "hw_top": np.dtype([("first", u32), ("last", u32)]),
    "hw_iv4": np.dtype([("start", u32), ("cls", u32)]),
    "hw_iv6": np.dtype([("hi", u64), ("lo", u64), ("cls", u32), ("pad", u32)]),
    "hw_l4_elem": np.dtype([("cls", u16, L4_SLOTS_PER_ELEM)]),
    "hw_xm_elem": np.dtype([("rule", u16, C["HW_XM_SLOTS"])]),
    "hw_dos_port": np.dtype([("port", u16), ("proto", u8), ("pad", u8), ("pps", u32)]),
    "hw_port_range": np.dtype([("lo", u16), ("hi", u16)]),
    "hw_dos_profile": np.dtype([("pps", u64), ("burst", u64), ("bps", u64), ("bps_burst", u64), ("syn_pps", u64),
                                ("syn_global_pps", u64), ("udp_pps", u64), ("icmp_pps", u64), ("ban_after_ns", u64),
                                ("ban_ns", u64), ("bps_fp", u64), ("prefix_v4", u8), ("prefix_v6", u8), ("nports", u8), ("enabled", u8),
                                ("pad", u32), ("ports", np.dtype([("port", u16), ("proto", u8), ("pad", u8),
                                                                  ("pps", u32)]), C["HW_DOS_PORTS_MAX"]),
                                ("syn_port_pps", u64), ("proxy_quiet_ns", u64), ("proxy_pressure", u32), ("proxy_mss", u16),
                                ("proxy", u8), ("proxy_wscale", u8), ("proxy_full", u8), ("nproxy_ranges", u8),
                                ("pad3", u16), ("pad4", u32),
                                ("proxy_ranges", np.dtype([("lo", u16), ("hi", u16)]), C["HW_PROXY_RANGES_MAX"])]),
    "hw_dos_if": np.dtype([("ifindex", u32), ("profile", u32)]),
    "hw_dos_key": np.dtype([("addr", u8, 16), ("family", u8), ("prefix_len", u8), ("profile", u8), ("pad", u8),
                            ("pad2", u32)]),
    "hw_dos_src": np.dtype([("last_ns", u64), ("tok_pkt", u64), ("tok_bits", u64), ("tok_syn", u64), ("tok_udp", u64),
                            ("tok_icmp", u64), ("streak_start_ns", u64), ("streak_last_ns", u64),
                            ("banned_until_ns", u64)]),
    "hw_syn_port": np.dtype([("tokens", u64), ("last_ns", u64), ("hot_until_ns", u64), ("hot_since_ns", u64),
                             ("refresh_ns", u64, 2)]),
    "hw_syn_state": np.dtype([("pressure_until_ns", u64), ("pressure_since_ns", u64)]),
    "hw_ct_pressure": np.dtype([("window_ns", u64), ("count", u64), ("prev", u64)]),
    "hw_dos_ban": np.dtype([("since_ns", u64), ("until_ns", u64), ("reason", u32), ("pad", u32)]),
    "hw_bucket": np.dtype([("tokens", u64), ("last_ns", u64)]),
    "hw_ban4_key": np.dtype([("prefixlen", u32), ("addr", u8, 4)]),
    "hw_ban6_key": np.dtype([("prefixlen", u32), ("addr", u8, 16)]),
    "hw_manual_ban": np.dtype([("until_ns", u64), ("added_ns", u64)]),
    "hw_counter": np.dtype([("packets", u64), ("bytes", u64)]),
    "hw_port_counter": np.dtype([("allowed", u64), ("dropped", u64), ("would_drop", u64), ("syns", u64)]),
    "hw_ct4_key": np.dtype([("addr_a", ">u4"), ("addr_b", ">u4"), ("port_a", ">u2"), ("port_b", ">u2"),
                            ("proto", u8), ("pad", u8, 3)]),
    "hw_ct6_key": np.dtype([("addr_a", u8, 16), ("addr_b", u8, 16), ("port_a", ">u2"), ("port_b", ">u2"),
                            ("proto", u8), ("pad", u8, 3)]),
    "hw_ct_entry": np.dtype([("created_ns", u64), ("last_ns", u64), ("end_ns", u64), ("packets", u64, 2),
                             ("bytes", u64, 2), ("cgroup_id", u64), ("rule_slot", u32), ("revision_id", u32),
                             ("state", u8), ("initiator", u8), ("origin", u8), ("fin_seen", u8), ("reported", u8),
                             ("report", u8), ("seq_known", u8), ("pad", u8), ("seq_end", u32, 2),
                             ("seq_ack", u32, 2), ("slot_state", u64)]),
    "hw_frag4_key": np.dtype([("saddr", u8, 4), ("daddr", u8, 4), ("id", ">u4"), ("proto", u8), ("dir", u8),
                              ("pad", u8, 2)]),
    "hw_frag6_key": np.dtype([("saddr", u8, 16), ("daddr", u8, 16), ("id", ">u4"), ("proto", u8), ("dir", u8),
                              ("pad", u8, 2)]),
    "hw_frag_entry": np.dtype([("created_ns", u64), ("rule_slot", u32), ("revision_id", u32), ("reason", u8),
                               ("pad", u8, 7), ("slot_state", u64)]),
    "hw_event": np.dtype([("ts_ns", u64), ("start_ns", u64), ("packets", u64, 2), ("bytes", u64, 2),
                          ("cgroup_id", u64), ("saddr", u8, 16), ("daddr", u8, 16), ("sport", ">u2"), ("dport", ">u2"),
                          ("ifindex", u32), ("rule_slot", u32), ("revision_id", u32), ("type", u8), ("family", u8),
                          ("proto", u8), ("verdict", u8), ("reason", u8), ("hook", u8), ("direction", u8),
                          ("tcp_flags", u8), ("ct_state", u8), ("icmp_type", u8), ("icmp_code", u8), ("end_cause", u8),
                          ("pad2", u32)]),
    "hw_ev_budget": np.dtype([("tokens_milli", u64), ("last_ns", u64)]),
    "hw_drop_key": np.dtype([("src", u8, 16), ("ifindex", u32), ("dport", ">u2"), ("reason", u8), ("verdict", u8),
                             ("proto", u8), ("family", u8), ("prefix_len", u8), ("direction", u8)]),
    "hw_drop_val": np.dtype([("packets", u64), ("bytes", u64), ("first_ns", u64), ("last_ns", u64)]),
    "hw_flow_key": np.dtype([("peer", u8, 16), ("dport", ">u2"), ("proto", u8), ("family", u8), ("prefix_len", u8),
                             ("direction", u8), ("kind", u8), ("pad", u8)]),
    "hw_flow_val": np.dtype([("flows", u64), ("ended", u64), ("packets", u64), ("bytes", u64), ("first_ns", u64),
                             ("last_ns", u64)]),
    "hw_share_key": np.dtype([("addr", u8, 16), ("family", u8), ("pad", u8, 3), ("pad2", u32)]),
    "hw_fqdn_rule": np.dtype([("order", u32), ("set", u32)]),
    "hw_fqdn_l4": np.dtype([("rules", u64), ("order0", u32), ("set0", u32)]),
    "hw_fqdn_key": np.dtype([("set", u32), ("family", u8), ("pad", u8, 3), ("addr", u8, 16)]),
    "hw_fqdn_val": np.dtype([("expires_ns", u64), ("learnt_ns", u64)]),
    "hw_dns_name": np.dtype([("learnt_ns", u64), ("name", "S256")]),
    "hw_dns_name_ip": np.dtype([("name_id", u64), ("family", u8), ("pad", u8, 3), ("addr", u8, 16), ("pad2", u32)]),
}
DTYPES["hw_drop_src"] = np.dtype([("k", DTYPES["hw_drop_key"]), ("pad", u32), ("packets", u64), ("bytes", u64)])
DTYPES["hw_fqdn_slot"] = np.dtype([("seq", u32), ("entries", u32), ("key", DTYPES["hw_fqdn_key"]), ("expires_ns", u64)])
DTYPES["hw_dos_slot"] = np.dtype([("s", DTYPES["hw_dos_src"]), ("k", DTYPES["hw_dos_key"]), ("slot_state", u64)])
DTYPES["hw_share_slot"] = np.dtype([("k", DTYPES["hw_share_key"]), ("tokens_milli", u64), ("last_ns", u64),
                                    ("slot_state", u64)])
for _fam in (4, 6):     # conntrack and fragment table slots: the entry, then the key it belongs to
    DTYPES[f"hw_ct{_fam}_slot"] = np.dtype([("e", DTYPES["hw_ct_entry"]), ("k", DTYPES[f"hw_ct{_fam}_key"])])
    DTYPES[f"hw_frag{_fam}_slot"] = np.dtype([("e", DTYPES["hw_frag_entry"]), ("k", DTYPES[f"hw_frag{_fam}_key"])])


def stats_index(hook: int, verdict: int, reason: int) -> int:
    """Index into hw_stats, as the C side computes it."""
    return (hook * VERDICTS + verdict) * REASONS + reason


def l4_key(direction: int, proto_idx: int, port: int) -> int:
    """Linear (direction, protocol, port) key of the hw_l4 table."""
    return (direction * PROTO_IDX_MAX + proto_idx) * 65536 + port
