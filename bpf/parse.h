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
	__u32 len;              /* IP-layer bytes: header + payload (docs/datapath.md "Counters") */
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
	__u8  hop_limit;        /* IPv4 TTL / IPv6 hop limit */
	__u8  dos_spared;       /* set by the DoS stage: the drop reason its tracked connection spared it (dos.h) */
	__u32 ifindex;
	__u32 frag_id;          /* fragments: IPv4 identification / IPv6 fragment id, network order */
	__u32 first_x;          /* 1 iff a first fragment (offset 0, more follow); see FIRST_FRAGMENT */
	__u32 in_saddr[4];      /* ICMP error: the offending packet, as sent */
	__u32 in_daddr[4];
	__u16 in_sport;
	__u16 in_dport;
	__u8  in_proto;
	__u8  inner;            /* ICMP error: in_saddr/in_daddr hold the embedded packet's addresses */
	__u8  ct_hint;          /* set by xdp_ingress before the tail call: 1 no connection, 2 invalid one;
				 * judge_first's note 3 (CT_HINT_REVERSE) */
	__u8  syn_proxy;        /* set by the DoS stage: SP_* (dos.h), what the SYN proxy does with it */
	__u32 l4len;            /* parsing only: bytes the IP header(s) say follow the headers parsed so far */
	__u64 now;              /* xdp_ingress's clock, so xdp_judge does not read it again */
	__s32 fqdn_m;           /* judging only: fqdn_match's answer (fqdn.h) */
	__u32 tcp_seq;          /* TCP, host order: the segment's sequence number */
	__u32 tcp_end;          /* TCP: tcp_seq + payload bytes + 1 per SYN/FIN (the sender's next sequence) */
	__u32 tcp_ack;          /* TCP: acknowledgement number (meaningful with TCPF_ACK) */
	__u8  in_icmp_type;     /* ICMP error quoting an ICMP message: its type (dos.h dos_error_spares) */
	__u8  fqdn_st;          /* judging only: fqdn_match's outcome, enum hw_fqdn_stat (fqdn.h) */
	__u8  pad1[2];
};

/* The per-CPU memory the programs parse into (hw_pkt_scratch, hw_tc_pkt): the dynamic-set counters
 * first (hostwall.h "hw_fqdn_stats"), never reset, then the packet, reset for each one. The egress
 * judgement counts its dynamic-set outcome there, a store to memory the packet already holds rather
 * than a per-CPU map lookup (docs/datapath.md "FQDN rules"); XDP's copy stays zero. */
struct pkt_mem {
	struct hw_counter fqdn[HW_FQDN_STATS];
	struct pkt p;
};
#define PKT_FQDN_STATS(pk) ((struct hw_counter *)((void *)(pk) - __builtin_offsetof(struct pkt_mem, p)))
_Static_assert(sizeof(struct pkt_mem) == HW_PKT_MEM_BYTES, "struct pkt changed: set hostwall.h HW_PKT_MEM_BYTES");

/* p->first_x is 1 + (the fragment field XOR the value it has in a first fragment), not a 0/1 flag: a
 * flag stored as a constant would split the verifier's states into two for every path after parsing,
 * while a value derived from the packet is one unknown scalar on all of them (docs/datapath.md
 * "Speed"). 1 only for a first fragment; 0 (unparsed, or IPv6 without a fragment header) never is. */
#define FIRST_FRAGMENT(p) ((p)->first_x == 1)

#define CT_HINT_MISS    1
#define CT_HINT_INVALID 2
#define CT_HINT_REVERSE 3       /* the peer's reverse SYN on a live tuple: judged, never opened (conntrack.h) */

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

/* IPv6 extension headers we step over; a chain longer than this is malformed (not guessed). */
#define HW_V6_EXT_MAX 6

static __always_inline int is_v6_ext(__u8 nh)
{
	return nh == IPPROTO_HOPOPTS || nh == IPPROTO_ROUTING || nh == IPPROTO_DSTOPTS || nh == IPPROTO_FRAGMENT;
}

/* Length of the extension header `ext` of type nh (its first 8 bytes are in the frame): the fragment
 * header is 8 bytes, the others 8-byte words less 1. */
static __always_inline __u32 v6_ext_len(__u8 nh, __u8 *ext)
{
	if (nh == IPPROTO_FRAGMENT)
		return 8;
	return (ext[1] + 1) * 8;
}

/* Parse the IP packet embedded in an ICMP error (header + first 8 bytes of L4). `avail`: bytes of
 * the error's body that the outer IP header says it holds; nothing past them is read as the inner
 * packet (a short frame's padding is not a header). Its IPv6 extension headers are stepped over as
 * the outer ones; a later fragment (offset > 0) holds payload, not ports: it gets no tuple (related
 * stays 0), its addresses still count (p->inner: path-MTU errors, essential.h). */
