"""Dashboards, alert rules, docs/metrics.md and docker-compose.yml, checked without a Grafana or a Docker daemon:

- the committed dashboards and Grafana alerting file are what dashboards/generate.py writes;
- every dashboard and Grafana alert rule round-trips through grafana-foundation-sdk without losing a key
  (only Prometheus' annotation-query fields, which the SDK does not model, are allowed to drop);
- panel conventions an on-call engineer relies on (description, unit, legend, variables, layout);
- every metric a query references exists (collector/metrics.py families + collector/kernel_metrics.SPEC) and
  docs/metrics.md documents every metric with its type and labels;
- `promtool check rules` and `promtool test rules` pass; Grafana alerting carries the same rules;
- docker-compose.yml loads with compose-go (the library of Docker Compose), references only files that exist,
  and its ports, topics, endpoints and paths are the code's defaults; deploy/otelcol/config.yaml validates
  with this repo's OTel Collector build; deploy/prometheus/prometheus.yml passes promtool.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DASH = ROOT / "dashboards"
DASHBOARDS = sorted(DASH.glob("*.json"))
RULES = DASH / "alerts" / "hostwall.rules.yml"
RULE_TESTS = DASH / "alerts" / "hostwall.rules.test.yml"
GRAFANA_ALERTING = DASH / "provisioning" / "alerting" / "hostwall.yaml"
DATASOURCES = DASH / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = DASH / "provisioning" / "dashboards" / "hostwall.yaml"
COMPOSE = ROOT / "docker-compose.yml"
PROM_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
OTEL_CONFIG = ROOT / "deploy" / "otelcol" / "config.yaml"
DOCKERFILE = ROOT / "deploy" / "hostwall" / "Dockerfile"
METRICS_MD = ROOT / "docs" / "metrics.md"
OTLP_PORTS = {"grpc": 4317, "http": 4318}        # OTLP specification defaults
BUILTIN_METRICS = {"up", "ALERTS", "ALERTS_FOR_STATE"}
# Prometheus annotation queries carry datasource-specific keys the SDK's AnnotationQuery does not model.
SDK_UNMODELLED = {".annotations.list[].builtIn", ".annotations.list[].expr", ".annotations.list[].step",
                  ".annotations.list[].titleFormat", ".annotations.list[].textFormat",
                  ".annotations.list[].tagKeys", ".annotations.list[].useValueForTime",
                  ".annotations.list[].target.expr", ".annotations.list[].target.refId",
                  ".annotations.list[].target.datasource"}


def load_generator():
    spec = importlib.util.spec_from_file_location("hostwall_dashboards_generate", DASH / "generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def dashboards() -> list[dict]:
    return [json.loads(p.read_text()) for p in DASHBOARDS]


def panels(d: dict) -> list[dict]:
    out = []
    for p in d["panels"]:
        out.append(p)
        out += p.get("panels", [])
    return out


def exprs(d: dict) -> list[tuple[str, str]]:
    """(where, expr) of every PromQL in a dashboard: targets, annotations, variables."""
    out = [(f"{p['title']} {t['refId']}", t["expr"]) for p in panels(d) for t in p.get("targets", [])]
    out += [(f"annotation {a['name']}", a["target"]["expr"]) for a in d["annotations"]["list"]
            if "expr" in a.get("target", {})]
    for v in d["templating"]["list"]:
        if v["type"] == "query":
            q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
            out.append((f"${v['name']}", re.fullmatch(r"label_values\((.+),\s*\w+\)", q).group(1)))
    return out


def rules() -> list[dict]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def diff(a, b, path: str = "") -> list[tuple[str, str]]:
    """(kind, path) for keys dropped or values changed from a to b; keys b adds (SDK defaults) are fine."""
    out = []
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                out.append(("dropped", f"{path}.{k}"))
            else:
                out += diff(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(("changed", f"{path} (length)"))
        for x, y in zip(a, b):
            out += diff(x, y, f"{path}[]")
    elif a != b:
        out.append(("changed", f"{path}: {a!r} -> {b!r}"))
    return out


# ---- generated files ------------------------------------------------------------------------------------

def test_committed_files_are_the_generators_output():
    gen = load_generator()
    outputs = gen.outputs()
    assert {p.name for p in outputs} >= {p.name for p in DASHBOARDS} | {GRAFANA_ALERTING.name}
    stale = [str(p.relative_to(ROOT)) for p, text in outputs.items() if not p.exists() or p.read_text() != text]
    assert not stale, f"out of date (run python dashboards/generate.py): {stale}"
    assert [d["uid"] for d in dashboards()] == ["hostwall-dos", "hostwall-pipeline", "hostwall-traffic"]


# ---- structure -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_dashboard_round_trips_through_the_grafana_sdk(path):
    from grafana_foundation_sdk.cog import runtime
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models import prometheus
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    d = json.loads(path.read_text())
    model = Dashboard.from_json(d)
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    problems = [f"{kind}: {p}" for kind, p in diff(d, back) if not (kind == "dropped" and p in SDK_UNMODELLED)]
    assert not problems, "\n".join(problems)
    for p in model.panels:
        if p.type_val != "row":
            assert runtime.panelcfg_config(p.type_val) is not None, f"unknown panel type {p.type_val}"
            assert p.targets and all(isinstance(t, prometheus.Dataquery) for t in p.targets), p.title


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.stem)
def test_panels_are_readable_at_a_glance(path):
    d = json.loads(path.read_text())
    assert d["uid"] and d["title"].startswith("hostwall") and "hostwall" in d["tags"] and d["description"]
    names = [v["name"] for v in d["templating"]["list"]]
    assert names[:3] == ["datasource", "job", "host"], names
    if d["uid"] != "hostwall-pipeline":
        assert "interface" in names
    ids = [p["id"] for p in panels(d)]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in panels(d):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] >= 1, (p["title"], g)
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"panel {p['title']!r} overlaps another"
        cells |= mine
        if p["type"] == "row":
            continue
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
        assert len(p.get("description", "")) >= 30, f"{p['title']}: say what it shows"
        assert p["fieldConfig"]["defaults"].get("unit"), f"{p['title']}: no unit"
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"] == p["datasource"] and t["expr"].strip()
            if p["type"] in ("timeseries", "state-timeline", "bargauge"):
                assert t["legendFormat"] not in ("", "__auto"), f"{p['title']} {t['refId']}: set a legend"
        if p["type"] == "timeseries":
            assert p["options"]["legend"]["showLegend"] and p["options"]["legend"]["calcs"]
    for where, e in exprs(d):
        # every selector follows the variables (the $job and $host lists themselves span what they choose from)
        need = {"$job": [], "$host": ['job=~"$job"']}.get(where, ['job=~"$job"', 'instance=~"$host"'])
        for m in re.finditer(r"\b(hostwall_\w+)(\{[^}]*\})?", e):
            assert all(n in (m.group(2) or "") for n in need), f"{where}: {m.group(0)} lacks {need}"
        for var in re.findall(r"\$(\w+)", e):
            assert var in names or var.startswith("__"), f"{where}: undefined ${var}"


def test_grafana_alerting_carries_the_prometheus_rules():
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.alerting import Rule

    register_default_plugins()
    doc = yaml.safe_load(GRAFANA_ALERTING.read_text())
    assert doc["apiVersion"] == 1
    ds_uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    grafana = {r["title"]: r for g in doc["groups"] for r in g["rules"]}
    prom = {r["alert"]: r for r in rules()}
    assert set(grafana) == set(prom)
    for name, r in prom.items():
        g = grafana[name]
        back = json.loads(json.dumps(Rule.from_json(g), cls=JSONEncoder))
        assert [p for k, p in diff(g, back)] == [], name                 # no key the SDK does not know
        [a] = [q for q in g["data"] if q["refId"] == "A"]
        assert a["datasourceUid"] == ds_uid and a["model"]["expr"] == r["expr"], name
        assert g["condition"] in {q["refId"] for q in g["data"]}
        assert g["for"] == r.get("for", "0s") and g["labels"] == r["labels"] and g["annotations"] == r["annotations"]
        assert len({q["refId"] for q in g["data"]}) == len(g["data"])
    assert len({r["uid"] for r in grafana.values()}) == len(grafana)


# ---- metrics ---------------------------------------------------------------------------------------------

def known_metrics() -> dict[str, tuple[str, tuple[str, ...], str]]:
    """Exposition name -> (type, labels, family) of every metric the collector can serve."""
    from hostwall.collector import kernel_metrics as km
    from hostwall.collector.metrics import families_from_status
    fams = [(f.prom, f.kind, f.labels) for f in families_from_status({}, {})]
    fams += [(n, kind, labels) for n, (kind, _unit, labels, _h, _s) in km.SPEC.items()]
    out = {}
    for name, kind, labels in fams:
        if kind == "counter":
            out[name + "_total"] = (kind, labels, name)
        elif kind == "histogram":
            for s in ("_bucket", "_sum", "_count"):
                out[name + s] = (kind, labels + (("le",) if s == "_bucket" else ()), name)
        else:
            out[name] = (kind, labels, name)
    return out


def referenced() -> dict[str, set[str]]:
    """metric name -> where (dashboards, alert rules, Grafana alerting)."""
    refs: dict[str, set[str]] = {}
    sources = [(f"{d['uid']}: {w}", e) for d in dashboards() for w, e in exprs(d)]
    sources += [(f"rule {r['alert']}", r["expr"]) for r in rules()]
    for where, e in sources:
        e = re.sub(r'"[^"]*"', '""', e)                                  # label values are not metric names
        for tok in re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?=\s*[{\[)]|\s*$|\s*[<>=!/*+-]|\s+(?:or|and|unless|offset)\b)", e):
            if tok.startswith("hostwall_") or tok in BUILTIN_METRICS:
                refs.setdefault(tok, set()).add(where)
    return refs


def test_every_referenced_metric_exists():
    known = known_metrics()
    refs = referenced()
    assert len(refs) >= 30, sorted(refs)
    missing = {m: sorted(w)[:3] for m, w in refs.items() if m not in known and m not in BUILTIN_METRICS}
    assert not missing, f"queries reference metrics nobody serves: {missing}"
    # label names used in by()/matchers exist on the metric (catches typos like `reasons`)
    for d in dashboards():
        for where, e in exprs(d):
            for m in re.finditer(r"\b(hostwall_\w+)\{([^}]*)\}", e):
                name, sel = m.group(1), m.group(2)
                labels = set(known[name][1]) | {"job", "instance"}
                for lab in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", sel):
                    assert lab in labels, f"{d['uid']} {where}: {name} has no label {lab}"


def test_docs_metrics_md_documents_every_metric():
    rows = {}
    for line in METRICS_MD.read_text().splitlines():
        m = re.match(r"\|\s*`(hostwall_\w+)`\s*\|\s*(\w+)\s*\|\s*([^|]+?)\s*\|\s*([^|]+?)\s*\|\s*(.+?)\s*\|\s*(.+?)\s*\|$",
                     line)
        if m:
            assert m.group(1) not in rows, f"{m.group(1)} documented twice"
            rows[m.group(1)] = m.groups()[1:]
    known = known_metrics()
    families = {}
    for expo, (kind, labels, fam) in known.items():
        if kind == "histogram":
            families[fam] = (kind, tuple(x for x in labels if x != "le"))
        else:
            families[expo] = (kind, labels)
    undocumented = sorted(set(families) - set(rows))
    unknown = sorted(set(rows) - set(families))
    assert not undocumented and not unknown, f"undocumented: {undocumented}; documented but not served: {unknown}"
    for name, (kind, labels) in families.items():
        dkind, unit, dlabels, meaning, source = rows[name]
        assert dkind == kind, f"{name}: documented as {dkind}, is a {kind}"
        got = () if dlabels.strip() in ("—", "-", "") else tuple(x.strip() for x in dlabels.split(","))
        assert got == labels, f"{name}: documented labels {got}, served {labels}"
        assert unit and len(meaning) > 15 and source, name


# ---- alert rules -----------------------------------------------------------------------------------------

def promtool() -> str:
    path = shutil.which("promtool") or "/usr/bin/promtool"
    if not os.access(path, os.X_OK):
        pytest.fail("promtool is not installed (Debian package prometheus; scripts/setup-peers.sh installs it)",
                    pytrace=False)
    return path


def test_promtool_check_rules():
    r = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules())} rules found" in r.stdout + r.stderr


def test_promtool_unit_tests_of_the_rules():
    """Each alert fires on its condition and not on its near misses (synthetic series)."""
    r = subprocess.run([promtool(), "test", "rules", RULE_TESTS.name], capture_output=True, text=True, timeout=120,
                       cwd=RULE_TESTS.parent)
    assert r.returncode == 0, r.stdout + r.stderr
    tested = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    assert tested == {r["alert"] for r in rules()}, "every rule has a unit test"


def test_required_alerts_exist():
    by_name = {r["alert"]: r for r in rules()}
    assert {"HostwallAnomalyHighSeverity", "HostwallRecordsLost", "HostwallMapPressureHigh", "HostwallSpoolGrowing",
            "HostwallEnforcerDetached"} <= set(by_name)
    for r in by_name.values():
        assert r["labels"]["severity"] in ("critical", "warning") and r["annotations"]["summary"]
        assert "job" in r["expr"] or r["expr"].startswith("up"), f"{r['alert']}: keep job/instance in the alert"
    assert "0.8" in by_name["HostwallMapPressureHigh"]["expr"]
    assert 'high|critical' in by_name["HostwallAnomalyHighSeverity"]["expr"]


# ---- docker-compose.yml and deploy/ ----------------------------------------------------------------------

COMPOSE_GO = "v2.16.2"
COMPOSE_CHECK = """package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"

	"github.com/compose-spec/compose-go/v2/cli"
)

