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

/* Concern headers, each owning its maps and helpers, in dependency order. */
#include "parse.h"
#include "classify.h"
#include "env.h"
#include "events.h"
#include "table.h"
#include "report.h"
#include "conntrack.h"
#include "verdict.h"
#include "dos.h"
#include "syncookie.h"

/* ---- programs' shared maps ------------------------------------------------------------------ */
BPF_PROG_ARRAY(hw_jump, 1);                            /* [0] = xdp_judge */

/* ---- the judgement shared by all hooks ------------------------------------------------------ */
static __always_inline void judge(struct env *v, struct pkt *p, struct judgement *j)
{
	struct ctref r = {};
	int ct_invalid = 0;

	if (p->ct_hint) {
		ct_invalid = p->ct_hint == CT_HINT_INVALID;     /* xdp_ingress already looked */
	} else if (p->trackable && !p->frag &&
		   ct_find(v, p, p->saddr, p->daddr, p->sport, p->dport, p->proto, &r)) {
		if (ct_advance(v, p, &r, 0)) {
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
	if (h->stateful && p->opens && !p->frag) {
		if (p->syn_proxy == SP_ANSWER)
			j->answer = 1;          /* xdp_judge answers it with a cookie: no state */
		else
			ct_open(v, p, j->slot, h->revision_id, j->reason, 0);
	}
	return;

fail_closed:            /* unreachable with loaded maps; counted, never silent */
	j->verdict = HW_V_DROP;
	j->reason = HW_R_MALFORMED;
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
	if (j->reason == HW_R_PASS_SYN_COOKIE)
		return XDP_TX;          /* the frame now holds the cookie SYN-ACK */
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

/* The SYN proxy's part of an allowed packet that xdp_ingress marked (pkt.syn_proxy, dos.h): answer a
 * SYN with its cookie SYN-ACK (counted pass_syn_cookie, in the flow aggregation as kind syn_cookie; one
 * that cannot be answered is tracked as without the proxy), and check an untracked ACK's cookie: valid
 * opens a confirmed connection; invalid is dropped (syn_cookie_invalid) while the proxy answers for the
 * port, else judged as the policy said. */
static __always_inline void syn_proxy_judged(struct xdp_md *ctx, struct env *v, struct pkt *p, struct judgement *j)
{
	__u32 gen = v->gen;
	struct hw_policy_hdr *h = hw_policy.lookup(&gen);
	if (!h)
		return;
	if (j->answer) {
		__u32 id = 0, len = 0;
		struct hw_dos_profile *pr = dos_profile(v, p->ifindex, &id);
		int rc = pr ? syn_answer(ctx, p, pr, &len) : 0;
		if (rc < 0) {
			j->verdict = HW_V_DROP;
			j->reason = HW_R_MALFORMED;
			return;
		}
		if (rc) {
			struct hw_flow_val a = {.flows = 1, .packets = 1, .bytes = len};
			flow_agg(v, p->saddr, p->family, p->dport, p->proto, HW_DIR_INGRESS, HW_AGG_SYN_COOKIE, &a);
			syn_stat(HW_SS_ANSWERED);
			j->reason = HW_R_PASS_SYN_COOKIE;
			return;
		}
		syn_stat(HW_SS_NOT_ANSWERABLE);
		ct_open(v, p, j->slot, h->revision_id, j->reason, 0);
		return;
	}
	if (p->syn_proxy != SP_CHECK && p->syn_proxy != SP_LEARN)
		return;
	if (syn_cookie_valid(ctx, p)) {
		syn_stat(HW_SS_COOKIE_VALID);
		if (h->stateful)
			ct_open(v, p, j->slot, h->revision_id, j->reason, 1);
		return;
	}
	if (p->syn_proxy == SP_CHECK) {
		syn_stat(HW_SS_COOKIE_INVALID);
		j->verdict = h->audit ? HW_V_WOULD_DROP : HW_V_DROP;
		j->reason = HW_R_SYN_COOKIE_INVALID;
	}
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
	if (p->syn_proxy != SP_NONE && j.verdict == HW_V_ALLOW && j.reason != HW_R_PASS_CONNTRACK &&
	    j.reason != HW_R_PASS_RELATED)
		syn_proxy_judged(ctx, &v, p, &j);
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
			int adv = ct_advance(&v, &p, &r, 1);
			if (adv > 0) {
				j.verdict = HW_V_ALLOW;
				j.reason = HW_R_PASS_CONNTRACK;
				j.slot = ~0U;
				return xdp_exit(ctx, &v, &p, &j);
			}
			/* invalid continuation, or one to report: xdp_judge looks again (ct_hint 0) */
			p.ct_hint = adv == 0 ? CT_HINT_INVALID : 0;
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
