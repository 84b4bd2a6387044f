"""Enforcer operations on one instance (a pin dir): start, apply, status, detach.

Start adopts a pinned instance of the same build (programs, conntrack and counters stay in the kernel,
so an enforcer restart has no enforcement gap), migrates conntrack into a freshly loaded datapath when
the build changed (the replaced instance retired for the collector once the new one runs: _replace), and
otherwise loads anew. Every operation validates first and changes nothing in the
kernel when the policy or the request is bad.
"""
from __future__ import annotations

import os
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
from pyroute2.netlink.exceptions import NetlinkError

from hostwall.bpf import bpfsys, conntrack, retired
from hostwall.bpf import fqdn as fq
from hostwall.bpf import layout as L
from hostwall.bpf.instance import Instance, policy_pressure
from hostwall.bpf.links import LinkError
from hostwall.bpf.state import (
    REVISIONS_KEEP,
    AttachedInterface,
    InstanceState,
    allocate_slots,
    new_instance_id,
    policy_writer,
)

from . import attach, fqdnsets
from .compiler import compile_policy, fqdn_lists
from .datapath import Datapath, build_hash
from .policy import ESSENTIAL_ICMP, InterfaceConf, Policy


class ControlError(RuntimeError):
    """A runtime failure with a one-line explanation (exit 1)."""


@dataclass(frozen=True)
class ApplyResult:
    old_revision: str
    new_revision: str
    rules: int
    prefixes: int
    compile_s: float
    install_s: float
    switch_ms: float
    barrier_ms: float
    fqdn_filled: int = 0         # learnt addresses entered into the policy's new dynamic sets
    fqdn_full: int = 0           # learnt addresses a full hw_fqdn refused: denied until their names are asked again
    written_records: int = 0     # policy records rewritten in the standby half (what differed)
    known_tables: int = 0        # policy tables not even compared: this Datapath object wrote them there


def fqdn_full_text(n: int) -> str:
    """What an operator reads when a swap's refill of new dynamic sets met a full map (counted, not silent)."""
    return (f"{n} learnt addresses did not fit the dynamic set map (hw_fqdn full): connections to them are "
            f"denied until their names are asked again (docs/policy.md \"FQDN rules\")")


@dataclass(frozen=True)
class StartResult:
    adopted: bool            # an existing pinned instance was taken over (no gap)
    migrated_conntrack: int  # entries carried into a new build's maps
    interfaces: list[AttachedInterface]
    apply: ApplyResult


def _zero_counters(dp: Datapath, slots: list[int]) -> None:
    """Reset the per-CPU counters of newly handed-out rule slots (a reused slot must not inherit)."""
    if not slots:
        return
    zero = bytes(L.DTYPES["hw_counter"].itemsize * dp.ncpus)
    for s in slots:
        bpfsys.map_update(dp.map_fds["hw_rule_stats"], int(s).to_bytes(4, "little"), zero)


def dos_interfaces(policy: Policy, attached: list[tuple[str, str | None]]) -> dict[int, str]:
    """ifindex → DoS profile for attached interfaces that the policy's `interfaces:` gives one."""
    by_name = {i.name: i.dos_profile for i in policy.interfaces if i.dos_profile}
    out = {}
    for name, netns in attached:
        if name in by_name:
            out[attach.link_state(name, netns).ifindex] = by_name[name]
    return out


def next_revision_id(dp: Datapath, st: InstanceState) -> int:
    """One above every id this instance handed out: the state's and both policy headers' in the kernel.
    The state alone is not enough: a swap whose state save failed (disk full, killed between the flip and
    the save) left its id live in the kernel, stamping connections, and handing it out again would name
    their rule after another policy's slot table (docs/records.md "Rule fields")."""
    return max([st.revision_id, *(int(h["revision_id"]) for h in dp.view("hw_policy"))]) + 1