// Load a compose file the way Docker Compose does (schema validation, interpolation, merge) and print it.
func main() {
	opts, err := cli.NewProjectOptions([]string{os.Args[1]}, cli.WithOsEnv,
		cli.WithWorkingDirectory(filepath.Dir(os.Args[1])), cli.WithName("hostwall"))
	if err == nil {
		var p any
		p, err = opts.LoadProject(context.Background())
		if err == nil {
			out, _ := json.Marshal(p)
			fmt.Println(string(out))
			return
		}
	}
	fmt.Fprintln(os.Stderr, err)
	os.Exit(1)
}
"""


@pytest.fixture(scope="module")
def compose_check(tmp_path_factory) -> Path:
    """compose-go (github.com/compose-spec/compose-go, what Docker Compose itself parses with), built once
    with Go (the Go toolchain scripts/setup-peers.sh uses for the OTel Collector); cached."""
    from tests.peers import cache_dir
    go = shutil.which("go") or "/usr/local/go/bin/go"
    if not os.access(go, os.X_OK):
        pytest.fail("Go is not installed (scripts/setup-peers.sh installs it)", pytrace=False)
    key = hashlib.sha256((COMPOSE_GO + COMPOSE_CHECK).encode()).hexdigest()[:12]
    cache = cache_dir() / "composecheck" / key
    binary = cache / "composecheck"
    if not binary.exists():
        src = tmp_path_factory.mktemp("composecheck")
        (src / "main.go").write_text(COMPOSE_CHECK)
        (src / "go.mod").write_text(f"module hostwall/composecheck\n\ngo 1.24\n\n"
                                    f"require github.com/compose-spec/compose-go/v2 {COMPOSE_GO}\n")
        env = dict(os.environ, GOMODCACHE=str(cache_dir() / "go" / "mod"), GOCACHE=str(cache_dir() / "go" / "build"),
                   GOFLAGS="-mod=mod", GOTOOLCHAIN="local")
        cache.mkdir(parents=True, exist_ok=True)
        r = subprocess.run([go, "build", "-o", str(binary), "."], cwd=src, env=env, capture_output=True, text=True,
                           timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    return binary


COMPOSE_ENV = {"HOSTWALL_POLICY_DIR": "/etc/hostwall", "HOSTWALL_INTERFACE": "eth0"}


def load_compose(binary: Path, env: dict) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("HOSTWALL_", "GRAFANA_"))}
    return subprocess.run([str(binary), str(COMPOSE)], env={**clean, **env}, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture(scope="module")
def project(compose_check) -> dict:
    r = load_compose(compose_check, COMPOSE_ENV)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_compose_loads_and_demands_the_policy(project, compose_check):
    assert set(project["services"]) == {"hostwall-enforcer", "hostwall-collector", "kafka", "kafka-topics",
                                        "otelcol", "prometheus", "alertmanager", "grafana"}
    r = load_compose(compose_check, {})                 # no policy given: refuses with a clear message
    assert r.returncode != 0 and "HOSTWALL_INTERFACE" in r.stderr + r.stdout
    for name in ("hostwall-enforcer", "hostwall-collector"):
        s = project["services"][name]
        assert s["privileged"] and s["network_mode"] == "host" and s["pid"] == "host"
        targets = {v["target"]: v for v in s["volumes"]}
        assert targets["/sys/fs/bpf"]["source"] == "/sys/fs/bpf"                     # bpffs: the pins
        assert "/sys/fs/cgroup" in targets and "/lib/modules" in targets and "/usr/src" in targets
        assert s["build"]["dockerfile"] == "deploy/hostwall/Dockerfile"


def test_compose_references_only_files_that_exist(project):
    doc = yaml.safe_load(COMPOSE.read_text())
    local = []
    for name, s in doc["services"].items():
        for v in s.get("volumes", []):
            src = v.split(":")[0] if isinstance(v, str) else v.get("source", "")
            if src.startswith("."):
                local.append((name, src))
                assert (ROOT / src).exists(), f"{name}: {src} does not exist"
        if "build" in s:
            assert (ROOT / s["build"]["context"] / s["build"]["dockerfile"]).is_file()
    assert len(local) >= 7, local
    copies = re.findall(r"^COPY\s+(.+?)\s+\S+\s*$", DOCKERFILE.read_text(), re.M)
    assert copies
    for c in copies:
        for src in c.split():
            assert (ROOT / src).exists(), f"Dockerfile COPY {src}: not in the repository"
    assert "python3-bpfcc" in DOCKERFILE.read_text() and "--system-site-packages" in DOCKERFILE.read_text()


def _port(hostport: str) -> int:
    return int(hostport.rsplit(":", 1)[1])


def test_compose_settings_are_the_code_defaults(project):
    from hostwall.bpf.state import DEFAULT_PIN_DIR
    from hostwall.collector.config import DEFAULT_SINK, KafkaOptions, OtlpOptions, load_config
    from tests.peers.kafka import kafka_version
    from tests.peers.otelcol import otelcol_version

    svc = project["services"]
    col_env = {k: v for k, v in svc["hostwall-collector"]["environment"].items()}
    cfg = load_config(None, env=col_env)                 # the collector's own resolution and validation
    kinds = {s.scheme: s for s in cfg.sinks}
    assert set(kinds) == {"jsonl", "kafka", "otlp"}
    # paths: pin dir, state dir, JSONL file, spool
    assert cfg.pin_dir == DEFAULT_PIN_DIR == svc["hostwall-enforcer"]["environment"]["HOSTWALL_PIN_DIR"]
    assert col_env["HOSTWALL_STATE_DIR"] == "/run/hostwall" == svc["hostwall-enforcer"]["environment"]["HOSTWALL_STATE_DIR"]
    assert kinds["jsonl"].url == DEFAULT_SINK and cfg.kafka.spool_dir == KafkaOptions().spool_dir
    for name in ("hostwall-enforcer", "hostwall-collector"):
        targets = {v["target"] for v in svc[name]["volumes"]}
        assert "/run/hostwall" in targets and Path(DEFAULT_PIN_DIR).parents[1].as_posix() in targets
    col_targets = {v["target"] for v in svc["hostwall-collector"]["volumes"]}
    assert Path(kinds["jsonl"].target).parent.as_posix() in col_targets and \
        Path(cfg.kafka.spool_dir).parent.as_posix() in col_targets
    # Kafka: listener, topics
    kenv = svc["kafka"]["environment"]
    assert f"PLAINTEXT://{kinds['kafka'].target}" in kenv["KAFKA_ADVERTISED_LISTENERS"]
    assert kinds["kafka"].port == 9092 and svc["kafka"]["image"] == f"apache/kafka:{kafka_version()}"
    topics_cmd = " ".join(svc["kafka-topics"]["command"])
    created = set(re.search(r"for t in ([^;]+); do", topics_cmd).group(1).split())
    k = KafkaOptions()
    assert created == {k.flows_topic, k.anomalies_topic, k.audit_topic} == {cfg.kafka.flows_topic,
                                                                            cfg.kafka.anomalies_topic,
                                                                            cfg.kafka.audit_topic}
    assert kenv["KAFKA_AUTO_CREATE_TOPICS_ENABLE"] == "false"
    # OTLP: the collector's otlp sink -> the OTel Collector's receiver of the default protocol
    otel = yaml.safe_load(OTEL_CONFIG.read_text())
    proto = OtlpOptions().protocol
    assert cfg.otlp.protocol == proto
    assert otel["receivers"]["otlp"]["protocols"][proto]["endpoint"] == kinds["otlp"].target
    assert kinds["otlp"].port == OTLP_PORTS[proto]
    assert svc["otelcol"]["image"] == f"otel/opentelemetry-collector-contrib:{otelcol_version().lstrip('v')}"
    assert svc["otelcol"]["volumes"][0]["target"] == svc["otelcol"]["command"][0].split("=", 1)[1]
    # Prometheus: scrapes the collector's endpoint and the OTel Collector's exporter; evaluates the rules
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["hostwall"]["static_configs"][0]["targets"] == [cfg.metrics.prometheus]
    # the collector pushes its incidents to the same Alertmanager as Prometheus, with the instance label
    # Prometheus gives it (so the deployed inhibitions match both)
    from hostwall.collector.alerting import default_labels
    am_port = svc["alertmanager"]["command"]
    assert cfg.alerting.alertmanager.rsplit(":", 1)[1] in " ".join(am_port)
    assert dict(default_labels(cfg))["instance"] == jobs["hostwall"]["static_configs"][0]["targets"][0]
    assert jobs["otelcol"]["static_configs"][0]["targets"] == [otel["exporters"]["prometheus"]["endpoint"]]
    assert jobs["otelcol"]["honor_labels"] is True
    pvols = {v["target"]: v["source"] for v in svc["prometheus"]["volumes"]}
    rules_dir = Path(prom["rule_files"][0]).parent.as_posix()
    assert Path(pvols[rules_dir]) == DASH / "alerts" and RULES.name.endswith(".yml")
    assert Path(pvols["/etc/prometheus/prometheus.yml"]) == PROM_CONFIG
    listen = [a.split("=", 1)[1] for a in svc["prometheus"]["command"] if a.startswith("--web.listen-address=")][0]
    # Grafana: the data source points at that Prometheus; provisioning and dashboards are mounted where read
    ds = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    assert ds["url"] == f"http://{listen}" and ds["jsonData"]["timeInterval"] == prom["global"]["scrape_interval"]
    gvols = {v["target"]: Path(v["source"]) for v in svc["grafana"]["volumes"] if v["type"] == "bind"}
    assert gvols["/etc/grafana/provisioning/datasources"] == DATASOURCES.parent
    assert gvols["/etc/grafana/provisioning/dashboards"] == PROVIDERS.parent
    assert gvols["/etc/grafana/provisioning/alerting"] == GRAFANA_ALERTING.parent
    provider = yaml.safe_load(PROVIDERS.read_text())["providers"][0]
    assert gvols[provider["options"]["path"]] == DASH
    home = svc["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DASH / Path(home).relative_to(provider["options"]["path"])).is_file()


def test_compose_prometheus_alerts_go_to_the_alertmanager(project):
    """Prometheus loads the rules (not their unit tests beside them) and sends to the Alertmanager service, which
    runs deploy/alertmanager/alertmanager.yml (tests/dashboards/test_alertmanager.py) on 127.0.0.1 alone."""
    import fnmatch
    svc = project["services"]
    prom = yaml.safe_load(PROM_CONFIG.read_text())
    pvols = {v["target"]: Path(v["source"]) for v in svc["prometheus"]["volumes"] if v["type"] == "bind"}
    [pattern] = prom["rule_files"]
    loaded = [p.name for p in pvols[str(Path(pattern).parent)].iterdir() if fnmatch.fnmatch(p.name, Path(pattern).name)]
    assert loaded == [RULES.name], loaded                # hostwall.rules.test.yml is no rule file
    am = svc["alertmanager"]
    args = dict(a.split("=", 1) for a in am["command"])
    assert args["--cluster.listen-address"] == "" and args["--web.listen-address"].startswith("127.0.0.1:")
    [amset] = prom["alerting"]["alertmanagers"]
    assert amset["static_configs"][0]["targets"] == [args["--web.listen-address"]] and amset["api_version"] == "v2"
    avols = {v["target"]: Path(v["source"]) for v in am["volumes"] if v["type"] == "bind"}
    assert avols[args["--config.file"]] == ROOT / "deploy" / "alertmanager" / "alertmanager.yml"
    used = {int(a.rsplit(":", 1)[1]) for s in svc.values() for a in s.get("command") or []
            if isinstance(a, str) and "listen-address=127.0.0.1:" in a}
    assert 9093 not in used, "9093 is Kafka's controller port in this stack"


def test_prometheus_config_passes_promtool():
    r = subprocess.run([promtool(), "check", "config", "--syntax-only", str(PROM_CONFIG)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.peers
def test_otelcol_config_validates_with_our_build(tmp_path):
    from tests.peers import PeerNotInstalled
    from tests.peers.otelcol import otelcol_binary
    try:
        binary = otelcol_binary()
    except PeerNotInstalled as e:
        pytest.fail(str(e), pytrace=False)
    r = subprocess.run([str(binary), "validate", f"--config={OTEL_CONFIG}"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    bad = tmp_path / "bad.yaml"                          # and it does reject a broken one
    bad.write_text(OTEL_CONFIG.read_text().replace("exporters: [prometheus]", "exporters: [nonexistent]"))
    assert subprocess.run([str(binary), "validate", f"--config={bad}"], capture_output=True,
                          timeout=60).returncode != 0
