"""The plain YAML loader (hostwall/yamlplain.py) gives PyYAML's data or steps aside.

Property: for any document, load_plain either returns None (the caller then uses the full loader) or
exactly what load_yaml builds (values, types, key order) with no issue, and the same line for every item
of a top-level list. Documents are drawn in every style the subset has and many it has not (tricky
scalars such as yes/on/~/017/1:30/2001-01-01, quoting, flow and block collections, indentless and
compact lists, comments, duplicate keys), then also with one character changed, which is where a
hand-written parser would accept what YAML rejects. Policies: the same Policy, and the very same error
report, with and without the plain loader."""
from __future__ import annotations

import glob
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hostwall.enforcer import policy as policy_mod
from hostwall.enforcer.policy import PolicyError, load_policy, parse_policy
from hostwall.yamldoc import _MISSING, Issues, load_yaml
from hostwall.yamlplain import load_plain

ROOT = Path(__file__).resolve().parents[2]

SCALARS = ["a", "r0001", "ingress", "deny-v4", "10.0.0.0/8", "2001:db8::/32", "yes", "No", "on", "OFF", "y",
           "true", "False", "null", "Null", "~", "", "0", "7", "42", "017", "0x1F", "0o7", "0b11", "1_000", "1.5",
           "1e5", ".5", ".inf", ".NaN", "-1", "+2", "-1e5", "2001-01-01", "1:30", "a b", "a  b", "a:b", "a: b",
           "a #b", "#x", "a,b", "[x]", "{x}", "-", "- x", "?", "? x", "caf\u00e9", "x\ty", "x\\y", "it's", 'say "hi"',
           "=", "<<", "&a", "*a", "!x", "|", ">", "%x", "@x", "`x", " lead", "trail ", "8000-8100", "a/b.c_d+e"]
KEYS = ["name", "priority", "ports", "peers", "x", "y", "on", "1", "a b", "<<", "a:b", "yes", "n", "~", "k.1",
        "-k", "\"q\"", "'s'"]

SAFE = ["a", "r0001", "ingress", "10.0.0.0/8", "0", "7", "42", "a b", "8000-8100", "a/b.c_d+e", "yes", "true",
        "null", "1.5"]
# mostly what the subset holds (so the plain path is taken often), with every kind of trouble mixed in
scalar = st.one_of(st.sampled_from(SAFE), st.sampled_from(SAFE), st.sampled_from(SAFE), st.sampled_from(SCALARS),
                   st.text(alphabet="ab1:#-, []{}'\"\\. ", max_size=6))
key = st.one_of(st.sampled_from(KEYS[:6]), st.sampled_from(KEYS[:6]), st.sampled_from(KEYS[:6]), st.sampled_from(KEYS))


def _tree(depth: int) -> st.SearchStrategy:
    if depth == 0:
        return scalar
    sub = _tree(depth - 1)
    pairs = st.lists(st.tuples(key, sub), max_size=4)
    return st.one_of(scalar, st.lists(sub, max_size=4), pairs, pairs.map(_unique), pairs.map(_unique))


def _unique(pairs: list) -> list:
    return list(dict(pairs).items())


style = st.fixed_dictionaries({
    "indent": st.sampled_from([2, 4, 1]),
    "quote": st.sampled_from(["plain", "plain", "double", "single"]),
    "flow": st.booleans(),
    "compact": st.booleans(),
    "indentless": st.booleans(),
    "comment": st.booleans(),
    "trailing": st.sampled_from(["", " ", "  # note"]),
})


def _scalar(v: str, s: dict) -> str:
    if s["quote"] == "double":
        return '"' + v + '"'
    if s["quote"] == "single":
        return "'" + v + "'"
    return v


def _flow(v, s: dict) -> str:
    if isinstance(v, str):
        return _scalar(v, s)
    if v and isinstance(v[0], tuple):
        return "{" + ", ".join(f"{k}: {_flow(x, s)}" for k, x in v) + "}"
    return "[" + ", ".join(_flow(x, s) for x in v) + "]"


def _block(v, ind: int, s: dict, out: list[str]) -> None:
    """Lines of a block collection at indentation ind (v is a list: of pairs for a mapping)."""
    pad, step = " " * ind, s["indent"]
    is_map = bool(v) and isinstance(v[0], tuple)
    for item in v:
        if s["comment"]:
            out.append(pad + "# c")
        k, x = item if is_map else (None, item)
        head = f"{pad}{k}:" if is_map else f"{pad}-"
        if isinstance(x, str) or not x or s["flow"]:
            out.append(f"{head} {_flow(x, s)}{s['trailing']}")
        elif not is_map and s["compact"] and isinstance(x[0], tuple):
            sub: list[str] = []
            _block(x, ind + 2, s, sub)
            out.append(f"{pad}- " + sub[0].lstrip(" "))
            out.extend(sub[1:])
        else:
            out.append(head + s["trailing"])
            _block(x, ind if (is_map and s["indentless"] and not isinstance(x[0], tuple)) else ind + step, s, out)


