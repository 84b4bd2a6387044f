/* SPDX-License-Identifier: Apache-2.0 */
/* Connection tracking: the per-family tables hw_ct4/hw_ct6 and their counters; lookup,
 * state machine, insert with eviction, and flow start/end events (docs/datapath.md).
 */
#ifndef HW_CONNTRACK_H
#define HW_CONNTRACK_H

/* ---- conntrack maps -------------------------------------------------------------------------- */

BPF_F_TABLE("array", u32, struct hw_ct4_slot, hw_ct4, HW_CT_MAX, MAPF_MMAP);
BPF_F_TABLE("array", u32, struct hw_ct6_slot, hw_ct6, HW_CT_MAX, MAPF_MMAP);
BPF_PERCPU_ARRAY(hw_ct_stats, struct hw_counter, 2 * HW_CT_STATS);    /* [v6 * HW_CT_STATS + stat] */
BPF_ARRAY(hw_ct_pressure, struct hw_ct_pressure, 1);                    /* evictions per second (SYN proxy auto) */

/* ---- connection tracking -------------------------------------------------------------------- */
static __always_inline void ct_stat(__u8 family, __u32 what)
{
	__u32 k = (family == 6) * HW_CT_STATS + what;
	counter_add(hw_ct_stats.lookup(&k), 0);
}

struct ctref {
	struct hw_ct_entry *e;
	__u8 side;              /* which side of the normalised key sent this packet: 0 = a, 1 = b */
};

static __always_inline __u8 ct_key4(struct hw_ct4_key *k, __u32 s, __u32 d, __u16 sp, __u16 dp, __u8 proto)
{
	__u8 side = (s > d) || (s == d && sp > dp);
	k->addr_a = side ? d : s;
	k->addr_b = side ? s : d;
	k->port_a = side ? dp : sp;
	k->port_b = side ? sp : dp;
	k->proto = proto;
	return side;
}

static __always_inline int addr6_cmp(__u32 *x, __u32 *y)
{
#pragma unroll
	for (int i = 0; i < 4; i++) {
		if (x[i] != y[i])
			return bpf_ntohl(x[i]) < bpf_ntohl(y[i]) ? -1 : 1;
	}
	return 0;
}

static __always_inline __u8 ct_key6(struct hw_ct6_key *k, __u32 *s, __u32 *d, __u16 sp, __u16 dp, __u8 proto)
{
	int c = addr6_cmp(s, d);
	__u8 side = c > 0 || (c == 0 && sp > dp);
	__builtin_memcpy(k->addr_a, side ? d : s, 16);
	__builtin_memcpy(k->addr_b, side ? s : d, 16);
	k->port_a = side ? dp : sp;
	k->port_b = side ? sp : dp;
	k->proto = proto;
	return side;
}

/* Unconfirmed: a TCP handshake not complete (SYN_SENT, SYN_RECV), or UDP/ICMP not replied (NEW). A full
 * bucket evicts these before any established connection; they expire after ct_unconfirmed_s. */
static __always_inline int ct_unconfirmed(struct hw_ct_entry *e)
{
	__u8 st = e->state;
	return st == HW_CT_NEW || st == HW_CT_SYN_SENT || st == HW_CT_SYN_RECV;
}

/* The unconfirmed entries' idle timeout of the active policy (ns). One inlined array lookup; callers
 * that rank several slots read it once. */
static __always_inline __u64 ct_unconfirmed_ns(struct env *v)
{
	__u32 gen = v->gen;
	struct hw_policy_hdr *h = hw_policy.lookup(&gen);
	__u64 s = h && h->ct_unconfirmed_s ? h->ct_unconfirmed_s : HW_CT_TO_UNCONFIRMED;
	return s * 1000000000ULL;
}

/* A replied UDP flow in which either side sent twice: a packet after the first exchange (netfilter's
 * assured UDP, read from the counters: a second request, a server's push, a keepalive; a request
 * retried before its reply counts too). A single exchange (a DNS lookup, an NTP
 * poll) is not — a busy host makes thousands a second, each from a new port, and they must neither hold
 * their slots for minutes nor push out established connections (ct_rank). Read on replied entries only
 * (both counters ≥ 1); no store on the packet path. One compare of an OR, the cheapest spelling
 * for the verifier tried (docs/datapath.md "Speed"). */
static __always_inline int ct_udp_assured(struct hw_ct_entry *e)
{
	return (e->packets[0] | e->packets[1]) > 1;     /* either side sent twice (both ≥ 1 once replied) */
}

/* Idle timeout of a confirmed entry (ns). */
static __always_inline __u64 ct_confirmed_timeout_ns(struct hw_ct_entry *e, __u8 proto)
{
	__u64 s;
	if (proto == IPPROTO_TCP) {
		switch (e->state) {
		case HW_CT_ESTABLISHED: s = HW_CT_TO_ESTABLISHED; break;
		case HW_CT_FIN_WAIT:
		case HW_CT_CLOSING:     s = HW_CT_TO_FIN; break;
		default:                s = HW_CT_TO_CLOSE; break;
		}
	} else if (proto == IPPROTO_UDP) {
		s = ct_udp_assured(e) ? HW_CT_TO_UDP_REPLIED : HW_CT_TO_UDP_UNASSURED;
	} else {
		s = HW_CT_TO_ICMP;
	}
	return s * 1000000000ULL;
}

/* Every timeout is at least 1 s (the unconfirmed one by policy validation, the others by these), so an
 * entry idle for at most 1 s is live whatever its state: ct_expired_u's one compare for a busy entry. */
_Static_assert(HW_CT_TO_CLOSE >= 1 && HW_CT_TO_UDP_UNASSURED >= 1 && HW_CT_TO_ICMP >= 1 &&
	       HW_CT_TO_UNCONFIRMED >= 1, "ct_expired_u's busy-entry shortcut assumes timeouts of 1 s or more");

/* Has the entry been idle past its timeout? `unc_ns`: ct_unconfirmed_ns, or 0 to look it up only if
 * the entry is unconfirmed (the fast path of an established connection never reads it). An entry idle
 * for at most 1 s returns after one compare, before its state and protocol are read (docs/datapath.md
 * "Speed"). */
