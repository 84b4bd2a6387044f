/* SPDX-License-Identifier: Apache-2.0 */
/* Packet parsing: Ethernet, IPv4/IPv6 (extension headers), the L4 header, and the
 * inner header of ICMP errors, into struct pkt (private to the datapath; docs/datapath.md).
 */
#ifndef HW_PARSE_H
#define HW_PARSE_H

/* ---- parsed packet (private to the datapath) ------------------------------------------------ */
struct pkt {
	__u32 saddr[4];         /* network order; v4 in [0] */
	__u32 daddr[4];
	__u32 len;              /* wire length */
	__u16 sport;            /* network order; ICMP echo: identifier */
	__u16 dport;
	__u8  family;           /* 4 or 6; 0 = not IP */
	__u8  proto;            /* IP protocol number */
	__u8  pidx;             /* enum hw_proto_idx */
	__u8  frag;             /* non-first fragment: no L4 header */
	__u8  tcp_flags;
	__u8  icmp_type;
	__u8  icmp_code;
	__u8  opens;            /* may open a tracked connection: TCP SYN, UDP, ICMP echo request */
	__u8  related;          /* ICMP error: the inner tuple below is valid */
	__u8  trackable;        /* TCP, UDP or ICMP echo: has a connection tuple */
	__u32 ifindex;
	__u32 in_saddr[4];      /* ICMP error: the offending packet, as sent */
	__u32 in_daddr[4];
	__u16 in_sport;
	__u16 in_dport;
	__u8  in_proto;
	__u8  ct_hint;          /* set by xdp_ingress before the tail call: 1 no connection, 2 invalid one */
	__u8  syn_proxy;        /* set by the DoS stage: SP_* (dos.h), what the SYN proxy does with it */
	__u64 now;              /* xdp_ingress's clock, so xdp_judge does not read it again */
};

#define CT_HINT_MISS    1
#define CT_HINT_INVALID 2

#define TCPF_FIN 0x01
#define TCPF_SYN 0x02
#define TCPF_RST 0x04
#define TCPF_ACK 0x10

#define PARSE_OK        0
#define PARSE_NOT_IP    1
#define PARSE_MALFORMED 2

/* ---- parsing -------------------------------------------------------------------------------- */
static __always_inline int is_icmp4_error(__u8 t) { return t == 3 || t == 4 || t == 5 || t == 11 || t == 12; }
static __always_inline int is_icmp6_error(__u8 t) { return t >= 1 && t <= 4; }

/* Parse the IP packet embedded in an ICMP error (header + first 8 bytes of L4). */
static __always_inline void parse_inner(struct pkt *p, void *cur, void *end)
{
	if (p->family == 4) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return;
		__u8 *l4 = cur + ip->ihl * 4;
		if ((void *)(l4 + 4) > end)
			return;
		p->in_saddr[0] = ip->saddr;
		p->in_daddr[0] = ip->daddr;
		p->in_proto = ip->protocol;
		cur = l4;
	} else {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return;
		__builtin_memcpy(p->in_saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->in_daddr, &ip6->daddr, 16);
		p->in_proto = ip6->nexthdr;
		cur = ip6 + 1;
		if (cur + 4 > end)
			return;
	}
	if (p->in_proto == IPPROTO_TCP || p->in_proto == IPPROTO_UDP) {
		__u16 *ports = cur;
		if ((void *)(ports + 2) > end)
			return;
		p->in_sport = ports[0];
		p->in_dport = ports[1];
		p->related = 1;
	} else if (p->in_proto == IPPROTO_ICMP || p->in_proto == IPPROTO_ICMPV6) {
		struct icmphdr *ic = cur;
		if ((void *)(ic + 1) > end)
			return;
		p->in_sport = ic->un.echo.id;
		p->in_dport = ic->un.echo.id;
		p->related = 1;
	}
}

