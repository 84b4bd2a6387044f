"""One way to pause Python's cyclic garbage collector around bulk work (docs/architecture.md).

Used where a loop allocates many small acyclic objects — records of a ring batch, YAML nodes of a policy,
cells and regions of a policy analysis, Kafka messages of a batch: generation scans over them cost as
much as the work itself (measured per use in docs/benchmarks.md), while reference counting frees all of
them anyway. Nested pauses are fine: only the outermost one enables the collector again, and only if it
was enabled when it began. Cost: two calls into the gc module.
"""
from __future__ import annotations

import gc

__all__ = ["GcPaused"]


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
