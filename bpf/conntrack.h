/* SPDX-License-Identifier: Apache-2.0 */
/* Connection tracking: the per-family tables hw_ct4/hw_ct6 and their counters; lookup,
 * state machine, insert with eviction, and flow start/end events (docs/datapath.md).
 */
#ifndef HW_CONNTRACK_H
#define HW_CONNTRACK_H

/* ---- conntrack maps -------------------------------------------------------------------------- */

BPF_F_TABLE("array", u32, struct hw_ct4_slot, hw_ct4, HW_CT_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_ct6_slot, hw_ct6, HW_CT_MAX, MAPF_MMAP);
BPF_PERCPU_ARRAY(hw_ct_stats, struct hw_counter, 2 * HW_CT_STATS);    /* [v6 * HW_CT_STATS + stat] */

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

#define CT4_WORDS (sizeof(struct hw_ct4_key) / 8)
#define CT6_WORDS (sizeof(struct hw_ct6_key) / 8)


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

/* Has this connection's end been reported already (by the datapath, or by the collector after the
 * close grace period)? */
static __always_inline int ct_reported(struct hw_ct_entry *e)
{
	return (e->fin_seen & HW_CT_F_END_EMITTED) || e->reported;
}

/* A tracked TCP connection was reset: report it once, with its totals (nothing after an RST belongs to
 * it). A connection closed by FINs is not reported here: its last ACK comes after the FINs, so the
 * collector reports it once it has been quiet for the close grace period (docs/collector.md). */
static __always_inline void ct_emit_end(struct env *v, struct pkt *p, struct ctref *r, __u8 from_init)
{
	struct hw_ct_entry *e = r->e;
	if (ct_reported(e))
		return;
	struct hw_event *ev = ev_reserve(v, HW_EV_FLOW_END);
	if (!ev)
		return;                 /* the collector's conntrack scan reports it at expiry */
	e->fin_seen |= HW_CT_F_END_EMITTED;
	ev_packet(ev, p);
	ev->ts_ns = e->end_ns;          /* this packet, on the precise clock (ct_advance read it) */
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
	/* The flow's end on the precise clock, read where it is cheap: every packet from the first FIN or
	 * RST on (one of them is the last), and the first packet of each tick otherwise (at most one read
	 * per connection per tick, whatever its rate: the established path stays free of the helper call). */
	if (e->state >= HW_CT_FIN_WAIT || e->last_ns != v->now)
		e->end_ns = hw_precise(v->cfg);
	e->last_ns = v->now;
	__sync_fetch_and_add(&e->packets[!from_init], 1);
	__sync_fetch_and_add(&e->bytes[!from_init], p->len);
	if (e->state == HW_CT_CLOSED)
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
	if (ct_reported(e))
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
	ev->ts_ns = e->end_ns;          /* it ended with its last packet (precise clock) */
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
	__u64 t = hw_precise(v->cfg);   /* the flow's first packet: start of its records */
	e->created_ns = t;
	e->end_ns = t;
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
	e->reported = 0;
	__sync_lock_test_and_set(&e->slot_state, HW_SLOT_LIVE);        /* publish: the entry is whole */
	struct hw_event *ev = ev_reserve(v, HW_EV_FLOW_START);
	if (ev) {
		ev_packet(ev, p);
		ev->ts_ns = t;
		ev->start_ns = t;
		ev->rule_slot = slot;
		ev->revision_id = rev;
		ev->ct_state = state;
		ev->verdict = HW_V_ALLOW;
		ev->reason = reason;
		hw_events.ringbuf_submit(ev, 0);
	}
}

#endif /* HW_CONNTRACK_H */
