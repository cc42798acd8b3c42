"""EAGLE-style speculative decoding: a one-layer draft head on the target's features drafts a
token tree, the target verifies the whole tree in ONE forward (tree attention), the longest
accepted path is kept. Lossless: greedy output == AR greedy, sampling keeps the target distribution.

The draft head (`EagleHead`, our own code on the model core's building blocks) comes in two forms:

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

Indices: "pair" i of the head = (feature of target position i, token i+1); it predicts token i+2
and outputs a hidden state standing in for the feature at i+1. The head keeps its own KV cache of
committed pairs; tree nodes are appended while drafting and cropped afterwards. Invariants after
every step: target cache == causal prefill of the committed tokens except the newest; head cache
== head prefill of the committed pairs except those of the newest accepted path (absorbed at the
start of the next step, with the target features the verification forward produced).

Drafting (EAGLE-2 dynamic tree, `tree=True`): the head's first forward (absorbing the accepted
pairs) gives the root's children; keep the top_k by log-prob; then `depth - 1` times feed the
frontier (top_k nodes), expand top_k children of each, score = cumulative log-prob, keep the
global top_k as the next frontier. All expanded nodes are reranked and the best total_tokens - 1
(parents always included) form the tree. `tree=False` drafts a chain of `chain_length` tokens
(argmax, or sampled from the head when sampling). So `depth` head forwards per step.

Verification: fed = [root (newest committed token) | tree nodes] at positions cache + node depth
under `masks.tree`; greedy: walk from the root, following the child whose token equals the target
argmax, and append the target argmax where the walk stops (bonus). Sampling: at each node the
children (deterministic candidates, best first) are tried in turn: candidate t is accepted with
probability p(t), else p(t) is zeroed and p renormalised (speculative sampling with a point-mass
proposal, exact for any draft-chosen candidate set); when all are rejected the token is drawn from
the residual p. Chains (`tree=False`, greedy or sampled from the head) are verified for every row at
once by `decoding.verify_chain`, the acceptance rule TiDAR and DFlash use. The accepted path's
target KV is compacted with `cache.keep`. Stats: nfe (target forwards), draft_forwards (the
prompt's pairs in the prefill, then `depth` per step), accepted lengths = accepted drafts + 1 (EAGLE's tau).

Written once over B rows (`tidar_bench.engine`; batch 1 is B = 1): each row has its own target
length, head length and pending pairs; every row has top_k frontier nodes after depth 1, so each
expand step is one head forward over [B, top_k] (per-row key windows over the row's tree slots);
the rerank and the tree walk are per row on the host (chains: `verify_chain`, all rows on the
device); verification is [B, total_tokens] (padded with inert nodes), and each row keeps its own
accepted path (`KVCache.keep(row=)`).
Compiled (and at B > 1) the three step shapes are fixed: absorb depth + 1 pairs, expand top_k
nodes, verify total_tokens; eager batch 1 runs exact shapes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from tidar_bench.attention import select_backend
from tidar_bench.cache import KVCache
from tidar_bench.compiled import steps_for
from tidar_bench.decoding import GenerationConfig, next_token, sample, stack_rows, verify_chain, warp_probs
from tidar_bench.engine import Row, RowDecoder
from tidar_bench.errors import UserError
from tidar_bench.formats import EAGLE_FORMATS, aux_to_model_core, flat_config
from tidar_bench.model import (MLP, Attention, Block, ModelConfig, RMSNorm, init_weights, load_state_dict, prepare_step,
                               read_config, rope_cos_sin, rope_inv_freq, save_checkpoint)
from tidar_bench.registry import DecoderContext, register_decoder

FORMS = ("eagle3", "eagle1")

# ----------------------------------------------------------------------------- the draft head


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
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise UserError(f"draft head {path} lacks {len(missing)} tensors, e.g. {missing[0]}")
    with torch.no_grad():
        for name, p in expected.items():
            if tuple(sd[name].shape) != tuple(p.shape):
                raise UserError(f"draft head {path}: {name} has shape {tuple(sd[name].shape)}, "
                                f"config implies {tuple(p.shape)}")
            p.copy_(sd[name].to(p.dtype))
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


# ----------------------------------------------------------------------------- the decoder


@dataclass
class DraftTree:
    """Drafted nodes in creation order (parents first). parent -1 = the root."""

    tokens: list[int]
    parents: list[int]
    depths: list[int]
    draft_probs: torch.Tensor | None = None  # chains sampled from the head: [n, V] proposal distributions

    def children(self) -> list[list[int]]:
        """Fed-index children lists (fed index 0 = root, node i = fed index i + 1), in order."""
        ch: list[list[int]] = [[] for _ in range(len(self.tokens) + 1)]
        for i, p in enumerate(self.parents):
            ch[p + 1].append(i + 1)
        return ch


def tree_sample_walk(fed_tokens: list[int], children: list[list[int]], probs: torch.Tensor,
                     generator: torch.Generator | None) -> tuple[list[int], int]:
    """Sampling verification of a tree with deterministic candidates. probs [n_fed, V] are the
    warped target distributions at every fed node. Returns (accepted fed path from the root, next token)."""
    path = [0]
    node = 0
    while True:
        p = probs[node].clone()
        moved = False
        for c in children[node]:
            t = fed_tokens[c]
            u = float(torch.rand((), generator=generator, device=p.device))
            if u < float(p[t]):
                path.append(c)
                node, moved = c, True
                break
            p[t] = 0.0
            total = float(p.sum())
            if total <= 0:  # only reachable with probability 0; keep a valid distribution
                p = probs[node].clone()
                break
            p = p / total
        if not moved:
            return path, int(sample(p, generator))


@dataclass
class _RowState:
    """One row's EAGLE state between steps (see the module doc's invariants)."""

    tok: int  # newest committed token (its target KV comes with the next verification)
    hlen: int  # committed pairs in the head cache
    pairs: list[int]  # tokens of the pairs not absorbed yet (the newest accepted path)
    feats: torch.Tensor | None  # their target features [len(pairs), F]
    front: tuple[torch.Tensor, torch.Tensor] | None  # (hidden, logits) of the newest absorbed pair, when pairs == []
    history: list[int]  # prompt + committed tokens (for `on_step`)


def tree_masks(parents: torch.Tensor) -> torch.Tensor:
    """[B, n, n] tree attention of B rows of fed nodes (parents [B, n], -1 = a root: sees only
    itself; `masks.tree` of each row), built by following parent links (depth steps), not per node."""
    B, n = parents.shape
    m = torch.eye(n, dtype=torch.bool).repeat(B, 1, 1)
    rows, cols = torch.arange(B)[:, None].expand(B, n), torch.arange(n)[None].expand(B, n)
    anc = parents.clone()
    while bool((anc >= 0).any()):
        live = anc >= 0
        m[rows[live], cols[live], anc[live]] = True
        anc = torch.where(live, parents.gather(1, anc.clamp(min=0)), anc)
    return m


class EagleDecoder(RowDecoder):
    """Written over B rows (`tidar_bench.engine`): every step drafts a tree (or chain) per row, the
    head's expand steps batched as [B, top_k], and verifies [B, total_tokens] in one target forward;
    batch 1 is B = 1."""

    name = "eagle"
    lossless = True

    def __init__(self, model, head: EagleHead, tokenizer=None, *, tree: bool = True, depth: int = 6, top_k: int = 4,
                 total_tokens: int = 32, chain_length: int = 5, compile: str = "off"):
        if min(depth, top_k, chain_length) < 1 or total_tokens < 2:
            raise ValueError("depth, top_k and chain_length must be >= 1 and total_tokens >= 2")
        self.model, self.head, self.tokenizer = model, head, tokenizer
        self.tree = tree
        if tree:
            self.depth, self.top_k, self.total_tokens = depth, min(top_k, head.lm_head.out_features), total_tokens
        else:
            self.depth, self.top_k, self.total_tokens = chain_length, 1, chain_length + 1
        # cache headroom past a row's committed length: verification, absorb (depth + 1), tree nodes
        self.step_rows = max(self.total_tokens, self.depth + 1, (self.depth - 1) * self.top_k + 1)
        self.layers = head.feature_layers(model.config.num_hidden_layers)
        # compiled mode (and B > 1): three fixed shapes (absorb depth+1 pairs, expand top_k nodes,
        # verify total_tokens), padded where a step has fewer; see tidar_bench/compiled.py
        self.target_steps = steps_for(model, model, compile)
        self.head_steps = steps_for(model, head, compile)
        # tests observe every step at batch 1: on_step(target cache, prompt + committed tokens)
        self.on_step: Callable | None = None

    def options(self) -> dict:
        o = {"form": self.head.form, "format": self.head.config.format, "target_layers": list(self.layers),
             "draft_vocab_size": self.head.lm_head.out_features, "tree": self.tree,
             "depth": self.depth, "compile": self.target_steps.compiled}
        if self.tree:
            o.update(top_k=self.top_k, total_tokens=self.total_tokens)
        else:
            o.update(chain_length=self.depth)
        return o

    def runners(self) -> list:
        return [self.target_steps, self.head_steps]

    @property
    def _hcache(self) -> KVCache | None:
        return self.caches.get("head")

    def new_caches(self, batch: int, max_len: int, reuse: dict) -> dict:
        return {"target": self.model.new_cache(max_len, batch=batch, reuse=reuse.get("target")),
                "head": self.head.new_cache(max_len, reuse=reuse.get("head"), batch=batch)}

    def begin(self, batch: int, config: GenerationConfig) -> None:
        self._sp = config.sampling

    def prefill(self, row: Row, prompt: list[int], caches: dict) -> list[int]:
        """Target prefill, then the head absorbs every prompt pair (feature i, token i+1)."""
        dev, L = self.model.device, len(prompt)
        out = self.model(torch.tensor([prompt], device=dev), cache=caches["target"], hidden_layers=self.layers,
                         logits_index=slice(-1, None))
        tok = int(next_token(out.logits[0, -1], self._sp, row.gen))
        feats = target_features(self.model, out.hidden_states, self.head.form, self.layers)
        hidden, logits = self.head(torch.tensor([prompt[1:] + [tok]], device=dev), target_feats=feats,
                                   cache=caches["head"])
        row.stats.nfe, row.stats.tokens_fed, row.stats.draft_forwards = 1, [L], 1
        row.length = L
        row.state = _RowState(tok, L, [], None, (hidden[0, -1], logits[0, -1]), prompt + [tok])
        return [tok]

    def step(self, rows: list[Row | None]) -> list[list[int] | None]:
        B, dev, sp = len(rows), self.model.device, self._sp
        cache, hcache = self.caches["target"], self.caches["head"]
        live = [s for s, r in enumerate(rows) if r is not None]
        st: list[_RowState | None] = [r.state if r is not None else None for r in rows]
        padded = self.target_steps.compiled or B > 1  # fixed shapes (eager batch 1: exact shapes)
        if any(st[s].pairs for s in live):
            self._absorb(rows, st, hcache, padded)
        trees = self._draft(rows, st, hcache)

        # verification: [root (newest token) | tree nodes] of every row, padded with inert nodes
        n = self.total_tokens if padded else len(trees[live[0]].tokens) + 1
        fed = [[0] * n for _ in range(B)]
        pos = [[0] * n for _ in range(B)]
        parents = [[-1] * n for _ in range(B)]
        for s in live:
            t, r = trees[s], rows[s]
            m = len(t.tokens) + 1
            fed[s][:m] = [st[s].tok] + t.tokens
            parents[s][1:m] = [p + 1 for p in t.parents]
            pos[s] = [r.length] + [r.length + d for d in t.depths] + [r.length] * (n - m)
        local = tree_masks(torch.tensor(parents)).to(dev)
        starts = [r.length if r is not None else 0 for r in rows]
        fed_t = torch.tensor(fed, device=dev)
        out = self.target_steps(fed_t, torch.tensor(pos, device=dev), cache=cache,
                                local_mask=local, hidden_layers=self.layers, starts=starts)
        chains = None if self.tree else self._verify_chains(rows, trees, fed_t, out.logits)
        best = out.logits.argmax(-1).tolist() if sp.greedy and self.tree else None
        feats = target_features(self.model, out.hidden_states, self.head.form, self.layers)
        committed: list[list[int] | None] = [None] * B
        for s in live:
            row, x, t = rows[s], st[s], trees[s]
            fed_tokens = fed[s][: len(t.tokens) + 1]
            if chains is not None:  # a chain: its first n drafts, then the target's token
                path, tok = list(range(chains[s][0] + 1)), chains[s][1]
            else:
                path, tok = self._verify(out.logits[s], best[s] if best else None, fed_tokens, t, row.gen)
            if path[-1] != len(path) - 1:  # a branch, not the fed prefix: move its KV behind the cache
                cache.keep([row.length + i for i in path], row=s)
            accepted = [fed_tokens[i] for i in path[1:]] + [tok]
            row.stats.nfe += 1
            row.stats.tokens_fed.append(n)
            row.stats.accepted_lengths.append(len(accepted))
            row.length += len(path)
            x.tok, x.pairs, x.feats = tok, accepted, feats[s, path]
            x.history += accepted
            committed[s] = accepted
        if B == 1 and self.on_step is not None:
            cache.length, hcache.length = rows[0].length, st[0].hlen
            self.on_step(cache, st[0].history)
        return committed

    def _absorb(self, rows: list[Row | None], st: list[_RowState | None], hcache: KVCache, padded: bool) -> None:
        """Feed every row's newly committed pairs to the head; keep (hidden, logits) of each row's
        last one. Padded: always depth + 1 pairs per row, causal, so the real pairs come first and
        never see the padding (its outputs are dropped, its KV lies past the row's head length)."""
        dev, B = self.model.device, len(rows)
        live = [s for s, x in enumerate(st) if x is not None and x.pairs]
        A = self.depth + 1 if padded else len(st[live[0]].pairs)
        F = st[live[0]].feats.shape[-1]
        ids = [[0] * A for _ in range(B)]
        f = torch.zeros(B, A, F, dtype=st[live[0]].feats.dtype, device=dev)
        for s in live:
            n = len(st[s].pairs)
            ids[s][:n] = st[s].pairs
            f[s, :n] = st[s].feats
        hl = [x.hlen if x is not None else 0 for x in st]
        pos = torch.tensor(hl, device=dev)[:, None] + torch.arange(A, device=dev)
        hidden, logits = self.head_steps(torch.tensor(ids, device=dev), cache=hcache, target_feats=f,
                                         position_ids=pos, starts=hl)
        for s in live:
            x, n = st[s], len(st[s].pairs)
            x.front = (hidden[s, n - 1], logits[s, n - 1])
            x.hlen += n
            x.pairs, x.feats = [], None
            rows[s].stats.draft_forwards += 1

    def _draft(self, rows: list[Row | None], st: list[_RowState | None], hcache: KVCache) -> list[DraftTree | None]:
        """Grow every row's draft tree from its newest pair's (hidden, logits): depth 1 takes the
        top_k children of the root, then each expand step feeds every row's top_k frontier nodes
        ([B, top_k], one head forward) over the key window of the row's tree slots. The head
        cache keeps only the committed pairs (tree nodes lie past each row's head length)."""
        head, dev, sp, B = self.head, self.model.device, self._sp, len(rows)
        k, sampled_chain = self.top_k, not self.tree and not sp.greedy
        live = [s for s in range(B) if st[s] is not None]
        tokens: list[list[int]] = [[] for _ in range(B)]
        parents: list[list[int]] = [[] for _ in range(B)]
        depths: list[list[int]] = [[] for _ in range(B)]
        scores: list[list[float]] = [[] for _ in range(B)]
        q_rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
        anc_slots: list[dict[int, list[int]]] = [{} for _ in range(B)]  # node -> its ancestors' + own tree slots

        def expand(logits_rows: torch.Tensor, parent_nodes: list[list[int]], depth: int) -> list[list[int]]:
            """Add the top-k children of each parent of each row (logits_rows [B, r, V_d]); the new ids."""
            if sampled_chain:  # one child, sampled from the head with the row's generator
                d = torch.zeros(B, 1, 1, dtype=torch.long, device=dev)
                for s in live:
                    q = warp_probs(logits_rows[s, 0], sp)
                    d[s, 0, 0] = sample(q, rows[s].gen)
                    q_rows[s].append(torch.zeros(head.config.vocab_size, device=dev).index_put_(
                        (head.to_target(torch.arange(q.numel(), device=dev)),), q))
                lp = [[[0.0]]] * B
            else:
                lp, d = logits_rows.log_softmax(-1).topk(k, dim=-1)
                lp = lp.tolist()
            tgt = head.to_target(d).tolist()
            new: list[list[int]] = [[] for _ in range(B)]
            for s in live:
                for r, par in enumerate(parent_nodes[s]):
                    base = 0.0 if par == -1 else scores[s][par]
                    for j, t in enumerate(tgt[s][r]):
                        new[s].append(len(tokens[s]))
                        tokens[s].append(t)
                        parents[s].append(par)
                        depths[s].append(depth)
                        scores[s].append(base + lp[s][r][j])
            return new

        zero = st[live[0]].front
        front = [st[s].front if st[s] is not None else (torch.zeros_like(zero[0]), torch.zeros_like(zero[1]))
                 for s in range(B)]
        frontier = expand(torch.stack([f[1] for f in front])[:, None], [[-1]] * B, 1)
        front_hidden = torch.stack([f[0] for f in front])[:, None].expand(-1, k, -1).contiguous()
        hl = [x.hlen if x is not None else 0 for x in st]
        W = (self.depth - 1) * k  # head-cache slots the tree can take: the key window of every expand step
        for depth in range(2, self.depth + 1):
            base = (depth - 2) * k  # this step's nodes' slots in the window
            local = torch.zeros(B, k, W, dtype=torch.bool)
            ids = [[0] * k for _ in range(B)]
            for s in range(B):
                for r in range(k):
                    if st[s] is None:  # an empty slot: each node sees only itself
                        local[s, r, base + r] = True
                        continue
                    node = frontier[s][r]
                    anc_slots[s][node] = anc_slots[s].get(parents[s][node], []) + [base + r]
                    local[s, r, anc_slots[s][node]] = True
                    ids[s][r] = tokens[s][node]
            pos = torch.tensor([h + depth - 2 for h in hl], device=dev)[:, None].expand(B, k)
            h, lg = self.head_steps(torch.tensor(ids, device=dev), cache=hcache, local_mask=local.to(dev), window=hl,
                                    hidden=front_hidden, position_ids=pos, starts=[x + base for x in hl])
            for s in live:
                rows[s].stats.draft_forwards += 1
            children = expand(lg, frontier, depth)
            best = [[] for _ in range(B)]
            idx = [[0] * k for _ in range(B)]
            for s in live:
                best[s] = children[s] if sampled_chain else sorted(children[s], key=lambda i: -scores[s][i])[:k]
                idx[s] = [frontier[s].index(parents[s][i]) for i in best[s]]
            front_hidden = h.gather(1, torch.tensor(idx, device=dev)[..., None].expand(-1, -1, h.shape[-1]))
            frontier = best
        if B == 1:
            hcache.length = hl[0]
        return [self._rerank(tokens[s], parents[s], depths[s], scores[s], q_rows[s] if sampled_chain else None)
                if st[s] is not None else None for s in range(B)]

    def _rerank(self, tokens: list[int], parents: list[int], depths: list[int], scores: list[float],
                q_rows: list[torch.Tensor] | None) -> DraftTree:
        """The total_tokens - 1 best nodes by cumulative log-prob, parents always included."""
        chosen: set[int] = set()
        for i in sorted(range(len(tokens)), key=lambda i: (-scores[i], depths[i])):
            if len(chosen) == self.total_tokens - 1:
                break
            if parents[i] == -1 or parents[i] in chosen:
                chosen.add(i)
        keep = sorted(chosen)
        fed_index = {node: j for j, node in enumerate(keep)}
        return DraftTree(tokens=[tokens[i] for i in keep],
                         parents=[-1 if parents[i] == -1 else fed_index[parents[i]] for i in keep],
                         depths=[depths[i] for i in keep],
                         draft_probs=torch.stack(q_rows) if q_rows is not None else None)

    def _verify_chains(self, rows: list[Row | None], trees: list[DraftTree | None], fed: torch.Tensor,
                       logits: torch.Tensor) -> list[list[int]]:
        """Chains (tree=False), every row at once: `decoding.verify_chain` (greedy, or speculative
        sampling against the head's proposal rows with each row's own generator) on the device, one
        host read. fed [B, n] = [root | chain | padding]; logits [B, n, V]. Per row [n accepted, token]."""
        sp = self._sp
        drafts = fed[:, 1:]
        nv = [len(t.tokens) if t is not None else 0 for t in trees]
        if sp.greedy:
            n, tok = verify_chain(drafts, logits, n_valid=nv)
        else:
            q = stack_rows([t.draft_probs if t is not None else None for t in trees], drafts.shape[1])
            n, tok = verify_chain(drafts, warp_probs(logits, sp), q, n_valid=nv,
                                  generators=[r.gen if r is not None else None for r in rows])
        return torch.stack([n, tok], 1).tolist()

    def _verify(self, logits: torch.Tensor, best: list[int] | None, fed_tokens: list[int], tree: DraftTree,
                gen) -> tuple[list[int], int]:
        """One row of a tree: (accepted path of fed indices, starting with the root; the target's next
        token). logits [n, V] of the fed nodes (padding after them); best: their argmax (greedy). The
        tree walk is its own rule (several candidates per node), not `decoding.verify_chain`."""
        children = tree.children()
        if best is None:
            return tree_sample_walk(fed_tokens, children, warp_probs(logits, self._sp), gen)
        path = [0]
        while True:
            nxt = next((c for c in children[path[-1]] if fed_tokens[c] == best[path[-1]]), None)
            if nxt is None:
                return path, best[path[-1]]
            path.append(nxt)


@register_decoder("eagle", needs_draft=True,
                  help="EAGLE-style speculative decoding: one-layer draft head (--draft DIR, EAGLE-3 layout), "
                       "dynamic draft tree verified in one target forward")
def build(ctx: DecoderContext, *, tree: bool = True, depth: int = 6, top_k: int = 4, total_tokens: int = 32,
          chain_length: int = 5, compile: str = "auto") -> EagleDecoder:
    head = load_eagle_head(ctx.draft_path, ctx.model)
    return EagleDecoder(ctx.model, head, ctx.tokenizer, tree=tree, depth=depth, top_k=top_k,
                        total_tokens=total_tokens, chain_length=chain_length, compile=compile)
