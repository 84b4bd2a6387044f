"""Hand-made frames in the lab: send raw Ethernet frames (crafted fragments, say) from a host's eth0
and collect what a lab echo server sends back, without waiting a fixed time.

`send_and_collect` runs a small stdlib-only script inside the sending host's namespace: it binds the
UDP port the crafted datagrams come from, writes the frames to eth0 through an AF_PACKET socket, then
sends one small *marker* datagram to the same echo server and reads echoes until the marker's echo is
back (or a deadline passes). The marker travels the same path after the frames, so once its echo
arrives every crafted datagram that was going to be delivered has been echoed: a negative result
("this datagram never arrived") is a measured fact, not a timeout guessed long enough.

Safety: every frame's IP destination (and the marker's) must lie inside the lab ranges
(hostwall.lab.traffic.check_lab_address); frames are written only to an interface inside the lab's
namespace. Bounds: one script run per call, a deadline on the wait, at most 1000 frames.
"""
from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .traffic import check_lab_address

if TYPE_CHECKING:
    from .netns import Lab

MAX_FRAMES = 1000

_SCRIPT = r"""
import json, os, socket, sys, time
a = json.load(sys.stdin)
fam = socket.AF_INET6 if a["family"] == 6 else socket.AF_INET
s = socket.socket(fam, socket.SOCK_DGRAM)
if fam == socket.AF_INET6:
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
s.bind(("::" if fam == socket.AF_INET6 else "0.0.0.0", a["port"]))
raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
raw.bind((a["ifname"], 0))
for f in a["frames"]:
    raw.send(bytes.fromhex(f))
marker = b"marker-" + os.urandom(8).hex().encode()
s.sendto(marker, (a["marker"][0], a["marker"][1]))
got, seen = [], False
deadline = time.monotonic() + a["timeout"]
for _ in range(10000):
    left = deadline - time.monotonic()
    if left <= 0:
        break
    s.settimeout(left)
    try:
        d = s.recv(65536)
    except OSError:
        break
    if d == marker:
        seen = True
        break
    got.append(len(d))
print(json.dumps({"received": got, "marker": seen}))
"""


def frame_destination(frame: bytes) -> str:
    """The IP destination of an Ethernet frame (IPv4 or IPv6, no VLAN tag); ValueError otherwise."""
    etype = int.from_bytes(frame[12:14], "big")
    if etype == 0x0800 and len(frame) >= 34:
        return str(ipaddress.IPv4Address(frame[30:34]))
    if etype == 0x86DD and len(frame) >= 54:
        return str(ipaddress.IPv6Address(frame[38:54]))
    raise ValueError("not an IPv4/IPv6 frame")


def send_and_collect(lab: Lab, host: str, frames: Sequence[bytes], *, family: int, port: int,
                     marker_dst: str, marker_port: int, timeout: float = 10.0, ifname: str = "eth0") -> dict:
    """Send `frames` from host's `ifname`, then the marker datagram from UDP `port` to
    marker_dst:marker_port; return {"received": [sizes of the other echoes to `port`], "marker": bool}."""
    if len(frames) > MAX_FRAMES:
        raise ValueError(f"{len(frames)} frames; at most {MAX_FRAMES} per call")
    for f in frames:
        check_lab_address(frame_destination(f))
    check_lab_address(marker_dst)
    args = {"family": family, "port": port, "ifname": ifname, "frames": [f.hex() for f in frames],
            "marker": [marker_dst, marker_port], "timeout": timeout}
    cp = lab.python(host, ["-c", _SCRIPT], input=json.dumps(args), timeout=timeout + 20)
    return json.loads(cp.stdout.strip().splitlines()[-1])
