"""The record builder's table of open flows (start seen, end not yet): what an end record takes from
its start (the interface and hook it was first seen on)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

__all__ = ["OpenFlow", "FlowTable"]


@dataclass(slots=True)
class OpenFlow:
    start_ns: int                  # monotonic
    last_ns: int                   # monotonic, last activity we heard of
    ifindex: int
    hook: int


class FlowTable:
    """OrderedDict LRU of open flows; O(1) per operation; size ≤ max_flows (evictions counted)."""

    def __init__(self, max_flows: int):
        self.max_flows = max_flows
        self.d: OrderedDict[tuple, OpenFlow] = OrderedDict()
        self.evicted = 0

    def open(self, key: tuple, flow: OpenFlow) -> None:
        self.d[key] = flow
        self.d.move_to_end(key)
        while len(self.d) > self.max_flows:
            self.d.popitem(last=False)
            self.evicted += 1

    def touch(self, key: tuple, last_ns: int) -> OpenFlow | None:
        f = self.d.get(key)
        if f is not None:
            f.last_ns = max(f.last_ns, last_ns)
            self.d.move_to_end(key)
        return f

    def close(self, key: tuple) -> OpenFlow | None:
        return self.d.pop(key, None)

    def expire(self, older_than_ns: int) -> int:
        """Drop flows whose last activity is older than the bound (their end was never reported)."""
        n = 0
        while self.d:
            k, f = next(iter(self.d.items()))
            if f.last_ns >= older_than_ns:
                break
            del self.d[k]
            n += 1
        return n
