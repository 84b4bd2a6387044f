"""Every struct dtype in hostwall.bpf.layout matches bpf/hostwall.h as the C compiler lays it out,
and the constants read from the header agree with the compiler's view of them."""
from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest

from hostwall.bpf import layout as L


def _fields(text: str) -> dict[str, list[str]]:
    out = {}
    for name, body in re.findall(r"struct\s+(hw_\w+)\s*\{(.*?)\};", re.sub(r"/\*.*?\*/", "", text, flags=re.S), re.S):
        out[name] = [re.sub(r"\[.*\]", "", decl.split()[-1]) for decl in body.split(";") if decl.strip()]
    return out


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.fail("no C compiler: install gcc (scripts/setup.sh does)")
    structs = _fields(L.HEADER.read_text())
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include <linux/types.h>', f'#include "{L.HEADER}"',
             'int main(void) { printf("{");']
    for s, fields in structs.items():
        lines.append(f'printf("\\"{s}\\": {{\\"size\\": %zu", sizeof(struct {s}));')
        for f in fields:
            lines.append(f'printf(", \\"{f}\\": [%zu, %zu]", offsetof(struct {s}, {f}), sizeof(((struct {s} *)0)->{f}));')
        lines.append('printf("}, ");')
    consts = [k for k in L.C if not k.startswith("HW_CT_TO_")]
    lines.append('printf("\\"consts\\": {");')
    for i, k in enumerate(consts):
        fmt, cast = ("%llu", "unsigned long long") if L.C[k] > 2**63 - 1 else ("%lld", "long long")  # HW_FQDN_K*
        lines.append(f'printf("{"," if i else ""}\\"{k}\\": {fmt}", ({cast})({k}));')
    lines.append('printf("}}"); return 0; }')
    d = tmp_path_factory.mktemp("layout")
    (d / "probe.c").write_text("\n".join(lines))
    subprocess.run([cc, "-o", str(d / "probe"), str(d / "probe.c")], check=True)
    return json.loads(subprocess.run([str(d / "probe")], check=True, capture_output=True, text=True).stdout)


def test_every_header_struct_has_a_dtype(c_layout):
    structs = {k for k in c_layout if k != "consts"}
    assert structs == set(L.DTYPES), "a struct was added to the header or the dtypes without its twin"


@pytest.mark.parametrize("name", sorted(L.DTYPES))
def test_struct_layout_matches_header(c_layout, name):
    c = c_layout[name]
    dt = L.DTYPES[name]
    assert dt.itemsize == c["size"], f"{name}: sizeof {c['size']} in C, {dt.itemsize} in Python"
    assert list(dt.names) == [k for k in c if k != "size"], f"{name}: field names or order differ"
    for f in dt.names:
        off, size = c[f]
        assert dt.fields[f][1] == off, f"{name}.{f}: offset {off} in C"
        assert dt.fields[f][0].itemsize == size, f"{name}.{f}: size {size} in C"


def test_constants_agree_with_compiler(c_layout):
    for k, v in c_layout["consts"].items():
        assert L.C[k] == v, k


def test_reason_names_cover_design_contract():
    drop = {"policy_deny", "default_deny", "rate_limit", "syn_flood", "udp_flood", "icmp_flood", "port_limit",
            "banned", "malformed", "conntrack_invalid", "fragment_unmatched", "syn_cookie_invalid",
            "judge_unreachable"}
    assert set(L.DROP_REASONS.values()) == drop


def test_reason_codes_are_unique_and_the_docs_table_is_the_header():
    """Every reason has its own code (a merge that gave two reasons one number is caught here: the C enum
    allows it), drop reasons below 16, and docs/records.md's code table says what the header says."""
    from hostwall import resource_dir
    members = re.findall(r"^\s*HW_R_(\w+)\s*=\s*(\d+)", L.HEADER.read_text(), flags=re.M)
    codes = [int(v) for _, v in members]
    assert len(codes) == len(set(codes)), sorted(members, key=lambda m: int(m[1]))
    assert all(c < 16 for c in L.DROP_REASONS) and max(codes) < L.REASONS
    text = (resource_dir("schemas").parent / "docs" / "records.md").read_text()
    table = {int(c): n for c, n in re.findall(r"\| (\d+) \| `(\w+)`", text)}
    assert table == {v: n for v, n in L.REASON_NAMES.items() if v}


def test_slot_of_the_live_policy_is_not_reused_until_it_is_retired():
    from hostwall.bpf.state import allocate_slots
    a = {"a-deny": 0, "a-allow": 1}
    b, fresh_b = allocate_slots(a, ["b-allow", "a-allow"], 8)
    assert b["a-allow"] == 1                          # kept: its counters go on
    assert b["b-allow"] not in (0, 1) and fresh_b == [b["b-allow"]]
    c, fresh_c = allocate_slots(b, ["c-new"], 8)
    assert c["c-new"] not in b.values()               # b is live until the flip
    assert 0 in {s for s in range(8) if s not in b.values()}    # a-deny's slot is free again now


def _c_sources() -> str:
    return "\n".join(p.read_text() for p in L.SOURCES)


def test_map_names_match_the_c():
    """hostwall.bpf.names lists exactly the maps the C declares (the one source for Python's names)."""
    from hostwall.bpf.names import ALL_MAPS
    text = re.sub(r"/\*.*?\*/", "", _c_sources(), flags=re.S)
    declared = set(re.findall(r"BPF_(?:ARRAY|PERCPU_ARRAY|PROG_ARRAY|RINGBUF_OUTPUT)\(\s*(hw_\w+)", text))
    declared |= set(re.findall(r"BPF_F?_?TABLE\(\s*\"\w+\"\s*,[^,]+,[^,]+,\s*(hw_\w+)", text))
    assert declared, "no map declarations found: did the C's map macros change?"
    assert set(ALL_MAPS) == declared, (f"only in C: {sorted(declared - set(ALL_MAPS))}; "
                                       f"only in hostwall.bpf.names: {sorted(set(ALL_MAPS) - declared)}")


def test_program_names_match_the_c():
    from hostwall.bpf.names import PROGRAMS
    kinds = {"xdp_md": "xdp", "__sk_buff": "sched_cls"}
    text = _c_sources()
    for name, kind in PROGRAMS.items():
        m = re.search(rf"^int\s+{name}\(struct\s+(\w+)\s*\*", text, flags=re.M)
        assert m, f"program {name} is not defined in the C"
        assert kinds[m.group(1)] == kind, f"{name}: a {m.group(1)} program, listed as {kind}"


def test_flow_schema_knows_every_reason():
    """Records carry the datapath's reason names (hostwall.reason): the flow schema must accept each."""
    from hostwall import resource_dir
    schema = json.loads((resource_dir("schemas") / "flow.schema.json").read_text())

    def enums(node):
        if isinstance(node, dict):
            if "reason" in node and isinstance(node["reason"], dict) and "enum" in node["reason"]:
                yield set(node["reason"]["enum"])
            for v in node.values():
                yield from enums(v)
        elif isinstance(node, list):
            for v in node:
                yield from enums(v)
    found = list(enums(schema))
    assert found, "no reason enum in schemas/flow.schema.json"
    for allowed in found:
        assert set(L.REASON_NAMES.values()) <= allowed, set(L.REASON_NAMES.values()) - allowed
