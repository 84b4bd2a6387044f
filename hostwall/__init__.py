"""hostwall: a Linux host firewall (XDP + TC eBPF) and flow-telemetry pipeline.

The one import namespace of the distribution (docs/architecture.md). Its packages live in the
repository's top-level folders, mapped in pyproject.toml:

    hostwall.bpf        bpf/        the kernel contract: the C programs, hostwall.h and its Python side
    hostwall.enforcer   enforcer/   policy language, compiler, loading, attaching, control, CLI
    hostwall.collector  collector/  ring drain → records → enrichment → anomalies → encoders → sinks
    hostwall.lab        lab/        the netns lab and `hostwall-lab demo`
    hostwall.bench      bench/      `python -m hostwall.bench SUITE`

Modules directly in this package belong to no side (YAML documents with source locations, units).
"""
from __future__ import annotations

from pathlib import Path

__version__ = "0.1.0"

_HERE = Path(__file__).resolve().parent


def resource_dir(name: str) -> Path:
    """A data folder the wheel ships inside the package (hostwall/<name>: schemas, examples) and a
    checkout keeps at the repository's top level (<repo>/<name>). Cost: two stat calls."""
    packaged = _HERE / name
    return packaged if packaged.is_dir() else _HERE.parent / name
