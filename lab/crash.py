"""Crash trials: the real collector process killed with SIGKILL at bad moments, next to the real enforcer,
the real pinned ring buffer and a real Kafka broker — and proof that nothing that reached the kernel was
lost without being counted (docs/testing.md "Crash tests", docs/collector.md "Delivery and loss").

One session: a netns lab with the enforcer (examples/policy.yaml), echo servers on the protected host,
a traffic generator that logs every connection it completes (lab/conn_log.py: the ground truth), the
collector (`hostwall-collector run`, sinks: Kafka and JSONL) and a broker the harness stops and starts.
Trials, mixed (seeded):

  stop    SIGSTOP the collector so a backlog builds in the ring, SIGCONT, SIGKILL a random moment later
  outage  stop the broker, wait until the collector spools, SIGKILL, restart it while the broker is down
  replay  stop the broker until the spool holds seconds of records, start it, SIGKILL as soon as the
          replay shows up in the topic, restart
  load    a UDP flood from the attacker (drop summaries, deny samples) and pings (conntrack ends), SIGKILL
          while the enforcer keeps judging, restart after a moment of downtime

After the last trial: the generator stops, the flows end (TCP connections closed by FINs once quiet for
the close grace period, ICMP after its 30 s conntrack idle timeout, both reported by the collector's
conntrack scan: docs/collector.md "Records"), the collector stops cleanly, and `Outcome` compares:

  - every connection in the generator's log has a flow start and a flow end record in Kafka;
  - every event the kernel emitted (its own counters) is in Kafka (events stream: lost_uncounted);
    what the kernel could not emit (budget, ring buffer full) is counted (lost_counted);
  - drop summaries add up to the kernel's drop counters exactly (none lost, none twice);
  - `hostwall-collector verify` on the topics and on the JSONL file: no unexplained gap.

Bounded: every wait has a deadline; processes, namespaces, pins and the broker's data are removed by
close() also after a failure. Cost: ~20 s per trial plus ~40 s at the end (the ICMP idle timeout).
"""
from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from hostwall.bpf.state import instance_stem

from .collector_proc import CollectorProcess
from .enforcer_proc import EnforcerProcess
from .netns import REPO_ROOT, Lab
from .traffic import echo_servers, start_in, trafgen_in

__all__ = ["KINDS", "CrashSession", "Outcome", "plan"]

KINDS = ("stop", "outage", "replay", "load")
POLICY = REPO_ROOT / "examples" / "policy.yaml"
ICMP_IDLE_S = 30.0                     # HW_CT_TO_ICMP: ping flows end by the collector's conntrack scan
CLOSE_GRACE_S = 2.0                    # flow_close_grace (default): FIN-closed connections end by the scan too
TOPICS = {"flows_topic": "crash.flows", "anomalies_topic": "crash.anomalies", "audit_topic": "crash.audit"}
CONFIG = {"conntrack_scan_interval": "1s", "drop_summary_interval": "250ms", "status_interval": "250ms",
          "jsonl": {"fsync": "interval", "fsync_interval": "250ms"},   # = the drop interval (docs/collector.md "Drop summary windows")
          "kafka": {**TOPICS, "spool_after": "1s", "request_timeout": "10s", "connect_timeout": "5s",
                    "linger": "5ms"}}