static __always_inline int ct_expired_u(struct env *v, struct hw_ct_entry *e, __u8 proto, __u64 unc_ns)
{
	__s64 idle = (__s64)(v->now - e->last_ns);
	__u64 to;
	if (idle <= 1000000000LL)
		return 0;
	if (ct_unconfirmed(e)) {
		to = unc_ns ? unc_ns : ct_unconfirmed_ns(v);
	} else {
		to = ct_confirmed_timeout_ns(e, proto);
	}
	return idle > (__s64)to;
}

static __always_inline int ct_expired(struct env *v, struct hw_ct_entry *e, __u8 proto)
{
	return ct_expired_u(v, e, proto, 0);
}

/* The set-associative tables (conntrack, DoS sources): a key is hashed and compared as its 64-bit
 * words, so keys are 8-aligned with zeroed pad bytes. First slot of its bucket: a seeded
 * multiply-xorshift over the words (enforcer/slot_table.py computes the same); the seed is random per
 * instance. */

#define CT4_WORDS (sizeof(struct hw_ct4_key) / 8)
#define CT6_WORDS (sizeof(struct hw_ct6_key) / 8)


static __always_inline __u32 ct_base4(struct hw_ct4_key *k, __u64 seed)
{
	return tbl_first_slot(k, CT4_WORDS, seed, HW_CT_MAX, HW_CT_WAYS);
}

static __always_inline __u32 ct_base6(struct hw_ct6_key *k, __u64 seed)
{
	return tbl_first_slot(k, CT6_WORDS, seed, HW_CT_MAX, HW_CT_WAYS);
}

/* Look up the connection of (s,d,sp,dp,proto); live entries only. HW_CT_WAYS inlined array lookups
 * and one-branch key compares, then one more lookup of the hit. The loop only notes the hit's index
 * (no early exit): compiled code after it is not duplicated per way, so the verifier's paths through
 * it merge (an early `break` multiplied the verified size of the whole judgement by the ways). */
static __always_inline int ct_find(struct env *v, struct pkt *p, __u32 *s, __u32 *d, __u16 sp, __u16 dp,
				   __u8 proto, struct ctref *r)
{
	struct hw_ct_entry *e = 0;
	__u32 hit = HW_CT_MAX;          /* no slot */
	if (p->family == 4) {
		struct hw_ct4_key k __attribute__((aligned(8))) = {};   /* compared as 64-bit words */
		r->side = ct_key4(&k, s[0], d[0], sp, dp, proto);
		__u32 base = ct_base4(&k, v->cfg->table_seed);
#pragma unroll
		for (int i = 0; i < HW_CT_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_ct4_slot *sl = hw_ct4.lookup(&idx);
			asm volatile("" : "+r"(sl));   /* one call site per map: inlined */
			if (sl && !(tbl_key_diff(&sl->k, &k, CT4_WORDS) | (sl->e.slot_state ^ HW_SLOT_LIVE)))
				hit = idx;
		}
		struct hw_ct4_slot *sl = hw_ct4.lookup(&hit);
		asm volatile("" : "+r"(sl));
		if (sl)
			e = &sl->e;
	} else {
		struct hw_ct6_key k __attribute__((aligned(8))) = {};
		r->side = ct_key6(&k, s, d, sp, dp, proto);
		__u32 base = ct_base6(&k, v->cfg->table_seed);
#pragma unroll
		for (int i = 0; i < HW_CT_WAYS; i++) {
			__u32 idx = base + i;
			struct hw_ct6_slot *sl = hw_ct6.lookup(&idx);
			if (sl && !(tbl_key_diff(&sl->k, &k, CT6_WORDS) | (sl->e.slot_state ^ HW_SLOT_LIVE)))
				hit = idx;
		}
		struct hw_ct6_slot *sl = hw_ct6.lookup(&hit);
		if (sl)
			e = &sl->e;
	}
	if (!e || ct_expired(v, e, proto))
		return 0;
	r->e = e;
	return 1;
}

/* A flow_end event's view of its connection: start, totals per direction, rule, state. */
static __always_inline void ev_flow_totals(struct hw_event *ev, struct hw_ct_entry *e)
{
	ev->start_ns = e->created_ns;
	ev->packets[0] = e->packets[0];
	ev->packets[1] = e->packets[1];
	ev->bytes[0] = e->bytes[0];
	ev->bytes[1] = e->bytes[1];
	ev->cgroup_id = e->cgroup_id;
	ev->rule_slot = e->rule_slot;
	ev->revision_id = e->revision_id;
	ev->direction = e->origin;
	ev->ct_state = e->state;
	ev->verdict = HW_V_ALLOW;
	ev->reason = HW_R_PASS_CONNTRACK;
}

/* Has this connection's end been reported already (by the datapath, or by the collector after the
 * close grace period)? */
static __always_inline int ct_reported(struct hw_ct_entry *e)
{
	return (e->fin_seen & HW_CT_F_END_EMITTED) || e->reported;
}

/* A connection reported in aggregate (report != EVENTS) ended: count it, with its totals, under the
 * peer (the initiator of an ingress-opened connection, the responder of an egress-opened one). A
 * PENDING connection (never confirmed, start never reported) counts as started and ended. */
static __always_inline void ct_end_agg(struct env *v, struct hw_ct_entry *e, __u32 *init, __u32 *resp,
				       __u16 resp_port, __u8 proto, __u8 family)
{
	__u32 rep = e->report;
	struct hw_flow_val a = {.flows = rep == HW_REP_PENDING, .ended = 1,
				.packets = e->packets[0] + e->packets[1], .bytes = e->bytes[0] + e->bytes[1]};
	if (rep == HW_REP_PENDING)
		ev_count(HW_EV_FLOW_START, HW_EO_AGGREGATED);
	ev_count(HW_EV_FLOW_END, HW_EO_AGGREGATED);
	flow_agg(v, e->origin == HW_DIR_INGRESS ? init : resp, family, resp_port, proto, e->origin, report_kind(rep), &a);
}

