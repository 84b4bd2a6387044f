"""Flows still tracked when the enforcer stops get their end (docs/collector.md "Detach").

The real enforcer and collector on a lab's protected host; a client opens a TCP connection to an echo
server and leaves it open, and exchanges one UDP datagram each way (an answered flow, tracked for
minutes). Then the enforcer stops cleanly (SIGTERM: detach, unpin): the collector, which still holds
the maps, reports the end of both flows with end_reason `detach`, exactly once each, stamped no later
than the stop, and its ledger balances."""
from __future__ import annotations

import sys
import time

import pytest

from hostwall.collector.records import parse_iso_ns
from hostwall.lab import traffic
from hostwall.lab.collector_proc import CollectorProcess, kind, read_jsonl
from hostwall.lab.enforcer_proc import EnforcerProcess

from .conftest import EXAMPLE_POLICY
from .test_capture import until

pytestmark = pytest.mark.lab

HOLD_OPEN = """
import socket, sys, time
dst = sys.argv[1]
t = socket.create_connection((dst, 80), timeout=5)
t.sendall(b"hello")
t.recv(100)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
u.settimeout(5)
u.sendto(b"ping", (dst, 5353))
u.recvfrom(100)
print(t.getsockname()[1], u.getsockname()[1], flush=True)
time.sleep(120)
"""


def hold_open(lab, prot: str):
    """The HOLD_OPEN client on the lab's client host: (its process, its source port per transport)."""
    client = lab.popen("cli", [sys.executable, "-c", HOLD_OPEN, prot])
    line = client.stdout.readline().split()
    assert len(line) == 2, f"client did not connect: {line} {client.stderr.read() if client.poll() else ''}"
    return client, {"tcp": int(line[0]), "udp": int(line[1])}


def flows(path, cli: str, ports: dict[str, int]) -> dict[str, list[dict]]:
    """The client's flow records per transport (its source port as given)."""
    out: dict[str, list[dict]] = {p: [] for p in ports}
    for r in read_jsonl(path):
        if kind(r) != "flow" or r["source"].get("ip") != cli:
            continue
        proto = r["network"].get("transport")
        if proto in ports and r["source"].get("port") == ports[proto]:
            out[proto].append(r)
    return out


def ends(recs: list[dict]) -> list[dict]:
    return [r for r in recs if r["event"]["type"] == ["end"]]


def the_detach_end(recs: list[dict], proto: str, stopped: int) -> dict:
    """A flow's one end record: `detach`, stamped between its start and the enforcer's stop."""
    [end] = ends(recs)
    assert end["hostwall"]["flow"]["end_reason"] == "detach", (proto, end["hostwall"]["flow"])
    assert end["event"]["reason"] == "datapath detached"
    assert parse_iso_ns(end["event"]["start"]) <= parse_iso_ns(end["event"]["end"]) <= stopped
    return end


def test_an_enforcer_stop_ends_the_open_tcp_connection_and_the_udp_flow_once(lab, tmp_path):
    from hostwall.bpf import retired
    cli, prot = lab.addr("cli"), lab.addr("prot")
    with EnforcerProcess(lab, EXAMPLE_POLICY) as enf, CollectorProcess(enf, tmp_path) as col, \
            traffic.echo_servers(lab, "prot", tcp=[80], udp=[5353]):
        client, ports = hold_open(lab, prot)
        try:
            until(lambda: all(flows(col.jsonl, cli, ports).values()), 20, "both flows' start records")
            assert not any(ends(v) for v in flows(col.jsonl, cli, ports).values())    # open: no end yet
            enf.stop()                                   # SIGTERM: detach and unpin
            stopped = time.time_ns()
            until(lambda: all(ends(v) for v in flows(col.jsonl, cli, ports).values()), 20,
                  "both flows' end records after the detach")
            scans = col.status()["conntrack"]["scans"]  # three more scans: nothing reported twice
            until(lambda: col.status()["conntrack"]["scans"] >= scans + 3, 20, "three more conntrack scans")
            assert len(retired.listing(enf.pin_dir)) == 1   # its maps were retired, this collector drains them
            assert col.stop() == 0
            assert retired.listing(enf.pin_dir) == []       # drained: unpinned at its stop
        finally:
            lab.stop(client)
    got = flows(col.jsonl, cli, ports)
    for proto, recs in got.items():
        end = the_detach_end(recs, proto, stopped)
        assert end["source"]["packets"] >= (3 if proto == "tcp" else 1) and end["destination"]["packets"] >= 1
    led = col.final_status["ledger"]
    assert led["ok"] and not led["violations"], led
    assert col.final_status["conntrack"]["detached"] >= 2


NOTE_POLICY = """
version: 1
name: detach-note
defaults: {ingress: deny, egress: allow, stateful: true}
rules:
  - {name: web, priority: 100, direction: ingress, action: allow, protocol: tcp, ports: [80]}
interfaces:
  - {name: eth0}
"""


