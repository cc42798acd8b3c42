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


def always_accept_chain(drafts, target, draft_probs=None, n_valid=None, generators=None):
    """A deliberately WRONG `decoding.verify_chain` for tests: accepts every draft (no rejection, no
    residual) and draws the bonus token from the target. A statistical test of a sampling decoder
    must fail with this patched in, or it cannot tell a wrong rule from the right one."""
    import torch

    from .decoding import sample

    nv = n_valid if n_valid is not None else [drafts.shape[1]] * drafts.shape[0]
    gens = generators if isinstance(generators, list) else [generators] * len(nv)
    return (torch.tensor(nv, device=drafts.device),
            torch.stack([sample(target[b, v], g) for b, (v, g) in enumerate(zip(nv, gens))]))


def chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor, min_expected: float = 5.0) -> float:
    """Pearson chi-square goodness of fit of `counts` to `probs` (the statistical tests of the
    sampling rules). A cell expecting `min_expected` counts or more is its own bin; the others are
    pooled by their expected counts alone (never by what was observed), from the most to the least
    likely, into consecutive bins of at least `min_expected` each; a remainder short of it joins the
    last bin. Raises ValueError when that leaves fewer than two bins: with one bin (df 0) the test
    cannot fail, so the caller must draw more samples."""
    counts, probs = counts.flatten().double(), probs.flatten().double()
    exp = probs * counts.sum()
    order = torch.sort(exp, descending=True, stable=True).indices.tolist()  # ties: in cell order
    obs_b, exp_b = [], []  # the bins
    o = e = 0.0  # the bin being filled from the small cells
    for i in order:
        if exp[i] >= min_expected:
            obs_b.append(float(counts[i])), exp_b.append(float(exp[i]))
            continue
        o, e = o + float(counts[i]), e + float(exp[i])
        if e >= min_expected:
            obs_b.append(o), exp_b.append(e)
            o = e = 0.0
    if o or e:  # the remainder: the last bin absorbs it (it must still count, e.g. draws of a zero-probability cell)
        if obs_b and e < min_expected:
            obs_b[-1], exp_b[-1] = obs_b[-1] + o, exp_b[-1] + e
        else:
            obs_b.append(o), exp_b.append(e)
    if len(obs_b) < 2:
        raise ValueError(f"chi-square over {counts.numel()} cells and {int(counts.sum())} samples leaves "
                         f"{len(obs_b)} bin of {min_expected:g} expected counts (df 0: the test cannot fail); "
                         "draw more samples")
    obs_t, exp_t = torch.tensor(obs_b, dtype=torch.float64), torch.tensor(exp_b, dtype=torch.float64)
    stat = ((obs_t - exp_t) ** 2 / exp_t).sum()
    df = len(obs_b) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), stat / 2))


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


# ------------------------------------------------------------------ third-party draft layouts
# Shared by tests/test_eagle.py, tests/test_formats.py and scripts/qwen3_family_replicas.py. `c` is the
# target's config (ours or HF's: hidden_size, intermediate_size, heads, head_dim, vocab_size).


