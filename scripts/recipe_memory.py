"""Memory per GPU of docs/training.md's TiDAR-1.7b-sd-doc-attn-prompt-mask-sft-style recipe, computed the way
docs/training.md's table is (parameter count of the config on the meta device x 16 bytes for fp32 weights,
fp32 gradients and the two AdamW moments, over 1 and 8 GPUs; bf16 sizes of what FSDP gathers at
once), plus the 8K-context activations named in docs/training.md. Computed, not measured.

Qwen3-1.7B shape: hidden 2048, intermediate 6144, 16 heads / 8 KV heads, head_dim 128, rope_theta
1e6, vocabulary 151936, tied embeddings, 28 layers: the values of Qwen3-1.7B's published config.json
(stated, not read here: no hub access).
Usage: python scripts/recipe_memory.py
"""

from __future__ import annotations

import json

QWEN3_1P7B = {"model_type": "qwen3", "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
              "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8, "head_dim": 128,
              "max_position_embeddings": 40960, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": True}
SEQ, GPUS = 8192, 8


def figures() -> dict:
    import torch

    from tidar_bench.model import ModelConfig, Transformer

    cfg = ModelConfig.from_dict(QWEN3_1P7B)
    with torch.device("meta"):
        m = Transformer(cfg)
    n = sum(p.numel() for p in m.parameters())
    emb = m.model.embed_tokens.weight.numel() * (1 if cfg.tie_word_embeddings else 2)
    block = sum(p.numel() for p in m.model.layers[0].parameters())
    rows = 2 * SEQ  # TiDAR's doubled row
    G = 2**30
    return {
        "params_B": n / 1e9, "ddp_GiB": n * 16 / G, "fsdp8_GiB": n * 16 / GPUS / G,
        "gathered_embedding_bf16_GiB": emb * 2 / G, "gathered_block_bf16_GiB": block * 2 / G,
        "logits_fp32_GiB_per_sequence": rows * cfg.vocab_size * 4 / G,  # logits; log-softmax and grad: as much each
        "saved_block_inputs_bf16_GiB_per_sequence": cfg.num_hidden_layers * rows * cfg.hidden_size * 2 / G,
        "dense_mask_bool_MiB_per_sequence": rows * rows / 2**20,
        "dense_mask_bf16_bias_MiB_per_sequence": rows * rows * 2 / 2**20,
        "math_attention_scores_fp32_GiB_per_sequence_layer": cfg.num_attention_heads * rows * rows * 4 / G,
        "block_mask_MiB_per_sequence": 4 * (2 * (rows // 128) ** 2 + 2 * (rows // 128)) * 2 / 2**20,
    }


if __name__ == "__main__":
    print(json.dumps(figures(), indent=1))
