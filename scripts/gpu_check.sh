#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): one command for a lent H100/H200 that writes
# results/gpu/<gpu-name>/ with every command and the environment beside its figures:
#   1. GPU tests: bf16 parity with transformers, lossless decoders on CUDA (eager and compiled)
#   2. profile-latency, compiled: qwen2.5-1.5b and qwen3-8b shapes, context 512 and 4096, causal
#      and TiDAR step masks k = 4, 8, 16 (random weights)
#   3. speed: ar vs hf vs hf(compile=true) on qwen2.5-1.5b random weights, achieved weight bandwidth
#   4. profile-latency --batch 1,4,16,64 on qwen2.5-1.5b (issue 17); batched speed (speed --batch-size 1,4,16) of
#      ar vs tidar on the embedded TiDAR checkpoint and mini_gsm prompts
#   5. the embedded default on the GPU: paired speed of every decoder on the shipped models and
#      mini_gsm prompts (`tidar-bench run` itself needs lm-eval, which the device image lacks; run
#      it too when lm-eval is importable)
# Budget: under 8 minutes on one H100/H200 (each section prints its wall time in log.txt).
#
#   bash scripts/gpu_check.sh                       # on the GPU machine
#   bash scripts/gpu_check.sh --quick --device cpu --out DIR   # tiny shapes on CPU (tests/test_gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."

QUICK=0
DEVICE=cuda
OUT=""
while [ $# -gt 0 ]; do
  case "$1" in
    --quick) QUICK=1 ;;
    --device) DEVICE="$2"; shift ;;
    --out) OUT="$2"; shift ;;
    *) echo "usage: bash scripts/gpu_check.sh [--quick] [--device cuda|cpu] [--out DIR]" >&2; exit 2 ;;
  esac
  shift
done
PY=${PYTHON:-python3}

# The device image has torch and transformers but no internet and no lm-eval: install the project
# without dependencies when it is not importable yet (typer/rich come with the image or a wheel
# folder .gpu_wheels/ made by `pip download -d .gpu_wheels typer rich`).
if ! "$PY" -c "import tidar_bench.baselines.ar" 2>/dev/null; then
  "$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
fi
if ! "$PY" -c "import typer, rich, safetensors, tokenizers, matplotlib" 2>/dev/null; then
  if [ -d .gpu_wheels ]; then
    "$PY" -m pip install -q --no-index --find-links .gpu_wheels typer rich safetensors tokenizers matplotlib
  else
    echo "error: typer/rich/safetensors/tokenizers/matplotlib missing and no .gpu_wheels/ folder" >&2; exit 2
  fi
fi
if [ "$DEVICE" = cuda ] && ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "error: no CUDA device here; use --quick --device cpu for the CPU smoke run" >&2; exit 2
fi

NAME=$("$PY" -c "import torch; print(torch.cuda.get_device_name(0).replace(' ', '_') if '$DEVICE' == 'cuda' else 'cpu')")
OUT=${OUT:-results/gpu/$NAME}
mkdir -p "$OUT"
: > "$OUT/commands.txt"
: > "$OUT/log.txt"
TB=("$PY" -m tidar_bench.cli)

step() {  # step NAME CMD...: run, log the command and its wall time; a failing step does not stop the rest
  local name=$1; shift
  echo "$*" >> "$OUT/commands.txt"
  local t0=$SECONDS rc=0
  echo "== $name: $*" | tee -a "$OUT/log.txt"
  "$@" >> "$OUT/log.txt" 2>&1 || rc=$?
  echo "== $name: exit $rc, $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
  [ $rc -eq 0 ] || FAILED="$FAILED $name"
}
FAILED=""

"$PY" -c "import json, sys; from tidar_bench.provenance import environment; \
json.dump(environment(), open(sys.argv[1], 'w'), indent=2)" "$OUT/environment.json"

