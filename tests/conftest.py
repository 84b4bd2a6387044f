import os
import sys
from pathlib import Path

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

pytest_plugins = ["tests.peers.fixtures"]

if os.environ.get("HOSTWALL_FD_AUDIT"):
    pytest_plugins.append("tests.fdaudit")


DEFAULT_STATE_DIR = Path("/run/hostwall")       # bpf/state.py state_dir() without HOSTWALL_STATE_DIR


def _listing(d: Path) -> set[str]:
    try:
        return set(os.listdir(d))
    except FileNotFoundError:
        return set()


@pytest.fixture(scope="session", autouse=True)
def private_state_dir(tmp_path_factory):
    """The session's HOSTWALL_STATE_DIR (state files, collector checkpoints, reader and FQDN locks) is a
    directory of its own, inherited by the processes tests start; a test that sets its own keeps it. Nothing
    of a test run lands in the host's /run/hostwall, where a real enforcer keeps its state: the session
    fails at its end if something new appeared there (docs/testing.md "State files")."""
    if "HOSTWALL_STATE_DIR" in os.environ:     # the caller chose one: theirs to clean
        yield Path(os.environ["HOSTWALL_STATE_DIR"])
        return
    before = _listing(DEFAULT_STATE_DIR)
    d = tmp_path_factory.mktemp("hostwall-state")
    os.environ["HOSTWALL_STATE_DIR"] = str(d)
    try:
        yield d
    finally:
        os.environ.pop("HOSTWALL_STATE_DIR", None)
    new = sorted(_listing(DEFAULT_STATE_DIR) - before)
    assert not new, f"tests wrote into {DEFAULT_STATE_DIR} (HOSTWALL_STATE_DIR bypassed): {new}"
