"""Smoke tests of the real peers: each one starts, takes data from a real client and gives it back."""

from __future__ import annotations

import asyncio
import base64
import http.server
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator

import pytest

from tests.peers import PeerNotInstalled, free_ports
from tests.peers.alertmanager import (
    Alertmanager,
    Notification,
    WebhookReceiver,
    alert,
    alertmanager_binary,
    rfc3339,
    webhook_config,
)
from tests.peers.kafka import Acl, KafkaBroker, kafka_cluster_id
from tests.peers.otelcol import OtelCollector
from tests.peers.prometheus import PrometheusServer

pytestmark = [pytest.mark.peers, pytest.mark.timeout(240)]


# ------------------------------------------------------------------------------------------------ kafka


async def _produce_consume(bootstrap: str, topic: str, key: bytes, value: bytes) -> tuple[bytes, bytes]:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True,
                                compression_type="gzip", request_timeout_ms=10000)
    await producer.start()
    try:
        meta = await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 30)
        assert meta.topic == topic and meta.offset >= 0
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        msg = await asyncio.wait_for(consumer.getone(), 30)
        return msg.key, msg.value
    finally:
        await consumer.stop()


def test_kafka_produce_consume(kafka_broker: KafkaBroker) -> None:
    topic = f"smoke-{uuid.uuid4().hex[:8]}"
    kafka_broker.create_topic(topic, partitions=2)
    md = kafka_broker.metadata([topic])
    assert md.topics[topic].ready and len(md.topics[topic].partitions) == 2
    key, value = b"10.0.0.1", b'{"event":{"action":"deny"}}'
    assert asyncio.run(_produce_consume(kafka_broker.bootstrap_servers, topic, key, value)) == (key, value)


def test_kafka_restart_keeps_data(kafka_broker_factory) -> None:
    broker: KafkaBroker = kafka_broker_factory()
    broker.create_topic("durable")
    asyncio.run(_produce_consume(broker.bootstrap_servers, "durable", b"k", b"before"))
    port = broker.port
    broker.stop()
    assert not broker.running
    broker.start()
    assert broker.port == port and broker.starts == 2
    assert "durable" in broker.metadata().topics  # same data dir: topic and record survive
    assert asyncio.run(_produce_consume(broker.bootstrap_servers, "durable", b"k2", b"after")) == (b"k", b"before")


