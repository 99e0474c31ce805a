# Two commands on a fresh machine: `make demo` (the main job on embedded data) and `make test`
# (the whole suite, as CI runs it: .ci/run). `make test-fast` leaves out the tests marked slow
# (programs in child processes, hostile corpora, the fresh-venv wheel check; tests/conftest.py
# lists them). All create the virtual environment in .venv on first use and reuse it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
RUNS ?= runs/demo
STAMP := $(VENV)/.installed
# The core's wheels at the pinned versions, for the offline fresh-venv check (make wheelhouse).
WHEELHOUSE ?= .wheelhouse
WHEELHOUSE_STAMP := $(WHEELHOUSE)/.complete

.PHONY: venv demo test test-fast clean-demo bazel-test bazel-check

venv: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -r requirements.txt
	$(VENV)/bin/pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

demo: $(STAMP)
	bash tools/demo.sh $(RUNS)

# Both tiers include tests/tools/test_check_bazel_deps.py, which checks every BUILD file
# against the imports without Bazel.
test: $(STAMP) $(WHEELHOUSE_STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -n 2 --durations=15 -m "not slow" tests

clean-demo:
	rm -rf $(RUNS)

# Bazel build + full test suite, offline (docs/bazel.md): set-up (apt bazel-bootstrap 4.2.3),
# BUILD-deps check, bazel test //..., a summary line, bazel shutdown.
bazel-test: $(STAMP)
	bash tools/bazel_test.sh

# Quick Bazel check: BUILD deps match imports, every target builds, four fast tests (~1 min).
bazel-check: $(STAMP)
	bash tools/bazel_test.sh --quick

# The core's wheels at the pinned versions (requirements.txt as constraints), downloaded once
# into .wheelhouse for the offline fresh-venv check below.
.PHONY: wheelhouse wheel-check

wheelhouse: $(WHEELHOUSE_STAMP)

$(WHEELHOUSE_STAMP): $(STAMP) pyproject.toml requirements.txt
	rm -rf $(WHEELHOUSE)
	$(VENV)/bin/pip download --quiet --no-build-isolation -c requirements.txt -d $(WHEELHOUSE) .
	touch $@

# Builds the wheel, installs its core alone into a fresh venv offline (--no-index
# --find-links $(WHEELHOUSE)), then trains, purifies and exports with it (tools/wheel_check.py;
# about 1.5 min on 2 idle cores). The same check runs in `make test` when .wheelhouse exists
# (tests/test_packaging.py, marker wheel_check).
wheel-check: $(WHEELHOUSE_STAMP)
	$(PY) tools/wheel_check.py --wheelhouse=$(WHEELHOUSE)