if [ $QUICK -eq 1 ]; then
  CONFIGS=(tiny); CONTEXTS=32; SLOTS=1,2,4; KS=2; REPEATS=2; SPEED_CFG=tiny
  SPEED=(--prompts 2 --prompt-len 8 --max-new-tokens 8); EMB=(--prompts 2 --max-new-tokens 8); BATCH=1,2
  COMPILE=off; SPEED_DECODERS="ar,hf(compile=false)"; SPEED_BATCH=1,2
else
  CONFIGS=(qwen2.5-1.5b qwen3-8b); CONTEXTS=512,4096; SLOTS=1,2,4,8,16,32,64,128,256; KS=4,8,16; REPEATS=20
  SPEED_CFG=qwen2.5-1.5b; SPEED=(--prompts 8 --prompt-len 128 --max-new-tokens 128)
  EMB=(--prompts 20 --max-new-tokens 256); BATCH=1,4,16,64
  COMPILE=on; SPEED_DECODERS="ar,hf(compile=false),hf(compile=true)"; SPEED_BATCH=1,4,16
fi

step gpu-tests "$PY" -m pytest tests/test_gpu.py -q -p no:cacheprovider -o addopts=""  # no pytest-xdist there
for cfg in "${CONFIGS[@]}"; do
  step "latency-$cfg" "${TB[@]}" profile-latency --config "$cfg" --context "$CONTEXTS" --slots "$SLOTS" \
    --mask tidar --block-size "$KS" --repeats "$REPEATS" --device "$DEVICE" --compile "$COMPILE" \
    --out "$OUT/latency/$cfg"
done
step "speed-$SPEED_CFG" "${TB[@]}" speed --config "$SPEED_CFG" --decoders "$SPEED_DECODERS" \
  "${SPEED[@]}" --device "$DEVICE" --compile "$COMPILE" --out "$OUT/speed_${SPEED_CFG}_ar_vs_hf.json"
step "latency-batch-${CONFIGS[0]}" "${TB[@]}" profile-latency --config "${CONFIGS[0]}" --context "${CONTEXTS%%,*}" \
  --slots "$SLOTS" --mask tidar --block-size "$KS" --batch "$BATCH" --repeats "$REPEATS" --device "$DEVICE" \
  --compile "$COMPILE" --out "$OUT/latency_batch/${CONFIGS[0]}"
EMBEDDED=tidar_bench/embedded
GSM=tasks/data/mini/gsm.jsonl
step embedded-base "${TB[@]}" speed --model "$EMBEDDED/base" --draft "$EMBEDDED/eagle" \
  --decoders "ar,ar(compile=false),hf,eagle" --prompts-file "$GSM" "${EMB[@]}" --device "$DEVICE" --dtype float32 \
  --compile "$COMPILE" --out "$OUT/embedded/base.json"
step embedded-tidar "${TB[@]}" speed --model "$EMBEDDED/tidar" --decoders "ar,tidar,tidar(max_blocks=3)" \
  --prompts-file "$GSM" "${EMB[@]}" --device "$DEVICE" --dtype float32 --compile "$COMPILE" --out "$OUT/embedded/tidar.json"
step embedded-batch "${TB[@]}" speed --model "$EMBEDDED/tidar" --decoders "ar,tidar(max_blocks=3),tidar" \
  --prompts-file "$GSM" "${EMB[@]}" --batch-size "${SPEED_BATCH}" --rounds 2 --device "$DEVICE" --dtype float32 \
  --out "$OUT/embedded/batch_tidar.json"
if [ $QUICK -eq 0 ] && "$PY" -c "import lm_eval" 2>/dev/null; then
  step embedded-run "${TB[@]}" run --device "$DEVICE" --compile "$COMPILE" --out "$OUT/embedded/run"
fi

if [ -n "$FAILED" ]; then
  echo "gpu_check: failed steps:$FAILED (see $OUT/log.txt)" >&2
  exit 1
fi
echo "gpu_check: all steps passed; results in $OUT"
