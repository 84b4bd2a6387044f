"""The OpenTelemetry resource of this collector, shared by the OTLP log sink and the self-metrics."""
from __future__ import annotations

import socket
from pathlib import Path
from typing import Any


def resource_attributes(config) -> dict:
    """OTel resource of this collector: service.*, host.*, os.type, hostwall.pin_dir, hostwall.interfaces."""
    from hostwall.collector.enrich.host import collector_version
    host = config.hostname or socket.gethostname()
    attrs: dict[str, Any] = {"service.name": "hostwall-collector", "service.namespace": "hostwall",
                             "service.version": collector_version(),
                             "service.instance.id": f"{host}:{Path(config.pin_dir).name}",
                             "host.name": host, "os.type": "linux", "hostwall.pin_dir": config.pin_dir}
    try:
        mid = Path("/etc/machine-id").read_text().strip()
        if mid:
            attrs["host.id"] = mid
    except OSError:
        pass
    try:
        from hostwall.bpf.state import InstanceState
        st = InstanceState.load(config.pin_dir)
        names = sorted({i.name for i in st.interfaces})
        if names:
            attrs["hostwall.interfaces"] = names
    except Exception:                                # noqa: BLE001 — no enforcer state yet: no interfaces
        pass
    return attrs
