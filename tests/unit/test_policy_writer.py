"""One policy writer per instance at a time (hostwall.bpf.state.policy_writer, docs/datapath.md
"Atomic swaps"): a second writer, in another process, waits until the first one is done."""

import subprocess
import sys
import threading

import pytest

from hostwall.enforcer import control
from hostwall.enforcer.policy import InterfaceConf, parse_policy

HOLDER = """
import sys
from hostwall.bpf.state import policy_writer
with policy_writer(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.readline()            # hold until the test says so
"""

POLICY = "version: 1\nname: w\ndefaults: {ingress: allow, egress: allow}\nrules: []\n"


@pytest.fixture
def holder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path / "state"))
    pin = str(tmp_path / "pins" / "x")
    p = subprocess.Popen([sys.executable, "-c", HOLDER, pin], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p, pin
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(timeout=30)


@pytest.mark.parametrize("call", ["apply", "start"])
def test_a_second_writer_waits_for_the_first(holder, call):
    p, pin = holder
    policy = parse_policy(POLICY)
    done = threading.Event()
    errors: list[BaseException] = []

    def write():
        try:
            if call == "apply":
                control.apply(policy, pin)          # no instance there: raises once it has the lock
            else:
                control.start(policy, pin, [InterfaceConf("hw-nosuch0", "auto", None)])  # refused once it has the lock
        except Exception as e:  # noqa: BLE001 — any outcome counts; the test is about when it comes
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    assert not done.wait(1.0), f"{call} did not wait for the other writer: {errors}"
    p.stdin.write("\n")
    p.stdin.flush()
    assert done.wait(60), f"{call} still waiting after the other writer let go"
    t.join(10)
    assert errors and isinstance(errors[0], control.ControlError), errors
