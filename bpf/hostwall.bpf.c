/* SPDX-License-Identifier: Apache-2.0
 *
 * hostwall datapath: XDP ingress, TC ingress and TC egress, compiled and loaded by BCC.
 *
 *   parse → conntrack (normalised key, one lookup) → [ICMP error → related lookup]
 *         → policy: peer class ∧ L4 class bit-vector AND, lowest set bit = first match
 *         → hw_exit(): the one counted exit of every program
 *
 * XDP judges ingress and leaves a struct hw_meta in front of packets it passes; TC ingress judges
 * only packets that carry no such mark (XDP not attached), so no packet is judged twice or by two
 * policy generations. TC egress judges egress and stamps the sender's cgroup into new connections.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
#include <uapi/linux/icmp.h>
#include <uapi/linux/icmpv6.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/in.h>

#include "hostwall.h"

#define MAPF_MMAP BPF_F_MMAPABLE

/* ---- maps ----------------------------------------------------------------------------------- */
BPF_ARRAY(hw_config, struct hw_config, 1);
BPF_ARRAY(hw_collect, struct hw_collect, 1);
BPF_F_TABLE("array", u32, struct hw_policy_hdr, hw_policy, 2, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_rule, hw_rules, 2 * HW_MAX_RULES, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_class, hw_peer_cls, 2 * HW_PEER_CLASSES_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_class, hw_l4_cls, 2 * HW_L4_CLASSES_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_top, hw_top4, 2 * HW_TOP_SIZE, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_top, hw_top6, 2 * HW_TOP_SIZE, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_iv4, hw_iv4, 2 * HW_V4_INTERVALS_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_iv6, hw_iv6, 2 * HW_V6_INTERVALS_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_l4_elem, hw_l4, 2 * HW_L4_ELEMS, MAPF_MMAP);

BPF_PERCPU_ARRAY(hw_stats, struct hw_counter, HW_HOOKS * HW_VERDICTS * HW_REASONS);
BPF_PERCPU_ARRAY(hw_rule_stats, struct hw_counter, HW_MAX_RULE_SLOTS);
BPF_PERCPU_ARRAY(hw_port_stats, struct hw_port_counter, 65536);

BPF_F_TABLE("array", u32, struct hw_ct4_slot, hw_ct4, HW_CT_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_ct6_slot, hw_ct6, HW_CT_MAX, MAPF_MMAP);
BPF_PERCPU_ARRAY(hw_ct_stats, struct hw_counter, 2 * HW_CT_STATS);    /* [v6 * HW_CT_STATS + stat] */

BPF_F_TABLE("array", u32, struct hw_dos_profile, hw_dos_profiles, 2 * HW_DOS_PROFILES_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_dos_if, hw_dos_ifs, 2 * HW_DOS_IF_SLOTS, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_dos_slot, hw_dos_src, HW_DOS_SRC_MAX, MAPF_MMAP);
BPF_TABLE("hash", struct hw_dos_key, struct hw_dos_ban, hw_dos_banned, HW_DOS_BANNED_MAX);
BPF_ARRAY(hw_dos_global, struct hw_bucket, HW_DOS_PROFILES_MAX * 16);
BPF_PERCPU_ARRAY(hw_dos_stats, struct hw_counter, HW_DOS_PROFILES_MAX * HW_REASONS);
BPF_PERCPU_ARRAY(hw_dos_src_stats, struct hw_counter, HW_DSS_STATS);
BPF_F_TABLE("lpm_trie", struct hw_ban4_key, struct hw_manual_ban, hw_manual_ban4, HW_MANUAL_BANS_MAX, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct hw_ban6_key, struct hw_manual_ban, hw_manual_ban6, HW_MANUAL_BANS_MAX, BPF_F_NO_PREALLOC);

BPF_PROG_ARRAY(hw_jump, 1);                            /* [0] = xdp_judge */

BPF_RINGBUF_OUTPUT(hw_events, HW_RINGBUF_BYTES / 4096);
BPF_PERCPU_ARRAY(hw_ev_stats, struct hw_counter, HW_EV_TYPES * HW_EV_OUTCOMES);
BPF_PERCPU_ARRAY(hw_ev_budget, struct hw_ev_budget, 1);
BPF_TABLE("percpu_hash", struct hw_drop_key, struct hw_drop_val, hw_drops0, HW_DROP_AGG_MAX);
BPF_TABLE("percpu_hash", struct hw_drop_key, struct hw_drop_val, hw_drops1, HW_DROP_AGG_MAX);
BPF_PERCPU_ARRAY(hw_drop_overflow, struct hw_counter, 2 * HW_VERDICTS * HW_REASONS);

/* ---- parsed packet (private to this file) --------------------------------------------------- */
struct pkt {
	__u32 saddr[4];         /* network order; v4 in [0] */
	__u32 daddr[4];
	__u32 len;              /* wire length */
	__u16 sport;            /* network order; ICMP echo: identifier */
	__u16 dport;
	__u8  family;           /* 4 or 6; 0 = not IP */
	__u8  proto;            /* IP protocol number */
	__u8  pidx;             /* enum hw_proto_idx */
	__u8  frag;             /* non-first fragment: no L4 header */
	__u8  tcp_flags;
	__u8  icmp_type;
	__u8  icmp_code;
	__u8  opens;            /* may open a tracked connection: TCP SYN, UDP, ICMP echo request */
	__u8  related;          /* ICMP error: the inner tuple below is valid */
	__u8  trackable;        /* TCP, UDP or ICMP echo: has a connection tuple */
	__u32 ifindex;
	__u32 in_saddr[4];      /* ICMP error: the offending packet, as sent */
	__u32 in_daddr[4];
	__u16 in_sport;
	__u16 in_dport;
	__u8  in_proto;
	__u8  ct_hint;          /* set by xdp_ingress before the tail call: 1 no connection, 2 invalid one */
	__u64 now;              /* xdp_ingress's clock, so xdp_judge does not read it again */
};

#define CT_HINT_MISS    1
#define CT_HINT_INVALID 2

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

#define PARSE_OK        0
#define PARSE_NOT_IP    1
#define PARSE_MALFORMED 2

/* ---- parsing -------------------------------------------------------------------------------- */
static __always_inline int is_icmp4_error(__u8 t) { return t == 3 || t == 4 || t == 5 || t == 11 || t == 12; }
static __always_inline int is_icmp6_error(__u8 t) { return t >= 1 && t <= 4; }

/* Parse the IP packet embedded in an ICMP error (header + first 8 bytes of L4). */
static __always_inline void parse_inner(struct pkt *p, void *cur, void *end)
{
	if (p->family == 4) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return;
		__u8 *l4 = cur + ip->ihl * 4;
		if ((void *)(l4 + 4) > end)
			return;
		p->in_saddr[0] = ip->saddr;
		p->in_daddr[0] = ip->daddr;
		p->in_proto = ip->protocol;
		cur = l4;
	} else {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return;
		__builtin_memcpy(p->in_saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->in_daddr, &ip6->daddr, 16);
		p->in_proto = ip6->nexthdr;
		cur = ip6 + 1;
		if (cur + 4 > end)
			return;
	}
	if (p->in_proto == IPPROTO_TCP || p->in_proto == IPPROTO_UDP) {
		__u16 *ports = cur;
		if ((void *)(ports + 2) > end)
			return;
		p->in_sport = ports[0];
		p->in_dport = ports[1];
		p->related = 1;
	} else if (p->in_proto == IPPROTO_ICMP || p->in_proto == IPPROTO_ICMPV6) {
		struct icmphdr *ic = cur;
		if ((void *)(ic + 1) > end)
			return;
		p->in_sport = ic->un.echo.id;
		p->in_dport = ic->un.echo.id;
		p->related = 1;
	}
}

