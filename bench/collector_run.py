"""The measured collector of suite `collector`, in a process of its own (no BCC, no LLVM).

`bench/collector.py` loads the BCC producer and starts this module as a child with the producer's
program and ring-buffer fds (`pass_fds`); the child imports only the collector side (`hostwall.bpf`
syscalls, ring buffer, records, enrichment, sinks), so its peak resident set is the collector's own
(docs/benchmarks.md "collector"). It fills the ring through BPF_PROG_TEST_RUN on the inherited
program fd, exactly as the parent's producer would, and prints one JSON object of metrics. One
measurement per process (`--mode`), so each starts from a fresh heap (a second pipeline in the same
process inherits the first one's garbage and open-flow table, and ran ~25 % slower), with the process
settings the collector CLI makes at start (hostwall/gcpause.py tune_for_batches):

  --mode on     e2e_jsonl_rps: ring → RecordBuilder → Enricher → JsonlSink through the real Pipeline,
                the Enricher's socket-owner and cgroup caches warm (every record attributed from a
                cache hit, as on a busy steady host); collector_rss_mb: this process's peak RSS (VmHWM)
  --mode off    e2e_jsonl_rps_enrich_off, collector_rss_mb_enrich_off: the same without the enricher
  --mode floor  floor_jsonl_rps: the same records prebuilt (one ring batch, reused): orjson.dumps each,
                join per batch of queues.batch, one write(2) per batch — nothing else
  --mode stages stage_*_ns: unprofiled ns per record of each stage (stages(); `python -m
                hostwall.bench.collector --stages` runs it)

`python -m hostwall.bench.collector --profile FILE [--enrich on|off]` loads the producer and runs this
child with `--profile FILE --mode on|off`: the e2e pass under cProfile and writes the stats
to FILE (cProfile's deterministic overhead inflates many-small-call code most; docs/benchmarks.md
states the factor measured in the same run); `--report FILE` prints its per-stage breakdown. Cost: ~2-4 s per 100k records on this machine.
"""
from __future__ import annotations

import argparse
import asyncio
import errno
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L

from .statedir import use_private_state_dir

FRAME = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(46)
BENCH_CGROUP_ID = 4242            # egress events carry it; the cgroup cache knows it (warm)
BENCH_LOCAL = ("10.0.0.1", 443)   # ingress flows' local socket; the socket cache knows its owner


def _log(msg: str) -> None:
    print(f"[collector:child] {msg}", file=sys.stderr, flush=True)


def rss_mb(field: str = "VmHWM") -> float:
    """VmHWM (peak resident set) or VmRSS of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def produce(prog_fd: int, k: int) -> None:
    """Up to k records into the ring in one test-run. A signal may interrupt a long test-run (EINTR)
    after some of them: callers count what arrived from the ring's producer position, not from k."""
    try:
        bpfsys.prog_test_run(prog_fd, FRAME, repeat=k)
    except bpfsys.BpfError as e:
        if e.errno != errno.EINTR:
            raise


class _Source:
    """collector.parts.KernelSource over the inherited ring fd: no drops, no conntrack."""

    def __init__(self, map_fd: int):
        self.map_fd = map_fd
        self._gen = 0
        self._last_scan: int | None = None

    def identity(self) -> dict:
        return {"boot_id": "bench", "ring_map_id": bpfsys.map_info(self.map_fd).id, "ev_stats_map_id": 0}

    def set_drop_prefixes(self, v4: int, v6: int) -> None:
        pass

    def agg_gen(self) -> int:
        return self._gen

    def read_drops(self):
        self._gen ^= 1
        return self.read_drops_of(self._gen ^ 1)

    def read_drops_of(self, gen: int):
        from hostwall.collector.kernel import DropDrain
        z = np.zeros(0, dtype=L.DTYPES["hw_drop_key"])
        now = self.now_ns()
        return DropDrain(z, np.zeros(0, dtype=L.DTYPES["hw_drop_val"]), {}, now, now, 0.0, gen)

    def clear_drops(self, d) -> None:
        pass

    def free_claims(self, scan) -> int:
        return 0

    def adopt_claims(self, scan) -> None:
        pass

    def set_last_scan(self, now_ns) -> None:
        self._last_scan = now_ns

    @property
    def last_scan_ns(self):
        return self._last_scan

    def ring(self):
        from hostwall.bpf.ringbuf import RingBuffer
        return RingBuffer(os.dup(self.map_fd))

    def monotonic_to_wall(self) -> int:
        from hostwall.collector.kernel import KernelSource
        return KernelSource.monotonic_to_wall()

    def now_ns(self) -> int:
        return time.clock_gettime_ns(time.CLOCK_MONOTONIC)

    def set_event_budget(self, n: int, source_share: int | None = None) -> None:
        pass

    def port_syns(self) -> np.ndarray:
        return np.zeros(65536, np.uint64)

    def syn_proxy(self, now_ns: int):
        from hostwall.bpf.syn_proxy import ProxyState
        return ProxyState(now_ns, {}, {})

    def kernel_loss(self) -> dict:
        return {}

    def detached_ns(self) -> int:
        return 0

    def scan_conntrack(self, now_ns: int, at_ns: int, grace_ns: int = 0):
        from hostwall.collector.kernel import CtScan
        return CtScan([], 0, 0, 0)

    def close(self) -> None:
        pass


