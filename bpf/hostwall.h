/* SPDX-License-Identifier: Apache-2.0
 *
 * hostwall.h — the ONE definition of every layout shared by the kernel programs and user space.
 *
 * User space reads the constants and enums from this file at import time (enforcer/layout.py) and
 * declares the structs as NumPy dtypes that tests/unit/test_layout.py checks against this header
 * compiled with the C compiler (sizeof/offsetof of every field). Change a layout here, then the dtype.
 *
 * Policy maps are double-buffered: every policy array holds two generations and is indexed
 * `gen * HW_<X>_MAX + i`. A packet reads the active generation once (hw_config.gen) and uses it for
 * every lookup, so it is judged wholly by one policy. User space fills the standby half, flips gen,
 * and waits one RCU grace period before it may write that half again.
 */
#ifndef HOSTWALL_H
#define HOSTWALL_H

/* ---- sizes ---------------------------------------------------------------------------------- */
#define HW_MAX_RULES          4096      /* rules per policy (bits in a class bitmap) */
#define HW_WORDS              64        /* HW_MAX_RULES / 64 */
#define HW_MAX_RULE_SLOTS     8192      /* counter slots; stable per rule name across swaps */
#define HW_PEER_CLASSES_MAX   16384     /* distinct peer rule-sets per generation */
#define HW_L4_CLASSES_MAX     16384     /* distinct (direction, protocol, port) rule-sets per generation */
#define HW_V4_INTERVALS_MAX   524288    /* elementary IPv4 intervals per generation (~2 per prefix) */
#define HW_V6_INTERVALS_MAX   262144    /* elementary IPv6 intervals per generation */
#define HW_TOP_BITS           16        /* the first lookup indexes the top 16 address bits */
#define HW_TOP_SIZE           65536
#define HW_SEARCH_STEPS       20        /* binary-search bound: log2(max intervals) + 1 */
#define HW_SUB_SIZE           65536     /* hw_sub4 / hw_sub6 entries per generation (a power of two) */
#define HW_SUB_FLAG           0x80000000u  /* hw_top.first: a dense bucket, its range is in hw_sub4/6 */
#define HW_SUB_OFF_MASK       0x00ffffffu  /* ... and these bits its first entry there */
#define HW_SUB_SHIFT_POS      24        /* ... bits 24-27: 16 - stride (the next `stride` bits index it) */
#define HW_PROTO_IDX_MAX      5         /* protocol index: tcp, udp, icmp, icmpv6, other */
#define HW_L4_SLOTS_PER_ELEM  4         /* u16 class ids packed per hw_l4_elem */
#define HW_L4_ELEMS           (2 * HW_PROTO_IDX_MAX * 65536 / HW_L4_SLOTS_PER_ELEM)  /* per generation */
#define HW_XM_SLOTS           4         /* u16 first-match cells packed per hw_xm_elem */
#define HW_XM_ELEMS           (1 << 20) /* hw_xmatch elements per generation (a power of two) */
#define HW_XM_CELLS_MAX       (HW_XM_ELEMS * HW_XM_SLOTS)  /* peer x L4 classes above it: the scan */
#define HW_CT_MAX             262144    /* conntrack table slots per family */
#define HW_CT_WAYS            4         /* slots per conntrack bucket: a connection lives in one of them */
#define HW_CT_F_END_EMITTED   0x80      /* hw_ct_entry.fin_seen: the datapath emitted this flow's flow_end */
/* hw_ct_entry.seq_known: which sequence state is learnt (bit << side, side 0 = initiator) */
#define HW_CT_SEQ_END         0x01      /* seq_end[side] */
#define HW_CT_SEQ_ACK         0x04      /* seq_ack[side] */
/* How far (bytes of sequence space) a TCP segment may start past the highest end the hook saw from its
 * sender and still count (reordering on the wire, bytes the hook did not count: docs/datapath.md
 * "Sequence checks"); a FIN counts within this distance either side of that end. */
#define HW_CT_SEQ_SLACK       65536
/* How far behind the host's highest end (or the peer's last acceptable ACK) a peer's ACK may lie and
 * still count (RFC 5961 §5's MAX.SND.WND, fixed): a blind RST/FIN with an ACK hits it with odds 2^-16,
 * so a FIN sweep needs ~2^31 packets (docs/datapath.md "Sequence checks"). */
#define HW_CT_ACK_WINDOW      65536
#define HW_RINGBUF_BYTES      (8 << 20) /* event ring buffer (power of two, multiple of the page size) */
#define HW_DROP_AGG_MAX       65536     /* drop aggregation keys per generation (per-CPU hash) */
#define HW_DROP_SRC_SLOTS     4096      /* individual dropped peers per CPU per generation (top talkers) */
#define HW_EVENT_BUDGET       20000     /* default events/s into the ring buffer (hw_config.event_budget) */
#define HW_EV_TYPES           8
#define HW_DOS_PROFILES_MAX   16        /* DoS profiles per generation */
#define HW_DOS_PORTS_MAX      8         /* per-port limits per profile */
#define HW_DOS_GLOBAL_ERR     15        /* hw_dos_global slot of a profile's spared ICMP errors (dos.h) */
#define HW_DOS_ERR_PPS        100       /* their rate in a profile without icmp or per-source pps */
#define HW_DOS_IF_SLOTS       256       /* interface → profile table, per generation (ifindex % slots, probed) */
#define HW_DOS_IF_PROBES      4
#define HW_DOS_SRC_MAX        1048576   /* per-source bucket slots: ~104 MB of kernel memory */
#define HW_DOS_WAYS           4         /* slots per source-table bucket */
#define HW_DOS_BANNED_MAX     65536     /* automatic bans, for listing */
#define HW_MANUAL_BANS_MAX    65536     /* operator bans per family (LPM trie) */
#define HW_DOS_STREAK_GAP_NS  1000000000ULL  /* over-limit packets further apart than this break a streak */
#define HW_SYN_PORTS          65536     /* per-destination-port SYN state (hw_syn_ports[dport]) */
#define HW_PROXY_RANGES_MAX   8         /* port ranges a profile's SYN proxy covers */
#define HW_SYN_REFRESH_NS     30000000000ULL /* a covered port lets one SYN per family reach the host's stack
                                         * this often (docs/dos.md: the listener accepts cookie ACKs only
                                         * within 2 minutes of a cookie it sent itself) */
