/* SPDX-License-Identifier: Apache-2.0 */
/* FQDN egress rules: the dynamic set of addresses the DNS proxy learnt for the names rules list, and
 * the per-generation tables that tie fqdns rules to it (docs/datapath.md "FQDN rules").
 */
#ifndef HW_FQDN_H
#define HW_FQDN_H

/* The dynamic set: (set, family, address) → expiry. Written by the enforcer's DNS proxy only (an entry
 * enters before the answer reaches the client), never by a program; pinned, and shared by both policy
 * generations: a set is named by its fqdns list, so a swap that keeps a list keeps its entries. */
BPF_F_TABLE("hash", struct hw_fqdn_key, struct hw_fqdn_val, hw_fqdn, HW_FQDN_IPS_MAX, BPF_F_NO_PREALLOC);
/* its index (hostwall.h struct hw_fqdn_slot): written with it, by user space alone, pinned with it */
BPF_F_TABLE("array", u32, struct hw_fqdn_slot, hw_fqdn_index, 1 << HW_FQDN_INDEX_BITS, MAPF_MMAP);
/* per generation: the fqdns rules in rule order, and per L4 class which of them it holds; the datapath's
 * counts of the set's outcomes are in the packet's per-CPU memory (parse.h struct pkt_mem) */
BPF_F_TABLE("array", u32, struct hw_fqdn_rule, hw_fqdn_rules, 2 * HW_FQDN_RULES_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_fqdn_l4, hw_fqdn_l4, 2 * HW_L4_CLASSES_MAX, MAPF_MMAP);
/* The DNS proxy's names, addresses and counters (enum hw_dns_stat): user space alone writes them (the
 * counters through mmap) and no program reads them; maps of the instance, so they are pinned with it and
 * survive enforcer restarts (hostwall.h "What the proxy learnt"; docs/metrics.md). */
BPF_F_TABLE("hash", __u64, struct hw_dns_name, hw_dns_names, HW_DNS_NAMES_MAX, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct hw_dns_name_ip, struct hw_fqdn_val, hw_dns_name_ips, HW_FQDN_IPS_MAX, BPF_F_NO_PREALLOC);
BPF_F_TABLE("array", u32, __u64, hw_dns_stats, HW_DNS_STATS, MAPF_MMAP);

/* hw_fqdn_index's slot of a key given as its three 64-bit words (set and family, addr[0..1], addr[2..3]):
 * bpf/fqdn.py index_slot computes the same */
static __always_inline __u32 fqdn_slot(__u64 w0, __u64 w1, __u64 w2)
{
	__u64 x = w0 * HW_FQDN_K0 + w1 * HW_FQDN_K1 + w2 * HW_FQDN_K2;
	return (__u32)(x >> (64 - HW_FQDN_INDEX_BITS));
}

/* hw_fqdn's answer for the key (w0, w1, w2) without the lookup when the index has it: the expiry of a
 * live entry, 0 for "not in the set" (no entry falls in the slot), 1 when the slot cannot tell (ask
 * hw_fqdn). The key stays in registers: a key stored in pieces and read back as words waits for the
 * stores to retire (docs/datapath.md "FQDN rules"). The copy is read between two reads of the slot's
 * sequence: a writer's change in between, or a copy that is not the key or has expired, tells nothing. */
static __always_inline __u64 fqdn_indexed(__u64 w0, __u64 w1, __u64 w2, __u64 now)
{
	__u32 si = fqdn_slot(w0, w1, w2);
	struct hw_fqdn_slot *s = hw_fqdn_index.lookup(&si);
	if (!s)
		return 1;
	__u32 seq = *(volatile __u32 *)&s->seq;
	if (!*(volatile __u32 *)&s->entries)
		return 0;
	asm volatile("" ::: "memory");
	__u64 exp = s->expires_ns;
	__u64 *c = (__u64 *)&s->key;            /* at offset 8 of an 8-byte aligned slot */
	int same = c[0] == w0 && c[1] == w1 && c[2] == w2;
	asm volatile("" ::: "memory");
	if (!same || exp <= now || (seq & 1) || *(volatile __u32 *)&s->seq != seq)
		return 1;
	return exp;
}

