"""Plain next-token (AR) objective: causal LM loss over packed sequences. Used to pretrain the base
that the TiDAR, block-diffusion and EAGLE recipes continue from (the embedded model suite)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..masks import ar_mod, doc_positions
from ..model import Transformer, load_model, save_model
from .data import unpack
from .masking import attention_mask, label_ce


class AutoregressiveObjective:
    name = "ar"
    mask_kind = "dense"  # or "block": FlexAttention block masks (long context, `masking.attention_mask`)

    def __init__(self, model: Transformer, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        model.requires_grad_(True)

    @classmethod
    def from_checkpoint(cls, base: str | Path, tokenizer, device: str = "auto") -> "AutoregressiveObjective":
        return cls(load_model(base, "float32", device), tokenizer)

    def module(self) -> Transformer:
        return self.model

    def loss(self, trainable, batch):
        """Next-token CE; with documents (`Batch.doc`) attention and positions stay within each
        document and a document's last token does not predict the next one's first; with `keep`
        only the kept tokens are predicted."""
        ids, doc, keep = unpack(batch)
        if doc is None and self.mask_kind == "dense":
            logits = trainable(ids).logits  # no mask = causal
        else:
            docs = doc if doc is not None else torch.zeros_like(ids)
            mask = attention_mask(ar_mod(docs), *ids.shape, ids.shape[1], ids.device, self.mask_kind)
            logits = trainable(ids, doc_positions(docs), mask).logits
        return label_ce(logits[:, :-1], ids[:, 1:], doc, keep), {}

    def save(self, out_dir: Path) -> None:
        save_model(self.model, out_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