static __always_inline int parse_l4(struct pkt *p, void *cur, void *end)
{
	if (p->frag) {
		p->pidx = p->proto == IPPROTO_TCP ? HW_P_TCP : p->proto == IPPROTO_UDP ? HW_P_UDP :
			  p->proto == IPPROTO_ICMP ? HW_P_ICMP : p->proto == IPPROTO_ICMPV6 ? HW_P_ICMPV6 : HW_P_OTHER;
		return PARSE_OK;
	}
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = cur;
		if ((void *)(th + 1) > end || th->doff < 5)
			return PARSE_MALFORMED;
		p->pidx = HW_P_TCP;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->opens = (p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) == TCPF_SYN;
		p->trackable = 1;
		if (th->dest == 0 || th->source == 0)
			return PARSE_MALFORMED;
		return PARSE_OK;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = cur;
		if ((void *)(uh + 1) > end || bpf_ntohs(uh->len) < sizeof(*uh))
			return PARSE_MALFORMED;
		p->pidx = HW_P_UDP;
		p->sport = uh->source;
		p->dport = uh->dest;
		p->opens = 1;
		p->trackable = 1;
		if (uh->dest == 0)
			return PARSE_MALFORMED;
		return PARSE_OK;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		struct icmphdr *ic = cur;   /* type, code, csum, id, seq: same layout for ICMPv6 echo */
		if ((void *)(ic + 1) > end)
			return PARSE_MALFORMED;
		if ((p->proto == IPPROTO_ICMP) != (p->family == 4))
			return PARSE_MALFORMED;     /* ICMP in IPv6 or ICMPv6 in IPv4 */
		p->pidx = p->family == 4 ? HW_P_ICMP : HW_P_ICMPV6;
		p->icmp_type = ic->type;
		p->icmp_code = ic->code;
		if (p->family == 4 ? (ic->type == 8 || ic->type == 0) : (ic->type == 128 || ic->type == 129)) {
			p->sport = ic->un.echo.id;
			p->dport = ic->un.echo.id;
			p->opens = ic->type == 8 || ic->type == 128;
			p->trackable = 1;
		} else if (p->family == 4 ? is_icmp4_error(ic->type) : is_icmp6_error(ic->type)) {
			parse_inner(p, (void *)(ic + 1), end);
		}
		return PARSE_OK;
	}
	default:
		p->pidx = HW_P_OTHER;
		return PARSE_OK;
	}
}

/* IPv6 extension headers we step over; a chain longer than this is malformed (not guessed). */
#define HW_V6_EXT_MAX 6

static __always_inline int parse_pkt(struct pkt *p, void *data, void *end)
{
	struct ethhdr *eth = data;
	void *cur = eth + 1;
	if (cur > end)
		return PARSE_MALFORMED;
	__u16 proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {       /* 802.1Q / 802.1ad tags */
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		__u16 *vh = cur;
		if ((void *)(vh + 2) > end)
			return PARSE_MALFORMED;
		proto = vh[1];
		cur += 4;
	}
	p->len = end - data;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end)
			return PARSE_MALFORMED;
		if (ip->version != 4 || ip->ihl < 5 || bpf_ntohs(ip->tot_len) < ip->ihl * 4)
			return PARSE_MALFORMED;
		p->family = 4;
		p->proto = ip->protocol;
		p->saddr[0] = ip->saddr;
		p->daddr[0] = ip->daddr;
		p->frag = (ip->frag_off & bpf_htons(0x1fff)) != 0;
		cur += ip->ihl * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return PARSE_MALFORMED;
		if (ip6->version != 6)
			return PARSE_MALFORMED;
		p->family = 6;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		__u8 nh = ip6->nexthdr;
		cur = ip6 + 1;
		int i;
		for (i = 0; i < HW_V6_EXT_MAX; i++) {
			if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
			    nh != IPPROTO_FRAGMENT)
				break;
			__u8 *ext = cur;
			if ((void *)(ext + 8) > end)    /* every extension header is at least 8 bytes */
				return PARSE_MALFORMED;
			if (nh == IPPROTO_FRAGMENT) {
				if (((ext[2] << 8) | ext[3]) & 0xfff8)
					p->frag = 1;
				cur += 8;
			} else {
				cur += (ext[1] + 1) * 8;
			}
			nh = ext[0];
		}
		if (i == HW_V6_EXT_MAX)
			return PARSE_MALFORMED;     /* chain longer than HW_V6_EXT_MAX */
		p->proto = nh;
	} else {
		return PARSE_NOT_IP;
	}
	if (cur > end)
		return PARSE_MALFORMED;
	return parse_l4(p, cur, end);
}

/* ---- helpers -------------------------------------------------------------------------------- */
/* Index of the lowest set bit (x != 0): popcount of the bits below it. Branch-free on purpose: BPF has
 * no conditional set, so a compare ladder would multiply the paths the verifier must walk. */
static __always_inline __u32 ctz64(__u64 x)
{
	__u64 v = (x & -x) - 1;
	v = v - ((v >> 1) & 0x5555555555555555ULL);
	v = (v & 0x3333333333333333ULL) + ((v >> 2) & 0x3333333333333333ULL);
	v = (v + (v >> 4)) & 0x0f0f0f0f0f0f0f0fULL;
	return (__u32)((v * 0x0101010101010101ULL) >> 56);
}

/* ---- policy classification ------------------------------------------------------------------ */
/* Peer class of an IPv4 address: top-16 bucket, then binary search among that bucket's intervals.
 * Cost: 1 + ceil(log2(intervals in bucket)) inlined array loads. */
static __always_inline int peer_class4(__u32 gen, __u32 addr_be, __u32 *cls)
{
	__u32 addr = bpf_ntohl(addr_be);
	__u32 k = gen * HW_TOP_SIZE + (addr >> 16);
	struct hw_top *t = hw_top4.lookup(&k);
	if (!t)
		return -1;
	__u32 lo = t->first, hi = t->last;
	for (int i = 0; i < HW_SEARCH_STEPS && lo < hi; i++) {
		__u32 mid = lo + ((hi - lo + 1) >> 1);
		__u32 idx = gen * HW_V4_INTERVALS_MAX + (mid & (HW_V4_INTERVALS_MAX - 1));
		struct hw_iv4 *e = hw_iv4.lookup(&idx);
		if (!e)
			return -1;
		if (e->start <= addr)
			lo = mid;
		else
			hi = mid - 1;
	}
	__u32 idx = gen * HW_V4_INTERVALS_MAX + (lo & (HW_V4_INTERVALS_MAX - 1));
	struct hw_iv4 *e = hw_iv4.lookup(&idx);
	if (!e)
		return -1;
	*cls = e->cls;
	return 0;
}

static __always_inline int peer_class6(__u32 gen, __u32 *addr_be, __u32 *cls)
{
	__u64 ahi = ((__u64)bpf_ntohl(addr_be[0]) << 32) | bpf_ntohl(addr_be[1]);
	__u64 alo = ((__u64)bpf_ntohl(addr_be[2]) << 32) | bpf_ntohl(addr_be[3]);
	__u32 k = gen * HW_TOP_SIZE + (__u32)(ahi >> 48);
	struct hw_top *t = hw_top6.lookup(&k);
	if (!t)
		return -1;
	__u32 lo = t->first, hi = t->last;
	for (int i = 0; i < HW_SEARCH_STEPS && lo < hi; i++) {
		__u32 mid = lo + ((hi - lo + 1) >> 1);
		__u32 idx = gen * HW_V6_INTERVALS_MAX + (mid & (HW_V6_INTERVALS_MAX - 1));
		struct hw_iv6 *e = hw_iv6.lookup(&idx);
		if (!e)
			return -1;
		if (e->hi < ahi || (e->hi == ahi && e->lo <= alo))
			lo = mid;
		else
			hi = mid - 1;
	}
	__u32 idx = gen * HW_V6_INTERVALS_MAX + (lo & (HW_V6_INTERVALS_MAX - 1));
	struct hw_iv6 *e = hw_iv6.lookup(&idx);
	if (!e)
		return -1;
	*cls = e->cls;
	return 0;
}

static __always_inline int l4_class(__u32 gen, __u32 dir, struct pkt *p, __u32 *cls)
{
	__u32 port = (p->pidx <= HW_P_UDP && !p->frag) ? bpf_ntohs(p->dport) : 0;
	__u32 key = (dir * HW_PROTO_IDX_MAX + p->pidx) * 65536 + port;
	__u32 idx = gen * HW_L4_ELEMS + key / HW_L4_SLOTS_PER_ELEM;
	struct hw_l4_elem *e = hw_l4.lookup(&idx);
	if (!e)
		return -1;
	*cls = e->cls[key & (HW_L4_SLOTS_PER_ELEM - 1)];
	return 0;
}

/* First matching rule (order index) or -1: AND the two class bitmaps, lowest set bit.
 * The summary word (bit w: word w non-empty) is tested four words at a time; within a group with
 * candidates the words are ANDed in order. Cost: ~5 instructions per empty group, ~16 per group
 * with candidates; worst case (every word a candidate, the match in the last) ~300 instructions. */
