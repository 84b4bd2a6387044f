/* SPDX-License-Identifier: Apache-2.0 */
/* DoS guards in XDP ingress, before conntrack and policy: per-source token buckets in a
 * set-associative table, the per-destination-port SYN stage (rate, guard, SYN proxy decision), global
 * SYN buckets, bans (automatic and manual) and their counters (docs/dos.md).
 */
#ifndef HW_DOS_H
#define HW_DOS_H

/* ---- DoS maps ------------------------------------------------------------------------------------ */

BPF_F_TABLE("array", u32, struct hw_dos_profile, hw_dos_profiles, 2 * HW_DOS_PROFILES_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_dos_if, hw_dos_ifs, 2 * HW_DOS_IF_SLOTS, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_dos_slot, hw_dos_src, HW_DOS_SRC_MAX, MAPF_MMAP);
BPF_TABLE("hash", struct hw_dos_key, struct hw_dos_ban, hw_dos_banned, HW_DOS_BANNED_MAX);
BPF_ARRAY(hw_dos_global, struct hw_bucket, HW_DOS_PROFILES_MAX * 16);
BPF_PERCPU_ARRAY(hw_dos_stats, struct hw_counter, HW_DOS_PROFILES_MAX * HW_REASONS);
BPF_PERCPU_ARRAY(hw_dos_src_stats, struct hw_counter, HW_DSS_STATS);
BPF_F_TABLE("lpm_trie", struct hw_ban4_key, struct hw_manual_ban, hw_manual_ban4, HW_MANUAL_BANS_MAX, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct hw_ban6_key, struct hw_manual_ban, hw_manual_ban6, HW_MANUAL_BANS_MAX, BPF_F_NO_PREALLOC);
BPF_F_TABLE("array", u32, struct hw_syn_port, hw_syn_ports, HW_SYN_PORTS, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_syn_state, hw_syn_state, HW_DOS_PROFILES_MAX, MAPF_MMAP);
BPF_PERCPU_ARRAY(hw_syn_stats, struct hw_counter, HW_SS_STATS);

#define DOS_WORDS (sizeof(struct hw_dos_key) / 8)

/* ---- DoS guards (XDP ingress, before conntrack and policy) ----------------------------------- */
/* Refill a bucket of `rate`/s (tokens in 1e-9 units) capped at `cap`, then take `cost`; 1 = admitted. */
static __always_inline int bucket_take(__u64 *tok, __u64 rate, __u64 cap, __u64 dt, __u64 cost)
{
	__u64 t = *tok + rate * dt;
	if (t > cap || t < *tok)
		t = cap;
	if (t < cost) {
		*tok = t;
		return 0;
	}
	*tok = t - cost;
	return 1;
}

/* Bits bucket in 1e-3 bit units: refill bps * dt / 1e6, as (bps_fp * dt) >> 20 with
 * bps_fp = bps * 2^20 / 1e6 (no division per packet). dt is clamped to 100 ms so the product fits
 * 64 bits up to ~100 Gbit/s; the bits burst is at most 100 ms worth, so nothing is lost by it. */
static __always_inline int bits_take(__u64 *tok, __u64 bps_fp, __u64 cap, __u64 dt, __u64 cost)
{
	if (dt > 100000000ULL)
		dt = 100000000ULL;
	__u64 t = *tok + ((bps_fp * dt) >> 20);
	if (t > cap)
		t = cap;
	if (t < cost) {
		*tok = t;
		return 0;
	}
	*tok = t - cost;
	return 1;
}

/* what the DoS stage decided for a TCP packet (struct pkt.syn_proxy) */
#define SP_NONE   0
#define SP_ANSWER 1     /* a SYN: answer it with a cookie SYN-ACK if the policy allows it */
#define SP_CHECK  2     /* an untracked ACK while the proxy answers for its port: its cookie must be valid */
#define SP_LEARN  3     /* an untracked ACK while an `auto` proxy is idle: a valid cookie opens a connection */

