"""A start on a kernel instance new to the checkpoint (collector/checkpoint.py analyze_restart;
docs/collector.md "Restarts"): its loss counters count from zero (what a build upgrade copied into them
excepted), a start after the checkpoint's instance was drained says so, and a reloaded datapath on the
same boot is not called a `reboot`."""
from __future__ import annotations

import uvloop

from hostwall.collector.checkpoint import Checkpoint, analyze_restart, mark_drained
from hostwall.collector.pipeline import Pipeline
from hostwall.collector.status_view import render_status
from tests.collector.fakes import FakeSource, MemorySink, StubBuilder, cfg, started, until

STRIDE = 128
OLD = {"boot_id": "b", "ring_map_id": 1, "ev_stats_map_id": 2}
NEW = {"boot_id": "b", "ring_map_id": 9, "ev_stats_map_id": 10}


def checkpoint(tmp_path, **extra) -> Checkpoint:
    return Checkpoint(tmp_path / "c.json", {"version": 1, "seq": {"events": 7}, "kernel": OLD, "clean_stop": True,
                                            "ring": {"pos": 4 * STRIDE, "seq": 7, "producer_pos": 4 * STRIDE},
                                            "kernel_loss": {"deny": {"budget": 50}, "dns": {"budget": 4}}, **extra})


def test_an_instance_new_to_the_checkpoint_counts_its_loss_counters_from_zero(tmp_path):
    r = analyze_restart(checkpoint(tmp_path), NEW, 0, STRIDE)
    assert r.baseline == {} and r.events_seq == 7                   # not the kernel's counters as a new zero
    r = analyze_restart(checkpoint(tmp_path), {**NEW, "boot_id": "other"}, 0, STRIDE)
    assert r.previous == "reboot" and r.baseline is None             # another boot: as before


def test_counters_a_build_upgrade_copied_are_not_counted_again(tmp_path):
    """enforcer/control.py _migrate_fqdn copies the DNS record counters into the new build's instance."""
    copied = {"from_ring": 1, "dns": {"emitted": 90, "budget": 6, "write_error": 0}}
    r = analyze_restart(checkpoint(tmp_path), NEW, 0, STRIDE, copied)
    assert r.baseline == {"dns": {"budget": 4}}          # copied from the checkpoint's instance: continue it
    r = analyze_restart(checkpoint(tmp_path), NEW, 0, STRIDE, {**copied, "from_ring": 5})
    assert r.baseline == {"dns": copied["dns"]}          # from one it never read: from the copied values


def test_a_start_after_the_drain_says_drained_not_reboot(tmp_path):
    ck = checkpoint(tmp_path)
    ck.save()
    mark_drained(ck.path, 1)
    r = analyze_restart(Checkpoint.load(ck.path), NEW, 0, STRIDE)
    assert (r.previous, r.lost, r.events_seq, r.new_kernel) == ("drained", {}, 7, True)
    r = analyze_restart(checkpoint(tmp_path, drained_ring=3), NEW, 0, STRIDE)
    assert r.previous == "reloaded"                     # another instance was drained: not this one


def test_the_pipeline_counts_what_a_new_instance_counted_before_its_first_read(tmp_path):
    """Collector stopped → the datapath reloaded (new maps) → the new instance counts ring-full events →
    the next start counts them (stage kernel), seqs continuing."""
    src, sink = FakeSource(), MemorySink()
    src.loss["deny"]["ringbuf_full"] = 5                  # before any collector: not counted (first start)
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])
    uvloop.run(_run(pipe, src, sink, 3))
    new, sink2 = FakeSource(), MemorySink()
    new.ident.update(ring_map_id=9, ev_stats_map_id=10)
    new.loss["deny"]["ringbuf_full"] = 6                  # the new instance, before this collector read it
    pipe2 = Pipeline(cfg(tmp_path), new, StubBuilder(), [sink2])
    uvloop.run(_run(pipe2, new, sink2, 2))
    assert dict(pipe2.ledger.lost_by["kernel"]) == {"ringbuf_full": 6}
    assert pipe2.kernel_while_down == {"ringbuf_full": 6}
    assert [r["hostwall"]["seq"] for r in sink2.records if r["hostwall"]["kind"] == "deny"] == [3, 4]


def test_a_reloaded_datapath_on_the_same_boot_is_not_called_a_reboot(tmp_path):
    """Collector killed with 3 events uncommitted → the datapath reloaded (new maps, same boot id: an
    enforcer restart, an upgrade, a discarded retired instance) → the next start names that cause in its
    restart (status, loss record: reason and message), never `reboot`; the lost backlog is still counted."""
    src, sink = FakeSource(), MemorySink()
    pipe = Pipeline(cfg(tmp_path), src, StubBuilder(), [sink])
    uvloop.run(_run(pipe, src, sink, 3))
    ck = Checkpoint.load(pipe.checkpoint.path)
    ck.ring["producer_pos"] = ck.ring["pos"] + 3 * STRIDE
    ck["clean_stop"] = False
    ck.save()
    new, sink2 = FakeSource(), MemorySink()
    new.ident.update(ring_map_id=9, ev_stats_map_id=10)
    pipe2 = Pipeline(cfg(tmp_path), new, StubBuilder(), [sink2])
    uvloop.run(_run(pipe2, new, sink2, 1))
    assert (pipe2.restart.previous, pipe2.restart.lost) == ("reloaded", {"reloaded": 3})
    [loss] = [r for r in sink2.records if r["hostwall"]["kind"] == "loss"]
    assert (loss["event"]["reason"], loss["hostwall"]["loss"]["previous"]) == ("reloaded", "reloaded")
    assert "reboot" not in loss["message"] and "reloaded datapath" in loss["message"], loss["message"]
    text = render_status({"restart": {**pipe2.restart.as_dict(), "kernel_while_down": {}}})
    assert "reboot" not in text and "restart    after a reloaded datapath" in text, text


async def _run(p, src, sink, n):
    """Start `p`, emit n deny events, wait for them in `sink`, stop."""
    task = await started(p)
    src.emit(n)
    await until(lambda: len([r for r in sink.records if r["hostwall"]["kind"] == "deny"]) >= n)
    p.stop()
    await task
