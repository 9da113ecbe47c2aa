#!/usr/bin/env bash
# One-shot check of the GPU deployment path (docs/gpu.md), for the first machine with an NVIDIA GPU:
#
#   scripts/gpu_check.sh              installs onnxruntime-gpu (in place of onnxruntime) and tensorrt
#                                     where the package registry serves them, then runs the check
#   scripts/gpu_check.sh --dry-run    installs nothing: every CPU-possible step (CI runs this)
#
# The check (scripts/gpu_check.py): builds the embedded default for both targets (or reuses them),
# runs the gpu-marked tests, parity per backend (ort-cpu, ort-cuda, tensorrt engines), prefill / decode
# ms per backend, and prints one summary table of what ran, what was skipped and why.
# Other options (--recipe R, --bench JSONL, --samples N, --out DIR) go to gpu_check.py.
set -uo pipefail
cd "$(dirname "$0")/.."

ORT_GPU="onnxruntime-gpu==1.31.1"   # pyproject's [gpu] extra
TRT="tensorrt==10.16.1.11"          # pyproject's [tensorrt] extra
DRY=0
ARGS=()
OUT=graphs
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; ARGS+=("$1") ;;
    --out) OUT="$2"; ARGS+=("$1" "$2"); shift ;;
    --recipe|--bench|--samples) ARGS+=("$1" "$2"); shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

mkdir -p "$OUT/gpu_check"
STEPS="$OUT/gpu_check/steps.jsonl"
: > "$STEPS"
step() {  # step NAME BACKEND STATUS DETAIL -> one JSON line for the summary table
  python3 -c 'import json, sys; print(json.dumps(dict(zip(["step", "backend", "status", "detail"], sys.argv[1:]),
              prefill_ms=None, decode_ms=None)))' "$@" >> "$STEPS"
  echo "[gpu_check] $1 $2: $3 - $4" >&2
}

install() {  # install BACKEND SPEC OK_NOTE FAIL_NOTE [PACKAGES TO UNINSTALL FIRST...]
  local backend="$1" spec="$2" ok="$3" fail="$4"
  shift 4
  if ! python3 -m pip install --quiet --dry-run "$spec" > /dev/null 2>&1; then
    step "install" "$backend" "skipped" "the package registry does not serve $spec"
    return
  fi
  if [ $# -gt 0 ]; then python3 -m pip uninstall --quiet -y "$@"; fi
  if python3 -m pip install --quiet "$spec"; then
    step "install" "$backend" "ran" "$spec$ok"
  else
    step "install" "$backend" "failed" "pip install $spec failed$fail"
  fi
}

if [ "$DRY" = 1 ]; then
  step "install" "-" "skipped" "dry run: nothing installed ($ORT_GPU, $TRT)"
elif ! nvidia-smi -L > /dev/null 2>&1; then
  step "install" "-" "skipped" "no NVIDIA GPU (nvidia-smi -L fails): nothing installed"
else
  GPU="$(nvidia-smi -L | head -1)"
  step "gpu" "-" "ran" "$GPU"
  # onnxruntime-gpu provides the same `onnxruntime` module as the CPU wheel: one or the other. Both
  # write site-packages/onnxruntime/: remove both, then install the GPU one alone.
  install ort-cuda "$ORT_GPU" " (replaces onnxruntime)" "; reinstall the CPU wheel: pip install onnxruntime==1.31.1" \
    onnxruntime onnxruntime-gpu
  install tensorrt "$TRT" "" ""
fi

exec python3 scripts/gpu_check.py --steps "$STEPS" ${ARGS[@]+"${ARGS[@]}"}