#define HW_PRESSURE_WINDOW_NS 1000000000ULL  /* conntrack evictions are counted per window of this length */
#define HW_SHARE_MAX          65536     /* per-source event share slots (4-way buckets) */
#define HW_SHARE_WAYS         4
#define HW_FLOW_AGG_MAX       65536     /* flow aggregation keys per generation (per-CPU hash) */

/* conntrack timeouts, seconds (nf_conntrack-like defaults). An unconfirmed entry (TCP handshake not
 * complete, UDP/ICMP not replied) expires after hw_policy_hdr.ct_unconfirmed_s (policy
 * conntrack.unconfirmed_timeout), default HW_CT_TO_UNCONFIRMED: fast, so a flood's half-open entries
 * leave the table quickly (docs/datapath.md, sizing). */
#define HW_CT_TO_UNCONFIRMED  10
#define HW_CT_TO_ESTABLISHED  432000
#define HW_CT_TO_FIN          120
#define HW_CT_TO_CLOSE        10
#define HW_CT_TO_UDP_REPLIED  180
/* a replied UDP flow with no packet since its first reply (a DNS lookup) — netfilter's unassured UDP
 * timeout; it also yields its slot before established connections (conntrack.h ct_rank) */
#define HW_CT_TO_UDP_UNASSURED 30
#define HW_CT_TO_ICMP         30

/* fragment table (docs/datapath.md "Fragments"): later fragments follow their first fragment */
#define HW_FRAG_MAX           16384     /* fragment table slots per family */
#define HW_FRAG_WAYS          4         /* slots per bucket */
#define HW_FRAG_TIMEOUT_NS    10000000000ULL  /* an entry serves later fragments for 10 s after the first */

/* FQDN egress rules (docs/datapath.md "FQDN rules"): the dynamic set the DNS proxy fills */
#define HW_FQDN_RULES_MAX     64        /* rules with fqdns per policy: one bit each in hw_fqdn_l4 */
#define HW_FQDN_IPS_MAX       65536     /* (set, address) entries of the dynamic set, all sets together */
#define HW_FQDN_INDEX_BITS    16        /* hw_fqdn_index: 2^16 slots in front of hw_fqdn */
#define HW_FQDN_K0            0x9E3779B97F4A7C15ULL   /* its slot's multipliers (odd; fqdn.h fqdn_slot) */
#define HW_FQDN_K1            0xC2B2AE3D27D4EB4FULL
#define HW_FQDN_K2            0x165667B19E3779F9ULL
#define HW_DNS_NAMES_MAX      16384     /* names the proxy learnt addresses for (hw_dns_names) */
#define HW_DNS_NAME_LEN       256       /* a name (at most 253 characters) and its NUL */
#define HW_DNS_LAT_BUCKETS    15        /* proxy latency histogram buckets (hw_dns_stats) */

/* ---- enums ---------------------------------------------------------------------------------- */
enum hw_hook { HW_HOOK_XDP_INGRESS = 0, HW_HOOK_TC_INGRESS = 1, HW_HOOK_TC_EGRESS = 2, HW_HOOKS = 3 };

enum hw_dir { HW_DIR_INGRESS = 0, HW_DIR_EGRESS = 1 };

enum hw_verdict { HW_V_ALLOW = 0, HW_V_DROP = 1, HW_V_WOULD_DROP = 2, HW_VERDICTS = 3 };

/* Why a packet got its verdict. 1..15 are drop reasons (docs/records.md); 16.. say why it passed. */
enum hw_reason {
	HW_R_NONE = 0,
	HW_R_POLICY_DENY = 1,
	HW_R_DEFAULT_DENY = 2,
	HW_R_RATE_LIMIT = 3,
	HW_R_SYN_FLOOD = 4,
	HW_R_UDP_FLOOD = 5,
	HW_R_ICMP_FLOOD = 6,
	HW_R_PORT_LIMIT = 7,
	HW_R_BANNED = 8,
	HW_R_MALFORMED = 9,
	HW_R_CONNTRACK_INVALID = 10,
	HW_R_FRAGMENT_UNMATCHED = 11, /* later fragment whose first fragment was denied, never seen or expired */
	HW_R_SYN_COOKIE_INVALID = 12, /* an untracked ACK to a port the SYN proxy covers, without a valid cookie */
	HW_R_JUDGE_UNREACHABLE = 13,  /* xdp_ingress's tail call to xdp_judge failed (hw_jump empty): fail closed */
	HW_R_PASS_RULE = 16,       /* allow/log rule matched */
	HW_R_PASS_DEFAULT = 17,    /* no rule matched, default allow */
	HW_R_PASS_CONNTRACK = 18,  /* packet of a tracked connection */
	HW_R_PASS_RELATED = 19,    /* ICMP error about a tracked connection */
	HW_R_PASS_NOT_IP = 20,     /* ARP and other non-IP frames are not judged */
	/* 21, 22: pass_judged / pass_deferred of older builds (TC ingress behind XDP), never reused */
	HW_R_PASS_ESSENTIAL = 23,  /* essential ICMP (neighbour/router discovery, MLD, path-MTU errors) */
	HW_R_PASS_FRAGMENT = 24,   /* later fragment of a datagram whose first fragment passed */
	HW_R_PASS_SYN_COOKIE = 25, /* an allowed SYN answered from XDP with a cookie SYN-ACK (no state kept) */
	HW_R_PASS_CONNTRACK_OVER_LIMIT = 26, /* a tracked connection's packet whose source is over a DoS limit or banned */
	HW_R_PASS_RELATED_OVER_LIMIT = 27,   /* an ICMP error about a host-opened connection, its source over a DoS limit or banned */
	HW_R_PASS_CONNTRACK_OUT_OF_WINDOW = 28, /* a RST, FIN or SYN-ACK of a tracked TCP connection outside its
	                                         * sequence window (or with an unacceptable ACK, as the peer's
	                                         * handshake-completing ACK; a FIN in syn_sent): passed to
	                                         * the stack, the entry unchanged (conntrack.h) */
	HW_REASONS = 32,
};

enum hw_action { HW_ACT_ALLOW = 0, HW_ACT_DENY = 1, HW_ACT_LOG = 2 };

enum hw_proto_idx { HW_P_TCP = 0, HW_P_UDP = 1, HW_P_ICMP = 2, HW_P_ICMPV6 = 3, HW_P_OTHER = 4 };

