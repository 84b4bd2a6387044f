"""Loss accounting against the real kernel (issue "Collector": loss tests).

The real datapath is loaded and pinned; the real collector pipeline (KernelSource, RecordBuilder,
Enricher, AnomalyDetector, JSONL sink, ledger, status file) runs in-process on it. Kernel events are
made with BPF_PROG_TEST_RUN: a UDP packet to port 514, judged by an `action: log` rule of a
stateless policy, emits exactly one `log` event per run, so `repeat=N` asks the kernel for N events.

- ring buffer full: the fill runs on the collector's own event-loop thread (the collector cannot
  read meanwhile), N is larger than the ring (8 MiB / 128 B = 65535 events). The kernel's
  ringbuf_full count must equal the events that were not written (N - emitted), the collector must
  count exactly that many as lost (kernel, ringbuf_full) and deliver every emitted one.
- stalled sink: a sink whose send() waits on a gate (the one test double here; block policy). The
  back-pressure must reach the kernel (ringbuf_full grows while the sink is stalled) and at every
  moment produced = delivered + lost + in flight must hold per sink, per stage and reason, as
  `hostwall-collector status --json` shows too. Released, everything drains; failed, whatever it
  held is counted lost with a reason and the rest stays in the ring for the next collector.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections import Counter

import pytest
import uvloop
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.packet import raw

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L
from hostwall.bpf.ringbuf import slot_size
from hostwall.collector.accounting import Ledger
from hostwall.collector.anomaly import AnomalyDetector
from hostwall.collector.config import CollectorConfig, QueueSizes
from hostwall.collector.enrich import Enricher
from hostwall.collector.enrich.host import HostInfo, InstanceStateView
from hostwall.collector.kernel import KernelSource
from hostwall.collector.pipeline import Pipeline, PipelineFailed
from hostwall.collector.records import RecordBuilder
from hostwall.collector.sinks.base import BaseSink, FullQueuePolicy
from hostwall.collector.sinks.jsonl import JsonlSink

pytestmark = pytest.mark.bpf

REPO = str(L.HEADER.parent.parent)
POLICY = """
version: 1
name: loss
defaults: {ingress: deny, egress: allow, stateful: false}
rules:
  - {name: audit-me, priority: 1, direction: ingress, action: log, protocol: udp, ports: [514]}
"""
LOG_FRAME = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP(src="10.0.0.9", dst="10.0.0.1")
                / UDP(sport=5000, dport=514))
RING_EVENTS = L.C["HW_RINGBUF_BYTES"] // slot_size(L.DTYPES["hw_event"].itemsize)   # a full ring holds ~this many
BIG_BUDGET = 10_000_000


@pytest.fixture(scope="module")
def instance():
    if os.geteuid() != 0:
        pytest.skip("loading BPF programs needs root (CAP_BPF, CAP_NET_ADMIN)")
    from hostwall.enforcer.datapath import Datapath
    dp = Datapath.load()
    pin = f"/sys/fs/bpf/hostwall-test/loss-{secrets.token_hex(3)}"
    dp.pin(pin)
    yield dp, pin
    Datapath.unpin(pin)
    dp.close()


@pytest.fixture
def kernel(instance, tmp_path, monkeypatch):
    """(KernelSource for the test's own reading, Datapath, pin dir) with the stateless log policy
    installed and the ring buffer and drop maps empty."""
    from hostwall.enforcer.compiler import compile_policy
    from hostwall.enforcer.policy import parse_policy
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path / "state"))
    dp, pin = instance
    pol = parse_policy(POLICY)
    dp.install(compile_policy(pol, {r.name: i for i, r in enumerate(pol.rules)}, 1))
    dp.clear_conntrack()
    ks = KernelSource(pin)
    ks.drain_drops()
    ks.drain_drops()
    with ks.ring() as rb:
        rb.read(1 << 20)
        assert rb.available_bytes() == 0
    yield ks, dp, pin
    ks.set_knobs(event_budget=L.C["HW_EVENT_BUDGET"])
    with ks.ring() as rb:                                 # leave nothing behind for the next test
        while rb.read(1 << 16).consumed_bytes:
            pass
    ks.close()


def log_events(dp, n: int) -> None:
    """Ask the kernel for n `log` events (one BPF_PROG_TEST_RUN syscall, repeat = n)."""
    assert bpfsys.prog_test_run(dp.prog_fds["xdp_ingress"], LOG_FRAME, repeat=n).retval == 2   # XDP_PASS


def log_outcomes(ks) -> Counter:
    return Counter(ks.kernel_loss()["log"])


def make_pipeline(pin: str, tmp_path, extra_sinks=(), **cfg_kw) -> tuple[Pipeline, JsonlSink]:
    """The production wiring (collector.pipeline.build_pipeline) with a JSONL sink, plus extra sinks."""
    cfg = CollectorConfig(pin_dir=pin, event_budget=BIG_BUDGET, drop_interval_s=0.25, ct_scan_interval_s=1.0,
                          status_interval_s=0.2, status_file=str(tmp_path / "collector-status.json"), **cfg_kw)
    jsonl = JsonlSink(tmp_path / "flows.jsonl", fsync="none")
    sinks = [jsonl, *extra_sinks]
    host = HostInfo.detect(pin)
    instance = InstanceStateView(pin)
    ledger = Ledger([s.name for s in sinks])
    pipe = Pipeline(cfg, KernelSource(pin), RecordBuilder(host, instance, ledger), sinks,
                    enricher=Enricher(host, instance), anomaly=AnomalyDetector(None, host), ledger=ledger,
                    audit_log=instance.audit_log)
    return pipe, jsonl


async def until(pred, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(every)


async def cli_status(status_file: str, *args: str) -> subprocess.CompletedProcess:
    """`hostwall-collector status` run as a separate process (without blocking the collector's loop)."""
    env = dict(os.environ, PYTHONPATH=REPO)
    return await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "hostwall.collector.cli", "status", *args,
                                                    "--status-file", status_file],
                                   env=env, cwd=REPO, capture_output=True, text=True, timeout=60)


