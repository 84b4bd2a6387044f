"""Records of FQDN egress allowlists (docs/records.md "DNS records"): the DNS proxy's decision records as the
enforcer writes them (enforcer/dnsrecords.py) and the collector completes them (records/dns.py), the DNS
log tail, and destination.domain on flows an fqdns rule allowed (enrich/domains.py). ECS/OCSF conformance
of these records is in test_record_conformance.py (dns_records, domain_flow_records below)."""
from __future__ import annotations

import json
import os

import dns.message
import numpy as np

from hostwall.bpf import layout as L
from hostwall.bpf.fqdn import Learnt
from hostwall.bpf.state import dns_log_path
from hostwall.collector.encoders import to_ocsf
from hostwall.collector.enrich.domains import DomainNamer
from hostwall.collector.enrich.host import InstanceStateView
from hostwall.collector.logtail import JsonlTail
from hostwall.enforcer.dnsrecords import DnsRecordLog
from hostwall.enforcer.dnswire import parse_query
from tests.collector.test_records import CLOCK, HOST, builder, event, state


def dns_records(tmp_path, monkeypatch) -> list[dict]:
    """A refused name (IPv4 client, UDP) and an upstream failure (IPv6 client, TCP), as shipped."""
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    stats = np.zeros(L.C["HW_DNS_STATS"], np.uint64)
    log = DnsRecordLog(HOST.pin_dir, stats)
    q = parse_query(dns.message.make_query("other.example.test", "A", use_edns=0).to_wire())
    log.refused(q, ("127.0.0.1", 40000), ("127.0.0.1", 53), "udp")
    q6 = parse_query(dns.message.make_query("Mirror.Example.TEST", "AAAA").to_wire())
    log.upstream_failure(q6, ("fd66:1::2", 40001), ("fd66:1::2", 53), "tcp", ["10.66.3.2:53", "[fd66:3::2]:53"],
                         "10.66.3.2:53: no answer within 2 s; [fd66:3::2]:53: Connection refused")
    b = builder()
    return [b.on_dns(json.loads(line)) for line in dns_log_path(HOST.pin_dir).read_text().splitlines()]


class _Maps:
    def __init__(self, rows):
        self.rows = rows

    def learnt(self, now=None):
        return self.rows


def domain_flow_records() -> list[dict]:
    """Egress flow start + end of an fqdns rule, named by DomainNamer from the learnt names."""
    st = state(slots={"mirrors": 0}, rule_meta={"mirrors": {"direction": "egress", "action": "allow",
                                                            "fqdns": ["*.cdn.example.test", "mirror.example.test"]}})
    view = InstanceStateView(HOST.pin_dir, st)
    b = builder()
    b.instance = view
    namer = DomainNamer(view, maps=_Maps([Learnt("a.cdn.example.test", "10.66.2.11", 10**15, 5),
                                          Learnt("b.cdn.example.test", "10.66.2.11", 10**15, 9),
                                          Learnt("evil.example.test", "10.66.2.11", 10**15, 99)]))
    recs = b.on_events(np.concatenate([
        event("flow_start", "10.66.1.2", "10.66.2.11", 40000, 443, direction=1, hook=2, rule_slot=0),
        event("flow_end", "10.66.1.2", "10.66.2.11", 40000, 443, direction=1, hook=2, rule_slot=0, start_ns=1,
              packets=[3, 2], bytes=[300, 200], ct_state=5)]), CLOCK)
    for r in recs:
        namer.name(r)
    return recs


def test_dns_records_carry_the_decision(tmp_path, monkeypatch):
    refused, failed = dns_records(tmp_path, monkeypatch)
    assert refused["hostwall"]["kind"] == "dns" and refused["event"]["action"] == "dns-refused"
    assert refused["dns"]["question"] == {"name": "other.example.test", "type": "A", "class": "IN"}
    assert refused["dns"]["response_code"] == "REFUSED" and refused["source"] == {"ip": "127.0.0.1", "port": 40000}
    assert failed["dns"]["question"]["name"] == "mirror.example.test", "names are recorded as compared: lowercase"
    assert failed["error"]["message"].startswith("10.66.3.2:53: no answer") and failed["network"]["transport"] == "tcp"
    assert refused["event"]["id"] != failed["event"]["id"] and len(refused["event"]["id"]) == 32
    o = to_ocsf(refused)
    assert (o["class_uid"], o["activity_id"], o["rcode_id"], o["rcode"], o["query"]["hostname"]) == \
        (4003, 2, 5, "Refused", "other.example.test")
    assert to_ocsf(failed)["rcode_id"] == 2 and to_ocsf(failed)["disposition_id"] == 27