static __always_inline int first_match(__u32 gen, __u32 pcls, __u32 lcls)
{
	__u32 ka = gen * HW_PEER_CLASSES_MAX + (pcls & (HW_PEER_CLASSES_MAX - 1));
	__u32 kb = gen * HW_L4_CLASSES_MAX + (lcls & (HW_L4_CLASSES_MAX - 1));
	struct hw_class *a = hw_peer_cls.lookup(&ka);
	struct hw_class *b = hw_l4_cls.lookup(&kb);
	if (!a || !b)
		return -1;
	__u64 s = a->summary & b->summary;
	for (int g = 0; g < HW_WORDS / 4; g++) {
		__u64 rest = s >> (g * 4);
		if (!rest)
			break;
		if (!(rest & 0xf))
			continue;
		__u32 w = (g * 4) & (HW_WORDS - 4);
		__u64 v = a->words[w] & b->words[w];
		if (v)
			return w * 64 + ctz64(v);
		v = a->words[w + 1] & b->words[w + 1];
		if (v)
			return (w + 1) * 64 + ctz64(v);
		v = a->words[w + 2] & b->words[w + 2];
		if (v)
			return (w + 2) * 64 + ctz64(v);
		v = a->words[w + 3] & b->words[w + 3];
		if (v)
			return (w + 3) * 64 + ctz64(v);
	}
	return -1;
}

/* ---- per-packet environment ----------------------------------------------------------------- */
struct env {
	struct hw_config *cfg;  /* enforcer's knobs (never NULL: array map) */
	struct hw_collect *col; /* collector's knobs (never NULL: array map) */
	__u64 now;              /* coarse monotonic ns (or the test clock) */
	__u64 cgroup;           /* egress: sender's cgroup id */
	__u32 hook;             /* enum hw_hook */
	__u32 dir;              /* enum hw_dir */
	__u32 gen;              /* policy generation read once for this packet */
};

/* ---- events (bounded by a per-CPU token budget) ---------------------------------------------- */
/* now - then, capped; 0 when `then` is later (another CPU stored a newer reading of the clock). */
static __always_inline __u64 elapsed_ns(__u64 now, __u64 then, __u64 cap)
{
	__s64 d = (__s64)(now - then);
	return d <= 0 ? 0 : (__u64)d > cap ? cap : (__u64)d;
}

static __always_inline void ev_count(__u32 type, __u32 outcome)
{
	__u32 k = type * HW_EV_OUTCOMES + outcome;
	struct hw_counter *c = hw_ev_stats.lookup(&k);
	if (c)
		c->packets++;
}

/* May one more event enter the ring buffer now? Each CPU gets budget/ncpus events per second with
 * a 50 ms burst, so all CPUs together stay within ~1.05 x budget in any second. */
static __always_inline int ev_budget_take(struct env *v)
{
	__u32 zero = 0;
	struct hw_ev_budget *b = hw_ev_budget.lookup(&zero);
	__u64 budget = v->col->event_budget;
	__u64 ncpus = v->cfg->ncpus ? v->cfg->ncpus : 1;
	if (!b || !budget)
		return 0;
	__u64 dt = elapsed_ns(v->now, b->last_ns, 1000000000ULL);
	__u64 cap = budget * 50 / ncpus + 1000;             /* milli-events: 50 ms worth, at least one */
	__u64 t = b->tokens_milli + dt * budget / ncpus / 1000000ULL;
	b->tokens_milli = t > cap ? cap : t;
	b->last_ns = v->now;
	if (b->tokens_milli < 1000)
		return 0;
	b->tokens_milli -= 1000;
	return 1;
}

/* Reserve an event slot, or count why not. The caller fills and submits it. */
static __always_inline struct hw_event *ev_reserve(struct env *v, __u32 type)
{
	if (!ev_budget_take(v)) {
		ev_count(type, HW_EO_BUDGET);
		return 0;
	}
	struct hw_event *e = hw_events.ringbuf_reserve(sizeof(struct hw_event));
	if (!e) {
		ev_count(type, HW_EO_RINGBUF_FULL);
		return 0;
	}
	ev_count(type, HW_EO_EMITTED);
	__builtin_memset(e, 0, sizeof(*e));
	e->type = type;
	e->ts_ns = bpf_ktime_get_ns();
	e->start_ns = e->ts_ns;
	e->hook = v->hook;
	e->direction = v->dir;
	e->cgroup_id = v->cgroup;
	return e;
}

static __always_inline void ev_packet(struct hw_event *e, struct pkt *p)
{
	__builtin_memcpy(e->saddr, p->saddr, 16);
	__builtin_memcpy(e->daddr, p->daddr, 16);
	e->sport = p->sport;
	e->dport = p->dport;
	e->family = p->family;
	e->proto = p->proto;
	e->ifindex = p->ifindex;
	e->tcp_flags = p->tcp_flags;
	e->icmp_type = p->icmp_type;
	e->icmp_code = p->icmp_code;
	e->packets[0] = 1;
	e->bytes[0] = p->len;
}

static __always_inline void counter_add(struct hw_counter *c, __u32 len)
{
	if (c) {
		c->packets++;
		c->bytes += len;
	}
}

/* ---- connection tracking -------------------------------------------------------------------- */
struct ctref {
	struct hw_ct_entry *e;
	__u8 side;              /* which side of the normalised key sent this packet: 0 = a, 1 = b */
};

static __always_inline __u8 ct_key4(struct hw_ct4_key *k, __u32 s, __u32 d, __u16 sp, __u16 dp, __u8 proto)
{
	__u8 side = (s > d) || (s == d && sp > dp);
	k->addr_a = side ? d : s;
	k->addr_b = side ? s : d;
	k->port_a = side ? dp : sp;
	k->port_b = side ? sp : dp;
	k->proto = proto;
	return side;
}

static __always_inline int addr6_cmp(__u32 *x, __u32 *y)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (x[i] != y[i])
			return bpf_ntohl(x[i]) < bpf_ntohl(y[i]) ? -1 : 1;
	}
	return 0;
}

static __always_inline __u8 ct_key6(struct hw_ct6_key *k, __u32 *s, __u32 *d, __u16 sp, __u16 dp, __u8 proto)
{
	int c = addr6_cmp(s, d);
	__u8 side = c > 0 || (c == 0 && sp > dp);
	__builtin_memcpy(k->addr_a, side ? d : s, 16);
	__builtin_memcpy(k->addr_b, side ? s : d, 16);
	k->port_a = side ? dp : sp;
	k->port_b = side ? sp : dp;
	k->proto = proto;
	return side;
}

static __always_inline __u64 ct_timeout_ns(struct hw_ct_entry *e, __u8 proto)
{
	__u64 s;
	if (proto == IPPROTO_TCP) {
		switch (e->state) {
		case HW_CT_ESTABLISHED: s = HW_CT_TO_ESTABLISHED; break;
		case HW_CT_SYN_SENT:    s = HW_CT_TO_SYN; break;
		case HW_CT_FIN_WAIT:
		case HW_CT_CLOSING:     s = HW_CT_TO_FIN; break;
		default:                s = HW_CT_TO_CLOSE; break;
		}
	} else if (proto == IPPROTO_UDP) {
		s = e->state == HW_CT_ESTABLISHED ? HW_CT_TO_UDP_REPLIED : HW_CT_TO_UDP;
	} else {
		s = HW_CT_TO_ICMP;
	}
	return s * 1000000000ULL;
}

/* The set-associative tables (conntrack, DoS sources): a key is hashed and compared as its 64-bit
 * words, so keys are 8-aligned with zeroed pad bytes. First slot of its bucket: a seeded
 * multiply-xorshift over the words (enforcer/slot_table.py computes the same); the seed is random per
 * instance. */
static __always_inline __u32 tbl_first_slot(void *key, __u32 nwords, __u64 seed, __u32 slots, __u32 ways)
{
	__u64 *w = key, h = seed;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i < nwords) {
			h = (h ^ w[i]) * 0x9e3779b97f4a7c15ULL;
			h ^= h >> 29;
		}
	}
	return ((__u32)(h >> 32) & (slots / ways - 1)) * ways;
}

/* 0 when two keys are equal: their words XORed and ORed (one branch for the caller, where a
 * field-by-field compare would give the verifier a path per field). */
static __always_inline __u64 tbl_key_diff(void *x, void *y, __u32 nwords)
{
	__u64 *a = x, *b = y, d = 0;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i < nwords)
			d |= a[i] ^ b[i];
	}
	return d;
}

#define CT4_WORDS (sizeof(struct hw_ct4_key) / 8)
#define CT6_WORDS (sizeof(struct hw_ct6_key) / 8)
#define DOS_WORDS (sizeof(struct hw_dos_key) / 8)

static __always_inline __u32 ct_base4(struct hw_ct4_key *k, __u64 seed)
{
	return tbl_first_slot(k, CT4_WORDS, seed, HW_CT_MAX, HW_CT_WAYS);
}

