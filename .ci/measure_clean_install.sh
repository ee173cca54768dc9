#!/usr/bin/env bash
# Time the install part of README's command 1 from a bare start: a new virtualenv, no pip cache, every
# package from PyPI, with constraints.txt. Prints both steps' times and whether pip backtracked.
#   bash .ci/measure_clean_install.sh [VENV_DIR]      (default: a temporary directory, removed afterwards)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-$(mktemp -d)/venv}
python3 -m venv "$VENV"
export PIP_CONSTRAINT=$PWD/constraints.txt PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
LOGS=$(mktemp -d)
t0=$SECONDS
"$VENV/bin/python" -m pip install -e . > "$LOGS/pip.log" 2>&1
t1=$SECONDS
PYTHON="$VENV/bin/python" bash trainer_image/install.sh > "$LOGS/install-sh.log" 2>&1
t2=$SECONDS
echo "pip install -e .: $((t1 - t0)) s; trainer_image/install.sh: $((t2 - t1)) s; total $((t2 - t0)) s"
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg); logs in $LOGS"
if grep -l "looking at multiple versions" "$LOGS"/*.log; then echo "pip backtracked (see the logs above)"; fi
[[ $# -ge 1 ]] || rm -rf "$(dirname "$VENV")"
