"""`import` checked against the real kernel (docs/policy.md "Import").

For each ruleset in tests/data/rulesets (a web server, a bastion, a database host, ufw's default, Docker's
generated rules, a kube-proxy node, a native nftables server): load it on the lab's protected host with
iptables-restore / ip6tables-restore / nft, send a few hundred probe packets (new TCP connections, UDP
datagrams and pings, in and out, IPv4 and IPv6) and record which the kernel let through (an nftables
observer after the filter, lab/probes.py) and which rules each probe matched (the rule counters).
Then import the ruleset with `hostwall-enforcer import`, run hostwall with the result on the same lab,
send the same probes and record what it let through. Required: every source rule is accounted for in
the report; every probe gets the kernel's verdict unless a rule the import left out (and listed)
decided it; and hostwall's verdicts are the reference model's for the imported policy.
"""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from hostwall.enforcer.analysis.frames import ip_packet
from hostwall.enforcer.analysis.packet import CasePacket
from hostwall.enforcer.policy import load_policy
from hostwall.enforcer.reference import evaluate
from hostwall.lab.probes import Sender, install_observer, ipt_counters, observed, static_neighbours

from .conftest import hostwall_attached

pytestmark = [pytest.mark.lab, pytest.mark.bpf]
ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data" / "rulesets"
PROT = {4: "10.66.1.2", 6: "fd66:1::2"}
EXTRA = {"cli": ["10.66.2.10", "10.66.2.41", "10.66.2.77", "10.66.2.53", "10.66.4.5", "fd66:2::10", "fd66:4::5"],
         "att": ["10.66.3.10", "10.66.3.66", "10.66.5.9", "fd66:3::10", "fd66:3::66"]}
SOURCES = {4: ["10.66.2.2", "10.66.2.10", "10.66.2.41", "10.66.2.77", "10.66.4.5", "10.66.3.2", "10.66.3.10", "10.66.5.9"],
           6: ["fd66:2::2", "fd66:2::10", "fd66:4::5", "fd66:3::2", "fd66:3::10"]}
DESTS = {4: ["10.66.2.53", "10.66.2.2", "10.66.3.10", "10.66.3.66", "10.66.5.9"], 6: ["fd66:2::2", "fd66:3::10", "fd66:3::66"]}


@dataclass
class Ruleset:
    name: str
    v4: str | None = None
    v6: str | None = None
    nft: str | None = None
    ports_in: list[int] = field(default_factory=list)
    ports_out: list[int] = field(default_factory=lambda: [25, 53, 80, 443])


RULESETS = [
    Ruleset("webserver", "webserver.rules", "webserver.rules6",
            ports_in=[22, 80, 443, 9100, 8000, 8050, 8099, 8100, 25, 53, 3306]),
    Ruleset("bastion", "bastion.rules", "bastion.rules6", ports_in=[22, 80, 443, 53, 2222],
            ports_out=[22, 53, 123, 80, 443, 8080]),
    Ruleset("database", "database.rules", ports_in=[5432, 6432, 3306, 22, 9100, 9187, 53, 80, 5433]),
    Ruleset("ufw", "ufw.rules", "ufw.rules6", ports_in=[22, 80, 5432, 137, 139, 445, 67, 68, 53, 443, 546]),
    Ruleset("docker", "docker.rules", ports_in=[22, 2375, 8080, 80, 443]),
    Ruleset("kubeproxy", "kubeproxy.rules", ports_in=[10250, 6443, 30000, 30080, 32000, 32767, 22, 53, 80, 29999]),
    Ruleset("web-nft", nft="web.nft", ports_in=[22, 80, 443, 53, 8080, 25]),
]


def _owner(addr: str) -> str:
    if addr in ("10.66.2.2", "fd66:2::2") or addr in EXTRA["cli"]:
        return "cli"
    return "att"


def _probes(rs: Ruleset, families: list[int]) -> list[CasePacket]:
    out: list[CasePacket] = []
    for fam in families:
        for src in SOURCES[fam]:
            for port in rs.ports_in:
                for proto in (6, 17):
                    out.append(CasePacket("ingress", proto, src, PROT[fam], 20000 + len(out), port,
                                          "S" if proto == 6 else ""))
            out.append(CasePacket("ingress", 1 if fam == 4 else 58, src, PROT[fam], icmp_id=len(out) + 1))
        for dst in DESTS[fam]:
            for port in rs.ports_out:
                for proto in (6, 17):
                    out.append(CasePacket("egress", proto, PROT[fam], dst, 20000 + len(out), port,
                                          "S" if proto == 6 else ""))
            out.append(CasePacket("egress", 1 if fam == 4 else 58, PROT[fam], dst, icmp_id=len(out) + 1))
    return out


