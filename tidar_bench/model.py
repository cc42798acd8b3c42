"""A compact decoder-only transformer for Llama, Qwen2 and Qwen3 checkpoints.

Written for decoders that need control: every forward takes explicit position ids, an arbitrary
boolean attention mask over [cached + fed] keys, and a static KV cache (tidar_bench.cache). Module
names follow the HF checkpoint layout so a state dict loads without renaming.

Family differences handled here: Qwen2 has q/k/v biases; Qwen3 normalises q and k per head
(RMSNorm over head_dim) before RoPE; Llama 3.x scales RoPE frequencies ("llama3" rope_type).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .attention import math as math_attention
from .attention import flex_block, is_block_mask, select_backend
from .cache import KVCache
from .errors import UserError
from .masks import static_step

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
# Checkpoints whose body is a supported family under another model_type: the tensors and config keys
# are that family's, and what the name adds (mask id, block size) is read by the decoder that uses it
# (baselines/block_diffusion.py). SDAR: JetLM/SDAR-*-Chat (modeling_sdar.py is Qwen3's, with is_causal
# off); Fast_dLLM_Qwen: Efficient-Large-Model/Fast_dLLM_v2_* (Qwen2).
MODEL_TYPE_ALIASES = {"sdar": "qwen3", "Fast_dLLM_Qwen": "qwen2"}
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Qwen2: always; Llama: config flag, also on o)
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    extra: dict = field(default_factory=dict)  # the raw config.json, for tools that need more

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        mt = MODEL_TYPE_ALIASES.get(d.get("model_type"), d.get("model_type"))
        if mt not in SUPPORTED_MODEL_TYPES:
            names = ", ".join(SUPPORTED_MODEL_TYPES + tuple(MODEL_TYPE_ALIASES))
            raise UserError(f"unsupported model_type {d.get('model_type')!r}; supported: {names}")
        if mt == "qwen3" and d.get("attention_bias"):  # HF Qwen3 then has an o_proj bias too; not built here
            raise UserError(f"model_type {d.get('model_type')!r} with attention_bias: true is not supported")
        if d.get("use_sliding_window"):
            raise UserError("sliding-window attention (use_sliding_window: true) is not supported")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        # transformers 5 stores rope settings in `rope_parameters`; older configs use rope_theta/rope_scaling
        rope = dict(d.get("rope_parameters") or {})
        theta = rope.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling = d.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        if scaling is not None:
            rt = scaling.get("rope_type", scaling.get("type", "default"))
            if rt not in ("default", "llama3", "linear"):
                raise UserError(f"unsupported rope scaling {rt!r}; supported: default, llama3, linear")
            if rt == "default":
                scaling = None
        llama_bias = bool(d.get("attention_bias", False))
        return cls(
            model_type=mt,
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(theta),
            rope_scaling=scaling,
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            attention_bias=True if mt == "qwen2" else llama_bias,
            o_bias=llama_bias if mt == "llama" else False,
            mlp_bias=bool(d.get("mlp_bias", False)) if mt == "llama" else False,
            qk_norm=mt == "qwen3",
            extra=d,
        )


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    s = cfg.rope_scaling
    if s is None:
        return inv.float()
    rt = s.get("rope_type", s.get("type"))
    if rt == "linear":
        return (inv / s["factor"]).float()
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
    factor, lo, hi = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old = s.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / inv
    smooth = ((old / wavelen) - lo) / (hi - lo)
    scaled = torch.where(wavelen > old / lo, inv / factor, inv)
    mid = (wavelen <= old / lo) & (wavelen >= old / hi)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(mid, blended, scaled).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, q, D]; cos/sin [B, 1, q, D] (halves repeated). Rotates pairs (i, i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        h, kv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv, self.head_dim = h, kv, d
        self.q_proj = nn.Linear(cfg.hidden_size, h * d, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv * d, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(h * d, cfg.hidden_size, bias=cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, cos, sin, mask, layer: int, cache: KVCache | None, start: int, attn):
        B, q, _ = x.shape
        qs = self.q_proj(x).view(B, q, self.n_heads, self.head_dim)
        ks = self.k_proj(x).view(B, q, self.n_kv, self.head_dim)
        vs = self.v_proj(x).view(B, q, self.n_kv, self.head_dim).transpose(1, 2)
        if self.qk_norm:
            qs, ks = self.q_norm(qs), self.k_norm(ks)
        qs = apply_rope(qs.transpose(1, 2), cos, sin)
        ks = apply_rope(ks.transpose(1, 2), cos, sin)
        if cache is not None:
            ks, vs = cache.write(layer, start, ks, vs)
            if isinstance(start, torch.Tensor) and mask.shape[-1] < ks.shape[2]:  # static step, kv_len
                ks, vs = ks[:, :, : mask.shape[-1]], vs[:, :, : mask.shape[-1]]
        out = attn(qs, ks, vs, mask)
        return self.o_proj(out.transpose(1, 2).reshape(B, q, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, layer, cache, start, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, layer, cache, start, attn)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Named `model` inside Transformer so parameter names match HF checkpoints."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [B, q or len(logits_index), V], float32
    hidden_states: dict[int, torch.Tensor]  # layer index -> [B, q, H] output of that layer


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """RoPE tables [B, 1, q, head_dim] for position ids [B, q], computed in fp32, cast to dtype."""
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]


def prepare_step(input_ids: torch.Tensor, position_ids: torch.Tensor | None, mask: torch.Tensor | None,
                 cache: KVCache | None, start: torch.Tensor | None = None, window: torch.Tensor | None = None,
                 kv_len: int | None = None):
    """Shared by every forward over the cache (the model, draft heads): normalise positions/mask.

    Eager (start None): reserve cache room; returns (start = cache length before the call, position
    ids [B, q], mask [B, 1, q, C + q] or "causal" or None (q == 1 attends to everything cached)).
    Static (start a long tensor, compiled mode): `mask` is the local [q, q] / [B, q, q] mask of the
    fed tokens (None: causal), or of the key window starting at `window`, and becomes
    `masks.static_step` over the whole cache (or its first `kv_len` slots); positions are required;
    the host cache length is left alone (the caller advances it)."""
    B, q = input_ids.shape
    if start is not None:
        if cache is None or position_ids is None:
            raise ValueError("a static step needs a cache and explicit position ids")
        if position_ids.dim() == 1:
            position_ids = position_ids[None].expand(B, q)
        return start, position_ids, static_step(start, mask, q, kv_len or cache.max_len, window)
    start = cache.length if cache is not None else 0
    if cache is not None:
        cache.reserve(q)
    if position_ids is None:
        position_ids = torch.arange(start, start + q, device=input_ids.device)
    if position_ids.dim() == 1:
        position_ids = position_ids[None].expand(B, q)
    if mask is None:
        mask = None if q == 1 else "causal"
    elif isinstance(mask, torch.Tensor) and mask.dim() == 2:  # else a tensor [B|1, 1, q, T] or a BlockMask
        mask = mask[None, None]
    return start, position_ids, mask


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # see `ensure_rope_table`
        self.attn = select_backend("auto")

    def _apply(self, fn, recurse=True):
        # .to(bf16) & co would cast the RoPE frequencies too; they must stay fp32 (HF keeps them
        # fp32 as well), so recompute them on the new device after any cast or move.
        super()._apply(fn, recurse)
        self.inv_freq = rope_inv_freq(self.config).to(self.inv_freq.device)
        self.rope_table = None  # rebuilt on the new device by the next new_cache
        return self

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def new_cache(self, max_len: int, batch: int = 1, reuse: KVCache | None = None) -> KVCache:
        """A static cache for at least max_len tokens; `reuse` (a decoder's cache from its last call)
        is reset and returned when it is big enough, so repeated calls allocate nothing. Sizes are
        rounded up to a power of two (>= 256): compiled steps have the cache length in their shape,
        so a few sizes mean a few compilations, not one per prompt length."""
        if reuse is not None and reuse.max_len >= max_len and reuse.batch == batch:
            reuse.reset()
            return reuse
        c = self.config
        size = max(256, 1 << (max_len - 1).bit_length())
        self.ensure_rope_table(size)
        return KVCache(c.num_hidden_layers, c.num_key_value_heads, c.head_dim, size,
                       batch=batch, dtype=self.dtype, device=self.device)

    def ensure_rope_table(self, n: int) -> None:
        """cos/sin (fp32, [n, head_dim]) of every position below n, for static steps: a compiled
        step indexes them by position instead of computing cos/sin, which inductor would otherwise
        recompute inside the fused attention kernel once per cached key. Built outside any compiled
        region (by `new_cache`, for positions below the cache size); the same fp32 values as
        `rope_cos_sin`, cast to the model dtype after indexing."""
        if self.rope_table is not None and self.rope_table[0].shape[0] >= n:
            return
        cos, sin = rope_cos_sin(torch.arange(n, device=self.inv_freq.device)[None], self.inv_freq, torch.float32)
        self.rope_table = (cos[0, 0], sin[0, 0])
        if self.inv_freq.device.type == "cuda":  # CUDA graphs: read in place, not copied per replay
            for t in self.rope_table:
                torch._dynamo.mark_static_address(t)

    def rope(self, position_ids: torch.Tensor, static_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE tables [B, 1, q, head_dim]; a static step over a cache of `static_len` slots reads
        them from `rope_table` when it covers the cache (positions stay below the cache size)."""
        t = self.rope_table
        if static_len is not None and t is not None and t[0].shape[0] >= static_len:
            return t[0][position_ids].to(self.dtype)[:, None], t[1][position_ids].to(self.dtype)[:, None]
        return rope_cos_sin(position_ids, self.inv_freq, self.dtype)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        *,
        hidden_layers: Sequence[int] = (),
        logits_index: torch.Tensor | slice | None = None,
        return_logits: bool = True,
        start: torch.Tensor | None = None,
        window: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> ForwardOutput:
        """input_ids [B, q]. position_ids [B, q] or [q] (default: cache.length + arange(q)).

        mask: bool [q, C + q] or [B, 1, q, C + q] over [cached keys | fed keys], True = attend
        (C = cache.length before this call, 0 without a cache), or a FlexAttention BlockMask
        (training without a cache, `masks.block_mask`). None means causal over the fed
        tokens with full access to the cache. With a cache, the fed tokens' keys/values are
        written at [C, C + q) and cache.length advances by q; crop() to evict them.

        hidden_layers: layer indices whose outputs to return (-1 or L-1: last layer, pre-norm).
        logits_index: positions (among the q) to compute logits for; default all; a [B, r] long
        tensor picks r positions per row.

        start: a long tensor for a static-shape step (compiled mode, `prepare_step`): mask is then
        the local mask of the fed tokens (or of the key window from `window`), the cache buffers
        keep their full shape and cache.length is not advanced (the caller does it; see
        tidar_bench/compiled.py). kv_len (static steps): attend over the first kv_len cache slots
        only, which must cover every key the step attends (compiled steps pass a bucket of 128)."""
        static = start is not None
        start, position_ids, mask = prepare_step(input_ids, position_ids, mask, cache, start, window, kv_len)
        cos, sin = self.rope(position_ids, cache.max_len if static else None)
        want = {i % self.config.num_hidden_layers for i in hidden_layers}
        hidden: dict[int, torch.Tensor] = {}
        x = self.model.embed_tokens(input_ids)
        attn = math_attention if static and x.device.type == "cpu" else self.attn
        if is_block_mask(mask):  # training with FlexAttention block masks (masks.block_mask)
            attn = flex_block
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, mask, i, cache, start, attn)
            if i in want:
                hidden[i] = x
        if cache is not None and not static:
            cache.advance(input_ids.shape[1])
        if not return_logits:
            return ForwardOutput(logits=torch.empty(0), hidden_states=hidden)
        if isinstance(logits_index, torch.Tensor) and logits_index.dim() == 2:  # [B, r]: per row
            x = x.gather(1, logits_index[..., None].expand(-1, -1, x.shape[-1]))
        elif logits_index is not None:
            x = x[:, logits_index]
        logits = self.lm_head(self.model.norm(x)).float()
        return ForwardOutput(logits=logits, hidden_states=hidden)