def test_kafka_producer_perf_tool(kafka_broker: KafkaBroker) -> None:
    kafka_broker.create_topic("perf")
    proc = kafka_broker.run_tool(
        "org.apache.kafka.tools.ProducerPerformance", "--topic", "perf", "--num-records", 2000,
        "--record-size", 100, "--throughput", -1,
        "--producer-props", f"bootstrap.servers={kafka_broker.bootstrap_servers}", "acks=all", timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2000 records sent" in proc.stdout, proc.stdout


def _sasl_kwargs(broker: KafkaBroker, user: str, password: str, mechanism: str, cafile=None) -> dict:
    from aiokafka.helpers import create_ssl_context
    return {"security_protocol": "SASL_SSL", "ssl_context": create_ssl_context(cafile=str(cafile or broker.ca_file)),
            "sasl_mechanism": mechanism, "sasl_plain_username": user, "sasl_plain_password": password}


async def _login(broker: KafkaBroker, user: str, password: str, mechanism: str) -> None:
    """One aiokafka connection to the SASL_SSL listener (TLS, ApiVersions, SCRAM); raises what aiokafka raises."""
    from aiokafka.conn import create_conn
    host, port = broker.sasl_bootstrap_servers.rsplit(":", 1)
    conn = await create_conn(host, int(port), request_timeout_ms=10000,
                             **_sasl_kwargs(broker, user, password, mechanism))
    conn.close()


@pytest.mark.parametrize("producer_mech,consumer_mech", [("SCRAM-SHA-256", "SCRAM-SHA-512"),
                                                         ("SCRAM-SHA-512", "SCRAM-SHA-256")])
def test_kafka_sasl_ssl_round_trip_and_acls(kafka_sasl_broker: KafkaBroker, producer_mech, consumer_mech) -> None:
    """aiokafka over SASL_SSL with the throwaway CA: the writer produces and reads back; the read-only user
    reads but its produce is refused by the ACLs; the unrelated CA does not verify the listener."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.errors import TopicAuthorizationFailedError

    b = kafka_sasl_broker
    topic = f"sasl-{uuid.uuid4().hex[:8]}"
    b.create_topic(topic, partitions=2)
    w, r = b.writer, b.reader
    key, value = b"10.0.0.2", b'{"event":{"action":"allow"}}'

    async def go() -> tuple:
        producer = AIOKafkaProducer(bootstrap_servers=b.sasl_bootstrap_servers, acks="all", enable_idempotence=True,
                                    request_timeout_ms=10000, **_sasl_kwargs(b, w.name, w.password, producer_mech))
        await producer.start()
        try:
            meta = await asyncio.wait_for(producer.send_and_wait(topic, value, key=key), 30)
        finally:
            await producer.stop()
        got = {}
        for user in (w, r):
            consumer = AIOKafkaConsumer(topic, bootstrap_servers=b.sasl_bootstrap_servers,
                                        auto_offset_reset="earliest", enable_auto_commit=False, group_id=None,
                                        **_sasl_kwargs(b, user.name, user.password, consumer_mech))
            await consumer.start()
            try:
                msg = await asyncio.wait_for(consumer.getone(), 30)
                got[user.name] = (msg.key, msg.value, msg.partition, msg.offset)
            finally:
                await consumer.stop()
        denied = AIOKafkaProducer(bootstrap_servers=b.sasl_bootstrap_servers, request_timeout_ms=10000,
                                  **_sasl_kwargs(b, r.name, r.password, producer_mech))
        await denied.start()
        try:
            with pytest.raises(TopicAuthorizationFailedError):
                await asyncio.wait_for(denied.send_and_wait(topic, b"not allowed"), 30)
        finally:
            await denied.stop()
        return meta, got

    meta, got = asyncio.run(go())
    assert got[w.name] == got[r.name] == (key, value, meta.partition, meta.offset)
    assert b.metadata([topic]).topics[topic].ready

    async def wrong_ca() -> None:
        from aiokafka.conn import create_conn
        host, port = b.sasl_bootstrap_servers.rsplit(":", 1)
        await create_conn(host, int(port), request_timeout_ms=10000,
                          **_sasl_kwargs(b, w.name, w.password, producer_mech, cafile=b.wrong_ca_file))

    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(wrong_ca())


def test_kafka_sasl_revoked_user_cannot_connect(kafka_sasl_broker: KafkaBroker) -> None:
    """A SCRAM user added and granted while the broker runs produces; once revoked (kafka-configs
    --delete-config), a new connection fails authentication for either mechanism, and the peer's own
    SCRAM client agrees. Users of the broker are untouched."""
    from aiokafka import AIOKafkaProducer
    from aiokafka.errors import SaslAuthenticationFailed

    b = kafka_sasl_broker
    name = f"carol-{uuid.uuid4().hex[:6]}"
    topic = f"revoke-{uuid.uuid4().hex[:8]}"
    b.create_topic(topic)
    user = b.add_scram_user(name)
    b.create_acls([Acl(user.principal, "WRITE", "TOPIC", topic), Acl(user.principal, "DESCRIBE", "TOPIC", topic)])

    async def produce() -> int:
        p = AIOKafkaProducer(bootstrap_servers=b.sasl_bootstrap_servers, request_timeout_ms=10000,
                             **_sasl_kwargs(b, name, user.password, "SCRAM-SHA-512"))
        await p.start()
        try:
            return (await asyncio.wait_for(p.send_and_wait(topic, b"before revocation"), 30)).offset
        finally:
            await p.stop()

    assert asyncio.run(produce()) == 0
    for mech in user.mechanisms:
        asyncio.run(_login(b, name, user.password, mech))
    b.remove_scram_user(name)
    assert name not in b.users
    for mech in user.mechanisms:
        with pytest.raises(SaslAuthenticationFailed):
            asyncio.run(_login(b, name, user.password, mech))
        assert b.scram_login(name, user.password, mech) is False
    w = b.writer                                   # everyone else still logs in
    assert all(b.scram_login(w.name, w.password, m) for m in w.mechanisms)
    asyncio.run(_login(b, w.name, w.password, "SCRAM-SHA-256"))


def test_kafka_sasl_peer_material(kafka_sasl_broker: KafkaBroker) -> None:
    """The certificate names 127.0.0.1 and localhost and chains to ca_file only; wrong passwords are refused."""
    b = kafka_sasl_broker
    host, port = b.sasl_bootstrap_servers.rsplit(":", 1)
    for name in ("127.0.0.1", "localhost"):
        ctx = ssl.create_default_context(cafile=str(b.ca_file))
        with socket.create_connection((host, int(port)), timeout=5) as raw, \
                ctx.wrap_socket(raw, server_hostname=name) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")
    assert b.ca_file.read_bytes() != b.wrong_ca_file.read_bytes()
    assert b.writer.password != b.reader.password
    assert b.scram_login(b.writer.name, b.writer.password + "x", "SCRAM-SHA-256") is False
    assert b.scram_login(b.reader.name, b.reader.password, "SCRAM-SHA-512") is True
    kinds = {(a.principal, a.operation, a.resource_type) for a in b.describe_acls()}
    assert ("User:bob", "READ", "TOPIC") in kinds and not {k for k in kinds if k[0] == "User:bob" and k[1] in ("WRITE", "ALL")}


# ------------------------------------------------------------------------------------------------- otel


def test_otel_log_and_metric(otel_collector: OtelCollector) -> None:
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.grpc._log_exporter import OTLPLogExporter
    from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import SimpleLogRecordProcessor
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
    from opentelemetry.sdk.resources import Resource

    marker = uuid.uuid4().hex
    resource = Resource.create({"service.name": "hostwall-smoke", "smoke.run": marker})

    logs = LoggerProvider(resource=resource)
    logs.add_log_record_processor(SimpleLogRecordProcessor(
        OTLPLogExporter(endpoint=otel_collector.grpc_endpoint, insecure=True, timeout=10)))
    logs.get_logger("hostwall.smoke").emit(body=f"flow denied {marker}", severity_number=SeverityNumber.WARN,
                                          severity_text="WARN",
                                          attributes={"source.ip": "10.0.0.1", "destination.port": 22})
    logs.shutdown()

    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=otel_collector.grpc_endpoint, insecure=True, timeout=10),
        export_interval_millis=60_000)
    meters = MeterProvider(resource=resource, metric_readers=[reader])
    counter = meters.get_meter("hostwall.smoke").create_counter("hostwall.smoke.drops", unit="1")
    counter.add(7, {"reason": "policy"})
    assert meters.force_flush(timeout_millis=10_000)
    meters.shutdown()

    [rec] = otel_collector.wait_for_log_records(lambda r: r.get("body_value") == f"flow denied {marker}")
    assert rec["attrs"] == {"source.ip": "10.0.0.1", "destination.port": 22}
    assert rec["severityText"] == "WARN" and rec["resource_attrs"]["smoke.run"] == marker

    [metric, *_] = otel_collector.wait_for_metric("hostwall.smoke.drops")
    point = metric["sum"]["dataPoints"][0]
    assert int(point["asInt"]) == 7 and metric["sum"]["isMonotonic"]

    lines = otel_collector.wait_for_prometheus("hostwall_smoke_drops_total")
    assert any('reason="policy"' in line and line.rsplit(" ", 1)[-1] == "7" for line in lines), lines

    # The collector counts what it accepted: what the sink tests will use to check delivery.
    otel_collector.wait_for_prometheus("otelcol_receiver_accepted_log_records", url=otel_collector.telemetry_url)


# ------------------------------------------------------------------------------------------- prometheus


class _Target(http.server.BaseHTTPRequestHandler):
    body = b"# TYPE hostwall_smoke_value gauge\nhostwall_smoke_value{kind=\"test\"} 42\n"

    def do_GET(self) -> None:
        if self.path != "/metrics":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def metrics_target() -> Iterator[str]:
    (port,) = free_ports(1)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Target)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_prometheus_scrapes_target(prometheus_server: PrometheusServer, metrics_target: str) -> None:
    prometheus_server.set_targets({"smoke": [metrics_target]}, replace=False)
    prometheus_server.wait_for_targets_up("smoke")
    [series] = prometheus_server.wait_for_query('hostwall_smoke_value{job="smoke"}')
    assert series["metric"]["kind"] == "test" and series["metric"]["instance"] == metrics_target
    assert float(series["value"][1]) == 42.0
    assert prometheus_server.query_value('sum(hostwall_smoke_value{job="smoke"})') == 42.0


def test_prometheus_scrapes_collector(prometheus_server: PrometheusServer, otel_collector: OtelCollector) -> None:
    """The chain the dashboards rely on: OTLP metric -> collector's prometheus exporter -> Prometheus."""
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{otel_collector.http_endpoint}/v1/metrics", timeout=10),
        export_interval_millis=60_000)
    meters = MeterProvider(metric_readers=[reader])
    meters.get_meter("hostwall.smoke").create_up_down_counter("hostwall.smoke.backlog").add(3)
    assert meters.force_flush(timeout_millis=10_000)
    meters.shutdown()

    prometheus_server.set_targets({"otelcol": [otel_collector.prometheus_target]}, replace=False)
    prometheus_server.wait_for_targets_up("otelcol")
    t0 = time.monotonic()
    [series] = prometheus_server.wait_for_query('hostwall_smoke_backlog{job="otelcol"}')
    assert float(series["value"][1]) == 3.0, (series, time.monotonic() - t0)


