"""The anomaly detector's configuration (collector/anomaly.py; the `anomaly` section of the collector's
config file, docs/collector.md "Configuration"): the window, baseline and opening parameters, the
keys it tracks and the severity bands, validated all at once — AnomalyConfig.from_dict raises
AnomalyConfigError listing every problem (unknown keys, types, ranges, cross-field rules). O(fields).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = ["AnomalyConfig", "AnomalyConfigError", "DIMENSIONS", "SIGNALS"]

DIMENSIONS = ("source_prefix", "destination_port", "reason")
SIGNALS = ("drops", "flows", "syns")


class AnomalyConfigError(ValueError):
    """Every problem of an anomaly configuration, one per line in .errors."""

    def __init__(self, errors: list[str]):
        self.errors = errors
        super().__init__("invalid anomaly config:\n  " + "\n  ".join(errors))


@dataclass(frozen=True)
class AnomalyConfig:
    window_s: float = 10.0               # sliding window length
    bucket_s: float = 1.0                # evaluation step and time resolution
    ewma_alpha: float = 0.05             # baseline learning rate per step
    score_threshold: float = 6.0         # open when the score reaches this ...
    min_rate: float = 50.0               # ... and the rate (per second) at least this
    quiet_s: float = 30.0                # close after this long below threshold
    update_interval_s: float = 10.0      # update records while open
    warmup_windows: int = 3              # windows of history before a non-zero baseline is trusted
    min_deviation: float = 1.0           # floor of the deviation (per second)
    open_learning_factor: float = 0.02   # baseline (mean) alpha multiplier while open; deviation frozen
    prefix_v4: int = 24
    prefix_v6: int = 64
    max_keys: int = 20000                # per (signal, dimension)
    top_talkers: int = 5
    talkers_tracked: int = 32
    dimensions: tuple = DIMENSIONS
    signals: tuple = SIGNALS
    severity_bands: dict = field(default_factory=lambda: {"low": 6.0, "medium": 12.0, "high": 24.0, "critical": 48.0})

    @classmethod
    def from_dict(cls, d: dict | None) -> AnomalyConfig:
        """Validate and build; raises AnomalyConfigError listing every error (unknown keys, types, ranges,
        cross-field rules)."""
        d = dict(d or {})
        errors: list[str] = []
        known = {f.name: f for f in fields(cls)}
        for k in sorted(set(d) - set(known)):
            errors.append(f"{k}: unknown setting (known: {', '.join(sorted(known))})")
        vals: dict[str, Any] = {}
        for name, f in known.items():
            if name not in d:
                continue
            vals[name] = _coerce(name, d[name], f, errors)
        cfg_vals = {k: v for k, v in vals.items() if v is not _BAD}
        try:
            cfg = cls(**cfg_vals)
        except TypeError as e:                       # pragma: no cover - guarded by _coerce
            errors.append(str(e))
            raise AnomalyConfigError(errors) from None
        errors += cfg._check()
        if errors:
            raise AnomalyConfigError(errors)
        return cfg

    def _check(self) -> list[str]:
        e = []
        for name in ("window_s", "bucket_s", "score_threshold", "update_interval_s", "min_deviation"):
            if not getattr(self, name) > 0:
                e.append(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("min_rate", "quiet_s"):
            if getattr(self, name) < 0:
                e.append(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not 0 < self.ewma_alpha <= 1:
            e.append(f"ewma_alpha: must be in (0, 1], got {self.ewma_alpha}")
        if not 0 <= self.open_learning_factor <= 1:
            e.append(f"open_learning_factor: must be in [0, 1], got {self.open_learning_factor}")
        if self.bucket_s > 0 and self.window_s > 0:
            n = self.window_s / self.bucket_s
            if abs(n - round(n)) > 1e-9 or round(n) < 1:
                e.append(f"window_s ({self.window_s}) must be a whole multiple of bucket_s ({self.bucket_s})")
            elif round(n) > 3600:
                e.append(f"window_s / bucket_s = {round(n)} buckets: at most 3600")
        if not 0 <= self.prefix_v4 <= 32:
            e.append(f"prefix_v4: must be 0..32, got {self.prefix_v4}")
        if not 0 <= self.prefix_v6 <= 128:
            e.append(f"prefix_v6: must be 0..128, got {self.prefix_v6}")
        for name in ("max_keys", "talkers_tracked", "warmup_windows"):
            if getattr(self, name) < (0 if name == "warmup_windows" else 1):
                e.append(f"{name}: must be >= {0 if name == 'warmup_windows' else 1}, got {getattr(self, name)}")
        if self.top_talkers < 0 or self.top_talkers > self.talkers_tracked:
            e.append(f"top_talkers: must be 0..talkers_tracked ({self.talkers_tracked}), got {self.top_talkers}")
        for dim in self.dimensions:
            if dim not in DIMENSIONS:
                e.append(f"dimensions: unknown {dim!r} (known: {', '.join(DIMENSIONS)})")
        for sig in self.signals:
            if sig not in SIGNALS:
                e.append(f"signals: unknown {sig!r} (known: {', '.join(SIGNALS)})")
        e += _check_bands(self.severity_bands, self.score_threshold)
        return e

    @property
    def buckets(self) -> int:
        return max(1, round(self.window_s / self.bucket_s))

    def severity(self, score: float) -> str:
        name = ""
        for n, lo in sorted(self.severity_bands.items(), key=lambda kv: kv[1]):
            if score >= lo:
                name = n
        return name or min(self.severity_bands.items(), key=lambda kv: kv[1])[0]


_BAD = object()
_SEQ_FIELDS = {"dimensions", "signals"}


def _coerce(name: str, v, f, errors: list[str]):
    t = f.type if isinstance(f.type, str) else f.type.__name__
    if name in _SEQ_FIELDS:
        if not isinstance(v, (list, tuple)) or not all(isinstance(x, str) for x in v):
            errors.append(f"{name}: must be a list of strings, got {v!r}")
            return _BAD
        return tuple(v)
    if name == "severity_bands":
        if not isinstance(v, dict):
            errors.append(f"severity_bands: must be a mapping of band name to minimum score, got {v!r}")
            return _BAD
        return dict(v)
    if t == "int":
        if isinstance(v, bool) or not isinstance(v, int):
            errors.append(f"{name}: must be an integer, got {v!r}")
            return _BAD
        return v
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        errors.append(f"{name}: must be a finite number, got {v!r}")
        return _BAD
    return float(v)


def _check_bands(bands: dict, threshold: float) -> list[str]:
    e = []
    if not bands:
        return ["severity_bands: at least one band is required"]
    for n, lo in bands.items():
        if not isinstance(n, str) or not n:
            e.append(f"severity_bands: band names must be non-empty strings, got {n!r}")
        if isinstance(lo, bool) or not isinstance(lo, (int, float)) or not math.isfinite(lo) or lo <= 0:
            e.append(f"severity_bands.{n}: minimum score must be a number > 0, got {lo!r}")
    nums = [lo for lo in bands.values() if isinstance(lo, (int, float)) and not isinstance(lo, bool)]
    if len(set(nums)) != len(nums):
        e.append("severity_bands: two bands share a minimum score")
    if nums and threshold > 0 and min(nums) > threshold:
        e.append(f"severity_bands: the lowest band ({min(nums)}) is above score_threshold ({threshold}): "
                 "an opened anomaly would have no severity")
    return e
