"""Connection probe for a kafka:// sink: can this collector deliver to that broker, and if not, why?

    result = await probe_kafka("broker:9093", config.kafka, timeout_s=10, name="kafka://broker:9093")
    result.status   # ok | unresolvable | unreachable | tls | auth | authz | unknown_topic
    str(result)     # one line: what happened, which sink and address, what to do

The probe walks the path the producer takes, one step at a time, and stops at the first that fails:
name resolution, TCP connect, the Kafka connection as the producer opens it (TLS handshake and
certificate verification, ApiVersions, SASL login: the same aiokafka connection code and the same
keyword arguments as the sink, from collector/sinks/kafka_client.py), then Metadata for the sink's three
topics, and a connection to every partition leader the metadata names (advertised listeners). Errors are
classified by exception class (ssl, socket and aiokafka.errors), never by message text.

Topics: the probe asks for metadata the way the producer does, allowing auto-creation, so a broker with
auto.create.topics.enable=true creates missing topics now rather than at the first record (what the sink
would do when it starts); with auto-creation off, a missing topic is `unknown_topic`. A KRaft broker
answers UNKNOWN_TOPIC_OR_PARTITION both while it creates a topic and when it will not, so the probe reads
the broker's auto.create.topics.enable (DescribeConfigs) when the principal may; when it may not, a topic
still unknown after UNKNOWN_TOPIC_GRACE_S (or near the deadline) is `unknown_topic`. Authorization: the
Metadata request (v8+) asks the broker which operations the principal may perform on each topic; a topic
it may describe but not write to is `authz`, as is one it may not even describe. Nothing is produced.

Retryable vs not (docs/collector.md, "Kafka, OTLP and self-metrics"): `unresolvable` and `unreachable`
may heal by themselves (DNS, a broker starting); `tls`, `auth`, `authz` and `unknown_topic` will not
until someone changes the configuration or the broker. The whole probe is bounded by ``timeout_s``
(it answers FINISH_MARGIN_S before it, so a caller's own clock sees the answer inside the bound); a step
still waiting at the deadline is reported as that step's failure. Name resolution runs in a daemon thread
of its own, so a resolver that hangs cannot hold up the caller's event loop shutdown (asyncio.run joins
the default executor's threads).
"""
from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import threading
import time
from dataclasses import dataclass

import aiokafka.errors as Errors
from aiokafka.conn import create_conn
from aiokafka.protocol.admin import DescribeConfigsRequest
from aiokafka.protocol.api import Request, RequestStruct, Response
from aiokafka.protocol.metadata import MetadataRequest_v4
from aiokafka.protocol.types import Array, Boolean, Int16, Int32, Schema, String

from .base import SinkUnavailable
from .kafka_client import client_kwargs, sasl_password, split_bootstrap, ssl_context

__all__ = ["AUTH", "AUTHZ", "FINISH_MARGIN_S", "OK", "RETRYABLE", "TLS", "UNKNOWN_TOPIC", "UNREACHABLE",
           "UNRESOLVABLE", "ProbeResult", "probe_kafka"]

OK, UNRESOLVABLE, UNREACHABLE = "ok", "unresolvable", "unreachable"
TLS, AUTH, AUTHZ, UNKNOWN_TOPIC = "tls", "auth", "authz", "unknown_topic"
RETRYABLE = frozenset({OK, UNRESOLVABLE, UNREACHABLE})   # the rest need a change of config or broker

_AUTH_ERRORS = (Errors.SaslAuthenticationFailed, Errors.AuthenticationFailedError,
                Errors.AuthenticationMethodNotSupported, Errors.UnsupportedSaslMechanismError,
                Errors.IllegalSaslStateError)
_AUTHZ_ERRORS = (Errors.TopicAuthorizationFailedError, Errors.ClusterAuthorizationFailedError)
_OP_WRITE = 4                       # AclOperation.WRITE: bit 1 << 4 of topic_authorized_operations
_OPS_UNKNOWN = -(1 << 31)           # "not computed" (older brokers, or not asked)
_RETRY_S = 0.1                      # between Metadata requests while a topic is being auto-created
UNKNOWN_TOPIC_GRACE_S = 5.0         # unknown topic, broker config not readable: wait this long for creation
_DEADLINE_MARGIN_S = 0.3            # ... or until this close to the deadline
_BROKER_RESOURCE = 4                # ConfigResource type BROKER
FINISH_MARGIN_S = 0.1               # the probe's own deadline is timeout_s minus this


