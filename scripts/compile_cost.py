#!/usr/bin/env python
"""What compiled `ar` costs and buys on a real model on CPU: cold compilation seconds and the paired
compiled / eager tokens/s ratio (docs/speed.md, "Compiled decoding"; issue 26).

    python scripts/compile_cost.py                 # SmolLM2-135M (scripts/smollm2.py), 8 prompts
    python scripts/compile_cost.py --model DIR --prompts 8 --target-len 760 --max-new-tokens 64

Cold: TORCHINDUCTOR_CACHE_DIR is a fresh temp folder (removed at the end), so every graph is built
from scratch, as on a first run; the figure is the sum of the decoder's first-call (compile) times
over the whole script, i.e. every graph these prompts need. Prompts: GSM8K few-shot text from the
shipped tasks/data/gsm8k (train questions + answers as shots, "Question: ...\\nAnswer: ...", then a test
question), raw text without a chat template, each with the number of shots (0-8) whose token count is
closest to --target-len. Every prompt decodes exactly --max-new-tokens greedy tokens (EOS ignored).
Paired: per prompt, compiled and eager `ar` one after the other, the order alternating (ABBA), after
one warm-up call of each; ratio = compiled tokens/s over eager on the same prompt; the compiled
tokens must equal the eager ones. compile=auto, so the CPU size rules of tidar_bench/compiled.py
decide how it compiles (recorded). The JSON goes to results/compile/ with command, machine, versions
and the load average before and after."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = Path(os.environ.get("TIDAR_BENCH_CACHE") or Path.home() / ".cache" / "tidar-bench") \
    / "smollm2" / "SmolLM2-135M-Instruct-Q4_1"


def tree_cpu_s() -> float:
    """CPU seconds (user + system) of this process and every live descendant, each with its reaped
    children (Linux /proc): inductor compiles in worker processes that run g++, so the process's own
    CPU time misses most of a compilation. On a shared machine the wall time of a compile says how
    busy the machine was; this says what the compile cost."""
    tick, total, todo = os.sysconf("SC_CLK_TCK"), 0, [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
            total += sum(int(x) for x in f[11:15])  # utime, stime, cutime, cstime
            todo += [int(c) for t in os.listdir(f"/proc/{pid}/task")
                     for c in open(f"/proc/{pid}/task/{t}/children").read().split()]
        except (OSError, IndexError):
            pass  # exited meanwhile
    return total / tick


def gsm8k_prompts(tokenizer, n: int, target: int) -> list[list[int]]:
    data = ROOT / "tasks" / "data" / "gsm8k"
    read = lambda f: [json.loads(line) for line in open(data / f, encoding="utf-8") if line.strip()]
    shots = "".join(f"Question: {r['question']}\nAnswer: {r['answer']}\n\n" for r in read("train.jsonl")[:8]).split("\n\n")
    out = []
    for r in read("test.jsonl")[:n]:
        cands = [tokenizer.encode("".join(s + "\n\n" for s in shots[:k]) + f"Question: {r['question']}\nAnswer:")
                 for k in range(9)]
        out.append(min(cands, key=lambda ids: abs(len(ids) - target)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--target-len", type=int, default=760)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "compile" / "smollm2_ar.json")
    a = ap.parse_args()
    if not (a.model / "config.json").is_file():
        sys.exit(f"error: no checkpoint at {a.model} (python scripts/smollm2.py makes SmolLM2's)")
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="inductor_cold_") as cold:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cold  # before torch is imported: nothing compiled yet
        os.environ.pop("TIDAR_BENCH_COMPILE", None)
        import torch

        sys.path.insert(0, str(ROOT))
        from tidar_bench.compiled import cpu_inductor_options, cpu_rule, kv_bucket, n_params
        from tidar_bench.decoding import GenerationConfig
        from tidar_bench.provenance import environment, portable_command, portable_path, write_atomic
        from tidar_bench.registry import DecoderContext, build_decoder, resolve_model

        ctx = DecoderContext(resolve_model(a.model), "cpu", "auto", None)
        comp = build_decoder("ar", ctx, {"compile": "auto"})
        eager = build_decoder("ar", ctx, {"compile": "off"})
        assert comp.options()["compile"], "compile=auto did not compile here"
        prompts = gsm8k_prompts(ctx.tokenizer, a.prompts, a.target_len)
        cfg = GenerationConfig(max_new_tokens=a.max_new_tokens)  # no stop: exactly max_new_tokens each
        compile_s, t0, c0 = 0.0, time.perf_counter(), tree_cpu_s()
        compile_s += comp.generate(prompts[0], cfg).stats.compile_s  # warm-up (compiles its graphs)
        first_call_s, first_call_cpu_s = time.perf_counter() - t0, tree_cpu_s() - c0
        t0, c0 = time.perf_counter(), tree_cpu_s()
        eager.generate(prompts[0], cfg)
        eager_call_s, eager_call_cpu_s = time.perf_counter() - t0, tree_cpu_s() - c0
        ratios, tps = [], {"compiled": [], "eager": []}
        dec_ratios, dec_tps, prefill = [], {"compiled": [], "eager": []}, {"compiled": [], "eager": []}
        for i, p in enumerate(prompts):
            order = [("compiled", comp), ("eager", eager)][:: 1 if i % 2 == 0 else -1]
            got = {}
            for label, d in order:
                g = d.generate(p, cfg)
                got[label] = g
                tps[label].append(g.stats.tokens_per_s)
                # the decode steps alone: the prompt's forward is eager in both modes (one dynamic-length
                # forward; compiled steps are fixed shapes), so it dilutes the end-to-end ratio
                st = g.stats
                prefill[label].append(st.prefill_time_s)
                dec_tps[label].append((st.new_tokens - 1) / (st.wall_time_s - st.prefill_time_s))
                if label == "compiled":
                    compile_s += g.stats.compile_s  # graphs of windows the warm-up did not reach
            if got["compiled"].tokens != got["eager"].tokens:
                sys.exit(f"error: prompt {i}: compiled ar's greedy tokens differ from eager ar's")
            ratios.append(tps["compiled"][-1] / tps["eager"][-1])
            dec_ratios.append(dec_tps["compiled"][-1] / dec_tps["eager"][-1])
        params = n_params(ctx.model)
        cache = ctx.model.new_cache(max(map(len, prompts)) + a.max_new_tokens + 2)
        rec = {
            "command": portable_command(["python", "scripts/compile_cost.py", *sys.argv[1:]]),
            "environment": environment(), "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "machine_note": "shared 2-core CPU (other engineers' jobs running)",
            "model": portable_path(a.model), "params": params, "dtype": str(ctx.model.dtype), "threads": torch.get_num_threads(),
            "cpu_rule": cpu_rule(params), "kv_bucket": kv_bucket(params * cache.k[0].element_size(), cache),
            "cpp_wrapper_env": os.environ.get("TIDAR_BENCH_CPP_WRAPPER"),
            "wrapper": "cpp-wrapper" if cpu_inductor_options(params)["cpp_wrapper"] else "python-wrapper",
            "prompts": f"{len(prompts)} GSM8K few-shot prompts (tasks/data/gsm8k), shots chosen for ~{a.target_len} tokens",
            "prompt_tokens": [len(p) for p in prompts], "max_new_tokens": a.max_new_tokens, "ignore_eos": True,
            "cold_compile_s": compile_s, "first_call_wall_s": first_call_s,
            "first_call_cpu_s": first_call_cpu_s, "eager_call_wall_s": eager_call_s, "eager_call_cpu_s": eager_call_cpu_s,
            "cpu_note": "cpu_s: user+system seconds of the process tree (compile workers and g++ included); the first "
                        "compiled call = compilation + one decode, the eager call of the same prompt = one decode",
            "compiled_tokens_per_s": tps["compiled"], "eager_tokens_per_s": tps["eager"],
            "compiled_tokens_per_s_mean": statistics.fmean(tps["compiled"]), "eager_tokens_per_s_mean": statistics.fmean(tps["eager"]),
            "paired_ratios": ratios, "ratio_median": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
            "prefill_s": prefill, "decode_steps_tokens_per_s": dec_tps,
            "decode_steps_note": "tokens after the first / (wall time - prefill time): the compiled steps alone",
            "decode_steps_paired_ratios": dec_ratios, "decode_steps_ratio_median": statistics.median(dec_ratios),
            "decode_steps_ratio_min": min(dec_ratios), "decode_steps_ratio_max": max(dec_ratios),
            "order": "ABBA (compiled first on even prompts), one warm-up call each", "mismatches": 0,
        }
    write_atomic(a.out, json.dumps(rec, indent=2) + "\n")
    print(f"cold compilation: {compile_s:.1f} s wall, first compiled call {first_call_cpu_s:.0f} CPU s "
          f"(the eager call of the same prompt: {eager_call_cpu_s:.0f} CPU s; {rec['wrapper']}, attention windows of {rec['kv_bucket']} slots); "
          f"compiled ar {rec['compiled_tokens_per_s_mean']:.1f} tok/s vs eager {rec['eager_tokens_per_s_mean']:.1f} tok/s, "
          f"paired ratio median {rec['ratio_median']:.3f}x [{rec['ratio_min']:.3f}-{rec['ratio_max']:.3f}] over "
          f"{len(prompts)} prompts of {min(rec['prompt_tokens'])}-{max(rec['prompt_tokens'])} tokens "
          f"(prefill {statistics.fmean(prefill['eager']):.1f} s eager, in both modes; the decode steps alone: "
          f"median {rec['decode_steps_ratio_median']:.3f}x [{rec['decode_steps_ratio_min']:.3f}-{rec['decode_steps_ratio_max']:.3f}]); "
          f"load average {load_before[0]:.2f} -> {rec['load_average_after'][0]:.2f}; wrote {a.out}")


if __name__ == "__main__":
    main()
