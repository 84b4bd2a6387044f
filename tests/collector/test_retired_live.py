"""Retired instances on the real datapath (bpf/retired.py, collector/retired_drain.py; docs/collector.md
"Detach"): a clean detach while no collector holds the maps keeps them pinned for the collector, which
drains them at its next start; a retired instance discarded by the bound is reported as loss."""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
from collections import Counter

import pytest
import uvloop

from hostwall.bpf import bpfsys, retired
from hostwall.bpf.ringbuf import RingBuffer
from hostwall.bpf.state import InstanceState

from .test_kernel_live import POLICY, egress, tcp_in, tcp_out, udp_in, xdp

pytestmark = pytest.mark.bpf

N_LOG = 37                      # `log` events produced while no collector runs
EVENTS = 2 * N_LOG + 2          # traffic(): a log event and a flow start per UDP flow, a deny, a TCP flow start


@pytest.fixture(scope="module")
def datapath():
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)")
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.datapath import Datapath
    from hostwall.enforcer.policy import parse_policy
    dp = Datapath.load()
    pol = parse_policy(POLICY)
    dp.install(compile_policy(pol, {r.name: i for i, r in enumerate(pol.rules)}, 1))
    yield dp, pol
    dp.close()


@pytest.fixture
def pin(datapath, tmp_path, monkeypatch):
    """A fresh pin of the module's datapath, its state dir, and cleanup of the pin and its retired dir."""
    dp, pol = datapath
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path / "state"))
    p = f"/sys/fs/bpf/hostwall-test/retire-{secrets.token_hex(3)}"
    dp.set_config(detached_ns=0)
    dp.clear_conntrack()
    dp.pin(p)
    InstanceState(pin_dir=p, build="live", slots={r.name: i for i, r in enumerate(pol.rules)},
                  revision_id=1).save()          # no interface: every one is detached, the note is written
    try:
        yield p
    finally:
        from hostwall.enforcer.datapath import Datapath
        Datapath.unpin(p)
        Datapath.unpin(retired.root(p))


def traffic(dp) -> None:
    """N_LOG log events, one denied packet (a drop key), one established TCP connection (tracked)."""
    for i in range(N_LOG):
        assert xdp(dp, udp_in(src="10.0.0.5", sport=6000 + i, dport=514)) == 2     # action log: passes
    assert xdp(dp, udp_in(src="198.51.100.7", dport=9999)) == 1                  # rule bad: dropped
    xdp(dp, tcp_in(src="10.0.0.8"))
    egress(dp, tcp_out("SA", dst="10.0.0.8"))
    xdp(dp, tcp_in(src="10.0.0.8", flags="A"))


def consume_ring(p: str) -> None:
    with RingBuffer.open(f"{p}/maps/hw_events") as rb:
        while rb.read(1 << 16).consumed_bytes:
            pass


def test_a_clean_detach_retires_the_maps_only_when_a_collector_reads_the_pin_dir(datapath, pin):
    from hostwall.enforcer import control
    dp, _ = datapath
    ring_id = bpfsys.map_info(dp.map_fds["hw_events"]).id
    assert control.detach(pin) == [] and not os.path.exists(pin)
    assert retired.listing(pin) == []                       # no collector checkpoint: unpinned as before
    dp.set_config(detached_ns=0)
    dp.pin(pin)
    InstanceState(pin_dir=pin, build="live").save()
    retired.collector_checkpoint(pin).write_text("{}")
    assert control.detach(pin) == [] and not os.path.exists(pin)
    [r] = retired.listing(pin)
    assert int(r.name) == int(dp.config()["detached_ns"]) > 0
    assert sorted(os.listdir(r)) == ["maps"]                # the programs are unpinned
    fd = bpfsys.obj_get(str(r / "maps" / "hw_events"))
    try:
        assert bpfsys.map_info(fd).id == ring_id            # the same kernel maps: a checkpoint still names them
    finally:
        os.close(fd)
    assert json.loads(retired.state_copy(pin, int(r.name)).read_text())["pin_dir"] == pin


def collector_cfg(pin: str, out):
    from hostwall.collector.config import load_config
    cfg = load_config(None, args={"pin_dir": pin, "sinks": [f"jsonl:{out}"]})
    return dataclasses.replace(cfg, drop_interval_s=0.25, ct_scan_interval_s=0.5, status_interval_s=0.2)


