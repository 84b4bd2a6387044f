/* SPDX-License-Identifier: Apache-2.0 */
/* Bounded reporting of flows under a flood (docs/collector.md, "Flows under a flood"): the event
 * budget's two classes, the per-source event share, and the flow aggregation that counts what is not
 * reported one event each (hw_flows0/1, drained with the drop aggregation).
 *
 * Why: a flood turns packets into "flows" (every spoofed SYN, every UDP datagram from a random port).
 * One event each would spend the ring's budget on the flood and shed the flows of legitimate clients
 * with it. Instead (enum hw_ct_report):
 *   - an unconfirmed connection's start may use the budget only above a reserve (half its burst); when
 *     the budget is down to the reserve its start waits for the connection to be confirmed (then it is
 *     emitted, from the reserve), and a connection that ends unconfirmed is counted in the aggregation;
 *   - a source over its share (hw_collect.source_share events/s) has its further flows aggregated;
 *   - a flow whose start finds no room (budget or ring buffer) is aggregated, never lost;
 *   - cookie SYN-ACKs of the SYN proxy are counted here, never one event each.
 * Every aggregated count also goes to hw_flow_stats[kind], so per kind the drained summaries plus
 * hw_flow_overflow equal those counters exactly.
 */
#ifndef HW_REPORT_H
#define HW_REPORT_H

/* ---- maps -------------------------------------------------------------------------------------- */

BPF_F_TABLE("array", u32, struct hw_share_slot, hw_share, HW_SHARE_MAX, MAPF_MMAP);
BPF_PERCPU_ARRAY(hw_share_stats, struct hw_counter, HW_DSS_STATS);     /* inserted, evicted, claim lost */
BPF_TABLE("percpu_hash", struct hw_flow_key, struct hw_flow_val, hw_flows0, HW_FLOW_AGG_MAX);
BPF_TABLE("percpu_hash", struct hw_flow_key, struct hw_flow_val, hw_flows1, HW_FLOW_AGG_MAX);
BPF_PERCPU_ARRAY(hw_flow_overflow, struct hw_flow_val, 2 * HW_AGG_KINDS);  /* [agg_gen * KINDS + kind] */
BPF_PERCPU_ARRAY(hw_flow_stats, struct hw_flow_val, HW_AGG_KINDS);         /* everything aggregated */

#define SHARE_WORDS (sizeof(struct hw_share_key) / 8)

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

/* ---- the flow aggregation ------------------------------------------------------------------------ */
static __always_inline void flow_val_add(struct hw_flow_val *d, struct hw_flow_val *a)
{
	d->flows += a->flows;
	d->ended += a->ended;
	d->packets += a->packets;
	d->bytes += a->bytes;
	d->last_ns = a->last_ns;
}

/* Count `a` (flows, ended, packets, bytes) for (peer, dport, proto, family, direction, kind) in the
 * current aggregation generation; a key that does not fit (map full) goes to hw_flow_overflow. One
 * call site per map, as the drop aggregation does, so the verifier inlines both lookups. */
static __always_inline void flow_agg(struct env *v, __u32 *peer, __u8 family, __u16 dport, __u8 proto,
				     __u8 direction, __u32 kind, struct hw_flow_val *a)
{
	struct hw_flow_key k = {};
	__u32 len = family == 4 ? v->col->agg_prefix_v4 : v->col->agg_prefix_v6;
	mask_addr(k.peer, peer, family, len);
	k.dport = proto == IPPROTO_TCP || proto == IPPROTO_UDP ? dport : 0;
	k.proto = proto;
	k.family = family;
	k.prefix_len = len;
	k.direction = direction;
	k.kind = kind;
	a->first_ns = v->now;
	a->last_ns = v->now;
	__u32 sk = kind & (HW_AGG_KINDS - 1);
	struct hw_flow_val *st = hw_flow_stats.lookup(&sk);
	if (st)
		flow_val_add(st, a);
	__u32 gen = v->col->agg_gen & 1;
	struct hw_flow_val *val;
	if (gen) {
		val = hw_flows1.lookup(&k);
		asm volatile("" : "+r"(val));   /* two call sites: one map each, so both get inlined */
	} else {
		val = hw_flows0.lookup(&k);
	}
	if (val) {
		flow_val_add(val, a);
		return;
	}
	if ((gen ? hw_flows1.insert(&k, a) : hw_flows0.insert(&k, a)) == 0)
		return;
	/* EEXIST: another CPU created it between our lookup and insert (add to our slot); else full */
	val = gen ? hw_flows1.lookup(&k) : hw_flows0.lookup(&k);
	if (val) {
		flow_val_add(val, a);
		return;
	}
	__u32 ok = gen * HW_AGG_KINDS + sk;
	struct hw_flow_val *ov = hw_flow_overflow.lookup(&ok);
	if (ov)
		flow_val_add(ov, a);
}

/* ---- the per-source event share ------------------------------------------------------------------- */
static __always_inline void share_stat(__u32 what)
{
	counter_add(hw_share_stats.lookup(&what), 0);
}

