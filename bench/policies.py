"""Benchmark policies: seeded, realistic-looking rule sets as YAML files + blocklist files.

`generate(dir, n_rules, seed, v4_blocklist=..., v6_blocklist=...)` writes `policy-<n>-<seed>.yaml`
(and its peers files) into `dir` and returns a BenchPolicy: the path plus the benchmark probes, the
packets whose fate the datapath suites measure. Every probe states the verdict and rule it must get;
`check_probes()` verifies that with the pure-Python reference (enforcer.reference.evaluate), so a
benchmark never times a path other than the one it names.

Shape of every policy (rule order = priority order, ties keep file order):

  order 0     deny-v4-blocklist   deny, peers_file (100k IPv4 prefixes in the max policy) or inline
  order 1     deny-v6-blocklist   deny, peers_file (10k IPv6 prefixes in the max policy) or inline
  order 2..   random rules        priority 10..999999: v4/v6 prefixes from a shared pool of "network
                                  objects", tcp/udp/any/icmp/icmpv6, single ports and ranges,
                                  allow/deny/log, ingress (75 %) and egress
  order n-2   probe-ingress       priority 1000000: allow tcp/PROBE_PORT_IN from the probe nets
  order n-1   probe-egress        priority 1000000: allow tcp/PROBE_PORT_OUT to the probe nets

Random rules never match a probe: their prefixes avoid the probe networks (198.18.0.0/15 and
2001:2::/48, the RFC 2544/5180 benchmarking ranges) and their ports stay below 50000, and a rule
with any peers always names ports (or is icmp). So the probe packets make the classifier do its
worst: the peer class of the probe source holds every any-peer rule and the L4 class of its port
every any-port rule, spread over all 64 bitmap words, and their AND is empty until the last word.

Blocklists are clustered like real threat-intel feeds: most entries spread over the public space,
some /16s dense with host routes. The probes live in such a dense /16 (IPv4 198.18.0.0/16, IPv6 the
2001::/16 top-16 bucket), so the binary search of the peer lookup takes its longest path, too.

Cost: ~0.5 s for the max policy (100k + 10k lines written with NumPy), dominated by formatting.
"""
from __future__ import annotations

import ipaddress
import os
import random
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hostwall.enforcer.policy import Policy
from hostwall.enforcer.reference import Decision, Packet, evaluate

__all__ = ["Probe", "BenchPolicy", "generate", "max_policy", "check_probes", "tempdir", "blocklist",
           "RULE_COUNTS", "MAX_RULES", "V4_BLOCKLIST", "V6_BLOCKLIST"]

RULE_COUNTS = (10, 1000, 4096)
MAX_RULES = 4096
V4_BLOCKLIST = 100_000
V6_BLOCKLIST = 10_000

LOCAL_V4 = "192.0.2.1"            # the protected host itself (TEST-NET-1)
LOCAL_V6 = "2001:db8::1"
PROBE_NET_V4 = "198.18.7.0/24"     # allowed by probe-ingress / probe-egress only
PROBE_NET_V6 = "2001:2:0:7::/64"
PROBE_SRC_V4 = "198.18.7.10"
PROBE_SRC_V6 = "2001:2:0:7::10"
DENY_NET_V4 = "198.18.200.0/24"    # in the blocklists (small policies: inline deny peers)
DENY_NET_V6 = "2001:2:0:200::/64"
DENY_SRC_V4 = "198.18.200.77"
DENY_SRC_V6 = "2001:2:0:200::77"
PROBE_PORT_IN = 50001
PROBE_PORT_OUT = 50002
PROBE_PORT_DEFAULT = 50003         # no rule names it: the default applies
RANDOM_PORT_MAX = 49_999           # random rules' ports and ranges stay below the probe ports

_AVOID_V4 = ipaddress.ip_network("198.18.0.0/15")
_AVOID_V6 = ipaddress.ip_network("2001:2::/48")