def _key(p: CasePacket) -> tuple:
    if p.protocol in (1, 58):
        return (p.family, p.src, p.dst, "echo", p.icmp_id)
    return (p.family, p.src, p.dst, "tcp" if p.protocol == 6 else "udp", p.sport, p.dport)


def _rule_lines(path: Path) -> dict[tuple[str, str, int], tuple[str, int, str]]:
    """(table, chain, position) -> (file, line, target) of every rule of an iptables-save file; a target
    that is a user chain is "JUMP" (a jump decides nothing by itself)."""
    out, pos, table = {}, {}, ""
    text = path.read_text()
    chains = {line[1:].split()[0] for line in text.splitlines() if line.startswith(":")}
    for ln, line in enumerate(text.splitlines(), 1):
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            toks = line.split()
            chain = toks[1]
            target = toks[toks.index("-j") + 1] if "-j" in toks else (toks[toks.index("-g") + 1] if "-g" in toks else "")
            out[(table, chain, pos.get((table, chain), 0))] = (str(path), ln, "JUMP" if target in chains else target)
            pos[(table, chain)] = pos.get((table, chain), 0) + 1
    return out


_BASES = {"ingress": {"PREROUTING", "INPUT"}, "egress": {"OUTPUT", "POSTROUTING"}}


def _reach(path: Path, direction: str) -> set[tuple[str, str]]:
    """(table, chain) of an iptables-save file that a packet of `direction` can traverse."""
    edges, table = {}, ""
    for line in path.read_text().splitlines():
        if line.startswith("*"):
            table = line[1:].strip()
        elif line.startswith("-A "):
            toks = line.split()
            for flag in ("-j", "-g"):
                if flag in toks:
                    edges.setdefault((table, toks[1]), set()).add((table, toks[toks.index(flag) + 1]))
    seen, todo = set(), [(t, c) for t in ("raw", "mangle", "nat", "filter", "security") for c in _BASES[direction]]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += edges.get(n, ())
    return seen


def _nft_reach(doc: dict, direction: str) -> set[str]:
    hooks = {"ingress": {"input", "prerouting"}, "egress": {"output", "postrouting"}}[direction]
    chains = [it["chain"] for it in doc["nftables"] if "chain" in it]
    edges: dict[str, set[str]] = {}
    for it in doc["nftables"]:
        r = it.get("rule")
        if r:
            me = f"{r['family']} {r['table']} {r['chain']}"
            for x in r["expr"]:
                for k in ("jump", "goto"):
                    if k in x:
                        edges.setdefault(me, set()).add(f"{r['family']} {r['table']} {x[k]['target']}")
    seen, todo = set(), [f"{c['family']} {c['table']} {c['name']}" for c in chains if c.get("hook") in hooks]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo += edges.get(n, ())
    return seen


def _nft_counters(lab, host: str) -> dict[tuple[str, str, int], int]:
    doc = json.loads(lab.run(host, ["nft", "-j", "list", "ruleset"]).stdout)["nftables"]
    out, pos = {}, {}
    for it in doc:
        r = it.get("rule")
        if not r:
            continue
        chain = f"{r['family']} {r['table']} {r['chain']}"
        i = pos.get(chain, 0)
        pos[chain] = i + 1
        out[("nft", chain, i)] = sum(x["counter"]["packets"] for x in r["expr"] if "counter" in x)
    return out


