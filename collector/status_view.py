"""Human-readable `hostwall-collector status` (the --json form holds everything): one line per concern —
collector state, ledger per sink, losses by stage and reason, kernel event outcomes, ring backlog and
what waits to be durable, acknowledgement, the last restart, retired instances drained, queues, sink
health (ok / degraded / failing, why, last success, spool size and age), drops, conntrack, enrichment."""
from __future__ import annotations

import time

from .checkpoint import PREVIOUS_TEXT, RESTARTED

__all__ = ["ledger_lines", "render_status"]


def ledger_lines(led: dict) -> list[str]:
    lines = []
    for name, b in led.get("sinks", {}).items():
        ok = b["produced"] == b["delivered"] + b["lost"] + b["in_flight"]
        lines.append(f"{name}: produced {b['produced']} = delivered {b['delivered']} + lost {b['lost']} + "
                     f"in flight {b['in_flight']} {'ok' if ok else 'MISMATCH'}")
    for v in led.get("violations", []) + led.get("quiescent_violations", []):
        lines.append(f"ledger violation: {v}")
    return lines


def _mib(n: float) -> str:
    return f"{n / 1048576:.1f} MiB"


def render_status(st: dict) -> str:
    """Human-readable status (the --json form holds everything)."""
    state = st.get("state", "?")
    age = float(st.get("age_s") or 0.0)         # since the snapshot was written (the status command sets it)
    if state in ("running", "starting") and not st.get("alive"):
        state = f"dead (last update {_age(age)})"
    elif state == "stopped" and st.get("updated_at"):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(st["updated_at"])))
        state = f"stopped at {when} ({_age(age)})"
    out = [f"collector  {state}, pid {st.get('pid')}, up {st.get('uptime_s', 0):.0f} s, pin {st.get('pin_dir')}"]
    if st.get("error"):
        out.append(f"error      {st['error']}")
    led = st.get("ledger", {})
    for line in ledger_lines(led):
        out.append(f"ledger     {line}")
    lost = [f"{stage}.{r} {n}" for stage, rs in led.get("lost_by_stage", {}).items() for r, n in rs.items()]
    lost += [f"{s}: {r} {n}" for s, b in led.get("sinks", {}).items() for r, n in b.get("lost_in_sink", {}).items()]
    out.append(f"lost       {', '.join(lost) if lost else 'none'}")
    kev = led.get("kernel_events", {})
    if kev:
        em = {t: o.get("emitted", 0) for t, o in kev.items()}
        out.append(f"kernel     events emitted {sum(em.values())} ({', '.join(f'{t} {n}' for t, n in em.items())}); "
                   f"aggregated {sum(o.get('aggregated', 0) for o in kev.values())}, "
                   f"over budget {sum(o.get('budget', 0) for o in kev.values())}, "
                   f"ring buffer full {sum(o.get('ringbuf_full', 0) for o in kev.values())} (cumulative)")
    ring = st.get("ring", {})
    if ring:
        out.append(f"ring       backlog {ring.get('backlog_bytes', 0)} B of {_mib(ring.get('size_bytes', 0))} "
                   f"({ring.get('uncommitted_bytes', 0)} B read, waiting to be durable); "
                   f"read {ring.get('records_read', 0)}, decode errors {ring.get('decode_errors', 0)}")
    dl = st.get("delivery") or {}
    if dl:
        out.append(f"delivery   {dl.get('durable', 0)} of {dl.get('batches', 0)} batches durable in "
                   f"{', '.join(dl.get('acknowledging_sinks') or []) or 'no at_least_once sink'}; "
                   f"{dl.get('commits_pending', 0)} read positions to commit, outbox {dl.get('outbox_pending', 0)}")
    rs = st.get("restart") or {}
    if rs.get("previous") in RESTARTED:
        lost = {**(rs.get("lost") or {}), **{f"kernel.{k}": v for k, v in (rs.get("kernel_while_down") or {}).items()}}
        out.append(f"restart    after {PREVIOUS_TEXT[rs['previous']]} (pid {rs.get('previous_pid')}): lost "
                   f"{', '.join(f'{k} {v}' for k, v in lost.items()) or 'nothing'}"
                   + (f"; {rs['duplicates_possible']} events again (duplicates)" if rs.get("duplicates_possible") else "")
                   + (f"; {'; '.join(rs['notes'])}" if rs.get("notes") else ""))
    out += [_retired_line(d) for d in st.get("retired_drained") or []]
    q = st.get("queues", {})
    qs = [f"events {q.get('events', {}).get('depth', 0)}/{q.get('events', {}).get('capacity_batches', 0)} batches"]
    qs += [f"{n} {v['depth']}/{v['capacity']} ({v['policy']}{', DEAD' if v.get('dead') else ''})"
           for n, v in q.get("sinks", {}).items()]
    out.append(f"queues     {'; '.join(qs)}")
    for n, s in st.get("sinks", {}).items():
        extra = f", {_mib(s['bytes_written'])} written, {s.get('rotations', 0)} rotations" if "bytes_written" in s else ""
        out.append(f"sink       {n}: {_health_text(s.get('health') or {}, age)}; delivered {s.get('delivered', 0)}, "
                   f"lost {s.get('lost', {}) or 0}, in flight {s.get('in_flight', 0)}{extra}")
    d = st.get("drops", {})
    out.append(f"drops      {d.get('intervals', 0)} intervals, {d.get('packets', 0)} packets summarized "
               f"(+{d.get('overflow_packets', 0)} overflow), last barrier {d.get('last', {}).get('barrier_ms', '-')} ms")
    c = st.get("conntrack", {})
    out.append(f"conntrack  {c.get('scans', 0)} scans, {c.get('closed', 0)} closed (after the close grace), "
               f"{c.get('expired', 0)} expired, {c.get('updates', 0)} updates")
    unresolved = (st.get("builder") or {}).get("rule_unresolved", 0)
    if unresolved:                  # docs/records.md "Rule fields"
        out.append(f"rules      {unresolved} records without their rule's name: stamped by a policy revision "
                   "the enforcer's state no longer keeps, or by another enforcer instance")
    en = st.get("enricher")
    if isinstance(en, dict):
        flat = ", ".join(f"{k} {v}" for k, v in en.items() if not isinstance(v, dict))
        rates = ", ".join(f"{path} {r:.0%}" for path, r in _hit_rates(en))
        out.append(f"enricher   {flat}" + (f"; cache hit rates: {rates}" if rates else ""))
    return "\n".join(out)


