"""Suite `dos` (docs/benchmarks.md): what the DoS guards cost and what they absorb.

- dos_added_ns: XDP ns/packet through BPF_PROG_TEST_RUN with a DoS profile on the arrival interface
  minus the same without one (same policy, same admitted packet: the full guard path, bucket hit).
- flood_pps / legit_success_ratio / records_per_s_during_flood: a real UDP flood at the lab's
  maximum rate from the attacker namespace while a client on another host does TCP echo round trips;
  packets/s dropped by the guards, the client's success ratio, events/s admitted into the ring buffer
  (the budget) next to drops/s, and the share of a CPU the hostwall programs used
  (kernel.bpf_stats_enabled run time).
"""
from __future__ import annotations

import statistics
import struct
import tempfile
import time
from pathlib import Path

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L

POLICY = """
version: 1
name: bench-dos
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: web, priority: 10, direction: ingress, action: allow, protocol: tcp, peers: [10.66.0.0/16], ports: [80]}
  - {name: mdns, priority: 10, direction: ingress, action: allow, protocol: udp, peers: [10.66.0.0/16], ports: [5353]}
dos:
  profiles:
    edge:
      per_source: {pps: %(pps)d, burst: %(pps)d, bps: 10Gbit}
      syn: {per_source_pps: %(pps)d, global_pps: %(pps)d}
      udp: {per_source_pps: %(udp)d}
      icmp: {per_source_pps: 50}
      ports: [{port: 5353, protocol: udp, pps: %(pps)d}]
      ban: {after: 30s, duration: 60s}
interfaces:
  - {name: %(ifname)s, dos_profile: edge}
"""


def _median_ns(fd: int, frame: bytes, ctx: bytes, repeat: int, batches: int) -> float:
    return statistics.median(bpfsys.prog_test_run(fd, frame, repeat=repeat, ctx=ctx).duration_ns
                             for _ in range(batches))


def dos_added_ns(quick: bool) -> dict:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import raw

    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.datapath import Datapath
    from hostwall.enforcer.policy import parse_policy

    pol = parse_policy(POLICY % {"pps": 10**9, "udp": 10**9, "ifname": "lo"})
    slots = {r.name: i for i, r in enumerate(pol.rules)}
    frame = raw(Ether() / IP(src="10.66.2.2", dst="10.66.1.2") / UDP(sport=1, dport=5353))
    ctx = struct.pack("<6I", 0, len(frame), 0, 1, 0, 0)          # arrives on lo (ifindex 1)
    dp = Datapath.load()
    try:
        dp.set_config(test_now_ns=0)
        fd = dp.prog_fds["xdp_ingress"]
        repeat, batches = (50_000, 5) if quick else (200_000, 9)
        res = {}
        for name, ifaces in (("off", {}), ("on", {1: "edge"})):
            dp.install(compile_policy(pol, slots, 1, ifaces))
            dp.clear_conntrack()
            bpfsys.prog_test_run(fd, frame, repeat=1000, ctx=ctx)   # warm: bucket and ct entries exist
            res[name] = _median_ns(fd, frame, ctx, repeat, batches)
        return {"ns_per_pkt_dos_off": res["off"], "ns_per_pkt_dos_on": res["on"],
                "dos_added_ns": res["on"] - res["off"]}
    finally:
        dp.close()


def _drops(dp) -> int:
    st = dp.stats()
    return sum(int(st["packets"][L.stats_index(h, L.C["HW_V_DROP"], r)]) for h in L.HOOK_NAMES for r in L.DROP_REASONS)


def _prog_ns(dp) -> int:
    return sum(bpfsys.prog_stats(fd)[0] for fd in dp.prog_fds.values())


def flood(quick: bool) -> dict:
    from hostwall.enforcer.datapath import Datapath
    from hostwall.lab import traffic
    from hostwall.lab.enforcer_proc import EnforcerProcess, events_admitted
    from hostwall.lab.netns import Lab

    seconds = 3.0 if quick else 8.0
    stats_path = Path("/proc/sys/kernel/bpf_stats_enabled")
    old_stats = stats_path.read_text().strip()
    stats_path.write_text("1")
    try:
        with tempfile.TemporaryDirectory() as tmp, Lab() as lab:
            pol = Path(tmp) / "dos.yaml"
            pol.write_text(POLICY % {"pps": 2000, "udp": 1000, "ifname": "eth0"})
            lab.warm()
            with traffic.echo_servers(lab, "prot", tcp=[80]), EnforcerProcess(lab, pol) as enf:
                dp = Datapath.open(enf.pin_dir)
                try:
                    ev0, dr0, cpu0, t0 = events_admitted(dp), _drops(dp), _prog_ns(dp), time.monotonic()
                    legit = traffic.start_in(lab, "cli", "tcp-client", host=lab.addr("prot"), port=80,
                                             count=int(seconds * 50), interval=0.02, op_timeout=1.0)
                    sent = traffic.trafgen_in(lab, "att", kind="udp", dport=5353, duration=seconds)
                    el = time.monotonic() - t0
                    ev, dr, cpu = events_admitted(dp) - ev0, _drops(dp) - dr0, _prog_ns(dp) - cpu0
                    res = legit.result(timeout=60)
                finally:
                    dp.close()
        return {"flood_sent_pps": sent["pps"], "flood_pps": dr / el,
                "legit_success_ratio": res["ok"] / max(res["count"], 1),
                "records_per_s_during_flood": ev / el, "drops_per_record": dr / max(ev, 1),
                "hostwall_cpu_share": cpu / (el * 1e9)}
    finally:
        stats_path.write_text(old_stats)


def run(quick: bool) -> dict:
    return {**dos_added_ns(quick), **flood(quick)}


TARGETS = {
    "dos_added_ns": ("<= 40 ns", lambda m: m["dos_added_ns"] <= 40.0),
    "legit_success_ratio": (">= 0.99", lambda m: m["legit_success_ratio"] >= 0.99),
    "records_per_s_during_flood": (f"<= event budget {L.C['HW_EVENT_BUDGET']}/s",
                                   lambda m: m["records_per_s_during_flood"] <= L.C["HW_EVENT_BUDGET"] * 1.05),
}
