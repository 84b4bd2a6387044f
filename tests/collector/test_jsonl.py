"""collector.sinks.jsonl: one record per line, size rotation keeping N files, fsync policies, and
every record accounted for (delivered, or lost with a reason)."""
from __future__ import annotations

import asyncio
import errno
import json
import os

import pytest

from hostwall.collector.sinks.base import BaseSink, FullQueuePolicy, SinkUnavailable
from hostwall.collector.sinks.jsonl import JsonlSink

from . import fsync_faults


def recs(n: int, start: int = 0, pad: int = 0) -> list[dict]:
    return [{"event": {"id": f"id-{i}", "dataset": "hostwall.flow"}, "seq": i, "pad": "x" * pad}
            for i in range(start, start + n)]


def run(coro):
    return asyncio.run(coro)


def lines(path) -> list[dict]:
    return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []


def accounted(sink) -> None:
    st = sink.stats()
    assert st["in_flight"] == 0, st


def test_one_record_per_line_and_counts(tmp_path):
    p = tmp_path / "sub" / "flows.jsonl"

    async def go():
        s = JsonlSink(p, fsync="none")
        await s.start()
        await s.send(recs(3))
        await s.send(recs(2, 3))
        await s.close()
        return s
    s = run(go())
    assert [r["seq"] for r in lines(p)] == [0, 1, 2, 3, 4]
    assert s.stats()["delivered"] == 5 and s.stats()["lost"] == {} and s.full_queue_policy is FullQueuePolicy.BLOCK
    assert s.stats()["bytes_written"] == p.stat().st_size
    accounted(s)


def test_appends_to_an_existing_file(tmp_path):
    p = tmp_path / "f.jsonl"
    p.write_text('{"old": 1}\n')

    async def go():
        s = JsonlSink(p, fsync="none", rotate_bytes=1 << 20)
        await s.start()
        assert s.stats()["file_bytes"] == 11
        await s.send(recs(1))
        await s.close()
    run(go())
    assert lines(p) == [{"old": 1}] + recs(1)


def test_rotation_keeps_n_files_each_under_the_limit(tmp_path):
    p = tmp_path / "f.jsonl"
    one = len(json.dumps(recs(1, 40, pad=100)[0], separators=(",", ":"))) + 1     # a 2-digit line

    async def go():
        s = JsonlSink(p, fsync="none", rotate_bytes=one * 10 + 5, rotate_keep=2)
        await s.start()
        for k in range(7):
            await s.send(recs(7, 7 * k, pad=100))       # batches straddle file boundaries
        await s.close()
        return s
    s = run(go())
    files = sorted(x.name for x in tmp_path.iterdir())
    assert files == ["f.jsonl", "f.jsonl.1", "f.jsonl.2"]
    for f in files:
        assert (tmp_path / f).stat().st_size <= one * 10 + 5
    kept = lines(tmp_path / "f.jsonl.2") + lines(tmp_path / "f.jsonl.1") + lines(p)
    seq = [r["seq"] for r in kept]
    assert seq == list(range(49 - len(seq), 49))         # the newest, in order, no gaps
    assert len(lines(tmp_path / "f.jsonl.1")) == 10
    assert s.stats()["rotations"] == 4 and s.stats()["delivered"] == 49


def test_a_line_longer_than_the_limit_gets_its_own_file(tmp_path):
    p = tmp_path / "f.jsonl"

    async def go():
        s = JsonlSink(p, fsync="none", rotate_bytes=100, rotate_keep=3)
        await s.start()
        await s.send(recs(1) + recs(1, 1, pad=300) + recs(1, 2))
        await s.close()
    run(go())
    assert [len(lines(x)) for x in (tmp_path / "f.jsonl.2", tmp_path / "f.jsonl.1", p)] == [1, 1, 1]
    assert lines(tmp_path / "f.jsonl.1")[0]["seq"] == 1