@dataclass(frozen=True)
class ProbeResult:
    status: str                     # OK, UNRESOLVABLE, UNREACHABLE, TLS, AUTH, AUTHZ, UNKNOWN_TOPIC
    sink: str
    address: str
    message: str                    # one line: what, which sink/address, what to do
    elapsed_s: float
    error: str | None = None        # class of the underlying error (or the Kafka error's class)

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def retryable(self) -> bool:
        return self.status in RETRYABLE

    def __str__(self) -> str:
        return self.message


# ---- Metadata v8: topic_authorized_operations (KIP-430); aiokafka ships v0..v5 -----------------

class _MetadataResponse_v8(Response):
    API_KEY = 3
    API_VERSION = 8
    SCHEMA = Schema(
        ("throttle_time_ms", Int32),
        ("brokers", Array(("node_id", Int32), ("host", String("utf-8")), ("port", Int32),
                          ("rack", String("utf-8")))),
        ("cluster_id", String("utf-8")),
        ("controller_id", Int32),
        ("topics", Array(("error_code", Int16), ("topic", String("utf-8")), ("is_internal", Boolean),
                         ("partitions", Array(("error_code", Int16), ("partition", Int32), ("leader", Int32),
                                              ("leader_epoch", Int32), ("replicas", Array(Int32)),
                                              ("isr", Array(Int32)), ("offline_replicas", Array(Int32)))),
                         ("topic_authorized_operations", Int32))),
        ("cluster_authorized_operations", Int32),
    )


class _MetadataRequest_v8(RequestStruct):
    API_KEY = 3
    API_VERSION = 8
    RESPONSE_TYPE = _MetadataResponse_v8
    SCHEMA = Schema(("topics", Array(String("utf-8"))), ("allow_auto_topic_creation", Boolean),
                    ("include_cluster_authorized_operations", Boolean),
                    ("include_topic_authorized_operations", Boolean))


class _TopicMetadata(Request[MetadataRequest_v4 | _MetadataRequest_v8]):
    """Metadata for some topics, auto-creation allowed (as the producer asks), with the principal's
    authorized operations per topic when the broker serves v8 (Kafka >= 2.3)."""
    API_KEY = 3

    def __init__(self, topics: list[str]) -> None:
        self.topics = topics

    def build(self, request_struct_class):
        if request_struct_class.API_VERSION >= 8:
            return request_struct_class(self.topics, True, False, True)
        return request_struct_class(self.topics, True)


# ---- the probe ---------------------------------------------------------------------------------

class _Failed(Exception):
    def __init__(self, status: str, message: str, error: BaseException | str | None) -> None:
        super().__init__(message)
        self.status, self.message = status, message
        self.error = error if isinstance(error, str) or error is None else type(error).__name__


def _reason(e: BaseException) -> str:
    if isinstance(e, ssl.SSLCertVerificationError):
        return e.verify_message or e.reason or str(e)
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    if isinstance(e, Errors.KafkaError):       # str() repeats the class; args[0] is the broker's message
        msg = e.args[0] if e.args and isinstance(e.args[0], str) else None
        return msg or getattr(e, "description", None) or type(e).__name__
    return str(e) or type(e).__name__