/* The share slot of `addr` (found, or taken: a free slot, else the least recently seen source of the
 * bucket, counted evicted). 0 when another CPU took the slot at that instant (counted; the event is
 * then judged by the budget alone). Cost: HW_SHARE_WAYS inlined array probes, like conntrack. */
static __always_inline struct hw_share_slot *share_slot(struct env *v, __u32 *addr, __u8 family)
{
	struct hw_share_key k __attribute__((aligned(8))) = {};   /* compared as 64-bit words */
	mask_addr(k.addr, addr, family, family == 4 ? 32 : 64);
	k.family = family;
	__u32 base = tbl_first_slot(&k, SHARE_WORDS, v->cfg->table_seed, HW_SHARE_MAX, HW_SHARE_WAYS);
	__u32 hit = HW_SHARE_MAX, pick_idx = HW_SHARE_MAX, rank = 0;
	__u64 oldest = ~0ULL;
#pragma unroll
	for (int i = 0; i < HW_SHARE_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_share_slot *sl = hw_share.lookup(&idx);
		if (!sl)
			continue;
		__u64 st = sl->slot_state;
		if (!(tbl_key_diff(&sl->k, &k, SHARE_WORDS) | (st ^ HW_SLOT_LIVE)))
			hit = idx;
		__u32 r = st == HW_SLOT_FREE ? 2 : st == HW_SLOT_LIVE ? 1 : 0;
		if (r > rank || (r == 1 && rank == 1 && sl->last_ns < oldest)) {
			pick_idx = idx;
			rank = r;
			oldest = sl->last_ns;
		}
	}
	struct hw_share_slot *sl = hw_share.lookup(&hit);
	if (sl)
		return sl;
	sl = hw_share.lookup(&pick_idx);
	__u64 seen = rank == 2 ? HW_SLOT_FREE : HW_SLOT_LIVE;
	if (!sl || !rank || __sync_val_compare_and_swap(&sl->slot_state, seen, HW_SLOT_BUSY) != seen) {
		share_stat(HW_DSS_CLAIM_LOST);
		return 0;
	}
	share_stat(HW_DSS_INSERTED);
	if (rank == 1)
		share_stat(HW_DSS_EVICTED);
	sl->k = k;
	sl->tokens_milli = (__u64)v->col->source_share * 1000;   /* a new source starts with a full second */
	sl->last_ns = v->now;
	__sync_lock_test_and_set(&sl->slot_state, HW_SLOT_LIVE);
	return sl;
}

/* May `addr` emit one more flow event individually? Refills its bucket (source_share events/s, one
 * second of burst) and takes one event if it can. 1 also when there is no share to keep. */
static __always_inline int share_take(struct env *v, __u32 *addr, __u8 family)
{
	__u64 share = v->col->source_share;
	if (!share)
		return 1;
	struct hw_share_slot *sl = share_slot(v, addr, family);
	if (!sl)
		return 1;
	__u64 cap = share * 1000;
	__u64 t = sl->tokens_milli + elapsed_ns(v->now, sl->last_ns, 1000000000ULL) * share / 1000000ULL;
	sl->last_ns = v->now;
	if (t > cap)
		t = cap;
	if (t < 1000) {
		sl->tokens_milli = t;
		return 0;
	}
	sl->tokens_milli = t - 1000;
	return 1;
}

/* ---- reporting a connection's start and end ----------------------------------------------------- */
/* The aggregation kind of a connection reported in aggregate. */
static __always_inline __u32 report_kind(__u32 report)
{
	return report == HW_REP_AGG_SHARE ? HW_AGG_OVER_SHARE :
	       report == HW_REP_AGG_BUDGET ? HW_AGG_OVER_BUDGET : HW_AGG_UNCONFIRMED;
}

/* How to report the start of a connection from `peer` (enum hw_ct_report), and the event to fill and
 * submit when it is EVENTS. A confirmed start draws on the whole budget; an unconfirmed one only above
 * the reserve, else it waits (PENDING: decided again when the connection is confirmed, or aggregated
 * if it ends unconfirmed). A source over its share, or a start that finds no room at all (budget or
 * ring buffer), is aggregated: counted, never lost. The budget is taken first, so a waiting start
 * costs its source no share. */
static __always_inline __u32 report_start(struct env *v, __u32 *peer, __u8 family, __u16 dport, __u8 proto,
					  __u8 direction, int confirmed, struct hw_event **out)
{
	struct hw_flow_val a = {.flows = 1};
	__u32 rep = HW_REP_AGG_BUDGET;
	*out = 0;
	if (!ev_budget_take(v, !confirmed)) {
		if (!confirmed)
			return HW_REP_PENDING;
	} else if (!share_take(v, peer, family)) {
		ev_budget_refund(v);
		rep = HW_REP_AGG_SHARE;
	} else {
		struct hw_event *ev = ev_alloc(v, HW_EV_FLOW_START);
		if (ev) {
			ev_count(HW_EV_FLOW_START, HW_EO_EMITTED);
			*out = ev;
			return HW_REP_EVENTS;
		}
	}
	flow_agg(v, peer, family, dport, proto, direction, report_kind(rep), &a);
	ev_count(HW_EV_FLOW_START, HW_EO_AGGREGATED);
	return rep;
}

#endif /* HW_REPORT_H */
