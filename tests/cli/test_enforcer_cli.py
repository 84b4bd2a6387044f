"""hostwall-enforcer's contract (docs/cli.md) on a real veth pair in a throwaway netns."""
from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from hostwall.bpf import conntrack
from hostwall.bpf import layout as L

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "policy.yaml"
POLICY = """
version: 1
name: cli
revision: "{rev}"
defaults: {{ingress: deny, egress: allow}}
rules:
  - {{name: ssh, priority: 10, direction: ingress, action: allow, protocol: tcp, ports: [22]}}
  - {{name: dns, priority: 20, direction: ingress, action: allow, protocol: udp, ports: [53]}}
"""
BAD = """
version: 1
name: cli
rules:
  - {name: ok, priority: 1, direction: ingress, action: allow, ports: [70000]}
  - {name: ok, priority: x, direction: sideways, action: allow, peers: [10.0.0.300/8]}
  - {name: f, priority: 1, direction: ingress, action: deny, peers_file: missing.txt}
interfaces:
  - {name: eth0, dos_profile: nope}
"""

pytestmark = pytest.mark.bpf


def cli(*args, env=None, check=False, timeout=120):
    r = subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", *args], capture_output=True, text=True,
                       env=env, cwd=ROOT, timeout=timeout)
    if check and r.returncode:
        raise AssertionError(f"{args}: rc={r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@pytest.fixture
def inst(tmp_path):
    """A veth pair (ns side v0) and a private pin dir + state dir; everything removed afterwards."""
    tag = uuid.uuid4().hex[:6]
    ns = f"hwcli-{tag}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    subprocess.run(["ip", "-n", ns, "link", "add", "v0", "type", "veth", "peer", "name", "v1"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "v0", "up"], check=True)
    subprocess.run(["ip", "-n", ns, "link", "set", "v1", "up"], check=True)
    env = dict(os.environ, HOSTWALL_STATE_DIR=str(tmp_path / "state"), HOSTWALL_PIN_DIR=f"/sys/fs/bpf/hostwall-test/{tag}",
               PYTHONPATH=str(ROOT))
    procs = []
    yield {"ns": ns, "env": env, "tmp": tmp_path, "procs": procs, "pin": env["HOSTWALL_PIN_DIR"]}
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    cli("detach", env=env)
    subprocess.run(["ip", "netns", "del", ns], check=False)


def write(tmp, name, text):
    p = tmp / name
    p.write_text(text)
    return str(p)


def start(inst, policy, *extra):
    p = subprocess.Popen([sys.executable, "-m", "hostwall.enforcer.cli", "run", "--policy", policy, "--netns", inst["ns"],
                          "--interface", "v0", *extra], env=inst["env"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    inst["procs"].append(p)
    line = p.stdout.readline()
    assert "enforcing" in line, line + p.stderr.read()
    return p


def status(inst):
    r = cli("status", "--json", env=inst["env"], check=True)
    return json.loads(r.stdout)


def test_validate_ok_and_errors(tmp_path):
    assert EXAMPLE.exists()
    r = cli("validate", str(EXAMPLE))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout
    r = cli("validate", write(tmp_path, "bad.yaml", BAD))
    assert r.returncode == 2
    err = r.stderr
    for needle in ("rules[0].ports[0]", "rules[1].priority", "rules[1].direction", "rules[1].peers[0]",
                   "rules[1].name", "rules[2].peers_file", "interfaces[0].dos_profile"):
        assert needle in err, f"{needle} missing from:\n{err}"
    assert "bad.yaml:5:" in err and "bad.yaml:6:" in err


def test_run_apply_status_detach(inst):
    tmp = inst["tmp"]
    p = start(inst, write(tmp, "a.yaml", POLICY.format(rev="r1")))
    s = status(inst)
    assert s["revision"] == "r1" and s["rules_count"] == 2
    assert s["interfaces"][0]["xdp_mode"] in ("native", "generic") and s["interfaces"][0]["tc_egress"]
    assert {"hw_ct4", "hw_ct6", "hw_dos_src", "hw_drops0", "policy.rules", "policy.v4_intervals"} <= set(s["map_pressure"])
    assert s["map_pressure"]["policy.rules"]["entries"] == 2
    assert all(0 <= m["percent"] <= 100 for m in s["map_pressure"].values())
    mem = s["map_memory"]                  # the kernel's charge per map: an array costs at least its values
    assert mem["total_bytes"] == sum(mem["maps"].values()) and {"hw_ct4", "hw_ct6", "hw_dos_src"} <= set(mem["maps"])
    assert mem["maps"]["hw_ct4"] >= conntrack.SLOT_DT[4].itemsize * L.CT_MAX, mem["maps"]["hw_ct4"]
    gen = s["generation"]
    # the text form, piped (no terminal, no COLUMNS): nothing cut, no DNS proxy without a dns section,
    # booleans as on/off
    env = {k: v for k, v in inst["env"].items() if k not in ("COLUMNS", "LINES")}
    text = cli("status", env=env, check=True).stdout
    assert "…" not in text and "policy.rules" in text and "policy.v4_intervals" in text, text
    assert "DNS proxy" not in text and "fqdn dynamic sets" not in text, text
    assert "stateful on, audit off, essential ICMP on" in text, text
    assert "True" not in text and "False" not in text, text
    assert "tc ingress" not in text, text          # none attached behind XDP (docs/datapath.md "Hooks")

    r = cli("apply", write(tmp, "b.yaml", POLICY.format(rev="r2")), env=inst["env"], check=True)
    assert "r1 → r2" in r.stdout and "switch" in r.stdout
    s = status(inst)
    assert (s["revision"], s["generation"]) == ("r2", gen ^ 1)

    # an invalid policy changes nothing: same revision, same generation, exit 2 with every error
    r = cli("apply", write(tmp, "bad.yaml", BAD), env=inst["env"])
    assert r.returncode == 2 and r.stderr.count("\n") >= 7
    s2 = status(inst)
    assert (s2["revision"], s2["generation"]) == ("r2", gen ^ 1)

    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert "detached" in out
    assert "unpinned" in out and "no collector checkpoint at" in out, out   # what went: said, with why
    assert not Path(inst["pin"]).exists()
    link = subprocess.run(["ip", "-n", inst["ns"], "-d", "link", "show", "v0"], capture_output=True, text=True).stdout
    assert "prog/xdp" not in link


def test_run_with_invalid_policy_exits_2_and_loads_nothing(inst):
    r = cli("run", "--policy", write(inst["tmp"], "bad.yaml", BAD), "--netns", inst["ns"], "--interface", "v0",
            env=inst["env"])
    assert r.returncode == 2
    assert not Path(inst["pin"]).exists()


def test_missing_interface_is_a_runtime_error(inst):
    r = cli("run", "--policy", write(inst["tmp"], "a.yaml", POLICY.format(rev="r1")), "--netns", inst["ns"],
            "--interface", "nope0", env=inst["env"])
    assert r.returncode == 1 and "nope0" in r.stderr
    assert not Path(inst["pin"]).exists()


def test_restart_with_keep_attached_adopts_without_gap(inst):
    pol = write(inst["tmp"], "a.yaml", POLICY.format(rev="r1"))
    p = start(inst, pol, "--keep-attached")
    prog_id = status(inst)["interfaces"][0]["xdp_prog_id"]
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=30)
    assert "stay attached" in out
    assert status(inst)["interfaces"][0]["xdp_prog_id"] == prog_id      # still enforcing while nothing runs
    p2 = start(inst, pol)
    s = status(inst)
    assert s["interfaces"][0]["xdp_prog_id"] == prog_id                  # same program: no reload, no gap
    assert s["pid_alive"]
    p2.send_signal(signal.SIGTERM)
    p2.communicate(timeout=30)


def test_sighup_reloads_and_keeps_running_on_bad_policy(inst):
    tmp = inst["tmp"]
    pol = write(tmp, "live.yaml", POLICY.format(rev="r1"))
    p = start(inst, pol)
    Path(pol).write_text(POLICY.format(rev="r2"))
    p.send_signal(signal.SIGHUP)
    deadline = time.time() + 20
    while status(inst)["revision"] != "r2" and time.time() < deadline:
        time.sleep(0.2)
    assert status(inst)["revision"] == "r2"
    Path(pol).write_text(BAD)
    p.send_signal(signal.SIGHUP)
    time.sleep(1.5)
    assert p.poll() is None and status(inst)["revision"] == "r2"
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)


def _lines(p):
    """The runner's stdout lines from now on, on a queue (a read with a deadline, never a blocking one)."""
    q: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [q.put(line) for line in p.stdout], daemon=True).start()
    return q


