"""Value parsers of the collector configuration (collector/config.py): each turns a raw value from the
file, the environment or an argument into a typed one, or raises ValueError with a message that says
what to write instead. Pure functions; O(len(value)).
"""
from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from typing import Any

__all__ = ["SASL_MECHANISMS", "parse_bool", "parse_choice", "parse_endpoint", "parse_file", "parse_headers",
           "parse_hostport", "parse_http_url", "parse_int", "parse_labels", "parse_listen", "parse_sasl", "parse_size",
           "parse_str", "parse_topic"]

SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")


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


def parse_http_url(v: Any) -> str:
    """'http(s)://HOST:PORT[/path]' (alerting.alertmanager) → the URL without a trailing slash."""
    t = parse_str(v)
    m = re.fullmatch(r"(https?)://(\[[0-9A-Fa-f:.]+\]:[0-9]+|[^:/\[\]\s]+:[0-9]+)(/[^\s?#]*)?", t)
    if not m:
        raise ValueError(f"{t!r} is not http(s)://HOST:PORT[/PATH] (e.g. http://127.0.0.1:9093)")
    parse_hostport(m.group(2), m.group(1))
    return t.rstrip("/")


def _pairs(v: Any, what: str, form: str) -> list[tuple[str, str]]:
    """{k: v} or 'k=v,k2=v2' → [(k, v), ...] (headers, labels)."""
    if isinstance(v, dict):
        return [(str(k), str(val)) for k, val in v.items()]
    if not isinstance(v, str):
        raise ValueError(f"{v!r} is not a mapping of {what}s or 'k=v,k2=v2'")
    items = []
    for part in filter(None, (p.strip() for p in v.split(","))):
        k, sep, val = part.partition("=")
        if not sep or not k.strip():
            raise ValueError(f"{what} {part!r} is not {form}")
        items.append((k.strip(), val.strip()))
    return items


_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def parse_labels(v: Any) -> tuple[tuple[str, str], ...]:
    """{name: value} or 'name=value,...' (alerting.labels) → ((name, value), ...), names as Prometheus
    allows them (not `__`-prefixed: reserved)."""
    items = _pairs(v, "label", "NAME=VALUE")
    for k, val in items:
        if not _LABEL.fullmatch(k) or k.startswith("__"):
            raise ValueError(f"label name {k!r} is not valid ([a-zA-Z_][a-zA-Z0-9_]*, not starting with __)")
        if not val:
            raise ValueError(f"label {k!r} has an empty value (Alertmanager drops it)")
    return tuple(sorted(items))


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
    items = _pairs(v, "header", "KEY=VALUE")
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
