"""Tests for tools/bazel_test_summary.py: pytest JUnit reports summed per Bazel target."""

import os

import pytest

from tools import bazel_test_summary as summary

_PYTEST_XML = ('<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests">'
               '<testsuite name="pytest" errors="{errors}" failures="{failures}" '
               'skipped="{skipped}" tests="{tests}" time="1.0"></testsuite></testsuites>')
_BAZEL_TIMEOUT_XML = ('<?xml version="1.0" encoding="UTF-8"?><testsuites><testsuite '
                      'name="tests/test_slow" tests="1" failures="0" errors="1">'
                      '<testcase name="tests/test_slow" status="run"><error '
                      'message="exited with error code 142"></error></testcase></testsuite>'
                      '</testsuites>')


def _write_log(testlogs, package, name, text):
    folder = os.path.join(testlogs, package, name)
    os.makedirs(folder)
    with open(os.path.join(folder, "test.xml"), "w", encoding="utf-8") as handle:
        handle.write(text)


def test_counts_are_summed_over_targets_from_pytest_reports(tmp_path):
    _write_log(tmp_path, "tests", "test_a",
               _PYTEST_XML.format(errors=0, failures=1, skipped=2, tests=10))
    _write_log(tmp_path, "tests", "test_b",
               _PYTEST_XML.format(errors=1, failures=0, skipped=0, tests=4))
    totals, missing = summary.summarize(str(tmp_path), ["//tests:test_a", "//tests:test_b"])
    assert (totals.passed, totals.failed, totals.skipped) == (10, 2, 2)
    assert missing == []


def test_target_without_pytest_report_counts_as_one_failure(tmp_path):
    _write_log(tmp_path, "tests", "test_ok",
               _PYTEST_XML.format(errors=0, failures=0, skipped=0, tests=3))
    _write_log(tmp_path, "tests", "test_slow", _BAZEL_TIMEOUT_XML)
    labels = ["//tests:test_ok", "//tests:test_slow", "//tests:test_never_built"]
    totals, missing = summary.summarize(str(tmp_path), labels)
    assert (totals.passed, totals.failed, totals.skipped) == (3, 2, 0)
    assert missing == ["//tests:test_slow", "//tests:test_never_built"]


def test_closing_line_and_exit_status(tmp_path, capsys):
    _write_log(tmp_path, "tests", "test_a",
               _PYTEST_XML.format(errors=0, failures=0, skipped=1, tests=5))
    assert summary.main(["prog", "//tests:test_a"], testlogs_dir=str(tmp_path)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "bazel: 4 passed, 0 failed, 1 skipped"
    assert summary.main(["prog", "//tests:test_a", "//tests:missing"],
                        testlogs_dir=str(tmp_path)) == 1
    assert capsys.readouterr().out.splitlines() == [
        "bazel: //tests:missing left no pytest report (build failure, crash or timeout)",
        "bazel: 4 passed, 1 failed, 1 skipped"]
    assert summary.main(["prog"], testlogs_dir=str(tmp_path)) == 2


def test_label_paths_and_bad_labels():
    assert summary.testlog_xml_path("/logs", "//tests:test_x") == "/logs/tests/test_x/test.xml"
    with pytest.raises(ValueError, match="//tests:test_x"):
        summary.testlog_xml_path("/logs", "tests/test_x")
