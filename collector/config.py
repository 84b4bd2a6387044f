"""Typed collector configuration: YAML file + environment + command-line arguments.

Each field is resolved on its own with the precedence argument > environment > file > default
(docs/architecture.md "Style"). Validation collects EVERY problem before reporting, each with where it came from:
`FILE:LINE: path: message` for the file, `environment HOSTWALL_COLLECTOR_X: path: message`,
`argument --sink: sinks[1]: message`. Cross-field rules run after the fields parse.

File format (every key optional):

    pin_dir: /sys/fs/bpf/hostwall/default
    hostname: web-1                     # observer.hostname override (default: the kernel's)
    encoding: ecs                       # default encoding of sinks that name none: ecs | ocsf
    sinks:                              # jsonl:PATH | kafka://HOST:PORT | otlp://HOST:PORT | console
      - jsonl:/var/log/hostwall/flows.jsonl
      - {url: "kafka://127.0.0.1:9092", encoding: ocsf}
    drop_summary_interval: 1s           # <= 1s
    conntrack_scan_interval: 5s
    active_timeout: 60s                 # long-lived flows get an update this often
    flow_close_grace: 2s                # a connection closed by FINs is reported once quiet this long
    event_budget: 20000                 # events/s into the ring buffer (written to hw_collect)
    event_source_share: 2000            # flow events/s one source may emit individually (default budget/10)
    drop_prefix_v4: 24                  # drop summaries aggregate sources by this prefix
    drop_prefix_v6: 64
    queues: {events: 16, sink: 20000, batch: 8192}
    jsonl: {rotate_size: 256MB, rotate_keep: 5, fsync: interval, fsync_interval: 1s}
    kafka:                              # kafka:// sinks (collector/sinks/kafka.py)
      flows_topic: hostwall.flows       # flows, log/deny samples, drop summaries (key: community id / prefix)
      anomalies_topic: hostwall.anomalies   # key: source prefix (or dimension=value)
      audit_topic: hostwall.audit       # key: pin dir
      compression: zstd                 # zstd | lz4 | gzip | snappy | none
      batch_size: 512KiB                # per partition batch, before compression (<= the broker's message.max.bytes)
      linger: 5ms
      request_timeout: 30s
      spool_after: 2s                   # no broker progress this long: spool to disk
      connect_timeout: 10s              # start-up probe: a broker that cannot be used fails the start within it
      client_id: hostwall-web-1
      tls: false                        # tls_ca_file, tls_cert_file, tls_key_file (PEM)
      sasl_mechanism: SCRAM-SHA-512     # PLAIN (needs tls) | SCRAM-SHA-256 | SCRAM-SHA-512
      sasl_username: hostwall
      sasl_password_file: /etc/hostwall/kafka.pass    # or sasl_password (environment!)
      spool_dir: /var/lib/hostwall/spool               # one sub-folder per kafka sink
      spool_size: 1GiB
      spool_segment_size: 64MiB
      spool_fsync: interval             # none | interval | always
      spool_fsync_interval: 1s
      spool_overflow: drop_newest       # drop_newest (counted) | block (back-pressure)
    otlp:                               # otlp:// sinks (collector/sinks/otlp.py)
      protocol: grpc                    # grpc (port 4317) | http (4318, protobuf)
      timeout: 10s                      # per export, the SDK's retries included
      batch: 512                        # log records per export request
      compression: none                 # none | gzip
      tls: false                        # tls_ca_file, tls_cert_file, tls_key_file
      headers: {x-tenant: blue}         # or "k=v,k2=v2"
      delivery: best_effort             # best_effort | at_least_once (the pipeline waits for acceptance)
    metrics:                            # self-metrics (collector/metrics.py); both off by default
      prometheus: 127.0.0.1:9464        # scrape endpoint (/metrics)
      otlp: otlp://127.0.0.1:4317       # OTLP metrics (protocol, tls and headers from `otlp`)
      interval: 15s                     # OTLP export period and kernel-map read period
    alerting:                           # direct alert push (collector/alert_push.py, docs/alerting.md); off by default
      alertmanager: http://127.0.0.1:9093   # Alertmanager base URL: POST /api/v2/alerts
      timeout: 2s                       # per POST
      refresh_interval: 15s             # open incidents are posted again this often ...
      hold: 5m                          # ... with endsAt = now + hold (covers a collector restart)
      min_severity: high                # the anomaly band from which an incident pages (anomaly.severity_bands)
      runbook_url: http://127.0.0.1:9090/user/HostwallAnomalyHighSeverity.md
      labels: {instance: "web-1:9464"}  # added to every alert (default instance: metrics.prometheus)
      max_alerts: 1000                  # incidents held for posting; more are counted and refused
    status_file: /run/hostwall/collector-....json
    anomaly: {...}                      # owned by collector.anomaly (AnomalyConfig.from_dict)

Environment: HOSTWALL_COLLECTOR_<KEY>, KEY = the dotted path upper-cased with '_' (e.g.
HOSTWALL_COLLECTOR_JSONL_FSYNC, HOSTWALL_COLLECTOR_QUEUES_SINK); HOSTWALL_COLLECTOR_SINKS is a
comma-separated URL list; HOSTWALL_PIN_DIR (the enforcer's) is honoured below
HOSTWALL_COLLECTOR_PIN_DIR. Secrets (sasl_password, OTLP header values) are never echoed: describe() redacts them.
"""
from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hostwall.bpf.state import DEFAULT_PIN_DIR, collector_checkpoint_path, collector_status_path
from hostwall.units import parse_duration
from hostwall.yamldoc import Issues, PolicyIssue, load_yaml

