"""A real Apache Kafka broker (KRaft combined mode, one node) on 127.0.0.1 for tests.

    broker = KafkaBroker()          # finds the jars cached by scripts/setup-peers.sh
    broker.start()                  # formats storage on first start; waits for a real Metadata answer
    broker.create_topic("flows", partitions=3)
    ... aiokafka clients on broker.bootstrap_servers ...
    broker.stop(); broker.start()   # outage: same ports, same data dir, topics and offsets kept
    broker.kill()                   # crash (SIGKILL) instead of a controlled shutdown
    broker.close()                  # stop + remove the temp folder

Readiness and topic creation speak the Kafka protocol directly (ApiVersions v0, Metadata v4, CreateTopics
v2: plain, non-flexible versions every Kafka 4.x broker serves), so this module needs no client library
and no event loop, and every call has a socket deadline.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import subprocess
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import (
    SETUP_HINT,
    PeerBase,
    PeerError,
    PeerNotInstalled,
    PeerProcess,
    cache_dir,
    declared_version,
    file_tail,
    free_ports,
    repo_root,
    wait_until,
)

__all__ = ["KafkaBroker", "kafka_home", "kafka_version"]

_API_METADATA, _API_VERSIONS, _API_CREATE_TOPICS = 3, 18, 19
_ERR_TOPIC_ALREADY_EXISTS = 36


def kafka_version() -> str:
    """The Kafka version scripts/setup-peers.sh installs (its ``KAFKA_VERSION=`` line)."""
    return declared_version(repo_root() / "scripts" / "setup-peers.sh", r"^KAFKA_VERSION=(\S+)")


def kafka_home() -> Path:
    """Folder with ``libs/*.jar``: ``$HOSTWALL_KAFKA_HOME`` or ``$HOSTWALL_CACHE/kafka/<version>``."""
    env = os.environ.get("HOSTWALL_KAFKA_HOME")
    home = Path(env) if env else cache_dir() / "kafka" / kafka_version()
    complete = env or (home / ".installed").exists()  # the script writes the stamp last
    if not complete or not any((home / "libs").glob("kafka_2.13-*.jar")):
        raise PeerNotInstalled(f"Kafka {kafka_version()} is not installed at {home}: {SETUP_HINT}")
    return home


def _java() -> str:
    java = os.environ.get("JAVA") or shutil.which("java")
    if not java:
        raise PeerNotInstalled(f"no java in PATH: {SETUP_HINT}")
    return java


# ------------------------------------------------------------------------------------- wire protocol


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def i8(self, v: int) -> _Writer:
        self.parts.append(struct.pack(">b", v))
        return self

    def i16(self, v: int) -> _Writer:
        self.parts.append(struct.pack(">h", v))
        return self

    def i32(self, v: int) -> _Writer:
        self.parts.append(struct.pack(">i", v))
        return self

    def string(self, v: str | None) -> _Writer:
        if v is None:
            return self.i16(-1)
        b = v.encode()
        self.i16(len(b))
        self.parts.append(b)
        return self

    def bytes(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def _take(self, fmt: str):
        (v,) = struct.unpack_from(fmt, self.data, self.pos)
        self.pos += struct.calcsize(fmt)
        return v

    def i8(self) -> int:
        return self._take(">b")

    def i16(self) -> int:
        return self._take(">h")

    def i32(self) -> int:
        return self._take(">i")

    def string(self) -> str | None:
        n = self.i16()
        if n < 0:
            return None
        v = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return v

    def array(self, item):
        n = self.i32()
        return [] if n < 0 else [item() for _ in range(n)]


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("broker closed the connection")
        buf += chunk
    return bytes(buf)


class _Conn:
    """One blocking connection with a deadline per request (request header v1, response header v0)."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.settimeout(timeout)
        self.correlation = 0

    def request(self, api_key: int, version: int, body: bytes) -> _Reader:
        self.correlation += 1
        header = _Writer().i16(api_key).i16(version).i32(self.correlation).string("hostwall-tests").bytes()
        msg = header + body
        self.sock.sendall(struct.pack(">i", len(msg)) + msg)
        (size,) = struct.unpack(">i", _recv_exact(self.sock, 4))
        r = _Reader(_recv_exact(self.sock, size))
        if r.i32() != self.correlation:
            raise ConnectionError("correlation id mismatch")
        return r

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> _Conn:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass
class PartitionMetadata:
    partition: int
    leader: int
    replicas: list[int]
    isr: list[int]
    error_code: int


@dataclass
class TopicMetadata:
    name: str
    error_code: int
    internal: bool
    partitions: list[PartitionMetadata] = field(default_factory=list)

    @property
    def ready(self) -> bool:
        return self.error_code == 0 and bool(self.partitions) and all(
            p.error_code == 0 and p.leader >= 0 for p in self.partitions)


@dataclass
class ClusterMetadata:
    brokers: dict[int, tuple[str, int]]
    cluster_id: str | None
    controller_id: int
    topics: dict[str, TopicMetadata]


def _api_versions(conn: _Conn) -> dict[int, tuple[int, int]]:
    r = conn.request(_API_VERSIONS, 0, b"")
    err = r.i16()
    apis = r.array(lambda: (r.i16(), r.i16(), r.i16()))
    if err:
        raise PeerError(f"ApiVersions error {err}")
    return {k: (lo, hi) for k, lo, hi in apis}


def _require(apis: Mapping[int, tuple[int, int]], key: int, version: int, name: str) -> None:
    lo, hi = apis.get(key, (1, 0))
    if not lo <= version <= hi:
        raise PeerError(f"broker does not serve {name} v{version} (serves v{lo}..v{hi}); update tests/peers/kafka.py")


def _metadata(conn: _Conn, topics: Sequence[str] | None) -> ClusterMetadata:
    w = _Writer()
    if topics is None:
        w.i32(-1)
    else:
        w.i32(len(topics))
        for t in topics:
            w.string(t)
    w.i8(0)  # allow_auto_topic_creation: never as a side effect of a probe
    r = conn.request(_API_METADATA, 4, w.bytes())
    r.i32()  # throttle_time_ms
    brokers = {}
    for node, host, port, _rack in r.array(lambda: (r.i32(), r.string(), r.i32(), r.string())):
        brokers[node] = (host, port)
    cluster_id = r.string()
    controller = r.i32()

    def partition() -> PartitionMetadata:
        err, idx, leader = r.i16(), r.i32(), r.i32()
        replicas = r.array(r.i32)
        isr = r.array(r.i32)
        return PartitionMetadata(idx, leader, replicas, isr, err)

    def topic() -> TopicMetadata:
        err, name, internal = r.i16(), r.string(), bool(r.i8())
        return TopicMetadata(name or "", err, internal, r.array(partition))

    return ClusterMetadata(brokers, cluster_id, controller, {t.name: t for t in r.array(topic)})


# ------------------------------------------------------------------------------------------ the broker


def kafka_cluster_id() -> str:
    """A Kafka cluster id as StorageTool random-uuid prints it: 16 random bytes, base64url without
    padding, redrawn (as Kafka's Uuid.randomUuid does) while it starts with '-', which the tool's
    argument parser would take for an option (1 draw in 64)."""
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cid.startswith("-"):
            return cid


class KafkaBroker(PeerBase):
    """One KRaft combined-mode node (broker + controller) on 127.0.0.1, data in ``workdir/data``.

    Ports and the cluster id are chosen once, at the first start(), and kept across stop()/start(), so
    clients configured with :attr:`bootstrap_servers` reconnect after an outage. JVM heap is capped
    (``heap``) to fit the 2-core/24 GiB machines next to the test suite.
    """

    name = "kafka"
    start_timeout = 120.0

    def __init__(self, *, workdir: str | os.PathLike[str] | None = None, auto_create_topics: bool = True,
                 num_partitions: int = 1, heap: str = "512m", config: Mapping[str, object] | None = None,
                 home: Path | None = None) -> None:
        self.home = Path(home) if home else kafka_home()  # raises PeerNotInstalled before any temp dir exists
        self.java = _java()
        super().__init__(workdir)
        self.version = kafka_version()
        self.auto_create_topics = auto_create_topics
        self.num_partitions = num_partitions
        self.heap = heap
        self.extra_config = dict(config or {})
        self.host = "127.0.0.1"
        self.port, self.controller_port = free_ports(2)
        self.cluster_id: str | None = None
        self.data_dir = self.workdir / "data"
        self.properties_path = self.workdir / "server.properties"
        self.starts = 0

    # -- connection info
    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"`` for aiokafka's ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def classpath(self) -> str:
        return str(self.home / "libs" / "*")

    # -- configuration
    def _server_properties(self) -> dict[str, object]:
        props: dict[str, object] = {
            "process.roles": "broker,controller",
            "node.id": 1,
            "controller.quorum.bootstrap.servers": f"{self.host}:{self.controller_port}",
            "listeners": f"PLAINTEXT://{self.host}:{self.port},CONTROLLER://{self.host}:{self.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{self.host}:{self.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "num.partitions": self.num_partitions,
            "auto.create.topics.enable": str(self.auto_create_topics).lower(),
            "offsets.topic.replication.factor": 1,
            "offsets.topic.num.partitions": 3,
            "transaction.state.log.replication.factor": 1,
            "transaction.state.log.min.isr": 1,
            "transaction.state.log.num.partitions": 3,
            "share.coordinator.state.topic.replication.factor": 1,
            "share.coordinator.state.topic.min.isr": 1,
            "group.initial.rebalance.delay.ms": 0,
            # After kill() the controller refuses the restarted broker until the old session expires
            # (DUPLICATE_BROKER_REGISTRATION): keep that short so crash tests restart in seconds.
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 500,
        }
        props.update(self.extra_config)
        return props

    def _write_config(self) -> None:
        lines = [f"{k}={v}" for k, v in self._server_properties().items()]
        self.properties_path.write_text("# generated by tests/peers/kafka.py\n" + "\n".join(lines) + "\n")
        (self.workdir / "log4j2.properties").write_text(
            "status = warn\n"
            "appender.file.type = File\n"
            "appender.file.name = FILE\n"
            f"appender.file.fileName = {self.workdir / 'server.log'}\n"
            "appender.file.layout.type = PatternLayout\n"
            "appender.file.layout.pattern = [%d] %p %m (%c)%n\n"
            "rootLogger.level = INFO\n"
            "rootLogger.appenderRef.file.ref = FILE\n"
            "logger.kafka.name = kafka\nlogger.kafka.level = INFO\n"
            "logger.state.name = state.change.logger\nlogger.state.level = WARN\n")

    def _jvm(self, main: str, *args: object, short_lived: bool = False) -> list[str]:
        if short_lived:  # a CLI tool: start fast, small heap
            opts = ["-Xmx256m", "-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC"]
        else:  # the broker: Kafka's own default JVM options, with a capped heap
            opts = [f"-Xms{self.heap}", f"-Xmx{self.heap}", "-XX:+UseG1GC", "-XX:MaxGCPauseMillis=20",
                    "-XX:InitiatingHeapOccupancyPercent=35", "-XX:+ExplicitGCInvokesConcurrent"]
        return [self.java, *opts, "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self.workdir / 'log4j2.properties'}",
                "-cp", self.classpath, main, *[str(a) for a in args]]

    def _format(self) -> None:
        self.cluster_id = kafka_cluster_id()
        self._write_config()
        proc = subprocess.run(
            self._jvm("kafka.tools.StorageTool", "format", "--standalone", "-t", self.cluster_id,
                      "-c", self.properties_path, short_lived=True),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, text=True)
        if proc.returncode != 0:
            raise PeerError(f"kafka: StorageTool format failed ({proc.returncode}):\n{proc.stdout[-3000:]}")

    # -- life cycle
    def _launch(self, timeout: float) -> None:
        """Start (formatting storage on the first start) and wait until the broker answers Metadata with
        itself registered and a controller elected. Same ports and data dir on every start."""
        if self.cluster_id is None:
            self._format()
        self.process = PeerProcess(self._jvm("kafka.Kafka", self.properties_path), name="kafka",
                                   log_path=self.workdir / "stdout.log", cwd=self.workdir)
        self.starts += 1
        self._wait_ready(self._ready, timeout, f"Metadata from {self.bootstrap_servers}")

    def _ready(self) -> bool:
        md = self.metadata(topics=[], timeout=2.0)
        return bool(md.brokers) and md.controller_id >= 0

    def stop(self, timeout: float = 30.0) -> None:
        """Controlled shutdown (SIGTERM), SIGKILL after ``timeout``. Data dir and ports are kept."""
        super().stop(timeout)

    def kill(self) -> None:
        """Crash the broker (SIGKILL, no controlled shutdown). start() brings it back on the same data."""
        if self.process is not None:
            self.process.kill()
            self.process = None

    @property
    def server_log(self) -> Path:
        return self.workdir / "server.log"

    def log_tail(self, lines: int = 40) -> str:
        out = super().log_tail(lines)
        if self.server_log.exists():
            out += "\n" + file_tail(self.server_log, lines)
        return out

    # -- admin
    def metadata(self, topics: Sequence[str] | None = None, timeout: float = 5.0) -> ClusterMetadata:
        """A real Metadata v4 request (``topics=None``: all topics; ``[]``: none)."""
        with _Conn(self.host, self.port, timeout) as conn:
            apis = _api_versions(conn)
            _require(apis, _API_METADATA, 4, "Metadata")
            return _metadata(conn, topics)

    def create_topics(self, topics: Mapping[str, int] | Iterable[str], *, replication_factor: int = 1,
                      config: Mapping[str, str] | None = None, timeout: float = 30.0,
                      exist_ok: bool = True) -> None:
        """Create topics (``{name: partitions}`` or names with :attr:`num_partitions`) and wait until every
        partition has a leader. ``config`` applies to all, e.g. ``{"retention.ms": "60000"}``."""
        spec = dict(topics) if isinstance(topics, Mapping) else {t: self.num_partitions for t in topics}
        w = _Writer().i32(len(spec))
        for name, partitions in spec.items():
            w.string(name).i32(partitions).i16(replication_factor).i32(0)  # no manual assignments
            w.i32(len(config or {}))
            for k, v in (config or {}).items():
                w.string(k).string(str(v))
        w.i32(int(timeout * 1000)).i8(0)  # timeout_ms, validate_only
        with _Conn(self.host, self.port, timeout + 5) as conn:
            _require(_api_versions(conn), _API_CREATE_TOPICS, 2, "CreateTopics")
            r = conn.request(_API_CREATE_TOPICS, 2, w.bytes())
            r.i32()  # throttle_time_ms
            results = r.array(lambda: (r.string(), r.i16(), r.string()))
        errors = [(n, c, m) for n, c, m in results
                  if c and not (exist_ok and c == _ERR_TOPIC_ALREADY_EXISTS)]
        if errors:
            raise PeerError(f"kafka: CreateTopics failed: {errors}")
        names = list(spec)

        def leaders_ready() -> bool:
            topics = self.metadata(names, timeout=2.0).topics
            return len(topics) == len(names) and all(t.ready for t in topics.values())

        wait_until(leaders_ready, timeout, f"leaders for topics {names}")

    def create_topic(self, name: str, partitions: int | None = None, **kw) -> None:
        self.create_topics({name: partitions or self.num_partitions}, **kw)

    # -- Kafka's own tools (e.g. ProducerPerformance for the kafka benchmark)
    def tool_argv(self, main_class: str, *args: object, heap: str = "256m") -> list[str]:
        """argv to run a Kafka tool class on the cached jars (log4j: WARN and up to stderr), e.g.
        ``tool_argv("org.apache.kafka.tools.ProducerPerformance", "--topic", "t", "--num-records", 100000,
        "--record-size", 200, "--throughput", -1, "--producer-props", f"bootstrap.servers={b.bootstrap_servers}")``."""
        log4j = self.workdir / "log4j2-tools.properties"
        if not log4j.exists():
            log4j.write_text(
                "status = warn\nappender.err.type = Console\nappender.err.name = ERR\n"
                "appender.err.target = SYSTEM_ERR\nappender.err.layout.type = PatternLayout\n"
                "appender.err.layout.pattern = [%d] %p %m (%c)%n\n"
                "rootLogger.level = WARN\nrootLogger.appenderRef.err.ref = ERR\n")
        return [self.java, f"-Xmx{heap}", "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={log4j}",
                "-cp", self.classpath, main_class, *[str(a) for a in args]]

    def run_tool(self, main_class: str, *args: object, timeout: float = 300.0,
                 heap: str = "256m") -> subprocess.CompletedProcess[str]:
        """Run a Kafka tool class to completion (killed after ``timeout`` s); stdout/stderr captured as text."""
        return subprocess.run(self.tool_argv(main_class, *args, heap=heap), capture_output=True, text=True,
                              timeout=timeout, cwd=self.workdir)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<KafkaBroker {self.version} {self.bootstrap_servers} {state} {self.workdir}>"
