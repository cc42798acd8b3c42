"""The DFlash drafter model and its checkpoint formats (z-lab, speculators DFlash / DSpark:
`load_dflash_drafter`); the decoder that drafts with it is `baselines/dflash.py` (docs/dflash.md).

The drafter (`DFlashDrafter`, our own code on the model core's building blocks) is a stack of
Qwen3-style layers with no embedding and no LM head of its own (it reads the target's):

- context: the target's hidden states at `target_layer_ids` (outputs of those layers, model-core
  indices; HF's hidden_states[id + 1]) of every committed position, concatenated and fused by
  `hidden_norm(fc(.))`. In EVERY drafter layer this one context row per position is projected by
  that layer's k_proj / v_proj (k_norm, RoPE at the position) and becomes extra keys/values
  ("KV injection"); the drafter's KV cache holds only these context entries.
- block: B = block_size tokens at positions P..P+B-1 = [newest committed token, MASK x (B-1)],
  embedded with the TARGET's embedding; queries come from the block only; each block row sees all
  context keys and the whole block (bidirectional), through `num_hidden_layers` layers, then
  `norm`; the target's `lm_head` reads rows 1..B-1: row i predicts the token AT position P+i
  (no shift). So one drafter forward proposes B-1 tokens.

vLLM speculators checkpoints (`speculators_model_type` dflash / dspark, `tidar_bench.formats`) load
into the same drafter; what differs from z-lab's layout, and how it is followed:
- aux layer id k = the input of target layer k: our target_layer_ids = k - 1;
- a reduced draft vocabulary: the checkpoint's own `lm_head [Vd, H]`, draft id -> target id
  + `d2t[id]` (the embedding is always the target's; a full-vocabulary lm_head is the target's);
- sliding-window drafter layers (`layer_types`): a block row sees the context of the `sliding_window`
  positions before the block and the block causally (`sliding_window_non_causal`: bidirectionally),
  speculators' training mask; z-lab's own sliding-window rule differs and is refused;
- `sample_from_anchor` (DSpark's default): block row k predicts position P+k+1, so B drafts, not B-1;
- DSpark's Markov head (`markov_rank`, vanilla): row k's logits + `markov_w2(markov_w1[prev])`, prev =
  the token before the one row k predicts (the anchor, then the drafts just chosen), so drafts are
  chosen left to right; sampled drafts keep their exact proposal rows, so speculative sampling stays
  exact. The confidence head only estimates acceptance and is not loaded.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from tidar_bench import masks
from tidar_bench.attention import select_backend
from tidar_bench.cache import KVCache
from tidar_bench.errors import UserError
from tidar_bench.formats import DFLASH_FORMATS, aux_to_model_core, flat_config
from tidar_bench.model import (Block, ModelConfig, RMSNorm, apply_rope, copy_weights, init_weights, load_state_dict, read_config,
                               rope_cos_sin, rope_inv_freq, save_checkpoint)


def default_target_layers(n_target_layers: int, n_draft_layers: int) -> list[int]:
    """The reference's choice: one layer per drafter layer, spread from layer 1 to L-3 (a single
    drafter layer taps L//2). Duplicates (tiny targets) are dropped."""
    if n_draft_layers == 1:
        return [n_target_layers // 2]
    start, end = 1, max(1, n_target_layers - 3)
    ids = [int(round(start + i * (end - start) / (n_draft_layers - 1))) for i in range(n_draft_layers)]
    return sorted({min(i, n_target_layers - 1) for i in ids})


class DFlashConfig:
    """The drafter's config.json, flattened by `formats.flat_config`. z-lab: a Qwen3 config +
    block_size, num_target_layers, dflash_config {mask_token_id, target_layer_ids, block_size (newer)};
    a top-level mask_token_id / target_layer_ids is accepted as well. speculators: + draft_vocab_size,
    aux_hidden_state_layer_ids (inputs of those layers), sliding_window_non_causal,
    sample_from_anchor, and for DSpark markov_rank / markov_head_type."""

    def __init__(self, raw: dict, format: str = "zlab-dflash"):
        self.raw, self.format = raw, format
        d = raw.get("dflash_config") or {}
        spec = format.startswith("speculators-")
        self.block_size = int(d.get("block_size", raw.get("block_size", 16)))
        self.mask_token_id = d.get("mask_token_id", raw.get("mask_token_id"))
        if spec:
            if raw.get("aux_hidden_state_layer_ids") is None:
                raise UserError("a speculators DFlash config without aux_hidden_state_layer_ids")
            layers = aux_to_model_core(raw["aux_hidden_state_layer_ids"], raw.get("num_target_layers", 1 << 30))
        else:
            layers = d.get("target_layer_ids", raw.get("target_layer_ids"))
            if layers is None:
                layers = default_target_layers(raw["num_target_layers"], raw["num_hidden_layers"])
        self.target_layer_ids = [int(i) for i in layers]
        # speculators' config-class defaults where a key is absent (DSpark: anchor-first, rank 256)
        self.sample_from_anchor = bool(raw.get("sample_from_anchor", format == "speculators-dspark")) if spec else False
        self.sliding_window_non_causal = bool(raw.get("sliding_window_non_causal", False))
        self.draft_vocab_size = int(raw.get("draft_vocab_size") or raw["vocab_size"]) if spec else raw["vocab_size"]
        self.markov_rank = int(raw.get("markov_rank", 256)) if format == "speculators-dspark" else 0
        if self.markov_rank and raw.get("markov_head_type", "vanilla") != "vanilla":
            raise UserError(f"DSpark markov_head_type {raw['markov_head_type']!r} is not supported (vanilla only)")
        types = raw.get("layer_types") or []
        # as transformers' Qwen3Config: the window exists only with use_sliding_window
        window = raw.get("sliding_window") if raw.get("use_sliding_window", False) else None
        self.sliding_layers = [i for i, t in enumerate(types) if t == "sliding_attention"] if window else []
        self.sliding_window = int(window) if self.sliding_layers else None
        bad = sorted({t for t in types if t not in ("full_attention", "sliding_attention")})
        if bad or ("sliding_attention" in types and not spec):  # z-lab: such a layer is causal, window or not
            raise UserError(f"DFlash drafter layer types {bad or ['sliding_attention']} are not supported "
                            "(sliding-window layers: speculators checkpoints only)")

    @property
    def own_lm_head(self) -> bool:
        """A reduced draft vocabulary comes with the checkpoint's own LM head (and d2t)."""
        return self.draft_vocab_size != self.raw["vocab_size"]

    @property
    def hidden_size(self) -> int:
        return self.raw["hidden_size"]

    def layer_config(self) -> ModelConfig:
        cfg = ModelConfig.from_dict(dict(self.raw, model_type="qwen3", use_sliding_window=False))
        cfg.o_bias = cfg.attention_bias  # the reference puts attention_bias on o_proj as well
        return cfg


class DFlashLayer(Block):
    """A Qwen3 decoder layer (the model core's, same parameters) whose attention also takes the
    context rows as keys/values."""

    def forward(self, x, ctx, cos, sin, mask, layer: int, cache: KVCache | None, start: int, attn):
        """x [B, q, H] block rows; ctx [B, c, H] fused context rows; cos/sin over [ctx | block]."""
        a = self.self_attn
        B, q, _ = x.shape
        h = self.input_layernorm(x)
        kv_in = torch.cat([ctx, h], dim=1)
        n = kv_in.shape[1]
        qs = a.q_norm(a.q_proj(h).view(B, q, a.n_heads, a.head_dim))
        ks = a.k_norm(a.k_proj(kv_in).view(B, n, a.n_kv, a.head_dim))
        vs = a.v_proj(kv_in).view(B, n, a.n_kv, a.head_dim).transpose(1, 2)
        qs = apply_rope(qs.transpose(1, 2), cos[:, :, n - q:], sin[:, :, n - q:])
        ks = apply_rope(ks.transpose(1, 2), cos, sin)
        if cache is not None:
            ks, vs = cache.write(layer, start, ks, vs)
            if isinstance(start, torch.Tensor) and mask.shape[-1] < ks.shape[2]:  # static step, kv_len
                ks, vs = ks[:, :, : mask.shape[-1]], vs[:, :, : mask.shape[-1]]
        out = attn(qs, ks, vs, mask)
        x = x + a.o_proj(out.transpose(1, 2).reshape(B, q, a.n_heads * a.head_dim))
        return x + self.mlp(self.post_attention_layernorm(x))


class MarkovHead(nn.Module):
    """DSpark's vanilla sequential head: a low-rank logit bias from the previous token."""

    def __init__(self, vocab: int, draft_vocab: int, rank: int):
        super().__init__()
        self.markov_w1 = nn.Embedding(vocab, rank)
        self.markov_w2 = nn.Linear(rank, draft_vocab, bias=False)

    def forward(self, prev: torch.Tensor) -> torch.Tensor:
        return self.markov_w2(self.markov_w1(prev)).float()


class DFlashDrafter(nn.Module):
    """Parameter names = the official checkpoints': layers.N.*, fc, hidden_norm, norm; speculators
    adds lm_head + d2t (reduced vocabulary) and DSpark markov_head.*."""

    def __init__(self, config: DFlashConfig):
        super().__init__()
        self.config = config
        lc = self.layer_config = config.layer_config()
        H = lc.hidden_size
        self.layers = nn.ModuleList(DFlashLayer(lc) for _ in range(lc.num_hidden_layers))
        self.fc = nn.Linear(len(config.target_layer_ids) * H, H, bias=False)
        self.hidden_norm = RMSNorm(H, lc.rms_norm_eps)
        self.norm = RMSNorm(H, lc.rms_norm_eps)
        self.lm_head = nn.Linear(H, config.draft_vocab_size, bias=False) if config.own_lm_head else None
        if config.own_lm_head:
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.markov_head = (MarkovHead(lc.vocab_size, config.draft_vocab_size, config.markov_rank)
                            if config.markov_rank else None)
        self.register_buffer("inv_freq", rope_inv_freq(lc), persistent=False)
        self.attn = select_backend("auto")

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)  # like Transformer: RoPE frequencies stay fp32 after any cast or move
        self.inv_freq = rope_inv_freq(self.layer_config).to(self.inv_freq.device)
        return self

    def draft_logits(self, states: torch.Tensor, target) -> torch.Tensor:
        """float32 logits over the draft vocabulary: the checkpoint's LM head, else the target's."""
        return (self.lm_head if self.lm_head is not None else target.lm_head)(states).float()

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        return draft_ids + self.d2t[draft_ids] if self.lm_head is not None else draft_ids

    def window_mask(self, position_ids: torch.Tensor, start: int, q: int, n: int) -> torch.Tensor:
        """[1, 1, q, start + n] keys a block row of a sliding-window layer sees (speculators' mask):
        the context of the `sliding_window` positions before the block's first position, and the
        block causally (all of it with sliding_window_non_causal). Cached context entries sit at
        their positions 0..start-1, as the decoder keeps them."""
        pos = position_ids[0]
        kpos = torch.cat([torch.arange(start, device=pos.device), pos[: n - q]])
        ctx = (kpos >= pos[n - q] - self.config.sliding_window)[None].expand(q, -1)
        blk = torch.ones(q, q, dtype=torch.bool, device=pos.device)
        if not self.config.sliding_window_non_causal:
            blk = blk.tril()
        return torch.cat([ctx, blk], dim=1)[None, None]

    def static_window_mask(self, position_ids: torch.Tensor, start: torch.Tensor, q: int, n: int,
                           T: int) -> torch.Tensor:
        """`window_mask` in a static step's form, [B, 1, q, T] over the cache slots (per-row offsets
        `start`, the fed entries at slots start..start+n-1, the block the last q): context slots hold
        the context of their own position, so the window is slot >= (block's first position) - W;
        the block causally unless sliding_window_non_causal. ANDed with the step's own mask."""
        slot = torch.arange(T, device=position_ids.device)
        ok = (slot[None] >= (position_ids[:, n - q] - self.config.sliding_window)[:, None])[:, None]  # [B, 1, T]
        if not self.config.sliding_window_non_causal:
            rel = slot[None] - (start.view(-1, 1) + n - q)  # [B|1, T]: index within the block
            ok = ok & (rel[:, None, :] <= torch.arange(q, device=slot.device)[None, :, None])
        return ok[:, None]

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def mask_token_id(self) -> int:
        return self.config.mask_token_id

    @property
    def target_layer_ids(self) -> list[int]:
        return self.config.target_layer_ids

    def new_cache(self, max_len: int, reuse: KVCache | None = None, batch: int = 1) -> KVCache:
        """Like the model core's: reused when big enough, sizes rounded up to a power of two (>= 256)."""
        if reuse is not None and reuse.max_len >= max_len and reuse.batch == batch:
            reuse.reset()
            return reuse
        lc, w = self.layer_config, self.fc.weight
        size = max(256, 1 << (max_len - 1).bit_length())
        return KVCache(lc.num_hidden_layers, lc.num_key_value_heads, lc.head_dim, size, batch=batch, dtype=w.dtype,
                       device=w.device)

    def forward(self, noise_emb: torch.Tensor, target_feats: torch.Tensor, position_ids: torch.Tensor,
                mask: torch.Tensor | None = None, cache: KVCache | None = None, start: torch.Tensor | None = None,
                window: torch.Tensor | None = None, kv_len: int | None = None) -> torch.Tensor:
        """noise_emb [B, q] block rows (the target's embedding of the block tokens); target_feats
        [B, c, F] concatenated target features of c context positions (c may be 0); position_ids
        [c + q] or [B, c + q] for [context | block]. The c + q fed entries are written to the cache
        (context AND block: crop afterwards to drop the block).

        mask: bool over [cached | fed] keys, with rows for the block ([q, ...]) or for all fed
        entries ([c + q, ...], the form of `compiled.Steps`: only the last q rows are used); None =
        every key. Eager (start None) as in the model core; start a long tensor = a static compiled
        step (`mask` is then the local mask of the fed entries, `masks.static_step`, over the
        cache's first `kv_len` slots: the attention window `compiled.Steps` passes). Returns the
        normed block states [B, q, H]; logits = target.lm_head(states)."""
        B, q, _ = noise_emb.shape
        ctx = self.hidden_norm(self.fc(target_feats))
        n = ctx.shape[1] + q
        static = start is not None
        if static:
            mask = masks.static_step(start, mask, n, kv_len or cache.max_len, window)
        elif cache is not None:
            start, _ = cache.reserve(n)
        else:
            start = 0
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, n)
        if mask is not None:
            mask = mask[None, None] if mask.dim() == 2 else mask
            mask = mask[..., -q:, :]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, noise_emb.dtype)
        swa = mask
        if self.config.sliding_layers:
            if static:
                swa = mask & self.static_window_mask(position_ids, start, q, n, mask.shape[-1])
            else:
                swa = self.window_mask(position_ids, start, q, n)
                swa = swa if mask is None else swa & mask
        x = noise_emb
        for i, layer in enumerate(self.layers):
            x = layer(x, ctx, cos, sin, swa if i in self.config.sliding_layers else mask, i, cache, start, self.attn)
        if cache is not None and not static:
            cache.advance(n)
        return self.norm(x)

    # ------------------------------------------------------------------------- construction, I/O

    @classmethod
    def from_target(cls, target, *, num_layers: int = 1, block_size: int = 16, mask_token_id: int,
                    target_layer_ids: Sequence[int] | None = None, seed: int = 0,
                    init: str = "random") -> "DFlashDrafter":
        """A fresh drafter sized like the target (layers of its shape). init "random", or "target":
        warm start from the target (`warm_start`)."""
        tc = target.config
        if num_layers < 1 or block_size < 2:
            raise UserError(f"a DFlash drafter needs >= 1 layer and block_size >= 2 (got {num_layers}, {block_size})")
        ids = list(target_layer_ids) if target_layer_ids else default_target_layers(tc.num_hidden_layers, num_layers)
        raw = {"architectures": ["DFlashDraftModel"], "model_type": "qwen3", "hidden_size": tc.hidden_size,
               "intermediate_size": tc.intermediate_size, "num_attention_heads": tc.num_attention_heads,
               "num_key_value_heads": tc.num_key_value_heads, "head_dim": tc.head_dim, "num_hidden_layers": num_layers,
               "num_target_layers": tc.num_hidden_layers, "block_size": block_size,
               "dflash_config": {"mask_token_id": int(mask_token_id), "target_layer_ids": ids},
               "vocab_size": tc.vocab_size, "rms_norm_eps": tc.rms_norm_eps, "rope_theta": tc.rope_theta,
               "rope_scaling": tc.rope_scaling, "max_position_embeddings": tc.max_position_embeddings,
               "attention_bias": False, "tie_word_embeddings": False, "use_sliding_window": False,
               "layer_types": ["full_attention"] * num_layers}
        drafter = cls(DFlashConfig(raw))
        init_weights(drafter, seed=seed)
        with torch.no_grad():  # the target's LM head reads the normed states: start near-uniform, not at
            drafter.norm.weight.fill_(0.1)  # logits of the size of the embedding norms (a CE of ~40 nats)
        drafter.to(device=target.device, dtype=target.dtype)
        drafter.check_target(target)
        if init == "target":
            drafter.warm_start(target)
        elif init != "random":
            raise UserError(f"init must be random or target, got {init!r}")
        return drafter

    @torch.no_grad()
    def warm_start(self, target) -> None:
        """Drafter layer i <- the weights of target layer L - n + i (attention, MLP, layer norms;
        what has no counterpart, e.g. q/k norms of a Llama target, stays as it is), fc <- the
        identity on the last tapped layer's block, final norm <- the target's. A training choice
        for small budgets (the attention already has useful patterns); the layout is unchanged."""
        src_layers = target.model.layers
        for i, layer in enumerate(self.layers):
            j = len(src_layers) - len(self.layers) + i
            if j < 0:
                continue
            src = dict(src_layers[j].named_parameters())
            for name, p in layer.named_parameters():
                if name in src and src[name].shape == p.shape:
                    p.copy_(src[name])
        H = self.config.hidden_size
        self.fc.weight.zero_()
        self.fc.weight[:, -H:] = torch.eye(H, dtype=self.fc.weight.dtype, device=self.fc.weight.device)
        self.norm.weight.copy_(target.model.norm.weight)

    def check_target(self, target) -> None:
        """The drafter reads the target's embedding, LM head and feature layers: check they fit."""
        tc, c = target.config, self.config
        if tc.hidden_size != c.hidden_size:
            raise UserError(f"DFlash drafter hidden size {c.hidden_size} != target hidden size {tc.hidden_size}")
        n_target = c.raw.get("num_target_layers", tc.num_hidden_layers)
        if n_target != tc.num_hidden_layers:
            raise UserError(f"DFlash drafter was built for a target with {n_target} layers, target has "
                            f"{tc.num_hidden_layers}")
        bad = [i for i in c.target_layer_ids if not 0 <= i < tc.num_hidden_layers]
        if bad:
            raise UserError(f"DFlash drafter taps target layers {bad} outside [0, {tc.num_hidden_layers})")
        if c.mask_token_id is None or not 0 <= int(c.mask_token_id) < tc.vocab_size:
            raise UserError(f"DFlash drafter mask_token_id {c.mask_token_id} is not a target token id "
                            f"(vocab {tc.vocab_size})")
        if c.raw.get("vocab_size", tc.vocab_size) != tc.vocab_size:
            raise UserError(f"DFlash drafter vocab_size {c.raw['vocab_size']} != target vocab_size {tc.vocab_size}")

    def save(self, out_dir: str | Path) -> None:
        """config.json + model.safetensors in the official layout."""
        save_checkpoint(out_dir, self.state_dict(), self.config.raw)


