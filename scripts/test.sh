#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (idempotent, cached under
# ~/.cache), then runs pytest against the real test bed (kube-apiserver & co., SeaweedFS, Prometheus).
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh tests/unit -q   # extra arguments go to pytest
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1

step() { printf '\n== %s (%s)\n' "$1" "$(date +%T)"; }

step "python packages"
"$PY" -m pip install -q -c constraints.txt -e '.[dev]'   # constraints.txt: the versions the suite passed with
PIP_CONSTRAINT=$PWD/constraints.txt PYTHON="$PY" bash trainer_image/install.sh

step "test bed (control plane binaries, the real node, its images, prometheus)"
bash tests/testbed/provision.sh

step "lint and types"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
"$PY" -m mypy

step "pytest"
set +e
"$PY" -m pytest "$@"
rc=$?
set -e
if [[ $rc -eq 5 ]]; then
  echo "pytest collected no tests: that is a failure, not a pass" >&2
  exit 1
fi
exit $rc
