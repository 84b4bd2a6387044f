"""A real Apache Kafka broker (KRaft combined mode, one node) on 127.0.0.1 for tests.

    broker = KafkaBroker()          # finds the jars cached by scripts/setup-peers.sh
    broker.start()                  # formats storage on first start; waits for a real Metadata answer
    broker.create_topic("flows", partitions=3)
    ... aiokafka clients on broker.bootstrap_servers ...
    broker.stop(); broker.start()   # outage: same ports, same data dir, topics and offsets kept
    broker.kill()                   # crash (SIGKILL) instead of a controlled shutdown
    broker.close()                  # stop + remove the temp folder

    secure = KafkaBroker(sasl_ssl=True)   # + a SASL_SSL listener (SCRAM-SHA-256/512, throwaway CA, ACLs)
    secure.sasl_bootstrap_servers, secure.ca_file, secure.wrong_ca_file
    secure.writer / secure.reader   # ScramUser: WRITE on every topic / READ only (authorization failures)
    secure.add_scram_user("carol"); secure.remove_scram_user("alice")   # at runtime, waits until in effect

Readiness, topic creation, ACLs and SCRAM logins speak the Kafka protocol directly (ApiVersions v0,
Metadata v4, CreateTopics v2, CreateAcls/DescribeAcls v1, SaslHandshake v1, SaslAuthenticate v1: plain,
non-flexible versions every Kafka 4.x broker serves), so this module needs no client library and no event
loop, and every call has a socket deadline. SCRAM users are changed with Kafka's own ConfigCommand.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import secrets
import shutil
import socket
import ssl
import struct
import subprocess
import time
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
from .kafka_security import SCRAM_MECHANISMS, ScramClient, make_test_pki

__all__ = ["SCRAM_MECHANISMS", "Acl", "KafkaBroker", "ScramUser", "kafka_home", "kafka_version"]

_API_METADATA, _API_VERSIONS, _API_CREATE_TOPICS = 3, 18, 19
_API_SASL_HANDSHAKE, _API_DESCRIBE_ACLS, _API_CREATE_ACLS, _API_SASL_AUTHENTICATE = 17, 29, 30, 36
_ERR_TOPIC_ALREADY_EXISTS = 36
_ERR_SASL_AUTHENTICATION_FAILED = 58


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

    def blob(self, v: bytes) -> _Writer:
        self.i32(len(v))
        self.parts.append(v)
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

    def i64(self) -> int:
        return self._take(">q")

    def string(self) -> str | None:
        n = self.i16()
        if n < 0:
            return None
        v = self.data[self.pos:self.pos + n].decode()
        self.pos += n
        return v

    def blob(self) -> bytes:
        n = self.i32()
        v = self.data[self.pos:self.pos + max(n, 0)]
        self.pos += max(n, 0)
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
    """One blocking connection with a deadline per request (request header v1, response header v0);
    over TLS when ``tls`` is given (the server certificate is verified against it for ``host``)."""

    def __init__(self, host: str, port: int, timeout: float, tls: ssl.SSLContext | None = None) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls is not None:
            try:
                sock = tls.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
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


# ------------------------------------------------------------------------------------ ACLs and SCRAM

_RESOURCE_TYPES = {"TOPIC": 2, "GROUP": 3, "CLUSTER": 4, "TRANSACTIONAL_ID": 5}
_PATTERN_TYPES = {"LITERAL": 3, "PREFIXED": 4}
_OPERATIONS = {"ALL": 2, "READ": 3, "WRITE": 4, "CREATE": 5, "DELETE": 6, "ALTER": 7, "DESCRIBE": 8,
               "CLUSTER_ACTION": 9, "DESCRIBE_CONFIGS": 10, "ALTER_CONFIGS": 11, "IDEMPOTENT_WRITE": 12}
_PERMISSIONS = {"DENY": 2, "ALLOW": 3}
_ANY = 1                                 # the "any" code of every ACL enum in a DescribeAcls filter


def _name_of(table: Mapping[str, int], code: int) -> str:
    return next((k for k, v in table.items() if v == code), str(code))


@dataclass(frozen=True)
class Acl:
    """One ACL binding, e.g. ``Acl("User:bob", "READ")`` (READ on every topic: resource name ``*``)."""
    principal: str
    operation: str                       # ALL | READ | WRITE | CREATE | DESCRIBE | IDEMPOTENT_WRITE | ...
    resource_type: str = "TOPIC"         # TOPIC | GROUP | CLUSTER | TRANSACTIONAL_ID
    resource_name: str = "*"             # "*": every resource of the type; CLUSTER: "kafka-cluster"
    pattern: str = "LITERAL"             # LITERAL | PREFIXED
    permission: str = "ALLOW"            # ALLOW | DENY
    host: str = "*"


@dataclass(frozen=True)
class ScramUser:
    name: str
    password: str
    mechanisms: tuple[str, ...] = SCRAM_MECHANISMS

    @property
    def principal(self) -> str:
        return f"User:{self.name}"


def _create_acls(conn: _Conn, acls: Sequence[Acl]) -> None:
    _require(_api_versions(conn), _API_CREATE_ACLS, 1, "CreateAcls")
    w = _Writer().i32(len(acls))
    for a in acls:
        w.i8(_RESOURCE_TYPES[a.resource_type]).string(a.resource_name).i8(_PATTERN_TYPES[a.pattern])
        w.string(a.principal).string(a.host).i8(_OPERATIONS[a.operation]).i8(_PERMISSIONS[a.permission])
    r = conn.request(_API_CREATE_ACLS, 1, w.bytes())
    r.i32()  # throttle_time_ms
    errors = [(a, code, msg) for a, (code, msg) in zip(acls, r.array(lambda: (r.i16(), r.string()))) if code]
    if errors:
        raise PeerError(f"kafka: CreateAcls failed: {errors}")


def _describe_acls(conn: _Conn) -> list[Acl]:
    _require(_api_versions(conn), _API_DESCRIBE_ACLS, 1, "DescribeAcls")
    body = (_Writer().i8(_ANY).string(None).i8(_ANY).string(None).string(None).i8(_ANY).i8(_ANY).bytes())
    r = conn.request(_API_DESCRIBE_ACLS, 1, body)
    r.i32()  # throttle_time_ms
    err, msg = r.i16(), r.string()
    if err:
        raise PeerError(f"kafka: DescribeAcls error {err}: {msg}")
    out: list[Acl] = []

    def resource() -> None:
        rtype, rname, pattern = r.i8(), r.string() or "", r.i8()
        for principal, host, op, perm in r.array(lambda: (r.string(), r.string(), r.i8(), r.i8())):
            out.append(Acl(principal or "", _name_of(_OPERATIONS, op), _name_of(_RESOURCE_TYPES, rtype), rname,
                           _name_of(_PATTERN_TYPES, pattern), _name_of(_PERMISSIONS, perm), host or ""))

    r.array(resource)
    return out


def _sasl_authenticate(conn: _Conn, token: bytes) -> tuple[int, str | None, bytes]:
    r = conn.request(_API_SASL_AUTHENTICATE, 1, _Writer().blob(token).bytes())
    err, msg, data = r.i16(), r.string(), r.blob()
    r.i64()  # session_lifetime_ms
    return err, msg, data


def _scram_login(conn: _Conn, mechanism: str, user: str, password: str) -> tuple[int, str | None]:
    """A full SCRAM exchange on a fresh connection: (0, None), or (Kafka error code, its message)."""
    apis = _api_versions(conn)
    _require(apis, _API_SASL_HANDSHAKE, 1, "SaslHandshake")
    _require(apis, _API_SASL_AUTHENTICATE, 1, "SaslAuthenticate")
    r = conn.request(_API_SASL_HANDSHAKE, 1, _Writer().string(mechanism).bytes())
    err, offered = r.i16(), r.array(r.string)
    if err:
        raise PeerError(f"kafka: SaslHandshake {mechanism}: error {err} (broker offers {offered})")
    scram = ScramClient(mechanism, user, password)
    err, msg, server_first = _sasl_authenticate(conn, scram.first())
    if err:
        return err, msg
    err, msg, server_final = _sasl_authenticate(conn, scram.final(server_first))
    if err:
        return err, msg
    scram.verify(server_final)
    return 0, None


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

    ``sasl_ssl=True`` adds a SASL_SSL listener (:attr:`sasl_bootstrap_servers`) taking SCRAM-SHA-256 and
    SCRAM-SHA-512, with a server certificate for 127.0.0.1/localhost from a throwaway CA (:attr:`ca_file`;
    :attr:`wrong_ca_file` is an unrelated CA), and turns on ACLs (StandardAuthorizer). The PLAINTEXT and
    controller listeners stay as they are and their principal (User:ANONYMOUS) is a super user, so the admin
    calls here and tests that use :attr:`bootstrap_servers` work unchanged. Two SCRAM users exist from the
    format on (``kafka-storage format --add-scram``), both mechanisms each, random passwords:
    :attr:`writer` (ALL on every topic and group, IDEMPOTENT_WRITE) and :attr:`reader` (READ on every topic
    and group, no WRITE: produce is an authorization failure). :meth:`add_scram_user` /
    :meth:`remove_scram_user` change users while the broker runs and return once a new connection sees it.
    """

    name = "kafka"
    start_timeout = 120.0

    def __init__(self, *, workdir: str | os.PathLike[str] | None = None, auto_create_topics: bool = True,
                 num_partitions: int = 1, heap: str = "512m", config: Mapping[str, object] | None = None,
                 home: Path | None = None, sasl_ssl: bool = False) -> None:
        self.home = Path(home) if home else kafka_home()  # raises PeerNotInstalled before any temp dir exists
        self.java = _java()
        super().__init__(workdir)
        self.version = kafka_version()
        self.auto_create_topics = auto_create_topics
        self.num_partitions = num_partitions
        self.heap = heap
        self.extra_config = dict(config or {})
        self.host = "127.0.0.1"
        self.port, self.controller_port, sasl_port = free_ports(3)
        self.cluster_id: str | None = None
        self.data_dir = self.workdir / "data"
        self.properties_path = self.workdir / "server.properties"
        self.starts = 0
        self.sasl_ssl = sasl_ssl
        self.sasl_port = sasl_port if sasl_ssl else None
        self.tls_dir = self.workdir / "tls"
        self._writer = ScramUser("alice", secrets.token_hex(12))
        self._reader = ScramUser("bob", secrets.token_hex(12))
        self.users: dict[str, ScramUser] = {u.name: u for u in (self._writer, self._reader)} if sasl_ssl else {}

    # -- connection info
    @property
    def bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"`` for aiokafka's ``bootstrap_servers``."""
        return f"{self.host}:{self.port}"

    @property
    def sasl_bootstrap_servers(self) -> str:
        """``"127.0.0.1:<port>"`` of the SASL_SSL listener (``sasl_ssl=True`` only)."""
        self._need_sasl()
        return f"{self.host}:{self.sasl_port}"

    @property
    def ca_file(self) -> Path:
        """PEM CA that signed the SASL_SSL listener's certificate (exists once started)."""
        self._need_sasl()
        return self.tls_dir / "ca.pem"

    @property
    def wrong_ca_file(self) -> Path:
        """PEM of a valid CA that signed nothing this broker presents: verification must fail with it."""
        self._need_sasl()
        return self.tls_dir / "other-ca.pem"

    @property
    def writer(self) -> ScramUser:
        """SCRAM user with ALL on every topic and group (and IDEMPOTENT_WRITE). Revoke a user of your own
        (:meth:`add_scram_user` + :meth:`create_acls`) rather than this one when the broker is shared."""
        self._need_sasl()
        return self._writer

    @property
    def reader(self) -> ScramUser:
        """SCRAM user with READ on every topic and group and no WRITE anywhere."""
        self._need_sasl()
        return self._reader

    def _need_sasl(self) -> None:
        if not self.sasl_ssl:
            raise PeerError("this KafkaBroker has no SASL_SSL listener: construct it with sasl_ssl=True")

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
        if self.sasl_ssl:
            listener = f"SASL_SSL://{self.host}:{self.sasl_port}"
            scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            props.update({
                "listeners": f"{props['listeners']},{listener}",
                "advertised.listeners": f"{props['advertised.listeners']},{listener}",
                "listener.security.protocol.map": f"{props['listener.security.protocol.map']},SASL_SSL:SASL_SSL",
                "listener.name.sasl_ssl.sasl.enabled.mechanisms": ",".join(SCRAM_MECHANISMS),
                **{f"listener.name.sasl_ssl.{m.lower()}.sasl.jaas.config": scram for m in SCRAM_MECHANISMS},
                "listener.name.sasl_ssl.ssl.keystore.type": "PEM",   # key + chain in one PEM file
                "listener.name.sasl_ssl.ssl.keystore.location": self.tls_dir / "server-keystore.pem",
                "listener.name.sasl_ssl.ssl.client.auth": "none",
                "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
                # PLAINTEXT and CONTROLLER connections (admin calls here, broker <-> controller) are ANONYMOUS.
                "super.users": "User:ANONYMOUS",
            })
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
        cluster_id = kafka_cluster_id()
        scram: list[str] = []
        if self.sasl_ssl:
            make_test_pki(self.tls_dir, hosts=(self.host, "localhost"))
            for u in self.users.values():
                for m in u.mechanisms:
                    scram += ["--add-scram", f"{m}=[name={u.name},password={u.password}]"]
        self._write_config()
        proc = subprocess.run(
            self._jvm("kafka.tools.StorageTool", "format", "--standalone", "-t", cluster_id,
                      "-c", self.properties_path, *scram, short_lived=True),
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120, text=True)
        if proc.returncode != 0:
            out = proc.stdout[-3000:]
            for u in self.users.values():
                out = out.replace(u.password, "***")
            raise PeerError(f"kafka: StorageTool format failed ({proc.returncode}):\n{out}")
        self.cluster_id = cluster_id

    # -- life cycle
    def _launch(self, timeout: float) -> None:
        """Start (formatting storage on the first start) and wait until the broker answers Metadata with
        itself registered and a controller elected. Same ports and data dir on every start."""
        deadline = time.monotonic() + timeout
        first = self.cluster_id is None
        if first:
            self._format()
        self.process = PeerProcess(self._jvm("kafka.Kafka", self.properties_path), name="kafka",
                                   log_path=self.workdir / "stdout.log", cwd=self.workdir)
        self.starts += 1
        self._wait_ready(self._ready, deadline - time.monotonic(), f"Metadata from {self.bootstrap_servers}")
        if self.sasl_ssl:
            if first:   # ACLs live in the metadata log: once is enough
                try:
                    self.create_acls(self._default_acls(), timeout=max(1.0, deadline - time.monotonic()))
                except (PeerError, TimeoutError, OSError) as e:
                    tail = self.log_tail()
                    self.stop()
                    raise PeerError(f"kafka: default ACLs: {e}\n{tail}") from None
            # The listener is up and takes SCRAM: a full login of a user that still has credentials.
            u = next(iter(self.users.values()), None)
            check = (lambda: all(self.scram_login(u.name, u.password, m) for m in u.mechanisms)) if u else \
                self._sasl_listener_up
            self._wait_ready(check, max(1.0, deadline - time.monotonic()),
                             f"SASL_SSL listener on {self.sasl_bootstrap_servers}")

    def _sasl_listener_up(self) -> bool:
        with _Conn(self.host, self.sasl_port, 2.0, tls=self.tls_context()) as conn:
            return bool(_api_versions(conn))

    def _default_acls(self) -> list[Acl]:
        w, r = self.writer.principal, self.reader.principal
        return [Acl(w, "ALL", "TOPIC"), Acl(w, "ALL", "GROUP"),
                Acl(w, "IDEMPOTENT_WRITE", "CLUSTER", "kafka-cluster"),
                Acl(r, "READ", "TOPIC"), Acl(r, "READ", "GROUP")]

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

    # -- SASL_SSL: ACLs and SCRAM users (sasl_ssl=True)
    def describe_acls(self, timeout: float = 5.0) -> list[Acl]:
        """Every ACL the broker's authorizer holds (DescribeAcls, answered from the broker's own copy)."""
        self._need_sasl()
        with _Conn(self.host, self.port, timeout) as conn:
            return _describe_acls(conn)

    def create_acls(self, acls: Iterable[Acl], timeout: float = 30.0) -> None:
        """Create ACLs and wait until the broker's authorizer lists all of them."""
        self._need_sasl()
        acls = list(acls)
        with _Conn(self.host, self.port, timeout) as conn:
            _create_acls(conn, acls)
        wait_until(lambda: set(acls) <= set(self.describe_acls(timeout=2.0)), timeout,
                   f"kafka: ACLs {acls} in effect")

    def tls_context(self, cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
        """A client TLS context that trusts ``cafile`` (default :attr:`ca_file`) and checks the host name."""
        ctx = ssl.create_default_context(cafile=str(cafile or self.ca_file))
        return ctx

    def scram_login(self, user: str, password: str, mechanism: str = "SCRAM-SHA-512",
                    timeout: float = 5.0) -> bool:
        """Authenticate on a fresh SASL_SSL connection: True when it works, False when the broker answers
        SASL_AUTHENTICATION_FAILED; anything else (TLS, connection, protocol) raises."""
        self._need_sasl()
        with _Conn(self.host, self.sasl_port, timeout, tls=self.tls_context()) as conn:
            code, msg = _scram_login(conn, mechanism, user, password)
        if code in (0, _ERR_SASL_AUTHENTICATION_FAILED):
            return code == 0
        raise PeerError(f"kafka: SCRAM {mechanism} login of {user}: error {code}: {msg}")

    def _config_command(self, *args: object, secret: str | None = None) -> None:
        proc = self.run_tool("kafka.admin.ConfigCommand", "--bootstrap-server", self.bootstrap_servers, *args,
                             timeout=120)
        if proc.returncode != 0:
            out = (proc.stdout + proc.stderr)[-3000:]
            raise PeerError(f"kafka: ConfigCommand failed ({proc.returncode}):\n"
                            f"{out.replace(secret, '***') if secret else out}")

    def add_scram_user(self, name: str, password: str | None = None,
                       mechanisms: Sequence[str] = SCRAM_MECHANISMS, timeout: float = 60.0) -> ScramUser:
        """Create (or re-key) SCRAM credentials while the broker runs (``kafka-configs --alter
        --add-config``), and wait until a new connection logs in with each mechanism. No ACLs are added:
        see :meth:`create_acls`."""
        self._need_sasl()
        user = ScramUser(name, password or secrets.token_hex(12), tuple(mechanisms))
        for m in user.mechanisms:    # one mechanism a request: the broker refuses a user twice in one
            self._config_command("--alter", "--add-config", f"{m}=[password={user.password}]",
                                 "--entity-type", "users", "--entity-name", name, secret=user.password)
        wait_until(lambda: all(self.scram_login(name, user.password, m) for m in user.mechanisms), timeout,
                   f"kafka: SCRAM login of {name} ({', '.join(user.mechanisms)})")
        self.users[name] = user
        return user

    def remove_scram_user(self, name: str, mechanisms: Sequence[str] | None = None,
                          timeout: float = 60.0) -> None:
        """Revoke SCRAM credentials while the broker runs (``kafka-configs --alter --delete-config``),
        and wait until a new connection with the old password is refused for each of them. Connections
        already authenticated stay open: Kafka checks credentials when a connection authenticates."""
        self._need_sasl()
        user = self.users[name]
        gone = tuple(mechanisms or user.mechanisms)
        for m in gone:
            self._config_command("--alter", "--delete-config", m, "--entity-type", "users", "--entity-name", name)
        wait_until(lambda: not any(self.scram_login(name, user.password, m) for m in gone), timeout,
                   f"kafka: SCRAM login of {name} refused ({', '.join(gone)})")
        left = tuple(m for m in user.mechanisms if m not in gone)
        if left:
            self.users[name] = dataclasses.replace(user, mechanisms=left)
        else:
            del self.users[name]

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
