"""`hostwall-enforcer test`: judge every case by the reference model and (given a datapath judge) by
the loaded BPF programs, check every invariant, and report every miss (docs/policy.md "Tooling").

A case fails when the reference model's outcome misses its expectation, or when any hook of the
datapath (XDP and TC ingress for ingress packets, TC egress for egress) disagrees with the reference
model in verdict, reason or rule: a disagreement is a bug in hostwall, and it fails the case even if
the expectation holds. An invariant fails when violated (with a counterexample the reference model
confirmed). The datapath judge is passed in (enforcer/testrun.py loads the programs and uses
BPF_PROG_TEST_RUN), so this module needs no kernel.

Cost: the reference side judges all stateless packets in one batch (batch.py): ~0.5 µs a case plus
~40 µs a rule; invariants: the owner sweep once, then O(cells in each set).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..policy import Policy
from ..reference import Learnt, evaluate
from .batch import BatchReference
from .cases import Case, CaseFile
from .ctmodel import Outcome, judge, outcome_of
from .fqdn import with_addresses
from .invariants import InvariantResult, check_invariant
from .packet import CasePacket
from .table import decision_table, paused_gc

__all__ = ["CaseResult", "TestReport", "run_tests", "reference_outcomes", "DatapathJudge"]

_NONE: tuple[str, ...] = ()      # no misses, no disagreements (shared: never mutated)
# packets -> per packet {hook: outcome}
DatapathJudge = Callable[[list[CasePacket]], list[dict[str, Outcome]]]


@dataclass(slots=True)
class CaseResult:
    case: Case
    reference: Outcome
    datapath: dict[str, Outcome] = field(default_factory=dict)
    misses: Sequence[str] = ()
    disagreements: Sequence[str] = ()

    @property
    def failed(self) -> bool:
        return bool(self.misses or self.disagreements)

    def text(self, source: str) -> str:
        c = self.case
        where = f"{source}:{c.line}" if c.line else source
        out = [f"{where}: case {c.name!r}: `{c.packet.text()}`"]
        if self.misses:
            out.append(f"    got {self.reference.text()}: {'; '.join(self.misses)}")
        for d in self.disagreements:
            out.append(f"    datapath disagrees with the reference model: {d}")
        return "\n".join(out)


@dataclass
class TestReport:
    policy: Policy
    cases_file: CaseFile
    results: list[CaseResult]
    invariants: list[InvariantResult]
    datapath_checked: bool
    seconds: float = 0.0
    snapshot: str | None = None          # where the fqdns rules' names → addresses came from (None: empty sets)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if r.failed]

    @property
    def violated(self) -> list[InvariantResult]:
        return [i for i in self.invariants if not i.holds]

    @property
    def failed(self) -> bool:
        return bool(self.failures or self.violated)

    def summary(self) -> str:
        how = "reference model and datapath (test-run)" if self.datapath_checked else "reference model only"
        if self.snapshot:
            how += f"; fqdns sets from {self.snapshot}"
        return (f"{len(self.results)} cases: {len(self.results) - len(self.failures)} passed, {len(self.failures)} "
                f"failed; {len(self.invariants)} invariants: {len(self.invariants) - len(self.violated)} hold, "
                f"{len(self.violated)} violated ({how}; policy {self.policy.name} revision {self.policy.revision}; "
                f"{self.seconds:.2f} s)")

    def text(self) -> str:
        lines = [r.text(self.cases_file.source) for r in self.failures]
        for inv in self.violated:
            where = f"{self.cases_file.source}:{inv.invariant.line}" if inv.invariant.line else self.cases_file.source
            lines.append(f"{where}: {inv.text()}")
        lines.append(("FAILED: " if self.failed else "ok: ") + self.summary())
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"ok": not self.failed, "summary": self.summary(), "datapath_checked": self.datapath_checked,
                "cases": [{"name": r.case.name, "line": r.case.line, "packet": r.case.packet.text(),
                           "ok": not r.failed, "reference": r.reference.to_json(),
                           "datapath": {h: o.to_json() for h, o in r.datapath.items()},
                           "misses": list(r.misses), "disagreements": list(r.disagreements)} for r in self.results],
                "invariants": [{"name": i.invariant.name, "line": i.invariant.line, "kind": i.invariant.kind,
                                "set": i.invariant.selector.text(), "holds": i.holds,
                                "counterexample": i.counterexample.text() if i.counterexample else None,
                                "outcome": i.outcome.to_json() if i.outcome else None,
                                "regions": [r.to_json() for r in i.regions]} for i in self.invariants]}


def reference_outcomes(policy: Policy, packets: list[CasePacket], batch: BatchReference | None = None,
                       learnt: Learnt | None = None) -> list[Outcome]:
    """The reference model's outcome of each packet (its `state` included), fqdns rules judged by the
    snapshot `learnt` (names → addresses; None: their sets are empty). Every stateless judgement (the
    packets and the openers of those with a state) is made in one batch; outcomes are shared objects
    per deciding rule, so a case costs a few list operations."""
    batch = batch or BatchReference(policy, learnt)
    stateful = [i for i, p in enumerate(packets) if p.state != "new"]
    opened = [packets[i].opener() for i in stateful]
    order: list[CasePacket] = list(packets)
    order += [op[0] for op in opened if op is not None]     # not None: their state is not new
    orders = batch.orders(order).tolist()
    drop = "would_drop" if policy.defaults.audit else "drop"
    by_rule = [Outcome(drop, "policy_deny", r.name) if r.action == "deny" else Outcome("allow", "pass_rule", r.name)
               for r in policy.rules]
    default = {d: Outcome("allow", "pass_default", None) if getattr(policy.defaults, d) == "allow"
               else Outcome(drop, "default_deny", None) for d in ("ingress", "egress")}

    def decided(k: int) -> Outcome:
        o = orders[k]
        if o >= 0:
            return by_rule[o]
        if o == -1:
            return default[order[k].direction]
        return outcome_of(evaluate(policy, order[k].reference(), learnt))
    dflt_in, dflt_eg = default["ingress"], default["egress"]
    out = [by_rule[o] if o >= 0 else (dflt_eg if p.direction == "egress" else dflt_in) if o == -1 else decided(i)
           for i, (o, p) in enumerate(zip(orders, packets))]
    def by_pair(opener: CasePacket, first: Outcome, own: Outcome) -> Callable[[CasePacket], Outcome]:
        return lambda c: first if c is opener else own
    for k, (i, op) in enumerate(zip(stateful, opened)):
        assert op is not None                             # its state is not new
        out[i] = judge(policy, packets[i], by_pair(op[0], decided(len(packets) + k), out[i]), op)
    return out


def run_tests(policy: Policy, cf: CaseFile, datapath: DatapathJudge | None = None,
              learnt: Learnt | None = None, snapshot: str | None = None) -> TestReport:
    """Every case and invariant; fqdns rules judged by the names → addresses snapshot `learnt` (read
    from `snapshot`, named in the report; the datapath judge must hold the same addresses in its
    sets), else with empty sets. The cyclic GC is paused meanwhile (as in policy.parse_policy): a run
    creates a few objects per case and no cycles, and gen-2 collections over everything else alive
    (a max policy's tables) otherwise halve the throughput."""
    with paused_gc():
        return _run_tests(policy, cf, datapath, learnt, snapshot)


def _run_tests(policy: Policy, cf: CaseFile, datapath: DatapathJudge | None, learnt: Learnt | None,
               snapshot: str | None) -> TestReport:
    t0 = time.perf_counter()
    packets = [c.packet for c in cf.cases]
    ref = reference_outcomes(policy, packets, learnt=learnt)
    dp = datapath(packets) if datapath is not None and packets else [{}] * len(packets)   # shared, never written
    results = [CaseResult(c, r, d, c.expect.misses(r), _NONE) for c, r, d in zip(cf.cases, ref, dp)]
    for res in results:
        if res.datapath:
            r = res.reference
            res.disagreements = [f"{hook}: {got.text()}, reference model: {r.text()}"
                                 for hook, got in res.datapath.items() if got != r]
    invs = []
    if cf.invariants:                     # over the snapshot's sets: fqdns rules as static rules
        static = with_addresses(policy, learnt)
        dt = decision_table(static)
        invs = [check_invariant(static, dt, inv, cf.local) for inv in cf.invariants]
    return TestReport(policy, cf, results, invs, datapath is not None, time.perf_counter() - t0,
                      snapshot if learnt is not None else None)