def _retired_line(d: dict) -> str:
    """One retired instance this run drained before the live one (docs/collector.md "Detach"): without
    it the text status did not say that the unread events and `detach` ends of a stopped enforcer came."""
    return (f"retired    drained {d.get('detached_ns')} before this run: {d.get('events', 0)} events, "
            f"{d.get('detach_ends', 0)} detach ends, {d.get('drop_intervals', 0)} drop intervals")


def _hit_rates(d: dict, prefix: str = ""):
    """(dotted path, hit_rate) of every nested cache the enricher reports."""
    for k, v in d.items():
        if isinstance(v, dict):
            if isinstance(v.get("hit_rate"), (int, float)):
                yield f"{prefix}{k}", float(v["hit_rate"])
            yield from _hit_rates(v, f"{prefix}{k}.")




def _age(s: float | None) -> str:
    if s is None:
        return "never"
    return f"{s:.0f} s ago" if s < 120 else f"{s / 60:.0f} min ago"


def _health_text(h: dict, age_s: float = 0.0) -> str:
    """`ok`, or `degraded: why` / `failing: why`, with last success and the spool when it holds data.
    age_s: how old the snapshot is; ages are shown from now (a stopped collector's saved status)."""
    if not h:
        return "?"
    txt = h.get("state", "?")
    if h.get("state") != "ok" and (h.get("reason") or h.get("last_error")):
        txt += f" ({h.get('reason') or h.get('last_error')})"
    since = h.get("since_success_s")
    txt += f", last success {_age(None if since is None else since + age_s)}"
    if h.get("spool_records"):
        age = h.get("spool_oldest_age_s")
        txt += (f", spool {_mib(h.get('spool_bytes', 0))} ({100 * h.get('spool_fill_ratio', 0):.0f} % of "
                f"{_mib(h.get('spool_max_bytes', 0))}), {h['spool_records']} records, oldest "
                f"{'?' if age is None else f'{age + age_s:.0f} s'}")
    return txt


def health_line(name: str, h: dict) -> str:
    """One sink's health for logs."""
    return f"{name}: {_health_text(h)}"