def _instrument(doc: dict) -> dict:
    """A copy of an nft JSON ruleset with a counter before every rule's verdict (the test reads which
    rules a probe matched; the import reads the original)."""
    items = []
    for it in doc["nftables"]:
        if "rule" in it:
            r = dict(it["rule"])
            r.pop("handle", None)
            ex = [x for x in r["expr"] if "counter" not in x]
            at = next((i for i, x in enumerate(ex) if any(k in x for k in ("accept", "drop", "reject", "return",
                                                                            "jump", "goto"))), len(ex))
            r["expr"] = ex[:at] + [{"counter": None}] + ex[at:]
            items.append({"add": {"rule": r}})
        elif any(k in it for k in ("table", "chain", "set")):
            k = next(k for k in ("table", "chain", "set") if k in it)
            v = {kk: vv for kk, vv in it[k].items() if kk != "handle"}
            items.append({"add": {k: v}})
    return {"nftables": items}


def _send_all(lab, senders, probes, per_probe=None) -> None:
    """Send every probe from its host; fence so every receiver has processed them. per_probe(i) runs
    after probe i (and its fence) when given."""
    for i, p in enumerate(probes):
        host = "prot" if p.direction == "egress" else _owner(p.src)
        senders[host].send([(p.family, p.dst, ip_packet(p))])
        if per_probe is not None:
            if p.direction == "ingress":
                senders[host].fence(PROT[4])
            per_probe(i)
    for h in ("cli", "att"):
        senders[h].fence(PROT[4])                     # prot processed every ingress probe
    senders["prot"].fence("10.66.2.2")                # cli and att processed every egress probe
    senders["prot"].fence("10.66.3.2")


