"""Retired instances: the maps of a cleanly detached instance, kept pinned until a collector drained them
(docs/collector.md "Detach", docs/datapath.md "Pins and retired instances"); an instance a build upgrade
replaced is retired the same way, once noted (docs/collector.md "Replaced instances").

A clean detach that noted itself (hw_config.detached_ns) moves the instance's `maps/` pin directory to
`<pin dir>-retired/<detached_ns>/maps` (rename(2) on bpffs: the same kernel maps, the same map ids, so
the collector's checkpoint still names them) instead of unpinning it — only when a collector reads this
pin dir (its checkpoint exists: the one it registered in $HOSTWALL_STATE_DIR, wherever its status file
is, or the default status file's; collector_checkpoint). bpffs refuses names with a dot, hence `-retired`.
The enforcer's state at the detach is kept beside it as `<stem>.retired-<detached_ns>.json` (the rule
names its records resolve through). At most MAX_RETIRED are kept per pin dir: retiring one more
discards the oldest, and what it still held that no one else reports (holdings: unread ring events,
connections whose end no one reported or claimed, drop keys never exported) is appended to
`<stem>.retired-discarded.jsonl`, which the collector reports as loss (`retired_discarded`). Cost of a
discard: one ring mmap, one conntrack table scan, one batch count per drop map, one checkpoint read.

A build upgrade that cannot retire the instance it replaces (its maps laid out otherwise, no state, an
old program still attached: enforcer/control.py _replace) notes what the unpin frees the same way
(note_replaced, reason `replaced_unreadable`; docs/collector.md "Replaced instances").
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np

from . import bpfsys, conntrack, state
from . import layout as L
from .ringbuf import RingBuffer
from .state import boot_id, instance_stem, policy_writer, state_dir

MAX_RETIRED = 4
SUFFIX = "-retired"
GONE = "gone-"          # a retired instance being unpinned (remove): out of the listing
REPLACED = "replaced_unreadable"    # note_replaced's loss reason

log = logging.getLogger("hostwall.retired")


def root(pin_dir: str | os.PathLike) -> Path:
    """Where the retired instances of `pin_dir` are pinned (same bpffs, beside the pin dir)."""
    return Path(os.path.abspath(pin_dir) + SUFFIX)


def listing(pin_dir: str | os.PathLike) -> list[Path]:
    """The retired instances of `pin_dir`, oldest first (named by their detached_ns)."""
    r = root(pin_dir)
    try:
        names = [p for p in r.iterdir() if p.name.isdigit() and (p / "maps").is_dir()]
    except FileNotFoundError:
        return []
    return sorted(names, key=lambda p: int(p.name))


def collector_checkpoint(pin_dir: str | os.PathLike) -> Path:
    """The checkpoint of the collector reading `pin_dir`, wherever its status file is (state.py
    collector_checkpoint: the registered one, else the default status file's)."""
    return state.collector_checkpoint(str(pin_dir))


def state_copy(pin_dir: str | os.PathLike, detached_ns: int) -> Path:
    """The enforcer's state as it was at the detach of the retired instance `detached_ns`."""
    return state_dir() / f"{instance_stem(str(pin_dir))}.retired-{int(detached_ns)}.json"


def discard_note(pin_dir: str | os.PathLike) -> Path:
    """What discarded retired instances held, one JSON object per line (the collector reports it)."""
    return state_dir() / f"{instance_stem(str(pin_dir))}.retired-discarded.jsonl"


def retire(pin_dir: str | os.PathLike, detached_ns: int, state: dict | None) -> list[dict]:
    """Move `pin_dir`'s maps to its retired directory `detached_ns` and keep `state` beside them; then
    discard the oldest beyond MAX_RETIRED. Returns what the discarded ones held (noted, see module doc).
    The caller unpins what is left in `pin_dir` (the programs)."""
    dest = root(pin_dir) / str(int(detached_ns))
    dest.mkdir(parents=True, exist_ok=True)
    if state is not None:
        try:
            _write_synced(state_copy(pin_dir, detached_ns), json.dumps(state, sort_keys=True).encode(), "wb")
        except OSError as e:            # a full state disk must not fail the stop: only rule names are missing
            log.warning("retired instance %s kept without its state copy (its records stay unnamed): %s", dest, e)
    os.rename(Path(pin_dir) / "maps", dest / "maps")
    out = []
    try:
        for old in listing(pin_dir)[:-MAX_RETIRED]:
            held = discard(pin_dir, old, reason="retired_discarded")
            if held is not None:
                out.append(held)
    except OSError as e:                # its note cannot be written: kept pinned (more than MAX_RETIRED), not lost
        log.warning("retired instances of %s beyond %d kept: the discard failed: %s", pin_dir, MAX_RETIRED, e)
    sweep(pin_dir)
    return out


def discard(pin_dir: str | os.PathLike, path: Path, reason: str) -> dict | None:
    """Unpin one retired instance, after noting durably what it still held. None, and nothing done, when
    a collector reads it (reader_lock): it drains and unpins it itself, so noting it lost would count its
    records twice (delivered and lost). The exclusive lock is held through the unpin."""
    with _exclusive(ring_id(path)) as free:
        if not free or not (path / "maps").is_dir():
            return None
        held = {"detached_ns": int(path.name), "reason": reason, "at": time.time(),
                **holdings(path, exported_gen(pin_dir, path))}
        _write_synced(discard_note(pin_dir), (json.dumps(held, sort_keys=True) + "\n").encode(), "ab")
        remove(pin_dir, path)
        return held


def note_replaced(pin_dir: str | os.PathLike, connections: int, unpin) -> dict | None:
    """Unpin (`unpin()`) the replaced instance still pinned at `pin_dir` after noting durably what it held
    (holdings; `connections`: the caller's count of ends no one will report, -1 if unknown; the note names
    the instance by its ring's map id). A note for the same ring from a replacement killed before its
    unpin is replaced, not added to. None, and no note, when a collector reads it (reader_lock): its fds
    keep the maps; nor when no maps are pinned. The exclusive lock is held through the unpin, as in discard. The caller holds
    state.policy_writer (the notes' writers)."""
    path = Path(pin_dir)
    ring = ring_id(path)
    with _exclusive(ring) as free:
        if not free or not (path / "maps").is_dir():     # read by a collector, or nothing pinned to free
            unpin()
            return None
        held = {"detached_ns": time.time_ns(), "reason": REPLACED, "at": time.time(), "ring_map_id": ring,
                **holdings(path, exported_gen(pin_dir, path), conntrack_too=False), "connections": connections}
        others = [d for d in discarded(pin_dir) if ring is None or d.get("ring_map_id") != ring]
        _rewrite(pin_dir, [*others, held])
        unpin()
        return held


def ring_id(path: str | os.PathLike) -> int | None:
    """The map id of the ring buffer pinned under `path` (a pin dir or a retired instance), None if none."""
    try:
        fd = bpfsys.obj_get(str(Path(path) / "maps" / "hw_events"))
    except OSError:
        return None
    try:
        return bpfsys.map_info(fd).id
    finally:
        os.close(fd)


def _reader_lock_path(ring: int) -> Path:
    return state_dir() / f"reader-{int(ring)}.lock"


def reader_lock(ring: int):
    """A shared flock a collector holds while it reads the kernel instance whose ring has map id `ring`
    (map ids are unique within a boot, like the state dir), from its start until it unpinned what it
    drained: a discard (exclusive, non-blocking) skips an instance a collector reads. Returns the open
    file; closing it (or the process dying) releases the lock."""
    p = _reader_lock_path(ring)
    p.parent.mkdir(parents=True, exist_ok=True)
    f = open(p, "ab")
    fcntl.flock(f.fileno(), fcntl.LOCK_SH)
    return f


@contextlib.contextmanager
def _exclusive(ring: int | None):
    """Yields True holding the exclusive reader lock of `ring` (no collector reads it), else False. An
    instance without a readable ring has no reader to exclude: True."""
    if ring is None:
        yield True
        return
    p = _reader_lock_path(ring)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "ab") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def remove(pin_dir: str | os.PathLike, path: Path) -> None:
    """Unpin a retired instance (drained, or noted by discard), its state copy and its lock file; the root
    goes when empty. The caller holds its reader lock (shared or exclusive). It is first renamed out of the
    listing (one rename(2)): a kill during the unlinks leaves no half-pinned instance that every collector
    start would fail on (missing maps) and whose note would not count; sweep() finishes it. The lock file
    goes after the pins, so whoever takes that lock next finds no pins and skips."""
    os.rename(path, path.with_name(GONE + path.name))
    sweep(pin_dir)


