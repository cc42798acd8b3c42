#!/usr/bin/env bash
# Figures of compiled mode on this CPU (issue 14), each written with its command and environment:
#   bash scripts/compiled_results.sh
# 1. the baseline benchmark: compiled ar vs eager ar vs transformers (eager and compiled), paired on the
#    shipped base checkpoint and the first 20 mini_gsm prompts (stop at EOS);
# 2. every lossless decoder compiled against the compiled ar of its checkpoint, same prompts;
# 3. the latency curve of the compiled step on the embedded architecture (explains TiDAR's CPU gain).
# The embedded default itself (compiled everywhere) is re-measured by scripts/embedded_results.sh.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TB=${TB:-.venv/bin/tidar-bench}
EMB=tidar_bench/embedded
GSM=tasks/data/mini/gsm.jsonl
COMMON=(--prompts-file "$GSM" --prompts 20 --max-new-tokens 256 --device cpu --dtype float32)

$TB speed --model $EMB/base --decoders "ar,ar(compile=false),hf(compile=true),hf(compile=false)" "${COMMON[@]}" \
  --out results/speed/compiled_ar_vs_eager_and_hf_embedded_gsm20.json
$TB speed --model $EMB/base --draft $EMB/eagle --decoders "ar,eagle,eagle(tree=False,chain_length=4),ar(compile=false)" \
  "${COMMON[@]}" --out results/speed/compiled_eagle_embedded_gsm20.json
$TB speed --model $EMB/tidar --decoders "ar,tidar(max_blocks=3),tidar,tidar(max_blocks=3,compile=false),ar(compile=false)" \
  "${COMMON[@]}" --out results/speed/compiled_tidar_embedded_gsm20.json
for mode in on off; do
  out=results/latency/cpu/embedded-$([ $mode = on ] && echo compiled || echo eager)
  $TB profile-latency --model $EMB/tidar --context 256 --slots 1,2,4,8,16,32,72 --mask tidar --block-size 8 \
    --repeats 20 --device cpu --compile $mode --out "$out"
done
