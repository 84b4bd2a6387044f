"""The demo names the flows its log leaves open (docs/records.md "Flows without an end")."""
from __future__ import annotations

from hostwall.lab.demo import open_flows, top_flows


def _flow(sport: int, state: str, **flow) -> dict:
    return {"hostwall": {"kind": "flow", "flow": {"state": state, **flow}},
            "network": {"transport": "udp", "community_id": f"1:{sport}"},
            "source": {"ip": "10.0.0.2", "port": sport}, "destination": {"ip": "10.0.0.1", "port": 5353}}


def test_open_flows_are_the_starts_without_an_end():
    log = [_flow(1, "open"), _flow(2, "open"), _flow(1, "closed", end_reason="idle_timeout", duration_ns=10**9)]
    [still] = open_flows(log)
    assert still["key"][3] == 2 and still["state"] == "open"
    assert {f["key"][3]: f["state"] for f in top_flows(log)} == {1: "idle_timeout", 2: "open"}