def test_records_are_rate_limited_and_the_rest_counted(tmp_path, monkeypatch):
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path))
    stats = np.zeros(L.C["HW_DNS_STATS"], np.uint64)
    t = [0.0]
    log = DnsRecordLog(HOST.pin_dir, stats, rate=10, burst=5, clock=lambda: t[0])
    q = parse_query(dns.message.make_query("x.test", "A").to_wire())
    for _ in range(20):
        log.refused(q, ("127.0.0.1", 1), ("127.0.0.1", 53), "udp")
    t[0] = 1.0
    for _ in range(20):
        log.refused(q, ("127.0.0.1", 1), ("127.0.0.1", 53), "udp")
    assert log.written == 10 and stats[L.C["HW_DNS_RECORDS_SUPPRESSED"]] == 30
    assert stats[L.C["HW_DNS_RECORDS_WRITTEN"]] == 10


def test_a_record_the_log_cannot_take_is_counted_not_raised(tmp_path, monkeypatch):
    (tmp_path / "blocked").write_text("")                  # the state dir is a file: every write fails
    monkeypatch.setenv("HOSTWALL_STATE_DIR", str(tmp_path / "blocked"))
    stats = np.zeros(L.C["HW_DNS_STATS"], np.uint64)
    log = DnsRecordLog(HOST.pin_dir, stats)
    q = parse_query(dns.message.make_query("x.test", "A").to_wire())
    log.refused(q, ("127.0.0.1", 1), ("127.0.0.1", 53), "udp")
    log.upstream_failure(q, ("127.0.0.1", 1), ("127.0.0.1", 53), "udp", ["10.66.3.2:53"], "timeout")
    assert log.written == 0 and stats[L.C["HW_DNS_RECORDS_UNWRITTEN"]] == 2
    assert stats[L.C["HW_DNS_RECORDS_WRITTEN"]] == 0


def test_the_dns_log_tail_follows_rotation_and_resumes(tmp_path):
    p = tmp_path / "x.dns.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\nnot json\n{"a": 3')
    t = JsonlTail(p)
    got, bad = t.read()
    assert [r["a"] for r in got] == [1, 2] and bad == 1
    with open(p, "a") as f:
        f.write("}\n")
    assert [r["a"] for r in t.read()[0]] == [3]
    assert JsonlTail(p, t.position).read() == ([], 0), "resumes at the saved position"
    with open(p, "a") as f:
        f.write('{"a": 4}\n{"a": 5')                          # 4 written before the rotation, 5 torn
    os.replace(p, str(p) + ".1")
    p.write_text('{"a": 6}\n')
    resumed = JsonlTail(p, t.position)
    assert [r["a"] for r in t.read()[0]] == [4], "the rest of the rotated file first"
    assert [r["a"] for r in t.read()[0]] == [6], "then the new file from its start"
    assert [r["a"] for r in resumed.read()[0]] == [4] and [r["a"] for r in resumed.read()[0]] == [6], \
        "a position saved before the rotation resumes in the rotated file"
    p.write_text("")
    assert t.read() == ([], 0) and t.position[1] == 0, "a truncated file starts over"


def test_destination_domain_names_fqdns_flows():
    start, end = domain_flow_records()
    assert start["destination"]["domain"] == "b.cdn.example.test", "the newest learnt name the rule's patterns match"
    assert end["destination"]["domain"] == "b.cdn.example.test"
    plain = builder().on_events(event("flow_start", "10.66.1.2", "10.66.2.11", 40000, 443, direction=1, hook=2,
                                      rule_slot=0), CLOCK)[0]
    DomainNamer(InstanceStateView(HOST.pin_dir, state()), maps=_Maps([Learnt("a.cdn.example.test", "10.66.2.11",
                                                                             10**15, 5)])).name(plain)
    assert "domain" not in plain["destination"], "a rule without fqdns gets no domain"


def test_naming_a_flow_leaves_the_records_sharing_its_destination_unchanged():
    """The builder shares one `destination` object among the records of a flow tuple that add no counters
    to it (docs/collector.md "Records at line rate"): naming one record replaces its object."""
    st = state(slots={"mirrors": 0}, rule_meta={"mirrors": {"direction": "egress", "action": "allow",
                                                            "fqdns": ["*.cdn.example.test"]}})
    view = InstanceStateView(HOST.pin_dir, st)
    b = builder()
    b.instance = view
    first, again = b.on_events(np.concatenate([
        event("flow_start", "10.66.1.2", "10.66.2.11", 40000, 443, direction=1, hook=2, rule_slot=0)] * 2), CLOCK)
    assert first["destination"] is again["destination"], "the premise: one shared object"
    DomainNamer(view, maps=_Maps([Learnt("a.cdn.example.test", "10.66.2.11", 10**15, 5)])).name(first)
    assert first["destination"] == {"ip": "10.66.2.11", "port": 443, "domain": "a.cdn.example.test"}
    assert again["destination"] == {"ip": "10.66.2.11", "port": 443}, "the other record is not named by it"
