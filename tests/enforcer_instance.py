"""An enforcer instance started in the test process on a netns lab's protected host (control.start), with
its state in a temp dir: for tests that need real pinned maps and a real policy swap, but not the runner."""
from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import tempfile

import pytest


@contextlib.contextmanager
def started_instance(policy_text: str, name: str, interfaces=None, prepare=None):
    """Yields (lab, dp, pin_dir, state_dir); the caller closes `dp` (once) inside the block. `prepare(lab)`
    runs before the start (e.g. to add links in the lab's namespaces: removed with them). Detaches,
    restores HOSTWALL_STATE_DIR and removes the state dir at the end, also when the test fails. Skips
    without a netns lab or root."""
    from hostwall.lab.netns import Lab, cleanup_stale, lab_available
    ok, why = lab_available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root")
    cleanup_stale()
    from hostwall.enforcer import control
    from hostwall.enforcer.policy import parse_policy
    state = tempfile.mkdtemp(prefix=f"hostwall-{name}-state-")
    old = os.environ.get("HOSTWALL_STATE_DIR")
    os.environ["HOSTWALL_STATE_DIR"] = state
    pin = f"/sys/fs/bpf/hostwall-test/{name}-{secrets.token_hex(3)}"
    try:
        pol = parse_policy(policy_text)
        with Lab() as lab:
            lab.warm()
            if prepare is not None:
                prepare(lab)
            dp, _, _ = control.start(pol, pin, interfaces or list(pol.interfaces), netns=lab.ns("prot"))
            try:
                yield lab, dp, pin, state
            finally:
                control.detach(pin)
    finally:
        if old is None:
            os.environ.pop("HOSTWALL_STATE_DIR", None)
        else:
            os.environ["HOSTWALL_STATE_DIR"] = old
        subprocess.run(["rm", "-rf", state], check=False)