def apply_policy(dp: Datapath, st: InstanceState, policy: Policy,
                 attached: list[tuple[str, str | None]] | None = None) -> ApplyResult:
    """Compile, install atomically, record. The caller saves the state. `attached`: interfaces the
    policy applies to (default: the instance's), for the DoS profile of each."""
    t0 = time.perf_counter()
    names = policy.counter_names()              # the rules, then pseudo-rules such as essential_icmp
    slots, fresh = allocate_slots(st.slots, names, L.MAX_RULE_SLOTS)
    rev_id = next_revision_id(dp, st)
    if attached is None:
        attached = [(i.name, i.netns) for i in st.interfaces]
    sets, fresh_sets = fqdnsets.allocate_sets(st.fqdn_sets, fqdn_lists(policy))
    cp = compile_policy(policy, slots, rev_id, dos_interfaces(policy, attached),
                        {tuple(k.split("\n")): v for k, v in sets.items()})
    t1 = time.perf_counter()
    _zero_counters(dp, fresh)
    filled, timing = _install_with_sets(dp, st, policy, cp, sets, fresh_sets)
    t2 = time.perf_counter()
    old_rev, old_rules = st.revision, st.rules
    st.slots = slots
    st.rule_meta = {r.name: {"priority": r.priority, "direction": r.direction, "action": r.action,
                             "order": i, **({"fqdns": list(r.fqdns)} if r.fqdns is not None else {})}
                    for i, r in enumerate(policy.rules)}
    if ESSENTIAL_ICMP in slots:                 # passes before any rule, both directions
        st.rule_meta[ESSENTIAL_ICMP] = {"priority": -1, "direction": "both", "action": "allow", "order": -1,
                                        "pseudo": True}
    st.revision_id = rev_id
    st.revisions = {k: v for k, v in st.revisions.items() if int(k) >= rev_id - REVISIONS_KEEP}
    st.revisions[str(rev_id)] = policy.revision
    st.revision_info = {k: v for k, v in st.revision_info.items() if int(k) >= rev_id - REVISIONS_KEEP}
    st.revision_info[str(rev_id)] = {"revision": policy.revision, "policy": policy.name, "slots": dict(slots)}
    profiles = {i.name: i.dos_profile for i in policy.interfaces}
    for a in st.interfaces:
        a.dos_profile = profiles.get(a.name)
    st.revision, st.policy_name, st.policy_path = policy.revision, policy.name, os.path.abspath(policy.source)
    st.rules, st.prefixes, st.applied_at = len(policy.rules), policy.prefix_count, time.time()
    st.dos_profiles = list(cp.dos_profile_names)
    st.tables = cp.describe()
    st.record_change(old_rev, policy.revision, old_rules, len(policy.rules), st.policy_path, timing.switch_s * 1e3)
    return ApplyResult(old_rev, policy.revision, len(policy.rules), policy.prefix_count, t1 - t0, t2 - t1,
                       timing.switch_s * 1e3, timing.barrier_s * 1e3, filled["entered"], filled["full"],
                       sum(timing.written.values()), len(timing.known))


def _install_with_sets(dp: Datapath, st: InstanceState, policy: Policy, cp, sets: dict[str, int],
                       fresh: list[int]):
    """The swap with the dynamic sets around it (enforcer/fqdnsets.py): publish old + new sets, fill the
    new ones from the learnt names, switch, then (one grace period later) empty the retired sets and
    publish the new sets alone. Returns (fill_sets' counts: entered / full, the swap's timing)."""
    old = {v: tuple(k.split("\n")) for k, v in st.fqdn_sets.items()}
    new = {v: tuple(k.split("\n")) for k, v in sets.items()}
    fm = fq.FqdnMaps(dp.map_fds, st.pin_dir)
    try:
        fqdnsets.publish(st.pin_dir, {**old, **new}, policy.dns, policy.revision)
        with fm.writing():
            if fresh:
                fm.delete_sets(set(fresh))  # an id retired earlier may hold leftovers (a crash mid-swap)
            filled = fqdnsets.fill_sets(fm, {i: new[i] for i in fresh})
        timing = dp.install(cp)
        retired = set(old) - set(new)
        if retired:
            dp.grace_period()               # no packet still judges by the old generation's sets
            with fm.writing():
                fm.delete_sets(retired)
        fqdnsets.publish(st.pin_dir, new, policy.dns, policy.revision)
    finally:
        fm.close()
    st.fqdn_sets = dict(sets)
    return filled, timing


CONNTRACK_MAPS = ("hw_config", "hw_ct4", "hw_ct6")
_SEED_END = L.DTYPES["hw_config"].fields["table_seed"][1] + 8     # hw_config up to table_seed: every build's


