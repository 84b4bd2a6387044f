/* SPDX-License-Identifier: Apache-2.0 */
/* Essential ICMP (defaults.essential_icmp; docs/policy.md "Essential ICMP"): the ICMP and ICMPv6
 * messages a host cannot work without pass before any rule. This header decides which messages are
 * essential; judge() (hostwall.bpf.c) also passes ICMP errors about tracked connections under the
 * same switch (pass_related) and counts both under the pseudo-rule's counter slot.
 */
#ifndef HW_ESSENTIAL_H
#define HW_ESSENTIAL_H

/* The error embeds a packet its destination sent: an ICMP error goes back to the source of the
 * packet that caused it (RFC 792, RFC 4443 §2.4), so the embedded source is the outer destination.
 * Anything else is not an error about our traffic (or a tunnel in an error's clothes). */
static __always_inline int icmp_inner_ours(struct pkt *p)
{
	if (!p->inner)
		return 0;
	if (p->family == 4)
		return p->in_saddr[0] == p->daddr[0];
	return !((p->in_saddr[0] ^ p->daddr[0]) | (p->in_saddr[1] ^ p->daddr[1]) |
		 (p->in_saddr[2] ^ p->daddr[2]) | (p->in_saddr[3] ^ p->daddr[3]));
}

/* fe80::/10 link-local, or :: (MLD reports of a host that has no address yet, RFC 3810 §5.2.13) */
static __always_inline int icmp_src_link_local(struct pkt *p)
{
	__u32 w0 = bpf_ntohl(p->saddr[0]);
	return (w0 & 0xffc00000) == 0xfe800000 ||
	       !(p->saddr[0] | p->saddr[1] | p->saddr[2] | p->saddr[3]);
}

/* Is this ICMP/ICMPv6 message essential? Cost: a few compares, ICMP packets only.
 * - ICMPv6 router/neighbour discovery: RS 133, RA 134, NS 135, NA 136, redirect 137, only with hop
 *   limit 255 (sent on-link: RFC 4861 §6.1, §7.1, §8.1; the kernel's own checks follow);
 * - MLD: query 130, report 131, done 132, v2 report 143, only from a link-local source (or ::) with
 *   hop limit 1 (RFC 2710 §3, RFC 3810 §5; snooping switches stop forwarding a group, solicited-node
 *   multicast included, to a host that never answers queries);
 * - path-MTU errors: ICMPv6 packet too big (2), ICMP destination unreachable / fragmentation needed
 *   (3/4, RFC 1191), when they embed a packet their destination sent (icmp_inner_ours). */
static __always_inline int essential_icmp(struct pkt *p)
{
	__u8 t = p->icmp_type;
	if (p->pidx == HW_P_ICMPV6) {
		if (t >= 133 && t <= 137)
			return p->hop_limit == 255;
		if (t == 130 || t == 131 || t == 132 || t == 143)
			return p->hop_limit == 1 && icmp_src_link_local(p);
		return t == 2 && icmp_inner_ours(p);
	}
	return t == 3 && p->icmp_code == 4 && icmp_inner_ours(p);
}

#endif /* HW_ESSENTIAL_H */
