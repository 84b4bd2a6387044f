/* SPDX-License-Identifier: Apache-2.0
 *
 * hostwall datapath: XDP ingress, TC ingress and TC egress, compiled and loaded by BCC.
 *
 *   parse → later fragment? follow its first fragment (frag.h)
 *         → conntrack (normalised key, one lookup) → essential ICMP [ICMP error → related lookup]
 *         → policy: peer class ∧ L4 class bit-vector AND, lowest set bit = first match;
 *           egress: fqdns rules before it that the dynamic set of learnt addresses matches (fqdn.h)
 *         → a first fragment that passed leaves a fragment-table entry
 *         → count(): the one counted exit of every program (verdict.h)
 *
 * XDP judges ingress; TC ingress is not attached behind it (docs/datapath.md: tc_ingress serves only
 * test-run and its tooling), so no packet is judged twice or by two policy generations. TC egress
 * judges egress and stamps the sender's cgroup into new connections.
 * Every program parses into per-CPU memory (hw_pkt_scratch for XDP, hw_tc_pkt for TC), which also
 * hands the packet over through tail calls: xdp_ingress → xdp_judge, and on TC every fragment →
 * tc_frag_ingress / tc_frag_egress (docs/datapath.md).
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
/* Branch hints for the compiler's block layout: the expected case falls through, the rare one is
 * placed out of line (docs/datapath.md "Speed"). Our own names: the kernel headers' likely() may trace. */
#define hw_likely(x)   __builtin_expect(!!(x), 1)
#define hw_unlikely(x) __builtin_expect(!!(x), 0)

/* Concern headers, each owning its maps and helpers, in dependency order. */
#include "parse.h"
#include "classify.h"
#include "env.h"
#include "events.h"
#include "table.h"
#include "report.h"
#include "conntrack.h"
#include "verdict.h"
#include "frag.h"
#include "essential.h"
#include "fqdn.h"
#include "dos.h"
#include "syncookie.h"

/* ---- programs' shared maps ------------------------------------------------------------------ */
BPF_PROG_ARRAY(hw_jump, 1);                            /* [0] = xdp_judge */