def _migrate_fqdn(pin_dir: str, new: Datapath) -> dict:
    """Carry the learnt names, the dynamic sets and the proxy's counters of a pinned instance of another
    build over (same layouts only): an enforcer upgrade keeps what the proxy learnt. Returns what the new
    instance's loss counters start from (InstanceState.carried_counters): the collector's baseline for a
    migrated instance, so the copied counts are not counted again (docs/collector.md "Restarts")."""
    old = Instance.open_maps(pin_dir, fq.MAPS)
    if old is None:
        return {}
    try:
        if fq.copy_maps(old.map_fds, new.map_fds) is None:
            return {}
        return {"from_ring": retired.ring_id(pin_dir), "dns": fq.record_counters(new.map_fds)}
    finally:
        old.close()


def _migrate_conntrack(old: Instance, new: Datapath) -> int:
    """Carry the tracked connections of a pinned instance of another build into a freshly loaded one:
    the tables are copied slot for slot with the old hash seed. `old` needs only CONNTRACK_MAPS, so an
    older build with fewer maps or programs carries its connections over too. A build whose tables or
    config are laid out differently carries nothing (its connections are judged by policy again); tables
    of the build before the TCP sequence state carry over, with nothing learnt (docs/datapath.md
    "Sequence checks")."""
    src = {}
    for name, fam in (("hw_ct4", 4), ("hw_ct6", 6)):
        was, now = bpfsys.map_info(old.map_fds[name]), bpfsys.map_info(new.map_fds[name])
        if (was.type, was.max_entries) != (now.type, now.max_entries):
            return 0
        if was.value_size != now.value_size:
            dt = conntrack.slot_dtype(was.value_size, fam)
            if dt is None:
                return 0
            src[fam] = dt
    cfg_size = bpfsys.map_info(old.map_fds["hw_config"]).value_size
    if cfg_size < _SEED_END or cfg_size > L.DTYPES["hw_config"].itemsize:
        return 0                # fields are only appended: an older, shorter hw_config still has the seed
    new.set_config(table_seed=int(old.config()["table_seed"]))
    return conntrack.copy_tables(old.map_fds, new.map_fds, src)


def _replace(pin_dir: str, new: Datapath, old_state: InstanceState | None, attached: list[AttachedInterface]) -> None:
    """A build upgrade, once the new programs run on every interface (`attached`): retire the replaced
    instance's maps when a collector reads this pin dir (docs/collector.md "Replaced instances"), then unpin
    what is left of it (also what an incomplete or older build left: it would shadow the new pins).

    Retired like a detached instance (bpf/retired.py), so a collector reads its ring to the end, exports its
    last drop interval and follows the new instance; first the connections the new instance carries (copied
    into its tables: _migrate_conntrack) are marked reported in the old tables, then the detach note is
    written, so its detach scan ends only those opened after the copy (`detach`). Neither is done, and the
    maps are unpinned as before, when the note would not be true (no old state, an interface of the old
    instance that may still run its programs) or when the old maps are not laid out as this build's (its
    collector could not read them: collector/kernel.py); then, when a collector reads the pin dir, what the
    unpin frees (unread events, the unexported drop interval, ends of connections not carried) is noted
    for it to report as lost (bpf/retired.py note_replaced). Cost: one grace period, one pass over each
    conntrack table of both instances."""
    new.grace_period()                  # no packet still runs the old programs
    old = Instance.open_maps(pin_dir, tuple(new.map_fds))
    kept = False
    if old is not None:
        try:
            if old_state is not None and _old_programs_gone(old_state, attached) and _same_layouts(old, new):
                conntrack.mark_carried(old.map_fds, new.map_fds)
                noted = _note_detach(pin_dir)
                if noted and retired.collector_checkpoint(pin_dir).exists():
                    retired.retire(pin_dir, noted, asdict(old_state))
                    kept = True
        finally:
            old.close()
    if kept or not retired.collector_checkpoint(pin_dir).exists():
        Datapath.unpin(pin_dir)
    else:
        retired.note_replaced(pin_dir, _uncarried(pin_dir, new), lambda: Datapath.unpin(pin_dir))