def sweep(pin_dir: str | os.PathLike) -> None:
    """Finish the unpins of removed instances (remove; a kill may have cut one short). Cost: one listing of
    the retired root; called by remove, retire and the collector's drain."""
    r = root(pin_dir)
    try:
        gone = [p for p in r.iterdir() if p.name.startswith(GONE)]
    except FileNotFoundError:
        return
    for p in gone:
        ring = ring_id(p)
        shutil.rmtree(p, ignore_errors=True)        # unlink on bpffs drops the pin reference
        if ring is not None:
            _reader_lock_path(ring).unlink(missing_ok=True)
        state_copy(pin_dir, int(p.name[len(GONE):])).unlink(missing_ok=True)
    try:
        r.rmdir()
    except OSError:
        pass                                        # other retired instances are left


def holdings(path: Path, exported: int | None = None, conntrack_too: bool = True) -> dict:
    """What a retired instance still holds for a collector, in records no one else reports: ring events
    not consumed; connections whose end no one reported or claimed (conntrack.EndMarks: the rule of the
    collector's scans — a datapath flow_end is an event, a durable close is delivered, a claim's batch is
    in the collector's conntrack journal, which replays it whatever the instance); drop and flow aggregation
    keys and overflow slots not exported (`exported`: the generation a collector shipped and has not
    cleared, exported_gen; _aggregates). -1 where a map
    could not be read (or, without `conntrack_too`, was not). Events and drop keys are counted from the
    kernel's layouts (ring headers, map info), so the instance may be of another build."""
    maps, gens = path / "maps", tuple(g for g in (0, 1) if g != exported)
    out = {"events": -1, "connections": -1, "drop_keys": -1, "flow_keys": -1, "overflow_slots": -1}
    try:
        with RingBuffer.open(maps / "hw_events") as ring:
            out["events"] = ring.pending_records()
    except OSError:
        pass
    fds: dict[str, int] = {}
    try:
        for n in ("hw_drops0", "hw_drops1") + (("hw_ct4", "hw_ct6") if conntrack_too else ()):
            fds[n] = bpfsys.obj_get(str(maps / n))
        out["drop_keys"] = sum(_entries(fds[f"hw_drops{g}"]) for g in gens)
        if conntrack_too:
            out["connections"] = conntrack.unreported_count(fds)
    except OSError:
        pass
    finally:
        for fd in fds.values():
            os.close(fd)
    out.update(_aggregates(maps, gens))
    return out