static __always_inline void syn_stat(__u32 what)
{
	counter_add(hw_syn_stats.lookup(&what), 0);
}

/* ---- the DoS stage: per-port SYN rate, guard and proxy decision (xdp_ingress) -------------------- */
static __always_inline int proxy_covers(struct hw_dos_profile *pr, __u16 port)
{
	if (!pr->nproxy_ranges)
		return 1;
#pragma unroll
	for (int i = 0; i < HW_PROXY_RANGES_MAX; i++) {
		if (i >= pr->nproxy_ranges)
			break;
		if (port >= pr->proxy_ranges[i].lo && port <= pr->proxy_ranges[i].hi)
			return 1;
	}
	return 0;
}

/* auto: is the conntrack table under pressure for this profile? Conntrack evictions over the last
 * second above proxy_pressure (re)start its quiet period; `note`: 1 to update the state (a SYN). */
static __always_inline int proxy_pressure(struct env *v, struct hw_dos_profile *pr, __u32 profile, int note)
{
	struct hw_syn_state *ss = hw_syn_state.lookup(&profile);
	if (!ss)
		return 0;
	if (note && pr->proxy_pressure) {
		__u32 zero = 0;
		struct hw_ct_pressure *cp = hw_ct_pressure.lookup(&zero);
		if (cp && v->now - cp->window_ns < 2 * HW_PRESSURE_WINDOW_NS) {
			__u64 rate = cp->prev > cp->count ? cp->prev : cp->count;
			if (rate > pr->proxy_pressure) {
				if (ss->pressure_until_ns <= v->now)
					ss->pressure_since_ns = v->now;
				ss->pressure_until_ns = v->now + pr->proxy_quiet_ns;
			}
		}
	}
	return ss->pressure_until_ns > v->now;
}

/* The per-destination-port SYN stage of an ingress TCP packet on an interface with profile `pr`. A SYN
 * takes a token of its port's bucket (syn_port_pps, all sources together). If the proxy covers the
 * port and answers (on; auto while hot or under pressure), the SYN is marked SP_ANSWER (the policy
 * still decides) and bypasses the global and per-port SYN limits: answering costs no state. Else a SYN
 * over the port's rate is dropped (syn_flood). An ACK to a covered port is marked for the cookie
 * check. Returns a drop reason or 0. */
static __always_inline __u32 syn_port_stage(struct env *v, struct pkt *p, struct hw_dos_profile *pr, __u32 profile)
{
	if (pr->proxy == HW_PROXY_OFF && !pr->syn_port_pps)
		return 0;                       /* nothing per port: no lookup */
	__u32 port = bpf_ntohs(p->dport);
	int covered = pr->proxy != HW_PROXY_OFF && proxy_covers(pr, port);
	if (!covered && (!p->opens || !pr->syn_port_pps))
		return 0;
	struct hw_syn_port *sp = hw_syn_ports.lookup(&port);
	if (!sp)
		return 0;
	if (!p->opens) {
		if ((p->tcp_flags & (TCPF_SYN | TCPF_RST | TCPF_ACK)) == TCPF_ACK) {
			int on = pr->proxy == HW_PROXY_ON || sp->hot_until_ns > v->now || proxy_pressure(v, pr, profile, 0);
			p->syn_proxy = on ? SP_CHECK : SP_LEARN;
		}
		return 0;
	}
	int over = 0;
	if (pr->syn_port_pps) {
		__u64 dt = elapsed_ns(v->now, sp->last_ns, 1000000000ULL);
		sp->last_ns = v->now;
		over = !bucket_take(&sp->tokens, pr->syn_port_pps, pr->syn_port_pps * 1000000000ULL, dt, 1000000000ULL);
	}
	if (covered) {
		int on = pr->proxy == HW_PROXY_ON;
		if (pr->proxy == HW_PROXY_AUTO) {
			if (over) {
				if (sp->hot_until_ns <= v->now)
					sp->hot_since_ns = v->now;
				sp->hot_until_ns = v->now + pr->proxy_quiet_ns;
			}
			on = sp->hot_until_ns > v->now || proxy_pressure(v, pr, profile, 1);
		}
		if (on) {
			__u32 fam = p->family == 6;
			if (v->now - sp->refresh_ns[fam] >= HW_SYN_REFRESH_NS) {
				sp->refresh_ns[fam] = v->now;       /* this one goes to the stack (see the top) */
				syn_stat(HW_SS_REFRESH);
				return 0;
			}
			p->syn_proxy = SP_ANSWER;
			return 0;
		}
	}
	if (over) {
		syn_stat(HW_SS_PORT_GUARD);
		return HW_R_SYN_FLOOD;
	}
	return 0;
}

