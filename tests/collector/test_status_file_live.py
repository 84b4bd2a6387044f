"""A collector with its own status file (`--status-file`, `status_file:`) on the real datapath: its
checkpoint is not the default one, yet a clean enforcer stop must retire the instance it reads and its
next start drain it (bpf/state.py register_collector; docs/collector.md "Detach")."""
from __future__ import annotations

import dataclasses
from collections import Counter

import pytest
import uvloop

from hostwall.bpf import retired
from hostwall.bpf.state import collector_checkpoint_path, collector_status_path

from .test_retired_live import (  # noqa: F401 — fixtures
    N_LOG,
    collector_cfg,
    consume_ring,
    datapath,
    pin,
    records,
    run_briefly,
    traffic,
)

pytestmark = pytest.mark.bpf


def test_a_clean_stop_retires_for_a_collector_with_its_own_status_file(datapath, pin, tmp_path):  # noqa: F811
    """Collector (status file /…/own/x.json) read the instance and stopped → traffic → clean detach: the
    maps are retired (not unpinned with what it had not read), and its next start with the same status
    file drains them: every log event, the drop summary, the detach ends, seqs contiguous, nothing lost."""
    from hostwall.collector.retired_drain import drain_retired
    from hostwall.collector.wiring import build_pipeline
    from hostwall.enforcer import control
    dp, _ = datapath
    out = tmp_path / "flows.jsonl"
    cfg = dataclasses.replace(collector_cfg(pin, out), status_file=str(tmp_path / "own" / "x.json"))
    consume_ring(pin)
    run_briefly(cfg)
    assert not collector_checkpoint_path(collector_status_path(pin)).exists()    # not the default checkpoint
    assert retired.collector_checkpoint(pin) == cfg.state_path()
    before = len(records(out))
    traffic(dp)
    control.detach(pin)
    [r] = retired.listing(pin)                              # retired for the collector, not unpinned

    got = uvloop.run(drain_retired(cfg, build_pipeline))
    assert got is not None and [g["detached_ns"] for g in got] == [int(r.name)]
    assert retired.listing(pin) == []
    new = records(out)[before:]
    kinds = Counter(x["hostwall"]["kind"] for x in new)
    assert kinds["log"] == N_LOG and kinds["drop_summary"] == 1 and not kinds["loss"], kinds
    ends = Counter(e["hostwall"]["flow"]["end_reason"] for e in new
                   if e["hostwall"]["kind"] == "flow" and e["event"]["type"] == ["end"])
    assert ends == {"detach": N_LOG + 1}, ends
    seqs = sorted(x["hostwall"]["seq"] for x in records(out) if x["hostwall"]["stream"] == "events")
    assert seqs == list(range(len(seqs)))                   # exact across the two runs: no gap, no repeat