def run_briefly(cfg) -> dict:
    """The production pipeline on the live pin dir: start, stop at once; its final status."""
    from hostwall.collector.wiring import build_pipeline
    pipe = build_pipeline(cfg)

    async def go():
        import asyncio
        task = asyncio.ensure_future(pipe.run())
        while pipe.state == "starting" and not task.done():
            await asyncio.sleep(0.01)
        pipe.stop()
        await task
    uvloop.run(go())
    return json.loads(pipe.status_path.read_text())


def records(path) -> list[dict]:
    return [json.loads(line) for line in open(path, "rb") if line.strip()]


def test_a_collector_start_drains_a_retired_instance_before_the_live_one(datapath, pin, tmp_path):
    """Collector stopped → traffic → clean detach (retired) → the next start drains it exactly: the log
    events, the drop summary and the TCP connection's `detach` end, seqs continuing the last run's; the
    retired pins are gone after."""
    from hostwall.collector.retired_drain import drain_retired
    from hostwall.collector.wiring import build_pipeline
    from hostwall.enforcer import control
    dp, _ = datapath
    cfg, out, before = read_then_traffic(dp, pin, tmp_path)
    control.detach(pin)
    [r] = retired.listing(pin)

    got = uvloop.run(drain_retired(cfg, build_pipeline))
    assert got is not None and [g["detached_ns"] for g in got] == [int(r.name)]
    assert retired.listing(pin) == [] and not retired.root(pin).exists()
    assert not retired.state_copy(pin, int(r.name)).exists()
    new = records(out)[before:]
    kinds = Counter(x["hostwall"]["kind"] for x in new)
    assert kinds["log"] == N_LOG, kinds
    [drops] = [x for x in new if x["hostwall"]["kind"] == "drop_summary"]
    assert drops["hostwall"]["source"]["prefix"] == "198.51.100.0/24" and drops["event"]["reason"] == "policy_deny"
    ends = Counter((e["hostwall"]["flow"]["end_reason"], e["network"]["transport"]) for e in new
                   if e["hostwall"]["kind"] == "flow" and e["event"]["type"] == ["end"])
    assert ends == {("detach", "tcp"): 1, ("detach", "udp"): N_LOG}, ends     # each tracked flow ends once
    seqs = sorted(x["hostwall"]["seq"] for x in records(out) if x["hostwall"]["stream"] == "events")
    assert seqs == list(range(len(seqs)))                   # exact across the two runs: no gap, no repeat


def test_the_bound_discards_the_oldest_retired_instance_and_the_collector_reports_it(datapath, pin, tmp_path):
    """A fifth retired instance discards the oldest: what it held (unread events, tracked connections, drop
    keys) is noted, and the next collector reports it as loss `retired_discarded` (counted, not silent)."""
    dp, _ = datapath
    consume_ring(pin)
    from hostwall.collector.kernel import KernelSource
    with KernelSource(pin) as ks:
        ks.drain_drops()
        ks.drain_drops()                                    # both drop generations empty
    traffic(dp)
    for ns in range(1, retired.MAX_RETIRED + 2):
        dp.pin(pin)
        retired.retire(pin, ns, None)
    assert [int(p.name) for p in retired.listing(pin)] == list(range(2, retired.MAX_RETIRED + 2))
    [note] = retired.discarded(pin)
    assert {k: note[k] for k in ("detached_ns", "reason", "events", "connections", "drop_keys")} == \
        {"detached_ns": 1, "reason": "retired_discarded", "events": EVENTS, "connections": N_LOG + 1, "drop_keys": 1}
    for p in retired.listing(pin):
        retired.remove(pin, p)
    dp.pin(pin)
    consume_ring(pin)
    st = run_briefly(collector_cfg(pin, tmp_path / "flows.jsonl"))
    assert st["ledger"]["lost_by_stage"]["restart"] == {"retired_discarded": EVENTS + N_LOG + 2}
    [rec] = [x for x in records(tmp_path / "flows.jsonl") if x["hostwall"]["kind"] == "loss"]
    assert (rec["event"]["action"], rec["hostwall"]["loss"]["reason"]) == ("collector-restart", "retired_discarded")
    assert rec["hostwall"]["loss"]["lost"] == {"retired_discarded": EVENTS + N_LOG + 2}
    assert retired.discarded(pin) == []                     # reported once: the note is gone


def read_then_retired(dp, pin: str, tmp_path):
    """A collector read the instance and stopped; then traffic; then a clean detach retired it. Returns the
    collector's config, its JSONL and the retired instance."""
    from hostwall.enforcer import control
    cfg, out, _ = read_then_traffic(dp, pin, tmp_path)
    control.detach(pin)
    [r] = retired.listing(pin)
    return cfg, out, r


