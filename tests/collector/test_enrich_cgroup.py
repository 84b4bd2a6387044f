"""cgroup id → container / pod / unit, on the real cgroup v2 hierarchy of this machine.

The test makes cgroups named like the ones docker, containerd (CRI), CRI-O, podman, kubelet and systemd
make, all under one private folder `hwtest-<random>` of the cgroup2 mount, moves a sleeping process into
each (cgroup.procs), and resolves the kernel's cgroup id (the directory inode) back to the workload.
Everything is removed afterwards, also when the test fails (processes killed, folders removed leaf first).
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import time
from pathlib import Path

import pytest

from hostwall.collector.enrich.cgroup import (
    CgroupResolver,
    LruTtlCache,
    RuntimeMetadata,
    cgroup2_mount,
    cgroup_id_of,
    parse_cgroup_path,
)

HEX = [secrets.token_hex(32) for _ in range(6)]
UID = "0d0c3f29-1111-4222-8333-444455556666"

# relative path under the private folder -> (container id, runtime, pod uid, qos, systemd unit)
LAYOUT = {
    f"system.slice/docker-{HEX[0]}.scope": (HEX[0], "docker", "", "", ""),
    f"docker/{HEX[1]}": (HEX[1], "docker", "", "", ""),
    f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{UID.replace('-', '_')}.slice/"
    f"cri-containerd-{HEX[2]}.scope": (HEX[2], "containerd", UID, "burstable", ""),
    f"kubepods/besteffort/pod{UID}/{HEX[3]}": (HEX[3], "", UID, "besteffort", ""),
    f"system.slice/crio-{HEX[4]}.scope": (HEX[4], "cri-o", "", "", ""),
    f"machine.slice/libpod-{HEX[5]}.scope/container": (HEX[5], "podman", "", "", ""),
    "system.slice/nginx.service": ("", "", "", "", "nginx.service"),
}


@pytest.fixture
def cgroup_tree():
    """{relative path: (cgroup id, pid)} of populated cgroups under a private folder; removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create cgroups")
    mount = cgroup2_mount()
    if mount is None:
        pytest.skip("no cgroup2 mount in /proc/self/mountinfo")
    top = Path(mount) / f"hwtest-{secrets.token_hex(4)}"
    try:
        top.mkdir()
    except OSError as e:
        pytest.skip(f"cannot create a cgroup under {mount}: {e}")
    procs: list[subprocess.Popen] = []
    try:
        out = {}
        for rel in LAYOUT:
            d = top / rel
            d.mkdir(parents=True)
            p = subprocess.Popen(["sleep", "120"], start_new_session=True)
            procs.append(p)
            (d / "cgroup.procs").write_text(str(p.pid))
            line = next(ln for ln in Path(f"/proc/{p.pid}/cgroup").read_text().splitlines() if ln.startswith("0::"))
            assert line[3:].endswith(rel), line                  # the kernel agrees the process moved
            out[rel] = (os.stat(d).st_ino, p.pid)
        yield mount, top, out
    finally:
        for p in procs:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait(timeout=10)
        dirs = [Path(dp) for dp, _, _ in os.walk(top)]
        for d in sorted(dirs, key=lambda x: len(x.parts), reverse=True):      # leaves first
            rmdir_cgroup(d)
        assert not top.exists(), f"could not remove {top}"


def rmdir_cgroup(d: Path) -> None:
    """Remove an emptied cgroup, retrying for up to ~2.5 s; gone already is fine."""
    for _ in range(50):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.05)             # the killed process is still leaving the cgroup


def test_real_cgroups_resolve_to_their_workload(cgroup_tree):
    mount, top, tree = cgroup_tree
    r = CgroupResolver(mount, runtime_meta=RuntimeMetadata(docker_root="/nonexistent", containerd_roots=(),
                                                           crio_roots=()))
    for rel, (cgid, _pid) in tree.items():
        info = r.resolve(cgid)
        assert info is not None, rel
        assert info.path == "/" + str((top / rel).relative_to(mount))
        assert cgroup_id_of(mount, info.path) == cgid
        cid, runtime, pod, qos, unit = LAYOUT[rel]
        assert (info.container_id, info.runtime, info.pod_uid, info.pod_qos, info.systemd_unit) == \
            (cid, runtime, pod, qos, unit), rel
        assert info.pod_name == info.pod_namespace == info.container_name == ""   # never from the path
    s = r.stats()
    assert s["walks"] == 1 and s["cache"]["misses"] == len(tree)               # one walk indexed them all
    for cgid, _ in tree.values():
        r.resolve(cgid)
    assert r.stats()["cache"]["hits"] == len(tree)


def test_unknown_id_is_negative_cached_and_walks_are_rate_limited(cgroup_tree):
    mount, _, _ = cgroup_tree
    now = [100.0]
    r = CgroupResolver(mount, clock=lambda: now[0], min_walk_interval_s=1.0, negative_ttl_s=5.0)
    assert r.resolve(2**62) is None and r.stats()["walks"] == 1
    assert r.resolve(2**62 + 1) is None and r.stats()["walks"] == 1           # within the walk interval
    now[0] += 2
    assert r.resolve(2**62) is None and r.stats()["walks"] == 1               # negative cache hit
    assert r.stats()["not_found"] == 2


