/* SPDX-License-Identifier: Apache-2.0 */
/* The per-packet environment: the enforcer's and the collector's knobs (hw_config, hw_collect),
 * the policy generation read once per packet, and the datapath's clock.
 */
#ifndef HW_ENV_H
#define HW_ENV_H

/* ---- knobs ---------------------------------------------------------------------------------- */

BPF_ARRAY(hw_config, struct hw_config, 1);
BPF_ARRAY(hw_collect, struct hw_collect, 1);

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

/* The precise clock that stamps records (CLOCK_MONOTONIC ns, bpf_ktime_get_ns; the test clock when
 * set). A helper call (20-35 ns here), so it is read where a record is born (an event, a connection's
 * first packet, the packets that may close one), never on every packet; the tick clock above only
 * ages entries (docs/datapath.md "Clock"). */
static __always_inline __u64 hw_precise(struct hw_config *c)
{
	if (c->test_now_ns)
		return c->test_now_ns;
	return bpf_ktime_get_ns();
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

#endif /* HW_ENV_H */
