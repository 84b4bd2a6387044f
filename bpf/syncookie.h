/* SPDX-License-Identifier: Apache-2.0 */
/* The SYN proxy's cookies in XDP (docs/dos.md, "SYN cookies"): SYNs to covered ports answered with
 * cookie SYN-ACKs from xdp_judge with the kernel's cookie helpers, so no state exists until an ACK
 * proves the client real. Which SYNs and ACKs it handles is decided in the DoS stage (dos.h,
 * syn_port_stage).
 *
 * Handshake completion: a valid cookie ACK opens a tracked connection (ESTABLISHED) and passes to the
 * host's stack, whose own tcp_syncookies path accepts it (the helpers use the stack's cookie secret).
 * The stack accepts a cookie ACK only within 2 minutes of a cookie it sent itself, so while the proxy
 * answers, one SYN per port and family every HW_SYN_REFRESH_NS goes through to the stack, which answers
 * it with its own cookie when net.ipv4.tcp_syncookies=2 (the operator's part, docs/dos.md).
 * Options: the cookie carries the client's MSS; with proxy_full the client's window scale and SACK
 * ride in the timestamp (the kernel's own cookie layout), which the stack decodes when
 * net.ipv4.tcp_timestamps=2 (no per-connection timestamp offset). Otherwise MSS only.
 */
#ifndef HW_SYNCOOKIE_H
#define HW_SYNCOOKIE_H

#define TCPOPT_EOL 0
#define TCPOPT_NOP 1
#define TCPOPT_MSS 2
#define TCPOPT_WS 3
#define TCPOPT_SACKOK 4
#define TCPOPT_TS 8

/* ---- cookies (xdp_judge) ------------------------------------------------------------------------- */
struct syn_opts {
	__u32 tsval;            /* the client's timestamp, if it sent one */
	__u8 ts;                /* the client sent a timestamp */
	__u8 ws;                /* the client sent a window scale */
	__u8 wscale;
	__u8 sack;              /* the client sent SACK-permitted */
};

/* Byte offset of the IP header behind the Ethernet header and up to two VLAN tags, or -1. */
static __always_inline int l3_offset(void *data, void *end, __u16 *proto)
{
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	int off = sizeof(*eth);
	__u16 pr = eth->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (pr != bpf_htons(ETH_P_8021Q) && pr != bpf_htons(ETH_P_8021AD))
			break;
		__u16 *vh = data + off;
		if ((void *)(vh + 2) > end)
			return -1;
		pr = vh[1];
		off += 4;
	}
	*proto = pr;
	return off;
}

/* The IP and TCP headers of a packet the proxy can answer or check: IPv4 without options, or IPv6
 * without extension headers (a fragment header among them), not a fragment (a cookie answers a whole
 * SYN, docs/dos.md), and the TCP header's 20 fixed bytes in the packet. Offsets (l3, l4) of
 * the IP and TCP headers; 0 if the packet is not one of those. */
static __always_inline int syn_headers(struct xdp_md *ctx, struct pkt *p, __u32 *l3, __u32 *l4)
{
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	__u16 proto = 0;
	int off = l3_offset(data, end, &proto);
	if (off < 0 || off > 22)
		return 0;
	if (p->family == 4) {
		struct iphdr *ip = data + off;
		if ((void *)(ip + 1) > end || ip->ihl != 5 || proto != bpf_htons(ETH_P_IP) ||
		    (ip->frag_off & bpf_htons(0x3fff)))         /* offset or more fragments */
			return 0;
		*l4 = off + sizeof(struct iphdr);
	} else {
		struct ipv6hdr *ip6 = data + off;
		if ((void *)(ip6 + 1) > end || ip6->nexthdr != IPPROTO_TCP || proto != bpf_htons(ETH_P_IPV6))
			return 0;
		*l4 = off + sizeof(struct ipv6hdr);
	}
	*l3 = off;
	struct tcphdr *th = data + *l4;
	return (void *)(th + 1) <= end;
}

/* Does this untracked ACK carry a valid cookie (bpf_tcp_raw_check_syncookie_*)? */
static __always_inline int syn_cookie_valid(struct xdp_md *ctx, struct pkt *p)
{
	__u32 l3 = 0, l4 = 0;
	if (!syn_headers(ctx, p, &l3, &l4))
		return 0;
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	l3 &= 31;
	if (p->family == 4) {
		struct iphdr *ip = data + l3;
		struct tcphdr *th = (void *)(ip + 1);
		if ((void *)(th + 1) > end)
			return 0;
		return bpf_tcp_raw_check_syncookie_ipv4(ip, th) == 0;
	}
	struct ipv6hdr *ip6 = data + l3;
	struct tcphdr *th = (void *)(ip6 + 1);
	if ((void *)(th + 1) > end)
		return 0;
	return bpf_tcp_raw_check_syncookie_ipv6(ip6, th) == 0;
}