from .config_checks import add_issue, cross_checks
from .config_values import (
    parse_bool,
    parse_choice,
    parse_endpoint,
    parse_file,
    parse_headers,
    parse_hostport,
    parse_http_url,
    parse_int,
    parse_labels,
    parse_listen,
    parse_sasl,
    parse_size,
    parse_str,
    parse_topic,
)

ENV_PREFIX = "HOSTWALL_COLLECTOR_"
ENCODINGS = ("ecs", "ocsf")
FSYNC_POLICIES = ("none", "interval", "always")
SCHEMES = ("jsonl", "kafka", "otlp", "console")
DEFAULT_SINK = "jsonl:/var/log/hostwall/flows.jsonl"
MAX_BATCH = 65536
COMPRESSIONS = ("zstd", "lz4", "gzip", "snappy", "none")
SPOOL_OVERFLOW = ("drop_newest", "block")
OTLP_PROTOCOLS = ("grpc", "http")
OTLP_COMPRESSIONS = ("none", "gzip")
SECRET_KEYS = frozenset({"sasl_password"})
DELIVERY = ("best_effort", "at_least_once")


class ConfigError(Exception):
    """Every problem found, one per line (str), as PolicyIssue objects in .issues."""

    def __init__(self, issues: list[PolicyIssue]):
        self.issues = issues
        super().__init__("\n".join(map(str, issues)))


# ---- typed config -------------------------------------------------------------------------------

@dataclass(frozen=True)
class SinkSpec:
    url: str
    scheme: str                 # jsonl | kafka | otlp | console
    target: str                 # jsonl: absolute path; kafka/otlp: host:port; console: ""
    encoding: str               # ecs | ocsf
    host: str | None = None
    port: int | None = None

    @property
    def name(self) -> str:
        """Stable label for stats and the ledger."""
        return self.url


@dataclass(frozen=True)
class QueueSizes:
    events: int = 16            # decoded event batches between the ring reader and record building
    sink: int = 20_000          # records queued per sink (~2-3 KB of Python dicts each: ~50 MB)
    batch: int = 8192           # max events per ring-buffer read


@dataclass(frozen=True)
class JsonlOptions:
    rotate_bytes: int = 256 << 20
    rotate_keep: int = 5
    fsync: str = "interval"     # none | interval | always
    fsync_interval_s: float = 1.0