def _aggregates(maps: Path, gens: tuple[int, ...]) -> dict:
    """The flow aggregation's keys (a flow summary each) and the non-zero overflow slots of the drop and
    flow aggregations (an overflow summary each: collector/records/drops.py, collector/flow_summary.py) in
    generations `gens`; -1 where a map cannot be read (an older build without it)."""
    out = {"flow_keys": -1, "overflow_slots": -1}
    fds: dict[str, int] = {}
    try:
        for n in ("hw_flows0", "hw_flows1", "hw_drop_overflow", "hw_flow_overflow"):
            fds[n] = bpfsys.obj_get(str(maps / n))
        out["flow_keys"] = sum(_entries(fds[f"hw_flows{g}"]) for g in gens)
        out["overflow_slots"] = sum(_nonzero_slots(fds[n], gens) for n in ("hw_drop_overflow", "hw_flow_overflow"))
    except OSError:
        pass
    finally:
        for fd in fds.values():
            os.close(fd)
    return out


def _nonzero_slots(fd: int, gens: tuple[int, ...]) -> int:
    """Slots of a per-CPU array laid out [generation][...] (two halves: hw_drop_overflow,
    hw_flow_overflow) holding anything on any CPU, in generations `gens`; any build's value layout."""
    i = bpfsys.map_info(fd)
    half, vb = i.max_entries // 2, (i.value_size + 7) // 8 * 8 * bpfsys.possible_cpus()
    return sum(int(np.frombuffer(bpfsys.array_slots(fd, g * half, half, vb), np.uint8).reshape(half, vb).any(axis=1).sum())
               for g in gens)


