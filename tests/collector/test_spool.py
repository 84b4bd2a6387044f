"""collector.sinks.spool: in order across segments, bounded, crash-safe (torn tail, CRC errors, a killed
writer), and replay from the cursor after a restart — at-least-once, never a silent loss."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hostwall.collector.sinks.spool import FRAME_OVERHEAD, Spool, SpoolError
from hostwall.collector.sinks.spool_format import SEG_HDR, frame

from . import fsync_faults

SEG = 4096


def run(coro):
    return asyncio.run(coro)


def payload(i: int, size: int = 100) -> bytes:
    head = f"rec-{i:08d}:".encode()
    return head + b"x" * max(0, size - len(head))


def idx(p: bytes) -> int:
    return int(p[4:12])


def make(d: Path, **kw) -> Spool:
    kw.setdefault("segment_bytes", SEG)
    kw.setdefault("max_bytes", 1 << 20)
    kw.setdefault("fsync", "none")
    s = Spool(d, **kw)
    s.open()
    return s


def read_all(s: Spool) -> list[tuple[int, bytes]]:
    out = []
    while True:
        got = s.read(max_records=37, max_bytes=5000)
        if not got:
            return out
        out += got


def segs(d: Path) -> list[Path]:
    return sorted(d.glob("*.seg"))


def test_order_across_segments_ack_deletes_and_cursor(tmp_path):
    async def go():
        s = make(tmp_path)
        assert await s.append([payload(i) for i in range(100)]) == 100
        assert len(segs(tmp_path)) > 2                       # 100 x 116 B over 4 KiB segments
        got = read_all(s)
        assert [q for q, _ in got] == list(range(100))
        assert [idx(p) for _, p in got] == list(range(100))
        assert s.unread == 0 and s.pending == 100
        s.ack(50, 100)                                       # out of order: the cursor waits for 0..49
        assert s.cursor == 0 and s.pending == 50
        s.ack(0, 50)
        assert s.cursor == 100 and s.pending == 0
        assert segs(tmp_path) == [] and s.size_bytes == 0    # everything acknowledged: nothing on disk
        assert await s.append([payload(100)]) == 1           # seqs continue
        assert read_all(s) == [(100, payload(100))]
        await s.close()
    run(go())


def test_restart_replays_from_the_cursor_in_order(tmp_path):
    async def go():
        s = make(tmp_path)
        await s.append([payload(i) for i in range(60)])
        assert [q for q, _ in s.read(max_records=30)] == list(range(30))
        s.ack(0, 25)
        await s.close()
        s2 = make(tmp_path)
        assert s2.recovery.cursor == "file" and s2.recovery.pending == 35
        got = read_all(s2)
        assert [q for q, _ in got] == list(range(25, 60))   # unacknowledged ones again, in order
        assert [idx(p) for _, p in got] == list(range(25, 60))
        await s2.append([payload(60)])                      # new records after the old ones
        assert read_all(s2) == [(60, payload(60))]
        await s2.close()
    run(go())


def test_rewind_rereads_unacknowledged_and_skips_acknowledged(tmp_path):
    async def go():
        s = make(tmp_path)
        await s.append([payload(i) for i in range(80)])
        read_all(s)
        s.ack(0, 10)
        s.ack(30, 50)                                        # delivered out of order before a failure
        s.rewind()
        got = [q for q, _ in read_all(s)]
        assert got == list(range(10, 30)) + list(range(50, 80))
        s.skip_to(80)
        assert s.read() == []
        await s.close()
    run(go())


def test_torn_tail_record_is_cut_at_open(tmp_path):
    async def go():
        s = make(tmp_path)
        await s.append([payload(i) for i in range(50)])
        # no close(): as if the process died; then tear the last record in half
        last = segs(tmp_path)[-1]
        os.truncate(last, last.stat().st_size - 40)
        s._close_reader()
        os.close(s._wfd)
        os.close(s._lockfd)
        s2 = make(tmp_path)
        assert s2.recovery.truncated_bytes == 100 + FRAME_OVERHEAD - 40
        assert s2.recovery.torn_records == 1                # policy none: the append returned, so it was settled
        assert s2.next_seq == 49 and s2.recovery.pending == 49
        assert [q for q, _ in read_all(s2)] == list(range(49))
        assert await s2.append([payload(49)]) == 1          # the lost seq is not reused blindly:
        assert read_all(s2) == [(49, payload(49))]          # it was never acknowledged to anyone
        await s2.close()
    run(go())


def test_a_tail_lost_after_it_was_synced_is_counted_from_the_cursor(tmp_path):
    """A machine crash that lost pages the spool had synced (a lying disk, a damaged file system): the
    cursor file's next_seq says how far appends had durably reached; everything after the last good frame
    up to it is counted."""
    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600)
        await s.append([payload(i) for i in range(60)])
        assert await s.sync() and s.synced_seq == 60
        s._close_reader()
        os.close(s._wfd)
        os.close(s._lockfd)
        seg = segs(tmp_path)[-1]
        with open(seg, "rb") as f:                          # cut inside record 55 (of the last segment)
            data = f.read()
        frame_len = FRAME_OVERHEAD + 100
        keep = len(data) - (60 - 55) * frame_len + 17
        os.truncate(seg, keep)
        s2 = make(tmp_path)
        assert s2.next_seq == 55 and s2.recovery.truncated_bytes == 17 and s2.recovery.torn_records == 5
        await s2.close()
    run(go())


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_crc_error_in_a_sealed_segment_counts_exactly_what_is_lost(tmp_path):
    async def go():
        s = make(tmp_path)
        await s.append([payload(i) for i in range(100)])
        await s.close()
        files = segs(tmp_path)
        first_of = [int(p.stem) for p in files]
        # damage record #5 of the second segment (payload byte)
        target = files[1]
        flip(target, 16 + 5 * (100 + FRAME_OVERHEAD) + FRAME_OVERHEAD + 20)
        s2 = make(tmp_path)
        got = [q for q, _ in read_all(s2)]
        bad = first_of[1] + 5
        lost = s2.take_lost()
        assert lost == [(bad, first_of[2])]                 # the rest of that segment, exactly
        assert got == [q for q in range(100) if not bad <= q < first_of[2]]
        assert s2.corrupt_records == first_of[2] - bad
        s2.ack(0, 100)
        assert s2.cursor == 100 and s2.pending == 0          # lost ranges do not block the cursor
        await s2.close()
    run(go())


def test_crc_error_in_the_last_segment_is_cut_at_open(tmp_path):
    async def go():
        s = make(tmp_path)
        await s.append([payload(i) for i in range(20)])
        await s.close()
        last = segs(tmp_path)[-1]
        first = int(last.stem)
        n_in_last = 20 - first
        assert n_in_last > 3
        flip(last, 16 + 2 * (100 + FRAME_OVERHEAD) + 4)     # the CRC field of its third record
        s2 = make(tmp_path)
        assert s2.next_seq == first + 2
        assert s2.recovery.truncated_bytes == (n_in_last - 2) * (100 + FRAME_OVERHEAD)
        assert [q for q, _ in read_all(s2)] == list(range(first + 2))
        await s2.close()
    run(go())


def test_damaged_cursor_replays_everything_rather_than_lose(tmp_path):
    async def go():
        s = make(tmp_path)
        await s.append([payload(i) for i in range(30)])
        read_all(s)
        s.ack(0, 10)
        await s.close()
        flip(tmp_path / "cursor", 9)
        s2 = make(tmp_path)
        assert s2.recovery.cursor == "reset"
        assert [q for q, _ in read_all(s2)][0] <= 10         # from the oldest segment kept: duplicates only
        await s2.close()
    run(go())


def test_size_limit_refuses_and_counts_then_room_returns(tmp_path):
    async def go():
        s = make(tmp_path, max_bytes=3 * SEG)
        n = await s.append([payload(i) for i in range(200)])
        assert 0 < n < 200 and s.refused == 200 - n
        assert s.size_bytes <= 3 * SEG
        assert await s.append([payload(999)]) == 0           # still full
        got = read_all(s)
        assert [q for q, _ in got] == list(range(n))
        waiter = asyncio.ensure_future(s.wait_room(200, timeout=5))
        await asyncio.sleep(0.01)
        assert not waiter.done()
        s.ack(0, n)
        assert await waiter
        assert await s.append([payload(i) for i in range(n, n + 10)]) == 10
        await s.close()
    run(go())


def test_record_too_large_and_second_process_are_clear_errors(tmp_path):
    async def go():
        s = make(tmp_path, max_record_bytes=1000)
        with pytest.raises(SpoolError, match="exceeds"):
            await s.append([b"x" * 1001])
        with pytest.raises(SpoolError, match="in use by another process"):
            Spool(tmp_path).open()
        await s.close()
    run(go())


WRITER = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r})
    from hostwall.collector.sinks.spool import Spool
    async def main():
        s = Spool({d!r}, segment_bytes=1 << 20, max_bytes=1 << 30, fsync="none")
        s.open()
        i = 0
        while True:
            batch = [b"rec-%08d:" % j + b"y" * (50 + j % 700) for j in range(i, i + 97)]
            assert await s.append(batch) == len(batch)
            i += len(batch)
            print(i, flush=True)                 # every record below i was accepted
    asyncio.run(main())
""")


