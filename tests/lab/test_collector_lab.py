"""End to end: the real enforcer and the real `hostwall-collector` process next to it in a netns lab
(issue "Collector"). One lab run — the demo's own (lab.demo.run_lab) with a second, OCSF-encoded
JSONL sink — is shared by the tests of this module:

    attacker probes (blocked) → normal client traffic, both families → a 3 s UDP flood from the
    attacker while the client keeps using the web service → quiet until the anomaly closes →
    SIGTERM to the collector (final drain) → enforcer counters.

Checked: the anomaly (exactly one for the attacker's prefix, open within 2 s of the flood's start
as seen in the flow log, closed after it, its top talkers individual hosts with integer counts; none
from normal traffic); every record against schemas/*.json by kind, the official ECS 8.11.0 and OCSF
1.7.0 definitions (100 %, as the demo's summary reports) and the contract's invariants; the OCSF sink
with pydantic-ocsf; drop summaries == the enforcer's drop counters; a client flow's start and end
records (same first packet, start before end); the ledger (produced = delivered + lost, nothing in
flight, every delivered record in the file)."""
from __future__ import annotations

import base64
import copy
import hashlib
import io
import ipaddress
import re
import struct
import subprocess
import sys
from collections import Counter, defaultdict

import pytest
from rich.console import Console

from hostwall.lab import demo
from hostwall.lab.collector_proc import LAB_CONFIG, kind, read_jsonl
from tests.collector.test_encoders import assert_ecs_fields, ocsf_model, ocsf_schema
from tests.collector.test_records import validator

from .conftest import EXAMPLE_POLICY, _available

pytestmark = pytest.mark.lab

ATTACKER = demo.ATTACKER_PREFIX
FLOOD_S = 3.0
FLOOD_PPS = 100_000


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    ok, why = _available()
    if not ok:
        pytest.skip(f"netns lab unavailable: {why}")
    out = tmp_path_factory.mktemp("collector-lab")
    sinks = [f"jsonl:{out / 'flows.jsonl'}", {"url": f"jsonl:{out / 'flows.ocsf.jsonl'}", "encoding": "ocsf"}]
    con = Console(file=io.StringIO(), width=120)
    r = demo.run_lab(EXAMPLE_POLICY, out, FLOOD_S, FLOOD_PPS, con, sinks=sinks)
    r.console_text = con.file.getvalue()
    r.ocsf = read_jsonl(out / "flows.ocsf.jsonl")
    return r


def anomaly_rows(run) -> list[dict]:
    return demo.anomalies(run.records, run.arrivals)


def community_id_v1(saddr: str, daddr: str, proto: int, sport: int, dport: int, seed: int = 0) -> str:
    """Community ID v1 (corelight/community-id-spec), written out here independently of the collector."""
    a, b = ipaddress.ip_address(saddr).packed, ipaddress.ip_address(daddr).packed
    if not (a < b or (a == b and sport < dport)):
        a, b, sport, dport = b, a, dport, sport
    data = struct.pack("!H", seed) + a + b + struct.pack("!BBHH", proto, 0, sport, dport)
    return "1:" + base64.b64encode(hashlib.sha1(data).digest()).decode()


# ---- anomalies -----------------------------------------------------------------------------------

def test_normal_traffic_opens_no_anomaly(run):
    warm_end = run.collector_started + LAB_CONFIG["anomaly"]["window_s"] * LAB_CONFIG["anomaly"]["warmup_windows"]
    assert run.normal_end - warm_end >= 5.0, "normal traffic must run well past the detector's warm-up"
    before = run.status_before_flood["anomaly"]
    assert before["observed"] > 20 and before["keys"] > 0, before        # it was watching the normal traffic
    assert before["opened"] == 0 and before["open"] == 0, before
    early = [rec for _, rec in run.arrivals if _seen_before(rec, run.flood_start)]
    assert early == []
    assert [r for r in anomaly_rows(run) if r["opened_at"] < run.flood_start - 1.0] == []


def _seen_before(rec: dict, t: float) -> bool:
    return demo.iso_s(rec["@timestamp"]) < t - 1.0


