"""Cross-field rules of the collector configuration (collector/config.py), run after every field
parsed: each problem is added to the Issues list with where the offending value came from (file line,
environment variable or argument), so every problem is reported at once. O(fields).
"""
from __future__ import annotations

from hostwall.yamldoc import Issues

from .config_values import SASL_MECHANISMS

__all__ = ["add_issue", "config_warnings", "cross_checks"]


def add_issue(issues: Issues, where: tuple, path: tuple, msg: str) -> None:
    kind, name = where
    if kind == "file":
        issues.add(path, msg)
    elif kind == "env":
        issues.add(path, msg, file=f"environment {name}", use_index=False)
    else:
        issues.add(path, msg, file=f"argument {name}", use_index=False)



def cross_checks(cfg, origins: dict, issues: Issues) -> None:
    def where(key: str) -> tuple:
        o = origins.get(key, "default")
        if o.startswith("environment "):
            return ("env", o.split(" ", 1)[1])
        if o == "argument":
            return ("arg", f"--{key.replace('_', '-')}")
        return ("file", None)

    if cfg.drop_interval_s > 1.0:
        add_issue(issues, where("drop_summary_interval"), ("drop_summary_interval",),
             f"{cfg.drop_interval_s:g}s is longer than 1s; drop summaries are exported at least every second")
    if cfg.active_timeout_s < cfg.ct_scan_interval_s:
        add_issue(issues, where("active_timeout"), ("active_timeout",),
             f"{cfg.active_timeout_s:g}s is shorter than conntrack_scan_interval ({cfg.ct_scan_interval_s:g}s); "
             "raise it or scan more often")
    if not 0 < cfg.close_grace_s <= 60:
        add_issue(issues, where("flow_close_grace"), ("flow_close_grace",),
             f"{cfg.close_grace_s:g}s is outside (0s, 60s]: closed connections must be reported after their "
             "last packets (a few round trips) and long before the datapath's FIN timeout")
    if cfg.jsonl.rotate_bytes < 4096:
        add_issue(issues, where("jsonl.rotate_size"), ("jsonl", "rotate_size"),
             f"{cfg.jsonl.rotate_bytes} bytes is too small to hold records; use at least 4096 (e.g. 100MB)")
    if cfg.queues.batch > cfg.queues.sink:
        add_issue(issues, where("queues.batch"), ("queues", "batch"),
             f"batch ({cfg.queues.batch}) exceeds the sink queue ({cfg.queues.sink}); a batch must fit a queue")
    _kafka_checks(cfg.kafka, where, issues)
    _tls_checks("otlp", cfg.otlp, where, issues)
    _alerting_checks(cfg, where, issues)


def config_warnings(cfg) -> list[str]:
    """Valid settings that do not do what they say (printed by check-config, logged by run). A drop
    interval is cleared only once durable in every at_least_once sink and the next flip waits for that
    (docs/collector.md "Drop summary windows"), so with a JSONL sink synced every fsync_interval the
    windows last about max(drop_summary_interval, jsonl.fsync_interval)."""
    out = []
    j = cfg.jsonl
    if (any(s.scheme == "jsonl" for s in cfg.sinks) and j.fsync == "interval"
            and cfg.drop_interval_s < j.fsync_interval_s):
        out.append(f"drop_summary_interval {cfg.drop_interval_s:g}s is shorter than jsonl.fsync_interval "
                   f"({j.fsync_interval_s:g}s): an interval is cleared only once durable, so drop summary "
                   f"windows last about {j.fsync_interval_s:g}s; lower jsonl.fsync_interval to match")
    return out


def _alerting_checks(cfg, where, issues: Issues) -> None:
    """Direct alert push (docs/alerting.md "Direct push"): a POST ends before the next refresh, an alert
    outlives two missed refreshes, and the paging band is one the detector has."""
    a = cfg.alerting
    if a.timeout_s <= 0 or a.timeout_s >= a.refresh_interval_s:
        add_issue(issues, where("alerting.timeout"), ("alerting", "timeout"),
                  f"{a.timeout_s:g}s must be > 0 and shorter than alerting.refresh_interval ({a.refresh_interval_s:g}s)")
    if a.hold_s < 2 * a.refresh_interval_s:
        add_issue(issues, where("alerting.hold"), ("alerting", "hold"),
                  f"{a.hold_s:g}s is shorter than two refresh intervals ({2 * a.refresh_interval_s:g}s): one lost "
                  "POST would resolve an open incident; raise hold or refresh more often")
    bands = getattr(cfg.anomaly, "severity_bands", None)
    if bands and a.min_severity not in bands:
        add_issue(issues, where("alerting.min_severity"), ("alerting", "min_severity"),
                  f"{a.min_severity!r} is not a band of anomaly.severity_bands ({', '.join(bands)})")


