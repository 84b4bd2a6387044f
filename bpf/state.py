"""User-space state of one enforcer instance, kept beside its pins so any process can act on it.

bpffs holds only maps and programs, so the rest (attached interfaces, revision table, the rule-name →
counter-slot map, the policy-change history) lives in a JSON file under $HOSTWALL_STATE_DIR
(default /run/hostwall: like the pins, it is gone after a reboot). Writes are atomic (tmp + rename).
"""
from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

DEFAULT_PIN_DIR = "/sys/fs/bpf/hostwall/default"
HISTORY_KEEP = 100
# older revisions kept in `revisions` / `revision_info` beside the current one: records stamped by them
# still name their rule after a swap or a collector restart (docs/records.md "Rule fields")
REVISIONS_KEEP = 16


def state_dir() -> Path:
    return Path(os.environ.get("HOSTWALL_STATE_DIR", "/run/hostwall"))


def boot_id() -> str:
    """This boot's id ("" if unreadable): map ids and monotonic times are only comparable within one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def instance_stem(pin_dir: str) -> str:
    """The instance's name in $HOSTWALL_STATE_DIR: its pin dir as one file-name part (every per-instance
    file there starts with it, the collector's `collector-<stem>.json` too)."""
    return os.path.abspath(pin_dir).strip("/").replace("/", "_")


def state_path(pin_dir: str) -> Path:
    return state_dir() / f"{instance_stem(pin_dir)}.json"


def collector_status_path(pin_dir: str) -> Path:
    """A collector's status file for `pin_dir` when its config sets none (collector/config.py)."""
    return state_dir() / f"collector-{instance_stem(pin_dir)}.json"


def collector_checkpoint_path(status: Path) -> Path:
    """A collector's checkpoint (collector/checkpoint.py), beside its status file: <status stem>.state.json.
    The enforcer reads it too: a clean detach retires an instance a collector reads (bpf/retired.py)."""
    return status.with_name(f"{status.stem}.state.json")


def collector_reader_path(pin_dir: str) -> Path:
    """The registration of the collector that last started on `pin_dir`: {"checkpoint": its absolute path,
    "pid", "at"} (register_collector; docs/collector.md "Status file and state dir")."""
    return state_dir() / f"collector-{instance_stem(pin_dir)}.reader.json"


def register_collector(pin_dir: str, checkpoint: Path) -> None:
    """Name `checkpoint` as the one of the collector reading `pin_dir`, wherever its status file is: the
    enforcer finds it there (collector_checkpoint). Atomic (tmp + rename); the last collector to start
    wins, and the file outlives the collector (a crash or a stop: the enforcer's stop must still retire
    the instance for the next start). Raises OSError when the state dir cannot be written."""
    p = collector_reader_path(pin_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps({"checkpoint": os.path.abspath(checkpoint), "pid": os.getpid(), "at": time.time()}))
    os.replace(tmp, p)


def collector_checkpoint(pin_dir: str) -> Path:
    """The checkpoint of the collector reading `pin_dir`: the registered one (register_collector) if it
    exists, else the default status file's (a collector of a build before the registration, or none: then
    the path does not exist). Cost: two small file reads at most."""
    default = collector_checkpoint_path(collector_status_path(pin_dir))
    try:
        got = json.loads(collector_reader_path(pin_dir).read_bytes()).get("checkpoint")
    except (OSError, ValueError, AttributeError):
        return default
    return Path(got) if isinstance(got, str) and Path(got).exists() else default


def audit_log_path(pin_dir: str) -> Path:
    """Policy-change audit records, one JSON object per line (shipped by the collector)."""
    return state_dir() / f"{instance_stem(pin_dir)}.audit.jsonl"


def fqdn_config_path(pin_dir: str) -> Path:
    """The live dynamic sets and the dns section, which the DNS proxy follows (enforcer/fqdnsets.py)."""
    return state_dir() / f"{instance_stem(pin_dir)}.fqdn.json"


@contextlib.contextmanager
def policy_writer(pin_dir: str):
    """Exclusive across processes: one policy writer per instance at a time (the runner's reload, a CLI
    `apply`). Both write the standby half of the policy maps and then flip, and both read-modify-write
    the state file, so two at once could flip to a mix of two policies or lose a revision (docs/datapath.md
    "Policy generations"). An flock on a file beside the state: released by the kernel if the holder dies."""
    path = state_dir() / f"{instance_stem(pin_dir)}.apply.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)                    # closing the only descriptor of the open file releases the lock


def dns_log_path(pin_dir: str) -> Path:
    """The DNS proxy's decision records (refused names, upstream failures), one JSON object per line
    (shipped by the collector as the audit log is)."""
    return state_dir() / f"{instance_stem(pin_dir)}.dns.jsonl"


@dataclass
class AttachedInterface:
    name: str
    netns: str | None
    xdp_mode_requested: str        # native | generic | auto
    xdp_mode: str                  # what took: native | generic
    ifindex: int = 0               # inside its netns
    dos_profile: str | None = None # of the active policy


