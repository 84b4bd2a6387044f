"""The Kafka sink's degraded mode: spooling and replay (part of collector.sinks.kafka.KafkaSink).

  degraded  entered when a batch is not accepted or acknowledged within `spool_after`, or a delivery
            fails: the batches still in the producer are copied to the spool (crash safety; the producer
            keeps retrying them: with idempotence they are never expired, so they arrive once and in
            order), and every new record is appended to the spool. A replay task feeds the spool to the
            producer in order (bounded in-flight bytes); when the spool is fully acknowledged the sink is
            healthy again. A collector that starts with a non-empty spool (earlier crash or outage) starts
            degraded and replays first.

Failures: record-level rejections (kafka_health.REJECTED) are counted lost ("rejected"). Any other
failure (connection, authentication, OutOfOrderSequenceNumber after a leader change, a dead sender)
waits until every batch in flight settled, replaces the producer (a new producer id: its sequence numbers
cannot be trusted any more) after a connection probe, rewinds the replay to the spool cursor and retries
with jittered exponential backoff (collector/backoff.py, 0.2 s .. 30 s): nothing is dropped for a
transient error; an error retrying cannot fix (kafka_probe: tls, auth, authz, unknown_topic) marks the
sink `failing` until a probe succeeds, and spooling goes on, bounded.

Durability (docs/collector.md "Delivery and loss"): records appended to the spool settle their batch
once the spool syncs them (`Spool.synced_seq`, per kafka.spool_fsync); mirrored batches settle at that
point too, or at the broker's acknowledgement, whichever comes first.

Spool full (kafka.spool_size): new records are refused and counted ("spool_full"; the sink is `failing`
until there is room), or with spool_overflow: block, send() waits (back-pressure into the pipeline; the
kernel then counts ringbuf_full). A write that fails is counted "disk_full" (ENOSPC, EDQUOT) or
"spool_error"; the collector keeps running.
"""
from __future__ import annotations

import asyncio
import errno
import functools
import logging
import time
from collections import deque

from hostwall.gcpause import GcPaused

from .base import Call, Health
from .kafka_health import err_name, is_fatal, is_rejected
from .kafka_probe import probe_kafka
from .kafka_wire import ANOMALIES, AUDIT, FLOWS, fill, pack, unpack
from .spool import SpoolError

log = logging.getLogger("hostwall.collector.kafka")

REPLAY_RECORDS = 4096               # records per spool read while replaying
REPLAY_INFLIGHT_BYTES = 16 << 20    # payload bytes handed to the producer and not yet acknowledged
PROBE_TIMEOUT_S = 10.0
PROBE_EVERY_S = 5.0                 # while degraded and not delivering: how often to ask the broker why
DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT})


class Flight:
    """One batch handed to aiokafka. msgs are kept until acknowledged (to spool them on an outage)."""
    __slots__ = ("msgs", "n", "mine", "t0", "sent", "nbytes", "seqs", "done", "ok", "final", "tp", "call", "settled")

    def __init__(self, msgs, n, mine, t0, nbytes, tp, seqs=None, call: Call | None = None):
        self.msgs, self.n, self.mine, self.t0, self.nbytes, self.tp = msgs, n, mine, t0, nbytes, tp
        self.sent = t0              # when the producer accepted it (the watchdog's clock); t0: enqueued
        self.seqs = seqs            # spool seqs (mirrored or replayed), acknowledged per batch; None: memory only
        self.done = False
        self.ok = False
        self.final = False          # acknowledged or rejected: nothing left to do for it
        self.call = call            # the send() call it belongs to (None: replayed from the spool)
        self.settled = call is None


