"""Shared test settings: quiet TensorFlow logs, repo root on sys.path, reference fixtures dir."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
    sys.path.insert(0, REPO_ROOT)

import pytest  # noqa: E402


def reference_dir() -> str:
    """The authors' reference fixtures: $COMDEFEND_REFERENCE_DIR or ../shared/reference."""
    return os.environ.get("COMDEFEND_REFERENCE_DIR",
                          os.path.join(os.path.dirname(REPO_ROOT), "shared", "reference"))


@pytest.fixture(scope="session")
def repo_root() -> str:
    return REPO_ROOT


def subprocess_env(**extra) -> dict:
    """Environment for a child Python that imports this repo (for binaries and multi-process
    tests)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    env.update(extra)
    return env
