"""Small checkpoints for tests and smoke runs, built with transformers (the reference) and saved
in HF layout, so our loader reads exactly what users' checkpoints look like."""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3")


def hf_config(family: str, vocab_size: int = 96, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    base = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                rms_norm_eps=1e-6, eos_token_id=vocab_size - 1, bos_token_id=None, pad_token_id=None)
    if family == "llama":
        base.update(rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0,
                                  "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
                    rope_theta=50000.0)
        cls = LlamaConfig
    elif family == "qwen2":
        base.update(tie_word_embeddings=True, rope_theta=1e6)
        cls = Qwen2Config
    elif family == "qwen3":
        base.update(head_dim=32, rope_theta=1e6)
        cls = Qwen3Config
    else:
        raise ValueError(family)
    base.update(overrides)
    return cls(**base)


def make_hf_model(family: str, path: str | Path, seed: int = 0, vocab_size: int = 96, **overrides):
    """Random-init HF model of `family`, saved to `path`; returns the HF model (fp32, eval).
    Weights are drawn with a larger std than HF's default so logits are far from uniform."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(family, vocab_size, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.08 if p.dim() > 1 else 0.02)
    model.eval()
    model.save_pretrained(str(path))
    return model


def make_sdar_replica(path: str | Path, seed: int = 0, vocab_size: int = 96, block_size: int = 4,
                      mask_token_id: int | None = None, **overrides):
    """A random SDAR checkpoint in JetLM/SDAR-*-Chat's layout: Qwen3 tensors (saved by transformers)
    and SDAR's config.json keys (`model_type: sdar`, `SDARForCausalLM`, `auto_map`, `block_size`,
    `mask_token_id`, as in JetAstra/SDAR's SDAR-4B-Chat/config.json). Returns the HF Qwen3 model."""
    import json

    model = make_hf_model("qwen3", path, seed, vocab_size, **overrides)
    cfg_file = Path(path) / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(model_type="sdar", architectures=["SDARForCausalLM"], block_size=block_size,
               mask_token_id=vocab_size - 2 if mask_token_id is None else mask_token_id,
               auto_map={"AutoConfig": "configuration_sdar.SDARConfig", "AutoModel": "modeling_sdar.SDARModel",
                         "AutoModelForCausalLM": "modeling_sdar.SDARForCausalLM"},
               attn_implementation="flex_attention", fuse_cross_entropy=True, use_sliding_window=False)
    cfg_file.write_text(json.dumps(cfg, indent=2))
    return model


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit of `counts` to `probs`; cells with expected count < 5
    are pooled (the statistical tests of the sampling rules)."""
    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs_c = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    exp_c = torch.cat([exp[~small], exp[small].sum().reshape(1)])
    keep = exp_c > 0
    obs_c, exp_c = obs_c[keep], exp_c[keep]
    stat = ((obs_c - exp_c) ** 2 / exp_c).sum()
    df = obs_c.numel() - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat.double() / 2))


class CharTok:
    """Minimal tokenizer for stop-string tests: token i decodes to one printable character."""

    def decode(self, ids):
        return "".join(chr(0x21 + i) for i in ids)


TIDAR_LM_VOCAB = 151936  # Qwen2.5/Qwen3's padded vocabulary, as the released TiDAR-LM checkpoints have it


def make_tidar_lm_replica(path: str | Path, tied: bool = True, seed: int = 0, hidden: int = 32,
                          tokenizer_from: str | Path | None = None) -> Path:
    """A tiny random checkpoint in the exact layout of the TiDAR authors' released checkpoints: a
    Qwen3 config (vocabulary 151936) whose `architectures` their converter renamed to
    TiDARForCausalLM, tied or untied head, safetensors, no tidar_config.json, no TiDAR key. Built at
    test time (about 20-40 MB), never committed."""
    import json

    make_hf_model("qwen3", path, seed=seed, vocab_size=TIDAR_LM_VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                  num_hidden_layers=2, head_dim=16, num_attention_heads=2, num_key_value_heads=1,
                  tie_word_embeddings=tied, eos_token_id=151645)
    cfg_path = Path(path) / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["architectures"] = ["TiDARForCausalLM"]
    cfg_path.write_text(json.dumps(cfg, indent=2))
    if tokenizer_from is not None:  # a stand-in tokenizer (ids < its vocabulary) where Qwen's is not at hand
        import shutil

        for f in ("tokenizer.json", "tokenizer_config.json"):
            if (Path(tokenizer_from) / f).is_file():
                shutil.copy(Path(tokenizer_from) / f, Path(path) / f)
    return Path(path)
