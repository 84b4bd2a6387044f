"""collector.config: argument > environment > file > default, every error with where it came from."""
from __future__ import annotations

import json
import sys
import textwrap
import types

import pytest

from hostwall.collector.config import DEFAULT_SINK, ConfigError, load_config, parse_sink, parse_size
from hostwall.collector.sinks import build_sink


def write(tmp_path, text: str):
    p = tmp_path / "hostwall.collector.yaml"
    p.write_text(textwrap.dedent(text).lstrip("\n"))
    return p


def errors(excinfo) -> list[str]:
    return [str(i) for i in excinfo.value.issues]


def test_defaults_without_file_or_environment():
    cfg = load_config(None, env={})
    assert cfg.pin_dir == "/sys/fs/bpf/hostwall/default"
    assert [s.url for s in cfg.sinks] == [DEFAULT_SINK]
    assert cfg.drop_interval_s == 1.0 and cfg.event_budget == 20000 and cfg.jsonl.fsync == "interval"
    assert cfg.origins["sinks"] == "default"


def test_file_values_are_typed(tmp_path):
    p = write(tmp_path, """
        pin_dir: /sys/fs/bpf/hostwall/edge
        hostname: web-1
        encoding: ocsf
        sinks:
          - jsonl:/var/log/hw/flows.jsonl
          - {url: "kafka://10.0.0.5:9092", encoding: ecs}
          - otlp://[::1]:4317
        drop_summary_interval: 500ms
        conntrack_scan_interval: 2s
        active_timeout: 1m
        event_budget: 5000
        queues: {events: 8, sink: 5000, batch: 1024}
        jsonl: {rotate_size: 10MB, rotate_keep: 3, fsync: always, fsync_interval: 2s}
        """)
    cfg = load_config(p, env={})
    assert cfg.drop_interval_s == 0.5 and cfg.active_timeout_s == 60.0 and cfg.event_budget == 5000
    assert cfg.jsonl.rotate_bytes == 10_000_000 and cfg.jsonl.fsync == "always" and cfg.queues.batch == 1024
    assert [(s.scheme, s.target, s.encoding) for s in cfg.sinks] == [
        ("jsonl", "/var/log/hw/flows.jsonl", "ocsf"), ("kafka", "10.0.0.5:9092", "ecs"), ("otlp", "::1:4317", "ocsf")]
    assert cfg.sinks[2].host == "::1" and cfg.sinks[2].port == 4317
    assert cfg.origins["event_budget"] == "file"


def test_precedence_argument_environment_file_default(tmp_path):
    p = write(tmp_path, "encoding: ocsf\nevent_budget: 100\npin_dir: /from/file\njsonl: {fsync: none}\n")
    env = {"HOSTWALL_COLLECTOR_EVENT_BUDGET": "200", "HOSTWALL_COLLECTOR_ENCODING": "ecs",
           "HOSTWALL_COLLECTOR_JSONL_FSYNC": "always"}
    cfg = load_config(p, env=env, args={"encoding": "ocsf", "pin_dir": None})
    assert cfg.encoding == "ocsf" and cfg.origins["encoding"] == "argument"            # argument > env
    assert cfg.event_budget == 200 and cfg.origins["event_budget"].startswith("environment")   # env > file
    assert cfg.jsonl.fsync == "always"
    assert cfg.pin_dir == "/from/file"                                                 # None = not given
    assert cfg.active_timeout_s == 60.0                                                # default


def test_pin_dir_from_the_enforcer_environment_is_the_lowest_environment(tmp_path):
    assert load_config(None, env={"HOSTWALL_PIN_DIR": "/a"}).pin_dir == "/a"
    assert load_config(None, env={"HOSTWALL_PIN_DIR": "/a", "HOSTWALL_COLLECTOR_PIN_DIR": "/b"}).pin_dir == "/b"
    assert load_config(write(tmp_path, "pin_dir: /c\n"), env={"HOSTWALL_PIN_DIR": "/a"}).pin_dir == "/c"
    assert load_config(None, env={"HOSTWALL_PIN_DIR": "/a"}, args={"pin_dir": "/d"}).pin_dir == "/d"