def _uncarried(pin_dir: str, new: Datapath) -> int:
    """Connections of the instance pinned at `pin_dir` whose end no one will report (conntrack.
    uncarried_count); -1 (unknown) when its tables are not laid out as this build's."""
    old = Instance.open_maps(pin_dir, ("hw_ct4", "hw_ct6"))
    if old is None:
        return -1
    try:
        if any(_shape(old.map_fds[n]) != _shape(new.map_fds[n]) for n in old.map_fds):
            return -1
        return conntrack.uncarried_count(old.map_fds, new.map_fds)
    finally:
        old.close()


def _same_layouts(old: Instance, new: Datapath) -> bool:
    """Every map of `new` is pinned in `old` with the same type, key, value and size."""
    return all(_shape(old.map_fds[n]) == _shape(fd) for n, fd in new.map_fds.items())


def _shape(fd: int) -> tuple:
    i = bpfsys.map_info(fd)
    return i.type, i.key_size, i.value_size, i.max_entries


def _old_programs_gone(old_state: InstanceState, attached: list[AttachedInterface]) -> bool:
    """No interface the replaced instance was attached to still runs its programs: the new ones replaced
    them there, or it carries none (or is gone with its netns)."""
    now = {(a.name, a.netns) for a in attached}
    return all((i.name, i.netns) in now or _runs_nothing(i) for i in old_state.interfaces)


def _check_interfaces(ifaces: list[InterfaceConf], netns: str | None) -> None:
    missing = []
    for i in ifaces:
        try:
            attach.link_state(i.name, netns)
        except LinkError:
            missing.append(i.name)
    if missing:
        where = f" in netns {netns}" if netns else ""
        raise ControlError(f"interface(s) not found{where}: {', '.join(missing)}; check `ip link`")


def carried_state(old: InstanceState | None, pin_dir: str, build: str) -> InstanceState:
    """The state of a freshly loaded datapath: what survives a build upgrade (the counter slots, the
    revision numbering and each kept revision's slot table, which the migrated connections are stamped
    with; the instance id, since the collector resolves records only within one instance, docs/records.md
    "Rule fields"). Without an old state: a new instance id, revisions from 1 (but see next_revision_id)."""
    if old is None:
        return InstanceState(pin_dir=pin_dir, build=build)
    return InstanceState(pin_dir=pin_dir, build=build, slots=old.slots, revision=old.revision,
                         revision_id=old.revision_id, revisions=old.revisions, revision_info=old.revision_info,
                         history=old.history, fqdn_sets=old.fqdn_sets, instance_id=old.instance_id)


def start(policy: Policy, pin_dir: str, interfaces: list[InterfaceConf], netns: str | None = None) -> tuple[Datapath, InstanceState, StartResult]:
    """Bring an instance up (or take it over) with `policy` on `interfaces`; one policy writer at a
    time (state.policy_writer), like `apply`. SIGTERM, SIGINT and SIGHUP are held meanwhile (_signals_held)."""
    with policy_writer(pin_dir), _signals_held():
        return _start(policy, pin_dir, interfaces, netns)


@contextmanager
def _signals_held():
    """The calling thread's SIGTERM, SIGINT and SIGHUP held pending until the block ends (then delivered,
    unless the caller holds them too: the runner's are handled by its loop): a stop while a start attaches
    or puts back would leave interfaces running the new programs unpinned, or a mix (docs/cli.md "Upgrades")."""
    was = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, was)


