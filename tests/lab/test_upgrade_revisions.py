"""A build upgrade (control.start on pins of another build: conntrack migrated into a new datapath) keeps
the revision numbering, each kept revision's slot table and the instance id, so the migrated connections'
records still name their rules (enforcer/control.py carried_state; docs/records.md "Rule fields")."""
from __future__ import annotations

import pytest

from hostwall.bpf.state import InstanceState
from hostwall.enforcer import control
from hostwall.enforcer.policy import parse_policy
from tests.enforcer_instance import started_instance

pytestmark = [pytest.mark.bpf, pytest.mark.lab]

POLICY = """
version: 1
name: {name}
defaults: {{ingress: deny, egress: allow, stateful: true}}
rules:
  - {{name: {rule}, priority: 100, direction: ingress, action: allow, protocol: tcp, ports: [80]}}
interfaces:
  - {{name: eth0}}
"""


def test_a_build_upgrade_keeps_revision_info_and_the_instance():
    first = POLICY.format(name="up-1", rule="web")
    with started_instance(first, "upgrade") as (lab, dp, pin, _):
        dp.close()
        second = parse_policy(POLICY.format(name="up-2", rule="www"))
        control.apply(second, pin)
        before = InstanceState.load(pin)
        assert before.instance_id and set(before.revision_info) == {"1", "2"}
        before.build = "an-older-build"             # as if the pins were left by another enforcer version
        before.save()
        dp2, after, res = control.start(second, pin, list(second.interfaces), netns=lab.ns("prot"))
        dp2.close()
        assert not res.adopted
        assert after.revision_id == 3 and after.instance_id == before.instance_id
        for rid in ("1", "2"):
            assert after.revision_info[rid] == before.revision_info[rid]
            assert after.revisions[rid] == before.revisions[rid]