def read_then_traffic(dp, pin: str, tmp_path):
    """A collector read the instance and stopped (its checkpoint names it); then traffic(). Returns the
    collector's config, its JSONL and how many records it holds before the traffic."""
    out = tmp_path / "flows.jsonl"
    cfg = collector_cfg(pin, out)
    consume_ring(pin)
    run_briefly(cfg)
    before = len(records(out))
    traffic(dp)
    return cfg, out, before


def test_a_discard_skips_the_retired_instance_a_collector_is_draining(datapath, pin, tmp_path):
    """`detach --discard-retired` while a collector drains the instance: the discard would note its records
    lost while the collector delivers them (counted twice). The collector's reader lock makes them
    exclusive: the discard skips it, the drain delivers everything and nothing is counted lost."""
    import asyncio

    from hostwall.collector.retired_drain import drain_retired
    from hostwall.collector.wiring import build_pipeline
    from hostwall.enforcer import control
    dp, _ = datapath
    cfg, out, r = read_then_retired(dp, pin, tmp_path)

    async def discard_while_draining():
        pipe = build_pipeline(cfg, r)
        task = asyncio.ensure_future(pipe.run())
        while pipe.state == "starting" and not task.done():
            await asyncio.sleep(0.01)
        try:
            return await asyncio.to_thread(control.discard_retired, pin)    # another process would do the same
        finally:
            pipe.stop()
            await task
            pipe.release_reader()
    assert uvloop.run(discard_while_draining()) == []
    assert retired.listing(pin) == [r] and retired.discarded(pin) == []
    assert uvloop.run(drain_retired(cfg, build_pipeline)) is not None
    assert retired.listing(pin) == []
    new = records(out)
    assert Counter(x["hostwall"]["kind"] for x in new)["log"] == N_LOG
    assert not [x for x in new if x["hostwall"]["kind"] == "loss"]
    assert retired.discarded(pin) == []


def test_a_discard_killed_between_its_note_and_the_unpin_is_not_counted_lost_as_well(datapath, pin, tmp_path):
    """kill -9 of a discard after it appended its note, before the unpin: the instance is still pinned and
    the next collector drains it (every record delivered), so the note must not be counted lost too."""
    from hostwall.collector.retired_drain import drain_retired
    from hostwall.collector.wiring import build_pipeline
    dp, _ = datapath
    cfg, out, r = read_then_retired(dp, pin, tmp_path)
    held = {"detached_ns": int(r.name), "reason": "operator_discarded", "at": 0.0, **retired.holdings(r)}
    retired._write_synced(retired.discard_note(pin), (json.dumps(held) + "\n").encode(), "ab")   # then killed
    assert uvloop.run(drain_retired(cfg, build_pipeline)) is not None
    new = records(out)
    assert Counter(x["hostwall"]["kind"] for x in new)["log"] == N_LOG
    assert not [x for x in new if x["hostwall"]["kind"] == "loss"]
    assert retired.discarded(pin) == [] and retired.listing(pin) == []
    dp.pin(pin)
    st = run_briefly(cfg)
    assert not st["ledger"]["lost_by_stage"].get("restart"), st["ledger"]["lost_by_stage"]


class Killed(BaseException):
    """kill -9 at this point of the code (nothing after it runs)."""


def test_an_unpin_killed_midway_leaves_no_half_instance_a_start_fails_on(datapath, pin, tmp_path, monkeypatch):
    """kill -9 in a discard's (or a drain's) unpin, after some of the maps' pins were unlinked: a
    half-pinned instance listed as retired would make every collector start fail (`missing maps`) and
    its note would not be counted. It must drop out of the listing at once, its note count as lost, and
    what is left of its pins go at the next collector start."""
    import shutil

    from hostwall.collector.retired_drain import drain_retired
    from hostwall.collector.wiring import build_pipeline
    from hostwall.enforcer.datapath import Datapath
    dp, _ = datapath
    cfg, out, r = read_then_retired(dp, pin, tmp_path)
    real = shutil.rmtree

    def killed(path, ignore_errors=False):
        os.unlink(os.path.join(path, "maps", "hw_drops0"))
        raise Killed
    monkeypatch.setattr(retired.shutil, "rmtree", killed)
    with pytest.raises(Killed):
        retired.discard(pin, r, reason="operator_discarded")
    monkeypatch.setattr(retired.shutil, "rmtree", real)
    assert retired.listing(pin) == []
    assert uvloop.run(drain_retired(cfg, build_pipeline)) == []
    assert not retired.root(pin).exists()                   # the half instance's pins are gone too
    Datapath.unpin(pin)
    dp.pin(pin)             # the module's datapath again (its ring read elsewhere: the restart also says crash)
    consume_ring(pin)
    st = run_briefly(cfg)
    assert st["ledger"]["lost_by_stage"]["restart"]["operator_discarded"] == EVENTS + N_LOG + 2
    assert retired.discarded(pin) == []


