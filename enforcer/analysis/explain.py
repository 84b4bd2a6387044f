"""`hostwall-enforcer explain POLICY PACKET`: why a packet gets its verdict (docs/policy.md "Tooling").

The deciding rule and the outcome come from the reference model (with the packet's `state`, through
ctmodel), including the stages before the rules: essential ICMP (which kind, and which condition an
ICMP message of an essential kind meets or misses) and later fragments; every later rule that also matches is listed as shadowed for this packet; the default of the
direction says what would happen without a matching rule. From the compiled tables (table.py): the
largest ranges around the packet that are judged alike (its peer's elementary interval, its port's
key interval). From the policy's DoS profile of the interface: the limits this packet counts against
and the bucket it shares. Live bans (operator and automatic) come from a running instance and are
passed in by the caller (cli_tooling.py), so this module stays free of kernel code.
fqdns rules (fqdn.py): every one whose other conditions the packet meets is listed with its names; with
a snapshot of names → addresses (a file, or the running instance's learnt names, passed in as `learnt`)
the packet is judged with it, and each such rule says which names put the destination into its set.
Cost: O(rules × prefixes) for the matches (reference.match), plus one compile for the ranges.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

from hostwall.bpf import layout as L

from ..policy import DosProfile, Policy, Rule
from ..reference import Learnt, essential_icmp, evaluate, match
from .ctmodel import Outcome, judge
from .fqdn import is_fqdn, names_holding
from .intervals import Span, addr_text, ranges_text
from .packet import ECHO, CasePacket
from .regions import icmp_keys_text
from .stages import ESS_MLD, ESS_ND, ESS_NONE, ESS_PMTU, KIND_NAMES, kind_of_message
from .table import ICMP_KEYED, PIDX_NAMES, DecisionTable, decision_table

__all__ = ["Explanation", "explain", "dos_limits"]


@dataclass
class Explanation:
    packet: CasePacket
    outcome: Outcome
    matching: list[Rule]                    # every rule that matches the packet, in the order tried
    default: str                            # allow | deny, of the packet's direction
    stateful: bool
    audit: bool
    peer_range: tuple[str, str] | None = None
    key_range: str | None = None
    dos_profile: str | None = None
    dos: list[str] = field(default_factory=list)
    bans: list[dict] = field(default_factory=list)
    source: str = ""
    essential: str | None = None            # essential ICMP: why the packet passes before the rules, or not
    fqdn: list[dict] = field(default_factory=list)   # fqdns rules whose other conditions the packet meets
    snapshot: str | None = None             # where the names → addresses came from (None: no snapshot)
    profile: str | None = None              # DoS profile of the packet's interface: its automatic bans apply
    essential_icmp: bool = True             # defaults.essential_icmp (a spared ICMP error needs it)

    def applies(self, b: dict) -> bool:
        """Does live ban `b` meet this packet (bpf/dos.h dos_check)? An operator's on every interface
        (manual_banned); an automatic one is keyed by its DoS profile and meets only packets of the
        interfaces bound to it (dos_profile → dos_source)."""
        return b["kind"] != "automatic" or (self.profile is not None and b.get("profile") == self.profile)

    def ban(self) -> dict | None:
        """The live ban that drops this packet before any rule (bpf/dos.h dos_check), or None; an
        operator's first. An automatic ban spares a reply on a connection this host opened, never an
        ICMP echo request (dos_spares); an operator's ban cuts everything (docs/dos.md "Tracked
        connections")."""
        o, p = self.outcome, self.packet
        echo_request = p.protocol in (1, 58) and p.icmp[0] == ECHO[p.family][0]
        spared = (self.stateful and p.state == "reply" and o.verdict == "allow" and not echo_request
                  and o.reason.startswith(("pass_conntrack", "pass_related")))
        live = sorted((b for b in self.bans if self.applies(b)), key=lambda b: b["kind"] == "automatic")
        return next((b for b in live if b["kind"] != "automatic" or not spared), None)

    def ban_spares(self) -> str | None:
        """When the automatic ban that drops this ICMP error would let it through (bpf/dos.h
        dos_error_spares): an error of a spared type quoting the host's own packet ('about' the
        destination), with connection tracking and essential ICMP on. Whether the quoted packet is on
        a connection this host opened the packet syntax cannot say, so this is the condition, in words."""
        b, p = self.ban(), self.packet
        if b is None or b["kind"] != "automatic" or not (self.stateful and self.essential_icmp):
            return None
        if not p.is_error() or p.icmp[0] not in SPARED_ERRORS[p.family] or p.about is None:
            return None
        if ipaddress.ip_address(p.about) != ipaddress.ip_address(p.dst):
            return None
        return ("passes instead (pass_related_over_limit) if it quotes a connection this host opened and has not "
                "closed, to one peer (not multicast or broadcast; of ICMP only the host's echo request), while the "
                "profile's shared budget for spared errors of all sources lasts (docs/dos.md \"Tracked connections\")")

    def verdict(self) -> Outcome:
        """The packet's verdict: the ban's (would_drop in audit mode) when one applies, else the rules'."""
        b = self.ban()
        return self.outcome if b is None else Outcome("would_drop" if self.audit else "drop", "banned", None)

    def text(self) -> str:
        p = self.packet
        b = self.ban()
        if b is None:
            out = [f"packet   {p.text()}", f"verdict  {self.outcome.text()}"]
        else:
            v = self.verdict()
            out = [f"packet   {p.text()}", f"verdict  {v.verdict} (banned, {b['kind']} ban {b['prefix']})"]
            spares = self.ban_spares()
            if spares:
                out.append(f"         {spares}")
            out += [f"         dropped as banned before any rule; without the ban: {self.outcome.text()}"]
        decider = self.matching[0] if self.matching and self.outcome.rule == self.matching[0].name else None
        if self.outcome.reason == "pass_conntrack":
            out.append("         the packet continues a tracked connection (its opener was allowed), so no rule "
                       "is consulted")
        elif self.outcome.reason == "pass_conntrack_out_of_window":
            out.append("         a RST, FIN, SYN-ACK or handshake ACK of a tracked connection outside its sequence "
                       "window (or with an unacceptable ACK): passed for the stack to ignore, the connection unchanged "
                       "(docs/datapath.md \"Sequence checks\")")
        elif self.outcome.reason == "pass_essential":
            out.append(f"         passed as essential ICMP before any rule (defaults.essential_icmp): {self.essential}")
        elif self.outcome.reason == "fragment_unmatched":
            out.append("         a later fragment without its first fragment: judged before any rule "
                       "(it follows its first fragment's verdict when that was seen)")
        elif decider is not None:
            out.append(f"         decided by rule {decider.name!r} ({self.source}:{decider.line}, priority "
                       f"{decider.priority}, {decider.action})")
        else:
            out.append(f"         no rule matches: the {p.direction} default ({self.default}) applies")
        rest = self.matching[1:] if decider is not None else self.matching
        if self.essential and self.outcome.reason != "pass_essential":
            out.append(f"essential ICMP: {self.essential}")
        if rest:
            out.append("shadowed (these match too, but are tried later):")
            out += [f"         {r.name!r} ({self.source}:{r.line}, priority {r.priority}, {r.action})" for r in rest]
        out += self._fqdn_text()
        out.append(f"default  {p.direction}: {self.default} (when no rule matches)")
        st = ("stateful: an allowed opening packet (TCP SYN, UDP, ICMP echo request) is tracked; the connection "
              "then passes both ways without rules" if self.stateful else "stateless: every packet is judged by the rules")
        out.append(f"state    {st}" + ("; audit mode: drops become would_drop and pass" if self.audit else ""))
        if self.peer_range:
            side = "source" if p.direction == "ingress" else "destination"
            out.append(f"alike    every {side} in {self.peer_range[0]} - {self.peer_range[1]}"
                       + (f" with {self.key_range}" if self.key_range else "") + " is judged the same way"
                       + (" (with the same hop limit and embedded packet)" if self.essential else "")
                       + (" (if in the same fqdns sets)" if any(not f["after"] for f in self.fqdn) else ""))
        if self.dos_profile:
            out.append(f"DoS      profile {self.dos_profile}:")
            out += [f"         {d}" for d in self.dos]
        elif p.direction == "ingress":
            out.append("DoS      no DoS profile applies (give the interface: 'on IF', or list the interface "
                       "with a dos_profile in the policy)")
        if self.bans:
            out.append("bans     " + "; ".join(self._ban_text(b) for b in self.bans)
                       + (": dropped as banned before any rule" if any(map(self.applies, self.bans)) else ""))
        return "\n".join(out)

    def _ban_text(self, b: dict) -> str:
        why = f", {b['reason']}" if b.get("reason") else ""
        if b["kind"] != "automatic":
            return f"{b['prefix']} ({b['kind']}{why})"
        if not self.applies(b):
            where = f"not {self.packet.interface}" if self.packet.interface else "give 'on IF'"
            return f"{b['prefix']} (automatic{why}; applies on interfaces with profile {b.get('profile')} only: {where})"
        return f"{b['prefix']} (automatic{why}" + ("; a connection this host opened excepted" if self.stateful else "") + ")"

    def _fqdn_text(self) -> list[str]:
        if not self.fqdn:
            return []
        dst = self.packet.dst
        out = [f"fqdns    rules that match this packet if {dst} is in their set (addresses their names resolved "
               "to through the DNS proxy" + (f"; snapshot: {self.snapshot})" if self.snapshot else ")")]
        for f in self.fqdn:
            out.append(f"         {f['rule']!r} ({self.source}:{f['line']}, priority {f['priority']}, {f['action']}): "
                       + ", ".join(f["fqdns"]))
            if f["after"]:
                out.append(f"           tried after {f['after']!r}, which decides this packet: it cannot decide it")
            if self.snapshot is None:
                continue
            if f["names"]:
                out.append(f"           {dst} is in its set: learnt for " + ", ".join(f["names"]))
            else:
                out.append(f"           {dst} is not in its set: no name it lists resolved to it")
        if self.snapshot is None:
            out.append("         (give --fqdn-addresses FILE or --pin-dir DIR to judge with names → addresses "
                       "and see which names put the address there)")
        return out

    def to_json(self) -> dict:
        b = self.ban()
        return {"packet": self.packet.text(), **self.verdict().to_json(),
                "without_bans": self.outcome.to_json() if b is not None else None, "ban_spares": self.ban_spares(),
                "matching": [{"rule": r.name, "line": r.line, "priority": r.priority, "action": r.action}
                             for r in self.matching],
                "default": self.default, "stateful": self.stateful, "audit": self.audit,
                "peer_range": list(self.peer_range) if self.peer_range else None, "key_range": self.key_range,
                "dos_profile": self.dos_profile, "dos": self.dos,
                "bans": [{**b, "applies": self.applies(b)} for b in self.bans], "essential_icmp": self.essential,
                "fqdn": self.fqdn, "fqdn_snapshot": self.snapshot}


