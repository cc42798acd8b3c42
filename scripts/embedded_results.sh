#!/usr/bin/env bash
# Every figure in results/embedded/ comes from this script (run from the repository root, CPU):
#   bash scripts/embedded_results.sh
# 1. the embedded default over all three mini tasks (code executed in the sandbox: opt-in given here),
#    and TiDAR with all pre-draft blocks (the default caps them on CPU: tidar_bench/harness/suite.py);
# 2. block diffusion at several confidence thresholds tau (quality vs T/NFE);
# 3. EAGLE chain vs tree drafting on the base;
# 4. the Pareto figures and report over all of them; 5. the CI baseline (subset that .ci/run runs).
set -euo pipefail
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
TB=${TB:-.venv/bin/tidar-bench}
OUT=results/embedded
WORK=$(mktemp -d)
EMB=tidar_bench/embedded

$TB run --allow-code-exec --out "$WORK/default"
# TiDAR with the paper's full pre-draft layout (one block per outcome) next to the suite's capped default
$TB run --model $EMB/tidar --decoders ar,tidar --tasks mini_gsm,mini_math --decoder-arg tidar.max_blocks=8 \
  --out "$WORK/tidar_all_blocks"
for tau in 0.5 0.7 0.9 0.99; do
  $TB run --model $EMB/bd --decoders bd --tasks mini_gsm,mini_math --decoder-arg threshold=$tau --out "$WORK/bd_tau$tau"
done
$TB run --model $EMB/base --draft $EMB/eagle --decoders ar,eagle --tasks mini_gsm,mini_math \
  --decoder-arg eagle.tree=False --decoder-arg eagle.chain_length=4 --out "$WORK/eagle_chain"

# keep the tables and provenance (not the per-sample caches) beside the figures
for d in "$WORK"/*/; do
  name=$(basename "$d"); mkdir -p "$OUT/runs/$name"
  cp "$d"/summary.csv "$OUT/runs/$name/"
  for f in suite.json run.json; do [ -f "$d/$f" ] && cp "$d/$f" "$OUT/runs/$name/"; done
  for sub in base tidar bd; do
    if [ -f "$d/$sub/run.json" ]; then mkdir -p "$OUT/runs/$name/$sub"; cp "$d/$sub"/{run.json,summary.csv} "$OUT/runs/$name/$sub/"; fi
  done
done

# 4. figures from the stored tables (redraw alone: these two lines): the compiled default on its own (the
#    the figure in docs/results.md), and every eager setting (TiDAR all blocks, bd thresholds, EAGLE chain) together
#    (the compiled default is re-measured with `tidar-bench run --out results/embedded/runs/default_compiled`)
$TB plot results/embedded/runs/default_compiled results/latency/cpu/cpu-5m --out "$OUT/figures"
E=results/embedded/runs
$TB plot $E/default $E/tidar_all_blocks $E/bd_tau0.5 $E/bd_tau0.7 $E/bd_tau0.9 $E/bd_tau0.99 $E/eagle_chain \
  --together --out "$OUT/figures/eager_settings"

# CI gate baseline: the same subset .ci/run decodes
$TB run --tasks mini_gsm,mini_math --limit 20 --out "$WORK/ci"
$TB check "$WORK/ci" --baseline "$OUT/ci_baseline.json" --update-baseline
rm -rf "$WORK"
