/* SPDX-License-Identifier: Apache-2.0 */
/* IP fragments: the per-family fragment tables hw_frag4/hw_frag6 and their counters. Only a first
 * fragment carries the L4 header the policy needs; a later fragment follows the verdict of its first
 * fragment (docs/datapath.md "Fragments"):
 *   frag_insert  a first fragment passed (rule, default, tracked connection, essential ICMP): note it;
 *   frag_follow  a later fragment: pass if its datagram's first fragment passed within
 *                HW_FRAG_TIMEOUT_NS, else drop as fragment_unmatched.
 * Unfragmented packets never reach this code (one or two tests of parsed fields in the callers).
 */
#ifndef HW_FRAG_H
#define HW_FRAG_H

/* ---- fragment maps ----------------------------------------------------------------------------- */

BPF_F_TABLE("array", u32, struct hw_frag4_slot, hw_frag4, HW_FRAG_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_frag6_slot, hw_frag6, HW_FRAG_MAX, MAPF_MMAP);
BPF_PERCPU_ARRAY(hw_frag_stats, struct hw_counter, 2 * HW_FRAG_STATS);   /* [v6 * HW_FRAG_STATS + stat] */

/* Per-CPU scratch memory of this header: the key under construction and the judgement handed to
 * frag_insert (read back from memory: unknown values to the verifier). Valid within one packet. */
union frag_keys {
	struct hw_frag4_key k4;
	struct hw_frag6_key k6;
};
struct frag_scratch {
	union frag_keys k;
	__u32 slot;             /* frag_note → frag_insert: the first fragment's judgement */
	__u32 revision_id;
	__u32 reason;
	__u32 pad;
};
BPF_PERCPU_ARRAY(hw_frag_scratch, struct frag_scratch, 1);

#define FRAG4_WORDS (sizeof(struct hw_frag4_key) / 8)
#define FRAG6_WORDS (sizeof(struct hw_frag6_key) / 8)

static __always_inline void frag_stat(struct pkt *p, __u32 what)
{
	__u32 k = (p->family == 6) * HW_FRAG_STATS + what;
	counter_add(hw_frag_stats.lookup(&k), p->len);
}

/* The datagram's key: addresses, direction, identification; IPv4 adds the protocol (RFC 791 keys
 * reassembly on it), IPv6 leaves it 0 (the identification is unique per address pair, RFC 8200 §4.5,
 * and the first fragment's upper-layer protocol may sit behind headers a later fragment lacks). */
static __always_inline void frag_key4(struct hw_frag4_key *k, struct pkt *p, __u32 dir)
{
	k->saddr = p->saddr[0];
	k->daddr = p->daddr[0];
	k->id = p->frag_id;
	k->proto = p->proto;
	k->dir = dir;
}

static __always_inline void frag_key6(struct hw_frag6_key *k, struct pkt *p, __u32 dir)
{
	__builtin_memcpy(k->saddr, p->saddr, 16);
	__builtin_memcpy(k->daddr, p->daddr, 16);
	k->id = p->frag_id;
	k->dir = dir;
}

static __always_inline int frag_live(struct hw_frag_entry *e, __u64 now)
{
	return e->slot_state == HW_SLOT_LIVE && (__s64)(now - e->created_ns) <= (__s64)HW_FRAG_TIMEOUT_NS;
}

/* Does a later fragment belong to a datagram whose first fragment passed? HW_FRAG_WAYS inlined array
 * lookups and one-branch key compares (as ct_find), counted followed / unmatched. */
static __always_inline int frag_follow(struct env *v, struct pkt *p)
{
	int hit = 0;
	__u32 zero = 0;
	struct frag_scratch *ks = hw_frag_scratch.lookup(&zero);
	if (!ks)
		return 0;               /* unreachable: array map */
	__builtin_memset(&ks->k, 0, sizeof(ks->k));
	if (p->family == 4) {
		struct hw_frag4_key *k = &ks->k.k4;
		frag_key4(k, p, v->dir);
		__u32 base = tbl_first_slot(k, FRAG4_WORDS, v->cfg->table_seed, HW_FRAG_MAX, HW_FRAG_WAYS);
#pragma unroll
		for (int i = 0; i < HW_FRAG_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_frag4_slot *sl = hw_frag4.lookup(&idx);
			asm volatile("" : "+r"(sl));   /* one call site per map: inlined */
			if (sl && !tbl_key_diff(&sl->k, k, FRAG4_WORDS) && frag_live(&sl->e, v->now))
				hit = 1;
		}
	} else {
		struct hw_frag6_key *k = &ks->k.k6;
		frag_key6(k, p, v->dir);
		__u32 base = tbl_first_slot(k, FRAG6_WORDS, v->cfg->table_seed, HW_FRAG_MAX, HW_FRAG_WAYS);
#pragma unroll
		for (int i = 0; i < HW_FRAG_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_frag6_slot *sl = hw_frag6.lookup(&idx);
			asm volatile("" : "+r"(sl));
			if (sl && !tbl_key_diff(&sl->k, k, FRAG6_WORDS) && frag_live(&sl->e, v->now))
				hit = 1;
		}
	}
	frag_stat(p, hit ? HW_FS_FOLLOWED : HW_FS_UNMATCHED);
	return hit;
}

/* Rank of a slot for a new entry: its own key (4: the same datagram's first fragment again, or its
 * identification reused), free (3), expired (2), live (1: the oldest is evicted); 0: BUSY. */
