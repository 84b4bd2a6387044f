"""How a kafka:// sink connects: the aiokafka security keyword arguments built from KafkaOptions.

Shared by the sink (collector/sinks/kafka.py) and the connection probe (collector/sinks/kafka_probe.py), so
the probe tests exactly what the producer will use. Options are documented in docs/collector.md.
"""
from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from .base import SinkUnavailable

__all__ = ["client_kwargs", "sasl_password", "split_bootstrap", "ssl_context"]


def ssl_context(o, sink: str) -> ssl.SSLContext | None:
    """The client TLS context of ``o`` (KafkaOptions), None without kafka.tls. Unreadable or invalid PEM
    files are a SinkUnavailable naming ``sink`` and the files."""
    if not o.tls:
        return None
    from aiokafka.helpers import create_ssl_context
    try:
        return create_ssl_context(cafile=o.tls_ca_file, certfile=o.tls_cert_file, keyfile=o.tls_key_file)
    except (OSError, ValueError) as e:       # ssl.SSLError is an OSError
        which = ", ".join(f for f in (o.tls_ca_file, o.tls_cert_file, o.tls_key_file) if f)
        raise SinkUnavailable(f"sink {sink}: kafka TLS: cannot load {which or 'the system CAs'}: "
                              f"{getattr(e, 'reason', None) or e}; check kafka.tls_* (PEM files)") from None


def sasl_password(o, sink: str) -> str | None:
    """kafka.sasl_password_file's first line (line end stripped), else kafka.sasl_password."""
    if o.sasl_password_file:
        try:
            return Path(o.sasl_password_file).read_text().rstrip("\r\n")
        except OSError as e:
            raise SinkUnavailable(f"sink {sink}: cannot read kafka.sasl_password_file "
                                  f"{o.sasl_password_file}: {e.strerror}") from None
    return o.sasl_password


def client_kwargs(o, ssl_ctx: ssl.SSLContext | None, password: str | None) -> dict[str, Any]:
    """security_protocol, ssl_context and the SASL arguments for any aiokafka client or connection."""
    kw: dict[str, Any] = {"security_protocol": o.security_protocol, "ssl_context": ssl_ctx}
    if o.sasl_mechanism:
        kw.update(sasl_mechanism=o.sasl_mechanism, sasl_plain_username=o.sasl_username,
                  sasl_plain_password=password)
    return kw


def split_bootstrap(bootstrap: str) -> tuple[str, int]:
    """"host:port" or "[v6]:port" -> (host, port); ValueError when the port is missing or not a number."""
    host, _, port = bootstrap.rpartition(":")
    return host.strip("[]"), int(port)
