"""Typed policy model (docs/policy.md) and loading.

load_policy/parse_policy return an immutable Policy or raise one PolicyError listing every problem
(schema + semantic, each with file, line and path). Invariants of a loaded Policy:
- rules are sorted by (priority, index): the first matching rule in `rules` wins;
- every PeerSet prefix has no host bits set; prefixes are unique per rule and sorted;
- ports are merged, sorted, inclusive ranges within 1..65535; only on tcp/udp/any rules;
- icmp_types are merged, sorted, inclusive ranges of (type << 8 | code); only on icmp/icmpv6 rules;
- no rule is named like a pseudo-rule (essential_icmp), whose counters share the rules' slots;
- a peers file with no entries (only comments) is valid and gives a rule that matches nothing;
- fqdns (enforcer/dnspolicy.py) are normalised, sorted and unique, only on egress rules without peers,
  and only with a `dns` section (Policy.dns).
Cost, on the machine's fast level (the slow one is ~2x): ~0.1 s CPU for 4096 new rules whose 110k
peers-file prefixes are cached: YAML ~0.045 s (the plain loader, hostwall/yamlplain.py; the full one
only for text outside its subset or with an issue), JSON Schema ~0.008 s (enforcer/rule_check.py),
rules ~0.05 s; a new peers file ~1 µs per IPv4 line (docs/benchmarks.md "`swap` — rule lines in one
pass").
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from hostwall.boundedmemo import BoundedMemo
from hostwall.gcpause import GcPaused
from hostwall.units import parse_duration
from hostwall.yamldoc import _MISSING, Issues, PolicyError, PolicyIssue, load_yaml
from hostwall.yamlplain import load_plain

from .dnspolicy import DnsConf, build_dns, rule_fqdns
from .icmp import parse_icmp_type
from .parse_memo import ContentCache, text_key
from .policy_dos import DosBuilder, DosProfile
from .validation import MAX_BAD_PEER_LINES, check_schema, merge_ranges, parse_cidr, parse_peer_lines, parse_port
from .validation import get_in as _get

__all__ = [
    "Direction", "Action", "Protocol", "PeerSet", "Rule", "Defaults", "DosProfile", "InterfaceConf",
    "Policy", "PolicyIssue", "PolicyError", "load_policy", "parse_policy", "MAX_RULES", "ESSENTIAL_ICMP",
    "PSEUDO_RULES", "DnsConf",
]

Direction = Literal["ingress", "egress"]
Action = Literal["allow", "deny", "log"]
Protocol = Literal["tcp", "udp", "icmp", "icmpv6", "any"]

MAX_RULES = 4096
# Pseudo-rules: what passes before any rule is counted (status, metrics, records) under these names.
ESSENTIAL_ICMP = "essential_icmp"
PSEUDO_RULES = (ESSENTIAL_ICMP,)
ProgressFn = Callable[[int, int], None]


# ---------------------------------------------------------------- model

_U32, _U8 = np.dtype(np.uint32), np.dtype(np.uint8)


def _frozen(a: Any, dtype: np.dtype) -> np.ndarray:
    """`a` as a read-only 1-D array of `dtype`; an array that already is one, owning its data, is kept
    (nothing can change it, so PeerSets may share it) instead of copied again. The check compares the
    dtype by identity (a builtin dtype is one object; `==` costs ~0.5 µs, a PeerSet makes two checks)."""
    if type(a) is np.ndarray and a.base is None and a.dtype is dtype and a.ndim == 1 and not a.flags.writeable:
        return a
    out: np.ndarray = np.array(a, dtype=dtype)
    if out.ndim != 1:
        out = out.reshape(-1).copy()
    out.setflags(write=False)
    return out


_EVERYTHING: PeerSet | None = None
_NO_V4 = (_frozen((), _U32), _frozen((), _U8))        # shared by every set without IPv4 prefixes

@dataclass(frozen=True, slots=True, eq=False)
class PeerSet:
    """Prefixes of one rule, as numeric arrays (fast to compile). any=True means no peers restriction.

    v4_net: uint32 network addresses (host order), v4_len: uint8 prefix lengths (read-only arrays);
    v6_net/v6_len: Python ints. len() is the number of prefixes (0 when any=True, so do not use
    truthiness to test for a restriction; test `.any`). contains() is O(n): for the reference model.
    """
    any: bool
    v4_net: np.ndarray
    v4_len: np.ndarray
    v6_net: list[int]
    v6_len: list[int]
    _v4_mask: np.ndarray | None = field(init=False, repr=False)

    def __post_init__(self) -> None:
        net, ln = _frozen(self.v4_net, _U32), _frozen(self.v4_len, _U8)
        if net.shape != ln.shape or len(self.v6_net) != len(self.v6_len):
            raise ValueError("PeerSet: net and len arrays differ in length")
        object.__setattr__(self, "v4_net", net)
        object.__setattr__(self, "v4_len", ln)
        object.__setattr__(self, "_v4_mask", None)       # contains() computes it (the reference model)
        object.__setattr__(self, "v6_net", list(self.v6_net))
        object.__setattr__(self, "v6_len", list(self.v6_len))

    @classmethod
    def everything(cls) -> PeerSet:
        """The unrestricted set (rule has no peers / peers_file): one shared immutable object."""
        global _EVERYTHING
        if _EVERYTHING is None:
            _EVERYTHING = cls(True, _NO_V4[0], _NO_V4[1], [], [])
        return _EVERYTHING

    @classmethod
    def from_cidrs(cls, cidrs: Iterable[str]) -> PeerSet:
        """Build from CIDR strings (bare address = host route); ValueError on the first bad one."""
        v4: set[tuple[int, int]] = set()
        v6: set[tuple[int, int]] = set()
        for c in cidrs:
            fam, net, ln = parse_cidr(c)
            (v4 if fam == 4 else v6).add((net, ln))
        return cls._from_pairs(v4, v6)

    @classmethod
    def _from_pairs(cls, v4: Iterable[tuple[int, int]], v6: Iterable[tuple[int, int]]) -> PeerSet:
        a4, a6 = sorted(set(v4)), sorted(set(v6))
        net, ln = (_frozen(next(z), _U32), _frozen(next(z), _U8)) if (z := zip(*a4)) and a4 else _NO_V4
        return cls(False, net, ln, [n for n, _ in a6], [ln for _, ln in a6])

    def contains(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True if `ip` is inside a prefix of its own family (always True when any)."""
        if self.any:
            return True
        if ip.version == 4:
            if not len(self.v4_net):
                return False
            if (mask := self._v4_mask) is None:
                ln = self.v4_len.astype(np.uint64)
                mask = (~((np.uint64(1) << (32 - ln)) - np.uint64(1)) & np.uint64(0xFFFFFFFF)).astype(np.uint32)
                object.__setattr__(self, "_v4_mask", mask)
            return bool(np.any((mask & np.uint32(int(ip))) == self.v4_net))
        n = int(ip)
        return any(((n ^ net) >> (128 - ln)) == 0 for net, ln in zip(self.v6_net, self.v6_len))

    def cidrs(self) -> list[str]:
        """Prefixes as CIDR strings (v4 first); for messages and debugging."""
        out = [f"{ipaddress.IPv4Address(int(n))}/{int(ln)}" for n, ln in zip(self.v4_net, self.v4_len)]
        out += [f"{ipaddress.IPv6Address(n)}/{ln}" for n, ln in zip(self.v6_net, self.v6_len)]
        return out

    def __len__(self) -> int:
        return len(self.v4_net) + len(self.v6_net)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PeerSet):
            return NotImplemented
        return (self.any == other.any and self.v4_net.tobytes() == other.v4_net.tobytes()   # same dtypes
                and self.v4_len.tobytes() == other.v4_len.tobytes()
                and self.v6_net == other.v6_net and self.v6_len == other.v6_len)

    def __hash__(self) -> int:
        return hash((self.any, self.v4_net.tobytes(), self.v4_len.tobytes(),
                     tuple(self.v6_net), tuple(self.v6_len)))

    def __repr__(self) -> str:
        if self.any:
            return "PeerSet(any)"
        return f"PeerSet(v4={len(self.v4_net)}, v6={len(self.v6_net)})"


