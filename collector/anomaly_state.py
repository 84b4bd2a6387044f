"""The anomaly detector's baselines on disk, so a restart does not blind it (docs/collector.md "Restarts").

Without them, a restarted detector knows no baseline and opens nothing for `warmup_windows` windows (30 s
with the defaults): a flood right after a restart would page late. So the detector writes its learned
baselines — per key: mean and deviation of the rate, steps learned; and whether it was past its warm-up —
every `window_s` to
`<status stem>.baselines.json` (tmp + rename: a reader sees the old or the new file), and a new detector
starts from them: the global warm-up is skipped, each key keeps the history it had (a key trusted before
is trusted at once), and new keys behave as new keys do after the warm-up.

A file is used only if it was written with the same window, bucket and prefix lengths (else the rates are
not comparable) and is at most `MAX_AGE_S` old. Keys whose baseline decayed to nothing, and open
anomalies' transient state (buckets, talkers, peaks), are not kept.

Cost: save O(keys) (orjson, ~1 µs per key) once per window on the pipeline's loop; load once at start.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import orjson

__all__ = ["MAX_AGE_S", "load_baselines", "save_baselines"]

VERSION = 1
MAX_AGE_S = 24 * 3600.0


def _shape(cfg) -> dict:
    return {"window_s": cfg.window_s, "bucket_s": cfg.bucket_s, "prefix_v4": cfg.prefix_v4, "prefix_v6": cfg.prefix_v6}


def snapshot(det, now: float) -> dict:
    keys = []
    floor = det.cfg.min_deviation * 1e-3
    for (signal, dim), table in det._keys.items():
        for value, k in table.items():
            if k.steps and (k.mean >= floor or k.dev >= floor):
                keys.append([signal, dim, value, k.extra, round(k.mean, 6), round(k.dev, 6), k.steps])
    return {"version": VERSION, "saved_at": now, "shape": _shape(det.cfg), "warm": bool(det.warm), "keys": keys}


def save_baselines(det, path: str | os.PathLike, now: float | None = None) -> bool:
    """Atomic write of the detector's baselines; False when the state dir cannot be written."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_bytes(orjson.dumps(snapshot(det, time.time() if now is None else now)))
        os.replace(tmp, p)
    except OSError:
        return False
    return True


def load_baselines(det, path: str | os.PathLike, now: float | None = None) -> tuple[int, bool, str]:
    """Restore baselines into a fresh detector: (keys restored, whether the saving run was past its warm-up —
    then every key it did not know is new, and the new run needs no warm-up either —, why not when nothing)."""
    now = time.time() if now is None else now
    try:
        data: Any = orjson.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return 0, False, "no baselines saved yet"
    except (OSError, orjson.JSONDecodeError) as e:
        return 0, False, f"unreadable baselines {path}: {e}"
    if not isinstance(data, dict) or data.get("version") != VERSION:
        return 0, False, f"baselines {path} have another format"
    if data.get("shape") != _shape(det.cfg):
        return 0, False, f"baselines {path} were learned with other window/bucket/prefix settings"
    age = now - float(data.get("saved_at") or 0)
    if not 0 <= age <= MAX_AGE_S:
        return 0, False, f"baselines {path} are {age / 3600:.1f} h old"
    bucket = math.floor(now / det.cfg.bucket_s)
    n = 0
    for row in data.get("keys") or ():
        try:
            signal, dim, value, extra, mean, dev, steps = row
            k = det._get_key(str(signal), str(dim), str(value), dict(extra), now)
        except (TypeError, ValueError):
            continue
        if k is None:
            break
        k.mean, k.dev, k.steps, k.created_bucket = float(mean), float(dev), int(steps), bucket
        n += 1
    warm = bool(data.get("warm"))
    return n, warm, "" if n or warm else f"baselines {path} hold no key and were saved during a warm-up"
