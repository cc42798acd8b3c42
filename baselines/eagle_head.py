"""The EAGLE draft head (`EagleHead`) and its checkpoint formats; the decoder that drafts with it is
`baselines/eagle.py`.

The head (our own code on the model core's building blocks) comes in two forms:

- "eagle3" (EAGLE-3, arXiv 2503.01840): features = the target's hidden states entering layers
  2, L//2 and L-3 (i.e. outputs of layers 1, L//2-1, L-4), concatenated and projected by
  `fc: Linear(3*H_target, H)`. The decoder layer's q/k/v read concat(input_layernorm(emb),
  hidden_norm(h)) (width 2H); the residual stream is h. Own reduced vocabulary: `lm_head: H -> V_d`,
  target id = draft id + d2t[draft id], `t2d` marks the kept target ids. Checkpoints in the
  official layout load as they are (`load_eagle_head`).
- "eagle1" (EAGLE-1/2): feature = the target's final normed hidden state; x = fc(concat(emb, f))
  (2H -> H, with bias), then a standard decoder layer; logits = lm_head(x) with lm_head copied from
  the target (EAGLE-1 regresses the next feature and reads it with the target's head). Stored in
  the same file layout plus `"eagle_form": "eagle1"` in config.json (our own checkpoints only).

Third-party EAGLE-3 heads load through the same class (`load_eagle_head`, `tidar_bench.formats`):
SafeAILab, AngelSlim (`Eagle3LlamaForCausalLM`: same tensors, no `head_dim` / `target_hidden_size`,
attention without bias whatever the config says), SGLang/SpecForge (`eagle_config.
eagle_aux_hidden_state_layer_ids` = outputs of those target layers), and vLLM speculators (nested
`transformer_layer_config`, `layers.0.` prefix, aux ids = inputs of those layers, `norm_before_residual`
(residual = hidden_norm(h)), q/k norm when the layer is Qwen3, a saved embedding that replaces the
target's, as in vLLM). Flags that change the arithmetic and are not implemented are refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from tidar_bench.attention import select_backend
from tidar_bench.cache import KVCache
from tidar_bench.errors import UserError
from tidar_bench.formats import EAGLE_FORMATS, aux_to_model_core, flat_config
from tidar_bench.model import (MLP, Attention, Block, ModelConfig, RMSNorm, copy_weights, init_weights, load_state_dict, prepare_step,
                               read_config, rope_cos_sin, rope_inv_freq, save_checkpoint)

FORMS = ("eagle3", "eagle1")


def feature_layers(form: str, n_layers: int, aux: Sequence[int] | None = None) -> tuple[int, ...]:
    """Target layers (model-core indices, output of layer i) whose hidden states feed the head.
    EAGLE-3 taps the states *entering* layers 2, L//2, L-3 (clamped to layer 0 for tiny models),
    unless the checkpoint names its layers (`aux`, already in model-core indices)."""
    if form == "eagle1":
        return (n_layers - 1,)
    if aux is not None:
        return tuple(aux)
    return tuple(max(0, i - 1) for i in (2, n_layers // 2, n_layers - 3))


def target_features(target, hidden: dict[int, torch.Tensor], form: str,
                    layers: Sequence[int] | None = None) -> torch.Tensor:
    """[B, q, F] head input features from a target forward run with hidden_layers=layers
    (default: feature_layers of the form)."""
    layers = layers or feature_layers(form, target.config.num_hidden_layers)
    if form == "eagle1":
        return target.model.norm(hidden[layers[0]])
    return torch.cat([hidden[i] for i in layers], dim=-1)


# speculators flags that change the head's arithmetic and are not implemented here: refused by name
UNSUPPORTED_FLAGS = ("norm_before_fc", "fc_norm", "norm_output")


@dataclass
class EagleConfig:
    """The head's config.json, flattened by `formats.flat_config` (official EAGLE-3 fields + our
    optional `eagle_form`; `format` says whose layout it came in)."""

    raw: dict
    format: str = "safeailab-eagle3"

    @property
    def form(self) -> str:
        return self.raw.get("eagle_form", "eagle3")

    @property
    def hidden_size(self) -> int:
        return self.raw["hidden_size"]

    @property
    def vocab_size(self) -> int:
        return self.raw["vocab_size"]

    @property
    def draft_vocab_size(self) -> int:
        return self.raw.get("draft_vocab_size") or self.raw["vocab_size"]

    @property
    def target_hidden_size(self) -> int:
        return self.raw.get("target_hidden_size") or self.raw["hidden_size"]

    @property
    def norm_before_residual(self) -> bool:
        """speculators: the residual stream starts from hidden_norm(h) instead of h."""
        return bool(self.raw.get("norm_before_residual", False))

    @property
    def n_features(self) -> int:
        """How many target layers feed fc (speculators and SGLang heads may name more than three)."""
        ids = self.raw.get("eagle_aux_hidden_state_layer_ids") if self.format == "speculators-eagle3" else \
            (self.raw.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids")
        return len(ids) if ids else 3

    def aux_layers(self, n_target_layers: int) -> list[int] | None:
        """The checkpoint's feature layers in model-core indices, or None (the default three)."""
        if self.format == "speculators-eagle3":
            ids = self.raw.get("eagle_aux_hidden_state_layer_ids")
            return None if ids is None else aux_to_model_core(ids, n_target_layers)
        if self.format == "specforge-eagle3":  # SGLang: id k = output of layer k = our index k
            ids = [int(i) for i in self.raw["eagle_config"]["eagle_aux_hidden_state_layer_ids"]]
            bad = [i for i in ids if not 0 <= i < n_target_layers]
            if bad:
                raise UserError(f"eagle_aux_hidden_state_layer_ids {bad} outside the target's layers 0..{n_target_layers - 1}")
            return ids
        return None

    def layer_config(self) -> ModelConfig:
        family = self.raw.get("model_type") if self.format == "speculators-eagle3" else "llama"
        if family not in ("llama", "qwen3"):
            raise UserError(f"EAGLE-3 draft layers of model_type {family!r} are not supported; supported: llama, qwen3")
        bias = {"speculators-eagle3": self.raw.get("attention_bias", False),
                "angelslim-eagle3": False}.get(self.format, self.raw.get("bias", False))  # AngelSlim: never
        d = dict(self.raw, model_type=family, num_hidden_layers=1, attention_bias=bool(bias))
        cfg = ModelConfig.from_dict(d)
        cfg.o_bias = cfg.attention_bias  # HF's Llama and Qwen3 layers put attention_bias on o_proj too
        return cfg


