"""Suite `kafka`: the Kafka sink against a real broker (tests/peers KafkaBroker, KRaft, 127.0.0.1), with
Kafka's own producer benchmark as the baseline in the same run.

- kafka_rps       sustained records/s through collector.sinks.kafka.KafkaSink (acks=all, idempotent,
                  zstd, 512 KiB batches, 4-partition topic): canonical ECS records made by the real
                  RecordBuilder (flows and denies with community ids), sent in pipeline-sized batches
                  (8192) as fast as the sink takes them; from the first send() to the moment every batch
                  is settled — the end-to-end acknowledgement the pipeline waits for before it releases
                  the ring buffer (docs/collector.md "Delivery and loss"). Encoding, routing, keys,
                  headers and the settlement bookkeeping are inside the timing.
- java_perf_rps   org.apache.kafka.tools.ProducerPerformance (kafka-tools jar from the cache) on the same
                  broker and a same-shaped topic: the SAME encoded records as payloads (--payload-file, so
                  size and compressibility match), acks=all, idempotence, zstd; the tool's own defaults
                  otherwise (batch.size 16 KiB, linger.ms 5).
- java_perf_tuned_rps  the same with batch.size and linger.ms set to KafkaSink's (512 KiB, 5 ms): the
                  stricter comparison (Java's I/O thread compresses and sends while its producer thread
                  appends; a warm JVM on 2M records reaches ~350k/s here).
- kafka_vs_java   kafka_rps / java_perf_rps (kafka_vs_java_tuned: / java_perf_tuned_rps)
- latency_p99_ms  kernel to broker at 20k records/s: a BCC program writes struct hw_event records into a
                  real ring buffer (bench.collector.Producer, kernel timestamp bpf_ktime_get_ns) 1000 every
                  50 ms; the real Pipeline (ring reader with acknowledged consumption, RecordBuilder, queues)
                  ships them through the Kafka sink to a topic with message.timestamp.type=LogAppendTime;
                  latency = the broker's append time - the record's @timestamp (the kernel's clock, mapped
                  to wall time); p50/p99/max over every record of the run (ms resolution, the broker's).
                  The run also checks that the ring's consumer position caught up with every record.
- max_rps_p99_250ms  the highest offered rate (records/s) at which that kernel-to-broker p99 stays
                  <= 250 ms with no offered record finding the ring full: a stepped search from the 20k/s
                  run (up x1.5 per step while it holds, else down /2), then one bisection step between the
                  last rate that held and the first that did not; each step a fresh topic and pipeline for
                  STEP_S seconds, bounded by SEARCH_BUDGET_S (the figure is a lower bound when the budget
                  ends the search). The step grid is coarse (factor 1.5, then 1.22): read it as such.
- latency_search_steps  how many steps that search ran
- latency_to_sink_p50_ms / _p99_ms  the 20k/s run split where the sink takes a record: kernel → the start of
                  the sink call that carried it (ring read, record building, the queues), and
  latency_sink_p50_ms / _p99_ms  from there to the broker's append (encoding, batching, waiting for the
                  producer's request in flight, the broker); latency_records_per_call: records per sink call
                  (the pipeline hands a sink what queued up while it was busy: docs/collector.md)
- record_bytes    mean encoded record size (the payload size of both producers)

The broker runs on the same 2 CPUs as the producer under test, so both producers pay for it; the Java
tool runs with its own JVM (-Xmx512m). --quick: 300k records, 10 s of latency; full: 2M, 30 s.
"""
from __future__ import annotations

import asyncio
import bisect
import ipaddress
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

TARGETS = {
    "kafka_rps": (">= 100k records/s", lambda m: m["kafka_rps"] >= 100_000),
    "kafka_vs_java": (">= 1.2 x Java ProducerPerformance", lambda m: m["kafka_rps"] >= 1.2 * m["java_perf_rps"]),
    "kafka_vs_java_tuned": (">= 1.0 x the Java tool with KafkaSink's batch settings",
                            lambda m: m["kafka_rps"] >= m["java_perf_tuned_rps"]),
    "latency_p99_ms": ("<= 250 ms kernel to broker at 20k/s", lambda m: m["latency_p99_ms"] <= 250),
}

NOTES = """\
kafka_rps: KafkaSink (acks=all, idempotent, zstd, 512 KiB batches) on real RecordBuilder records, 4 partitions.
java_perf_rps: Kafka's ProducerPerformance, same payloads (--payload-file), acks=all, zstd, its default
batch.size/linger.ms; java_perf_tuned_rps: the same with KafkaSink's batch.size/linger.ms.
latency_p99_ms: BCC ring buffer -> Pipeline -> KafkaSink at 20k records/s; broker LogAppendTime - kernel time.
max_rps_p99_250ms: highest offered rate of a stepped search (x1.5 steps, one bisection) with p99 <= 250 ms.
Broker, producer and consumer share the machine's CPUs."""

