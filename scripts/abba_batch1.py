"""Batch-1 speed of two versions of the code, alternated ABBA in one script (issue 26's must-show).

    python scripts/abba_batch1.py --old /work/old --new . --prompts 20 --rounds 4 \
        --out results/batch/abba_batch1.json

Each of --old / --new is a checkout with its own `.venv` (`pip install -e .`); the script runs one
worker process per round in the order A B B A (A = old, B = new; --rounds 8: ABBA ABBA). A worker
builds, through that checkout's own registry, every decoder of the embedded suite as `tidar-bench run`
builds it (compiled, fp32, one thread): `ar` (base), `tidar(max_blocks=3)` (TiDAR checkpoint), `eagle`
(base + shipped EAGLE-3 head), `dflash` (base + shipped drafter), `bd` (block-diffusion checkpoint);
warms each up on the longest prompt (compilation, caches), then decodes the first N mini_gsm prompts
greedily at batch 1 (stop at EOS, at most --max-new-tokens), recording each prompt's decode tokens/s
(new tokens / wall time, compilation excluded, as every decoder reports it) and its tokens.

Paired figure per decoder: for every (A, B) pair of adjacent rounds and every prompt, tokens/s(new) /
tokens/s(old); printed as the median with its spread (min-max and quartiles) over prompts x pairs, plus
the ratio of total tokens / total time. Also checks that the two versions emitted the same tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

WORKER = r'''
import json, sys, time
import torch
torch.set_num_threads(1)
from tidar_bench.registry import DecoderContext, build_decoder, eos_token_ids, load_tokenizer
from tidar_bench.decoding import GenerationConfig
from tidar_bench.harness.suite import EMBEDDED_DIR as E
n, max_new = int(sys.argv[1]), int(sys.argv[2])
rows = [json.loads(l) for l in open("tasks/data/mini/gsm.jsonl")][:n]
SETTINGS = [("ar", "base", None, {}), ("tidar", "tidar", None, {"max_blocks": "3"}),
            ("eagle", "base", "eagle", {}), ("dflash", "base", None, {"draft": str(E / "dflash")}),
            ("bd", "bd", None, {})]
out = {}
for name, ckpt, draft, opts in SETTINGS:
    ctx = DecoderContext(E / ckpt, device="cpu", dtype="float32", draft_path=(E / draft) if draft else None)
    tok = load_tokenizer(E / ckpt)
    dec = build_decoder(name, ctx, {**opts, "compile": "on"})
    cfg = GenerationConfig(max_new_tokens=max_new, stop_token_ids=eos_token_ids(E / ckpt, tok))
    prompts = [tok.encode(r["prompt"]) for r in rows]
    t0 = time.perf_counter()
    for _ in range(2):
        dec.generate(max(prompts, key=len), cfg)
    warm = time.perf_counter() - t0
    res = []
    for p in prompts:
        g = dec.generate(p, cfg)
        res.append({"tokens_per_s": g.stats.tokens_per_s, "new_tokens": g.stats.new_tokens,
                    "wall_time_s": g.stats.wall_time_s, "nfe": g.stats.nfe, "tokens": g.tokens})
    out[name] = {"warmup_s": warm, "prompts": res}
    print(f"  {name}: {sum(r['new_tokens'] for r in res) / sum(r['wall_time_s'] for r in res):.1f} tok/s "
          f"(warm-up {warm:.1f} s)", file=sys.stderr, flush=True)
print(json.dumps(out))
'''


def git_commit(tree: Path) -> str:
    return subprocess.run(["git", "-C", str(tree), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()


def quartiles(xs: list[float]) -> dict:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="checkout of the code before (with .venv)")
    ap.add_argument("--new", type=Path, default=Path("."), help="checkout of the code after (with .venv)")
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4, help="a multiple of 4: ABBA, ABBA ABBA, ...")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if a.rounds % 4:
        sys.exit("error: --rounds must be a multiple of 4 (ABBA)")
    trees = {"old": a.old.resolve(), "new": a.new.resolve()}
    for k, t in trees.items():
        if not (t / ".venv/bin/python").exists():
            sys.exit(f"error: --{k} {t} has no .venv/bin/python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIDAR_BENCH_COMPILE": "on"}
    order = ["old", "new", "new", "old"] * (a.rounds // 4)
    runs = []
    load = [os.getloadavg()[0]]
    for i, which in enumerate(order):
        print(f"round {i + 1}/{len(order)}: {which} ({trees[which]})", file=sys.stderr, flush=True)
        p = subprocess.run([str(trees[which] / ".venv/bin/python"), "-c", WORKER, str(a.prompts), str(a.max_new_tokens)],
                           cwd=trees[which], env=env, stdout=subprocess.PIPE, text=True)
        if p.returncode:
            sys.exit(f"error: the {which} worker failed (rc {p.returncode})")
        runs.append((which, json.loads(p.stdout.strip().splitlines()[-1])))
        load.append(os.getloadavg()[0])
    summary = {}
    for name in runs[0][1]:
        ratios, tot = [], {"old": [0, 0.0], "new": [0, 0.0]}
        same = True
        for j in range(0, len(runs), 2):  # pairs: (A, B), (B, A), ...
            (w1, r1), (w2, r2) = runs[j], runs[j + 1]
            old, new = (r1, r2) if w1 == "old" else (r2, r1)
            for po, pn in zip(old[name]["prompts"], new[name]["prompts"]):
                ratios.append(pn["tokens_per_s"] / po["tokens_per_s"])
                same &= po["tokens"] == pn["tokens"]
        for w, r in runs:
            tot[w][0] += sum(x["new_tokens"] for x in r[name]["prompts"])
            tot[w][1] += sum(x["wall_time_s"] for x in r[name]["prompts"])
        tps = {w: tot[w][0] / tot[w][1] for w in tot}
        summary[name] = {"old_tokens_per_s": tps["old"], "new_tokens_per_s": tps["new"],
                         "total_ratio": tps["new"] / tps["old"], "paired_ratio": quartiles(ratios),
                         "n_ratios": len(ratios), "same_tokens": same}
    print(f"\nbatch-1 compiled decode tokens/s, new / old, {a.prompts} mini_gsm prompts x {len(order) // 2} ABBA pairs "
          f"(load average {min(load):.1f}-{max(load):.1f}):")
    for name, s in summary.items():
        q = s["paired_ratio"]
        print(f"  {name:7s} old {s['old_tokens_per_s']:7.1f}  new {s['new_tokens_per_s']:7.1f} tok/s   total {s['total_ratio']:.3f}x   "
              f"per prompt median {q['median']:.3f}x [q1 {q['q1']:.3f}, q3 {q['q3']:.3f}; min {q['min']:.3f}, max {q['max']:.3f}]"
              f"   same tokens: {s['same_tokens']}")
    if a.out:
        sys.path.insert(0, str(trees["new"]))
        from tidar_bench.provenance import environment

        rec = {"command": "python " + " ".join(sys.argv), "old_commit": git_commit(trees["old"]),
               "new_commit": git_commit(trees["new"]), "order": order, "prompts": a.prompts,
               "max_new_tokens": a.max_new_tokens, "compile": "on", "dtype": "float32", "threads": 1,
               "load_average_between_rounds": load, "summary": summary,
               "runs": [{"version": w, **{n: {"warmup_s": r[n]["warmup_s"],
                                                "tokens_per_s": [x["tokens_per_s"] for x in r[n]["prompts"]]}
                                            for n in r}} for w, r in runs],
               "environment": environment()}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        tmp = a.out.with_suffix(".tmp")
        tmp.write_text(json.dumps(rec, indent=1) + "\n")
        tmp.replace(a.out)
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