def test_killed_writer_loses_nothing_it_accepted(tmp_path):
    """SIGKILL mid-append: a reopened spool holds every accepted record, in order, no gaps, no garbage."""
    d = tmp_path / "spool"
    root = str(Path(__file__).resolve().parents[2])
    p = subprocess.Popen([sys.executable, "-c", WRITER.format(root=root, d=str(d))], stdout=subprocess.PIPE,
                         text=True)
    accepted = 0
    t0 = time.monotonic()
    # at least 0.7 s of appends and more than 1000 records: a count with a deadline, since a loaded machine
    # may spend the first 0.7 s starting the interpreter (docs/testing.md)
    while (time.monotonic() - t0 < 0.7 or accepted <= 1000) and time.monotonic() - t0 < 60:
        line = p.stdout.readline()
        if not line:
            break
        accepted = int(line)
    assert p.poll() is None, "the writer must still be writing when it is killed"
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    for line in p.stdout:                        # what it printed before dying was accepted too
        accepted = max(accepted, int(line))
    assert accepted > 1000

    async def go():
        s = make(d, segment_bytes=1 << 20, max_bytes=1 << 30)
        got = read_all(s)
        seqs = [q for q, _ in got]
        assert seqs == list(range(len(got)))
        assert [idx(pl) for _, pl in got] == seqs
        assert len(got) >= accepted
        assert s.corrupt_records == 0
        await s.close()
    run(go())


