"""hostwall/gcpause.py: the pause nests, and tune_for_batches sets what it documents (in a child process:
it is process-wide)."""
from __future__ import annotations

import gc
import subprocess
import sys

from hostwall.gcpause import BATCH_GEN0_THRESHOLD, GcPaused


def test_pauses_nest_and_restore_the_previous_state():
    assert gc.isenabled()
    with GcPaused():
        assert not gc.isenabled()
        with GcPaused():
            assert not gc.isenabled()
        assert not gc.isenabled()                  # only the outermost pause enables it again
    assert gc.isenabled()


def test_tune_for_batches_freezes_start_up_and_raises_generation_0_only():
    code = ("import gc, json; from hostwall.gcpause import tune_for_batches; before = gc.get_threshold(); "
            "tune_for_batches(); print(json.dumps([before, gc.get_threshold(), gc.get_freeze_count()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    before, after, frozen = __import__("json").loads(out.stdout)
    assert after == [BATCH_GEN0_THRESHOLD, before[1], before[2]] and BATCH_GEN0_THRESHOLD > 8192 * 12
    assert frozen > 1000                           # the imports' objects