static __always_inline __u32 ct_base6(struct hw_ct6_key *k, __u64 seed)
{
	return tbl_first_slot(k, CT6_WORDS, seed, HW_CT_MAX, HW_CT_WAYS);
}

static __always_inline int ct_expired(struct hw_ct_entry *e, __u8 proto, __u64 now)
{
	return (__s64)(now - e->last_ns) > (__s64)ct_timeout_ns(e, proto);
}

/* Look up the connection of (s,d,sp,dp,proto); live entries only. HW_CT_WAYS inlined array lookups
 * and one-branch key compares, then one more lookup of the hit. The loop only notes the hit's index
 * (no early exit): compiled code after it is not duplicated per way, so the verifier's paths through
 * it merge (an early `break` multiplied the verified size of the whole judgement by the ways). */
static __always_inline int ct_find(struct env *v, struct pkt *p, __u32 *s, __u32 *d, __u16 sp, __u16 dp,
				   __u8 proto, struct ctref *r)
{
	struct hw_ct_entry *e = 0;
	__u32 hit = HW_CT_MAX;          /* no slot */
	if (p->family == 4) {
		struct hw_ct4_key k __attribute__((aligned(8))) = {};   /* compared as 64-bit words */
		r->side = ct_key4(&k, s[0], d[0], sp, dp, proto);
		__u32 base = ct_base4(&k, v->cfg->table_seed);
#pragma unroll
		for (int i = 0; i < HW_CT_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_ct4_slot *sl = hw_ct4.lookup(&idx);
			asm volatile("" : "+r"(sl));   /* one call site per map: inlined */
			if (sl && !(tbl_key_diff(&sl->k, &k, CT4_WORDS) | (sl->e.slot_state ^ HW_SLOT_LIVE)))
				hit = idx;
		}
		struct hw_ct4_slot *sl = hw_ct4.lookup(&hit);
		asm volatile("" : "+r"(sl));
		if (sl)
			e = &sl->e;
	} else {
		struct hw_ct6_key k __attribute__((aligned(8))) = {};
		r->side = ct_key6(&k, s, d, sp, dp, proto);
		__u32 base = ct_base6(&k, v->cfg->table_seed);
#pragma unroll
		for (int i = 0; i < HW_CT_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_ct6_slot *sl = hw_ct6.lookup(&idx);
			if (sl && !(tbl_key_diff(&sl->k, &k, CT6_WORDS) | (sl->e.slot_state ^ HW_SLOT_LIVE)))
				hit = idx;
		}
		struct hw_ct6_slot *sl = hw_ct6.lookup(&hit);
		if (sl)
			e = &sl->e;
	}
	if (!e || ct_expired(e, proto, v->now))
		return 0;
	r->e = e;
	return 1;
}

/* A flow_end event's view of its connection: start, totals per direction, rule, state. */
static __always_inline void ev_flow_totals(struct hw_event *ev, struct hw_ct_entry *e)
{
	ev->start_ns = e->created_ns;
	ev->packets[0] = e->packets[0];
	ev->packets[1] = e->packets[1];
	ev->bytes[0] = e->bytes[0];
	ev->bytes[1] = e->bytes[1];
	ev->cgroup_id = e->cgroup_id;
	ev->rule_slot = e->rule_slot;
	ev->revision_id = e->revision_id;
	ev->direction = e->origin;
	ev->ct_state = e->state;
	ev->verdict = HW_V_ALLOW;
	ev->reason = HW_R_PASS_CONNTRACK;
}

/* A tracked TCP connection just closed: report it once, with its totals. */
static __always_inline void ct_emit_end(struct env *v, struct pkt *p, struct ctref *r, __u8 from_init)
{
	struct hw_ct_entry *e = r->e;
	if (e->fin_seen & HW_CT_F_END_EMITTED)
		return;
	struct hw_event *ev = ev_reserve(v, HW_EV_FLOW_END);
	if (!ev)
		return;                 /* the collector's conntrack scan reports it at expiry */
	e->fin_seen |= HW_CT_F_END_EMITTED;
	ev_packet(ev, p);
	ev->ts_ns = v->now;             /* start and end of a flow on one clock */
	if (!from_init) {               /* flows are reported from the initiator's side */
		__builtin_memcpy(ev->saddr, p->daddr, 16);
		__builtin_memcpy(ev->daddr, p->saddr, 16);
		ev->sport = p->dport;
		ev->dport = p->sport;
	}
	ev_flow_totals(ev, e);
	hw_events.ringbuf_submit(ev, 0);
}

/* Is this packet a valid continuation of the tracked connection? Updates state if so. */
static __always_inline int ct_advance(struct env *v, struct pkt *p, struct ctref *r)
{
	struct hw_ct_entry *e = r->e;
	__u8 from_init = r->side == e->initiator;
	/* the initiator's packets travel the way the first one did, the responder's the other way */
	if ((from_init ? e->origin : !e->origin) != v->dir)
		return 0;
	if (p->proto == IPPROTO_TCP) {
		__u8 f = p->tcp_flags;
		if (f & TCPF_RST) {
			e->state = HW_CT_CLOSED;
		} else if ((f & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK)) {
			if (from_init)
				return 0;
			if (e->state == HW_CT_SYN_SENT)
				e->state = HW_CT_ESTABLISHED;
		} else if (f & TCPF_SYN) {
			if (!from_init || e->state >= HW_CT_FIN_WAIT)
				return 0;   /* a new connection on a closing tuple is judged afresh */
		} else if (e->state >= HW_CT_CLOSED) {
			return 0;
		}
		if (f & TCPF_FIN) {
			e->fin_seen |= from_init ? 1 : 2;
			e->state = (e->fin_seen & 3) == 3 ? HW_CT_CLOSING : HW_CT_FIN_WAIT;
		}
	} else if (!from_init && e->state == HW_CT_NEW) {
		e->state = HW_CT_ESTABLISHED;
	}
	e->last_ns = v->now;
	__sync_fetch_and_add(&e->packets[!from_init], 1);
	__sync_fetch_and_add(&e->bytes[!from_init], p->len);
	if (e->state >= HW_CT_CLOSING)
		ct_emit_end(v, p, r, from_init);
	return 1;
}

static __always_inline void ct_stat(__u8 family, __u32 what)
{
	__u32 k = (family == 6) * HW_CT_STATS + what;
	counter_add(hw_ct_stats.lookup(&k), 0);
}

/* Report a connection the datapath displaces from its slot (idle past its timeout, replaced, or
 * evicted from a full bucket) with its totals, once: as the collector's idle scan would have. */
static __always_inline void ct_retire(struct env *v, struct hw_ct_entry *e, __u32 *a, __u32 *b, __u16 pa,
				      __u16 pb, __u8 proto, __u8 family, __u8 cause)
{
	if (e->fin_seen & HW_CT_F_END_EMITTED)
		return;
	struct hw_event *ev = ev_reserve(v, HW_EV_FLOW_END);
	if (!ev)
		return;                 /* counted by ev_reserve */
	if (family == 4) {              /* the v4 key holds one word per address (ev_reserve zeroed the rest) */
		ev->saddr[0] = e->initiator ? b[0] : a[0];
		ev->daddr[0] = e->initiator ? a[0] : b[0];
	} else {
		__builtin_memcpy(ev->saddr, e->initiator ? b : a, 16);
		__builtin_memcpy(ev->daddr, e->initiator ? a : b, 16);
	}
	ev->sport = e->initiator ? pb : pa;
	ev->dport = e->initiator ? pa : pb;
	ev->family = family;
	ev->proto = proto;
	ev->ts_ns = e->last_ns;         /* it ended with its last packet */
	ev_flow_totals(ev, e);
	ev->end_cause = cause;
	hw_events.ringbuf_submit(ev, 0);
}

/* Rank of a slot for a new connection: its own old slot (4), a free one (3), an expired one (2), a
 * live one (1: evicted if nothing better, least recently used first); 0: BUSY, another CPU is
 * writing it. `diff`: ct_key*_diff of the slot's key and the new one. */
static __always_inline __u32 ct_rank(struct hw_ct_entry *e, __u64 diff, __u8 proto, __u64 now)
{
	__u64 st = e->slot_state;
	if (st == HW_SLOT_FREE)
		return 3;
	if (st != HW_SLOT_LIVE)
		return 0;
	if (!diff)
		return 4;
	return ct_expired(e, proto, now) ? 2 : 1;
}

/* Claim the picked slot (FREE/LIVE → BUSY) and count the insert. 0: none to pick, or another CPU
 * took it first (counted; this connection is then not tracked). */