def test_disk_full_mid_append_reports_what_was_written_and_leaves_no_torn_frame(tmp_path, monkeypatch):
    import errno

    import hostwall.collector.sinks.spool as sp

    async def go():
        s = make(tmp_path)
        assert await s.append([payload(i) for i in range(10)]) == 10
        real = os.write
        calls = {"n": 0}

        def flaky(fd, buf):                      # the next segment's frames: half written, then ENOSPC
            calls["n"] += 1
            if calls["n"] == 3:
                real(fd, bytes(buf)[: len(buf) // 2])
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, buf)
        monkeypatch.setattr(sp.os, "write", flaky)
        with pytest.raises(OSError) as ei:
            await s.append([payload(i) for i in range(10, 100)])
        monkeypatch.setattr(sp.os, "write", real)
        written = ei.value.written
        assert 0 < written < 90
        assert s.next_seq == 10 + written
        assert await s.append([payload(999)]) == 1            # goes on in a fresh segment
        got = read_all(s)
        assert [q for q, _ in got] == list(range(10 + written + 1)) and s.corrupt_records == 0
        await s.close()
        s2 = make(tmp_path)
        assert s2.recovery.truncated_bytes == 0 and s2.next_seq == 10 + written + 1
        assert [idx(p) for _, p in read_all(s2)] == list(range(10 + written)) + [999]
        await s2.close()
    run(go())


# ---- an acknowledgement that empties the spool while an fdatasync runs (found by the crash test) --------

def _slow_fdatasync(monkeypatch, delay: float = 0.2) -> None:
    """fdatasync in the worker thread takes `delay` s before it reaches the kernel (a loaded disk)."""
    real = os.fdatasync

    def slow(fd):
        time.sleep(delay)
        return real(fd)
    monkeypatch.setattr(os, "fdatasync", slow)


def test_an_ack_that_empties_the_spool_during_a_sync_breaks_no_caller(tmp_path, monkeypatch):
    """The replay acknowledges the last records while the sink's append path syncs the segment: the
    acknowledgement deletes the segment and must not close its descriptor under the running fdatasync,
    and a second sync() waiting for the first must not see an error (a kill -9 crash trial ended the
    collector with 'replay task failed: OSError: [Errno 9] Bad file descriptor')."""
    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600)
        assert await s.append([payload(i) for i in range(5)]) == 5
        _slow_fdatasync(monkeypatch)
        first = asyncio.ensure_future(s.sync())
        await asyncio.sleep(0.05)                        # its fdatasync is in the worker thread now
        second = asyncio.ensure_future(s.sync())         # the replay task's periodic sync waits for it
        await asyncio.sleep(0.01)
        s.ack(0, 5)                                      # replayed and acknowledged: the segment goes
        results = await asyncio.gather(first, second, return_exceptions=True)
        assert results == [True, True] and s.fsync_errors == 0, (results, s.fsync_errors)
        assert await s.append([payload(5)]) == 1 and [q for q, _ in s.read()] == [5]
        await s.close()
    run(go())


