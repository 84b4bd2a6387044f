"""`python -m hostwall.bench.code_compare REV_A REV_B PATH...` — which functions' bytecode differs between
two revisions (docs/benchmarks.md "Before/after the house change (issue 18)").

A change that only moves modules (import paths, formatting, annotations, comments) leaves every function
body's bytecode as it was: then the work done per record or per packet is the same by construction, and a
benchmark difference between the two revisions is the machine's noise. For each Python file under PATH
present at both revisions, the source is compiled (nothing is imported or run) and its code objects are
compared by qualified name: instructions, constants, names and local names. A file's module body and
class bodies are reported like any function (they run once, at import), so read the names: what
matters for speed is whether a per-record / per-call function is listed. Stdlib only; run from the
repository (uses git).
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import types
from collections.abc import Iterator

__all__ = ["differing_code", "main"]


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], capture_output=True)


def _code_objects(co: types.CodeType, prefix: str = "") -> Iterator[tuple[str, types.CodeType]]:
    name = f"{prefix}.{co.co_name}" if prefix else co.co_name
    yield name, co
    for c in co.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_objects(c, name)


def _signature(co: types.CodeType) -> tuple:
    consts = tuple("<code>" if isinstance(c, types.CodeType) else c for c in co.co_consts)
    return co.co_code, consts, co.co_names, co.co_varnames


def differing_code(source_a: bytes | str, source_b: bytes | str, filename: str = "<src>") -> list[str]:
    """Qualified names of the code objects that differ (or exist on one side only), sorted."""
    a = dict(_code_objects(compile(source_a, filename, "exec")))
    b = dict(_code_objects(compile(source_b, filename, "exec")))
    return sorted(n for n in a.keys() | b.keys() if n not in a or n not in b or _signature(a[n]) != _signature(b[n]))


def _files(rev: str, paths: list[str]) -> set[str]:
    out = _git("ls-tree", "-r", "--name-only", rev, "--", *paths)
    if out.returncode:
        raise SystemExit(f"git ls-tree {rev}: {out.stderr.decode().strip()}")
    return {f for f in out.stdout.decode().split() if f.endswith(".py")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hostwall.bench.code_compare", description=__doc__.split("\n")[0])
    ap.add_argument("rev_a")
    ap.add_argument("rev_b")
    ap.add_argument("paths", nargs="+", help="files or folders (as at both revisions)")
    a = ap.parse_args(argv)
    fa, fb = _files(a.rev_a, a.paths), _files(a.rev_b, a.paths)
    for f in sorted(fa ^ fb):
        print(f"{f}: only at {a.rev_a if f in fa else a.rev_b}")
    same = 0
    for f in sorted(fa & fb):
        src = [_git("show", f"{rev}:{f}").stdout for rev in (a.rev_a, a.rev_b)]
        names = [] if src[0] == src[1] else differing_code(src[0], src[1], f)
        if names:
            print(f"{f}: {', '.join(names)}")
        else:
            same += 1
    print(f"{same} of {len(fa & fb)} files in both: every code object the same")
    return 0


if __name__ == "__main__":
    sys.exit(main())
