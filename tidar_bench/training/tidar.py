"""TiDAR dual-mode objective ("full mask"), arXiv 2511.08923.

Each sequence x_0..x_{S-1} is doubled into [x | S mask tokens] with position ids [0..S-1, 0..S-1]
and read in ONE forward under `masks.tidar_training(S, k)`:
- clean position i attends causally and predicts x_{i+1}   -> L_AR  (mean over S-1 positions);
- mask position i (block b = i // k) attends to clean tokens before b*k and to its own block,
  and predicts x_i, the clean token at the same position   -> L_Diff (mean over S positions).
loss = (alpha * L_AR + L_Diff) / (1 + alpha).

Packed rows with documents (`--doc-attention`): both halves attend only within their document,
positions and blocks restart at each document (`masks.tidar_mod`), and L_AR skips a document's last
token (it would predict the next document). With `keep` (loss_on="completion") L_AR counts the kept
labels and L_Diff the kept positions.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint import TidarConfig
from ..errors import UserError
from ..masks import doc_positions, tidar_mod, tidar_training
from ..model import Transformer, load_model, save_model
from .data import add_mask_token, unpack
from .masking import attention_mask, label_ce


class TidarObjective:
    name = "tidar"
    mask_kind = "dense"  # or "block": FlexAttention block masks (long context, `masking.attention_mask`)

    def __init__(self, model: Transformer, tokenizer, block_size: int = 8, alpha: float = 1.0,
                 mask_token_id: int | None = None):
        if block_size < 1:
            raise ValueError(f"block size must be >= 1, got {block_size}")
        if alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {alpha}")
        self.model = model
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.alpha = alpha
        self.mask_id = mask_token_id if mask_token_id is not None else add_mask_token(model, tokenizer)
        self._masks: dict[int, torch.Tensor] = {}
        model.requires_grad_(True)

    @classmethod
    def from_checkpoint(cls, base: str | Path, tokenizer, device: str = "auto", block_size: int | None = None,
                        **kw) -> "TidarObjective":
        """An AR base gets a new [MASK] token and block size 8 unless given; a TiDAR base (its
        tidar_config.json, or a released TiDAR-LM checkpoint's preset) keeps its mask token and,
        unless given, its block size: training continues in its convention."""
        try:
            cfg, _ = TidarConfig.resolve(base)
        except UserError:
            cfg = None
        if cfg is not None:
            kw.setdefault("mask_token_id", cfg.mask_token_id)
        k = block_size if block_size is not None else (cfg.block_size if cfg is not None else 8)
        return cls(load_model(base, "float32", device), tokenizer, block_size=k, **kw)

    def module(self) -> Transformer:
        return self.model

    def inputs(self, batch: torch.Tensor, doc: torch.Tensor | None = None):
        """(ids [B, 2S], position ids [2S] or [B, 2S], mask) of the doubled sequence: [2S, 2S] when
        one mask serves every row, else per row (documents) or a block mask."""
        B, S = batch.shape
        ids = torch.cat([batch, torch.full_like(batch, self.mask_id)], 1)
        if doc is None and self.mask_kind == "dense":
            mask = self._masks.get(S)
            if mask is None:
                mask = self._masks[S] = tidar_training(S, self.block_size, batch.device)
            return ids, torch.arange(S, device=batch.device).repeat(2), mask
        doc = doc if doc is not None else torch.zeros_like(batch)
        pos = doc_positions(doc)
        mask = attention_mask(tidar_mod(doc, pos, self.block_size), B, 2 * S, 2 * S, batch.device, self.mask_kind)
        return ids, pos.repeat(1, 2), mask

    def loss(self, trainable, batch):
        batch, doc, keep = unpack(batch)
        S = batch.shape[1]
        ids, pos, mask = self.inputs(batch, doc)
        logits = trainable(ids, pos, mask).logits
        V = logits.shape[-1]
        l_ar = label_ce(logits[:, : S - 1], batch[:, 1:], doc, keep)
        if keep is None:
            l_diff = F.cross_entropy(logits[:, S:].reshape(-1, V), batch.reshape(-1))
        else:
            l_diff = F.cross_entropy(logits[:, S:][keep], batch[keep], reduction="sum") / keep.sum().clamp_min(1)
        loss = (self.alpha * l_ar + l_diff) / (1 + self.alpha)
        return loss, {"ar": l_ar.detach(), "diff": l_diff.detach()}

    def save(self, out_dir: Path) -> None:
        save_model(self.model, out_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
        TidarConfig(self.mask_id, self.block_size, self.alpha).save(out_dir)
