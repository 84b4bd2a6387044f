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
    metrics:                            # self-metrics (collector/metrics.py); both off by default
      prometheus: 127.0.0.1:9464        # scrape endpoint (/metrics)
      otlp: otlp://127.0.0.1:4317       # OTLP metrics (protocol, tls and headers from `otlp`)
      interval: 15s                     # OTLP export period and kernel-map read period
    status_file: /run/hostwall/collector-....json
    anomaly: {...}                      # owned by collector.anomaly (AnomalyConfig.from_dict)

Environment: HOSTWALL_COLLECTOR_<KEY>, KEY = the dotted path upper-cased with '_' (e.g.
HOSTWALL_COLLECTOR_JSONL_FSYNC, HOSTWALL_COLLECTOR_QUEUES_SINK); HOSTWALL_COLLECTOR_SINKS is a
comma-separated URL list; HOSTWALL_PIN_DIR (the enforcer's) is honoured below
HOSTWALL_COLLECTOR_PIN_DIR. Secrets (sasl_password) are never echoed: describe() redacts them.
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from hostwall.bpf.state import DEFAULT_PIN_DIR, state_dir, state_path
from hostwall.units import parse_duration
from hostwall.yamldoc import Issues, PolicyIssue, load_yaml

ENV_PREFIX = "HOSTWALL_COLLECTOR_"
ENCODINGS = ("ecs", "ocsf")
FSYNC_POLICIES = ("none", "interval", "always")
SCHEMES = ("jsonl", "kafka", "otlp", "console")
DEFAULT_SINK = "jsonl:/var/log/hostwall/flows.jsonl"
MAX_BATCH = 65536
COMPRESSIONS = ("zstd", "lz4", "gzip", "snappy", "none")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SPOOL_OVERFLOW = ("drop_newest", "block")
OTLP_PROTOCOLS = ("grpc", "http")
OTLP_COMPRESSIONS = ("none", "gzip")
SECRET_KEYS = frozenset({"sasl_password"})


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


@dataclass(frozen=True)
class MetricsOptions:
    """Self-metrics outputs (collector/metrics.py): both off unless set."""
    prometheus: str | None = None       # "HOST:PORT" of the scrape endpoint
    otlp: str | None = None             # "HOST:PORT" of an OTLP receiver (otlp://HOST:PORT in the file)
    interval_s: float = 15.0


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
    anomaly: Any = None
    hostname: str | None = None
    status_file: str | None = None
    status_interval_s: float = 1.0
    origins: Mapping[str, str] = field(default_factory=dict, compare=False)   # key -> where it came from

    def status_path(self) -> Path:
        """$HOSTWALL_STATE_DIR/collector-<pin stem>.json unless status_file is set."""
        if self.status_file:
            return Path(self.status_file)
        return state_dir() / f"collector-{state_path(self.pin_dir).stem}.json"


# ---- value parsers (raise ValueError with an actionable message) ---------------------------------

_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*([A-Za-z]*)\s*$")
_SIZE_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20,
               "gib": 1 << 30, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_size(v: Any) -> int:
    """Bytes: 1048576, '100MB', '1GiB', '64k'. Must be > 0."""
    if isinstance(v, bool) or not isinstance(v, (int, float, str)):
        raise ValueError(f"{v!r} is not a size; use bytes or a unit like 100MB or 1GiB")
    if isinstance(v, str):
        m = _SIZE.match(v)
        if not m or m.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"malformed size {v!r}; use e.g. 100MB, 512MiB, 1GiB")
        val = float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
    else:
        val = float(v)
    if not val >= 1 or math.isinf(val):
        raise ValueError(f"size {v!r} must be at least 1 byte")
    return int(val)


def parse_int(lo: int, hi: int) -> Callable[[Any], int]:
    def p(v: Any) -> int:
        if isinstance(v, str) and re.fullmatch(r"\s*[0-9]+\s*", v):
            v = int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{v!r} is not an integer")
        if not lo <= v <= hi:
            raise ValueError(f"{v} is out of range; use {lo}..{hi}")
        return v
    return p


