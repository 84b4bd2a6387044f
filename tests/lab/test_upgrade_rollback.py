"""A start whose attach fails on one interface puts back what ran before on every interface it touched
(enforcer/attach.py attach_all; docs/cli.md "Upgrades"): a build upgrade leaves the old instance enforcing,
unchanged (its programs on the links, its pins, state and fqdn config; no detach note, nothing retired), and
frees the new datapath; a first start leaves what another tool ran; an adopted instance (same build) leaves
no program of its own on an interface it could not finish.

The failures are real kernel refusals inside the lab's protected host: native XDP on `lo` (no driver
support: EOPNOTSUPP), native XDP on a veth that runs generic XDP (the kernel runs the two modes never together:
EEXIST), and a TC filter of another kind (u32) at our priority on egress (EINVAL), which fails after XDP and
TC ingress took on that interface."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from hostwall.bpf import bpfsys, retired
from hostwall.bpf.instance import Instance
from hostwall.bpf.links import TC_EGRESS_PARENT, TC_INGRESS_PARENT, TC_PRIO, programs
from hostwall.bpf.state import InstanceState, fqdn_config_path, state_path
from hostwall.enforcer import attach, control
from hostwall.enforcer.datapath import Datapath
from hostwall.enforcer.policy import InterfaceConf, parse_policy
from hostwall.lab import traffic
from hostwall.lab.collector_proc import CollectorProcess
from hostwall.lab.enforcer_proc import EnforcerProcess
from tests.enforcer_instance import started_instance

from .conftest import EXAMPLE_POLICY, INLINE_POLICY
from .test_capture import until
from .test_detach_lab import tcp_starts

pytestmark = [pytest.mark.bpf, pytest.mark.lab]

ETH0 = InterfaceConf("eth0", "auto", None)


def policy_text(name: str) -> str:
    """The lab's inline policy (block-attacker, client-web on tcp 80, ...) named `name`."""
    return INLINE_POLICY.replace("name: lab-inline", f"name: {name}")


def veth_x0(lab, u32_on_egress: bool = False) -> None:
    """A second interface in the protected host: veth x0 (peer x1, both there). `u32_on_egress`: someone
    else's u32 filter at our TC priority on x0's egress, which makes our bpf filter there fail."""
    lab.run("prot", ["ip", "link", "add", "x0", "type", "veth", "peer", "name", "x1"])
    for d in ("x0", "x1"):
        lab.run("prot", ["ip", "link", "set", d, "up"])
    if u32_on_egress:
        lab.run("prot", ["tc", "qdisc", "add", "dev", "x0", "clsact"])
        lab.run("prot", ["tc", "filter", "add", "dev", "x0", "egress", "prio", str(TC_PRIO), "u32",
                         "match", "u32", "0", "0", "classid", "1:1"])


def ids(ifname: str, netns: str) -> tuple:
    """(generic XDP id, native XDP id, {clsact parent: TC prog id at our priority})."""
    p = programs(ifname, netns)
    return p.xdp_generic, p.xdp_native, {k: i for k, (i, _) in p.tc.items()}


def pinned(pin: str) -> dict[str, int]:
    """Every pinned map of the instance at `pin` by path, with its id; and every pinned program, id 0."""
    out = {}
    for path in sorted(Path(pin).rglob("*")):
        if path.is_file() and path.parent.name == "maps":
            fd = bpfsys.obj_get(str(path))
            try:
                out[str(path)] = bpfsys.map_info(fd).id
            finally:
                os.close(fd)
        elif path.is_file():
            out[str(path)] = 0
    return out


def record_loads(monkeypatch) -> list[list[int]]:
    """Datapath.load wrapped: each load's map ids, read while its fds are open."""
    real, loads = Datapath.load.__func__, []

    def load(cls):
        dp = real(cls)
        loads.append([bpfsys.map_info(fd).id for fd in dp.map_fds.values()])
        return dp
    monkeypatch.setattr(Datapath, "load", classmethod(load))
    return loads


def freed(map_ids: list[int]) -> bool:
    for i in map_ids:
        try:
            os.close(bpfsys.map_get_fd_by_id(i))
            return False
        except OSError:
            pass
    return True


