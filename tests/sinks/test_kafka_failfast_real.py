"""Errors retrying cannot fix, with the real `hostwall-collector` process, a real pinned enforcer instance
and a real broker (docs/collector.md "Kafka, OTLP and self-metrics"):

- at start: an unreachable or unresolvable broker, a wrong SCRAM password, a CA that did not sign the
  broker's certificate — `run` exits 1 within 10 s with one line on stderr (what, which sink, what to do);
  `check-config --connect` says the same, one line per sink;
- while running: a SCRAM credential revoked on the broker turns the sink `failing` (status and
  metrics), logged once, while spooling goes on and the collector keeps running.

The SASL_SSL broker has SCRAM users, a throwaway CA and ACLs (tests/peers/kafka.py)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import yaml

from hostwall.lab.enforcer_proc import EnforcerProcess
from hostwall.lab.netns import REPO_ROOT, Lab, lab_available
from hostwall.lab.traffic import echo_servers, start_in
from tests.peers import free_ports, wait_until
from tests.peers.kafka import Acl, KafkaBroker

pytestmark = [pytest.mark.peers, pytest.mark.lab, pytest.mark.timeout(300)]
BOUND_S = 10.0
POLICY = REPO_ROOT / "examples" / "policy.yaml"


@pytest.fixture(scope="module")
def enforcer():
    ok, why = lab_available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    with Lab() as lab, EnforcerProcess(lab, POLICY) as enf:
        yield lab, enf


def topics(tag: str) -> dict:
    return {"flows_topic": f"f{tag}.flows", "anomalies_topic": f"f{tag}.anomalies", "audit_topic": f"f{tag}.audit"}


def write_config(path: Path, kafka: dict, **extra) -> Path:
    cfg = {"status_interval": "250ms", "kafka": {"connect_timeout": "8s", **kafka}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def collector(enf: EnforcerProcess, *args: str, timeout: float = 60.0) -> tuple[int, list[str], str, float]:
    """Run `hostwall-collector ARGS` as the operator would; (exit code, stderr lines, stdout, seconds)."""
    env = dict(enf.env, PYTHONPATH=str(REPO_ROOT))
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "hostwall.collector.cli", *args], env=env, cwd=REPO_ROOT,
                       capture_output=True, text=True, timeout=timeout)
    return r.returncode, [ln for ln in r.stderr.splitlines() if ln.strip()], r.stdout, time.monotonic() - t0


def assert_one_line_start_failure(rc, err, elapsed, sink: str, status: str, *needles: str):
    assert rc == 1, (rc, err)
    assert len(err) == 1, err                                  # one line, nothing else on stderr
    line = err[0]
    assert line.startswith(f"hostwall-collector: cannot start: {sink}: {status}: "), line
    assert all(n in line for n in needles), line
    assert elapsed <= BOUND_S, f"{elapsed:.1f} s"


@pytest.fixture(scope="module")
def secure(kafka_sasl_broker: KafkaBroker) -> tuple[KafkaBroker, dict]:
    tag = uuid.uuid4().hex[:8]
    t = topics(tag)
    kafka_sasl_broker.create_topics({name: 1 for name in t.values()})
    return kafka_sasl_broker, t


def sasl(b: KafkaBroker, user, password: str | None = None, ca=None) -> dict:
    return {"tls": True, "tls_ca_file": str(ca or b.ca_file), "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": user.name, "sasl_password": user.password if password is None else password}


def test_unreachable_and_unresolvable_brokers_fail_the_start(enforcer, tmp_path):
    _, enf = enforcer
    port, = free_ports(1)                                     # nothing listens there
    for url, status, needle in ((f"kafka://127.0.0.1:{port}", "unreachable", f"no TCP connection to 127.0.0.1:{port}"),
                                ("kafka://no-such-broker.invalid:9092", "unresolvable", "cannot resolve")):
        cfg = write_config(tmp_path / "c.yaml", {"spool_dir": str(tmp_path / "spool")})
        rc, err, _, elapsed = collector(enf, "run", "--config", str(cfg), "--pin-dir", enf.pin_dir,
                                        "--sink", url, "--sink", f"jsonl:{tmp_path / 'f.jsonl'}")
        assert_one_line_start_failure(rc, err, elapsed, url, status, needle, "never delivered to this broker")


def test_wrong_scram_password_and_wrong_ca_fail_the_start(enforcer, secure, tmp_path):
    _, enf = enforcer
    b, t = secure
    url = f"kafka://{b.sasl_bootstrap_servers}"
    cases = [("auth", sasl(b, b.writer, password="not-the-password"), ("refused the SASL_SSL SCRAM-SHA-512",
                                                                       "kafka.sasl_username")),
             ("tls", sasl(b, b.writer, ca=b.wrong_ca_file), ("does not verify", "kafka.tls_ca_file"))]
    for status, opts, needles in cases:
        cfg = write_config(tmp_path / f"{status}.yaml", {**opts, **t, "spool_dir": str(tmp_path / status)})
        rc, err, _, elapsed = collector(enf, "run", "--config", str(cfg), "--pin-dir", enf.pin_dir, "--sink", url)
        assert_one_line_start_failure(rc, err, elapsed, url, status, *needles)
        assert "not-the-password" not in err[0] and b.writer.password not in err[0]
        # check-config --connect: one line per sink, the same verdict, exit 1
        rc, err2, out, elapsed = collector(enf, "check-config", "--connect", "--config", str(cfg),
                                           "--sink", url, "--sink", f"jsonl:{tmp_path / 'ok.jsonl'}")
        lines = out.splitlines()
        assert rc == 1 and len(lines) == 2 and elapsed <= BOUND_S + 2, (rc, lines, err2)
        assert lines[0].startswith(f"{url}: {status}: ") and lines[1].startswith(f"jsonl:{tmp_path / 'ok.jsonl'}: ok")
    # and the right credentials: check-config --connect says ok, exit 0
    cfg = write_config(tmp_path / "ok.yaml", {**sasl(b, b.writer), **t, "spool_dir": str(tmp_path / "ok")})
    rc, _, out, _ = collector(enf, "check-config", "--connect", "--config", str(cfg), "--sink", url)
    assert rc == 0 and out.startswith(f"{url}: ok: "), out


@pytest.mark.timeout(420)
def test_a_credential_revoked_while_running_turns_the_sink_failing(enforcer, kafka_broker_factory, tmp_path):
    """The broker drops connections whose SASL session expires (connections.max.reauth.ms), so the revoked
    password is checked again at the next login; the sink must then say `failing` (not just degraded),
    once in the log, keep spooling, and the collector must keep running."""
    lab, enf = enforcer
    b = kafka_broker_factory(sasl_ssl=True, auto_create_topics=False, config={"connections.max.reauth.ms": 4000})
    tag = uuid.uuid4().hex[:8]
    t = topics(tag)
    b.create_topics({name: 1 for name in t.values()})
    carol = b.add_scram_user(f"carol{tag[:4]}")
    b.create_acls([Acl(carol.principal, op, "TOPIC", name) for name in t.values() for op in ("WRITE", "DESCRIBE")]
                  + [Acl(carol.principal, "IDEMPOTENT_WRITE", "CLUSTER", "kafka-cluster")])
    url = f"kafka://{b.sasl_bootstrap_servers}"
    status_file = tmp_path / "status.json"
    cfg = write_config(tmp_path / "c.yaml", {**sasl(b, carol), **t, "spool_dir": str(tmp_path / "spool"),
                                              "spool_after": "1s"}, conntrack_scan_interval="1s",
                       drop_summary_interval="250ms")
    env = dict(enf.env, PYTHONPATH=str(REPO_ROOT))
    log = open(tmp_path / "collector.log", "wb")
    p = subprocess.Popen([sys.executable, "-m", "hostwall.collector.cli", "run", "--config", str(cfg), "--pin-dir",
                          enf.pin_dir, "--sink", url, "--status-file", str(status_file)], env=env, cwd=REPO_ROOT,
                         stdout=subprocess.PIPE, stderr=log, text=True)
    traffic = None
    try:
        def status() -> dict:
            try:
                return json.loads(status_file.read_text())
            except (OSError, ValueError):
                return {}

        def sink() -> dict:
            return (status().get("sinks") or {}).get(url) or {}

        def alive() -> None:
            assert p.poll() is None, (tmp_path / "collector.log").read_text()[-3000:]

        with echo_servers(lab, "prot", tcp=[80]):
            # new connections all along: flow starts and ends keep records coming
            traffic = start_in(lab, "cli", "tcp-client", host=lab.addr("prot"), port=80, count=6000, interval=0.02,
                               op_timeout=0.5)
            wait_until(lambda: sink().get("delivered", 0) > 20, 60, "records delivered with the valid credential",
                       alive=alive)
            assert sink()["health"]["state"] == "ok"
            b.remove_scram_user(carol.name)
            try:
                h = wait_until(lambda: (sink().get("health") or {}).get("state") == "failing" and sink()["health"],
                               90, "the sink failing after the revocation", alive=alive)
            except TimeoutError as e:                   # say what the sink saw instead
                raise AssertionError(f"{e}; sink: {json.dumps(sink())[:1500]}; collector log: "
                                     f"{(tmp_path / 'collector.log').read_text()[-3000:]}") from None
            assert ": auth: " in (h["reason"] or "") and "kafka.sasl_username" in h["reason"], h
            spooled = sink()["spool"]["appended"]
            wait_until(lambda: sink()["spool"]["appended"] > spooled, 30, "spooling goes on", alive=alive)
            st = status()
            assert st["state"] == "running" and st["ledger"]["ok"]
            text = (tmp_path / "collector.log").read_text()
            assert text.count(f"sink {url}: degraded -> failing") + text.count(f"sink {url}: ok -> failing") == 1, text
            traffic.stop()
            traffic = None
    finally:
        if traffic is not None:
            traffic.stop()
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
        log.close()
    assert p.returncode == 0, (tmp_path / "collector.log").read_text()[-3000:]
