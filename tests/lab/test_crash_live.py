"""kill -9 of the real collector at bad moments loses nothing that reached the ring buffer (docs/collector.md
"Delivery and loss", docs/testing.md "Crash tests"): the real enforcer and pinned ring, the real
`hostwall-collector run` (Kafka + JSONL sinks), a real broker stopped and started by the test, and a traffic
generator that logs every connection it completes. lab/crash.py runs the trials; this test holds the
outcome to the contract:

  - every completed connection has its flow start and its flow end in Kafka (ICMP flows too, which end
    by the collector's conntrack scan, across crashes);
  - every event the kernel says it emitted is in Kafka; what it could not emit is counted (lost_counted);
    nothing else is missing (lost_uncounted = 0); duplicates are allowed (same event.id);
  - drop summaries add up to the kernel's drop counters exactly, across crashes mid-interval;
  - `hostwall-collector verify` agrees for the topics and the JSONL file: no unexplained gap.

HOSTWALL_CRASH_TRIALS (default 10) and HOSTWALL_CRASH_SEED (default fixed) pick the trials."""
from __future__ import annotations

import json
import os

import pytest

from hostwall.lab.crash import KINDS, CrashSession, plan
from hostwall.lab.netns import cleanup_stale, lab_available

pytestmark = [pytest.mark.lab, pytest.mark.peers, pytest.mark.timeout(1500)]

TRIALS = int(os.environ.get("HOSTWALL_CRASH_TRIALS", "10"))
SEED = int(os.environ.get("HOSTWALL_CRASH_SEED", "14"))


def test_kill_9_at_bad_moments_loses_nothing(kafka_broker_factory, tmp_path):
    ok, why = lab_available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    cleanup_stale()
    kinds = plan(TRIALS, SEED)
    if TRIALS >= len(KINDS):
        assert set(kinds) == set(KINDS)
    broker = kafka_broker_factory(num_partitions=3)
    with CrashSession(broker, tmp_path, seed=SEED) as s:
        s.run(kinds)
        out = s.finish()
    report = {**out.metrics(), "trials": out.trials}
    print("\ncrash trials:", json.dumps(report, indent=1, default=str))

    assert [t["kind"] for t in out.trials] == kinds
    assert out.connections >= 100 * TRIALS, out.connections
    assert out.missing_start == [] and out.missing_end == [], (out.missing_start[:5], out.missing_end[:5])
    assert out.events_received == out.kernel_emitted, (out.events_received, out.kernel_emitted)
    assert out.lost_uncounted == 0
    assert out.drop_packets_summarized == out.drop_packets_kernel > 0, (out.drop_packets_summarized,
                                                                        out.drop_packets_kernel)
    for target, (rc, rep) in out.verify.items():
        bad = [r for r in rep.get("streams", []) if r["unexplained"] or r["conflicts"]]
        assert rc == 0 and rep.get("ok") and not bad, (target, rc, bad[:3])
        streams = {r["stream"] for r in rep["streams"]}
        assert {"events", "drop_summaries", "conntrack"} <= streams, (target, streams)
    for t in out.trials:
        if t["kind"] == "outage":
            assert t["restarted_state"] == "degraded", t        # restarted while the broker was down
        if t["kind"] == "stop":
            assert t["stopped_s"] >= 3.0
    assert out.metrics()["unexplained_gaps"] == 0
