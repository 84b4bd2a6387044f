"""`hostwall-enforcer import (--iptables-save F | --ip6tables-save F | --nft-json F)... [-o POLICY]`
(docs/cli.md, docs/policy.md "Import").

Reads the rulesets, translates INPUT and OUTPUT (and the chains they jump to) for one interface,
prints the report (every source rule: translated with notes, or left out with why) and writes the
policy. Exit 0: everything was translated; 3: something was left out (the report lists it; the
policy is written only with --partial); 2: unreadable input (every problem with its line).
"""
from __future__ import annotations

import ipaddress
import json
import os
import sys
from datetime import UTC, datetime

from .emit import translate
from .flatten import Context
from .iptables import parse_iptables_save
from .model import IRuleset

EXIT_OK, EXIT_INPUT, EXIT_PARTIAL = 0, 2, 3


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {path}: {e}") from None


def _interfaces(rulesets: list[IRuleset]) -> set[str]:
    out = set()
    for rs in rulesets:
        for ch in rs.chains.values():
            for r in ch.rules:
                out |= {c.value for c in r.conds if c.kind in ("iif", "oif") and c.value != "lo"}
    return out


def cmd_import(a, _load=None) -> int:
    rulesets: list[IRuleset] = []
    srcs = []
    try:
        for p in a.iptables_save or []:
            text = _read(p)
            fam = 6 if "ip6tables-save" in text.split("\n", 1)[0] else 4
            rulesets.append(parse_iptables_save(text, p, fam))
            srcs.append(f"{p} (ip{'6' if fam == 6 else ''}tables-save)")
        for p in a.ip6tables_save or []:
            rulesets.append(parse_iptables_save(_read(p), p, 6))
            srcs.append(f"{p} (ip6tables-save)")
        for p in a.nft_json or []:
            from .nft import parse_nft_json
            rulesets += parse_nft_json(_read(p), p)
            srcs.append(f"{p} (nft -j list ruleset)")
        local: dict[int, list[int]] = {}
        for addr in a.local_address or []:
            ip = ipaddress.ip_address(addr)
            local.setdefault(ip.version, []).append(int(ip))
    except ValueError as e:
        print(f"hostwall-enforcer: {e}", file=sys.stderr)
        return EXIT_INPUT
    if not rulesets:
        print("hostwall-enforcer: import needs --iptables-save, --ip6tables-save or --nft-json", file=sys.stderr)
        return EXIT_INPUT
    problems = [(o, why) for rs in rulesets for o, why in rs.problems]
    if problems:
        for o, why in problems:
            print(f"{o.where()}: {why}: {o.text}", file=sys.stderr)
        print(f"hostwall-enforcer: {len(problems)} unreadable line(s); nothing was written", file=sys.stderr)
        return EXIT_INPUT
    iface = a.interface or "eth0"
    named = _interfaces(rulesets) - {iface}
    if named and not a.interface:
        print(f"hostwall-enforcer: the rules also name interface(s) {', '.join(sorted(named))}: translating for "
              f"{iface}, the one hostwall protects (pass --interface to choose)", file=sys.stderr)
    header = [f"Imported by `hostwall-enforcer import` from {', '.join(srcs)}",
              f"on {datetime.now(UTC).isoformat(timespec='seconds')} for interface {iface}. Every rule names its source line;",
              "see the import report for what was left out and why (docs/policy.md, Import)."]
    tr = translate(rulesets, Context(iface, local), a.name, header)
    left = tr.left_out
    out_stream = sys.stderr if a.output is None and not a.json else sys.stdout
    if a.json:
        print(json.dumps({**tr.to_json(), "policy": tr.text if (not left or a.partial) else None}, indent=1))
    else:
        print(tr.report(), file=out_stream)
    if left and not a.partial:
        print(f"hostwall-enforcer: {len(left)} source rule(s) left out (listed above); nothing was written. "
              "Check them, then pass --partial to write the policy without them", file=sys.stderr)
        return EXIT_PARTIAL
    if a.output:
        tmp = a.output + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(tr.text)
        os.replace(tmp, a.output)
        print(f"wrote {a.output}: {tr.rules} rules", file=sys.stderr if a.json else out_stream)
    elif not a.json:
        sys.stdout.write(tr.text)
    return EXIT_OK


def add_parser(sub) -> None:
    p = sub.add_parser("import", help="translate iptables-save / nft JSON rules into a policy (exact, or listed)")
    p.add_argument("--iptables-save", action="append", metavar="FILE", help="iptables-save output (repeatable)")
    p.add_argument("--ip6tables-save", action="append", metavar="FILE", help="ip6tables-save output (repeatable)")
    p.add_argument("--nft-json", action="append", metavar="FILE", help="`nft -j list ruleset` output (repeatable)")
    p.add_argument("-o", "--output", metavar="POLICY", help="write the policy here (default: stdout)")
    p.add_argument("--partial", action="store_true", help="write the policy even if some rules were left out")
    p.add_argument("--interface", help="the interface hostwall will protect (default: eth0)")
    p.add_argument("--local-address", action="append", metavar="ADDR",
                   help="this host's address on it (repeatable): decides -d on INPUT and -s on OUTPUT")
    p.add_argument("--name", default="imported", help="the policy's name (default %(default)s)")
    p.add_argument("--json", action="store_true", help="report (and policy) as JSON")
    p.set_defaults(tool=cmd_import)