static __always_inline struct hw_dos_profile *dos_profile(struct env *v, __u32 ifindex, __u32 *id)
{
	__u32 base = v->gen * HW_DOS_IF_SLOTS;
#pragma unroll
	for (int i = 0; i < HW_DOS_IF_PROBES; i++) {
		__u32 k = base + ((ifindex + i) & (HW_DOS_IF_SLOTS - 1));
		struct hw_dos_if *f = hw_dos_ifs.lookup(&k);
		if (!f || f->ifindex == 0)
			return 0;
		if (f->ifindex == ifindex) {
			*id = f->profile & (HW_DOS_PROFILES_MAX - 1);
			__u32 pk = v->gen * HW_DOS_PROFILES_MAX + *id;
			struct hw_dos_profile *pr = hw_dos_profiles.lookup(&pk);
			return pr && pr->enabled ? pr : 0;
		}
	}
	return 0;
}

static __always_inline int manual_banned(struct env *v, struct pkt *p)
{
	struct hw_manual_ban *b;
	if (p->family == 4) {
		struct hw_ban4_key k = {.prefixlen = 32, .addr = p->saddr[0]};
		b = hw_manual_ban4.lookup(&k);
	} else {
		struct hw_ban6_key k = {.prefixlen = 128};
		__builtin_memcpy(k.addr, p->saddr, 16);
		b = hw_manual_ban6.lookup(&k);
	}
	return b && (b->until_ns == 0 || b->until_ns > v->now);
}

static __always_inline void dos_ban(struct env *v, struct hw_dos_key *k, struct hw_dos_src *s,
				    struct hw_dos_profile *pr, __u32 reason)
{
	s->banned_until_ns = v->now + pr->ban_ns;
	struct hw_dos_ban b = {.since_ns = v->now, .until_ns = s->banned_until_ns, .reason = reason};
	hw_dos_banned.update(k, &b);    /* for listing; if full, the ban still holds through *s */
}

static __always_inline __u32 dos_base(struct hw_dos_key *k, __u64 seed)
{
	return tbl_first_slot(k, DOS_WORDS, seed, HW_DOS_SRC_MAX, HW_DOS_WAYS);
}

static __always_inline void dos_src_stat(__u32 what)
{
	counter_add(hw_dos_src_stats.lookup(&what), 0);
}

/* Rank of a slot for a new source: free (3), a live unbanned one (2), a live banned one (1); the least
 * recently seen first among live ones; 0: BUSY. */
static __always_inline __u32 dos_rank(struct hw_dos_slot *sl, __u64 now)
{
	__u64 st = sl->slot_state;
	if (st == HW_SLOT_FREE)
		return 3;
	if (st != HW_SLOT_LIVE)
		return 0;
	return sl->s.banned_until_ns > now ? 1 : 2;
}

/* Start tracking source k in a slot of its bucket (full buckets evict, counted); 0: lost the slot to
 * another CPU (counted; no per-source limit for this packet: fail open). */
