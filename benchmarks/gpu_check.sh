#!/usr/bin/env bash
# The ready GPU check (issue 17 part 4); see benchmarks/gpu_check.py for what it measures.
#
#   bash benchmarks/gpu_check.sh prepare            # on a networked machine: fills .whl/ and .gpu_assets/
#   bash benchmarks/gpu_check.sh [OUTDIR] [ARGS]    # on the GPU machine (OUTDIR defaults to $OUT)
#   bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR # tiny model on CPU, same code paths (~5-8 min on 2 cores)
#   bash benchmarks/gpu_check.sh --cpu-smoke OUTDIR --parts b   # part (b) alone: ours, TRL default and TRL
#                                                   # fastest on the tiny model, LoRA (~1 min; needs trl)
#
# `prepare` (needs the trainer stack installed here: trainer_image/install.sh) writes, into folders that
# .git/info/exclude ignores and the device tool carries:
#   .whl/         wheels the GPU image lacks (Python 3.12, x86-64): deepspeed (built here, pure Python, ops
#                 JIT-compiled there on demand), bitsandbytes (repacked with only its CUDA 13 and CPU
#                 libraries: 43 MB -> ~4 MB), pydantic (+core), trl, datasets and their small dependencies,
#                 liger-kernel (Triton kernels: TRL fastest uses them when importable);
#   .gpu_assets/  SmolLM2's tokenizer (vocab 49,152; the model itself is randomly initialised there) and a
#                 snapshot of operator/ + trainer_image/ at HEAD (src/, with COMMIT), so edits made in the
#                 working tree while the device runs do not change what is measured.
# Then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl", ".gpu_assets"],
#                                  timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

wheels() {
  local plat=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
              --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64 -d .whl)
  "$PY" -m pip download -q "${plat[@]}" "pydantic==2.14.4" "pydantic-core==2.50.5" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "typing-extensions>=4.16" "hjson==3.1.0" "trl==1.16.0" "datasets==4.8.5" \
    "dill==0.4.1" "multiprocess==0.70.19" "peft==0.21.2" "liger-kernel==0.8.5"
  local tmp; tmp=$(mktemp -d)
  "$PY" -m pip download -q "${plat[@]}" "bitsandbytes==0.50.2"
  mv .whl/bitsandbytes-*.whl "$tmp"/
  "$PY" benchmarks/gpu_check_setup.py repack-bnb "$tmp"/bitsandbytes-*.whl .whl
  local ds; ds=$("$PY" -c 'from importlib.metadata import version; print(version("deepspeed"))')
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl "deepspeed==$ds"
  rm -rf "$tmp"
}

if [[ "${1:-}" == "prepare" ]]; then
  for d in /.whl/ /.gpu_assets/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
  rm -rf .whl .gpu_assets && mkdir -p .whl .gpu_assets/src
  wheels
  PYTHONPATH="operator:trainer_image" "$PY" benchmarks/gpu_check_setup.py export-tokenizer .gpu_assets/tokenizer
  git archive HEAD operator trainer_image | tar -x -C .gpu_assets/src
  echo "$(git rev-parse --short HEAD) ($(git log -1 --format=%cd --date=iso-strict HEAD))" > .gpu_assets/src/COMMIT
  ls -la .whl && du -sh .whl .gpu_assets
  exit 0
fi

ARGS=()
if [[ "${1:-}" == "--cpu-smoke" ]]; then ARGS+=(--cpu-smoke); shift; fi
OUTDIR="${1:-${OUT:-}}"
[[ -n "$OUTDIR" ]] || { echo "usage: $0 [--cpu-smoke] OUTDIR (or set \$OUT)" >&2; exit 2; }
shift || true
mkdir -p "$OUTDIR"

if [[ -d .whl ]] && ls .whl/*.whl >/dev/null 2>&1 && [[ ${#ARGS[@]} -eq 0 ]]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -d .gpu_assets/src ]]; then
  ARGS+=(--src .gpu_assets/src --source-note "snapshot of commit $(cat .gpu_assets/src/COMMIT)")
else
  ARGS+=(--source-note "working tree at $(git rev-parse --short HEAD 2>/dev/null || echo '?') (uncommitted edits included)")
fi
nvidia-smi 2>&1 | head -15 || true
set -o pipefail
"$PY" benchmarks/gpu_check.py --out "$OUTDIR" "${ARGS[@]}" "$@" 2>&1 | tee -a "$OUTDIR/console.log"