@dataclass(frozen=True)
class KafkaOptions:
    """Options of every kafka:// sink (collector/sinks/kafka.py)."""
    flows_topic: str = "hostwall.flows"
    anomalies_topic: str = "hostwall.anomalies"
    audit_topic: str = "hostwall.audit"
    compression: str = "zstd"           # zstd | lz4 | gzip | snappy | none
    batch_bytes: int = 512 << 10        # aiokafka max_batch_size (per partition, before compression)
    linger_s: float = 0.005
    request_timeout_s: float = 30.0
    spool_after_s: float = 2.0          # no acknowledgement for this long: degrade to the spool
    connect_timeout_s: float = 10.0     # start-up probe and (re)connect bound (kafka_probe.py)
    client_id: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    sasl_mechanism: str | None = None   # PLAIN | SCRAM-SHA-256 | SCRAM-SHA-512
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    sasl_password_file: str | None = None
    spool_dir: str = "/var/lib/hostwall/spool"
    spool_max_bytes: int = 1 << 30
    spool_segment_bytes: int = 64 << 20
    spool_fsync: str = "interval"       # none | interval | always
    spool_fsync_interval_s: float = 1.0
    spool_overflow: str = "drop_newest"   # drop_newest | block

    @property
    def security_protocol(self) -> str:
        return ("SASL_SSL" if self.tls else "SASL_PLAINTEXT") if self.sasl_mechanism else \
            ("SSL" if self.tls else "PLAINTEXT")


@dataclass(frozen=True)
class OtlpOptions:
    """Options of every otlp:// sink and of OTLP self-metrics (collector/sinks/otlp.py, metrics.py)."""
    protocol: str = "grpc"              # grpc | http (protobuf)
    timeout_s: float = 10.0             # per export call, the SDK exporter's own retries included
    batch: int = 512                    # log records per export request
    compression: str = "none"           # none | gzip
    tls: bool = False
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    delivery: str = "best_effort"       # best_effort | at_least_once (docs/collector.md "Delivery and loss")


@dataclass(frozen=True)
class MetricsOptions:
    """Self-metrics outputs (collector/metrics.py): both off unless set."""
    prometheus: str | None = None       # "HOST:PORT" of the scrape endpoint
    otlp: str | None = None             # "HOST:PORT" of an OTLP receiver (otlp://HOST:PORT in the file)
    interval_s: float = 15.0


@dataclass(frozen=True)
class AlertingOptions:
    """Direct alert push to Alertmanager (collector/alert_push.py): off unless `alertmanager` is set."""
    alertmanager: str | None = None     # base URL, e.g. http://127.0.0.1:9093
    timeout_s: float = 2.0              # per POST /api/v2/alerts
    refresh_interval_s: float = 15.0    # open incidents are re-posted this often
    hold_s: float = 300.0               # endsAt = now + hold: how long Alertmanager keeps one without news
    min_severity: str = "high"          # anomaly band (anomaly.severity_bands) from which an incident pages
    runbook_url: str = "http://127.0.0.1:9090/user/HostwallAnomalyHighSeverity.md"
    labels: tuple[tuple[str, str], ...] = ()    # static labels of every alert (instance: see alert_push.py)
    max_alerts: int = 1000              # incidents held for posting at once


@dataclass(frozen=True)
class CollectorConfig:
    pin_dir: str = DEFAULT_PIN_DIR
    sinks: tuple[SinkSpec, ...] = ()
    encoding: str = "ecs"
    drop_interval_s: float = 1.0
    ct_scan_interval_s: float = 5.0
    active_timeout_s: float = 60.0
    close_grace_s: float = 2.0      # FIN-closed connections: reported once quiet this long (last ACK counted)
    event_budget: int = 20000
    event_source_share: int | None = None   # flow events/s per source (hw_collect); None: event_budget / 10
    drop_prefix_v4: int = 24        # drop aggregation source prefix (written to hw_collect at start)
    drop_prefix_v6: int = 64
    queues: QueueSizes = QueueSizes()
    jsonl: JsonlOptions = JsonlOptions()
    kafka: KafkaOptions = KafkaOptions()
    otlp: OtlpOptions = OtlpOptions()
    metrics: MetricsOptions = MetricsOptions()
    alerting: AlertingOptions = AlertingOptions()
    anomaly: Any = None
    hostname: str | None = None
    status_file: str | None = None
    status_interval_s: float = 1.0
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)   # key -> where it came from

    def status_path(self) -> Path:
        """$HOSTWALL_STATE_DIR/collector-<pin stem>.json unless status_file is set."""
        if self.status_file:
            return Path(self.status_file)
        return collector_status_path(self.pin_dir)

    def state_path(self, status: Path | None = None) -> Path:
        """The checkpoint (collector/checkpoint.py), next to the status file: <status stem>.state.json."""
        return collector_checkpoint_path(status or self.status_path())

    def outbox_path(self, status: Path | None = None) -> Path:
        """The outbox (collector/outbox.py), next to the status file: <status stem>.outbox.jsonl."""
        st = status or self.status_path()
        return st.with_name(f"{st.stem}.outbox.jsonl")

    def side_path(self, suffix: str, status: Path | None = None) -> Path:
        """A file of the collector's own state next to the status file: <status stem>.<suffix>
        (baselines.json: collector/anomaly_state.py; alerts.json: collector/alerting.py)."""
        st = status or self.status_path()
        return st.with_name(f"{st.stem}.{suffix}")

    def ct_journal_path(self, status: Path | None = None) -> Path:
        """The conntrack journal's directory (collector/ct_journal.py), next to the status file: <status stem>.ct."""
        st = status or self.status_path()
        return st.with_name(f"{st.stem}.ct")


