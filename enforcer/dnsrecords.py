"""The DNS proxy's decision records: names it refused (refuse_unlisted) and queries it answered SERVFAIL
because no upstream answered (docs/records.md "DNS records").

One ECS-shaped JSON object per line in the instance's DNS log ($HOSTWALL_STATE_DIR/<pin stem>.dns.jsonl,
bpf/state.py dns_log_path), which the collector tails and ships like the audit log (it adds event.id,
event.created, observer and hostwall.schema_version). Why a file and not the ring buffer: these records
are born in user space, the collector must not import the enforcer, and a file in the state dir survives
either process restarting (the collector resumes at its saved offset).

Bounded: at most `rate` records per second (burst `burst`) are written; the rest are counted in
hw_dns_stats[HW_DNS_RECORDS_SUPPRESSED] (and every query is in the other counters regardless); a record the
file cannot take (disk full, state dir gone) is counted in HW_DNS_RECORDS_UNWRITTEN and the query is answered
as usual; HW_DNS_RECORDS_WRITTEN counts the rest. The collector folds these into its loss ledger
(collector/kernel.py kernel_loss, type "dns": emitted, budget, write_error). The file is rotated to `.1`
past `max_bytes`; the collector reads the rest of a rotated file before the new one (collector/logtail.py).
Cost: one write(2) per record.
"""
from __future__ import annotations

import ipaddress
import os
import time
from collections.abc import Callable

import orjson

from hostwall.bpf import layout as L
from hostwall.bpf.state import dns_log_path

from .dnswire import Question

__all__ = ["DnsRecordLog"]

_SUPPRESSED, _UNWRITTEN, _WRITTEN = (L.C["HW_DNS_RECORDS_SUPPRESSED"], L.C["HW_DNS_RECORDS_UNWRITTEN"],
                                     L.C["HW_DNS_RECORDS_WRITTEN"])


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns // 1000 % 10**6:06d}Z"


class DnsRecordLog:
    """Appends decision records; `stats` is the proxy's counter array (hw_dns_stats view)."""

    def __init__(self, pin_dir: str, stats, *, rate: float = 50.0, burst: float = 200.0,
                 max_bytes: int = 64 << 20, clock: Callable[[], float] = time.monotonic):
        self.pin_dir = pin_dir
        self.path = dns_log_path(pin_dir)
        self.stats = stats
        self.rate, self.burst, self.max_bytes, self.clock = rate, burst, max_bytes, clock
        self.tokens = burst
        self.at = clock()
        self.written = 0

    def _allow(self) -> bool:
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        self.stats[_SUPPRESSED] += 1
        return False

    def _write(self, rec: dict) -> None:
        line = orjson.dumps(rec) + b"\n"
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            try:
                if os.fstat(fd).st_size + len(line) > self.max_bytes:
                    os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                    os.close(fd)
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
                if os.write(fd, line) != len(line):
                    raise OSError("short write")
            finally:
                os.close(fd)
        except OSError:
            self.stats[_UNWRITTEN] += 1
            return
        self.written += 1
        self.stats[_WRITTEN] += 1

    def _base(self, action: str, types: list[str], q: Question, rcode: str, client: tuple, server: tuple,
              transport: str, decision: str) -> dict:
        ns = time.time_ns()
        fam = ipaddress.ip_address(client[0]).version
        return {
            "@timestamp": _iso(ns),
            "event": {"kind": "event", "category": ["network"], "type": types, "action": action,
                      "outcome": "failure", "dataset": "hostwall.dns"},
            "dns": {"type": "answer", "id": str(q.id), "op_code": "QUERY", "response_code": rcode,
                    "question": {"name": q.name, "type": q.type_name, "class": "IN" if q.qclass == 1 else
                                 f"CLASS{q.qclass}"}},
            "source": {"ip": client[0], "port": int(client[1])},
            "destination": {"ip": server[0], "port": int(server[1])},
            "network": {"transport": transport, "protocol": "dns", "type": f"ipv{fam}",
                        "iana_number": "17" if transport == "udp" else "6"},
            "hostwall": {"pin_dir": self.pin_dir, "dns": {"decision": decision}},
        }

    def refused(self, q: Question, client: tuple, server: tuple, transport: str) -> None:
        """An unlisted name answered REFUSED (refuse_unlisted)."""
        if not self._allow():
            return
        rec = self._base("dns-refused", ["protocol", "denied"], q, "REFUSED", client, server, transport, "refused")
        rec["event"]["reason"] = "no fqdns rule lists this name (dns.refuse_unlisted)"
        self._write(rec)

    def upstream_failure(self, q: Question, client: tuple, server: tuple, transport: str,
                         upstreams: list[str], error: str) -> None:
        """No upstream answered in time (or every one failed): the client got SERVFAIL."""
        if not self._allow():
            return
        rec = self._base("dns-upstream-failure", ["protocol"], q, "SERVFAIL", client, server, transport,
                         "upstream_failure")
        rec["event"]["reason"] = f"no upstream answered: {error}"
        rec["error"] = {"message": error, "type": "upstream_failure"}
        rec["hostwall"]["dns"]["upstreams"] = upstreams
        self._write(rec)