static __always_inline struct hw_dos_src *dos_take(struct env *v, struct hw_dos_key *k, __u32 base,
						   struct hw_dos_profile *pr)
{
	__u32 pick_idx = HW_DOS_SRC_MAX, rank = 0;
	__u64 oldest = ~0ULL;
#pragma unroll
	for (int i = 0; i < HW_DOS_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_dos_slot *sl = hw_dos_src.lookup(&idx);
		if (!sl)
			continue;
		__u32 r = dos_rank(sl, v->now);
		if (r > rank || (r == rank && r && r < 3 && sl->s.last_ns < oldest)) {
			pick_idx = idx;
			rank = r;
			oldest = sl->s.last_ns;
		}
	}
	struct hw_dos_slot *sl = hw_dos_src.lookup(&pick_idx);
	__u64 seen = rank == 3 ? HW_SLOT_FREE : HW_SLOT_LIVE;
	if (!sl || !rank || __sync_val_compare_and_swap(&sl->slot_state, seen, HW_SLOT_BUSY) != seen) {
		dos_src_stat(HW_DSS_CLAIM_LOST);
		return 0;
	}
	dos_src_stat(HW_DSS_INSERTED);
	if (rank != 3)
		dos_src_stat(HW_DSS_EVICTED);
	sl->k = *k;
	struct hw_dos_src n = {.last_ns = v->now, .tok_pkt = pr->burst * 1000000000ULL,
			       .tok_bits = pr->bps_burst * 1000ULL, .tok_syn = pr->syn_pps * 1000000000ULL,
			       .tok_udp = pr->udp_pps * 1000000000ULL, .tok_icmp = pr->icmp_pps * 1000000000ULL};
	sl->s = n;
	__sync_lock_test_and_set(&sl->slot_state, HW_SLOT_LIVE);
	return &sl->s;
}

/* The source's ban, then its buckets: the first that is empty names the reason; 0: admitted. */
static __always_inline __u32 dos_buckets(struct env *v, struct pkt *p, struct hw_dos_profile *pr, struct hw_dos_src *s)
{
	if (hw_unlikely(s->banned_until_ns)) {
		if (s->banned_until_ns > v->now)
			return HW_R_BANNED;
		s->banned_until_ns = 0;         /* expired by itself */
		s->streak_start_ns = 0;
	}
	__u64 dt = elapsed_ns(v->now, s->last_ns, 2000000000ULL);
	s->last_ns = v->now;
	if (p->proto == IPPROTO_TCP && p->opens && pr->syn_pps &&
	    hw_unlikely(!bucket_take(&s->tok_syn, pr->syn_pps, pr->syn_pps * 1000000000ULL, dt, 1000000000ULL)))
		return HW_R_SYN_FLOOD;
	if (p->proto == IPPROTO_UDP && pr->udp_pps &&
	    hw_unlikely(!bucket_take(&s->tok_udp, pr->udp_pps, pr->udp_pps * 1000000000ULL, dt, 1000000000ULL)))
		return HW_R_UDP_FLOOD;
	if ((p->pidx == HW_P_ICMP || p->pidx == HW_P_ICMPV6) && pr->icmp_pps &&
	    hw_unlikely(!bucket_take(&s->tok_icmp, pr->icmp_pps, pr->icmp_pps * 1000000000ULL, dt, 1000000000ULL)))
		return HW_R_ICMP_FLOOD;
	if (pr->pps && hw_unlikely(!bucket_take(&s->tok_pkt, pr->pps, pr->burst * 1000000000ULL, dt, 1000000000ULL)))
		return HW_R_RATE_LIMIT;
	if (pr->bps && hw_unlikely(!bits_take(&s->tok_bits, pr->bps_fp, pr->bps_burst * 1000ULL, dt, (__u64)p->len * 8000ULL)))
		return HW_R_RATE_LIMIT;
	return 0;
}

static __always_inline int global_take(__u32 idx, __u64 rate, __u64 now)
{
	struct hw_bucket *b = hw_dos_global.lookup(&idx);
	if (!b)
		return 1;
	__u64 dt = elapsed_ns(now, b->last_ns, 1000000000ULL);
	b->last_ns = now;
	return bucket_take(&b->tokens, rate, rate * 1000000000ULL, dt, 1000000000ULL);
}

