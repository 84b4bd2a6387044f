"""Accounting holes a kill -9 or a rebuild could open in the record path (docs/collector.md "Delivery and
loss", "Restarts"): every record arrives or is counted lost once, with its reason and, where known, its
seqs. A fake kernel (tests/collector/fakes.py); the real path: tests/lab/test_crash_live.py."""
from __future__ import annotations

import asyncio
import json

import uvloop

from hostwall.collector.pipeline import Pipeline
from tests.collector.fakes import FakeSource, MemorySink, StubBuilder, cfg, started, until
from tests.collector.test_delivery import CtIdBuilder, _ct_scan, restarted


def _start_stop(pipe) -> None:
    """Start and stop at once (a start's recovery, then a clean stop)."""
    async def go():
        task = await started(pipe)
        pipe.stop()
        await task
    uvloop.run(go())


def _published_kernel_loss(status_path) -> dict:
    try:
        st = json.loads(status_path.read_text())
    except (OSError, ValueError):
        return {}
    return dict((st.get("ledger") or {}).get("lost_by_stage", {}).get("kernel") or {})


def test_a_kernel_loss_reported_in_an_idle_stretch_is_not_counted_again_after_a_crash(tmp_path):
    """An idle collector makes no commits. A kernel loss it counted (and published in its status) must
    still be in the checkpoint's baseline when it is killed, else the next start counts it again under
    kernel_while_down."""
    src, sink = FakeSource(), MemorySink()
    c = cfg(tmp_path)
    pipe = Pipeline(c, src, StubBuilder(), [sink])
    at_kill: dict = {}

    async def one():
        task = await started(pipe)
        src.loss["deny"]["ringbuf_full"] = 5                 # counted by this run, on its tick
        status = tmp_path / "status.json"
        await until(lambda: _published_kernel_loss(status) == {"ringbuf_full": 5})
        at_kill["ck"] = pipe.checkpoint.path.read_bytes()  # what the disk holds at a kill -9 now
        pipe.stop()
        await task
    uvloop.run(one())
    ck = json.loads(at_kill["ck"])
    ck["clean_stop"] = False
    pipe.checkpoint.path.write_text(json.dumps(ck))
    src.loss["deny"]["budget"] = 2                           # while no collector ran: counted next start
    pipe2 = Pipeline(c, restarted(src), StubBuilder(), [MemorySink()])
    _start_stop(pipe2)
    assert pipe2.restart.previous == "crash"
    assert pipe2.kernel_while_down == {"budget": 2}
    assert dict(pipe2.ledger.lost_by["kernel"]) == {"budget": 2}


def test_a_journal_rebuild_that_makes_fewer_records_counts_the_rest_lost_with_their_seqs(tmp_path):
    """A conntrack batch rebuilt from the journal (collector/ct_journal.py) by a builder that makes fewer
    records than were journaled (a builder that changed between the runs): the seqs the batch had and the
    rebuild did not fill are counted lost (stage restart, reason journal_rebuild) and named in a loss
    record, and never reused by the next records (the dead run may have written them somewhere)."""
    src = _journal_batch_never_durable(tmp_path)
    src2 = restarted(src)
    src2.scans.append(_ct_scan([103], [], 20))
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), src2, _builder(_NoUpdates), [sink2])

    async def two():
        task = await started(pipe2)
        await until(lambda: any(r["event"]["id"] == "flow-close-103" for r in sink2.records)
                    and any(r["hostwall"]["kind"] == "loss" for r in sink2.records))
        pipe2.stop()
        await task
    uvloop.run(two())
    got = [(r["event"]["id"], r["hostwall"]["seq"]) for r in sink2.records if r["hostwall"]["stream"] == "conntrack"]
    assert got == [("flow-close-101", 0), ("flow-close-102", 1), ("flow-close-103", 3)]
    assert pipe2.ledger.lost_by["restart"]["journal_rebuild"] == 1
    loss = [r["hostwall"]["loss"] for r in sink2.records if r["hostwall"]["kind"] == "loss"]
    assert [(x["stream"], x["reason"], x["count"], x["ranges"]) for x in loss] == \
        [("conntrack", "journal_rebuild", 1, [[2, 2]])]
    assert pipe2.ledger.check(quiescent=True) == []