/* Values are stable across builds (a restart carries entries over), so SYN_RECV, added later, comes
 * last; the datapath never compares states by order across it. Unconfirmed: NEW, SYN_SENT, SYN_RECV. */
enum hw_ct_state {
	HW_CT_NEW = 0,          /* UDP/ICMP: one side seen (unconfirmed) */
	HW_CT_SYN_SENT = 1,     /* TCP: SYN seen (unconfirmed) */
	HW_CT_ESTABLISHED = 2,  /* TCP handshake complete (the initiator's ACK after the SYN-ACK), or UDP/ICMP replied */
	HW_CT_FIN_WAIT = 3,     /* one FIN seen */
	HW_CT_CLOSING = 4,      /* both FINs seen */
	HW_CT_CLOSED = 5,       /* RST seen */
	HW_CT_SYN_RECV = 6,     /* TCP: SYN-ACK seen, the initiator's ACK not yet (unconfirmed) */
};

enum hw_event_type {
	HW_EV_NONE = 0,
	HW_EV_FLOW_START = 1,       /* a tracked connection was opened by an allowed packet */
	HW_EV_FLOW_END = 2,         /* a tracked TCP connection closed (both FINs or RST), or a connection
	                             * was displaced from its conntrack slot (hw_event.end_cause) */
	HW_EV_DENY = 3,             /* first dropped packet of a drop-aggregation key in this interval */
	HW_EV_LOG = 4,              /* a packet judged by an action:log rule */
};

/* what became of an event the datapath wanted to emit: hw_ev_stats[type * HW_EV_OUTCOMES + outcome].
 * aggregated: a flow event counted in the flow aggregation instead (a source over its share, or no room
 * in the budget): not lost, it is in the flow summaries (docs/collector.md). */
enum hw_ev_outcome { HW_EO_EMITTED = 0, HW_EO_BUDGET = 1, HW_EO_RINGBUF_FULL = 2, HW_EO_AGGREGATED = 3,
                     HW_EV_OUTCOMES = 4 };

/* ---- policy maps (one entry per generation unless noted) ------------------------------------ */
/* Runtime knobs. Each map has ONE writer, so a read-modify-write never undoes another's change. */
struct hw_config {                  /* hw_config[0] — written by the enforcer only */
	__u32 gen;                  /* active policy generation: 0 or 1 */
	__u32 ncpus;                /* possible CPUs: the event budget is split evenly among them */
	__u64 test_now_ns;          /* tests only: when non-zero, the datapath's clock reads this */
	__u32 manual_bans;          /* operator bans in the LPM tries; 0 skips that lookup */
	__u32 unused;               /* older builds' xdp_ingress flag (TC ingress behind XDP); kept so the
	                             * fields after it keep their offsets (fields are only appended) */
	__u64 tick_ns;              /* the datapath's clock is jiffies * tick_ns + tick_base_ns (CLOCK_MONOTONIC, */
	__u64 tick_base_ns;         /* tick resolution), calibrated at load; tick_ns 0: coarse clock helper */
	__u64 table_seed;           /* hash seed of the conntrack and DoS source tables, random per instance */
	__u64 detached_ns;          /* datapath clock when a clean stop detached every interface (0: attached or
	                             * crashed); set before the unpin, so a collector still holding the maps
	                             * reports the connections left in conntrack as ended (docs/collector.md
	                             * "Detach"). Last: an older build's shorter value still migrates */
};

struct hw_collect {                 /* hw_collect[0] — written by the collector only */
	__u32 agg_gen;              /* drop aggregation map the datapath writes: 0 or 1 */
	__u32 event_budget;         /* ring-buffer events per second, all CPUs together; 0 = none */
	__u8  agg_prefix_v4;        /* drop aggregation source prefix length (default 24) */
	__u8  agg_prefix_v6;        /* (default 64) */
	__u16 pad;
	__u32 source_share;         /* flow events/s one source may emit individually (its flows over that are
	                             * aggregated); 0 = no per-source share */
};

struct hw_policy_hdr {              /* hw_policy_map[gen] */
	__u32 revision_id;          /* index into the user-space revision table (status, records) */
	__u32 nrules;
	__u8  default_ingress;      /* enum hw_action: ALLOW or DENY */
	__u8  default_egress;
	__u8  stateful;
	__u8  audit;
	__u8  essential_icmp;       /* 1: essential ICMP passes before any rule (docs/policy.md) */
	__u8  pad[3];
	__u32 essential_slot;       /* counter slot of the pseudo-rule essential_icmp; ~0: none */
	__u32 fqdn_rules;           /* rules with fqdns (hw_fqdn_rules); 0 skips the dynamic set */
	__u32 ct_unconfirmed_s;     /* idle timeout of unconfirmed conntrack entries, s; 0: HW_CT_TO_UNCONFIRMED */
	__u32 xm_stride;            /* hw_xmatch cell = L4 class * xm_stride + peer class; 0: no table, the
	                             * bit-vector scan (32 bytes in all: a multiple of 8, the value stride) */
};

struct hw_rule {                    /* hw_rule_map[gen * HW_MAX_RULES + order] */
	__u32 slot;                 /* counter slot in hw_rule_stats */
	__u8  action;               /* enum hw_action */
	__u8  pad[3];
};

struct hw_class {                   /* hw_peer_cls / hw_l4_cls[gen * MAX + class] */
	__u64 summary;              /* bit w set  <=>  words[w] != 0 */
	__u64 words[HW_WORDS];      /* bit r set  <=>  rule of order r is in this class */
};

struct hw_top {                     /* hw_top4 / hw_top6[gen * HW_TOP_SIZE + top16(addr)], and hw_sub4 / */
	__u32 first;                /* hw_sub6[gen * HW_SUB_SIZE + i]: interval holding the range's first */
	__u32 last;                 /* and last address; a top entry with HW_SUB_FLAG in first: a dense */
};                                  /* bucket, narrowed by hw_sub4/6 (docs/datapath.md "Classification") */

struct hw_iv4 {                     /* hw_iv4[gen * HW_V4_INTERVALS_MAX + i], sorted by start */
	__u32 start;                /* host byte order */
	__u32 cls;                  /* peer class */
};