def parse_sink(v: Any, default_encoding: str) -> SinkSpec:
    """A sink URL (str) or {url, encoding}."""
    enc = default_encoding
    if isinstance(v, dict):
        unknown = set(v) - {"url", "encoding"}
        if unknown:
            raise ValueError(f"unknown sink keys {sorted(unknown)}; a sink has url and encoding")
        if "encoding" in v:
            enc = parse_choice(ENCODINGS)(v["encoding"])
        v = v.get("url")
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{v!r} is not a sink URL; use jsonl:PATH, kafka://HOST:PORT, otlp://HOST:PORT or console")
    url = v.strip()
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if scheme not in SCHEMES or (not sep and scheme != "console"):
        raise ValueError(f"unknown sink {url!r}; use jsonl:PATH, kafka://HOST:PORT, otlp://HOST:PORT or console")
    if scheme == "console":
        if rest:
            raise ValueError(f"console takes no target, got {url!r}")
        return SinkSpec("console", "console", "", enc)
    if scheme == "jsonl":
        path = rest[2:] if rest.startswith("//") else rest
        if not path:
            raise ValueError("jsonl: needs a file path, e.g. jsonl:/var/log/hostwall/flows.jsonl")
        path = os.path.abspath(path)
        if os.path.isdir(path):
            raise ValueError(f"jsonl:{path} is a directory; name a file inside it")
        return SinkSpec(f"jsonl:{path}", "jsonl", path, enc)
    if not rest.startswith("//"):
        raise ValueError(f"{scheme} sink needs {scheme}://HOST:PORT, got {url!r}")
    host, port = parse_hostport(rest[2:].rstrip("/"), scheme)
    return SinkSpec(f"{scheme}://{rest[2:].rstrip('/')}", scheme, f"{host}:{port}", enc, host, port)


# ---- field table --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Field:
    path: tuple[str, ...]       # key path in the file
    attr: tuple[str, ...]       # attribute path in CollectorConfig
    parse: Callable[[Any], Any]

    @property
    def env(self) -> str:
        return ENV_PREFIX + "_".join(self.path).upper()

    @property
    def key(self) -> str:
        return ".".join(self.path)


def _dur(v: Any) -> float:
    return parse_duration(v)


def parse_http_url_any(v: Any) -> str:
    """An http(s) link (runbook_url): any path, query or fragment."""
    t = parse_str(v)
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", t):
        raise ValueError(f"{t!r} is not an http(s):// link")
    return t