def file_kinds(path) -> Counter:
    with open(path, "rb") as f:
        return Counter(json.loads(line)["hostwall"]["kind"] for line in f if line.strip())


def assert_balanced(led: dict, *, quiescent: bool) -> None:
    """produced = delivered + lost + in_flight for every sink, with lost and in-flight split by stage
    and reason adding up to the totals (the status JSON's ledger)."""
    lost_up = sum(n for reasons in led["lost_by_stage"].values() for n in reasons.values())
    assert lost_up == led["lost_upstream"]
    assert led["produced"] == sum(led["produced_by_source"].values())
    assert led["produced"] == led["lost_upstream"] + led["fanned_out"] + led["in_flight_upstream"]
    for name, b in led["sinks"].items():
        assert b["lost"] == lost_up + sum(b["lost_in_sink"].values()), (name, b)
        assert b["in_flight"] == led["in_flight_upstream"] + b["in_flight_in_sink"], (name, b)
        assert b["produced"] == led["produced"] == b["delivered"] + b["lost"] + b["in_flight"], (name, b)
        assert b["in_flight"] >= 0 and b["in_flight_in_sink"] >= 0
        if quiescent:
            assert b["in_flight"] == 0, (name, b)
    assert led["ok"] and led["violations"] == [], led["violations"]


# ---- ring buffer full --------------------------------------------------------------------------------

def test_a_full_ring_buffer_is_counted_event_for_event_as_ringbuf_full(kernel, tmp_path):
    ks, dp, pin = kernel
    n = RING_EVENTS + 20_000
    pipe, jsonl = make_pipeline(pin, tmp_path)
    seen = {}

    async def go():
        task = asyncio.ensure_future(pipe.run())
        await until(lambda: pipe.state == "running" or task.done(), 30, "the collector to start")
        seen["before"] = log_outcomes(ks)                  # after the collector's own baseline
        log_events(dp, n)                                  # on the collector's loop thread: it cannot read now
        seen["after"] = log_outcomes(ks)
        await until(lambda: pipe.ring.available_bytes() == 0 and pipe.ledger.in_flight(jsonl.name) == 0
                    and pipe.ledger.in_flight_upstream == 0, 60, "the collector to drain the ring")
        # a loss right before the stop (no tick will see it) must still reach the final ledger
        ks.set_event_budget(0)
        log_events(dp, 10)
        seen["end"] = log_outcomes(ks)
        pipe.stop()
        await task
    uvloop.run(go())

    d = seen["after"] - seen["before"]
    assert d["emitted"] + d["ringbuf_full"] == n and d["budget"] == 0, d
    assert d["ringbuf_full"] >= n - RING_EVENTS and d["emitted"] <= RING_EVENTS, d   # the ring really was full
    assert (seen["end"] - seen["after"]) == Counter(budget=10)
    led = pipe.ledger
    assert dict(led.lost_by) == {"kernel": Counter({"ringbuf_full": d["ringbuf_full"], "budget": 10})}
    assert led.produced_by["kernel"] == d["ringbuf_full"] + 10
    assert file_kinds(jsonl.path)["log"] == d["emitted"] == led.produced_by["events"]
    st = json.loads((tmp_path / "collector-status.json").read_text())
    assert st["state"] == "stopped" and st["ledger"]["quiescent_violations"] == []
    assert st["ledger"]["lost_by_stage"] == {"kernel": {"budget": 10, "ringbuf_full": d["ringbuf_full"]}}
    assert_balanced(st["ledger"], quiescent=True)
    b = st["ledger"]["sinks"][jsonl.name]
    assert b["delivered"] == sum(file_kinds(jsonl.path).values())