def attacker_blocked_and_counted(lab, pin: str) -> None:
    """The instance at `pin` judges eth0's ingress: the attacker's SYNs are dropped and counted by its rule,
    the client's connection passes."""
    prot = lab.addr("prot")
    st = InstanceState.load(pin)
    inst = Instance.open(pin)
    try:
        slot = st.slots["block-attacker"]
        was = int(inst.rule_stats()[slot]["packets"])
        with traffic.echo_servers(lab, "prot", tcp=[80]):
            assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1
            assert traffic.tcp_client_in(lab, "att", prot, 80, count=1, timeout=0.5)["ok"] == 0
        until(lambda: int(inst.rule_stats()[slot]["packets"]) > was, 10, "the attacker's SYNs counted")
    finally:
        inst.close()


@contextlib.contextmanager
def older_instance(text: str, name: str, interfaces: list, prepare=None, tc_ingress: bool = False):
    """started_instance whose state names another build, as if a package upgrade brought another datapath:
    the next start replaces it. `tc_ingress`: with our TC ingress filter on eth0 too, as builds before
    tcin32 attached it. Yields (lab, pin dir, the protected host's netns)."""
    with started_instance(text, name, interfaces, prepare=prepare) as (lab, dp, pin, _):
        if tc_ingress:
            attach.attach_tc("eth0", dp.prog_fds["tc_ingress"], dp.prog_fds["tc_egress"], lab.ns("prot"))
        dp.close()
        st = InstanceState.load(pin)
        st.build = "an-older-build"
        st.save()
        yield lab, pin, lab.ns("prot")


def test_a_failed_upgrade_puts_the_old_programs_back_and_leaves_the_old_instance(monkeypatch):
    """Old instance on eth0 and x0 (generic); the upgrade attaches on eth0, then asks native XDP on x0, which
    the kernel refuses (generic runs there: EEXIST). eth0 must run the old programs again, not nothing."""
    text = policy_text("upfail")
    old_ifs = [ETH0, InterfaceConf("x0", "generic", None)]
    with older_instance(text, "upfail", old_ifs, prepare=veth_x0) as (lab, pin, ns):
        before = {n: ids(n, ns) for n in ("eth0", "x0")}
        assert all(b[0] for b in before.values()), before
        state_was, fqdn_was, pins_was = state_path(pin).read_bytes(), fqdn_config_path(pin).exists(), pinned(pin)
        loads = record_loads(monkeypatch)
        with pytest.raises(RuntimeError) as err:
            control.start(parse_policy(text), pin, [ETH0, InterfaceConf("x0", "native", None)], netns=ns)
        assert {n: ids(n, ns) for n in ("eth0", "x0")} == before
        assert state_path(pin).read_bytes() == state_was and fqdn_config_path(pin).exists() == fqdn_was
        assert pinned(pin) == pins_was and retired.listing(pin) == []
        old = Instance.open(pin)
        try:
            assert int(old.config()["detached_ns"]) == 0        # no detach note: a collector reads on
        finally:
            old.close()
        [new_maps] = loads
        until(lambda: freed(new_maps), 10, "the new datapath's maps freed")
        attacker_blocked_and_counted(lab, pin)
        msg = str(err.value)
        assert isinstance(err.value, control.ControlError), msg            # the CLI's exit 1, with this text
        assert "attaching on x0@" in msg and "eth0@" in msg and "run again exactly what they ran before" in msg, msg
        assert "build an-older-build) still enforces unchanged" in msg and "FAILED" not in msg, msg


