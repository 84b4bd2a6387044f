"""Fakes shared by the collector tests (and the sink tests that run a pipeline): a ring buffer in plain
memory laid out like the kernel's, a fake kernel source implementing collector.parts.KernelSource, a
stand-in record builder, and in-memory sinks. Test modules import these from here, never from each other.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.ringbuf import BUSY_BIT, DISCARD_BIT, EVENT_DTYPE, HDR_SIZE, RingWalker, check_events, slot_size
from hostwall.bpf.syn_proxy import ProxyState
from hostwall.collector.config import CollectorConfig, JsonlOptions, QueueSizes
from hostwall.collector.kernel import CtScan, DropDrain
from hostwall.collector.sinks.base import BaseSink, FullQueuePolicy

DENY = L.C["HW_EV_DENY"]
DROP_KEY, DROP_VAL = L.DTYPES["hw_drop_key"], L.DTYPES["hw_drop_val"]


class FakeRing:
    """Producer side of a ring buffer in plain memory, following kernel/bpf/ringbuf.c: reserve writes
    a BUSY header at producer_pos and advances it; commit clears BUSY (or sets DISCARD). The data
    area is written through both halves of the double mapping, as the kernel's pages appear."""

    def __init__(self, size: int = 4096):
        self.size, self.mask = size, size - 1
        self.cons = bytearray(4096)
        self.prod = bytearray(4096)
        self.data = bytearray(2 * size)
        self.seq = 0

    def _pos(self, buf) -> int:
        return int.from_bytes(buf[:8], "little")

    def _write(self, pos: int, b: bytes) -> None:
        for i in range(0, len(b)):
            off = (pos + i) & self.mask
            self.data[off] = b[i]
            self.data[off + self.size] = b[i]

    def reserve(self, length: int) -> int | None:
        prod, cons = self._pos(self.prod), self._pos(self.cons)
        new = prod + slot_size(length)
        if new - cons > self.mask:
            return None
        self._write(prod, (length | BUSY_BIT).to_bytes(4, "little") + b"\0\0\0\0")
        self.prod[:8] = new.to_bytes(8, "little")
        return prod

    def commit(self, pos: int, payload: bytes, discard: bool = False) -> None:
        self._write(pos + HDR_SIZE, payload)
        self._write(pos, (len(payload) | (DISCARD_BIT if discard else 0)).to_bytes(4, "little"))

    def event(self, seq: int | None = None, type_: int = DENY, family: int = 4) -> bytes:
        e = np.zeros(1, dtype=EVENT_DTYPE)
        e["start_ns"] = self.seq if seq is None else seq
        e["type"], e["family"], e["dport"] = type_, family, 443
        self.seq += 1
        return e.tobytes()

    def emit(self, payload: bytes | None = None, discard: bool = False) -> bool:
        payload = self.event() if payload is None else payload
        pos = self.reserve(len(payload))
        if pos is None:
            return False
        self.commit(pos, payload, discard)
        return True

    def walker(self, validate=check_events) -> RingWalker:
        return RingWalker(self.cons, self.prod, self.data, self.size, validate=validate)


class FakeRingBuffer(RingWalker):
    """A RingWalker over a FakeRing with an asyncio wake-up instead of poll."""

    def __init__(self, fake: FakeRing):
        super().__init__(fake.cons, fake.prod, fake.data, fake.size, validate=check_events)
        self._evt: asyncio.Event | None = None
        self.closed = False

    async def wait(self, timeout=None) -> bool:
        if self.unread_bytes():
            return True
        if self.uncommitted_bytes():                 # as RingBuffer: short steps while commits are due
            await asyncio.sleep(0.005)
            return self.unread_bytes() > 0
        self._evt = asyncio.Event()
        try:
            async with asyncio.timeout(timeout):
                await self._evt.wait()
        except TimeoutError:
            pass
        finally:
            self._evt = None
        return self.unread_bytes() > 0

    def notify(self) -> None:
        if self._evt is not None:
            self._evt.set()

    def close(self) -> None:
        self.closed = True