@dataclass
class InstanceState:
    pin_dir: str
    build: str
    interfaces: list[AttachedInterface] = field(default_factory=list)
    revision: str = ""
    revision_id: int = 0
    policy_name: str = ""
    policy_path: str = ""
    applied_at: float = 0.0
    rules: int = 0
    prefixes: int = 0
    revisions: dict[str, str] = field(default_factory=dict)    # revision_id (as str) -> revision
    # revision_id (as str) -> {revision, policy, slots: {rule name: slot}}: resolves the rule of a record
    # stamped with an older revision (slots are reused across swaps)
    revision_info: dict[str, dict] = field(default_factory=dict)
    slots: dict[str, int] = field(default_factory=dict)        # rule name -> counter slot
    rule_meta: dict[str, dict] = field(default_factory=dict)   # rule name -> {priority, direction, action}
    dos_profiles: list[str] = field(default_factory=list)      # profile id -> name (active policy)
    tables: dict[str, int] = field(default_factory=dict)       # fill of the active policy tables
    history: list[dict] = field(default_factory=list)
    pid: int | None = None                                      # the `run` process, if any
    fqdn_sets: dict[str, int] = field(default_factory=dict)    # fqdns list ("\n"-joined) -> dynamic set id
    # random, made when an instance starts without a state (revision ids begin at 1 again), kept across
    # adoption and build upgrades: the collector never resolves one instance's revision ids through
    # another's revision_info (docs/records.md "Rule fields"); "" in states written before it existed
    instance_id: str = ""
    # the loss counters a build upgrade copied into this instance: {"from_ring": the old instance's ring
    # map id, "dns": {outcome: count}} (enforcer/control.py _migrate_fqdn); {} for a fresh instance, whose
    # counters start at zero. The collector's baseline for an instance new to it (docs/collector.md "Restarts")
    carried_counters: dict = field(default_factory=dict)

    @classmethod
    def load(cls, pin_dir: str) -> InstanceState | None:
        return cls.load_file(state_path(pin_dir))

    @classmethod
    def load_file(cls, p: Path) -> InstanceState | None:
        """The state saved at `p` (the live one, or a retired instance's copy: bpf/retired.py)."""
        try:
            d = json.loads(p.read_text())
        except FileNotFoundError:
            return None
        d["interfaces"] = [AttachedInterface(**i) for i in d.get("interfaces", [])]
        return cls(**d)

    def save(self) -> None:
        p = state_path(self.pin_dir)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(self), indent=1, sort_keys=True))
        os.replace(tmp, p)

    def remove(self) -> None:
        state_path(self.pin_dir).unlink(missing_ok=True)
        fqdn_config_path(self.pin_dir).unlink(missing_ok=True)

    def record_change(self, old_revision: str, new_revision: str, old_rules: int, new_rules: int,
                      source: str, switch_ms: float) -> dict:
        """Append a policy-change audit record to the history and the audit log; returns it."""
        rec = audit_record("policy-apply", {"pin_dir": self.pin_dir, "policy": {
            "old_revision": old_revision, "new_revision": new_revision, "old_rules": old_rules,
            "new_rules": new_rules, "source": source, "switch_ms": round(switch_ms, 4)}})
        self.history = (self.history + [rec])[-HISTORY_KEEP:]
        append_audit(self.pin_dir, rec)
        return rec


def new_instance_id() -> str:
    return secrets.token_hex(8)


def audit_record(action: str, hostwall: dict, user: str | None = None, when: float | None = None) -> dict:
    """An audit record (schemas/audit.schema.json) of `action` with its hostwall part, stamped `when`
    (Unix seconds; default now)."""
    t = time.time() if when is None else when
    return {"@timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1e6):06d}Z",
            "event": {"kind": "event", "category": ["configuration"], "type": ["change"], "action": action,
                      "dataset": "hostwall.audit"},
            "user": {"name": user or _who()}, "hostwall": hostwall}


def append_audit(pin_dir: str, rec: dict) -> None:
    """Append one record to the instance's audit log (the collector ships it)."""
    p = audit_log_path(pin_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    with open(p, "a") as f:
        f.write(json.dumps(rec, sort_keys=True) + "\n")


def _who() -> str:
    return os.environ.get("SUDO_USER") or getpass.getuser()


def allocate_slots(current: dict[str, int], names: list[str], capacity: int) -> tuple[dict[str, int], list[int]]:
    """Counter slots for the rules of a new policy.

    A name that stays keeps its slot (its counters go on). A new name gets the lowest slot that
    neither the new nor the *current* policy uses: the current policy stays live until the flip and
    its packets keep counting into its slots, so a slot is reused only one swap after it was retired.
    Returns (slots for `names`, slots newly handed out, whose counters the caller zeroes first)."""
    wanted = set(names)
    keep = {n: s for n, s in current.items() if n in wanted}
    busy = set(current.values())
    free = (s for s in range(capacity) if s not in busy)
    fresh = []
    for n in names:
        if n not in keep:
            s = next(free, None)
            if s is None:
                raise RuntimeError(f"no free counter slot (capacity {capacity})")
            keep[n] = s
            fresh.append(s)
    return keep, fresh
