"""The collector's checkpoint: what a restart needs to tell the truth (docs/collector.md "Restarts").

One small JSON file per pin dir, next to the status file (`<status stem>.state.json`), rewritten with
tmp + rename (atomic: a reader or a restart sees the old or the new file, never half of one):

    version, pid, started_at, updated_at, clean_stop     this run; clean_stop is set by a clean stop only
    kernel        the kernel instance it belongs to: boot_id, ring_map_id, ev_stats_map_id, drops_map_ids
    ring          pos / seq (last committed consumer position and the events seq after it), unapplied
                  ([[pos, seq], ...]: every commit since the last consumer position known to be in the
                  kernel, that one first; the checkpoint is written before the kernel's consumer position
                  moves, and one write may hold several commits, so after a crash the kernel is at one of
                  them and its seq is exact), producer_pos (as last seen), events (records committed,
                  cumulative)
    seq           next hostwall.seq per stream (events, drop_summaries, conntrack, audit, dns, anomaly,
                  collector, tick) as of the last durable commit
    kernel_loss   the kernel's loss counters as last reported (written after each status write that
                  shows a change, the final one included, and with the restart record): the baseline the
                  next run continues from (never the kernel's counters as a new zero; a loss is counted
                  twice only after a kill between a status write and this save)
    drain         a drop-aggregation interval read but not cleared yet: gen, t0/t1 (wall ns), seq_base,
                  n (records made of it) — a restart re-exports it with the same event ids and seqs
    ct_last_scan  the datapath-clock time of the last conntrack scan whose records are durable
    audit, dns    {inode, offset} of the enforcer's audit log / DNS decision log up to which records are
                  durable

Cost: one small write per commit group (at most every COMMIT_INTERVAL_S of collector/pipeline.py);
fsync only at a clean stop (a collector crash keeps the page cache; a machine crash loses the ring
buffer the checkpoint describes anyway).
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = ["PREVIOUS_TEXT", "RESTARTED", "STREAMS", "Checkpoint", "Restart", "analyze_restart"]

VERSION = 1
MAX_UNAPPLIED = 4096                  # ring commits one checkpoint write may hold (a batch per commit group)
STREAMS = ("events", "drop_summaries", "conntrack", "audit", "dns", "anomaly", "collector", "tick")
# how the previous run ended, in a restart's words (loss record message, status `restart`); the first three
# are reported at every start (their data may be gone): `reboot` only when the boot id changed
PREVIOUS_TEXT = {"crash": "a crash", "reboot": "a reboot", "reloaded": "a reloaded datapath (same boot, new maps)",
                 "drained": "a drained instance", "clean": "a clean stop", "none": "no previous run"}
RESTARTED = ("crash", "reboot", "reloaded")


class Checkpoint:
    def __init__(self, path: str | os.PathLike, data: dict | None = None, *, problem: str | None = None):
        self.path = Path(path)
        self.data: dict[str, Any] = data or {}
        self.problem = problem              # why an existing file could not be used (None: fine or absent)
        self.data.setdefault("version", VERSION)
        self.data.setdefault("seq", {})
        self.data.setdefault("ring", {})
        self.writes = 0
        self.write_errors = 0

    @classmethod
    def load(cls, path: str | os.PathLike) -> Checkpoint:
        """The file's checkpoint, or an empty one (first start; or damaged, noted in `problem`)."""
        p = Path(path)
        try:
            raw = p.read_bytes()
        except FileNotFoundError:
            return cls(p)
        except OSError as e:
            return cls(p, problem=f"cannot read {p}: {e.strerror or e}")
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            return cls(p, problem=f"damaged checkpoint {p}: {e}")
        if not isinstance(data, dict) or data.get("version") != VERSION:
            return cls(p, problem=f"checkpoint {p} has another format (version {data.get('version')!r})"
                       if isinstance(data, dict) else f"damaged checkpoint {p}")
        return cls(p, data)

    @property
    def exists(self) -> bool:
        return bool(self.data.get("kernel"))

    # ---- fields --------------------------------------------------------------------------------
    def seq(self, stream: str) -> int:
        return int(self.data["seq"].get(stream, 0))

    def set_seq(self, stream: str, n: int) -> None:
        self.data["seq"][stream] = int(n)

    @property
    def ring(self) -> dict:
        return self.data["ring"]

    def commit_ring(self, pos: int, seq: int, events: int, producer_pos: int) -> None:
        """A ring commit is durable: the kernel's consumer position may now move to `pos` (ring_applied
        says when it did). Until then the kernel may be at any earlier unapplied commit."""
        r = self.data["ring"]
        pending = r.setdefault("unapplied", [])
        if not pending and "pos" in r:
            pending.append([int(r["pos"]), int(r["seq"])])
        if not pending or pending[-1][0] != pos:
            pending.append([int(pos), int(seq)])
        else:
            pending[-1][1] = int(seq)
        if len(pending) > MAX_UNAPPLIED:          # cannot happen while the ring commits after each save
            del pending[1:-MAX_UNAPPLIED + 1]
        r["pos"], r["seq"] = int(pos), int(seq)
        r["events"] = int(r.get("events", 0)) + int(events)
        r["producer_pos"] = int(producer_pos)
        self.set_seq("events", seq)

    def ring_applied(self, pos: int) -> None:
        """The kernel's consumer position is now `pos`: earlier commits can no longer be where it is. `pos`
        itself stays first: until the later commits are applied the kernel is there, and a checkpoint
        written meanwhile (another task's save) must give a restart its exact seq."""
        r = self.data["ring"]
        r["unapplied"] = [e for e in r.get("unapplied", []) if e[0] >= pos]

    def __getitem__(self, key: str) -> Any:
        return self.data.get(key)

    def __setitem__(self, key: str, value: Any) -> None:
        self.data[key] = value

    # ---- writing -------------------------------------------------------------------------------
    def save(self, *, sync: bool = False) -> bool:
        """Atomic write; False (counted in write_errors) when the state dir cannot be written."""
        self.data["updated_at"] = time.time()
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
            try:
                os.write(fd, orjson.dumps(self.data, option=orjson.OPT_SORT_KEYS))
                if sync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError:
            self.write_errors += 1
            return False
        self.writes += 1
        return True