static __always_inline int ct_claim(struct env *v, __u32 rank, struct hw_ct_entry *e, __u8 proto, __u8 family)
{
	__u64 seen = rank == 3 ? HW_SLOT_FREE : HW_SLOT_LIVE;
	if (!rank || __sync_val_compare_and_swap(&e->slot_state, seen, HW_SLOT_BUSY) != seen) {
		ct_stat(family, HW_CTS_CLAIM_LOST);
		return 0;
	}
	ct_stat(family, HW_CTS_INSERTED);
	if (rank == 1)
		ct_stat(family, HW_CTS_EVICTED);
	else if (rank == 2 || (rank == 4 && ct_expired(e, proto, v->now)))
		ct_stat(family, HW_CTS_REUSED_IDLE);
	return 1;
}

/* Why a displaced connection ended (hw_event.end_cause). */
static __always_inline __u8 ct_cause(__u32 rank, struct hw_ct_entry *e, __u8 proto, __u64 now)
{
	if (rank == 1)
		return HW_END_EVICTED;
	return rank == 2 || ct_expired(e, proto, now) ? HW_END_IDLE : HW_END_CLOSED;
}

/* Take a slot of k's bucket for a new connection: the best ranked (ct_rank), reporting the connection
 * it held. Returns the slot's entry, BUSY, with k written; 0 if none could be claimed. */
static __always_inline struct hw_ct_entry *ct_take4(struct env *v, struct hw_ct4_key *k)
{
	__u32 pick_idx = HW_CT_MAX, rank = 0;
	__u64 oldest = ~0ULL;
	__u32 base = ct_base4(k, v->cfg->table_seed);
#pragma unroll
	for (int i = 0; i < HW_CT_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_ct4_slot *sl = hw_ct4.lookup(&idx);
		asm volatile("" : "+r"(sl));   /* one call site per map: inlined */
		if (!sl)
			continue;
		__u32 r = ct_rank(&sl->e, tbl_key_diff(&sl->k, k, CT4_WORDS), sl->k.proto, v->now);
		if (r > rank || (r == 1 && rank == 1 && sl->e.last_ns < oldest)) {
			pick_idx = idx;
			rank = r;
			oldest = sl->e.last_ns;
		}
	}
	struct hw_ct4_slot *pick = hw_ct4.lookup(&pick_idx);
	asm volatile("" : "+r"(pick));
	if (!pick || !ct_claim(v, rank, &pick->e, pick->k.proto, 4))
		return 0;
	if (rank != 3)
		ct_retire(v, &pick->e, &pick->k.addr_a, &pick->k.addr_b, pick->k.port_a, pick->k.port_b, pick->k.proto, 4,
			  ct_cause(rank, &pick->e, pick->k.proto, v->now));
	pick->k = *k;
	return &pick->e;
}

static __always_inline struct hw_ct_entry *ct_take6(struct env *v, struct hw_ct6_key *k)
{
	__u32 pick_idx = HW_CT_MAX, rank = 0;
	__u64 oldest = ~0ULL;
	__u32 base = ct_base6(k, v->cfg->table_seed);
#pragma unroll
	for (int i = 0; i < HW_CT_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_ct6_slot *sl = hw_ct6.lookup(&idx);
		if (!sl)
			continue;
		__u32 r = ct_rank(&sl->e, tbl_key_diff(&sl->k, k, CT6_WORDS), sl->k.proto, v->now);
		if (r > rank || (r == 1 && rank == 1 && sl->e.last_ns < oldest)) {
			pick_idx = idx;
			rank = r;
			oldest = sl->e.last_ns;
		}
	}
	struct hw_ct6_slot *pick = hw_ct6.lookup(&pick_idx);
	if (!pick || !ct_claim(v, rank, &pick->e, pick->k.proto, 6))
		return 0;
	if (rank != 3)
		ct_retire(v, &pick->e, pick->k.addr_a, pick->k.addr_b, pick->k.port_a, pick->k.port_b, pick->k.proto, 6,
			  ct_cause(rank, &pick->e, pick->k.proto, v->now));
	pick->k = *k;
	return &pick->e;
}

static __always_inline void ct_open(struct env *v, struct pkt *p, __u32 slot, __u32 rev, __u32 reason)
{
	struct hw_ct_entry *e;
	__u8 initiator;
	if (p->family == 4) {
		struct hw_ct4_key k __attribute__((aligned(8))) = {};   /* compared as 64-bit words */
		initiator = ct_key4(&k, p->saddr[0], p->daddr[0], p->sport, p->dport, p->proto);
		e = ct_take4(v, &k);
	} else {
		struct hw_ct6_key k __attribute__((aligned(8))) = {};
		initiator = ct_key6(&k, p->saddr, p->daddr, p->sport, p->dport, p->proto);
		e = ct_take6(v, &k);
	}
	if (!e)
		return;
	__u8 state = p->proto == IPPROTO_TCP ? HW_CT_SYN_SENT : HW_CT_NEW;
	e->created_ns = v->now;
	e->last_ns = v->now;
	e->packets[0] = 1;
	e->packets[1] = 0;
	e->bytes[0] = p->len;
	e->bytes[1] = 0;
	e->cgroup_id = v->cgroup;
	e->rule_slot = slot;
	e->revision_id = rev;
	e->state = state;
	e->initiator = initiator;
	e->origin = v->dir;
	e->fin_seen = 0;
	__sync_lock_test_and_set(&e->slot_state, HW_SLOT_LIVE);        /* publish: the entry is whole */
	struct hw_event *ev = ev_reserve(v, HW_EV_FLOW_START);
	if (ev) {
		ev_packet(ev, p);
		ev->start_ns = v->now;
		ev->rule_slot = slot;
		ev->revision_id = rev;
		ev->ct_state = state;
		ev->verdict = HW_V_ALLOW;
		ev->reason = reason;
		hw_events.ringbuf_submit(ev, 0);
	}
}

/* ---- the one counted exit ------------------------------------------------------------------- */
struct judgement {
	__u32 verdict;          /* enum hw_verdict */
	__u32 reason;           /* enum hw_reason */
	__u32 slot;             /* rule counter slot, or ~0 */
	__u32 revision_id;
	__u8  action;           /* enum hw_action of the matching rule (log → event) */
	__u8  ruled;            /* a rule decided */
};

/* Report one judged packet (a deny sample or a log rule's packet) with its verdict and rule. */
static __always_inline void ev_judged(struct env *v, struct pkt *p, struct judgement *j, __u32 type)
{
	struct hw_event *ev = ev_reserve(v, type);
	if (!ev)
		return;
	ev_packet(ev, p);
	ev->rule_slot = j->slot;
	ev->revision_id = j->revision_id;
	ev->verdict = j->verdict;
	ev->reason = j->reason;
	hw_events.ringbuf_submit(ev, 0);
}

static __always_inline void drop_val_add(struct hw_drop_val *val, __u32 len, __u64 now)
{
	val->packets++;
	val->bytes += len;
	val->last_ns = now;
}

/* Mask an address (network order words) to `len` bits. */
static __always_inline void mask_addr(__u32 *dst, __u32 *src, __u32 family, __u32 len)
{
	__u32 words = family == 4 ? 1 : 4;
#pragma unroll
	for (int i = 0; i < 4; i++) {
		__u32 keep = len >= 32 * (i + 1) ? 32 : len > 32 * i ? len - 32 * i : 0;
		__u32 m = keep == 0 ? 0 : keep >= 32 ? ~0U : ~0U << (32 - keep);
		dst[i] = i < words ? src[i] & bpf_htonl(m) : 0;
	}
}

static __always_inline void agg_overflow(struct env *v, struct judgement *j, struct pkt *p, __u32 gen)
{
	__u32 k = (gen * HW_VERDICTS + j->verdict) * HW_REASONS + j->reason;
	counter_add(hw_drop_overflow.lookup(&k), p->len);
}

/* Add a dropped (or would-drop) packet to the drop aggregation of the current interval; the first
 * packet of a key in an interval is also reported as a `deny` event with its full tuple. */