FIELDS = [
    _Field(("pin_dir",), ("pin_dir",), parse_str),
    _Field(("hostname",), ("hostname",), parse_str),
    _Field(("encoding",), ("encoding",), parse_choice(ENCODINGS)),
    _Field(("drop_summary_interval",), ("drop_interval_s",), _dur),
    _Field(("conntrack_scan_interval",), ("ct_scan_interval_s",), _dur),
    _Field(("active_timeout",), ("active_timeout_s",), _dur),
    _Field(("flow_close_grace",), ("close_grace_s",), _dur),
    _Field(("event_budget",), ("event_budget",), parse_int(0, 10_000_000)),
    _Field(("event_source_share",), ("event_source_share",), parse_int(0, 10_000_000)),
    _Field(("drop_prefix_v4",), ("drop_prefix_v4",), parse_int(0, 32)),
    _Field(("drop_prefix_v6",), ("drop_prefix_v6",), parse_int(0, 128)),
    _Field(("queues", "events"), ("queues", "events"), parse_int(1, 1_000_000)),
    _Field(("queues", "sink"), ("queues", "sink"), parse_int(1, 100_000_000)),
    _Field(("queues", "batch"), ("queues", "batch"), parse_int(1, MAX_BATCH)),
    _Field(("jsonl", "rotate_size"), ("jsonl", "rotate_bytes"), parse_size),
    _Field(("jsonl", "rotate_keep"), ("jsonl", "rotate_keep"), parse_int(1, 1000)),
    _Field(("jsonl", "fsync"), ("jsonl", "fsync"), parse_choice(FSYNC_POLICIES)),
    _Field(("jsonl", "fsync_interval"), ("jsonl", "fsync_interval_s"), _dur),
    _Field(("status_file",), ("status_file",), parse_str),
    _Field(("status_interval",), ("status_interval_s",), _dur),
    _Field(("kafka", "flows_topic"), ("kafka", "flows_topic"), parse_topic),
    _Field(("kafka", "anomalies_topic"), ("kafka", "anomalies_topic"), parse_topic),
    _Field(("kafka", "audit_topic"), ("kafka", "audit_topic"), parse_topic),
    _Field(("kafka", "compression"), ("kafka", "compression"), parse_choice(COMPRESSIONS)),
    _Field(("kafka", "batch_size"), ("kafka", "batch_bytes"), parse_size),
    _Field(("kafka", "linger"), ("kafka", "linger_s"), _dur),
    _Field(("kafka", "request_timeout"), ("kafka", "request_timeout_s"), _dur),
    _Field(("kafka", "spool_after"), ("kafka", "spool_after_s"), _dur),
    _Field(("kafka", "connect_timeout"), ("kafka", "connect_timeout_s"), _dur),
    _Field(("kafka", "client_id"), ("kafka", "client_id"), parse_str),
    _Field(("kafka", "tls"), ("kafka", "tls"), parse_bool),
    _Field(("kafka", "tls_ca_file"), ("kafka", "tls_ca_file"), parse_file),
    _Field(("kafka", "tls_cert_file"), ("kafka", "tls_cert_file"), parse_file),
    _Field(("kafka", "tls_key_file"), ("kafka", "tls_key_file"), parse_file),
    _Field(("kafka", "sasl_mechanism"), ("kafka", "sasl_mechanism"), parse_sasl),
    _Field(("kafka", "sasl_username"), ("kafka", "sasl_username"), parse_str),
    _Field(("kafka", "sasl_password"), ("kafka", "sasl_password"), parse_str),
    _Field(("kafka", "sasl_password_file"), ("kafka", "sasl_password_file"), parse_file),
    _Field(("kafka", "spool_dir"), ("kafka", "spool_dir"), parse_str),
    _Field(("kafka", "spool_size"), ("kafka", "spool_max_bytes"), parse_size),
    _Field(("kafka", "spool_segment_size"), ("kafka", "spool_segment_bytes"), parse_size),
    _Field(("kafka", "spool_fsync"), ("kafka", "spool_fsync"), parse_choice(FSYNC_POLICIES)),
    _Field(("kafka", "spool_fsync_interval"), ("kafka", "spool_fsync_interval_s"), _dur),
    _Field(("kafka", "spool_overflow"), ("kafka", "spool_overflow"), parse_choice(SPOOL_OVERFLOW)),
    _Field(("otlp", "protocol"), ("otlp", "protocol"), parse_choice(OTLP_PROTOCOLS)),
    _Field(("otlp", "timeout"), ("otlp", "timeout_s"), _dur),
    _Field(("otlp", "batch"), ("otlp", "batch"), parse_int(1, 65536)),
    _Field(("otlp", "compression"), ("otlp", "compression"), parse_choice(OTLP_COMPRESSIONS)),
    _Field(("otlp", "tls"), ("otlp", "tls"), parse_bool),
    _Field(("otlp", "tls_ca_file"), ("otlp", "tls_ca_file"), parse_file),
    _Field(("otlp", "tls_cert_file"), ("otlp", "tls_cert_file"), parse_file),
    _Field(("otlp", "tls_key_file"), ("otlp", "tls_key_file"), parse_file),
    _Field(("otlp", "headers"), ("otlp", "headers"), parse_headers),
    _Field(("otlp", "delivery"), ("otlp", "delivery"), parse_choice(DELIVERY)),
    _Field(("metrics", "prometheus"), ("metrics", "prometheus"), parse_listen),
    _Field(("metrics", "otlp"), ("metrics", "otlp"), parse_endpoint),
    _Field(("metrics", "interval"), ("metrics", "interval_s"), _dur),
    _Field(("alerting", "alertmanager"), ("alerting", "alertmanager"), parse_http_url),
    _Field(("alerting", "timeout"), ("alerting", "timeout_s"), _dur),
    _Field(("alerting", "refresh_interval"), ("alerting", "refresh_interval_s"), _dur),
    _Field(("alerting", "hold"), ("alerting", "hold_s"), _dur),
    _Field(("alerting", "min_severity"), ("alerting", "min_severity"), parse_str),
    _Field(("alerting", "runbook_url"), ("alerting", "runbook_url"), parse_http_url_any),
    _Field(("alerting", "labels"), ("alerting", "labels"), parse_labels),
    _Field(("alerting", "max_alerts"), ("alerting", "max_alerts"), parse_int(1, 100_000)),
]
_SECTION_TYPES = {"queues": QueueSizes, "jsonl": JsonlOptions, "kafka": KafkaOptions, "otlp": OtlpOptions,
                  "metrics": MetricsOptions, "alerting": AlertingOptions}
