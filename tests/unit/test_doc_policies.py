"""Every policy example in README.md and docs/*.md validates (docs/policy.md "Top-level keys"), so the
docs cannot drift from the schema again. A ```yaml block is a policy when its top-level keys are policy
keys (version, name, defaults, rules, dos, conntrack, dns, interfaces, revision). A block written as a
deliberately partial fragment is marked by the line `<!-- policy fragment -->` right before it: it is
validated with `version: 1` and a `name` added, so its keys and values are still checked."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from hostwall.enforcer.policy import PolicyError, parse_policy

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
KEYS = {"version", "name", "revision", "defaults", "rules", "dos", "conntrack", "dns", "interfaces"}
FRAGMENT = "<!-- policy fragment -->"
BLOCK = re.compile(r"^```yaml\n(.*?)^```", re.M | re.S)


def policy_blocks() -> list[tuple[str, str, bool]]:
    """(where, text, is_fragment) of every ```yaml block whose top-level keys are policy keys."""
    out = []
    for doc in DOCS:
        text = doc.read_text()
        for m in BLOCK.finditer(text):
            data = yaml.safe_load(m.group(1))
            if not isinstance(data, dict) or not set(data) <= KEYS:
                continue
            line = text.count("\n", 0, m.start()) + 1
            before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
            out.append((f"{doc.relative_to(ROOT)}:{line}", m.group(1), before.strip() == FRAGMENT))
    return out


BLOCKS = policy_blocks()


def test_the_docs_hold_policy_examples():
    where = {w.split(":")[0] for w, _, _ in BLOCKS}
    assert {"README.md", "docs/policy.md"} <= where, BLOCKS
    # fragments stay rare: a whole policy is the example an operator copies
    assert sum(f for _, _, f in BLOCKS) <= 2, [w for w, _, f in BLOCKS if f]


@pytest.mark.parametrize("where,text,fragment", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_policy_example_validates(where, text, fragment):
    if fragment:
        text = "version: 1\nname: doc-fragment\n" + text
    try:
        parse_policy(text, source=where)
    except PolicyError as e:
        pytest.fail(f"{where}: " + "; ".join(str(i) for i in e.issues))
