"""GPU check for `--attention-masks block` (NOT run in this project so far: its machines had no GPU).

On one CUDA device, a TiDAR training step (forward + backward, bf16 autocast) of a small random Qwen3-
shaped model on packed rows with document attention:
1. equivalence at seq_len 512: the loss and the gradient of the embedding under block masks (compiled
   flex_attention) equal those under dense masks (SDPA) within bf16 tolerance;
2. memory at seq_len 8192 (a doubled row of 16,384): peak allocated with block masks, then with dense
   masks (an out-of-memory error is reported as such), and the number of dynamo recompilations over
   3 steps with different document layouts.
Usage: python scripts/check_long_context_cuda.py [--out results/training/long_context_cuda.json]
(`--smoke`: the same on CPU at seq_len 64/128, to check the script; it stores nothing)
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from tidar_bench.model import ModelConfig, Transformer, init_weights
from tidar_bench.training.data import Batch
from tidar_bench.training.tidar import TidarObjective

CFG = {"model_type": "qwen3", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1536, "num_hidden_layers": 4,
       "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 64, "max_position_embeddings": 16384,
       "tie_word_embeddings": True}


DEV = "cuda"


def batch(S: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 31000, (1, S), generator=g)
    starts = torch.zeros(1, S, dtype=torch.long)
    starts[0, torch.randint(1, S, (max(1, S // 900),), generator=g)] = 1
    return Batch(ids, starts.cumsum(1)).to(DEV)


def step(obj, model, b, kind):
    obj.mask_kind = kind
    model.zero_grad(set_to_none=True)
    if DEV == "cpu":  # FlexAttention has no backward on CPU: the smoke run checks the forward only
        with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
            return float(obj.loss(model, b)[0]), torch.zeros(1)
    with torch.autocast(DEV, dtype=torch.bfloat16):
        loss, _ = obj.loss(model, b)
    loss.backward()
    return float(loss), model.model.embed_tokens.weight.grad.float().clone()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="results/training/long_context_cuda.json")
    ap.add_argument("--smoke", action="store_true", help="CPU, seq_len 64/128: checks the script itself, measures nothing")
    a = ap.parse_args()
    global DEV
    short, long_ = (64, 128) if a.smoke else (512, 8192)
    if a.smoke:
        DEV = "cpu"
    torch.manual_seed(0)
    model = init_weights(Transformer(ModelConfig.from_dict(CFG)), std=0.02).to(DEV)
    obj = TidarObjective(model, None, block_size=16, mask_token_id=31999)
    out = {"command": "python scripts/check_long_context_cuda.py --out " + a.out,
           "device": torch.cuda.get_device_name() if DEV == "cuda" else "cpu (smoke)",
           "torch": torch.__version__, "python": platform.python_version(), "config": CFG, "compile": "flex compiled"}
    b = batch(short, 0)
    (ld, gd), (lb, gb) = step(obj, model, b, "dense"), step(obj, model, b, "block")
    out[f"equivalence_{short}"] = {"loss_dense": ld, "loss_block": lb, "grad_max_abs_diff": float((gd - gb).abs().max()),
                              "grad_max_abs": float(gd.abs().max())}
    import torch._dynamo.utils as du

    for kind in ("block", "dense"):
        if DEV == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            for s in range(3):
                step(obj, model, batch(long_, s + 1), kind)
            out[f"peak_gib_{long_}_{kind}"] = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else None
        except torch.OutOfMemoryError as e:
            out[f"peak_gib_{long_}_{kind}"] = f"out of memory: {str(e).splitlines()[0]}"
    out["dynamo_counters"] = {k: dict(v) for k, v in du.counters.items() if k in ("stats", "recompiles")}
    if not a.smoke:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(out, indent=1, default=str))
    print(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