def _entries(fd: int) -> int:
    """Entries of a per-CPU hash map, sized by its own map info (any build's layout)."""
    i = bpfsys.map_info(fd)
    return bpfsys.count_entries(fd, i.key_size, (i.value_size + 7) // 8 * 8 * bpfsys.possible_cpus())


def exported_gen(pin_dir: str | os.PathLike, path: Path) -> int | None:
    """The drop generation of the retired instance at `path` that its collector exported and has not
    cleared: the `drain` of the collector's checkpoint (collector/checkpoint.py) when that checkpoint names
    this instance (same boot, same ring map id) and the generation is not the one the datapath writes
    (the collector's own test, collector/sources.py _export_checkpointed_drain). Those summaries are the
    collector's (sent, or counted lost by its sinks); None when there is none. Cost: one small file read,
    two map lookups."""
    try:
        ck = json.loads(collector_checkpoint(pin_dir).read_bytes())
        drain, kernel = ck.get("drain"), ck.get("kernel") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(drain, dict) or kernel.get("boot_id") != boot_id() or kernel.get("ring_map_id") != ring_id(path):
        return None
    gen = int(drain.get("gen", -1))
    return gen if gen in (0, 1) and gen != _agg_gen(path) else None


def _agg_gen(path: Path) -> int | None:
    """hw_collect.agg_gen & 1 of the instance at `path`: the drop generation the datapath writes. Read
    with the map's own value size (another build's may differ; fields are only appended), None if too
    short for agg_gen."""
    try:
        fd = bpfsys.obj_get(str(path / "maps" / "hw_collect"))
    except OSError:
        return None
    try:
        dt, size = L.DTYPES["hw_collect"], bpfsys.map_info(fd).value_size
        raw = bpfsys.map_lookup(fd, b"\0" * 4, size)
    except OSError:
        return None
    finally:
        os.close(fd)
    field, off = dt.fields["agg_gen"][:2]
    if raw is None or off + field.itemsize > len(raw):
        return None
    return int(np.frombuffer(raw, dtype=field, count=1, offset=off)[0]) & 1


def _write_synced(path: Path, data: bytes, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, mode) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def discarded(pin_dir: str | os.PathLike) -> list[dict]:
    """The discard notes not yet reported by a collector (unreadable lines are skipped)."""
    try:
        lines = discard_note(pin_dir).read_bytes().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            d = json.loads(line)
        except ValueError:
            continue
        if isinstance(d, dict) and "detached_ns" in d:
            out.append(d)
    return out


def unpinned_notes(pin_dir: str | os.PathLike) -> list[dict]:
    """The discard notes whose instance is really gone, one per instance (the last): a discard killed
    between its note and the unpin leaves the instance pinned, and the collector drains it — counting its
    note too would count its records twice (its drain drops the note: forget_discarded). Likewise a
    replaced instance's note (note_replaced) while its ring is still the one pinned at the pin dir (a
    replacement killed before its unpin: the collector reads it; the next replacement notes it again)."""
    last = {int(d["detached_ns"]): d for d in discarded(pin_dir)}
    live = ring_id(pin_dir)
    return [d for ns, d in sorted(last.items()) if ring_id(root(pin_dir) / str(ns)) is None
            and (d.get("ring_map_id") is None or d["ring_map_id"] != live)]


def forget_discarded(pin_dir: str | os.PathLike, reported: list[dict]) -> None:
    """The collector reported these notes (its loss record is durable in its outbox): drop them, keeping
    any note a discard appended meanwhile (the enforcer appends holding state.policy_writer, so do we)."""
    if not reported:
        return
    with policy_writer(str(pin_dir)):
        gone = {int(d["detached_ns"]) for d in reported}
        left = [d for d in discarded(pin_dir) if int(d["detached_ns"]) not in gone]
        _rewrite(pin_dir, left)


def _rewrite(pin_dir: str | os.PathLike, notes: list[dict]) -> None:
    """Replace the discard notes with `notes` (atomic: rename; none: the file goes). Under policy_writer."""
    p = discard_note(pin_dir)
    if not notes:
        p.unlink(missing_ok=True)
        return
    tmp = p.with_name(p.name + ".tmp")
    _write_synced(tmp, b"".join(json.dumps(d, sort_keys=True).encode() + b"\n" for d in notes), "wb")
    os.replace(tmp, p)


def lost_records(note: dict) -> int:
    """Records a discarded instance's holdings stood for: an event each, a flow end per connection, a drop
    or flow summary per aggregation key, an overflow summary per non-zero overflow slot (a lower bound:
    unknown parts, -1, count nothing; a note of a build before flow_keys and overflow_slots has none)."""
    return sum(max(0, int(note.get(k, 0))) for k in ("events", "connections", "drop_keys", "flow_keys", "overflow_slots"))