/* Parse the SYN's options (at most 40 bytes, copied to the stack). */
static __always_inline void syn_parse_opts(__u8 *buf, __u32 thl, struct syn_opts *o)
{
	__u32 i = 20;
#pragma unroll
	for (int n = 0; n < 12; n++) {
		if (i >= thl || i >= 60)
			break;
		__u8 kind = buf[i & 63];
		if (kind == TCPOPT_EOL)
			break;
		if (kind == TCPOPT_NOP) {
			i++;
			continue;
		}
		__u8 len = buf[(i + 1) & 63];
		if (len < 2 || i + len > thl)
			break;
		if (kind == TCPOPT_WS && len == 3) {
			o->ws = 1;
			o->wscale = buf[(i + 2) & 63] > 14 ? 14 : buf[(i + 2) & 63];
		} else if (kind == TCPOPT_SACKOK && len == 2) {
			o->sack = 1;
		} else if (kind == TCPOPT_TS && len == 10) {
			o->ts = 1;
			o->tsval = ((__u32)buf[(i + 2) & 63] << 24) | ((__u32)buf[(i + 3) & 63] << 16) |
				   ((__u32)buf[(i + 4) & 63] << 8) | buf[(i + 5) & 63];
		}
		i += len;
	}
}

/* One's-complement sum of N 16-bit words at p, as they lie in memory (the folded result stored back
 * the same way is the Internet checksum whatever the host's byte order). Inline loads: no helper. */
#define SUM16(p, n) ({ __u64 _s = 0; __u16 *_w = (__u16 *)(p);                   \
	_Pragma("unroll") for (int _i = 0; _i < (n); _i++) _s += _w[_i]; _s; })

static __always_inline __u16 csum_fold(__u64 s)
{
	s = (s & 0xffffffff) + (s >> 32);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	s = (s & 0xffff) + (s >> 16);
	return ~s;
}

/* Write the cookie SYN-ACK's TCP options at `o` (20 bytes with full options, else 4: MSS only). */
static __always_inline void syn_write_opts(__u8 *o, __u16 mss, int full, struct syn_opts *so, __u32 tsval,
					   __u8 wscale)
{
	o[0] = TCPOPT_MSS;
	o[1] = 4;
	o[2] = mss >> 8;
	o[3] = mss & 0xff;
	if (!full)
		return;
	o[4] = so->sack ? TCPOPT_SACKOK : TCPOPT_NOP;
	o[5] = so->sack ? 2 : TCPOPT_NOP;
	o[6] = TCPOPT_TS;
	o[7] = 10;
	__u32 tv = bpf_htonl(tsval), te = bpf_htonl(so->tsval);
	__builtin_memcpy(o + 8, &tv, 4);
	__builtin_memcpy(o + 12, &te, 4);
	o[16] = TCPOPT_NOP;
	o[17] = so->ws ? TCPOPT_WS : TCPOPT_NOP;
	o[18] = so->ws ? 3 : TCPOPT_NOP;
	o[19] = so->ws ? wscale : TCPOPT_NOP;
}

/* Turn the SYN in ctx into its cookie SYN-ACK (XDP_TX by the caller). 1: done, with *synack_len its
 * length; 0: this SYN cannot be answered (IP options, IPv6 extension headers, a fragment, a helper failure): it
 * is then handled as without the proxy (counted not_answerable). Nothing is changed before every
 * check has passed; -1 (unreachable: the frame has exactly the length just set) if the frame was
 * resized but could not be written, so the caller must drop it. */