def test_a_stop_on_a_full_state_disk_still_retires_the_maps(datapath, pin, monkeypatch):
    """A full state disk at the enforcer's stop: neither the state copy (rule names only) nor the note of
    the discard the bound asks for can be written. The detach must not fail half-way (a traceback, the
    programs left pinned, the state kept): the maps are retired without their copy, and the oldest is kept
    (more than MAX_RETIRED for a while) rather than unpinned without its note."""
    import errno

    from hostwall.enforcer import control
    dp, _ = datapath
    for ns in range(1, retired.MAX_RETIRED + 1):
        dp.pin(pin)
        retired.retire(pin, ns, None)
    dp.pin(pin)
    real = retired._write_synced

    def full(path, data, mode):
        if path.name.startswith(f"{retired.instance_stem(pin)}.retired-"):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real(path, data, mode)
    monkeypatch.setattr(retired, "_write_synced", full)
    retired.collector_checkpoint(pin).parent.mkdir(parents=True, exist_ok=True)
    retired.collector_checkpoint(pin).write_text("{}")
    assert control.detach(pin) == [] and not os.path.exists(pin)
    got = retired.listing(pin)
    assert len(got) == retired.MAX_RETIRED + 1 and int(got[-1].name) == int(dp.config()["detached_ns"])
    assert not retired.state_copy(pin, int(got[-1].name)).exists() and retired.discarded(pin) == []


def discard_oldest(dp, pin: str) -> dict:
    """Retire the pinned instance as the oldest, then MAX_RETIRED more: the bound discards it. Its note."""
    for ns in range(1, retired.MAX_RETIRED + 2):
        dp.pin(pin)
        retired.retire(pin, ns, None)
    [note] = retired.discarded(pin)
    assert note["detached_ns"] == 1
    return note


def test_a_discard_note_counts_only_the_connections_whose_end_no_one_reports(datapath, pin):
    """The note's `connections` are records lost: only connections whose end no one has reported or will
    report (what a detach scan would report: collector/ct_scan.py). Not a FIN close reported durable (left
    live until its timeout), not one claimed by a collector (its batch is journaled: the journal replays
    it whatever the instance), not one whose flow_end the datapath emitted (an event: counted in
    `events` while unread). Here only the established TCP connection of traffic() is left."""
    from hostwall.collector.kernel import KernelSource
    dp, _ = datapath
    consume_ring(pin)
    traffic(dp)                                             # N_LOG UDP flows, one established TCP connection
    xdp(dp, tcp_in(src="10.0.0.22"))                        # closed by both FINs
    egress(dp, tcp_out("SA", dst="10.0.0.22"))
    xdp(dp, tcp_in(src="10.0.0.22", flags="FA"))
    egress(dp, tcp_out("FA", dst="10.0.0.22"))
    with KernelSource(pin) as ks:
        now = ks.now_ns()
        closes = ks.scan_conntrack(now + 3 * 10**9, 0, 2 * 10**9)
        assert closes.closed == 1 and closes.expired == 0
        for f in closes.families:
            ks.free_claims(f)                               # its close record durable: REPORTED_DURABLE
        idle = ks.scan_conntrack(now + 15 * 10**9, 0, 2 * 10**9)
        assert idle.expired == N_LOG and idle.closed == 0   # claimed, the collector stopped before durable
    xdp(dp, tcp_in(src="10.0.0.23"))                        # reset: the datapath emitted its flow_end
    egress(dp, tcp_out("SA", dst="10.0.0.23"))
    xdp(dp, tcp_in(src="10.0.0.23", flags="A"))
    egress(dp, tcp_out("R", dst="10.0.0.23"))
    note = discard_oldest(dp, pin)
    assert note["connections"] == 1, note


