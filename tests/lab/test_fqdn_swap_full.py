"""A policy swap's refill of a new dynamic set that meets a full hw_fqdn map counts what it refused
(docs/policy.md "FQDN rules": counted, not silent) — control.apply's result and the CLI's warning."""
from __future__ import annotations

import ipaddress
import os
import subprocess
import sys

import pytest

from hostwall.bpf import layout as L

pytestmark = [pytest.mark.bpf, pytest.mark.lab]

BASE = """
version: 1
name: fqfull
defaults: {{ingress: allow, egress: deny, stateful: false}}
dns: {{upstreams: [10.66.2.2]}}
rules:
  - {{name: dns, priority: 10, direction: egress, action: allow, protocol: udp, peers: [10.66.2.2/32], ports: [53]}}
  - {{name: a, priority: 20, direction: egress, action: allow, protocol: tcp, fqdns: [a.full.test]}}
{extra}"""
WITH_B = "  - {name: b, priority: 30, direction: egress, action: allow, protocol: tcp, fqdns: ['*.b.full.test']}\n"


@pytest.fixture
def instance():
    """control.start on a netns lab's protected host (tests/enforcer_instance.py)."""
    from hostwall.enforcer.policy import InterfaceConf
    from tests.enforcer_instance import started_instance
    with started_instance(BASE.format(extra=""), "fqfull", [InterfaceConf("eth0", "auto", None)]) as (_, dp, pin, state):
        try:
            yield dp, pin, state
        finally:
            dp.close()


def test_swap_into_a_full_set_map_counts_and_warns(instance, tmp_path):
    from hostwall.bpf.fqdn import FqdnMaps, now_ns
    from hostwall.enforcer import control
    from hostwall.enforcer.policy import parse_policy
    dp, pin, state = instance
    fm = FqdnMaps(dp.map_fds)
    t = now_ns()
    exp = t + 600 * 10**9
    learnt = ["x.b.full.test", "y.b.full.test"]
    for i, name in enumerate(learnt):                 # two names the new rule's set will want, 3 addresses
        assert fm.name_put(name, t)
        for ip in [f"10.99.{i}.1", f"10.99.{i}.2"][: 1 + i]:
            assert fm.name_ip_put(name, ip, exp, t)
    (a_set,) = control.InstanceState.load(pin).fqdn_sets.values()
    base = int(ipaddress.IPv4Address("10.128.0.0"))   # fill hw_fqdn to the brim under the old rule's set
    n = 0                                             # (a new set's id is emptied before it is filled)
    while fm.set_put(a_set, str(ipaddress.IPv4Address(base + n)), exp, t):
        n += 1
        assert n <= L.FQDN_IPS_MAX, "hw_fqdn never refused an entry"
    assert n == L.FQDN_IPS_MAX
    fm.close()
    r = control.apply(parse_policy(BASE.format(extra=WITH_B)), pin)
    assert (r.fqdn_filled, r.fqdn_full) == (0, 3)

    # the CLI says so: one warning line with the count, exit 0 (the swap itself succeeded)
    p2 = tmp_path / "p2.yaml"
    p2.write_text(BASE.format(extra=WITH_B.replace("b.full.test", "b.full.test', '*.c.full.test")))
    out = subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", "apply", str(p2), "--pin-dir", pin],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "HOSTWALL_STATE_DIR": state})
    assert out.returncode == 0, out.stderr
    warn = [ln for ln in out.stderr.splitlines() if "did not fit the dynamic set map" in ln]
    assert len(warn) == 1 and warn[0].startswith("hostwall-enforcer: warning: 3 learnt addresses"), out.stderr
