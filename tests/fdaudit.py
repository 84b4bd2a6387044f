"""Descriptor audit for the test session (docs/testing.md): `HOSTWALL_FD_AUDIT=FILE pytest …` writes one
line per test: test id, change in open descriptors, total after it, and what the new ones point at. A leak
is a positive change that later tests (or the fixture's teardown) never give back."""

import os

import pytest


def _fds() -> dict[int, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before = _fds()
    yield
    after = _fds()
    new = {fd: what for fd, what in after.items() if before.get(fd) != what}
    if len(after) != len(before):
        with open(os.environ["HOSTWALL_FD_AUDIT"], "a") as f:
            kinds: dict[str, int] = {}
            for what in new.values():
                key = what.split(":")[0] if ":" in what else what
                kinds[key] = kinds.get(key, 0) + 1
            f.write(f"{item.nodeid}\t{len(after) - len(before)}\t{len(after)}\t{kinds}\n")
