#!/usr/bin/env bash
# Every number and figure in results/batch/ comes from this script (repository root, CPU):
#   bash scripts/batch_results.sh
# 1. batched throughput of every decoder vs its checkpoint's batched ar at B = 1, 2, 4, 8 (paired,
#    same process, ABBA rounds), real mini_gsm prompts stopping at EOS, every decoder COMPILED (the
#    default: one graph per batch size and step shape; compile time is kept out of the timings):
#    tidar (and its own ar) on the TiDAR checkpoint, eagle (its default dynamic tree) and dflash (and
#    ar) on the base, bd (and its own ar) on the bd checkpoint, the transformers reference hf
#    (compiled and eager: padded generate per chunk of B) on the base, and compiled vs eager ar;
#    STAGES="speed latency plot" (default all) picks the parts;
# 2. forward latency (eager) vs tokens fed per sequence at B = 1, 2, 4, 8 on the same architecture, with the
#    predicted TiDAR speedup per batch size from the T/NFE measured in 1.;
# 3. the figures and report.md.
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TB=${TB:-.venv/bin/tidar-bench}
OUT=results/batch
EMB=tidar_bench/embedded
COMMON=(--prompts-file tasks/data/mini/gsm.jsonl --prompts "${PROMPTS:-8}" --max-new-tokens "${MAX_NEW:-48}"
        --batch-size 1,2,4,8 --rounds "${ROUNDS:-2}" --device cpu --threads 1)
mkdir -p "$OUT"
STAGES=${STAGES:-speed latency plot}
if [[ " $STAGES " == *" speed "* ]]; then
$TB speed --model $EMB/tidar --decoders "ar,tidar(max_blocks=3)" "${COMMON[@]}" --out "$OUT/speed_tidar.json"
$TB speed --model $EMB/base --draft $EMB/eagle --decoders "ar,eagle,dflash(draft=$EMB/dflash)" "${COMMON[@]}" \
  --out "$OUT/speed_eagle_dflash.json"
$TB speed --model $EMB/bd --decoders ar,bd "${COMMON[@]}" --out "$OUT/speed_bd.json"
$TB speed --model $EMB/base --decoders "ar,hf,hf(compile=false)" "${COMMON[@]}" --out "$OUT/speed_hf.json"
$TB speed --model $EMB/base --decoders "ar(compile=off),ar" "${COMMON[@]}" --out "$OUT/speed_ar_compiled_vs_eager.json"
fi
TNFE=$(.venv/bin/python -c "import json; c = json.load(open('$OUT/speed_tidar.json'))['batch']['1']; \
print('8=%.3f' % next(v['tokens_per_nfe'] for k, v in c.items() if k.startswith('tidar')))")
if [[ " $STAGES " == *" latency "* ]]; then
  # eager forwards: compiled, this 72-point sweep builds a graph per point (~20 s each on this CPU, 25 min)
  $TB profile-latency --model $EMB/tidar --context 64,256 --slots 1,2,4,...,64 --block-size 4,8 --batch 1,2,4,8 \
    --tnfe "$TNFE" --repeats 10 --device cpu --compile off --out "$OUT/latency"
fi
if [[ " $STAGES " == *" plot "* ]]; then
  $TB plot "$OUT"/speed_*.json "$OUT/latency" --out "$OUT/figures"
fi