def test_kafka_cluster_ids_never_look_like_an_option():
    """StorageTool's parser took an id starting with '-' for an option and the broker never started."""
    ids = [kafka_cluster_id() for _ in range(3000)]        # a leading '-' is 1 draw in 64
    assert not [i for i in ids if i.startswith("-")]
    assert all(len(base64.urlsafe_b64decode(i + "==")) == 16 for i in ids) and len(set(ids)) == len(ids)


# ----------------------------------------------------------------------------------------- alertmanager


def test_alertmanager_starts_and_answers(alertmanager_factory) -> None:
    am: Alertmanager = alertmanager_factory()
    st = am.status()
    assert st["versionInfo"]["version"].startswith("0."), st["versionInfo"]
    assert st["cluster"]["status"] == "disabled"                 # no gossip port, nothing but 127.0.0.1
    assert "webhook" in st["config"]["original"]                  # the config this test wrote
    assert am.alerts() == [] and am.alert_groups() == []
    am.post_alerts([alert("PeerSmokeApi", instance="api-test", severity="warning")])
    [a] = am.wait_for_alerts(lambda alerts: alerts, what="the posted alert")
    assert a["labels"] == {"alertname": "PeerSmokeApi", "instance": "api-test", "severity": "warning"}
    assert a["status"]["state"] == "active" and [r["name"] for r in a["receivers"]] == ["webhook"]