/* A tracked TCP connection was reset (cause HW_END_CLOSED), or its tuple reused by a new one
 * (HW_END_REUSED, ct_reuse): report it once, with its totals (nothing after an RST belongs to it), as an
 * event or in aggregate (hw_ct_entry.report). A connection closed by FINs is not reported here: its last
 * ACK comes after the FINs, so the collector reports it (one record, or in a flow summary) once it has
 * been quiet for the close grace period (docs/collector.md). */
static __always_inline void ct_emit_end(struct env *v, struct pkt *p, struct ctref *r, __u8 from_init, __u8 cause)
{
	struct hw_ct_entry *e = r->e;
	if (ct_reported(e))
		return;
	if (e->report != HW_REP_EVENTS) {
		e->fin_seen |= HW_CT_F_END_EMITTED;
		ct_end_agg(v, e, from_init ? p->saddr : p->daddr, from_init ? p->daddr : p->saddr,
			   from_init ? p->dport : p->sport, p->proto, p->family);
		return;
	}
	struct hw_event *ev = ev_reserve(v, HW_EV_FLOW_END, 0);
	if (!ev)
		return;                 /* the collector's conntrack scan reports it at expiry */
	e->fin_seen |= HW_CT_F_END_EMITTED;
	ev_packet(ev, p);
	ev->ts_ns = e->end_ns;          /* this packet, on the precise clock (ct_advance read it) */
	if (!from_init) {               /* flows are reported from the initiator's side */
		__builtin_memcpy(ev->saddr, p->daddr, 16);
		__builtin_memcpy(ev->daddr, p->saddr, 16);
		ev->sport = p->dport;
		ev->dport = p->sport;
	}
	ev_flow_totals(ev, e);
	ev->end_cause = cause;
	hw_events.ringbuf_submit(ev, 0);
}

/* A PENDING connection was just confirmed: report its start now (from the budget's high class), or
 * count it in aggregate if its source is over its share or there is no room. Race, stated: two CPUs
 * confirming the same connection within the same few nanoseconds (a reply and a retransmission on
 * two CPUs) may both report its start, as two events or an event and an aggregate count. */
static __always_inline void ct_report_confirmed(struct env *v, struct pkt *p, struct hw_ct_entry *e, __u8 from_init)
{
	__u32 *init = from_init ? p->saddr : p->daddr, *resp = from_init ? p->daddr : p->saddr;
	__u16 iport = from_init ? p->sport : p->dport, rport = from_init ? p->dport : p->sport;
	struct hw_event *ev = 0;
	e->report = HW_REP_EVENTS;      /* claimed (the caller saw PENDING) */
	e->report = report_start(v, e->origin == HW_DIR_INGRESS ? init : resp, p->family, rport, p->proto, e->origin,
				 1, &ev);
	if (!ev)
		return;
	ev->ts_ns = e->created_ns;      /* the start is the first packet's time */
	ev->start_ns = e->created_ns;
	__builtin_memcpy(ev->saddr, init, 16);
	__builtin_memcpy(ev->daddr, resp, 16);
	ev->sport = iport;
	ev->dport = rport;
	ev->family = p->family;
	ev->proto = p->proto;
	ev->ifindex = p->ifindex;
	ev->tcp_flags = p->tcp_flags;
	ev->packets[0] = 1;
	ev->rule_slot = e->rule_slot;
	ev->revision_id = e->revision_id;
	ev->direction = e->origin;
	ev->ct_state = e->state;
	ev->cgroup_id = e->cgroup_id;
	ev->verdict = HW_V_ALLOW;
	ev->reason = e->rule_slot == ~0U ? HW_R_PASS_DEFAULT : HW_R_PASS_RULE;
	hw_events.ringbuf_submit(ev, 0);
}

/* Sequence checks (docs/datapath.md "Sequence checks", docs/policy.md "stateful"). Side `d` (0
 * initiator, 1 responder) sent p, a packet that came in (ct_advance asks for the peer's packets only:
 * the host vouches for its own). Is the peer's acknowledgement acceptable (RFC 5961 §5)? Within [its last acceptable one (or the
 * host's end when none) - HW_CT_ACK_WINDOW, the host's end]: an ACK of data the host never sent, or
 * older than that, is a blind guess. The host's side not learnt yet: accepted, as before. */
static __always_inline int ct_ack_ok(struct hw_ct_entry *e, struct pkt *p, __u8 d)
{
	__u8 known = e->seq_known, h = !d;
	if (!(known & (HW_CT_SEQ_END << h)))
		return 1;
	if (!(p->tcp_flags & TCPF_ACK))
		return 0;
	__u32 end = e->seq_end[h & 1];
	__u32 lo = ((known & (HW_CT_SEQ_ACK << d)) ? e->seq_ack[d & 1] : end) - HW_CT_ACK_WINDOW;
	return p->tcp_ack - lo <= end - lo;
}

/* May this RST, FIN or SYN-ACK change the entry? A RST must carry exactly the sequence number the
 * receiver last acknowledged (its RCV.NXT, RFC 5961 §3.2) or the sender's own next one (a RST right
 * after its data, before the ACK); the responder's while the initiator has acknowledged nothing (syn_sent, a
 * simultaneous open before the initiator's SYN-ACK, a reused tuple) must acknowledge the SYN (RFC 9293
 * §3.10.7.3). A SYN-ACK must acknowledge the other side's SYN exactly: its end, or its ISN+1 (a TCP
 * Fast Open SYN whose data the receiver refused, RFC 7413 §4.2.2; kept in seq_ack until that side
 * acknowledges something: ct_seq_learn). A FIN must lie within
 * HW_CT_SEQ_SLACK of the sender's highest end. From the peer, a RST or FIN carrying an ACK (a FIN
 * always does) must also have an acceptable one (ct_ack_ok; `peer`: p came in, the host vouches for
 * its own): a blind attacker guesses both sequence spaces. Sides not learnt yet (an entry carried over from a build without them) accept, as before.
 * Cost: a few loads and compares, on RST/FIN/SYN-ACK only. */
