/* SPDX-License-Identifier: Apache-2.0 */
/* The one counted exit of every program: counters per (hook, verdict, reason), rule and port,
 * deny/log events, and the double-buffered drop aggregation the collector drains.
 */
#ifndef HW_VERDICT_H
#define HW_VERDICT_H

/* ---- counters and drop aggregation ------------------------------------------------------------ */

BPF_PERCPU_ARRAY(hw_stats, struct hw_counter, HW_HOOKS * HW_VERDICTS * HW_REASONS);
BPF_PERCPU_ARRAY(hw_rule_stats, struct hw_counter, HW_MAX_RULE_SLOTS);
BPF_PERCPU_ARRAY(hw_port_stats, struct hw_port_counter, 65536);

BPF_TABLE("percpu_hash", struct hw_drop_key, struct hw_drop_val, hw_drops0, HW_DROP_AGG_MAX);
BPF_TABLE("percpu_hash", struct hw_drop_key, struct hw_drop_val, hw_drops1, HW_DROP_AGG_MAX);
BPF_PERCPU_ARRAY(hw_drop_overflow, struct hw_counter, 2 * HW_VERDICTS * HW_REASONS);
BPF_PERCPU_ARRAY(hw_drop_srcs, struct hw_drop_src, 2 * HW_DROP_SRC_SLOTS);

/* ---- the one counted exit ------------------------------------------------------------------- */
struct judgement {
	__u32 verdict;          /* enum hw_verdict */
	__u32 reason;           /* enum hw_reason */
	__u32 slot;             /* rule counter slot, or ~0 */
	__u32 revision_id;
	__u8  action;           /* enum hw_action of the matching rule (log → event) */
	__u8  ruled;            /* a rule decided */
	__u8  answer;           /* an allowed SYN the SYN proxy answers (xdp_judge sends the cookie SYN-ACK) */
};

/* Report one judged packet (a deny sample or a log rule's packet) with its verdict and rule. */
static __always_inline void ev_judged(struct env *v, struct pkt *p, struct judgement *j, __u32 type)
{
	struct hw_event *ev = ev_reserve(v, type, type == HW_EV_DENY);     /* deny samples: the low class */
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

static __always_inline void agg_overflow(struct env *v, struct judgement *j, struct pkt *p, __u32 gen)
{
	__u32 k = (gen * HW_VERDICTS + j->verdict) * HW_REASONS + j->reason;
	counter_add(hw_drop_overflow.lookup(&k), p->len);
}

/* Count a dropped packet against its individual peer (full address) for the summaries' top talkers:
 * one inlined per-CPU array lookup, a hash and a four-word compare (no helper call, no atomics). The
 * slot keeps the first key of the interval that hashed to it; a later one is not counted here (its
 * packets are in the aggregate all the same), so listed counts are exact or lower bounds. */
#define DROP_SRC_WORDS 4                /* hw_drop_src.k + pad: 32 bytes */

static __always_inline void agg_src(struct env *v, struct pkt *p, struct hw_drop_key *k, __u32 gen)
{
	struct hw_drop_src c __attribute__((aligned(8))) = {};
	c.k = *k;
	__builtin_memcpy(c.k.src, v->dir == HW_DIR_INGRESS ? p->saddr : p->daddr, 16);
	__u32 idx = gen * HW_DROP_SRC_SLOTS + tbl_first_slot(&c, DROP_SRC_WORDS, v->cfg->table_seed, HW_DROP_SRC_SLOTS, 1);
	struct hw_drop_src *s = hw_drop_srcs.lookup(&idx);
	if (!s)
		return;
	if (!s->packets)
		__builtin_memcpy(s, &c, DROP_SRC_WORDS * 8);
	else if (tbl_key_diff(s, &c, DROP_SRC_WORDS))
		return;                         /* another peer holds this slot for the interval */
	s->packets++;
	s->bytes += p->len;
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
	agg_src(v, p, &k, gen);
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

/* hw_stats[hook][verdict][reason]: the one counter every exit increments. */
static __always_inline void count_stat(__u32 hook, __u32 verdict, __u32 reason, __u32 len)
{
	__u32 k = (hook * HW_VERDICTS + verdict) * HW_REASONS + reason;
	counter_add(hw_stats.lookup(&k), len);
}

static __always_inline void count(struct env *v, struct pkt *p, struct judgement *j)
{
	count_stat(v->hook, j->verdict, j->reason, p->len);
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
			if (p->opens && p->pidx == HW_P_TCP && v->dir == HW_DIR_INGRESS)
				pc->syns++;     /* the per-port SYN rate, whatever became of the SYN */
		}
	}
	if (j->verdict != HW_V_ALLOW) {
		agg_drop(v, p, j);
	} else if (j->ruled && j->action == HW_ACT_LOG) {
		ev_judged(v, p, j, HW_EV_LOG);
	}
}

#endif /* HW_VERDICT_H */