def parse_choice(choices: tuple[str, ...]) -> Callable[[Any], str]:
    def p(v: Any) -> str:
        if not isinstance(v, str) or v.strip().lower() not in choices:
            raise ValueError(f"{v!r} is not one of {', '.join(choices)}")
        return v.strip().lower()
    return p


def parse_str(v: Any) -> str:
    if not isinstance(v, str) or not v.strip():
        raise ValueError(f"{v!r} is not a non-empty string")
    return v.strip()


def parse_bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
        return v.strip().lower() in ("true", "yes", "on", "1")
    raise ValueError(f"{v!r} is not a boolean; use true or false")


def parse_topic(v: Any) -> str:
    """A Kafka topic name: 1-249 of [A-Za-z0-9._-], not '.' or '..'."""
    t = parse_str(v)
    if len(t) > 249 or t in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]+", t):
        raise ValueError(f"{t!r} is not a valid Kafka topic name (1-249 of letters, digits, '.', '_', '-')")
    return t


def parse_file(v: Any) -> str:
    """A readable file (TLS material, password file); the error says what is wrong with it."""
    path = os.path.abspath(parse_str(v))
    if not os.path.exists(path):
        raise ValueError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise ValueError(f"{path} is not a file")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path} is not readable by this user")
    return path


def parse_sasl(v: Any) -> str:
    if not isinstance(v, str) or v.strip().upper() not in SASL_MECHANISMS:
        raise ValueError(f"{v!r} is not a supported SASL mechanism; use one of {', '.join(SASL_MECHANISMS)}")
    return v.strip().upper()


def parse_endpoint(v: Any) -> str:
    """'HOST:PORT' or 'otlp://HOST:PORT' (or http(s)://) → 'HOST:PORT'."""
    t = parse_str(v)
    t = re.sub(r"^(otlp|http|https|grpc)://", "", t).rstrip("/")
    host, port = parse_hostport(t, "otlp")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_listen(v: Any) -> str:
    """'HOST:PORT' to listen on (metrics.prometheus)."""
    t = parse_str(v)
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:/\[\]\s]*):([0-9]+)", t)
    if not m:
        raise ValueError(f"{t!r} is not HOST:PORT to listen on (e.g. 127.0.0.1:9464)")
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1..65535")
    return t


def parse_headers(v: Any) -> tuple[tuple[str, str], ...]:
    """{k: v} or 'k=v,k2=v2' → ((k, v), ...); keys are lower-cased (gRPC metadata must be)."""
    if isinstance(v, str):
        items = []
        for part in filter(None, (p.strip() for p in v.split(","))):
            k, sep, val = part.partition("=")
            if not sep or not k.strip():
                raise ValueError(f"header {part!r} is not KEY=VALUE")
            items.append((k.strip(), val.strip()))
    elif isinstance(v, dict):
        items = [(str(k), str(val)) for k, val in v.items()]
    else:
        raise ValueError(f"{v!r} is not a mapping of headers or 'k=v,k2=v2'")
    for k, _ in items:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", k):
            raise ValueError(f"header name {k!r} has characters HTTP/gRPC do not allow")
    return tuple((k.lower(), val) for k, val in items)


