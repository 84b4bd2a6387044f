"""Names of the programs and maps in bpf/hostwall.bpf.c, as pinned under <pin dir>/{progs,maps}.

One list for every Python user (loading, pinning, adopting, the collector); tests/unit/test_layout.py
checks it against the maps and programs the C source declares, so a rename on either side fails there.
"""
from __future__ import annotations

from . import layout as L

PROGRAMS = {"xdp_judge": "xdp", "xdp_ingress": "xdp", "tc_frag_ingress": "sched_cls", "tc_frag_egress": "sched_cls",
            "tc_ingress": "sched_cls",
            "tc_egress": "sched_cls"}

# map name -> (value dtype name, entries per generation or None when not double-buffered)
POLICY_MAPS = {
    "hw_policy": ("hw_policy_hdr", 1),
    "hw_rules": ("hw_rule", L.MAX_RULES),
    "hw_peer_cls": ("hw_class", L.PEER_CLASSES_MAX),
    "hw_l4_cls": ("hw_class", L.L4_CLASSES_MAX),
    "hw_top4": ("hw_top", L.TOP_SIZE),
    "hw_top6": ("hw_top", L.TOP_SIZE),
    "hw_iv4": ("hw_iv4", L.V4_INTERVALS_MAX),
    "hw_iv6": ("hw_iv6", L.V6_INTERVALS_MAX),
    "hw_sub4": ("hw_top", L.SUB_SIZE),
    "hw_sub6": ("hw_top", L.SUB_SIZE),
    "hw_l4": ("hw_l4_elem", L.L4_ELEMS),
    "hw_xmatch": ("hw_xm_elem", L.XM_ELEMS),
    "hw_dos_profiles": ("hw_dos_profile", L.C["HW_DOS_PROFILES_MAX"]),
    "hw_dos_ifs": ("hw_dos_if", L.C["HW_DOS_IF_SLOTS"]),
    "hw_fqdn_rules": ("hw_fqdn_rule", L.FQDN_RULES_MAX),
    "hw_fqdn_l4": ("hw_fqdn_l4", L.L4_CLASSES_MAX),
}
OTHER_MAPS = ("hw_config", "hw_collect", "hw_stats", "hw_rule_stats", "hw_port_stats", "hw_ct4", "hw_ct6", "hw_ct_stats",
              "hw_frag4", "hw_frag6", "hw_frag_stats", "hw_frag_scratch", "hw_jump_tc", "hw_tc_pkt", "hw_events",
              "hw_ev_stats", "hw_ev_budget", "hw_drops0", "hw_drops1", "hw_drop_overflow", "hw_drop_srcs", "hw_jump",
              "hw_pkt_scratch", "hw_dos_src", "hw_dos_banned", "hw_dos_global", "hw_dos_stats", "hw_dos_src_stats", "hw_manual_ban4",
              "hw_manual_ban6", "hw_fqdn", "hw_fqdn_index", "hw_dns_names",
              "hw_dns_name_ips", "hw_dns_stats",
              # tracking under attack (SYN proxy, per-port SYN state, bounded flow reports; docs/dos.md)
              "hw_ct_pressure", "hw_syn_ports", "hw_syn_state", "hw_syn_stats", "hw_share", "hw_share_stats",
              "hw_flows0", "hw_flows1", "hw_flow_overflow", "hw_flow_stats")
ALL_MAPS = tuple(POLICY_MAPS) + OTHER_MAPS