@dataclass
class Restart:
    """What a start found about the run before it (status `restart`, the restart loss record)."""
    previous: str                           # none | clean | crash | reboot | reloaded | drained
    events_seq: int = 0                     # hostwall.seq of the first event read now
    lost: dict[str, int] = field(default_factory=dict)      # reason -> records (stage "restart")
    duplicates_possible: int = 0            # events re-read that the previous run had committed
    baseline: dict | None = None            # kernel counters to continue from (None: take the kernel's as zero)
    notes: list[str] = field(default_factory=list)
    previous_pid: int | None = None
    previous_updated_at: float | None = None
    new_kernel: bool = False                # the checkpoint's kernel instance is gone (reboot, reloaded, drained)

    def as_dict(self) -> dict:
        return {"previous": self.previous, "events_seq": self.events_seq, "lost": dict(self.lost),
                "duplicates_possible": self.duplicates_possible, "notes": list(self.notes),
                "previous_pid": self.previous_pid, "previous_updated_at": self.previous_updated_at}


def _same_kernel(old: dict, new: dict) -> bool:
    return bool(old) and old.get("boot_id") == new.get("boot_id") and \
        old.get("ring_map_id") == new.get("ring_map_id") and old.get("ev_stats_map_id") == new.get("ev_stats_map_id")


def _unapplied(ring: dict) -> dict[int, int]:
    """Consumer position -> events seq of the commits the kernel may still be at (prev_pos/prev_seq:
    checkpoints written before `unapplied` existed)."""
    at = {int(p): int(q) for p, q in ring.get("unapplied", [])}
    if ring.get("prev_pos") is not None:
        at.setdefault(int(ring["prev_pos"]), int(ring["prev_seq"]))
    return at


def mark_drained(path: str | os.PathLike, ring_map_id: int) -> None:
    """The instance whose ring has `ring_map_id` was drained to its end (collector/retired_drain.py) and is
    about to be unpinned: the next start on another instance says `drained`, not `reloaded`. Written (fsynced)
    before the unpin; the pipeline that drained it has stopped."""
    ck = Checkpoint.load(path)
    ck["drained_ring"] = int(ring_map_id)
    ck.save(sync=True)