def seq_runs(seqs: list[int]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s in seqs:
        if out and out[-1][1] == s:
            out[-1] = (out[-1][0], s + 1)
        else:
            out.append((s, s + 1))
    return out


def _payload(t: float, m: tuple) -> bytes:
    return pack(t, m[0], m[1], m[2], m[3])


class SpoolReplay:
    """Mixin of KafkaSink: spool appends, mirroring, the replay/watchdog task, durability of spooled data."""

    # ---- health ----------------------------------------------------------------------------------
    def _health_now(self, *, fatal: str | None = ..., full: str | None = ..., why: str = "") -> None:
        """Set one cause (fatal: a problem retrying cannot fix; full: the spool or its disk refuses
        records; None clears it) and derive the state: failing while either cause holds, degraded while
        spooling, ok otherwise. The base class logs each change once."""
        if fatal is not ...:
            self._fatal_why = fatal
        if full is not ...:
            self._full_why = full
        self._fatal = self._fatal_why is not None
        if self._fatal_why or self._full_why:
            self._set_health(Health.FAILING, self._fatal_why or self._full_why)
        elif self.degraded:
            self._set_health(Health.DEGRADED, why or self._health_why if self._health is Health.DEGRADED else why)
        else:
            self._set_health(Health.OK)

    # ---- settling --------------------------------------------------------------------------------
    def _settle_flight(self, f: Flight) -> None:
        if not f.settled:
            f.settled = True
            self._settle(f.call, f.mine)

    def _wait_spool(self, end_seq: int, call: Call | None, n: int, flight: Flight | None = None) -> None:
        """Settle (call, n) — or the flight — once the spool has synced every seq below end_seq."""
        self._spool_waits.append((end_seq, call, n, flight))
        self._on_spool_synced()

    def _on_spool_synced(self) -> None:
        w: deque = self._spool_waits
        upto = self.spool.synced_seq
        while w and w[0][0] <= upto:
            _, call, n, flight = w.popleft()
            if flight is not None:
                self._settle_flight(flight)
            else:
                self._settle(call, n)

    def _cancelled(self, call: Call, left: int) -> None:
        """A send cancelled by the shutdown deadline: what it handed over counts as usual (a batch in the
        producer when acknowledged or at close, spooled records carried over — BaseSink's `cancelled` would
        count those twice). The records it never handed over (`_untaken`) stay in flight and keep the call
        unsettled: close() leaves them to the pipeline, which counts them `requeued` and keeps their kernel
        data for the next collector (docs/collector.md "The loss ledger")."""
        if self._untaken:
            self._cut = call

    def _note_msgs(self, reason: str, msgs) -> None:
        self._note_seqs(reason, (m[4] for m in msgs if len(m) > 4))

    # ---- degraded: spool + replay -----------------------------------------------------------------
    def _degrade(self, why: str) -> None:
        if self.degraded or self._closing:
            return
        log.warning("%s: %s; spooling to %s", self.name, why, self.spool.dir)
        self.degraded = True
        self.counters["degradations"] += 1
        self.last_error = why
        self._health_now(why=f"spooling: {why}")
        self._mirroring = asyncio.ensure_future(self._mirror_window())
        self._wake.set()

    async def _mirror_window(self) -> None:
        await self._mirror([f for f in self._window.values() if f.seqs is None])

    async def _mirror(self, flights: list[Flight]) -> None:
        """Copy batches still in the producer into the spool (in creation order), so a crash cannot lose
        them; they stay owned by the producer (the replay skips their seqs) unless they failed."""
        async with self._spool_lock:
            for f in flights:
                if f.seqs is not None or f.final:
                    continue
                payloads = [_payload(f.t0, m) for m in f.msgs]
                first = self.spool.next_seq
                try:
                    n = await self.spool.append(payloads)
                except (SpoolError, OSError) as e:
                    n = getattr(e, "written", 0)
                    self.last_error = f"spool: {e}"
                if n < len(payloads):               # spool full: it stays in memory only
                    self.counters["mirror_refused"] += len(payloads) - n
                    if n:                            # the part that got in is not replayed (it is this
                        self.spool.ack(first, first + n)   # flight's, counted once, by the flight)
                    if f.done:                       # failed and cannot be spooled: lost
                        self._window.pop(id(f), None)
                        self._lose("spool_full", f.mine)
                        self._note_msgs("spool_full", f.msgs)
                        self._settle_flight(f)
                    continue
                self._age.mark(first, first + n, f.t0)
                f.seqs = list(range(first, first + n))
                msgs, f.msgs = f.msgs, None          # the spool has them now
                if f.final:                          # settled while we wrote: nothing to replay
                    self.spool.ack(first, first + n)
                elif f.done:                         # failed before we got here: the replay sends it
                    self._window.pop(id(f), None)
                    self._need_rewind = True
                    self._wait_spool(first + n, None, 0, f)
                else:
                    self._owned.append((first, first + n))
                    self.counters["mirrored"] += n
                    self._wait_spool(first + n, None, 0, f)
                del msgs
        self._wake.set()

    def _release(self, seqs: list[int]) -> None:
        if self._owned and seqs:
            r = (seqs[0], seqs[-1] + 1)
            try:
                self._owned.remove(r)
            except ValueError:
                pass

    def _is_owned(self, seq: int) -> bool:
        for a, b in self._owned:
            if a <= seq < b:
                return True
        return False

    def _spooled(self, first: int, n: int, call: Call | None, now: float) -> None:
        """n records written to the spool from seq `first`: they settle once synced (carried over if the
        spool outlives this run)."""
        self._age.mark(first, first + n, now)
        self._wait_spool(first + n, call, n)
        self._untaken -= n
        self.counters["spooled"] += n

    async def _spool_msgs(self, msgs: list, call: Call | None) -> None:
        """Append to the spool in order (after any mirroring in progress). Full: drop_newest counts the
        refused records lost ("spool_full"); block waits for room."""
        self._appenders += 1
        try:
            await self._spool_append(msgs, call)
        finally:
            self._appenders -= 1
        self._wake.set()

    async def _spool_append(self, msgs: list, call: Call | None) -> None:
        if self._mirroring is not None and not self._mirroring.done():
            await asyncio.shield(self._mirroring)
        now = time.time()
        with GcPaused():
            payloads = [_payload(now, m) for m in msgs]
        async with self._spool_lock:
            done = 0
            while done < len(payloads):
                first = self.spool.next_seq
                try:
                    n = await self.spool.append(payloads[done:])
                except SpoolError as e:              # one record over the spool's record limit
                    self._lose("too_large", 1)
                    self._note_msgs("too_large", msgs[done:done + 1])
                    self._settle(call, 1)
                    self._untaken -= 1
                    self.last_error = str(e)
                    done += 1
                    continue
                except asyncio.CancelledError:       # the deadline, in its fdatasync / new segment: what
                    w = self.spool.next_seq - first      # it wrote is spooled (carried over), not untaken
                    self._spooled(first, w, call, now)
                    raise
                except OSError as e:                 # disk full / failing: count, keep the service up
                    w = getattr(e, "written", 0)
                    self._age.mark(first, first + w, now)
                    self._wait_spool(first + w, call, w)
                    done += w
                    self.counters["spooled"] += w
                    reason = "disk_full" if e.errno in DISK_FULL else "spool_error"
                    self._untaken -= len(payloads) - done + w      # spooled, or counted lost here
                    self._lose(reason, len(payloads) - done)
                    self._note_msgs(reason, msgs[done:])
                    self._settle(call, len(payloads) - done)
                    self.last_error = f"spool write {self.spool.dir}: {e.strerror or e}"
                    self._health_now(full=f"{reason.replace('_', ' ')}: {self.last_error}; new records are "
                                     "counted lost")
                    self.counters["spool_errors"] += 1
                    break
                self._spooled(first, n, call, now)
                done += n
                if done < len(payloads):
                    if self.o.spool_overflow == "block" and not self._closing:
                        self.counters["spool_waits"] += 1
                        await self.spool.wait_room(len(payloads[done]), timeout=1.0)
                        continue
                    self._lose("spool_full", len(payloads) - done)
                    self._note_msgs("spool_full", msgs[done:])
                    self._settle(call, len(payloads) - done)
                    self._untaken -= len(payloads) - done
                    self.last_error = f"spool full ({self.spool.max_bytes} bytes): newest records dropped"
                    self._health_now(full=f"{self.last_error}; new records are counted lost")
                    break
            else:
                if self._full_why is not None:
                    self._health_now(full=None, why="spooling again")

    async def _run(self) -> None:
        """Replay + watchdog: wakes on events or every 0.2 s."""
        while not self._closing:
            try:
                await asyncio.wait_for(self._wake.wait(), 0.2)
            except TimeoutError:
                pass
            self._wake.clear()
            self._account_corrupt()
            if self.spool.sync_due():
                await self.spool.sync()
            if not self.degraded:
                oldest = next(iter(self._window.values()), None)
                if oldest is not None and time.time() - oldest.sent > self.o.spool_after_s:
                    self._degrade(f"no acknowledgement for {self.o.spool_after_s:g}s")
                elif self._producer_dead() and self._producer is not None:
                    self._degrade("producer stopped")
                continue
            if self._mirroring is not None and not self._mirroring.done():
                await asyncio.shield(self._mirroring)
            self._watch_broker()
            if self._need_rewind or self._recycle or self._producer_dead():
                if self._window or self._replay:
                    continue                         # let every batch in flight settle first (a poisoned
                                                     # producer fails them fast; a dead one already did)
                await self._sleep(self._backoff.next())
                if self._closing:
                    return
                if self._producer_dead() or self._recycle:
                    self.counters["producer_restarts"] += self._producer is not None
                    if not await self._reconnect():
                        continue
                    self._recycle = False
                self._need_rewind = False
                self.spool.rewind()
                self.counters["rewinds"] += 1
            try:
                await self._feed()
            except OSError as e:                     # the spool cannot be read: report, back off, retry
                self.counters["spool_read_errors"] += 1
                self.last_error = f"spool read {self.spool.dir}: {e.strerror or e}"
                if self.counters["spool_read_errors"] in (1, 10, 100):
                    log.error("%s: %s", self.name, self.last_error)
                await self._sleep(self._backoff.next())
                continue
            if (self.degraded and not self._need_rewind and not self._window and not self._replay
                    and self.spool.pending == 0 and self.spool.unread == 0 and not self._closing
                    and not self._appenders and not self._spool_lock.locked() and not self._producer_dead()):
                log.info("%s: spool replayed; back to direct delivery", self.name)
                self.degraded = False
                self._owned.clear()
                self._backoff.reset()
                self.counters["recoveries"] += 1
                self._health_now(fatal=None, full=None)

    def _watch_broker(self) -> None:
        """While degraded, the producer may sit on batches it cannot deliver (aiokafka retries them forever,
        also after the broker refused our credentials): ask the broker why, every PROBE_EVERY_S, in the
        background, so the health says `failing` when retrying cannot fix it (docs/collector.md)."""
        if self._closing or (self._probing is not None and not self._probing.done()):
            return
        if time.monotonic() - self._probed_at < PROBE_EVERY_S:
            return
        self._probed_at = time.monotonic()
        self._probing = asyncio.ensure_future(self._probe_health())
        self._probing.add_done_callback(self._task_done)

    async def _probe_health(self) -> None:
        r = await probe_kafka(self.bootstrap, self.o, PROBE_TIMEOUT_S, name=self.name, client_id=self.client_id)
        self.counters["probes"] += 1
        if self._closing or not self.degraded:
            return
        if r.ok:
            self._health_now(fatal=None)
        else:
            self.last_error = str(r)
            self._health_now(fatal=None if r.retryable else str(r), why=str(r))

    async def _reconnect(self) -> bool:
        """Probe, then a new producer. A problem retrying cannot fix marks the sink failing (once per
        change); False while it is not connected."""
        r = await probe_kafka(self.bootstrap, self.o, PROBE_TIMEOUT_S, name=self.name, client_id=self.client_id)
        if not r.ok:
            self.last_error = str(r)
            self._health_now(fatal=None if r.retryable else str(r), why=str(r))
            return False
        try:
            await self._connect()
        except Exception as e:                       # noqa: BLE001 — still not usable: back off and retry
            self.last_error = f"reconnect: {err_name(e)}: {e}"
            self._health_now(fatal=self.last_error if is_fatal(e) else None, why=self.last_error)
            return False
        self._health_now(fatal=None, why="connected again; replaying the spool")
        return self._producer is not None

    async def _feed(self) -> None:
        """Hand spooled records to the producer in order while in-flight bytes allow."""
        while (not self._closing and not self._need_rewind and self._replay_bytes < REPLAY_INFLIGHT_BYTES
               and self.spool.unread and not self._producer_dead()):
            got = self.spool.read(REPLAY_RECORDS, max(1 << 20, REPLAY_INFLIGHT_BYTES - self._replay_bytes))
            self._account_corrupt()
            if self._owned:
                got = [(s, p) for s, p in got if not self._is_owned(s)]
            if not got:
                continue
            await self._send_chunk(got)

    async def _send_chunk(self, got: list[tuple[int, bytes]]) -> None:
        """Spooled records → batches per partition → producer; each batch is acknowledged in the spool
        on its own (no duplicates when another batch of the same read fails)."""
        groups: dict[tuple[str, int], list] = {}
        first_mine = self._run_first_seq
        with GcPaused():
            decoded = [(s, unpack(p)) for s, p in got]
        for s, (t_enq, topic, key, value, headers) in decoded:
            if topic not in self._partitions:        # a topic renamed since the record was spooled
                topic = self._retopic(headers)
            tp = (topic, self._partition(topic, key))
            groups.setdefault(tp, []).append((s, t_enq, key, value, headers))
        for tp, ms in groups.items():
            i = 0
            while i < len(ms):
                batch = self._producer.create_batch()
                j, nbytes = fill(batch, ms, i, int(time.time() * 1000), 2)
                if j == i:                           # spooled under a larger kafka.batch_size: cannot send
                    q = ms[i][0]
                    if q >= first_mine:
                        self._lose("too_large", 1)
                    else:
                        self.recovered_lost["too_large"] += 1
                    self.spool.ack(q, q + 1)
                    i += 1
                    continue
                seqs = [m[0] for m in ms[i:j]]
                mine = sum(1 for q in seqs if q >= first_mine)
                f = Flight(None, j - i, mine, min(m[1] for m in ms[i:j]), nbytes, tp, seqs=seqs)
                while True:
                    try:
                        fut = await self._producer.send_batch(batch, tp[0], partition=tp[1])
                        break
                    except Exception as e:           # noqa: BLE001 — not queued: retry the same batch
                        self.last_error = f"replay: {err_name(e)}: {e}"
                        if self._closing or self._producer_dead():
                            self._need_rewind = True     # the rest of this read is re-read later
                            return
                        await self._sleep(self._backoff.next())
                self._replay[id(f)] = f
                self._replay_bytes += nbytes
                fut.add_done_callback(functools.partial(self._replay_done, f))
                self.counters["replayed_batches"] += 1
                i = j

    def _retopic(self, headers: list) -> str:
        kind = dict(headers).get("kind", b"").decode()
        return self.topics[ANOMALIES if kind == "anomaly" else AUDIT if kind == "audit" else FLOWS]

    def _replay_done(self, f: Flight, fut: asyncio.Future) -> None:
        self._replay.pop(id(f), None)
        self._replay_bytes -= f.nbytes
        exc = _fut_exc(fut)
        if exc is None:
            self._deliver(f.mine)
            self.recovered_delivered += f.n - f.mine
            self.latency.add(time.time() - f.t0, f.n)
        elif is_rejected(exc):
            self._lose("rejected", f.mine)
            self.recovered_lost["rejected"] += f.n - f.mine
            self.last_error = f"broker rejected a batch: {err_name(exc)}: {exc}"
        else:
            self._need_rewind = True                 # not acknowledged: re-read from the cursor
            self._recycle = True
            self.counters["failed_batches"] += 1
            self.last_error = f"replay delivery failed: {err_name(exc)}: {exc}"
            if is_fatal(exc):
                self._health_now(fatal=self.last_error)
            self._wake.set()
            return
        self.spool.ack_seqs(f.seqs)
        self._wake.set()

    def _account_corrupt(self) -> None:
        for a, b in self.spool.take_lost():
            mine = max(0, b - max(a, self._run_first_seq))
            self._lose("spool_corrupt", mine)
            self.recovered_lost["spool_corrupt"] += (b - a) - mine

    async def _sleep(self, s: float) -> None:
        """Sleep, but wake early when closing."""
        end = time.monotonic() + s
        while not self._closing and time.monotonic() < end:
            await asyncio.sleep(min(0.1, end - time.monotonic()))


def _fut_exc(fut: asyncio.Future) -> BaseException | None:
    if fut.cancelled():
        return asyncio.CancelledError("cancelled")
    return fut.exception()
