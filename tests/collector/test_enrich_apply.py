"""Enricher._apply with its merge plan (collector/enrich/__init__.py) against the key-by-key merge it
replaced: for random records and attribution fragments — tops present or absent, nested dicts merged
into a dict, replacing a scalar, or new — applied once or twice (a second workload's fragment over
the first one's shared objects), the merged record's JSON bytes (key order included) are identical,
and no fragment is ever changed."""
from __future__ import annotations

import copy

import orjson
from hypothesis import given
from hypothesis import strategies as st

from hostwall.collector.enrich import _apply, _Attribution

KEYS = st.sampled_from(["a", "b", "c", "id", "name", "image", "resource"])
TOPS = st.sampled_from(["hostwall", "container", "orchestrator", "process", "source"])
_scalar = st.one_of(st.integers(0, 9), st.sampled_from(["x", "y"]))
_leaf = st.dictionaries(KEYS, _scalar, max_size=3)
_obj = st.dictionaries(KEYS, st.one_of(_scalar, _leaf), max_size=4)
_frag = st.dictionaries(TOPS, _obj, max_size=4)


def old_apply(record: dict, attr: dict) -> None:
    for top, frag in attr.items():
        dst = record.setdefault(top, {})
        for k, v in frag.items():
            if isinstance(v, dict):
                dst[k] = {**dst.get(k, {}), **v} if isinstance(dst.get(k), dict) else dict(v)
            else:
                dst[k] = v


@given(record=st.dictionaries(TOPS, _obj, max_size=4), frags=st.lists(_frag, min_size=1, max_size=2),
       planned=st.booleans())
def test_apply_merges_like_the_key_by_key_merge_and_never_changes_a_fragment(record, frags, planned):
    want, got = copy.deepcopy(record), copy.deepcopy(record)
    attrs = [_Attribution(copy.deepcopy(f)) if planned else copy.deepcopy(f) for f in frags]
    before = [orjson.dumps(a) for a in attrs]
    for f, a in zip(frags, attrs):
        old_apply(want, copy.deepcopy(f))
        _apply(got, a)
        assert orjson.dumps(got) == orjson.dumps(want)
    assert [orjson.dumps(a) for a in attrs] == before