# ---- a journal rebuild mismatch seen by more than one start (collector/sources.py _rebuild_mismatch) ------

class _NoUpdates:
    """A CtIdBuilder that changed between the runs: it makes no update records (fewer than journaled)."""

    def on_conntrack(self, ek, ee, updates, clock, closed=None):
        return [r for r in super().on_conntrack(ek, ee, updates, clock, closed) if "update" not in r["ident"]]


class _TwiceUpdates:
    """A CtIdBuilder that changed between the runs: each update twice (more records than journaled)."""

    def on_conntrack(self, ek, ee, updates, clock, closed=None):
        out = super().on_conntrack(ek, ee, updates, clock, closed)
        return out + [dict(r, ident=r["ident"] + "-again") for r in out if "update" in r["ident"]]


class _NothingOfTheBatch:
    """A CtIdBuilder that changed between the runs: no record of the journaled batch (ids below 300)."""

    def on_conntrack(self, ek, ee, updates, clock, closed=None):
        return [r for r in super().on_conntrack(ek, ee, updates, clock, closed)
                if int(r["ident"].rsplit("-", 1)[1]) >= 300]


def _builder(mixin):
    return type(mixin.__name__, (mixin, CtIdBuilder), {})()


def _run_until(pipe, done) -> None:
    """Run `pipe` until done() holds, then stop it (whatever its sinks made durable by then)."""
    async def run() -> None:
        task = await started(pipe)
        await until(done)
        pipe.stop()
        await task
    uvloop.run(run())


def _journal_batch_never_durable(tmp_path) -> FakeSource:
    """Run 1: a 3-record conntrack batch (seqs 0-2) is journaled and never gets durable (abandoned, as
    after a crash). Returns its source, for restarted()."""
    src, sink = FakeSource(), MemorySink(durable_gate=asyncio.Event())
    src.scans.append(_ct_scan([101, 102], [201], 7))
    _run_until(Pipeline(cfg(tmp_path), src, CtIdBuilder(), [sink], shutdown_timeout_s=0.5),
               lambda: len(sink.records) == 3)
    return src


def _journal_batch_then_restarts(tmp_path, builder, runs: int, monkeypatch=None, keep_unannotated=False):
    """Run 1 journals a 3-record conntrack batch (seqs 0-2) that never gets durable; `runs` later starts
    rebuild it with `builder` and never get it durable either (a kill, or a stop before the sinks settled);
    a last start rebuilds it with a durable sink. keep_unannotated: the later starts die between putting
    the loss record in the outbox and noting it in the journal. Returns (ledger journal_rebuild per start,
    the last sink's records)."""
    from hostwall.collector.ct_journal import CtJournal

    src = _journal_batch_never_durable(tmp_path)
    if keep_unannotated:
        monkeypatch.setattr(CtJournal, "annotate", lambda self, *a, **k: None, raising=False)
    counted = []
    for _ in range(runs):
        src = restarted(src)
        s = MemorySink(durable_gate=asyncio.Event())
        p = Pipeline(cfg(tmp_path), src, builder, [s], shutdown_timeout_s=0.5)

        async def again(p=p, s=s):
            task = await started(p)
            await until(lambda: any(r["hostwall"].get("stream") == "conntrack" for r in s.records))
            p.stop()
            await task
        uvloop.run(again())
        counted.append(p.ledger.lost_by.get("restart", {}).get("journal_rebuild", 0))
    if keep_unannotated:
        monkeypatch.undo()
    last = MemorySink()
    p = Pipeline(cfg(tmp_path), restarted(src), builder, [last])

    async def final():
        task = await started(p)
        await until(lambda: any(r["hostwall"].get("stream") == "conntrack" for r in last.records))
        await until(lambda: not p.ct_journal.dir.exists() or len(p.ct_journal) == 0)
        p.stop()
        await task
    uvloop.run(final())
    counted.append(p.ledger.lost_by.get("restart", {}).get("journal_rebuild", 0))
    return counted, last.records