SECTIONS = {sec: [f for f in FIELDS if f.path[0] == sec] for sec in _SECTION_TYPES}
TOP_KEYS = {f.path[0] for f in FIELDS} | {"sinks", "anomaly"}


# ---- loading ------------------------------------------------------------------------------------

def load_config(path: str | os.PathLike | None = None, *, args: Mapping[str, Any] | None = None,
                env: Mapping[str, str] | None = None) -> CollectorConfig:
    """Resolve and validate; raises ConfigError listing every problem.

    args: values from the command line, keyed by file key ("pin_dir", "encoding", "sinks" (list),
    "event_budget", ...); None values are "not given". env: defaults to os.environ. path: None means
    $HOSTWALL_COLLECTOR_CONFIG if set, else no file."""
    env = os.environ if env is None else env
    args = {k: v for k, v in (args or {}).items() if v is not None and v != [] and v != ()}
    if path is None and env.get(ENV_PREFIX + "CONFIG"):
        path = env[ENV_PREFIX + "CONFIG"]
    src = str(path) if path is not None else "<config>"
    issues = Issues(src)
    data = _read_file(path, issues) if path is not None else {}
    _check_keys(data, issues)

    values: dict[tuple[str, ...], Any] = {}
    origins: dict[str, str] = {}
    for f in FIELDS:
        raw, origin, where = _pick(f, args, env, data)
        if origin == "default":
            continue
        try:
            values[f.attr] = f.parse(raw)
            origins[f.key] = origin
        except ValueError as e:
            add_issue(issues, where, f.path, str(e))
    if ("pin_dir",) not in values and env.get("HOSTWALL_PIN_DIR"):
        values[("pin_dir",)] = env["HOSTWALL_PIN_DIR"]
        origins["pin_dir"] = "environment HOSTWALL_PIN_DIR"

    cfg = _build(values, origins)
    cfg = replace(cfg, sinks=_sinks(args, env, data, cfg.encoding, issues, origins))
    cfg = replace(cfg, anomaly=_anomaly(data, issues))
    cross_checks(cfg, origins, issues)
    if len(issues):
        raise ConfigError(issues.sorted())
    return cfg


def _read_file(path, issues: Issues) -> dict:
    try:
        text = Path(path).read_text()
    except OSError as e:
        issues.add((), f"cannot read the config file: {e.strerror}; check --config", use_index=False)
        return {}
    if all(not ln.strip() or ln.lstrip().startswith("#") or ln.strip() == "---" for ln in text.splitlines()):
        return {}                                   # empty or comments only: every default
    data = load_yaml(text, issues)
    if not isinstance(data, dict):
        if len(issues) == 0:
            issues.add((), "the config file must be a YAML mapping (key: value lines)")
        return {}
    return data


