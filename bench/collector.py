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
                    Enricher (socket-owner and cgroup caches warm: every record attributed from a
                    cache hit) → JSONL sink (encode, write, rotation; fsync none) through the real
                    Pipeline with its queues and ledger; records / s from the first read to the last
                    record written, with the ledger balanced at the end. e2e_jsonl_rps_enrich_off:
                    the same without the enricher
- floor_jsonl_rps   the same records prebuilt: orjson + one write(2) per batch, nothing else;
                    e2e_over_floor = e2e_jsonl_rps / floor_jsonl_rps (the same-run ratio)
- collector_rss_mb  peak resident set (VmHWM) of the collector process: the e2e runs happen in a
                    child (bench/collector_run.py) that never imports BCC, fed the producer's
                    program and ring fds; rss_mb_bench_process is this process (BCC/LLVM) for context

The producer writes a load balancer's mix (deny, TCP flow start + end of an ingress connection, an
egress UDP flow start from a container's cgroup; see PRODUCER_SRC) as fast as test-run can (~100 ns
each), so drains see a full ring (8 MiB = 65535 records); drops and conntrack come from a fake source,
so it measures the record path itself.
"""
from __future__ import annotations

import ctypes
import os
import statistics
import sys
import time

import numpy as np

from hostwall.bpf import bpfsys
from hostwall.bpf import layout as L

from .collector_run import rss_mb
from .statedir import use_private_state_dir

TARGETS = {
    "decode_rps": (">= 2e6 records/s", lambda m: m["decode_rps"] >= 2e6),
    "decode_speedup": (">= 5 x BCC callback", lambda m: m["decode_speedup"] >= 5),
    "e2e_jsonl_rps": (">= 150k records/s (enrichment on)", lambda m: m["e2e_jsonl_rps"] >= 150e3),
    "e2e_over_floor": (">= 0.3 x floor_jsonl_rps", lambda m: m["e2e_over_floor"] >= 0.3),
    "collector_rss_mb": ("<= 150 MiB", lambda m: m["collector_rss_mb"] <= 150),
}

NOTES = """\
decode_rps: collector.ringbuf batch decode of full 8 MiB rings (mmap + NumPy, one core).
bcc_callback_rps: BCC open_ring_buffer + ring_buffer_consume with a per-record Python callback
(event(data) ctypes decode), same records, same run. e2e_jsonl_rps: ring → RecordBuilder → Enricher
(warm caches) → JSONL through the Pipeline (fsync none), in a child process without BCC whose peak
RSS is collector_rss_mb; floor_jsonl_rps: the same records prebuilt, orjson + write only."""

PRODUCER_SRC = r"""
#include "hostwall.h"
#ifndef RB_BYTES
#define RB_BYTES HW_RINGBUF_BYTES
#endif
BPF_RINGBUF_OUTPUT(hw_events, RB_BYTES / 4096);
BPF_ARRAY(hw_seq, u64, 1);

/* With HW_BENCH_MIX (Producer(mix=True), the e2e runs) a busy load balancer's mix, 4 records per
 * step m = n >> 2 of one connection of (m & 0x3ff):
 * n & 3 == 0  deny (xdp ingress, default deny) of 198.51.100.x → 10.0.0.1:443
 *          1  flow_start of the ingress TCP connection 198.51.100.x:port → 10.0.0.1:443
 *          2  flow_end (closed) of that connection, packets and bytes both ways
 *          3  flow_start of an egress UDP flow 10.0.0.1:port → 192.0.2.53:53 from cgroup 4242 */
