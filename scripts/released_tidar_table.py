"""The table of results/released_tidar/README.md, from the run folder's summary.csv and run.json:
    python scripts/released_tidar_table.py results/released_tidar > results/released_tidar/table.md"""

import csv
import json
import statistics
import sys
from pathlib import Path

folder = Path(sys.argv[1])
run = json.loads((folder / "run.json").read_text())
rows = [r for r in csv.DictReader(open(folder / "summary.csv")) if r["filter"] == "strict-match"]
print(f"command: `{run['command']}`  ")
env = run["environment"]
print(f"machine: {env.get('platform', '')} {env.get('cpu', '')}; torch {env.get('torch')}, transformers "
      f"{env.get('transformers')}, lm-eval {env.get('lm_eval')}; git {env.get('git_commit', '')}; sampling seed "
      f"{run['seed']}; ar compiled: {rows[0]['ar_compiled']}\n")
print("| decoder | lossless | exact match (strict) ± se | tokens/s | vs compiled ar | T/NFE | τ (EAGLE) | "
      "accept length (authors) | outputs ≠ ar (of 114) |")
print("|---|---|---|---|---|---|---|---|---|")
for r in rows:
    d = r["decoder"]
    mism = r["mismatches_vs_ar"] or r["lossy_mismatches_vs_ar"] or "-"
    print(f"| `{d}` | {'yes' if run['decoders'][d]['lossless'] else 'no'} | {float(r['score']):.3f} ± "
          f"{float(r['stderr']):.3f} | {float(r['tokens_per_s']):.1f} | {float(r['speedup_vs_ar']):.2f}x | "
          f"{float(r['tokens_per_nfe']):.2f} | {float(r['mean_accepted_length']):.2f} | "
          f"{float(r['accept_length']):.2f} | {mism} |")
seeds = [r for r in rows if r["decoder"].startswith("tidar(rule=authors,seed=")]
if len(seeds) > 1:
    f = lambda k: [float(r[k]) for r in seeds]  # noqa: E731
    print(f"\n`tidar(rule=authors)` over {len(seeds)} seeds: exact match mean {statistics.fmean(f('score')):.3f} "
          f"(range {min(f('score')):.3f}-{max(f('score')):.3f}), outputs ≠ ar mean "
          f"{statistics.fmean(f('lossy_mismatches_vs_ar')):.1f} (range {min(f('lossy_mismatches_vs_ar')):.0f}-"
          f"{max(f('lossy_mismatches_vs_ar')):.0f}), T/NFE {min(f('tokens_per_nfe')):.2f}-{max(f('tokens_per_nfe')):.2f}, "
          f"speedup vs ar {min(f('speedup_vs_ar')):.2f}-{max(f('speedup_vs_ar')):.2f}x")
print(f"\nar's own tokens/s: {float(rows[0]['ar_tokens_per_s']):.1f} (compiled: {rows[0]['ar_compiled']}); "
      f"harness wall time {run['wall_s_this_invocation']:.0f} s")