static __always_inline int ct_seq_ok(struct hw_ct_entry *e, struct pkt *p, __u8 d, __u8 peer)
{
	__u8 known = e->seq_known, f = p->tcp_flags, r = !d;
	__u32 end = e->seq_end[d & 1];
	if (f & TCPF_RST) {
		if (peer && (f & TCPF_ACK) && !ct_ack_ok(e, p, d))
			return 0;
		/* the initiator's SYN is learnt, and it acknowledged nothing yet */
		if (d && (known & (HW_CT_SEQ_END | HW_CT_SEQ_ACK)) == HW_CT_SEQ_END)
			return (f & TCPF_ACK) && p->tcp_ack == e->seq_end[0];
		int ok = 0, any = 0;
		if (known & (HW_CT_SEQ_ACK << r)) {
			any = 1;
			ok = p->tcp_seq == e->seq_ack[r & 1];
		}
		if (known & (HW_CT_SEQ_END << d)) {
			any = 1;
			ok |= p->tcp_seq == end;
		}
		return ok || !any;
	}
	if ((f & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK))   /* seq_ack[r] unknown: r's ISN+1 */
		return !(known & (HW_CT_SEQ_END << r)) || p->tcp_ack == e->seq_end[r & 1] ||
		       (!(known & (HW_CT_SEQ_ACK << r)) && p->tcp_ack == e->seq_ack[r & 1]);
	if (peer && !ct_ack_ok(e, p, d))
		return 0;
	return !(known & (HW_CT_SEQ_END << d)) || p->tcp_seq - end + HW_CT_SEQ_SLACK <= 2 * HW_CT_SEQ_SLACK;
}

/* Is p, a SYN or SYN-ACK of side d, a retransmission of the SYN that side sent: its ISN+1 at most
 * HW_CT_SEQ_SLACK below that side's learnt end (TFO data, or the host's data sent in syn_recv, lie above
 * it)? Not when that end is unknown. */
static __always_inline int ct_syn_resent(struct hw_ct_entry *e, struct pkt *p, __u8 d)
{
	return (e->seq_known & (HW_CT_SEQ_END << d)) && e->seq_end[d & 1] - p->tcp_seq - 1 <= HW_CT_SEQ_SLACK;
}

/* Learn side d's sequence state from its segment p (which ct_seq_ok passed): its end advances only for
 * a segment that starts at most HW_CT_SEQ_SLACK past it, its acknowledgement only forward; a peer's
 * segment with an unacceptable ACK (ct_ack_ok) teaches nothing. A SYN (a SYN-ACK: ct_seq_ok checked its
 * ACK) starts its side afresh, a new ISN: from the host always, from the peer while the host has not
 * answered (syn_sent); the initiator's bare SYN (a new connection) also forgets the responder's; a
 * retransmission of the SYN that side sent keeps what it learnt (docs/datapath.md "Sequence checks"). Until
 * side d acknowledges something its seq_ack slot (HW_CT_SEQ_ACK unset, read by nothing else) holds its
 * SYN's ISN+1, or its end. The host's own ACK (TC egress: trusted, its kernel acknowledges only what
 * it received) past the peer's end moves that end up to it: a burst lost before XDP beyond the slack
 * would otherwise freeze it, leaving the peer's FIN and RST out of window. A peer's ACK moves nothing
 * of the host's (ct_ack_ok bounds it by the host's end anyway). Cost:
 * the ACK check only for a peer's segment that would teach something, stores only what changed (the
 * established path stays cheap: a segment with nothing new returns after two compares). */
static __always_inline void ct_seq_learn(struct hw_ct_entry *e, struct pkt *p, __u8 d, __u8 st, __u8 peer)
{
	__u8 known = e->seq_known, k, f = p->tcp_flags, host = !peer;
	__u32 end = e->seq_end[d & 1];
	int resent = ct_syn_resent(e, p, d);    /* no new ISN: nothing starts afresh */
	if ((f & TCPF_SYN) && !resent && (!peer || (f & TCPF_ACK) || st == HW_CT_SYN_SENT)) {
		known = d || (f & TCPF_ACK) ? known & ~((HW_CT_SEQ_END | HW_CT_SEQ_ACK) << d) : 0;
		peer = 0;               /* afresh: its ACK, if any, was checked exactly (ct_seq_ok) */
	}
	int new_end = !(known & (HW_CT_SEQ_END << d)) ||
		      ((__s32)(p->tcp_seq - end) <= HW_CT_SEQ_SLACK && (__s32)(p->tcp_end - end) > 0);
	int new_ack = (f & TCPF_ACK) &&
		      (!(known & (HW_CT_SEQ_ACK << d)) || (__s32)(p->tcp_ack - e->seq_ack[d & 1]) > 0);
	if (!(new_end | new_ack) || (peer && !ct_ack_ok(e, p, d)))
		return;
	k = known;
	if (new_end) {
		e->seq_end[d & 1] = p->tcp_end;
		k |= HW_CT_SEQ_END << d;
	}
	if (new_ack) {
		e->seq_ack[d & 1] = p->tcp_ack;
		k |= HW_CT_SEQ_ACK << d;
		/* the host acknowledged past the peer's end (a burst lost before XDP): the end follows */
		__u8 o = !d;
		if (host && (k & (HW_CT_SEQ_END << o)) && (__s32)(p->tcp_ack - e->seq_end[o & 1]) > 0)
			e->seq_end[o & 1] = p->tcp_ack;
	} else if (new_end && !(k & (HW_CT_SEQ_ACK << d))) {
		e->seq_ack[d & 1] = (f & TCPF_SYN) ? p->tcp_seq + 1 : p->tcp_end;     /* ISN+1 (TFO: ct_seq_ok) */
	}
	if (k != e->seq_known)
		e->seq_known = k;
}

/* Is p, the host's SYN-ACK (TC egress: trusted) on an established or half-closed (fin_wait) entry, proof that its tuple carries a
 * new connection (docs/datapath.md "Reused tuples")? It acknowledges a SYN the entry does not know (not
 * the initiator's learnt end: ct_seq_ok refused it) and starts from a new ISN (no retransmission of the
 * host's SYN-ACK, as after a final ACK dropped past XDP). The host's kernel answers a SYN with a SYN-ACK
 * only without a socket for the tuple (a live one sends a challenge ACK, RFC 5961 §4), so the old
 * connection is over; a spoofed SYN cannot make it. Not before established: a handshake in progress may have
 * no socket yet (SYN cookies: `tcp_syncookies=2`, the SYN proxy's setting, or a SYN flood), so a spoofed
 * SYN gets a SYN-ACK there. Both sides must be learnt (an entry carried over without sequence state
 * proves nothing). */
