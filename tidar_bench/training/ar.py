"""Plain next-token (AR) objective: causal LM loss over packed sequences. Used to pretrain the base
that the TiDAR, block-diffusion and EAGLE recipes continue from (the embedded model suite)."""

from __future__ import annotations

from pathlib import Path

import torch.nn.functional as F

from ..model import Transformer, load_model, save_model


class AutoregressiveObjective:
    name = "ar"

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
        logits = trainable(batch).logits  # no mask = causal
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        return loss, {}

    def save(self, out_dir: Path) -> None:
        save_model(self.model, out_dir)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(out_dir))
