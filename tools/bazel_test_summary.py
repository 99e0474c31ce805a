"""Sums the pytest results of Bazel test targets into one closing line.

Usage (from the repository root, after ``bazel test``)::

    python tools/bazel_test_summary.py //tests:test_a //tests:test_b ...

Reads each target's ``bazel-testlogs/<package>/<name>/test.xml`` (written by
tests/bazel_pytest_main.py through pytest's JUnit report; Bazel keeps it for cached results
too) and prints ``bazel: N passed, N failed, N skipped``, counting pytest test cases. A target
without a pytest report (it did not build, crashed, or timed out, so Bazel wrote its own XML
or none) counts as one failure and is named. Exits 1 when anything failed.
"""

from __future__ import annotations

import os
import sys
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass


@dataclass
class Counts:
    """Test-case totals: passed, failed (failures and errors) and skipped."""

    passed: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, other: "Counts") -> None:
        self.passed += other.passed
        self.failed += other.failed
        self.skipped += other.skipped


def testlog_xml_path(testlogs_dir: str, label: str) -> str:
    """``//tests:test_x`` -> ``<testlogs_dir>/tests/test_x/test.xml``."""
    if not label.startswith("//") or ":" not in label:
        raise ValueError(f"expected a label like //tests:test_x, got {label!r}")
    package, name = label[2:].split(":", 1)
    return os.path.join(testlogs_dir, package, name, "test.xml")


def pytest_counts(xml_path: str) -> Counts | None:
    """Totals of a pytest JUnit report, or None when the file is missing or not pytest's."""
    if not os.path.isfile(xml_path):
        return None
    try:
        root = ElementTree.parse(xml_path).getroot()
    except ElementTree.ParseError:
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    if not suites or any(suite.get("name") != "pytest" for suite in suites):
        return None
    counts = Counts()
    for suite in suites:
        total = int(suite.get("tests", 0))
        failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
        skipped = int(suite.get("skipped", 0))
        counts.add(Counts(passed=total - failed - skipped, failed=failed, skipped=skipped))
    return counts


def summarize(testlogs_dir: str, labels: list[str]) -> tuple[Counts, list[str]]:
    """Totals over ``labels`` and the labels that have no pytest report."""
    totals = Counts()
    missing = []
    for label in labels:
        counts = pytest_counts(testlog_xml_path(testlogs_dir, label))
        if counts is None:
            missing.append(label)
            totals.failed += 1
        else:
            totals.add(counts)
    return totals, missing


def main(argv: list[str], testlogs_dir: str | None = None) -> int:
    """Prints the summary of the labels in ``argv[1:]``; ``testlogs_dir`` defaults to the
    repository's ``bazel-testlogs``. Returns 1 when anything failed, 2 without labels."""
    labels = argv[1:]
    if not labels:
        print("usage: bazel_test_summary.py //pkg:test [...]", file=sys.stderr)
        return 2
    if testlogs_dir is None:
        repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        testlogs_dir = os.path.join(repo_root, "bazel-testlogs")
    totals, missing = summarize(testlogs_dir, labels)
    for label in missing:
        print(f"bazel: {label} left no pytest report (build failure, crash or timeout)")
    print(f"bazel: {totals.passed} passed, {totals.failed} failed, {totals.skipped} skipped")
    return 1 if totals.failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