def _sighup(p, q, old, new):
    """SIGHUP, then the runner's line for this reload: (records written, tables known)."""
    p.send_signal(signal.SIGHUP)
    want = f"SIGHUP: revision {old} → {new}"
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            line = q.get(timeout=max(0.1, deadline - time.time()))
        except queue.Empty:
            break
        if want in line:
            m = re.search(r"(\d+) records written, (\d+) tables known", line)
            assert m, line
            return int(m.group(1)), int(m.group(2))
    raise AssertionError(f"no '{want}' from the runner (exit code {p.poll()})")


def _verdict(inst, port, sport):
    """(verdict, reason) the running instance's XDP program gives a TCP SYN to `port` (test-run)."""
    from hostwall.bench.datapath import TCP_SYN, Runner, tcp_frame
    from hostwall.bpf.instance import Instance
    from hostwall.enforcer.reference import Packet
    inst_ = Instance.open(inst["pin"])
    try:
        pkt = Packet("ingress", 4, "192.0.2.7", "198.51.100.1", 6, sport, port)
        return Runner(inst_).judged("xdp_ingress", tcp_frame(pkt, TCP_SYN))[1:3]
    finally:
        inst_.close()


def test_sighup_reload_keeps_its_datapath_and_is_incremental(inst):
    """The runner's reloads go through its own Datapath (docs/datapath.md "Atomic swaps"): a one-rule
    change rewrites a few records and skips the compare of tables it wrote there itself; after another
    process's `apply` it compares every table again (the gen/revision check) and still gets it right."""
    tmp = inst["tmp"]
    pol = write(tmp, "live.yaml", POLICY.format(rev="r1"))
    p = start(inst, pol)
    q = _lines(p)
    Path(pol).write_text(POLICY.format(rev="r2"))
    _sighup(p, q, "r1", "r2")                        # both halves now hold the same rules
    Path(pol).write_text(POLICY.format(rev="r3").replace("ports: [22]", "ports: [2222]"))
    written, known = _sighup(p, q, "r2", "r3")
    print(f"one-rule reload: {written} records written, {known} tables known")
    assert known >= 1, "no table was known: the reload did not reuse the runner's Datapath"
    assert 1 <= written <= 8, written                 # header, the rule, its L4 entries: not the tables
    assert _verdict(inst, 2222, 40001) == ("allow", "pass_rule")
    assert _verdict(inst, 22, 40002) == ("drop", "default_deny")

    # another process swaps meanwhile: the runner's next reload must not trust what it wrote before
    r = cli("apply", write(tmp, "other.yaml", POLICY.format(rev="r4").replace("ports: [22]", "ports: [2200]")),
            env=inst["env"], check=True)
    assert "r3 → r4" in r.stdout
    assert _verdict(inst, 2200, 40003) == ("allow", "pass_rule")
    Path(pol).write_text(POLICY.format(rev="r5").replace("ports: [22]", "ports: [2323]"))
    written, known = _sighup(p, q, "r4", "r5")
    assert known == 0, known
    assert written >= 1
    assert _verdict(inst, 2323, 40004) == ("allow", "pass_rule")
    for port, sport in ((2222, 40005), (2200, 40006), (22, 40007)):
        assert _verdict(inst, port, sport) == ("drop", "default_deny"), port
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=30)


def test_sigterm_says_the_maps_were_retired_for_the_collector(inst, monkeypatch):
    """A stop while a collector reads this pin dir (its checkpoint exists) retires the maps
    (docs/collector.md "Detach"); the stop line says where they went, not only what was detached."""
    from hostwall.bpf import retired
    monkeypatch.setenv("HOSTWALL_STATE_DIR", inst["env"]["HOSTWALL_STATE_DIR"])
    p = start(inst, write(inst["tmp"], "a.yaml", POLICY.format(rev="r1")))
    ck = retired.collector_checkpoint(inst["pin"])
    ck.write_text("{}")                              # a collector read this pin dir before
    try:
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=30)
        [kept] = retired.listing(inst["pin"])
        assert f"maps retired to {kept} for a collector to drain" in out, out
    finally:
        cli("detach", "--discard-retired", env=inst["env"])
    assert retired.listing(inst["pin"]) == []