static __always_inline void agg_drop(struct env *v, struct pkt *p, struct judgement *j)
{
	struct hw_drop_key k = {};
	__u32 fam = p->family;
	__u32 len = fam == 4 ? v->col->agg_prefix_v4 : v->col->agg_prefix_v6;
	mask_addr(k.src, v->dir == HW_DIR_INGRESS ? p->saddr : p->daddr, fam, len);
	k.ifindex = p->ifindex;
	k.dport = (p->pidx <= HW_P_UDP && !p->frag) ? p->dport : 0;
	k.reason = j->reason;
	k.verdict = j->verdict;
	k.proto = p->proto;
	k.family = fam;
	k.prefix_len = fam ? len : 0;
	k.direction = v->dir;
	__u32 gen = v->col->agg_gen & 1;
	struct hw_drop_val *val;
	if (gen) {
		val = hw_drops1.lookup(&k);
		asm volatile("" : "+r"(val));   /* keep two call sites: one map each, so both get inlined */
	} else {
		val = hw_drops0.lookup(&k);
	}
	if (val) {
		drop_val_add(val, p->len, v->now);
		return;
	}
	struct hw_drop_val nv = {.packets = 1, .bytes = p->len, .first_ns = v->now, .last_ns = v->now};
	int rc = gen ? hw_drops1.insert(&k, &nv) : hw_drops0.insert(&k, &nv);
	if (rc) {
		/* EEXIST: another CPU created it between our lookup and insert — add to our slot */
		val = gen ? hw_drops1.lookup(&k) : hw_drops0.lookup(&k);
		if (val) {
			drop_val_add(val, p->len, v->now);
		} else {
			agg_overflow(v, j, p, gen);     /* map full: counted, never silent */
		}
		return;
	}
	ev_judged(v, p, j, HW_EV_DENY);
}

static __always_inline void count(struct env *v, struct pkt *p, struct judgement *j)
{
	__u32 k = (v->hook * HW_VERDICTS + j->verdict) * HW_REASONS + j->reason;
	counter_add(hw_stats.lookup(&k), p->len);
	if (j->slot < HW_MAX_RULE_SLOTS) {
		__u32 s = j->slot;
		counter_add(hw_rule_stats.lookup(&s), p->len);
	}
	if (p->pidx <= HW_P_UDP && p->family && !p->frag) {
		__u32 port = bpf_ntohs(p->dport);
		struct hw_port_counter *pc = hw_port_stats.lookup(&port);
		if (pc) {
			if (j->verdict == HW_V_ALLOW)
				pc->allowed++;
			else if (j->verdict == HW_V_DROP)
				pc->dropped++;
			else
				pc->would_drop++;
		}
	}
	if (j->verdict != HW_V_ALLOW) {
		agg_drop(v, p, j);
	} else if (j->ruled && j->action == HW_ACT_LOG) {
		ev_judged(v, p, j, HW_EV_LOG);
	}
}

/* ---- DoS guards (XDP ingress, before conntrack and policy) ----------------------------------- */
/* Refill a bucket of `rate`/s (tokens in 1e-9 units) capped at `cap`, then take `cost`; 1 = admitted. */
static __always_inline int bucket_take(__u64 *tok, __u64 rate, __u64 cap, __u64 dt, __u64 cost)
{
	__u64 t = *tok + rate * dt;
	if (t > cap || t < *tok)
		t = cap;
	if (t < cost) {
		*tok = t;
		return 0;
	}
	*tok = t - cost;
	return 1;
}

/* Bits bucket in 1e-3 bit units: refill bps * dt / 1e6, as (bps_fp * dt) >> 20 with
 * bps_fp = bps * 2^20 / 1e6 (no division per packet). dt is clamped to 100 ms so the product fits
 * 64 bits up to ~100 Gbit/s; the bits burst is at most 100 ms worth, so nothing is lost by it. */
static __always_inline int bits_take(__u64 *tok, __u64 bps_fp, __u64 cap, __u64 dt, __u64 cost)
{
	if (dt > 100000000ULL)
		dt = 100000000ULL;
	__u64 t = *tok + ((bps_fp * dt) >> 20);
	if (t > cap)
		t = cap;
	if (t < cost) {
		*tok = t;
		return 0;
	}
	*tok = t - cost;
	return 1;
}

static __always_inline struct hw_dos_profile *dos_profile(struct env *v, __u32 ifindex, __u32 *id)
{
	__u32 base = v->gen * HW_DOS_IF_SLOTS;
#pragma unroll
	for (int i = 0; i < HW_DOS_IF_PROBES; i++) {
		__u32 k = base + ((ifindex + i) & (HW_DOS_IF_SLOTS - 1));
		struct hw_dos_if *f = hw_dos_ifs.lookup(&k);
		if (!f || f->ifindex == 0)
			return 0;
		if (f->ifindex == ifindex) {
			*id = f->profile & (HW_DOS_PROFILES_MAX - 1);
			__u32 pk = v->gen * HW_DOS_PROFILES_MAX + *id;
			struct hw_dos_profile *pr = hw_dos_profiles.lookup(&pk);
			return pr && pr->enabled ? pr : 0;
		}
	}
	return 0;
}

static __always_inline int manual_banned(struct env *v, struct pkt *p)
{
	struct hw_manual_ban *b;
	if (p->family == 4) {
		struct hw_ban4_key k = {.prefixlen = 32, .addr = p->saddr[0]};
		b = hw_manual_ban4.lookup(&k);
	} else {
		struct hw_ban6_key k = {.prefixlen = 128};
		__builtin_memcpy(k.addr, p->saddr, 16);
		b = hw_manual_ban6.lookup(&k);
	}
	return b && (b->until_ns == 0 || b->until_ns > v->now);
}

static __always_inline void dos_ban(struct env *v, struct hw_dos_key *k, struct hw_dos_src *s,
				    struct hw_dos_profile *pr, __u32 reason)
{
	s->banned_until_ns = v->now + pr->ban_ns;
	struct hw_dos_ban b = {.since_ns = v->now, .until_ns = s->banned_until_ns, .reason = reason};
	hw_dos_banned.update(k, &b);    /* for listing; if full, the ban still holds through *s */
}

static __always_inline __u32 dos_base(struct hw_dos_key *k, __u64 seed)
{
	return tbl_first_slot(k, DOS_WORDS, seed, HW_DOS_SRC_MAX, HW_DOS_WAYS);
}

static __always_inline void dos_src_stat(__u32 what)
{
	counter_add(hw_dos_src_stats.lookup(&what), 0);
}

/* Rank of a slot for a new source: free (3), a live unbanned one (2), a live banned one (1); the least
 * recently seen first among live ones; 0: BUSY. */
static __always_inline __u32 dos_rank(struct hw_dos_slot *sl, __u64 now)
{
	__u64 st = sl->slot_state;
	if (st == HW_SLOT_FREE)
		return 3;
	if (st != HW_SLOT_LIVE)
		return 0;
	return sl->s.banned_until_ns > now ? 1 : 2;
}

/* Start tracking source k in a slot of its bucket (full buckets evict, counted); 0: lost the slot to
 * another CPU (counted; no per-source limit for this packet: fail open). */
static __always_inline struct hw_dos_src *dos_take(struct env *v, struct hw_dos_key *k, __u32 base,
						   struct hw_dos_profile *pr)
{
	__u32 pick_idx = HW_DOS_SRC_MAX, rank = 0;
	__u64 oldest = ~0ULL;
#pragma unroll
	for (int i = 0; i < HW_DOS_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_dos_slot *sl = hw_dos_src.lookup(&idx);
		if (!sl)
			continue;
		__u32 r = dos_rank(sl, v->now);
		if (r > rank || (r == rank && r && r < 3 && sl->s.last_ns < oldest)) {
			pick_idx = idx;
			rank = r;
			oldest = sl->s.last_ns;
		}
	}
	struct hw_dos_slot *sl = hw_dos_src.lookup(&pick_idx);
	__u64 seen = rank == 3 ? HW_SLOT_FREE : HW_SLOT_LIVE;
	if (!sl || !rank || __sync_val_compare_and_swap(&sl->slot_state, seen, HW_SLOT_BUSY) != seen) {
		dos_src_stat(HW_DSS_CLAIM_LOST);
		return 0;
	}
	dos_src_stat(HW_DSS_INSERTED);
	if (rank != 3)
		dos_src_stat(HW_DSS_EVICTED);
	sl->k = *k;
	struct hw_dos_src n = {.last_ns = v->now, .tok_pkt = pr->burst * 1000000000ULL,
			       .tok_bits = pr->bps_burst * 1000ULL, .tok_syn = pr->syn_pps * 1000000000ULL,
			       .tok_udp = pr->udp_pps * 1000000000ULL, .tok_icmp = pr->icmp_pps * 1000000000ULL};
	sl->s = n;
	__sync_lock_test_and_set(&sl->slot_state, HW_SLOT_LIVE);
	return &sl->s;
}

/* Per-source limits; returns a drop reason or 0. Keeps the over-limit streak and bans. Finding the
 * source costs HW_DOS_WAYS inlined array probes (no helper call), as conntrack does. */