class Eagle3Layer(nn.Module):
    """EAGLE-3's decoder layer: attention over concat(norm(emb), norm(h)), residual on h."""

    def __init__(self, cfg: ModelConfig, norm_before_residual: bool = False):
        super().__init__()
        H = cfg.hidden_size
        self.norm_before_residual = norm_before_residual
        self.input_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.hidden_norm = RMSNorm(H, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        a = self.self_attn
        for name, out in (("q_proj", a.n_heads), ("k_proj", a.n_kv), ("v_proj", a.n_kv)):
            setattr(a, name, nn.Linear(2 * H, out * a.head_dim, bias=cfg.attention_bias))
        self.post_attention_layernorm = RMSNorm(H, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, emb, h, cos, sin, mask, cache, start, attn):
        hn = self.hidden_norm(h)
        x = torch.cat([self.input_layernorm(emb), hn], dim=-1)
        h = (hn if self.norm_before_residual else h) + self.self_attn(x, cos, sin, mask, 0, cache, start, attn)
        return h + self.mlp(self.post_attention_layernorm(h))


class EagleHead(nn.Module):
    def __init__(self, config: EagleConfig):
        super().__init__()
        if config.form not in FORMS:
            raise UserError(f"unknown eagle_form {config.form!r}; valid: {', '.join(FORMS)}")
        self.config = config
        lc = self.layer_config = config.layer_config()
        H, V, Vd = config.hidden_size, config.vocab_size, config.draft_vocab_size
        self.embed_tokens = nn.Embedding(V, H)  # the target's, frozen; not stored in head checkpoints
        self.embed_tokens.weight.requires_grad_(False)
        if config.form == "eagle3":
            self.fc = nn.Linear(config.n_features * config.target_hidden_size, H, bias=False)
            self.midlayer = Eagle3Layer(lc, config.norm_before_residual)
            self.norm = RMSNorm(H, lc.rms_norm_eps)
        else:
            self.fc = nn.Linear(2 * H, H, bias=True)
            self.midlayer = Block(lc)
            self.norm = nn.Identity()
        self.lm_head = nn.Linear(H, Vd, bias=False)
        self.register_buffer("d2t", torch.zeros(Vd, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(V) < Vd)  # default draft vocab: the first Vd ids
        self.register_buffer("inv_freq", rope_inv_freq(lc), persistent=False)
        self.attn = select_backend("auto")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # like Transformer: RoPE frequencies stay fp32 after any cast or move
        self.inv_freq = rope_inv_freq(self.layer_config).to(self.inv_freq.device)
        return self

    @property
    def form(self) -> str:
        return self.config.form

    def feature_layers(self, n_target_layers: int) -> tuple[int, ...]:
        """The target layers (model-core indices) this head reads: its checkpoint's, or the default."""
        return feature_layers(self.form, n_target_layers, self.config.aux_layers(n_target_layers))

    def set_draft_vocab(self, target_ids: torch.Tensor) -> None:
        """Reduced vocabulary = these target ids (sorted): fills d2t and t2d."""
        ids = torch.as_tensor(target_ids, dtype=torch.long).sort().values
        if ids.numel() != self.lm_head.out_features:
            raise ValueError(f"{ids.numel()} draft ids for a draft vocabulary of {self.lm_head.out_features}")
        self.d2t.copy_(ids.to(self.d2t.device) - torch.arange(ids.numel(), device=self.d2t.device))
        self.t2d.zero_()
        self.t2d[ids.to(self.t2d.device)] = True

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids]

    def new_cache(self, max_len: int, reuse: KVCache | None = None, batch: int = 1) -> KVCache:
        if reuse is not None and reuse.max_len >= max_len and reuse.batch == batch:
            reuse.reset()
            return reuse
        lc = self.layer_config
        w = self.lm_head.weight
        return KVCache(1, lc.num_key_value_heads, lc.head_dim, max_len, batch=batch, dtype=w.dtype, device=w.device)

    def forward(self, ids: torch.Tensor, target_feats: torch.Tensor | None = None, hidden: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cache: KVCache | None = None, start: torch.Tensor | None = None,
                window: torch.Tensor | None = None, kv_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [B, q] target token ids; the q pairs' features are [target_feats ; hidden] along the
        sequence: target features (projected by fc in EAGLE-3) for the first part, the head's own
        output states for the rest. mask/positions/cache/start/window/kv_len as in the model core
        (`prepare_step`: start given = a static compiled step). Returns
        (hidden [B, q, H] (the next feature's estimate), logits [B, q, V_draft] float32)."""
        parts = []
        if target_feats is not None:
            parts.append(self.fc(target_feats) if self.form == "eagle3" else target_feats)
        if hidden is not None:
            parts.append(hidden)
        h = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        q = ids.shape[1]
        static = start is not None
        start, position_ids, mask = prepare_step(ids, position_ids, mask, cache, start, window, kv_len)
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, h.dtype)
        emb = self.embed_tokens(ids)
        if self.form == "eagle3":
            out = self.midlayer(emb, h, cos, sin, mask, cache, start, self.attn)
        else:
            out = self.midlayer(self.fc(torch.cat([emb, h], dim=-1)), cos, sin, mask, 0, cache, start, self.attn)
        if cache is not None and not static:
            cache.advance(q)
        return out, self.lm_head(self.norm(out)).float()

    # ------------------------------------------------------------------------- construction, I/O

    @classmethod
    def from_target(cls, target, form: str = "eagle3", draft_vocab_size: int | None = None,
                    seed: int = 0) -> "EagleHead":
        """A fresh head sized like the target (one layer of its shape), random-init, with the
        target's embedding (and, for eagle1, its norm-free LM head)."""
        if form not in FORMS:
            raise UserError(f"--form must be one of {', '.join(FORMS)}, got {form!r}")
        tc = target.config
        raw = {"architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": tc.hidden_size,
               "intermediate_size": tc.intermediate_size, "num_attention_heads": tc.num_attention_heads,
               "num_key_value_heads": tc.num_key_value_heads, "head_dim": tc.head_dim, "num_hidden_layers": 1,
               "vocab_size": tc.vocab_size, "draft_vocab_size": draft_vocab_size or tc.vocab_size,
               "rms_norm_eps": tc.rms_norm_eps, "rope_theta": tc.rope_theta, "rope_scaling": tc.rope_scaling,
               "max_position_embeddings": tc.max_position_embeddings, "tie_word_embeddings": False,
               "target_hidden_size": tc.hidden_size}
        if form == "eagle1":
            if draft_vocab_size not in (None, tc.vocab_size):
                raise UserError("the eagle1 form reads the target's LM head: no reduced draft vocabulary")
            raw["eagle_form"] = "eagle1"
        head = cls(EagleConfig(raw))
        init_weights(head, seed=seed)
        head.to(device=target.device, dtype=target.dtype)
        head.attach(target)
        if form == "eagle1":
            with torch.no_grad():
                head.lm_head.weight.copy_(target.lm_head.weight)
            head.lm_head.weight.requires_grad_(False)
        return head

    def attach(self, target) -> None:
        """Take the (frozen) token embedding from the target; check the two fit together."""
        tc, c = target.config, self.config
        if tc.vocab_size != c.vocab_size:
            raise UserError(f"draft head vocab_size {c.vocab_size} != target vocab_size {tc.vocab_size}")
        if tc.hidden_size != c.target_hidden_size:
            raise UserError(f"draft head expects target hidden size {c.target_hidden_size}, target has {tc.hidden_size}")
        if tc.hidden_size != c.hidden_size:
            raise UserError(f"draft head hidden size {c.hidden_size} != target embedding width {tc.hidden_size}")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(target.model.embed_tokens.weight)

    def save(self, out_dir: str | Path) -> None:
        """config.json + model.safetensors in the official EAGLE-3 layout (no embedding)."""
        save_checkpoint(out_dir, {k: v for k, v in self.state_dict().items() if not k.startswith("embed_tokens")},
                        self.config.raw)


def load_eagle_head(path: str | Path, target) -> EagleHead:
    """Load a draft head directory (config.json + model.safetensors or pytorch_model.bin) in any
    layout `formats.detect` names (SafeAILab, AngelSlim, SGLang/SpecForge, speculators) onto the
    target's device/dtype, with the target's embedding (or the checkpoint's own, when it has one:
    speculators saves it and vLLM then uses it)."""
    fmt, raw = flat_config(read_config(path), path)
    if fmt not in EAGLE_FORMATS:
        raise UserError(f"{path} is a {fmt} checkpoint, not an EAGLE head; use the dflash decoder")
    if raw.get("num_hidden_layers", 1) != 1:
        raise UserError(f"{path}: EAGLE heads with {raw['num_hidden_layers']} decoder layers are not supported (one)")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        if key not in raw:
            raise UserError(f"{path}/config.json lacks {key!r}; is this an EAGLE draft head?")
    if fmt == "speculators-eagle3":
        flags = [f for f in UNSUPPORTED_FLAGS if raw.get(f)]
        if flags:
            raise UserError(f"{path}: speculators EAGLE-3 option {flags[0]}=true is not supported")
        if "norm_before_residual" not in raw:  # speculators' default is False, vLLM's True: do not guess
            raise UserError(f"{path}: speculators EAGLE-3 config lacks norm_before_residual "
                            "(speculators reads a missing key as false, vLLM as true); add it")
    elif "eagle_aux_hidden_state_layer_ids" in raw:
        raise UserError(f"{path}: top-level eagle_aux_hidden_state_layer_ids outside a speculators config is ambiguous "
                        "(vLLM: inputs of those layers, SGLang: outputs); put it in speculators' or SGLang's layout")
    config = EagleConfig(raw, fmt)
    with torch.device("meta"):
        head = EagleHead(config)
    head = head.to_empty(device=target.device)
    sd = load_state_dict(path)
    if fmt == "speculators-eagle3":
        sd = {("midlayer." + k[len("layers.0."):] if k.startswith("layers.0.") else k): v for k, v in sd.items()}
    Vd, V = head.config.draft_vocab_size, head.config.vocab_size
    if "d2t" not in sd and Vd == V:  # the official code drops the maps for a full draft vocab
        sd["d2t"], sd["t2d"] = torch.zeros(Vd, dtype=torch.long), torch.ones(V, dtype=torch.bool)
    if "fc.weight" in sd and sd["fc.weight"].shape[0] != config.hidden_size:
        raise UserError(f"draft head {path}: fc.weight has {sd['fc.weight'].shape[0]} outputs, not hidden_size "
                        f"{config.hidden_size} (AngelSlim's early-stop heads are not supported)")
    expected = {k: v for k, v in head.state_dict().items() if not k.startswith("embed_tokens")}
    copy_weights(expected, sd, f"draft head {path}")
    head.to(dtype=target.dtype)  # floating tensors only: d2t/t2d keep long/bool
    head.attach(target)
    if "embed_tokens.weight" in sd:
        if tuple(sd["embed_tokens.weight"].shape) != tuple(head.embed_tokens.weight.shape):
            raise UserError(f"draft head {path}: embed_tokens.weight has shape {tuple(sd['embed_tokens.weight'].shape)}")
        with torch.no_grad():
            head.embed_tokens.weight.copy_(sd["embed_tokens.weight"])
    head.feature_layers(target.config.num_hidden_layers)  # checks the aux ids against the target now
    head.eval().requires_grad_(False)
    return head
