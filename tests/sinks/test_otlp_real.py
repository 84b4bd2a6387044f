"""collector.sinks.otlp and collector.metrics against a real OpenTelemetry Collector and Prometheus
(tests/peers): log records arrive over gRPC and HTTP with semantic-convention attributes, severity and
resource; a collector outage is counted (export_failed, queue_full) with bounded queues and the ledger
balanced; self-metrics arrive over OTLP and on the Prometheus endpoint with the same names and values."""
from __future__ import annotations

import asyncio
import re
import time
import urllib.request
import uuid
from collections import Counter

import pytest
import uvloop

from hostwall.collector.config import MetricsOptions, OtlpOptions, QueueSizes
from hostwall.collector.encoders.otel import to_otel
from hostwall.collector.metrics import SelfMetrics, families_from_status
from hostwall.collector.pipeline import Pipeline
from hostwall.collector.records import iso_ns, parse_iso_ns
from hostwall.collector.sinks.otlp import OtlpSink
from tests.collector.fakes import FakeSource, StubBuilder, cfg, started, until
from tests.collector.test_encoders import all_records
from tests.peers import free_ports

pytestmark = [pytest.mark.peers]


def resource(marker: str) -> dict:
    return {"service.name": "hostwall-collector", "service.namespace": "hostwall", "service.instance.id": marker,
            "host.name": "fw-test", "hostwall.interfaces": ["eth0", "eth1"], "hostwall.pin_dir": "/sys/fs/bpf/hw"}