@pytest.mark.timeout(900)
@pytest.mark.parametrize("rs", RULESETS, ids=[r.name for r in RULESETS])
def test_import_agrees_with_the_kernel(lab, datapath, tmp_path, rs):
    lab.add_addresses("cli", EXTRA["cli"])
    lab.add_addresses("att", EXTRA["att"])
    static_neighbours(lab, {"prot": list(PROT.values()), "cli": ["10.66.2.2", "fd66:2::2", *EXTRA["cli"]],
                            "att": ["10.66.3.2", "fd66:3::2", *EXTRA["att"]]})
    families = [f for f, path in ((4, rs.v4), (6, rs.v6)) if path] if not rs.nft else [4, 6]
    probes = _probes(rs, families)
    senders = {h: Sender(lab, h) for h in ("prot", "cli", "att")}
    try:
        # ---- 1. the kernel with the original ruleset
        import_args = []
        lines: dict[tuple[str, str, int], tuple[str, int, str]] = {}
        if rs.nft:
            lab.run("prot", ["nft", "-f", str(DATA / rs.nft)])
            dump = lab.run("prot", ["nft", "-j", "list", "ruleset"]).stdout
            (tmp_path / "ruleset.json").write_text(dump)
            import_args = ["--nft-json", str(tmp_path / "ruleset.json")]
            lab.run("prot", ["nft", "flush", "ruleset"])
            lab.run("prot", ["nft", "-j", "-f", "-"], input=json.dumps(_instrument(json.loads(dump))))
        for fam, name in ((4, rs.v4), (6, rs.v6)):
            if name:
                lab.run("prot", ["iptables-restore" if fam == 4 else "ip6tables-restore"], input=(DATA / name).read_text())
                import_args += ["--iptables-save" if fam == 4 else "--ip6tables-save", str(DATA / name)]
                lines.update({(k[0] + str(fam), k[1], k[2]): v for k, v in _rule_lines(DATA / name).items()})
        for h in ("prot", "cli", "att"):
            install_observer(lab, h)

        def counters() -> dict:
            if rs.nft:
                return _nft_counters(lab, "prot")
            out = {}
            for fam in families:
                out.update({(k[0] + str(fam), k[1], k[2]): v for k, v in ipt_counters(lab, "prot", fam).items()})
            return out
        matched: list[set] = [set() for _ in probes]
        last = [counters()]

        # the rules a probe can traverse (replies to it move other chains' counters meanwhile)
        reach: dict[str, set] = {}
        for d in ("ingress", "egress"):
            if rs.nft:
                doc = json.loads((tmp_path / "ruleset.json").read_text())
                reach[d] = {("nft", c) for c in _nft_reach(doc, d)}
            else:
                reach[d] = {(t + str(fam), c) for fam, name in ((4, rs.v4), (6, rs.v6)) if name
                            for t, c in _reach(DATA / name, d)}

        def after(i: int) -> None:
            now = counters()
            matched[i] = {k for k, v in now.items() if v != last[0].get(k, 0) and k[2] >= 0
                          and (k[0], k[1]) in reach[probes[i].direction]}
            last[0] = now
        _send_all(lab, senders, probes, after)
        kernel = observed(lab, "prot") | observed(lab, "cli") | observed(lab, "att")

        # ---- 2. import
        pol = tmp_path / "imported.yaml"
        r = subprocess.run([sys.executable, "-m", "hostwall.enforcer.cli", "import", *import_args, "-o", str(pol),
                            "--local-address", PROT[4], "--local-address", PROT[6], "--partial", "--json"],
                           capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert r.returncode == 0, r.stderr
        report = json.loads(r.stdout)
        left = {(s["file"], s["line"], s["chain"], s["text"]) for s in report["source_rules"]
                if s["status"] in ("untranslated", "out_of_scope")}
        # every source rule is accounted for in the report
        for name in (rs.v4, rs.v6):
            if name:
                want = {ln for _f, ln, _tg in _rule_lines(DATA / name).values()}
                got = {s["line"] for s in report["source_rules"] if s["file"] == str(DATA / name)}
                assert want <= got, f"{name}: source lines missing from the report: {sorted(want - got)}"

        # ---- 3. hostwall with the imported policy, same lab, same probes
        lab.run("prot", ["nft", "flush", "ruleset"])
        for h in ("prot", "cli", "att"):
            lab.run(h, ["nft", "delete", "table", "inet", "hwobs"], check=False)
            install_observer(lab, h)
        policy = load_policy(pol)
        with hostwall_attached(lab, datapath, policy):
            _send_all(lab, senders, probes)
            ours = observed(lab, "prot") | observed(lab, "cli") | observed(lab, "att")
    finally:
        for s in senders.values():
            s.close()

    def left_out(k: tuple) -> tuple[bool, str]:
        """Is the matched rule `k` one the import left out, and does its target decide verdicts?"""
        if rs.nft:
            chain, idx = k[1], k[2]
            hit = [x for x in left if x[2] == chain and x[3].startswith("[handle")]
            doc = json.loads((tmp_path / "ruleset.json").read_text())["nftables"]
            rules = [it["rule"] for it in doc if "rule" in it and f"{it['rule']['family']} {it['rule']['table']} "
                     f"{it['rule']['chain']}" == chain]
            text = f"[handle {rules[idx].get('handle')}]"
            verdict = any(any(v in x for v in ("accept", "drop", "reject", "return", "jump", "goto"))
                          for x in rules[idx]["expr"])
            return any(x[3].startswith(text + " ") for x in hit), ("verdict" if verdict else "log")
        file, ln, target = lines[k]
        return (any(x[0] == file and x[1] == ln for x in left),
                "log" if target in ("", "LOG", "NFLOG", "JUMP") else "verdict")

    disagree, compared, explained, why = [], 0, 0, {}
    for i, p in enumerate(probes):
        k_ok, h_ok = _key(p) in kernel, _key(p) in ours
        ref = evaluate(policy, p.reference()).verdict == "allow"
        assert h_ok == ref, f"hostwall judged `{p.text()}` {'allowed' if h_ok else 'dropped'}, the reference model not"
        deciding = [k for k in matched[i] if left_out(k) == (True, "verdict")]
        if deciding:
            explained += 1
            why[str(lines.get(deciding[0], deciding[0]))] = why.get(str(lines.get(deciding[0], deciding[0])), 0) + 1
            continue
        compared += 1
        if k_ok != h_ok:
            disagree.append(f"`{p.text()}`: kernel {'accepted' if k_ok else 'dropped'}, hostwall "
                            f"{'allowed' if h_ok else 'dropped'}; rules matched: "
                            + ", ".join(f"{lines.get(k, k)}" for k in sorted(matched[i])))
    print(f"{rs.name}: {len(probes)} probes, {compared} decided by translated rules only (all must agree), "
          f"{explained} matched a left-out rule that decides ({why}); kernel accepted "
          f"{len(kernel & {_key(p) for p in probes})}")
    assert not disagree, f"{len(disagree)} of {compared} probes disagree:\n" + "\n".join(disagree[:30])
    assert compared >= len(probes) // 2, (compared, len(probes))
    accepted = sum(_key(p) in kernel for p in probes)
    assert 0 < accepted < len(probes), "the probes must see both verdicts"