def test_flood_opens_exactly_one_anomaly_for_the_attacker_prefix_and_closes_it(run):
    rows = anomaly_rows(run)
    by_prefix = [r for r in rows if r["dimension"] == "source_prefix"]
    assert [(r["value"], r["states"][0], r["states"][-1]) for r in by_prefix] == [(ATTACKER, "open", "close")], rows
    a = by_prefix[0]
    assert a["states"].count("open") == 1 and a["states"].count("close") == 1
    # open: the anomaly's own time and the moment a reader of the flow log saw it, both ≤ 2 s
    assert a["opened_at"] - run.flood_start <= demo.OPEN_WITHIN_S, (a, run.flood_start)
    assert a["open_seen"] is not None and a["open_seen"] - run.flood_start <= demo.OPEN_WITHIN_S, (a, run.flood_start)
    assert a["closed_at"] >= run.flood_end
    assert a["severity"] and a["peak_rate"] > 1000          # a real flood, not a trickle over the threshold
    recs = [r for r in run.records if kind(r) == "anomaly" and r["hostwall"]["anomaly"]["id"] == a["id"]]
    talkers = recs[-1]["hostwall"]["anomaly"]["top_talkers"]
    top = ipaddress.ip_address(talkers[0]["source"])                  # one host, never the prefix
    assert top in ipaddress.ip_network(ATTACKER), talkers
    assert all(isinstance(t[k], int) for t in talkers for k in ("count", "packets", "bytes")), talkers
    assert all(r["source"] == {"address": ATTACKER} and "ip" not in r["source"] for r in recs)
    # nothing anywhere opened for the client's or any other prefix
    assert all(demo.in_prefix(r["value"], ATTACKER) for r in rows if r["dimension"] == "source_prefix")


# ---- schemas -------------------------------------------------------------------------------------

SCHEMA_BY_KIND = {"flow": "flow.schema.json", "log": "flow.schema.json", "deny": "flow.schema.json",
                  "drop_summary": "flow.schema.json", "anomaly": "anomaly.schema.json", "audit": "audit.schema.json",
                  "loss": "loss.schema.json"}


def test_every_record_validates_against_its_schema(run):
    validators = {k: validator(name) for k, name in SCHEMA_BY_KIND.items()}
    kinds = Counter(kind(r) for r in run.records)
    assert {"flow", "deny", "drop_summary", "anomaly", "audit"} <= set(kinds), kinds
    assert set(kinds) <= set(SCHEMA_BY_KIND), kinds
    for r in run.records:
        errs = sorted(validators[kind(r)].iter_errors(r), key=str)
        assert not errs, f"{kind(r)} {r['event'].get('action')}: {[e.message for e in errs][:5]}"
    ids = [r["event"]["id"] for r in run.records]
    assert len(ids) == len(set(ids))                        # event.id unique per record


def test_ecs_field_names_and_types_match_the_ecs_reference(run):
    seen = assert_ecs_fields(run.records)
    assert {"source.ip", "destination.port", "network.community_id", "rule.name", "source.bytes",
            "destination.packets", "observer.ingress.interface.name", "event.id"} <= seen


def test_every_record_conforms_to_the_official_definitions_and_the_schemas(run):
    c = run.conformance
    assert c.available and c.records == len(run.records) > 100
    assert c.ok, (c.line(), c.problems.most_common(10), c.invariant_violations[:10])
    n = len(run.records)
    con = Console(file=io.StringIO(), width=200)
    demo.print_summary(run, con)                                  # what the demo prints
    assert f"ECS 8.11.0: {n}/{n} valid, OCSF 1.7.0: {n}/{n} valid, schemas/*.json: {n}/{n} valid" \
        in con.file.getvalue()
    # the second sink wrote the OCSF events themselves: the official schema accepts every one
    from tests.conformance import ocsf
    assert [v for o in run.ocsf for v in ocsf.validate(o)] == []


def test_ocsf_sink_validates_with_pydantic_ocsf(run):
    assert len(run.ocsf) == len(run.records) > 0             # the same records, through the second sink
    dictionary = ocsf_schema()["dictionary"]["attributes"]
    classes = Counter()
    for o in run.ocsf:
        model = ocsf_model(o["class_uid"])
        model.model_validate(copy.deepcopy(o))              # raises pydantic.ValidationError on a mismatch
        for name in o:
            assert name in model.model_fields or name in dictionary, f"{name} is not an OCSF attribute"
        for name in ("action_id", "disposition_id"):
            if name in o:
                assert str(o[name]) in dictionary[name]["enum"], (name, o[name])
        classes[o["class_uid"]] += 1
    assert set(classes) == {4001, 2004, 5019}, classes      # network activity, detection finding, config change
    assert {o["metadata"]["uid"] for o in run.ocsf} == {r["event"]["id"] for r in run.records}


# ---- drops, flows, ledger ------------------------------------------------------------------------

def test_drop_summaries_add_up_exactly_to_the_enforcers_drop_counters(run):
    log, enf = demo.drops_from_log(run.records), demo.drops_from_enforcer(run.enforcer_status)
    assert log == enf
    assert enf[("udp_flood", "drop")] > 10_000                          # the DoS profile took the flood
    assert enf[("policy_deny", "drop")] > 0 and enf[("default_deny", "drop")] > 0
    ledger = run.collector_status["ledger"]
    assert ledger["drop_packets"].get("overflow", 0) == 0
    assert ledger["drop_packets"]["summarized"] == sum(enf.values())