def plan(trials: int, seed: int) -> list[str]:
    """`trials` kinds: every kind at least once (when trials >= 4), the rest drawn with the seed."""
    rng = random.Random(seed)
    kinds = list(KINDS) * (trials // len(KINDS)) + rng.sample(KINDS, trials % len(KINDS))
    rng.shuffle(kinds)
    return kinds


def _wait(pred, timeout: float, what: str, every: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() > end:
            raise TimeoutError(f"crash trial: timed out after {timeout:g} s waiting for {what}")
        time.sleep(every)


@dataclass
class Outcome:
    trials: list[dict]
    connections: int = 0
    missing_start: list[dict] = field(default_factory=list)
    missing_end: list[dict] = field(default_factory=list)
    kernel_emitted: int = 0
    kernel_lost: dict = field(default_factory=dict)
    events_received: int = 0
    records_received: int = 0                   # distinct event ids in Kafka
    duplicates: int = 0
    drop_packets_summarized: int = 0
    drop_packets_kernel: int = 0
    verify: dict = field(default_factory=dict)  # target -> (exit code, report)

    @property
    def lost_uncounted(self) -> int:
        return max(0, self.kernel_emitted - self.events_received) + len(self.missing_start) + len(self.missing_end)

    @property
    def lost_counted(self) -> int:
        return sum(self.kernel_lost.values())

    def metrics(self) -> dict[str, float]:
        return {"trials": float(len(self.trials)), "records_produced": float(self.records_received + self.lost_counted
                                                                              + self.lost_uncounted),
                "lost_uncounted": float(self.lost_uncounted), "lost_counted": float(self.lost_counted),
                "duplicates": float(self.duplicates), "connections": float(self.connections),
                "kernel_events": float(self.kernel_emitted),
                "unexplained_gaps": float(sum(r.get("unexplained", 0) for _, rep in self.verify.values()
                                              for r in rep.get("streams", [])))}


class CrashSession:
    """The lab, enforcer, traffic and collector of a crash run; `broker` is a started
    tests.peers.kafka.KafkaBroker this session may stop and start."""

    def __init__(self, broker, out_dir: str | os.PathLike, *, rate: float = 150.0, seed: int = 1,
                 log=lambda msg: print(f"[crash] {msg}", file=sys.stderr, flush=True)):
        self.broker = broker
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.rate = rate
        self.rng = random.Random(seed)
        self.log = log
        self.lab: Lab | None = None
        self.enf: EnforcerProcess | None = None
        self.col: CollectorProcess | None = None
        self.trials: list[dict] = []
        self.pings: list[tuple[float, float]] = []
        self._servers = None
        self._traffic = None
        self.conn_log = self.out / "connections.jsonl"
        self.jsonl = self.out / "flows.jsonl"
        self.sink = f"kafka://{broker.bootstrap_servers}"

    # ---- lifecycle -------------------------------------------------------------------------------
    def __enter__(self) -> CrashSession:
        try:
            self._open()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _open(self) -> None:
        self.broker.create_topics({TOPICS["flows_topic"]: 3, TOPICS["anomalies_topic"]: 1, TOPICS["audit_topic"]: 1})
        self.lab = Lab()
        self.lab.warm()
        self.enf = EnforcerProcess(self.lab, POLICY).start()
        self._servers = echo_servers(self.lab, "prot", tcp=[80], duration=1800.0)
        self._servers.__enter__()
        self.start_collector()
        self._traffic = self._start_traffic()

    def _start_traffic(self):
        argv = [sys.executable, "-m", "hostwall.lab.conn_log", "--host", self.lab.addr("prot"), "--port", "80",
                "--rate", str(self.rate), "--duration", "1800", "--out", str(self.conn_log)]
        proc = self.lab.popen("cli", argv)
        line = proc.stdout.readline()
        if '"ready"' not in line:
            raise RuntimeError(f"the traffic generator did not start: {line!r} {proc.stderr.read()[-1000:]}")
        return proc

    def close(self) -> None:
        """Stop everything this session started; idempotent, safe after a failure."""
        if self._traffic is not None and self.lab is not None:
            self.lab.stop(self._traffic)
            self._traffic = None
        if self.col is not None:
            self.col.close()
        if self._servers is not None:
            self._servers.__exit__(None, None, None)
            self._servers = None
        if self.enf is not None:
            self.enf.close()
            self.enf = None
        if self.lab is not None:
            self.lab.close()
            self.lab = None
        if not self.broker.running:
            self.broker.start()

    # ---- the collector ---------------------------------------------------------------------------
    def start_collector(self, timeout: float = 60.0) -> None:
        cfg = json.loads(json.dumps(CONFIG))
        cfg["kafka"]["spool_dir"] = str(self.out / "spool")
        self.col = CollectorProcess(self.enf, self.out, sinks=[self.sink, f"jsonl:{self.jsonl}"], config=cfg)
        self.col.start(timeout)

    def kill(self) -> None:
        """SIGKILL the collector (and reap it): it writes nothing more."""
        p = self.col.proc
        os.kill(p.pid, signal.SIGKILL)
        p.wait(10)
        self.col.close()

    def status(self) -> dict:
        """The collector's status file, read directly (cheap enough to poll every 100 ms)."""
        try:
            return json.loads((Path(self.enf.state_dir) / f"collector-{instance_stem(self.enf.pin_dir)}.json").read_text())
        except (OSError, ValueError):
            return {}

    def sink_stats(self) -> dict:
        return (self.status().get("sinks") or {}).get(self.sink) or {}

    def healthy(self) -> bool:
        s = self.sink_stats()
        return s.get("state") == "healthy" and not (s.get("spool") or {}).get("pending")

    # ---- trials ----------------------------------------------------------------------------------
    def run(self, kinds: list[str]) -> None:
        for i, kind in enumerate(kinds):
            t0 = time.time()
            detail = getattr(self, f"trial_{kind}")()
            self.trials.append({"n": i, "kind": kind, "t0": t0, "t1": time.time(), **detail})
            self.log(f"trial {i + 1}/{len(kinds)} {kind}: {detail}")
            _wait(self.healthy, 120, "the collector delivering directly again after the trial", every=0.25)

    def trial_stop(self) -> dict:
        time.sleep(self.rng.uniform(0.5, 1.5))
        stop_s, after_s = self.rng.uniform(3.0, 8.0), self.rng.uniform(0.0, 0.1)
        os.kill(self.col.proc.pid, signal.SIGSTOP)
        time.sleep(stop_s)
        os.kill(self.col.proc.pid, signal.SIGCONT)
        time.sleep(after_s)
        self.kill()
        self.start_collector()
        return {"stopped_s": round(stop_s, 2), "killed_after_resume_s": round(after_s, 3)}

    def trial_outage(self) -> dict:
        self.broker.stop()
        _wait(lambda: self.sink_stats().get("state") == "degraded" and self.sink_stats()["spool"]["pending"] > 0,
              30, "the collector spooling while the broker is down")
        time.sleep(self.rng.uniform(0.2, 2.0))
        spooled = self.sink_stats()["spool"]["pending"]
        self.kill()
        self.start_collector()                  # the broker is still down: it must start degraded
        down = self.sink_stats()
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.broker.start()
        return {"spooled_at_kill": spooled, "restarted_state": down.get("state")}

    def trial_replay(self) -> dict:
        self.broker.stop()
        _wait(lambda: (self.sink_stats().get("spool") or {}).get("pending", 0) >= self.rate * 4, 60,
              "seconds of records in the spool")
        before = self._end_offsets()
        self.broker.start()
        waited = asyncio.run(self._kill_when_topic_grows(before))
        self.start_collector()
        rec = ((self.sink_stats().get("spool") or {}).get("recovery") or {}).get("pending", 0)
        return {"killed_after_growth_s": round(waited, 3), "spool_pending_at_restart": rec}

    def trial_load(self) -> dict:
        t0 = time.time()
        ping = start_in(self.lab, "cli", "ping", host=self.lab.addr("prot"), count=3, interval=0.2)
        flood = trafgen_in(self.lab, "att", kind="udp", dport=5353, duration=None, rate_pps=50_000)
        time.sleep(self.rng.uniform(0.5, 2.0))
        self.kill()
        down_s = self.rng.uniform(0.5, 2.0)
        time.sleep(down_s)
        self.start_collector()
        flood_report = flood.stop()
        ping.result(timeout=30)
        self.pings.append((t0, time.time()))
        return {"down_s": round(down_s, 2), "flood_packets": flood_report.get("packets") or 0}

    def _end_offsets(self) -> int:
        async def go():
            from aiokafka import AIOKafkaConsumer
            from aiokafka.structs import TopicPartition
            c = AIOKafkaConsumer(bootstrap_servers=self.broker.bootstrap_servers, group_id=None)
            await c.start()
            try:
                tps = [TopicPartition(TOPICS["flows_topic"], p) for p in range(3)]
                return sum((await c.end_offsets(tps)).values())
            finally:
                await c.stop()
        return asyncio.run(go()) if self.broker.running else -1

    async def _kill_when_topic_grows(self, before: int, timeout: float = 60.0) -> float:
        """Poll the topic's end offsets every 20 ms; SIGKILL the collector at the first growth (the replay
        has started and is not acknowledged in the spool yet)."""
        from aiokafka import AIOKafkaConsumer
        from aiokafka.structs import TopicPartition
        t0 = time.monotonic()
        c = AIOKafkaConsumer(bootstrap_servers=self.broker.bootstrap_servers, group_id=None)
        await asyncio.wait_for(c.start(), 60)
        try:
            tps = [TopicPartition(TOPICS["flows_topic"], p) for p in range(3)]
            while sum((await c.end_offsets(tps)).values()) <= before:
                if time.monotonic() - t0 > timeout:
                    raise TimeoutError("crash trial: the replay never reached the broker")
                await asyncio.sleep(0.02)
            self.kill()
        finally:
            await c.stop()
        return time.monotonic() - t0

    # ---- the end -----------------------------------------------------------------------------------
    def finish(self, timeout: float = 120.0) -> Outcome:
        """Stop the traffic, let every flow end, stop the collector cleanly, read everything back."""
        self.lab.stop(self._traffic)
        self._traffic = None
        last_ping = max((t1 for _, t1 in self.pings), default=0.0)
        # the last connections' ends: the close grace period, then a scan (conntrack_scan_interval 1 s) and
        # the next one, should the first have raced a late packet
        ends_due = max(time.time() + CLOSE_GRACE_S + 3, last_ping + ICMP_IDLE_S + 3)
        _wait(lambda: time.time() > ends_due, ends_due - time.time() + 10, "the flows' close grace and idle timeouts",
              every=0.5)
        _wait(lambda: self.status().get("ring", {}).get("backlog_bytes", 1) == 0 and self.healthy(), timeout,
              "the collector to catch up", every=0.25)
        rc = self.col.stop()
        if rc != 0:
            raise RuntimeError(f"the collector's clean stop exited {rc}: {self.col.log_tail()}")
        return self._outcome()

    def _kernel(self) -> tuple[dict, int]:
        from hostwall.collector.kernel import KernelSource
        with KernelSource(self.enf.pin_dir) as ks:
            loss = ks.kernel_loss()
        drops = sum(v.get("drop", 0) + v.get("would_drop", 0) for v in self.enf.status()["drops_by_reason"].values())
        return loss, drops

    def _outcome(self) -> Outcome:
        from hostwall.collector.verify import read_kafka
        loss, drops = self._kernel()
        out = Outcome(self.trials, drop_packets_kernel=drops)
        out.kernel_emitted = sum(o.get("emitted", 0) for o in loss.values())
        out.kernel_lost = {f"kernel.{r}": sum(o.get(r, 0) for o in loss.values()) for r in ("budget", "ringbuf_full")}
        recs: list[dict] = []
        for t in TOPICS.values():
            recs += asyncio.run(read_kafka(self.broker.bootstrap_servers, t, timeout_s=180))
        ids = Counter(r.get("event", {}).get("id") for r in recs)
        out.duplicates = sum(n - 1 for n in ids.values())
        out.records_received = len(ids)
        uniq = {r["event"]["id"]: r for r in recs}
        out.events_received = sum(1 for r in uniq.values() if r.get("hostwall", {}).get("stream") == "events")
        out.drop_packets_summarized = sum(r.get("network", {}).get("packets", 0) for r in uniq.values()
                                          if r["hostwall"].get("kind") == "drop_summary")
        self._match_connections(out, uniq.values())
        for target in [f"{self.sink}/{t}" for t in TOPICS.values()], [str(self.jsonl)]:
            r = subprocess.run([sys.executable, "-m", "hostwall.collector.cli", "verify", "--json", *target],
                               capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                               env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)))
            out.verify[" ".join(target)] = (r.returncode, json.loads(r.stdout) if r.stdout.strip() else {})
        return out

    def _match_connections(self, out: Outcome, records) -> None:
        """Every completed connection of the generator's log: a flow start and a flow end, same 5-tuple,
        whose event.start is the connection's first packet (within 1 s of the generator's clock)."""
        from hostwall.collector.records import parse_iso_ns
        flows: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
        icmp: dict[str, list[float]] = defaultdict(list)
        for r in records:
            hw, ev = r.get("hostwall") or {}, r.get("event") or {}
            if hw.get("kind") != "flow" or not ev.get("start"):
                continue
            what = "start" if "start" in ev.get("type", ()) else "end" if "end" in ev.get("type", ()) else None
            if what is None:
                continue
            t = parse_iso_ns(ev["start"]) / 1e9
            net, src, dst = r.get("network") or {}, r.get("source") or {}, r.get("destination") or {}
            if net.get("transport") == "icmp":
                icmp[what].append(t)
                continue
            flows[(src.get("ip"), src.get("port"), dst.get("ip"), dst.get("port"))][what].append(t)
        with open(self.conn_log) as f:
            conns = [json.loads(line) for line in f if line.strip()]
        for c in conns:
            if not c.get("ok"):
                continue
            out.connections += 1
            got = flows.get((c["src"], c["sport"], c["dst"], c["dport"]), {})
            for what, missing in (("start", out.missing_start), ("end", out.missing_end)):
                if not any(c["t0"] - 1.0 <= t <= c["t1"] + 1.0 for t in got.get(what, ())):
                    missing.append(c)
        for t0, t1 in self.pings:
            for what, missing in (("start", out.missing_start), ("end", out.missing_end)):
                if not any(t0 - 1.0 <= t <= t1 + 1.0 for t in icmp.get(what, ())):
                    missing.append({"ping": [t0, t1], "missing": what})
