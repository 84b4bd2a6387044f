"""One way to pause Python's cyclic garbage collector around bulk work (docs/architecture.md).

Used where a loop allocates many small acyclic objects — records of a ring batch, YAML nodes of a policy,
cells and regions of a policy analysis, Kafka messages of a batch: generation scans over them cost as
much as the work itself (measured per use in docs/benchmarks.md), while reference counting frees all of
them anyway. Nested pauses are fine: only the outermost one enables the collector again, and only if it
was enabled when it began. Cost: two calls into the gc module.
"""
from __future__ import annotations

import gc

__all__ = ["GcPaused", "tune_for_batches", "BATCH_GEN0_THRESHOLD"]

BATCH_GEN0_THRESHOLD = 200_000     # > one ring batch's container allocations (8192 records × ~12)


class GcPaused:
    """`with GcPaused(): ...` — the cyclic GC is off inside and back to its previous state after."""
    __slots__ = ("was",)

    def __enter__(self) -> GcPaused:
        self.was = gc.isenabled()
        gc.disable()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.was:
            gc.enable()


def tune_for_batches(gen0: int = BATCH_GEN0_THRESHOLD) -> None:
    """Process-wide, for a process that makes records in batches (the collector CLI's choice, made once
    at start; docs/collector.md "Records at line rate"): start-up's objects are frozen out of every
    collection (as the enforcer's runner does), and generation 0 collects after `gen0` net allocations
    instead of 700. Why: a ring batch built under GcPaused adds ~100k container objects at once, so with
    the default the next allocation traverses the whole batch, and generation 1 the records queued for
    the sink — ~10-20 % of the collector's CPU in `bench collector`, for records that are acyclic and
    freed by reference counting once written. Cost: cyclic garbage waits for up to `gen0` allocations;
    a collection, when it comes, traverses up to that many young objects (tens of ms)."""
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(gen0, g1, g2)