static __always_inline __u32 dos_source(struct env *v, struct pkt *p, struct hw_dos_profile *pr, __u32 profile)
{
	struct hw_dos_key k __attribute__((aligned(8))) = {};   /* compared as 64-bit words */
	__u32 len = p->family == 4 ? pr->prefix_v4 : pr->prefix_v6;
	mask_addr(k.addr, p->saddr, p->family, len);
	k.family = p->family;
	k.prefix_len = len;
	k.profile = profile;
	__u32 base = dos_base(&k, v->cfg->table_seed);
	__u32 hit = HW_DOS_SRC_MAX;
#pragma unroll
	for (int i = 0; i < HW_DOS_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_dos_slot *sl = hw_dos_src.lookup(&idx);
		if (sl && !(tbl_key_diff(&sl->k, &k, DOS_WORDS) | (sl->slot_state ^ HW_SLOT_LIVE)))
			hit = idx;
	}
	struct hw_dos_slot *sl = hw_dos_src.lookup(&hit);
	struct hw_dos_src *s = sl ? &sl->s : dos_take(v, &k, base, pr);
	if (!s)
		return 0;
	if (s->banned_until_ns) {
		if (s->banned_until_ns > v->now)
			return HW_R_BANNED;
		s->banned_until_ns = 0;         /* expired by itself */
		s->streak_start_ns = 0;
	}
	__u64 dt = elapsed_ns(v->now, s->last_ns, 2000000000ULL);
	s->last_ns = v->now;
	__u32 reason = 0;
	if (p->proto == IPPROTO_TCP && p->opens && pr->syn_pps &&
	    !bucket_take(&s->tok_syn, pr->syn_pps, pr->syn_pps * 1000000000ULL, dt, 1000000000ULL))
		reason = HW_R_SYN_FLOOD;
	else if (p->proto == IPPROTO_UDP && pr->udp_pps &&
		 !bucket_take(&s->tok_udp, pr->udp_pps, pr->udp_pps * 1000000000ULL, dt, 1000000000ULL))
		reason = HW_R_UDP_FLOOD;
	else if ((p->pidx == HW_P_ICMP || p->pidx == HW_P_ICMPV6) && pr->icmp_pps &&
		 !bucket_take(&s->tok_icmp, pr->icmp_pps, pr->icmp_pps * 1000000000ULL, dt, 1000000000ULL))
		reason = HW_R_ICMP_FLOOD;
	else if (pr->pps && !bucket_take(&s->tok_pkt, pr->pps, pr->burst * 1000000000ULL, dt, 1000000000ULL))
		reason = HW_R_RATE_LIMIT;
	else if (pr->bps && !bits_take(&s->tok_bits, pr->bps_fp, pr->bps_burst * 1000ULL, dt, (__u64)p->len * 8000ULL))
		reason = HW_R_RATE_LIMIT;
	if (!reason)
		return 0;
	if (!s->streak_start_ns || v->now - s->streak_last_ns > HW_DOS_STREAK_GAP_NS)
		s->streak_start_ns = v->now;
	s->streak_last_ns = v->now;
	if (pr->ban_after_ns && v->now - s->streak_start_ns >= pr->ban_after_ns)
		dos_ban(v, &k, s, pr, reason);
	return reason;
}

static __always_inline int global_take(__u32 idx, __u64 rate, __u64 now)
{
	struct hw_bucket *b = hw_dos_global.lookup(&idx);
	if (!b)
		return 1;
	__u64 dt = elapsed_ns(now, b->last_ns, 1000000000ULL);
	b->last_ns = now;
	return bucket_take(&b->tokens, rate, rate * 1000000000ULL, dt, 1000000000ULL);
}

static __always_inline __u32 dos_limits(struct env *v, struct pkt *p, struct hw_dos_profile *pr, __u32 profile)
{
	__u32 reason = dos_source(v, p, pr, profile);
	if (reason)
		return reason;
	if (p->proto == IPPROTO_TCP && p->opens && pr->syn_global_pps &&
	    !global_take(profile * 16, pr->syn_global_pps, v->now))
		return HW_R_SYN_FLOOD;
	if (pr->nports && p->pidx <= HW_P_UDP && !p->frag) {
		__u16 port = bpf_ntohs(p->dport);
#pragma unroll
		for (int i = 0; i < HW_DOS_PORTS_MAX; i++) {
			if (i >= pr->nports)
				break;
			if (pr->ports[i].port == port && pr->ports[i].proto == p->proto)
				return global_take(profile * 16 + 1 + i, pr->ports[i].pps, v->now) ? 0 : HW_R_PORT_LIMIT;
		}
	}
	return 0;
}

static __always_inline void dos_count(__u32 profile, __u32 reason)
{
	__u32 k = (profile & (HW_DOS_PROFILES_MAX - 1)) * HW_REASONS + reason;
	struct hw_counter *c = hw_dos_stats.lookup(&k);
	if (c)
		c->packets++;
}

/* All DoS checks for one ingress packet; returns a drop reason or 0 (admitted). Operator bans apply
 * on every interface; the limits apply where the interface has a profile (counted per profile). */
static __always_inline __u32 dos_check(struct env *v, struct pkt *p)
{
	if (v->cfg->manual_bans && manual_banned(v, p))
		return HW_R_BANNED;
	__u32 profile = 0;
	struct hw_dos_profile *pr = dos_profile(v, p->ifindex, &profile);
	if (!pr)
		return 0;
	__u32 reason = dos_limits(v, p, pr, profile);
	if (reason)
		dos_count(profile, reason);
	return reason;
}

/* ---- the judgement shared by all hooks ------------------------------------------------------ */
static __always_inline void judge(struct env *v, struct pkt *p, struct judgement *j)
{
	struct ctref r = {};
	int ct_invalid = 0;

	if (p->ct_hint) {
		ct_invalid = p->ct_hint == CT_HINT_INVALID;     /* xdp_ingress already looked */
	} else if (p->trackable && !p->frag &&
		   ct_find(v, p, p->saddr, p->daddr, p->sport, p->dport, p->proto, &r)) {
		if (ct_advance(v, p, &r)) {
			j->verdict = HW_V_ALLOW;
			j->reason = HW_R_PASS_CONNTRACK;
			return;
		}
		ct_invalid = 1;
	}
	if (p->related) {
		struct ctref ir = {};
		if (ct_find(v, p, p->in_saddr, p->in_daddr, p->in_sport, p->in_dport, p->in_proto, &ir)) {
			j->verdict = HW_V_ALLOW;
			j->reason = HW_R_PASS_RELATED;
			return;
		}
	}

	__u32 gen = v->gen;
	struct hw_policy_hdr *h = hw_policy.lookup(&gen);
	if (!h)
		goto fail_closed;
	j->revision_id = h->revision_id;

	__u32 pcls = 0, lcls = 0;
	int m = -1;
	int rc = p->family == 4 ? peer_class4(gen, v->dir == HW_DIR_INGRESS ? p->saddr[0] : p->daddr[0], &pcls)
				: peer_class6(gen, v->dir == HW_DIR_INGRESS ? p->saddr : p->daddr, &pcls);
	if (rc == 0 && l4_class(gen, v->dir, p, &lcls) == 0)
		m = first_match(gen, pcls, lcls);

	__u8 action;
	if (m >= 0) {
		__u32 idx = gen * HW_MAX_RULES + ((__u32)m & (HW_MAX_RULES - 1));
		struct hw_rule *rule = hw_rules.lookup(&idx);
		if (!rule)
			goto fail_closed;
		action = rule->action;
		j->slot = rule->slot;
		j->ruled = 1;
		j->action = action;
		j->reason = action == HW_ACT_DENY ? HW_R_POLICY_DENY : HW_R_PASS_RULE;
	} else {
		action = v->dir == HW_DIR_INGRESS ? h->default_ingress : h->default_egress;
		j->reason = action == HW_ACT_DENY ? HW_R_DEFAULT_DENY : HW_R_PASS_DEFAULT;
	}
	if (action == HW_ACT_DENY) {
		if (ct_invalid)
			j->reason = HW_R_CONNTRACK_INVALID;
		j->verdict = h->audit ? HW_V_WOULD_DROP : HW_V_DROP;
		return;
	}
	j->verdict = HW_V_ALLOW;
	if (h->stateful && p->opens && !p->frag)
		ct_open(v, p, j->slot, h->revision_id, j->reason);
	return;

fail_closed:            /* unreachable with loaded maps; counted, never silent */
	j->verdict = HW_V_DROP;
	j->reason = HW_R_MALFORMED;
}