BATCH = 8192
WARMUP = 6 * BATCH
PARTITIONS = 4
P99_LIMIT_MS = 250.0
STEP_S = {True: 4.0, False: 10.0}             # --quick / full: seconds of offered load per search step
SEARCH_BUDGET_S = {True: 90.0, False: 300.0}  # wall time the stepped search may take
SEARCH_STEPS = 8


def _log(msg: str) -> None:
    print(f"[kafka] {msg}", file=sys.stderr, flush=True)


def make_records(n: int) -> list[dict]:
    """n canonical records from the real RecordBuilder: flow starts and denies over many 5-tuples."""
    from hostwall.bpf import layout as L
    from hostwall.bpf.clock import Clock
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.records import RecordBuilder
    ev = np.zeros(n, L.DTYPES["hw_event"])
    i = np.arange(n)
    base = int(ipaddress.ip_address("198.51.100.0"))
    src = (base + (i % 50_000)).astype(">u4").view(np.uint8).reshape(n, 4)
    ev["saddr"][:, :4] = src
    ev["daddr"][:, :4] = np.frombuffer(ipaddress.ip_address("10.0.0.1").packed, np.uint8)
    ev["sport"] = 1024 + (i * 7919) % 60000
    ev["dport"] = np.where(i % 3 == 0, 443, np.where(i % 3 == 1, 22, 8080))
    now = time.monotonic_ns()
    ev["ts_ns"] = now + i
    ev["start_ns"] = now + i
    types = {v: k for k, v in L.EVENT_TYPE_NAMES.items()}
    ev["type"] = np.where(i % 4 == 3, types["deny"], types["flow_start"])
    ev["family"], ev["proto"], ev["ifindex"], ev["rule_slot"], ev["ct_state"] = 4, 6, 2, 0xFFFFFFFF, 2
    ev["verdict"] = np.where(i % 4 == 3, L.C["HW_V_DROP"], L.C["HW_V_ALLOW"])
    ev["reason"] = np.where(i % 4 == 3, L.C["HW_R_DEFAULT_DENY"], L.C.get("HW_R_PASS_DEFAULT", 0))
    ev["packets"][:, 0], ev["bytes"][:, 0] = 1, 60
    b = RecordBuilder(HostInfo("bench-host", "bench-boot", "/sys/fs/bpf/hostwall/bench", "0.1.0"), None)
    return b.on_events(ev, Clock.calibrate())


async def _sink_throughput(bootstrap: str, topic: str, recs: list[dict], total: int, spool: str) -> float:
    from hostwall.collector.config import KafkaOptions
    from hostwall.collector.sinks.kafka import KafkaSink
    s = KafkaSink(bootstrap, options=KafkaOptions(flows_topic=topic, anomalies_topic=topic + ".a",
                                                  audit_topic=topic + ".audit", spool_dir=spool))
    await s.start()
    if s.degraded:
        raise RuntimeError(f"kafka sink did not connect: {s.last_error}")
    for k in range(0, WARMUP, BATCH):              # warm up (untimed): connections, metadata, the broker's
        await s.send(recs[k:k + BATCH])            # JIT — the Java runs after this one find it warm too
    while s.delivered < WARMUP:
        await asyncio.sleep(0.005)
    base = s.delivered
    t0 = time.perf_counter()
    sent = calls = 0
    while sent < total:
        k = min(BATCH, total - sent)
        off = sent % (len(recs) - BATCH)
        await s.send(recs[off:off + k])
        sent += k
        calls += 1
    want = s.batches                               # every call, warm-up included, settled: acknowledged
    while s.settled_calls < want or s.delivered - base < total:
        if time.perf_counter() - t0 > 300:
            raise RuntimeError(f"only {s.delivered - base} of {total} delivered; {s.stats()}")
        await asyncio.sleep(0.002)
    dt = time.perf_counter() - t0
    st = s.stats()
    await s.close()
    if st["lost"] or st["state"] != "healthy":
        raise RuntimeError(f"kafka sink lost records or degraded during the run: {st['lost']} {st['state']}")
    return total / dt


