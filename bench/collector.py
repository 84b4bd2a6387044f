"""Suite `collector`: how fast the collector takes records off the kernel ring buffer, and end to end.

Records come from a small BCC program (`Producer`) that writes one fixed-size struct hw_event per
BPF_PROG_TEST_RUN repetition into a BPF_MAP_TYPE_RINGBUF (real kernel ring buffer, real records,
sequence numbered): fill the ring (test-run, repeat = N), then drain it; only the drain is timed.

- decode_rps        collector.ringbuf batch decoder (mmap, NumPy view, one copy) on one core:
                    records / s over full-ring drains (`read()` returns a NumPy batch; every record's
                    length is checked and its type/family validated; the sequence is checked after)
- bcc_callback_rps  baseline in the same run, same records: BCC's own consumer,
                    `BPF["hw_events"].open_ring_buffer(cb)` + `ring_buffer_consume()`, with the
                    customary per-record Python callback that decodes the record (`event(data)`,
                    a ctypes struct) and keeps it
- decode_speedup    decode_rps / bcc_callback_rps
- e2e_jsonl_rps     ring buffer → RecordBuilder (canonical ECS dicts, event ids, community id) →
                    JSONL sink (encode, write, rotation; fsync none) through the real Pipeline
                    with its queues and ledger; records / s from the first read to the last
                    record written, with the ledger balanced at the end
- rss_mb            peak resident set (VmHWM) during the e2e run, default queue sizes; this process
                    also holds BCC/LLVM (rss_mb_before_e2e is the resident set just before it)

Caveats: the producer writes records as fast as test-run can (~100 ns each), so drains see a full
ring (8 MiB = 65535 records); e2e runs with enrichment off (no sockets / cgroups to resolve in a
benchmark) and a fake drop/conntrack source, so it measures the record path itself.
"""
from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L

TARGETS = {
    "decode_rps": (">= 2e6 records/s", lambda m: m["decode_rps"] >= 2e6),
    "decode_speedup": (">= 5 x BCC callback", lambda m: m["decode_speedup"] >= 5),
}

NOTES = """\
decode_rps: collector.ringbuf batch decode of full 8 MiB rings (mmap + NumPy, one core).
bcc_callback_rps: BCC open_ring_buffer + ring_buffer_consume with a per-record Python callback
(event(data) ctypes decode), same records, same run. e2e_jsonl_rps: ring → RecordBuilder → JSONL
through the Pipeline (fsync none, enrichment off)."""

PRODUCER_SRC = r"""
#include "hostwall.h"
#ifndef RB_BYTES
#define RB_BYTES HW_RINGBUF_BYTES
#endif
BPF_RINGBUF_OUTPUT(hw_events, RB_BYTES / 4096);
BPF_ARRAY(hw_seq, u64, 1);

static __always_inline int fill(struct hw_event *e, u64 n)
{
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->start_ns = n;                          /* sequence number: lets the reader check order */
	e->packets[0] = 1;
	e->bytes[0] = 60;
	e->saddr[0] = bpf_htonl(0xc6336400 | (n & 0xff));     /* 198.51.100.x */
	e->daddr[0] = bpf_htonl(0x0a000001);                  /* 10.0.0.1 */
	e->sport = bpf_htons(40000 + (n & 0x3ff));
	e->dport = bpf_htons(443);
	e->rule_slot = ~0U;
	e->type = HW_EV_DENY;
	e->family = 4;
	e->proto = 6;
	e->verdict = HW_V_DROP;
	e->reason = HW_R_DEFAULT_DENY;
	e->hook = HW_HOOK_XDP_INGRESS;
	e->tcp_flags = 0x10;
	return 0;
}

static __always_inline u64 next_seq(void)
{
	u32 z = 0;
	u64 *s = hw_seq.lookup(&z);
	return s ? __sync_fetch_and_add(s, 1) : 0;
}

int produce(struct xdp_md *ctx)
{
	struct hw_event *e = hw_events.ringbuf_reserve(sizeof(struct hw_event));
	if (!e)
		return XDP_DROP;                  /* ring full: the caller sees it in retval */
	fill(e, next_seq());
	hw_events.ringbuf_submit(e, 0);
	return XDP_PASS;
}

int produce_discard(struct xdp_md *ctx)   /* reserved, then thrown away (DISCARD bit) */
{
	struct hw_event *e = hw_events.ringbuf_reserve(sizeof(struct hw_event));
	if (!e)
		return XDP_DROP;
	hw_events.ringbuf_discard(e, 0);
	return XDP_PASS;
}

int produce_short(struct xdp_md *ctx)     /* a record of the wrong size: a decode error */
{
	u64 *e = hw_events.ringbuf_reserve(24);
	if (!e)
		return XDP_DROP;
	e[0] = 1; e[1] = 2; e[2] = 3;
	hw_events.ringbuf_submit(e, 0);
	return XDP_PASS;
}
"""