struct hw_iv6 {                     /* hw_iv6[gen * HW_V6_INTERVALS_MAX + i], sorted by (hi, lo) */
	__u64 hi;                   /* host byte order halves of the start address */
	__u64 lo;
	__u32 cls;
	__u32 pad;
};

struct hw_xm_elem {                 /* hw_xmatch[gen * HW_XM_ELEMS + cell / 4] (docs/datapath.md) */
	__u16 rule[HW_XM_SLOTS];    /* first matching rule's order + 1 for (peer class, L4 class); 0: none */
};

struct hw_l4_elem {                 /* hw_l4[gen * HW_L4_ELEMS + key / 4], key = (dir*5+proto)*65536+port */
	__u16 cls[HW_L4_SLOTS_PER_ELEM];
};

/* ---- FQDN rules (docs/datapath.md "FQDN rules") ---------------------------------------------- *
 * A rule with fqdns is in no peer class: first_match never returns it. Its peer condition is the dynamic
 * set: the addresses the DNS proxy learnt for the names of its fqdns list (one *set* per distinct list,
 * numbered stably by user space, so a policy swap that keeps a list keeps its entries). Per generation,
 * hw_fqdn_rules lists the fqdns rules in rule order and hw_fqdn_l4[L4 class] has bit i set when the i-th
 * of them matches that class, and a copy of the first such rule's order and set; an egress packet whose
 * L4 class has such bits looks its destination up in the set once per candidate rule that comes before
 * the first static match. */
struct hw_fqdn_rule {               /* hw_fqdn_rules[gen * HW_FQDN_RULES_MAX + i], i in rule order */
	__u32 order;                /* the rule's order index (hw_rules) */
	__u32 set;                  /* its dynamic set */
};

struct hw_fqdn_l4 {                 /* hw_fqdn_l4[gen * HW_L4_CLASSES_MAX + L4 class] */
	__u64 rules;                /* bit i: hw_fqdn_rules[i] matches this (direction, protocol, port) class */
	__u32 order0;               /* hw_fqdn_rules[lowest bit of rules].order (0 when rules is 0) */
	__u32 set0;                 /* hw_fqdn_rules[lowest bit of rules].set: the first candidate, no load */
};

struct hw_fqdn_key {                /* hw_fqdn (hash, shared by both generations, pinned) */
	__u32 set;
	__u8  family;               /* 4 or 6 */
	__u8  pad[3];
	__u32 addr[4];              /* network order; IPv4 in addr[0], the rest zero */
};

struct hw_fqdn_val {
	__u64 expires_ns;           /* CLOCK_MONOTONIC: the entry allows new connections until then */
	__u64 learnt_ns;            /* CLOCK_MONOTONIC: the answer that (last) put it here */
};

/* hw_fqdn_index[slot]: a direct-mapped index in front of hw_fqdn, derived from it and written with it by
 * user space alone (mmap, under the writers' lock; bpf/fqdn.py), never by a program. slot = the top
 * HW_FQDN_INDEX_BITS bits of w0 * K0 + w1 * K1 + w2 * K2 (mod 2^64) where w0..w2 are the key's three
 * 64-bit words, host order (fqdn.h fqdn_slot).
 * `entries` counts the hw_fqdn entries whose key falls in the slot: 0 means not in the set, no lookup;
 * the slot also holds a copy of one of them (the one written last), which a packet may match without the
 * lookup. Anything else (a torn read, another key, a copy past its expiry) asks hw_fqdn itself, which
 * stays the set: the index can only spare lookups, never change an answer (docs/datapath.md "FQDN rules"). */
struct hw_fqdn_slot {
	__u32 seq;                  /* even: stable; odd: its writer is changing the copy */
	__u32 entries;              /* hw_fqdn entries whose key falls here */
	struct hw_fqdn_key key;     /* the copy's key (family 0: no copy) */
	__u64 expires_ns;           /* the copy's expiry, hw_fqdn's for that key */
};

/* What the proxy learnt, by name (hw_dns_names, hw_dns_name_ips: user space only, pinned with the
 * instance): which addresses each asked name resolved to and until when. The dynamic sets are derived
 * from it: a policy swap that adds a set fills it from here before the switch, `status` shows it, and the
 * collector names a flow's destination from it (destination.domain). name_id: the first 8 bytes of the
 * name's BLAKE2b digest, little endian. */
struct hw_dns_name {                /* hw_dns_names[name_id] */
	__u64 learnt_ns;            /* CLOCK_MONOTONIC: the latest answer for it */
	char  name[HW_DNS_NAME_LEN];/* lowercase, no trailing dot, NUL-terminated */
};

struct hw_dns_name_ip {             /* hw_dns_name_ips key; value: struct hw_fqdn_val */
	__u64 name_id;
	__u8  family;
	__u8  pad[3];
	__u32 addr[4];              /* network order; IPv4 in addr[0] */
	__u32 pad2;                 /* 32 bytes */
};

/* hw_fqdn_stats: per-CPU counts of the egress first packets that probed the dynamic set, one per packet
 * (not per candidate rule): HIT a candidate matched; else EXPIRED one found its entry past its expiry;
 * else MISS (fqdn.h fqdn_match). No map of their own: they are the first HW_FQDN_STATS struct hw_counter
 * of hw_tc_pkt[0]'s per-CPU value (packets only), never reset; the rest of that value is the datapath's
 * private packet memory (parse.h struct pkt_mem). */
enum hw_fqdn_stat { HW_FQS_HIT = 0, HW_FQS_EXPIRED = 1, HW_FQS_MISS = 2, HW_FQDN_STATS = 3 };
/* sizeof(parse.h struct pkt_mem): hw_tc_pkt's value in this build (parse.h asserts it; change both
 * together). A reader of the counters above checks it first: an instance of another build (before the
 * fold, hw_tc_pkt held the packet alone) must not have its packet bytes read as counts. */
#define HW_PKT_MEM_BYTES 192

/* hw_dns_stats[]: the DNS proxy's counters (u64 each; written by the enforcer's proxy alone, through mmap,
 * never by a program: pinned so they survive enforcer restarts, read by `status` and the collector's
 * metrics; docs/metrics.md). Latency buckets: answers that took <= 2^b * 0.125 ms (the last: any). */
