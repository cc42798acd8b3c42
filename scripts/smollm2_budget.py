#!/usr/bin/env python
"""The time budget of scripts/smollm2_pipeline.sh from its --smoke run: per training recipe, the CPU
seconds per training token, and the full run's estimate at that cost (1 thread; 2 threads should be
faster). On a shared machine wall time says more about the other users than about the recipe, so the
cost is (wall seconds per token of the recipe's train_log) x (CPU share of its stage: cpu_s / wall_s).

    python scripts/smollm2_budget.py [results/smollm2/smoke]
"""

import json
import re
import sys
from pathlib import Path

smoke = Path(sys.argv[1] if len(sys.argv) > 1 else "results/smollm2/smoke")
script = (Path(__file__).parent / "smollm2_pipeline.sh").read_text()
full = script.split("if [ $MODE = full ]; then", 1)[1].split("else", 1)[0]
var = dict(re.findall(r"(\w+)=(\d+)", full))
stages = {}
for line in (smoke / "stages.jsonl").read_text().splitlines():
    r = json.loads(line)
    if r["rc"] == 0:
        stages[r["stage"]] = r  # the last successful run of each stage
print("| recipe | smoke: tokens/s (wall, last step) | stage CPU share | CPU ms per token | full run: tokens | estimate (1 thread) |")
print("|---|---|---|---|---|---|")
for stage, steps, batch in (("eagle", "E_STEPS", "E_BATCH"), ("dflash", "D_STEPS", "D_BATCH"),
                            ("tidar", "T_STEPS", "T_BATCH"), ("bd", "B_STEPS", "B_BATCH")):
    log = smoke / "training" / stage / "train_log.jsonl"
    if stage not in stages or not log.is_file():
        continue
    tps = [json.loads(x) for x in log.read_text().splitlines()][-1]["tokens_per_s"]
    share = stages[stage]["cpu_s"] / stages[stage]["wall_s"]
    ms = 1000 * share / tps
    tokens = int(var[steps]) * int(var[batch]) * int(var["SEQ"])
    print(f"| {stage} | {tps:.1f} | {share:.2f} | {ms:.0f} | {tokens:,} | {tokens * ms / 60000:.0f} min |")