static __always_inline __u32 frag_rank(struct hw_frag_entry *e, __u64 diff, __u64 now)
{
	__u64 st = e->slot_state;
	if (st == HW_SLOT_FREE)
		return 3;
	if (st != HW_SLOT_LIVE)
		return 0;
	if (!diff)
		return 4;
	return frag_live(e, now) ? 1 : 2;
}

/* Claim the picked slot (FREE/LIVE → BUSY) and fill its entry; the caller writes the key and
 * publishes the slot (LIVE). 0: another CPU took the slot in between (counted claim_lost; this
 * datagram's later fragments will be unmatched). */
static __always_inline int frag_fill(struct env *v, struct pkt *p, struct hw_frag_entry *e, __u32 rank,
				     struct frag_scratch *ks)
{
	__u64 seen = rank == 3 ? HW_SLOT_FREE : HW_SLOT_LIVE;
	if (!rank || __sync_val_compare_and_swap(&e->slot_state, seen, HW_SLOT_BUSY) != seen) {
		frag_stat(p, HW_FS_CLAIM_LOST);
		return 0;
	}
	frag_stat(p, HW_FS_INSERTED);
	if (rank == 1)
		frag_stat(p, HW_FS_EVICTED);
	e->created_ns = v->now;
	e->rule_slot = ks->slot;
	e->revision_id = ks->revision_id;
	e->reason = ks->reason;
	return 1;
}

/* A first fragment passed: note its datagram so that its later fragments follow (frag_follow). The
 * judgement is in ks (slot, revision_id, reason). */
static __always_inline void frag_insert(struct env *v, struct pkt *p, struct frag_scratch *ks)
{
	__u32 pick = HW_FRAG_MAX, rank = 0;
	__u64 oldest = ~0ULL;
	__builtin_memset(&ks->k, 0, sizeof(ks->k));
	if (p->family == 4) {
		struct hw_frag4_key *k = &ks->k.k4;
		frag_key4(k, p, v->dir);
		__u32 base = tbl_first_slot(k, FRAG4_WORDS, v->cfg->table_seed, HW_FRAG_MAX, HW_FRAG_WAYS);
#pragma unroll
		for (int i = 0; i < HW_FRAG_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_frag4_slot *sl = hw_frag4.lookup(&idx);
			asm volatile("" : "+r"(sl));
			if (!sl)
				continue;
			__u32 r = frag_rank(&sl->e, tbl_key_diff(&sl->k, k, FRAG4_WORDS), v->now);
			if (r > rank || (r == 1 && rank == 1 && sl->e.created_ns < oldest)) {
				pick = idx;
				rank = r;
				oldest = sl->e.created_ns;
			}
		}
		struct hw_frag4_slot *sl = hw_frag4.lookup(&pick);
		asm volatile("" : "+r"(sl));
		if (!sl)
			return;
		if (frag_fill(v, p, &sl->e, rank, ks)) {
			sl->k = *k;
			__sync_lock_test_and_set(&sl->e.slot_state, HW_SLOT_LIVE);    /* publish: the entry is whole */
		}
	} else {
		struct hw_frag6_key *k = &ks->k.k6;
		frag_key6(k, p, v->dir);
		__u32 base = tbl_first_slot(k, FRAG6_WORDS, v->cfg->table_seed, HW_FRAG_MAX, HW_FRAG_WAYS);
#pragma unroll
		for (int i = 0; i < HW_FRAG_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_frag6_slot *sl = hw_frag6.lookup(&idx);
			asm volatile("" : "+r"(sl));
			if (!sl)
				continue;
			__u32 r = frag_rank(&sl->e, tbl_key_diff(&sl->k, k, FRAG6_WORDS), v->now);
			if (r > rank || (r == 1 && rank == 1 && sl->e.created_ns < oldest)) {
				pick = idx;
				rank = r;
				oldest = sl->e.created_ns;
			}
		}
		struct hw_frag6_slot *sl = hw_frag6.lookup(&pick);
		asm volatile("" : "+r"(sl));
		if (!sl)
			return;
		if (frag_fill(v, p, &sl->e, rank, ks)) {
			sl->k = *k;
			__sync_lock_test_and_set(&sl->e.slot_state, HW_SLOT_LIVE);
		}
	}
}

/* ---- where fragments are judged --------------------------------------------------------------- *
 * XDP: xdp_judge (behind a tail call already) judges fragments inline. TC: tc_ingress and tc_egress
 * hand every fragment to tc_frag_ingress / tc_frag_egress by a tail call (hostwall.bpf.c tc_divert),
 * which judge the packet the caller parsed into hw_tc_pkt: the fragment paths are verified once, as
 * their own programs, not as more paths of the TC programs. */
BPF_PROG_ARRAY(hw_jump_tc, 2);                         /* tc_frag_ingress, tc_frag_egress */
#define FRAG_JUMP_INGRESS 0
#define FRAG_JUMP_EGRESS  1

/* A first fragment passed: note its datagram (its judgement goes through scratch memory, read back as
 * unknown values, so the insert is verified once, not once per path of the judgement before it). */
static __always_inline void frag_note(struct env *v, struct pkt *p, struct judgement *j)
{
	if (!FIRST_FRAGMENT(p) || j->verdict != HW_V_ALLOW)
		return;
	__u32 zero = 0;
	struct frag_scratch *ks = hw_frag_scratch.lookup(&zero);
	if (!ks)
		return;                 /* unreachable: array map */
	ks->slot = j->slot;
	ks->revision_id = j->revision_id;
	ks->reason = j->reason;
	asm volatile("" ::: "memory");
	frag_insert(v, p, ks);
}

#endif /* HW_FRAG_H */
