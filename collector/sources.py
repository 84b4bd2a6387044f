"""The pipeline's periodic sources and its start-up recovery (part of collector.pipeline.Pipeline).

Each source hands its records to `_emit` and releases what it took from the kernel only once they are
durable in every at_least_once sink (docs/collector.md "Delivery and loss"):

    drops   read a drop-aggregation interval (flip + RCU barrier, no clear) and the flow aggregation of
            the same generation → drop_summary and flow_summary records in a fixed order → checkpoint the interval (generation, window, seq base, count) → fan out → when
            durable, clear exactly what was read and checkpoint that. The next flip waits for it. A
            restart finds the checkpointed interval still in its map and exports it again with the same
            window, so the same event ids and seqs (or finds it cleared, and moves on).
    ct      claim idle conntrack ends and FIN closes quiet for the close grace period
            (hostwall.bpf.conntrack) → flow end / update records → when durable, checkpoint the stream's
            seq and the scan time, then release the claims (free idle slots, mark closes reported).
            Connections reported in aggregate that ended become flow_summary records of the same batch.
    tick    builder/anomaly tick, the per-port SYN signal and the SYN proxy's switches (collector/
            syn_proxy.py; anomaly records go through the outbox), the enforcer's audit log and DNS decision
            log (collector/logtail.py; each log's offset is checkpointed with its stream's seq when the
            records are durable), kernel loss counters (the baseline is checkpointed), and loss records for
            records a sink counted lost.

Recovery (`_recover`, once at start): compare the checkpoint with the kernel (collector/checkpoint.py),
count what the kernel counted while no collector ran, count what could not be recovered (`restart`
stage: crash, reboot, reloaded), resend the outbox, and publish one collector-restart loss record.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import orjson

from hostwall.bpf import retired
from hostwall.bpf.ringbuf import slot_size
from hostwall.bpf.state import register_collector

from . import flow_summary
from .acks import CommitEntry
from .checkpoint import PREVIOUS_TEXT, RESTARTED, STREAMS, analyze_restart
from .ct_journal import journal_view
from .logtail import JsonlTail
from .loss_report import SeqRanges

log = logging.getLogger("hostwall.collector")

CLOCK_RECALIBRATE_S = 60.0


class Sources:
    """Mixin of collector.pipeline.Pipeline: the sources other than the ring, and recovery."""

    # ---- recovery --------------------------------------------------------------------------------
    async def _recover(self) -> None:
        ck = self.checkpoint
        identity = await self._k(self.source.identity)
        hold = getattr(self.source, "reader_lock", None)        # no discard while read (bpf/retired.py)
        if hold is not None and self.reader is None:
            self.reader = hold(self.cfg.pin_dir)
        stride = slot_size(self.ring.record_size)
        rs = self.restart = analyze_restart(ck, identity, self.ring.consumer_pos, stride, self._carried_counters())
        if rs.previous == "crash" and self.previous_run is None and ck.exists:
            self.previous_run = {"pid": ck["pid"], "updated_at": ck["updated_at"], "state": "crashed"}
        if rs.baseline is not None:
            self.ledger.set_kernel_baseline(rs.baseline)
        before = dict(self.ledger.lost_by.get("kernel", {}))
        await self._fold_kernel()
        self.kernel_while_down = {r: n - before.get(r, 0) for r, n in self.ledger.lost_by.get("kernel", {}).items()
                                  if n - before.get(r, 0) > 0} if rs.baseline is not None else {}
        if rs.baseline is None:                  # a first read counts nothing: it is the baseline at once
            ck["kernel_loss"] = self.ledger.kernel_baseline()
        for s in self.slots:                     # a spool's torn tail (collector/sinks/spool.py recovery)
            torn = ((s.sink.stats().get("recovered") or {}).get("lost") or {}).get("spool_torn", 0)
            if torn:
                rs.lost["spool_torn"] = rs.lost.get("spool_torn", 0) + torn
                rs.notes.append(f"sink {s.name}: {torn} spooled records cut off with a torn spool tail")
        gone = retired.unpinned_notes(self.cfg.pin_dir)     # retired instances unpinned undrained (bpf/retired.py)
        for h in gone:
            rs.lost[h["reason"]] = rs.lost.get(h["reason"], 0) + retired.lost_records(h)
            rs.notes.append(f"retired instance {h['detached_ns']} was unpinned before a collector drained it "
                            f"({h['reason']}): {h['events']} events, {h['connections']} connection ends, "
                            f"{h['drop_keys']} drop keys, {h.get('flow_keys', 0)} flow summary keys, "
                            f"{h.get('overflow_slots', 0)} overflow slots")
        if any(h.get("ring_map_id") == (ck.data.get("kernel") or {}).get("ring_map_id") for h in gone):
            rs.lost.pop("reloaded", None)        # its note counted the same backlog, exactly (note_replaced)
        for reason, n in rs.lost.items():
            self.ledger.lose("restart", reason, n, produced="kernel")
        self.seq = {s: ck.seq(s) for s in STREAMS}
        self.seq["events"] = rs.events_seq
        if rs.new_kernel:                        # the kernel state the checkpoint described is gone
            ck["drain"] = None
            ck["ct_last_scan"] = None
            ck.data["ring"] = {}
        self._open_logs()                        # before the checkpoint names this kernel (exists)
        ck["kernel"] = identity
        ck["pid"], ck["started_at"], ck["clean_stop"] = os.getpid(), self._started, False
        if "pos" not in ck.ring:
            ck.ring.update(pos=self.ring.consumer_pos, seq=rs.events_seq)
        ck.save()
        self._register_reader()
        if ck["ct_last_scan"]:
            self.source.set_last_scan(int(ck["ct_last_scan"]))
        self._drain_checked = False
        self._ct_checked = False
        self._detach_seen = False                # a scan saw hw_config.detached_ns (its ends are reported)
        # the flow summaries' window starts at the previous scan: the last run's last durable one (same boot)
        last = ck["ct_last_scan"]
        self._last_scan_wall: int | None = self.clock.wall_ns(int(last)) if last else None
        self._boot_id = str(identity.get("boot_id") or "")
        await self._replay_outbox()
        if rs.previous in RESTARTED:
            await self._close_orphaned_anomalies()
        if rs.previous in RESTARTED or gone:
            log.warning("collector restarted after %s: %s", PREVIOUS_TEXT[rs.previous],
                        "; ".join(rs.notes) or f"kernel counted while down: {self.kernel_while_down or 'nothing'}")
            rec = self.losses.restart(rs.as_dict(), kernel_while_down=self.kernel_while_down,
                                      previous_run=(self.previous_run or {}).get("ledger"), seqs=dict(self.seq))
            await self._emit_owned([rec], "collector", kept=lambda: retired.forget_discarded(self.cfg.pin_dir, gone))
            self._keep_kernel_baseline()         # kernel_while_down is in the outbox now

    def _register_reader(self) -> None:
        """Name our checkpoint, wherever the status file is, for the enforcer's stop to find (bpf/state.py
        register_collector): without it a clean stop unpins what we have not read (docs/collector.md
        "Detach"). A state dir that cannot be written is counted (reader_register_errors) and logged."""
        try:
            register_collector(self.cfg.pin_dir, self.checkpoint.path)
        except OSError as e:
            self.counters["reader_register_errors"] += 1
            log.warning("cannot register the checkpoint %s for %s: a clean enforcer stop will unpin what this "
                        "collector has not read: %s", self.checkpoint.path, self.cfg.pin_dir, e)

    def _carried_counters(self) -> dict:
        """InstanceState.carried_counters of the instance read (a retired one's state copy): what a build
        upgrade copied into its loss counters (bpf/state.py)."""
        from hostwall.bpf.state import InstanceState, state_path
        src = getattr(self.source, "pin_dir", None)
        if src is None:
            return {}
        src = Path(src)
        p = retired.state_copy(self.cfg.pin_dir, int(src.name)) if src.parent == retired.root(self.cfg.pin_dir) \
            else state_path(self.cfg.pin_dir)
        try:
            st = InstanceState.load_file(p)
        except (OSError, ValueError, TypeError):
            return {}
        return st.carried_counters if st is not None else {}

    def release_reader(self) -> None:
        """Release the instance's reader lock; the owner calls it once what it drained is unpinned (until
        then a discard must not note as lost what this run delivered)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None

    async def _replay_outbox(self) -> None:
        """Records an earlier run put in the outbox and never got durable everywhere: send them first."""
        pending = self.outbox.load()
        self._rebuild_reported = {(x["ranges"][0][0], x["ranges"][-1][1]) for r in pending      # _rebuild_mismatch
                                  for x in [(r.get("hostwall") or {}).get("loss") or {}]
                                  if x.get("reason") == "journal_rebuild" and x.get("ranges")}
        if self.outbox.damaged:
            log.warning("outbox %s: %d unreadable line(s) dropped", self.outbox.path, self.outbox.damaged)
            self.ledger.lose("restart", "outbox_torn", self.outbox.damaged, produced="collector")
        if not pending:
            return
        for r in pending:
            h = r.get("hostwall") or {}
            st = h.get("stream")
            if st in self.seq and isinstance(h.get("seq"), int):
                self.seq[st] = max(self.seq[st], h["seq"] + 1)
        by: dict[str, list[dict]] = {}
        for r in pending:
            by.setdefault((r.get("hostwall") or {}).get("stream") or "collector", []).append(r)
        log.info("resending %d record(s) from the outbox %s", len(pending), self.outbox.path)
        track_open_anomalies(self.checkpoint, [r for r in pending if (r.get("hostwall") or {}).get("kind") == "anomaly"])
        for stream, recs in by.items():
            ticket = await self._emit(recs, stream, assign_seq=False, enrich=False, observe=False)
            self._commit_owned(ticket, stream, recs)

    async def _emit_owned(self, records: list[dict], stream: str, kept=None) -> None:
        """Records made from the collector's own state: outbox first, then fan out; settled in order.
        kept: called once they are in the outbox, before anything can interleave (no await between)."""
        ticket = await self._emit(records, stream, outbox=True, enrich=False, observe=False, kept=kept)
        self._commit_owned(ticket, stream, records)

    def _commit_owned(self, ticket, stream: str, records: list[dict]) -> None:
        ck, outbox, seq_after = self.checkpoint, self.outbox, self.seq.get(stream, 0)
        opened = [r for r in records if (r.get("hostwall") or {}).get("kind") == "anomaly"]

        def before() -> None:
            ck.set_seq(stream, max(ck.seq(stream), seq_after))
            if opened:                           # which anomalies are open, as durable records say
                track_open_anomalies(ck, opened)

        async def after() -> None:
            outbox.settle(records)
        self.commits.add(CommitEntry(ticket, before, after))

    async def _close_orphaned_anomalies(self) -> None:
        """Anomalies the crashed run had open (checkpoint, plus opens resent from the outbox): close them,
        since the detector state that would have closed them is gone."""
        from .anomaly import AnomalyDetector
        still = dict(self.checkpoint["open_anomalies"] or {})
        if not still:
            return
        now = time.time()
        closes = [AnomalyDetector.close_after_restart(last, now) for last in still.values()]
        log.info("closing %d anomaly(ies) the previous run left open", len(closes))
        await self._emit_owned(closes, "anomaly")

    # ---- drop aggregation ------------------------------------------------------------------------
    async def _export_drops(self) -> None:
        if not self._drain_checked:
            self._drain_checked = True
            await self._export_checkpointed_drain()
        if self.checkpoint["drain"]:            # an interval is still uncleared (not durable): never flip
            return                              # back onto it; the next collector exports it
        d = await self._k(self.source.read_drops)
        self._count_drain(d)
        self.counters["drop_intervals"] += 1
        self.last_drain = {"keys": len(d.keys), "packets": d.packets, "overflow_packets": d.overflow_packets,
                           "barrier_ms": round(d.barrier_s * 1e3, 3)}
        await self._ship_drain(d, self.clock.wall_ns(d.t0_ns), self.clock.wall_ns(d.t1_ns), self.seq["drop_summaries"])

    async def _export_checkpointed_drain(self) -> None:
        """An interval the last run read but did not clear: export it again, or note that it was cleared."""
        ck = self.checkpoint
        m = ck["drain"]
        if not m:
            return
        if await self._k(self.source.agg_gen) == m["gen"]:
            ck["drain"] = None                  # never flipped away from: nothing was read from it
            return
        d = await self._k(self.source.read_drops_of, int(m["gen"]))
        if not _drain_records(d):               # cleared before the crash: its records were durable
            self.seq["drop_summaries"] = max(self.seq["drop_summaries"], int(m["seq_base"]) + int(m["n"]))
            ck.set_seq("drop_summaries", self.seq["drop_summaries"])
            ck["drain"] = None
            ck.save()
            return
        self.counters["drain_reexported"] += 1
        self._count_drain(d)
        self.seq["drop_summaries"] = int(m["seq_base"])
        await self._ship_drain(d, int(m["t0"]), int(m["t1"]), int(m["seq_base"]))

    def _count_drain(self, d) -> None:
        self.ledger.count_drops(d.packets, d.overflow_packets)
        fl = getattr(d, "flows", None)
        if fl is not None and fl.records:
            self.ledger.count_flows(fl.totals())

    async def _ship_drain(self, d, t0: int, t1: int, seq_base: int) -> None:
        if not _drain_records(d):
            return
        recs = self._build("drop_summaries", len(d.keys), self.builder.on_drop_summaries, d.keys, d.vals, t0, t1,
                           self.clock, d.sources) if len(d.keys) else []
        if d.overflow:
            recs += self._build("drop_summaries", len(d.overflow), self.builder.on_drop_overflow, d.overflow, t0, t1,
                                self.clock)
        fl = getattr(d, "flows", None)
        if fl is not None and fl.records:               # the same interval's flows in aggregate, same stream
            recs += self._build("drop_summaries", fl.records, flow_summary.from_drain, self.builder, fl, t0, t1,
                                self.clock)
        recs.sort(key=lambda r: r["event"]["id"])        # a fixed order: a re-export gets the same seqs
        ck = self.checkpoint
        ck["drain"] = {"gen": d.gen, "t0": t0, "t1": t1, "seq_base": seq_base, "n": len(recs)}
        ck.save()
        ticket = await self._emit(recs, "drop_summaries")
        if ticket is not None and not await ticket.wait():
            return                                       # stopping: the interval stays for the next run
        await self._k(self.source.clear_drops, d)
        ck["drain"] = None
        ck.set_seq("drop_summaries", seq_base + len(recs))
        ck.save()

    # ---- conntrack -------------------------------------------------------------------------------
    async def _scan_ct(self) -> None:
        if not self._ct_checked:
            self._ct_checked = True
            await self._replay_ct_journal()
        now = await self._k(self.source.now_ns)
        s = await self._k(self.source.scan_conntrack, now, int(self.cfg.active_timeout_s * 1e9),
                          int(self.cfg.close_grace_s * 1e9))
        closed = s.closed
        self.counters["ct_scans"] += 1
        self.counters["ct_expired"] += s.expired
        self.counters["ct_updates"] += s.updates
        self.counters["ct_closed"] += closed
        self.counters["ct_raced"] += s.raced
        self.counters["ct_reclaimed"] += s.reclaimed
        self.last_scan = {"entries": s.scanned, "expired": s.expired, "updates": s.updates, "closed": closed,
                          "raced": s.raced, "ended_before": s.ended, "reclaimed": s.reclaimed}
        t1 = self.clock.wall_ns(now)
        window = (self._last_scan_wall or t1, t1)
        self._last_scan_wall = t1
        recs, journaled = self._build_ct(s.families, window)
        if s.stale_detach:
            self.counters["ct_detach_stale"] += 1
            if self.counters["ct_detach_stale"] == 1:
                log.warning("hw_config.detached_ns is set but the datapath still tracks packets after it: the "
                            "detach note is stale and ignored, no connection is ended for it (docs/collector.md "
                            "\"Detach\"; counted in ct_detach_stale)")
        if s.detached_ns and not self._detach_seen:
            self._detach_seen = True
            self.detached_ns = s.detached_ns     # names its retired dir (bpf/retired.py)
            self.counters["ct_detached"] += s.detached
            log.warning("the datapath was detached (a clean enforcer stop, or a build upgrade that carried the "
                        "rest over): %d connection(s) it still tracked reported as ended (end_reason detach)",
                        s.detached)
        await self._ship_ct(recs, journaled, now, window=window)

    async def _final_detach_scan(self) -> None:
        """At the stop: if the datapath detached since the last scan, one more scan reports the ends of the
        connections it still tracked (this collector holds the last reference to its tables)."""
        if not self._detach_seen and await self._k(self.source.detached_ns):
            await self._scan_ct()

    def _build_ct(self, families, window: tuple[int, int] | None) -> tuple[list[dict], list]:
        """The scan's records, and its families as the journal keeps them (collector/ct_journal.py
        journal_view: what the builder decided from its flow table is kept, not decided again)."""
        recs: list[dict] = []
        journaled = []
        for f in families:
            ck = f.closed_keys
            made = None
            dk = f.detached_keys
            if len(f.expired_keys) or len(f.update_keys) or len(ck) or len(dk):
                det = ((dk, f.detached_entries, f.detached_ns),) if len(dk) else ()
                recs += self._build("conntrack", len(f.expired_keys) + len(f.update_keys) + len(ck) + len(dk),
                                    self.builder.on_conntrack, f.expired_keys, f.expired_entries,
                                    (f.update_keys, f.update_entries), self.clock,
                                    (ck, f.closed_entries) if len(ck) else None, *det)
                made = getattr(self.builder, "ct_expired_made", None)
            journaled.append(journal_view(f, made))
            if f.agg_keys is not None and len(f.agg_keys) and window is not None:    # ended in aggregate
                recs += self._build("conntrack", len(f.agg_keys), flow_summary.from_scan, self.builder, f.agg_keys,
                                    f.agg_entries, self.cfg.drop_prefix_v4, self.cfg.drop_prefix_v6, *window,
                                    self.clock)
        return recs, journaled

    async def _ship_ct(self, recs: list[dict], families, now: int, journaled=None, window=None,
                       seq_end: int = 0) -> None:
        """Journal the batch (unless it comes from the journal), fan it out, and once durable checkpoint
        the stream's seq and the scan time, then release the claims and drop the journal file. seq_end: the
        seq after the batch as journaled (a rebuild that made fewer records skips the rest)."""
        base = self.seq["conntrack"]
        path = journaled
        if recs and journaled is None:
            path = self.ct_journal.write(base, len(recs), now, self._boot_id, families, window)
            if path is None:
                self.counters["ct_journal_errors"] += 1
                if self.counters["ct_journal_errors"] in (1, 10, 100):
                    log.warning("cannot write the conntrack journal %s: a crash before this batch is durable "
                                "may number its records again", self.ct_journal.dir)
        ticket = await self._emit(recs, "conntrack")
        self.seq["conntrack"] = max(self.seq["conntrack"], seq_end)
        claims = [f for f in families if any(i is not None and len(i) for i in (f.claimed_idx, f.closed_idx))]
        ck, src, journal, seq_after = self.checkpoint, self.source, self.ct_journal, self.seq["conntrack"]

        def before() -> None:
            ck.set_seq("conntrack", seq_after)
            ck["ct_last_scan"] = now

        async def after() -> None:
            for f in claims:
                self.counters["ct_released"] += await self._k(src.free_claims, f)
            journal.remove(path)
        self.commits.add(CommitEntry(ticket, before, after if claims or path is not None else None))

    async def _replay_ct_journal(self) -> None:
        """Scan batches an earlier run journaled and did not see durable: send each again from its
        snapshot (same records, same seqs), after taking over its claims; a batch that was durable already
        (the crash came between the checkpoint and the release) is only released."""
        batches, bad = self.ct_journal.load()
        if bad:
            log.warning("conntrack journal %s: %d unreadable batch(es) dropped", self.ct_journal.dir, bad)
            self.counters["ct_journal_unreadable"] += bad
        if not batches:
            return
        durable_to = self.checkpoint.seq("conntrack")
        last = None
        for b in batches:
            scans = b.scans()
            ours = b.boot_id == self._boot_id       # the kernel tables it claimed in are this boot's
            for f in scans:
                if ours:
                    await self._k(self.source.adopt_claims, f)
            if b.seq_end <= durable_to:         # (n shrinks in a rebuild that made fewer: CtJournal.annotate)
                for f in scans:
                    if ours:
                        self.counters["ct_released"] += await self._k(self.source.free_claims, f)
                self.ct_journal.remove(b.path)
                continue
            recs, _ = self._build_ct(scans, b.window)
            if len(recs) != b.n:                    # a builder that changed between the runs
                recs = await self._rebuild_mismatch(b, recs)
            self.counters["ct_journal_resent"] += len(recs)
            self.seq["conntrack"] = b.seq_base
            await self._ship_ct(recs, scans if ours else [], b.now_ns, journaled=b.path, seq_end=b.seq_end)
            last = b.now_ns if ours else last
        log.info("resent %d conntrack batch(es) from the journal %s", len(batches), self.ct_journal.dir)
        if last is not None:
            self.source.set_last_scan(last)         # their active-timeout updates are in them
            self._last_scan_wall = self.clock.wall_ns(last)     # and their summaries' windows end there

    async def _rebuild_mismatch(self, b, recs: list[dict]) -> list[dict]:
        """A journaled batch rebuilt into another number of records than it holds (seqs [seq_base,
        seq_base + n)). Fewer: the seqs left unfilled are counted lost (stage restart, reason journal_rebuild)
        and named in a loss record per sink, so `verify` explains the gap (never reused: the dead run may
        have written them). More: the first n are sent, the rest counted lost — never numbered, no gap.
        Once across restarts: the journal notes what is counted (CtJournal.annotate, right after the loss
        record is in the outbox), and a loss record the outbox replayed counts as noted (a kill between
        the two). docs/collector.md "Delivery and loss"."""
        made = len(recs)
        log.warning("conntrack journal %s: %d records rebuilt, %d journaled", b.path, made, b.n)
        if made > b.covered:
            self.ledger.lose("restart", "journal_rebuild", made - b.covered, produced="conntrack")
            self.ct_journal.annotate(b, b.n, made)
        if made >= b.n:
            return recs[:b.n]
        gap = (b.seq_base + made, b.seq_base + b.n - 1)
        if gap in self._rebuild_reported:
            self.ct_journal.annotate(b, made, b.covered)
            return recs
        self.ledger.lose("restart", "journal_rebuild", b.n - made, produced="conntrack")
        ranges = SeqRanges()
        ranges.add(range(gap[0], gap[1] + 1))
        await self._emit_owned([self.losses.sink_loss(s.name, "journal_rebuild", "conntrack", ranges)
                                for s in self.slots], "collector",
                               kept=lambda: self.ct_journal.annotate(b, made, b.covered))
        return recs

    # ---- tick ------------------------------------------------------------------------------------
    async def _tick(self) -> None:
        now = await self._k(self.source.now_ns)
        await self._emit(self.builder.tick(now), "tick")
        if self.syn_watch is not None:                   # SYNs per port, the SYN proxy's switches
            syns, proxy = await self._k(self.source.port_syns), await self._k(self.source.syn_proxy, now)
            recs = self.syn_watch.tick(syns, proxy, time.time())
            if recs:
                await self._emit_owned(recs, "anomaly")
        if self.anomaly is not None:                     # the detector works in wall-clock seconds
            recs = self.anomaly.tick(time.time()) or []
            if recs:
                await self._emit_owned(recs, "anomaly")
        await self._tail_logs()
        await self._fold_kernel()
        await self._report_sink_losses()
        if time.monotonic() - self._clock_at >= CLOCK_RECALIBRATE_S:      # follow wall-clock steps
            self.clock = self._clock_factory(self.source.monotonic_to_wall())
            self._clock_at = time.monotonic()

    async def _fold_kernel(self) -> None:
        totals = await self._k(self.source.kernel_loss)
        self.ledger.fold_kernel(totals)

    def _keep_kernel_baseline(self, sync: bool = False) -> None:
        """The kernel losses folded so far are reported (the status just written — the final one too, so
        the stop saves it only once that landed — or the restart record in the outbox): make the counters
        the checkpoint's baseline now. Not at the next commit — an idle collector makes none, and a restart
        would count the losses reported since then again; not at the fold either — a kill before they are
        reported would leave them counted nowhere (docs/collector.md "The loss ledger"). Cost: one
        checkpoint write per change of a loss counter (fsynced at the stop: sync)."""
        now = self.ledger.kernel_baseline()
        if now and now != self.checkpoint["kernel_loss"]:
            self.checkpoint["kernel_loss"] = now
            self.checkpoint.save(sync=sync)

    async def _report_sink_losses(self, which: str = "all") -> None:
        """Loss records of the seqs sinks counted lost: all on the tick, one per (sink, stream, reason);
        before each commit (collector/pipeline.py) only the at_least_once sinks' — what a best_effort sink
        loses or the pipeline sheds in front of it never holds the kernel back, so it waits for the tick
        (else a steadily shedding sink costs a record, an outbox fdatasync and a fan-out per commit)."""
        recs = self._sink_loss_records(which)
        if recs:
            await self._emit_owned(recs, "collector")

    def _stash_sink_losses(self, which: str = "all") -> None:
        """While stopping (sinks closing or closed): numbered and put in the outbox only; the next start
        sends them (and counts them produced then). which: as _sink_loss_records."""
        recs = self._sink_loss_records(which)
        if recs:
            self._number(recs, "collector")
            try:
                self.outbox.append(recs)
            except OSError as e:
                self.counters["outbox_errors"] += 1
                log.warning("cannot write the outbox %s: %s (%d loss record(s) not kept)", self.outbox.path, e,
                            len(recs))

    def _sink_loss_records(self, which: str = "all") -> list[dict]:
        """Loss records of the seqs the sinks noted lost since the last call; which: "all", "acking" (the
        at_least_once sinks) or "best_effort" (the others)."""
        if which not in ("all", "acking", "best_effort"):
            raise ValueError(f"which sinks: {which!r}")
        return [self.losses.sink_loss(s.name, reason, stream, ranges)
                for s in self.slots if which == "all" or s.acknowledges == (which == "acking")
                for (stream, reason), ranges in s.take_lost_seqs()]

    # ---- the enforcer's logs (audit, DNS decisions) --------------------------------------------------
    def _open_logs(self) -> None:
        """Tail each log from its checkpointed offset (records up to it are durable), or from its start
        (re-shipped records have the same event.id)."""
        self.logs = {}
        for stream, path, build in (("audit", self.audit_log, self.builder.on_audit),
                                    ("dns", self.dns_log, self.builder.on_dns)):
            if path is not None:
                self.logs[stream] = (JsonlTail(path, self._log_resume(stream)), build)

    def _log_resume(self, stream: str) -> tuple[int, int]:
        a = self.checkpoint[stream]
        if a:
            return int(a["inode"]), int(a["offset"])
        if stream != "audit" or self.checkpoint.exists:  # the status holds the read position, not the durable one
            return (0, 0)
        try:                                             # a collector from before checkpoints: its status
            prev = orjson.loads(self.status_path.read_bytes()).get(stream, {})
            return int(prev["inode"]), int(prev["offset"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return (0, 0)

    async def _tail_logs(self) -> None:
        """New whole lines of each log → records of its stream; a line that is not a record is counted
        (decode/<stream>_line). The offset is checkpointed with the stream's seq once they are durable."""
        for stream, (tail, build) in self.logs.items():
            lines, bad = tail.read()
            recs = []
            for line in lines:
                try:
                    recs.append(build(line))
                except (ValueError, TypeError, AttributeError, KeyError):
                    bad += 1
            if bad:
                self.ledger.lose("decode", f"{stream}_line", bad, produced=stream)
            ticket = await self._emit(recs, stream, observe=False)
            self.commits.add(CommitEntry(ticket, self._log_commit(stream, tail.position)))

    def _log_commit(self, stream: str, pos: tuple[int, int]):
        ck, seq_after = self.checkpoint, self.seq[stream]

        def before() -> None:
            ck[stream] = {"inode": pos[0], "offset": pos[1]}
            ck.set_seq(stream, seq_after)
        return before


def _drain_records(d) -> int:
    """Summary records a DropDrain makes (drops, overflow, flows in aggregate); 0: an empty interval."""
    fl = getattr(d, "flows", None)
    return len(d.keys) + len(d.overflow) + (fl.records if fl is not None else 0)


def track_open_anomalies(ck, records: list[dict]) -> None:
    """Keep the checkpoint's {anomaly id: last record} of open anomalies (open/update add, close removes)."""
    now = dict(ck["open_anomalies"] or {})
    for r in records:
        a = r["hostwall"].get("anomaly") or {}
        if a.get("state") == "close":
            now.pop(a.get("id"), None)
        elif a.get("id"):
            now[a["id"]] = r
    ck["open_anomalies"] = now


def previous_run(status_path) -> dict | None:
    """The last status the previous collector wrote, when it did not stop (its pid is gone and its state
    says running): kept in this run's status as `previous_run` instead of being overwritten."""
    try:
        st = orjson.loads(status_path.read_bytes())
    except (OSError, ValueError):
        return None
    if st.get("state") not in ("starting", "running", "stopping"):
        return None
    try:
        os.kill(int(st.get("pid")), 0)
        return None                                     # still alive: not ours to report
    except (TypeError, ValueError, ProcessLookupError):
        pass
    except PermissionError:
        return None
    return {"pid": st.get("pid"), "state": "crashed", "started_at": st.get("started_at"),
            "updated_at": st.get("updated_at"), "ledger": st.get("ledger")}