@dataclass(frozen=True, slots=True)
class Rule:
    """One rule; `index` is its position in the file, `line` its YAML line."""
    name: str
    priority: int
    direction: Direction
    action: Action
    protocol: Protocol
    peers: PeerSet
    ports: tuple[tuple[int, int], ...] | None    # inclusive (lo, hi); None = any port
    index: int
    line: int
    # inclusive (lo, hi) over type << 8 | code (enforcer/icmp.py); None = every ICMP type
    icmp_types: tuple[tuple[int, int], ...] | None = None
    # egress destination names (hostwall.dnsnames patterns, sorted); None = the peers decide
    fqdns: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Defaults:
    ingress: Literal["allow", "deny"] = "deny"
    egress: Literal["allow", "deny"] = "allow"
    stateful: bool = True
    audit: bool = False
    essential_icmp: bool = True     # ND/RD, MLD, path-MTU errors, errors of tracked flows pass first


@dataclass(frozen=True, slots=True)
class InterfaceConf:
    name: str
    xdp_mode: Literal["native", "generic", "auto"]
    dos_profile: str | None


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated policy. `rules` is sorted by (priority, index); `revision` is the given one or
    "sha256:" + 12 hex of the policy text and the peers files' contents."""
    version: int
    name: str
    revision: str
    defaults: Defaults
    rules: tuple[Rule, ...]
    dos_profiles: dict[str, DosProfile]
    interfaces: tuple[InterfaceConf, ...]
    source: str
    dns: DnsConf | None = None          # the DNS proxy (required by fqdns rules)
    unconfirmed_timeout_s: float | None = None   # conntrack.unconfirmed_timeout (None: the datapath's default)

    @property
    def prefix_count(self) -> int:
        """Sum of prefixes over all rules (a file shared by two rules counts twice)."""
        return sum(len(r.peers) for r in self.rules)

    def counter_names(self) -> list[str]:
        """Names that get a rule counter slot: the rules in order, then the pseudo-rules in use."""
        return [r.name for r in self.rules] + ([ESSENTIAL_ICMP] if self.defaults.essential_icmp else [])


