"""Outcomes in the datapath's words, and the connection-tracking model for cases with a `state`.

An `Outcome` is what `status` and the records call verdict, reason and rule: allow with pass_rule,
pass_default, pass_conntrack (…), drop or would_drop with policy_deny, default_deny,
conntrack_invalid (…), and the deciding rule (None for the default and for tracked packets).

`judge` models the datapath's tracking for one packet after its opener (packet.CasePacket.opener;
bpf/conntrack.h `ct_open`, `ct_advance`, docs/policy.md "stateful"): the opener is judged by the
policy; only an allowed opening packet (TCP SYN, any UDP, ICMP echo request) of a stateful policy
opens a connection (state SYN_SENT for TCP, NEW otherwise). The packet then passes as pass_conntrack
if it continues the connection validly: from the side and in the direction it belongs to, and for
TCP not a SYN-ACK from the initiator (a SYN from the responder is a simultaneous open; a tuple that is its own reverse
counts as the initiator's, as the datapath's normalised key does). Otherwise it is judged by the
policy, and a drop of such an invalid continuation has reason conntrack_invalid. A valid continuation
may be out of the fresh entry's sequence window (bpf/conntrack.h `ct_seq_ok`, docs/datapath.md
"Sequence checks"): the case frames (analysis/frames.py) give every TCP packet the same sequence
number and, with ACK, an acknowledgement of the opener's end (a bare SYN: packet.CasePacket.opener).
So the initiator's RST (not at its next sequence number) is out of window, and so are the responder's
RST without ACK coming in from the peer when the host sent the SYN (no acceptable ACK, RFC 5961 §5)
and every FIN but one the responder's SYN carries (no FIN counts before the handshake is answered;
the responder's SYN|FIN without ACK from the peer lacks the ACK): they pass as
pass_conntrack_out_of_window, whatever the policy. The
responder's SYN-ACK and RST with ACK acknowledge the SYN; FINs are at the SYN's sequence number. Cost:
one or two stateless judgements.
"""
from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from ..policy import Policy
from ..reference import Decision
from .packet import ECHO, CasePacket

__all__ = ["Outcome", "outcome_of", "judge", "opens"]

_FIN, _SYN, _RST, _ACK = 0x01, 0x02, 0x04, 0x10


@dataclass(frozen=True)
class Outcome:
    verdict: str                 # allow | drop | would_drop
    reason: str                  # pass_rule | pass_default | pass_conntrack | policy_deny | default_deny | …
    rule: str | None

    def text(self) -> str:
        by = f"rule {self.rule!r}" if self.rule else ("the default" if self.reason in ("pass_default", "default_deny")
                                                      else "no rule")
        return f"{self.verdict} ({self.reason}, {by})"

    def to_json(self) -> dict:
        return {"verdict": self.verdict, "reason": self.reason, "rule": self.rule}


def outcome_of(d: Decision | Outcome) -> Outcome:
    """The reference model's Decision in the datapath's vocabulary (its counters' reasons); an
    Outcome is returned as it is."""
    if isinstance(d, Outcome):
        return d
    if d.verdict == "allow":
        return Outcome("allow", d.reason or ("pass_rule" if d.rule else "pass_default"), d.rule)
    return Outcome(d.verdict, d.reason or "policy_deny", d.rule)


def opens(p: CasePacket) -> bool:
    """Does an allowed `p` open a connection (bpf/parse.h `opens`)?"""
    if p.fragment:
        return False
    if p.protocol == 6:
        f = p.tcp_flag_bits
        return f & (_SYN | _ACK | _RST) == _SYN
    if p.protocol == 17:
        return True
    return p.protocol in (1, 58) and p.icmp[0] == ECHO[p.family][0]


def _continues(p: CasePacket, from_initiator: bool) -> bool:
    """bpf/conntrack.h ct_advance's state machine on a fresh entry (TCP SYN_SENT, others NEW)."""
    if p.protocol != 6:
        return True
    f = p.tcp_flag_bits
    if f & _RST:
        return True
    if f & (_SYN | _ACK) == (_SYN | _ACK):
        return not from_initiator
    return True             # a SYN from the responder too: simultaneous open (docs/policy.md "stateful")


def _out_of_window(p: CasePacket, from_initiator: bool) -> bool:
    """bpf/conntrack.h ct_seq_ok on a fresh entry (only the initiator's side learnt, from its SYN), for a
    packet `_continues` accepts, with the case frames' numbers (module docstring)."""
    if p.protocol != 6:
        return False
    f = p.tcp_flag_bits
    if f & _RST:
        return from_initiator or not f & _ACK
    if f & _FIN and (from_initiator or not f & _SYN):
        return True         # no FIN before the handshake is answered (the fresh entry is syn_sent)
    # a FIN from the peer needs an acceptable ACK once the host's side is known (the host sent the SYN)
    return bool(f & _FIN) and not f & _ACK and not from_initiator and p.direction == "ingress"


def _symmetric(p: CasePacket) -> bool:
    """A tuple that is its own reverse (same address and port on both sides; ICMP echo carries its id
    as both ports): bpf/conntrack.h ct_key4/ct_key6 then always name the sender the initiator, whose
    packets must travel the opener's direction, so such a packet never continues as the reply."""
    if p.src != p.dst and _raw(p.src) != _raw(p.dst):     # text first: most tuples differ there already
        return False
    return p.protocol in (1, 58) or p.sport == p.dport


def _raw(addr: str) -> bytes:
    return socket.inet_pton(socket.AF_INET6 if ":" in addr else socket.AF_INET, addr)


def judge(policy: Policy, pkt: CasePacket, stateless: Callable[[CasePacket], Decision | Outcome],
          opened: tuple[CasePacket, str] | None = None) -> Outcome:
    """Outcome of `pkt` given its state; `stateless(p)` is the policy's judgement of one packet (a
    reference Decision or already an Outcome); `opened`: pkt.opener() when the caller has it already."""
    op = opened if opened is not None else pkt.opener()
    if op is None:
        return outcome_of(stateless(pkt))
    opener, how = op
    first = stateless(opener)
    tracked = first.verdict == "allow" and policy.defaults.stateful and opens(opener)
    if tracked and not (how == "reversed" and _symmetric(pkt)):
        if _continues(pkt, how == "same"):
            oow = _out_of_window(pkt, how == "same")
            return Outcome("allow", "pass_conntrack_out_of_window" if oow else "pass_conntrack", None)
    out = outcome_of(stateless(pkt))
    if tracked and out.verdict != "allow":
        return Outcome(out.verdict, "conntrack_invalid", out.rule)
    return out