def test_a_client_flow_has_start_and_end_with_totals_both_ways_rule_and_community_id(run):
    cli, prot = "10.66.2.2", "10.66.1.2"
    flows = defaultdict(dict)
    for r in run.records:
        if kind(r) == "flow" and r["source"]["ip"] == cli and r["destination"].get("port") == 22 \
                and r["destination"]["ip"] == prot:
            flows[r["source"]["port"]][r["event"]["type"][0]] = r
    assert len(flows) == 3, flows.keys()                     # three ssh connections from the client (IPv4)
    for sport, f in flows.items():
        assert set(f) >= {"start", "end"}, (sport, f.keys())
        start, end = f["start"], f["end"]
        cid = community_id_v1(cli, prot, 6, sport, 22)
        for r in (start, end):
            assert r["network"]["community_id"] == cid
            assert r["rule"]["name"] == "client-ssh" and r["rule"]["ruleset"] == "lab-demo"
            assert r["network"]["transport"] == "tcp" and r["network"]["direction"] == "ingress"
            assert r["hostwall"]["verdict"] == "allow"
        assert end["source"]["packets"] > 0 and end["destination"]["packets"] > 0
        assert end["source"]["bytes"] > 0 and end["destination"]["bytes"] > 0
        assert end["network"]["packets"] == end["source"]["packets"] + end["destination"]["packets"]
        fl = end["hostwall"]["flow"]
        assert fl["state"] == "closed" and fl["end_reason"] == "fin"
        # one first packet for both records (the precise clock), and the start sorts before the end
        assert fl["start"] == start["hostwall"]["flow"]["start"] == start["event"]["start"] == start["@timestamp"]
        assert demo.iso_s(start["@timestamp"]) <= demo.iso_s(end["@timestamp"]) == demo.iso_s(fl["end"])
        assert end["event"]["duration"] == fl["duration_ns"] > 0


def test_ledger_balances_for_every_sink_and_the_log_holds_every_delivered_record(run):
    st = run.collector_status
    assert run.collector_rc == 0 and st["state"] == "stopped"
    led = st["ledger"]
    assert led["ok"] and led["violations"] == [] and led["quiescent_violations"] == []
    assert len(led["sinks"]) == 2
    for name, b in led["sinks"].items():
        assert b["produced"] == b["delivered"] + b["lost"] and b["in_flight"] == 0, (name, b)
        assert b["lost"] == 0, (name, b, led["lost_by_stage"])     # a light lab load loses nothing
        assert demo.jsonl_lines(name) == b["delivered"]
        assert f"{name}: produced {b['produced']} = delivered {b['delivered']} + lost 0 + in flight 0 ok" \
            in run.collector_exit
    assert led["produced"] == len(run.records)
    by_kind = Counter(kind(r) for r in run.records)
    assert led["produced_by_source"]["anomaly"] == by_kind["anomaly"]
    assert led["produced_by_source"]["audit"] == by_kind["audit"] == 1


def test_the_demo_checks_and_summary(run):
    cs = demo.checks(run)
    assert all(c.ok for c in cs), [(c.what, c.detail) for c in cs if not c.ok]
    con = Console(file=io.StringIO(), width=140)
    demo.print_summary(run, con)
    text = con.file.getvalue()
    for what in ("top flows", "drops by reason", "anomalies", "collector ledger", str(run.jsonl), "udp_flood",
                 "client-web", ATTACKER):
        assert what in text, what

    # the files the summary names exist, and the kept log holds the collector's output (its banner and
    # its exit ledger, which it prints on stdout)
    files = re.search(r"next to it: (.*)", text, re.S).group(1)
    named = re.findall(r"([\w.-]+\.(?:yaml|log|json))\b", files)
    assert {"hostwall.collector.yaml", "hostwall.collector.log", "collector-status.json"} <= set(named), files
    for name in named:
        assert (run.out_dir / name).is_file(), name
    log = (run.out_dir / "hostwall.collector.log").read_text()
    assert "collecting from" in log and "produced" in log, log[-2000:]
    assert f"hostwall-collector status --status-file {run.out_dir / 'collector-status.json'}" in " ".join(text.split())
    # the saved status reads back with the command the summary gives (README "after the demo")
    r = subprocess.run([sys.executable, "-m", "hostwall.collector.cli", "status", "--status-file",
                        str(run.out_dir / "collector-status.json")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and "stopped" in r.stdout, r.stdout + r.stderr
    # the anomaly's peak rate is a window average, and the column says over which window
    assert "window avg" in text
    assert f"the highest {LAB_CONFIG['anomaly']['window_s']:g} s window average" in " ".join(text.split()), text