def test_an_ack_that_empties_the_spool_while_an_append_seals_a_segment(tmp_path, monkeypatch):
    """An append that fills its segment seals it (fdatasync) before it starts the next one; the replay's
    acknowledgement of everything meanwhile deletes the sealed segment. The append must go on into a new
    segment, not fail with EBADF (the sink would count its records lost as a spool error)."""
    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600)
        n = (SEG - 64) // (100 + FRAME_OVERHEAD)         # about one segment's worth
        assert await s.append([payload(i) for i in range(n - 2)]) == n - 2
        _slow_fdatasync(monkeypatch)
        more = asyncio.ensure_future(s.append([payload(i) for i in range(n - 2, n + 10)]))
        await asyncio.sleep(0.05)                        # sealing the first segment (its fdatasync runs)
        s.ack(0, s.next_seq)                             # everything written so far is acknowledged
        assert await more == 12
        assert [q for q, _ in s.read()] == [q for q in range(n - 2, n + 10) if not s.is_acked(q)]
        await s.close()
    run(go())


@pytest.mark.parametrize("fails", [False, True])
def test_a_sync_whose_task_is_cancelled_leaves_the_spool_waiting_for_its_fdatasync(tmp_path, monkeypatch, fails):
    """The sink's close cancels the task that awaits a sync while the worker thread still runs it: the
    records are not known durable yet, the descriptor is not closed under it, and the next sync waits
    for its outcome — a failure is counted and leaves the records unproven though that sync succeeds."""
    real = os.fdatasync

    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600)
        assert await s.append([payload(i) for i in range(3)]) == 3
        gate = fsync_faults.held(monkeypatch, fails=fails)
        await fsync_faults.cancelled_while_syncing(s, s.sync())
        assert s._syncing is not None and not s._syncing.done() and s.synced_seq == 0
        later = asyncio.ensure_future(s.sync())          # waits for the running one
        await asyncio.sleep(0.01)
        assert not later.done()
        gate.set()
        monkeypatch.setattr(os, "fdatasync", real)
        assert await later is True
        assert (s.fsync_errors, s.synced_seq) == ((1, 0) if fails else (0, 3)), (s.fsync_errors, s.synced_seq)
        await s.close()
    run(go())