def test_a_tc_failure_after_xdp_on_the_same_interface_is_undone_there_too(monkeypatch):
    """x0 carries someone's u32 filter at our TC priority on egress: our XDP and TC ingress take on x0, the
    egress filter fails. x0 must be left as it was (no XDP, no filter of ours, the u32 filter and its clsact
    kept), eth0 with the old programs."""
    text = policy_text("upfail-tc")
    with older_instance(text, "upfailtc", [ETH0], prepare=lambda lab: veth_x0(lab, u32_on_egress=True)) \
            as (lab, pin, ns):
        before = {n: ids(n, ns) for n in ("eth0", "x0")}
        assert before["x0"] == (0, 0, {}), before
        with pytest.raises(RuntimeError) as err:
            control.start(parse_policy(text), pin, [ETH0, InterfaceConf("x0", "generic", None)], netns=ns)
        assert {n: ids(n, ns) for n in ("eth0", "x0")} == before
        shown = lab.run("prot", ["tc", "filter", "show", "dev", "x0", "egress"]).stdout
        assert "u32" in shown and programs("x0", ns).clsact, shown
        attacker_blocked_and_counted(lab, pin)
        assert isinstance(err.value, control.ControlError) and "TC attach on x0 failed" in str(err.value), err.value


def xdp_pass_prog() -> int:
    """Another tool's XDP program: `r0 = XDP_PASS; exit`. Returns its fd (caller closes)."""
    insn = struct.Struct("<BBhi")
    fd, log = bpfsys.prog_load_verbose(bpfsys.PROG_TYPE_XDP, insn.pack(0xB7, 0, 0, 2) + insn.pack(0x95, 0, 0, 0),
                                       "other_tool")
    assert fd >= 0, log
    return fd


def test_a_failed_first_start_leaves_another_tools_xdp_program_and_nothing_of_ours(lab):
    """No instance at the pin dir; x0 runs another tool's XDP program (generic, held by nobody else once
    replaced). The start replaces it on x0, then fails on lo (no native XDP): x0 runs that program again,
    and nothing is pinned or saved."""
    text = policy_text("upfail-first")
    veth_x0(lab)
    ns = lab.ns("prot")
    fd = xdp_pass_prog()
    try:
        attach.attach_xdp("x0", fd, "generic", ns)
        other = ids("x0", ns)
    finally:
        os.close(fd)                                # only the link holds it now
    fresh = f"/sys/fs/bpf/hostwall-test/upfailfirst-{os.getpid()}-fresh"
    try:
        with pytest.raises(RuntimeError) as err:
            control.start(parse_policy(text), fresh, [InterfaceConf("x0", "generic", None),
                                                      InterfaceConf("lo", "native", None)], netns=ns)
        assert ids("x0", ns) == other and other[0]
        assert not Path(fresh).exists() and InstanceState.load(fresh) is None
        assert not fqdn_config_path(fresh).exists()
        assert "attaching on lo@" in str(err.value) and "nothing was installed" in str(err.value), err.value
    finally:
        if Path(fresh).exists():                    # only if the test failed: leave no pins behind
            control.detach(fresh)


def test_a_failed_adopting_start_leaves_no_program_of_ours_where_it_could_not_finish():
    """Same build (adopted): eth0 keeps running the instance; x0, attached in this start before lo failed,
    runs nothing again (before: our programs stayed there, recorded nowhere, never detached). The new policy
    was swapped in: the saved state says so."""
    text = policy_text("upfail-adopt")
    with started_instance(text, "upfailadopt", [ETH0], prepare=veth_x0) as (lab, dp, pin, _):
        dp.close()
        ns = lab.ns("prot")
        before = {n: ids(n, ns) for n in ("eth0", "x0")}
        second = parse_policy(policy_text("upfail-adopt-2"))
        with pytest.raises(RuntimeError) as err:
            control.start(second, pin, [ETH0, InterfaceConf("x0", "generic", None), InterfaceConf("lo", "native", None)],
                          netns=ns)
        assert {n: ids(n, ns) for n in ("eth0", "x0")} == before and before["x0"] == (0, 0, {})
        st = InstanceState.load(pin)
        assert st.policy_name == "upfail-adopt-2" and [i.name for i in st.interfaces] == ["eth0"]
        assert control.status(pin)["policy"] == "upfail-adopt-2"
        attacker_blocked_and_counted(lab, pin)
        assert "still enforces, now with policy upfail-adopt-2" in str(err.value), err.value