async def probe_kafka(bootstrap: str, options=None, timeout_s: float = 10.0, *, name: str | None = None,
                      client_id: str = "hostwall-probe") -> ProbeResult:
    """Probe the broker at ``bootstrap`` ("host:port") with the sink's options (KafkaOptions; defaults
    when None) and topics, within ``timeout_s``. Never raises for a broker problem: see ProbeResult."""
    from hostwall.collector.config import KafkaOptions
    o = options or KafkaOptions()
    sink = name or f"kafka://{bootstrap}"
    t0 = time.monotonic()
    budget = max(0.0, timeout_s - FINISH_MARGIN_S)
    step = ["prepare", bootstrap]            # what the probe is doing, and with which address
    try:
        async with asyncio.timeout(budget):
            message = await _probe(bootstrap, o, sink, client_id, t0, budget, step)
        status, error = OK, None
    except _Failed as f:
        status, message, error = f.status, f.message, f.error
    except TimeoutError:
        status, message = _timed_out(step[1], o, sink, timeout_s, step[0])
        error = "TimeoutError"
    return ProbeResult(status, sink, bootstrap, message, time.monotonic() - t0, error)


def _who(o) -> str:
    if o.sasl_mechanism:
        return f"{o.security_protocol} {o.sasl_mechanism} as {o.sasl_username!r}"
    return o.security_protocol


def _timed_out(address: str, o, sink: str, timeout_s: float, step: str) -> tuple[str, str]:
    what = {
        "resolve": (UNRESOLVABLE, f"no answer from DNS for {address.rpartition(':')[0]!r}",
                    "check this machine's resolver and the host in the sink URL"),
        "connect": (UNREACHABLE, f"no TCP connection to {address}",
                    "check that the broker runs and that host, port and firewalls let this machine in"),
        "handshake": (UNREACHABLE, f"{address} accepted TCP but did not complete a {_who(o)} handshake",
                      "check that the port is a Kafka listener of that protocol (kafka.tls, kafka.sasl_*)"),
    }.get(step, (UNREACHABLE, f"{address} answered but the topics' metadata was not complete (no leader yet)",
                 "check the broker's health (kafka-topics --describe)"))
    status, what, todo = what
    return status, f"{sink}: {status}: {what} within {timeout_s:g}s; {todo}"


async def _probe(bootstrap: str, o, sink: str, client_id: str, t0: float, budget_s: float,
                 step: list[str]) -> str:
    try:
        host, port = split_bootstrap(bootstrap)
    except ValueError:
        raise _Failed(UNRESOLVABLE, f"{sink}: {UNRESOLVABLE}: {bootstrap!r} is not HOST:PORT; fix the sink URL",
                      "ValueError") from None
    try:
        ctx = ssl_context(o, sink)
    except SinkUnavailable as e:
        raise _Failed(TLS, f"{sink}: {TLS}: {e}", e) from None
    try:
        password = sasl_password(o, sink)
    except SinkUnavailable as e:
        raise _Failed(AUTH, f"{sink}: {AUTH}: {e}", e) from None
    kw = client_kwargs(o, ctx, password)
    topics = [o.flows_topic, o.anomalies_topic, o.audit_topic]
    topics = list(dict.fromkeys(topics))

    conn = await _connect(sink, host, port, o, kw, client_id, t0, budget_s, step)
    try:
        step[0] = "metadata"
        brokers, metadata, checked = await _topic_metadata(sink, conn, topics, o, bootstrap, (host, port),
                                                           t0 + budget_s)
    except (OSError, Errors.KafkaError) as e:    # the connection broke, or an error Kafka gave no code for
        raise _Failed(UNREACHABLE, f"{sink}: {UNREACHABLE}: Metadata request to {bootstrap} failed "
                      f"({type(e).__name__}: {_reason(e)}); check the broker's health and log", e) from None
    finally:
        conn.close()
    # The producer talks to each partition's leader at its advertised address: reach those too.
    leaders = {brokers[p[2]] for t in metadata for p in t[3] if p[2] in brokers} - {(host, port)}
    for lhost, lport in sorted(leaders):
        c = await _connect(sink, lhost, lport, o, kw, client_id, t0, budget_s, step,
                           advertised_by=bootstrap)
        c.close()
    return (f"{sink}: {OK}: {bootstrap} {_who(o)}; topics {', '.join(topics)} "
            f"{'writable' if checked else 'present (this broker does not report permissions)'} "
            f"({time.monotonic() - t0:.1f}s)")


