"""What the objectives share for packed rows: the attention mask of a batch (dense or FlexAttention
block mask, from the mask predicates in `tidar_bench.masks`) and the cross-entropy over the tokens
that count (same document, kept by loss_on)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import UserError

MASK_KINDS = ("dense", "block")


def attention_mask(mod, batch: int, q_len: int, kv_len: int, device, kind: str = "dense"):
    """The mask predicate `mod` for a forward: a bool [batch, 1, q, kv] tensor ("dense", SDPA) or a
    FlexAttention BlockMask ("block": O((n/128)^2) memory, what makes 8K TiDAR rows fit)."""
    from .. import masks

    if kind == "dense":
        return masks.dense(mod, batch, q_len, kv_len, device)
    if kind == "block":
        return masks.block_mask(mod, batch, q_len, kv_len, device)
    raise UserError(f"unknown attention mask kind {kind!r}; use {' or '.join(MASK_KINDS)}")


def label_ce(logits: torch.Tensor, labels: torch.Tensor, doc: torch.Tensor | None = None,
             keep: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token CE of logits [B, n, V] for labels [B, n] (logits row i predicts label i,
    the token after it), over the labels that count: `keep` [B, n+1] (the label's own flag) and,
    with `doc` [B, n+1], only where label and predictor share a document. No counted label: 0."""
    V = logits.shape[-1]
    if doc is None and keep is None:
        return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1))
    count = torch.ones_like(labels, dtype=torch.bool)
    if doc is not None:
        count &= doc[:, 1:] == doc[:, :-1]
    if keep is not None:
        count &= keep[:, 1:]
    ce = F.cross_entropy(logits[count], labels[count], reduction="sum")
    return ce / count.sum().clamp_min(1)