def _check_keys(data: dict, issues: Issues) -> None:
    for k in data:
        if k not in TOP_KEYS:
            issues.add((k,), f"unknown key{_suggest(k, TOP_KEYS)}")
    for sec, flds in SECTIONS.items():
        v = data.get(sec)
        if v is None:
            continue
        if not isinstance(v, dict):
            issues.add((sec,), f"must be a mapping with keys {', '.join(f.path[1] for f in flds)}")
            continue
        names = {f.path[1] for f in flds}
        for k in v:
            if k not in names:
                issues.add((sec, k), f"unknown key{_suggest(k, names)}")


def _suggest(k: Any, names) -> str:
    close = difflib.get_close_matches(str(k), sorted(names), n=1)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(names))}"


def _pick(f: _Field, args, env, data) -> tuple[Any, str, tuple]:
    """(raw value, origin label, where) by precedence; where = ('arg'|'env'|'file', name)."""
    if f.key in args:
        return args[f.key], "argument", ("arg", f"--{f.key.replace('_', '-').replace('.', '-')}")
    if f.env in env:
        return env[f.env], f"environment {f.env}", ("env", f.env)
    node: Any = data
    for p in f.path:
        if not isinstance(node, dict) or p not in node:
            return None, "default", ()
        node = node[p]
    return node, "file", ("file", None)


def _build(values: dict, origins: dict) -> CollectorConfig:
    sections = {sec: cls(**{a[1]: v for a, v in values.items() if len(a) == 2 and a[0] == sec})
                for sec, cls in _SECTION_TYPES.items()}
    top = {a[0]: v for a, v in values.items() if len(a) == 1}
    return CollectorConfig(origins=origins, **sections, **top)


def _sinks(args, env, data, encoding: str, issues: Issues, origins: dict) -> tuple[SinkSpec, ...]:
    if "sinks" in args:
        raw, where, origin = list(args["sinks"]), ("arg", "--sink"), "argument"
    elif ENV_PREFIX + "SINKS" in env:
        raw = [s for s in re.split(r"[,\s]+", env[ENV_PREFIX + "SINKS"]) if s]
        where, origin = ("env", ENV_PREFIX + "SINKS"), f"environment {ENV_PREFIX}SINKS"
    elif "sinks" in data:
        raw, where, origin = data["sinks"], ("file", None), "file"
        if not isinstance(raw, list) or not raw:
            add_issue(issues, where, ("sinks",), "must be a non-empty list of sink URLs")
            return ()
    else:
        raw, where, origin = [DEFAULT_SINK], ("default", None), "default"
    out: list[SinkSpec] = []
    seen: dict[str, int] = {}
    for i, v in enumerate(raw):
        try:
            s = parse_sink(v, encoding)
        except ValueError as e:
            add_issue(issues, where, ("sinks", i), str(e))
            continue
        if s.url in seen:
            add_issue(issues, where, ("sinks", i), f"duplicate sink {s.url} (also sinks[{seen[s.url]}]); list it once")
            continue
        seen[s.url] = i
        out.append(s)
    origins["sinks"] = origin
    return tuple(out)


def _anomaly(data: dict, issues: Issues) -> Any:
    """Pass the `anomaly` section to collector.anomaly.AnomalyConfig.from_dict when that module exists."""
    raw = data.get("anomaly")
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        issues.add(("anomaly",), "must be a mapping (see the anomaly detector's settings)")
        return None
    try:
        from .anomaly import AnomalyConfig  # another module's section; optional in this build
    except ImportError:
        return raw
    try:
        return AnomalyConfig.from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        for line in getattr(e, "errors", None) or str(e).splitlines() or [repr(e)]:
            issues.add(("anomaly",), str(line).strip())
        return None


def describe(cfg: CollectorConfig) -> dict:
    """JSON-ready summary (status file)."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg)
           if f.name not in ("sinks", "anomaly", "origins", *_SECTION_TYPES)}
    out["sinks"] = [{"url": s.url, "encoding": s.encoding} for s in cfg.sinks]
    for sec in _SECTION_TYPES:
        o = getattr(cfg, sec)
        out[sec] = {f.name: shown(f.name, getattr(o, f.name)) for f in fields(o)}
    out["origins"] = dict(cfg.origins)
    return out


REDACTED = "<redacted>"


def shown(name: str, value):
    """A section's value as the status file and check-config may show it: secrets (sasl_password, header
    values such as `authorization`) redacted."""
    if name in SECRET_KEYS and value:
        return REDACTED
    if name == "headers":
        return tuple((k, REDACTED) for k, _ in value)
    return value