def warm_enricher(host):
    """An Enricher whose socket-owner and cgroup caches already hold what the bench's records ask
    for: ingress flows' local socket (BENCH_LOCAL, tcp and udp) and egress records' cgroup."""
    from hostwall.collector.enrich import Enricher
    from hostwall.collector.enrich.cgroup import CgroupResolver, parse_cgroup_path
    from hostwall.collector.enrich.sockets import SocketOwner, SocketOwnerResolver
    cg = CgroupResolver(mount="/sys/fs/cgroup", ttl_s=3600.0)
    cid = "0123456789abcdef" * 4
    cg.cache.put(BENCH_CGROUP_ID, parse_cgroup_path(
        f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1234abcd_5678_90ef_1234_567890abcdef.slice/"
        f"cri-containerd-{cid}.scope", BENCH_CGROUP_ID))
    so = SocketOwnerResolver(ttl_s=3600.0, cgroup_mount="/sys/fs/cgroup")
    owner = SocketOwner(inode=12345, pid=4321, process_name="nginx", executable="/usr/sbin/nginx",
                        cgroup_id=BENCH_CGROUP_ID, cgroup_path="/kubepods.slice/x.scope")
    for proto in (6, 17):
        so.cache.put((None, proto, *BENCH_LOCAL), owner)
    return Enricher(host, None, cgroups=cg, sockets=so)


def e2e(prog_fd: int, map_fd: int, n_records: int, enrich: bool, profile: str | None = None) -> tuple[float, int]:
    """Pipeline: ring → RecordBuilder (→ Enricher) → JsonlSink; records/s and bytes written."""
    from hostwall.bpf.ringbuf import slot_size
    from hostwall.collector.accounting import Ledger
    from hostwall.collector.config import CollectorConfig, JsonlOptions, QueueSizes
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.pipeline import Pipeline
    from hostwall.collector.records import RecordBuilder
    from hostwall.collector.sinks.jsonl import JsonlSink

    d = Path(tempfile.mkdtemp(prefix="hw-bench-collector-"))
    try:
        path = d / "flows.jsonl"
        cfg = CollectorConfig(pin_dir=str(d), drop_interval_s=1.0, ct_scan_interval_s=60, active_timeout_s=60,
                              queues=QueueSizes(),
                              jsonl=JsonlOptions(rotate_bytes=1 << 30, fsync="none"), status_file=str(d / "st.json"))
        sink = JsonlSink(path, fsync="none", rotate_bytes=1 << 30)
        ledger = Ledger([sink.name])
        host = HostInfo(hostname="bench", boot_id="b", pin_dir=str(d))
        builder = RecordBuilder(host, None, ledger)
        enricher = warm_enricher(host) if enrich else None
        pipe = Pipeline(cfg, _Source(map_fd), builder, [sink], ledger=ledger, enricher=enricher)
        cap = (L.C["HW_RINGBUF_BYTES"] - 8) // slot_size(L.DTYPES["hw_event"].itemsize)
        slot = slot_size(L.DTYPES["hw_event"].itemsize)

        async def go() -> float:
            task = asyncio.ensure_future(pipe.run())
            while pipe.state != "running":
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            pos0 = pipe.ring.producer_pos
            left = n_records
            while left > 0:                       # keep the ring topped up as the collector drains it
                room = cap - pipe.ring.available_bytes() // slot
                k = min(left, max(0, room - 1))
                if k:
                    produce(prog_fd, k)
                    left = n_records - (pipe.ring.producer_pos - pos0) // slot
                await asyncio.sleep(0.002)
            while sink.delivered < n_records and not task.done():
                await asyncio.sleep(0.002)
            dt = time.perf_counter() - t0
            pipe.stop()
            await task
            return dt

        import uvloop
        if profile:
            import cProfile
            prof = cProfile.Profile()
            dt = prof.runcall(uvloop.run, go())
            prof.dump_stats(profile)
        else:
            dt = uvloop.run(go())
        bad = ledger.check(quiescent=True)
        if bad or sink.delivered != n_records:
            raise RuntimeError(f"e2e: delivered {sink.delivered} of {n_records}; ledger {bad}")
        if enricher is not None:
            st = enricher.stats()
            unattributed = st["unattributed"]
            if unattributed or st["errors"]:
                raise RuntimeError(f"e2e: enrichment not warm: {unattributed} unattributed, {st['errors']} errors")
        return n_records / dt, path.stat().st_size
    finally:
        shutil.rmtree(d, ignore_errors=True)