static __always_inline int ct_reused(struct hw_ct_entry *e, struct pkt *p, __u8 st)
{
	__u8 both = HW_CT_SEQ_END | (HW_CT_SEQ_END << 1);
	__u8 f = p->tcp_flags & (TCPF_SYN | TCPF_ACK | TCPF_FIN | TCPF_RST);
	return (st == HW_CT_ESTABLISHED || st == HW_CT_FIN_WAIT) && f == (TCPF_SYN | TCPF_ACK) &&
	       (e->seq_known & both) == both && !ct_syn_resent(e, p, 1);
}

/* The slot's connection is over and p, the host's SYN-ACK, answers a new one on its tuple (ct_reused):
 * report the old flow's end once (HW_END_REUSED, at its last packet: the new SYN was not counted in it),
 * then the slot holds the new connection, claimed like an insert (BUSY while written, counted): syn_recv,
 * counters from this packet, the responder's end its ISN+1, the initiator's its ACK; its start is
 * reported when the initiator's ACK confirms it (PENDING, report.h). Initiator, origin, rule and revision
 * stay: the new SYN passed as a packet of the tracked tuple. 2 (passed, nothing changed) when another
 * CPU holds the slot. */
static __always_inline int ct_reuse(struct env *v, struct pkt *p, struct ctref *r)
{
	struct hw_ct_entry *e = r->e;
	if (__sync_val_compare_and_swap(&e->slot_state, HW_SLOT_LIVE, HW_SLOT_BUSY) != HW_SLOT_LIVE) {
		ct_stat(p->family, HW_CTS_CLAIM_LOST);
		return 2;
	}
	ct_stat(p->family, HW_CTS_INSERTED);
	ct_emit_end(v, p, r, 0, HW_END_REUSED);
	__u64 t = hw_precise(v->cfg);
	e->created_ns = t;
	e->end_ns = t;
	e->last_ns = v->now;
	e->packets[0] = 0;
	e->packets[1] = 1;
	e->bytes[0] = 0;
	e->bytes[1] = p->len;
	e->state = HW_CT_SYN_RECV;
	e->fin_seen = 0;
	e->reported = 0;
	e->report = HW_REP_PENDING;
	e->seq_end[0] = p->tcp_ack;
	e->seq_ack[0] = p->tcp_ack;     /* the initiator's ISN+1 until it acknowledges (ct_seq_learn) */
	e->seq_end[1] = p->tcp_end;
	e->seq_ack[1] = p->tcp_ack;
	e->seq_known = HW_CT_SEQ_END | ((HW_CT_SEQ_END | HW_CT_SEQ_ACK) << 1);
	__sync_lock_test_and_set(&e->slot_state, HW_SLOT_LIVE);        /* publish: the entry is whole */
	return 1;
}

/* Is this packet a valid continuation of the tracked connection? Updates state if so: 1. 0: not a
 * valid continuation (nothing changed). A TCP connection is confirmed by the initiator's ACK after the
 * responder's SYN-ACK (SYN_RECV → ESTABLISHED), UDP and ICMP by the first reply (NEW → ESTABLISHED).
 * `fast` (xdp_ingress): a packet whose continuation must be reported (it confirms a connection whose
 * start is PENDING, or closes one) returns -1 with nothing changed, for xdp_judge to handle: the fast
 * path stays free of the reporting code, which keeps xdp_ingress inside the verifier's budget.
 * 2: a RST, FIN or SYN-ACK the state machine accepts but out of the connection's sequence window
 * (ct_seq_ok), the peer's handshake-completing ACK with an unacceptable ACK (ct_ack_ok), or a FIN
 * before the handshake is answered (syn_sent): passed, for the stack to ignore or answer with a
 * challenge ACK (RFC 5961), and nothing changed — a blind RST neither closes the entry nor a FIN
 * shortens its timeout (counted as pass_conntrack_out_of_window); so is the peer's SYN with a new ISN
 * on a live tuple. The host's SYN-ACK to such a SYN (ct_reused) ends the old flow and renews the slot
 * (1); the host's own new SYN on an established tuple returns 0, to be opened afresh (docs/datapath.md
 * "Reused tuples"). CT_REVERSE_SYN: the peer's bare SYN from the responder's side of a live (established,
 * fin_wait) entry, a new connection in the reverse direction or a blind spoofer's: no continuation, so
 * the policy judges it as untracked (no bypass), but it never takes the slot (judge_first); nothing changed. */
#define CT_REVERSE_SYN 3