# ----------------------------------------------------------------------------- loading


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"unknown device {device!r}; use cpu, cuda, cuda:N or auto")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for, but CUDA is not available on this machine")
    if dev.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use one of: auto, float32, bfloat16, float16")
    dt = DTYPES[dtype]
    if device.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise UserError("bfloat16 is not supported on this GPU; use --dtype float16 or float32")
    return dt


def read_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"model directory not found: {path}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"no config.json in {path}")
    try:
        return json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"config.json in {path} is not valid JSON: {e}")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint directory: model.safetensors, sharded safetensors with an index,
    or (only through torch.load(weights_only=True)) pytorch_model.bin."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    try:
        if single.is_file():
            return load_file(str(single))
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            sd: dict[str, torch.Tensor] = {}
            for s in shards:
                if not (path / s).is_file():
                    raise UserError(f"shard {s} listed in {index.name} is missing in {path}")
                sd.update(load_file(str(path / s)))
            return sd
        others = sorted(path.glob("*.safetensors"))
        if len(others) == 1:
            return load_file(str(others[0]))
    except (SafetensorError, OSError, json.JSONDecodeError, KeyError) as e:
        raise UserError(f"cannot read the safetensors weights in {path}: {e}")
    binf = path / "pytorch_model.bin"
    if binf.is_file():
        try:
            return torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unpickling failure is a corrupt/unsafe file
            raise UserError(f"cannot load {binf} with weights_only=True: {e}")
    raise UserError(f"no weights in {path}: expected model.safetensors or model.safetensors.index.json")