def _config(pin: str):
    from hostwall.bpf.instance import Instance
    inst = Instance.open_maps(pin, ("hw_config",))
    assert inst is not None
    return inst


def test_a_detach_that_leaves_a_program_attached_notes_nothing(monkeypatch):
    """An interface whose detach failed keeps running the programs on these maps: control.detach must not
    note a detach (docs/collector.md "Detach"), or the collector would end live connections."""
    from pyroute2.netlink.exceptions import NetlinkError

    from hostwall.bpf.links import link_state
    from hostwall.enforcer import control
    from hostwall.enforcer.datapath import Datapath
    from tests.enforcer_instance import started_instance
    with started_instance(NOTE_POLICY, "detnote") as (lab, dp, pin, _):
        cfg = _config(pin)                              # holds the maps past the unpin, as a collector does
        try:
            def failing(ifname, netns=None):
                raise NetlinkError(16, "Device or resource busy")
            monkeypatch.setattr(Datapath, "detach", staticmethod(failing))
            assert control.detach(pin) == []
            assert link_state("eth0", lab.ns("prot")).xdp_prog_id != 0       # still attached
            assert int(cfg.config()["detached_ns"]) == 0
            monkeypatch.undo()
            Datapath.detach("eth0", lab.ns("prot"))
        finally:
            cfg.close()
            dp.close()


def test_an_adopted_instance_starts_without_a_detach_note():
    """A kill between the note and the unpin leaves pins and the note; the `run` that adopts them must
    clear it, or its collector would end every live connection (docs/collector.md "Detach")."""
    from hostwall.enforcer import control
    from hostwall.enforcer.policy import parse_policy
    from tests.enforcer_instance import started_instance
    with started_instance(NOTE_POLICY, "detadopt") as (lab, dp, pin, _):
        try:
            dp.set_config(detached_ns=12345)
            pol = parse_policy(NOTE_POLICY)
            dp2, _, res = control.start(pol, pin, list(pol.interfaces), netns=lab.ns("prot"))
            try:
                assert res.adopted
                assert int(dp2.config()["detached_ns"]) == 0
            finally:
                dp2.close()
        finally:
            dp.close()


def test_a_stop_while_no_collector_runs_is_drained_by_the_next_collector(lab, tmp_path):
    """Collector stopped first (Compose's stop order) → traffic (an open TCP connection, an answered UDP
    flow, denied packets) → enforcer stopped (its maps retired, docs/collector.md "Detach") → enforcer
    started again → collector started: it drains the retired instance first — the flows' `detach` ends
    exactly once, the drop summary and the flow starts produced while it was down — then collects from the
    new instance; `hostwall-collector verify` finds no unexplained gap and the retired pins are gone."""
    from hostwall.bpf import retired
    cli, prot = lab.addr("cli"), lab.addr("prot")
    with EnforcerProcess(lab, EXAMPLE_POLICY) as enf, traffic.echo_servers(lab, "prot", tcp=[80], udp=[5353]):
        with CollectorProcess(enf, tmp_path) as first:
            assert first.stop() == 0                     # it read this instance: its checkpoint names it
        client, ports = hold_open(lab, prot)
        try:
            assert traffic.tcp_client_in(lab, "cli", prot, 9000, count=2, timeout=0.3)["ok"] == 0    # denied
            enf.stop()                                   # SIGTERM: detach; no collector holds the maps
            stopped = time.time_ns()
            assert len(retired.listing(enf.pin_dir)) == 1
            enf.start()
            with CollectorProcess(enf, tmp_path) as col:
                until(lambda: all(ends(v) for v in flows(col.jsonl, cli, ports).values()), 30,
                      "both flows' end records from the retired instance")
                assert retired.listing(enf.pin_dir) == []
                assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1    # the new instance
                until(lambda: sum(1 for r in read_jsonl(col.jsonl) if kind(r) == "flow"
                                  and r["network"].get("transport") == "tcp" and r["event"]["type"] == ["start"]
                                  and r["destination"].get("port") == 80) >= 2, 20, "the new instance's flow")
                assert col.stop() == 0
        finally:
            lab.stop(client)
    for proto, recs in flows(col.jsonl, cli, ports).items():
        the_detach_end(recs, proto, stopped)
        assert len([r for r in recs if r["event"]["type"] == ["start"]]) == 1
    denied = [r for r in read_jsonl(col.jsonl) if kind(r) == "drop_summary"
              and r["destination"].get("port") == 9000]
    assert denied, "no drop summary of the denied connection attempts"
    assert col.final_status["retired_drained"] and col.final_status["ledger"]["ok"]
    rs = col.final_status["restart"]
    assert (rs["previous"], rs["lost"]) == ("drained", {}), rs      # not `reboot`: the instance was read to its end
    v = col.cli("verify", str(col.jsonl))
    assert v.returncode == 0, v.stdout + v.stderr


