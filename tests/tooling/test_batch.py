"""The batch form of the reference model (enforcer/analysis/batch.py) judges exactly like
enforcer/reference.evaluate, packet for packet, on random policies."""
from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer.analysis.batch import BatchReference
from hostwall.enforcer.policy import parse_policy
from hostwall.enforcer.reference import Packet, evaluate

from .strategies import packets, policies


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=policies(), pkts=st.lists(packets(), min_size=1, max_size=60))
def test_batch_equals_scalar_reference(text, pkts):
    policy = parse_policy(text)
    assert BatchReference(policy).evaluate(pkts) == [evaluate(policy, p) for p in pkts]


def test_blocklist_of_many_prefixes_and_v6_ranks():
    nets = [f"10.{i // 256}.{i % 256}.0/24" for i in range(0, 4000, 3)]
    text = ("version: 1\nname: b\ndefaults: {ingress: allow}\nrules:\n"
            f"  - {{name: block, priority: 1, direction: ingress, action: deny, peers: {nets + ['fd00:1::/32']}}}\n"
            "  - {name: ssh, priority: 2, direction: ingress, action: deny, protocol: tcp, ports: [22]}\n")
    policy = parse_policy(text.replace("'", '"'))
    pkts = [Packet("ingress", 4, f"10.{i // 256}.{i % 256}.7", "192.0.2.1", 6, 999, 22 if i % 2 else 80)
            for i in range(0, 4000, 7)]
    pkts += [Packet("ingress", 6, a, "2001:db8::1", 17, 5, 53) for a in ("fd00:1::1", "fd00:1:ffff::", "fd00:2::", "fd00:0:ffff:ffff::")]
    assert BatchReference(policy).evaluate(pkts) == [evaluate(policy, p) for p in pkts]