# ---- a failed fdatasync is final: its records are unproven until the broker has them ----------------------

def test_records_a_failed_fdatasync_left_are_never_reported_synced_until_acknowledged(tmp_path, monkeypatch):
    """interval: the fdatasync that seals a full segment fails. Later syncs (of the next segment, or of
    anything) succeed, but synced_seq stays below the sealed segment's unsynced records until the
    cursor (broker acknowledgements) passes them — it follows the cursor meanwhile — and then moves to
    what was proven since."""
    failing = fsync_faults.failing_by_name(monkeypatch)

    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600)
        synced_calls = []
        s.on_synced = lambda: synced_calls.append(s.synced_seq)
        per_seg = (SEG - 16) // (100 + FRAME_OVERHEAD)
        assert await s.append([payload(i) for i in range(2)]) == 2
        assert await s.sync() is True and s.synced_seq == 2          # proven before the failure
        assert await s.append([payload(i) for i in range(2, per_seg)]) == per_seg - 2
        failing.add(s.segments[0].path.name)
        assert await s.append([payload(per_seg + i) for i in range(3)]) == 3     # seals the first: fails
        assert len(s.segments) == 2 and s.fsync_errors == 1
        assert await s.sync() is True                 # the second segment's fdatasync works...
        assert await s.sync() is True
        assert s.synced_seq == 2, s.synced_seq        # ...and proves nothing about the first one's records
        s.ack(0, per_seg - 1)                         # acknowledged by the broker: no disk proof needed
        assert s.synced_seq == per_seg - 1
        s.ack(per_seg - 1, per_seg)                   # the broker has every unproven record now
        assert s.synced_seq == s.next_seq == per_seg + 3, s.synced_seq
        assert synced_calls == [2, per_seg - 1, per_seg + 3]
        await s.close()
    run(go())


def test_concurrent_syncs_never_report_records_an_fdatasync_is_still_writing(tmp_path, monkeypatch):
    """Two syncs at once (the replay task and the sink's flush): the second waits for the first, so it
    never reports records whose fdatasync is running and then fails."""
    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600)
        assert await s.append([payload(i) for i in range(3)]) == 3
        gate = fsync_faults.held(monkeypatch, fails=True)
        a = await fsync_faults.syncing(s, s.sync())
        b = asyncio.ensure_future(s.sync())
        await asyncio.sleep(0.01)
        assert s.synced_seq == 0 and not b.done()
        gate.set()
        assert await a is False
        await b
        assert s.synced_seq == 0 and s.fsync_errors == 1
        await s.close()
    run(go())


def test_an_append_that_fails_before_its_first_frame_does_not_delete_the_next_segment(tmp_path, monkeypatch):
    """An empty spool starts a segment, and the write of its first frame fails (ENOSPC). The next append
    starts a segment with the same first seq, so the same file name: acknowledging its records must not
    delete the file of the earlier empty entry, which is the live one."""
    import hostwall.collector.sinks.spool as spool_mod
    real, fail = spool_mod.write_all, {"frames": 1}

    def write_all(fd, buf):
        if fail["frames"] and not buf.startswith(b"HWSPOOL1"):
            fail["frames"] -= 1
            raise OSError(28, "No space left on device")
        real(fd, buf)
    monkeypatch.setattr(spool_mod, "write_all", write_all)

    async def go():
        s = make(tmp_path)
        with pytest.raises(OSError):
            await s.append([payload(0)])
        assert await s.append([payload(i) for i in range(2)]) == 2
        assert len(s.segments) == 1, [seg.path.name for seg in s.segments]
        s.ack(0, 1)
        assert s.segments and s.segments[0].path.exists()
        assert [idx(p) for _, p in s.read()] == [1]
        await s.close()
    run(go())


