"""Compare our DFlash drafter (baselines/dflash_drafter.py) with the reference implementation on the same
weights: one forward, and the same forward split over two cached steps (context absorbed, block
cropped, more context + a new block), as the decoders run it.

The reference is imported from a checkout of https://github.com/z-lab/dflash (it is not vendored):

    python scripts/dflash_reference_check.py --ref /path/to/dflash/dflash/model.py

Prints the largest absolute difference of the drafter's output states for each case.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ref", type=Path, required=True, help="dflash/model.py of a z-lab/dflash checkout")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("dflash_reference", args.ref)
    ref_mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ref_mod)
    from transformers import DynamicCache, Qwen3Config

    from test_dflash import _official_layout
    from tidar_bench.baselines.dflash_drafter import DFlashConfig, DFlashDrafter

    cfg, sd = _official_layout()
    hc = Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "auto_map", "dtype")})
    hc.num_target_layers, hc.block_size, hc.dflash_config = cfg["num_target_layers"], cfg["block_size"], cfg["dflash_config"]
    hc._attn_implementation = "sdpa"
    ref = ref_mod.DFlashDraftModel(hc).float().eval()
    ref.load_state_dict(sd)
    ours = DFlashDrafter(DFlashConfig(cfg))
    ours.load_state_dict(sd)
    ours.eval()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(1, 7, 2 * cfg["hidden_size"], generator=g)
    noise = torch.randn(1, cfg["block_size"], cfg["hidden_size"], generator=g)
    pos = torch.arange(7 + cfg["block_size"])[None] + 3
    with torch.no_grad():
        r = ref(position_ids=pos, noise_embedding=noise, target_hidden=ctx, attention_mask=None, is_causal=False)
        print("one forward:", float((r - ours(noise, ctx, pos)).abs().max()))
        pk, cache = DynamicCache(), ours.new_cache(32)
        k = cfg["block_size"]
        r1 = ref(position_ids=pos[:, : 5 + k], noise_embedding=noise, target_hidden=ctx[:, :5], past_key_values=pk,
                 use_cache=True, is_causal=False)
        pk.crop(-k)
        o1 = ours(noise, ctx[:, :5], pos[:, : 5 + k], cache=cache)
        cache.crop(5)
        r2 = ref(position_ids=pos[:, 5:], noise_embedding=noise, target_hidden=ctx[:, 5:], past_key_values=pk,
                 use_cache=True, is_causal=False)
        o2 = ours(noise, ctx[:, 5:], pos[:, 5:], cache=cache)
        print("two cached steps:", float((r1 - o1).abs().max()), float((r2 - o2).abs().max()))


if __name__ == "__main__":
    main()
