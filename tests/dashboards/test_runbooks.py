"""Alert rules and runbooks stay in step (docs/runbooks/, docs/alerting.md):

- every rule of dashboards/alerts/hostwall.rules.yml has `runbook_url` = <base>/<AlertName>.md, one base for all,
  the base dashboards/generate.py writes (and the Grafana copy carries the same, test_dashboards.py);
- docs/runbooks/<AlertName>.md exists for every alert and every runbook belongs to an alert;
- each runbook has its title and the four sections, in order;
- what the runbooks tell an on-call engineer to type or look at exists: every `hostwall-enforcer ...` /
  `hostwall-collector ...` command parses with the real CLI, every "Dashboard" › "Panel" names a real panel;
- docker-compose.yml's Prometheus serves docs/runbooks/ at the base of the default runbook_url, and a real
  Prometheus started with --web.user-assets=docs/runbooks answers each alert's link with its runbook.
"""
from __future__ import annotations

import importlib.util
import json
import re
import shlex
import urllib.parse
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "dashboards" / "alerts" / "hostwall.rules.yml"
RUNBOOKS = ROOT / "docs" / "runbooks"
COMPOSE = ROOT / "docker-compose.yml"
SECTIONS = ["What it means", "How to confirm", "How to mitigate", "When to escalate"]


def rules() -> dict[str, dict]:
    return {r["alert"]: r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}