/* The first matching rule once fqdns rules are considered: `m` is the first static match (order index,
 * or -1); an fqdns rule of the packet's L4 class that comes before it matches when the destination is in
 * its set and the entry has not expired. Candidates are tried in rule order, one probe each (the index,
 * and the hash lookup, ~30-40 ns here, only when the index cannot tell: docs/benchmarks.md "FQDN dynamic
 * set, index in front"), and only those before `m`: a packet whose class holds no fqdns
 * rule, or whose static match comes first, pays one inlined array load. The class's entry holds its
 * first candidate's order and set, so the common case (one fqdns rule in the class) reads no
 * hw_fqdn_rules entry. One count per packet that probed the set (enum hw_fqdn_stat, in the packet's
 * per-CPU memory: parse.h struct pkt_mem): hit if a candidate
 * matched, else expired if one found its entry past its expiry, else miss. Expiry only stops new
 * connections: packets of tracked ones never get here. */
static __always_inline int fqdn_match(struct env *v, struct pkt *p, __u32 gen, __u32 lcls, int m)
{
	__u32 k = gen * HW_L4_CLASSES_MAX + (lcls & (HW_L4_CLASSES_MAX - 1));
	struct hw_fqdn_l4 *c = hw_fqdn_l4.lookup(&k);
	if (!c)
		return m;
	__u64 mask = c->rules;
	if (!mask)
		return m;
	__u32 order = c->order0, set = c->set0;
	if (m >= 0 && order >= (__u32)m)
		return m;                       /* nothing probed: not counted */
	mask &= mask - 1;
	/* the key's words (struct hw_fqdn_key): set | family << 32, then the address as p holds it */
	__u64 fam = (__u64)p->family << 32;
	__u64 a0 = *(__u64 *)&p->daddr[0], a1 = *(__u64 *)&p->daddr[2];
	/* the first candidate straight-line, without the loop's set-up, and counted where it ends (a count
	 * at a fixed place, not one chosen by an outcome read back): the index answers most packets; the
	 * loop takes the rest, the hash lookup and later candidates (docs/datapath.md "FQDN rules") */
	__u64 exp = fqdn_indexed(set | fam, a0, a1, v->now);
	if (exp > 1) {
		PKT_FQDN_STATS(p)[HW_FQS_HIT].packets++;
		return order & (HW_MAX_RULES - 1);
	}
	if (!exp && !mask) {
		PKT_FQDN_STATS(p)[HW_FQS_MISS].packets++;
		return m;
	}
	/* the loop's answer and outcome go through the packet's per-CPU memory: read back after it they are
	 * unknown values on every path out of it, so the verifier walks the rest of the program once, not
	 * once per iteration (docs/datapath.md "Speed") */
	p->fqdn_m = m;
	p->fqdn_st = HW_FQS_MISS;
	for (int i = 0; i < HW_FQDN_RULES_MAX; i++) {
		if (exp == 1) {                 /* the index cannot tell: the key in memory for hw_fqdn */
			struct hw_fqdn_key fk __attribute__((aligned(8))) = {};
			fk.set = set;
			fk.family = p->family;
			__builtin_memcpy(fk.addr, p->daddr, 16);
			struct hw_fqdn_val *e = hw_fqdn.lookup(&fk);
			exp = e ? e->expires_ns : 0;
			if (e && exp <= v->now) {
				p->fqdn_st = HW_FQS_EXPIRED;
				exp = 0;
			}
		}
		if (exp) {
			p->fqdn_st = HW_FQS_HIT;
			p->fqdn_m = order & (HW_MAX_RULES - 1);
			break;
		}
		if (!mask)
			break;
		__u32 ri = gen * HW_FQDN_RULES_MAX + (ctz64(mask) & (HW_FQDN_RULES_MAX - 1));
		mask &= mask - 1;
		struct hw_fqdn_rule *fr = hw_fqdn_rules.lookup(&ri);
		if (!fr || (m >= 0 && fr->order >= (__u32)m))
			break;
		order = fr->order;
		set = fr->set;
		exp = fqdn_indexed(set | fam, a0, a1, v->now);
	}
	asm volatile("" ::: "memory");
	__u32 st = p->fqdn_st;
	if (st < HW_FQDN_STATS)
		PKT_FQDN_STATS(p)[st].packets++;
	return p->fqdn_m;
}

#endif /* HW_FQDN_H */