@pytest.mark.parametrize("policy,batches,expect", [("none", 5, 0), ("always", 5, 5), ("interval", 5, 0)])
def test_fsync_policies(tmp_path, monkeypatch, policy, batches, expect):
    calls = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append(fd))

    async def go():
        s = JsonlSink(tmp_path / "f.jsonl", fsync=policy, fsync_interval_s=3600)
        await s.start()
        for k in range(batches):
            await s.send(recs(2, 2 * k))
        during = len(calls)
        await s.close()                                   # close flushes (interval/always)
        return during, s
    during, s = run(go())
    assert during == expect
    assert len(calls) == expect + (1 if policy == "interval" else 0)
    assert s.stats()["delivered"] == 2 * batches


def test_fsync_failure_with_policy_always_is_a_counted_loss(tmp_path, monkeypatch):
    def boom(fd):
        raise OSError(errno.EIO, "I/O error")
    monkeypatch.setattr(os, "fdatasync", boom)

    async def go():
        s = JsonlSink(tmp_path / "f.jsonl", fsync="always")
        await s.start()
        await s.send(recs(4))
        return s
    s = run(go())
    assert s.stats()["lost"] == {"fsync_error": 4} and s.stats()["delivered"] == 0 and s.fsync_errors == 1
    accounted(s)


def test_encode_errors_are_counted_and_the_rest_written(tmp_path):
    p = tmp_path / "f.jsonl"

    async def go():
        s = JsonlSink(p, fsync="none")
        await s.start()
        bad = {"event": {"id": "x"}, "oops": {1, 2}, "hostwall": {"seq": 7, "stream": "events"}}   # a set is not JSON
        await s.send(recs(2) + [bad] + recs(1, 2))
        await s.close()
        return s
    s = run(go())
    assert [r["seq"] for r in lines(p)] == [0, 1, 2]
    assert s.stats()["lost"] == {"encode_error": 1} and s.stats()["delivered"] == 3
    assert "encode" in s.stats()["last_error"]
    # its hostwall.seq is noted, so the pipeline's loss record explains the gap (docs/records.md)
    assert {k: (v.count, v.ranges) for k, v in s.take_lost_seqs().items()} == {("events", "encode_error"): (1, [[7, 7]])}
    accounted(s)


def test_write_errors_are_counted_and_the_file_reopened(tmp_path, monkeypatch):
    p = tmp_path / "f.jsonl"
    real_write = os.write
    fail = {"on": True}

    def write(fd, b):
        if fail["on"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, b)
    monkeypatch.setattr(os, "write", write)

    health = []

    async def go():
        s = JsonlSink(p, fsync="none")
        await s.start()
        await s.send(recs(3))
        health.append(s.health()["state"])
        fail["on"] = False
        await s.send(recs(2, 3))
        health.append(s.health()["state"])
        await s.close()
        return s
    s = run(go())
    # ENOSPC is its own reason (disk_full); the sink is failing until a write succeeds, and both batches
    # are settled (counted lost, or written: fsync none)
    assert s.stats()["lost"] == {"disk_full": 3} and s.stats()["delivered"] == 2
    assert health == ["failing", "ok"] and s.settled_calls == 2 and s.unsettled_calls == 0
    assert "No space left" in s.stats()["last_error"]
    assert [r["seq"] for r in lines(p)] == [3, 4]
    accounted(s)


def test_ocsf_encoding_and_unknown_encoding(tmp_path):
    p = tmp_path / "f.jsonl"

    async def go():
        s = JsonlSink(p, encoding="ocsf", fsync="none")
        await s.start()
        await s.send([{"event": {"id": "x"}, "hostwall": {"kind": "no-such-kind"}}])
        await s.close()
        return s
    s = run(go())
    st = s.stats()
    assert st["delivered"] + st["lost"].get("encode_error", 0) == 1           # mapped, or a counted loss
    with pytest.raises(SinkUnavailable, match="encoding 'xml'"):
        run(JsonlSink(tmp_path / "g.jsonl", encoding="xml").start())


def test_base_sink_counts_a_failed_send():
    class Broken(BaseSink):
        async def _send(self, records):
            self._deliver(1)
            raise RuntimeError("broker gone")

    s = Broken("broken")
    with pytest.raises(RuntimeError):
        run(s.send(recs(5)))
    assert s.stats()["delivered"] == 1 and s.stats()["lost"] == {"sink_error": 4} and s.stats()["in_flight"] == 0
    assert "broker gone" in s.stats()["last_error"]