# ---------------------------------------------------------------- loading

def load_policy(path: str | os.PathLike, progress: ProgressFn | None = None) -> Policy:
    """Read and validate a policy file; peers_file paths are relative to its folder."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
    except OSError as e:
        raise PolicyError([PolicyIssue("", None, f"cannot read policy file: {e.strerror or e}", source)]) from None
    except UnicodeDecodeError as e:
        raise PolicyError([PolicyIssue("", None, f"policy file is not UTF-8 ({e.reason} at byte {e.start})",
                                       source)]) from None
    return parse_policy(text, source=source, base_dir=os.path.dirname(os.path.abspath(source)),
                        progress=progress)


def parse_policy(text: str, source: str = "<string>", base_dir: str | None = None,
                 progress: ProgressFn | None = None) -> Policy:
    """Validate policy text; peers_file paths resolve against base_dir (default: the cwd).

    Raises PolicyError with every issue found; returns a Policy only when there are none.
    The cyclic GC is paused meanwhile: YAML node graphs are acyclic, and gen-2 collections over
    ~10^5 fresh nodes otherwise cost more than the parse itself (max policy: 1.2 s -> 0.45 s).
    """
    with GcPaused():
        return _parse(text, source, base_dir, progress)


def _parse(text: str, source: str, base_dir: str | None, progress: ProgressFn | None) -> Policy:
    """The plain loader first (hostwall/yamlplain.py: no PyYAML node graph, ~0.1 s less for the max
    policy); if the text is outside its subset or anything is wrong, everything again from the full
    loader, whose issues carry their lines (docs/policy.md "Validation")."""
    plain = load_plain(text)
    if plain is not None:
        issues = Issues(source, plain[1])
        check_schema(plain[0], issues)
        policy = _Builder(plain[0], text, source, base_dir or os.getcwd(), issues, progress).build()
        if not len(issues) and policy is not None:
            return policy
        progress = None                           # shown once already
    issues = Issues(source)
    data = load_yaml(text, issues)
    if data is _MISSING:
        raise PolicyError(issues.sorted())
    check_schema(data, issues)
    policy = _Builder(data, text, source, base_dir or os.getcwd(), issues, progress).build()
    if len(issues) or policy is None:
        raise PolicyError(issues.sorted())
    return policy


# parsed peers files (the last 8) and inline peers and ports by their text (4 x MAX_RULES lists each:
# the distinct lists of about four max policies, whose three rotated ones hold 9.1k peers lists, 3.5 MB,
# and 4.3k ports lists, 0.5 MB; and at most 2^17 items per memo, ~0.1 KB each with its parse: at most
# ~14 + 14 MB however long the lists), hostwall/boundedmemo.py, enforcer/parse_memo.py
_PEER_FILES: ContentCache[PeerSet] = ContentCache(8)
_INLINE_PEERS: BoundedMemo[tuple, PeerSet] = BoundedMemo(4 * MAX_RULES, 1 << 17)
_PORTS: BoundedMemo[tuple, tuple[tuple[int, int], ...]] = BoundedMemo(4 * MAX_RULES, 1 << 17)


def clear_peer_file_cache() -> None:
    """Forget every parse kept across parses: peers files, inline peers, ports (a cold apply)."""
    for memo in (_PEER_FILES, _INLINE_PEERS, _PORTS):
        memo.clear()


class _Builder(DosBuilder):
    """Semantic checks + construction. Each check skips paths the schema already flagged; the DoS
    profiles' part is policy_dos.DosBuilder."""

    def __init__(self, data: Any, text: str, source: str, base_dir: str, issues: Issues,
                 progress: ProgressFn | None):
        self.data, self.text, self.source, self.base_dir = data, text, source, base_dir
        self.issues, self.progress = issues, progress
        self.files: dict[str, bytes] = {}          # resolved path -> content (read once, hashed once)
        # inline peers already parsed in this policy (rules reuse the same network objects: the max
        # policy has ~20k inline entries of ~3k distinct texts); freed with the builder
        self.cidrs: dict[str, tuple[int, int, int]] = {}

    def ok(self, path: tuple, value: Any, *types: type) -> bool:
        """Value present, of the given type (bool is not int), and not already flagged."""
        if value is None or (isinstance(value, bool) and bool not in types) or not isinstance(value, types):
            return False
        return not (self.issues and self.issues.bad(path))

    def build(self) -> Policy | None:
        d = self.data if isinstance(self.data, dict) else {}
        defaults = self._defaults(_get(d, "defaults"))
        rules = self._rules(_get(d, "rules"))
        profiles = self._profiles(_get(_get(d, "dos"), "profiles"))
        interfaces = self._interfaces(_get(d, "interfaces"), d)
        dns = build_dns(self.issues, _get(d, "dns"))
        unconfirmed = self._unconfirmed_timeout(_get(d, "conntrack"))
        self._proxy_needs_state(profiles, defaults.stateful)
        if len(self.issues):
            return None
        revision = _get(d, "revision")
        if revision is None:
            h = hashlib.sha256(self.text.encode("utf-8"))
            for content in self.files.values():
                h.update(b"\0")
                h.update(content)
            revision = "sha256:" + h.hexdigest()[:12]
        return Policy(version=int(d["version"]), name=d["name"], revision=str(revision), defaults=defaults,
                      rules=tuple(sorted(rules, key=lambda r: (r.priority, r.index))),
                      dos_profiles=profiles, interfaces=tuple(interfaces), source=self.source, dns=dns,
                      unconfirmed_timeout_s=unconfirmed)

    # -- defaults
    def _defaults(self, d: Any) -> Defaults:
        base = Defaults()
        if not isinstance(d, dict):
            return base
        return Defaults(ingress=d.get("ingress", base.ingress), egress=d.get("egress", base.egress),
                        stateful=d.get("stateful", base.stateful), audit=d.get("audit", base.audit),
                        essential_icmp=d.get("essential_icmp", base.essential_icmp))

    # -- rules
    def _rules(self, rules: Any) -> list[Rule]:
        if not isinstance(rules, list):
            return []
        self._read_peer_files(rules)
        lines = self.issues.index.item_lines(("rules",))
        names: dict[str, int] = {}
        out: list[Rule] = []
        has_dns = isinstance(_get(self.data, "dns"), dict)
        for i, r in enumerate(rules):
            p = ("rules", i)
            if not isinstance(r, dict):
                continue
            name: Any = r.get("name")
            if self.ok(p + ("name",), name, str):
                if name in PSEUDO_RULES:
                    self.issues.add(p + ("name",), f"{name!r} is reserved: it counts what passes before any "
                                                   "rule (docs/policy.md); name the rule differently")
                elif name in names:
                    first = self.issues.index.line(("rules", names[name], "name"))
                    self.issues.add(p + ("name",), f"duplicate rule name {name!r} (first at line {first}); "
                                                   "rule names must be unique")
                else:
                    names[name] = i
            proto = r.get("protocol", "any")
            peers = self._peers(p, r)
            ports = self._ports(p, r, proto)
            icmp_types = self._icmp_types(p, r, proto)
            fqdns = rule_fqdns(self.issues, p, r, has_dns) if "fqdns" in r else None
            if self.issues.tainted(p):
                continue
            out.append(Rule(name=name, priority=int(r["priority"]), direction=r["direction"], action=r["action"],
                            protocol=proto, peers=peers, ports=ports, index=i,
                            line=lines[i] if i < len(lines) else self.issues.index.line(p) or 0,
                            icmp_types=icmp_types, fqdns=fqdns))
        return out

    def _peers(self, p: tuple, r: dict) -> PeerSet:
        if "peers" in r and "peers_file" in r:
            self.issues.add(p + ("peers_file",), "give either peers or peers_file, not both; "
                                                 "move the inline peers into the file or drop one")
            return PeerSet.everything()
        if "peers_file" in r:
            return self._peer_sets.get(p, PeerSet.everything())
        peers: Any = r.get("peers")
        if not self.ok(p + ("peers",), peers, list):
            return PeerSet.everything()
        key = text_key(peers, str) if not self.issues else None
        if key is not None and (kept := _INLINE_PEERS.get(key)) is not None:
            return kept
        v4: list[tuple[int, int]] = []
        v6: list[tuple[int, int]] = []
        cidrs = self.cidrs
        for j, c in enumerate(peers):
            if (hit := cidrs.get(c) if type(c) is str else None) is None:
                pj = p + ("peers", j)
                if not self.ok(pj, c, str):
                    continue
                try:
                    hit = cidrs[c] = parse_cidr(c)
                except ValueError as e:
                    self.issues.add(pj, str(e))
                    continue
            fam, net, ln = hit
            (v4 if fam == 4 else v6).append((net, ln))
        out = PeerSet._from_pairs(v4, v6)
        if key is not None and not self.issues:
            _INLINE_PEERS.put(key, out, len(key))
        return out

    def _ports(self, p: tuple, r: dict, proto: Any) -> tuple[tuple[int, int], ...] | None:
        if "ports" not in r:
            return None
        ports = r["ports"]
        if proto in ("icmp", "icmpv6") and not self.issues.bad(p + ("protocol",)):
            self.issues.add(p + ("ports",), f"ports apply to tcp, udp or any, not {proto}; "
                                            "remove ports or change the protocol")
            return None
        if not self.ok(p + ("ports",), ports, list):
            return None
        key = text_key(ports, int, str) if not self.issues else None
        if key is not None and (kept_ports := _PORTS.get(key)) is not None:
            return kept_ports
        ranges = []
        for j, v in enumerate(ports):
            pj = p + ("ports", j)
            if not self.ok(pj, v, int, float, str):
                continue
            try:
                ranges.append(parse_port(v))
            except ValueError as e:
                self.issues.add(pj, str(e))
        out = merge_ranges(ranges)
        if key is not None and not self.issues:
            _PORTS.put(key, out, len(key))
        return out

    def _icmp_types(self, p: tuple, r: dict, proto: Any) -> tuple[tuple[int, int], ...] | None:
        """icmp_types of an icmp/icmpv6 rule as merged key ranges (enforcer/icmp.py); every bad entry
        is reported with its own path."""
        if "icmp_types" not in r:
            return None
        types = _get(r, "icmp_types")
        if proto not in ("icmp", "icmpv6"):
            if not self.issues.bad(p + ("protocol",)):
                self.issues.add(p + ("icmp_types",), f"icmp_types need protocol icmp or icmpv6 (type names and "
                                                     f"numbers differ between them), not {proto}; set the "
                                                     "protocol or remove icmp_types")
            return None
        if not self.ok(p + ("icmp_types",), types, list):
            return None
        ranges = []
        for j, v in enumerate(types):
            pj = p + ("icmp_types", j)
            if self.issues.bad(pj):
                continue
            try:
                ranges.append(parse_icmp_type(v, proto))
            except ValueError as e:
                self.issues.add(pj, str(e))
        return merge_ranges(ranges)

    def _read_peer_files(self, rules: list) -> None:
        """Read every referenced peers file once, then parse with one progress total."""
        self._peer_sets: dict[tuple, PeerSet] = {}
        todo: list[tuple[tuple, str]] = []          # (rule path, resolved path)
        for i, r in enumerate(rules):
            p = ("rules", i)
            if not isinstance(r, dict) or "peers_file" not in r or "peers" in r:
                continue
            fp = r["peers_file"]
            if not self.ok(p + ("peers_file",), fp, str):
                continue
            full = os.path.normpath(os.path.join(self.base_dir, os.path.expanduser(fp)))
            if full not in self.files:
                try:
                    with open(full, "rb") as f:
                        self.files[full] = f.read()
                except OSError as e:
                    self.issues.add(p + ("peers_file",), f"cannot read peers file {fp!r} ({full}): "
                                                         f"{e.strerror or e}; paths are relative to the "
                                                         "policy file's folder")
                    continue
            todo.append((p, full))
        parsed: dict[str, PeerSet | None] = {}
        lines_of: dict[str, list[str]] = {}
        for p, full in todo:
            if full in lines_of or full in parsed:
                continue
            if (hit := _PEER_FILES.get(self.files[full])) is not None:
                parsed[full] = hit
                continue
            try:
                text = self.files[full].decode("utf-8-sig")
            except UnicodeDecodeError as e:
                lines_of[full], parsed[full] = [], None
                self.issues.add(p + ("peers_file",), f"peers file is not UTF-8 ({e.reason} at byte {e.start}); "
                                                     "save it as UTF-8 text", file=full)
                continue
            lines = text.split("\n")
            if lines and lines[-1] == "":
                lines.pop()
            lines_of[full] = lines
        total = sum(len(v) for v in lines_of.values())
        done = 0
        for p, full in todo:
            if full not in parsed:
                lines = lines_of[full]
                tick = None
                if self.progress is not None:
                    tick = lambda n, base=done: self.progress(base + n, total)  # noqa: E731
                res = parse_peer_lines(lines, tick)
                done += len(lines)
                for ln, msg in res.bad:
                    self.issues.add(p + ("peers_file",), msg, line=ln, file=full)
                if res.bad_total > MAX_BAD_PEER_LINES:
                    self.issues.add(p + ("peers_file",), f"... and {res.bad_total - MAX_BAD_PEER_LINES} more "
                                                         "invalid lines", file=full)
                parsed[full] = None
                if not res.bad_total:
                    parsed[full] = ps = PeerSet(False, res.v4_net, res.v4_len, res.v6_net, res.v6_len)
                    _PEER_FILES.put(self.files[full], ps)
            if (peer_set := parsed[full]) is not None:
                self._peer_sets[p] = peer_set

    # -- conntrack
    def _unconfirmed_timeout(self, ct: Any) -> float | None:
        path = ("conntrack", "unconfirmed_timeout")
        t = self._num(path, _get(ct, "unconfirmed_timeout"), parse_duration)
        if t is not None and not 1.0 <= t <= 3600.0:
            self.issues.add(path, f"{_get(ct, 'unconfirmed_timeout')!r} is out of range: give 1s to 1h (whole "
                                  "seconds; the datapath counts seconds)")
            return None
        return t

    def _num(self, path: tuple, value: Any, parse: Callable[[Any], Any] | None = None) -> Any:
        if value is None or not self.ok(path, value, int, float, str):
            return None
        if parse is None:
            return int(value)
        try:
            return parse(value)
        except ValueError as e:
            self.issues.add(path, str(e))
            return None

    # -- interfaces
    def _interfaces(self, ifaces: Any, d: dict) -> list[InterfaceConf]:
        out: list[InterfaceConf] = []
        if not isinstance(ifaces, list):
            return out
        profiles = _get(_get(d, "dos"), "profiles")
        known = set(profiles) if isinstance(profiles, dict) else set()
        names: dict[str, int] = {}
        for i, e in enumerate(ifaces):
            p = ("interfaces", i)
            if not isinstance(e, dict):
                continue
            name = _get(e, "name")
            if self.ok(p + ("name",), name, str):
                if name in PSEUDO_RULES:
                    self.issues.add(p + ("name",), f"{name!r} is reserved: it counts what passes before any "
                                                   "rule (docs/policy.md); name the rule differently")
                elif name in names:
                    self.issues.add(p + ("name",), f"interface {name!r} is listed twice (first at interfaces"
                                                   f"[{names[name]}]); list each interface once")
                else:
                    names[name] = i
            prof = e.get("dos_profile")
            if self.ok(p + ("dos_profile",), prof, str) and prof not in known:
                hint = f"; defined: {', '.join(sorted(map(str, known)))}" if known else \
                       "; define it under dos.profiles"
                self.issues.add(p + ("dos_profile",), f"unknown DoS profile {prof!r}{hint}")
            if not self.issues.tainted(p):
                out.append(InterfaceConf(name=name, xdp_mode=e.get("xdp_mode", "auto"), dos_profile=prof))
        return out