def floor(prog_fd: int, map_fd: int, n_records: int) -> float:
    """orjson + write(2) only, of one ring's worth of prebuilt records (built by the same builder and
    enricher as e2e), written in batches of QueueSizes.batch until n_records are out."""
    import orjson

    from hostwall.bpf.clock import Clock
    from hostwall.bpf.ringbuf import RingBuffer, slot_size
    from hostwall.collector.config import QueueSizes
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.records import RecordBuilder

    slot = slot_size(L.DTYPES["hw_event"].itemsize)
    host = HostInfo(hostname="bench", boot_id="b", pin_dir="/tmp")
    builder, enricher = RecordBuilder(host, None), warm_enricher(host)
    batch = QueueSizes().batch
    with RingBuffer(os.dup(map_fd)) as rb:
        rb.read(1 << 20)
        while rb.available_bytes() // slot < batch:
            produce(prog_fd, batch - rb.available_bytes() // slot)
        recs = builder.on_events(rb.read(batch).records, Clock.calibrate())
    for i, r in enumerate(recs):
        enricher.enrich(r)
        r["hostwall"]["seq"], r["hostwall"]["stream"] = i, "events"
    enricher.close()
    d = Path(tempfile.mkdtemp(prefix="hw-bench-floor-"))
    try:
        fd = os.open(d / "floor.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        dumps = orjson.dumps
        t0 = time.perf_counter()
        left = n_records
        while left > 0:
            part = recs[:min(left, len(recs))]
            buf = b"".join([dumps(r) + b"\n" for r in part])
            view = memoryview(buf)
            while view:
                view = view[os.write(fd, view):]
            left -= len(part)
        dt = time.perf_counter() - t0
        os.close(fd)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return n_records / dt


def stages(prog_fd: int, map_fd: int, n_records: int) -> dict[str, float]:
    """Unprofiled ns per record of each stage of the e2e record path, timed with perf_counter_ns around
    whole ring batches (queues.batch events) — the same calls the Pipeline makes, without the event
    loop between them: ring read, RecordBuilder.on_events, ledger + hostwall.seq numbering
    (Pipeline._number), Enricher.enrich_batch (warm caches), the JSONL sink's send (encode + write),
    and, apart, the cyclic GC's own time inside them (gc.callbacks). Each stage also as this thread's
    CPU time (`stage_*_cpu_ns`, time.thread_time_ns at the same points): wall time counts the time the
    process waited for a core, which on a shared, loaded machine hides a 10 % change (docs/benchmarks.md,
    issue 17 collector); CPU time does not (caches and memory are still shared)."""
    import gc

    from hostwall.bpf.ringbuf import slot_size
    from hostwall.collector.accounting import Ledger
    from hostwall.collector.config import CollectorConfig, JsonlOptions, QueueSizes
    from hostwall.collector.enrich.host import HostInfo
    from hostwall.collector.pipeline import Pipeline
    from hostwall.collector.records import RecordBuilder
    from hostwall.collector.sinks.jsonl import JsonlSink

    d = Path(tempfile.mkdtemp(prefix="hw-bench-stages-"))
    gc_ns = [0, 0]

    def on_gc(phase: str, _info: dict) -> None:
        if phase == "start":
            gc_ns[1] = time.perf_counter_ns()
        else:
            gc_ns[0] += time.perf_counter_ns() - gc_ns[1]
    try:
        cfg = CollectorConfig(pin_dir=str(d), queues=QueueSizes(), status_file=str(d / "st.json"),
                              jsonl=JsonlOptions(rotate_bytes=1 << 30, fsync="none"))
        sink = JsonlSink(d / "flows.jsonl", fsync="none", rotate_bytes=1 << 30)
        ledger = Ledger([sink.name])
        host = HostInfo(hostname="bench", boot_id="b", pin_dir=str(d))
        builder, enricher = RecordBuilder(host, None, ledger), warm_enricher(host)
        pipe = Pipeline(cfg, _Source(map_fd), builder, [sink], ledger=ledger, enricher=enricher)
        from hostwall.bpf.clock import Clock
        clock = Clock.calibrate()
        slot, batch = slot_size(L.DTYPES["hw_event"].itemsize), cfg.queues.batch
        t = dict.fromkeys(("decode", "build", "number", "enrich", "sink"), 0)
        cpu = dict.fromkeys(t, 0)
        now = time.thread_time_ns
        done = 0

        async def go() -> None:
            nonlocal done
            await sink.start()
            ring = _Source(map_fd).ring()
            ring.read(1 << 20)
            gc.callbacks.append(on_gc)
            try:
                while done < n_records:
                    k = min(batch, n_records - done)
                    while ring.available_bytes() // slot < k:
                        produce(prog_fd, k - ring.available_bytes() // slot)
                    c0, t0 = now(), time.perf_counter_ns()
                    b = ring.read(k)
                    c1, t1 = now(), time.perf_counter_ns()
                    recs = builder.on_events(b.records, clock)
                    c2, t2 = now(), time.perf_counter_ns()
                    ledger.produce("events", len(recs))
                    pipe._number(recs, "events")
                    c3, t3 = now(), time.perf_counter_ns()
                    await pipe._enrich(recs)
                    c4, t4 = now(), time.perf_counter_ns()
                    await sink.send(recs)
                    c5, t5 = now(), time.perf_counter_ns()
                    for key, dt, dc in zip(t, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4),
                                           (c1 - c0, c2 - c1, c3 - c2, c4 - c3, c5 - c4)):
                        t[key] += dt
                        cpu[key] += dc
                    done += len(recs)
                    del recs, b
            finally:
                gc.callbacks.remove(on_gc)
                await sink.close()
                ring.close()
        import uvloop
        uvloop.run(go())
        out = {f"stage_{k}_ns": v / done for k, v in t.items()}
        out["stage_total_ns"] = sum(t.values()) / done
        out.update({f"stage_{k}_cpu_ns": v / done for k, v in cpu.items()})
        out["stage_total_cpu_ns"] = sum(cpu.values()) / done
        out["stage_gc_ns"] = gc_ns[0] / done
        return out
    finally:
        shutil.rmtree(d, ignore_errors=True)


# cProfile functions → pipeline stage (docs/benchmarks.md "Where the time goes"). Python functions
# by file (and name, for the id/time helpers inside the record modules); built-ins by their own name
# when it says what they do, else their time goes to the stage of the caller (per call edge).
_BUILTIN_STAGE = (("sha1", "ids"), ("blake2b", "ids"), ("b64encode", "ids"), ("hexdigest", "ids"),
                  ("'digest'", "ids"), ("_struct.pack", "ids"), ("inet_ntop", "addresses"),
                  ("gmtime", "times"), ("strftime", "times"), ("orjson.dumps", "encode"), ("posix.write", "write"),
                  ("prog_test_run", "bench producer"), ("epoll", "event loop"), ("select", "event loop"))
_FILE_STAGE = (("community_id.py", "ids"), ("records/timefmt.py", "times"), ("bpf/clock.py", "times"),
               ("bpf/ringbuf.py", "decode"), ("records/batch.py", "decode"), ("collector/enrich/", "enrichment"),
               ("collector/records/", "record building"), ("encoders/", "encode"), ("sinks/jsonl.py", "encode"),
               ("spool_format.py", "write"), ("bpf/bpfsys.py", "bench producer"), ("bench/", "bench producer"),
               ("collector/", "queueing and pipeline"), ("asyncio/", "event loop"), ("uvloop", "event loop"),
               ("numpy", "decode"))
_NAME_STAGE = {"_event_id": "ids", "iso_ns": "times", "_endpoints": "addresses", "ntop": "addresses"}


def _stage(func: tuple) -> str | None:
    path, _line, name = func
    if path == "~":
        return next((st for key, st in _BUILTIN_STAGE if key in name), None)
    if name in _NAME_STAGE and "collector/" in path:
        return _NAME_STAGE[name]
    return next((st for key, st in _FILE_STAGE if key in path), "other")


def stage_breakdown(stats_file: str) -> dict[str, float]:
    """Own time (tottime) per stage of a cProfile stats file, in seconds; built-ins that name no
    stage are charged to their callers' stages by call edge."""
    import pstats
    st = pstats.Stats(stats_file).stats              # func -> (cc, nc, tt, ct, callers)
    out: dict[str, float] = {}
    for func, (_cc, _nc, tt, _ct, callers) in st.items():
        stage = _stage(func)
        if stage is not None:
            out[stage] = out.get(stage, 0.0) + tt
            continue
        for caller, edge in callers.items():         # edge: (cc, nc, tt, ct) of calls from caller
            c = _stage(caller) or "other built-ins"
            out[c] = out.get(c, 0.0) + edge[2]
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prog-fd", type=int, help="the producer's program (bench/collector.py passes it)")
    ap.add_argument("--map-fd", type=int, help="its ring buffer")
    ap.add_argument("--records", type=int, default=100_000)
    ap.add_argument("--profile", help="run the e2e pass of --mode on|off under cProfile; stats written here")
    ap.add_argument("--mode", choices=("on", "off", "floor", "stages"), default="on",
                    help="e2e with enrichment on / off, or the floor (one per process: a fresh heap each)")
    ap.add_argument("--report", help="print the per-stage breakdown of a --profile stats file and exit")
    a = ap.parse_args(argv)
    if a.report:
        b = stage_breakdown(a.report)
        total = sum(b.values())
        for k, v in b.items():
            print(f"{k:24s} {v:8.3f} s {100 * v / total:5.1f} %")
        return 0
    use_private_state_dir()                 # the parent's, inherited; its own when run alone
    m: dict[str, float] = {"rss_mb_child_start": rss_mb("VmRSS")}
    from hostwall.gcpause import tune_for_batches
    tune_for_batches()                      # as the collector CLI does at start (collector/cli.py run)
    if a.mode == "stages":
        m.update(stages(a.prog_fd, a.map_fd, a.records))
        _log("stages, ns per record: " + ", ".join(f"{k[6:-3]} {v:.0f}" for k, v in m.items() if k.startswith("stage_")))
    elif a.mode == "floor":
        m["floor_jsonl_rps"] = floor(a.prog_fd, a.map_fd, a.records)
        _log(f"floor (prebuilt records, orjson + write): {m['floor_jsonl_rps']:.3g} records/s")
    else:
        rps, size = e2e(a.prog_fd, a.map_fd, a.records, a.mode == "on", profile=a.profile)
        m["e2e_jsonl_rps" if a.mode == "on" else "e2e_jsonl_rps_enrich_off"] = rps
        m["collector_rss_mb" if a.mode == "on" else "collector_rss_mb_enrich_off"] = rss_mb("VmHWM")
        m["e2e_bytes_per_record" if a.mode == "on" else "e2e_bytes_per_record_enrich_off"] = size / a.records
        _log(f"e2e enrichment {a.mode}{' (warm caches)' if a.mode == 'on' else ''}: {rps:.3g} records/s, "
             f"{size / a.records:.0f} B/record, peak RSS {rss_mb('VmHWM'):.0f} MiB")
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
