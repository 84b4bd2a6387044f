/* SPDX-License-Identifier: Apache-2.0 */
/* The policy classifier: the double-buffered policy maps (a generation each) and the
 * bit-vector first match (peer class ∧ L4 class, lowest set bit; docs/datapath.md).
 */
#ifndef HW_CLASSIFY_H
#define HW_CLASSIFY_H

/* ---- policy maps (double-buffered: [gen * size + i]) ------------------------------------- */

BPF_F_TABLE("array", u32, struct hw_policy_hdr, hw_policy, 2, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_rule, hw_rules, 2 * HW_MAX_RULES, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_class, hw_peer_cls, 2 * HW_PEER_CLASSES_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_class, hw_l4_cls, 2 * HW_L4_CLASSES_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_top, hw_top4, 2 * HW_TOP_SIZE, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_top, hw_top6, 2 * HW_TOP_SIZE, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_top, hw_sub4, 2 * HW_SUB_SIZE, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_top, hw_sub6, 2 * HW_SUB_SIZE, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_iv4, hw_iv4, 2 * HW_V4_INTERVALS_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_iv6, hw_iv6, 2 * HW_V6_INTERVALS_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_l4_elem, hw_l4, 2 * HW_L4_ELEMS, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_xm_elem, hw_xmatch, 2 * HW_XM_ELEMS, MAPF_MMAP);

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
/* hw_sub4/6 index of a dense bucket's entry (top entry's first = HW_SUB_FLAG | shift << 24 | offset) for
 * the 16 address bits after the top 16: the compiler gave the bucket 2^(16 - shift) entries from offset. */
static __always_inline __u32 sub_index(__u32 gen, __u32 first, __u32 next16)
{
	__u32 i = (first & HW_SUB_OFF_MASK) + (next16 >> ((first >> HW_SUB_SHIFT_POS) & 15));
	return gen * HW_SUB_SIZE + (i & (HW_SUB_SIZE - 1));
}

/* Peer class of an IPv4 address: top-16 bucket (a dense one narrowed by its hw_sub4 entry), then binary
 * search among the range's intervals (docs/datapath.md "Classification").
 * Cost: 1 (+1 dense) + ceil(log2(intervals in range)) inlined array loads. */
static __always_inline int peer_class4(__u32 gen, __u32 addr_be, __u32 *cls)
{
	__u32 addr = bpf_ntohl(addr_be);
	__u32 k = gen * HW_TOP_SIZE + (addr >> 16);
	struct hw_top *t = hw_top4.lookup(&k);
	if (!t)
		return -1;
	__u32 lo = t->first, hi = t->last;
	if (lo & HW_SUB_FLAG) {
		__u32 ks = sub_index(gen, lo, addr & 0xffff);
		struct hw_top *s = hw_sub4.lookup(&ks);
		if (!s)
			return -1;
		lo = s->first;
		hi = s->last;
	}
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
	if (lo & HW_SUB_FLAG) {
		__u32 ks = sub_index(gen, lo, (__u32)(ahi >> 32) & 0xffff);
		struct hw_top *s = hw_sub6.lookup(&ks);
		if (!s)
			return -1;
		lo = s->first;
		hi = s->last;
	}
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

/* L4 class of (direction, protocol, key): the key is the destination port for TCP/UDP and
 * (type << 8 | code) for ICMP/ICMPv6 (docs/datapath.md "Classification"), so ICMP type matching is
 * the same one table load as a port. Later fragments never get here (frag_follow judges them). */
static __always_inline int l4_class(__u32 gen, __u32 dir, struct pkt *p, __u32 *cls)
{
	__u32 port = p->pidx <= HW_P_UDP ? bpf_ntohs(p->dport) :
		     p->pidx <= HW_P_ICMPV6 ? ((__u32)p->icmp_type << 8 | p->icmp_code) : 0;
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

/* First matching rule (order index) or -1 from the compiler's cross-product table (hw_policy_hdr.xm_stride
 * set): one inlined array load in place of first_match's scan (docs/datapath.md "Classification"). The
 * compiler bounds stride x L4 classes by HW_XM_CELLS_MAX, so the cell is always one it wrote. */
static __always_inline int xm_match(__u32 gen, __u32 pcls, __u32 lcls, __u32 stride)
{
	__u32 cell = lcls * stride + pcls;
	__u32 idx = gen * HW_XM_ELEMS + ((cell / HW_XM_SLOTS) & (HW_XM_ELEMS - 1));
	struct hw_xm_elem *e = hw_xmatch.lookup(&idx);
	if (!e)
		return -1;
	return (int)e->rule[cell & (HW_XM_SLOTS - 1)] - 1;
}

#endif /* HW_CLASSIFY_H */
