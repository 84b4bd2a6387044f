"""The conntrack journal: what each conntrack scan batch was made of, kept until its records are durable,
so a restart sends the same records with the same `hostwall.seq` (docs/collector.md "Delivery and loss").

Why: a scan's records (FIN closes after the close grace period, idle ends, active-timeout updates) are
numbered in the `conntrack` stream when they are fanned out. Claimed ends can be found again in the
kernel after a crash, but not in the same batch (new closes join them) and not as the same update
records (an update's totals move on), so re-reporting them with fresh numbers would give a seq two
different events (a conflict `hostwall-collector verify` reports) or leave a hole where the dead run's
records never landed. The journal makes a scan batch reproducible instead, as the drop checkpoint does
for drop intervals: before the batch is fanned out, the scan's kernel snapshot (keys and entries as the
record builder saw them, the claimed slots) is written here with the batch's first seq; once every
at_least_once sink has the batch durable, the checkpoint moves past it and the file is removed. A start
that finds files rebuilds each batch from its snapshot (RecordBuilder is deterministic: same event.id,
same order, so the same seqs), adopts its claims (the kernel keeps them: a new scan must not report them
again) and releases them once durable.

Format: one uncompressed NumPy .npz per batch, `<seq_base>.npz` in `<status stem>.ct/`: per family
`<field>_<fam>` arrays of CtFamilyScan, and `meta` (JSON: seq_base, n, scan time, boot id; after a rebuild
mismatch was counted, seq_end and covered (`annotate`); for a batch
with flow summaries of connections counted in aggregate, their window and closes per family). Written
to a temporary name and renamed; no fsync, like the checkpoint (a collector crash keeps the page cache; a
machine crash loses the kernel state the batch came from anyway). Cost: one write of ~150 bytes per
record per scan batch (the records themselves are ~1 KB), one unlink per settled batch; memory: none
beyond the batch being written.
"""
from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from hostwall.bpf import layout as L

from .ct_scan import CT_ENTRY_DT, CtFamilyScan

__all__ = ["CtBatch", "CtJournal", "FIELDS", "journal_view"]

# CtFamilyScan fields kept (collector/kernel.py): what on_conntrack needs, and the claims to release
FIELDS = ("expired_keys", "expired_entries", "update_keys", "update_entries", "closed_keys", "closed_entries",
          "claimed_idx", "claimed_seen", "closed_idx", "closed_seen", "agg_keys", "agg_entries", "detached_keys",
          "detached_entries")
_KEY_DT = {4: L.DTYPES["hw_ct4_key"], 6: L.DTYPES["hw_ct6_key"]}
_END_EMITTED = L.C["HW_CT_F_END_EMITTED"]


def journal_view(f: CtFamilyScan, made: np.ndarray | None) -> CtFamilyScan:
    """The family as the journal keeps it: of the expired entries only those that made a record (`made`:
    RecordBuilder.ct_expired_made), with the bits that let the builder skip one cleared (fin_seen's
    END_EMITTED, `reported`), so a rebuild makes exactly these whatever its flow table holds (the skip
    depends on it: collector/records/conntrack.py _ct_end). Claims are untouched (claimed_idx/_seen)."""
    if made is None or not len(made) or len(made) != len(f.expired_keys):
        return f
    ents = f.expired_entries[made].copy()
    ents["fin_seen"] &= 0xFF ^ _END_EMITTED
    ents["reported"] = 0
    return dataclasses.replace(f, expired_keys=f.expired_keys[made], expired_entries=ents)


@dataclass
class CtBatch:
    """One journaled scan batch: its first seq, record count, scan time (datapath clock), the boot it
    came from, and per family the CtFamilyScan fields (FIELDS) as arrays."""
    path: Path
    seq_base: int
    n: int
    now_ns: int
    boot_id: str
    families: dict[int, dict[str, np.ndarray]]
    window: tuple[int, int] | None = None        # the flow summaries' [t0, t1] (wall ns), if the batch has any
    agg_closed: dict[int, int] = field(default_factory=dict)
    seq_end: int = -1      # the seq after the batch as first numbered (n shrinks when a rebuild made fewer)
    covered: int = -1      # records of a rebuild whose fate is counted already: a larger rebuild counts the rest
    detached_ns: int = 0   # a detach scan's batch: when the datapath detached (its ends' time)

    def __post_init__(self) -> None:
        if self.seq_end < 0:
            self.seq_end = self.seq_base + self.n
        if self.covered < 0:
            self.covered = self.n

    def scans(self) -> list[CtFamilyScan]:
        """The batch as the scan returned it: one CtFamilyScan per family (absent fields empty)."""
        out = []
        for fam in (4, 6):
            a = self.families.get(fam, {})

            def get(name: str, dt, a=a) -> np.ndarray:
                return a[name] if name in a else np.zeros(0, dt)
            out.append(CtFamilyScan(fam, get("expired_keys", _KEY_DT[fam]), get("expired_entries", CT_ENTRY_DT),
                                    get("update_keys", _KEY_DT[fam]), get("update_entries", CT_ENTRY_DT),
                                    get("claimed_idx", np.int64), get("claimed_seen", CT_ENTRY_DT),
                                    get("closed_keys", _KEY_DT[fam]), get("closed_entries", CT_ENTRY_DT),
                                    get("closed_idx", np.int64), get("closed_seen", CT_ENTRY_DT),
                                    get("agg_keys", _KEY_DT[fam]), get("agg_entries", CT_ENTRY_DT),
                                    int(self.agg_closed.get(fam, 0)), get("detached_keys", _KEY_DT[fam]),
                                    get("detached_entries", CT_ENTRY_DT), self.detached_ns))
        return out


