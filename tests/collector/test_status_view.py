"""`hostwall-collector status` text (collector/status_view.py): a saved status of a stopped collector
says when it stopped and how old its figures are from now; "commits pending" says what it counts."""
from __future__ import annotations

import time

from hostwall.collector.status_view import render_status


def saved(age_s: float) -> dict:
    now = time.time()
    return {"state": "stopped", "pid": 1, "uptime_s": 26, "pin_dir": "/sys/fs/bpf/x", "alive": False,
            "updated_at": now - age_s, "age_s": age_s,
            "delivery": {"batches": 12, "durable": 12, "acknowledging_sinks": ["jsonl:/x"],
                         "commits_pending": 19, "outbox_pending": 0},
            "sinks": {"jsonl:/x": {"health": {"state": "ok", "since_success_s": 0.2}, "delivered": 3}}}


def test_a_stopped_collectors_saved_status_is_aged_from_now():
    text = render_status(saved(3600))
    head = text.splitlines()[0]
    assert head.startswith("collector  stopped at ") and "(60 min ago)" in head, head
    assert time.strftime("%Y-%m-%d", time.localtime(time.time() - 3600)) in head
    assert "last success 60 min ago" in text and "last success 0 s ago" not in text, text


def test_commits_pending_names_what_it_counts():
    line = next(x for x in render_status(saved(1)).splitlines() if x.startswith("delivery"))
    assert "19 read positions to commit" in line and "commits pending" not in line, line


def test_retired_instances_drained_before_this_run_are_shown():
    """README: after a clean enforcer stop with no collector, the next start drains the retired maps and
    `status` shows it — the text form too, not only --json."""
    st = {**saved(1), "retired_drained": [{"detached_ns": 726906715723, "events": 8, "detach_ends": 3,
                                           "drop_intervals": 2}]}
    lines = [x for x in render_status(st).splitlines() if x.startswith("retired")]
    assert lines == ["retired    drained 726906715723 before this run: 8 events, 3 detach ends, "
                     "2 drop intervals"], lines
    assert not [x for x in render_status(saved(1)).splitlines() if x.startswith("retired")]