def render(pairs: list, s: dict) -> str:
    out: list[str] = ["# generated"]
    _block(pairs, 0, s, out)
    return "\n".join(out) + "\n"


def canon(x):
    """Data with its types and key order made comparable."""
    if isinstance(x, dict):
        return ("d", [(canon(k), canon(v)) for k, v in x.items()])
    if isinstance(x, list):
        return ("l", [canon(v) for v in x])
    return (type(x).__name__, repr(x))


def check_same(text: str) -> bool:
    """load_plain's answer is load_yaml's (or None); True if the plain loader took the document."""
    fast = load_plain(text)
    if fast is None:
        return False
    issues = Issues("t.yaml")
    slow = load_yaml(text, issues)
    assert slow is not _MISSING and not len(issues), (text, [str(i) for i in issues.sorted()])
    assert canon(fast[0]) == canon(slow), text
    for k in slow:
        assert fast[1].item_lines((k,)) == issues.index.item_lines((k,)), (text, k)
    return True


doc = st.lists(st.tuples(key, _tree(3)), min_size=1, max_size=5).map(_unique)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc, style)
def test_plain_loader_agrees_with_pyyaml(pairs, s):
    check_same(render(pairs, s))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc, style, st.integers(min_value=0), st.sampled_from(list(" -:#,[]{}\"'\n\t~&*!|>?%@`\\x1")),
       st.sampled_from(["insert", "replace", "delete"]))
def test_plain_loader_agrees_after_one_edit(pairs, s, at, ch, how):
    text = render(pairs, s)
    i = at % len(text)
    text = (text[:i] + ch + text[i:] if how == "insert" else text[:i] + ch + text[i + 1:] if how == "replace"
            else text[:i] + text[i + 1:])
    check_same(text)


@pytest.mark.parametrize("text", [
    "a: 1\nb:\n  - x\n  - y\n",
    "a:\n- x\n- {k: v, l: [1, 2]}\nb: ~\n",
    "rules:\n  - name: r\n    ports: [22, \"80-90\"]\n  -\n    name: s\n",
    "a: {x: [], y: {}}  # c\n",
    "a: [[1, [2]], {b: [c]}]\n",
    "a: yes\nb: 0x1F\nc: 017\nd: 1_000\ne: 1.5\nf:\n",
    "k: caf\u00e9\n",                       # non-ASCII plain scalar: outside (PyYAML takes it)
])
def test_known_documents(text):
    check_same(text)


def test_plain_loader_rejects_what_it_cannot_mirror():
    for text in ["a: 1\na: 2\n", "a: &x 1\nb: *x\n", "a: !!str 1\n", "a: |\n  x\n", "a: b\n  c\n", "---\na: 1\n",
                 "a:\n\tb: 1\n", "a: [1,\n  2]\n", "<<: {a: 1}\n", "a: {b: 1, b: 2}\n", "a: 'it''s'\n", "1: a\n",
                 "a: \"x\\ty\"\n", "a:\n  - x\n b: 1\n", "  a: 1\n", "on: 1\n", "a: [1,]\n", "a:b\n"]:
        assert load_plain(text) is None, text


def test_plain_loader_stays_inside_pyyamls_bounds():
    """Documents PyYAML refuses or reports must not be accepted here: deep nesting (libyaml's flow depth,
    the full loader's depth limit) and simple keys over 1024 characters; and values it cannot build."""
    deep_flow = "a: " + "[" * 1000 + "]" * 1000 + "\n"
    deep_block = "".join(" " * i + "k:\n" for i in range(340)) + " " * 340 + "k: 1\n"
    for text in [deep_flow, deep_block, "a" * 1025 + ": 1\n", "x: {" + "k" * 1100 + ": v}\n",
                 "a: 2001-02-29\n", "a: [2001-13-45]\n", "a: " + "1" * 4301 + "\n", "a: {b: " + "2" * 4301 + "}\n"]:
        assert load_plain(text) is None, text[:40]
    nested = "a: " + "[" * 30 + "]" * 30 + "\n"         # well inside both bounds: still the plain path
    check_same(nested)


@pytest.mark.parametrize("value", ["[" * 1000 + "]" * 1000, "2001-02-29", "1" * 4301, "[" + "7" * 4301 + "]",
                                   "{a: " + "9" * 4301 + "}"])