def dos_limits(prof: DosProfile, pkt: CasePacket, stateful: bool = True) -> list[str]:
    """The limits of `prof` this packet counts against (docs/dos.md), in the order the guards check,
    and, with connection tracking (`stateful`), what the per-source limits and bans spare."""
    out = []
    src = ipaddress.ip_address(pkt.src)
    plen = prof.source_prefix_v4 if src.version == 4 else prof.source_prefix_v6
    bucket = ipaddress.ip_network(f"{src}/{plen}", strict=False)
    syn = pkt.protocol == 6 and pkt.tcp_flag_bits & 0x16 == 0x02
    if syn and prof.syn_per_source_pps:
        out.append(f"SYN: {prof.syn_per_source_pps} per second per source (reason syn_flood)")
    if pkt.protocol == 17 and prof.udp_per_source_pps:
        out.append(f"UDP: {prof.udp_per_source_pps} per second per source (reason udp_flood)")
    if pkt.protocol in (1, 58) and prof.icmp_per_source_pps:
        out.append(f"ICMP: {prof.icmp_per_source_pps} per second per source (reason icmp_flood)")
    if prof.per_source_pps:
        out.append(f"packets: {prof.per_source_pps} per second per source, burst {prof.per_source_burst or prof.per_source_pps}"
                   " (reason rate_limit)")
    if prof.per_source_bps:
        out.append(f"bits: {prof.per_source_bps / 1e6:g} Mbit/s per source (reason rate_limit)")
    if syn and prof.syn_global_pps:
        out.append(f"SYN, all sources together: {prof.syn_global_pps} per second (reason syn_flood)")
    for port, proto, pps in prof.ports:
        if pkt.protocol == (6 if proto == "tcp" else 17) and pkt.dport == port:
            out.append(f"port {port}/{proto}: {pps} per second, all sources together (reason port_limit)")
    if out:
        out.append(f"the source's bucket is {bucket} (source_prefix_v{src.version}: /{plen}): every address in it "
                   "shares these per-source limits")
    else:
        out.append("no limit of this profile applies to this packet")
    if prof.ban_after_s and prof.ban_duration_s:
        out.append(f"ban: over a per-source limit for {prof.ban_after_s:g} s in a row → every packet from {bucket} "
                   f"dropped for {prof.ban_duration_s:g} s (reason banned)")
    if stateful and (out[-1].startswith("ban:") or any("per source" in d for d in out)):
        out.append(SPARED)
    return out