@dataclass(frozen=True)
class Probe:
    """A benchmark packet and what the policy must do with it (checked against the reference)."""
    path: str                  # allow | deny | default | egress_allow
    packet: Packet
    verdict: str               # allow | drop
    rule: str | None           # the matching rule, None for the default
    reason: str | None         # policy_deny | default_deny | None (allow)


@dataclass
class BenchPolicy:
    path: Path
    n_rules: int
    seed: int
    v4_prefixes: int           # total over all rules (blocklist included)
    v6_prefixes: int
    probes: dict[tuple[int, str], Probe] = field(default_factory=dict)   # (family, path) -> probe
    probe_port_in: int = PROBE_PORT_IN

    @property
    def label(self) -> str:
        return "max_policy" if self.n_rules >= MAX_RULES and self.v4_prefixes >= V4_BLOCKLIST else \
            f"{self.n_rules}_rules"


@contextmanager
def tempdir(prefix: str = "hostwall-bench-"):
    d = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- random material ---------------------------------------------------------------------------

def _overlaps_avoid(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    avoid = _AVOID_V4 if net.version == 4 else _AVOID_V6
    return net.overlaps(avoid)


def _v4_pool(rng: random.Random, n: int) -> list[str]:
    """Network objects: private and public prefixes, /8../32 weighted to /16../28."""
    out: set[str] = set()
    lens = [8, 12, 16, 20, 22, 24, 24, 24, 26, 28, 28, 32, 32]
    while len(out) < n:
        ln = rng.choice(lens)
        base = rng.choice([(10 << 24, 8), ((172 << 24) | (16 << 16), 12), ((100 << 24) | (64 << 16), 10),
                           (0, 0), (0, 0)])
        if base[1] and ln < base[1]:
            ln = base[1]
        addr = base[0] | rng.getrandbits(32 - base[1]) if base[1] else rng.randrange(1 << 24, 224 << 24)
        net = ipaddress.ip_network((addr & ~((1 << (32 - ln)) - 1) & 0xFFFFFFFF, ln))
        if not _overlaps_avoid(net):
            out.add(str(net))
    return sorted(out)


def _v6_pool(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    bases = [(0x20010db8 << 96, 32), (0xfd << 120, 8), (0x2001 << 112, 16), (0x2a00 << 112, 12),
             (0x2600 << 112, 12)]
    while len(out) < n:
        b, bl = rng.choice(bases)
        ln = max(bl, rng.choice([32, 40, 48, 48, 56, 64, 64, 64, 128]))
        addr = b | rng.getrandbits(128 - bl)
        net = ipaddress.ip_network((addr & ~((1 << (128 - ln)) - 1) & ((1 << 128) - 1), ln))
        if not _overlaps_avoid(net):
            out.add(str(net))
    return sorted(out)


def _ports(rng: random.Random, singles: list[int], ranges: list[str]) -> list:
    k = rng.choice([1, 1, 1, 2, 3])
    out = []
    for _ in range(k):
        out.append(rng.choice(ranges) if rng.random() < 0.2 else rng.choice(singles))
    return sorted(set(out), key=str)


def _random_rules(rng: random.Random, n: int, v4pool: list[str], v6pool: list[str]) -> list[dict]:
    singles = sorted(set([22, 25, 53, 80, 123, 443, 993, 3306, 5432, 6379, 8080, 8443, 9090, 9100] +
                         [rng.randrange(1, RANDOM_PORT_MAX) for _ in range(140)]))
    ranges = []
    for _ in range(40):
        lo = rng.randrange(1024, RANDOM_PORT_MAX - 2000)
        ranges.append(f"{lo}-{lo + rng.choice([10, 100, 500, 1000, 1999])}")
    rules = []
    for i in range(n):
        r: dict = {"name": f"r{i:04d}", "priority": rng.randrange(10, 1_000_000),
                   "direction": "ingress" if rng.random() < 0.75 else "egress",
                   "action": rng.choices(["allow", "deny", "log"], [6, 3, 1])[0]}
        proto = rng.choices(["tcp", "udp", "any", "icmp", "icmpv6"], [50, 25, 15, 5, 5])[0]
        r["protocol"] = proto
        any_peer = rng.random() < 0.2
        if not any_peer:
            peers = []
            if proto == "icmp" or (proto != "icmpv6" and rng.random() < 0.75):
                peers += rng.sample(v4pool, rng.choice([1, 1, 2, 3]))
            if proto != "icmp" and (not peers or rng.random() < 0.5):
                peers += rng.sample(v6pool, rng.choice([1, 1, 2]))
            r["peers"] = peers
        if proto in ("tcp", "udp", "any") and (any_peer or rng.random() < 0.8):
            r["ports"] = _ports(rng, singles, ranges)
        rules.append(r)
    return rules


def _v4_blocklist(rng: np.random.Generator, n: int, extra: list[str]) -> list[str]:
    """n unique IPv4 prefixes: 85 % spread over public space (/32 60 %, /24 30 %, /16-/23 10 %),
    15 % host routes clustered in a few dense /16s, one of them the probe /16 (198.18.0.0/16)."""
    avoid_lo, avoid_hi = int(_AVOID_V4.network_address), int(_AVOID_V4.broadcast_address)
    probe = ipaddress.ip_network(PROBE_NET_V4)
    n_cluster = n * 15 // 100
    hot16 = [int(ipaddress.ip_address("198.18.0.0"))] + \
            [int(x) << 16 for x in rng.integers(1 << 8, 223 << 8, size=7)]
    keys: set[int] = set()
    for e in extra:
        net = ipaddress.ip_network(e)
        keys.add((int(net.network_address) << 8) | net.prefixlen)
    # clustered host routes
    while len(keys) < len(extra) + n_cluster:
        base = hot16[rng.integers(0, len(hot16))]
        a = base | int(rng.integers(0, 1 << 16))
        if (a >> 8) == (int(probe.network_address) >> 8):
            continue
        keys.add((a << 8) | 32)
    while len(keys) < n:
        m = (n - len(keys)) * 2
        cat = rng.random(m)
        lens = np.where(cat < 0.6, 32, np.where(cat < 0.9, 24, rng.integers(16, 24, size=m)))
        addr = rng.integers(1 << 24, 224 << 24, size=m, dtype=np.uint64)
        mask = (~((np.uint64(1) << (np.uint64(32) - lens.astype(np.uint64))) - np.uint64(1))) & np.uint64(0xFFFFFFFF)
        net = addr & mask
        end = net + (np.uint64(1) << (np.uint64(32) - lens.astype(np.uint64))) - np.uint64(1)
        ok = (end < avoid_lo) | (net > avoid_hi)
        for a, ln in zip(net[ok].tolist(), lens[ok].tolist()):
            keys.add((a << 8) | ln)
            if len(keys) >= n:
                break
    arr = np.array(sorted(keys), dtype=np.uint64)
    a = (arr >> np.uint64(8)).astype(np.uint32)
    ln = (arr & np.uint64(0xFF)).astype(np.uint8)
    b = a.view(np.uint8).reshape(-1, 4)[:, ::-1]   # little endian -> dotted order
    return [f"{w}.{x}.{y}.{z}/{int(n)}" for (w, x, y, z), n in zip(b.tolist(), ln.tolist())]


def _v6_blocklist(rng: random.Random, n: int, extra: list[str]) -> list[str]:
    """n unique IPv6 prefixes: half in 2001::/16 (the probe's top-16 bucket), the rest in 2400::/12,
    2600::/12, 2a00::/12 and 2c00::/12; /32../64 networks and /128 hosts."""
    out = set(extra)
    bases = [(0x2001 << 112, 16)] * 4 + [(0x240 << 116, 12), (0x260 << 116, 12), (0x2a0 << 116, 12),
                                         (0x2c0 << 116, 12)]
    while len(out) < n:
        b, bl = rng.choice(bases)
        ln = rng.choice([32, 40, 48, 48, 56, 64, 64, 128, 128])
        addr = b | rng.getrandbits(128 - bl)
        net = ipaddress.IPv6Network((addr & ~((1 << (128 - ln)) - 1) & ((1 << 128) - 1), ln))
        if not _overlaps_avoid(net):
            out.add(str(net))
    return sorted(out)


# ---- YAML ----------------------------------------------------------------------------------------

def _yaml_value(v) -> str:
    if isinstance(v, list):
        return "[" + ", ".join(_yaml_value(x) for x in v) + "]"
    if isinstance(v, int):
        return str(v)
    s = str(v)
    return f'"{s}"' if (":" in s or "-" in s or s[:1].isdigit()) else s


def _rule_yaml(r: dict) -> str:
    return "  - {" + ", ".join(f"{k}: {_yaml_value(v)}" for k, v in r.items()) + "}\n"


# ---- the generator -------------------------------------------------------------------------------

def generate(directory: str | os.PathLike, n_rules: int, seed: int = 1, v4_blocklist: int = 0,
             v6_blocklist: int = 0, probe_port_in: int = PROBE_PORT_IN) -> BenchPolicy:
    """Write a policy with exactly `n_rules` rules (>= 4) into `directory` (see module doc).

    v4_blocklist / v6_blocklist > 0 move the deny rules' peers into peers files of that many
    prefixes. probe_port_in lets two policies differ in what they allow (swap benchmarks)."""
    if n_rules < 4:
        raise ValueError("a benchmark policy needs at least 4 rules (2 deny, 2 probes)")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    n_random = n_rules - 4
    v4pool = _v4_pool(rng, max(8, min(2000, n_random // 2)))
    v6pool = _v6_pool(rng, max(8, min(1000, n_random // 4)))
    rules: list[dict] = []
    stem = f"policy-{n_rules}-{seed}"
    n4 = n6 = 0
    if v4_blocklist:
        lines = _v4_blocklist(nprng, v4_blocklist, [DENY_NET_V4])
        (d / f"{stem}-block-v4.txt").write_text(
            "# benchmark threat-intel list (generated, seeded)\n" + "\n".join(lines) + "\n")
        rules.append({"name": "deny-v4-blocklist", "priority": 0, "direction": "ingress", "action": "deny",
                      "peers_file": f"{stem}-block-v4.txt"})
        n4 += len(lines)
    else:
        peers = [DENY_NET_V4] + rng.sample(v4pool, min(3, len(v4pool)))
        rules.append({"name": "deny-v4-blocklist", "priority": 0, "direction": "ingress", "action": "deny",
                      "peers": peers})
        n4 += len(peers)
    if v6_blocklist:
        lines = _v6_blocklist(rng, v6_blocklist, [DENY_NET_V6])
        (d / f"{stem}-block-v6.txt").write_text("# benchmark IPv6 block list\n" + "\n".join(lines) + "\n")
        rules.append({"name": "deny-v6-blocklist", "priority": 1, "direction": "ingress", "action": "deny",
                      "peers_file": f"{stem}-block-v6.txt"})
        n6 += len(lines)
    else:
        peers = [DENY_NET_V6] + rng.sample(v6pool, min(2, len(v6pool)))
        rules.append({"name": "deny-v6-blocklist", "priority": 1, "direction": "ingress", "action": "deny",
                      "peers": peers})
        n6 += len(peers)
    rand = _random_rules(rng, n_random, v4pool, v6pool)
    for r in rand:
        for p in r.get("peers", []):
            if ":" in p:
                n6 += 1
            else:
                n4 += 1
    rules += rand
    probe_peers = [PROBE_NET_V4, PROBE_NET_V6]
    rules.append({"name": "probe-ingress", "priority": 1_000_000, "direction": "ingress", "action": "allow",
                  "protocol": "tcp", "peers": probe_peers, "ports": [probe_port_in]})
    rules.append({"name": "probe-egress", "priority": 1_000_000, "direction": "egress", "action": "allow",
                  "protocol": "tcp", "peers": probe_peers, "ports": [PROBE_PORT_OUT]})
    n4 += 2
    n6 += 2
    text = (f"# hostwall benchmark policy: {n_rules} rules, seed {seed} (generated by bench/policies.py)\n"
            f"version: 1\nname: bench-{n_rules}-{seed}\nrevision: \"bench-{n_rules}-{seed}-{probe_port_in}\"\n"
            "defaults: {ingress: deny, egress: allow, stateful: true, audit: false}\n"
            "rules:\n" + "".join(_rule_yaml(r) for r in rules))
    path = d / f"{stem}.yaml"
    path.write_text(text)
    bp = BenchPolicy(path=path, n_rules=n_rules, seed=seed, v4_prefixes=n4, v6_prefixes=n6,
                     probe_port_in=probe_port_in)
    bp.probes = _probes(probe_port_in)
    return bp


def max_policy(directory: str | os.PathLike, seed: int = 1, probe_port_in: int = PROBE_PORT_IN) -> BenchPolicy:
    """4096 rules including a 100k-prefix IPv4 and a 10k-prefix IPv6 peers_file deny rule."""
    return generate(directory, MAX_RULES, seed, V4_BLOCKLIST, V6_BLOCKLIST, probe_port_in)


def blocklist(bp: BenchPolicy, family: int) -> list[str]:
    """The prefixes of bp's IPv4 or IPv6 block-list peers file (max policy), in file order; [] without one."""
    f = bp.path.with_name(f"{bp.path.stem}-block-v{family}.txt")
    if not f.exists():
        return []
    return [ln.strip() for ln in f.read_text().splitlines() if ln.strip() and not ln.startswith("#")]


def _probes(port_in: int) -> dict[tuple[int, str], Probe]:
    out = {}
    for fam, local, src, deny in ((4, LOCAL_V4, PROBE_SRC_V4, DENY_SRC_V4), (6, LOCAL_V6, PROBE_SRC_V6, DENY_SRC_V6)):
        out[(fam, "allow")] = Probe("allow", Packet("ingress", fam, src, local, 6, 40000, port_in),
                                    "allow", "probe-ingress", None)
        out[(fam, "deny")] = Probe("deny", Packet("ingress", fam, deny, local, 6, 40000, port_in), "drop",
                                   "deny-v4-blocklist" if fam == 4 else "deny-v6-blocklist", "policy_deny")
        out[(fam, "default")] = Probe("default", Packet("ingress", fam, src, local, 6, 40000, PROBE_PORT_DEFAULT),
                                      "drop", None, "default_deny")
        out[(fam, "egress_allow")] = Probe("egress_allow", Packet("egress", fam, local, src, 6, 40000, PROBE_PORT_OUT),
                                           "allow", "probe-egress", None)
    return out


def check_probes(policy: Policy, probes: dict[tuple[int, str], Probe]) -> None:
    """Raise AssertionError unless the reference model gives every probe its stated verdict/rule."""
    bad = []
    for key, pr in probes.items():
        got: Decision = evaluate(policy, pr.packet)
        if (got.verdict, got.rule, got.reason) != (pr.verdict, pr.rule, pr.reason):
            bad.append(f"{key}: expected {pr.verdict}/{pr.rule}/{pr.reason}, reference says "
                       f"{got.verdict}/{got.rule}/{got.reason}")
    if bad:
        raise AssertionError(f"{policy.name}: benchmark probes do not take their paths:\n  " + "\n  ".join(bad))