def test_unreadable_values_are_error_reports_with_lines(value):
    """A policy the plain loader leaves gets the full loader's report (file:line), never a traceback."""
    text = (f"version: 1\nname: x\nrules:\n  - name: r\n    priority: 1\n    direction: ingress\n"
            f"    action: allow\n    peers: {value}\n")
    with pytest.raises(PolicyError) as e:
        parse_policy(text, source="deep.yaml")
    assert "deep.yaml:8" in str(e.value), str(e.value)


# ---- policies

POLICY_FILES = sorted({*glob.glob(str(ROOT / "examples" / "*.yaml")),
                       *glob.glob(str(ROOT / "tests" / "data" / "policies" / "*.yaml")),
                       str(ROOT / "deploy" / "hostwall" / "policy.yaml")})


def _slow_only(monkeypatch):
    monkeypatch.setattr(policy_mod, "load_plain", lambda text: None)


@pytest.mark.parametrize("path", POLICY_FILES, ids=os.path.basename)
def test_policy_files_take_the_plain_path_and_give_the_same_policy(path, monkeypatch):
    text = Path(path).read_text(encoding="utf-8-sig")
    assert check_same(text), f"{path} is outside the plain subset"
    try:
        fast = load_policy(path)
    except PolicyError as e:                   # a file that needs things this checkout lacks: same report
        _slow_only(monkeypatch)
        with pytest.raises(PolicyError) as slow_e:
            load_policy(path)
        assert str(slow_e.value) == str(e)
        return
    _slow_only(monkeypatch)
    slow = load_policy(path)
    assert fast == slow
    assert [r.line for r in fast.rules] == [r.line for r in slow.rules]


def test_bench_policy_takes_the_plain_path(tmp_path, monkeypatch):
    from hostwall.bench import policies as P
    bp = P.generate(tmp_path, 300, seed=5, v4_blocklist=50, v6_blocklist=20)
    assert check_same(bp.path.read_text())
    fast = load_policy(bp.path)
    _slow_only(monkeypatch)
    assert load_policy(bp.path) == fast


BAD = """\
version: 1
name: bad
rules:
  - {name: a, priority: 1, direction: ingress, action: allow, protocol: tcp, ports: [22, "90-80"]}
  - {name: a, priority: 2, direction: ingress, action: allow, peers: [10.0.0.0/33]}
  - name: c
    priority: 3
    direction: sideways
    action: deny
"""


def test_errors_are_the_full_loaders_with_lines(monkeypatch):
    assert load_plain(BAD) is not None               # in the subset: the plain path runs first
    with pytest.raises(PolicyError) as fast:
        parse_policy(BAD, source="bad.yaml")
    _slow_only(monkeypatch)
    with pytest.raises(PolicyError) as slow:
        parse_policy(BAD, source="bad.yaml")
    assert str(fast.value) == str(slow.value)
    assert all(i.line is not None for i in fast.value.issues)
    assert "bad.yaml:4: rules[0].ports[1]" in str(fast.value)


def test_progress_is_reported_once_when_the_full_loader_runs_again(tmp_path):
    (tmp_path / "block.txt").write_text("10.0.0.0/8\n10.1.0.0/16\n")
    pol = tmp_path / "p.yaml"
    pol.write_text("version: 1\nname: p\nrules:\n  - {name: b, priority: 1, direction: ingress, action: deny, "
                   "peers_file: block.txt}\n  - {name: x, priority: 2, direction: up, action: deny}\n")
    seen: list[tuple[int, int]] = []
    with pytest.raises(PolicyError):
        load_policy(pol, progress=lambda n, total: seen.append((n, total)))
    assert seen and seen[-1] == (2, 2) and seen.count((2, 2)) == 1


