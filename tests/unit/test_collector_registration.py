"""The registration of a collector's checkpoint (bpf/state.py register_collector, collector_checkpoint):
the enforcer's stop finds the checkpoint of the collector reading a pin dir wherever its status file is
(docs/collector.md "Status file and state dir")."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from hostwall.bpf import retired, state

PIN = "/sys/fs/bpf/hostwall-test/registration"


@pytest.fixture
def sd(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path / "state"))
    return tmp_path / "state"


def checkpoint(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{}")
    return path


def default() -> Path:
    return state.collector_checkpoint_path(state.collector_status_path(PIN))


def test_without_a_registration_the_default_checkpoint_is_the_one(sd):
    assert retired.collector_checkpoint(PIN) == default() and not default().exists()
    checkpoint(default())
    assert retired.collector_checkpoint(PIN) == default()


def test_a_custom_status_files_checkpoint_is_found_once_registered(sd, tmp_path):
    own = checkpoint(tmp_path / "own" / "x.state.json")
    assert not retired.collector_checkpoint(PIN).exists()   # unregistered: the enforcer would unpin
    state.register_collector(PIN, own)
    assert retired.collector_checkpoint(PIN) == own


def test_the_registration_survives_the_collectors_crash(sd, tmp_path):
    """kill -9 right after the registration: the enforcer's stop, while the collector is down, still finds
    its checkpoint (it must retire the instance for the next start)."""
    own = checkpoint(tmp_path / "own" / "x.state.json")
    code = ("import os, signal; from pathlib import Path; from hostwall.bpf import state; "
            f"state.register_collector({PIN!r}, Path({str(own)!r})); os.kill(os.getpid(), signal.SIGKILL)")
    p = subprocess.run([sys.executable, "-c", code], env={**os.environ, "HOSTWALL_STATE_DIR": str(sd)}, timeout=60)
    assert p.returncode == -signal.SIGKILL
    assert retired.collector_checkpoint(PIN) == own
    assert [f.name for f in sd.iterdir()] == [state.collector_reader_path(PIN).name]    # no tmp file left


def test_the_last_collector_to_start_wins_when_configs_alternate(sd, tmp_path):
    """Custom, then default, then custom again: the default checkpoint left by the second run must not
    hide the third run's (its `drain` decides what a discard counts: retired.exported_gen)."""
    own = checkpoint(tmp_path / "own" / "x.state.json")
    state.register_collector(PIN, own)
    state.register_collector(PIN, checkpoint(default()))
    assert retired.collector_checkpoint(PIN) == default()
    state.register_collector(PIN, own)
    assert retired.collector_checkpoint(PIN) == own


def test_a_registration_naming_a_gone_or_damaged_file_falls_back_to_the_default(sd, tmp_path):
    own = checkpoint(tmp_path / "own" / "x.state.json")
    state.register_collector(PIN, own)
    checkpoint(default())
    own.unlink()                                            # the operator removed that collector's files
    assert retired.collector_checkpoint(PIN) == default()
    state.collector_reader_path(PIN).write_text("{not json")
    assert retired.collector_checkpoint(PIN) == default()
    state.collector_reader_path(PIN).write_text('["x"]')
    assert retired.collector_checkpoint(PIN) == default()


def test_a_registration_that_cannot_be_written_is_counted(tmp_path, monkeypatch):
    """A state dir that cannot be written: the collector runs on, counts it (status pipeline
    reader_register_errors) and says so, rather than leaving the enforcer to unpin unread data unnoticed."""
    from hostwall.collector.sources import Sources
    (tmp_path / "state").write_text("a file, not a directory")
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path / "state"))
    pipe = SimpleNamespace(cfg=SimpleNamespace(pin_dir=PIN), checkpoint=SimpleNamespace(path=tmp_path / "x.state.json"),
                           counters=Counter())
    Sources._register_reader(pipe)
    assert pipe.counters == {"reader_register_errors": 1}