# docs/dos.md "Tracked connections"; bpf/dos.h dos_error_spares: errors an automatic ban may spare
SPARED_ERRORS = {4: (3, 11, 12), 6: (1, 2, 3, 4)}
SPARED = ("spared: a packet of a connection this host opened and has not closed passes its source's per-source "
          "limits and automatic ban (reason pass_conntrack_over_limit; the shared TCP/UDP limits still apply), "
          "and so does an ICMP error quoting one (pass_related_over_limit, with essential_icmp on), all sources' "
          "spared errors together at one source's ICMP rate; never an ICMP echo request, nor an error quoting "
          "multicast or broadcast; operator bans still apply")


def _essential_note(policy: Policy, pkt: CasePacket, rp) -> str | None:
    """Why an ICMP message of an essential kind passes before the rules, or why it does not (its
    condition not met, or essential_icmp off); None for other messages."""
    kind = kind_of_message(pkt.family, *pkt.icmp)
    if kind == ESS_NONE:
        return None
    what = KIND_NAMES[kind]
    if not getattr(policy.defaults, "essential_icmp", False):
        return f"a {what} message, but defaults.essential_icmp is false: the rules judge it"
    need = {ESS_ND: "hop limit 255", ESS_MLD: "hop limit 1 and a link-local source (fe80::/10 or ::)",
            ESS_PMTU: "an embedded packet its destination sent ('about' the destination's address)"}[kind]
    if essential_icmp(rp):
        return f"a {what} message with {need}"
    return f"a {what} message, but it passes before the rules only with {need}: the rules judge it"