def _rebuild_losses(records) -> list:
    return [(x["stream"], x["count"], x["ranges"]) for r in records if r["hostwall"]["kind"] == "loss"
            for x in [r["hostwall"]["loss"]] if x.get("reason") == "journal_rebuild"]


def _ct(records) -> list:
    return [(r["event"]["id"], r["hostwall"]["seq"]) for r in records if r["hostwall"].get("stream") == "conntrack"]


def test_a_journal_rebuild_with_fewer_records_is_reported_once_across_restarts(tmp_path):
    """The start that finds the mismatch counts it and puts its loss record in the outbox; the batch is
    not durable when it dies, so the next start replays that loss record AND rebuilds the batch again: it
    must not count the same unfilled seq a second time (verify summed 2 lost for a 1-seq gap)."""
    counted, recs = _journal_batch_then_restarts(tmp_path, _builder(_NoUpdates), runs=2)
    assert counted == [1, 0, 0]
    assert _rebuild_losses(recs) == [("conntrack", 1, [[2, 2]])]
    assert _ct(recs) == [("flow-close-101", 0), ("flow-close-102", 1)]


def test_a_rebuild_loss_in_the_outbox_but_not_yet_in_the_journal_is_not_reported_again(tmp_path, monkeypatch):
    """A kill between the outbox append of the loss record and the journal's note of it: the next start
    knows it from the outbox it replays."""
    counted, recs = _journal_batch_then_restarts(tmp_path, _builder(_NoUpdates), runs=1, monkeypatch=monkeypatch,
                                                 keep_unannotated=True)
    assert counted == [1, 0]
    assert _rebuild_losses(recs) == [("conntrack", 1, [[2, 2]])]


def test_a_journal_rebuild_with_more_records_sends_the_batch_and_counts_the_rest_once(tmp_path):
    """More records than journaled: the batch's 3 seqs are filled by the first 3, the extra one is counted
    lost (never numbered: no gap, no loss record), once across restarts."""
    counted, recs = _journal_batch_then_restarts(tmp_path, _builder(_TwiceUpdates), runs=1)
    assert counted == [1, 0]
    assert _rebuild_losses(recs) == []
    assert _ct(recs) == [("flow-close-101", 0), ("flow-close-102", 1), ("flow-update-201", 2)]


# ---- the kernel-loss baseline around a status write that does not land --------------------------------------

def _failing_status(monkeypatch, which: str):
    """write_status raising EIO for the final status ("final") or for every status ("all")."""
    import hostwall.collector.pipeline as P
    real = P.write_status

    def write(path, st):
        if which == "all" or st.get("state") in ("stopped", "failed"):
            raise OSError(5, "EIO")
        return real(path, st)
    monkeypatch.setattr(P, "write_status", write)


def test_kernel_losses_the_final_status_never_showed_are_counted_by_the_next_start(tmp_path, monkeypatch):
    """The stop folds the kernel counters once more; if the final status that would show them does not
    land (EIO, a kill), the checkpoint must keep the old baseline, so the next start counts them under
    kernel_while_down instead of nowhere."""
    src = FakeSource()
    c = cfg(tmp_path, status_interval_s=3600)              # only the start's and the final status
    pipe = Pipeline(c, src, StubBuilder(), [MemorySink()])
    _failing_status(monkeypatch, "final")

    async def one():
        task = await started(pipe)
        src.loss["deny"]["ringbuf_full"] = 5
        pipe.stop()
        await task
    uvloop.run(one())
    assert pipe.ledger.lost_by["kernel"]["ringbuf_full"] == 5
    monkeypatch.undo()
    pipe2 = Pipeline(c, restarted(src), StubBuilder(), [MemorySink()])
    _start_stop(pipe2)
    assert pipe2.kernel_while_down == {"ringbuf_full": 5}