def _tls_checks(sec: str, o, where, issues: Issues) -> None:
    """TLS material only with tls on; a client certificate needs its key and the other way round."""
    files = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(o, k)]
    if files and not o.tls:
        add_issue(issues, where(f"{sec}.{files[0]}"), (sec, files[0]),
             f"{', '.join(files)} set but {sec}.tls is false; set {sec}.tls: true (or remove them)")
    if bool(o.tls_cert_file) != bool(o.tls_key_file):
        have, miss = ("tls_cert_file", "tls_key_file") if o.tls_cert_file else ("tls_key_file", "tls_cert_file")
        add_issue(issues, where(f"{sec}.{have}"), (sec, have),
             f"a client certificate needs both tls_cert_file and tls_key_file; {sec}.{miss} is missing")


def _kafka_checks(k, where, issues: Issues) -> None:
    _tls_checks("kafka", k, where, issues)
    if k.sasl_mechanism:
        if not k.sasl_username:
            add_issue(issues, where("kafka.sasl_mechanism"), ("kafka", "sasl_mechanism"),
                 f"{k.sasl_mechanism} needs kafka.sasl_username")
        if not k.sasl_password and not k.sasl_password_file:
            add_issue(issues, where("kafka.sasl_mechanism"), ("kafka", "sasl_mechanism"),
                 f"{k.sasl_mechanism} needs kafka.sasl_password_file (or kafka.sasl_password, e.g. from "
                 "HOSTWALL_COLLECTOR_KAFKA_SASL_PASSWORD)")
        if k.sasl_mechanism == "PLAIN" and not k.tls:
            add_issue(issues, where("kafka.sasl_mechanism"), ("kafka", "sasl_mechanism"),
                 "PLAIN sends the password in clear text; set kafka.tls: true (or use SCRAM-SHA-512)")
    else:
        for key in ("sasl_username", "sasl_password", "sasl_password_file"):
            if getattr(k, key):
                add_issue(issues, where(f"kafka.{key}"), ("kafka", key),
                     f"kafka.{key} is set but kafka.sasl_mechanism is not; set it to one of "
                     f"{', '.join(SASL_MECHANISMS)}")
                break
    if k.sasl_password and k.sasl_password_file:
        add_issue(issues, where("kafka.sasl_password"), ("kafka", "sasl_password"),
             "set kafka.sasl_password or kafka.sasl_password_file, not both")
    if k.spool_segment_bytes > k.spool_max_bytes:
        add_issue(issues, where("kafka.spool_segment_size"), ("kafka", "spool_segment_size"),
             f"segment size {k.spool_segment_bytes} exceeds spool_size {k.spool_max_bytes}")
    if k.spool_max_bytes < (1 << 20):
        add_issue(issues, where("kafka.spool_size"), ("kafka", "spool_size"),
             f"{k.spool_max_bytes} bytes is too small for a spool; use at least 1MiB (e.g. 1GiB)")
    if k.spool_segment_bytes < (64 << 10):
        add_issue(issues, where("kafka.spool_segment_size"), ("kafka", "spool_segment_size"),
             f"{k.spool_segment_bytes} bytes is too small; use at least 64KiB (e.g. 64MiB)")
    if not (1 << 10) <= k.batch_bytes <= (16 << 20):
        add_issue(issues, where("kafka.batch_size"), ("kafka", "batch_size"),
             f"{k.batch_bytes} bytes is out of range 1KiB..16MiB")
    if k.request_timeout_s <= k.spool_after_s:
        add_issue(issues, where("kafka.spool_after"), ("kafka", "spool_after"),
             f"spool_after ({k.spool_after_s:g}s) must be shorter than request_timeout ({k.request_timeout_s:g}s)")