/* Is p an ICMP error the source guards may spare for the connection it quotes (docs/dos.md "Tracked
 * connections")? Destination unreachable, packet too big, time exceeded, parameter problem (v4 3, 11,
 * 12; v6 1-4; not source quench or redirect), quoting a packet the host sent (icmp_inner_ours) to one
 * peer: not to multicast or limited broadcast, whose flows have public tuples and no one peer; of a
 * quoted ICMP message only an echo request (the host's ping: its id alone would match a reply or a
 * timestamp). A few compares, on the guards' drop path only. */
static __always_inline int dos_error_spares(struct pkt *p)
{
	if (!p->related || !icmp_inner_ours(p))
		return 0;
	__u32 d0 = bpf_ntohl(p->in_daddr[0]);
	if (p->family == 4 ? p->icmp_type == 4 || p->icmp_type == 5 || (d0 >> 28) == 0xe || d0 == 0xffffffff
			   : (d0 >> 24) == 0xff)
		return 0;
	if (p->in_proto == IPPROTO_ICMP || p->in_proto == IPPROTO_ICMPV6)
		return p->in_icmp_type == (p->family == 4 ? 8 : 128);
	return 1;
}

/* The rate of a profile's one bucket for spared ICMP errors, all sources together: one source's ICMP
 * share (icmp_pps, else pps), so a spoofed flood of errors quoting a public tuple (NTP 123 <-> 123)
 * gets no more than one source would; path-MTU and unreachable errors are few (docs/dos.md). */
_Static_assert(HW_DOS_PORTS_MAX < HW_DOS_GLOBAL_ERR, "a profile's port buckets must not reach its error bucket");

static __always_inline __u64 dos_err_pps(struct hw_dos_profile *pr)
{
	return pr->icmp_pps ? pr->icmp_pps : pr->pps ? pr->pps : HW_DOS_ERR_PPS;
}

/* Does p belong to a tracked connection that the source guards spare (docs/dos.md "Tracked
 * connections")? Only one the host opened, not closed, and not an ICMP echo request (echo entries are
 * keyed by id alone: a request "from" the peer would match the host's own ping and be reflected). An
 * inbound connection is never spared: its sender chose the tuple (UDP, ICMP) or can complete its
 * handshake blind (conntrack checks no sequence numbers), and a real client must stay bounded by its
 * limits on its own connections. An ICMP error is judged by the packet it quotes (dos_error_spares
 * says which errors may be; dos_source caps them): path-MTU errors from a banned router keep the host's
 * connections alive.
 * One conntrack lookup, paid on the drop path only; whether p continues the connection validly is
 * judged where conntrack passes it (ct_advance, or as related: judge_first). */
static __always_inline int dos_spares(struct env *v, struct pkt *p)
{
	struct ctref r = {};
	int echo_request = (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) && p->opens;
	int error = dos_error_spares(p);
	if (!(p->trackable || error) || echo_request)
		return 0;
	/* one lookup site for both (inlined once): the error's quoted tuple, or p's own */
	__u32 *s = error ? p->in_saddr : p->saddr, *d = error ? p->in_daddr : p->daddr;
	if (!ct_find(v, p, s, d, error ? p->in_sport : p->sport, error ? p->in_dport : p->dport,
		     error ? p->in_proto : p->proto, &r))
		return 0;
	return r.e->origin == HW_DIR_EGRESS && r.e->state != HW_CT_CLOSED;
}

/* The 32-bit network mask of the first `bits` bits of a word (any int: <= 0 none, >= 32 all): the low
 * word of a 64-bit shift, so only the clamp branches (one for an IPv4 length, never negative). */
static __always_inline __u32 dos_mask32(int bits)
{
	return (__u32)(0xffffffff00000000ULL >> (bits <= 0 ? 0 : bits >= 32 ? 32 : bits));
}

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "dos_key writes struct hw_dos_key as little-endian 64-bit words"
#endif

