"""TiDAR block-size sweep on a tiny model trained here, on CPU: T/NFE and tokens/s vs AR per k.

Steps (all seeded, all offline):
1. a synthetic corpus (tidar_bench.corpus) with train / held-out splits, and a BPE tokenizer on it;
2. one random-init Llama-shaped base checkpoint;
3. for each k: `tidar-bench train tidar --base BASE --block-size k` for the same number of steps
   (the dual-mode loss trains the AR mode and the diffusion mode together);
4. on the held-out prompts, greedy `ar` and `tidar` decoding of each checkpoint, paired per prompt:
   TiDAR's tokens must equal AR's (lossless), and T/NFE and the tokens/s ratio are reported.

Usage: python scripts/tidar_k_sweep.py --out results/tidar_k_sweep [--ks 1,2,4,8] [--steps 300]
Writes OUT/sweep.csv, OUT/sweep.json (with machine, versions, seed, commands) and prints the table.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tidar_bench.corpus import make_splits, train_tokenizer, write_jsonl  # noqa: E402
from tidar_bench.decoding import GenerationConfig  # noqa: E402
from tidar_bench.model import ModelConfig, Transformer, init_weights, save_model  # noqa: E402
from tidar_bench.registry import DecoderContext, build_decoder  # noqa: E402


def base_checkpoint(out: Path, vocab: int, seed: int) -> None:
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": vocab, "hidden_size": 192,
           "intermediate_size": 512, "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4,
           "max_position_embeddings": 1024, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
           "tie_word_embeddings": True, "torch_dtype": "float32"}
    save_model(init_weights(Transformer(ModelConfig.from_dict(cfg)), seed=seed), out)


def run(cmd: list[str]) -> None:
    print("$", " ".join(shlex.quote(c) for c in cmd), flush=True)
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ks", default="1,2,4,8")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--n-train", type=int, default=6000)
    ap.add_argument("--n-eval", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ks = [int(k) for k in args.ks.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="tidar_sweep_"))
    train, held = make_splits(args.n_train, args.n_eval, seed=args.seed)
    write_jsonl(train, work / "train.jsonl")
    tok = train_tokenizer([it["text"] for it in train], 512, work / "base")
    base_checkpoint(work / "base", len(tok), args.seed)
    t_train = {}
    for k in ks:
        t0 = time.perf_counter()
        run([sys.executable, "-m", "tidar_bench.cli", "train", "tidar", "--base", str(work / "base"),
             "--data", str(work / "train.jsonl"), "--out", str(work / f"tidar_k{k}"), "--block-size", str(k),
             "--steps", str(args.steps), "--seq-len", "128", "--batch-size", "16", "--lr", "2e-3",
             "--seed", str(args.seed), "--device", "cpu"])
        t_train[k] = time.perf_counter() - t0
        # keep the loss curve and log beside the results
        for f in ("train_log.jsonl", "loss.png"):
            if (work / f"tidar_k{k}" / f).exists():
                (args.out / f"k{k}_{f}").write_bytes((work / f"tidar_k{k}" / f).read_bytes())
    rows = []
    for k in ks:
        ctx = DecoderContext(work / f"tidar_k{k}", "cpu", "float32")
        ar, td = build_decoder("ar", ctx), build_decoder("tidar", ctx)
        eos = ctx.tokenizer.eos_token_id
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, stop_token_ids=(eos,))
        prompts = [ctx.tokenizer.encode(it["prompt"]) for it in held]
        ar.generate(prompts[0], cfg), td.generate(prompts[0], cfg)  # warm-up
        tot = {"ar": [0, 0.0, 0], "tidar": [0, 0.0, 0]}
        mismatches, acc = 0, []
        for p in prompts:
            a, t = ar.generate(p, cfg), td.generate(p, cfg)
            mismatches += a.tokens != t.tokens
            for name, g in (("ar", a), ("tidar", t)):
                tot[name][0] += g.stats.new_tokens
                tot[name][1] += g.stats.wall_time_s
                tot[name][2] += g.stats.nfe
            acc.extend(t.stats.accepted_lengths)
        ar_tps = tot["ar"][0] / tot["ar"][1]
        td_tps = tot["tidar"][0] / tot["tidar"][1]
        rows.append({"k": k, "tidar_T_per_NFE": tot["tidar"][0] / tot["tidar"][2],
                     "mean_accepted_length": sum(acc) / max(1, len(acc)),
                     "ar_tokens_per_s": ar_tps, "tidar_tokens_per_s": td_tps, "speedup_vs_ar": td_tps / ar_tps,
                     "greedy_mismatches_vs_ar": mismatches, "prompts": len(prompts), "train_steps": args.steps,
                     "train_seconds": t_train[k]})
    with (args.out / "sweep.csv.tmp").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (args.out / "sweep.csv.tmp").replace(args.out / "sweep.csv")
    meta = {"command": " ".join(shlex.quote(a) for a in sys.argv), "rows": rows, "seed": args.seed,
            "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "torch_threads": torch.get_num_threads()},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": __import__("transformers").__version__},
            "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())}
    (args.out / "sweep.json.tmp").write_text(json.dumps(meta, indent=2))
    (args.out / "sweep.json.tmp").replace(args.out / "sweep.json")
    print(f"{'k':>3} {'T/NFE':>6} {'mean acc':>8} {'ar tok/s':>9} {'tidar tok/s':>11} {'speedup':>8} {'mismatch':>8}")
    for r in rows:
        print(f"{r['k']:>3} {r['tidar_T_per_NFE']:>6.2f} {r['mean_accepted_length']:>8.2f} {r['ar_tokens_per_s']:>9.1f} "
              f"{r['tidar_tokens_per_s']:>11.1f} {r['speedup_vs_ar']:>7.2f}x {r['greedy_mismatches_vs_ar']:>8}")


if __name__ == "__main__":
    main()