def load_model(path: str | Path, dtype: str | torch.dtype | None = "auto", device: str | None = "auto") -> Transformer:
    """Load an HF-layout checkpoint directory (config.json + safetensors) into our Transformer."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    cfg = ModelConfig.from_dict(read_config(path))
    sd = load_state_dict(path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device=dev)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
        model.lm_head.weight = model.model.embed_tokens.weight
    expected = model.state_dict()
    if cfg.tie_word_embeddings:
        expected.pop("lm_head.weight")
    copy_weights(expected, sd, f"checkpoint {path}")
    model = model.to(dt).eval()
    model.requires_grad_(False)
    return model


@torch.no_grad()
def copy_weights(expected: dict[str, torch.Tensor], sd: dict[str, torch.Tensor], what: str) -> None:
    """Copy every tensor of `expected` (a module's state_dict, or the part of it a checkpoint holds)
    from the checkpoint's `sd`, in place and cast to the module's dtype; a missing tensor or another
    shape is a one-line UserError naming `what` (e.g. "checkpoint DIR"). Keys of `sd` that `expected`
    lacks are ignored."""
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise UserError(f"{what} lacks {len(missing)} tensors, e.g. {missing[0]}")
    for name, p in expected.items():
        if tuple(sd[name].shape) != tuple(p.shape):
            raise UserError(f"{what}: {name} has shape {tuple(sd[name].shape)}, config implies {tuple(p.shape)}")
        p.copy_(sd[name].to(p.dtype))


def init_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> nn.Module:
    """Random init (norms 1, biases 0, the rest N(0, std)) for from-config models and fresh draft heads."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def save_checkpoint(path: str | Path, state_dict: dict[str, torch.Tensor], config: dict) -> None:
    """Write config.json + model.safetensors (HF layout), atomically per file: the model core's,
    draft heads' and drafters' checkpoints all go through here."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    tmp = path / "model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / "model.safetensors")
    cfg_tmp = path / "config.json.tmp"
    cfg_tmp.write_text(json.dumps(config, indent=2))
    cfg_tmp.replace(path / "config.json")


def save_model(model: Transformer, path: str | Path) -> None:
    """Write config.json + model.safetensors (HF layout), atomically per file."""
    sd = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    save_checkpoint(path, sd, model.config.extra)