def save_draft(path: str | Path, cfg: dict, sd: dict) -> Path:
    """config.json + model.safetensors, as the formats' authors save them."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path / "model.safetensors"))
    return path


def eagle3_layout(c, draft_vocab: int = 32, seed: int = 0) -> tuple[dict, dict]:
    """config.json + state dict with exactly the names of yuhuili/EAGLE3-LLaMA3.1-Instruct-8B (SafeAILab;
    AngelSlim saves the same names), in the target's shape `c`."""
    H, V, I = c.hidden_size, c.vocab_size, c.intermediate_size
    D = H // c.num_attention_heads  # the head's own (its config has no head_dim), not the target's
    g = torch.Generator().manual_seed(seed)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": H, "intermediate_size": I,
           "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
           "num_hidden_layers": 1, "vocab_size": V, "draft_vocab_size": draft_vocab, "rms_norm_eps": 1e-5,
           "max_position_embeddings": 2048, "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "float16"}
    keep = torch.arange(0, V, V // draft_vocab)[:draft_vocab]
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[keep] = True
    q, kv = c.num_attention_heads * D, c.num_key_value_heads * D
    sd = {"d2t": keep - torch.arange(draft_vocab), "t2d": t2d,
          "midlayer.self_attn.q_proj.weight": w(q, 2 * H), "midlayer.self_attn.k_proj.weight": w(kv, 2 * H),
          "midlayer.self_attn.v_proj.weight": w(kv, 2 * H), "midlayer.self_attn.o_proj.weight": w(H, q),
          "midlayer.mlp.gate_proj.weight": w(I, H), "midlayer.mlp.up_proj.weight": w(I, H),
          "midlayer.mlp.down_proj.weight": w(H, I), "midlayer.hidden_norm.weight": 1 + w(H),
          "midlayer.input_layernorm.weight": 1 + w(H), "midlayer.post_attention_layernorm.weight": 1 + w(H),
          "norm.weight": 1 + w(H), "fc.weight": w(H, 3 * H), "lm_head.weight": w(draft_vocab, H)}
    return cfg, sd


def make_angelslim_eagle3(path: str | Path, c, draft_vocab: int = 32, seed: int = 0) -> Path:
    """A random head in Tencent AngelSlim's saved `Eagle3LlamaForCausalLM` layout (its
    qwen3-1.7b-eagle3.json: flat Llama config, `target_model_type`, a tie flag that does not apply, no
    `target_hidden_size` or aux-id key; SafeAILab's tensor names, d2t/t2d always, no embedding)."""
    cfg, sd = eagle3_layout(c, draft_vocab, seed)
    cfg.update(architectures=["Eagle3LlamaForCausalLM"], target_model_type="qwen3", tie_word_embeddings=True,
               head_dim=c.hidden_size // c.num_attention_heads, rope_theta=1e6,
               torch_dtype="bfloat16")
    return save_draft(path, cfg, sd)


def speculators_layer(c, n_layers: int = 1, **kw) -> dict:
    """speculators' `transformer_layer_config`: the target's Qwen3 shape."""
    return dict({"model_type": "qwen3", "hidden_size": c.hidden_size, "intermediate_size": c.intermediate_size,
                 "num_attention_heads": c.num_attention_heads, "num_key_value_heads": c.num_key_value_heads,
                 "head_dim": c.head_dim, "num_hidden_layers": n_layers, "vocab_size": c.vocab_size,
                 "rms_norm_eps": 1e-6, "rope_theta": 1e6, "max_position_embeddings": 512, "attention_bias": False}, **kw)


def speculators_drafter(c, kind: str = "dspark", *, block_size: int = 4, draft_vocab: int | None = None,
                        n_layers: int = 2, sliding: int | None = 3, seed: int = 1, aux=(1, 3), **top):
    """A speculators DFlash/DSpark config (nested; `sliding`: all layers but the last sliding-window, as
    rasyosef/Qwen3-1.7B-DSpark) and a random drafter of that config: (raw config, DFlashDrafter)."""
    from tidar_bench.baselines.dflash_drafter import DFlashConfig, DFlashDrafter
    from tidar_bench.formats import flat_config
    from tidar_bench.model import init_weights

    V = c.vocab_size
    layer = speculators_layer(c, n_layers)
    if sliding:
        layer.update(use_sliding_window=True, sliding_window=sliding,
                     layer_types=["sliding_attention"] * (n_layers - 1) + ["full_attention"])
    raw = dict({"speculators_model_type": kind, "architectures": ["DSparkDraftModel" if kind == "dspark" else
                "DFlashDraftModel"], "transformer_layer_config": layer, "draft_vocab_size": draft_vocab or V,
                "block_size": block_size, "aux_hidden_state_layer_ids": list(aux), "mask_token_id": V - 2}, **top)
    if kind == "dspark":
        raw.setdefault("markov_rank", 8)
    fmt, flat = flat_config(raw)
    drafter = DFlashDrafter(DFlashConfig(flat, fmt))
    init_weights(drafter, seed=seed)
    with torch.no_grad():
        if drafter.markov_head is not None:
            drafter.markov_head.markov_w1.weight.normal_(0, 1.0)
        if drafter.lm_head is not None:
            drafter.d2t.copy_(torch.arange(0, V, V // drafter.lm_head.out_features)[: drafter.lm_head.out_features]
                              - torch.arange(drafter.lm_head.out_features))
    return raw, drafter.eval()


def make_dspark_replica(path: str | Path, c, *, mask_token_id: int, aux=(1, 2, 3), n_layers: int = 4,
                        seed: int = 1) -> Path:
    """A random drafter in rasyosef/Qwen3-1.7B-DSpark's saved layout (speculators `DSparkDraftModel`):
    nested config with the DSpark keys as its card has them (block 8, markov_rank, confidence head,
    sample_from_anchor), all layers but the last sliding-window, full vocabulary (no d2t/t2d), no
    embed_tokens or lm_head (shared from the target), `markov_head.*` and `confidence_head.proj.*` tensors."""
    raw, drafter = speculators_drafter(c, "dspark", block_size=8, n_layers=n_layers, sliding=4, seed=seed, aux=aux,
                                       mask_token_id=mask_token_id, markov_head_type="vanilla",
                                       enable_confidence_head=True, confidence_head_with_markov=True,
                                       sample_from_anchor=True, sliding_window_non_causal=False,
                                       target_hidden_size=c.hidden_size, torch_dtype="bfloat16",
                                       speculators_version="0.3.0",
                                       speculators_config={"algorithm": "dspark", "default_proposal_method": "greedy",
                                                           "proposal_methods": [{"proposal_type": "greedy",
                                                                                 "speculative_tokens": 8}],
                                                           "verifier": {"name_or_path": "Qwen/Qwen3-1.7B",
                                                                        "architectures": ["Qwen3ForCausalLM"]}})
    g = torch.Generator().manual_seed(seed)
    r = raw["markov_rank"]
    sd = dict(drafter.state_dict(), **{"confidence_head.proj.weight": torch.randn(1, c.hidden_size + r, generator=g),
                                        "confidence_head.proj.bias": torch.zeros(1)})
    return save_draft(path, raw, sd)