class FakeSource:
    """collector.parts.KernelSource over a FakeRing, with canned drop intervals and conntrack scans.

    drains: DropDrain objects handed out by read_drops() in order (then empty ones); clear_drops()
    records what was cleared. scans: CtScan objects handed out by scan_conntrack(); free_claims() records
    the families freed, adopt_claims() the families of journaled batches taken over."""

    def __init__(self, ring_size: int = 1 << 16):
        self.fake = FakeRing(ring_size)
        self.rb = FakeRingBuffer(self.fake)
        self.budget = None
        self.share = None
        self.prefixes = None
        self.drains: list[DropDrain] = []
        self.scans: list[CtScan] = []
        self.cleared: list[DropDrain] = []
        self.freed: list[int] = []
        self.adopted: list = []                          # CtFamilyScans of journaled batches (restart tests)
        self.gen = 0
        self.pending_gen: dict[int, DropDrain] = {}      # what read_drops_of(gen) returns (restart tests)
        self.loss = {"deny": {"emitted": 0, "budget": 0, "ringbuf_full": 0}}
        self.ident = {"boot_id": "fake-boot", "ring_map_id": 1, "ev_stats_map_id": 2, "drops_map_ids": [3, 4]}
        self.last_scan: int | None = None
        self.closed = False
        self.detached = 0                                # hw_config.detached_ns (detach tests)

    # collector.parts.KernelSource
    def ring(self):
        return self.rb

    def identity(self) -> dict:
        return dict(self.ident)

    def monotonic_to_wall(self) -> int:
        return 1_700_000_000 * 10**9

    def now_ns(self) -> int:
        return time.monotonic_ns()

    def set_event_budget(self, n: int, source_share: int | None = None) -> None:
        self.budget = n
        self.share = source_share

    def port_syns(self) -> np.ndarray:
        return np.zeros(65536, np.uint64)

    def syn_proxy(self, now_ns: int) -> ProxyState:
        return ProxyState(now_ns, {}, {})

    def set_drop_prefixes(self, v4: int, v6: int) -> None:
        self.prefixes = (v4, v6)

    def kernel_loss(self) -> dict:
        return json.loads(json.dumps(self.loss))

    def agg_gen(self) -> int:
        return self.gen

    def read_drops(self) -> DropDrain:
        old, self.gen = self.gen, self.gen ^ 1
        if self.drains:
            d = self.drains.pop(0)
            d.gen = old
            return d
        now = self.now_ns()
        return DropDrain(np.zeros(0, DROP_KEY), np.zeros(0, DROP_VAL), {}, now, now, 0.0, old)

    def read_drops_of(self, gen: int) -> DropDrain:
        d = self.pending_gen.pop(gen, None)
        return d if d is not None else DropDrain(np.zeros(0, DROP_KEY), np.zeros(0, DROP_VAL), {}, 0, 0, 0.0, gen)

    def clear_drops(self, d: DropDrain) -> None:
        self.cleared.append(d)

    def detached_ns(self) -> int:
        return self.detached

    def scan_conntrack(self, now_ns, at_ns, grace_ns=2_000_000_000) -> CtScan:
        return self.scans.pop(0) if self.scans else CtScan([], 0, 0, 0)

    def free_claims(self, scan) -> int:
        n = sum(0 if i is None else len(i) for i in (scan.claimed_idx, scan.closed_idx))
        self.freed.append(n)
        return n

    def adopt_claims(self, scan) -> None:
        self.adopted.append(scan)

    def set_last_scan(self, now_ns) -> None:
        self.last_scan = now_ns

    @property
    def last_scan_ns(self):
        return self.last_scan

    def close(self) -> None:
        self.closed = True

    # test helpers
    def emit(self, n: int, bad_len: int = 0) -> int:
        done = 0
        for _ in range(n):
            if not self.fake.emit():
                break
            done += 1
        for _ in range(bad_len):
            self.fake.emit(b"\x00" * 24)
        self.rb.notify()
        return done

    def emit_all(self, n: int, timeout: float = 30.0) -> int:
        """Emit n events, waiting (bounded) for room when the ring is full; returns how many went in."""
        done = 0
        end = time.monotonic() + timeout
        while done < n and time.monotonic() < end:
            k = self.emit(n - done)
            done += k
            if not k:
                time.sleep(0.005)
        return done