static __always_inline int ct_advance(struct env *v, struct pkt *p, struct ctref *r, int fast)
{
	struct hw_ct_entry *e = r->e;
	__u8 from_init = r->side == e->initiator;
	__u8 st = e->state, ns = st, fin = e->fin_seen;
	int confirmed = 0, closing = 0;
	__u8 peer = v->dir == HW_DIR_INGRESS;    /* the host vouches for its own segments only */
	/* the initiator's packets travel the way the first one did, the responder's the other way */
	if ((from_init ? e->origin : !e->origin) != v->dir)
		return 0;
	if (p->proto == IPPROTO_TCP) {
		__u8 f = p->tcp_flags;
		/* a plain segment (no SYN, FIN, RST) of an established connection changes no state and has
		 * nothing to report: straight to the sequence learning and the counters (docs/datapath.md "Speed") */
		if (!(f & (TCPF_SYN | TCPF_FIN | TCPF_RST)) && st == HW_CT_ESTABLISHED)
			goto advance;
		if (f & TCPF_RST) {
			ns = HW_CT_CLOSED;
		} else if ((f & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK)) {
			if (from_init && st != HW_CT_SYN_RECV)
				return 0;   /* the initiator answers a SYN only in a simultaneous open */
			if (st == HW_CT_SYN_SENT)
				ns = HW_CT_SYN_RECV;
		} else if (f & TCPF_SYN) {
			if (!from_init) {
				/* simultaneous open (RFC 9293 §3.5, netfilter's SYN_SENT2): the responder's own SYN
				 * answers the initiator's; both SYNs seen is SYN_RECV (docs/policy.md "stateful").
				 * Later the peer's is a reverse SYN, judged but never opened on a live entry; the
				 * host's own is trusted: judged afresh (docs/datapath.md "Reused tuples") */
				if (st != HW_CT_SYN_SENT && st != HW_CT_SYN_RECV) {
					int live = st == HW_CT_ESTABLISHED || st == HW_CT_FIN_WAIT;
					return peer && live ? CT_REVERSE_SYN : 0;
				}
				ns = HW_CT_SYN_RECV;
			} else if (st == HW_CT_CLOSING || st == HW_CT_CLOSED) {
				return 0;   /* a new connection on a closed tuple (both FINs or a RST) is judged afresh */
			} else if ((st == HW_CT_ESTABLISHED || st == HW_CT_FIN_WAIT || (peer && st == HW_CT_SYN_RECV)) &&
				   !ct_syn_resent(e, p, 0)) {
				/* a new ISN on a live tuple, half-closed ones too (one FIN: the other side still
				 * sends; netfilter ignores a SYN there as well; docs/datapath.md "Reused tuples"): the host's own SYN
				 * proves its old socket gone, a new connection judged afresh (ct_open takes the
				 * slot); the peer's alone proves nothing (a spoofer's, or answered by a challenge
				 * ACK): passed, nothing changed, until the host's SYN-ACK to it (ct_reused) */
				return peer ? 2 : 0;
			}
		} else if (st == HW_CT_CLOSED) {
			return 0;
		} else if (st == HW_CT_SYN_RECV && from_init && (f & TCPF_ACK)) {
			/* the peer's ACK confirms only if it acknowledges the host's SYN-ACK: a blind one
			 * would make a spoofed handshake an established entry (days of timeout, a flow start) */
			if (peer && !ct_ack_ok(e, p, 0))
				return 2;
			ns = HW_CT_ESTABLISHED;
			confirmed = 1;
		}
		if (f & TCPF_FIN) {
			/* no FIN before the handshake is answered (real TCP sends none; netfilter: invalid) —
			 * unless this very packet answers it (the responder's SYN or SYN-ACK; a RST is a RST):
			 * a spoofed SYN + FIN must not make a fin_wait entry, which ranks with established ones */
			if (st == HW_CT_SYN_SENT && ns != HW_CT_SYN_RECV && !(f & TCPF_RST))
				return 2;
			fin |= from_init ? 1 : 2;
			ns = (fin & 3) == 3 ? HW_CT_CLOSING : HW_CT_FIN_WAIT;
		}
		/* valid by the state machine; out of its sequence window it changes nothing (2), unless it is
		 * the host's SYN-ACK to a new connection on the tuple */
		if (((f & (TCPF_RST | TCPF_FIN)) || (f & (TCPF_SYN | TCPF_ACK)) == (TCPF_SYN | TCPF_ACK)) &&
		    !ct_seq_ok(e, p, !from_init, peer))
			return !peer && !from_init && !fast && ct_reused(e, p, st) ? ct_reuse(v, p, r) : 2;
	} else if (!from_init && st == HW_CT_NEW) {
		ns = HW_CT_ESTABLISHED;
		confirmed = 1;
	}
	/* a reset to report (a FIN close is the collector's, after the close grace period) */
	closing = ns == HW_CT_CLOSED && !(fin & HW_CT_F_END_EMITTED) && !e->reported;
	confirmed = confirmed && e->report == HW_REP_PENDING;
	if (fast && (confirmed || closing))
		return -1;
advance:
	if (p->proto == IPPROTO_TCP)
		ct_seq_learn(e, p, !from_init, st, peer);
	if (ns != st)
		e->state = ns;
	if (fin != e->fin_seen)
		e->fin_seen = fin;
	/* The flow's end on the precise clock, read where it is cheap: every packet from the first FIN or
	 * RST on (one of them is the last), and the first packet of each tick otherwise (at most one read
	 * per connection per tick, whatever its rate: the established path stays free of the helper call).
	 * States are compared by value, not order (SYN_RECV comes after CLOSED). */
	if ((__u8)(ns - HW_CT_FIN_WAIT) <= HW_CT_CLOSED - HW_CT_FIN_WAIT || e->last_ns != v->now)
		e->end_ns = hw_precise(v->cfg);
	e->last_ns = v->now;
	__sync_fetch_and_add(&e->packets[!from_init], 1);
	__sync_fetch_and_add(&e->bytes[!from_init], p->len);
	if (fast)
		return 1;
	if (confirmed)
		ct_report_confirmed(v, p, e, from_init);
	if (closing)
		ct_emit_end(v, p, r, from_init, HW_END_CLOSED);
	return 1;
}

/* Count an eviction in the current second (the SYN proxy's `auto` reads the previous second's count:
 * syncookie.h). Approximate under concurrent window turns; exact enough for a threshold. */
static __always_inline void ct_pressure_note(struct env *v)
{
	__u32 zero = 0;
	struct hw_ct_pressure *cp = hw_ct_pressure.lookup(&zero);
	if (!cp)
		return;
	__u64 w = cp->window_ns;
	if (v->now - w >= HW_PRESSURE_WINDOW_NS) {
		cp->prev = v->now - w < 2 * HW_PRESSURE_WINDOW_NS ? cp->count : 0;
		cp->count = 0;
		cp->window_ns = v->now;
	}
	__sync_fetch_and_add(&cp->count, 1);
}

/* Report a connection the datapath displaces from its slot (idle past its timeout, replaced, or
 * evicted from a full bucket) with its totals, once: as the collector's idle scan would have. `a`, `b`,
 * `pa`, `pb`: the slot's key (side a, side b). */