# ---- stalled sink ------------------------------------------------------------------------------------

class StalledSink(BaseSink):
    """The test double: a sink that holds every batch until `gate` opens, then delivers it — or, with
    fail set, raises (a broken sink). Block policy, like a local file."""
    full_queue_policy = FullQueuePolicy.BLOCK

    def __init__(self):
        super().__init__("stalled")
        self.gate = asyncio.Event()
        self.fail = False
        self.waiting = 0

    async def _send(self, records):
        self.waiting += 1
        try:
            await self.gate.wait()
        finally:
            self.waiting -= 1
        if self.fail:
            raise OSError("the disk went away")
        self._deliver(len(records))


SMALL_QUEUES = QueueSizes(events=2, sink=2048, batch=512)


async def _stall(pipe, ks, dp, stalled, seen: dict) -> None:
    """Start, fill the ring past full while the sink is stalled, wait until back-pressure holds."""
    await until(lambda: pipe.state == "running", 30, "the collector to start")
    seen["before"] = log_outcomes(ks)
    log_events(dp, RING_EVENTS + 5000)
    await until(lambda: stalled.waiting == 1 and pipe.status()["queues"]["events"]["depth"] == SMALL_QUEUES.events,
                20, "back-pressure to reach the ring reader")
    await asyncio.sleep(0.3)
    seen["mid"] = log_outcomes(ks)
    # the reader has stopped: only the room it made before it stopped is free; ask for 5000 more
    seen["free"] = (pipe.ring.size - pipe.ring.available_bytes()) // slot_size(L.DTYPES["hw_event"].itemsize)
    seen["more"] = seen["free"] + 5000
    log_events(dp, seen["more"])
    seen["after"] = log_outcomes(ks)
    want = (seen["after"] - seen["before"])["ringbuf_full"]
    await until(lambda: pipe.ledger.lost_by.get("kernel", {}).get("ringbuf_full", 0) == want, 10,
                "a tick to fold the kernel counters into the ledger")
    folded = time.time()
    await until(lambda: json.loads(pipe.status_path.read_text()).get("updated_at", 0) > folded, 10,
                "a status write after the fold")