static __always_inline void parse_inner(struct pkt *p, void *cur, void *end, __u32 avail)
{
	__u32 hlen;
	if (p->family == 4) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end || ip->ihl < 5)
			return;
		hlen = ip->ihl * 4;
		if (hlen > avail)
			return;
		p->in_saddr[0] = ip->saddr;
		p->in_daddr[0] = ip->daddr;
		p->inner = 1;
		if (ip->frag_off & bpf_htons(0x1fff))
			return;
		p->in_proto = ip->protocol;
		cur += hlen;
	} else {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end || sizeof(*ip6) > avail)
			return;
		hlen = sizeof(*ip6);
		__builtin_memcpy(p->in_saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->in_daddr, &ip6->daddr, 16);
		p->inner = 1;
		__u8 nh = ip6->nexthdr;
		cur = ip6 + 1;
		for (int i = 0; i < HW_V6_EXT_MAX && is_v6_ext(nh); i++) {
			__u8 *ext = cur;
			if ((void *)(ext + 8) > end ||
			    (nh == IPPROTO_FRAGMENT && ((((ext[2] << 8) | ext[3]) & 0xfff8) | ext[1])))
				return;         /* truncated, a later fragment, or a fragment header with its reserved byte set */
			__u32 len = (ext[1] + 1) * 8;   /* a fragment header's too (8): one path for the verifier */
			cur += len;
			hlen += len;
			nh = ext[0];
		}
		p->in_proto = nh;       /* still an extension header if the chain is too long: no tuple */
	}
	if (p->in_proto == IPPROTO_TCP || p->in_proto == IPPROTO_UDP) {
		__u16 *ports = cur;
		if ((void *)(ports + 2) > end || hlen + 4 > avail)
			return;
		p->in_sport = ports[0];
		p->in_dport = ports[1];
		p->related = 1;
	} else if (p->in_proto == IPPROTO_ICMP || p->in_proto == IPPROTO_ICMPV6) {
		struct icmphdr *ic = cur;
		if ((void *)(ic + 1) > end || hlen + sizeof(*ic) > avail)
			return;
		p->in_sport = ic->un.echo.id;
		p->in_dport = ic->un.echo.id;
		p->in_icmp_type = ic->type;
		p->related = 1;
	}
}

/* The L4 header at `cur`. `l4len`: bytes the IP header(s) say follow (the frame may hold padding
 * after them): a header that does not fit in them is malformed, also in a first fragment (a first
 * fragment too short for its L4 header, RFC 1858's tiny fragment, never reaches the policy). */
static __always_inline int parse_l4(struct pkt *p, void *cur, void *end, __u32 l4len)
{
	if (p->frag) {
		p->pidx = p->proto == IPPROTO_TCP ? HW_P_TCP : p->proto == IPPROTO_UDP ? HW_P_UDP :
			  p->proto == IPPROTO_ICMP ? HW_P_ICMP : p->proto == IPPROTO_ICMPV6 ? HW_P_ICMPV6 : HW_P_OTHER;
		return PARSE_OK;
	}
	switch (p->proto) {
	case IPPROTO_TCP: {
		struct tcphdr *th = cur;
		if ((void *)(th + 1) > end || th->doff < 5 || th->doff * 4 > l4len)
			return PARSE_MALFORMED;
		p->pidx = HW_P_TCP;
		p->sport = th->source;
		p->dport = th->dest;
		p->tcp_flags = ((__u8 *)th)[13];
		p->tcp_seq = bpf_ntohl(th->seq);
		p->tcp_ack = bpf_ntohl(th->ack_seq);
		p->tcp_end = p->tcp_seq + (l4len - th->doff * 4) + !!(p->tcp_flags & TCPF_SYN) + (p->tcp_flags & TCPF_FIN);
		p->opens = (p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_RST)) == TCPF_SYN;
		p->trackable = 1;
		if (th->dest == 0 || th->source == 0)
			return PARSE_MALFORMED;
		return PARSE_OK;
	}
	case IPPROTO_UDP: {
		struct udphdr *uh = cur;
		if ((void *)(uh + 1) > end || sizeof(*uh) > l4len || bpf_ntohs(uh->len) < sizeof(*uh))
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
		if ((void *)(ic + 1) > end || sizeof(*ic) > l4len)
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
			parse_inner(p, (void *)(ic + 1), end, l4len - sizeof(*ic));
		}
		return PARSE_OK;
	}
	default:
		p->pidx = HW_P_OTHER;
		return PARSE_OK;
	}
}

/* frame_len: the whole frame's length (XDP: data_end - data; TC: skb->len, which may exceed the
 * linear data). p->len becomes the packet's IP-layer length: the IP header's own length (IPv4 total
 * length, IPv6 40 + payload length; Ethernet padding after it counts for nothing, and an IP length
 * longer than the frame after its L2 header is malformed: the kernel drops it); the frame after
 * its L2 header when there is no IP length (non-IP, IPv6 jumbograms, frames too short to say, and
 * `gso`: nonzero for a TC hook's GSO skb, an IPv4 BIG TCP super-packet's total length 0).
 * NetFlow/IPFIX count octets the same way. */