def test_a_batch_of_many_encode_chunks_rotates_and_counts_like_one(tmp_path, monkeypatch):
    """A batch larger than ENCODE_CHUNK (encoded a chunk at a time): rotation points, order and the
    loss reasons are as for one encoded batch — a write failing in the second chunk loses the rest of
    the batch as disk_full, except the records that cannot be encoded (encode_error)."""
    from hostwall.collector.sinks import jsonl
    monkeypatch.setattr(jsonl, "ENCODE_CHUNK", 10)
    p = tmp_path / "f.jsonl"
    one = len(json.dumps(recs(1, 40, pad=100)[0], separators=(",", ":"))) + 1
    real_write = os.write
    writes = {"n": 0, "fail_at": None}

    def write(fd, b):
        writes["n"] += 1
        if writes["fail_at"] is not None and writes["n"] >= writes["fail_at"]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, b)
    monkeypatch.setattr(os, "write", write)
    bad = {"event": {"id": "x"}, "oops": {1, 2}}

    async def go():
        s = JsonlSink(p, fsync="none", rotate_bytes=one * 7 + 5, rotate_keep=20)
        await s.start()
        await s.send(recs(35, 10, pad=100))                       # 4 chunks, 5 files
        writes["fail_at"] = writes["n"] + 2                         # the second write of the next batch
        await s.send(recs(5, 45, pad=100) + [bad] + recs(14, 50, pad=100) + [bad] + recs(5, 64, pad=100))
        await s.close()
        return s
    s = run(go())
    files = sorted((x for x in tmp_path.iterdir()), key=lambda x: -int(x.suffix[1:]) if x.suffix != ".jsonl" else 0)
    got = [r["seq"] for f in files for r in lines(f)]
    assert all(len(lines(f)) <= 7 for f in files)
    assert got == list(range(10, 10 + len(got)))                  # in order, no gaps
    st = s.stats()
    assert st["lost"] == {"encode_error": 2, "disk_full": 59 - len(got)}
    assert st["delivered"] == len(got) and 35 < len(got) < 69
    accounted(s)


def test_write_and_fsync_losses_note_the_records_seqs(tmp_path, monkeypatch):
    """disk_full, write_error and fsync_error losses note the lost records' hostwall.seq (as encode_error
    does), so the pipeline's loss records explain every gap a consumer of the file sees (docs/records.md
    "Completeness"); the records written before a failing write are not among them."""
    def hw(n: int, start: int) -> list[dict]:
        return [r | {"hostwall": {"seq": r["seq"], "stream": "events"}} for r in recs(n, start)]
    real_write = os.write
    fail = {"errno": None}

    def write(fd, b):
        if fail["errno"] is not None:
            raise OSError(fail["errno"], os.strerror(fail["errno"]))
        return real_write(fd, b)
    monkeypatch.setattr(os, "write", write)

    def noted(s) -> dict:
        return {k: (v.count, v.ranges) for k, v in s.take_lost_seqs().items()}

    async def go():
        s = JsonlSink(tmp_path / "f.jsonl", fsync="none", rotate_bytes=10**6)
        await s.start()
        await s.send(hw(3, 0))
        fail["errno"] = errno.ENOSPC
        await s.send(hw(4, 3))                              # the write fails: all four lost
        await s.send(hw(2, 7))                              # the reopened file's write fails too
        assert noted(s) == {("events", "disk_full"): (6, [[3, 8]])}
        fail["errno"] = errno.EIO
        await s.send(hw(2, 9))
        assert noted(s) == {("events", "write_error"): (2, [[9, 10]])}
        fail["errno"] = None
        await s.close()

        def boom(fd):
            raise OSError(errno.EIO, "I/O error")
        monkeypatch.setattr(os, "fdatasync", boom)
        a = JsonlSink(tmp_path / "g.jsonl", fsync="always")
        await a.start()
        await a.send(hw(3, 11))
        assert noted(a) == {("events", "fsync_error"): (3, [[11, 13]])}
        return s, a
    s, a = run(go())
    assert [r["seq"] for r in lines(tmp_path / "f.jsonl")] == [0, 1, 2]
    assert s.stats()["lost"] == {"disk_full": 6, "write_error": 2} and a.stats()["lost"] == {"fsync_error": 3}