@pytest.mark.timeout(180)
@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_log_records_arrive_with_semconv_attributes_and_severity(otel_collector, protocol):
    recs = all_records()
    marker = f"otlp-{protocol}-{uuid.uuid4().hex[:8]}"
    endpoint = otel_collector.grpc_endpoint if protocol == "grpc" else otel_collector.http_endpoint[len("http://"):]
    sink = OtlpSink(endpoint, options=OtlpOptions(protocol=protocol, batch=7), resource=resource(marker))

    async def go():
        await sink.start()
        await sink.send(recs)
        await sink.close()
    asyncio.run(go())
    st = sink.stats()
    assert st["delivered"] == len(recs) and st["lost"] == {} and st["exports"] == -(-len(recs) // 7), st
    got = otel_collector.wait_for_log_records(lambda r: r["resource_attrs"].get("service.instance.id") == marker,
                                              count=len(recs))
    assert len(got) == len(recs)
    by_uid = {r["attrs"]["log.record.uid"]: r for r in got}
    assert len(by_uid) == len(recs)
    for rec in recs:
        r = by_uid[rec["event"]["id"]]
        want = to_otel(rec)
        assert int(r["timeUnixNano"]) == parse_iso_ns(rec["@timestamp"]) == want["time_unix_nano"]
        assert int(r["observedTimeUnixNano"]) >= int(time.time_ns() - 600 * 10**9)
        assert r["severityNumber"] == {9: "SEVERITY_NUMBER_INFO", 13: "SEVERITY_NUMBER_WARN",
                                       14: "SEVERITY_NUMBER_WARN2", 17: "SEVERITY_NUMBER_ERROR",
                                       21: "SEVERITY_NUMBER_FATAL"}[want["severity_number"]] \
            or r["severityNumber"] == want["severity_number"]
        assert r["severityText"] == want["severity_text"]
        assert r["body_value"] == want["body"]
        assert r["attrs"] == want["attributes"]          # every attribute, with its type, survived the wire
        if rec.get("event", {}).get("dataset"):
            assert r.get("eventName") == rec["event"]["dataset"]
        assert r["scope"]["name"] == "hostwall.collector"
        assert r["scope_schema_url"] == r["resource_schema_url"] == want["schema_url"]    # the semconv version
        assert r["resource_attrs"]["hostwall.interfaces"] == ["eth0", "eth1"]
        assert r["resource_attrs"]["host.name"] == "fw-test"
    kinds = Counter(r["hostwall"]["kind"] for r in recs)
    sev = Counter(by_uid[r["event"]["id"]]["severityText"] for r in recs)
    assert kinds["anomaly"] and sev["INFO"] and sev["WARN"]
    flow = next(by_uid[r["event"]["id"]] for r in recs if r["hostwall"]["kind"] == "flow" and
                r.get("network", {}).get("transport") == "tcp")
    for key in ("network.transport", "network.type", "source.address", "source.port", "destination.address",
                "destination.port", "client.address", "server.port", "network.io.direction", "host.name",
                "hostwall.verdict", "hostwall.community_id"):
        assert key in flow["attrs"], key


class TimedBuilder(StubBuilder):
    """StubBuilder whose records carry the fields an OTel log record needs."""

    def _rec(self, kind: str, ident) -> dict:
        r = super()._rec(kind, ident)
        r["@timestamp"] = iso_ns(time.time_ns())
        r["hostwall"]["schema_version"] = "1.1.0"
        r["network"] = {"transport": "tcp", "type": "ipv4"}
        r["source"], r["destination"] = {"ip": "10.0.0.1", "port": 40000}, {"ip": "10.0.0.2", "port": 443}
        return r


def scrape(addr) -> str:
    with urllib.request.urlopen(f"http://{addr[0]}:{addr[1]}/metrics", timeout=5) as r:
        return r.read().decode()


def sample(text: str, name: str, **labels) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            return float(m.group(3))
    return None


@pytest.mark.timeout(300)
def test_collector_outage_is_counted_bounded_and_metrics_arrive(otel_collector_factory, prometheus_server, tmp_path):
    col = otel_collector_factory()
    marker = f"outage-{uuid.uuid4().hex[:8]}"
    sink = OtlpSink(col.grpc_endpoint, options=OtlpOptions(protocol="grpc", timeout_s=1.0, batch=256),
                    resource=resource(marker), name="otlp://col")
    port, = free_ports(1)
    metrics = SelfMetrics(MetricsOptions(prometheus=f"127.0.0.1:{port}", otlp=col.grpc_endpoint, interval_s=0.5),
                          otlp_options=OtlpOptions(protocol="grpc", timeout_s=2.0), resource=resource(marker),
                          pin_dir=str(tmp_path / "no-such-pin"))
    src = FakeSource(ring_size=1 << 20)
    capacity = 2000
    pipe = Pipeline(cfg(tmp_path, queues=QueueSizes(events=4, sink=capacity, batch=256)), src, TimedBuilder(),
                    [sink], metrics=metrics)
    depths: list[int] = []
    ours = lambda r: r["resource_attrs"].get("service.instance.id") == marker      # noqa: E731

    def lane_lost(reason: str) -> int:
        pipe._sync_sink(pipe.slots[0])
        return pipe.ledger.lanes["otlp://col"].lost[reason]

    async def pump(n: int, per: int = 250, timeout: float = 60.0) -> int:
        """Emit n events, `per` at a time, waiting for room in the ring when it is full: a count of work
        with a deadline, never an amount of work in a fixed time (docs/testing.md)."""
        end = time.monotonic() + timeout
        sent = 0
        while sent < n:
            assert time.monotonic() < end, f"only {sent} of {n} events fit the ring within {timeout:g} s"
            sent += src.emit(min(per, n - sent))
            depths.append(pipe.slots[0].queue.size)
            await asyncio.sleep(0.02)
        return sent

    async def go():
        task = await started(pipe)
        assert await pump(3000) == 3000
        await until(lambda: sink.delivered == 3000, 30)
        before = len([r for r in col.log_records() if ours(r)])
        assert before == 3000
        await asyncio.to_thread(col.stop)                  # the OTel Collector goes away
        await pump(20000)
        await until(lambda: sink.export_failures >= 2, 30)
        mid = pipe.status()
        await asyncio.to_thread(col.start)                 # ... and comes back (same ports)
        sink._pause = 0.0
        await pump(2000)
        await until(lambda: pipe.slots[0].queue.size == 0 and sink.in_flight == 0, 60)
        # the OTel Collector writes what it received to its file: wait until every delivered record is there
        await until(lambda: len([r for r in col.log_records() if ours(r)]) >= sink.delivered - before, 30)
        await until(lambda: sample(scrape(metrics.prometheus_address), "hostwall_records_lost_total", stage="sink",
                                   reason="export_failed", sink="otlp://col") == lane_lost("export_failed"), 30)
        prom_text = scrape(metrics.prometheus_address)
        pipe.stop()
        await task
        return before, mid, prom_text

    before, mid, prom_text = uvloop.run(go())
    led = pipe.ledger
    assert led.check(quiescent=True) == []
    lane = led.lanes["otlp://col"]
    assert lane.lost["export_failed"] > 0 and lane.lost["queue_full"] > 0, dict(lane.lost)
    assert lane.delivered + sum(lane.lost.values()) == led.produced
    assert max(depths) <= capacity + 256                   # bounded: at most one batch over the capacity
    assert mid["sinks"]["otlp://col"]["in_flight"] <= 256
    after = len([r for r in col.log_records() if ours(r)])  # the restarted collector's file
    assert before + after == lane.delivered, (before, after, lane.delivered)   # delivered = arrived, exactly

    # self-metrics: the Prometheus endpoint shows the ledger's numbers with our naming rules
    assert sample(prom_text, "hostwall_records_lost_total", stage="sink", reason="export_failed",
                  sink="otlp://col") == lane.lost["export_failed"]
    assert sample(prom_text, "hostwall_records_produced_total", source="events") > 0
    assert sample(prom_text, "hostwall_queue_capacity", queue="otlp://col") == capacity
    assert sample(prom_text, "hostwall_build_info") == 1
    counters = {line.split()[2] for line in prom_text.splitlines()
                if line.startswith("# TYPE hostwall_") and line.endswith(" counter")}
    assert "hostwall_records_lost_total" in counters and all(c.endswith("_total") for c in counters), counters
    for line in prom_text.splitlines():
        if line.startswith("hostwall_") and "{" in line:
            assert not re.search(r'\w+="[^"]{200,}"', line)      # no unbounded label values
    # ... and the OTLP push reached the collector under the same (dotted) names, with our resource
    m = col.wait_for_metric("hostwall.records.produced", timeout=30)
    assert any(x["resource_attrs"].get("service.instance.id") == marker for x in m)
    lost = col.wait_for_metric("hostwall.records.lost", timeout=30)
    pts = [p for x in lost for p in x["sum"]["dataPoints"]]
    assert any({a["key"]: a["value"].get("stringValue") for a in p["attributes"]}.get("reason") == "export_failed"
               for p in pts)
    col.wait_for_prometheus("hostwall_records_produced_total", timeout=30)   # the collector's translation agrees

    # a real Prometheus scrapes our endpoint
    metrics2 = SelfMetrics(MetricsOptions(prometheus="127.0.0.1:0", interval_s=60), resource=resource(marker))
    metrics2.start()
    try:
        metrics2.update(pipe.status())
        addr = metrics2.prometheus_address
        prometheus_server.set_targets({"hostwall-collector": [f"{addr[0]}:{addr[1]}"]}, replace=False)
        prometheus_server.wait_for_targets_up("hostwall-collector")
        res = prometheus_server.wait_for_query('hostwall_records_delivered_total{job="hostwall-collector"}')
        assert float(res[0]["value"][1]) == lane.delivered
    finally:
        metrics2.close()


def test_metric_families_follow_the_naming_rules():
    st = {"ledger": {"produced_by_source": {"events": 5}, "lost_by_stage": {"kernel": {"ringbuf_full": 2}},
                     "sinks": {"kafka://k:9092": {"delivered": 3, "lost_in_sink": {"spool_full": 1}, "in_flight": 1}},
                     "kernel_events": {"deny": {"emitted": 5, "budget": 1, "ringbuf_full": 2}},
                     "drop_packets": {"summarized": 10, "overflow": 0}},
          "queues": {"events": {"depth": 1, "capacity_batches": 16},
                     "sinks": {"kafka://k:9092": {"depth": 4, "capacity": 100, "dropped": 0}}},
          "ring": {"backlog_bytes": 4096},
          "sinks": {"kafka://k:9092": {"state": "degraded", "spool": {"size_bytes": 123, "pending": 7},
                                       "latency": {"buckets_s": [0.1, 1.0], "counts": [2, 1, 0], "sum_s": 0.5,
                                                   "count": 3}}},
          "enricher": {"flow_memory": {"hits": 3, "misses": 1}, "cgroups": {"cache": {"hits": 0, "misses": 0}}}}
    fams = {f.prom: f for f in families_from_status(st, {"drops": {("drop", "policy_deny"): 9}, "dos_buckets": 4,
                                                         "bans_auto": 1, "bans_manual": 2})}
    for name, f in fams.items():
        assert name.startswith("hostwall_") and not name.endswith("_total")      # the client adds _total
        assert re.fullmatch(r"hostwall(\.[a-z][a-z0-9_]*)+", f.otel), f.otel
        # the OTel Collector's prometheus exporter turns the OTLP name into the same Prometheus name
        assert name == f.otel.replace(".", "_") + {"By": "_bytes", "s": "_seconds"}.get(f.unit, ""), name
        assert f.unit != "1" or name.endswith("_ratio")       # "1" makes the translation add _ratio
        assert len(f.samples) <= 50
        for lv, _ in f.samples:
            assert len(lv) == len(f.labels)
    assert fams["hostwall_spool_size_bytes"].unit == "By" and fams["hostwall_spool_size_bytes"].otel == \
        "hostwall.spool.size"
    assert fams["hostwall_kafka_delivery_latency_seconds"].kind == "histogram"
    assert ("sink", "spool_full", "kafka://k:9092", "lost") in [lv for lv, _ in fams["hostwall_records_lost"].samples]
    assert dict(fams["hostwall_enrich_cache_hit_ratio"].samples)[("flow_memory",)] == 0.75
    assert dict(fams["hostwall_dos_bans"].samples) == {("auto",): 1, ("manual",): 2}


@pytest.mark.timeout(120)
def test_kernel_gauges_read_real_pinned_maps(tmp_path):
    """Drops by verdict/reason, DoS drops, DoS buckets and bans come from the pinned maps of a real
    (loaded, not attached) datapath: counts written into the maps are what the metrics report."""
    import os
    import shutil

    import numpy as np

    from hostwall.bpf import bpfsys, dos_sources
    from hostwall.bpf import layout as L
    from hostwall.collector.metrics import _KernelGauges
    if os.geteuid() != 0:
        pytest.fail("needs root (BPF)")
    from hostwall.enforcer.datapath import Datapath
    dp = Datapath.load()
    pin = f"/sys/fs/bpf/hw-test-metrics-{uuid.uuid4().hex[:8]}"
    try:
        dp.pin(pin)
        ncpu = bpfsys.possible_cpus()
        ctr = L.DTYPES["hw_counter"]
        stride = (ctr.itemsize + 7) & ~7

        def percpu(packets_per_cpu: list[int]) -> bytes:
            out = bytearray()
            for p in packets_per_cpu:
                v = np.zeros(1, ctr)
                v["packets"] = p
                out += v.tobytes() + bytes(stride - ctr.itemsize)
            return bytes(out)
        drop, would = L.C["HW_V_DROP"], L.C["HW_V_WOULD_DROP"]
        r_policy, r_syn = L.C["HW_R_POLICY_DENY"], L.C["HW_R_SYN_FLOOD"]
        idx = lambda hook, v, r: (hook * L.VERDICTS + v) * L.REASONS + r          # noqa: E731
        bpfsys.map_update(dp.map_fds["hw_stats"], idx(0, drop, r_policy).to_bytes(4, "little"),
                          percpu([3] + [4] * (ncpu - 1)))
        bpfsys.map_update(dp.map_fds["hw_stats"], idx(1, drop, r_policy).to_bytes(4, "little"), percpu([5] * ncpu))
        bpfsys.map_update(dp.map_fds["hw_stats"], idx(0, would, r_syn).to_bytes(4, "little"), percpu([7] * ncpu))
        bpfsys.map_update(dp.map_fds["hw_dos_stats"], (2 * L.REASONS + r_syn).to_bytes(4, "little"),
                          percpu([11] * ncpu))
        kdt, bdt = L.DTYPES["hw_dos_key"], L.DTYPES["hw_dos_ban"]
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        with dos_sources.table(dp.map_fds[dos_sources.MAP]) as t:
            t.slots["slot_state"][:9000:2] = L.C["HW_SLOT_LIVE"]     # 4500 tracked sources (any slots)
            t.slots["slot_state"][1:20:2] = L.C["HW_SLOT_BUSY"]      # being written: not counted
        for i in range(5):
            k = np.zeros(1, kdt)
            k["addr"][0][:4] = list(i.to_bytes(4, "big"))
            k["family"], k["prefix_len"] = 4, 32
            if i < 5:
                b = np.zeros(1, bdt)
                b["since_ns"], b["until_ns"] = now, now + (60 * 10**9 if i < 3 else -10**9)   # 3 active, 2 expired
                bpfsys.map_update(dp.map_fds["hw_dos_banned"], k.tobytes(), b.tobytes())
        dp.set_config(manual_bans=2)
        g = _KernelGauges(pin)
        try:
            k = g.read()
        finally:
            g.close()
        assert g.missing == []
        assert k["drops"][("drop", "policy_deny")] == 3 + 4 * (ncpu - 1) + 5 * ncpu
        assert k["drops"][("would_drop", "syn_flood")] == 7 * ncpu
        assert k["dos_drops"] == {"syn_flood": 11 * ncpu}
        assert k["dos_buckets"] == 4500
        assert k["bans_auto"] == 3 and k["bans_manual"] == 2
        fams = {f.prom: f for f in families_from_status({}, k)}
        assert dict(fams["hostwall_dos_bans"].samples) == {("auto",): 3, ("manual",): 2}
        assert dict(fams["hostwall_drops_packets"].samples)[("would_drop", "syn_flood")] == 7 * ncpu
    finally:
        dp.close()
        shutil.rmtree(pin, ignore_errors=True)