static __always_inline int parse_l4(struct pkt *p, void *cur, void *end)
{
	if (p->frag) {
		p->pidx = p->proto == IPPROTO_TCP ? HW_P_TCP : p->proto == IPPROTO_UDP ? HW_P_UDP :
			  p->proto == IPPROTO_ICMP ? HW_P_ICMP : p->proto == IPPROTO_ICMPV6 ? HW_P_ICMPV6 : HW_P_OTHER;
		return PARSE_OK;
	}
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = cur;
		if ((void *)(th + 1) > end || th->doff < 5)
			return PARSE_MALFORMED;
		p->pidx = HW_P_TCP;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->opens = (p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) == TCPF_SYN;
		p->trackable = 1;
		if (th->dest == 0 || th->source == 0)
			return PARSE_MALFORMED;
		return PARSE_OK;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = cur;
		if ((void *)(uh + 1) > end || bpf_ntohs(uh->len) < sizeof(*uh))
			return PARSE_MALFORMED;
		p->pidx = HW_P_UDP;
		p->sport = uh->source;
		p->dport = uh->dest;
		p->opens = 1;
		p->trackable = 1;
		if (uh->dest == 0)
			return PARSE_MALFORMED;
		return PARSE_OK;
	}
	case IPPROTO_ICMP:
	case IPPROTO_ICMPV6: {
		struct icmphdr *ic = cur;   /* type, code, csum, id, seq: same layout for ICMPv6 echo */
		if ((void *)(ic + 1) > end)
			return PARSE_MALFORMED;
		if ((p->proto == IPPROTO_ICMP) != (p->family == 4))
			return PARSE_MALFORMED;     /* ICMP in IPv6 or ICMPv6 in IPv4 */
		p->pidx = p->family == 4 ? HW_P_ICMP : HW_P_ICMPV6;
		p->icmp_type = ic->type;
		p->icmp_code = ic->code;
		if (p->family == 4 ? (ic->type == 8 || ic->type == 0) : (ic->type == 128 || ic->type == 129)) {
			p->sport = ic->un.echo.id;
			p->dport = ic->un.echo.id;
			p->opens = ic->type == 8 || ic->type == 128;
			p->trackable = 1;
		} else if (p->family == 4 ? is_icmp4_error(ic->type) : is_icmp6_error(ic->type)) {
			parse_inner(p, (void *)(ic + 1), end);
		}
		return PARSE_OK;
	}
	default:
		p->pidx = HW_P_OTHER;
		return PARSE_OK;
	}
}

/* IPv6 extension headers we step over; a chain longer than this is malformed (not guessed). */
#define HW_V6_EXT_MAX 6

static __always_inline int parse_pkt(struct pkt *p, void *data, void *end)
{
	struct ethhdr *eth = data;
	void *cur = eth + 1;
	if (cur > end)
		return PARSE_MALFORMED;
	__u16 proto = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {       /* 802.1Q / 802.1ad tags */
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		__u16 *vh = cur;
		if ((void *)(vh + 2) > end)
			return PARSE_MALFORMED;
		proto = vh[1];
		cur += 4;
	}
	p->len = end - data;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end)
			return PARSE_MALFORMED;
		if (ip->version != 4 || ip->ihl < 5 || bpf_ntohs(ip->tot_len) < ip->ihl * 4)
			return PARSE_MALFORMED;
		p->family = 4;
		p->proto = ip->protocol;
		p->saddr[0] = ip->saddr;
		p->daddr[0] = ip->daddr;
		p->frag = (ip->frag_off & bpf_htons(0x1fff)) != 0;
		cur += ip->ihl * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return PARSE_MALFORMED;
		if (ip6->version != 6)
			return PARSE_MALFORMED;
		p->family = 6;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		__u8 nh = ip6->nexthdr;
		cur = ip6 + 1;
		int i;
		for (i = 0; i < HW_V6_EXT_MAX; i++) {
			if (nh != IPPROTO_HOPOPTS && nh != IPPROTO_ROUTING && nh != IPPROTO_DSTOPTS &&
			    nh != IPPROTO_FRAGMENT)
				break;
			__u8 *ext = cur;
			if ((void *)(ext + 8) > end)    /* every extension header is at least 8 bytes */
				return PARSE_MALFORMED;
			if (nh == IPPROTO_FRAGMENT) {
				if (((ext[2] << 8) | ext[3]) & 0xfff8)
					p->frag = 1;
				cur += 8;
			} else {
				cur += (ext[1] + 1) * 8;
			}
			nh = ext[0];
		}
		if (i == HW_V6_EXT_MAX)
			return PARSE_MALFORMED;     /* chain longer than HW_V6_EXT_MAX */
		p->proto = nh;
	} else {
		return PARSE_NOT_IP;
	}
	if (cur > end)
		return PARSE_MALFORMED;
	return parse_l4(p, cur, end);
}

#endif /* HW_PARSE_H */