enum hw_dns_stat {
	HW_DNS_QUERIES_UDP = 0,     /* queries received */
	HW_DNS_QUERIES_TCP = 1,
	HW_DNS_LISTED = 2,          /* queries for a name some rule lists */
	HW_DNS_ANSWERED = 3,        /* upstream answers relayed to the client */
	HW_DNS_REFUSED = 4,         /* unlisted names answered REFUSED (refuse_unlisted) */
	HW_DNS_SERVFAIL = 5,        /* upstream failures answered SERVFAIL */
	HW_DNS_UPSTREAM_TIMEOUT = 6,
	HW_DNS_UPSTREAM_ERROR = 7,  /* refused connection, network error, truncated TCP answer */
	HW_DNS_MALFORMED_QUERY = 8, /* client datagrams that are no DNS query: dropped */
	HW_DNS_MALFORMED_ANSWER = 9,/* upstream answers that do not parse: dropped */
	HW_DNS_MISMATCHED = 10,     /* upstream datagrams with the wrong ID or question: ignored */
	HW_DNS_LEARNT = 11,         /* addresses entered into the dynamic set (new or renewed) */
	HW_DNS_OVERFLOW = 12,       /* addresses over max_ips_per_name: not entered */
	HW_DNS_SET_FULL = 13,       /* addresses the full dynamic set refused */
	HW_DNS_RECORDS_SUPPRESSED = 14, /* DNS decision records over the rate limit: counted, not written */
	HW_DNS_LATENCY_SUM_US = 15, /* sum of answer latencies (µs) */
	HW_DNS_OVERLOAD = 16,       /* queries dropped: too many in flight */
	HW_DNS_LAT0 = 17,           /* HW_DNS_LAT_BUCKETS latency buckets follow */
	HW_DNS_RECORDS_UNWRITTEN = 32, /* DNS decision records the log could not take (write error): counted */
	HW_DNS_RECORDS_WRITTEN = 33,   /* DNS decision records written to the log */
	HW_DNS_CACHE_HITS = 34,     /* queries answered from the proxy's answer cache (enforcer/dnscache.py) */
	HW_DNS_CACHE_MISSES = 35,   /* cacheable queries (cache on) that went to an upstream */
	HW_DNS_CACHE_EVICTIONS = 36,/* live cache entries dropped for room (the oldest first) */
	HW_DNS_STATS = 40,
};

/* ---- DoS profiles (policy generation: swapped with the policy) ------------------------------ *
 * Rates are per second; 0 disables that limit. Buckets hold tokens scaled so refill is one
 * multiply: packets in 1e-9 packet units (rate * dt_ns), bits in 1e-3 bit units (rate * dt_ns / 1e6). */
struct hw_dos_port {
	__u16 port;                 /* host order */
	__u8  proto;                /* IPPROTO_TCP / IPPROTO_UDP */
	__u8  pad;
	__u32 pps;
};

struct hw_port_range {
	__u16 lo;                   /* host order, inclusive */
	__u16 hi;
};

/* SYN proxy (docs/dos.md): SYNs to covered ports answered from XDP with cookie SYN-ACKs */
enum hw_syn_proxy { HW_PROXY_OFF = 0, HW_PROXY_ON = 1, HW_PROXY_AUTO = 2 };

struct hw_dos_profile {             /* hw_dos_profiles[gen * HW_DOS_PROFILES_MAX + id] */
	__u64 pps;                  /* per source */
	__u64 burst;                /* packets */
	__u64 bps;                  /* per source, bits/s */
	__u64 bps_burst;            /* bits */
	__u64 syn_pps;              /* per source TCP SYN (without ACK) */
	__u64 syn_global_pps;       /* all sources together */
	__u64 udp_pps;              /* per source */
	__u64 icmp_pps;             /* per source, ICMP and ICMPv6 */
	__u64 ban_after_ns;         /* over a limit this long in a row → banned; 0 = never */
	__u64 ban_ns;               /* ban duration */
	__u64 bps_fp;               /* bps * 2^20 / 1e6: refill of the bits bucket without a division */
	__u8  prefix_v4;            /* source grouping */
	__u8  prefix_v6;
	__u8  nports;
	__u8  enabled;
	__u32 pad;
	struct hw_dos_port ports[HW_DOS_PORTS_MAX];
	/* SYNs to one destination port, all sources together (docs/dos.md): a signal, a guard (proxy off:
	 * the excess is dropped, syn_flood) and the SYN proxy's auto trigger */
	__u64 syn_port_pps;
	__u64 proxy_quiet_ns;       /* auto: the proxy stays on this long after the last trigger */
	__u32 proxy_pressure;       /* auto: on while conntrack evicts more than this many entries per second
	                             * (0: table pressure does not trigger it) */
	__u16 proxy_mss;            /* MSS the cookie SYN-ACK advertises over IPv4 (IPv6: 20 less) */
	__u8  proxy;                /* enum hw_syn_proxy */
	__u8  proxy_wscale;         /* window scale the cookie SYN-ACK advertises (full options only) */
	__u8  proxy_full;           /* 1: carry window scaling and SACK in the cookie's timestamp (the host runs
	                             * net.ipv4.tcp_timestamps=2); 0: MSS only */
	__u8  nproxy_ranges;        /* 0: the proxy covers every port */
	__u16 pad3;
	__u32 pad4;
	struct hw_port_range proxy_ranges[HW_PROXY_RANGES_MAX];   /* ports the proxy covers, inclusive */
};

struct hw_dos_if {                  /* hw_dos_ifs[gen * HW_DOS_IF_SLOTS + slot] */
	__u32 ifindex;              /* 0 = empty slot */
	__u32 profile;              /* profile id */
};

/* ---- DoS state (not swapped: a policy swap keeps buckets and bans) --------------------------- */
struct hw_dos_key {                 /* hw_dos_src slots, hw_dos_banned (hash) */
	__u32 addr[4];              /* source masked to the profile's prefix, network order */
	__u8  family;
	__u8  prefix_len;
	__u8  profile;
	__u8  pad;
	__u32 pad2;                 /* 24 bytes: compared and hashed as three 64-bit words */
};

struct hw_dos_src {
	__u64 last_ns;
	__u64 tok_pkt;              /* 1e-9 packets */
	__u64 tok_bits;             /* 1e-3 bits */
	__u64 tok_syn;
	__u64 tok_udp;
	__u64 tok_icmp;
	__u64 streak_start_ns;      /* first over-limit packet of the current streak, 0 = none */
	__u64 streak_last_ns;       /* latest over-limit packet */
	__u64 banned_until_ns;      /* 0 = not banned */
};