def test_the_cli_run_of_a_failed_upgrade_exits_1_and_the_old_instance_goes_on(lab, tmp_path, monkeypatch):
    """`hostwall-enforcer run` of another build whose attach fails (lo in native mode): exit 1 saying the old
    instance still enforces; `status` shows it, the collector reading it keeps getting its records (nothing
    retired), and the retry with a fixed config upgrades as usual."""
    prot = lab.addr("prot")
    shutil.copytree(EXAMPLE_POLICY.parent, tmp_path / "examples")        # with the files it names
    bad = tmp_path / "examples" / "bad.yaml"
    bad.write_text(EXAMPLE_POLICY.read_text().replace("  - {name: eth0, xdp_mode: auto, dos_profile: lab}",
                                                      "  - {name: eth0, xdp_mode: auto, dos_profile: lab}\n"
                                                      "  - {name: lo, xdp_mode: native}"))
    assert "name: lo" in bad.read_text()
    with EnforcerProcess(lab, EXAMPLE_POLICY, keep_attached=True) as enf, CollectorProcess(enf, tmp_path) as col, \
            traffic.echo_servers(lab, "prot", tcp=[80]):
        assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1
        until(lambda: tcp_starts(col.jsonl, prot, 80) >= 1, 30, "the old instance's flow")
        enf.stop()
        monkeypatch.setenv("HOSTWALL_STATE_DIR", enf.state_dir)
        st = InstanceState.load(enf.pin_dir)
        st.build = "an-older-build"
        st.save()
        eth0 = ids("eth0", lab.ns("prot"))
        r = enf.cli("run", "--policy", str(bad), "--netns", lab.ns("prot"), check=False)
        assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
        assert ids("eth0", lab.ns("prot")) == eth0, r.stderr
        assert "attaching on lo@" in r.stderr and "still enforces unchanged" in r.stderr, r.stderr
        s = enf.status()
        assert s["build"] == "an-older-build" and s["interfaces"][0]["xdp_prog_id"] == eth0[0], s["interfaces"]
        assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1
        until(lambda: tcp_starts(col.jsonl, prot, 80) >= 2, 30, "the old instance's next flow, read on")
        assert retired.listing(enf.pin_dir) == [] and col.alive()
        enf.start()                                     # the fixed config: eth0 only
        assert "carried" in enf.banner, enf.banner
        assert traffic.tcp_client_in(lab, "cli", prot, 80, count=1)["ok"] == 1
        until(lambda: tcp_starts(col.jsonl, prot, 80) >= 3, 30, "the new instance's flow")
        assert col.stop() == 0


STOPPED_MIDWAY = """
import os, signal, sys
from hostwall.enforcer import control
from hostwall.enforcer.datapath import Datapath
from hostwall.enforcer.policy import InterfaceConf, parse_policy

real = Datapath.attach

def attach(self, ifname, xdp_mode="auto", netns=None):
    if ifname != "eth0":                        # eth0 runs the new programs now: a stop asked midway
        os.kill(os.getpid(), signal.SIGTERM)
    return real(self, ifname, xdp_mode, netns)

Datapath.attach = attach
text, pin, ns = sys.stdin.read(), sys.argv[1], sys.argv[2]
try:
    control.start(parse_policy(text), pin, [InterfaceConf("eth0", "auto", None), InterfaceConf("lo", "native", None)],
                  netns=ns)
except control.ControlError as e:
    print(e, flush=True)
"""


def test_a_sigterm_during_an_upgrades_attach_comes_after_the_roll_back():
    """A process asked to stop (SIGTERM, default action) after the upgrade attached on eth0, before lo fails: it
    must die only once eth0 runs the old programs again (before: killed at once, eth0 left running the new
    build's unpinned programs, recorded nowhere)."""
    text = policy_text("upfail-term")
    with older_instance(text, "upfailterm", [ETH0]) as (lab, pin, ns):
        before, state_was = ids("eth0", ns), state_path(pin).read_bytes()
        r = subprocess.run([sys.executable, "-c", STOPPED_MIDWAY, pin, ns], input=text, capture_output=True,
                           text=True, timeout=300, cwd=Path(__file__).parents[2])
        assert r.returncode == -signal.SIGTERM, (r.returncode, r.stdout, r.stderr)
        assert ids("eth0", ns) == before, (before, r.stderr)
        assert state_path(pin).read_bytes() == state_was
        attacker_blocked_and_counted(lab, pin)