static __always_inline void ct_retire(struct env *v, struct hw_ct_entry *e, __u32 *a, __u32 *b, __u16 pa,
				      __u16 pb, __u8 proto, __u8 family, __u8 cause)
{
	if (ct_reported(e))
		return;
	if (e->report != HW_REP_EVENTS) {
		__u32 w[4] = {}, x[4] = {};
		if (family == 4) {      /* the v4 key holds one word per address */
			w[0] = e->initiator ? b[0] : a[0];
			x[0] = e->initiator ? a[0] : b[0];
		} else {
			__builtin_memcpy(w, e->initiator ? b : a, 16);
			__builtin_memcpy(x, e->initiator ? a : b, 16);
		}
		ct_end_agg(v, e, w, x, e->initiator ? pa : pb, proto, family);
		return;
	}
	struct hw_event *ev = ev_reserve(v, HW_EV_FLOW_END, 0);
	if (!ev)
		return;                 /* counted by ev_reserve */
	if (family == 4) {              /* the v4 key holds one word per address (ev_reserve zeroed the rest) */
		ev->saddr[0] = e->initiator ? b[0] : a[0];
		ev->daddr[0] = e->initiator ? a[0] : b[0];
	} else {
		__builtin_memcpy(ev->saddr, e->initiator ? b : a, 16);
		__builtin_memcpy(ev->daddr, e->initiator ? a : b, 16);
	}
	ev->sport = e->initiator ? pb : pa;
	ev->dport = e->initiator ? pa : pb;
	ev->family = family;
	ev->proto = proto;
	ev->ts_ns = e->end_ns;          /* it ended with its last packet (precise clock) */
	ev_flow_totals(ev, e);
	ev->end_cause = cause;
	hw_events.ringbuf_submit(ev, 0);
}

/* Rank of a slot for a new connection, best first: its own old slot (8), a free one (7), an expired
 * one (6), a closed one (5: both FINs or a RST seen, its end already reported), a live unconfirmed one
 * (4), a replied UDP flow of a single exchange (3: ct_udp_assured), a live established one (2); among
 * slots of a rank from 5 down the least recently used is taken. So a full bucket never evicts an
 * established connection while it holds an unconfirmed one or a single-exchange UDP flow
 * (docs/datapath.md). 0: BUSY, another CPU is writing it. `diff`: tbl_key_diff of the slot's key and
 * the new one; `unc_ns`: ct_unconfirmed_ns. */
#define CT_RANK_OWN 8
#define CT_RANK_FREE 7
#define CT_RANK_EXPIRED 6
#define CT_RANK_CLOSED 5
#define CT_RANK_UNCONFIRMED 4
#define CT_RANK_UNASSURED 3
#define CT_RANK_ESTABLISHED 2

static __always_inline __u32 ct_rank(struct env *v, struct hw_ct_entry *e, __u64 diff, __u8 proto, __u64 unc_ns)
{
	__u64 st = e->slot_state;
	if (st == HW_SLOT_FREE)
		return CT_RANK_FREE;
	if (st != HW_SLOT_LIVE)
		return 0;
	if (!diff)
		return CT_RANK_OWN;
	if (ct_expired_u(v, e, proto, unc_ns))
		return CT_RANK_EXPIRED;
	if (e->state == HW_CT_CLOSING || e->state == HW_CT_CLOSED)
		return CT_RANK_CLOSED;
	if (ct_unconfirmed(e))
		return CT_RANK_UNCONFIRMED;
	return proto == IPPROTO_UDP && !ct_udp_assured(e) ? CT_RANK_UNASSURED : CT_RANK_ESTABLISHED;
}

/* Does a slot of rank r, last used at `last`, beat the pick so far (rank, oldest)? */
static __always_inline int ct_better(__u32 r, __u64 last, __u32 rank, __u64 oldest)
{
	return r > rank || (r == rank && r <= CT_RANK_CLOSED && r && last < oldest);
}

/* Claim the picked slot (FREE/LIVE → BUSY) and count the insert. 0: none to pick, or another CPU
 * took it first (counted; this connection is then not tracked). */
static __always_inline int ct_claim(struct env *v, __u32 rank, struct hw_ct_entry *e, __u8 proto, __u8 family,
				    __u64 unc_ns)
{
	__u64 seen = rank == CT_RANK_FREE ? HW_SLOT_FREE : HW_SLOT_LIVE;
	if (!rank || __sync_val_compare_and_swap(&e->slot_state, seen, HW_SLOT_BUSY) != seen) {
		ct_stat(family, HW_CTS_CLAIM_LOST);
		return 0;
	}
	ct_stat(family, HW_CTS_INSERTED);
	if (rank == CT_RANK_UNCONFIRMED || rank == CT_RANK_UNASSURED || rank == CT_RANK_ESTABLISHED) {
		ct_stat(family, rank == CT_RANK_UNCONFIRMED ? HW_CTS_EVICTED_UNCONFIRMED : HW_CTS_EVICTED_ESTABLISHED);
		ct_pressure_note(v);
	} else if (rank == CT_RANK_EXPIRED || rank == CT_RANK_CLOSED ||
		   (rank == CT_RANK_OWN && ct_expired_u(v, e, proto, unc_ns))) {
		ct_stat(family, HW_CTS_REUSED_IDLE);
	}
	return 1;
}

_Static_assert(HW_END_CLOSED == 0, "ct_cause's branch-free reused-or-closed assumes CLOSED is 0");

/* Why a displaced connection ended (hw_event.end_cause). Its own established slot taken on egress:
 * the host's new SYN on the tuple, which ct_advance judged afresh (docs/datapath.md "Reused tuples");
 * written without branches and for egress only, the cheapest form for the verifier tried. */
static __always_inline __u8 ct_cause(struct env *v, __u32 rank, struct hw_ct_entry *e, __u8 proto, __u64 unc_ns)
{
	if (rank == CT_RANK_UNCONFIRMED)
		return HW_END_EVICTED_UNCONFIRMED;
	if (rank == CT_RANK_ESTABLISHED || rank == CT_RANK_UNASSURED)      /* confirmed: replied */
		return HW_END_EVICTED_ESTABLISHED;
	if (rank == CT_RANK_EXPIRED || ct_expired_u(v, e, proto, unc_ns))
		return HW_END_IDLE;
	if (v->dir != HW_DIR_EGRESS)
		return HW_END_CLOSED;
	return ((rank == CT_RANK_OWN) & (e->state == HW_CT_ESTABLISHED)) * HW_END_REUSED;
}