async def _resolve(host: str, port: int) -> None:
    """getaddrinfo in a daemon thread (see the module docstring); IP literals need none."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    fut: asyncio.Future = loop.create_future()

    def settle(result, error) -> None:
        if not fut.done():
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(result)

    def work() -> None:
        try:
            result, error = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM), None
        except Exception as e:                   # noqa: BLE001 — handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:                     # the loop is gone: nobody waits any more
            pass

    threading.Thread(target=work, name=f"kafka-probe-dns-{host}", daemon=True).start()
    await fut


async def _connect(sink: str, host: str, port: int, o, kw: dict, client_id: str, t0: float, budget_s: float,
                   step: list[str], advertised_by: str | None = None):
    """Resolve, TCP connect, then open the Kafka connection as the producer does (TLS, ApiVersions, SASL)."""
    addr = f"{host}:{port}"
    via = f" (advertised by {advertised_by}: check the broker's advertised.listeners)" if advertised_by else ""
    step[0], step[1] = "resolve", addr
    try:
        await _resolve(host, port)
    except socket.gaierror as e:
        raise _Failed(UNRESOLVABLE, f"{sink}: {UNRESOLVABLE}: cannot resolve {host!r}{via} ({_reason(e)}); "
                      "fix the host in the sink URL or this machine's DNS", e) from None
    step[0] = "connect"
    try:
        _, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        raise _Failed(UNREACHABLE, f"{sink}: {UNREACHABLE}: no TCP connection to {addr}{via} ({_reason(e)}); "
                      "check that the broker runs and that host, port and firewalls let this machine in",
                      e) from None
    writer.close()
    step[0] = "handshake"
    remaining_ms = max(100, int((budget_s - (time.monotonic() - t0)) * 1000))
    try:
        return await create_conn(host, port, client_id=client_id, request_timeout_ms=remaining_ms, **kw)
    except ssl.SSLCertVerificationError as e:
        raise _Failed(TLS, f"{sink}: {TLS}: the certificate of {addr}{via} does not verify ({_reason(e)}); "
                      f"set kafka.tls_ca_file to the CA that signed it (now: "
                      f"{o.tls_ca_file or 'the system CAs'}) and check that it names {host}", e) from None
    except ssl.SSLError as e:
        raise _Failed(TLS, f"{sink}: {TLS}: TLS handshake with {addr}{via} failed ({_reason(e)}); check that "
                      "the listener speaks TLS and kafka.tls_* (CA, client certificate and key)", e) from None
    except (Errors.IllegalSaslStateError, Errors.UnsupportedSaslMechanismError) as e:
        raise _Failed(AUTH, f"{sink}: {AUTH}: {addr}{via} does not take SASL {o.sasl_mechanism} on this port "
                      f"({type(e).__name__}: {_reason(e)}); use the broker's SASL listener and a mechanism it "
                      "enables (kafka.sasl_mechanism)", e) from None
    except _AUTH_ERRORS as e:
        raise _Failed(AUTH, f"{sink}: {AUTH}: {addr}{via} refused the {_who(o)} login "
                      f"({type(e).__name__}: {_reason(e)}); check kafka.sasl_username, kafka.sasl_password(_file) "
                      f"and that the broker has {o.sasl_mechanism or 'SASL'} credentials for that user", e) from None
    except OSError as e:
        if o.tls and not isinstance(e, TimeoutError):    # from the TLS handshake: reset or EOF, not a cert
            raise _Failed(TLS, f"{sink}: {TLS}: {addr}{via} dropped the TLS handshake ({type(e).__name__}); "
                          "check that the port is the broker's SSL/SASL_SSL listener (or set kafka.tls: false)",
                          e) from None
        raise _Failed(UNREACHABLE, f"{sink}: {UNREACHABLE}: {addr}{via} accepted TCP but the {_who(o)} "
                      f"handshake failed ({type(e).__name__}: {_reason(e)}); check that the port is a Kafka "
                      "listener of that protocol (kafka.tls, kafka.sasl_mechanism)", e) from None
    except Errors.KafkaError as e:
        raise _Failed(UNREACHABLE, f"{sink}: {UNREACHABLE}: {addr}{via} accepted TCP but the {_who(o)} "
                      f"handshake failed ({type(e).__name__}: {_reason(e)}); check that the port is a Kafka "
                      "listener of that protocol (kafka.tls, kafka.sasl_mechanism)", e) from None


async def _auto_create(conn, node: int) -> bool | None:
    """The broker's auto.create.topics.enable, or None when the principal may not read it (or no answer)."""
    resp = await conn.send(DescribeConfigsRequest([(_BROKER_RESOURCE, str(node), ["auto.create.topics.enable"])]))
    for r in resp.resources:
        if Errors.for_code(r[0]) is not Errors.NoError:
            return None
        for entry in r[4]:
            if entry[0] == "auto.create.topics.enable" and entry[1] is not None:
                return entry[1].strip().lower() == "true"
    return None


