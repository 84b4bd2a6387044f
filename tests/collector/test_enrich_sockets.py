"""Ingress attribution through the local socket, for real: a listener inside a network namespace made by
this test (and inside a docker-named cgroup) owns an address/port; sock_diag in that namespace finds its
socket, the /proc scan its pid, and the Enricher turns a flow record to that address/port into
process + container fields. Everything (namespace, cgroups, processes) is removed afterwards."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from hostwall.bpf.state import AttachedInterface, InstanceState
from hostwall.collector.enrich import Enricher
from hostwall.collector.enrich.cgroup import CgroupResolver, RuntimeMetadata, cgroup2_mount
from hostwall.collector.enrich.host import HostInfo, InstanceStateView
from hostwall.collector.enrich.sockets import SocketOwnerResolver
from tests.collector.test_enrich_cgroup import rmdir_cgroup

ADDR = "10.66.9.1"                 # exists only on lo inside the test's own namespace
LISTENER = f"""
import os, socket, sys, time
t = socket.socket(); t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); t.bind(("{ADDR}", 8080)); t.listen()
u = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::", 5353))
print(os.getpid(), flush=True)
time.sleep(120)
"""


def _run(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=20)


@pytest.fixture
def listener_in_netns():
    """(netns, pid, veth name, cgroup relative path, container id) of a listener; all removed afterwards."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.skip("needs root and iproute2 (network namespaces)")
    mount = cgroup2_mount()
    ns = f"hwsk{secrets.token_hex(3)}"
    cid = secrets.token_hex(32)
    cg = Path(mount) / f"hwtest-{secrets.token_hex(4)}" / "system.slice" / f"docker-{cid}.scope" if mount else None
    proc = None
    try:
        if _run("ip", "netns", "add", ns).returncode:
            pytest.skip("cannot create a network namespace")
        for cmd in (["link", "set", "lo", "up"], ["addr", "add", f"{ADDR}/32", "dev", "lo"],
                    ["link", "add", "hwa", "type", "veth", "peer", "name", "hwb"]):
            cp = _run("ip", "-n", ns, *cmd)
            assert cp.returncode == 0, cp.stderr
        if cg is not None:
            cg.mkdir(parents=True)
        # the shell joins the cgroup first, so the sockets are created there too
        join = f"echo $$ > {cg}/cgroup.procs && " if cg is not None else ""
        proc = subprocess.Popen(["sh", "-c", f"{join}exec ip netns exec {ns} {sys.executable} -c '{LISTENER}'"],
                                stdout=subprocess.PIPE, text=True, start_new_session=True)
        pid = int(proc.stdout.readline())
        rel = "/" + str(cg.relative_to(mount)) if cg is not None else ""
        yield ns, pid, "hwa", rel, cid if cg is not None else ""
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
        _run("ip", "netns", "del", ns)
        if cg is not None:
            top = cg.parent.parent
            for d in (cg, cg.parent, top):
                rmdir_cgroup(d)
            assert not top.exists(), f"could not remove {top}"


def test_sock_diag_finds_the_owner_in_its_namespace(listener_in_netns):
    ns, pid, _, rel, _ = listener_in_netns
    r = SocketOwnerResolver()
    try:
        tcp = r.lookup(ns, 6, ADDR, 8080)
        assert tcp is not None and tcp.pid == pid and tcp.process_name.startswith("python")
        assert tcp.executable == os.path.realpath(sys.executable)
        if rel:
            assert tcp.cgroup_path == rel
        udp = r.lookup(ns, 17, ADDR, 5353)                   # a v4 datagram reaches the dual-stack [::] socket
        assert udp is not None and udp.pid == pid
        assert r.lookup(ns, 6, ADDR, 8081) is None            # nobody listens there
        assert r.lookup(None, 6, ADDR, 8080) is None          # not in the root namespace
        again = r.lookup(ns, 6, ADDR, 8080)
        assert again == tcp and r.stats()["cache"]["hits"] == 1
        assert r.stats()["dumps"] >= 2 and r.stats()["timeouts"] == 0
    finally:
        r.close()


def test_enricher_attributes_an_ingress_flow_to_the_listening_container(listener_in_netns, tmp_path, monkeypatch):
    ns, pid, veth, rel, cid = listener_in_netns
    if not rel:
        pytest.skip("no cgroup2 mount: container attribution cannot be shown")
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    st = InstanceState(pin_dir="/x", build="b", interfaces=[AttachedInterface(veth, ns, "auto", "generic")])
    host = HostInfo("fw-1")
    ifindex = int(subprocess.run(["ip", "netns", "exec", ns, "cat", f"/sys/class/net/{veth}/ifindex"],
                                 capture_output=True, text=True, timeout=10).stdout)
    enr = Enricher(host, InstanceStateView("/x", st),
                   cgroups=CgroupResolver(runtime_meta=RuntimeMetadata(docker_root=str(tmp_path))))
    rec = {"@timestamp": "2024-01-01T00:00:00.000000Z", "event": {"action": "flow_start", "type": ["start"]},
           "network": {"iana_number": "6", "transport": "tcp", "direction": "ingress", "community_id": "1:x"},
           "source": {"ip": "10.66.2.2", "port": 40000}, "destination": {"ip": ADDR, "port": 8080},
           "observer": {"hostname": "fw-1", "ingress": {"interface": {"id": str(ifindex)}}},
           "hostwall": {"kind": "flow", "cgroup_id": 0, "interface": {"id": ifindex},
                        "flow": {"start": "2024-01-01T00:00:00.000000Z", "state": "open"}}}
    try:
        enr.enrich(rec)
    finally:
        enr.close()
    assert rec["hostwall"]["interface"] == {"id": ifindex, "name": veth, "netns": ns}
    assert rec["observer"]["ingress"]["interface"]["name"] == veth
    assert rec["process"]["pid"] == pid
    assert rec["container"] == {"id": cid, "runtime": "docker"}
    assert rec["hostwall"]["attribution"] == "socket" and rec["hostwall"]["cgroup_path"] == rel
    s = enr.stats()
    assert s["attributed_socket"] == 1 and s["errors"] == 0