static __always_inline int parse_pkt(struct pkt *p, void *data, void *end, __u32 frame_len, __u32 gso)
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
	__u32 l2 = cur - data;
	__u32 l3 = frame_len > l2 ? frame_len - l2 : 0, jumbo_fix = 0;
	p->len = l3;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = cur;
		if ((void *)(ip + 1) > end)
			return PARSE_MALFORMED;
		__u32 ip_len = bpf_ntohs(ip->tot_len);
		/* total length 0: an IPv4 BIG TCP super-packet (a TC hook's GSO skb over 64k, as the kernel's
		 * iph_totlen reads it); its length is the skb's. Anywhere else (XDP: gso 0) it is malformed. */
		if (ip_len == 0 && gso && l3 > 0xffff && ip->protocol == IPPROTO_TCP)
			ip_len = l3;
		/* longer than the frame: the kernel drops it (ip_rcv_core), and its length must not teach the
		 * sequence checks a segment end it does not carry (docs/datapath.md "Sequence checks") */
		if (ip->version != 4 || ip->ihl < 5 || ip_len < ip->ihl * 4 || ip_len > l3)
			return PARSE_MALFORMED;
		p->len = ip_len;
		p->family = 4;
		p->proto = ip->protocol;
		p->saddr[0] = ip->saddr;
		p->daddr[0] = ip->daddr;
		p->hop_limit = ip->ttl;
		__u16 fo = bpf_ntohs(ip->frag_off);
		p->frag = (fo & 0x1fff) != 0;                   /* offset > 0 */
		p->first_x = ((fo & 0x3fff) ^ 0x2000) + 1;      /* 1: offset 0, more fragments */
		p->frag_id = ip->id;
		p->l4len = ip_len - ip->ihl * 4;
		cur += ip->ihl * 4;
	} else if (proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = cur;
		if ((void *)(ip6 + 1) > end)
			return PARSE_MALFORMED;
		if (ip6->version != 6)
			return PARSE_MALFORMED;
		__u32 ip_len = bpf_ntohs(ip6->payload_len);
		if (ip_len + 40 > l3)   /* longer than the frame: as IPv4 above (ipv6_rcv drops it) */
			return PARSE_MALFORMED;
		if (ip_len)             /* 0: a jumbogram (the frame's length stands) */
			p->len = ip_len + 40;
		p->family = 6;
		__builtin_memcpy(p->saddr, &ip6->saddr, 16);
		__builtin_memcpy(p->daddr, &ip6->daddr, 16);
		p->hop_limit = ip6->hop_limit;
		__u8 nh = ip6->nexthdr;
		cur = ip6 + 1;
		/* payload length 0: a jumbo (BIG TCP) super-packet on a TC hook; its length is the skb's
		 * (frame_len), as anywhere else the frame's. Parsed as 64 KiB (a constant bound keeps the
		 * verifier's work small: ~97k instructions in tc_egress otherwise), its TCP end then moved to
		 * what the frame carries (below) */
		p->l4len = ip_len ? ip_len : 0x10000;
		if (!ip_len)
			jumbo_fix = l3 - 40 - 0x10000;
		int i;
		for (i = 0; i < HW_V6_EXT_MAX; i++) {
			if (!is_v6_ext(nh))
				break;
			__u8 *ext = cur;
			if ((void *)(ext + 8) > end)    /* every extension header is at least 8 bytes */
				return PARSE_MALFORMED;
			if (nh == IPPROTO_FRAGMENT) {
				__u16 fo = (ext[2] << 8) | ext[3];
				p->frag = (fo & 0xfff8) != 0;           /* offset > 0 */
				p->first_x = ((fo & 0xfff9) ^ 1) + 1;   /* 1: offset 0, more fragments (M) */
				p->frag_id = *(__u32 *)(ext + 4);       /* an atomic fragment (offset 0, no M) is whole */
				cur += 8;
				p->l4len -= 8;
				nh = ext[0];
				if (p->frag)
					break;  /* past this header a later fragment holds payload, not headers */
				continue;
			}
			__u32 len = v6_ext_len(nh, ext);
			cur += len;
			p->l4len -= len;
			nh = ext[0];
		}
		if (i == HW_V6_EXT_MAX && is_v6_ext(nh))
			return PARSE_MALFORMED;     /* chain longer than HW_V6_EXT_MAX */
		if ((__s32)p->l4len < 0)
			return PARSE_MALFORMED;     /* extension headers longer than the payload */
		p->proto = nh;
	} else {
		return PARSE_NOT_IP;
	}
	if (cur > end)
		return PARSE_MALFORMED;
	int rc = parse_l4(p, cur, end, p->l4len);
	p->tcp_end += jumbo_fix;        /* sequence arithmetic: wraps as it should */
	return rc;
}

#endif /* HW_PARSE_H */
