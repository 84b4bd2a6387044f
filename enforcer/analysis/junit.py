"""JUnit XML of a `test` run, the report format CI systems (Jenkins, GitLab, GitHub Actions reporters)
read: one <testsuite> for the cases and one for the invariants, a <testcase> each, a <failure> with
the whole explanation for every miss. Pure ElementTree; cost O(cases).
"""
from __future__ import annotations

import os
import xml.etree.ElementTree as ET

from .judge import TestReport

__all__ = ["junit_xml", "write_junit"]


def junit_xml(rep: TestReport) -> bytes:
    src = rep.cases_file.source
    root = ET.Element("testsuites", name=f"hostwall-enforcer test {os.path.basename(src)}",
                      tests=str(len(rep.results) + len(rep.invariants)),
                      failures=str(len(rep.failures) + len(rep.violated)), time=f"{rep.seconds:.3f}")
    cases = ET.SubElement(root, "testsuite", name=f"{src} cases", tests=str(len(rep.results)),
                          failures=str(len(rep.failures)), errors="0", skipped="0")
    ET.SubElement(ET.SubElement(cases, "properties"), "property", name="policy",
                  value=f"{rep.policy.source} ({rep.policy.name} revision {rep.policy.revision})")
    for r in rep.results:
        tc = ET.SubElement(cases, "testcase", classname="cases", name=r.case.name, file=src,
                           line=str(r.case.line or 0))
        if r.failed:
            msg = "; ".join([*r.misses, *(f"datapath: {d}" for d in r.disagreements)])
            f = ET.SubElement(tc, "failure", message=msg, type="disagreement" if r.disagreements else "expectation")
            f.text = r.text(src)
    invs = ET.SubElement(root, "testsuite", name=f"{src} invariants", tests=str(len(rep.invariants)),
                         failures=str(len(rep.violated)), errors="0", skipped="0")
    for i in rep.invariants:
        tc = ET.SubElement(invs, "testcase", classname="invariants", name=i.invariant.name, file=src,
                           line=str(i.invariant.line or 0))
        if not i.holds:
            assert i.counterexample is not None           # a violated invariant has its counterexample
            f = ET.SubElement(tc, "failure", message=f"violated, e.g. {i.counterexample.text()}", type="invariant")
            f.text = i.text()
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True)


def write_junit(rep: TestReport, path: str) -> None:
    with open(path, "wb") as f:
        f.write(junit_xml(rep))