/* hw_dos_src[bucket * HW_DOS_WAYS + way]: a set-associative table like conntrack's (slot_state
 * FREE → BUSY → LIVE, same hash over the key's 64-bit words); a new source takes a free slot, else
 * evicts the least recently seen unbanned source of its bucket, else the least recently seen one. */
struct hw_dos_slot {
	struct hw_dos_src s;
	struct hw_dos_key k;
	__u64 slot_state;           /* enum hw_ct_slot_state */
};

/* hw_dos_src_stats[]: per-CPU counts of source inserts */
enum hw_dos_src_stat { HW_DSS_INSERTED = 0, HW_DSS_EVICTED = 1, HW_DSS_CLAIM_LOST = 2, HW_DSS_STATS = 3 };

/* Per-destination-port SYN state, shared by all interfaces with a profile (hw_syn_ports[dport], not
 * swapped with the policy). User space reads it in place (mmap): the proxy of an `auto` profile covers
 * the port while hot_until_ns is ahead of the clock. */
struct hw_syn_port {
	__u64 tokens;               /* the per-port SYN bucket (syn_port_pps), 1e-9 SYN units */
	__u64 last_ns;
	__u64 hot_until_ns;         /* auto: the proxy covers this port until then (over syn_port_pps + quiet) */
	__u64 hot_since_ns;         /* when the current hot period began */
	__u64 refresh_ns[2];        /* last SYN let through to the host's stack while the proxy answered, v4 / v6 */
};

/* Per profile (hw_syn_state[profile]): the proxy of an `auto` profile covers all its ports while
 * pressure_until_ns is ahead of the clock (conntrack evicting more than proxy_pressure entries/s). */
struct hw_syn_state {
	__u64 pressure_until_ns;
	__u64 pressure_since_ns;
};

/* hw_ct_pressure[0]: conntrack evictions (both families) per HW_PRESSURE_WINDOW_NS */
struct hw_ct_pressure {
	__u64 window_ns;            /* start of the current window */
	__u64 count;                /* evictions in it */
	__u64 prev;                 /* evictions in the window before (0 if that was not the previous one) */
};

/* hw_syn_stats[]: per-CPU counts of the SYN proxy's work */
enum hw_syn_stat { HW_SS_ANSWERED = 0, HW_SS_REFRESH = 1, HW_SS_COOKIE_VALID = 2, HW_SS_COOKIE_INVALID = 3,
                   HW_SS_NOT_ANSWERABLE = 4, HW_SS_PORT_GUARD = 5, HW_SS_STATS = 6 };

struct hw_dos_ban {                 /* hw_dos_banned value: automatic bans, for `ban list` */
	__u64 since_ns;
	__u64 until_ns;
	__u32 reason;               /* the limit whose streak led to the ban */
	__u32 pad;
};

struct hw_bucket {                  /* hw_dos_global[profile * 16 + i]: i 0 = global SYN, 1.. = ports[i-1], HW_DOS_GLOBAL_ERR */
	__u64 tokens;               /* 1e-9 packets */
	__u64 last_ns;
};

struct hw_ban4_key {                /* hw_manual_ban4 (LPM trie) */
	__u32 prefixlen;
	__u32 addr;                 /* network order */
};

struct hw_ban6_key {                /* hw_manual_ban6 (LPM trie) */
	__u32 prefixlen;
	__u32 addr[4];
};

struct hw_manual_ban {
	__u64 until_ns;             /* CLOCK_MONOTONIC; 0 = until removed */
	__u64 added_ns;
};

/* ---- counters (per-CPU) --------------------------------------------------------------------- */
struct hw_counter {                 /* hw_stats[(hook * HW_VERDICTS + verdict) * HW_REASONS + reason],
	                             * hw_rule_stats[slot] */
	__u64 packets;
	__u64 bytes;
};

struct hw_port_counter {            /* hw_port_stats[dport]: tcp and udp only, packets */
	__u64 allowed;
	__u64 dropped;
	__u64 would_drop;
	__u64 syns;                 /* ingress TCP SYNs (without ACK), whatever their verdict: the per-port SYN rate */
};

/* ---- connection tracking (shared by all hooks and all CPUs) ---------------------------------- *
 * One set-associative table per family in an mmapable array: a connection lives in one of the
 * HW_CT_WAYS consecutive slots of its bucket (a seeded hash of the normalised key), so the datapath
 * finds it with inlined array lookups instead of a hash-map helper call. A new connection takes its
 * own old slot, a free one, an expired one, or else evicts the least recently used; the datapath
 * reports the flow it displaces (flow_end with end_cause idle / evicted). Keys are normalised: side a
 * is the lower (address, port) pair, so both directions find the same slot. ICMP echo uses the
 * identifier as both ports. Slot life: FREE → BUSY (claimed by cmpxchg, being written) → LIVE
 * (published by xchg); only LIVE slots match. The collector frees idle ones (mmap store). */
enum hw_ct_slot_state { HW_SLOT_FREE = 0, HW_SLOT_BUSY = 1, HW_SLOT_LIVE = 2 };

/* why the datapath reported a flow's end: hw_event.end_cause. A full bucket evicts an unconfirmed
 * connection before any established one (docs/datapath.md), least recently used first among equals.
 * REUSED: a new connection on the tuple while the entry still held the old one, proven by the host's
 * own SYN or SYN-ACK (docs/datapath.md "Reused tuples").
 * A connection still tracked when the datapath detaches has no kernel cause: the collector reports its
 * end (end_reason "detach", hw_config.detached_ns). */
enum hw_ct_end_cause { HW_END_CLOSED = 0, HW_END_IDLE = 1, HW_END_EVICTED_ESTABLISHED = 2,
                       HW_END_EVICTED_UNCONFIRMED = 3, HW_END_REUSED = 4 };

/* hw_ct_stats[]: per-CPU counts of what became of connection inserts */
/* reused_idle: a slot whose connection was idle past its timeout or closed (FINs or RST) */
enum hw_ct_stat { HW_CTS_INSERTED = 0, HW_CTS_REUSED_IDLE = 1, HW_CTS_EVICTED_ESTABLISHED = 2, HW_CTS_CLAIM_LOST = 3,
                  HW_CTS_EVICTED_UNCONFIRMED = 4, HW_CT_STATS = 5 };