def _java_perf(broker, topic: str, payload_file: Path, total: int, batch_bytes: int | None = None,
               linger_ms: int | None = None) -> float:
    """ProducerPerformance records/s: acks=all, idempotence, zstd; batch.size/linger.ms the tool's
    defaults (16 KiB, 5 ms in Kafka 4.x) unless given."""
    props = [f"bootstrap.servers={broker.bootstrap_servers}", "acks=all", "enable.idempotence=true",
             "compression.type=zstd"]
    if batch_bytes is not None:
        props += [f"batch.size={batch_bytes}", "max.request.size=2097152"]
    if linger_ms is not None:
        props.append(f"linger.ms={linger_ms}")
    res = broker.run_tool("org.apache.kafka.tools.ProducerPerformance", "--topic", topic, "--num-records", total,
                          "--throughput", -1, "--payload-file", payload_file, "--payload-delimiter", "\n",
                          "--producer-props", *props, timeout=600, heap="512m")
    out = res.stdout + res.stderr
    m = None
    for line in out.splitlines():
        mm = re.search(rf"^{total} records sent, ([0-9.]+) records/sec", line.strip())
        if mm:
            m = mm
    if res.returncode != 0 or m is None:
        raise RuntimeError(f"ProducerPerformance failed ({res.returncode}):\n{out[-2000:]}")
    return float(m.group(1))


class _SinkCalls:
    """Wraps the sink's send_many (what the pipeline's sink worker calls): when each call began (wall ms)
    and the events-stream hostwall.seq of its first record — the latency breakdown's split point. One
    append per call."""

    def __init__(self, sink) -> None:
        self.began_ms: list[float] = []
        self.first_seq: list[int] = []
        self.records = 0
        inner = sink.send_many

        async def send_many(batches: list[list[dict]]) -> None:
            self.began_ms.append(time.time() * 1000)
            self.first_seq.append(batches[0][0]["hostwall"]["seq"])
            self.records += sum(map(len, batches))
            await inner(batches)
        sink.send_many = send_many

    def began(self, seq: int) -> float:
        """Wall ms at which the sink call that carried events record `seq` began."""
        return self.began_ms[bisect.bisect_right(self.first_seq, seq) - 1]


@dataclass
class LatencyRun:
    """One paced run: per record kernel → broker (`total`) and kernel → the sink call that took it
    (`to_sink`: ring read, record building and the queues), ms; offered records that found the ring full
    (-1: a strict=False run that did not hold); sink calls."""
    total: list[float] = field(default_factory=list)
    to_sink: list[float] = field(default_factory=list)
    ring_full: int = -1
    calls: int = 0