def test_sinks_from_arguments_replace_the_file_list(tmp_path):
    p = write(tmp_path, "sinks: [jsonl:/x.jsonl, console]\n")
    cfg = load_config(p, env={"HOSTWALL_COLLECTOR_SINKS": "jsonl:/env.jsonl, console"})
    assert [s.url for s in cfg.sinks] == ["jsonl:/env.jsonl", "console"]
    cfg = load_config(p, env={}, args={"sinks": ["jsonl:/arg.jsonl"], "encoding": "ocsf"})
    assert [(s.url, s.encoding) for s in cfg.sinks] == [("jsonl:/arg.jsonl", "ocsf")]


def test_every_file_error_is_listed_with_its_line(tmp_path):
    p = write(tmp_path, """
        pin_dir: /sys/fs/bpf/x
        sinks:
          - jsonl:/tmp/x.jsonl
          - kafka://localhost:99999
          - foo:bar
          - kafka://nohostport
        drop_summary_interval: 2s
        jsonl:
          fsync: sometimes
          rotate_sise: 1MB
        queues: {events: 0}
        evnt_budget: 5
        """)
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    got = errors(ei)
    f = str(p)
    want = [f"{f}:4: sinks[1]: port 99999 is out of range 1..65535",
            f"{f}:5: sinks[2]: unknown sink 'foo:bar'",
            f"{f}:6: sinks[3]: kafka:// needs HOST:PORT",
            f"{f}:7: drop_summary_interval: 2s is longer than 1s",
            f"{f}:9: jsonl.fsync: 'sometimes' is not one of none, interval, always",
            f"{f}:10: jsonl.rotate_sise: unknown key; did you mean 'rotate_size'?",
            f"{f}:11: queues.events: 0 is out of range",
            f"{f}:12: evnt_budget: unknown key; did you mean 'event_budget'?"]
    assert len(got) == len(want), got
    for g, w in zip(got, want):
        assert g.startswith(w), (g, w)


def test_environment_and_argument_errors_name_their_origin():
    with pytest.raises(ConfigError) as ei:
        load_config(None, env={"HOSTWALL_COLLECTOR_JSONL_ROTATE_KEEP": "x", "HOSTWALL_COLLECTOR_SINKS": "nope"},
                    args={"sinks": None, "event_budget": -1})
    got = errors(ei)
    assert "environment HOSTWALL_COLLECTOR_JSONL_ROTATE_KEEP: jsonl.rotate_keep: 'x' is not an integer" in got
    assert any(g.startswith("environment HOSTWALL_COLLECTOR_SINKS: sinks[0]: unknown sink 'nope'") for g in got)
    assert any(g.startswith("argument --event-budget: event_budget: -1 is out of range") for g in got)


def test_yaml_syntax_error_has_a_line(tmp_path):
    p = write(tmp_path, "sinks:\n  - jsonl:/x\n bad: [\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    assert errors(ei)[0].startswith(f"{p}:") and "YAML syntax error" in errors(ei)[0]


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file"):
        load_config(tmp_path / "absent.yaml", env={})
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- a\n- b\n"), env={})
    assert load_config(write(tmp_path, "\n# only a comment\n---\n"), env={}) == load_config(None, env={})


def test_cross_field_rules(tmp_path):
    p = write(tmp_path, "conntrack_scan_interval: 30s\nactive_timeout: 10s\nqueues: {sink: 100, batch: 500}\n"
                        "jsonl: {rotate_size: 100}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p, env={})
    text = "\n".join(errors(ei))
    assert "active_timeout: 10s is shorter than conntrack_scan_interval (30s)" in text
    assert "queues.batch: batch (500) exceeds the sink queue (100)" in text
    assert "jsonl.rotate_size: 100 bytes is too small" in text


@pytest.mark.parametrize("url,err", [
    ("jsonl:", "needs a file path"), ("kafka://h", "needs HOST:PORT"), ("kafka:h:1", "needs kafka://HOST:PORT"),
    ("otlp://[zz]:1", "needs HOST:PORT"), ("otlp://[fe80::1:1", "needs HOST:PORT"), ("console:x", "takes no target"),
    ("http://x:1", "unknown sink"), ({"url": "console", "color": 1}, "unknown sink keys"),
    ({"url": "console", "encoding": "xml"}, "not one of ecs, ocsf")])
def test_bad_sink_urls(url, err):
    with pytest.raises(ValueError, match=err):
        parse_sink(url, "ecs")


def test_duplicate_sinks(tmp_path):
    with pytest.raises(ConfigError, match=r"sinks\[1\]: duplicate sink jsonl:/a"):
        load_config(write(tmp_path, "sinks: [jsonl:/a, 'jsonl:///a']\n"), env={})


def test_relative_jsonl_paths_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert parse_sink("jsonl:out/f.jsonl", "ecs").target == str(tmp_path / "out" / "f.jsonl")


@pytest.mark.parametrize("v,n", [(4096, 4096), ("1MiB", 1 << 20), ("100MB", 10**8), ("1.5k", 1536), ("2G", 2 << 30)])
def test_sizes(v, n):
    assert parse_size(v) == n


@pytest.mark.parametrize("v", ["-1", "12 parsecs", True, 0, "MB"])
def test_bad_sizes(v):
    with pytest.raises(ValueError):
        parse_size(v)


def test_status_path_follows_the_state_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    cfg = load_config(None, env={}, args={"pin_dir": "/sys/fs/bpf/hostwall/edge"})
    assert cfg.status_path() == tmp_path / "collector-sys_fs_bpf_hostwall_edge.json"
    assert load_config(None, env={}, args={"status_file": "/x/s.json"}).status_path().as_posix() == "/x/s.json"


def test_anomaly_section_goes_to_the_anomaly_module(tmp_path, monkeypatch):
    seen = {}

    class AnomalyConfig:
        @classmethod
        def from_dict(cls, d):
            seen.update(d)
            if d.get("threshold", 0) < 0:
                raise ValueError("threshold: must be >= 0\nwindow: must be a duration")
            return ("cfg", d)

    fake = types.ModuleType("hostwall.collector.anomaly")
    fake.AnomalyConfig = AnomalyConfig
    monkeypatch.setitem(sys.modules, "hostwall.collector.anomaly", fake)
    cfg = load_config(write(tmp_path, "anomaly: {threshold: 3, window: 10s}\n"), env={})
    assert cfg.anomaly == ("cfg", {"threshold": 3, "window": "10s"})
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "anomaly:\n  threshold: -1\n"), env={})
    assert [e.split(": ", 2)[1:] for e in errors(ei)] == [["anomaly", "threshold: must be >= 0"],
                                                         ["anomaly", "window: must be a duration"]]