def target_context(hidden: dict[int, torch.Tensor], layer_ids: Sequence[int]) -> torch.Tensor:
    """[B, q, len(ids) * H] drafter context from a target forward run with hidden_layers=layer_ids."""
    return torch.cat([hidden[i] for i in layer_ids], dim=-1)


def load_dflash_drafter(path: str | Path, target) -> DFlashDrafter:
    """Load a drafter directory (z-lab DFlash or speculators DFlash / DSpark layout: config.json +
    model.safetensors or pytorch_model.bin) onto the target's device/dtype. Tensors the decode does
    not use (speculators' copy of the embedding, t2d, DSpark's confidence head) are not loaded."""
    fmt, raw = flat_config(read_config(path), path)
    if fmt not in DFLASH_FORMATS:
        raise UserError(f"{path} is a {fmt} checkpoint, not a DFlash drafter; use the eagle decoder")
    if "block_size" not in raw and "block_size" not in (raw.get("dflash_config") or {}):
        raise UserError(f"{path}/config.json lacks 'block_size'; is this a DFlash drafter?")
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size"):
        if key not in raw:
            raise UserError(f"{path}/config.json lacks {key!r}; is this a DFlash drafter?")
    try:
        config = DFlashConfig(raw, fmt)
    except KeyError as e:
        raise UserError(f"{path}/config.json lacks {e.args[0]!r} (and dflash_config.target_layer_ids)")
    with torch.device("meta"):
        drafter = DFlashDrafter(config)
    drafter = drafter.to_empty(device=target.device)
    sd = load_state_dict(path)
    expected = drafter.state_dict()
    copy_weights(expected, sd, f"DFlash drafter {path}")
    drafter.to(dtype=target.dtype)  # floating tensors only: d2t stays long
    drafter.check_target(target)
    drafter.eval().requires_grad_(False)
    return drafter
