"""lab/collector_proc.py keeps the collector's stdout in its log; lab/crash.py's collector settings
raise no check-config warning (docs/collector.md "Drop summary windows")."""
from __future__ import annotations

import sys
from types import SimpleNamespace

from hostwall.collector.config import load_config
from hostwall.collector.config_checks import config_warnings
from hostwall.lab.collector_proc import CollectorProcess

# a stand-in collector: the banner, a line that is not UTF-8, then more lines, then exit
FAKE = ("import sys; w = sys.stdout.buffer.write; w(b'collecting from fake\\n'); w(b'bad \\xff\\xfe byte\\n'); "
        "w(b'after the bad line\\n'); sys.stdout.flush()")


def test_the_tee_keeps_draining_past_undecodable_output_and_closes_the_pipe(tmp_path, monkeypatch):
    enf = SimpleNamespace(pin_dir=str(tmp_path / "pins"), env={})
    col = CollectorProcess(enf, tmp_path)
    monkeypatch.setattr(col, "argv", lambda: [sys.executable, "-c", FAKE])
    col.start(timeout=30)
    col.proc.wait(timeout=30)
    col.close()                     # joins the tee: the pipe closes when the process exits
    out = "".join(col._out)
    assert "after the bad line" in out and "bad \ufffd\ufffd byte" in out, out
    assert col.proc.stdout.closed
    assert "after the bad line" in col.log_path.read_text()


def test_the_crash_sessions_collector_config_raises_no_warning(tmp_path):
    import yaml

    from hostwall.lab.collector_proc import LAB_CONFIG, _merge
    from hostwall.lab.crash import CONFIG
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(_merge(LAB_CONFIG, CONFIG)))
    cfg = load_config(p, env={}, args={"sinks": [f"jsonl:{tmp_path}/f.jsonl"]})
    assert config_warnings(cfg) == []