# ---- no batch settles on data no fdatasync covered (a file closed for writing before one did) ---------

def _fdatasync_log(monkeypatch, fail: dict | None = None) -> list[tuple[int, int]]:
    """os.fdatasync replaced: logs (fd, size of the file behind it) and fails with EIO while fail["on"]."""
    log: list[tuple[int, int]] = []

    def sync(fd):
        if fail is not None and fail["on"]:
            raise OSError(errno.EIO, "I/O error")
        log.append((fd, os.fstat(fd).st_size))
    monkeypatch.setattr(os, "fdatasync", sync)
    return log


@pytest.mark.parametrize("policy", ["interval", "always"])
def test_a_failed_write_does_not_settle_what_was_written_before_it_without_an_fdatasync(tmp_path, monkeypatch,
                                                                                          policy):
    """A write that fails closes the file for writing. What the batches before it (interval) or the same
    batch's first chunk (always) wrote there settles only after an fdatasync of *that* file."""
    import hostwall.collector.sinks.jsonl as jsonl_mod
    p = tmp_path / "f.jsonl"
    synced = _fdatasync_log(monkeypatch)
    real, fail = jsonl_mod.write_all, {"after": None}

    def write_all(fd, buf):
        if fail["after"] is not None:
            if fail["after"] == 0:
                raise OSError(errno.EIO, "I/O error")
            fail["after"] -= 1
        real(fd, buf)
    monkeypatch.setattr(jsonl_mod, "write_all", write_all)
    monkeypatch.setattr(jsonl_mod, "ENCODE_CHUNK", 2)       # a batch of 4 is two writes

    async def go():
        s = JsonlSink(p, fsync=policy, fsync_interval_s=3600)
        await s.start()
        if policy == "interval":
            await s.send(recs(2))                          # written, waits for the periodic fdatasync
            fail["after"] = 0
            await s.send(recs(2, 2))                       # fails: counted lost, the file closed for writing
            fail["after"] = None
            before = s.unsettled_calls
            await s.flush()
        else:
            fail["after"] = 1
            await s.send(recs(4))                          # first chunk written, second fails
            before = 0
        return s, before
    s, before = run(go())
    size = p.stat().st_size
    assert size > 0 and synced and synced[0][1] == size, (synced, size)   # the written file's data was synced
    if policy == "interval":
        # the send whose write failed syncs the retired file at once (the earlier batch settles then, not
        # only at the next idle flush)
        assert before == 0 and s.unsettled_calls == 0 and s.stats()["lost"] == {"write_error": 2}
    else:
        assert s.stats()["lost"] == {"write_error": 2} and s.unsettled_calls == 0
    assert [r["seq"] for r in lines(p)] == [0, 1]
    accounted(s)


def test_a_rotated_file_whose_fdatasync_fails_loses_the_batches_it_held_for_good(tmp_path, monkeypatch):
    """interval: a batch takes the file past rotate_bytes; the rotated file's fdatasync fails (once, as
    the kernel reports a writeback error). Every batch that wrote to it is counted lost (fsync_error)
    and settled — a later, successful fdatasync proves nothing about them — and the sink goes on."""
    fsync_faults.failing_by_name(monkeypatch, "f.jsonl.1")
    p = tmp_path / "f.jsonl"
    one = len(json.dumps(recs(1)[0], separators=(",", ":"))) + 1

    async def go():
        s = JsonlSink(p, fsync="interval", fsync_interval_s=3600, rotate_bytes=one * 3, rotate_keep=3)
        await s.start()
        await s.send(recs(2))                          # waits for the periodic fdatasync
        held = s.unsettled_calls
        await s.send(recs(2, 2))                       # record 2 into f.jsonl, then rotation: record 3 new
        after = s.unsettled_calls, s.stats()["lost"], s.stats()["delivered"], s.fsync_errors, len(s._stale)
        await s.send(recs(1, 4))
        await s.close()
        return s, held, after
    s, held, after = run(go())
    assert held == 1
    assert after == (0, {"fsync_error": 4}, 0, 1, 0), after
    assert s.stats()["delivered"] == 1 and s.fsync_errors == 1        # the next batch is delivered as usual
    rotated = p.with_name(p.name + ".1")
    assert [r["seq"] for r in lines(rotated)] == [0, 1, 2] and [r["seq"] for r in lines(p)] == [3, 4]
    accounted(s)