def test_the_restart_record_makes_its_kernel_while_down_the_baseline_even_without_a_status(tmp_path, monkeypatch):
    """The restart record (in the outbox) reports kernel_while_down; with no status write landing after it,
    a kill must still not count those losses again at the next start."""
    src = FakeSource()
    c = cfg(tmp_path)
    pipe = Pipeline(c, src, StubBuilder(), [MemorySink()])
    _start_stop(pipe)

    def crashed() -> None:
        ck = json.loads(pipe.checkpoint.path.read_text())
        ck["clean_stop"] = False
        pipe.checkpoint.path.write_text(json.dumps(ck))
    crashed()
    src.loss["deny"]["budget"] = 2                               # while no collector ran
    _failing_status(monkeypatch, "all")
    sink = MemorySink()
    pipe2 = Pipeline(c, restarted(src), StubBuilder(), [sink])
    at_kill: dict = {}

    async def two():
        task = await started(pipe2)
        await until(lambda: any(r["hostwall"]["kind"] == "loss" for r in sink.records))
        at_kill["ck"] = pipe2.checkpoint.path.read_bytes()
        pipe2.stop()
        await task
    uvloop.run(two())
    monkeypatch.undo()
    assert pipe2.kernel_while_down == {"budget": 2}
    pipe.checkpoint.path.write_bytes(at_kill["ck"])
    crashed()
    pipe3 = Pipeline(c, restarted(src), StubBuilder(), [MemorySink()])
    _start_stop(pipe3)
    assert pipe3.restart.previous == "crash" and pipe3.kernel_while_down == {}


def test_sink_loss_records_rejects_an_unknown_choice(tmp_path):
    import pytest
    pipe = Pipeline(cfg(tmp_path), FakeSource(), StubBuilder(), [MemorySink()])
    with pytest.raises(ValueError):
        pipe._sink_loss_records("acking_only")


def test_a_rebuild_of_no_records_never_gives_its_seqs_to_later_records(tmp_path):
    """Run 1 journals 3 records (seqs 0-2), never durable; run 2 rebuilds them into none (loss record
    for 0-2, journal annotated n=0) and stops before that is durable; run 3's new records must not take
    seqs 0-2, which the loss record calls lost (the journal said n=0: 'durable' by seq_base + n)."""
    src = _journal_batch_never_durable(tmp_path)
    s2 = MemorySink(durable_gate=asyncio.Event())
    _run_until(Pipeline(cfg(tmp_path), restarted(src), _builder(_NothingOfTheBatch), [s2], shutdown_timeout_s=0.5),
               lambda: bool(_rebuild_losses(s2.records)))
    src = restarted(src)
    src.scans.append(_ct_scan([301], [], 20))
    s3 = MemorySink()
    _run_until(Pipeline(cfg(tmp_path), src, _builder(_NothingOfTheBatch), [s3]), lambda: bool(_ct(s3.records)))
    lost = {s for _, _, ranges in _rebuild_losses(s3.records) for lo, hi in ranges for s in range(lo, hi + 1)}
    assert lost == {0, 1, 2}
    assert [seq for _, seq in _ct(s3.records)] == [3]


def test_kept_is_not_called_when_the_outbox_append_failed(tmp_path):
    """A journal rebuild's loss record marks its batch counted (kept) only once it is in the outbox: one
    that exists only in memory would die with the process, and the next start must count it again."""
    pipe = Pipeline(cfg(tmp_path), FakeSource(), StubBuilder(), [MemorySink()])
    kept: list[int] = []

    def broken(_records) -> None:
        raise OSError(28, "No space left on device")

    async def go() -> None:
        task = await started(pipe)
        await pipe._emit_owned([{"hostwall": {"kind": "test"}}], "collector", kept=lambda: kept.append(1))
        pipe.outbox.append = broken
        await pipe._emit_owned([{"hostwall": {"kind": "test"}}], "collector", kept=lambda: kept.append(2))
        pipe.stop()
        await task
    uvloop.run(go())
    assert kept == [1]
    assert pipe.counters["outbox_errors"] == 1
