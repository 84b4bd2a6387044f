"""The policy a running instance enforces, read back from its pinned maps: the OLD side of
`apply --dry-run` (docs/cli.md).

The active generation's classification tables (hw_iv4/6, hw_peer_cls, hw_l4, hw_l4_cls, hw_rules,
hw_policy) are copied out of the mmap'ed arrays into analysis.table.Tables, so the diff is against what
the kernel actually judges by, not against a file that may have changed since. Rule names come from
the state file's slot table of that revision. The rule definitions for the rule-level diff come from
the policy file the state names, when it still has the running revision; otherwise only what the state
keeps (priority, direction, action). Cost: one copy of the active tables (tens of MB for the max
policy), no syscall per entry.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.instance import Instance
from hostwall.bpf.names import POLICY_MAPS
from hostwall.bpf.state import InstanceState
from hostwall.yamldoc import PolicyError

from .analysis.table import Tables
from .control import ControlError
from .policy import Policy, load_policy

__all__ = ["RunningPolicy", "running_policy"]


@dataclass(frozen=True)
class RuleMeta:
    """What the state file keeps of a running rule (enough for the rule-level diff)."""
    name: str
    priority: int
    direction: str
    action: str
    line: int = 0


@dataclass
class RunningPolicy:
    tables: Tables
    state: InstanceState
    policy: Policy | None           # the file it came from, if it still has the running revision
    rules: list                     # Rule objects (from the file) or RuleMeta

    @property
    def label(self) -> str:
        src = self.policy.source if self.policy else (self.state.policy_path or "?")
        return f"running instance {self.state.pin_dir} ({self.state.policy_name} revision {self.tables.revision}, from {src})"


def _gen_slice(inst: Instance, name: str, gen: int, n: int | None = None) -> np.ndarray:
    per_gen = POLICY_MAPS[name][1]
    v = inst.view(name)
    return np.array(v[gen * per_gen: gen * per_gen + (per_gen if n is None else n)])


def running_policy(pin_dir: str) -> RunningPolicy:
    st = InstanceState.load(pin_dir)
    if st is None or not Instance.is_pinned(pin_dir):
        raise ControlError(f"no running instance at {pin_dir}; start one with `hostwall-enforcer run`")
    inst = Instance.open(pin_dir)
    try:
        gen = inst.active_gen()
        hdr = _gen_slice(inst, "hw_policy", gen, 1)[0]
        nrules = int(hdr["nrules"])
        rules = _gen_slice(inst, "hw_rules", gen, nrules)
        n4 = int(_gen_slice(inst, "hw_top4", gen)["last"][-1]) + 1
        n6 = int(_gen_slice(inst, "hw_top6", gen)["last"][-1]) + 1
        iv4 = _gen_slice(inst, "hw_iv4", gen, n4)
        iv6 = _gen_slice(inst, "hw_iv6", gen, n6)
        n_peer = int(max(iv4["cls"].max(initial=0), iv6["cls"].max(initial=0))) + 1
        peer = _gen_slice(inst, "hw_peer_cls", gen, n_peer)
        dense = _gen_slice(inst, "hw_l4", gen)["cls"].reshape(-1).copy()
        l4 = _gen_slice(inst, "hw_l4_cls", gen, int(dense.max()) + 1)
    finally:
        inst.close()
    rid = str(int(hdr["revision_id"]))
    info = st.revision_info.get(rid, {})
    by_slot = {s: n for n, s in (info.get("slots") or st.slots).items()}
    names = tuple(by_slot.get(int(s), f"slot-{int(s)}") for s in rules["slot"])
    revision = info.get("revision") or st.revisions.get(rid, st.revision)
    t = Tables(names=names, actions=rules["action"].astype(np.int64),
               default={L.DIR["ingress"]: int(hdr["default_ingress"]), L.DIR["egress"]: int(hdr["default_egress"])},
               audit=bool(hdr["audit"]), v4_starts=iv4["start"].astype(np.uint64), v4_cls=iv4["cls"].astype(np.int64),
               v6_starts=[(int(a) << 64) | int(b) for a, b in zip(iv6["hi"], iv6["lo"])],
               v6_cls=iv6["cls"].astype(np.int64), peer_words=peer["words"], l4_dense=dense, l4_words=l4["words"],
               revision=revision, essential=bool(hdr["essential_icmp"]))
    pol = None
    if st.policy_path:
        try:
            p = load_policy(st.policy_path)
            pol = p if p.revision == revision else None
        except PolicyError:
            pol = None
    if pol is not None:
        rule_list = list(pol.rules)
    else:
        meta = st.rule_meta
        rule_list = [RuleMeta(n, int(meta.get(n, {}).get("priority", 0)), meta.get(n, {}).get("direction", "?"),
                              meta.get(n, {}).get("action", "?")) for n in names]
    return RunningPolicy(t, st, pol, rule_list)