@pytest.mark.parametrize("policy,outcome", [("interval", "fails"), ("always", "succeeds")])
def test_a_send_cancelled_during_its_fdatasync_counts_each_record_once(tmp_path, monkeypatch, policy, outcome):
    """The shutdown deadline cancels a send while its fdatasync runs in the worker thread. That fdatasync
    still decides the fate of what it covered — the cancelled send's records included: they stay in
    flight, unsettled, until close's sync counts them delivered or lost (never `cancelled`, which would
    let the kernel release records a failing sync then loses) — close waits for it rather than closing
    the file under it, and every record is counted exactly once."""
    async def go():
        s = JsonlSink(tmp_path / "f.jsonl", fsync=policy, fsync_interval_s=0 if policy == "always" else 3600)
        await s.start()
        if policy == "interval":
            await s.send(recs(3))                      # waits for the periodic fdatasync
            s.fsync_interval_s = 0                      # the next send runs it
        gate = fsync_faults.held(monkeypatch, fails=outcome == "fails")
        await fsync_faults.cancelled_while_syncing(s, s.send(recs(2, 3)))
        closing = asyncio.ensure_future(s.close())
        await asyncio.sleep(0.02)
        waited = not closing.done()
        gate.set()
        await closing
        return s, waited
    s, waited = run(go())
    st = s.stats()
    assert waited, "close() waited for the running fdatasync"
    if policy == "interval":                           # both batches: their fdatasync failed after all
        assert st["lost"] == {"fsync_error": 5} and st["delivered"] == 0, st
    else:
        assert st["lost"] == {} and st["delivered"] == 2, st
    assert s.unsettled_calls == 0
    accounted(s)


def test_a_send_cancelled_with_no_sync_after_it_stays_in_flight_for_the_shutdown_to_requeue(tmp_path,
                                                                                            monkeypatch):
    """fsync=always, the deadline cancels a send during its fdatasync and close() is cut too: the records
    stay in flight and their call unsettled (the pipeline counts them `requeued` and the kernel keeps
    them), not `cancelled` and settled."""
    async def go():
        s = JsonlSink(tmp_path / "f.jsonl", fsync="always")
        await s.start()
        gate = fsync_faults.held(monkeypatch, fails=False)
        await fsync_faults.cancelled_while_syncing(s, s.send(recs(2)))
        st = s.stats()
        gate.set()
        await s.close()
        return st
    st = run(go())
    assert st["lost"] == {} and st["delivered"] == 0 and st["in_flight"] == 2, st


# ---- a new file's name is made durable with its data (the directory's fsync) ---------------------------

def _dir_fsync_log(monkeypatch, sink_box: dict, fail: dict) -> list[tuple[list[str], int]]:
    """jsonl's fsync_dir replaced: logs (the directory's names, the sink's unsettled calls) at each call,
    and fails with EIO while fail["on"]."""
    import hostwall.collector.sinks.jsonl as jsonl_mod
    log: list[tuple[list[str], int]] = []

    def fsync_dir(path):
        if fail["on"]:
            raise OSError(errno.EIO, "I/O error")
        log.append((sorted(os.listdir(path)), sink_box["s"].unsettled_calls))
    monkeypatch.setattr(jsonl_mod, "fsync_dir", fsync_dir)
    return log


