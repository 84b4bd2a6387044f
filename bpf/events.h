/* SPDX-License-Identifier: Apache-2.0 */
/* Events to the collector: the one ring buffer, its per-CPU token budget, and counts of what
 * was emitted, over budget or refused by a full ring (docs/collector.md).
 */
#ifndef HW_EVENTS_H
#define HW_EVENTS_H

/* ---- ring buffer and its accounting ---------------------------------------------------------- */

BPF_RINGBUF_OUTPUT(hw_events, HW_RINGBUF_BYTES / 4096);
BPF_PERCPU_ARRAY(hw_ev_stats, struct hw_counter, HW_EV_TYPES * HW_EV_OUTCOMES);
BPF_PERCPU_ARRAY(hw_ev_budget, struct hw_ev_budget, 1);

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
 * a 50 ms burst, so all CPUs together stay within ~1.05 x budget in any second. `low`: an event of the
 * low class (an unconfirmed connection's start, a deny sample) takes a token only while the bucket
 * holds more than half its burst, so the other half stays for the high class (flow ends, confirmed
 * starts, log events): under a flood of new connections the confirmed ones keep being reported
 * (docs/collector.md, "Flows under a flood"). */
static __always_inline int ev_budget_take(struct env *v, int low)
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
	if (b->tokens_milli < 1000 + (low ? cap / 2 : 0))
		return 0;
	b->tokens_milli -= 1000;
	return 1;
}

/* Give back a token taken by ev_budget_take (the event went elsewhere); same CPU, no race. */
static __always_inline void ev_budget_refund(struct env *v)
{
	__u32 zero = 0;
	struct hw_ev_budget *b = hw_ev_budget.lookup(&zero);
	if (b)
		b->tokens_milli += 1000;
}

/* A zeroed event slot in the ring buffer with its header filled, or 0 when the ring is full. Not
 * counted: the caller counts the outcome. */
static __always_inline struct hw_event *ev_alloc(struct env *v, __u32 type)
{
	struct hw_event *e = hw_events.ringbuf_reserve(sizeof(struct hw_event));
	if (!e)
		return 0;
	__builtin_memset(e, 0, sizeof(*e));
	e->type = type;
	e->ts_ns = hw_precise(v->cfg);
	e->start_ns = e->ts_ns;
	e->hook = v->hook;
	e->direction = v->dir;
	e->cgroup_id = v->cgroup;
	return e;
}

/* Reserve an event slot within the budget (class `low`, see ev_budget_take), or count why not. The
 * caller fills and submits it. */
static __always_inline struct hw_event *ev_reserve(struct env *v, __u32 type, int low)
{
	if (!ev_budget_take(v, low)) {
		ev_count(type, HW_EO_BUDGET);
		return 0;
	}
	struct hw_event *e = ev_alloc(v, type);
	if (!e) {
		ev_count(type, HW_EO_RINGBUF_FULL);
		return 0;
	}
	ev_count(type, HW_EO_EMITTED);
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

#endif /* HW_EVENTS_H */
