"""Fixtures shared by the unit tests."""
from __future__ import annotations

import pytest


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private state dir (HOSTWALL_STATE_DIR) for code that keeps state beside the pinned maps."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    return tmp_path