/* Take a slot of k's bucket for a new connection: the best ranked (ct_rank), reporting the connection
 * it held. Returns the slot's entry, BUSY, with k written; 0 if none could be claimed. */
static __always_inline struct hw_ct_entry *ct_take4(struct env *v, struct hw_ct4_key *k)
{
	__u32 pick_idx = HW_CT_MAX, rank = 0;
	__u64 oldest = ~0ULL, unc_ns = ct_unconfirmed_ns(v);
	__u32 base = ct_base4(k, v->cfg->table_seed);
#pragma unroll
	for (int i = 0; i < HW_CT_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_ct4_slot *sl = hw_ct4.lookup(&idx);
		asm volatile("" : "+r"(sl));   /* one call site per map: inlined */
		if (!sl)
			continue;
		__u32 r = ct_rank(v, &sl->e, tbl_key_diff(&sl->k, k, CT4_WORDS), sl->k.proto, unc_ns);
		if (ct_better(r, sl->e.last_ns, rank, oldest)) {
			pick_idx = idx;
			rank = r;
			oldest = sl->e.last_ns;
		}
	}
	struct hw_ct4_slot *pick = hw_ct4.lookup(&pick_idx);
	asm volatile("" : "+r"(pick));
	if (!pick || !ct_claim(v, rank, &pick->e, pick->k.proto, 4, unc_ns))
		return 0;
	if (rank != CT_RANK_FREE)
		ct_retire(v, &pick->e, &pick->k.addr_a, &pick->k.addr_b, pick->k.port_a, pick->k.port_b, pick->k.proto, 4,
			  ct_cause(v, rank, &pick->e, pick->k.proto, unc_ns));
	pick->k = *k;
	return &pick->e;
}

static __always_inline struct hw_ct_entry *ct_take6(struct env *v, struct hw_ct6_key *k)
{
	__u32 pick_idx = HW_CT_MAX, rank = 0;
	__u64 oldest = ~0ULL, unc_ns = ct_unconfirmed_ns(v);
	__u32 base = ct_base6(k, v->cfg->table_seed);
#pragma unroll
	for (int i = 0; i < HW_CT_WAYS; i++) {
		__u32 idx = base + i;
		struct hw_ct6_slot *sl = hw_ct6.lookup(&idx);
		if (!sl)
			continue;
		__u32 r = ct_rank(v, &sl->e, tbl_key_diff(&sl->k, k, CT6_WORDS), sl->k.proto, unc_ns);
		if (ct_better(r, sl->e.last_ns, rank, oldest)) {
			pick_idx = idx;
			rank = r;
			oldest = sl->e.last_ns;
		}
	}
	struct hw_ct6_slot *pick = hw_ct6.lookup(&pick_idx);
	if (!pick || !ct_claim(v, rank, &pick->e, pick->k.proto, 6, unc_ns))
		return 0;
	if (rank != CT_RANK_FREE)
		ct_retire(v, &pick->e, pick->k.addr_a, pick->k.addr_b, pick->k.port_a, pick->k.port_b, pick->k.proto, 6,
			  ct_cause(v, rank, &pick->e, pick->k.proto, unc_ns));
	pick->k = *k;
	return &pick->e;
}

/* Track a new connection opened by the allowed packet p. `confirmed`: its handshake is already proven
 * (a valid SYN-cookie ACK: the SYN proxy answered the SYN), so it starts ESTABLISHED. Its start is
 * reported as report_start decides (report.h). */
static __always_inline void ct_open(struct env *v, struct pkt *p, __u32 slot, __u32 rev, __u32 reason, int confirmed)
{
	struct hw_ct_entry *e;
	__u8 initiator;
	if (p->family == 4) {
		struct hw_ct4_key k __attribute__((aligned(8))) = {};   /* compared as 64-bit words */
		initiator = ct_key4(&k, p->saddr[0], p->daddr[0], p->sport, p->dport, p->proto);
		e = ct_take4(v, &k);
	} else {
		struct hw_ct6_key k __attribute__((aligned(8))) = {};
		initiator = ct_key6(&k, p->saddr, p->daddr, p->sport, p->dport, p->proto);
		e = ct_take6(v, &k);
	}
	if (!e)
		return;
	__u8 state = confirmed ? HW_CT_ESTABLISHED : p->proto == IPPROTO_TCP ? HW_CT_SYN_SENT : HW_CT_NEW;
	__u64 t = hw_precise(v->cfg);   /* the flow's first packet: start of its records */
	struct hw_event *ev = 0;
	e->report = report_start(v, v->dir == HW_DIR_INGRESS ? p->saddr : p->daddr, p->family, p->dport, p->proto,
				 v->dir, confirmed, &ev);
	e->created_ns = t;
	e->end_ns = t;
	e->last_ns = v->now;
	e->packets[0] = 1;
	e->packets[1] = 0;
	e->bytes[0] = p->len;
	e->bytes[1] = 0;
	e->cgroup_id = v->cgroup;
	e->rule_slot = slot;
	e->revision_id = rev;
	e->state = state;
	e->initiator = initiator;
	e->origin = v->dir;
	e->fin_seen = 0;
	e->reported = 0;
	e->seq_known = 0;
	if (p->proto == IPPROTO_TCP)
		ct_seq_learn(e, p, 0, HW_CT_SYN_SENT, 0);      /* the opener is the initiator's (side 0): afresh */
	__sync_lock_test_and_set(&e->slot_state, HW_SLOT_LIVE);        /* publish: the entry is whole */
	if (ev) {
		ev_packet(ev, p);
		ev->ts_ns = t;
		ev->start_ns = t;
		ev->rule_slot = slot;
		ev->revision_id = rev;
		ev->ct_state = state;
		ev->verdict = HW_V_ALLOW;
		ev->reason = reason;
		hw_events.ringbuf_submit(ev, 0);
	}
}

#endif /* HW_CONNTRACK_H */