def _new_instance_baseline(ck: Checkpoint, identity: dict, carried: dict | None) -> dict:
    """The loss counters an instance new to the checkpoint (same boot) starts from: zero, except what a
    build upgrade copied into it (InstanceState.carried_counters: the DNS record counters) — continued from
    the checkpoint's when copied from the instance it names (what that one counted after the last fold is
    counted once), else from the copied values."""
    carried = carried or {}
    if not carried.get("dns"):
        return {}
    if carried.get("from_ring") == (ck.data.get("kernel") or {}).get("ring_map_id"):
        dns = (ck.data.get("kernel_loss") or {}).get("dns") or carried["dns"]
    else:
        dns = carried["dns"]
    return {"dns": dict(dns)}


def analyze_restart(ck: Checkpoint, identity: dict, consumer_pos: int, stride: int,
                    carried: dict | None = None) -> Restart:
    """Compare the last run's checkpoint with the kernel as it is now.

    Same kernel instance (boot, ring and counter maps): the ring's consumer position is where the last run
    committed (or at the commit before, if it died between writing the checkpoint and moving the
    position: those events come again, with their seqs: duplicates, not loss); the kernel counters
    continue from the checkpoint's baseline, so what the kernel counted while no collector ran is counted
    now (budget, ringbuf_full). A consumer position *past* the checkpoint means events someone else took:
    lost, reason `crash`. A new boot (another boot id) or, on the same boot, a reloaded datapath (new maps:
    an enforcer restart, a build upgrade, a discarded retired instance): the ring the last run read is
    gone with every event it held beyond the last commit — at least (producer_pos - pos) / stride as last
    seen: reason `reboot` or `reloaded` (only a changed boot id is a reboot). An instance new to the checkpoint on the same boot: its loss counters count from
    zero, what a build upgrade copied into it excepted (`carried`, _new_instance_baseline); the kernel's
    counts before this start are counted now. The checkpoint's instance drained to its end
    (mark_drained) and unpinned after a clean stop: previous `drained`, nothing lost (docs/collector.md
    "Restarts")."""
    old = ck.data.get("kernel") or {}
    r = ck.ring
    prev = "clean" if ck.data.get("clean_stop") else "crash"
    rs = Restart(prev, previous_pid=ck.data.get("pid"), previous_updated_at=ck.data.get("updated_at"))
    if ck.problem:
        rs.notes.append(ck.problem)
    if not old:
        rs.previous = "none" if not ck.problem else "crash"
        return rs
    if not _same_kernel(old, identity):
        rs.new_kernel = True
        same_boot = old.get("boot_id") == identity.get("boot_id")
        if same_boot:
            rs.baseline = _new_instance_baseline(ck, identity, carried)
        rs.events_seq = ck.seq("events")
        if same_boot and ck.data.get("clean_stop") and ck.data.get("drained_ring") == old.get("ring_map_id"):
            rs.previous = "drained"
            rs.notes.append("the previous instance was drained to its end and unpinned (a retired instance)")
            return rs
        rs.previous = "reloaded" if same_boot else "reboot"
        why = "new boot" if not same_boot else "the datapath was reloaded (new maps)"
        backlog = max(0, int(r.get("producer_pos", 0)) - int(r.get("pos", 0))) // stride if "pos" in r else 0
        if backlog and not ck.data.get("clean_stop"):
            rs.lost[rs.previous] = backlog
        rs.notes.append(f"{why}: the previous ring buffer is gone"
                        + (f" with at least {backlog} uncommitted events" if backlog else ""))
        return rs
    rs.baseline = ck.data.get("kernel_loss")
    pos, seq = r.get("pos"), r.get("seq")
    if pos is None:
        rs.events_seq = ck.seq("events")
    elif consumer_pos == pos:
        rs.events_seq = int(seq)
    elif consumer_pos in (at := _unapplied(r)):
        rs.events_seq = at[consumer_pos]
        rs.duplicates_possible = (pos - consumer_pos) // stride
        rs.notes.append(f"the ring had not moved to the last commit: {rs.duplicates_possible} events come again")
    elif consumer_pos > pos:
        rs.events_seq = int(seq)
        rs.lost["crash"] = (consumer_pos - pos) // stride
        rs.notes.append(f"{rs.lost['crash']} events were consumed from the ring by someone else")
    else:                                   # not a commit it knows: every slot is one event of one stride
        rs.duplicates_possible = (pos - consumer_pos) // stride
        rs.events_seq = max(0, int(seq) - rs.duplicates_possible)
        rs.notes.append(f"the ring is behind the last commit: {rs.duplicates_possible} events come again")
    return rs
