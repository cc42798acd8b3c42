"""Batch-1 speed of two versions of the code, alternated ABBA prompt by prompt (issue 26's must-show).

    python scripts/abba_batch1.py --old /work/old --new . --prompts 20 --rounds 12 --workers 3 \
        --out results/batch/abba_batch1.json

Each of --old / --new is a checkout with its own `.venv` (`pip install -e .`). The script starts
--workers long-lived worker processes per checkout (a process's own speed varies by several percent on
this VM, from where its memory lands; several processes per side average that out). Each worker builds, through its checkout's own registry, every
decoder of the embedded suite as `tidar-bench run` builds it (compiled, fp32, one thread): `ar` (base),
`tidar(max_blocks=3)` (TiDAR checkpoint), `eagle` (base + shipped EAGLE-3 head), `dflash` (base + shipped
drafter), `bd` (block-diffusion checkpoint), and warms each up on the longest prompt (compilation,
caches). Then, for each decoder and each of the first N mini_gsm prompts, the two workers decode that
prompt greedily at batch 1 (stop at EOS, at most --max-new-tokens) in the order A B B A, --rounds / 4
times over (A = old, B = new; group g of a prompt uses the g-th worker of each side, round robin; only
one worker runs at a time, the others wait on their pipes). So the old
and new timings of a prompt are seconds apart: a load change on this shared machine hits both sides
of a pair, which separate processes run minutes apart (the first version of this script) could not
promise. Tokens/s = new tokens / decode wall time, compilation excluded, as every decoder reports it.

Paired figure per decoder: per prompt and per ABBA group, (tokens of the two new runs / their time) /
(tokens of the two old runs / their time); printed as the median with its spread (quartiles, min-max)
over prompts x groups, plus the ratio of total tokens / total time. Also checks that the two versions
emitted the same tokens on every run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = r'''
import json, sys, time
import torch
torch.set_num_threads(1)
from tidar_bench.registry import DecoderContext, build_decoder, eos_token_ids, load_tokenizer
from tidar_bench.decoding import GenerationConfig
from tidar_bench.harness.suite import EMBEDDED_DIR as E
n, max_new, only = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
rows = [json.loads(l) for l in open("tasks/data/mini/gsm.jsonl")][:n]
SETTINGS = [("ar", "base", None, {}), ("tidar", "tidar", None, {"max_blocks": "3"}),
            ("eagle", "base", "eagle", {}), ("dflash", "base", None, {"draft": str(E / "dflash")}),
            ("bd", "bd", None, {})]
decs = {}
for name, ckpt, draft, opts in [s for s in SETTINGS if s[0] in only]:
    ctx = DecoderContext(E / ckpt, device="cpu", dtype="float32", draft_path=(E / draft) if draft else None)
    tok = load_tokenizer(E / ckpt)
    dec = build_decoder(name, ctx, {**opts, "compile": "on"})
    cfg = GenerationConfig(max_new_tokens=max_new, stop_token_ids=eos_token_ids(E / ckpt, tok))
    prompts = [tok.encode(r["prompt"]) for r in rows]
    t0 = time.perf_counter()
    for _ in range(2):
        dec.generate(max(prompts, key=len), cfg)
    decs[name] = (dec, cfg, prompts, time.perf_counter() - t0)
print(json.dumps({k: v[3] for k, v in decs.items()}), flush=True)
for line in sys.stdin:
    name, i = json.loads(line)
    dec, cfg, prompts, _ = decs[name]
    g = dec.generate(prompts[i], cfg)
    print(json.dumps({"new_tokens": g.stats.new_tokens, "wall_time_s": g.stats.wall_time_s, "tokens": g.tokens}),
          flush=True)
'''

DECODERS = ["ar", "tidar", "eagle", "dflash", "bd"]


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
    ap.add_argument("--rounds", type=int, default=8, help="runs of each prompt per version and decoder x 2, "
                    "a multiple of 4: ABBA, ABBA ABBA, ...")
    ap.add_argument("--workers", type=int, default=3, help="worker processes per version")
    ap.add_argument("--decoders", default=",".join(DECODERS), help="comma-separated subset of " + ",".join(DECODERS))
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    decoders = a.decoders.split(",")
    if not decoders or set(decoders) - set(DECODERS):
        sys.exit(f"error: --decoders takes a comma-separated subset of {','.join(DECODERS)}, got {a.decoders!r}")
    if a.rounds % 4 or a.rounds < 4:
        sys.exit("error: --rounds must be a positive multiple of 4 (ABBA)")
    trees = {"old": a.old.resolve(), "new": a.new.resolve()}
    for k, t in trees.items():
        if not (t / ".venv/bin/python").exists():
            sys.exit(f"error: --{k} {t} has no .venv/bin/python")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TIDAR_BENCH_COMPILE": "on"}
    workers, warmup = {}, {}
    for j in range(a.workers):
        for w in ("old", "new"):  # one at a time: warm-ups (compilation) do not overlap
            print(f"starting {w} worker {j + 1}/{a.workers} ({trees[w]}): build, compile and warm up every decoder",
                  file=sys.stderr, flush=True)
            workers[w, j] = subprocess.Popen([str(trees[w] / ".venv/bin/python"), "-c", WORKER, str(a.prompts),
                                              str(a.max_new_tokens), ",".join(decoders)], cwd=trees[w], env=env, stdin=subprocess.PIPE,
                                             stdout=subprocess.PIPE, text=True, bufsize=1)
            line = workers[w, j].stdout.readline()
            if not line:
                sys.exit(f"error: {w} worker {j + 1} failed (rc {workers[w, j].wait()})")
            warmup[f"{w}_{j + 1}"] = json.loads(line)

    def call(w: str, j: int, name: str, i: int) -> dict:
        workers[w, j].stdin.write(json.dumps([name, i]) + "\n")
        line = workers[w, j].stdout.readline()
        if not line:
            sys.exit(f"error: {w} worker {j + 1} failed (rc {workers[w, j].wait()})")
        return json.loads(line)

    order = ["old", "new", "new", "old"]
    load = [os.getloadavg()[0]]
    summary, per_prompt = {}, {}
    for name in decoders:
        ratios, tot, same, rows = [], {"old": [0, 0.0], "new": [0, 0.0]}, True, []
        for i in range(a.prompts):
            ref = None
            for g in range(a.rounds // 4):
                group = {"old": [0, 0.0], "new": [0, 0.0]}
                for w in order:
                    r = call(w, (i + g) % a.workers, name, i)
                    ref = r["tokens"] if ref is None else ref
                    same &= r["tokens"] == ref
                    for acc in (group[w], tot[w]):
                        acc[0] += r["new_tokens"]
                        acc[1] += r["wall_time_s"]
                tps = {w: group[w][0] / group[w][1] for w in group}
                ratios.append(tps["new"] / tps["old"])
                rows.append({"prompt": i, "old_tokens_per_s": tps["old"], "new_tokens_per_s": tps["new"]})
        load.append(os.getloadavg()[0])
        tps = {w: tot[w][0] / tot[w][1] for w in tot}
        summary[name] = {"old_tokens_per_s": tps["old"], "new_tokens_per_s": tps["new"],
                         "total_ratio": tps["new"] / tps["old"], "paired_ratio": quartiles(ratios),
                         "n_ratios": len(ratios), "same_tokens": same}
        per_prompt[name] = rows
        q = summary[name]["paired_ratio"]
        print(f"  {name:7s} old {tps['old']:7.1f}  new {tps['new']:7.1f} tok/s   total {tps['new'] / tps['old']:.3f}x   "
              f"per prompt median {q['median']:.3f}x [q1 {q['q1']:.3f}, q3 {q['q3']:.3f}; min {q['min']:.3f}, "
              f"max {q['max']:.3f}]   same tokens: {same}", file=sys.stderr, flush=True)
    for p in workers.values():
        p.stdin.close()
        p.wait()
    print(f"\nbatch-1 compiled decode tokens/s, new / old, {a.prompts} mini_gsm prompts x {a.rounds // 4} ABBA groups "
          f"per prompt, {a.workers} worker processes per version (load average {min(load):.1f}-{max(load):.1f}):")
    for name, s in summary.items():
        q = s["paired_ratio"]
        print(f"  {name:7s} old {s['old_tokens_per_s']:7.1f}  new {s['new_tokens_per_s']:7.1f} tok/s   total {s['total_ratio']:.3f}x   "
              f"per prompt median {q['median']:.3f}x [q1 {q['q1']:.3f}, q3 {q['q3']:.3f}; min {q['min']:.3f}, max {q['max']:.3f}]"
              f"   same tokens: {s['same_tokens']}")
    if a.out:
        sys.path.insert(0, str(trees["new"]))
        from tidar_bench.provenance import environment, write_atomic
        try:
            from tidar_bench.provenance import portable_command  # paths as outputs show them (no machine path)
        except ImportError:  # a --new tree from before portable paths
            portable_command = " ".join

        rec = {"command": "python " + portable_command(sys.argv), "old_commit": git_commit(trees["old"]),
               "new_commit": git_commit(trees["new"]), "order_per_prompt": order * (a.rounds // 4),
               "prompts": a.prompts, "max_new_tokens": a.max_new_tokens, "compile": "on", "dtype": "float32",
               "threads": 1, "workers_per_version": a.workers, "warmup_s": warmup, "load_average_after_each_decoder": load, "summary": summary,
               "per_prompt_groups": per_prompt, "environment": environment()}
        write_atomic(a.out, json.dumps(rec, indent=1) + "\n")
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
