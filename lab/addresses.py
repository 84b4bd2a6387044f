"""The lab's address space (lab/netns.py) plus loopback: the only destinations the traffic helpers
accept, so no helper can send a packet outside the namespaces a test made (docs/testing.md)."""
from __future__ import annotations

import ipaddress

# The lab's address space (lab/netns.py) plus loopback: the only destinations these helpers accept.
ALLOWED_NETS = tuple(ipaddress.ip_network(n) for n in ("10.66.0.0/16", "fd66::/16", "127.0.0.0/8", "::1/128"))


def check_lab_address(addr: str) -> str:
    """Raise ValueError unless `addr` (address or prefix) lies inside the lab ranges or loopback.
    Every client and the trafgen builder call this, so no helper can send traffic elsewhere."""
    net = ipaddress.ip_network(addr, strict=False)
    if not any(net.version == a.version and net.subnet_of(a) for a in ALLOWED_NETS):
        raise ValueError(f"{addr} is outside the lab (allowed: {', '.join(map(str, ALLOWED_NETS))})")
    return addr
