"""The house rules of docs/architecture.md, checked over the code as it would be installed:

- one import namespace: the wheel holds only `hostwall/` (plus its dist-info), every package folder
  is listed in pyproject.toml's mapping;
- the layer contracts (import-linter, pyproject.toml [tool.importlinter]) hold, and a seeded bad
  import breaks them with a message naming it;
- no import circles at all (strongly connected modules in the import graph);
- no module over 600 lines in the enforcer, the collector and the lab;
- ruff is clean; mypy is clean over the policy-pure packages (pyproject.toml [tool.mypy]); no file
  cites a document that is not in the repository.

import-linter, grimp and mypy find modules by walking the package's folder, and ours are spread over the
repository's top-level folders; `installed_tree` copies them into the installed layout first.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE_DIR: dict[str, str] = PYPROJECT["tool"]["setuptools"]["package-dir"]
MAX_LINES = 600
SIZE_CHECKED = ("enforcer", "collector", "lab", "fleet")


def _venv_tool(name: str) -> str:
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        pytest.fail(f"{name} is not installed in the venv: run scripts/setup.sh")
    return str(path)


def installed_tree(dst: Path) -> Path:
    """Copy every mapped package's .py files to dst/<dotted path>/ (the wheel's layout); returns dst."""
    for pkg, folder in PACKAGE_DIR.items():
        src = ROOT / folder
        out = dst.joinpath(*pkg.split("."))
        for f in src.rglob("*.py"):
            if "__pycache__" not in f.parts:
                target = out / f.relative_to(src)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(f, target)
    shutil.copy2(ROOT / "pyproject.toml", dst / "pyproject.toml")
    return dst


def lint_imports(tree: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tree))
    return subprocess.run([_venv_tool("lint-imports"), "--no-cache"], cwd=tree, env=env, capture_output=True,
                          text=True, timeout=300)


def test_every_package_folder_is_mapped():
    listed = set(PYPROJECT["tool"]["setuptools"]["packages"])
    found = set()
    for pkg, folder in PACKAGE_DIR.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            found.add(".".join((pkg, *rel)))
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"


def test_layer_contracts_hold(tmp_path):
    r = lint_imports(installed_tree(tmp_path))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "BROKEN" not in r.stdout


def test_a_collector_import_of_the_enforcer_breaks_the_contracts(tmp_path):
    tree = installed_tree(tmp_path)
    records = tree / "hostwall" / "collector" / "records" / "__init__.py"
    records.write_text(records.read_text() + "\nfrom hostwall.enforcer import control  # seeded\n")
    r = lint_imports(tree)
    assert r.returncode != 0
    assert "hostwall.collector.records -> hostwall.enforcer.control" in r.stdout, r.stdout[-4000:]


def _cycles(graph, modules: set[str]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    for root in sorted(modules):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.find_modules_directly_imported_by(root) & modules)))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on.add(root)
        while work:
            node, it = work[-1]
            nxt = next(it, None)
            if nxt is not None:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on.add(nxt)
                    work.append((nxt, iter(sorted(graph.find_modules_directly_imported_by(nxt) & modules))))
                elif nxt in on:
                    low[node] = min(low[node], index[nxt])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def test_no_import_circles(tmp_path):
    import grimp
    tree = installed_tree(tmp_path)
    sys.path.insert(0, str(tree))
    try:
        graph = grimp.build_graph("hostwall", cache_dir=None)
    finally:
        sys.path.remove(str(tree))
    modules = set(graph.modules)
    # a package's __init__ importing its own submodules is not a circle of concepts
    def edges_ok(m: str) -> set[str]:
        return {d for d in graph.find_modules_directly_imported_by(m) if not m.startswith(d + ".")}
    class G:
        find_modules_directly_imported_by = staticmethod(edges_ok)
    cycles = _cycles(G, modules)
    assert cycles == [], "import circles: " + "; ".join(" <-> ".join(c) for c in cycles)


def test_the_cycle_finder_finds_a_seeded_circle():
    deps = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}

    class G:
        @staticmethod
        def find_modules_directly_imported_by(m):
            return deps.get(m, set())
    assert _cycles(G, set(deps)) == [["a", "b", "c"]]


def _modules(folders) -> list[Path]:
    return sorted(p for f in folders if (ROOT / f).is_dir() for p in (ROOT / f).rglob("*.py")
                  if "__pycache__" not in p.parts)


def test_modules_hold_one_concept_each():
    big = {str(p.relative_to(ROOT)): n for p in _modules(SIZE_CHECKED)
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert big == {}, f"split these by concept (docs/architecture.md): {big}"


def test_ruff_is_clean():
    r = subprocess.run([_venv_tool("ruff"), "check", "--no-cache", str(ROOT)], cwd=ROOT, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:] + r.stderr[-2000:]


def _checkout_path(installed: str) -> str:
    """hostwall/enforcer/policy.py -> enforcer/policy.py: the file to edit for a path in the installed tree."""
    for pkg in sorted(PACKAGE_DIR, key=len, reverse=True):
        prefix = pkg.replace(".", "/") + "/"
        if installed.startswith(prefix):
            return PACKAGE_DIR[pkg] + "/" + installed[len(prefix):]
    return installed


@pytest.mark.timeout(600)
def test_mypy_is_clean_on_the_pure_packages(tmp_path):
    tree = installed_tree(tmp_path / "tree")
    r = subprocess.run([_venv_tool("mypy"), "--cache-dir", str(tmp_path / "cache")], cwd=tree, capture_output=True,
                       text=True, timeout=600)
    report = re.sub(r"^(hostwall/\S+?\.py)(?=:)", lambda m: _checkout_path(m.group(1)), r.stdout, flags=re.M)
    assert r.returncode == 0, report[-6000:] + r.stderr[-2000:]


def test_no_file_cites_a_document_outside_the_repository():
    cited = re.compile(r"\bDESIGN\.md\b")
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    me = Path(__file__).resolve().relative_to(ROOT).as_posix()         # names the pattern it looks for
    bad = [f for f in tracked if f.endswith((".py", ".md", ".sh", ".yml", ".yaml", ".toml", ".c", ".h"))
           and f != me and (ROOT / f).exists() and cited.search((ROOT / f).read_text(errors="replace"))]
    assert bad == [], f"these cite DESIGN.md, which is not in the repository; cite docs/ instead: {bad}"


@pytest.mark.timeout(600)
def test_the_wheel_installs_only_the_hostwall_namespace(tmp_path):
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(ROOT)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = tmp_path.glob("hostwall-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {t for t in tops if not t.endswith(".dist-info")} == {"hostwall"}, tops
    for data in ("hostwall/bpf/hostwall.h", "hostwall/bpf/hostwall.bpf.c", "hostwall/schemas/policy.schema.json",
                 "hostwall/examples/policy.yaml"):
        assert data in names, f"{data} missing from the wheel"
    # imports in a fresh virtual environment with no path tricks (system site packages give numpy etc.
    # only if present; the import of the pure modules needs PyYAML, numpy, jsonschema)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    zipfile.ZipFile(wheel).extractall(site)
    deps = subprocess.run([sys.executable, "-c", "import yaml, numpy, jsonschema, os; "
                           "print(os.pathsep.join({os.path.dirname(os.path.dirname(m.__file__)) "
                           "for m in (yaml, numpy, jsonschema)}))"], capture_output=True, text=True,
                          check=True).stdout.strip()
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": deps}
    probe = ("import hostwall, hostwall.enforcer.policy as p; "
             "pol = p.load_policy(str(hostwall.resource_dir('examples') / 'policy.yaml')); "
             "print(hostwall.__file__, pol.name)")
    r = subprocess.run([str(venv / "bin" / "python"), "-c", probe], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith(site), r.stdout