def _fqdn_candidates(policy: Policy, rp, learnt: Learnt | None) -> list[dict]:
    """fqdns rules whose conditions other than the destination hold for `rp`, in the order tried, with
    the names that put its destination into the rule's set (by `learnt`) and the static rule tried
    before them that decides the packet anyway (after)."""
    out: list[dict] = []
    if rp.direction != "egress":
        return out
    static = next((i for i, r in enumerate(policy.rules) if not is_fqdn(r) and match(r, rp)), None)
    for i, r in enumerate(policy.rules):
        if not is_fqdn(r) or not match(r, rp, _any_name(r, rp.dst)):
            continue
        after = policy.rules[static].name if static is not None and static < i else None
        out.append({"rule": r.name, "line": r.line, "priority": r.priority, "action": r.action,
                    "fqdns": list(r.fqdns or ()), "after": after,
                    "names": names_holding(r, rp.dst, learnt) if learnt is not None else None})
    return out


def _any_name(rule, dst: str) -> Learnt:
    """A snapshot in which the rule's first pattern resolved to `dst` (to test its other conditions)."""
    pat = (rule.fqdns or ("x",))[0]
    return {("x" + pat[1:]) if pat.startswith("*") else pat: (dst,)}


def explain(policy: Policy, pkt: CasePacket, dt: DecisionTable | None = None,
            bans: list[dict] | None = None, learnt: Learnt | None = None, snapshot: str | None = None) -> Explanation:
    """Explain `pkt` under `policy`; `bans` (from a running instance) are filtered to the ones that
    cover the packet's source; `learnt` (names → addresses, from `snapshot`) fills the fqdns rules' sets
    (without it they hold nothing, and are listed as candidates)."""
    rp = pkt.reference()
    out = judge(policy, pkt, lambda c: evaluate(policy, c.reference(), learnt))
    matching = [r for r in policy.rules if match(r, rp, learnt)]
    ex = Explanation(pkt, out, matching, getattr(policy.defaults, pkt.direction), policy.defaults.stateful,
                     policy.defaults.audit, source=policy.source)
    ex.essential_icmp = bool(getattr(policy.defaults, "essential_icmp", False))
    ex.fqdn = _fqdn_candidates(policy, rp, learnt)
    ex.snapshot = snapshot if learnt is not None else None
    dt = dt or decision_table(policy)
    fam = pkt.family
    _, lo, hi = dt.peer_interval_of(fam, int(ipaddress.ip_address(pkt.peer)))
    ex.peer_range = (addr_text(fam, lo), addr_text(fam, hi - 1))
    pidx = L.PROTO_IDX.get(pkt.proto_name, L.PROTO_IDX["other"])
    name = PIDX_NAMES[pidx]
    if name in ("tcp", "udp"):
        key = 0 if pkt.fragment else pkt.dport
    elif name in ("icmp", "icmpv6"):
        t, c = pkt.icmp
        key = (t << 8 | c) if ICMP_KEYED else 0
    else:
        key = 0
    iv = dt.l4_interval_of(L.DIR[pkt.direction], pidx, key)
    if iv is not None and name in ("tcp", "udp") and key:
        ex.key_range = f"{name} port {ranges_text(Span(((iv[1], iv[2]),)) - Span.point(0))}"
    elif iv is not None and name in ("icmp", "icmpv6") and ICMP_KEYED:
        ex.key_range = f"{name} {icmp_keys_text(Span(((iv[1], iv[2]),)))}"
        ex.essential = _essential_note(policy, pkt, rp)
    by_if = {i.name: i.dos_profile for i in policy.interfaces}
    if pkt.direction == "ingress":
        prof = by_if.get(pkt.interface) if pkt.interface else None
        where = f"interface {pkt.interface}"
        if prof is None and not pkt.interface:
            with_prof = {n: v for n, v in by_if.items() if v}
            if len(set(with_prof.values())) == 1:
                prof = next(iter(with_prof.values()))
                where = "interface " + ", ".join(sorted(with_prof))
        if prof:
            ex.dos_profile = f"{prof} ({where})"
            ex.dos = dos_limits(policy.dos_profiles[prof], pkt, policy.defaults.stateful)
        ex.profile = prof or None
        src = ipaddress.ip_address(pkt.src)
        ex.bans = [b for b in (bans or []) if src in ipaddress.ip_network(b["prefix"])]
    return ex