def test_an_interrupt_during_attach_is_rolled_back_like_a_failure():
    """A KeyboardInterrupt (any BaseException) raised while attaching on x0, after eth0 took: eth0 runs the old
    programs again and the error says it was interrupted (before: the interrupt went through, eth0 kept the
    new build's programs)."""
    text = policy_text("upfail-intr")
    with older_instance(text, "upfailintr", [ETH0], prepare=veth_x0) as (lab, pin, ns):
        before = {n: ids(n, ns) for n in ("eth0", "x0")}
        real = Datapath.attach

        def interrupted(self, ifname, xdp_mode="auto", netns=None):
            mode = real(self, ifname, xdp_mode, netns)
            if ifname == "x0":
                raise KeyboardInterrupt
            return mode
        with pytest.MonkeyPatch.context() as mp, pytest.raises(BaseException) as err:
            mp.setattr(Datapath, "attach", interrupted)
            control.start(parse_policy(text), pin, [ETH0, InterfaceConf("x0", "generic", None)], netns=ns)
        assert {n: ids(n, ns) for n in ("eth0", "x0")} == before
        assert isinstance(err.value, control.ControlError), repr(err.value)
        assert "attaching on x0@" in str(err.value) and "KeyboardInterrupt" in str(err.value), err.value
        attacker_blocked_and_counted(lab, pin)


def test_a_put_back_that_raises_does_not_stop_the_others_and_is_said(monkeypatch):
    """A first start on eth0 (which runs the lab instance), x0 and lo (no native XDP: fails); putting back x0
    raises something unforeseen (a ValueError). eth0 must still get the lab instance's programs back, and the
    error must name x0 as not put back, with what it runs (before: the ValueError went through, eth0 kept the
    new programs, nothing said so)."""
    text = policy_text("upfail-pb")
    with started_instance(text, "upfailpb", [ETH0], prepare=veth_x0) as (lab, dp, pin, _):
        dp.close()
        ns = lab.ns("prot")
        before = ids("eth0", ns)
        real = attach._tc_back

        def tc_back(ipr, idx, b, now):
            if b.ifname == "x0":
                raise ValueError("an unforeseen attribute")
            return real(ipr, idx, b, now)
        monkeypatch.setattr(attach, "_tc_back", tc_back)
        with pytest.raises(Exception) as err:
            control.start(parse_policy(text), pin + "-fresh", [ETH0, InterfaceConf("x0", "generic", None),
                                                                InterfaceConf("lo", "native", None)], netns=ns)
        assert ids("eth0", ns) == before
        msg = str(err.value)
        assert isinstance(err.value, control.ControlError), repr(err.value)
        assert "putting back what ran on x0@" in msg and "FAILED (an unforeseen attribute)" in msg, msg
        assert "TC egress prog" in msg and "nothing was installed except where stated" in msg, msg
        attacker_blocked_and_counted(lab, pin)


def test_an_older_builds_tc_ingress_filter_is_put_back():
    """The old build ran a TC ingress filter on eth0 too; this build attaches XDP and TC egress only and
    deletes that filter (XDP judges ingress: docs/datapath.md "Hooks"), then fails on x0 (native where
    generic runs): eth0 gets the old ingress filter back, with its XDP program and egress filter. A guard
    for the tcin32 merge: passed before this branch's fixes too."""
    text = policy_text("upfail-noin")
    old_ifs = [ETH0, InterfaceConf("x0", "generic", None)]
    with older_instance(text, "upfailnoin", old_ifs, prepare=veth_x0, tc_ingress=True) as (lab, pin, ns):
        before = {n: ids(n, ns) for n in ("eth0", "x0")}
        assert set(before["eth0"][2]) == {TC_INGRESS_PARENT, TC_EGRESS_PARENT}, before
        with pytest.raises(control.ControlError):
            control.start(parse_policy(text), pin, [ETH0, InterfaceConf("x0", "native", None)], netns=ns)
        assert {n: ids(n, ns) for n in ("eth0", "x0")} == before
        attacker_blocked_and_counted(lab, pin)
