"""collector.verify on synthetic record sets: ranges, duplicates, gaps explained by loss records or not,
seq conflicts, rotated JSONL files read in order, the CLI's exit codes, and whose loss records explain a
gap: only the sink that wrote what is verified (--sink, or inferred from the target)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hostwall.collector.loss_report import LossReporter, SeqRanges
from hostwall.collector.verify import Verifier, own_sinks, parse_target

ROOT = Path(__file__).resolve().parents[2]


def rec(seq: int, stream: str = "events", host: str = "h1", eid: str | None = None) -> dict:
    return {"event": {"id": eid or f"{host}-{stream}-{seq}"}, "observer": {"hostname": host},
            "hostwall": {"kind": "flow", "seq": seq, "stream": stream}}


KAFKA = "kafka://b:9092"


def loss(host: str, stream: str, seqs: list[int], reason: str = "spool_full", sink: str = KAFKA) -> dict:
    r = SeqRanges()
    r.add(seqs)
    return LossReporter(host, "/pin").sink_loss(sink, reason, stream, r)


def analyse(records, sinks=(KAFKA,)):
    v = Verifier(set(sinks))
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
    recs = [rec(i) for i in range(20) if i not in (5, 6, 12)] + [loss("h1", "events", [5, 6]),
                                                                  loss("h1", "events", [4, 5], "too_large")]
    out, _ = analyse(recs)                      # overlapping reports (4 arrived after all) cover 5..6 once
    ev = out[("h1", "events")]
    assert ev.gaps == [[5, 6], [12, 12]] and ev.explained == [[5, 6]] and ev.unexplained == [[12, 12]]
    assert not ev.ok and ev.lost_reported == {"spool_full": 2, "too_large": 2}
    assert "unexplained 1 [12]" in ev.line() and ev.line().endswith("INCOMPLETE")
    # a loss record of another host explains nothing here
    out, _ = analyse([rec(0), rec(2), loss("h2", "events", [1])])
    assert out[("h1", "events")].unexplained == [[1, 1]]


def test_a_seq_reused_by_another_event_is_a_conflict():
    out, _ = analyse([rec(0), rec(1), rec(1, eid="other")])
    assert out[("h1", "events")].conflicts == 1 and not out[("h1", "events")].ok


def test_only_the_verified_sinks_loss_records_explain_a_gap():
    """Loss records go to every sink: the Kafka sink's report of seqs 5..6 is in the JSONL file too, and
    says nothing about why the JSONL file lacks them. Such a gap is counted apart and stays unexplained."""
    recs = [rec(i) for i in range(20) if i not in (5, 6, 12)] + [loss("h1", "events", [5, 6]),
                                                                  loss("h1", "events", [12], "disk_full", "jsonl:/f")]
    out, _ = analyse(recs, sinks=["jsonl:/f"])
    ev = out[("h1", "events")]
    assert ev.explained == [[12, 12]] and ev.unexplained == [[5, 6]] and ev.other_sink == [[5, 6]]
    assert not ev.ok and ev.lost_reported == {"disk_full": 1} and ev.other_sinks == {KAFKA: 2}
    d = ev.as_dict()
    assert (d["other_sink"], d["other_sink_ranges"], d["unexplained"]) == (2, [[5, 6]], 2)
    assert "2 covered only by another sink's loss records" in ev.line()
    # no sink known: no loss record explains anything
    out, _ = analyse(recs, sinks=())
    assert out[("h1", "events")].unexplained == [[5, 6], [12, 12]] and out[("h1", "events")].explained == []


def test_the_sink_is_inferred_from_the_target(tmp_path, monkeypatch):
    f = tmp_path / "flows.jsonl"
    f.write_text("")
    (tmp_path / "link.jsonl").symlink_to(f)
    names = {KAFKA, f"jsonl:{tmp_path / 'link.jsonl'}", "jsonl:/elsewhere/flows.jsonl", "otlp://b:4317"}
    monkeypatch.chdir(tmp_path)
    assert own_sinks("flows.jsonl", names) == {f"jsonl:{tmp_path / 'link.jsonl'}"}
    assert own_sinks("jsonl:flows.jsonl", {KAFKA}) == set()
    assert own_sinks("kafka://B:9092/hostwall.flows", names) == {KAFKA}
    assert own_sinks("kafka://a:9092,b:9092/t", names) == {KAFKA}
    assert own_sinks("kafka://c:9092/t", names) == set()


def cli(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "hostwall.collector.cli", "verify", *args], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_cli_a_jsonl_gap_covered_only_by_another_sinks_loss_record_fails(tmp_path):
    p = tmp_path / "flows.jsonl"
    body = [rec(i) for i in range(10) if i not in (3, 4)]
    p.write_text("".join(json.dumps(r) + "\n" for r in body + [loss("h1", "events", [3, 4])]))
    r = cli("--json", str(p))
    assert r.returncode == 1, r.stdout + r.stderr
    st = json.loads(r.stdout)["streams"][0]
    assert (st["unexplained"], st["other_sink"], st["other_sink_ranges"]) == (2, 2, [[3, 4]])
    r = cli(str(p))
    assert r.returncode == 1 and "--sink" in r.stdout + r.stderr
    assert cli("--sink", KAFKA, str(p)).returncode == 0            # --sink: the file is that sink's output
    # the file's own sink (named by its absolute path) reported them: complete, also given a relative path
    p.write_text("".join(json.dumps(r) + "\n" for r in body + [loss("h1", "events", [3, 4], sink=f"jsonl:{p}")]))
    r = cli("--json", "flows.jsonl", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["sinks"] == [f"jsonl:{p}"] and out["streams"][0]["explained"] == 2


def test_rotated_files_and_cli_exit_codes(tmp_path):
    p = tmp_path / "flows.jsonl"
    (tmp_path / "flows.jsonl.2").write_text("".join(json.dumps(rec(i)) + "\n" for i in range(0, 5)))
    (tmp_path / "flows.jsonl.1").write_text("".join(json.dumps(rec(i)) + "\n" for i in range(5, 8)))
    p.write_text("".join(json.dumps(rec(i)) + "\n" for i in range(8, 12)) + "{torn")
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


def test_a_reader_that_leaves_early_gets_no_traceback(tmp_path):
    """`verify FILE | head -1`: the closed pipe ends verify with exit 1, not a Python traceback."""
    p = tmp_path / "flows.jsonl"
    p.write_text("".join(json.dumps(rec(0, host=f"host-{i}")) + "\n" for i in range(3000)))   # > a pipe's 64 KiB
    proc = subprocess.Popen([sys.executable, "-m", "hostwall.collector.cli", "verify", str(p)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("host host-")
    proc.stdout.close()
    err = proc.stderr.read()
    assert proc.wait(timeout=60) == 1 and "Traceback" not in err and "BrokenPipe" not in err, err