async def _latency(broker, topic: str, seconds: float, rate: int, spool: str, drain_s: float = 60.0,
                   strict: bool = True) -> LatencyRun:
    """Kernel → broker latencies (ms) of every record of a paced run through the real Pipeline, split at
    the sink call, and how many of the offered records did not fit the ring buffer (a pipeline slower
    than the offered rate: what waits to be acknowledged fills the ring; the datapath would count those
    ringbuf_full). strict=False (the rate search): a run whose records were not all delivered within
    drain_s (still in the ring, or in the sink's spool at the stop: carried over) is not an error but
    LatencyRun() (ring_full -1): the step failed."""
    import orjson
    from aiokafka import AIOKafkaConsumer

    from hostwall.bench.collector import Producer
    from hostwall.bench.collector_run import _Source
    from hostwall.collector.accounting import Ledger
    from hostwall.collector.config import CollectorConfig, KafkaOptions, QueueSizes
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.pipeline import Pipeline
    from hostwall.collector.records import RecordBuilder, parse_iso_ns
    from hostwall.collector.sinks.kafka import KafkaSink

    prod = Producer()
    d = Path(tempfile.mkdtemp(prefix="hw-bench-kafka-"))
    try:
        sink = KafkaSink(broker.bootstrap_servers, options=KafkaOptions(
            flows_topic=topic, anomalies_topic=topic + ".a", audit_topic=topic + ".audit", spool_dir=spool))
        cfg = CollectorConfig(pin_dir=str(d), drop_interval_s=1.0, ct_scan_interval_s=60, active_timeout_s=60,
                              queues=QueueSizes(), status_file=str(d / "st.json"))
        calls = _SinkCalls(sink)
        ledger = Ledger([sink.name])
        builder = RecordBuilder(HostInfo(hostname="bench", boot_id="b", pin_dir=str(d)), None, ledger)
        pipe = Pipeline(cfg, _Source(prod.map_fd), builder, [sink], ledger=ledger)
        task = asyncio.ensure_future(pipe.run())
        while pipe.state != "running":
            if task.done():
                await task
            await asyncio.sleep(0.01)
        step, per = 0.05, int(rate * 0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        n = 0
        while loop.time() - t0 < seconds:
            due = int((loop.time() - t0) / step) + 1
            while n < due * per:
                prod.produce(per)
                n += per
            await asyncio.sleep(step / 2)
        while sink.delivered < n and loop.time() - t0 < seconds + drain_s:
            await asyncio.sleep(0.05)
        t_end = loop.time() + 10                   # the last commit follows the last acknowledgement
        while pipe.ring.consumer_pos != pipe.ring.producer_pos and loop.time() < t_end:
            await asyncio.sleep(0.01)
        caught_up = pipe.ring.consumer_pos == pipe.ring.producer_pos
        pipe.stop()
        await task
        if not strict and (not caught_up or sink.delivered < n):
            return LatencyRun()                    # spooled or still in the ring: the step did not hold
        if not caught_up:
            raise RuntimeError("latency run: the ring's consumer position never reached the last record")
        problems = ledger.check(quiescent=True)
        if problems or sink.stats()["lost"]:
            raise RuntimeError(f"latency run: the sink lost records or the ledger is off: {problems} "
                               f"{sink.stats()['lost']}")
        delivered = sink.delivered
    finally:
        prod.close()
        shutil.rmtree(d, ignore_errors=True)
    c = AIOKafkaConsumer(topic, bootstrap_servers=broker.bootstrap_servers, auto_offset_reset="earliest",
                         enable_auto_commit=False, group_id=None)
    await c.start()
    run = LatencyRun(ring_full=n - delivered, calls=len(calls.began_ms))
    lat, to_sink = run.total, run.to_sink
    try:
        while len(lat) < delivered:
            got = await asyncio.wait_for(c.getmany(timeout_ms=1000, max_records=20000), 30)
            for msgs in got.values():
                for m in msgs:
                    if m.timestamp_type != 1:
                        raise RuntimeError("the latency topic must use LogAppendTime")
                    r = orjson.loads(m.value)
                    t_kernel_ms = parse_iso_ns(r["@timestamp"]) / 1e6
                    lat.append(m.timestamp - t_kernel_ms)
                    hw = r["hostwall"]
                    to_sink.append(calls.began(hw["seq"]) - t_kernel_ms if hw.get("stream") == "events" else np.nan)
    finally:
        await c.stop()
    return run


def latency_metrics(r: LatencyRun) -> dict[str, float]:
    """The 20k/s run's metrics: kernel → broker percentiles, and the breakdown at the sink call."""
    a, up = np.array(r.total), np.array(r.to_sink)
    sink = a - up
    return {"latency_p50_ms": float(np.percentile(a, 50)), "latency_p99_ms": float(np.percentile(a, 99)),
            "latency_max_ms": float(a.max()), "latency_records": float(len(a)),
            "latency_ring_full": float(r.ring_full),
            "latency_to_sink_p50_ms": float(np.nanpercentile(up, 50)),
            "latency_to_sink_p99_ms": float(np.nanpercentile(up, 99)),
            "latency_sink_p50_ms": float(np.nanpercentile(sink, 50)), "latency_sink_p99_ms": float(np.nanpercentile(sink, 99)),
            "latency_records_per_call": len(a) / r.calls if r.calls else 0.0}


def _step(broker, k: int, rate: int, seconds: float, work: Path) -> tuple[bool, float]:
    """One step of the rate search: (held: p99 <= P99_LIMIT_MS and nothing found the ring full, p99)."""
    import uvloop
    topic = f"bench.rate{k}"
    broker.create_topics({topic: PARTITIONS, topic + ".a": 1, topic + ".audit": 1},
                         config={"message.timestamp.type": "LogAppendTime"})
    r = uvloop.run(_latency(broker, topic, seconds, rate, str(work / f"r{k}"), drain_s=5.0, strict=False))
    p99 = float(np.percentile(np.array(r.total), 99)) if r.total else float("inf")
    held = r.ring_full == 0 and p99 <= P99_LIMIT_MS
    _log(f"rate search: {rate} records/s offered: p99 {p99:.0f} ms, ring full {r.ring_full}: "
         f"{'held' if held else 'did not hold'}")
    return held, p99


def max_rate(broker, held_20k: bool, quick: bool, work: Path) -> tuple[float, int]:
    """Stepped search for the highest offered rate whose p99 stays <= P99_LIMIT_MS (see the module
    docstring), starting from the 20k/s run's verdict; returns (rate, steps). Bounded by SEARCH_STEPS and
    SEARCH_BUDGET_S."""
    t_end = time.monotonic() + SEARCH_BUDGET_S[quick]
    good, bad = (20_000, None) if held_20k else (0, 20_000)
    steps = 0
    while steps < SEARCH_STEPS and time.monotonic() < t_end:
        if bad is None:
            rate = int(good * 1.5)
        elif good == 0:
            rate = bad // 2
            if rate < 1000:
                break
        elif bad / good > 1.3:                    # one bisection step (geometric) between the two
            rate = int((good * bad) ** 0.5)
        else:
            break
        held, _ = _step(broker, steps, rate, STEP_S[quick], work)
        steps += 1
        if held:
            good = rate
        else:
            bad = rate
    return float(good), steps


def run(quick: bool) -> dict[str, float]:
    from hostwall.collector.config import KafkaOptions
    from hostwall.collector.sinks.kafka_wire import make_encoder
    from tests.peers.kafka import KafkaBroker
    total, lat_s = (300_000, 10.0) if quick else (2_000_000, 30.0)
    m: dict[str, float] = {}
    enc = make_encoder("ecs")
    m["record_bytes"] = float(np.mean([len(enc(r)) for r in make_records(5000)]))
    _log(f"records: {m['record_bytes']:.0f} B each (ECS JSON)")
    work = Path(tempfile.mkdtemp(prefix="hw-bench-kafka-"))
    broker = KafkaBroker(num_partitions=PARTITIONS, heap="1g")
    try:
        t1 = time.perf_counter()
        broker.start()
        _log(f"broker {broker.version} up in {time.perf_counter() - t1:.1f} s at {broker.bootstrap_servers}")
        broker.create_topics({"bench.sink": PARTITIONS, "bench.java": PARTITIONS, "bench.sink.a": 1,
                              "bench.sink.audit": 1})
        broker.create_topics({"bench.latency": PARTITIONS, "bench.latency.a": 1, "bench.latency.audit": 1},
                             config={"message.timestamp.type": "LogAppendTime"})
        # latency first, on a fresh broker: the throughput runs below write GBs, and the page-cache
        # writeback that follows stalls any broker on this disk for seconds
        import uvloop
        r = uvloop.run(_latency(broker, "bench.latency", lat_s, 20_000, str(work / "s2")))
        m.update(latency_metrics(r))
        _log(f"kernel -> broker at 20k/s: p50 {m['latency_p50_ms']:.1f} ms, p99 {m['latency_p99_ms']:.1f} ms, "
             f"max {m['latency_max_ms']:.1f} ms over {len(r.total)} records; kernel -> sink call p50 "
             f"{m['latency_to_sink_p50_ms']:.1f} / p99 {m['latency_to_sink_p99_ms']:.1f} ms, sink call -> broker "
             f"p50 {m['latency_sink_p50_ms']:.1f} / p99 {m['latency_sink_p99_ms']:.1f} ms, "
             f"{m['latency_records_per_call']:.0f} records a call")
        held = m["latency_p99_ms"] <= P99_LIMIT_MS and m["latency_ring_full"] == 0
        m["max_rps_p99_250ms"], steps = max_rate(broker, held, quick, work)
        m["latency_search_steps"] = float(steps)
        _log(f"highest offered rate with p99 <= {P99_LIMIT_MS:.0f} ms: {m['max_rps_p99_250ms']:.0f} records/s "
             f"({steps} steps)")
        t2 = time.perf_counter()
        recs = make_records(60_000)
        values = [enc(r) for r in recs]
        _log(f"records for the throughput runs built in {time.perf_counter() - t2:.1f} s")
        m["kafka_rps"] = asyncio.run(_sink_throughput(broker.bootstrap_servers, "bench.sink", recs, total,
                                                      str(work / "s1")))
        _log(f"KafkaSink: {m['kafka_rps']:.0f} records/s ({total} records)")
        payload = work / "payloads.txt"
        payload.write_bytes(b"\n".join(values))
        o = KafkaOptions()
        m["java_perf_rps"] = _java_perf(broker, "bench.java", payload, total)
        _log(f"ProducerPerformance (its default batch.size/linger.ms): {m['java_perf_rps']:.0f} records/s")
        m["java_perf_tuned_rps"] = _java_perf(broker, "bench.java", payload, total, o.batch_bytes,
                                              int(o.linger_s * 1000))
        _log(f"ProducerPerformance (batch.size/linger.ms as KafkaSink): {m['java_perf_tuned_rps']:.0f} records/s")
        m["kafka_vs_java"] = m["kafka_rps"] / m["java_perf_rps"]
        m["kafka_vs_java_tuned"] = m["kafka_rps"] / m["java_perf_tuned_rps"]
    finally:
        broker.close()
        shutil.rmtree(work, ignore_errors=True)
    m["records"] = float(total)
    return dict(sorted(m.items()))
