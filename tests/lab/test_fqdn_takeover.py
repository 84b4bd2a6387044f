"""A start that takes a pinned instance of the same build over rebuilds the dynamic set's index from the set
(enforcer/control.py _start, bpf/fqdn.py reindex; docs/datapath.md "FQDN rules"): a writer killed between
its hw_fqdn update and its slot's (the run process's DNS proxy, SIGKILL) left the slot counting one entry
too few, which the datapath reads as "not in the set", and renewals of the address never fix it."""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = [pytest.mark.bpf, pytest.mark.lab]

POLICY = """
version: 1
name: fqtake
defaults: {ingress: allow, egress: deny, stateful: false}
dns: {upstreams: [10.66.2.2]}
rules:
  - {name: dns, priority: 10, direction: egress, action: allow, protocol: udp, peers: [10.66.2.2/32], ports: [53]}
  - {name: a, priority: 20, direction: egress, action: allow, protocol: tcp, fqdns: [a.take.test]}
"""


def test_a_takeover_reindexes_what_a_killed_writer_left():
    from hostwall.bpf import layout as L
    from hostwall.bpf.fqdn import FqdnMaps, index_slot, now_ns
    from hostwall.enforcer import control
    from hostwall.enforcer.policy import InterfaceConf, parse_policy
    from tests.enforcer_instance import started_instance
    ifs = [InterfaceConf("eth0", "auto", None)]
    with started_instance(POLICY, "fqtake", ifs) as (lab, dp, pin, _):
        try:
            (sid,) = control.InstanceState.load(pin).fqdn_sets.values()
            fm = FqdnMaps(dp.map_fds, pin)
            t = now_ns()
            assert fm.set_put(sid, "10.66.9.1", t + 600 * 10**9, t)
            key = np.zeros(1, L.DTYPES["hw_fqdn_key"])
            key["set"], key["family"], key["addr"][0, :4] = sid, 4, [10, 66, 9, 1]
            slot = int(index_slot(key)[0])
            ix = fm.index()
            assert int(ix["entries"][slot]) == 1
            # the writer killed after hw_fqdn took the address and while its slot was changing
            ix["entries"][slot] = 0
            ix["seq"][slot] |= 1
            ix["key"][slot] = np.zeros(1, L.DTYPES["hw_fqdn_key"])[0]
            dp2, _, res = control.start(parse_policy(POLICY), pin, ifs, netns=lab.ns("prot"))
            dp2.close()
            assert res.adopted
            assert int(ix["entries"][slot]) == 1 and int(ix["seq"][slot]) % 2 == 0
            assert ix["key"][slot].tobytes() == key.tobytes() and int(ix["entries"].sum()) == 1
            fm.close()
        finally:
            dp.close()