def test_alertmanager_notifies_the_webhook(alertmanager_factory, webhook_receiver: WebhookReceiver) -> None:
    """A posted alert reaches the receiver as a firing notification; ending it sends the resolved one."""
    am: Alertmanager = alertmanager_factory(webhook_config(webhook_receiver.url))
    smoke = alert("PeerSmokeWebhook", instance="hook-test", severity="warning",
                  annotations={"summary": "smoke", "runbook_url": "http://127.0.0.1/rb.md"}, starts_at=time.time() - 60)
    am.post_alerts([smoke])
    [n] = webhook_receiver.wait_for(lambda ns: ns, what="the firing notification")
    assert n.path == "/hook" and n.receiver == "webhook" and n.status == "firing" and n.body["version"] == "4"
    assert n.body["groupLabels"] == {"alertname": "PeerSmokeWebhook", "instance": "hook-test"}
    [a] = n.alerts
    assert a["labels"]["severity"] == "warning" and a["annotations"]["runbook_url"] == "http://127.0.0.1/rb.md"

    am.post_alerts([{**smoke, "endsAt": rfc3339(time.time())}])
    resolved: list[Notification] = webhook_receiver.wait_for(
        lambda ns: [x for x in ns if x.status == "resolved"], what="the resolved notification")
    assert resolved[0].alert_labels("alertname") == ["PeerSmokeWebhook"]


def test_prometheus_sends_its_alerts_to_alertmanager(prometheus_server_factory, alertmanager_factory,
                                                     webhook_receiver: WebhookReceiver, tmp_path) -> None:
    """The chain the deployment relies on: a rule fires in Prometheus -> Alertmanager -> receiver."""
    rules = tmp_path / "smoke.rules.yml"
    rules.write_text("groups:\n- name: smoke\n  rules:\n  - alert: PeerSmokeRule\n    expr: vector(1)\n"
                     "    labels: {severity: warning, service: smoke}\n"
                     "    annotations: {summary: 'value {{ $value }}'}\n")
    am: Alertmanager = alertmanager_factory(webhook_config(webhook_receiver.url, group_by=("alertname",)))
    prom = prometheus_server_factory(None, rule_files=[rules], alertmanagers=[am.url])
    assert prom.config()["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == [f"127.0.0.1:{am.port}"]
    [n] = webhook_receiver.wait_for(lambda ns: ns, timeout=60, what="PeerSmokeRule from Prometheus")
    [a] = n.alerts
    assert a["labels"] == {"alertname": "PeerSmokeRule", "severity": "warning", "service": "smoke"}
    assert a["annotations"] == {"summary": "value 1"} and "/graph?g0.expr=vector%281%29" in a["generatorURL"]


def test_a_missing_alertmanager_says_how_to_install_it(monkeypatch) -> None:
    monkeypatch.setenv("HOSTWALL_ALERTMANAGER", "/nonexistent/prometheus-alertmanager")
    with pytest.raises(PeerNotInstalled, match="run scripts/setup-peers.sh"):
        alertmanager_binary()