async def _topic_metadata(sink: str, conn, topics: list[str], o, bootstrap: str, address: tuple[str, int],
                          deadline: float):
    """Metadata until every topic has a leader for every partition; classify topic errors by class.
    Returns (brokers {node: (host, port)}, topic entries, whether WRITE was checked for every topic)."""
    auto_create: bool | None = None
    first_unknown: float | None = None
    while True:
        resp = await conn.send(_TopicMetadata(topics))
        brokers = {b[0]: (b[1], b[2]) for b in resp.brokers}
        pending = []
        checked = True
        for t in resp.topics:
            err, name, parts = t[0], t[1], t[3]
            ops = t[4] if len(t) > 4 else _OPS_UNKNOWN
            checked = checked and ops != _OPS_UNKNOWN
            cls = Errors.for_code(err)
            if issubclass(cls, _AUTHZ_ERRORS) or (cls is Errors.NoError and ops != _OPS_UNKNOWN
                                                   and not ops & (1 << _OP_WRITE)):
                raise _Failed(AUTHZ, f"{sink}: {AUTHZ}: {bootstrap} ({_who(o)}) does not allow "
                              f"{'writing to' if cls is Errors.NoError else 'even describing'} topic {name} "
                              f"({'no WRITE permission' if cls is Errors.NoError else cls.__name__}); grant it, "
                              f"e.g. kafka-acls --add --allow-principal User:{o.sasl_username or 'ANONYMOUS'} "
                              f"--operation Write --operation Describe --topic {name}",
                              "TopicAuthorizationFailedError" if cls is Errors.NoError else cls.__name__)
            if cls is Errors.UnknownTopicOrPartitionError and first_unknown is None:
                first_unknown = time.monotonic()
                node = next((n for n, a in brokers.items() if a == address), next(iter(brokers), None))
                if node is not None:
                    try:
                        auto_create = await _auto_create(conn, node)
                    except Errors.KafkaError:            # e.g. an old broker: decide by waiting instead
                        auto_create = None
            now = time.monotonic()
            if cls is Errors.InvalidTopicError or cls is Errors.UnknownTopicOrPartitionError and (
                    auto_create is False or auto_create is None and (
                        now - first_unknown >= UNKNOWN_TOPIC_GRACE_S or deadline - now <= _DEADLINE_MARGIN_S)):
                missing = ", ".join(x[1] for x in resp.topics if Errors.for_code(x[0]) is cls)
                if cls is Errors.InvalidTopicError:
                    what = f"{bootstrap} says topic name(s) {missing} are invalid; fix"
                elif auto_create is False:
                    what = (f"no topic {missing} on {bootstrap}, and the broker does not create topics "
                            f"(auto.create.topics.enable=false); create it (kafka-topics --create) or fix")
                else:
                    what = (f"no topic {missing} on {bootstrap}, and the broker did not create it within "
                            f"{now - first_unknown:.1f}s (auto.create.topics.enable=false?); create it "
                            f"(kafka-topics --create) or fix")
                raise _Failed(UNKNOWN_TOPIC, f"{sink}: {UNKNOWN_TOPIC}: {what} "
                              "kafka.flows_topic / anomalies_topic / audit_topic", cls.__name__)
            if cls is not Errors.NoError or not parts or any(p[2] < 0 for p in parts):
                pending.append(name)         # being created, or a leader election in progress
        if not pending:
            return brokers, resp.topics, checked
        await asyncio.sleep(_RETRY_S)
