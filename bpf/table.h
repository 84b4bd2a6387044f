/* SPDX-License-Identifier: Apache-2.0 */
/* Set-associative tables in mmapable arrays (conntrack, DoS sources): the seeded bucket hash
 * and the key compare over 64-bit words, inlined by the verifier (docs/datapath.md).
 */
#ifndef HW_TABLE_H
#define HW_TABLE_H

static __always_inline __u32 tbl_first_slot(void *key, __u32 nwords, __u64 seed, __u32 slots, __u32 ways)
{
	__u64 *w = key, h = seed;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i < nwords) {
			h = (h ^ w[i]) * 0x9e3779b97f4a7c15ULL;
			h ^= h >> 29;
		}
	}
	return ((__u32)(h >> 32) & (slots / ways - 1)) * ways;
}

/* 0 when two keys are equal: their words XORed and ORed (one branch for the caller, where a
 * field-by-field compare would give the verifier a path per field). */
static __always_inline __u64 tbl_key_diff(void *x, void *y, __u32 nwords)
{
	__u64 *a = x, *b = y, d = 0;
#pragma unroll
	for (int i = 0; i < 8; i++) {
		if (i < nwords)
			d |= a[i] ^ b[i];
	}
	return d;
}

#endif /* HW_TABLE_H */