def _start(policy: Policy, pin_dir: str, interfaces: list[InterfaceConf], netns: str | None) -> tuple[Datapath, InstanceState, StartResult]:
    _check_interfaces(interfaces, netns)
    build = build_hash()
    st = InstanceState.load(pin_dir)
    adopted, migrated, replaced = False, 0, None
    if Datapath.is_pinned(pin_dir) and st is not None and st.build == build:
        dp = Datapath.open(pin_dir)
        dp.set_config(detached_ns=0)    # a note left by a kill before the unpin: attached again (docs/collector.md "Detach")
        fq.reindex(dp.map_fds, pin_dir)  # what a killed writer left half-written in hw_fqdn_index (rebuild_index)
        adopted = True
    else:
        dp = Datapath.load()
        old = Instance.open_maps(pin_dir, CONNTRACK_MAPS)     # any build's pins that hold conntrack
        if old is not None:
            try:
                migrated = _migrate_conntrack(old, dp)
            finally:
                old.close()
        carried = _migrate_fqdn(pin_dir, dp)
        replaced, st = st, carried_state(st, pin_dir, build)
        st.carried_counters = carried
    st.build = build
    st.instance_id = st.instance_id or new_instance_id()      # new, or a state from before instance ids
    fqdn_was = fqdnsets.snapshot(pin_dir)
    res = apply_policy(dp, st, policy, [(i.name, netns) for i in interfaces])
    if adopted:
        dp.pin(pin_dir)
    try:
        attached = attach.attach_all(dp, interfaces, netns, {p.name: p.dos_profile for p in policy.interfaces})
    except attach.RolledBack as e:
        raise _not_started(e, dp, st, replaced, adopted, fqdn_was) from e
    if not adopted:
        _replace(pin_dir, dp, replaced, attached)
        dp.pin(pin_dir)
    keep = {(a.name, a.netns) for a in attached}
    st.interfaces = attached + [a for a in st.interfaces if (a.name, a.netns) not in keep and adopted]
    st.pid = os.getpid()
    st.save()
    return dp, st, StartResult(adopted, migrated, attached, res)


def _not_started(e: attach.RolledBack, dp: Datapath, st: InstanceState, replaced: InstanceState | None,
                 adopted: bool, fqdn_was: bytes | None) -> ControlError:
    """A start whose attach failed, once attach_all put back what ran before on every interface it touched.
    A new datapath (a first start, a build upgrade) is closed, never pinned: its maps are freed and what
    the pin dir holds (the replaced instance's pins, state, fqdn config) is as before, no detach note, nothing
    retired, so a collector reading the old instance goes on. An adopted instance runs the new policy
    (apply_policy swapped it in): its state is saved with it. Returns the error to raise: what failed and
    what enforces now (docs/cli.md "Upgrades")."""
    dp.close()
    if adopted:
        st.save()
        now = f"the instance at {st.pin_dir} still enforces, now with policy {st.policy_name} revision {st.revision}"
    else:
        fqdnsets.restore(st.pin_dir, fqdn_was)
        how = "except where stated" if e.failed else "unchanged"
        now = (f"the instance at {st.pin_dir} (build {replaced.build}) still enforces {how}; the new build was "
               f"not installed" if replaced is not None else "nothing was installed" + (f" {how}" if e.failed else ""))
    return ControlError(f"{e}; {now}" + ("" if e.failed else "; fix the cause and run again"))


def apply(policy: Policy, pin_dir: str, dp: Datapath | None = None) -> ApplyResult:
    """Atomic swap on a running instance, one writer at a time (state.policy_writer).

    `dp`: the caller's long-lived Datapath of that instance (the runner's, on SIGHUP), kept open, so its
    same-object shortcuts apply (docs/datapath.md "Atomic swaps"): tables it wrote into the standby half
    itself are not compared, the grace period ran after its last flip. Its check of the active gen and
    revision id sees another process's apply meanwhile, and then it compares every table. Without
    `dp`, a Datapath is opened for this one apply (the CLI's `apply`)."""
    with policy_writer(pin_dir):
        st = InstanceState.load(pin_dir)
        if st is None or not Datapath.is_pinned(pin_dir):
            raise ControlError(f"no running instance at {pin_dir}; start one with `hostwall-enforcer run`")
        own = dp is None
        use = Datapath.open(pin_dir) if dp is None else dp
        try:
            res = apply_policy(use, st, policy)
            st.save()
            return res
        finally:
            if own:
                use.close()


def detach(pin_dir: str) -> list[str]:
    """Detach every interface of the instance, note the detach in hw_config, retire its maps when a
    collector reads this pin dir (bpf/retired.py: kept pinned until drained, so what it has not read yet
    is not freed with them), unpin the rest, forget the state. Returns what was detached. The note
    (detached_ns, after the last interface: no packet reaches the tables after it) tells a collector still holding the maps to report the connections left in conntrack
    as ended (docs/collector.md "Detach"); an instance left attached (a crash, --keep-attached) never gets
    one (a new build that replaces it notes it itself: _replace). Nor does one whose state is missing or where an
    interface still carries a program after its detach: the programs may still run on these maps, and a
    false note would end live connections. One policy writer at a time (state.policy_writer): set_config
    is a read-modify-write of hw_config that an apply's gen flip or a ban must not interleave with."""
    with policy_writer(pin_dir):
        st = InstanceState.load(pin_dir)
        done, left = [], []
        for i in (st.interfaces if st else []):
            where = i.name + (f"@{i.netns}" if i.netns else "")
            (done if _detach_one(i) else left).append(where)
        noted = _note_detach(pin_dir) if st is not None and not left else 0
        if noted and retired.collector_checkpoint(pin_dir).exists():
            retired.retire(pin_dir, noted, asdict(st))
        Datapath.unpin(pin_dir)
        if st:
            st.remove()
        return done