def test_a_discard_note_does_not_count_the_drop_interval_a_collector_exported(datapath, pin):
    """A collector read a drop interval and shipped it (its checkpoint's `drain` names that generation,
    not cleared yet: collector/sources.py _ship_drain) when its instance was retired: those summaries are
    the collector's, so the note counts only the drop keys never exported — the active generation's."""
    from hostwall.collector.checkpoint import Checkpoint
    from hostwall.collector.kernel import KernelSource
    dp, _ = datapath
    consume_ring(pin)
    with KernelSource(pin) as ks:
        ks.drain_drops()
        ks.drain_drops()                                    # both drop generations empty
        assert xdp(dp, udp_in(src="198.51.100.7", dport=9999)) == 1
        d = ks.read_drops()                                 # exported, not cleared: the drain is pending
        assert len(d.keys) == 1
        ck = Checkpoint(retired.collector_checkpoint(pin))
        ck["kernel"] = ks.identity()
        ck["drain"] = {"gen": d.gen, "t0": 0, "t1": 1, "seq_base": 0, "n": 1}
        ck.save()
    assert xdp(dp, udp_in(src="198.51.100.8", dport=9999)) == 1     # a key of the interval after it
    note = discard_oldest(dp, pin)
    assert note["drop_keys"] == 1, note


def test_a_drain_whose_pipeline_never_starts_gives_up_within_its_bound(datapath, pin, tmp_path, monkeypatch):
    """A drain pipeline that never reaches `running` (a sink whose start hangs: an unreachable broker, a
    stuck kernel call) must not keep `run` waiting forever: after DRAIN_START_S the drain gives up with one
    line naming the instance, and the instance stays pinned (nothing of it is lost)."""
    import asyncio

    from hostwall.collector import retired_drain
    from hostwall.collector.wiring import build_pipeline
    dp, _ = datapath
    cfg, out, r = read_then_retired(dp, pin, tmp_path)
    monkeypatch.setattr(retired_drain, "DRAIN_START_S", 0.5, raising=False)

    def stuck(cfg, path):
        pipe = build_pipeline(cfg, path)
        pipe.slots[0].sink.start = asyncio.Event().wait        # never returns
        return pipe

    async def drain():
        return await asyncio.wait_for(retired_drain.drain_retired(cfg, stuck), 20)
    with pytest.raises(retired_drain.RetiredNotDrained, match=f"{r}.*did not start within 0.5 s"):
        uvloop.run(drain())
    assert retired.listing(pin) == [r]
    assert uvloop.run(retired_drain.drain_retired(cfg, build_pipeline)) is not None     # drained after all
    assert Counter(x["hostwall"]["kind"] for x in records(out))["log"] == N_LOG


def _percpu(value: bytes) -> bytes:
    """One CPU's value for a per-CPU map update, zero on every other CPU (values rounded to 8 bytes)."""
    size = (len(value) + 7) // 8 * 8
    return value.ljust(size, b"\0") + b"\0" * size * (bpfsys.possible_cpus() - 1)


def test_a_discard_note_counts_the_aggregations_it_frees(datapath, pin):
    """Flow aggregation keys (a flow summary each) and non-zero overflow slots of the drop and flow
    aggregations (an overflow summary each) that no collector exported are records a discard frees too:
    the note counts them, in both generations (none exported here), and lost_records adds them."""
    import numpy as np

    from hostwall.bpf import layout as L
    dp, _ = datapath
    consume_ring(pin)
    from hostwall.collector.kernel import KernelSource
    with KernelSource(pin) as ks:
        ks.drain_drops()
        ks.drain_drops()                                    # both generations empty
    for gen, port in ((0, 80), (1, 443)):                   # one flow summary key in each generation
        k = np.zeros(1, L.DTYPES["hw_flow_key"])
        k["peer"][0][:4] = (198, 51, 100, gen)
        k["dport"], k["proto"], k["family"], k["prefix_len"] = port, 6, 4, 24
        v = np.zeros(1, L.DTYPES["hw_flow_val"])
        v["flows"] = 3
        bpfsys.map_update(dp.map_fds[f"hw_flows{gen}"], k.tobytes(), _percpu(v.tobytes()))
    half = L.C["HW_VERDICTS"] * L.C["HW_REASONS"]
    cnt = np.array([(5, 300)], L.DTYPES["hw_counter"]).tobytes()
    bpfsys.map_update(dp.map_fds["hw_drop_overflow"], (1 * half + 7).to_bytes(4, "little"), _percpu(cnt))
    fv = np.zeros(1, L.DTYPES["hw_flow_val"])
    fv["flows"] = 2
    bpfsys.map_update(dp.map_fds["hw_flow_overflow"], (0 * L.C["HW_AGG_KINDS"] + 1).to_bytes(4, "little"),
                      _percpu(fv.tobytes()))
    note = discard_oldest(dp, pin)
    assert (note["drop_keys"], note["flow_keys"], note["overflow_slots"]) == (0, 2, 2), note
    assert retired.lost_records(note) == note["events"] + note["connections"] + 4