class StubBuilder:
    """collector.parts.RecordBuilder stand-in: one record per input row, with the row's identity."""

    def __init__(self, fail_on_events: bool = False):
        self.fail = fail_on_events
        self.calls: Counter = Counter()
        self.drop_windows: list[tuple] = []
        self.ct_families: list[int] = []

    def _rec(self, kind: str, ident) -> dict:
        return {"event": {"id": f"{kind}-{ident}", "dataset": f"hostwall.{kind}"}, "hostwall": {"kind": kind},
                "ident": ident}

    def on_events(self, batch, clock):
        self.calls["events"] += 1
        if self.fail:
            raise ValueError("cannot build")
        return [self._rec("deny", int(s)) for s in batch["start_ns"]]

    def on_drop_summaries(self, keys, vals, t0, t1, clock, sources=None):
        self.drop_windows.append((t0, t1))
        return [self._rec("drop_summary", f"{int(p)}-{t0}-{t1}") for p in vals["packets"]]

    def on_drop_overflow(self, counts, t0, t1, clock):
        return [self._rec("drop_summary", f"overflow-{v}-{r}-{t0}") for (v, r) in counts]

    def on_conntrack(self, ek, ee, updates, clock, closed=None):
        self.ct_families.append(len(ek))
        return [self._rec("flow", i) for i in range(len(ek) + len(updates[0]) + (len(closed[0]) if closed else 0))]

    def on_audit(self, rec):
        return {**rec, "hostwall": {"kind": "audit"}}

    def on_dns(self, rec):
        return {**rec, "hostwall": {"kind": "dns"}}

    def tick(self, now=None):
        self.calls["tick"] += 1
        return []

    def stats(self):
        return dict(self.calls)


class MemorySink(BaseSink):
    """A sink that keeps what it is sent. gate: send() waits for it; fail_after: raise once it holds that
    many records. durable_gate: with it, batches settle (become durable) only once it is set."""

    def __init__(self, name="mem", policy=FullQueuePolicy.BLOCK, gate: asyncio.Event | None = None,
                 fail_after: int | None = None, durable_gate: asyncio.Event | None = None):
        super().__init__(name)
        self.full_queue_policy = policy
        if policy is not FullQueuePolicy.BLOCK:
            from hostwall.collector.sinks.base import Durability
            self.durability = Durability.BEST_EFFORT
        self.records: list[dict] = []
        self.gate = gate
        self.fail_after = fail_after
        self.durable_gate = durable_gate
        self.tracks_durability = durable_gate is not None
        self._waiting: list = []
        self.sends: list[int] = []                       # records per call (send or send_many)
        self.flushes = 0
        self.started = self.closed = False

    async def start(self):
        self.started = True

    async def _send(self, records):
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_after is not None and len(self.records) >= self.fail_after:
            raise OSError("disk on fire")
        self.sends.append(len(records))
        self.records += records
        self._deliver(len(records))
        if self.durable_gate is not None:
            self._waiting.append(self._call)
            if self.durable_gate.is_set():
                self.make_durable()

    def make_durable(self) -> None:
        calls, self._waiting = self._waiting, []
        for c in calls:
            self._settle(c, c.remaining)

    async def flush(self):
        self.flushes += 1
        if self.durable_gate is not None and self.durable_gate.is_set():
            self.make_durable()

    async def close(self):
        self.closed = True


# ---- running a pipeline in a test ---------------------------------------------------------------------

def cfg(tmp_path, **kw) -> CollectorConfig:
    base = dict(pin_dir=str(tmp_path / "pin"), drop_interval_s=0.05, ct_scan_interval_s=0.05, active_timeout_s=60,
                status_interval_s=0.05, status_file=str(tmp_path / "status.json"),
                queues=QueueSizes(events=4, sink=1000, batch=64), jsonl=JsonlOptions(fsync="none"))
    base.update(kw)
    return CollectorConfig(**base)


async def until(pred, timeout=5.0):
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.01)


async def started(pipe):
    task = asyncio.ensure_future(pipe.run())
    await until(lambda: pipe.state == "running" or task.done())
    return task
