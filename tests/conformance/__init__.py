"""Strict validators of records against the official definitions vendored in tests/data/ (see
tests/data/README.md): `ecs.validate(record)` and `ocsf.validate(event)` return a list of
human-readable violations ("path: what is wrong"), empty when the record conforms."""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data"


def _version_key(v: str) -> tuple:
    return tuple(int(x) if x.isdigit() else x for x in v.split("."))


@cache
def load(kind: str, filename: str, version: str | None = None) -> dict:
    """The vendored `tests/data/<kind>/<version>/<filename>`; version None = the newest vendored."""
    if version is None:
        versions = [p.name for p in (DATA / kind).iterdir() if (p / filename).is_file()]
        version = max(versions, key=_version_key)
    return json.loads((DATA / kind / version / filename).read_text())


def join(path: str, key) -> str:
    """Dotted path of a child: `a.b`, or `a[3]` for an array element."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else str(key)
