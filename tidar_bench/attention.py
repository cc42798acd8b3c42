"""Attention backends. All take q [B, H, q, D], k/v [B, Hkv, T, D] and a mask that is None
(attend to every key), the string "causal" (causal over the last q keys, full access to the
earlier ones) or a bool tensor [B|1, 1, q, T] (True = attend), and return [B, H, q, D].

- "sdpa": torch.nn.functional.scaled_dot_product_attention with boolean masks (every device).
- "math": matmul + masked softmax + matmul (compiled static steps on CPU, see `math`).
- "flex": FlexAttention with a block mask built from the same boolean mask (CUDA; also runs on
  CPU, where tests compare it with sdpa). Opt-in (TIDAR_BENCH_ATTN=flex): without compiled
  kernels and a cached block mask it is not faster than sdpa for per-step masks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

_HAS_GQA = tuple(int(x) for x in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 5)


def _expand_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
    rep = q.shape[1] // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def _dense(mask, q_len: int, kv_len: int, device) -> torch.Tensor | None:
    if mask is None:
        return None
    if isinstance(mask, str):  # "causal" with a cached prefix
        i = torch.arange(q_len, device=device)[:, None]
        j = torch.arange(kv_len, device=device)[None, :]
        return (j <= i + (kv_len - q_len))[None, None]
    return mask


def sdpa(q, k, v, mask):
    q_len, kv_len = q.shape[2], k.shape[2]
    kw = {}
    if _HAS_GQA and k.shape[1] != q.shape[1]:
        kw["enable_gqa"] = True
    else:
        k, v = _expand_kv(q, k, v)
    if isinstance(mask, str) and q_len == kv_len:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **kw)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_dense(mask, q_len, kv_len, q.device), **kw)


def math(q, k, v, mask):
    """Plain attention (matmul, masked softmax in fp32, matmul) with grouped heads folded into the
    query rows. What compiled static steps use on CPU: there inductor fuses it into a few kernels,
    while SDPA's CPU flash kernel costs hundreds of microseconds per call for a 1-token query over
    the whole static cache. A 1-token query (every `ar` step) is written as products summed over
    D (scores) and over the keys (output) instead of two matmuls: inductor then fuses each into one
    loop that reads the cache's keys and values in place, where the matmuls were library calls on a
    copy of them (docs/speed.md, "Compiled decoding"). mask: None, or bool [B|1, 1, q, T]."""
    B, H, qn, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    rep = H // Hkv
    qg = q.reshape(B, Hkv, rep * qn, D)
    if qn == 1:
        scores = (qg[:, :, :, None, :] * k[:, :, None]).float().sum(-1) * D ** -0.5
    else:
        scores = (qg @ k.transpose(-1, -2)).float() * D ** -0.5
    if mask is not None:
        if isinstance(mask, str):
            mask = _dense(mask, qn, T, q.device)
        scores = scores.view(B, Hkv, rep, qn, T).masked_fill(~mask[:, :, None], float("-inf")).view(B, Hkv, rep * qn, T)
    probs = scores.softmax(-1).to(v.dtype)
    out = (probs[..., None] * v[:, :, None]).sum(-2) if qn == 1 else probs @ v
    return out.view(B, H, qn, D)


def flex(q, k, v, mask):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    q_len, kv_len = q.shape[2], k.shape[2]
    dense = _dense(mask, q_len, kv_len, q.device)
    block_mask = None
    if dense is not None:
        d = dense[0, 0]

        def mask_mod(b, h, qi, kvi):
            return d[qi, kvi]

        block_mask = create_block_mask(mask_mod, None, None, q_len, kv_len, device=q.device)
    k, v = _expand_kv(q, k, v)
    return flex_attention(q, k, v, block_mask=block_mask)


def is_block_mask(mask) -> bool:
    return type(mask).__name__ == "BlockMask"


_compiled_flex = None


def flex_block(q, k, v, block_mask):
    """FlexAttention under a prebuilt BlockMask (training masks from `masks.block_mask`): only the
    tiles the mask touches are computed and no n x n mask exists. Compiled on CUDA (the fused
    kernel); eager elsewhere (CPU tests: correct, not memory-saving)."""
    global _compiled_flex
    from torch.nn.attention.flex_attention import flex_attention

    fn = flex_attention
    if q.device.type == "cuda":
        if _compiled_flex is None:
            _compiled_flex = torch.compile(flex_attention)
        fn = _compiled_flex
    gqa = k.shape[1] != q.shape[1]
    return fn(q, k, v, block_mask=block_mask, enable_gqa=gqa) if gqa else fn(q, k, v, block_mask=block_mask)


def flex_available() -> bool:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


BACKENDS = {"sdpa": sdpa, "flex": flex, "math": math}


def select_backend(name: str = "auto", device: torch.device | str = "cpu"):
    """`auto` honours TIDAR_BENCH_ATTN, else sdpa."""
    if name == "auto":
        name = os.environ.get("TIDAR_BENCH_ATTN", "sdpa")
    if name == "flex" and not flex_available():
        raise ValueError("FlexAttention is not available in this torch build")
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose from {', '.join(BACKENDS)}")
    return BACKENDS[name]
