"""Batch-1 `hf` before and after it became the B = 1 case of `generate_batch` (issue 26): the old
baselines/hf.py (from git, BEFORE below) and the current one decode the same prompts in one process,
alternating ABBA per round; prints and writes per-round tokens/s ratios (after / before) and checks the
tokens are identical.

    python scripts/hf_batch1_before_after.py --compile off --rounds 4 --out results/speed/hf_batch1_before_after_eager.json
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "9b3b744"  # the last commit with the batch-1-only hf.py


def old_decoder_class():
    src = subprocess.run(["git", "show", f"{BEFORE}:baselines/hf.py"], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.replace("@register_decoder(", "@(lambda *a, **k: lambda f: f)(")  # not registered twice
    mod = types.ModuleType("hf_before")
    exec(compile(src, "hf_before.py", "exec"), mod.__dict__)
    return mod.HFDecoder


def main() -> None:
    from tidar_bench.baselines.hf import HFDecoder
    from tidar_bench.speed import read_prompts
    from tidar_bench.decoding import GenerationConfig
    from tidar_bench.harness.results import write_json
    from tidar_bench.provenance import environment, portable_command, portable_path
    from tidar_bench.registry import DecoderContext

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(ROOT / "tidar_bench/embedded/base"))
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--compile", default="off")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    ctx = DecoderContext(Path(a.model), "cpu", "float32")
    tok = ctx.tokenizer
    prompts = [tok.encode(t) for t in read_prompts(ROOT / "tasks/data/mini/gsm.jsonl", a.prompts)]
    cfg = GenerationConfig(max_new_tokens=a.max_new_tokens, stop_token_ids=ctx.stop_token_ids)
    decs = {"before": old_decoder_class()(a.model, "cpu", "float32", tok, compile=a.compile),
            "after": HFDecoder(a.model, "cpu", "float32", tok, compile=a.compile)}
    for d in decs.values():
        d.generate(max(prompts, key=len), cfg)  # warm-up (compilation)
    tps = {n: [] for n in decs}
    tokens = {}
    for r in range(a.rounds):
        for n in (list(decs) if r % 2 == 0 else list(decs)[::-1]):  # ABBA
            t0 = time.perf_counter()
            gens = [decs[n].generate(p, cfg) for p in prompts]
            dt = time.perf_counter() - t0
            tokens.setdefault(n, [g.tokens for g in gens])
            tps[n].append(sum(len(g.tokens) for g in gens) / dt)
            print(f"round {r} {n}: {tps[n][-1]:.1f} tok/s", flush=True)
    ratios = [x / y for x, y in zip(tps["after"], tps["before"])]
    rec = {"command": portable_command(["python", "scripts/hf_batch1_before_after.py", *sys.argv[1:]]),
           "environment": environment(), "before_commit": BEFORE, "model": portable_path(a.model), "prompts": a.prompts,
           "max_new_tokens": a.max_new_tokens, "compile": a.compile, "threads": torch.get_num_threads(),
           "tokens_per_s": tps, "ratios_after_over_before": ratios, "median_ratio": statistics.median(ratios),
           "identical_tokens": tokens["before"] == tokens["after"],
           "note": "shared 2-core machine (other engineers' jobs and a low-priority training job running)"}
    print(f"after/before: median {rec['median_ratio']:.3f} [{min(ratios):.3f}-{max(ratios):.3f}] "
          f"over {a.rounds} paired rounds; identical tokens: {rec['identical_tokens']}")
    if a.out:
        write_json(a.out, rec)


if __name__ == "__main__":
    main()