def test_cli_bad_config_exits_2_listing_every_error(tmp_path, capsys):
    from hostwall.collector.cli import main
    p = write(tmp_path, "event_budget: lots\njsonl: {fsync: maybe}\n")
    assert main(["check-config", "--config", str(p), "--sink", "ftp://x"]) == 2
    err = capsys.readouterr().err
    assert "invalid configuration (3 errors)" in err
    assert f"{p}:1: event_budget" in err and f"{p}:2: jsonl.fsync" in err and "argument --sink: sinks[0]" in err


def test_cli_check_config_prints_the_resolved_config(tmp_path, capsys, monkeypatch):
    from hostwall.collector.cli import main
    monkeypatch.setenv("HOSTWALL_COLLECTOR_EVENT_BUDGET", "77")
    assert main(["check-config", "--sink", "console", "--encoding", "ocsf"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["event_budget"] == 77 and out["sinks"] == [{"url": "console", "encoding": "ocsf"}]
    assert "origins" not in out                     # not a key of the file format (docs/collector.md)
    assert main(["check-config", "--sink", "console", "--origins"]) == 0
    assert json.loads(capsys.readouterr().out)["event_budget"] == "environment HOSTWALL_COLLECTOR_EVENT_BUDGET"


EVERY_SECTION = """
pin_dir: {tmp}/pins
hostname: web-1
encoding: ocsf
sinks:
  - jsonl:{tmp}/flows.jsonl
  - {{url: "kafka://127.0.0.1:9092", encoding: ecs}}
  - otlp://127.0.0.1:4317
  - console
drop_summary_interval: 250ms
conntrack_scan_interval: 1.2345678s
active_timeout: 300h
flow_close_grace: 2s
event_budget: 30000
event_source_share: 1234
drop_prefix_v4: 22
drop_prefix_v6: 56
queues: {{events: 8, sink: 30000, batch: 4096}}
jsonl: {{rotate_size: 64MiB, rotate_keep: 3, fsync: interval, fsync_interval: 250ms}}
kafka:
  flows_topic: f.flows
  anomalies_topic: f.anomalies
  audit_topic: f.audit
  compression: lz4
  batch_size: 256KiB
  linger: 0.00005s
  request_timeout: 30s
  spool_after: 2s
  connect_timeout: 10s
  client_id: hw-1
  tls: true
  tls_ca_file: {tmp}/ca.pem
  sasl_mechanism: SCRAM-SHA-512
  sasl_username: hw
  sasl_password: s3cret
  spool_dir: {tmp}/spool
  spool_size: 2GiB
  spool_segment_size: 64MiB
  spool_fsync: always
  spool_fsync_interval: 1s
  spool_overflow: block
otlp: {{protocol: http, timeout: 10s, batch: 256, compression: gzip, headers: {{x-tenant: blue}},
        delivery: at_least_once}}
metrics: {{prometheus: "127.0.0.1:9464", otlp: "otlp://127.0.0.1:4317", interval: 15s}}
alerting: {{alertmanager: "http://127.0.0.1:9093", timeout: 2s, refresh_interval: 15s, hold: 5m,
           min_severity: high, runbook_url: "http://x:1/r.md", labels: {{instance: "web-1:9464"}},
           max_alerts: 100}}
status_file: {tmp}/status.json
status_interval: 2s
anomaly: {{window_s: 20.0, bucket_s: 2.0, min_rate: 12.5, signals: [drops, syns], severity_bands: {{high: 6.0}}}}
"""


def test_cli_check_config_output_as_printed_is_the_same_config(tmp_path, capsys):
    """check-config speaks the file's language (drop_summary_interval, not drop_interval_s) and its
    output, fed back AS PRINTED, resolves to the same configuration: every section, the anomaly one
    too, durations exact (300h, 0.00005s, 8 significant digits), no nulls, secrets redacted."""
    from hostwall.collector.cli import main
    from hostwall.collector.config import FIELDS, describe
    (tmp_path / "ca.pem").write_text("x")
    p = tmp_path / "every.yaml"
    p.write_text(EVERY_SECTION.format(tmp=tmp_path))
    first = load_config(p, env={})
    assert main(["check-config", "--config", str(p)]) == 0
    printed = capsys.readouterr().out
    out = json.loads(printed)
    assert out["drop_summary_interval"] == "0.25s" and "drop_interval_s" not in out
    assert out["active_timeout"] == "1080000s" and out["kafka"]["linger"] == "0.00005s"
    assert out["conntrack_scan_interval"] == "1.2345678s"
    assert out["jsonl"]["rotate_size"] == 64 << 20 and "rotate_bytes" not in out["jsonl"]
    assert out["kafka"]["sasl_password"] == "<redacted>" and out["otlp"]["headers"] == {"x-tenant": "<redacted>"}
    assert "s3cret" not in printed and "blue" not in printed
    assert out["anomaly"]["min_rate"] == 12.5 and out["anomaly"]["signals"] == ["drops", "syns"]
    keys = {f.path for f in FIELDS}
    flat = {(k,) if not isinstance(v, dict) or k == "anomaly" else (k, k2)
            for k, v in out.items() if k != "sinks" for k2 in (v if isinstance(v, dict) else [k])}
    unset = {("kafka", "sasl_password_file"), *((sec, f"tls_{k}_file") for sec in ("kafka", "otlp")
                                                 for k in ("ca", "cert", "key") if (sec, k) != ("kafka", "ca"))}
    assert flat == (keys - unset) | {("anomaly",)}, flat ^ keys
    again = tmp_path / "again.yaml"
    again.write_text(printed)
    second = load_config(again, env={})
    a, b = describe(first), describe(second)
    a.pop("origins"), b.pop("origins")
    a["otlp"]["headers"] = tuple((k, "<redacted>") for k, _ in a["otlp"]["headers"])
    assert a == b
    assert first.anomaly == second.anomaly
    # the defaults' nulls (hostname, client_id, ...) are left out, not printed as null
    assert main(["check-config", "--sink", "console"]) == 0
    printed = capsys.readouterr().out
    assert "null" not in printed and "hostname" not in json.loads(printed)
    again.write_text(printed)
    assert describe(load_config(again, env={}))["hostname"] is None


def test_cli_run_fails_in_one_line_without_a_pinned_instance(tmp_path, capsys):
    from hostwall.collector.cli import main
    assert main(["run", "--pin-dir", str(tmp_path), "--sink", f"jsonl:{tmp_path}/f.jsonl"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no hostwall instance is pinned there" in err[0]


def test_cli_status_reads_the_status_file(tmp_path, capsys, monkeypatch):
    from hostwall.collector.accounting import Ledger
    from hostwall.collector.cli import main
    from hostwall.collector.pipeline import write_status
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    assert main(["status", "--pin-dir", "/sys/fs/bpf/hostwall/x"]) == 1
    assert "no collector status at" in capsys.readouterr().err
    led = Ledger(["jsonl:/f"])
    led.produce("events", 10)
    led.lose("kernel", "budget", 2, produced="kernel")
    led.fan_out(10)
    led.deliver("jsonl:/f", 9)
    write_status(tmp_path / "collector-sys_fs_bpf_hostwall_x.json",
                 {"pid": 999999999, "state": "running", "updated_at": 0, "ledger": led.snapshot(),
                  "queues": {"events": {"depth": 0, "capacity_batches": 64},
                             "sinks": {"jsonl:/f": {"depth": 1, "capacity": 10, "policy": "block"}}}})
    assert main(["status", "--pin-dir", "/sys/fs/bpf/hostwall/x"]) == 0
    out = capsys.readouterr().out
    assert "collector  dead" in out                       # pid gone: the file is stale
    assert "jsonl:/f: produced 12 = delivered 9 + lost 2 + in flight 1 ok" in out
    assert "kernel.budget 2" in out
    assert main(["status", "--json", "--pin-dir", "/sys/fs/bpf/hostwall/x"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["alive"] is False and st["ledger"]["sinks"]["jsonl:/f"]["in_flight"] == 1


def test_kafka_and_otlp_sinks_are_built_from_the_config():
    cfg = load_config(None, env={}, args={"sinks": ["kafka://127.0.0.1:9092", "otlp://127.0.0.1:4317"]})
    kafka, otlp = (build_sink(spec, cfg) for spec in cfg.sinks)
    assert type(kafka).__name__ == "KafkaSink" and kafka.name == "kafka://127.0.0.1:9092"
    assert kafka.full_queue_policy.value == "block" and kafka.topics == ("hostwall.flows", "hostwall.anomalies",
                                                                          "hostwall.audit")
    assert type(otlp).__name__ == "OtlpSink" and otlp.full_queue_policy.value == "drop_oldest"


def test_cli_run_fails_in_one_line_when_a_sink_package_is_missing(tmp_path, capsys, monkeypatch):
    from hostwall.collector.cli import main
    monkeypatch.delitem(sys.modules, "hostwall.collector.sinks.kafka", raising=False)
    monkeypatch.setitem(sys.modules, "aiokafka", None)          # import aiokafka -> ModuleNotFoundError
    assert main(["run", "--pin-dir", str(tmp_path), "--sink", "kafka://127.0.0.1:9092"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the Python package 'aiokafka'" in err[0], err


def test_check_config_warns_when_drop_windows_outlast_the_interval(tmp_path, capsys):
    """An interval is cleared only once durable and the next flip waits for it (docs/collector.md
    "Drop summary windows"): with a JSONL sink synced every second, 250 ms windows are ~1 s long."""
    from hostwall.collector.cli import main
    sink = f"jsonl:{tmp_path}/f.jsonl"
    p = write(tmp_path, "drop_summary_interval: 250ms\n")
    assert main(["check-config", "--config", str(p), "--sink", sink]) == 0
    err = capsys.readouterr().err
    assert "warning: drop_summary_interval 0.25s is shorter than jsonl.fsync_interval (1s)" in err
    assert "windows last about drop_summary_interval + the sync time (up to 1.25s)" in err, err
    for ok in ("drop_summary_interval: 250ms\njsonl: {fsync_interval: 250ms}\n",
               "drop_summary_interval: 250ms\njsonl: {fsync: always}\n", "drop_summary_interval: 1s\n"):
        assert main(["check-config", "--config", str(write(tmp_path, ok)), "--sink", sink]) == 0
        assert "warning" not in capsys.readouterr().err, ok
    assert main(["check-config", "--config", str(p), "--sink", "console"]) == 0     # no sink waits for a sync
    assert "warning" not in capsys.readouterr().err


def test_the_status_files_config_redacts_secrets_too(tmp_path):
    """describe() (the status file's `config`) shows no secret: the Kafka SASL password and the values of
    OTLP headers (e.g. `authorization: Bearer …`) are redacted, as check-config redacts them."""
    from hostwall.collector.config import describe
    (tmp_path / "ca.pem").write_text("x")
    p = tmp_path / "every.yaml"
    p.write_text(EVERY_SECTION.format(tmp=tmp_path))
    shown = json.dumps(describe(load_config(p, env={})), default=str)
    assert "s3cret" not in shown and "blue" not in shown
    assert "<redacted>" in shown