XDP_DROP, XDP_PASS = 1, 2
FRAME = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(46)


def _log(msg: str) -> None:
    print(f"[collector] {msg}", file=sys.stderr, flush=True)


class Producer:
    """A BCC-loaded program writing struct hw_event records into its own ring buffer `hw_events`.

    produce(n): n records via one test-run (repeat = n); returns how many did not fit."""

    def __init__(self, ring_bytes: int = L.C["HW_RINGBUF_BYTES"]):
        from bcc import BPF
        self.bpf = BPF(text=PRODUCER_SRC.encode(), cflags=[f"-I{L.HEADER.parent}", f"-DRB_BYTES={ring_bytes}"])
        self.fds = {n: self.bpf.load_func(n.encode(), BPF.XDP).fd
                    for n in ("produce", "produce_discard", "produce_short")}
        self.map_fd = self.bpf[b"hw_events"].map_fd
        self.ring_bytes = ring_bytes

    def _run(self, prog: str, n: int) -> int:
        res = bpfsys.prog_test_run(self.fds[prog], FRAME, repeat=n)
        return res.retval

    def produce(self, n: int) -> None:
        """n records in one kernel call (each repetition reserves + submits one)."""
        if n > 0:
            self._run("produce", n)

    def produce_discard(self, n: int = 1) -> None:
        self._run("produce_discard", n)

    def produce_short(self, n: int = 1) -> None:
        self._run("produce_short", n)

    def ring_fd(self) -> int:
        """A new fd of the ring buffer map (for collector.ringbuf.RingBuffer, which closes it)."""
        return os.dup(self.map_fd)

    def close(self) -> None:
        self.bpf.cleanup()


def _capacity(ring_bytes: int) -> int:
    from hostwall.bpf.ringbuf import slot_size
    return (ring_bytes - 8) // slot_size(L.DTYPES["hw_event"].itemsize)


def bench_decode(prod: Producer, rounds: int) -> tuple[float, int]:
    """records/s of RingBuffer.read over `rounds` full rings; checks order and count."""
    from hostwall.bpf.ringbuf import RingBuffer
    cap = _capacity(prod.ring_bytes)
    times, total = [], 0
    with RingBuffer(prod.ring_fd()) as rb:
        rb.read()                                     # empty it (earlier runs)
        last = None
        for _ in range(rounds):
            prod.produce(cap)
            t0 = time.perf_counter()
            b = rb.read(cap)
            dt = time.perf_counter() - t0
            seq = b.records["start_ns"]
            if len(seq) != cap or b.errors or (last is not None and int(seq[0]) != last + 1) \
                    or not (np.diff(seq.astype(np.int64)) == 1).all():
                raise RuntimeError(f"decode check failed: {len(seq)} of {cap} records, errors {dict(b.errors)}")
            last = int(seq[-1])
            times.append(dt)
            total += len(seq)
    return cap / statistics.median(times), total


def bench_bcc_callback(prod: Producer, rounds: int) -> float:
    """records/s of BCC's ring_buffer_consume with a per-record Python callback (same records).

    The callback decodes each record as BCC's `event(data)` does (cast to a ctypes struct); BCC
    cannot derive that struct from hostwall.h (__u64 fields), so it is generated from the NumPy
    layout (np.ctypeslib.as_ctypes_type), not hand-written."""
    table = prod.bpf[b"hw_events"]
    ptr = ctypes.POINTER(np.ctypeslib.as_ctypes_type(L.DTYPES["hw_event"]))
    got: list = []
    errors = [0]

    def cb(_ctx, data, size):
        try:
            got.append(ctypes.cast(data, ptr).contents)
        except Exception:  # noqa: BLE001 — never raise through the C callback
            errors[0] += 1
        return 0

    table.open_ring_buffer(cb)
    prod.bpf.ring_buffer_consume()                    # empty it
    cap = _capacity(prod.ring_bytes)
    times = []
    for _ in range(rounds):
        got.clear()
        prod.produce(cap)
        t0 = time.perf_counter()
        prod.bpf.ring_buffer_consume()
        dt = time.perf_counter() - t0
        if len(got) != cap or errors[0]:
            raise RuntimeError(f"BCC consumer got {len(got)} of {cap} records ({errors[0]} callback errors)")
        seq = [int(e.start_ns) for e in (got[0], got[-1])]
        if seq[1] - seq[0] != cap - 1:
            raise RuntimeError(f"BCC consumer: sequence {seq} does not span {cap} records")
        times.append(dt)
    got.clear()
    return cap / statistics.median(times)


