"""Runs one pytest file as a Bazel ``py_test``: ``bazel_pytest_main.py tests/test_x.py [args]``.

Bazel starts a test with the runfiles tree as the working directory, so the path argument is
relative to the workspace root (``$(rootpath ...)`` in tests/BUILD). pytest's cache is turned
off because runfiles are read-only, and a JUnit XML report is written where Bazel asks for one
(``XML_OUTPUT_FILE``) so ``bazel test`` records every test case. The exit status is pytest's,
so a file with no collected tests (status 5) fails the target rather than passing silently.

Python puts this script's folder, tests/ (symlinks resolved), first on ``sys.path``; it is
taken off again, since the test folders mirror the library's names (tests/tools,
tests/training, ...) and would shadow the real top-level packages such as ``tools``.
"""

import os
import sys

import pytest


def main(argv: list[str]) -> int:
    """Runs pytest on ``argv[1:]`` (test file first) and returns pytest's exit status."""
    if len(argv) < 2:
        print("usage: bazel_pytest_main.py TEST_FILE [PYTEST_ARGS...]", file=sys.stderr)
        return 2
    tests_dir = os.path.dirname(os.path.realpath(__file__))
    sys.path[:] = [entry for entry in sys.path
                   if not entry or os.path.realpath(entry) != tests_dir]
    pytest_args = ["-p", "no:cacheprovider", "-q", *argv[1:]]
    junit_path = os.environ.get("XML_OUTPUT_FILE")
    if junit_path:
        pytest_args.append(f"--junitxml={junit_path}")
    return int(pytest.main(pytest_args))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