static __always_inline int fill(struct hw_event *e, u64 n)
{
#ifdef HW_BENCH_MIX
	u64 m = n >> 2, k = n & 3;
#else
	u64 m = n, k = 0;                         /* all denies (decode runs, tests/collector/test_ringbuf.py) */
#endif
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->start_ns = n;                          /* sequence number: lets the reader check order */
	e->packets[0] = 1;
	e->bytes[0] = 60;
	e->saddr[0] = bpf_htonl(0xc6336400 | (m & 0xff));     /* 198.51.100.x */
	e->daddr[0] = bpf_htonl(0x0a000001);                  /* 10.0.0.1 */
	e->sport = bpf_htons(40000 + (m & 0x3ff));
	e->dport = bpf_htons(443);
	e->rule_slot = ~0U;
	e->family = 4;
	e->proto = 6;
	e->hook = HW_HOOK_XDP_INGRESS;
	e->tcp_flags = 0x10;
	if (k == 0) {
		e->type = HW_EV_DENY;
		e->verdict = HW_V_DROP;
		e->reason = HW_R_DEFAULT_DENY;
	} else if (k == 1 || k == 2) {
		e->type = k == 1 ? HW_EV_FLOW_START : HW_EV_FLOW_END;
		e->verdict = HW_V_ALLOW;
		e->reason = HW_R_PASS_DEFAULT;
		e->tcp_flags = k == 1 ? 0x02 : 0x04;
		e->ct_state = k == 1 ? HW_CT_NEW : HW_CT_CLOSED;
		if (k == 2) {
			e->packets[0] = 12; e->packets[1] = 10;
			e->bytes[0] = 1400; e->bytes[1] = 52000;
		}
	} else {
		e->type = HW_EV_FLOW_START;
		e->verdict = HW_V_ALLOW;
		e->reason = HW_R_PASS_RULE;
		e->hook = HW_HOOK_TC_EGRESS;
		e->direction = HW_DIR_EGRESS;
		e->proto = 17;
		e->tcp_flags = 0;
		e->cgroup_id = 4242;
		e->saddr[0] = bpf_htonl(0x0a000001);
		e->daddr[0] = bpf_htonl(0xc0000235);              /* 192.0.2.53 */
		e->sport = bpf_htons(30000 + (m & 0x3ff));
		e->dport = bpf_htons(53);
	}
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

    produce(n): n records via one test-run (repeat = n); returns how many did not fit. mix: the e2e
    runs' load-balancer mix of record kinds (PRODUCER_SRC), else every record a deny."""

    def __init__(self, ring_bytes: int = L.C["HW_RINGBUF_BYTES"], mix: bool = False):
        from bcc import BPF
        cflags = [f"-I{L.HEADER.parent}", f"-DRB_BYTES={ring_bytes}"] + (["-DHW_BENCH_MIX=1"] if mix else [])
        self.bpf = BPF(text=PRODUCER_SRC.encode(), cflags=cflags)
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


def bench_child(prod: Producer, n_records: int, profile: str | None = None, mode: str = "on") -> dict[str, float]:
    """Runs bench/collector_run.py in a child process (no BCC: the collector's own memory) with the
    producer's program and ring fds; returns its metrics (`mode`: e2e with enrichment on / off, or
    the floor; with `profile`, the e2e pass runs under cProfile and its stats go there)."""
    import json
    import subprocess
    prog_fd, map_fd = prod.fds["produce"], prod.ring_fd()
    try:
        cmd = [sys.executable, "-m", "hostwall.bench.collector_run", "--prog-fd", str(prog_fd),
               "--map-fd", str(map_fd), "--records", str(n_records), "--mode", mode]
        if profile:
            cmd += ["--profile", profile]
        out = subprocess.run(cmd, pass_fds=(prog_fd, map_fd), stdout=subprocess.PIPE, check=True, timeout=900)
    finally:
        os.close(map_fd)
    return json.loads(out.stdout.decode().strip().splitlines()[-1])


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
    prod = Producer(mix=True)                         # a fresh ring (BCC's consumer holds the old one)
    try:
        m["rss_mb_bench_process"] = rss_mb("VmRSS")
        for mode in ("floor", "off", "on"):            # each in a fresh child: a fresh heap
            m.update({k: v for k, v in bench_child(prod, e2e_n, mode=mode).items() if k != "rss_mb_child_start"})
        m["e2e_over_floor"] = m["e2e_jsonl_rps"] / m["floor_jsonl_rps"]
        m["e2e_records"] = float(e2e_n)
    finally:
        prod.close()
    m["ring_records"] = float(_capacity(L.C["HW_RINGBUF_BYTES"]))
    return dict(sorted(m.items()))


def main(argv: list[str] | None = None) -> int:
    """`python -m hostwall.bench.collector --profile FILE [--enrich on|off] [--records N]`: one e2e pass
    of the child under cProfile (bench/collector_run.py; `--report FILE` there prints the stages).
    `--stages [--records N]`: the unprofiled ns per record of each stage instead (collector_run.stages)."""
    import argparse
    import json
    ap = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    how = ap.add_mutually_exclusive_group(required=True)
    how.add_argument("--profile")
    how.add_argument("--stages", action="store_true")
    ap.add_argument("--enrich", choices=("on", "off"), default="on")
    ap.add_argument("--records", type=int, default=100_000)
    a = ap.parse_args(argv)
    use_private_state_dir()
    prod = Producer(mix=True)
    try:
        mode = "stages" if a.stages else a.enrich
        print(json.dumps(bench_child(prod, a.records, a.profile, mode=mode)))
    finally:
        prod.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
