"""pytest fixtures for the real peers; load with ``pytest_plugins = ["tests.peers.fixtures"]`` in tests/conftest.py.

Session-scoped, shared by every test of the run (started on first use, stopped at the end):
    kafka_broker       -> tests.peers.kafka.KafkaBroker        (.bootstrap_servers, .create_topic(), ...)
    kafka_sasl_broker  -> KafkaBroker(sasl_ssl=True, auto_create_topics=False)
                                                               (.sasl_bootstrap_servers, .ca_file, .writer, ...)
    otel_collector     -> tests.peers.otelcol.OtelCollector    (.grpc_endpoint, .http_endpoint, .prometheus_url, ...)
    prometheus_server  -> tests.peers.prometheus.PrometheusServer (.url, .query(), .set_targets(), ...)
Function-scoped factories, for tests that need a peer of their own (outage tests that stop/kill a broker,
a collector with other config, Prometheus with specific targets); whatever they made is closed after the test:
    kafka_broker_factory(**KafkaBroker kwargs)            -> started KafkaBroker
    otel_collector_factory(**OtelCollector kwargs)        -> started OtelCollector
    prometheus_server_factory(targets, **kwargs)          -> started PrometheusServer
    alertmanager_factory(config, **kwargs)                -> started Alertmanager (tests.peers.alertmanager)
    webhook_receiver                                      -> WebhookReceiver on 127.0.0.1 (what Alertmanager posts)

Do not stop the shared ``kafka_broker``: use ``kafka_broker_factory`` for outages. A peer that is not
installed makes the test FAIL (not skip) with "run scripts/setup-peers.sh".
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any, TypeVar

import pytest

from . import PeerBase, PeerError, PeerNotInstalled
from .alertmanager import Alertmanager, WebhookReceiver
from .kafka import KafkaBroker
from .otelcol import OtelCollector
from .prometheus import PrometheusServer

P = TypeVar("P", bound=PeerBase)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "peers: uses a real Kafka / OTel Collector / Prometheus / Alertmanager (scripts/setup-peers.sh)")


def start_peer(cls: Callable[..., P], *args: Any, **kwargs: Any) -> P:
    """Construct and start a peer; turn "not installed" and start failures into test failures.
    For a peer of another scope than these fixtures' (e.g. a module fixture's own Prometheus)."""
    problem = None
    try:
        peer = cls(*args, **kwargs)
    except PeerNotInstalled as e:
        problem = str(e)
    else:
        try:
            peer.start()
        except (PeerError, TimeoutError) as e:
            peer.close()
            problem = f"{cls.__name__} did not start: {e}"
    if problem is not None:  # outside the except blocks: no chained traceback noise
        pytest.fail(problem, pytrace=False)
    return peer


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[KafkaBroker]:
    """One KRaft broker for the session (auto-create on, 1 partition default). Never stop it in a test:
    outage tests use ``kafka_broker_factory``."""
    with start_peer(KafkaBroker) as broker:
        yield broker


@pytest.fixture(scope="session")
def kafka_sasl_broker() -> Iterator[KafkaBroker]:
    """One KRaft broker for the session with a SASL_SSL listener (SCRAM-SHA-256/512, throwaway CA, ACLs
    with a writer and a read-only user) next to PLAINTEXT, topic auto-creation off. Tests revoke users
    they added themselves (add_scram_user), never ``writer`` / ``reader``."""
    with start_peer(KafkaBroker, sasl_ssl=True, auto_create_topics=False) as broker:
        yield broker


@pytest.fixture(scope="session")
def otel_collector() -> Iterator[OtelCollector]:
    """One collector for the session; records of all tests land in the same files: filter by a marker
    (e.g. a unique resource attribute) rather than counting everything."""
    with start_peer(OtelCollector) as collector:
        yield collector


@pytest.fixture(scope="session")
def prometheus_server() -> Iterator[PrometheusServer]:
    """Starts with no scrape targets; tests call ``set_targets(..., replace=False)`` to add their jobs."""
    with start_peer(PrometheusServer) as server:
        yield server


def _factory(cls: Callable[..., P]) -> Callable[..., Iterator[Callable[..., P]]]:
    def fixture() -> Iterator[Callable[..., P]]:
        with ExitStack() as made:  # closes them in reverse order
            yield lambda *args, **kwargs: made.enter_context(start_peer(cls, *args, **kwargs))

    fixture.__doc__ = f"Make started {cls.__name__}s for this test only; all are closed after it."
    return fixture


kafka_broker_factory = pytest.fixture(_factory(KafkaBroker), name="kafka_broker_factory")
otel_collector_factory = pytest.fixture(_factory(OtelCollector), name="otel_collector_factory")
prometheus_server_factory = pytest.fixture(_factory(PrometheusServer), name="prometheus_server_factory")
alertmanager_factory = pytest.fixture(_factory(Alertmanager), name="alertmanager_factory")


@pytest.fixture
def webhook_receiver() -> Iterator[WebhookReceiver]:
    """An HTTP server on 127.0.0.1 recording every notification POST (``.url``, ``.wait_for(...)``)."""
    with WebhookReceiver() as receiver:
        yield receiver
