"""Benchmarks keep hostwall's state files — collector registrations and checkpoints, reader and FQDN
locks — in a directory of their own, never in the host's /run/hostwall where a real enforcer keeps its
state (docs/testing.md "State files"): every collector a suite starts registers its checkpoint there
(bpf/state.py register_collector), and a bench run must leave nothing behind."""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path


def use_private_state_dir() -> Path:
    """Point HOSTWALL_STATE_DIR (inherited by the processes a suite starts) at a new temporary directory,
    removed when this process exits; a caller's own HOSTWALL_STATE_DIR is kept (theirs to clean)."""
    if os.environ.get("HOSTWALL_STATE_DIR"):
        return Path(os.environ["HOSTWALL_STATE_DIR"])
    d = tempfile.mkdtemp(prefix="hw-bench-state-")
    os.environ["HOSTWALL_STATE_DIR"] = d
    atexit.register(shutil.rmtree, d, True)
    return Path(d)