def discard_retired(pin_dir: str) -> list[dict]:
    """Unpin every retired instance of `pin_dir` (the operator's `detach --discard-retired`); what each
    held is noted for the collector to report as lost (reason `operator_discarded`). One a collector is
    draining is skipped (bpf/retired.py reader_lock): it unpins it itself."""
    with policy_writer(pin_dir):
        gone = [retired.discard(pin_dir, p, reason="operator_discarded") for p in retired.listing(pin_dir)]
    return [g for g in gone if g is not None]


def _detach_one(i: AttachedInterface) -> bool:
    """Detach our programs from one interface; True if none of them is left there (or the interface or its
    netns is gone). Checked on the link after the detach: the detach itself ignores some netlink errors."""
    try:
        Datapath.detach(i.name, i.netns)
    except (attach.AttachError, LinkError, NetlinkError, OSError):
        pass                                # judged below, by what the link still carries
    return _runs_nothing(i)


def _runs_nothing(i: AttachedInterface) -> bool:
    """The link carries no XDP or TC program (or the interface or its netns is gone: nothing runs there)."""
    try:
        ls = attach.link_state(i.name, i.netns)
    except (LinkError, OSError):
        return True
    return ls.xdp_prog_id == 0 and not ls.tc_ingress and not ls.tc_egress


def _note_detach(pin_dir: str) -> int:
    """hw_config.detached_ns = now on the datapath's clock (its test clock when set); returns it. No pinned
    hw_config of this layout (nothing pinned, an older build): nothing to note, 0."""
    inst = Instance.open_maps(pin_dir, ("hw_config",))
    if inst is None:
        return 0
    try:
        if bpfsys.map_info(inst.map_fds["hw_config"]).value_size != L.DTYPES["hw_config"].itemsize:
            return 0
        now = int(inst.config()["test_now_ns"]) or time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        inst.set_config(detached_ns=now)
        return now
    finally:
        inst.close()


def syn_proxy_status(dp: Datapath, names: tuple[str, ...]) -> dict:
    """The SYN proxy of each profile (mode, what an `auto` one answers for now), its work since load, and
    the flows counted in aggregate (docs/dos.md, docs/collector.md)."""
    from hostwall.bpf import flow_agg, syn_proxy

    from .syn_watch import datapath_now_ns
    now = datapath_now_ns(dp)
    st = syn_proxy.read(dp.map_fds, now)
    gen = dp.active_gen()
    prof = dp.view("hw_dos_profiles")[gen * L.C["HW_DOS_PROFILES_MAX"]: gen * L.C["HW_DOS_PROFILES_MAX"] + len(names)]
    modes = {v: k for k, v in L.SYN_PROXY_MODES.items()}
    return {"profiles": {n: {"mode": modes.get(int(p["proxy"]), "off"), "per_port_pps": int(p["syn_port_pps"]),
                             "pressure": st.pressure.get(i) is not None} for i, (n, p) in enumerate(zip(names, prof))},
            "ports_on": {str(port): round((now - since) / 1e9, 1) for port, since in sorted(st.ports.items())},
            "stats": syn_proxy.stats(dp.map_fds, dp.ncpus),
            "flows_aggregated": flow_agg.stats(dp.map_fds, dp.ncpus)}