def generator():
    spec = importlib.util.spec_from_file_location("hostwall_dashboards_generate", ROOT / "dashboards" / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def runbooks() -> dict[str, str]:
    return {p.stem: p.read_text() for p in sorted(RUNBOOKS.glob("*.md"))}


def test_every_alert_links_its_runbook():
    base = generator().runbook_base([])
    assert base.startswith(("http://", "https://")) and not base.endswith("/"), base
    for name, r in rules().items():
        url = r["annotations"].get("runbook_url")
        assert url == f"{base}/{name}.md", f"{name}: runbook_url {url!r} (run python dashboards/generate.py)"
        assert (RUNBOOKS / f"{name}.md").is_file(), f"{name}: no docs/runbooks/{name}.md"


def test_every_runbook_belongs_to_an_alert():
    orphans = sorted(set(runbooks()) - set(rules()))
    assert not orphans, f"runbooks without an alert rule: {orphans}"
    assert set(runbooks()) == set(rules())


@pytest.mark.parametrize("name", sorted(rules()))
def test_runbook_has_the_four_sections(name):
    text = (RUNBOOKS / f"{name}.md").read_text()
    assert text.splitlines()[0] == f"# {name}"
    headings = re.findall(r"^## (.+?)\s*$", text, re.M)
    assert headings == SECTIONS, f"{name}: sections {headings}, want {SECTIONS}"
    for part in re.split(r"^## .+$", text, flags=re.M)[1:]:
        assert len(part.split()) >= 30, f"{name}: a section with almost nothing in it"
    severity = rules()[name]["labels"]["severity"]
    assert f"Severity `{severity}`" in text, f"{name}: say the alert's severity ({severity})"


def test_the_runbook_base_can_be_configured(monkeypatch):
    gen = generator()
    text = RULES.read_text()
    other = gen.with_runbook_urls(text, "https://wiki.example.org/hostwall/runbooks")
    urls = re.findall(r'runbook_url: "([^"]+)"', other)
    assert urls == [f"https://wiki.example.org/hostwall/runbooks/{n}.md" for n in rules()]
    assert gen.with_runbook_urls(other, gen.runbook_base([])) == text                 # and back, nothing else
    missing = re.sub(r"^\s*runbook_url:.*\n", "", text, flags=re.M)                 # a rule without one gets one
    assert gen.with_runbook_urls(missing, gen.runbook_base([])) == text
    assert gen.runbook_base(["--runbook-base", "https://x.example/rb/"]) == "https://x.example/rb"
    monkeypatch.setenv("HOSTWALL_RUNBOOK_BASE_URL", "https://env.example/rb")
    assert gen.runbook_base([]) == "https://env.example/rb"
    assert re.findall(r'runbook_url: "([^"]+)"', gen.outputs()[RULES])[0].startswith("https://env.example/rb/")


# ---- what the runbooks quote exists ---------------------------------------------------------------------

def _parsers():
    from hostwall.collector.cli import _parser as collector_parser
    from hostwall.enforcer.cli import build_parser as enforcer_parser
    return {"hostwall-enforcer": enforcer_parser(), "hostwall-collector": collector_parser()}


def quoted_commands() -> list[tuple[str, str]]:
    out = []
    for name, text in runbooks().items():
        for code in re.findall(r"``(.+?)``|`([^`]+)`", text, re.S):
            cmd = " ".join((code[0] or code[1]).split())
            if re.match(r"hostwall-(enforcer|collector) [a-z]", cmd) and ": " not in cmd:   # not an output line
                out.append((name, cmd))
    return out


def test_quoted_commands_parse_with_the_real_clis():
    parsers = _parsers()
    cmds = quoted_commands()
    assert len(cmds) >= 15, cmds
    seen, bad = set(), []
    for name, cmd in cmds:
        prog, *args = shlex.split(cmd)
        args = [a for a in args if a != "..."]
        try:
            parsers[prog].parse_args(args)
        except SystemExit:
            bad.append(f"{name}: `{cmd}`")
        seen.add(" ".join([prog] + args))
    assert not bad, "not valid command lines of the CLIs:\n" + "\n".join(bad)
    for must in ("hostwall-enforcer status", "hostwall-collector status", "hostwall-enforcer ban add",
                 "hostwall-enforcer apply /etc/hostwall/policy.yaml"):
        assert any(s.startswith(must) for s in seen), f"no runbook shows `{must}`"


def test_quoted_dashboard_panels_exist():
    dashboards = {}
    for p in (ROOT / "dashboards").glob("*.json"):
        d = json.loads(p.read_text())
        titles = {x["title"] for x in d["panels"]} | {y["title"] for x in d["panels"] for y in x.get("panels", [])}
        dashboards[d["title"].split(" — ", 1)[1]] = titles
    refs = [(n, d, p) for n, text in runbooks().items() for d, p in re.findall(r'"([^"]+)" › "([^"]+)"', text)]
    assert len(refs) >= 20, refs
    for name, dash, panel in refs:
        assert dash in dashboards, f"{name}: no dashboard {dash!r} (have {sorted(dashboards)})"
        assert panel in dashboards[dash], f"{name}: dashboard {dash!r} has no panel {panel!r}"
    for name in rules():
        assert any(n == name for n, _, _ in refs), f"{name}: point at a dashboard panel"


# ---- the default base works --------------------------------------------------------------------------------

def test_compose_prometheus_serves_the_runbooks_at_the_default_base():
    gen = generator()
    prom = yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]
    args = dict(a.split("=", 1) for a in prom["command"] if "=" in a)
    mounts = dict(reversed(v.split(":")[:2]) for v in prom["volumes"] if v.startswith("./"))
    assert (ROOT / mounts[args["--web.user-assets"]]).resolve() == RUNBOOKS
    assert gen.RUNBOOK_BASE == f"http://{args['--web.listen-address']}/user"


@pytest.mark.peers
def test_prometheus_answers_every_runbook_url(prometheus_server_factory):
    """The link in a notification opens the runbook: a real Prometheus serving docs/runbooks as the compose
    stack does (on its own port here, so only the path of the URL is taken)."""
    prom = prometheus_server_factory(None, extra_args=[f"--web.user-assets={RUNBOOKS}"])
    from tests.peers import http_get
    for name, r in rules().items():
        path = urllib.parse.urlsplit(r["annotations"]["runbook_url"]).path
        status, body = http_get(prom.url + path)
        assert status == 200 and body.decode() == (RUNBOOKS / f"{name}.md").read_text(), (name, status)
    assert http_get(prom.url + "/user/NoSuchAlert.md")[0] == 404