class CtJournal:
    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.written = 0
        self.errors = 0

    def write(self, seq_base: int, n: int, now_ns: int, boot_id: str, families,
              window: tuple[int, int] | None = None) -> Path | None:
        """Journal a batch of `n` records numbered from `seq_base`, made of `families` (CtFamilyScan).
        None when the file cannot be written (counted in `errors`: that batch is not reproducible)."""
        arrays: dict[str, np.ndarray] = {}
        for f in families:
            for name in FIELDS:
                v = getattr(f, name)
                if v is not None and len(v):
                    arrays[f"{name}_{f.family}"] = np.ascontiguousarray(v)
        meta = {"seq_base": int(seq_base), "n": int(n), "now_ns": int(now_ns), "boot_id": boot_id,
                "agg_closed": {str(f.family): int(f.agg_closed) for f in families if f.agg_closed},
                "detached_ns": max((int(f.detached_ns) for f in families), default=0)}
        if window is not None:
            meta["window"] = [int(window[0]), int(window[1])]
        path = self._save(self.dir / f"{int(seq_base):020d}.npz", arrays, meta)
        self.written += path is not None
        return path

    def annotate(self, b: CtBatch, n: int, covered: int) -> None:
        """Note in b's file that a rebuild's mismatch is counted (collector/sources.py _rebuild_mismatch):
        its records are now the first `n`, and `covered` records of a rebuild are accounted for; seq_end
        stays. Same atomic rename as write()."""
        b.n, b.covered = n, covered
        arrays = {f"{name}_{fam}": a for fam, d in b.families.items() for name, a in d.items()}
        meta = {"seq_base": b.seq_base, "n": n, "now_ns": b.now_ns, "boot_id": b.boot_id,
                "agg_closed": {str(k): v for k, v in b.agg_closed.items()}, "seq_end": b.seq_end, "covered": covered,
                "detached_ns": b.detached_ns}
        if b.window is not None:
            meta["window"] = list(b.window)
        self._save(b.path, arrays, meta)

    def _save(self, path: Path, arrays: dict[str, np.ndarray], meta: dict) -> Path | None:
        arrays["meta"] = np.frombuffer(orjson.dumps(meta), np.uint8)
        tmp = self.dir / f".{path.name}.tmp{os.getpid()}"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.savez(buf, **arrays)
            tmp.write_bytes(buf.getbuffer())
            os.replace(tmp, path)
        except OSError:
            self.errors += 1
            tmp.unlink(missing_ok=True)
            return None
        return path

    def load(self) -> tuple[list[CtBatch], int]:
        """The batches an earlier run left, by seq_base; and how many files were unreadable (removed)."""
        out, bad = [], 0
        for p in sorted(self.dir.glob("*.npz")) if self.dir.is_dir() else []:
            try:
                with np.load(p, allow_pickle=False) as z:
                    meta = orjson.loads(z["meta"].tobytes())
                    fams: dict[int, dict[str, np.ndarray]] = {4: {}, 6: {}}
                    for key in z.files:
                        if key != "meta":
                            name, fam = key.rsplit("_", 1)
                            fams[int(fam)][name] = z[key]
                w = meta.get("window")
                out.append(CtBatch(p, int(meta["seq_base"]), int(meta["n"]), int(meta["now_ns"]),
                                   str(meta.get("boot_id", "")), fams, (int(w[0]), int(w[1])) if w else None,
                                   {int(k): int(v) for k, v in (meta.get("agg_closed") or {}).items()},
                                   int(meta.get("seq_end", -1)), int(meta.get("covered", -1)),
                                   int(meta.get("detached_ns", 0))))
            except (OSError, ValueError, KeyError, orjson.JSONDecodeError):
                bad += 1
                self.remove(p)
        out.sort(key=lambda b: b.seq_base)
        return out, bad

    def remove(self, path: Path | None) -> None:
        if path is not None:
            try:
                path.unlink(missing_ok=True)
            except OSError:
                self.errors += 1

    def __len__(self) -> int:
        return len(list(self.dir.glob("*.npz"))) if self.dir.is_dir() else 0