def test_a_stalled_sink_backpressures_to_the_kernel_and_nothing_disappears(kernel, tmp_path):
    ks, dp, pin = kernel
    stalled = StalledSink()
    pipe, jsonl = make_pipeline(pin, tmp_path, [stalled], queues=SMALL_QUEUES)
    status_file = str(tmp_path / "collector-status.json")
    seen: dict = {}

    async def go():
        task = asyncio.ensure_future(pipe.run())
        await _stall(pipe, ks, dp, stalled, seen)
        # while stalled: the ring holds a backlog, the sink queue is full, and the operator's status
        # shows every record as delivered, lost (with stage and reason) or in flight
        r = await cli_status(status_file, "--json")
        assert r.returncode == 0, r.stderr
        seen["cli"] = json.loads(r.stdout)
        seen["cli_text"] = (await cli_status(status_file)).stdout
        seen["live"] = pipe.ledger.snapshot(pipe.observed_in_flight())
        seen["backlog"] = pipe.ring.available_bytes()
        stalled.gate.set()                                 # the sink recovers: everything drains
        await until(lambda: pipe.ring.available_bytes() == 0 and pipe.ledger.in_flight(stalled.name) == 0
                    and pipe.ledger.in_flight_upstream == 0, 60, "the backlog to drain")
        pipe.stop()
        await task
    uvloop.run(go())

    during = seen["after"] - seen["mid"]                   # back-pressure reached the kernel
    assert during["emitted"] + during["ringbuf_full"] == seen["more"] and during["ringbuf_full"] >= 5000, during
    assert during["emitted"] <= seen["free"], (during, seen["free"])
    st = seen["cli"]
    assert st["alive"] and st["state"] == "running"
    assert seen["backlog"] > 0 and st["ring"]["backlog_bytes"] > 0
    q = st["queues"]["sinks"]["stalled"]
    assert q["policy"] == "block" and q["depth"] + 512 > q["capacity"] and not q["dead"]
    led = st["ledger"]
    assert_balanced(led, quiescent=False)
    assert led["sinks"]["stalled"]["in_flight"] > 0 and led["sinks"]["stalled"]["delivered"] == 0
    d = seen["after"] - seen["before"]
    assert led["lost_by_stage"] == {"kernel": {"ringbuf_full": d["ringbuf_full"]}}
    assert led["kernel_events"]["log"]["ringbuf_full"] == seen["after"]["ringbuf_full"]
    assert {k: seen["live"][k] for k in ("produced", "lost_upstream", "fanned_out", "lost_by_stage")} == \
        {k: led[k] for k in ("produced", "lost_upstream", "fanned_out", "lost_by_stage")}   # CLI == in-process
    assert f"lost       kernel.ringbuf_full {d['ringbuf_full']}" in seen["cli_text"]
    assert "stalled: produced" in seen["cli_text"] and "(block)" in seen["cli_text"]

    final = json.loads(open(status_file).read())
    assert final["state"] == "stopped" and final["ledger"]["quiescent_violations"] == []
    assert_balanced(final["ledger"], quiescent=True)
    d = log_outcomes(ks) - seen["before"]
    kinds = file_kinds(jsonl.path)
    assert kinds["log"] == d["emitted"] and d["emitted"] + d["ringbuf_full"] == RING_EVENTS + 5000 + seen["more"]
    for name in (jsonl.name, "stalled"):
        b = final["ledger"]["sinks"][name]
        assert b["delivered"] == sum(kinds.values()) and b["lost"] == d["ringbuf_full"], (name, b)


def test_a_failing_sink_counts_what_it_held_and_leaves_the_rest_in_the_ring(kernel, tmp_path):
    ks, dp, pin = kernel
    stalled = StalledSink()
    pipe, jsonl = make_pipeline(pin, tmp_path, [stalled], queues=SMALL_QUEUES)
    seen: dict = {}

    async def go():
        task = asyncio.ensure_future(pipe.run())
        await _stall(pipe, ks, dp, stalled, seen)
        stalled.fail = True
        stalled.gate.set()                                 # the sink breaks: the service stops (exit 1)
        with pytest.raises(PipelineFailed, match="sink stalled: OSError: the disk went away"):
            await asyncio.wait_for(task, 30)
    uvloop.run(go())

    st = json.loads((tmp_path / "collector-status.json").read_text())
    assert st["state"] == "failed" and "the disk went away" in st["error"]
    led = st["ledger"]
    assert led["quiescent_violations"] == []
    assert_balanced(led, quiescent=True)
    b = led["sinks"]["stalled"]
    assert b["delivered"] == 0 and b["lost_in_sink"]["sink_error"] > 0              # the batch it held
    assert b["lost"] == b["produced"]
    j = led["sinks"][jsonl.name]
    assert j["delivered"] == sum(file_kinds(jsonl.path).values())
    # every event the kernel emitted was either released (durable in every at_least_once sink before the
    # failure) or is still in the ring for the next collector — including all the failed sink had taken
    d = log_outcomes(ks) - seen["before"]
    read = st["ring"]["records_read"] if st["ring"] else pipe.counters["events_read"]
    released = json.loads(pipe.checkpoint.path.read_text())["ring"]["events"]
    with ks.ring() as rb:
        left = rb.available_bytes() // slot_size(L.DTYPES["hw_event"].itemsize)
    assert released + left == d["emitted"], (released, left, d)
    assert released < read and b["lost"] == d["ringbuf_full"] + read
    assert led["produced_by_source"]["events"] == read