class _BenchSource:
    """collector.parts.KernelSource for the e2e runs: the producer's ring, no drops, no conntrack."""

    def __init__(self, prod: Producer):
        self.prod = prod
        self._gen = 0
        self._last_scan: int | None = None

    def identity(self) -> dict:
        from hostwall.bpf import bpfsys
        return {"boot_id": "bench", "ring_map_id": bpfsys.map_info(self.prod.map_fd).id, "ev_stats_map_id": 0}

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
        return RingBuffer(self.prod.ring_fd())

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

    def scan_conntrack(self, now_ns: int, at_ns: int, grace_ns: int = 0):
        from hostwall.collector.kernel import CtScan
        return CtScan([], 0, 0, 0)

    def close(self) -> None:
        pass


def bench_e2e(prod: Producer, n_records: int) -> tuple[float, int]:
    """Pipeline: ring → RecordBuilder → JsonlSink; records/s and bytes written."""
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
        builder = RecordBuilder(HostInfo(hostname="bench", boot_id="b", pin_dir=str(d)), None, ledger)
        pipe = Pipeline(cfg, _BenchSource(prod), builder, [sink], ledger=ledger)
        cap = _capacity(prod.ring_bytes)
        slot = slot_size(L.DTYPES["hw_event"].itemsize)

        async def go() -> float:
            task = asyncio.ensure_future(pipe.run())
            while pipe.state != "running":
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            left = n_records
            while left > 0:                       # keep the ring topped up as the collector drains it
                room = cap - pipe.ring.available_bytes() // slot
                k = min(left, max(0, room - 1))
                if k:
                    prod.produce(k)
                    left -= k
                await asyncio.sleep(0.002)
            while sink.delivered < n_records and not task.done():
                await asyncio.sleep(0.002)
            dt = time.perf_counter() - t0
            pipe.stop()
            await task
            return dt

        import uvloop
        dt = uvloop.run(go())
        bad = ledger.check(quiescent=True)
        if bad or sink.delivered != n_records:
            raise RuntimeError(f"e2e: delivered {sink.delivered} of {n_records}; ledger {bad}")
        return n_records / dt, path.stat().st_size
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _rss_mb(field: str = "VmHWM") -> float:
    """VmHWM (peak resident set) or VmRSS of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: write 5 to clear_refs), so the next peak is the e2e run's."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def run(quick: bool) -> dict[str, float]:
    rounds, e2e_n = (5, 100_000) if quick else (21, 1_000_000)
    m: dict[str, float] = {}
    t0 = time.perf_counter()
    prod = Producer()
    try:
        _log(f"producer loaded in {time.perf_counter() - t0:.1f} s; ring {prod.ring_bytes >> 20} MiB, "
             f"{_capacity(prod.ring_bytes)} records per fill")
        m["decode_rps"], n = bench_decode(prod, rounds)
        _log(f"decode: {m['decode_rps']:.3g} records/s ({n} records)")
        m["bcc_callback_rps"] = bench_bcc_callback(prod, max(3, rounds // 3))
        _log(f"BCC callback: {m['bcc_callback_rps']:.3g} records/s")
        m["decode_speedup"] = m["decode_rps"] / m["bcc_callback_rps"]
    finally:
        prod.close()
    prod = Producer()                                 # a fresh ring (BCC's consumer holds the old one)
    try:
        m["rss_mb_before_e2e"] = _rss_mb("VmRSS")
        _reset_peak_rss()
        m["e2e_jsonl_rps"], size = bench_e2e(prod, e2e_n)
        m["rss_mb"] = _rss_mb("VmHWM")
        m["e2e_records"] = float(e2e_n)
        m["e2e_bytes_per_record"] = size / e2e_n
        _log(f"e2e ring → records → JSONL: {m['e2e_jsonl_rps']:.3g} records/s ({e2e_n} records, "
             f"{size / e2e_n:.0f} B/record)")
    finally:
        prod.close()
    m["ring_records"] = float(_capacity(L.C["HW_RINGBUF_BYTES"]))
    return dict(sorted(m.items()))