/* The datapath's clock (CLOCK_MONOTONIC ns at tick resolution, like the coarse clock). The verifier
 * inlines bpf_jiffies64 as one load, where a clock helper call costs 20-35 ns per packet here. */
static __always_inline __u64 hw_now(struct hw_config *c)
{
	if (c->test_now_ns)
		return c->test_now_ns;
	if (!c->tick_ns)
		return bpf_ktime_get_coarse_ns();       /* not calibrated yet (the first instant of a load) */
	return bpf_jiffies64() * c->tick_ns + c->tick_base_ns;
}

static __always_inline int env_maps(struct env *v, __u32 hook, __u32 dir, __u64 cgroup)
{
	__u32 zero = 0;
	v->cfg = hw_config.lookup(&zero);
	v->col = hw_collect.lookup(&zero);
	if (!v->cfg || !v->col)
		return -1;
	v->gen = v->cfg->gen & 1;
	v->hook = hook;
	v->dir = dir;
	v->cgroup = cgroup;
	return 0;
}

static __always_inline int env_init(struct env *v, __u32 hook, __u32 dir, __u64 cgroup)
{
	if (env_maps(v, hook, dir, cgroup))
		return -1;
	v->now = hw_now(v->cfg);
	return 0;
}

static __always_inline void judge_parsed(struct env *v, struct pkt *p, int rc, struct judgement *j)
{
	j->slot = ~0U;
	if (rc == PARSE_NOT_IP) {
		j->verdict = HW_V_ALLOW;
		j->reason = HW_R_PASS_NOT_IP;
		return;
	}
	if (rc == PARSE_MALFORMED) {
		__u32 gen = v->gen;
		struct hw_policy_hdr *h = hw_policy.lookup(&gen);
		j->verdict = h && h->audit ? HW_V_WOULD_DROP : HW_V_DROP;
		j->reason = HW_R_MALFORMED;
		p->pidx = HW_P_OTHER;   /* no trustworthy port: aggregate and count without one */
		return;
	}
	judge(v, p, j);
}

/* ---- programs ------------------------------------------------------------------------------- */
/* XDP is two programs joined by a tail call, so each stays within the verifier's budget:
 * xdp_ingress parses and applies the DoS guards; xdp_judge runs conntrack and the policy on the
 * packet xdp_ingress parsed (handed over in per-CPU scratch memory, valid within one packet). */
BPF_PERCPU_ARRAY(hw_pkt_scratch, struct pkt, 1);

static __always_inline int xdp_exit(struct xdp_md *ctx, struct env *v, struct pkt *p, struct judgement *j)
{
	count(v, p, j);
	if (j->verdict == HW_V_DROP)
		return XDP_DROP;
	if (j->reason != HW_R_PASS_DEFERRED)
		return XDP_PASS;
	/* XDP could not judge it: mark it so TC ingress does (if there is no room for the mark, TC
	 * ingress sees an unmarked packet and passes it as judged; both outcomes are counted) */
	if (bpf_xdp_adjust_meta(ctx, -(int)sizeof(struct hw_meta)) == 0) {
		struct hw_meta *meta = (void *)(long)ctx->data_meta;
		if ((void *)(meta + 1) <= (void *)(long)ctx->data) {
			meta->magic = HW_META_MAGIC;
			meta->reason = j->reason;
		}
	}
	return XDP_PASS;
}

int xdp_judge(struct xdp_md *ctx)
{
	struct judgement j = {};
	struct env v = {};
	__u32 zero = 0;
	struct pkt *p = hw_pkt_scratch.lookup(&zero);
	if (env_maps(&v, HW_HOOK_XDP_INGRESS, HW_DIR_INGRESS, 0) || !p)
		return XDP_PASS;        /* unreachable: array maps */
	v.now = p->now;
	j.slot = ~0U;
	judge(&v, p, &j);
	return xdp_exit(ctx, &v, p, &j);
}

int xdp_ingress(struct xdp_md *ctx)
{
	struct pkt p = {};
	struct judgement j = {};
	struct env v = {};
	if (env_init(&v, HW_HOOK_XDP_INGRESS, HW_DIR_INGRESS, 0))
		return XDP_PASS;        /* unreachable: hw_config is an array */
	int rc = parse_pkt(&p, (void *)(long)ctx->data, (void *)(long)ctx->data_end);
	p.ifindex = ctx->ingress_ifindex;
	if (rc != PARSE_OK) {
		judge_parsed(&v, &p, rc, &j);
		return xdp_exit(ctx, &v, &p, &j);
	}
	__u32 dos = dos_check(&v, &p);
	if (dos) {
		__u32 g = v.gen;
		struct hw_policy_hdr *h = hw_policy.lookup(&g);
		j.verdict = h && h->audit ? HW_V_WOULD_DROP : HW_V_DROP;
		j.reason = dos;
		j.slot = ~0U;
		j.revision_id = h ? h->revision_id : 0;
		return xdp_exit(ctx, &v, &p, &j);
	}
	/* fast path: a packet of a tracked connection leaves here, without the tail call */
	if (p.trackable && !p.frag) {
		struct ctref r = {};
		if (ct_find(&v, &p, p.saddr, p.daddr, p.sport, p.dport, p.proto, &r)) {
			if (ct_advance(&v, &p, &r)) {
				j.verdict = HW_V_ALLOW;
				j.reason = HW_R_PASS_CONNTRACK;
				j.slot = ~0U;
				return xdp_exit(ctx, &v, &p, &j);
			}
			p.ct_hint = CT_HINT_INVALID;
		} else {
			p.ct_hint = CT_HINT_MISS;
		}
	}
	p.now = v.now;
	__u32 zero = 0;
	struct pkt *sp = hw_pkt_scratch.lookup(&zero);
	if (sp) {
		__builtin_memcpy(sp, &p, sizeof(p));
		hw_jump.call(ctx, 0);
	}
	/* no judge program to jump to: TC ingress judges it instead (counted) */
	j.verdict = HW_V_ALLOW;
	j.reason = HW_R_PASS_DEFERRED;
	j.slot = ~0U;
	return xdp_exit(ctx, &v, &p, &j);
}

/* Clock calibration (test-run only, never attached): writes jiffies, the coarse and the precise
 * monotonic clock, read together, over the first 24 bytes of the frame. */
int clock_probe(struct xdp_md *ctx)
{
	__u64 *d = (void *)(long)ctx->data;
	if ((void *)(d + 3) > (void *)(long)ctx->data_end)
		return XDP_ABORTED;
	d[0] = bpf_jiffies64();
	d[1] = bpf_ktime_get_coarse_ns();
	d[2] = bpf_ktime_get_ns();
	return XDP_PASS;
}

#define HW_PULL_LEN 256

static __always_inline int tc_parse(struct __sk_buff *skb, struct pkt *p)
{
	__u32 want = skb->len < HW_PULL_LEN ? skb->len : HW_PULL_LEN;
	if (skb->data_end - skb->data < want)
		bpf_skb_pull_data(skb, want);
	int rc = parse_pkt(p, (void *)(long)skb->data, (void *)(long)skb->data_end);
	p->len = skb->len;
	p->ifindex = skb->ifindex;
	return rc;
}

int tc_ingress(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct judgement j = {};
	struct env v = {};
	if (env_init(&v, HW_HOOK_TC_INGRESS, HW_DIR_INGRESS, 0))
		return TC_ACT_OK;
	struct hw_meta *meta = (void *)(long)skb->data_meta;
	int marked = (void *)(meta + 1) <= (void *)(long)skb->data && meta->magic == HW_META_MAGIC;
	if (v.cfg->xdp_ingress && !marked) {    /* XDP judged it (only deferred packets are marked) */
		j.verdict = HW_V_ALLOW;
		j.reason = HW_R_PASS_JUDGED;
		j.slot = ~0U;
		p.len = skb->len;           /* counted in aggregate only: XDP counted the details */
		p.pidx = HW_P_OTHER;
		count(&v, &p, &j);
		return TC_ACT_OK;
	}
	int rc = tc_parse(skb, &p);
	judge_parsed(&v, &p, rc, &j);
	count(&v, &p, &j);
	return j.verdict == HW_V_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}

int tc_egress(struct __sk_buff *skb)
{
	struct pkt p = {};
	struct judgement j = {};
	struct env v = {};
	if (env_init(&v, HW_HOOK_TC_EGRESS, HW_DIR_EGRESS, bpf_skb_cgroup_id(skb)))
		return TC_ACT_OK;
	int rc = tc_parse(skb, &p);
	judge_parsed(&v, &p, rc, &j);
	count(&v, &p, &j);
	return j.verdict == HW_V_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
