#!/usr/bin/env bash
# The released TiDAR checkpoints (Hugging Face org TiDAR-LM) on a GPU machine with hub access, one command
# (docs/checkpoints.md, "Released TiDAR checkpoints"); budget: 15 minutes on one H100 (unmeasured here: no GPU with hub
# access was available; each section prints its wall time in log.txt):
#   1. download TiDAR-LM/TiDAR-1.7b-<VARIANT> and Qwen/Qwen3-1.7B; where mask id / block size come from and the
#      convention check (prefill block offset-0 argmax vs AR argmax) -> tidar_options.json
#   2. speed on the authors' workload (lm-eval few-shot contexts, 512 tokens, EOS ignored, batch 1): compiled ar,
#      exact tidar, tidar(rule=authors), tidar(rule=authors-greedy), paired per prompt -> speed_authors_workload.json;
#      Qwen3-1.7B's own compiled ar on the same prompts -> speed_qwen3_ar.json
#   3. run --limit with scores on humaneval, mbpp, gsm8k_cot, minerva_math -> run/ (summary.csv, run.json)
# into results/gpu/<gpu>/tidar-lm/, commands in commands.txt, environment in environment.txt.
#
#   bash scripts/tidar_lm_check.sh [VARIANT]            # default sft-0.5M-3e-5-20K
#   REPLICA=1 OUT=DIR bash scripts/tidar_lm_check.sh    # CPU replica: a tiny random checkpoint in the exact TiDAR-LM
#                                                       # layout (vocab 151936, TiDARForCausalLM, no side file), built
#                                                       # now, with a stand-in tokenizer; tests/test_tidar_authors.py
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
TB="$PY -m tidar_bench.cli"
VARIANT=${1:-sft-0.5M-3e-5-20K}
DECODERS="ar,tidar,tidar(rule=authors),tidar(rule=authors-greedy)"
if [ "${REPLICA:-0}" = 1 ]; then
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
  OUT=${OUT:?REPLICA=1 needs OUT=DIR}
  MODEL="$OUT/TiDAR-replica"
  $PY -c "import sys; from tidar_bench.testing import make_tidar_lm_replica as m; m(sys.argv[1], tied=False, tokenizer_from='tidar_bench/embedded/tidar')" "$MODEL"
  BASE=""; DEV=cpu; NEW=6; LIMIT=1; TASKS=gsm8k_cot
  EXTRA=(--compile off --decoder-arg tidar.block_size=2)
  # building the whole workload (every document's few-shot context, to shuffle them) takes minutes on a
  # loaded CPU: the replica decodes 4 mini_gsm prompts the same way (EOS ignored); tests cover --workload
  PROMPTS=(--prompts-file tasks/data/mini/gsm.jsonl --prompts 4 --ignore-eos)
else
  MODEL=TiDAR-LM/TiDAR-1.7b-$VARIANT; BASE=Qwen/Qwen3-1.7B; DEV=cuda
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -c 'A-Za-z0-9\n' '_')
  OUT=${OUT:-results/gpu/$GPU/tidar-lm}
  NEW=512; LIMIT=${LIMIT:-10}; TASKS=humaneval,mbpp,gsm8k_cot,minerva_math
  EXTRA=()
  PROMPTS=(--workload authors --prompts "${PER_TASK:-8}")  # 8 per task: 32 requests x 512 tokens per decoder
fi
mkdir -p "$OUT"
: > "$OUT/commands.txt"; : > "$OUT/log.txt"
{ date -u; uname -a; nvidia-smi 2>/dev/null || echo "no nvidia-smi"; $PY -m pip freeze 2>/dev/null | grep -iE "^(torch|transformers|lm.eval|tidar)" || true; git rev-parse HEAD 2>/dev/null || true; } > "$OUT/environment.txt"
step() {  # step NAME CMD...: run, log the command and its wall time
  local name=$1; shift
  echo "$*" >> "$OUT/commands.txt"
  local t0=$SECONDS
  "$@" >> "$OUT/log.txt" 2>&1
  echo "$name: $((SECONDS - t0)) s" | tee -a "$OUT/log.txt"
}
# 1. download (hub ids resolve to the local HF cache), preset, convention check
step convention $PY -c "
import json, sys
from tidar_bench.registry import DecoderContext, build_decoder, resolve_model
ctx = DecoderContext(resolve_model(sys.argv[1]), device=sys.argv[2])
o = build_decoder('tidar', ctx, {'compile': 'off'}).options()
json.dump({'model': sys.argv[1], **o}, open(sys.argv[3], 'w'), indent=2)
print(o['config_source'], o['convention_check'])" "$MODEL" "$DEV" "$OUT/tidar_options.json"
[ -n "$BASE" ] && step download_base $PY -c "import sys; from tidar_bench.registry import resolve_model; resolve_model(sys.argv[1])" "$BASE"
# 2. the authors' workload, paired per prompt
step speed $TB speed --model "$MODEL" --decoders "$DECODERS" "${PROMPTS[@]}" \
  --max-new-tokens "$NEW" --device "$DEV" "${EXTRA[@]}" --out "$OUT/speed_authors_workload.json"
[ -n "$BASE" ] && step speed_qwen3 $TB speed --model "$BASE" --decoders ar "${PROMPTS[@]}" \
  --max-new-tokens "$NEW" --device "$DEV" --out "$OUT/speed_qwen3_ar.json"
# 3. scores
step run $TB run --model "$MODEL" --decoders "$DECODERS" --tasks "$TASKS" --limit "$LIMIT" --allow-code-exec \
  --device "$DEV" "${EXTRA[@]}" --out "$OUT/run"
echo "done: $OUT" | tee -a "$OUT/log.txt"
