"""Tiny random checkpoints in the real layouts of the Qwen3-1.7B family, for the replica mode of
scripts/qwen3_family.sh (generated at run time, never committed).

    python scripts/qwen3_family_replicas.py OUT_DIR

Writes one folder per hub checkpoint the family script reads, each with the embedded suite's
byte-level BPE tokenizer (so lm-eval's real task prompts tokenize) and a vocabulary of its size:
- `qwen3`: Qwen/Qwen3-1.7B's layout (Qwen3, tied embeddings, as its config says);
- `sdar`: JetLM/SDAR-*-Chat's layout (tidar_bench.testing.make_sdar_replica; mask = the
  tokenizer's [MASK], block size 4).
A new row of the family table adds its layout here, one line in REPLICAS.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tidar_bench.testing import make_hf_model, make_sdar_replica  # noqa: E402

TOKENIZER = ROOT / "tidar_bench/embedded/base"
SHAPE = dict(vocab_size=807, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, eos_token_id=0)
MASK = 2  # the embedded tokenizer's [MASK]

REPLICAS = {
    "qwen3": lambda d: make_hf_model("qwen3", d, seed=0, tie_word_embeddings=True, **SHAPE),
    "sdar": lambda d: make_sdar_replica(d, seed=1, block_size=4, mask_token_id=MASK, **SHAPE),
}


def main(out: Path) -> None:
    for name, make in REPLICAS.items():
        d = out / name
        make(d)
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(TOKENIZER / f, d / f)
        print(d)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