/* How a connection's start and end are reported (hw_ct_entry.report; docs/collector.md):
 * EVENTS     its own flow_start / flow_end events (the start may still have been lost, counted);
 * PENDING    unconfirmed, its start not reported yet: the event budget's reserve is kept for confirmed
 *            connections. Confirmed → its flow_start is emitted then; ends unconfirmed → counted in the
 *            flow aggregation (kind unconfirmed);
 * AGG_SHARE  its source was over its event share: start and end in the flow aggregation (over_share);
 * AGG_BUDGET the event budget (or the ring buffer) had no room: start and end aggregated (over_budget). */
enum hw_ct_report { HW_REP_EVENTS = 0, HW_REP_PENDING = 1, HW_REP_AGG_SHARE = 2, HW_REP_AGG_BUDGET = 3 };

struct hw_ct4_key {
	__u32 addr_a;               /* network byte order */
	__u32 addr_b;
	__u16 port_a;               /* network byte order */
	__u16 port_b;
	__u8  proto;
	__u8  pad[3];
};

struct hw_ct6_key {
	__u32 addr_a[4];
	__u32 addr_b[4];
	__u16 port_a;
	__u16 port_b;
	__u8  proto;
	__u8  pad[3];
};

struct hw_ct_entry {
	__u64 created_ns;           /* first packet, on the precise clock (hw_precise): the flow's start */
	__u64 last_ns;              /* latest packet on the datapath clock (hw_now, tick resolution): ages the entry */
	__u64 end_ns;               /* latest packet on the precise clock, read only where it is cheap enough:
	                             * every TCP packet from the first FIN or RST on, and the first packet of
	                             * each tick otherwise (docs/datapath.md "Clock"): the flow's end */
	__u64 packets[2];           /* [0] from initiator, [1] from responder */
	__u64 bytes[2];             /* IP-layer bytes (header + payload), as packets[] */
	__u64 cgroup_id;            /* egress-opened connections: the sender's cgroup */
	__u32 rule_slot;            /* rule that allowed the first packet, or ~0 for a default */
	__u32 revision_id;          /* policy revision that allowed it */
	__u8  state;                /* enum hw_ct_state */
	__u8  initiator;            /* 0: side a opened, 1: side b opened */
	__u8  origin;               /* enum hw_dir of the opening packet */
	__u8  fin_seen;             /* bit 0: initiator FIN, bit 1: responder FIN, HW_CT_F_END_EMITTED */
	__u8  reported;             /* written by the collector only (one byte store): non-zero once it reported this
	                             * closed connection's end after the close grace period (2 claimed, 1 durable:
	                             * bpf/conntrack.py); reset when the slot is reused */
	__u8  report;               /* enum hw_ct_report */
	__u8  seq_known;            /* TCP: HW_CT_SEQ_* bits << side of the fields below that hold a value */
	__u8  pad;
	__u32 seq_end[2];           /* TCP, [0] initiator, [1] responder: highest seq + payload (+1 per SYN/FIN)
	                             * sent, host order; advanced only by a segment starting within
	                             * HW_CT_SEQ_SLACK of it (docs/datapath.md "Sequence checks") */
	__u32 seq_ack[2];           /* TCP: highest acknowledgement number each side sent (the receiver's
	                             * RCV.NXT as it announced it: a RST must carry it exactly, RFC 5961);
	                             * before that side's first ACK (HW_CT_SEQ_ACK unset): its SYN's ISN+1 */
	__u64 slot_state;           /* enum hw_ct_slot_state (64 bits: BPF's cmpxchg/xchg here need them) */
};

struct hw_ct4_slot {                /* hw_ct4[bucket * HW_CT_WAYS + way] */
	struct hw_ct_entry e;
	struct hw_ct4_key k;
};

struct hw_ct6_slot {                /* hw_ct6[bucket * HW_CT_WAYS + way] */
	struct hw_ct_entry e;
	struct hw_ct6_key k;
};

/* ---- fragment table (shared by all hooks and CPUs; docs/datapath.md "Fragments") ------------ *
 * A first fragment that passes (by a rule, a default or a tracked connection) leaves an entry keyed by
 * its addresses, protocol, direction and IP ID (IPv6: fragment identification); a later fragment passes
 * only if it finds a live entry younger than HW_FRAG_TIMEOUT_NS. Set-associative like conntrack: one
 * of HW_FRAG_WAYS consecutive slots of the bucket the key's seeded hash names; a new entry takes its
 * own old slot, a free one, an expired one, or evicts the oldest (counted). */
enum hw_frag_stat { HW_FS_INSERTED = 0, HW_FS_EVICTED = 1, HW_FS_CLAIM_LOST = 2, HW_FS_FOLLOWED = 3,
                    HW_FS_UNMATCHED = 4, HW_FRAG_STATS = 5 };   /* hw_frag_stats[v6 * HW_FRAG_STATS + stat] */

struct hw_frag4_key {
	__u32 saddr;                /* network order */
	__u32 daddr;
	__u32 id;                   /* the 16-bit IPv4 identification as on the wire, in the first two bytes */
	__u8  proto;
	__u8  dir;                  /* enum hw_dir */
	__u8  pad[2];
};

struct hw_frag6_key {
	__u32 saddr[4];
	__u32 daddr[4];
	__u32 id;                   /* fragment header identification, network order */
	__u8  proto;                /* the upper-layer protocol of the first fragment */
	__u8  dir;
	__u8  pad[2];
};

struct hw_frag_entry {
	__u64 created_ns;           /* the first fragment passed (datapath clock) */
	__u32 rule_slot;            /* rule that allowed the first fragment, ~0 for a default or a connection */
	__u32 revision_id;
	__u8  reason;               /* enum hw_reason of the first fragment's pass */
	__u8  pad[7];
	__u64 slot_state;           /* enum hw_ct_slot_state */
};

struct hw_frag4_slot {              /* hw_frag4[bucket * HW_FRAG_WAYS + way] */
	struct hw_frag_entry e;
	struct hw_frag4_key k;
};

struct hw_frag6_slot {              /* hw_frag6[bucket * HW_FRAG_WAYS + way] */
	struct hw_frag_entry e;
	struct hw_frag6_key k;
};

/* ---- events (ring buffer) -------------------------------------------------------------------- *
 * Fixed size, so the collector decodes a batch as one NumPy structured view. Timestamps are
 * CLOCK_MONOTONIC ns on the precise clock (hw_precise: bpf_ktime_get_ns), never the datapath's tick
 * clock; the collector converts them to wall time. */
