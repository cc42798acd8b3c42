"""Build the embedded model suite that `tidar-bench run` uses by default, on CPU, offline.

Steps (all seeded; every training step is a `tidar-bench train ...` command, logged in BUILD.json):
1. the synthetic corpus (tidar_bench/corpus.py): train split -> WORK/train.jsonl; the held-out
   split (no prompt shared with train) -> tasks/data/mini/{gsm,code,math}.jsonl, the mini tasks' data;
2. a byte-level BPE tokenizer with EOS, PAD and [MASK] trained on the train split;
3. a random-init Llama-shaped model (config below) -> `tidar-bench train ar` -> the AR base;
4. from the base: `train tidar` (block 8), `train block-diffusion` (block 8), `train eagle` (EAGLE-3
   head, own reduced vocabulary, training-time test), `train dflash` (DFlash drafter, block 8, 2 layers
   on target layers 1-3, warm-started from the base's last layers);
5. every checkpoint is stored with bf16 weights (the size budget) and loaded through the same
   code path as any user checkpoint; the bf16-rounded base is what the later recipes continue from,
   so the suite is consistent: ar / hf / eagle decode the shipped base, tidar its shipped checkpoint.

Usage: python scripts/build_embedded.py [--out tidar_bench/embedded] [--ar-steps N ...]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tidar_bench.corpus import make_splits, train_tokenizer, write_jsonl  # noqa: E402
from tidar_bench.model import ModelConfig, Transformer, init_weights, save_model  # noqa: E402
from tidar_bench.provenance import environment, portable_command  # noqa: E402

ARCH = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 192, "intermediate_size": 576,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16"}
SIDE_FILES = ("tidar_config.json", "bd_config.json")


def to_bf16(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder, storing its floating weights as bf16 (everything else as is)."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.name == "model.safetensors":
            sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
            save_file(sd, str(dst / f.name), metadata={"format": "pt"})
        elif f.is_file() and not f.name.endswith(".tmp"):
            shutil.copy2(f, dst / f.name)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["torch_dtype"] = "bfloat16"
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "tidar_bench" / "embedded")
    ap.add_argument("--tasks-data", type=Path, default=ROOT / "tasks" / "data" / "mini")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temp dir)")
    ap.add_argument("--n-train", type=int, default=30000)
    ap.add_argument("--n-heldout", type=int, default=300, help="held-out items in all (a third per family)")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--ar-steps", type=int, default=2000)
    ap.add_argument("--tidar-steps", type=int, default=600)
    ap.add_argument("--bd-steps", type=int, default=400)
    ap.add_argument("--eagle-steps", type=int, default=400)
    ap.add_argument("--dflash-steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reuse", action="store_true",
                    help="keep the checkpoints already in --work (and their BUILD.json entries from --out); "
                         "retrain only the missing ones")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="tidar_embedded_"))
    work.mkdir(parents=True, exist_ok=True)
    log: dict = {"script": portable_command(["python", "scripts/build_embedded.py", *sys.argv[1:]]),
                 "seed": args.seed, "arch": ARCH, "steps": [], "environment": environment()}

    previous = {}
    if args.reuse and (args.out / "BUILD.json").is_file():
        previous = {s["name"]: s for s in json.loads((args.out / "BUILD.json").read_text())["steps"]}

    def run(name: str, cmd: list[str]) -> None:
        shown = portable_command(["tidar-bench", *cmd])  # BUILD.json: no machine path
        if args.reuse and (work / name / "config.json").is_file() and name in previous:
            print("reusing", work / name, flush=True)
            log["steps"].append(dict(previous[name], reused=True))
            return
        print("$", shown, flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "tidar_bench.cli", *map(str, cmd)], check=True)
        log["steps"].append({"name": name, "command": shown, "seconds": round(time.perf_counter() - t0, 1)})

    # 1-2. corpus and tokenizer
    if args.reuse and not (work / "init" / "tokenizer.json").is_file():
        sys.exit("--reuse needs a --work folder of an earlier build")
    train, held = make_splits(args.n_train, args.n_heldout, seed=args.seed)
    write_jsonl(train, work / "train.jsonl")
    args.tasks_data.mkdir(parents=True, exist_ok=True)
    for fam in ("gsm", "code", "math"):
        write_jsonl([it for it in held if it["family"] == fam], args.tasks_data / f"{fam}.jsonl")
    if args.reuse:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(work / "init"))
    else:
        tok = train_tokenizer([it["text"] for it in train], args.vocab, work / "init", with_mask=True)
    # 3. random init -> AR base
    if not args.reuse:
        save_model(init_weights(Transformer(ModelConfig.from_dict(dict(ARCH, vocab_size=len(tok)))), seed=args.seed),
                   work / "init")
    common = ["--data", work / "train.jsonl", "--seed", args.seed, "--device", "cpu", "--batch-size", 16]
    run("ar", ["train", "ar", "--base", work / "init", "--out", work / "ar", "--seq-len", 128, "--lr", 2e-3,
               "--steps", args.ar_steps, *common])
    if not (args.reuse and (work / "base" / "config.json").is_file()):
        to_bf16(work / "ar", work / "base")
    # 4. recipes continued from the (bf16-stored) base
    run("tidar", ["train", "tidar", "--base", work / "base", "--out", work / "tidar", "--block-size", 8,
                  "--seq-len", 128, "--lr", 1e-3, "--steps", args.tidar_steps, *common])
    run("bd", ["train", "block-diffusion", "--base", work / "base", "--out", work / "bd", "--block-size", 8,
               "--token-shift",
               "--seq-len", 128, "--lr", 1e-3, "--steps", args.bd_steps, *common])
    run("eagle", ["train", "eagle", "--target", work / "base", "--out", work / "eagle", "--form", "eagle3",
                  "--draft-vocab-size", len(tok) // 2, "--ttt-steps", 3, "--seq-len", 128, "--lr", 2e-3,
                  "--steps", args.eagle_steps, *common])
    run("dflash", ["train", "dflash", "--target", work / "base", "--out", work / "dflash", "--block-size", 8,
                   "--num-layers", 2, "--target-layers", "1,2,3", "--num-anchors", 8, "--init", "target",
                   "--seq-len", 64, "--lr", 3e-3, "--steps", args.dflash_steps, *common[:-2], "--batch-size", 8])
    # 5. ship
    tmp = args.out.with_name(args.out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "base", tmp / "base")
    for name in ("tidar", "bd", "eagle", "dflash"):
        to_bf16(work / name, tmp / name)
    for d in tmp.iterdir():
        (d / "loss.png").unlink(missing_ok=True)  # logs stay beside the models; plots go to results/
    log["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (tmp / "BUILD.json").write_text(json.dumps(log, indent=2))
    shutil.rmtree(args.out, ignore_errors=True)
    tmp.replace(args.out)
    figs = ROOT / "results" / "embedded" / "training"
    figs.mkdir(parents=True, exist_ok=True)
    for name in ("ar", "tidar", "bd", "eagle", "dflash"):
        if (work / name / "loss.png").exists():
            shutil.copy2(work / name / "loss.png", figs / f"{name}_loss.png")
    print(f"wrote {args.out} ({sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