def test_runtime_metadata_names_only_what_the_runtime_wrote(tmp_path):
    cid_d, cid_c = HEX[0], HEX[2]
    (tmp_path / "docker" / cid_d).mkdir(parents=True)
    (tmp_path / "docker" / cid_d / "config.v2.json").write_text(json.dumps(
        {"Name": "/web-1", "Config": {"Image": "nginx:1.27", "Labels": {}}}))
    (tmp_path / "k8s" / cid_c).mkdir(parents=True)
    (tmp_path / "k8s" / cid_c / "config.json").write_text(json.dumps({"annotations": {
        "io.kubernetes.cri.container-name": "api", "io.kubernetes.cri.image-name": "registry/api:2",
        "io.kubernetes.cri.sandbox-name": "api-7d9f", "io.kubernetes.cri.sandbox-namespace": "shop"}}))
    meta = RuntimeMetadata(docker_root=str(tmp_path / "docker"), containerd_roots=(str(tmp_path / "k8s"),),
                           crio_roots=())
    assert meta.lookup("docker", cid_d) == {"name": "web-1", "image": "nginx:1.27"}
    assert meta.lookup("containerd", cid_c) == {"name": "api", "image": "registry/api:2", "pod_name": "api-7d9f",
                                                "pod_namespace": "shop"}
    assert meta.lookup("containerd", HEX[1]) == {} and meta.lookup("docker", "../../etc") == {}


def test_parse_is_strict_about_what_is_a_container():
    assert parse_cgroup_path("/system.slice/crio-conmon-" + HEX[4] + ".scope").container_id == ""
    assert parse_cgroup_path("/user.slice/user-0.slice/session-3.scope").container_id == ""
    assert parse_cgroup_path("/docker/not-a-container-id").container_id == ""
    g = parse_cgroup_path(f"/kubepods/pod{UID}/{HEX[3]}")
    assert (g.pod_uid, g.pod_qos, g.container_id) == (UID, "guaranteed", HEX[3])
    g = parse_cgroup_path(f"/kubepods.slice/kubepods-pod{UID.replace('-', '_')}.slice/crio-{HEX[4]}.scope")
    assert (g.pod_uid, g.pod_qos, g.runtime) == (UID, "guaranteed", "cri-o")
    assert parse_cgroup_path(f"/libpod_parent/libpod-{HEX[5]}").runtime == "podman"


def test_lru_ttl_cache_bounds():
    now = [0.0]
    c = LruTtlCache(3, ttl_s=10, clock=lambda: now[0])
    for i in range(4):
        c.put(i, str(i))
    assert len(c) == 3 and c.get(0) is None and c.evictions == 1
    c.get(1)                                   # 1 becomes most recent
    c.put(4, "4")
    assert c.get(2) is None and c.get(1) == "1"
    now[0] = 11
    assert c.get(1) is None and c.expirations == 1
    assert 0 < c.stats()["hit_rate"] < 1


def _egress_flow(cgid: int, state: str) -> dict:
    return {"event": {"type": ["start" if state == "open" else "end"]},
            "network": {"iana_number": "6", "direction": "egress", "community_id": "1:abc"},
            "source": {"ip": "10.66.1.2", "port": 41000}, "destination": {"ip": "10.66.2.2", "port": 443},
            "hostwall": {"kind": "flow", "cgroup_id": cgid, "flow": {"state": state}}}


def test_enricher_attributes_egress_by_the_kernel_cgroup_id_and_remembers_the_flow(cgroup_tree):
    from hostwall.collector.enrich import Enricher
    from hostwall.collector.enrich.host import HostInfo
    mount, _, tree = cgroup_tree
    rel = next(r for r in LAYOUT if "cri-containerd" in r)
    cgid, _ = tree[rel]
    enr = Enricher(HostInfo("fw-1"), None, cgroups=CgroupResolver(mount, runtime_meta=RuntimeMetadata(
        docker_root="/nonexistent", containerd_roots=(), crio_roots=())), sockets=False)
    start = _egress_flow(cgid, "open")
    enr.enrich(start)
    assert start["container"] == {"id": HEX[2], "runtime": "containerd"}
    assert start["orchestrator"] == {"type": "kubernetes", "resource": {"type": "pod", "id": UID}}
    assert start["hostwall"]["attribution"] == "cgroup" and start["hostwall"]["pod_qos"] == "burstable"
    end = _egress_flow(0, "closed")                  # e.g. the cgroup is gone by the time the flow ends
    enr.enrich(end)
    assert end["container"] == start["container"] and enr.stats()["from_flow_memory"] == 1
    again = _egress_flow(0, "closed")                # the memory ends with the flow
    enr.enrich(again)
    assert "container" not in again and enr.stats()["unattributed"] == 1
