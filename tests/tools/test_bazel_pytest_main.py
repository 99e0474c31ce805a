"""Tests for tests/bazel_pytest_main.py, the runner behind every Bazel py_test."""

import os
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

from tests.conftest import REPO_ROOT, subprocess_env

RUNNER = os.path.join(REPO_ROOT, "tests", "bazel_pytest_main.py")


def _run(tmp_path, test_source, **env):
    (tmp_path / "test_probe.py").write_text(test_source)
    return subprocess.run([sys.executable, RUNNER, "test_probe.py"], cwd=tmp_path,
                          env=subprocess_env(**env), capture_output=True, text=True, timeout=120)


def test_test_folders_do_not_shadow_top_level_packages(tmp_path):
    """Python puts tests/ first on sys.path for the runner; tests/tools must not hide tools."""
    result = _run(tmp_path, (
        "import os\nimport tools\n"
        "def test_tools_is_the_repositorys():\n"
        "    folders = [os.path.realpath(path) for path in tools.__path__]\n"
        "    assert not [folder for folder in folders if folder.endswith('/tests/tools')]\n"
        "    from tools import check_bazel_deps\n"))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


def test_the_junit_report_goes_where_bazel_asks_and_the_status_is_pytests(tmp_path):
    report = tmp_path / "report" / "test.xml"
    report.parent.mkdir()
    result = _run(tmp_path, "def test_fails():\n    assert 1 == 2\n",
                  XML_OUTPUT_FILE=str(report))
    assert result.returncode == 1
    suite = ElementTree.parse(report).getroot().find("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("1", "1")
    empty = _run(tmp_path, "x = 1\n")
    assert empty.returncode == 5  # no tests collected fails the target


def test_without_a_test_file_it_prints_its_usage():
    result = subprocess.run([sys.executable, RUNNER], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "usage: bazel_pytest_main.py" in result.stderr
