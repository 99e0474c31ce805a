#!/bin/sh
# Stand-in for Bazel's downloaded coverage tools: `bazel coverage` is not supported offline.
echo "remote_coverage_tools is an offline stub: bazel coverage is unavailable in this checkout;" \
     "use pytest-cov through the venv instead." >&2
exit 1
