"""collector.verify on synthetic record sets: ranges, duplicates, gaps explained by loss records or not,
seq conflicts, rotated JSONL files read in order, and the CLI's exit codes."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hostwall.collector.loss_report import LossReporter, SeqRanges
from hostwall.collector.verify import Verifier, parse_target

ROOT = Path(__file__).resolve().parents[2]


def rec(seq: int, stream: str = "events", host: str = "h1", eid: str | None = None) -> dict:
    return {"event": {"id": eid or f"{host}-{stream}-{seq}"}, "observer": {"hostname": host},
            "hostwall": {"kind": "flow", "seq": seq, "stream": stream}}


def loss(host: str, stream: str, seqs: list[int], reason: str = "spool_full") -> dict:
    r = SeqRanges()
    r.add(seqs)
    return LossReporter(host, "/pin").sink_loss("kafka://b:9092", reason, stream, r)


def analyse(records):
    v = Verifier()
    for r in records:
        v.add(r)
    return {(x.host, x.stream): x for x in v.report()}, v


def test_complete_with_duplicates_is_ok():
    recs = [rec(i) for i in range(10)] + [rec(3), rec(4)] + [rec(i, "conntrack") for i in range(5)]
    out, v = analyse(recs)
    ev = out[("h1", "events")]
    assert ev.ok and ev.received == 10 and ev.duplicates == 2 and ev.ranges == [[0, 9]] and ev.gaps == []
    assert out[("h1", "conntrack")].ok and v.records == 17


def test_the_same_event_sent_again_under_a_new_seq_fills_that_seq():
    """A restarted detector re-opens the anomaly it had open (same event.id) with the next seq: a copy,
    counted as a duplicate, and its seq is no gap; a seq nothing carried still is one."""
    recs = [rec(0, "anomaly"), rec(1, "anomaly"), rec(2, "anomaly", eid="h1-anomaly-1"), rec(4, "anomaly")]
    out, _ = analyse(recs)
    an = out[("h1", "anomaly")]
    assert an.duplicates == 1 and an.ranges == [[0, 2], [4, 4]] and an.unexplained == [[3, 3]]


def test_gaps_explained_by_loss_records_and_unexplained_ones():
    recs = [rec(i) for i in range(20) if i not in (5, 6, 12)] + [loss("h1", "events", [5, 6])]
    out, _ = analyse(recs)
    ev = out[("h1", "events")]
    assert ev.gaps == [[5, 6], [12, 12]] and ev.explained == [[5, 6]] and ev.unexplained == [[12, 12]]
    assert not ev.ok and ev.lost_reported == {"spool_full": 2}
    assert "unexplained 1 [12]" in ev.line() and ev.line().endswith("INCOMPLETE")
    # a loss record of another host explains nothing here
    out, _ = analyse([rec(0), rec(2), loss("h2", "events", [1])])
    assert out[("h1", "events")].unexplained == [[1, 1]]


def test_a_seq_reused_by_another_event_is_a_conflict():
    out, _ = analyse([rec(0), rec(1), rec(1, eid="other")])
    assert out[("h1", "events")].conflicts == 1 and not out[("h1", "events")].ok


def test_rotated_files_and_cli_exit_codes(tmp_path):
    p = tmp_path / "flows.jsonl"
    (tmp_path / "flows.jsonl.2").write_text("".join(json.dumps(rec(i)) + "\n" for i in range(0, 5)))
    (tmp_path / "flows.jsonl.1").write_text("".join(json.dumps(rec(i)) + "\n" for i in range(5, 8)))
    p.write_text("".join(json.dumps(rec(i)) + "\n" for i in range(8, 12)) + "{torn")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "hostwall.collector.cli", "verify", *args], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
    r = cli(str(p))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "received 12 (seq 0..11 in 1 range(s))" in r.stdout and "1 undecodable: complete" in r.stdout
    (tmp_path / "flows.jsonl.1").unlink()
    r = cli("--json", str(p))
    assert r.returncode == 1
    st = json.loads(r.stdout)["streams"][0]
    assert st["unexplained_ranges"] == [[5, 7]] and st["unexplained"] == 3
    assert cli(str(tmp_path / "nope.jsonl")).returncode == 2
    assert parse_target("kafka://h:9092/t.flows") == ("kafka", "h:9092", "t.flows")