def test_a_created_or_rotated_file_has_its_directory_fsynced_before_its_batches_settle(tmp_path, monkeypatch):
    """fsync=interval: the file created at start and the one rotation creates each get one directory fsync,
    run before the batches written there settle; a batch into a file that already existed needs none."""
    box, fail = {}, {"on": False}
    log = _dir_fsync_log(monkeypatch, box, fail)
    p = tmp_path / "f.jsonl"
    one = len(json.dumps(recs(1)[0], separators=(",", ":"))) + 1

    async def go():
        s = box["s"] = JsonlSink(p, fsync="interval", fsync_interval_s=3600, rotate_bytes=one * 3, rotate_keep=3)
        await s.start()
        await s.send(recs(1))
        await s.flush()                                 # created at start: directory synced, then settled
        first = list(log)
        await s.send(recs(1, 1))
        await s.flush()                                 # same file: no directory fsync
        second = list(log)
        await s.send(recs(2, 2))                        # rotation: a new f.jsonl and f.jsonl.1
        await s.close()
        return s, first, second
    s, first, second = run(go())
    assert first == [(["f.jsonl"], 1)], first
    assert second == first
    assert log[1:] == [(["f.jsonl", "f.jsonl.1"], 1)], log
    assert s.stats()["dir_fsyncs"] == 2 and s.stats()["delivered"] == 4
    accounted(s)


def test_a_failed_directory_fsync_loses_what_it_covered_and_is_tried_again(tmp_path, monkeypatch):
    """fsync=always on a new file whose directory fsync fails: the batch is counted lost (fsync_error),
    not delivered; the next sync fsyncs the directory again, and its batch is delivered."""
    box, fail = {}, {"on": True}
    log = _dir_fsync_log(monkeypatch, box, fail)

    async def go():
        s = box["s"] = JsonlSink(tmp_path / "f.jsonl", fsync="always")
        await s.start()
        await s.send(recs(2))
        lost = dict(s.stats()["lost"])
        fail["on"] = False
        await s.send(recs(1, 2))
        await s.close()
        return s, lost
    s, lost = run(go())
    assert lost == {"fsync_error": 2}
    st = s.stats()
    assert st["delivered"] == 1 and st["dir_fsyncs"] == 1 and s.fsync_errors == 1 and len(log) == 1, st
    accounted(s)


def test_an_existing_file_needs_no_directory_fsync(tmp_path, monkeypatch):
    box, fail = {}, {"on": False}
    log = _dir_fsync_log(monkeypatch, box, fail)
    p = tmp_path / "f.jsonl"
    p.write_text('{"seq":0}\n')

    async def go():
        s = box["s"] = JsonlSink(p, fsync="always")
        await s.start()
        await s.send(recs(1, 1))
        await s.close()
        return s
    s = run(go())
    assert log == [] and s.stats()["delivered"] == 1


def test_an_interval_fsync_error_names_the_seqs_of_every_batch_it_covered(tmp_path, monkeypatch):
    """Under fsync=interval a failed fdatasync loses every batch written since the last good one: they are
    counted `fsync_error` and their hostwall.seq noted, so the loss record explains the gap (before, the
    sink kept no seqs of an interval's batches: a gap `verify` could not explain). Batches of several
    streams, one of them with a hole (an encode error, noted apart) and a call of several batches."""
    def hw(n: int, start: int, stream: str = "events") -> list[dict]:
        return [r | {"hostwall": {"seq": r["seq"], "stream": stream}} for r in recs(n, start)]

    def noted(s) -> dict:
        return {k: (v.count, v.ranges) for k, v in s.take_lost_seqs().items()}
    failing = fsync_faults.failing_by_name(monkeypatch)

    async def go():
        s = JsonlSink(tmp_path / "f.jsonl", fsync="interval", fsync_interval_s=3600, rotate_bytes=10**6)
        await s.start()
        await s.send(hw(2, 0))
        await s.flush()                                     # synced: delivered
        await s.send(hw(3, 2))
        bad = hw(3, 5)
        bad[1]["unencodable"] = object()
        await s.send(bad)
        await s.send_many([hw(2, 8), hw(2, 40, "conntrack")])
        assert noted(s) == {("events", "encode_error"): (1, [[6, 6]])}
        failing.add("f.jsonl")
        await s.flush()
        return s, noted(s)
    s, got = run(go())
    assert got == {("events", "fsync_error"): (7, [[2, 5], [7, 9]]), ("conntrack", "fsync_error"): (2, [[40, 41]])}
    assert s.stats()["lost"] == {"encode_error": 1, "fsync_error": 9} and s.stats()["delivered"] == 2
    accounted(s)