def tcp_starts(path, prot: str, port: int) -> int:
    return sum(1 for r in read_jsonl(path) if kind(r) == "flow" and r["network"].get("transport") == "tcp"
               and r["event"]["type"] == ["start"] and r["destination"].get("ip") == prot
               and r["destination"].get("port") == port)


def test_a_running_collector_follows_the_restarted_enforcer(lab, tmp_path):
    """Enforcer stopped (detach: its maps retired) and started again while the collector runs: the
    collector reads the detached instance to its end, unpins it and goes on with the new instance in the
    same process (collector/retired_drain.py follow; docs/collector.md "Detach") — the new instance's
    flows arrive in the same JSONL, the seqs run on (`verify` clean), and it says `drained`, not `reboot`."""
    from hostwall.bpf import retired
    prot = lab.addr("prot")
    with EnforcerProcess(lab, EXAMPLE_POLICY) as enf, CollectorProcess(enf, tmp_path) as col, \
            traffic.echo_servers(lab, "prot", tcp=[80], udp=[5353]):
        pid = col.proc.pid
        assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1
        until(lambda: tcp_starts(col.jsonl, prot, 80) >= 1, 20, "the first instance's flow")
        enf.stop()                                      # SIGTERM: detach, the maps retired (a collector reads them)
        enf.start()
        until(lambda: retired.listing(enf.pin_dir) == [], 30, "the detached instance drained and unpinned")
        assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1
        until(lambda: tcp_starts(col.jsonl, prot, 80) >= 2, 30, "the new instance's flow, no collector restart")
        assert col.alive() and col.proc.pid == pid
        assert col.stop() == 0
    st = col.final_status
    assert st["ledger"]["ok"] and not st["ledger"]["violations"], st["ledger"]
    assert st["restart"]["previous"] == "drained" and st["restart"]["lost"] == {}, st["restart"]
    v = col.cli("verify", str(col.jsonl))
    assert v.returncode == 0, v.stdout + v.stderr


def test_a_running_collector_follows_a_build_upgrade(lab, tmp_path, monkeypatch):
    """The enforcer left attached (--keep-attached) and started again as another build while the collector
    runs (its state names another build: control.start carries conntrack into a new datapath and replaces
    the instance, docs/collector.md "Replaced instances"): the collector reads the old instance to its end
    and goes on with the new one in the same process — a new connection's records arrive without a
    collector restart — and the connections carried over get no end when the old instance is left: each
    ends exactly once, when it really ends in the new instance (the TCP connection by its FINs, the UDP
    flow, one datagram each way, by its 30 s idle timeout)."""
    from hostwall.bpf import retired
    from hostwall.bpf.state import InstanceState
    cli, prot = lab.addr("cli"), lab.addr("prot")
    with EnforcerProcess(lab, EXAMPLE_POLICY, keep_attached=True) as enf, CollectorProcess(enf, tmp_path) as col, \
            traffic.echo_servers(lab, "prot", tcp=[80], udp=[5353]):
        pid = col.proc.pid
        client, ports = hold_open(lab, prot)
        try:
            until(lambda: all(flows(col.jsonl, cli, ports).values()), 20, "both flows' start records")
            enf.stop()                                  # --keep-attached: programs, pins and connections stay
            monkeypatch.setenv("HOSTWALL_STATE_DIR", enf.state_dir)
            st = InstanceState.load(enf.pin_dir)
            st.build = "an-older-build"                 # as if a package upgrade brought another datapath
            st.save()
            enf.start()
            assert "carried" in enf.banner, enf.banner
            assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1    # the new instance
            until(lambda: tcp_starts(col.jsonl, prot, 80) >= 2, 30, "the new instance's flow, no collector restart")
            until(lambda: retired.listing(enf.pin_dir) == [], 30, "the replaced instance drained and unpinned")
            lab.stop(client)                            # the carried TCP connection closes in the new instance
            until(lambda: all(ends(v) for v in flows(col.jsonl, cli, ports).values()), 60,
                  "the carried connections' ends")
            scans = col.status()["conntrack"]["scans"]  # three more scans: nothing reported twice
            until(lambda: col.status()["conntrack"]["scans"] >= scans + 3, 20, "three more conntrack scans")
            assert col.alive() and col.proc.pid == pid
            assert col.stop() == 0
        finally:
            lab.stop(client)
    got = flows(col.jsonl, cli, ports)
    for proto, reason in (("tcp", "fin"), ("udp", "idle_timeout")):
        [end] = ends(got[proto])                        # no `detach` or early idle end from the old instance
        assert end["hostwall"]["flow"]["end_reason"] == reason, (proto, end["hostwall"]["flow"])
        assert len([r for r in got[proto] if r["event"]["type"] == ["start"]]) == 1
    st = col.final_status
    assert st["ledger"]["ok"] and not st["ledger"]["violations"], st["ledger"]
    assert st["restart"]["previous"] == "drained" and st["restart"]["lost"] == {}, st["restart"]
    v = col.cli("verify", str(col.jsonl))
    assert v.returncode == 0, v.stdout + v.stderr
