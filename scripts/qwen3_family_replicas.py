"""Tiny random checkpoints in the real layouts of the Qwen3-1.7B family, for the replica mode of
scripts/qwen3_family.sh (generated at run time, never committed).

    python scripts/qwen3_family_replicas.py OUT_DIR

Writes one folder per hub checkpoint the family script reads; the models (not the drafts) get the
embedded suite's byte-level BPE tokenizer (so lm-eval's real task prompts tokenize):
- `qwen3`: Qwen/Qwen3-1.7B's layout (Qwen3, tied embeddings, as its config says), 4 layers so the
  drafts' feature layers are distinct;
- `angelslim`: AngelSlim's Qwen3-1.7B EAGLE-3 head (`Eagle3LlamaForCausalLM`, reduced draft vocabulary
  with d2t/t2d; tidar_bench.testing.make_angelslim_eagle3);
- `dspark`: rasyosef/Qwen3-1.7B-DSpark (speculators `DSparkDraftModel`: block 8, 3 sliding-window layers
  + 1 full, full vocabulary, no embed_tokens/lm_head; aux ids 1, 2, 3 of 4 layers where the real one
  has 2, 10, 18, 26 of 28; tidar_bench.testing.make_dspark_replica);
- `sdar`: JetLM/SDAR-*-Chat's layout (tidar_bench.testing.make_sdar_replica; mask = the
  tokenizer's [MASK], block size 4);
- `tidar`: TiDAR-LM/TiDAR-1.7b-*'s layout (TiDARForCausalLM, Qwen3, vocabulary 151936 since the preset's
  mask id is 151662, tied as Qwen3-1.7B; tidar_bench.testing.make_tidar_lm_replica).
A new row of the family table adds its layout here, one line in REPLICAS.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tidar_bench.testing import (hf_config, make_angelslim_eagle3, make_dspark_replica, make_hf_model,  # noqa: E402
                                 make_sdar_replica, make_tidar_lm_replica)

TOKENIZER = ROOT / "tidar_bench/embedded/base"
SHAPE = dict(vocab_size=807, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, eos_token_id=0)
MASK = 2  # the embedded tokenizer's [MASK]

QWEN3 = dict(SHAPE, num_hidden_layers=4, tie_word_embeddings=True)
TARGET = hf_config("qwen3", **QWEN3)  # the drafts' target shape

REPLICAS = {  # name: (maker, gets the tokenizer)
    "qwen3": (lambda d: make_hf_model("qwen3", d, seed=0, **QWEN3), True),
    "angelslim": (lambda d: make_angelslim_eagle3(d, TARGET, draft_vocab=256, seed=2), False),
    "dspark": (lambda d: make_dspark_replica(d, TARGET, mask_token_id=MASK, aux=(1, 2, 3), seed=3), False),
    "sdar": (lambda d: make_sdar_replica(d, seed=1, block_size=4, mask_token_id=MASK, **SHAPE), True),
    "tidar": (lambda d: make_tidar_lm_replica(d, tied=True, seed=4, hidden=32), True),
}


def main(out: Path) -> None:
    for name, (make, tokenizer) in REPLICAS.items():
        d = out / name
        make(d)
        for f in ("tokenizer.json", "tokenizer_config.json") if tokenizer else ():
            shutil.copy(TOKENIZER / f, d / f)
        print(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