def status(pin_dir: str, with_pressure: bool = True) -> dict:
    """Everything `status` shows, as plain data."""
    st = InstanceState.load(pin_dir)
    if st is None or not Datapath.is_pinned(pin_dir):
        raise ControlError(f"no running instance at {pin_dir}")
    dp = Datapath.open(pin_dir)
    try:
        hdr = dp.active_header()
        stats = dp.stats()
        counters: dict = {}
        totals = {v: {"packets": 0, "bytes": 0} for v in L.VERDICT_NAMES.values()}
        by_reason: dict = {}
        for hook, hname in L.HOOK_NAMES.items():
            for v, vname in L.VERDICT_NAMES.items():
                for r, rname in L.REASON_NAMES.items():
                    c = stats[L.stats_index(hook, v, r)]
                    if c["packets"]:
                        counters.setdefault(hname, {}).setdefault(vname, {})[rname] = {
                            "packets": int(c["packets"]), "bytes": int(c["bytes"])}
                        totals[vname]["packets"] += int(c["packets"])
                        totals[vname]["bytes"] += int(c["bytes"])
                        if v != L.C["HW_V_ALLOW"]:
                            key = by_reason.setdefault(rname, {"drop": 0, "would_drop": 0})
                            key[vname] += int(c["packets"])
        rs = dp.rule_stats()
        rules = [{"name": n, **st.rule_meta.get(n, {}), "packets": int(rs[s]["packets"]), "bytes": int(rs[s]["bytes"])}
                 for n, s in st.slots.items()]
        rules.sort(key=lambda r: r.get("order", 0))
        ps = dp.port_stats()
        tot = ps["allowed"] + ps["dropped"] + ps["would_drop"]
        top = np.argsort(tot)[::-1][:20]
        ports = [{"port": int(p), "allowed": int(ps[p]["allowed"]), "dropped": int(ps[p]["dropped"]),
                  "would_drop": int(ps[p]["would_drop"])} for p in top if tot[p]]
        links = []
        for i in st.interfaces:
            try:
                ls = attach.link_state(i.name, i.netns)
                links.append({"name": i.name, "netns": i.netns, "xdp_mode": ls.xdp_mode, "requested": i.xdp_mode_requested,
                              "xdp_prog_id": ls.xdp_prog_id, "tc_ingress": ls.tc_ingress, "tc_egress": ls.tc_egress})
            except Exception as e:  # noqa: BLE001 — status shows the error per interface
                links.append({"name": i.name, "netns": i.netns, "error": str(e)})
        out = {
            "pin_dir": pin_dir, "build": st.build, "policy": st.policy_name, "policy_path": st.policy_path,
            "revision": st.revisions.get(str(int(hdr["revision_id"])), st.revision),
            "generation": dp.active_gen(), "applied_at": st.applied_at, "rules_count": int(hdr["nrules"]),
            "prefixes": st.prefixes, "defaults": {
                "ingress": "deny" if hdr["default_ingress"] == L.ACTION["deny"] else "allow",
                "egress": "deny" if hdr["default_egress"] == L.ACTION["deny"] else "allow",
                "stateful": bool(hdr["stateful"]), "audit": bool(hdr["audit"]),
                "essential_icmp": bool(hdr["essential_icmp"])},
            "interfaces": links, "totals": totals, "drops_by_reason": by_reason, "counters": counters,
            "rules": rules, "ports": ports, "pid": st.pid,
            "pid_alive": bool(st.pid and os.path.exists(f"/proc/{st.pid}")),
        }
        names = tuple(st.dos_profiles)
        ds = dp.dos_stats()
        out["dos"] = {names[p] if p < len(names) else str(p): {L.REASON_NAMES[r]: int(ds[p * L.REASONS + r]["packets"])
                      for r in L.DROP_REASONS if ds[p * L.REASONS + r]["packets"]}
                      for p in range(len(names))}
        from . import bans
        out["bans"] = bans.listing(dp, names)
        out["syn_proxy"] = syn_proxy_status(dp, names)
        out["fragments"] = {f"ipv{fam}": c for fam, c in dp.frag_stats().items()}
        if st.fqdn_sets or fqdnsets.FqdnConfig.read(pin_dir) is not None:
            fm = fq.FqdnMaps(dp.map_fds)
            try:
                out["fqdn"] = fqdnsets.status(fm, pin_dir, st.rule_meta, out["pid_alive"])
            finally:
                fm.close()
            out["fqdn"]["datapath"] = dp.fqdn_stats()
        out["map_memory"] = dp.map_memory()
        if with_pressure:
            out["map_pressure"] = {**policy_pressure(st.tables), **dp.map_pressure()}
        return out
    finally:
        dp.close()