/* The source key of p: its address masked to `len` bits, family, prefix length, profile. Written as
 * the three 64-bit words the hash and the compares read: a key stored field by field and read back as
 * words makes each load wait for the stores it spans (not forwarded), ~12 ns per packet here
 * (docs/benchmarks.md "The DoS stage's cost"). */
static __always_inline void dos_key(struct hw_dos_key *k, struct pkt *p, __u32 len, __u32 profile)
{
	__u64 *w = (__u64 *)k;
	_Static_assert(sizeof(*k) == 24 && __builtin_offsetof(struct hw_dos_key, family) == 16,
		       "struct hw_dos_key: three words, family first in the third");
	if (p->family == 4) {
		w[0] = p->saddr[0] & bpf_htonl(dos_mask32(len));
		w[1] = 0;
	} else {
		w[0] = (p->saddr[0] & bpf_htonl(dos_mask32(len))) |
		       (__u64)(p->saddr[1] & bpf_htonl(dos_mask32((int)len - 32))) << 32;
		w[1] = (p->saddr[2] & bpf_htonl(dos_mask32((int)len - 64))) |
		       (__u64)(p->saddr[3] & bpf_htonl(dos_mask32((int)len - 96))) << 32;
	}
	w[2] = p->family | (__u64)(__u8)len << 8 | (__u64)(__u8)profile << 16;     /* pads 0 */
}

/* Per-source limits; returns a drop reason or 0. A packet its tracked connection spares (dos_spares)
 * is admitted, marked p->dos_spared; it took the tokens there were and extends no over-limit streak.
 * Keeps the streak of the others and bans. Finding the source costs at most HW_DOS_WAYS inlined array
 * probes (no helper call), leaving at the hit: a source sits in the first way of its bucket unless
 * others came first. */
static __always_inline __u32 dos_source(struct env *v, struct pkt *p, struct hw_dos_profile *pr, __u32 profile)
{
	struct hw_dos_key k __attribute__((aligned(8)));
	dos_key(&k, p, p->family == 4 ? pr->prefix_v4 : pr->prefix_v6, profile);
	__u32 base = dos_base(&k, v->cfg->table_seed);
	struct hw_dos_src *s = 0;
#pragma unroll
	for (int i = 0; i < HW_DOS_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_dos_slot *sl = hw_dos_src.lookup(&idx);
		if (sl && !(tbl_key_diff(&sl->k, &k, DOS_WORDS) | (sl->slot_state ^ HW_SLOT_LIVE))) {
			s = &sl->s;
			break;
		}
	}
	if (hw_unlikely(!s))
		s = dos_take(v, &k, base, pr);
	if (hw_unlikely(!s))
		return 0;
	__u32 reason = dos_buckets(v, p, pr, s);
	if (hw_likely(!reason))
		return 0;
	/* an error (p->related: never trackable) is spared only within its profile's shared bucket */
	if (dos_spares(v, p) &&
	    (!p->related || global_take(profile * 16 + HW_DOS_GLOBAL_ERR, dos_err_pps(pr), v->now))) {
		p->dos_spared = reason;
		return 0;
	}
	if (reason == HW_R_BANNED)
		return reason;
	if (!s->streak_start_ns || v->now - s->streak_last_ns > HW_DOS_STREAK_GAP_NS)
		s->streak_start_ns = v->now;
	s->streak_last_ns = v->now;
	if (pr->ban_after_ns && v->now - s->streak_start_ns >= pr->ban_after_ns)
		dos_ban(v, &k, s, pr, reason);
	return reason;
}

/* A per-port limit's port and protocol as one word, port | proto << 16 (one load, one compare). */
static __always_inline __u32 dos_port_word(struct hw_dos_port *d)
{
	_Static_assert(__builtin_offsetof(struct hw_dos_port, port) == 0 &&
		       __builtin_offsetof(struct hw_dos_port, proto) == 2, "struct hw_dos_port: port, then proto");
	return *(__u32 *)d & 0xffffff;
}