def parse_hostport(text: str, scheme: str) -> tuple[str, int]:
    """'HOST:PORT' or '[v6]:PORT' → (host, port)."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:([0-9]+)|([^:/\[\]\s]+):([0-9]+)", text)
    if not m:
        raise ValueError(f"{scheme}:// needs HOST:PORT (e.g. {scheme}://127.0.0.1:"
                         f"{9092 if scheme == 'kafka' else 4317}), got {text!r}")
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    p = int(port)
    if not 1 <= p <= 65535:
        raise ValueError(f"port {p} is out of range 1..65535")
    return host, p


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
    _Field(("metrics", "prometheus"), ("metrics", "prometheus"), parse_listen),
    _Field(("metrics", "otlp"), ("metrics", "otlp"), parse_endpoint),
    _Field(("metrics", "interval"), ("metrics", "interval_s"), _dur),
]
_SECTION_TYPES = {"queues": QueueSizes, "jsonl": JsonlOptions, "kafka": KafkaOptions, "otlp": OtlpOptions,
                  "metrics": MetricsOptions}
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
            _add(issues, where, f.path, str(e))
    if ("pin_dir",) not in values and env.get("HOSTWALL_PIN_DIR"):
        values[("pin_dir",)] = env["HOSTWALL_PIN_DIR"]
        origins["pin_dir"] = "environment HOSTWALL_PIN_DIR"

    cfg = _build(values, origins)
    cfg = replace(cfg, sinks=_sinks(args, env, data, cfg.encoding, issues, origins))
    cfg = replace(cfg, anomaly=_anomaly(data, issues))
    _cross_checks(cfg, origins, issues)
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


def _add(issues: Issues, where: tuple, path: tuple, msg: str) -> None:
    kind, name = where
    if kind == "file":
        issues.add(path, msg)
    elif kind == "env":
        issues.add(path, msg, file=f"environment {name}", use_index=False)
    else:
        issues.add(path, msg, file=f"argument {name}", use_index=False)


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
            _add(issues, where, ("sinks",), "must be a non-empty list of sink URLs")
            return ()
    else:
        raw, where, origin = [DEFAULT_SINK], ("default", None), "default"
    out: list[SinkSpec] = []
    seen: dict[str, int] = {}
    for i, v in enumerate(raw):
        try:
            s = parse_sink(v, encoding)
        except ValueError as e:
            _add(issues, where, ("sinks", i), str(e))
            continue
        if s.url in seen:
            _add(issues, where, ("sinks", i), f"duplicate sink {s.url} (also sinks[{seen[s.url]}]); list it once")
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


def _cross_checks(cfg: CollectorConfig, origins: dict, issues: Issues) -> None:
    def where(key: str) -> tuple:
        o = origins.get(key, "default")
        if o.startswith("environment "):
            return ("env", o.split(" ", 1)[1])
        if o == "argument":
            return ("arg", f"--{key.replace('_', '-')}")
        return ("file", None)

    if cfg.drop_interval_s > 1.0:
        _add(issues, where("drop_summary_interval"), ("drop_summary_interval",),
             f"{cfg.drop_interval_s:g}s is longer than 1s; drop summaries are exported at least every second")
    if cfg.active_timeout_s < cfg.ct_scan_interval_s:
        _add(issues, where("active_timeout"), ("active_timeout",),
             f"{cfg.active_timeout_s:g}s is shorter than conntrack_scan_interval ({cfg.ct_scan_interval_s:g}s); "
             "raise it or scan more often")
    if not 0 < cfg.close_grace_s <= 60:
        _add(issues, where("flow_close_grace"), ("flow_close_grace",),
             f"{cfg.close_grace_s:g}s is outside (0s, 60s]: closed connections must be reported after their "
             "last packets (a few round trips) and long before the datapath's FIN timeout")
    if cfg.jsonl.rotate_bytes < 4096:
        _add(issues, where("jsonl.rotate_size"), ("jsonl", "rotate_size"),
             f"{cfg.jsonl.rotate_bytes} bytes is too small to hold records; use at least 4096 (e.g. 100MB)")
    if cfg.queues.batch > cfg.queues.sink:
        _add(issues, where("queues.batch"), ("queues", "batch"),
             f"batch ({cfg.queues.batch}) exceeds the sink queue ({cfg.queues.sink}); a batch must fit a queue")
    _kafka_checks(cfg.kafka, where, issues)
    _tls_checks("otlp", cfg.otlp, where, issues)


def _tls_checks(sec: str, o, where, issues: Issues) -> None:
    """TLS material only with tls on; a client certificate needs its key and the other way round."""
    files = [k for k in ("tls_ca_file", "tls_cert_file", "tls_key_file") if getattr(o, k)]
    if files and not o.tls:
        _add(issues, where(f"{sec}.{files[0]}"), (sec, files[0]),
             f"{', '.join(files)} set but {sec}.tls is false; set {sec}.tls: true (or remove them)")
    if bool(o.tls_cert_file) != bool(o.tls_key_file):
        have, miss = ("tls_cert_file", "tls_key_file") if o.tls_cert_file else ("tls_key_file", "tls_cert_file")
        _add(issues, where(f"{sec}.{have}"), (sec, have),
             f"a client certificate needs both tls_cert_file and tls_key_file; {sec}.{miss} is missing")


def _kafka_checks(k: KafkaOptions, where, issues: Issues) -> None:
    _tls_checks("kafka", k, where, issues)
    if k.sasl_mechanism:
        if not k.sasl_username:
            _add(issues, where("kafka.sasl_mechanism"), ("kafka", "sasl_mechanism"),
                 f"{k.sasl_mechanism} needs kafka.sasl_username")
        if not k.sasl_password and not k.sasl_password_file:
            _add(issues, where("kafka.sasl_mechanism"), ("kafka", "sasl_mechanism"),
                 f"{k.sasl_mechanism} needs kafka.sasl_password_file (or kafka.sasl_password, e.g. from "
                 "HOSTWALL_COLLECTOR_KAFKA_SASL_PASSWORD)")
        if k.sasl_mechanism == "PLAIN" and not k.tls:
            _add(issues, where("kafka.sasl_mechanism"), ("kafka", "sasl_mechanism"),
                 "PLAIN sends the password in clear text; set kafka.tls: true (or use SCRAM-SHA-512)")
    else:
        for key in ("sasl_username", "sasl_password", "sasl_password_file"):
            if getattr(k, key):
                _add(issues, where(f"kafka.{key}"), ("kafka", key),
                     f"kafka.{key} is set but kafka.sasl_mechanism is not; set it to one of "
                     f"{', '.join(SASL_MECHANISMS)}")
                break
    if k.sasl_password and k.sasl_password_file:
        _add(issues, where("kafka.sasl_password"), ("kafka", "sasl_password"),
             "set kafka.sasl_password or kafka.sasl_password_file, not both")
    if k.spool_segment_bytes > k.spool_max_bytes:
        _add(issues, where("kafka.spool_segment_size"), ("kafka", "spool_segment_size"),
             f"segment size {k.spool_segment_bytes} exceeds spool_size {k.spool_max_bytes}")
    if k.spool_max_bytes < (1 << 20):
        _add(issues, where("kafka.spool_size"), ("kafka", "spool_size"),
             f"{k.spool_max_bytes} bytes is too small for a spool; use at least 1MiB (e.g. 1GiB)")
    if k.spool_segment_bytes < (64 << 10):
        _add(issues, where("kafka.spool_segment_size"), ("kafka", "spool_segment_size"),
             f"{k.spool_segment_bytes} bytes is too small; use at least 64KiB (e.g. 64MiB)")
    if not (1 << 10) <= k.batch_bytes <= (16 << 20):
        _add(issues, where("kafka.batch_size"), ("kafka", "batch_size"),
             f"{k.batch_bytes} bytes is out of range 1KiB..16MiB")
    if k.request_timeout_s <= k.spool_after_s:
        _add(issues, where("kafka.spool_after"), ("kafka", "spool_after"),
             f"spool_after ({k.spool_after_s:g}s) must be shorter than request_timeout ({k.request_timeout_s:g}s)")


def describe(cfg: CollectorConfig) -> dict:
    """JSON-ready summary (status file)."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg)
           if f.name not in ("sinks", "anomaly", "origins", *_SECTION_TYPES)}
    out["sinks"] = [{"url": s.url, "encoding": s.encoding} for s in cfg.sinks]
    for sec in _SECTION_TYPES:
        o = getattr(cfg, sec)
        out[sec] = {f.name: ("<redacted>" if f.name in SECRET_KEYS and getattr(o, f.name) else getattr(o, f.name))
                    for f in fields(o)}
    out["origins"] = dict(cfg.origins)
    return out