def test_flow_lines_parsed_before_are_fresh_copies(monkeypatch):
    """_FLOWS: a line seen before gives the same data as a first parse, as new objects each time (the
    caller may change them), also after a change elsewhere; the memo is bounded; the depth is part of
    the key (a line that fits at one depth may be too deep at another)."""
    import hostwall.yamlplain as Y
    Y.clear_flow_memo()
    text = "rules:\n  - {name: a, ports: [80, 443], peers: [\"10.0.0.0/8\"], m: {k: [1, {x: y}]}}\n  - [1, 2]\n"
    first, _ = load_plain(text)
    assert len(Y._FLOWS) == 2
    first["rules"][0]["ports"].append(1)
    first["rules"][0]["m"]["k"][1]["x"] = "changed"
    again, _ = load_plain(text)
    assert again == load_yaml(text, Issues("t")) and check_same(text)
    assert again["rules"][0]["ports"] == [80, 443] and again["rules"][0]["m"]["k"][1] == {"x": "y"}
    edited, _ = load_plain(text.replace("[1, 2]", "[1, 3]"))
    assert edited["rules"][1] == [1, 3] and edited["rules"][0] == again["rules"][0]
    assert edited["rules"][0] is not again["rules"][0] and len(Y._FLOWS) == 3
    monkeypatch.setattr(Y._FLOWS, "size", 2)
    for i in range(5):
        assert load_plain(f"a: [{i}]\n")[0] == {"a": [i]}
        assert len(Y._FLOWS) <= 2
    Y.clear_flow_memo()
    monkeypatch.setattr(Y._FLOWS, "max_weight", 200)    # long lines fill the byte budget sooner
    long = "[" + ", ".join(f"10.0.{i}.0/24" for i in range(40)) + "]"
    assert load_plain(f"a: {long}\n")[0]["a"][39] == "10.0.39.0/24"
    assert len(Y._FLOWS) == 0 and Y._FLOWS.weight == 0  # one line over the whole budget: never kept
    for i in range(5):
        assert load_plain(f"b: [{i}, x{i}]\n")[0] == {"b": [i, f"x{i}"]}
        assert 0 < Y._FLOWS.weight <= 200
    dated = "a: {d: 2001-01-01, e: [2002-02-02]}\n"                # marshal cannot keep dates: parsed each time
    assert load_plain(dated)[0] == load_plain(dated)[0] == load_yaml(dated, Issues("t")) and check_same(dated)
    line = "[" * 40 + "]" * 40
    assert load_plain(f"a: {line}\n") is not None
    deep = "".join(" " * i + "k:\n" for i in range(30)) + " " * 30 + f"k: {line}\n"
    assert load_plain(deep) is None                      # 31 block levels + 40 flow > MAX_DEPTH
    Y.clear_flow_memo()
    assert load_plain(deep) is None


flow_line = st.lists(st.tuples(key, st.one_of(scalar, st.lists(scalar, max_size=4))), min_size=1, max_size=6)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(flow_line, style, st.integers(min_value=0), st.sampled_from(list(" -:#,[]{}\"'~x1")),
       st.sampled_from(["insert", "replace", "delete", "keep"]))
def test_flat_flow_lines_are_the_token_loops(pairs, s, at, ch, how):
    """_flat (one findall per rule line) gives what the token loop gives, or steps aside (None); where
    the token loop leaves the subset, _flat never builds a value. Lines drawn as a rule is written (a
    mapping of scalars and lists of scalars), as a bare list, and with one character changed."""
    import hostwall.yamlplain as Y
    for text in (_flow(pairs, s), _flow([v for _, v in pairs], s)):
        i = at % len(text)
        text = (text[:i] + ch + text[i:] if how == "insert" else text[:i] + ch + text[i + 1:]
                if how == "replace" else text[:i] + text[i + 1:] if how == "delete" else text).rstrip(" ")
        if not text or text[0] not in "[{" or "#" in text:
            continue
        try:
            slow = Y._Parser([]).flow(Y._TOKEN.findall(text))
        except Y._Out:
            slow = Y._Out
        try:
            fast = Y._Parser([])._flat(text)
        except Y._Out:
            fast = Y._Out
        assert fast is None or (fast is not Y._Out and canon(fast) == canon(slow)), (text, fast, slow)
        if slow is Y._Out:
            assert fast is None or fast is Y._Out, text


def test_rule_lines_take_the_flat_path():
    import hostwall.yamlplain as Y
    line = '{name: r0002, priority: 637183, direction: ingress, protocol: any, peers: ["fd8d::/128", 10.0.0.0/8], ports: []}'
    assert Y._Parser([])._flat(line) == {"name": "r0002", "priority": 637183, "direction": "ingress",
                                         "protocol": "any", "peers": ["fd8d::/128", "10.0.0.0/8"], "ports": []}
    assert Y._Parser([])._flat('["a", b c, 1]') == ["a", "b c", 1]


@pytest.mark.parametrize("line", ["{a: b{c: d}", "{a: b, a: c}", "{a: b}}", "{a: b} x", "{a: [b{c]}", "{a: [b, ]}",
                                  "{a: b,, c: d}", "{a:b}", "{a: b c: d}", "{a: \"x\"y}", "{ {a: b}}", "{a: b, {c: d}}"])
def test_flat_path_rejects_what_the_token_loop_rejects(line):
    import hostwall.yamlplain as Y
    with pytest.raises(Y._Out):
        Y._Parser([]).flow(Y._TOKEN.findall(line))
    try:
        assert Y._Parser([])._flat(line) is None
    except Y._Out:
        pass