static __always_inline __u32 dos_limits(struct env *v, struct pkt *p, struct hw_dos_profile *pr, __u32 profile)
{
	__u32 reason = dos_source(v, p, pr, profile);
	if (hw_unlikely(reason))
		return reason;
	if (p->proto == IPPROTO_TCP && !p->frag && (reason = syn_port_stage(v, p, pr, profile)))
		return reason;
	if (p->proto == IPPROTO_TCP && p->opens && pr->syn_global_pps && p->syn_proxy != SP_ANSWER &&
	    !global_take(profile * 16, pr->syn_global_pps, v->now))
		return HW_R_SYN_FLOOD;
	if (pr->nports && p->pidx <= HW_P_UDP && !p->frag) {
		/* the first entry straight-line, before the loop (most profiles limit one port or few) */
		__u32 want = bpf_ntohs(p->dport) | (__u32)p->proto << 16;
		if (dos_port_word(&pr->ports[0]) == want)
			return global_take(profile * 16 + 1, pr->ports[0].pps, v->now) ? 0 : HW_R_PORT_LIMIT;
#pragma unroll
		for (int i = 1; i < HW_DOS_PORTS_MAX; i++) {
			if (i >= pr->nports)
				break;
			if (dos_port_word(&pr->ports[i]) == want)
				return global_take(profile * 16 + 1 + i, pr->ports[i].pps, v->now) ? 0 : HW_R_PORT_LIMIT;
		}
	}
	return 0;
}

static __always_inline void dos_count(__u32 profile, __u32 reason)
{
	__u32 k = (profile & (HW_DOS_PROFILES_MAX - 1)) * HW_REASONS + reason;
	struct hw_counter *c = hw_dos_stats.lookup(&k);
	if (c)
		c->packets++;
}

/* The reason conntrack passed p for: pass_conntrack_over_limit if only its connection got it through
 * the source guards (dos_source). TC never sets p->dos_spared: the test is pruned there. */
static __always_inline __u32 ct_pass_reason(struct env *v, struct pkt *p)
{
	return v->hook == HW_HOOK_XDP_INGRESS && p->dos_spared ? HW_R_PASS_CONNTRACK_OVER_LIMIT : HW_R_PASS_CONNTRACK;
}

/* The same for an ICMP error about a tracked connection: pass_related_over_limit if only the connection
 * it quotes got it through the source guards. */
static __always_inline __u32 related_pass_reason(struct env *v, struct pkt *p)
{
	return v->hook == HW_HOOK_XDP_INGRESS && p->dos_spared ? HW_R_PASS_RELATED_OVER_LIMIT : HW_R_PASS_RELATED;
}

/* xdp_judge: a packet admitted only as part of its tracked connection does not continue it (ct_advance
 * refused it): dropped for the limit it was over (would_drop in audit mode), counted per profile. */
static __always_inline void dos_unspared(struct env *v, struct pkt *p, struct judgement *j, __u8 audit)
{
	__u32 profile = 0;
	if (dos_profile(v, p->ifindex, &profile))
		dos_count(profile, p->dos_spared);
	j->verdict = audit ? HW_V_WOULD_DROP : HW_V_DROP;
	j->reason = p->dos_spared;
}

/* All DoS checks for one ingress packet; returns a drop reason or 0 (admitted). Operator bans apply
 * on every interface; the limits apply where the interface has a profile (counted per profile). */
static __always_inline __u32 dos_check(struct env *v, struct pkt *p)
{
	if (v->cfg->manual_bans && manual_banned(v, p))
		return HW_R_BANNED;
	__u32 profile = 0;
	struct hw_dos_profile *pr = dos_profile(v, p->ifindex, &profile);
	if (!pr)
		return 0;
	__u32 reason = dos_limits(v, p, pr, profile);
	if (hw_unlikely(reason))
		dos_count(profile, reason);
	return reason;
}

#endif /* HW_DOS_H */