struct hw_event {
	__u64 ts_ns;                /* the packet that made the event; FLOW_END: the flow's last packet
	                             * (hw_ct_entry.end_ns); FLOW_START: = start_ns */
	__u64 start_ns;             /* FLOW_START / FLOW_END: the connection's first packet (created_ns); else = ts_ns */
	__u64 packets[2];           /* FLOW_END: [0] from initiator, [1] from responder; else [0] = 1 */
	__u64 bytes[2];             /* IP-layer bytes, as packets[] */
	__u64 cgroup_id;            /* egress-opened connections / egress packets: the sender's cgroup */
	__u32 saddr[4];             /* network order; flows: the initiator */
	__u32 daddr[4];
	__u16 sport;                /* network order */
	__u16 dport;
	__u32 ifindex;
	__u32 rule_slot;            /* ~0: no rule (default or conntrack) */
	__u32 revision_id;
	__u8  type;                 /* enum hw_event_type */
	__u8  family;               /* 4 or 6 */
	__u8  proto;                /* IP protocol number */
	__u8  verdict;              /* enum hw_verdict */
	__u8  reason;               /* enum hw_reason */
	__u8  hook;                 /* enum hw_hook */
	__u8  direction;            /* enum hw_dir of the packet (flows: of the opening packet) */
	__u8  tcp_flags;            /* flows: union of flags seen is not kept; the triggering packet's */
	__u8  ct_state;             /* enum hw_ct_state (flows) */
	__u8  icmp_type;
	__u8  icmp_code;
	__u8  end_cause;            /* FLOW_END: enum hw_ct_end_cause */
	__u32 pad2;
};

/* per-CPU token bucket that holds the ring buffer to hw_collect.event_budget (budget / ncpus each) */
struct hw_ev_budget {
	__u64 tokens_milli;         /* thousandths of an event */
	__u64 last_ns;
};

/* ---- drop aggregation (per-CPU hash, two generations: hw_drops0 / hw_drops1) ---------------- *
 * Every drop and would-drop exit adds the packet here, keyed by source prefix, reason and
 * destination port. The collector flips hw_collect.agg_gen, waits one RCU grace period and drains
 * the other map (read + delete), so summaries add up exactly to the hw_stats drop counters.
 * A key that does not fit (map full) is counted in hw_drop_overflow[agg_gen][verdict][reason]. */
struct hw_drop_key {
	__u32 src[4];               /* peer address (source for ingress, destination for egress) masked
	                             * to the aggregation prefix, network order */
	__u32 ifindex;
	__u16 dport;                /* network order; 0 for non-TCP/UDP */
	__u8  reason;
	__u8  verdict;              /* HW_V_DROP or HW_V_WOULD_DROP */
	__u8  proto;
	__u8  family;
	__u8  prefix_len;
	__u8  direction;            /* enum hw_dir */
};

struct hw_drop_val {
	__u64 packets;
	__u64 bytes;
	__u64 first_ns;
	__u64 last_ns;
};

/* ---- flow aggregation (per-CPU hash, two generations: hw_flows0 / hw_flows1, flipped with agg_gen) -- *
 * Flows not reported one event each (enum hw_ct_report) and cookie SYN-ACKs, counted per peer prefix
 * (the source of ingress-opened flows, the destination of egress-opened ones), destination port and
 * kind; drained with the drop aggregation. Per kind, summaries + hw_flow_overflow = the hw_flow_stats
 * counters exactly. A start adds flows; an end adds ended and the flow's packets/bytes (both ways). */
enum hw_agg_kind { HW_AGG_UNCONFIRMED = 0, HW_AGG_OVER_SHARE = 1, HW_AGG_OVER_BUDGET = 2, HW_AGG_SYN_COOKIE = 3,
                   HW_AGG_KINDS = 4 };

struct hw_flow_key {
	__u32 peer[4];              /* masked to the aggregation prefix (hw_collect.agg_prefix_v4/v6), network order */
	__u16 dport;                /* network order */
	__u8  proto;
	__u8  family;
	__u8  prefix_len;
	__u8  direction;            /* enum hw_dir of the opening packet */
	__u8  kind;                 /* enum hw_agg_kind */
	__u8  pad;
};

struct hw_flow_val {
	__u64 flows;                /* connections started (syn_cookie: SYNs answered) */
	__u64 ended;                /* connections ended */
	__u64 packets;              /* of ended connections, both directions (syn_cookie: SYN-ACKs sent) */
	__u64 bytes;
	__u64 first_ns;
	__u64 last_ns;
};

/* ---- per-source event share (hw_share[bucket * HW_SHARE_WAYS + way], a set-associative table) ---- *
 * A token bucket of flow events per source address (/32, /64), refilled at hw_collect.source_share/s:
 * a source over its share has its further flows aggregated, so one source cannot spend the budget. */
struct hw_share_key {
	__u32 addr[4];              /* network order; IPv6 masked to /64 */
	__u8  family;
	__u8  pad[3];
	__u32 pad2;                 /* 24 bytes: compared and hashed as three 64-bit words */
};

struct hw_share_slot {
	struct hw_share_key k;
	__u64 tokens_milli;         /* thousandths of an event */
	__u64 last_ns;
	__u64 slot_state;           /* enum hw_ct_slot_state */
};

/* The individual peers behind the drop summaries (top talkers), per interval: a per-CPU array,
 * hw_drop_srcs[agg_gen * HW_DROP_SRC_SLOTS + slot], direct-mapped by a seeded hash of the key. A slot
 * counts the first key of the interval that hashed to it; another key that hashes there is not
 * counted here (its packets are in hw_drops all the same), so a listed peer's counts are exact unless
 * it lost its slot on some CPU (then a lower bound). Drained with hw_drops (same flip and grace
 * period): the collector reads and zeroes the old generation's slots. */
struct hw_drop_src {
	struct hw_drop_key k;       /* the drop-aggregation key (prefix_len = the aggregation prefix), but
	                             * with the peer's full address in src */
	__u32 pad;                  /* zero: the first 32 bytes are hashed and compared as 64-bit words */
	__u64 packets;              /* 0 = empty slot */
	__u64 bytes;                /* IP-layer */
};

#endif /* HOSTWALL_H */
