"""hostwall-enforcer's contract (docs/cli.md) on a real veth pair in a throwaway netns."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
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
