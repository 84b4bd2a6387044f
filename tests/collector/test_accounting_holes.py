"""Accounting holes a kill -9 or a rebuild could open in the record path (docs/collector.md "Delivery and
loss", "Restarts"): every record arrives or is counted lost once, with its reason and, where known, its
seqs. A fake kernel (tests/collector/fakes.py); the real path: tests/lab/test_crash_live.py."""
from __future__ import annotations

import json

import uvloop

from hostwall.collector.pipeline import Pipeline
from tests.collector.fakes import FakeSource, MemorySink, StubBuilder, cfg, started, until
from tests.collector.test_delivery import restarted


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

    async def two():
        task = await started(pipe2)
        pipe2.stop()
        await task
    uvloop.run(two())
    assert pipe2.restart.previous == "crash"
    assert pipe2.kernel_while_down == {"budget": 2}
    assert dict(pipe2.ledger.lost_by["kernel"]) == {"budget": 2}


def test_a_journal_rebuild_that_makes_fewer_records_counts_the_rest_lost_with_their_seqs(tmp_path):
    """A conntrack batch rebuilt from the journal (collector/ct_journal.py) by a builder that makes fewer
    records than were journaled (a builder that changed between the runs): the seqs the batch had and the
    rebuild did not fill are counted lost (stage restart, reason journal_rebuild) and named in a loss
    record, and never reused by the next records (the dead run may have written them somewhere)."""
    import asyncio

    from tests.collector.test_delivery import CtIdBuilder, _ct_scan

    class NoUpdates(CtIdBuilder):
        def on_conntrack(self, ek, ee, updates, clock, closed=None):
            return [r for r in super().on_conntrack(ek, ee, updates, clock, closed) if "update" not in r["ident"]]

    src, sink = FakeSource(), MemorySink(durable_gate=asyncio.Event())
    src.scans.append(_ct_scan([101, 102], [201], 7))
    pipe = Pipeline(cfg(tmp_path), src, CtIdBuilder(), [sink], shutdown_timeout_s=0.5)

    async def one():
        task = await started(pipe)
        await until(lambda: len(sink.records) == 3)
        pipe.stop()                                      # never durable: abandoned, as after a crash
        await task
    uvloop.run(one())
    src2 = restarted(src)
    src2.scans.append(_ct_scan([103], [], 20))
    sink2 = MemorySink()
    pipe2 = Pipeline(cfg(tmp_path), src2, NoUpdates(), [sink2])

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
