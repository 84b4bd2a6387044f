"""Revision ids are never handed out twice within an instance (enforcer/control.py next_revision_id): a
swap whose state save failed left its id live in the kernel, and the next apply must number above it, or
records of the connections it allowed would be named after another policy's rules (docs/records.md
"Rule fields")."""
from __future__ import annotations

import os
import secrets

import pytest

from hostwall.bpf.state import InstanceState
from hostwall.enforcer import control
from hostwall.enforcer.datapath import Datapath, build_hash
from hostwall.enforcer.policy import parse_policy

pytestmark = pytest.mark.bpf


def _policy(name: str):
    return parse_policy(f"version: 1\nname: {name}\ndefaults: {{ingress: deny, egress: allow}}\nrules:\n"
                        f"  - {{name: {name}-ssh, priority: 0, direction: ingress, action: allow, protocol: tcp, "
                        f"ports: [22]}}\n")


@pytest.fixture
def pinned(tmp_path, monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)")
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    pin = f"/sys/fs/bpf/hostwall-test/revids-{secrets.token_hex(3)}"
    dp = Datapath.load()
    try:
        dp.pin(pin)
        InstanceState(pin_dir=pin, build=build_hash(), instance_id="t").save()
        yield dp, pin
    finally:
        Datapath.unpin(pin)
        dp.close()


def test_a_failed_state_save_does_not_hand_its_revision_id_out_again(pinned, monkeypatch):
    dp, pin = pinned
    control.apply(_policy("x"), pin, dp)
    assert int(dp.active_header()["revision_id"]) == 1
    with monkeypatch.context() as m:
        def full(self):
            raise OSError(28, "No space left on device")
        m.setattr(InstanceState, "save", full)
        with pytest.raises(OSError):
            control.apply(_policy("y"), pin, dp)        # the kernel judges by y as revision 2; the state says 1
    assert int(dp.active_header()["revision_id"]) == 2 and InstanceState.load(pin).revision_id == 1
    control.apply(_policy("z"), pin, dp)
    st = InstanceState.load(pin)
    assert int(dp.active_header()["revision_id"]) == st.revision_id == 3
    assert "2" not in st.revision_info             # y's records stay unnamed (counted), never named after z
