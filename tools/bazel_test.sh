#!/usr/bin/env bash
# Builds and tests comdefend-tf with Bazel, offline (docs/bazel.md); used by `make bazel-test`.
#
#   tools/bazel_test.sh          every target built, every test run (bazel test //...)
#   tools/bazel_test.sh --quick  BUILD files checked against the imports, every target built,
#                                and four fast tests run through the Bazel toolchain
#
# Steps: tools/bazel_setup.sh (installs Bazel if needed, writes the machine-specific files),
# tools/check_bazel_deps.py --bazel=bazel (BUILD deps match the imports, and its own reading of
# the BUILD files matches `bazel query`'s), bazel build/test, a closing
# "bazel: N passed, N failed, N skipped" line summed over the pytest cases, and always
# `bazel shutdown` so no Bazel server outlives the command. Extra arguments after the mode
# go to `bazel test` (e.g. --nocache_test_results).
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
cd "${repo_root}"
python_bin="${PYTHON:-${repo_root}/.venv/bin/python}"

quick_tests=(//tests:tools/test_check_bazel_deps //tests:tools/test_test_tiers
             //tests:tools/test_bazel_pytest_main //tests:test_layers)
mode="full"
if [[ "${1:-}" == "--quick" ]]; then
  mode="quick"
  shift
fi

bash tools/bazel_setup.sh || exit 1
trap 'bazel shutdown >/dev/null 2>&1 || true' EXIT

"${python_bin}" tools/check_bazel_deps.py --bazel=bazel || exit 1

if [[ "${mode}" == "quick" ]]; then
  bazel build //... || exit 1
  test_targets=("${quick_tests[@]}")
else
  query_output="$(bazel query 'tests(//...)' 2>/tmp/bazel_test_query.$$)"
  query_status=$?
  if [[ ${query_status} -ne 0 ]]; then
    cat "/tmp/bazel_test_query.$$" >&2
  fi
  rm -f "/tmp/bazel_test_query.$$"
  mapfile -t test_targets < <(printf '%s\n' "${query_output}" | grep '^//')
  if [[ ${query_status} -ne 0 || ${#test_targets[@]} -eq 0 ]]; then
    echo "bazel_test: bazel query 'tests(//...)' found no test targets" >&2
    exit 1
  fi
fi

started=${SECONDS}
bazel test "$@" "${test_targets[@]}"
test_status=$?
echo "bazel_test: bazel test took $((SECONDS - started)) s"
"${python_bin}" tools/bazel_test_summary.py "${test_targets[@]}"
summary_status=$?
if [[ ${test_status} -ne 0 ]]; then
  exit "${test_status}"
fi
exit "${summary_status}"
