"""Tests for the test tiers of tests/conftest.py (`make test-fast` leaves out `slow`)."""

import ast
import glob
import os

from tests import conftest


def _definitions():
    """(test function names, fixture names) defined anywhere under tests/."""
    tests, fixtures = set(), set()
    pattern = os.path.join(conftest.REPO_ROOT, "tests", "**", "*.py")
    for path in glob.glob(pattern, recursive=True):
        with open(path, encoding="utf-8") as handle:
            tree = ast.parse(handle.read(), filename=path)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if any("fixture" in ast.unparse(decorator) for decorator in node.decorator_list):
                fixtures.add(node.name)
            elif node.name.startswith("test_") and os.path.basename(path).startswith("test_"):
                tests.add(node.name)
    return tests, fixtures


def test_every_listed_name_still_names_a_test_or_fixture():
    """A renamed or moved-away test would silently fall into the fast tier otherwise."""
    tests, fixtures = _definitions()
    assert sorted(conftest.SLOW_TESTS - tests) == []
    assert sorted(conftest.SLOW_FIXTURES - fixtures) == []


def test_the_slow_marker_is_registered(pytestconfig):
    markers = [line.split(":", 1)[0] for line in pytestconfig.getini("markers")]
    assert "slow" in markers and "wheel_check" in markers


class _Item:
    def __init__(self, name, fixturenames=(), markers=()):
        self.name = name
        self.originalname = name.split("[", 1)[0]
        self.fixturenames = list(fixturenames)
        self._markers = set(markers)

    def get_closest_marker(self, name):
        return name if name in self._markers else None


def test_items_are_slow_by_name_fixture_or_wheel_check_marker():
    assert conftest.is_slow(_Item("test_training_drives_loss_down_and_psnr_up"))
    assert conftest.is_slow(_Item("test_bad_flags_fail_clearly[x-1]"))
    assert conftest.is_slow(_Item("test_any", fixturenames=["tmp_path", "exported"]))
    assert conftest.is_slow(_Item("test_any", markers=["wheel_check"]))
    assert not conftest.is_slow(_Item("test_any", fixturenames=["tmp_path"]))
    assert not conftest.is_slow(_Item("test_training_drives_loss_down"))