def test_the_cursor_file_names_proven_records_so_a_torn_tail_is_counted(tmp_path, monkeypatch):
    """A failed fdatasync pins synced_seq, but the cursor file records what later fdatasyncs proved: a
    machine crash that then damages the failed page makes recovery count every record it cuts."""
    failing = fsync_faults.failing_by_name(monkeypatch)

    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600, segment_bytes=1 << 16)
        assert await s.append([payload(i) for i in range(3)]) == 3
        failing.add(s.segments[0].path.name)
        assert await s.sync() is False
        assert await s.append([payload(i) for i in range(3, 30)]) == 27
        assert await s.sync() is True and s.synced_seq == 0
        path = s.segments[0].path
        s._drop_writer()                              # a machine crash: no close, the cursor file as it is
        os.close(s._lockfd)
        return path
    path = run(go())
    with open(path, "r+b") as f:                     # the failed page never reached the disk
        f.seek(16 + 8)
        f.write(b"\xff" * 4)
    again = make(tmp_path, fsync="interval")
    assert again.recovery.torn_records == 30 and again.next_seq == 0, again.recovery


# ---- accounting after a kill or a cancel mid-append ------------------------------------------------------

@pytest.mark.parametrize("policy", ["interval", "always"])
def test_a_frame_torn_by_a_kill_mid_append_is_not_counted_lost(tmp_path, policy):
    """A kill -9 during an append's write(2) leaves a partial frame. That append never returned, so its
    records were never settled (the kernel still holds them: they come again): cutting the frame loses
    nothing, and `torn_records` must not count it (it said 1: `spool_torn` one too many). What the cursor
    file names as written (synced) is still counted (test_a_tail_lost_after_it_was_synced_is_counted_from_the_cursor)."""
    async def go():
        s = make(tmp_path, fsync=policy, fsync_interval_s=3600)
        assert await s.append([payload(i) for i in range(20)]) == 20
        if policy == "interval":
            assert await s.sync()
        assert s.synced_seq == 20
        half = frame(20, payload(20))[: FRAME_OVERHEAD + 30]           # the next append, cut by the kill
        with open(segs(tmp_path)[-1], "ab") as f:
            f.write(half)
        s._close_reader()
        os.close(s._wfd)
        os.close(s._lockfd)
        s2 = make(tmp_path, fsync=policy)
        assert s2.recovery.truncated_bytes == len(half) and s2.next_seq == 20
        assert s2.recovery.torn_records == 0, s2.recovery
        await s2.close()
    run(go())


def test_appended_counts_the_segments_an_append_wrote_before_it_was_cancelled(tmp_path, monkeypatch):
    """An append that spans segments awaits the fdatasync that seals the full one; cancelled there (the
    sink's shutdown deadline), the records of the segments it wrote are in the spool (next_seq moved past
    them) and the spool's `appended` statistic must count them (it counted none: it was added at the end)."""
    async def go():
        s = make(tmp_path, fsync="interval", fsync_interval_s=3600)
        gate = fsync_faults.held(monkeypatch, fails=False)
        n = 2 * SEG // (100 + FRAME_OVERHEAD)                    # two segments' worth
        await fsync_faults.cancelled_while_syncing(s, s.append([payload(i) for i in range(n)]))
        gate.set()
        assert 0 < s.next_seq < n
        assert s.appended == s.next_seq, (s.appended, s.next_seq)
        assert s.stats()["bytes_appended"] == sum(g.size - SEG_HDR.size for g in s.segments)
        await s.close()
    run(go())
