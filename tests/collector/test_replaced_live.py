"""A replaced instance (a build upgrade: control.start on pins of another build) on the real datapath
(enforcer/control.py `_start`, bpf/retired.py; docs/collector.md "Detach", "Replaced instances"): its
maps are retired like a detached instance's when a collector reads the pin dir, so the next collector
start reads its ring to the end and exports its last drop interval; the connections carried into the
new instance get no end there — only one created in it after the copy ends (`detach`)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
import uvloop

from hostwall.bpf import bpfsys, retired

from .test_kernel_live import egress, tcp_out, udp_in, xdp
from .test_retired_live import (  # noqa: F401 — fixtures
    EVENTS,
    N_LOG,
    datapath,
    pin,
    read_then_traffic,
    records,
)

pytestmark = pytest.mark.bpf

LATE = "10.0.0.77"              # a UDP flow the old datapath opens after its tables were copied


def flow_ends(recs: list[dict]) -> Counter:
    return Counter((r["source"].get("ip"), r["network"]["transport"], r["hostwall"]["flow"]["end_reason"])
                   for r in recs if r["hostwall"]["kind"] == "flow" and r["event"]["type"] == ["end"])


def run_scanning(cfg, scans: int = 2) -> dict:
    """The production pipeline on the live pin dir until it made `scans` conntrack scans; its final status."""
    import asyncio

    from hostwall.collector.wiring import build_pipeline
    pipe = build_pipeline(cfg)

    async def go():
        task = asyncio.ensure_future(pipe.run())
        while pipe.counters["ct_scans"] < scans and not task.done():
            await asyncio.sleep(0.05)
        pipe.stop()
        await task
    uvloop.run(go())
    return json.loads(pipe.status_path.read_text())


def test_a_build_upgrade_while_no_collector_runs_is_drained_by_the_next_start(
        datapath, pin, tmp_path, monkeypatch):  # noqa: F811
    """Collector stopped → traffic → a build upgrade replaces the instance (a flow opened in the old one
    between the copy and the switch) → the next collector start drains the old instance: its log events,
    its drop summary, seqs contiguous, nothing lost, `drained`; no end for the connections carried into the
    new instance, one `detach` end for the late flow; a carried connection that then ends in the new
    instance ends exactly once."""
    from hostwall.collector.retired_drain import drain_retired
    from hostwall.collector.wiring import build_pipeline
    from hostwall.enforcer import control
    dp, pol = datapath
    cfg, out, before = read_then_traffic(dp, pin, tmp_path)    # a collector read this instance, then stopped
    copy_fqdn = control._migrate_fqdn

    def after_the_copy(pin_dir, new):                       # the old programs still run until the switch
        assert xdp(dp, udp_in(src=LATE, sport=7000, dport=514)) == 2
        return copy_fqdn(pin_dir, new)
    monkeypatch.setattr(control, "_migrate_fqdn", after_the_copy)
    new, _, res = control.start(pol, pin, [], None)         # the pinned state says build "live": replaced
    try:
        assert not res.adopted and res.migrated_conntrack == N_LOG + 1
        [r] = retired.listing(pin)
        got = uvloop.run(drain_retired(cfg, build_pipeline))
        assert got is not None and [g["detached_ns"] for g in got] == [int(r.name)]
        assert retired.listing(pin) == []
        drained = records(out)[before:]
        kinds = Counter(x["hostwall"]["kind"] for x in drained)
        assert kinds["log"] == N_LOG + 1, kinds
        assert [x["event"]["reason"] for x in drained if x["hostwall"]["kind"] == "drop_summary"] == ["policy_deny"]
        assert flow_ends(drained) == {(LATE, "udp", "detach"): 1}, flow_ends(drained)

        egress(new, tcp_out("R", dst="10.0.0.8"))           # the carried TCP connection ends in the new instance
        st = run_scanning(cfg)                              # the UDP flows carried over have expired there
        assert st["restart"]["previous"] == "drained" and st["restart"]["lost"] == {}, st["restart"]
        assert st["ledger"]["ok"], st["ledger"]
        everything = records(out)
        assert flow_ends(everything) == {(LATE, "udp", "detach"): 1, ("10.0.0.8", "tcp", "rst"): 1,
                                         ("10.0.0.5", "udp", "idle_timeout"): N_LOG}, flow_ends(everything)
        assert len({x["event"]["id"] for x in everything}) == len(everything)     # each end once
        seqs = sorted(x["hostwall"]["seq"] for x in everything if x["hostwall"]["stream"] == "events")
        assert seqs == list(range(len(seqs)))               # no gap, no repeat across the three runs
    finally:
        new.close()


def test_a_build_upgrade_without_a_collector_checkpoint_unpins_the_old_instance(datapath, pin):  # noqa: F811
    """No collector reads the pin dir: nothing to keep, the old maps are unpinned as before."""
    from hostwall.enforcer import control
    dp, pol = datapath
    old_ring = bpfsys.map_info(dp.map_fds["hw_events"]).id
    new, _, res = control.start(pol, pin, [], None)
    try:
        assert not res.adopted and retired.listing(pin) == []
        assert retired.ring_id(pin) == bpfsys.map_info(new.map_fds["hw_events"]).id != old_ring
    finally:
        new.close()


def test_a_build_upgrade_that_cannot_retire_the_old_instance_counts_what_it_frees(
        datapath, pin, tmp_path, monkeypatch):  # noqa: F811
    """A build upgrade whose old maps are laid out otherwise (`_same_layouts` patched False: a real other
    layout needs another BPF object) cannot retire them: the unpin frees the ring's unread events, the
    unexported drop interval and the flow opened after the copy. With a collector checkpoint they are
    noted, and the next collector start reports them as loss `replaced_unreadable` (counted, not silent)."""
    from hostwall.enforcer import control
    dp, pol = datapath
    cfg, out, _ = read_then_traffic(dp, pin, tmp_path)
    copy_fqdn = control._migrate_fqdn

    def after_the_copy(pin_dir, new):
        assert xdp(dp, udp_in(src=LATE, sport=7000, dport=514)) == 2     # a log event and a flow start
        return copy_fqdn(pin_dir, new)
    monkeypatch.setattr(control, "_migrate_fqdn", after_the_copy)
    monkeypatch.setattr(control, "_same_layouts", lambda old, new: False)
    old_ring = bpfsys.map_info(dp.map_fds["hw_events"]).id
    new, _, res = control.start(pol, pin, [], None)
    try:
        assert not res.adopted and retired.listing(pin) == []
        [note] = retired.discarded(pin)
        assert {k: note[k] for k in ("reason", "events", "connections", "drop_keys", "ring_map_id")} == \
            {"reason": "replaced_unreadable", "events": EVENTS + 2, "connections": 1, "drop_keys": 1,
             "ring_map_id": old_ring}
        lost = EVENTS + 2 + 1 + 1
        st = run_scanning(cfg, scans=1)
        assert st["ledger"]["lost_by_stage"]["restart"] == {"replaced_unreadable": lost}, st["ledger"]
        assert st["restart"]["lost"] == {"replaced_unreadable": lost}, st["restart"]
        [rec] = [x for x in records(out) if x["hostwall"]["kind"] == "loss"]
        assert rec["hostwall"]["loss"]["lost"] == {"replaced_unreadable": lost}
        assert retired.discarded(pin) == []                 # reported once: the note is gone
    finally:
        new.close()


def test_a_crashed_collector_s_backlog_is_not_counted_again_beside_the_replacement_note(
        datapath, pin, tmp_path, monkeypatch):  # noqa: F811
    """The collector died (no clean stop) having seen the traffic's events produced but not committed them;
    then an upgrade that cannot retire the old instance notes them (`replaced_unreadable`). Its next start
    must not count them a second time as `reboot` (the backlog its checkpoint saw: the same events)."""
    from hostwall.bpf.ringbuf import RingBuffer
    from hostwall.enforcer import control
    dp, pol = datapath
    cfg, out, _ = read_then_traffic(dp, pin, tmp_path)
    ck_path = retired.collector_checkpoint(pin)
    ck = json.loads(ck_path.read_text())
    with RingBuffer.open(f"{pin}/maps/hw_events") as rb:
        ck["ring"]["producer_pos"] = rb.producer_pos        # as the crashed collector last saw it
    ck["clean_stop"] = False
    ck_path.write_text(json.dumps(ck))
    monkeypatch.setattr(control, "_same_layouts", lambda old, new: False)
    new, _, _ = control.start(pol, pin, [], None)
    try:
        [note] = retired.discarded(pin)
        assert (note["events"], note["connections"], note["drop_keys"]) == (EVENTS, 0, 1)
        lost = EVENTS + 1                                   # the events and the drop key, once
        st = run_scanning(cfg, scans=1)
        assert st["restart"]["lost"] == {"replaced_unreadable": lost}, st["restart"]
        assert st["ledger"]["lost_by_stage"]["restart"] == {"replaced_unreadable": lost}, st["ledger"]
    finally:
        new.close()


def test_a_start_over_a_pin_dir_without_maps_notes_nothing(datapath, pin, tmp_path):  # noqa: F811
    """The old state names another build but no maps are pinned (a replacement killed after it retired
    them, before it pinned the new instance): nothing is freed, so no `replaced_unreadable` note (the
    collector would report a loss record of nothing)."""
    from hostwall.enforcer import control
    from hostwall.enforcer.datapath import Datapath
    dp, pol = datapath
    read_then_traffic(dp, pin, tmp_path)
    Datapath.unpin(pin)
    new, _, res = control.start(pol, pin, [], None)
    try:
        assert not res.adopted and retired.discarded(pin) == []
    finally:
        new.close()
