"""Typed collector configuration: YAML file + environment + command-line arguments.

Each field is resolved on its own with the precedence argument > environment > file > default
(DESIGN.md §8). Validation collects EVERY problem before reporting, each with where it came from:
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
    event_budget: 20000                 # events/s into the ring buffer (written to hw_collect)
    drop_prefix_v4: 24                  # drop summaries aggregate sources by this prefix
    drop_prefix_v6: 64
    queues: {events: 16, sink: 20000, batch: 8192}
    jsonl: {rotate_size: 256MB, rotate_keep: 5, fsync: interval, fsync_interval: 1s}
    status_file: /run/hostwall/collector-....json
    anomaly: {...}                      # owned by collector.anomaly (AnomalyConfig.from_dict)

Environment: HOSTWALL_COLLECTOR_<KEY>, KEY = the dotted path upper-cased with '_' (e.g.
HOSTWALL_COLLECTOR_JSONL_FSYNC, HOSTWALL_COLLECTOR_QUEUES_SINK); HOSTWALL_COLLECTOR_SINKS is a
comma-separated URL list; HOSTWALL_PIN_DIR (the enforcer's) is honoured below
HOSTWALL_COLLECTOR_PIN_DIR. kafka:// and otlp:// parse and validate here; whether this build can
run them is decided when the service starts (a clear "not available in this build yet" error).
"""
from __future__ import annotations

import difflib
import ipaddress
import math
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from enforcer.state import DEFAULT_PIN_DIR, state_dir, state_path
from enforcer.validation import Issues, PolicyIssue, load_yaml, parse_duration

ENV_PREFIX = "HOSTWALL_COLLECTOR_"
ENCODINGS = ("ecs", "ocsf")
FSYNC_POLICIES = ("none", "interval", "always")
SCHEMES = ("jsonl", "kafka", "otlp", "console")
DEFAULT_SINK = "jsonl:/var/log/hostwall/flows.jsonl"
MAX_BATCH = 65536


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
class CollectorConfig:
    pin_dir: str = DEFAULT_PIN_DIR
    sinks: tuple[SinkSpec, ...] = ()
    encoding: str = "ecs"
    drop_interval_s: float = 1.0
    ct_scan_interval_s: float = 5.0
    active_timeout_s: float = 60.0
    event_budget: int = 20000
    drop_prefix_v4: int = 24        # drop aggregation source prefix (written to hw_collect at start)
    drop_prefix_v6: int = 64
    queues: QueueSizes = QueueSizes()
    jsonl: JsonlOptions = JsonlOptions()
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
    _Field(("event_budget",), ("event_budget",), parse_int(0, 10_000_000)),
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
]
SECTIONS = {"queues": [f for f in FIELDS if f.path[0] == "queues"],
            "jsonl": [f for f in FIELDS if f.path[0] == "jsonl"]}
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
    queues = QueueSizes(**{a[1]: v for a, v in values.items() if a[0] == "queues"})
    jsonl = JsonlOptions(**{a[1]: v for a, v in values.items() if a[0] == "jsonl"})
    top = {a[0]: v for a, v in values.items() if len(a) == 1}
    return CollectorConfig(queues=queues, jsonl=jsonl, origins=origins, **top)


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
        from .anomaly import AnomalyConfig      # another module's section; optional in this build
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
    if cfg.jsonl.rotate_bytes < 4096:
        _add(issues, where("jsonl.rotate_size"), ("jsonl", "rotate_size"),
             f"{cfg.jsonl.rotate_bytes} bytes is too small to hold records; use at least 4096 (e.g. 100MB)")
    if cfg.queues.batch > cfg.queues.sink:
        _add(issues, where("queues.batch"), ("queues", "batch"),
             f"batch ({cfg.queues.batch}) exceeds the sink queue ({cfg.queues.sink}); a batch must fit a queue")


def describe(cfg: CollectorConfig) -> dict:
    """JSON-ready summary (status file)."""
    out = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("sinks", "queues", "jsonl",
                                                                               "anomaly", "origins")}
    out["sinks"] = [{"url": s.url, "encoding": s.encoding} for s in cfg.sinks]
    out["queues"] = {f.name: getattr(cfg.queues, f.name) for f in fields(cfg.queues)}
    out["jsonl"] = {f.name: getattr(cfg.jsonl, f.name) for f in fields(cfg.jsonl)}
    out["origins"] = dict(cfg.origins)
    return out