/* ---- the judgement shared by all hooks ------------------------------------------------------ */
/* An unfragmented packet or a first fragment: conntrack, essential ICMP, then the policy. */
static __always_inline void judge_first(struct env *v, struct pkt *p, struct judgement *j)
{
	struct ctref r = {};
	int ct_invalid = 0;

	if (p->ct_hint) {
		ct_invalid = p->ct_hint == CT_HINT_INVALID;     /* xdp_ingress already looked */
	} else if (p->trackable &&
		   ct_find(v, p, p->saddr, p->daddr, p->sport, p->dport, p->proto, &r)) {
		int adv = ct_advance(v, p, &r, 0);
		/* spared by the DoS stage only as its connection's packet: out of window it is not (dos.h) */
		if (adv == 1 || (adv == 2 && !p->dos_spared)) {
			j->verdict = HW_V_ALLOW;
			j->reason = adv == 2 ? HW_R_PASS_CONNTRACK_OUT_OF_WINDOW : ct_pass_reason(v, p);
			return;
		}
		ct_invalid = 1;
		/* noted in the packet, not a local: read back below as an unknown value, it does not split
		 * the verifier's states through the policy (docs/datapath.md "Speed") */
		if (adv == CT_REVERSE_SYN)
			p->ct_hint = CT_HINT_REVERSE;
	}
	/* an ICMP error about a tracked connection: looked up here, next to the lookup above (its stack
	 * is reused), and passed below only with essential ICMP on */
	int related = 0;
	if (p->related) {
		struct ctref ir = {};
		related = ct_find(v, p, p->in_saddr, p->in_daddr, p->in_sport, p->in_dport, p->in_proto, &ir);
	}

	__u32 gen = v->gen;
	struct hw_policy_hdr *h = hw_policy.lookup(&gen);
	if (!h)
		goto fail_closed;
	j->revision_id = h->revision_id;
	/* spared by the DoS stage (dos.h dos_spares): passes only as its connection's packet (above) or an
	 * error about it (below, with essential ICMP on), else dropped for its limit before the policy */
	if (v->hook == HW_HOOK_XDP_INGRESS && p->dos_spared && !(related && h->essential_icmp)) {
		dos_unspared(v, p, j, h->audit);        /* before the policy: no connection opened for it */
		return;
	}

	/* essential ICMP, before any rule (docs/policy.md "Essential ICMP") */
	if (p->pidx >= HW_P_ICMP && p->pidx <= HW_P_ICMPV6 && h->essential_icmp) {
		__u32 why = related ? related_pass_reason(v, p) : essential_icmp(p) ? HW_R_PASS_ESSENTIAL : 0;
		if (why) {
			j->verdict = HW_V_ALLOW;
			j->reason = why;
			j->slot = h->essential_slot;
			return;
		}
	}

	__u32 pcls = 0, lcls = 0;
	int m = -1;
	int rc = p->family == 4 ? peer_class4(gen, v->dir == HW_DIR_INGRESS ? p->saddr[0] : p->daddr[0], &pcls)
				: peer_class6(gen, v->dir == HW_DIR_INGRESS ? p->saddr : p->daddr, &pcls);
	if (rc == 0 && l4_class(gen, v->dir, p, &lcls) == 0) {
		m = h->xm_stride ? xm_match(gen, pcls, lcls, h->xm_stride) : first_match(gen, pcls, lcls);
		/* fqdns rules are in no peer class: the dynamic set decides them (fqdn.h) */
		if (v->dir == HW_DIR_EGRESS && h->fqdn_rules)
			m = fqdn_match(v, p, gen, lcls, m);
	}

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
	if (v->dir == HW_DIR_INGRESS && p->ct_hint == CT_HINT_REVERSE) {
		/* allowed, but its tuple is a live connection's: passed to the stack (a live socket answers
		 * with a challenge ACK), the entry kept (docs/datapath.md "Reused tuples") */
		j->reason = HW_R_PASS_CONNTRACK_OUT_OF_WINDOW;
		return;
	}
	if (h->stateful && p->opens) {
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

/* A later fragment carries no L4 header: it follows its first fragment (docs/datapath.md "Fragments"). */
static __always_inline void judge_later_fragment(struct env *v, struct pkt *p, struct judgement *j)
{
	__u32 gen = v->gen;
	struct hw_policy_hdr *h = hw_policy.lookup(&gen);
	j->revision_id = h ? h->revision_id : 0;
	if (frag_follow(v, p)) {
		j->verdict = HW_V_ALLOW;
		j->reason = HW_R_PASS_FRAGMENT;
		return;
	}
	j->verdict = h && h->audit ? HW_V_WOULD_DROP : HW_V_DROP;
	j->reason = HW_R_FRAGMENT_UNMATCHED;
}

static __always_inline void judge(struct env *v, struct pkt *p, struct judgement *j)
{
	if (p->frag) {
		judge_later_fragment(v, p, j);
		return;
	}
	judge_first(v, p, j);
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
	judge_first(v, p, j);           /* TC hands fragments to tc_frag_* before this */
}

/* ---- programs ------------------------------------------------------------------------------- */
/* XDP is two programs joined by a tail call, so each stays within the verifier's budget:
 * xdp_ingress parses and applies the DoS guards; xdp_judge runs conntrack and the policy on the
 * packet xdp_ingress parsed (handed over in per-CPU scratch memory, valid within one packet). */
BPF_PERCPU_ARRAY(hw_pkt_scratch, struct pkt_mem, 1);

static __always_inline struct pkt *xdp_pkt(void)
{
	__u32 zero = 0;
	struct pkt_mem *pm = hw_pkt_scratch.lookup(&zero);
	if (!pm)
		return 0;
	return &pm->p;
}

static __always_inline int xdp_exit(struct env *v, struct pkt *p, struct judgement *j)
{
	count(v, p, j);
	if (j->verdict == HW_V_DROP)
		return XDP_DROP;
	if (j->reason == HW_R_PASS_SYN_COOKIE)
		return XDP_TX;          /* the frame now holds the cookie SYN-ACK */
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
	struct pkt *p = xdp_pkt();
	if (env_maps(&v, HW_HOOK_XDP_INGRESS, HW_DIR_INGRESS, 0) || !p)
		return XDP_PASS;        /* unreachable: array maps */
	v.now = p->now;
	j.slot = ~0U;
	judge(&v, p, &j);
	if (p->syn_proxy != SP_NONE && j.verdict == HW_V_ALLOW && j.reason != HW_R_PASS_CONNTRACK &&
	    j.reason != HW_R_PASS_CONNTRACK_OVER_LIMIT && j.reason != HW_R_PASS_RELATED &&
	    j.reason != HW_R_PASS_CONNTRACK_OUT_OF_WINDOW)
		syn_proxy_judged(ctx, &v, p, &j);
	int ret = xdp_exit(&v, p, &j);
	frag_note(&v, p, &j);           /* a first fragment that passed: its later fragments follow */
	return ret;
}

int xdp_ingress(struct xdp_md *ctx)
{
	struct judgement j = {};
	struct env v = {};
	/* parsed straight into the per-CPU handover to xdp_judge: no copy before the tail call, less stack,
	 * and fields the verifier reads back as unknown values (docs/datapath.md "Speed") */
	struct pkt *p = xdp_pkt();
	if (!p || env_init(&v, HW_HOOK_XDP_INGRESS, HW_DIR_INGRESS, 0))
		return XDP_PASS;        /* unreachable: array maps */
	__builtin_memset(p, 0, sizeof(*p));
	int rc = parse_pkt(p, (void *)(long)ctx->data, (void *)(long)ctx->data_end,
			   (__u32)(ctx->data_end - ctx->data), 0);
	p->ifindex = ctx->ingress_ifindex;
	if (rc != PARSE_OK) {
		judge_parsed(&v, p, rc, &j);
		return xdp_exit(&v, p, &j);
	}
	__u32 dos = dos_check(&v, p);
	if (hw_unlikely(dos)) {
		__u32 g = v.gen;
		struct hw_policy_hdr *h = hw_policy.lookup(&g);
		j.verdict = h && h->audit ? HW_V_WOULD_DROP : HW_V_DROP;
		j.reason = dos;
		j.slot = ~0U;
		j.revision_id = h ? h->revision_id : 0;
		return xdp_exit(&v, p, &j);
	}
	/* fast path: a packet of a tracked connection leaves here, without the tail call (a first
	 * fragment takes the tail call: xdp_judge notes its datagram for the later fragments) */
	if (p->trackable && !FIRST_FRAGMENT(p)) {
		struct ctref r = {};
		if (ct_find(&v, p, p->saddr, p->daddr, p->sport, p->dport, p->proto, &r)) {
			int adv = ct_advance(&v, p, &r, 1);
			if (adv == 1 || (adv == 2 && !p->dos_spared)) {
				j.verdict = HW_V_ALLOW;
				j.reason = adv == 2 ? HW_R_PASS_CONNTRACK_OUT_OF_WINDOW : ct_pass_reason(&v, p);
				j.slot = ~0U;
				return xdp_exit(&v, p, &j);
			}
			/* invalid continuation; one to report, or a reverse SYN: xdp_judge looks again (ct_hint 0) */
			p->ct_hint = adv == 0 || adv == 2 ? CT_HINT_INVALID : 0;
		} else {
			p->ct_hint = CT_HINT_MISS;
		}
	}
	p->now = v.now;
	hw_jump.call(ctx, 0);
	/* no judge program to jump to (hw_jump empty: unreachable once loaded): nothing behind XDP judges
	 * ingress, so fail closed, counted (docs/datapath.md "Hooks") */
	j.verdict = HW_V_DROP;
	j.reason = HW_R_JUDGE_UNREACHABLE;
	j.slot = ~0U;
	return xdp_exit(&v, p, &j);
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
	int rc = parse_pkt(p, (void *)(long)skb->data, (void *)(long)skb->data_end, skb->len, skb->gso_size);
	p->ifindex = skb->ifindex;
	return rc;
}

/* The TC programs parse into per-CPU memory, not onto the stack: it keeps their stacks small, and read
 * back from memory the packet's fields are unknown values to the verifier, so it walks far fewer
 * distinct paths (as in xdp_judge; docs/datapath.md "Speed"). Valid within one packet:
 * TC runs with bottom halves off, so nothing else on this CPU writes it meanwhile; tc_frag_* reads it
 * after the tail call. */
BPF_PERCPU_ARRAY(hw_tc_pkt, struct pkt_mem, 1);

/* the packet part of hw_tc_pkt (its dynamic-set counters are never reset: parse.h struct pkt_mem) */
static __always_inline struct pkt *tc_mem(void)
{
	__u32 zero = 0;
	struct pkt_mem *pm = hw_tc_pkt.lookup(&zero);
	if (!pm)
		return 0;
	return &pm->p;
}

static __always_inline struct pkt *tc_pkt(void)
{
	struct pkt *p = tc_mem();
	if (p)
		__builtin_memset(p, 0, sizeof(*p));
	return p;
}

/* A fragment on a TC hook: judged by tc_frag_ingress / tc_frag_egress, a tail call that does not
 * return (frag.h "where fragments are judged"). If that tail call fails (no program in hw_jump_tc:
 * unreachable once loaded) the caller drops and counts it: fail closed, never silent. */
static __always_inline void tc_divert(struct __sk_buff *skb, __u32 which, struct judgement *j)
{
	hw_jump_tc.call(skb, which);
	j->verdict = HW_V_DROP;
	j->reason = HW_R_MALFORMED;
	j->slot = ~0U;
}

/* Tail-called by tc_ingress / tc_egress for every fragment (frag.h frag_divert): the judgement of a
 * fragment on a TC hook (docs/datapath.md "Fragments"), its count, and for a first fragment that
 * passed, its note. One program per hook, so that hook and direction are constants. Never attached. */
static __always_inline int tc_frag(struct __sk_buff *skb, __u32 hook, __u32 dir)
{
	struct judgement j = {};
	struct env v = {};
	struct pkt *p = tc_mem();                       /* parsed by the caller (see hw_tc_pkt) */
	if (!p || env_init(&v, hook, dir, dir == HW_DIR_EGRESS ? bpf_skb_cgroup_id(skb) : 0))
		return TC_ACT_SHOT;     /* unreachable: array maps */
	j.slot = ~0U;
	judge(&v, p, &j);
	count(&v, p, &j);
	frag_note(&v, p, &j);
	return j.verdict == HW_V_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}

int tc_frag_ingress(struct __sk_buff *skb)
{
	return tc_frag(skb, HW_HOOK_TC_INGRESS, HW_DIR_INGRESS);
}

int tc_frag_egress(struct __sk_buff *skb)
{
	return tc_frag(skb, HW_HOOK_TC_EGRESS, HW_DIR_EGRESS);
}

/* Ingress on TC: never attached by the enforcer (XDP judges ingress there, docs/datapath.md "Hooks");
 * kept for BPF_PROG_TEST_RUN, where test-run and its tooling judge ingress on both programs. */
int tc_ingress(struct __sk_buff *skb)
{
	struct judgement j = {};
	struct env v = {};
	struct pkt *p = tc_pkt();
	if (!p || env_init(&v, HW_HOOK_TC_INGRESS, HW_DIR_INGRESS, 0))
		return TC_ACT_OK;       /* unreachable: array maps */
	int rc = tc_parse(skb, p);
	if (rc == PARSE_OK && (p->frag || FIRST_FRAGMENT(p)))
		tc_divert(skb, FRAG_JUMP_INGRESS, &j);     /* returns only if the tail call failed */
	else
		judge_parsed(&v, p, rc, &j);
	count(&v, p, &j);
	return j.verdict == HW_V_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}

int tc_egress(struct __sk_buff *skb)
{
	struct judgement j = {};
	struct env v = {};
	struct pkt *p = tc_pkt();
	if (!p || env_init(&v, HW_HOOK_TC_EGRESS, HW_DIR_EGRESS, bpf_skb_cgroup_id(skb)))
		return TC_ACT_OK;       /* unreachable: array maps */
	int rc = tc_parse(skb, p);
	if (rc == PARSE_OK && (p->frag || FIRST_FRAGMENT(p)))
		tc_divert(skb, FRAG_JUMP_EGRESS, &j);     /* returns only if the tail call failed */
	else
		judge_parsed(&v, p, rc, &j);
	count(&v, p, &j);
	return j.verdict == HW_V_DROP ? TC_ACT_SHOT : TC_ACT_OK;
}
