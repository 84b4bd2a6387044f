"""Enricher.enrich_batch (resolutions reused per lookup key within a batch) against enrich() record by
record: for random batches of flow / deny / log / summary records of both directions, several
workloads (cgroup ids, local sockets, none) and flows that start and end in the batch, the enriched
records (bytes, key order included) and the attribution counters are identical; the resolvers are
asked once per distinct key per batch."""
from __future__ import annotations

import copy

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.collector.enrich import Enricher
from hostwall.collector.enrich.cgroup import parse_cgroup_path
from hostwall.collector.enrich.host import HostInfo
from hostwall.collector.enrich.sockets import SocketOwner

CGROUPS = {7: parse_cgroup_path("/system.slice/docker-" + "ab" * 32 + ".scope", 7),
           8: parse_cgroup_path("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_5678_90ef_"
                                "1234_567890abcdef.slice/cri-containerd-" + "cd" * 32 + ".scope", 8),
           9: parse_cgroup_path("/user.slice/user-0.slice/session-1.scope", 9)}
OWNERS = {("10.0.0.1", 443): SocketOwner(1, 100, "nginx", "/usr/sbin/nginx", 8, "/kubepods.slice/x"),
          ("10.0.0.1", 53): SocketOwner(2, 0, "", "", 0, "/system.slice/named.service"),
          ("10.0.0.2", 443): SocketOwner(3, 200, "envoy", "/usr/bin/envoy", 99, "")}


class Cgroups:
    def __init__(self):
        self.calls = 0

    def resolve(self, cgid):
        self.calls += 1
        return CGROUPS.get(cgid)

    def stats(self):
        return {}


class Sockets:
    def __init__(self):
        self.calls = 0

    def lookup(self, netns, proto, ip, port):
        self.calls += 1
        return OWNERS.get((ip, port))

    def stats(self):
        return {}

    def close(self):
        pass


_record = st.fixed_dictionaries({
    "kind": st.sampled_from(["flow", "flow", "deny", "log", "drop_summary"]),
    "direction": st.sampled_from(["ingress", "egress", None]),
    "local": st.sampled_from([("10.0.0.1", 443), ("10.0.0.1", 53), ("10.0.0.2", 443), ("10.0.0.3", 80), ("10.0.0.1", None)]),
    "proto": st.sampled_from(["6", "17", "1"]), "cgid": st.sampled_from([0, 7, 8, 9, 11]),
    "cid": st.sampled_from(["1:a", "1:b", "1:c", None]), "state": st.sampled_from(["open", "closed"]),
    "ifindex": st.sampled_from([None, None, 5]),       # with an interface id: enrich()'s own path in the batch
})


def make(r: dict) -> dict:
    ip, port = r["local"]
    local, peer = {"ip": ip}, {"ip": "198.51.100.9"}
    if port is not None:
        local["port"], peer["port"] = port, 40000
    src, dst = (peer, local) if r["direction"] != "egress" else (local, peer)
    net = {"type": "ipv4", "iana_number": r["proto"]}
    if r["direction"]:
        net["direction"] = r["direction"]
    if r["cid"]:
        net["community_id"] = r["cid"]
    hw = {"kind": r["kind"], "schema_version": "1.1.0", "verdict": "allow", "hook": "xdp_ingress", "cgroup_id": r["cgid"]}
    if r["kind"] == "flow":
        hw["flow"] = {"state": r["state"]}
    if r.get("ifindex"):
        hw["interface"] = {"id": r["ifindex"]}
    return {"@timestamp": "2026-12-06T00:00:00.000000Z", "event": {"kind": "event"}, "observer": {"hostname": "h"},
            "hostwall": hw, "network": net, "source": src, "destination": dst}


def enricher() -> tuple[Enricher, Cgroups, Sockets]:
    cg, so = Cgroups(), Sockets()
    return Enricher(HostInfo("h"), None, cgroups=cg, sockets=so), cg, so


@settings(max_examples=200, deadline=None)
@given(batches=st.lists(st.lists(_record, max_size=30), min_size=1, max_size=3))
def test_enrich_batch_equals_enrich_record_by_record(batches):
    one, _, _ = enricher()
    many, cg, so = enricher()
    for b in batches:
        recs = [make(r) for r in b]
        want = copy.deepcopy(recs)
        for r in want:
            one.enrich(r)
        assert many.enrich_batch(recs) == 0
        assert [orjson.dumps(r) for r in recs] == [orjson.dumps(r) for r in want]
    assert {k: v for k, v in many.stats().items() if isinstance(v, int)} == \
           {k: v for k, v in one.stats().items() if isinstance(v, int)}


def test_a_batch_resolves_each_key_once():
    enr, cg, so = enricher()
    recs = [make({"kind": "deny", "direction": "ingress", "local": ("10.0.0.1", 443), "proto": "6", "cgid": 0,
                  "cid": None, "state": "open"}) for _ in range(50)]
    assert enr.enrich_batch(recs) == 0
    assert so.calls == 1 and cg.calls == 1                  # the socket, then its owner's cgroup
    assert enr.stats()["attributed_socket"] == 50
    # one workload's fragments are shared read-only (enrich._apply); each record keeps its own hostwall
    assert all(r["container"] is recs[0]["container"] and r["hostwall"] is not recs[0]["hostwall"] for r in recs[1:])