static __always_inline int syn_answer(struct xdp_md *ctx, struct pkt *p, struct hw_dos_profile *pr, __u32 *synack_len)
{
	__u32 l3 = 0, l4 = 0;
	if (!syn_headers(ctx, p, &l3, &l4))
		return 0;
	void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
	l3 &= 31;
	l4 &= 63;
	struct tcphdr *th = data + l4;
	if ((void *)(th + 1) > end)
		return 0;
	__u32 thl = th->doff * 4;
	if (thl < 20 || thl > 60)
		return 0;
	__u8 buf[64] = {};              /* the SYN's TCP header: the helpers and the option parser read it */
	if (bpf_xdp_load_bytes(ctx, l4, buf, thl))
		return 0;
	struct syn_opts so = {};
	syn_parse_opts(buf, thl, &so);
	__u32 seq = ((struct tcphdr *)buf)->seq;
	__u16 sport = ((struct tcphdr *)buf)->source, dport = ((struct tcphdr *)buf)->dest;
	__s64 ck;
	__u32 iplen = p->family == 4 ? 20 : 40;
	if (p->family == 4) {
		struct iphdr *ip = data + l3;
		if ((void *)(ip + 1) > end)
			return 0;
		ck = bpf_tcp_raw_gen_syncookie_ipv4(ip, (struct tcphdr *)buf, thl);
	} else {
		struct ipv6hdr *ip6 = data + l3;
		if ((void *)(ip6 + 1) > end)
			return 0;
		ck = bpf_tcp_raw_gen_syncookie_ipv6(ip6, (struct tcphdr *)buf, thl);
	}
	if (ck < 0)
		return 0;
	int full = pr->proxy_full && so.ts;     /* options ride in the timestamp: no timestamp, MSS only */
	__u32 optlen = full ? 20 : 4;
	__u32 newlen = l3 + iplen + 20 + optlen;
	/* a SYN whose header the answer's replaces byte for byte (MSS only to MSS only, or the usual
	 * 20 bytes of options to full options) keeps its length: no helper call (docs/benchmarks.md, issue 20) */
	int delta = (int)newlen - (int)(ctx->data_end - ctx->data);
	if (delta && bpf_xdp_adjust_tail(ctx, delta))
		return 0;
	data = (void *)(long)ctx->data;
	end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end)
		return -1;
	__u8 mac[6];
	__builtin_memcpy(mac, eth->h_source, 6);
	__builtin_memcpy(eth->h_source, eth->h_dest, 6);
	__builtin_memcpy(eth->h_dest, mac, 6);
	__u64 sum;
	__u16 mss = p->family == 4 ? pr->proxy_mss : pr->proxy_mss - 20;
	/* the kernel's cookie timestamp: ms clock with the client's options in the low 6 bits, not ahead of now */
	__u32 tsval = 0;
	if (full) {
		__u32 now_ms = bpf_ktime_get_ns() / 1000000ULL;
		tsval = (now_ms & ~0x3fU) | (so.ws ? so.wscale : 0xf) | (so.sack ? 0x10 : 0);
		if (tsval > now_ms)
			tsval -= 0x40;
	}
	struct tcphdr *t;
	if (p->family == 4) {
		struct iphdr *ip = data + l3;
		t = (void *)(ip + 1);
		if ((void *)t + 24 > end || (full && (void *)t + 40 > end))
			return -1;
		__u32 a = ip->saddr;
		ip->saddr = ip->daddr;
		ip->daddr = a;
		ip->tos = 0;
		ip->tot_len = bpf_htons(20 + 20 + optlen);
		ip->id = 0;
		ip->frag_off = bpf_htons(0x4000);
		ip->ttl = 64;
		ip->check = 0;
		ip->check = csum_fold(SUM16(ip, 10));
		sum = SUM16(&ip->saddr, 4) + bpf_htons(IPPROTO_TCP) + bpf_htons(20 + optlen);
	} else {
		struct ipv6hdr *ip6 = data + l3;
		t = (void *)(ip6 + 1);
		if ((void *)t + 24 > end || (full && (void *)t + 40 > end))
			return -1;
		struct in6_addr a = ip6->saddr;
		ip6->saddr = ip6->daddr;
		ip6->daddr = a;
		*(__u32 *)ip6 = bpf_htonl(0x60000000);
		ip6->payload_len = bpf_htons(20 + optlen);
		ip6->hop_limit = 64;
		sum = SUM16(&ip6->saddr, 16) + bpf_htons(20 + optlen) + bpf_htons(IPPROTO_TCP);
	}
	__builtin_memset(t, 0, 20);
	t->source = dport;
	t->dest = sport;
	t->seq = bpf_htonl((__u32)ck);
	t->ack_seq = bpf_htonl(bpf_ntohl(seq) + 1);
	t->doff = (20 + optlen) / 4;
	t->syn = 1;
	t->ack = 1;
	t->window = bpf_htons(65535);
	syn_write_opts((__u8 *)(t + 1), mss, full, &so, tsval, pr->proxy_wscale);
	if (full)
		sum += SUM16(t, 20);
	else
		sum += SUM16(t, 12);
	t->check = csum_fold(sum);
	*synack_len = newlen;
	return 1;
}

#endif /* HW_SYNCOOKIE_H */
