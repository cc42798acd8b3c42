#!/usr/bin/env bash
# Issue 22 "must show": the TiDAR authors' decoding rules against our exact rule on the shipped TiDAR
# checkpoint (k = 8), paired in ONE run on all 114 mini_gsm items, against compiled `ar`:
#   bash scripts/released_tidar_results.sh
# -> results/released_tidar/{summary.csv,run.json,uptime.txt} (+ speed.json: paired per-prompt tokens/s)
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TB=${TB:-.venv/bin/tidar-bench}
OUT=results/released_tidar
WORK=$(mktemp -d)
DECODERS="ar,tidar,tidar(rule=authors-greedy),tidar(rule=authors,seed=0),tidar(rule=authors,seed=1),tidar(rule=authors,seed=2)"
mkdir -p "$OUT"
{ date -u; echo "before run: $(uptime)"; } > "$OUT/uptime.txt"
$TB run --model tidar_bench/embedded/tidar --tasks mini_gsm --decoders "$DECODERS" --out "$WORK/run" | tee "$OUT/run_table.txt"
cp "$WORK/run/summary.csv" "$WORK/run/run.json" "$OUT/"
echo "after run: $(uptime)" >> "$OUT/uptime.txt"
# paired per-prompt tokens/s (same prompts, decoders back to back; stop at EOS, <= 256 tokens); SPEED_PROMPTS=0 skips
[ "${SPEED_PROMPTS:-40}" = 0 ] && exit 0
$TB speed --model tidar_bench/embedded/tidar --decoders "$DECODERS" --prompts-file tasks/data/mini/gsm.jsonl \
  --prompts ${SPEED_PROMPTS:-40} --max-new-tokens 256 --device cpu --out "$OUT/speed.json" | tee "$OUT/speed_table.txt"
echo "after speed: $(uptime)" >> "$OUT/uptime.txt"
