"""loss_report.note_record_seqs against note_seqs (docs/collector.md "Delivery and loss"): the C-level
fast path for a numbered one-stream batch names exactly the seqs note_seqs names, for every input shape."""
from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hostwall.collector.loss_report import note_record_seqs, note_seqs

_hostwall = st.one_of(
    st.none(),
    st.fixed_dictionaries({"seq": st.integers(0, 60), "stream": st.sampled_from(["flow", "ct"])}),
    st.fixed_dictionaries({"seq": st.integers(0, 60), "stream": st.just("flow"), "kind": st.just("loss")}),
    st.fixed_dictionaries({"seq": st.integers(0, 60)}),
    st.fixed_dictionaries({"stream": st.just("flow")}),
)
_record = st.one_of(st.builds(lambda h: {"hostwall": h}, _hostwall), st.just({"event": {}}))


def _plain(acc):
    return {k: (v.ranges, v.count) for k, v in acc.items()}


@settings(max_examples=400, deadline=None)
@given(st.lists(_record, max_size=40))
def test_record_seqs_name_what_note_seqs_names(records):
    fast, slow = {}, {}
    note_record_seqs(fast, "fsync_error", records)
    note_seqs(slow, "fsync_error", ((r.get("hostwall") or {}) for r in records))
    assert _plain(fast) == _plain(slow)


def test_a_numbered_batch_is_one_range():
    acc = {}
    note_record_seqs(acc, "fsync_error", [{"hostwall": {"seq": s, "stream": "flow"}} for s in range(10, 1034)])
    assert _plain(acc) == {("flow", "fsync_error"): ([[10, 1033]], 1024)}
